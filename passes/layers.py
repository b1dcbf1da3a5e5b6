"""The weight layers of a graph, named and filtered: the one layer selection
that every pass acting per layer (``quantize``, pruning) shares.

A layer is an ``aten.linear(x, W, b)`` or an ``aten.embedding(W, ids)``
whose ``W`` is a constant 2-D floating-point tensor, named after the module
that called it (``transformer.h.0.attn.c_attn``, from torch.export's
``nn_module_stack``; the node's name for ops of the top-level module)::

    selection = select_layers(graph, include=r"\\.mlp\\.", min_size=4096)
    for layer in selection.selected:
        ...  # layer.node, layer.name, layer.weight
    selection.skipped  # {"excluded": 3, "lm-head": 1, ...}

A pass offers the same filters as options by deriving from
:class:`LayerFilterOptions` and calling ``self.select_layers(graph)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..ir.nodes import module_path
from .base import Option, Pass

aten = torch.ops.aten

LAYER_KINDS = ("linear", "embedding")
# Names an output projection goes by in the model families fxopt traces.
LM_HEAD_NAME = re.compile(r"(^|[._])(lm_head|head|output|classifier)$")
# What may stand between a mixture of experts' router linear and the topk
# that picks the experts: a softmax or sigmoid, a cast, a view, a bias.
ROUTER_STEPS = {aten.softmax.int, aten._softmax.default, aten.sigmoid.default, aten._to_copy.default,
                aten.to.dtype, aten.view.default, aten.reshape.default, aten.add.Tensor}


class LayerSelectionError(ValueError):
    """A filter that selects nothing it names (a typo in a regex, most often)."""


@dataclass
class Layer:
    """One weight layer. ``config`` is what the pass that selected it decided
    for it (``quantize``: a :class:`~fxopt.passes.quantize.LayerConfig`)."""

    node: fx.Node  # aten.linear(x, weight, bias) or aten.embedding(weight, ids)
    name: str
    kind: str  # "linear" | "embedding"
    weight_node: fx.Node
    weight: torch.Tensor
    cfg: Any = None

    @property
    def x(self) -> fx.Node:
        return self.node.args[0]

    @property
    def bias(self) -> fx.Node | None:
        return self.node.args[2] if len(self.node.args) > 2 else None


@dataclass
class LayerSelection:
    """``candidates``: every layer of the chosen kinds with a constant weight
    (the LM head left out when skipped); ``selected``: those the filters kept;
    ``skipped``: how many layers each reason left out."""

    candidates: list[Layer] = field(default_factory=list)
    selected: list[Layer] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def regex_problem(value: str) -> str | None:
    """Why ``value`` is not a regular expression, or None (an Option check)."""
    try:
        re.compile(value)
    except re.error as e:
        return f"invalid regular expression: {e}"
    return None


def layer_name(node: fx.Node) -> str:
    return module_path(node)


def is_router(node: fx.Node, steps: int = 4) -> bool:
    """Whether ``node``'s output chooses experts: it reaches an ``aten.topk``
    within ``steps`` of :data:`ROUTER_STEPS` (Mixtral, Qwen2-MoE and OLMoE:
    softmax then topk; DeepSeek's: sigmoid, a bias, then topk)."""
    frontier = [node]
    for _ in range(steps):
        frontier = [u for n in frontier for u in n.users]
        if any(u.target == aten.topk.default for u in frontier):
            return True
        frontier = [u for u in frontier if u.target in ROUTER_STEPS]
    return False


def select_layers(graph, *, kinds: tuple[str, ...] = ("linear",), include: str | None = None, exclude: str | None = None,
                  min_size: int = 0, skip_lm_head: bool = True, skip_router: bool = True) -> LayerSelection:
    """The layers of ``graph`` of the given ``kinds`` that the filters keep.

    * ``include`` / ``exclude``: regular expressions searched (``re.search``)
      in the layer's name;
    * ``min_size``: weights with fewer elements are left out;
    * ``skip_lm_head``: leaves out the output projection (a linear named
      ``lm_head``/``head``/``output``/``classifier``, or one reading an
      embedding table: a tied head) and an embedding table an LM head reads;
    * ``skip_router``: leaves out a mixture of experts' router (a linear
      whose scores pick experts through ``topk``, :func:`is_router`): a small
      weight whose error changes which experts a token meets.

    Weights that are not constant 2-D float tensors are skipped as
    ``weight-not-constant``. Raises :class:`LayerSelectionError` when
    ``include`` or ``exclude`` matches no candidate (it names them).
    """
    unknown = set(kinds) - set(LAYER_KINDS)
    if unknown:
        raise ValueError(f"layer kinds are {list(LAYER_KINDS)}, got {sorted(unknown)}")
    out = LayerSelection()
    targets = {aten.linear.default: "linear", aten.embedding.default: "embedding"}
    embedding_tables = {id(t) for n in graph.fx.nodes if n.target == aten.embedding.default
                        for t in [graph.constant(n.args[0])] if t is not None}
    linear_weights = {id(t) for n in graph.fx.nodes if n.target == aten.linear.default
                      for t in [graph.constant(n.args[1])] if t is not None}
    for node in list(graph.fx.nodes):
        kind = targets.get(node.target) if node.op == "call_function" else None
        if kind not in kinds:
            continue
        wnode = node.args[1] if kind == "linear" else node.args[0]
        weight = graph.constant(wnode)
        if weight is None or weight.dim() != 2 or not weight.is_floating_point():
            out.skip("weight-not-constant")
            continue
        layer = Layer(node, layer_name(node), kind, wnode, weight)
        if skip_lm_head and kind == "linear" and (LM_HEAD_NAME.search(layer.name) or id(weight) in embedding_tables):
            out.skip("lm-head")
            continue
        if skip_lm_head and kind == "embedding" and id(weight) in linear_weights:
            out.skip("tied-lm-head")
            continue
        if skip_router and kind == "linear" and is_router(node):
            out.skip("router")
            continue
        out.candidates.append(layer)
    names = [l.name for l in out.candidates]
    for label, pattern in (("include", include), ("exclude", exclude)):
        if pattern is not None and not any(re.search(pattern, n) for n in names):
            raise LayerSelectionError(f"option {label}={pattern!r} matches no layer; layers: {names}")
    for layer in out.candidates:
        if include is not None and not re.search(include, layer.name):
            out.skip("not-included")
        elif exclude is not None and re.search(exclude, layer.name):
            out.skip("excluded")
        elif layer.weight.numel() < min_size:
            out.skip("below-min-size")
        else:
            out.selected.append(layer)
    return out


class LayerFilterOptions(Pass):
    """The layer filters as pass options (``include``, ``exclude``,
    ``min_size``, ``skip_lm_head``, ``skip_router``); a pass derives from this class and calls
    :meth:`select_layers`. Not a pass by itself (it registers no name)."""

    include = Option(None, str, check=regex_problem, help="regex: only layers whose name matches (re.search)")
    exclude = Option(None, str, check=regex_problem, help="regex: skip layers whose name matches")
    min_size = Option(0, int, check=lambda v: None if v >= 0 else "must be >= 0", help="skip weights with fewer elements")
    skip_lm_head = Option(True, help="leave the LM head (output projection or tied embedding) alone")
    skip_router = Option(True, help="leave mixture-of-experts routers (a linear whose scores pick experts by topk) alone")

    def select_layers(self, graph, kinds: tuple[str, ...] = ("linear",)) -> LayerSelection:
        """:func:`select_layers` with this pass's options; a filter that
        matches nothing fails the pass with the layers' names."""
        try:
            return select_layers(graph, kinds=kinds, include=self.include, exclude=self.exclude,
                                 min_size=self.min_size, skip_lm_head=self.skip_lm_head,
                                 skip_router=self.skip_router)
        except LayerSelectionError as e:
            raise self.fail(str(e)) from None
