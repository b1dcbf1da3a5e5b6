"""The pass manager: checks a pipeline up front, runs it on a copy of the
caller's graph, and records what each pass did.

After each pass it recompiles the module, drops attributes no node reads,
refreshes shape metadata and verifies the graph. Optional: IR dumps before and
after each pass (an :class:`Instrument`), and a numerics check against the
original outputs that names the first pass that breaks them.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.fx
import torch.utils._pytree

from ..ir.graph import Graph
from ..ir.meta import meta_snapshot, refresh_changed_meta, shape_env_rollback
from ..ir.parity import compare
from .analysis import AnalysisManager
from .base import Pass, PassContext, PassError, PassResult, did_you_mean
from .pipeline import FIXED_POINT, MAX_NESTING, FixedPoint, Item, PipelineError, format_pipeline, parse_pipeline
from .registry import REGISTRY, PassRegistry


# Inputs passes read although no ``needs`` declares them: calibration_data
# where it depends on options (quantize's mode=static, method=awq or gptq;
# prune, shrink), progress (``Pass.progress``) for any pass.
DOCUMENTED_INPUTS = ("calibration_data", "progress")


@dataclass
class PassRecord:
    name: str
    ms: float
    changed: bool
    nodes_before: int
    nodes_after: int
    param_bytes_before: int
    param_bytes_after: int
    stats: dict[str, Any] = field(default_factory=dict)
    numerics: dict[str, float] | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PipelineResult:
    graph: Graph
    pipeline: str
    records: list[PassRecord]
    warnings: list[str] = field(default_factory=list)
    # The run's analysis cache: what was computed, and how often (``analyses.computed``).
    analyses: AnalysisManager = field(default_factory=AnalysisManager)

    def as_dict(self) -> dict:
        return {"pipeline": self.pipeline, "passes": [r.as_dict() for r in self.records], "warnings": self.warnings}


class NumericsError(PassError):
    pass


class Instrument:
    """Hooks around each pass. Subclass and override what you need."""

    def before_pass(self, p: Pass, graph: Graph) -> None: ...

    def after_pass(self, p: Pass, graph: Graph, record: PassRecord) -> None: ...

    def after_failure(self, p: Pass, graph: Graph, error: BaseException) -> None: ...


class IRDump(Instrument):
    """Writes ``NNN_<pass>.before.txt`` / ``.after.txt`` into a folder, and on
    failure ``NNN_<pass>.failed.txt`` with the pipeline text and the input IR."""

    def __init__(self, folder: str | Path, pipeline: str = ""):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pipeline = pipeline
        self.index = 0
        self._before = ""

    def _stem(self, p: Pass) -> str:
        return f"{self.index:03d}_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", str(p))[:80]

    def before_pass(self, p, graph):
        self.index += 1
        self._before = str(graph)
        (self.folder / f"{self._stem(p)}.before.txt").write_text(self._before + "\n")

    def after_pass(self, p, graph, record):
        (self.folder / f"{self._stem(p)}.after.txt").write_text(str(graph) + "\n")

    def after_failure(self, p, graph, error):
        text = f"# pipeline: {self.pipeline}\n# failing pass: {p}\n# error: {error}\n\n{self._before}\n"
        (self.folder / f"{self._stem(p)}.failed.txt").write_text(text)


class PassManager:
    """Runs passes in order.

    ``PassManager("canonicalize,dce,cse")`` or ``PassManager([Canonicalize(), DCE()])``.
    ``verify``: check the graph after each pass. ``dump_dir``: write the IR before and
    after each pass. ``check_numerics``: compare outputs with the input graph's after
    each pass (on ``numerics_inputs``, a list of ``(args, kwargs)``, or the graph's
    example inputs) within ``tolerance`` x output scale (default: 1e-4, or 5e-3 / 4e-2
    when an output is float16 / bfloat16, whose one rounding step is already
    ~5e-4 / 4e-3), raised to a pass's own ``numerics_tolerance`` once a lossy
    pass has run. Further keyword arguments are
    inputs that passes declare in ``needs`` (e.g. ``calibration_data=[...]``).
    """

    def __init__(
        self,
        passes: str | Sequence[Item],
        *,
        registry: PassRegistry | None = None,
        verify: bool = True,
        dump_dir: str | Path | None = None,
        check_numerics: bool = False,
        numerics_inputs: Iterable[tuple[tuple, dict]] | None = None,
        tolerance: float | None = None,
        instruments: Sequence[Instrument] = (),
        **context: Any,
    ):
        self.registry = registry or REGISTRY
        self.items: list[Item] = parse_pipeline(passes, self.registry) if isinstance(passes, str) else list(passes)
        for item in self._flat(self.items):
            if not isinstance(item, Pass):
                raise TypeError(f"PassManager takes Pass instances or pipeline text, got {item!r}")
        self.verify = verify
        self.dump_dir = dump_dir
        self.check_numerics = check_numerics
        self.numerics_inputs = list(numerics_inputs) if numerics_inputs is not None else None
        self.tolerance = tolerance
        self.instruments = list(instruments)
        self._check_input_names(context)
        self.context = PassContext(dict(context))

    @classmethod
    def from_pipeline(cls, text: str, **kwargs) -> "PassManager":
        return cls(text, **kwargs)

    def __str__(self) -> str:
        return format_pipeline(self.items)

    def passes(self) -> list[Pass]:
        """The passes in pipeline order, fixed-point groups flattened."""
        return self._flat(self.items)

    @staticmethod
    def _flat(items: Sequence[Item], depth: int = 0) -> list[Pass]:
        if depth > MAX_NESTING:
            raise PipelineError(f"{FIXED_POINT} groups nested more than {MAX_NESTING} deep")
        out: list[Pass] = []
        for item in items:
            out.extend(PassManager._flat(item.passes, depth + 1) if isinstance(item, FixedPoint) else [item])
        return out

    def _check_input_names(self, inputs: dict) -> None:
        """Refuse a keyword input no pass reads (a typo would otherwise be
        ignored, and a pass that needs the input would run without it)."""
        known = set(DOCUMENTED_INPUTS)
        for cls in self.registry:
            known |= set(cls.needs)
        for p in self._flat(self.items):
            known |= set(p.needs) | set(self.required_inputs(p))
        unknown = sorted(set(inputs) - known)
        if unknown:
            bad = unknown[0]
            raise TypeError(f"PassManager got an unknown keyword argument {bad!r}{did_you_mean(bad, known)}; "
                            f"inputs that passes take: {', '.join(sorted(known)) or 'none'}")

    # -- up-front checks -----------------------------------------------------------
    def check(self, graph: Graph | None = None, context: PassContext | None = None) -> None:
        """Fail before any pass runs: ordering, requires/ensures, needed inputs."""
        context = context or self.context
        flat = self._flat(self.items)
        names = [p.name for p in flat]
        have = set(graph.properties) if graph is not None else set()
        for i, p in enumerate(flat):
            for other in p.runs_after:
                if other in names[i + 1:] and other not in names[:i]:
                    raise PipelineError(f"pass {p.name!r} must run after {other!r}, but the pipeline {self} runs {other!r} later")
            for other in p.runs_before:
                if other in names[:i]:
                    raise PipelineError(f"pass {p.name!r} must run before {other!r}, but the pipeline {self} runs {other!r} earlier")
            for prop in p.requires:
                if prop not in have:
                    providers = sorted(c.name for c in self.registry if prop in c.ensures)
                    raise PipelineError(
                        f"pass {p.name!r} requires {prop!r}, which no earlier pass ensures"
                        + (f"; run one of {providers} before it" if providers else "")
                    )
            for key in self.required_inputs(p):
                if key not in context:
                    raise PipelineError(
                        f"pass {str(p)!r} needs input {key!r}; give it as PassManager(..., {key}=...)"
                    )
            have |= set(p.ensures)

    @staticmethod
    def required_inputs(p: Pass) -> tuple[str, ...]:
        dynamic = getattr(p, "required_inputs", None)
        return tuple(dynamic()) if callable(dynamic) else tuple(p.needs)

    def tolerance_for(self, graph: Graph, ran: Sequence[Pass] | None = None) -> float:
        """What ``check_numerics`` holds ``graph``'s outputs to (x output scale)
        after the passes ``ran`` (default: the whole pipeline): ``tolerance``,
        or :func:`default_tolerance`, raised to each lossy pass's own."""
        base = self.tolerance if self.tolerance is not None else default_tolerance(graph)
        return raised_tolerance(base, self.passes() if ran is None else ran)

    # -- running -------------------------------------------------------------------------
    def run(self, graph: Graph, **context: Any) -> PipelineResult:
        """Run the pipeline on a copy of ``graph``; ``graph`` itself is never changed."""
        if not isinstance(graph, Graph):
            hint = (" (a torch.nn.Module): trace it first, graph = fxopt.trace(model, example_inputs)"
                    if isinstance(graph, torch.nn.Module) else "")
            raise TypeError(f"PassManager.run expects an fxopt Graph, got {type(graph).__name__}{hint}")
        self._check_input_names(context)
        ctx = PassContext({**self.context.inputs, **context})
        self.check(graph, ctx)
        instruments = list(self.instruments)
        if self.dump_dir is not None:
            instruments.append(IRDump(self.dump_dir, str(self)))
        work = graph.copy()
        state = _RunState(ctx, instruments, output_signature(graph))
        if self.check_numerics:
            inputs = self.numerics_inputs or [(graph.example_args, graph.example_kwargs)]
            state.numerics = []
            for a, k in inputs:  # each from the same state, as the checks below run
                with graph.state_restored():
                    state.numerics.append((a, k, graph(*a, **k)))
            state.tolerance = self.tolerance_for(graph, ran=())
        records: list[PassRecord] = []
        warnings: list[str] = []
        # Inside a user's torch.inference_mode(), the constants passes make
        # (quantized weights, merged matrices) would be inference tensors, which
        # torch.export and in-place packing caches cannot take.
        with shape_env_rollback(graph), torch.inference_mode(False):
            for item in self.items:
                self._run_item(item, work, state, records, warnings)
        return PipelineResult(work, str(self), records, warnings, state.analyses)

    def _run_item(self, item: Item, work: Graph, state: "_RunState", records, warnings) -> bool:
        if isinstance(item, Pass):
            return self._run_pass(item, work, state, records)
        any_changed = False
        for _ in range(item.max_iterations):
            changed = False
            for sub in item.passes:
                changed |= self._run_item(sub, work, state, records, warnings)
            any_changed |= changed
            if not changed:
                return any_changed
        warnings.append(f"{item} did not reach a fixed point in {item.max_iterations} iterations")
        return any_changed

    def _run_pass(self, p: Pass, work: Graph, state: "_RunState", records: list[PassRecord]) -> bool:
        p.context = state.context
        p.analyses = state.analyses
        nodes_before, bytes_before = work.num_nodes(), work.param_bytes()
        existing = set(work.fx.nodes)
        before = meta_snapshot(work)
        for inst in state.instruments:
            inst.before_pass(p, work)
        start = time.perf_counter()
        try:
            result = p.run(work)
            ms = (time.perf_counter() - start) * 1e3
            if not isinstance(result, PassResult):
                raise PassError(f"run() returned {type(result).__name__}, expected PassResult", pass_name=str(p))
            # A pass may edit and restore (split a fused op, find nothing, fuse it again) and
            # report no change: the nodes the analyses name are gone all the same.
            if result.changed or not existing.issuperset(work.fx.nodes):
                state.analyses.invalidate(work, p.preserves if result.preserved is None else result.preserved)
            work.recompile()
            work.prune_unreferenced_attributes()
            if result.changed:
                refresh_changed_meta(work, before)
            else:
                work.refresh_meta()
            if self.verify:
                work.verify()
                now = output_signature(work)
                if len(now) == len(state.outputs):
                    for i in result.sharded_outputs:  # a rank's shard of an output: its new shape is the one to keep
                        state.outputs[i] = now[i]
                if now != state.outputs:
                    changed = next(i for i, (a, b) in enumerate(zip(now, state.outputs)) if a != b) if len(now) == len(state.outputs) else "count"
                    raise PassError(f"changed the model's outputs (output {changed}: {state.outputs[changed] if changed != 'count' else len(state.outputs)} -> "
                                    f"{now[changed] if changed != 'count' else len(now)})", pass_name=str(p))
        except Exception as e:
            err = e if isinstance(e, PassError) and e.pass_name else PassError(
                str(e) if isinstance(e, PassError) else f"{type(e).__name__}: {e}",
                pass_name=str(p),
                node=getattr(e, "node", None) or p.current_node,
            )
            for inst in state.instruments:
                inst.after_failure(p, work, err)
            if err is e:
                raise
            raise err from e
        finally:
            p.current_node = None
        work.properties |= set(p.ensures)
        for node in work.fx.nodes:  # provenance: which pass made each node
            if node not in existing:
                node.meta.setdefault("created_by", str(p))
        record = PassRecord(str(p), ms, bool(result.changed), nodes_before, work.num_nodes(), bytes_before, work.param_bytes(), dict(result.stats))
        if state.numerics is not None:
            state.tolerance = raised_tolerance(state.tolerance, [p])
            worst = None
            for args, kwargs, ref in state.numerics:
                with work.state_restored():
                    parity = compare(ref, work(*args, **kwargs))
                if worst is None or parity.max_abs_err / max(parity.scale, 1e-12) > worst.max_abs_err / max(worst.scale, 1e-12):
                    worst = parity
            record.numerics = worst.as_dict()
            if not worst.within(state.tolerance):
                err = NumericsError(
                    f"outputs drifted from the original: max abs error {worst.max_abs_err:.3g} > "
                    f"{state.tolerance:g} x output scale {worst.scale:.3g} (cosine {worst.cosine:.6f})",
                    pass_name=str(p),
                )
                for inst in state.instruments:
                    inst.after_failure(p, work, err)
                raise err
        records.append(record)
        for inst in state.instruments:
            inst.after_pass(p, work, record)
        return record.changed


# Relative output error a float pass may cause, by the coarsest float dtype among the outputs.
_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 4e-2}


def default_tolerance(graph: Graph) -> float:
    """1e-4, or more when an output is float16 / bfloat16 (see :data:`_TOLERANCE`)."""
    out = next(n for n in reversed(graph.fx.nodes) if n.op == "output")
    dtypes = {n.meta["val"].dtype for n in torch.utils._pytree.tree_leaves(out.args[0])
              if isinstance(n, torch.fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)}
    return max([1e-4, *(_TOLERANCE.get(d, 1e-4) for d in dtypes)])


def raised_tolerance(tolerance: float, passes: Sequence[Pass]) -> float:
    """``tolerance`` once ``passes`` have run: a lossy pass (quantization,
    pruning) raises it to its own ``numerics_tolerance``."""
    return max([tolerance, *(p.numerics_tolerance for p in passes)])


def output_signature(graph: Graph) -> list[str]:
    """Dtype and (symbolic) shape of each output: what no pass may change."""
    from ..ir.printer import format_value

    out = next(n for n in reversed(graph.fx.nodes) if n.op == "output")
    leaves = torch.utils._pytree.tree_leaves(out.args[0])
    return [format_value(n.meta.get("val")) if isinstance(n, torch.fx.Node) else repr(n) for n in leaves]


@dataclass
class _RunState:
    context: PassContext
    instruments: list[Instrument]
    outputs: list[str]
    analyses: AnalysisManager = field(default_factory=AnalysisManager)
    numerics: list | None = None
    tolerance: float = 1e-4
