"""The ONNX Runtime backend: ``torch.onnx.export(dynamo=True)`` of the
re-exported graph, with fxopt's ops lowered through the translation table in
:mod:`fxopt.ir.ops`, run in an ``onnxruntime.InferenceSession``."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from ..ir.graph import Graph
from ..ir.ops import onnx_translation_table
from .base import BackendError, CompiledModel

_LEVELS = ("disable", "basic", "extended", "all")
# Metadata key under which a saved ONNX model keeps fxopt's interface (JSON).
INTERFACE_KEY = "fxopt.interface"


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs a warning per missing torchvision op and prints its steps."""
    names = ["torch.onnx._internal.exporter._registration", "torch.onnx", "onnxscript"]
    old = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # Said once per input for each Dim that inputs share, which is the point of sharing it.
            warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints")
            yield
    finally:
        for n, level in zip(names, old):
            logging.getLogger(n).setLevel(level)


_STRIDE_CHANGING = {torch.ops.aten.transpose.int, torch.ops.aten.permute.default, torch.ops.aten.t.default}


def _views_a_transpose(node: torch.fx.Node) -> bool:
    return (node.target == torch.ops.aten.view.default and isinstance(node.args[0], torch.fx.Node)
            and node.args[0].target in _STRIDE_CHANGING)


def _contiguous_before_views(graph: Graph) -> Graph:
    """A copy of ``graph`` with a contiguous ``aten.clone`` between each
    transpose / permute and an ``aten.view`` of its result.

    ONNX has no strides (the clone becomes an Identity the exporter drops),
    but the exporter's decompositions do: a traced view may rely on the
    strides of the kernel before the transpose (T5's attention views SDPA's
    output after a transpose, valid for the CPU kernel's [B, S, H, D] layout),
    and the decomposed SDPA's contiguous output cannot be viewed that way;
    plain ``torch.onnx.export`` fails on such models."""
    if not any(_views_a_transpose(n) for n in graph.fx.nodes):
        return graph
    graph = graph.copy()
    for node in [n for n in graph.fx.nodes if _views_a_transpose(n)]:
        with graph.fx.inserting_before(node):
            clone = graph.fx.call_function(torch.ops.aten.clone.default, (node.args[0],),
                                           {"memory_format": torch.contiguous_format})
        clone.meta = dict(node.args[0].meta)
        node.replace_input_with(node.args[0], clone)
    graph.recompile()
    return graph


aten = torch.ops.aten


def _diff_by_slices(graph, node) -> torch.fx.Node | None:
    """``aten.diff(x, 1, dim, prepend, append)`` as ``c[1:] - c[:-1]`` along
    ``dim`` of ``c = cat([prepend, x, append])`` (``!=`` for booleans)."""
    x, given = node.args[0], dict(zip(("n", "dim", "prepend", "append"), node.args[1:]), **node.kwargs)
    n, dim, prepend, append = given.get("n", 1), given.get("dim", -1), given.get("prepend"), given.get("append")
    if n != 1:
        return None
    parts = [p for p in (prepend, x, append) if p is not None]
    whole = graph.call_function(aten.cat.default, (parts, dim)) if len(parts) > 1 else x
    later = graph.call_function(aten.slice.Tensor, (whole, dim, 1, sys.maxsize))
    earlier = graph.call_function(aten.slice.Tensor, (whole, dim, 0, -1))
    boolean = node.meta.get("val") is not None and node.meta["val"].dtype == torch.bool
    return graph.call_function(aten.ne.Tensor if boolean else aten.sub.Tensor, (later, earlier))


# Ops the exporter has no translation for, each with an equivalent it has one for.
_TRANSLATABLE = {
    aten.__and__.Tensor: lambda graph, node: graph.call_function(aten.bitwise_and.Tensor, node.args, node.kwargs),
    aten.__or__.Tensor: lambda graph, node: graph.call_function(aten.bitwise_or.Tensor, node.args, node.kwargs),
    aten.diff.default: _diff_by_slices,
}


def _translatable(graph: Graph) -> Graph:
    """``graph``, or a copy whose ops of :data:`_TRANSLATABLE` are written
    with ops the exporter translates, so that its decomposition re-trace can
    be skipped (:func:`_decompose_only_when_needed`)."""
    if not any(n.op == "call_function" and n.target in _TRANSLATABLE for n in graph.fx.nodes):
        return graph
    graph = graph.copy()
    for node in [n for n in graph.fx.nodes if n.op == "call_function" and n.target in _TRANSLATABLE]:
        with graph.fx.inserting_before(node):
            equivalent = _TRANSLATABLE[node.target](graph.fx, node)
        if equivalent is not None:
            equivalent.meta = dict(node.meta)
            node.replace_all_uses_with(equivalent)
            graph.fx.erase_node(node)
    graph.recompile()
    return graph


@functools.lru_cache(maxsize=4)
def _decomposed_by_exporter(registry) -> frozenset:
    from torch.onnx._internal.exporter import _decomp

    return frozenset(_decomp.create_onnx_friendly_decomposition_table(set(_decomp.get_onnx_implemented_overloads(registry))))


@contextlib.contextmanager
def _decompose_only_when_needed():
    """torch.onnx re-traces the whole program to decompose the ops it has no
    translation for: about 40% of an export. A graph fxopt traced is ATen
    already; when none of its ops is in the exporter's decomposition table
    the re-trace would return the same program, and is skipped."""
    try:
        from torch.onnx._internal.exporter import _fx_passes
        original = _fx_passes.decompose_with_registry
    except (ImportError, AttributeError):  # another torch's exporter: it decomposes as it always does
        yield
        return

    def decompose(program, registry):
        table = _decomposed_by_exporter(registry)
        if any(n.op == "call_function" and n.target in table for n in program.graph.nodes):
            return original(program, registry)
        return program

    _fx_passes.decompose_with_registry = decompose
    try:
        yield
    finally:
        _fx_passes.decompose_with_registry = original


@contextlib.contextmanager
def _type_promotion_reads_meta():
    """torch.onnx inserts the casts that ATen's implicit type promotion implies
    by re-running every node of the program on fake tensors (about a fifth of
    an export), though each node's ``meta["val"]`` already holds that result.
    Here each node gives its ``meta["val"]``; only the nodes the promotion
    changes (which it re-runs and whose ``meta["val"]`` it updates), the casts
    it inserts, and nodes without a value still run."""
    try:
        from torch.onnx._internal.fx.passes import type_promotion
        interpreter = type_promotion._TypePromotionInterpreter
        rule_of = type_promotion.get_type_promotion_rule
    except (ImportError, AttributeError):  # another torch's exporter: it promotes as it always does
        yield
        return
    original = interpreter.run_node

    def run_node(self, n):
        if n.op != "call_function" or not isinstance(n.meta.get("val"), (torch.Tensor, tuple, list)):
            return original(self, n)
        with self._set_current_node(n):
            if rule := rule_of(n, self.type_promotion_table):
                self._maybe_promote_node(n, rule)  # a promoted node runs here, and its meta["val"] is updated
        return n.meta["val"]

    interpreter.run_node = run_node
    try:
        yield
    finally:
        interpreter.run_node = original


def _name_outputs(model, names: list[str]) -> None:
    """Name the ONNX model's outputs after the model's own output structure
    (``logits``, ``past_key_values.0.key``) instead of the internal nodes
    that computed them (``linear``, ``getitem_9``). Graph inputs keep their
    names; another value that has a wanted name is renamed out of the way;
    an output that is an input, an initializer or an earlier output gets an
    Identity."""
    import onnx_ir as ir

    graph = model.graph
    outputs = list(graph.outputs)
    input_names = {v.name for v in graph.inputs}
    names = [n if n not in input_names or outputs[i].name == n else f"{n}_output" for i, n in enumerate(names)]
    keeps = {id(outputs[i]) for i, n in enumerate(names) if outputs[i].name == n}
    values = [v for node in graph.all_nodes() for v in node.outputs] + list(graph.initializers.values())
    taken = {v.name for v in values} | input_names | set(names)
    for value in values:
        if value.name in names and id(value) not in keeps:
            i = 0
            while f"{value.name}_{i}" in taken:
                i += 1
            was_initializer = value.is_initializer()
            if was_initializer:  # initializers are registered under their name
                graph.initializers.pop(value.name)
            value.name = f"{value.name}_{i}"
            taken.add(value.name)
            if was_initializer:
                graph.initializers[value.name] = value
    seen = set()
    for i, (value, name) in enumerate(zip(outputs, names)):
        if value.name == name and id(value) not in seen:
            seen.add(id(value))
            continue
        if value.is_graph_input() or value.is_initializer() or id(value) in seen:
            node = ir.node("Identity", [value])
            graph.append(node)
            node.outputs[0].shape, node.outputs[0].type = value.shape, value.type
            value = graph.outputs[i] = node.outputs[0]
        seen.add(id(value))
        value.name = name


def export_onnx_program(graph: Graph, *, opset: int | None = None, optimize: bool = True, disable_lowerings=(),
                        lowerings: dict | None = None):
    """Re-export the graph and convert it to an ``torch.onnx.ONNXProgram``;
    ``disable_lowerings`` names groups of aten lowerings to leave to the
    exporter (``fxopt.ir.ops.onnx_lowering_groups()``, e.g. "contrib-attention");
    ``lowerings`` adds translations of ops of the caller's own (op overload ->
    onnxscript function)."""
    written = graph.written_attributes()
    if written:
        # The exporter would drop the writes: every run would start from the traced state.
        raise BackendError(f"{graph.name} writes its buffer(s) {written} during forward (state kept between calls); "
                           "an ONNX model keeps no state between runs: use the eager backend, or pass the state in and out as inputs and outputs")
    exported = _translatable(_contiguous_before_views(graph))
    dims = exported.dynamic_shapes()
    try:
        ep = exported.to_exported_program(dims)
    except torch._dynamo.exc.UserError:  # relations between sizes that named dims cannot state
        ep, dims = exported.to_exported_program(exported.dynamic_shapes(named=False)), None
    kwargs = {"opset_version": opset} if opset else {}
    if dims:  # the exporter names each dynamic dimension after its Dim: one name per shared dimension
        kwargs["dynamic_shapes"] = dims
    try:
        with _quiet_exporter(), _decompose_only_when_needed(), _type_promotion_reads_meta():
            program = torch.onnx.export(
                ep,
                dynamo=True,
                custom_translation_table={**onnx_translation_table(disable_lowerings), **(lowerings or {})},
                optimize=optimize,
                verbose=False,
                **kwargs,
            )
    except Exception as e:
        msg = str(e).strip().splitlines()
        summary = next((line for line in msg if "Error" in line and "<class" in line), msg[0] if msg else type(e).__name__)
        raise BackendError(f"ONNX export of {graph.name} failed: {summary}") from e
    _name_outputs(program.model, graph.interface().output_names())
    _drop_unused_outputs(program.model)
    if optimize and share_dimension_shapes(program.model):
        import onnx_ir.passes.common as common

        # the per-layer computations over the now shared sizes are the same: keep one
        common.CommonSubexpressionEliminationPass()(program.model)
        common.RemoveUnusedNodesPass()(program.model)
    return program


def share_dimension_shapes(model) -> int:
    """Point every one-dimension ``Shape`` whose dimension is a named
    (symbolic) size of a graph input at one ``Shape`` of that input, and
    return how many moved. The exporter names a dimension after the size
    torch.export proved it equals, but each layer still reads it from its own
    tensor (a decode step's attention from its own past, the batch from its own
    query), so ONNX Runtime computes the same lengths and masks once per layer;
    read from one place, common-subexpression elimination keeps one of each."""
    import onnx_ir as ir

    graph = model.graph
    sources: dict[str, tuple] = {}
    for value in graph.inputs:
        for axis, dim in enumerate(value.shape or ()):
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                sources.setdefault(dim.value, (value, axis))
    shared: dict[tuple, ir.Value] = {}
    moved = 0
    for node in list(graph):
        if node.op_type != "Shape" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None or node.inputs[0].shape is None:
            continue
        x = node.inputs[0]
        rank = len(x.shape)
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", rank)
        start, end = (min(max(i + rank if i < 0 else i, 0), rank) for i in (start, end))
        if end - start != 1 or node.outputs[0].is_graph_output():
            continue
        dim = x.shape[start]
        if not (isinstance(dim, ir.SymbolicDim) and dim.value in sources):
            continue
        source, axis = sources[dim.value]
        key = (source.name, axis)
        if key not in shared:
            if x is source and start == axis:
                shared[key] = node.outputs[0]
                continue
            first = ir.node("Shape", [source], {"start": axis, "end": axis + 1})
            graph.insert_before(next(iter(graph)), first)
            shared[key] = first.outputs[0]
        if shared[key] is node.outputs[0]:
            continue
        node.outputs[0].replace_all_uses_with(shared[key])
        graph.remove(node, safe=True)
        moved += 1
    return moved


def _drop_unused_outputs(model) -> None:
    """Remove the unused trailing outputs of contrib ops: onnxscript gives a
    node every output its schema lists, and a kernel computes (and copies into)
    each output that exists, e.g. GroupQueryAttention's present key/value after
    a prefill that keeps no cache."""
    for node in model.graph.all_nodes():
        if node.domain != "com.microsoft":
            continue
        keep = len(node.outputs)
        while keep > 1 and not node.outputs[keep - 1].uses() and not node.outputs[keep - 1].is_graph_output():
            keep -= 1
        if keep < len(node.outputs):
            node.resize_outputs(keep)


def export_onnx(graph: Graph, path: str | Path, *, opset: int | None = None, check: bool = True, disable_lowerings=()) -> Path:
    """Write ``graph`` as an ONNX model (weights beside it when over 2 GB) that
    ``onnx.checker`` accepts; dynamic dimensions stay symbolic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_onnx_program(graph, opset=opset, disable_lowerings=disable_lowerings)
    program.save(str(path))
    if check:
        onnx.checker.check_model(str(path))
    return path


def session_options(intra_op_threads, inter_op_threads, graph_optimization_level, allow_spinning):
    import onnxruntime as ort

    if graph_optimization_level not in _LEVELS:
        raise BackendError(f"graph_optimization_level must be one of {list(_LEVELS)}, got {graph_optimization_level!r}")
    so = ort.SessionOptions()
    if intra_op_threads is not None:
        so.intra_op_num_threads = int(intra_op_threads)
    if inter_op_threads is not None:
        so.inter_op_num_threads = int(inter_op_threads)
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[graph_optimization_level]
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if allow_spinning else "0")
    if allow_spinning:
        # Spinning between a run's kernels is what makes ONNX Runtime fast at
        # batch 1 (GPT-2 W8A8, one token: 4.3 ms spinning vs 6.6 ms not), but by
        # default its threads go on spinning after Run returns and doubled the
        # time of an eager model run next on the same cores (23 -> 49 ms).
        # force_spinning_stop parks them as Run returns: the speed, not the tax
        # (benchmarks/ort_spinning.py).
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


# ONNX Runtime's own graph transformers that fxopt turns off: SkipLayerNormFusion
# folds Add + LayerNormalization back into SkipLayerNormalization (and Add +
# SimplifiedLayerNormalization into SkipSimplifiedLayerNormalization), which
# measured up to 4x slower on CPU from 128 rows (ir/ops_fused.py,
# benchmarks/ort_kernels.py).
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def new_session(model, options, providers=("CPUExecutionProvider",)):
    """An ``onnxruntime.InferenceSession`` on ``model`` (bytes or a path) with
    :data:`DISABLED_OPTIMIZERS` off: every fxopt session (backend, benchmarks)
    is made here."""
    import onnxruntime as ort

    session = ort.InferenceSession(model, options, providers=list(providers), disabled_optimizers=list(DISABLED_OPTIMIZERS))
    _return_freed_heap()
    return session


def _return_freed_heap() -> None:
    """Hand the heap memory freed while ONNX Runtime built a session back to
    the system. Constant folding at load (a codebook weight decoded into a
    float initializer, a transposed copy) and weight prepacking free their
    intermediates in many allocations that glibc keeps: a session of GPT-2
    small with its codebooks decoded at load held twice the memory of the
    fp32 one before this, the same after (benchmarks/cluster_lowering.py)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # a C library without malloc_trim (musl)
            pass


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _session_error(graph: Graph, providers, error: Exception) -> str:
    """ONNX Runtime's refusal, with the one cause a user can act on named:
    its CPU provider has almost no bfloat16 kernels (Add, Mul, ... are missing)."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    message = f"ONNX Runtime could not load {graph.name} ({', '.join(providers)}): {first}"
    if torch.bfloat16 in graph.dtypes() and "CUDAExecutionProvider" not in providers:
        message += ("; the graph computes in bfloat16, which ONNX Runtime's CPU provider does not run: "
                    "convert the model to float32 or float16 before tracing, or export it with "
                    "fxopt.export_onnx for a provider that has bfloat16 kernels")
    return message


def run_on_tensors(session, feed: dict[str, torch.Tensor], output_names: list[str]) -> list[torch.Tensor]:
    """Run ``session`` on torch tensors and return torch tensors: the inputs
    reach ONNX Runtime as numpy views of the tensors' memory, each output is
    a torch tensor over the (writable) array ONNX Runtime returned. Plain
    ``run`` with numpy costs less per call than ``OrtValue``s over DLPack,
    whose Python wrappers a graph cut into many sessions pays at every cut."""
    arrays = {name: t.detach().contiguous().numpy() for name, t in feed.items()}
    return [torch.from_numpy(np.asarray(o)) for o in session.run(output_names, arrays)]


def _without_numpy_type(graph: Graph) -> list[str]:
    """The graph's inputs and outputs whose dtype numpy has no type for
    (bfloat16, float8): ONNX Runtime's Python API takes and returns numpy
    arrays, so such a model would load and then fail at every call."""
    out = next(n for n in reversed(graph.fx.nodes) if n.op == "output")
    ends = [(f"input '{n.name}'", n) for n in graph.placeholders()]
    ends += [(f"output #{i} ('{n.name}')", n) for i, n in enumerate(torch.utils._pytree.tree_leaves(out.args[0]))
             if isinstance(n, torch.fx.Node)]
    bad = []
    for label, node in ends:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            try:
                torch.empty(0, dtype=val.dtype).numpy()
            except TypeError:
                bad.append(f"{label} is {val.dtype}")
    return bad


class SharedInitializers:
    """Initializers held once by several ONNX Runtime sessions (a generator's
    prefill and decode step): each distinct tensor (dtype, shape, bytes) is one
    ``OrtValue`` over its array, given to every session with
    ``SessionOptions.add_initializer``, which ONNX Runtime uses as it is (no
    copy; ``add_external_initializers`` copies each tensor into every session).
    The models reach ONNX Runtime without their data: each large initializer
    is external data in a sparse placeholder file that ONNX Runtime never reads,
    since the shared value overrides it. The arrays are the exported program's
    own (views of the graph's torch tensors where the exporter kept them).

    A ``Transpose`` of a large initializer (a linear's weight read as ``[in,
    out]`` when the exporter did not fold it) is folded here, once for every
    session: left in the model, ONNX Runtime's constant folding would make a
    transposed copy per session.

    ONNX Runtime's Python API cannot share *prepacked* weights between sessions
    (its C API's ``PrepackedWeightsContainer`` is not exposed): a session that
    prepacks (MLAS's packed fp32 GEMM, MatMulNBits' and the int8 kernels'
    layouts) holds its own packed copy beside the shared one. Hence
    ``prepack`` per session in :meth:`attach`."""

    PLACEHOLDER = "fxopt-shared-placeholder.bin"

    def __init__(self, min_bytes: int = 1024):
        self.min_bytes = min_bytes
        self._values: dict[tuple, tuple[np.ndarray, object]] = {}
        self._transposed: dict[tuple, np.ndarray] = {}  # (key of the source, perm) -> folded array
        self._dir = tempfile.TemporaryDirectory(prefix="fxopt-shared-")
        self._placeholder_bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the distinct initializers held."""
        return sum(a.nbytes for a, _ in self._values.values())

    def arrays(self) -> dict[tuple, np.ndarray]:
        return {k: a for k, (a, _) in self._values.items()}

    def key(self, arr: np.ndarray) -> tuple:
        flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        return (arr.dtype.str, tuple(arr.shape), hashlib.blake2b(flat.data, digest_size=20).hexdigest())

    def _large(self, program):
        for name, value in program.model.graph.initializers.items():
            t = value.const_value
            if t is not None and t.nbytes >= self.min_bytes:
                yield name, value, t

    def fold_transposes(self, program) -> int:
        """Replace each ``Transpose`` of a large initializer in ``program`` by
        an initializer holding the transposed array, one array per distinct
        (source, perm) across every program given here; returns how many."""
        import onnx_ir as ir

        graph = program.model.graph
        folded = 0
        for node in list(graph):
            if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
                continue
            source = node.inputs[0]
            t = source.const_value if source is not None and source.is_initializer() else None
            if t is None or t.nbytes < self.min_bytes:
                continue
            arr = np.ascontiguousarray(t.numpy())
            perm = node.attributes.get_ints("perm", None)
            perm = tuple(perm) if perm is not None else tuple(reversed(range(arr.ndim)))
            index = (self.key(arr), perm)
            if index not in self._transposed:
                self._transposed[index] = np.ascontiguousarray(arr.transpose(perm))
            out = node.outputs[0]
            value = ir.Value(name=f"{source.name}_transposed", shape=ir.Shape(self._transposed[index].shape),
                             type=ir.TensorType(t.dtype), const_value=ir.Tensor(self._transposed[index]))
            while value.name in graph.initializers:
                value.name += "_"
            graph.register_initializer(value)
            out.replace_all_uses_with(value, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            if not source.uses() and not source.is_graph_output() and not source.is_graph_input():
                del graph.initializers[source.name]
            folded += 1
        return folded

    def attach(self, program, options, *, prepack: bool = True) -> tuple[bytes, int]:
        """The serialized model of ``program`` (its large transposes of
        initializers folded, :meth:`fold_transposes`) with its large
        initializers left out, and the bytes of those initializers; ``options``
        are set to take them from the shared ones."""
        import onnx_ir as ir
        import onnxruntime as ort

        self.fold_transposes(program)
        names, values, swapped = [], [], []
        try:
            for name, value, t in self._large(program):
                arr = np.ascontiguousarray(t.numpy())
                key = self.key(arr)
                if key not in self._values:
                    self._values[key] = (arr, ort.OrtValue.ortvalue_from_numpy(arr))
                names.append(name)
                values.append(self._values[key][1])
                swapped.append((value, t))
                self._placeholder_bytes = max(self._placeholder_bytes, arr.nbytes)
                # external data in the placeholder file, overridden by the shared value (never read)
                value.const_value = ir.ExternalTensor(self.PLACEHOLDER, 0, arr.nbytes, t.dtype, shape=t.shape, name=name)
            proto = ir.to_proto(program.model)
        finally:
            for value, t in swapped:
                value.const_value = t
        if names:
            with open(os.path.join(self._dir.name, self.PLACEHOLDER), "ab") as f:
                f.truncate(max(self._placeholder_bytes, f.tell()))  # sparse: no data is written
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", self._dir.name)
            for name, value in zip(names, values):
                options.add_initializer(name, value)
        options.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
        return proto.SerializeToString(), sum(v.tensor_size_in_bytes() for v in values)

    def write(self, programs: dict[str, object], directory, weights: str = "weights.bin") -> dict[str, Path]:
        """Write each program as ``<name>.onnx`` in ``directory`` with every
        large initializer in one external file ``weights``, each distinct
        tensor once; returns the paths written."""
        import onnx_ir as ir

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        offsets: dict[tuple, int] = {}
        paths = {}
        with open(directory / weights, "wb") as data:
            for kind, program in programs.items():
                swapped = []
                try:
                    for name, value, t in self._large(program):
                        arr = np.ascontiguousarray(t.numpy())
                        key = self.key(arr)
                        if key not in offsets:
                            pad = -data.tell() % 64  # aligned, as ONNX Runtime maps it
                            data.write(b"\0" * pad)
                            offsets[key] = data.tell()
                            data.write(arr.reshape(-1).view(np.uint8).data)
                        swapped.append((value, t))
                        value.const_value = ir.ExternalTensor(weights, offsets[key], arr.nbytes, t.dtype, shape=t.shape, name=name)
                    proto = ir.to_proto(program.model)
                finally:
                    for value, t in swapped:
                        value.const_value = t
                paths[kind] = directory / f"{kind}.onnx"
                onnx.save_model(proto, str(paths[kind]))
        return paths


class OnnxRuntimeModel(CompiledModel):
    """Options: ``intra_op_threads``, ``inter_op_threads``,
    ``graph_optimization_level`` (disable|basic|extended|all), ``providers``
    (default: CUDA when present, then CPU), ``allow_spinning`` (ONNX Runtime's
    worker threads spin while a run waits between kernels and park when it
    returns; off, they sleep between kernels: slower, for cores shared with
    other work during a run), ``opset``, ``disable_lowerings`` (groups of aten lowerings to
    leave to the exporter, e.g. ``["contrib-attention"]``), ``shared_initializers`` (a
    :class:`SharedInitializers` this model takes its large initializers from and adds
    its own to, to hold weights once across models) with ``prepack`` (whether ONNX
    Runtime may prepack them: a packed copy per model), ``rewrite_onnx`` (a function
    given the exported ``onnx_ir`` model to change in place before the session is made)."""

    backend = "onnxruntime"

    def __init__(self, graph: Graph, *, intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 graph_optimization_level: str = "all", providers: list[str] | None = None,
                 allow_spinning: bool = True, opset: int | None = None, disable_lowerings=(),
                 shared_initializers: SharedInitializers | None = None, prepack: bool = True, rewrite_onnx=None):
        import onnxruntime as ort

        self.graph = graph
        self.interface = graph.interface()
        no_numpy = _without_numpy_type(graph)
        if no_numpy:
            raise BackendError(f"{graph.name}: {', '.join(no_numpy)}, which ONNX Runtime's Python API cannot pass (numpy has "
                               "no such type): convert the model to float32 or float16 before tracing, or export it with "
                               "fxopt.export_onnx for a runtime that takes it")
        providers = list(providers) if providers else default_providers()
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise BackendError(f"execution provider(s) {missing} not available; available: {ort.get_available_providers()}")
        options = session_options(intra_op_threads, inter_op_threads, graph_optimization_level, allow_spinning)
        self.program = export_onnx_program(graph, opset=opset, disable_lowerings=tuple(disable_lowerings))
        if rewrite_onnx is not None:
            rewrite_onnx(self.program.model)
        self._tmp = self._source = None
        # the serialized model's size (the bytes themselves are not kept: a copy of the weights)
        self._bytes = None
        # the sessions read the shared arrays in place: they must live as long as this model
        self._shared = shared_initializers
        if shared_initializers is not None:
            source, external = shared_initializers.attach(self.program, options, prepack=prepack)
            self._bytes = len(source) + external
        elif (proto := self.program.model_proto).ByteSize() < (1 << 31) - (1 << 20):
            source = proto.SerializeToString()
            self._bytes = len(source)
        else:  # protobuf cannot hold it in one message: go through a file with external data
            self._tmp = tempfile.TemporaryDirectory(prefix="fxopt-ort-")
            source = os.path.join(self._tmp.name, "model.onnx")
            self.program.save(source)
        try:
            self.session = new_session(source, options, providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(_session_error(graph, providers, e)) from e
        del source
        self._bind_inputs()

    def _bind_inputs(self) -> None:
        """Match the session's inputs and outputs with the interface's flat ones."""
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # ONNX inputs are the tensor inputs in flattened order (the exporter may
        # rename one, e.g. an input that is also an output becomes "<name>_orig");
        # non-tensor inputs were specialized into the model as constants.
        records = self.interface.inputs
        self._tensor_positions = [i for i, r in enumerate(records) if "dtype" in r]
        self._constants = {i: r["value"] for i, r in enumerate(records) if "dtype" not in r}
        if len(self._tensor_positions) != len(self.input_names):
            raise BackendError(f"ONNX model takes {len(self.input_names)} inputs {self.input_names}, the graph {len(self._tensor_positions)} tensors")
        if len(self.output_names) != self.interface.num_outputs():
            raise BackendError(f"ONNX model has {len(self.output_names)} outputs, the graph {self.interface.num_outputs()}")

    def __call__(self, *args, **kwargs):
        leaves = self.graph_inputs(self.interface, args, kwargs, self.index_bounds)
        for i, traced in self._constants.items():
            if leaves[i] != traced:
                raise BackendError(f"input #{i} was {traced!r} when traced and the ONNX model is specialized to it; got {leaves[i]!r}")
        feed = {name: leaves[i].detach().cpu().contiguous().numpy() for name, i in zip(self.input_names, self._tensor_positions)}
        try:
            outputs = self.session.run(self.output_names, feed)
        except Exception as e:  # onnxruntime's own types; its message names a node, not the input
            shapes = ", ".join(f"{name} {list(value.shape)}" for name, value in feed.items())
            raise BackendError(f"{self.interface.name}: ONNX Runtime failed on inputs {shapes} (do their sizes agree as when "
                               f"traced?): {str(e).strip().splitlines()[0][:300]}") from e
        return self.interface.unflatten_outputs([torch.from_numpy(np.asarray(o)) for o in outputs])

    def save(self, path) -> Path:
        """Writes the ONNX model with the model's interface (input names,
        structures, dtypes; JSON) in its metadata, which :meth:`load` and
        ``fxopt.load_compiled`` read back."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.program is None:  # loaded from a file
            proto = onnx.load(str(self._source))
            onnx.save_model(proto, str(path), save_as_external_data=proto.ByteSize() >= (1 << 31) - (1 << 20))
            return path
        self.stamp_interface()
        self.program.save(str(path))
        return path

    def stamp_interface(self) -> None:
        """Put the model's interface in the exported program's metadata, as
        :meth:`save` writes it (for writers of the program other than ``save``)."""
        self.interface.index_bounds = self.index_bounds
        try:
            self.program.model.metadata_props[INTERFACE_KEY] = self.interface.to_json()
        except TypeError as e:
            raise BackendError(f"cannot save {self.interface.name}: {e}") from None

    @classmethod
    def load(cls, path, *, intra_op_threads: int | None = None, inter_op_threads: int | None = None,
             graph_optimization_level: str = "all", providers: list[str] | None = None,
             allow_spinning: bool = True) -> "OnnxRuntimeModel":
        """A compiled model from a file :meth:`save` wrote: the same inputs
        and output structure as the model that was saved; session options as
        for compiling."""
        from ..ir.interface import Interface, StructureError
        from ..ir.serialize import LoadError

        path = Path(path)
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf's DecodeError and friends
            raise LoadError(f"{path} is not an ONNX model ({type(e).__name__}: {str(e)[:200]})") from None
        meta = {p.key: p.value for p in proto.metadata_props}
        if INTERFACE_KEY not in meta:
            raise LoadError(f"{path} is an ONNX model without fxopt's interface metadata ({INTERFACE_KEY!r}); only models "
                            "saved by a compiled ONNX Runtime model's .save load back as fxopt models")
        try:
            interface = Interface.from_json(meta[INTERFACE_KEY], f"{path}: metadata {INTERFACE_KEY!r}")
        except (ValueError, StructureError) as e:
            raise LoadError(str(e)) from None
        self = cls.__new__(cls)
        self.graph, self.program, self.interface, self._bytes, self._tmp, self._source = None, None, interface, None, None, path
        self.index_bounds = interface.index_bounds  # in place of the graph's (a cached property)
        providers = list(providers) if providers else default_providers()
        options = session_options(intra_op_threads, inter_op_threads, graph_optimization_level, allow_spinning)
        try:
            self.session = new_session(str(path), options, providers)
        except Exception as e:
            raise LoadError(f"ONNX Runtime could not load {path} ({', '.join(providers)}): {str(e).strip().splitlines()[0][:300]}") from e
        locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        self._files = [path, *(path.parent / loc for loc in sorted(locations))]
        self._bind_inputs()
        return self

    def artifact_bytes(self) -> int:
        if self._source is not None:
            return sum(f.stat().st_size for f in self._files)
        if self._bytes is not None:
            return self._bytes
        return sum(f.stat().st_size for f in Path(self._tmp.name).iterdir())
