"""The eager backend: runs the GraphModule with PyTorch, optionally under torch.compile."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..ir.collectives import (ALL_REDUCE, GROUP, REDUCE_OPS, WAIT, bind_process_group, group_names, in_place_all_reduce,
                              process_group_named, reduce_op)
from ..ir.graph import Graph
from ..ir.ops import ACTIVATIONS, registered_ops
from ..ir.ops_attention import attention_with_past_in_buffer
from .base import BackendError, CompiledModel


class EagerModel(CompiledModel):
    backend = "eager"

    def __init__(self, graph: Graph, *, torch_compile: bool = False, compile_options: dict | None = None,
                 prepack: bool | PackedLinearWeights = False, cache_in_buffer: bool = False):
        """``prepack``: run the graph's float32 linears on oneDNN-blocked copies
        of their weights (:class:`PackedLinearWeights`, which may be shared
        with other models so that a weight is packed once): faster than
        ``torch.nn.functional.linear`` where the weights stream from memory,
        most at a decode step's few rows (``benchmarks/eager_linears.py``),
        for one more copy of those weights in memory. The copies are made
        here: later in-place changes to a weight are not seen.
        ``torch.compile`` packs weights its own way (freezing), so the two are
        not combined.

        ``cache_in_buffer``: a decode step's ``fxopt.attention_with_past``
        grows each past key/value in place when the caller passes it as a
        prefix view of a longer buffer
        (:func:`~fxopt.ir.ops_attention.attention_with_past_in_buffer`), as a
        generator with ``cache="buffer"`` does; other pasts are concatenated."""
        if not isinstance(prepack, (bool, PackedLinearWeights)):
            raise BackendError(f"eager backend: prepack must be True, False or a PackedLinearWeights, got {prepack!r}")
        if (prepack is not False or cache_in_buffer) and torch_compile:
            raise BackendError("eager backend: prepack and cache_in_buffer rewrite the graph that runs, torch_compile "
                               "compiles its own (and packs weights itself under freezing)")
        if prepack is not False and not torch.backends.mkldnn.is_available():
            raise BackendError("eager backend: prepack needs a PyTorch built with oneDNN (torch.backends.mkldnn)")
        if GROUP in group_names(graph):
            # a tensor-parallel rank graph runs its collectives in this process's group
            graph = bind_process_group(graph)
        self.graph = graph
        # built once: rebuilding it (its symbols printed) costs more than a small decode step's kernels
        self.interface = graph.interface()
        self.packed = None if prepack is False else prepack if isinstance(prepack, PackedLinearWeights) else PackedLinearWeights()
        if torch_compile:
            self._fn = torch.compile(graph.module, **(compile_options or {}))
        else:
            self._fn = runnable_module(graph, self.packed, cache_in_buffer)

    def __call__(self, *args, **kwargs):
        # Rebuilt in the traced structure, so that a model traced with keyword
        # inputs can be called positionally too, as the original can.
        leaves = self.graph_inputs(self.interface, args, kwargs, self.index_bounds)
        args, kwargs = pytree.tree_unflatten(leaves, self.graph.fx._codegen.pytree_info.in_spec)
        with torch.inference_mode():
            return self._fn(*args, **kwargs)

    @property
    def running_graph(self) -> fx.Graph | None:
        """The fx graph that runs (``graph`` with the backend's rewrites: packed
        linears, the cache grown in its buffer, in-place all-reduces); None
        under ``torch.compile``."""
        return getattr(self._fn, "graph", None) if isinstance(self._fn, fx.GraphModule) else None

    def save(self, path) -> Path:
        """Writes the graph as a torch.export archive (.pt2) that ``fxopt.load`` reads."""
        path = Path(path)
        self.graph.save(path)
        return path

    @classmethod
    def load(cls, path, **options) -> "EagerModel":
        """A compiled model from a file :meth:`save` wrote (``fxopt.load``
        of the graph, compiled with ``options``)."""
        return cls(Graph.load(path), **options)

    def artifact_bytes(self) -> int:
        return self.graph.param_bytes()


class InPlaceAllReduce(torch.nn.Module):
    """``x`` reduced over the process group named ``group_name`` by the group's
    own in-place all-reduce, on a copy (the functional all-reduce it replaces
    leaves ``x`` as it was). The name is resolved at every call, as the
    functional collective does: process groups made again after a
    ``destroy_process_group`` may reuse a name; a group without its own
    all-reduce gets the functional collective."""

    def __init__(self, group_name: str, op: str):
        super().__init__()
        self.group_name, self.op = group_name, op
        self._group = self._reduce = self._op = None

    def forward(self, x):
        group = process_group_named(self.group_name)
        if group is not self._group:
            self._group, self._reduce, self._op = group, in_place_all_reduce(group), reduce_op(self.op)
        if self._reduce is None:
            return WAIT(ALL_REDUCE(x, self.op, self.group_name))
        out = x.clone(memory_format=torch.contiguous_format)
        self._reduce(out, self._op)
        return out

    def __getstate__(self):  # the group and its method stay with the process that resolved them
        return {**self.__dict__, "_group": None, "_reduce": None, "_op": None}


class PackedLinearWeights:
    """Float32 linear weights in oneDNN's blocked layout
    (``torch.ops.mkldnn._reorder_linear_weight``), each packed once: the eager
    models compiled with one instance (a generator's prefill and decode
    graphs) read one packed copy of a weight they share. A weight is packed
    when a model is compiled; changing it in place later is not seen."""

    def __init__(self):
        # keyed by id(weight); the weight is held beside its packed copy so that its id is not reused
        self._packed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        entry = self._packed.get(id(weight))
        if entry is None:
            with torch.no_grad():
                entry = self._packed[id(weight)] = (weight, torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
        return entry[1]

    def __len__(self) -> int:
        return len(self._packed)


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none") -> torch.Tensor:
    """``activation(x @ W.T + bias)`` with ``weight`` W packed by :class:`PackedLinearWeights`."""
    y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return y if activation == "none" else ACTIVATIONS[activation](y)


LINEARS = (torch.ops.aten.linear.default, torch.ops.fxopt.linear_act.default)
ATTENTION_WITH_PAST = torch.ops.fxopt.attention_with_past.default


def _float32(node) -> bool:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dtype == torch.float32


def _pack_linears(fx_graph: fx.Graph, graph: Graph, packed: PackedLinearWeights) -> list[tuple[str, torch.Tensor]]:
    """Each float32 linear (``aten.linear``, ``fxopt.linear_act``) of
    ``fx_graph`` (a copy of ``graph``'s) whose weight is one of ``graph``'s
    2-D CPU tensors becomes a :func:`packed_linear` on ``packed``'s copy; the
    attributes to add to the module that runs it. Linears on computed
    weights, on attributes the graph writes (a packed copy would not follow),
    other dtypes or devices stay as they are."""
    written = set(graph.written_attributes())

    def constant(node) -> torch.Tensor | None:
        if not isinstance(node, fx.Node) or node.op != "get_attr" or node.target in written:
            return None
        value = graph.get_attr(node.target)
        return value if isinstance(value, torch.Tensor) else None

    attributes: dict[int, tuple[str, torch.Tensor]] = {}
    for node in [n for n in fx_graph.nodes if n.op == "call_function" and n.target in LINEARS]:
        args = list(node.args) + [None] * (4 - len(node.args))
        x, weight_node, bias = args[0], args[1], node.kwargs.get("bias", args[2])
        activation = args[3] if node.target != torch.ops.aten.linear.default else "none"
        weight = constant(weight_node)
        if (weight is None or weight.dtype != torch.float32 or weight.dim() != 2 or weight.device.type != "cpu"
                or weight.layout != torch.strided or not _float32(x) or x.meta["val"].dim() < 2
                or (bias is not None and not _float32(bias)) or set(node.kwargs) - {"bias"}):
            continue
        if id(weight) not in attributes:
            attributes[id(weight)] = (f"packed_linear_weight_{len(attributes)}", packed(weight))
        with fx_graph.inserting_before(node):
            packed_weight = fx_graph.get_attr(attributes[id(weight)][0])
            new = fx_graph.call_function(packed_linear, (x, packed_weight, bias, activation))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        fx_graph.erase_node(node)
    return list(attributes.values())


def _reduce_in_place(fx_graph: fx.Graph) -> list[tuple[str, torch.nn.Module]]:
    """Each all-reduce of ``fx_graph`` on a group with its own in-place
    all-reduce (:func:`~fxopt.ir.collectives.in_place_all_reduce`) and its
    ``wait_tensor`` become one :class:`InPlaceAllReduce` call; the submodules
    to add to the module that runs it."""
    replaced = []
    for node in [n for n in fx_graph.nodes if n.op == "call_function" and n.target == ALL_REDUCE]:
        if len(node.args) != 3 or node.kwargs or node.args[1] not in REDUCE_OPS:
            continue
        x, op, name = node.args
        try:
            group = process_group_named(name)
        except (RuntimeError, ValueError):  # no such group here: the functional collective says so when it runs
            continue
        waits = list(node.users)
        if in_place_all_reduce(group) is None or not waits or any(w.target != WAIT for w in waits):
            continue
        target = f"all_reduce_{len(replaced)}"
        with fx_graph.inserting_before(node):
            reduced = fx_graph.call_module(target, (x,))
        reduced.meta = dict(node.meta)
        for wait in waits:
            wait.replace_all_uses_with(reduced)
            fx_graph.erase_node(wait)
        fx_graph.erase_node(node)
        replaced.append((target, InPlaceAllReduce(name, op)))
    return replaced


def _kernels(cache_in_buffer: bool) -> dict:
    """fxopt op -> the function the running module calls for it: its eager
    kernel (without the op's dispatch, which costs more than the kernel itself
    on a decode step's single row, a norm of 576 values), and with
    ``cache_in_buffer`` attention against a cache that grows it in place where
    it is a buffer's prefix. What the dispatch also checked, that no output
    aliases an input, holds for every kernel (each returns new tensors)."""
    kernels = {d.overload: d.kernel for d in registered_ops().values()}
    if cache_in_buffer:
        kernels[ATTENTION_WITH_PAST] = attention_with_past_in_buffer
    return kernels


def _call_kernels(fx_graph: fx.Graph, kernels: dict) -> bool:
    """Each node of ``fx_graph`` calling one of ``kernels``' ops calls its
    function instead; unused attribute reads, which the generated code would
    still run, are dropped. Whether anything changed."""
    changed = False
    for node in list(fx_graph.nodes):
        if node.op == "call_function" and node.target in kernels:
            node.target, changed = kernels[node.target], True
        elif node.op == "get_attr" and not node.users:
            fx_graph.erase_node(node)
            changed = True
    return changed


def runnable_module(graph: Graph, packed: PackedLinearWeights | None = None, cache_in_buffer: bool = False
                    ) -> torch.nn.Module:
    """The module that runs ``graph``: its own, or one that shares its
    attributes in which all-reduces run in place where their group can
    (:func:`_reduce_in_place`), given ``packed`` the float32 linears on
    constant weights run on packed copies (:func:`_pack_linears`), and fxopt
    ops call their functions directly (:func:`_kernels`: with
    ``cache_in_buffer``, attention grows a buffered cache in place).
    ``graph`` itself (what is saved and printed) is unchanged."""
    kernels = _kernels(cache_in_buffer)
    targets = {n.target for n in graph.fx.nodes if n.op == "call_function"}
    if not (ALL_REDUCE in targets or targets & kernels.keys() or (packed is not None and targets & set(LINEARS))
            or any(n.op == "get_attr" and not n.users for n in graph.fx.nodes)):
        return graph.module  # nothing to rewrite: no copy of the graph
    fx_graph = copy.deepcopy(graph.fx)
    submodules = _reduce_in_place(fx_graph)
    attributes = _pack_linears(fx_graph, graph, packed) if packed is not None else []
    if not _call_kernels(fx_graph, kernels) and not submodules and not attributes:
        return graph.module
    # built on the unchanged graph (which names every attribute to take over), then given the rewritten one
    module = fx.GraphModule(graph.module, copy.deepcopy(graph.fx), class_name=type(graph.module).__name__)
    for target, submodule in submodules:
        module.add_submodule(target, submodule)
    for name, tensor in attributes:
        setattr(module, name, tensor)
    module.graph = fx_graph
    return module
