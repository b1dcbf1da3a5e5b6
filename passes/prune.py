"""``prune``: sets weights of linear layers (optionally embedding tables) to
exactly zero, ``W <- W * mask``, choosing the mask from a score.

Methods (one table, :data:`METHODS`):

* ``magnitude``: score ``|W|``, compared over the whole layer.
* ``wanda``: score ``|W_ij| * ||X_j||_2`` (the input's per-channel norm over
  the calibration rows), compared within each output row (Sun et al., "A
  Simple and Effective Pruning Approach for Large Language Models", 2024).
* ``sparsegpt``: column by column, the weights with the smallest
  ``W_ij^2 / [H^-1]_jj^2`` in each block of columns are removed and the error
  is spread over the columns not yet visited through the inverse Hessian
  ``(X^T X)^-1``, as GPTQ does for rounding (Frantar and Alistarh, "SparseGPT",
  2023). The kept weights change; the error on the calibration inputs falls.

Patterns: ``unstructured`` (``ratio`` of the weights, per layer or with one
``threshold=global`` over every selected layer) and ``N:M`` (at most N
non-zeros in every M consecutive input channels of a row: 2:4, 4:8).

The mask math is in plain functions (:func:`unstructured_mask`,
:func:`nm_mask`, :func:`wanda_scores`, :func:`sparsegpt_prune`) that the tests
check against the papers' algorithms.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from .base import Option, OptionError, PassResult
from .fusion import fuse_linear_act, split_linear_act
from .layers import Layer, LayerFilterOptions
from .quantize.calibration import LinearStats, calibrate_sequentially, collect_linear_stats
from .quantize.methods import GPTQ_DAMP, inverse_hessian_factor
from .registry import register_pass

aten = torch.ops.aten

SPARSEGPT_BLOCK = 128  # columns whose mask is chosen together (the paper's B_s)


# -- masks ----------------------------------------------------------------------------

def parse_pattern(text: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> ``(N, M)`` (N kept of M)."""
    if text == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", text)
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"pattern is 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def prune_count(total: int, ratio: float) -> int:
    """How many of ``total`` weights a ``ratio`` removes (rounded down)."""
    return int(math.floor(total * ratio + 1e-9))


def unstructured_mask(scores: torch.Tensor, ratio: float, per_row: bool = False) -> torch.Tensor:
    """Keep-mask removing exactly ``floor(ratio * count)`` lowest scores of the
    whole tensor (or of each row); ties go to the lower index."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    rows = scores.reshape(scores.shape[0], -1) if per_row else scores.reshape(1, -1)
    drop = prune_count(rows.shape[1], ratio)
    if drop:
        order = torch.argsort(rows, dim=1, stable=True)[:, :drop]
        keep.view(rows.shape).scatter_(1, order, False)
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the ``n`` highest scores of every ``m`` consecutive
    entries along the last dimension (which ``m`` must divide)."""
    rows, k = scores.shape
    if k % m:
        raise ValueError(f"N:M sparsity with M={m} needs the input dimension to be a multiple of {m}, got {k}")
    groups = scores.reshape(rows, k // m, m)
    order = torch.argsort(groups, dim=-1, stable=True)[..., : m - n]
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order, False)
    return keep.reshape(rows, k)


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||``: a weight matters as much as what it multiplies."""
    return weight.abs().float() * input_norm.float()[None, :]


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, *, ratio: float = 0.0, nm: tuple[int, int] | None = None,
                    block: int = SPARSEGPT_BLOCK, damp: float = GPTQ_DAMP) -> torch.Tensor:
    """SparseGPT's pruning with weight reconstruction; returns the new weight
    (float32) with exactly zeroed pruned entries.

    Unstructured: each block of ``block`` columns removes its share of
    ``floor(ratio * N * K)`` (shares sum exactly to it) with the smallest
    ``w^2 / [H^-1]_jj^2`` among the block's columns as they stand when the
    block starts; N:M: the same score chooses within every ``M`` columns when
    the first of them is reached. ``hessian``: ``X^T X / rows`` of the input.
    """
    W = weight.detach().double().clone()
    rows, k = W.shape
    Hinv, _ = inverse_hessian_factor(hessian, damp)
    total = prune_count(rows * k, ratio) if nm is None else 0
    pruned = torch.zeros(rows, k, dtype=torch.bool)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        W1 = W[:, b0:b1].clone()
        Err = torch.zeros_like(W1)
        Hb = Hinv[b0:b1, b0:b1]
        mask = torch.zeros_like(W1, dtype=torch.bool)  # True: pruned
        if nm is None:
            share = round(total * b1 / k) - round(total * b0 / k)
            if share:
                score = (W1.pow(2) / torch.diag(Hb).pow(2)[None, :]).flatten()
                mask.view(-1)[torch.argsort(score, stable=True)[:share]] = True
        for j in range(b1 - b0):
            if nm is not None and j % nm[1] == 0:
                cols = slice(j, j + nm[1])
                score = W1[:, cols].pow(2) / torch.diag(Hb)[cols].pow(2)[None, :]
                mask[:, cols] = ~nm_mask(score, nm[0], nm[1])
            w = W1[:, j]
            q = w.masked_fill(mask[:, j], 0.0)
            err = (w - q) / Hb[j, j]
            W1[:, j:] -= err[:, None] * Hb[j, j:][None, :]
            W1[:, j] = q
            Err[:, j] = err
        W[:, b0:b1] = W1
        W[:, b1:] -= Err @ Hinv[b0:b1, b1:]
        pruned[:, b0:b1] = mask
    return W.masked_fill(pruned, 0.0).float()


# -- methods ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """``prune(weight, group) -> new weight``: ``group`` is the
    :class:`WeightGroup` (its score comparison settings and calibration)."""

    prune: Callable[["Prune", torch.Tensor, "WeightGroup"], torch.Tensor]
    needs_calibration: bool = False
    # scores(weight, group) -> tensor: what a global threshold compares (None: no global threshold)
    scores: Callable[[torch.Tensor, "WeightGroup"], torch.Tensor] | None = None
    per_row: bool = False  # compare scores within each output row (Wanda)


@dataclass
class WeightGroup:
    """One weight tensor and the selected layers (calls) that read it."""

    layers: list[Layer]
    hessian: torch.Tensor | None = None  # X^T X / rows over every call, float64
    keep: torch.Tensor | None = None  # a mask chosen beforehand (global threshold)

    @property
    def first(self) -> Layer:
        return self.layers[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.first.weight


def _magnitude_scores(weight, group):
    return weight.abs().float()


def _wanda_input_norm(group: WeightGroup) -> torch.Tensor:
    return torch.diag(group.hessian).clamp(min=0).sqrt().float()


def _wanda_scores(weight, group):
    return wanda_scores(weight, _wanda_input_norm(group))


def _masked(scores_of):
    """A method that keeps the highest ``scores_of(weight, group)`` and leaves the kept weights as they are."""

    def prune(pass_, weight, group):
        if group.keep is None:
            scores = scores_of(weight, group)
            nm = pass_.nm
            keep = nm_mask(scores, *nm) if nm else unstructured_mask(scores, pass_.ratio, per_row=METHODS[pass_.method].per_row)
        else:
            keep = group.keep
        return weight.float() * keep
    return prune


def _sparsegpt(pass_, weight, group):
    return sparsegpt_prune(weight, group.hessian, ratio=pass_.ratio, nm=pass_.nm, block=pass_.block_size, damp=pass_.damp)


METHODS: dict[str, Method] = {
    "magnitude": Method(_masked(_magnitude_scores), scores=_magnitude_scores),
    "wanda": Method(_masked(_wanda_scores), needs_calibration=True, scores=_wanda_scores, per_row=True),
    "sparsegpt": Method(_sparsegpt, needs_calibration=True),
}


def _pattern_problem(v) -> str | None:
    try:
        parse_pattern(v)
    except ValueError as e:
        return str(e)
    return None


# -- the pass ------------------------------------------------------------------------

@register_pass("prune")
class Prune(LayerFilterOptions):
    """Sets weights of ``aten.linear`` layers (and, with ``embeddings``,
    ``aten.embedding`` tables) to exactly zero.

    Matches: the layers ``quantize`` would select with the same filters
    (``include``, ``exclude``, ``min_size``, ``skip_lm_head``), constant 2-D
    float weights. A weight read by several selected layers (a layer called
    twice) is pruned once, on the inputs of all its calls.

    Produces: the same graph with each selected weight replaced by a new
    constant holding ``W * mask`` (SparseGPT: the reconstructed kept weights
    times the mask); every other node and constant is untouched. Zeros stay
    exactly zero through ``quantize`` (0 is a code of every scheme).
    Embedding tables are pruned by magnitude whatever the method (a lookup has
    no input activation to weigh).

    Stats: per layer ``sparsity`` (zeros / elements) and ``rel_err``, the
    relative output error ``||X (W - W')^T|| / ||X W^T||`` on the calibration
    inputs (the graph's example inputs when none are given; for embeddings the
    weight's relative error); overall ``sparsity`` of the selected weights.

    Refuses: N:M on a layer whose input dimension M does not divide (names the
    layer: exclude it); ``threshold=global`` with ``sparsegpt`` (its mask is
    chosen while the weights change); filters that match no layer. ``ratio=0``
    leaves the graph as it was.
    """

    method = Option("magnitude", str, choices=tuple(METHODS), help="magnitude | wanda | sparsegpt")
    ratio = Option(0.5, float, check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
                   help="pattern=unstructured: fraction of each selected weight set to zero")
    pattern = Option("unstructured", str, check=_pattern_problem, help="unstructured | N:M (N kept of every M input channels: 2:4, 4:8)")
    threshold = Option("layer", str, choices=("layer", "global"),
                       help="unstructured: compare scores within each layer (Wanda: each output row) or across all selected layers")
    embeddings = Option(False, help="prune embedding tables too (by magnitude)")
    block_size = Option(SPARSEGPT_BLOCK, int, check=lambda v: None if v >= 1 else "must be >= 1",
                        help="sparsegpt: columns whose mask is chosen together")
    damp = Option(GPTQ_DAMP, float, check=lambda v: None if v >= 0 else "must be >= 0",
                  help="sparsegpt: fraction of mean(diag H) added to H's diagonal")
    sequential = Option(True, help="wanda, sparsegpt: calibrate each layer on the inputs the already-pruned layers produce "
                                   "(false: every layer on the unpruned model's inputs, one calibration run)")

    runs_after = ("canonicalize",)
    runs_before = ("quantize",)
    requires = ("canonical-linear",)
    numerics_tolerance = 1.0  # removing half the weights moves outputs by design

    def validate_options(self) -> None:
        self.nm = parse_pattern(self.pattern)
        if self.nm and "ratio" in self.given_options:
            raise OptionError(f"pass 'prune': option 'ratio' applies to pattern=unstructured; pattern {self.pattern} "
                              f"removes {self.nm[1] - self.nm[0]} of every {self.nm[1]}")
        if self.nm and self.threshold == "global":
            raise OptionError("pass 'prune': threshold=global applies to pattern=unstructured (N:M chooses within each group)")
        if self.threshold == "global" and METHODS[self.method].scores is None:
            raise OptionError(f"pass 'prune': method {self.method!r} chooses its mask while it updates the weights and "
                              "cannot share one threshold across layers (threshold=global); use threshold=layer, or method magnitude or wanda")

    def required_inputs(self) -> tuple[str, ...]:
        return ("calibration_data",) if METHODS[self.method].needs_calibration else ()

    def _noop(self) -> bool:
        return self.nm is None and self.ratio == 0

    def run(self, graph) -> PassResult:
        if self._noop():
            return PassResult(False, {"pruned": 0, "sparsity": 0.0})
        split = split_linear_act(graph, pass_=self)  # fxopt.linear_act: prune its linear, fuse it again
        try:
            return self._run(graph)
        finally:
            if split:
                fuse_linear_act(graph, split, pass_=self)

    def _run(self, graph) -> PassResult:
        selection = self.select_layers(graph, ("linear", "embedding") if self.embeddings else ("linear",))
        selected, skipped = selection.selected, selection.skipped
        groups: dict[int, WeightGroup] = {}
        for layer in selected:
            groups.setdefault(id(layer.weight), WeightGroup([])).layers.append(layer)
        if self.nm:  # check every layer before the first edit
            for group in groups.values():
                k = group.weight.shape[1]
                if k % self.nm[1]:
                    raise self.fail(f"layer {group.first.name!r} (weight {tuple(group.weight.shape)}): pattern {self.pattern} needs "
                                    f"the input dimension to be a multiple of {self.nm[1]}; leave the layer out (exclude=..., min_size=...)",
                                    group.first.node)
        per_layer: dict[str, dict] = {}
        totals = [0, 0]  # zeros, elements

        def prune(group: WeightGroup, erase: bool = True) -> None:
            self.current_node = group.first.node
            if group.first.kind == "embedding":
                scores = group.weight.abs().float()
                keep = group.keep if group.keep is not None else (
                    nm_mask(scores, *self.nm) if self.nm else unstructured_mask(scores, self.ratio))
                new = group.weight.float() * keep
            else:
                new = METHODS[self.method].prune(self, group.weight, group)
            self._replace(graph, group, new.to(group.weight.dtype), per_layer, totals, erase)

        if self._sequential():
            # Embedding tables first (by magnitude, no calibration): the linears are calibrated behind them.
            linear_groups = [g for g in groups.values() if g.first.kind == "linear"]
            for group in groups.values():
                if group.first.kind != "linear":
                    self._attach_hessians(graph, [group])
                    prune(group)
            self._prune_sequentially(graph, linear_groups, prune)
        else:
            self._attach_hessians(graph, list(groups.values()))
            if self.threshold == "global":
                self._global_masks(list(groups.values()))
            for group in groups.values():
                prune(group)
        zeros, total = totals
        self.current_node = None
        stats = {"pruned": len(per_layer), "skipped": skipped, "sparsity": round(zeros / total, 6) if total else 0.0,
                 "layers": per_layer}
        return PassResult(bool(per_layer), stats)

    def _sequential(self) -> bool:
        return self.sequential and METHODS[self.method].needs_calibration and self.threshold == "layer"

    def _prune_sequentially(self, graph, groups: list[WeightGroup], prune) -> None:
        """Each group is pruned when the calibration run reaches its last call,
        on the inputs of all its calls as the graph then stands (the layers
        before it already pruned); the rest of the run computes with the pruned
        weight. The replaced weight constants are erased after the run."""
        by_node = {l.node: g for g in groups for l in g.layers if l.kind == "linear"}
        seen: dict[int, list[LinearStats]] = {}

        def visit(node, stats: LinearStats) -> None:
            group = by_node[node]
            calls = seen.setdefault(id(group), [])
            calls.append(stats)
            if len(calls) == sum(1 for l in group.layers if l.kind == "linear"):
                rows = sum(s.rows for s in calls)
                group.hessian = sum(s.hessian * s.rows for s in calls) / max(rows, 1)
                prune(group, erase=False)

        calibrate_sequentially(graph, self._calibration(graph), list(by_node), visit, progress=self.progress)
        for node in {l.weight_node: None for g in groups for l in g.layers}:
            if not node.users:
                graph.fx.erase_node(node)

    def _replace(self, graph, group: WeightGroup, new: torch.Tensor, per_layer: dict, totals: list, erase: bool) -> None:
        """Every call of ``group`` reads ``new`` in place of its weight; the record goes to ``per_layer``."""
        record = self._record(group, new)
        node = graph.add_constant(new, f"{group.first.name}.weight")
        for layer in group.layers:
            layer.node.replace_input_with(layer.weight_node, node)
            if erase and not layer.weight_node.users:
                graph.fx.erase_node(layer.weight_node)
        for layer in group.layers:
            key, calls = layer.name, 1
            while key in per_layer:
                calls += 1
                key = f"{layer.name}#{calls}"
            per_layer[key] = record
        totals[0] += int((new == 0).sum())
        totals[1] += new.numel()

    def _calibration(self, graph) -> list:
        data = self.context.get("calibration_data")
        if data is None:
            if graph.example_args and graph.example_kwargs:
                raise self.fail("the graph's example inputs mix positional and keyword inputs; give calibration_data")
            data = [graph.example_kwargs if graph.example_kwargs else graph.example_args]
        return data

    def _attach_hessians(self, graph, groups: list[WeightGroup]) -> None:
        """``X^T X / rows`` of each linear group's input, summed over its calls,
        on the calibration data (or the graph's example inputs, for the error stat)."""
        linears = [l for g in groups for l in g.layers if l.kind == "linear"]
        if not linears:
            return
        stats: dict[str, LinearStats] = collect_linear_stats(graph, self._calibration(graph), [l.node for l in linears], hessian=True)
        for group in groups:
            calls = [stats[l.node.name] for l in group.layers if l.kind == "linear"]
            if calls:
                rows = sum(s.rows for s in calls)
                group.hessian = sum(s.hessian * s.rows for s in calls) / max(rows, 1)

    def _global_masks(self, groups: list[WeightGroup]) -> None:
        """One threshold over the scores of every selected weight: exactly
        ``floor(ratio * total)`` weights go, wherever they are."""
        method = METHODS[self.method]
        scores = [(_magnitude_scores if g.first.kind == "embedding" else method.scores)(g.weight, g) for g in groups]
        flat = torch.cat([s.flatten() for s in scores])
        keep = unstructured_mask(flat, self.ratio)
        offset = 0
        for group, s in zip(groups, scores):
            group.keep = keep[offset: offset + s.numel()].view(s.shape)
            offset += s.numel()

    def _record(self, group: WeightGroup, new: torch.Tensor) -> dict:
        w, d = group.weight.double(), (group.weight.double() - new.double())
        if group.hessian is not None:
            H = group.hessian
            num, den = ((d @ H) * d).sum().item(), ((w @ H) * w).sum().item()
        else:
            num, den = d.pow(2).sum().item(), w.pow(2).sum().item()
        rel = math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0
        return {"method": "magnitude" if group.first.kind == "embedding" else self.method, "pattern": self.pattern,
                "sparsity": round(float((new == 0).float().mean()), 6), "rel_err": round(rel, 6)}
