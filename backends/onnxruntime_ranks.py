"""ONNX Runtime for a rank graph: one ONNX model cut at its collectives.

ONNX Runtime's collective ops (``com.microsoft`` AllReduce / AllGather) run
on CUDA with NCCL only. A tensor-parallel rank graph on CPU is therefore
exported once, with each collective lowered to a marker node
(``fxopt.cut::Collective``, its index and gather size as attributes), and the
ONNX model is cut at the markers into segments, each an ONNX Runtime session;
the collectives run between the sessions through ``torch.distributed`` in the
process group the graph is bound to (:func:`fxopt.ir.collectives.bind_process_group`).

Segment ``k`` holds the nodes that depend, through their inputs, on ``k``
collectives in a row; a value several segments read is an output of the one
that computes it and an input of the others (shape computations included:
they are small int64 tensors); a node computed from weights and constants
alone (a Constant, the transpose a tied LM head reads) is copied into every
segment that reads it, where ONNX Runtime folds it once at load instead of
computing it in the first segment at every call (at
``graph_optimization_level="disable"``, which folds nothing, only Constants
are copied). Tensors reach ONNX Runtime as numpy views of their memory
(:func:`~fxopt.backends.onnxruntime.run_on_tensors`), and a sum is
all-reduced in place in the array ONNX Runtime returned when nothing else
reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
import torch

from ..ir.collectives import (ALL_GATHER, ALL_REDUCE, GROUP, WAIT, bind_process_group, group_names, in_place_all_reduce,
                              process_group_named, reduce_op)
from ..ir.graph import Graph
from .base import BackendError, CompiledModel
from .onnxruntime import default_providers, export_onnx_program, new_session, run_on_tensors, session_options

# Collectives the model is cut at; ``wait_tensor`` disappears (each collective
# has finished when the next segment starts).
CUT_AT = (ALL_REDUCE, ALL_GATHER)
CUT_DOMAIN = "fxopt.cut"
# Nodes of no runtime input that still may not be computed once per segment.
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def has_collectives(graph: Graph) -> bool:
    return any(n.op == "call_function" and n.target in CUT_AT for n in graph.fx.nodes)


# -- the marker a collective is exported as -------------------------------------------
@torch.library.custom_op("fxopt_cut::collective", mutates_args=())
def collective_marker(x: torch.Tensor, index: int, gather: int) -> torch.Tensor:
    """Where collective ``index`` of a rank graph is cut out for ONNX
    export: the shape of its result (``gather`` copies along dim 0 for an
    all-gather of ``gather`` ranks, else ``x``'s), the rank's own value."""
    return torch.cat([x] * gather) if gather else x.clone()


@collective_marker.register_fake
def _(x, index, gather):
    return x.new_empty((x.shape[0] * gather, *x.shape[1:])) if gather else torch.empty_like(x)


def _marker_lowering():
    import onnx.defs as defs
    from onnxscript.values import Opset

    if not defs.has("Collective", 1, CUT_DOMAIN):
        types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)", "tensor(int64)",
                 "tensor(int32)", "tensor(int8)", "tensor(uint8)", "tensor(bool)"]
        defs.register_schema(defs.OpSchema(
            "Collective", CUT_DOMAIN, 1, inputs=[defs.OpSchema.FormalParameter("x", "T")],
            outputs=[defs.OpSchema.FormalParameter("y", "T")], type_constraints=[("T", types, "")],
            attributes=[defs.OpSchema.Attribute("index", defs.OpSchema.AttrType.INT, ""),
                        defs.OpSchema.Attribute("gather", defs.OpSchema.AttrType.INT, "")]))
    cut = Opset(CUT_DOMAIN, 1)

    def lowering(x, index: int, gather: int):
        return cut.Collective(x, index=index, gather=gather)

    return {torch.ops.fxopt_cut.collective.default: lowering}


@dataclass
class Collective:
    """One collective between two segments: ``kind`` on the value named
    ``source`` giving the value named ``result``, in the group named ``group``."""

    node: str
    kind: object
    group: str
    reduce_op: str = "sum"
    group_size: int = 1
    source: str = ""
    result: str = ""
    in_place: bool = False  # nothing else reads the source: reduce into its memory


@dataclass
class Segment:
    session: object
    inputs: list[str]
    outputs: list[str]
    model_bytes: int = 0
    collectives: list[Collective] = field(default_factory=list)  # run after this segment
    # values it computes from weights alone (a tied LM head's transpose), which ONNX Runtime folds at load
    folded: list[str] = field(default_factory=list)


def _with_markers(graph: Graph) -> tuple[Graph, list[Collective]]:
    """A copy of ``graph`` whose collectives are markers and whose
    ``wait_tensor`` nodes are gone; the collectives, by marker index."""
    marked = graph.copy()
    records = []
    for node in list(marked.fx.nodes):
        if node.op == "call_function" and node.target in CUT_AT:
            if node.target == ALL_REDUCE:
                records.append(Collective(node.name, node.target, node.args[2], reduce_op=node.args[1]))
                gather = 0
            else:
                gather = int(node.args[1])
                records.append(Collective(node.name, node.target, node.args[2], group_size=gather))
            node.target = torch.ops.fxopt_cut.collective.default
            node.args, node.kwargs = (node.args[0], len(records) - 1, gather), {}
    for node in list(marked.fx.nodes):
        if node.op == "call_function" and node.target == WAIT:
            node.replace_all_uses_with(node.args[0])
            marked.fx.erase_node(node)
    _chunks_as_selects(marked.fx)
    marked.recompile()
    return marked, records


def _chunks_as_selects(fx_graph) -> None:
    """``chunk(x, n, dim)`` into ``n`` equal pieces (the ranks' parts of a
    gathered tensor, laid out again) as ``select(unflatten(x, dim, [n, -1]),
    dim, i)`` for piece ``i``. Along a dynamic dimension the exporter writes
    ``chunk`` as a SplitToSequence whose split is not a constant, which
    onnxscript's optimizer fails on; a Reshape and Gathers export everywhere."""
    import operator

    from torch.fx.experimental.symbolic_shapes import statically_known_true

    aten = torch.ops.aten
    for node in [n for n in fx_graph.nodes if n.op == "call_function" and n.target == aten.chunk.default]:
        x, n = node.args[0], node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if (not isinstance(val, torch.Tensor) or not node.users
                or any(u.target is not operator.getitem for u in node.users)
                or not statically_known_true(val.shape[dim] % n == 0)):
            continue
        with fx_graph.inserting_after(node):
            pieces = fx_graph.call_function(aten.unflatten.int, (x, dim, [n, -1]))
        for user in list(node.users):
            with fx_graph.inserting_after(user):
                select = fx_graph.call_function(aten.select.int, (pieces, dim % val.dim(), user.args[1]))
            select.meta = dict(user.meta)
            user.replace_all_uses_with(select)
            fx_graph.erase_node(user)
        fx_graph.erase_node(node)


def _computing(values: list[str], constants: dict[str, onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The constant nodes ``values`` need, their own inputs' first, each once."""
    order: list[onnx.NodeProto] = []
    seen: set[int] = set()

    def visit(v: str) -> None:
        node = constants.get(v)
        if node is None or id(node) in seen:
            return
        seen.add(id(node))
        for u in node.input:
            visit(u)
        order.append(node)

    for v in values:
        visit(v)
    return order


class OnnxRuntimeRankModel(CompiledModel):
    """A rank graph (a graph with ``_c10d_functional`` collectives) on ONNX
    Runtime: one session per segment between collectives, the collectives
    run by ``torch.distributed``. Called like the rank graph; every rank of
    the group must call it with inputs of the same shapes. Options as for
    :class:`~fxopt.backends.onnxruntime.OnnxRuntimeModel`, applied to every
    session. A collective waits for the other ranks as long as its process
    group's timeout allows, then raises :class:`CollectiveError`."""

    backend = "onnxruntime"

    def __init__(self, graph: Graph, *, intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 graph_optimization_level: str = "all", providers: list[str] | None = None,
                 allow_spinning: bool = True, opset: int | None = None, disable_lowerings=()):
        if GROUP in group_names(graph):
            # as the eager backend does: collectives on "tp" run in this process's default group
            graph = bind_process_group(graph)
        self.graph = graph
        self.interface = graph.interface()
        self._groups: dict[str, object] = {}
        self._in_place: dict[str, object] = {}  # group name -> its own in-place all-reduce, or None
        marked, self.collectives = _with_markers(graph)
        program = export_onnx_program(marked, opset=opset, disable_lowerings=tuple(disable_lowerings),
                                      lowerings=_marker_lowering())
        options = session_options(intra_op_threads, inter_op_threads, graph_optimization_level, allow_spinning)
        providers = list(providers) if providers else default_providers()
        self._cut(program.model_proto, options, providers, folding=graph_optimization_level != "disable")

    # -- cutting ---------------------------------------------------------------
    def _cut(self, model: onnx.ModelProto, options, providers, folding: bool = True) -> None:
        g = model.graph
        initializers = {t.name: t for t in g.initializer}
        types = {v.name: v for v in [*g.input, *g.value_info, *g.output]}
        # value -> the node computing it from initializers and constants alone (a Constant, a
        # tied LM head's Transpose): copied into every segment that reads it, where ONNX
        # Runtime folds it once at load, rather than computed each call in segment 0 and
        # handed on (``folding=False``: a session that folds nothing, only Constants copied)
        constants: dict[str, onnx.NodeProto] = {}
        computed = {v.name for v in g.output} | {n.input[0] for n in g.node if n.domain == CUT_DOMAIN}
        stage: dict[str, int] = {v.name: 0 for v in g.input}  # the segment after which a value exists
        placed: list[tuple[onnx.NodeProto, int]] = []
        marks: list[tuple[onnx.NodeProto, int]] = []
        for node in g.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise BackendError(f"{self.graph.name}: ONNX node {node.name} ({node.op_type}) has a subgraph; "
                                   "rank graphs with control flow are not cut into sessions")
            inputs = [v for v in node.input if v and v not in initializers and v not in constants]
            s = max((stage[v] for v in inputs), default=0)
            if node.domain == CUT_DOMAIN:
                marks.append((node, s))
                stage[node.output[0]] = s + 1
            elif (not inputs and node.op_type not in NONDETERMINISTIC and not computed & set(node.output)
                  and (folding or node.op_type == "Constant")):
                constants.update((o, node) for o in node.output)
            else:
                placed.append((node, s))
                stage.update((o, s) for o in node.output)
        count = 1 + max([s for _, s in placed] + [s for _, s in marks], default=0)
        readers: dict[str, set] = {}
        for node, s in placed:
            for v in node.input:
                readers.setdefault(v, set()).add(s)
        for node, _ in marks:
            readers.setdefault(node.input[0], set()).add("collective")
        for v in g.output:
            readers.setdefault(v.name, set()).add("output")

        opsets = [o for o in model.opset_import if o.domain != CUT_DOMAIN]
        self.segments: list[Segment] = []
        for k in range(count):
            nodes = [n for n, s in placed if s == k]
            made = {o for n in nodes for o in n.output}
            read = list(dict.fromkeys(v for n in nodes for v in n.input if v))
            inputs = [v for v in read if v not in made and v not in initializers and v not in constants]
            outputs = [o for n in nodes for o in n.output if readers.get(o, set()) - {k}]
            session, folded = None, []
            if nodes:
                missing = [v for v in inputs + outputs if v not in types]
                if missing:
                    raise BackendError(f"{self.graph.name}: the ONNX model gives no type for {missing[:3]}, which "
                                       f"cross between segments {k} and others")
                folded = _computing(read, constants)
                read = list(dict.fromkeys([*read, *(v for n in folded for v in n.input if v)]))
                sub = onnx.helper.make_graph(
                    folded + nodes, f"{g.name}.segment{k}",
                    [types[v] for v in inputs], [types[v] for v in outputs],
                    [initializers[v] for v in read if v in initializers])
                sub_model = onnx.helper.make_model(sub, opset_imports=opsets, ir_version=model.ir_version,
                                                   functions=list(model.functions))
                try:
                    session = new_session(sub_model.SerializeToString(), options, providers)
                except Exception as e:  # onnxruntime's own exception types
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                    raise BackendError(f"{self.graph.name}: ONNX Runtime could not load segment {k}: {first}") from e
            self.segments.append(Segment(session, inputs, outputs, sub_model.ByteSize() if nodes else 0,
                                         folded=[o for n in folded if n.op_type != "Constant" for o in n.output]))
        for node, s in marks:
            index = next(a.i for a in node.attribute if a.name == "index")
            c = self.collectives[index]
            c.source, c.result = node.input[0], node.output[0]
            # Summed in its own memory when only the collective reads it (never a graph input or constant).
            c.in_place = (c.kind == ALL_REDUCE and readers.get(c.source) == {"collective"}
                          and c.source in stage and c.source not in {v.name for v in g.input})
            self.segments[s].collectives.append(c)
        self.num_segments = sum(1 for s in self.segments if s.session is not None)
        self._input_names = [v.name for v in g.input]
        self._output_names = [v.name for v in g.output]
        self._tensor_positions = [i for i, r in enumerate(self.interface.inputs) if "dtype" in r]
        self._initializer_outputs = {v: torch.from_numpy(onnx.numpy_helper.to_array(initializers[v]).copy())
                                     for v in self._output_names if v in initializers}

    # -- running ---------------------------------------------------------------
    def group(self, name: str):
        """The process group a collective's group name resolves to."""
        if name not in self._groups:
            import torch.distributed as dist

            if not dist.is_available() or not dist.is_initialized():
                raise BackendError(f"{self.graph.name} holds collectives but no process group is initialized: launch "
                                   "with `torchrun --nproc-per-node N ...` (or `fxopt optimize ... --tensor-parallel N`) "
                                   "and call fxopt.launch.init() before running it")
            try:
                self._groups[name] = process_group_named(name)
            except Exception as e:
                raise BackendError(f"{self.graph.name}: no process group named {name!r} in this process ({e}); bind the "
                                   "graph to a group of this run with fxopt.parallel.bind_process_group") from None
            self._in_place[name] = in_place_all_reduce(self._groups[name])
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
                op = reduce_op(c.reduce_op)
                direct = self._in_place[c.group]
                if direct is not None:
                    direct(out, op)
                elif op == dist.ReduceOp.AVG and dist.get_backend(group) == "gloo":  # gloo has no AVG
                    dist.all_reduce(out, dist.ReduceOp.SUM, group=group)
                    out /= dist.get_world_size(group)
                else:
                    dist.all_reduce(out, op, group=group)
            else:
                x = x.contiguous()
                out = x.new_empty((x.shape[0] * c.group_size, *x.shape[1:]))
                dist.all_gather_single(out, x, group=group)
        except RuntimeError as e:
            raise CollectiveError(f"{self.graph.name}: collective {c.node}", group, e) from e
        env[c.result] = out

    def __call__(self, *args, **kwargs):
        leaves = self.graph_inputs(self.interface, args, kwargs, self.index_bounds)
        env: dict[str, torch.Tensor] = {name: leaves[i] for name, i in zip(self._input_names, self._tensor_positions)}
        fed = {t.untyped_storage().data_ptr() for t in env.values()}  # memory that is not ours to sum into
        for k, segment in enumerate(self.segments):
            if segment.session is not None:
                feed = {v: env[v] for v in segment.inputs}
                fed.update(t.untyped_storage().data_ptr() for t in feed.values())
                try:
                    env.update(zip(segment.outputs, run_on_tensors(segment.session, feed, segment.outputs)))
                except Exception as e:  # onnxruntime's own exception types
                    shapes = ", ".join(f"{name} {list(t.shape)}" for name, t in feed.items())
                    raise BackendError(f"{self.graph.name}: ONNX Runtime failed in segment {k} on {shapes}: "
                                       f"{str(e).strip().splitlines()[0][:300]}") from e
            for c in segment.collectives:
                self._collective(c, env, fed)
        return self.interface.unflatten_outputs([env[v] if v in env else self._initializer_outputs[v]
                                                 for v in self._output_names])

    def save(self, path):
        raise BackendError(f"{self.graph.name}: a rank graph on ONNX Runtime is several sessions joined by collectives and "
                           "is not saved as one file; save the rank graph (graph.save) and compile it where it runs")

    def artifact_bytes(self) -> int:
        return sum(s.model_bytes for s in self.segments)


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
