"""ONNX Runtime for a rank graph: the graph cut at its collectives.

ONNX Runtime's collective ops (``com.microsoft`` AllReduce / AllGather) run
on CUDA with NCCL only. A tensor-parallel rank graph on CPU is therefore cut
at its collective nodes into segments, each lowered and run as an ONNX
Runtime session by :class:`~fxopt.backends.onnxruntime.OnnxRuntimeModel`, and
the collectives run between the segments through ``torch.distributed`` in
the process group their group name resolves to (see
:func:`fxopt.ir.collectives.bind_group`). Tensors cross between ONNX Runtime
and torch without copies: inputs go in as ``OrtValue.from_dlpack`` views of
the torch tensors, outputs come back as ``torch.from_numpy`` views of the
OrtValues' memory, and a sum is all-reduced in place in that memory.

Segment ``k`` computes the nodes that depend, through their inputs, on ``k``
collectives in a row; a value that several segments read is an output of the
one that computes it and an input of the others. Sizes (SymInt nodes) are
recomputed inside each segment that reads them rather than passed along.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..ir.collectives import ALL_GATHER, ALL_REDUCE, GROUP, WAIT, bind_process_group, group_names
from ..ir.graph import Graph
from ..ir.meta import fake_mode_of
from .base import BackendError, CompiledModel
from .onnxruntime import OnnxRuntimeModel

# Collectives the segments are cut at; ``wait_tensor`` is a no-op between
# them (each collective has finished when the next segment starts).
CUT_AT = (ALL_REDUCE, ALL_GATHER)


def has_collectives(graph: Graph) -> bool:
    return any(n.op == "call_function" and n.target in CUT_AT for n in graph.fx.nodes)


@dataclass
class Collective:
    """One collective between two segments: ``kind`` on the value ``source``
    giving ``result``, in the process group named ``group``."""

    node: str
    kind: object
    source: str
    result: str
    group: str
    reduce_op: str = "sum"
    group_size: int = 1
    in_place: bool = False  # the source has no other reader: reduce into its memory


@dataclass
class Segment:
    model: OnnxRuntimeModel | None
    inputs: list[str]
    outputs: list[str]
    collectives: list[Collective] = field(default_factory=list)  # run after this segment


def _is_tensor_node(node) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor)


def _stand_in_values(graph: Graph) -> dict[str, object]:
    """Every node's value on the graph's example inputs, with each collective
    replaced by a local stand-in of the right shape (a sum becomes the rank's
    own value, a gather N copies of it): example inputs for the segments'
    traces, no process group needed."""

    values: dict[str, object] = {}

    class StandIn(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n.name] = out
            return out

        def call_function(self, target, args, kwargs):
            if target == ALL_REDUCE:
                return args[0].clone()
            if target == ALL_GATHER:
                return torch.cat([args[0]] * int(args[1]), 0)
            if target == WAIT:
                return args[0]
            return super().call_function(target, args, kwargs)

    leaves = pytree.tree_leaves((graph.example_args, graph.example_kwargs))
    with torch.no_grad():
        StandIn(graph.module).run(*leaves)
    return values


class OnnxRuntimeRankModel(CompiledModel):
    """A rank graph (a graph with ``_c10d_functional`` collectives) on ONNX
    Runtime: one session per segment between collectives, the collectives
    run by ``torch.distributed``. Called like the rank graph; every rank of
    the group must call it with inputs of the same shapes.

    Options as for :class:`OnnxRuntimeModel` (threads, optimization level,
    spinning ...), applied to every segment's session. A collective waits for
    the other ranks as long as its process group's timeout allows, then raises
    :class:`CollectiveError`."""

    backend = "onnxruntime"

    def __init__(self, graph: Graph, **options):
        if GROUP in group_names(graph):
            # as the eager backend does: collectives on "tp" run in this process's default group
            graph = bind_process_group(graph)
        self.graph = graph
        self._groups: dict[str, object] = {}
        self._plan(graph, options)

    # -- cutting ---------------------------------------------------------------
    def _plan(self, graph: Graph, options: dict) -> None:
        nodes = list(graph.fx.nodes)
        output = next(n for n in reversed(nodes) if n.op == "output")
        # The segment that computes a node (for a collective: the first that can read its result).
        stage: dict[fx.Node, int] = {}
        alias: dict[fx.Node, fx.Node] = {}  # wait_tensor -> the collective it waits for
        for n in nodes:
            if n.op != "call_function":
                stage[n] = 0
            elif n.target == WAIT:
                alias[n] = alias.get(n.args[0], n.args[0])
                stage[n] = stage[n.args[0]]
            else:
                stage[n] = max((stage[a] for a in n.all_input_nodes), default=0) + (n.target in CUT_AT)

        def key(n: fx.Node) -> str:
            return alias.get(n, n).name

        def computes(n: fx.Node) -> bool:
            return n.op == "call_function" and n.target != WAIT and n.target not in CUT_AT and _is_tensor_node(n)

        collectives = [n for n in nodes if n.op == "call_function" and n.target in CUT_AT]
        self.num_segments = 1 + max((stage[n] for n in nodes if computes(n)), default=0)
        values = _stand_in_values(graph)
        self._input_keys = [p.name for p in graph.placeholders()]
        leaves = pytree.tree_leaves(output.args[0])
        self._output_keys = [key(leaf) if isinstance(leaf, fx.Node) else leaf for leaf in leaves]

        # Each segment's fx graph and the values it reads; then, as outputs, its
        # values that others read (later segments, collectives, the graph's output).
        built = []
        for s in range(self.num_segments):
            members = [n for n in nodes if computes(n) and stage[n] == s]
            built.append((members, *self._segment_graph(members, key)) if members else None)
        wanted = {k for b in built if b for k in b[3]} | {key(c.args[0]) for c in collectives}
        wanted |= {k for k in self._output_keys if isinstance(k, str)}
        self._options = options
        self.segments: list[Segment] = []
        for s, b in enumerate(built):
            if b is None:
                self.segments.append(Segment(None, [], []))
                continue
            members, seg, env, inputs = b
            outputs = [m.name for m in members if m.name in wanted]
            seg.output(tuple(env[m] for m in members if m.name in wanted))
            module = fx.GraphModule(graph.module, _placeholders_first(seg))
            model = self._lower(graph, module, tuple(values[k] for k in inputs), s)
            self.segments.append(Segment(model, inputs, outputs))
        for c in collectives:
            src = c.args[0]
            # Summed in its own memory when nothing else reads the value (a graph
            # input or constant never is).
            in_place = (c.target == ALL_REDUCE and src.op == "call_function"
                        and all(u is c for u in src.users) and key(src) not in self._output_keys)
            if c.target == ALL_REDUCE:
                record = Collective(c.name, c.target, key(src), c.name, c.args[2], reduce_op=c.args[1], in_place=in_place)
            else:
                record = Collective(c.name, c.target, key(src), c.name, c.args[2], group_size=int(c.args[1]))
            self.segments[stage[c] - 1].collectives.append(record)
        self._constants = {n.name: graph.get_attr(n.target) for n in nodes if n.op == "get_attr" and n.name in self._output_keys}
        self._constants.update({p.name: values[p.name] for p in graph.placeholders() if not _is_tensor_node(p)})

    @staticmethod
    def _segment_graph(members: list[fx.Node], key):
        """An fx graph computing ``members`` from the tensor values it reads
        (its inputs, keys in order); constants are read where they live and
        sizes are recomputed from the tensors they are sizes of."""
        seg = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        inputs: list[str] = []
        member_set = set(members)

        def value(a: fx.Node):
            if a in env:
                return env[a]
            if a.op == "get_attr":
                env[a] = seg.get_attr(a.target)
            elif a.op == "placeholder" and not _is_tensor_node(a):
                return a.meta.get("val")  # a non-tensor input: the model is specialized to it
            elif a in member_set:
                raise AssertionError(f"{a.name} read before it is computed")
            elif a.op == "placeholder" or _is_tensor_node(a) or a.target == WAIT or a.target in CUT_AT:
                env[a] = seg.placeholder(f"in{len(inputs)}_{key(a)}")
                env[a].meta = dict(a.meta)
                inputs.append(key(a))
            else:  # a size or a multi-output op: recomputed here
                env[a] = seg.node_copy(a, value)
            return env[a]

        for n in members:
            env[n] = seg.node_copy(n, value)
        _chunks_as_selects(seg)
        return seg, env, inputs

    def _lower(self, graph: Graph, module: fx.GraphModule, example: tuple, s: int) -> OnnxRuntimeModel:
        """The segment as an fxopt Graph called with its inputs in order and
        returning a tuple, with the rank graph's shape metadata (its dynamic
        dimensions stay dynamic, under the same names), compiled for ONNX
        Runtime. Its constants are the rank graph's tensors, not copies."""
        from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

        placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
        output = next(n for n in module.graph.nodes if n.op == "output")
        module.graph._codegen = _PyTreeCodeGen(_PyTreeInfo(
            [p.name for p in placeholders], pytree.tree_structure((example, {})), pytree.tree_structure(tuple(output.args[0]))))
        module.recompile()
        segment = Graph(module, example, {}, f"{graph.name}.segment{s}")
        segment.dim_names = dict(graph.dim_names)
        segment._fake_mode = getattr(graph, "_fake_mode", None) or fake_mode_of(graph)
        return OnnxRuntimeModel(segment, **self._options)

    # -- running ---------------------------------------------------------------
    def group(self, name: str):
        """The process group a collective's group name resolves to."""
        if name not in self._groups:
            import torch.distributed as dist
            from torch.distributed.distributed_c10d import _resolve_process_group

            if not dist.is_available() or not dist.is_initialized():
                raise BackendError(f"{self.graph.name} holds collectives but no process group is initialized: launch "
                                   "with `torchrun --nproc-per-node N ...` (or `fxopt optimize ... --tensor-parallel N`) "
                                   "and call fxopt.parallel.init_process_group() before running it")
            try:
                self._groups[name] = _resolve_process_group(name)
            except Exception as e:
                raise BackendError(f"{self.graph.name}: no process group named {name!r} in this process ({e}); bind the "
                                   "graph to a group of this run with fxopt.parallel.bind_process_group") from None
        return self._groups[name]

    def _collective(self, c: Collective, env: dict, fed: set) -> None:
        import torch.distributed as dist

        x = env[c.source]
        group = self.group(c.group)
        try:
            if c.kind == ALL_REDUCE:
                # In place only in memory a session wrote and nothing was fed from
                # (a session may hand an input back as an output).
                own = c.in_place and x.is_contiguous() and x.untyped_storage().data_ptr() not in fed
                out = x if own else x.contiguous().clone()
                op = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG, "max": dist.ReduceOp.MAX,
                      "min": dist.ReduceOp.MIN, "product": dist.ReduceOp.PRODUCT}[c.reduce_op]
                if op == dist.ReduceOp.AVG and dist.get_backend(group) == "gloo":  # gloo has no AVG
                    dist.all_reduce(out, dist.ReduceOp.SUM, group=group)
                    out /= dist.get_world_size(group)
                else:
                    dist.all_reduce(out, op, group=group)
            else:
                x = x.contiguous()
                out = x.new_empty((x.shape[0] * c.group_size, *x.shape[1:]))
                dist.all_gather_into_tensor(out, x, group=group)
        except RuntimeError as e:
            raise CollectiveError(f"{self.graph.name}: collective {c.node}", group, e) from e
        env[c.result] = out

    def __call__(self, *args, **kwargs):
        leaves = self.graph_inputs(self.graph, args, kwargs, self.index_bounds)
        env: dict[str, object] = dict(zip(self._input_keys, leaves))
        fed: set[int] = set()  # storages of the tensors given to the sessions
        for segment in self.segments:
            if segment.model is not None:
                inputs = [env[k] for k in segment.inputs]
                fed.update(t.untyped_storage().data_ptr() for t in inputs)
                env.update(zip(segment.outputs, segment.model.run_tensors(inputs)))
            for c in segment.collectives:
                self._collective(c, env, fed)
        flat = [env[k] if isinstance(k, str) and k in env else self._constants.get(k, k) for k in self._output_keys]
        return self.graph.unflatten_outputs(flat)

    def save(self, path):
        raise BackendError(f"{self.graph.name}: a rank graph on ONNX Runtime is several sessions joined by collectives and "
                           "is not saved as one file; save the rank graph (graph.save) and compile it where it runs")

    def artifact_bytes(self) -> int:
        return sum(s.model.artifact_bytes() for s in self.segments if s.model is not None)


class CollectiveError(BackendError):
    """A collective failed: a peer rank exited, or did not answer within the
    process group's timeout. ``what`` names the collective (a graph and node)."""

    def __init__(self, what: str, group, error: Exception):
        import torch.distributed as dist

        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        try:
            where = f"rank {dist.get_rank()} (rank {dist.get_rank(group)} of {dist.get_world_size(group)} in its group)"
        except Exception:  # the group may be gone with the peer
            where = "this rank"
        super().__init__(f"{what} failed on {where}: another rank exited or did not answer within the process "
                         f"group's timeout ({first})")


def _chunks_as_selects(seg: fx.Graph) -> None:
    """``chunk(x, n, dim)`` into ``n`` equal pieces (a gathered tensor laid out
    again) as ``select(unflatten(x, dim, [n, -1]), dim, i)`` for piece ``i``.
    Along a dynamic dimension the exporter writes ``chunk`` as a
    SplitToSequence whose split is not a constant, which onnxscript's
    optimizer fails on; a Reshape and Gathers export everywhere."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    aten = torch.ops.aten
    for node in [n for n in seg.nodes if n.op == "call_function" and n.target == aten.chunk.default]:
        x, n = node.args[0], node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if (not isinstance(val, torch.Tensor) or not node.users
                or any(u.target is not operator.getitem for u in node.users)
                or not statically_known_true(val.shape[dim] % n == 0)):
            continue
        with seg.inserting_after(node):
            pieces = seg.call_function(aten.unflatten.int, (x, dim, [n, -1]))
        for user in list(node.users):
            with seg.inserting_after(user):
                select = seg.call_function(aten.select.int, (pieces, dim % val.dim(), user.args[1]))
            select.meta = dict(user.meta)
            user.replace_all_uses_with(select)
            seg.erase_node(user)
        seg.erase_node(node)


def _placeholders_first(seg: fx.Graph) -> fx.Graph:
    """``seg`` with its placeholders moved before every other node."""
    placeholders = [n for n in seg.nodes if n.op == "placeholder"]
    first = next((n for n in seg.nodes if n.op != "placeholder"), None)
    if first is not None:
        for p in placeholders:
            first.prepend(p)
    seg.lint()
    return seg

