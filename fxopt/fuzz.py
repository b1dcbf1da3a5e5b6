"""Seeded fuzzing of pipelines: random subsets and orders of the registered
passes with random options, run on small models and compiled for each backend.

Every run must end one of two ways:

* ``ok``: each output on the traced inputs and on inputs of another shape is
  within tolerance of the original model's (the tolerance the pass manager
  would use: the output dtype's, raised by each lossy pass in the pipeline);
* ``refused``: a clear error, a :class:`PipelineError`, :class:`OptionError`,
  :class:`PassError` naming its pass, or :class:`BackendError`.

Anything else is a finding: ``crash`` (another exception type, or a
``PassError`` that only wraps an internal exception such as a ``TypeError``),
``mismatch`` (outputs out of tolerance without an error), ``mutated`` (the
original model's parameters or buffers, or the traced graph, changed).

``python scripts/fuzz_pipelines.py --seed 0 --count 200`` runs it at length;
``tests/test_fuzz.py`` runs a few cases of it.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from .backends import BackendError, compile
from .ir.collectives import ProcessGroupError
from .ir.graph import Graph
from .ir.parity import compare
from .ir.trace import split_inputs, trace
from .models import BUILTIN, ModelSpec
from .passes import REGISTRY, PassError, PassManager, PipelineError
from .passes.base import Option, OptionError, Pass
from .passes.pipeline import format_value
from .passes.registry import PassRegistry

MODELS = ("mlp", "tiny-gpt", "gpt2-tiny", "bert-tiny")
BACKENDS = ("eager", "onnxruntime")
# ProcessGroupError: a tensor-parallel rank graph compiled where no process group runs it
CLEAR = (PipelineError, OptionError, PassError, BackendError, ProcessGroupError)

# Values tried for options whose type alone says little (regexes, per-layer
# overrides); other options draw from their choices or from values of their type.
EXAMPLES: dict[tuple[str, str], list] = {
    ("quantize", "include"): [None, r"h\.0", "attn|mlp", r"layers\.1", "fc", "["],
    ("quantize", "exclude"): [None, "lm_head", r"h\.1", "attn", "("],
    ("quantize", "overrides"): [(), (r"h\.0:bits=4",), ("mlp:bits=8;group_size=32",), ("attn:scheme=sym",), ("bad",)],
    ("quantize", "group_size"): [16, 32, 64, 128, 48],
    ("quantize", "guard"): [False] * 9 + [True],  # times every layer: slow, so rare
    ("constant-fold", "max_bytes"): [0, 64, 4096, 1 << 20, -1],
}
_INTS = [0, 1, 2, 3, 4, 8, 16, 32, 64, 128]
_FLOATS = [0.0, 0.1, 0.5, 0.9, 1.0, 2.0, 60.0, 99.0, 99.99, 100.0]
# An exception type at the start of a PassError's reason: a pass crashed and
# the manager only wrapped it (a clear refusal says what is wrong instead).
_WRAPPED = re.compile(r"^(TypeError|AttributeError|KeyError|IndexError|AssertionError|NameError|UnboundLocalError|"
                      r"ZeroDivisionError|RecursionError|NotImplementedError|StopIteration):")


@dataclass
class Outcome:
    model: str
    pipeline: str
    backend: str
    kind: str  # ok | refused | crash | mismatch | mutated
    detail: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        return f"{self.kind:8s} {self.model:10s} {self.backend:11s} {self.pipeline}" + (f"\n         {self.detail}" if self.detail else "")


def random_value(rng: random.Random, pass_name: str, name: str, opt: Option) -> Any:
    """A value for option ``name`` of ``pass_name``: mostly valid, now and then not."""
    types = opt.type if isinstance(opt.type, tuple) else (opt.type,)
    pool: list = []
    if (pass_name, name) in EXAMPLES:
        pool = list(EXAMPLES[(pass_name, name)])
    elif opt.choices:
        pool = list(opt.choices)
    elif bool in types:
        pool = [True, False]
    elif int in types:
        pool = _INTS
    elif float in types:
        pool = _FLOATS
    elif tuple in types:
        default = tuple(opt.default) if isinstance(opt.default, tuple) else ()
        subset = tuple(v for v in default if rng.random() < 0.6)
        pool = [default, subset, ()]
    elif str in types:
        pool = ["x"]
    if opt.default is None or not pool:
        pool = [*pool, None]
    valid = [v for v in pool if _accepts(opt, pass_name, v)]
    return rng.choice(valid if valid and rng.random() < 0.9 else pool)  # a bad value now and then


def _accepts(opt: Option, pass_name: str, value: Any) -> bool:
    try:
        opt.validate(pass_name, value)
        return True
    except OptionError:
        return False


def random_pass_text(rng: random.Random, cls: type[Pass], option_rate: float = 0.3) -> str:
    opts = {k: random_value(rng, cls.name, k, o) for k, o in cls.options.items() if rng.random() < option_rate}
    opts = {k: v for k, v in opts.items() if v is not None or cls.options[k].default is None}
    if not opts:
        return cls.name
    return cls.name + "(" + ",".join(f"{k}={format_value(v)}" for k, v in opts.items()) + ")"


def random_pipeline(rng: random.Random, registry: PassRegistry = REGISTRY, max_passes: int = 5) -> str:
    """Pipeline text: a random subset of the registered passes in a random
    order, with random options, sometimes a fixed-point group or a repeat."""
    classes = list(registry)
    chosen = rng.sample(classes, rng.randint(1, min(max_passes, len(classes))))
    if rng.random() < 0.2:
        chosen.append(rng.choice(chosen))
    items = [random_pass_text(rng, c) for c in chosen]
    if rng.random() < 0.6 and "canonicalize" in registry:  # most passes run after it: fewer ordering refusals
        items.insert(0, "canonicalize")
    if len(items) > 2 and rng.random() < 0.15:
        i = rng.randrange(len(items) - 1)
        items[i:i + 2] = [f"fixed-point({items[i]},{items[i + 1]})"]
    return ",".join(items)


def _fingerprint_state(model: torch.nn.Module | Graph) -> dict[str, torch.Tensor]:
    if isinstance(model, Graph):
        state = model.tensor_attributes()
    else:
        state = dict(model.named_parameters(remove_duplicate=False))
        state.update(model.named_buffers(remove_duplicate=False))
    return {k: v.detach().clone() for k, v in state.items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def changed_state(model: torch.nn.Module | Graph, saved: dict[str, torch.Tensor]) -> list[str]:
    """Names of parameters and buffers whose bits differ from ``saved`` (or that came or went)."""
    now = _fingerprint_state(model)
    names = sorted(set(now) | set(saved))
    return [n for n in names if n not in now or n not in saved or now[n].shape != saved[n].shape
            or now[n].dtype != saved[n].dtype or not torch.equal(_bits(now[n]), _bits(saved[n]))]


def _clear(e: BaseException) -> bool:
    if isinstance(e, PassError):
        return bool(e.pass_name) and not _WRAPPED.match(e.reason)
    return isinstance(e, CLEAR)


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:400]}"


@dataclass
class _Model:
    spec: ModelSpec
    graph: Graph
    graph_text: str
    state: dict[str, torch.Tensor]
    graph_state: dict[str, torch.Tensor]
    references: list = field(default_factory=list)  # (inputs, original outputs)


class Fuzzer:
    """Runs random pipelines on ``models`` (built-in names) for ``backends``."""

    def __init__(self, models: Iterable[str] = MODELS, backends: Iterable[str] = BACKENDS, registry: PassRegistry = REGISTRY):
        self.model_names = list(models)
        self.backends = list(backends)
        self.registry = registry
        self._models: dict[str, _Model] = {}

    def model(self, name: str) -> _Model:
        if name not in self._models:
            spec = BUILTIN[name]()
            state = _fingerprint_state(spec.model)
            graph = trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, name=name)
            m = _Model(spec, graph, str(graph), state, _fingerprint_state(graph))
            for inputs in [spec.example_inputs, *spec.other_inputs]:
                args, kwargs = split_inputs(inputs)
                with torch.no_grad():
                    m.references.append((inputs, spec.model(*args, **kwargs)))
            self._models[name] = m
        return self._models[name]

    def run(self, model_name: str, pipeline: str) -> list[Outcome]:
        """One pipeline on one model, compiled for every backend."""
        m = self.model(model_name)
        start = time.perf_counter()

        def outcome(backend: str, kind: str, detail: str = "") -> Outcome:
            mutated = changed_state(m.spec.model, m.state)
            mutated += [f"graph {n}" for n in changed_state(m.graph, m.graph_state)]
            if mutated or str(m.graph) != m.graph_text:
                self._models.pop(model_name, None)  # later runs start from a fresh model
                kind, detail = "mutated", f"changed: {mutated or 'the traced graph'}; after {kind}: {detail}"
            return Outcome(model_name, pipeline, backend, kind, detail, time.perf_counter() - start)

        calibration = [inputs for inputs, _ in m.references]
        try:
            manager = PassManager(pipeline, registry=self.registry, calibration_data=calibration)
            result = manager.run(m.graph)
        except Exception as e:  # noqa: BLE001 - classifying every failure is the point
            kind = "refused" if _clear(e) else "crash"
            return [outcome(b, kind, _describe(e)) for b in self.backends]
        tolerance = manager.tolerance_for(m.graph)
        outcomes = []
        for backend in self.backends:
            try:
                compiled = compile(result.graph, backend)
                worst = None
                for inputs, ref in m.references:
                    args, kwargs = split_inputs(inputs)
                    parity = compare(ref, compiled(*args, **kwargs))
                    if not parity.within(tolerance):
                        worst = f"max abs error {parity.max_abs_err:.3g} > {tolerance:g} x scale {parity.scale:.3g} (cosine {parity.cosine:.5f})"
                        break
                outcomes.append(outcome(backend, "mismatch", worst) if worst else outcome(backend, "ok"))
            except Exception as e:  # noqa: BLE001
                outcomes.append(outcome(backend, "refused" if _clear(e) else "crash", _describe(e)))
        return outcomes

    def fuzz(self, seed: int, count: int, *, log=None) -> list[Outcome]:
        """``count`` random (model, pipeline) cases from ``seed``, each on every backend."""
        rng = random.Random(seed)
        outcomes: list[Outcome] = []
        for _ in range(count):
            model_name = rng.choice(self.model_names)
            pipeline = random_pipeline(rng, self.registry)
            for o in self.run(model_name, pipeline):
                outcomes.append(o)
                if log:
                    log(o)
        return outcomes


FINDINGS = ("crash", "mismatch", "mutated")


def summary(outcomes: list[Outcome]) -> str:
    kinds = {k: sum(o.kind == k for o in outcomes) for k in ("ok", "refused", *FINDINGS)}
    return f"{len(outcomes)} runs: " + ", ".join(f"{n} {k}" for k, n in kinds.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=100, help="random (model, pipeline) cases; each runs on every backend")
    ap.add_argument("--models", default=",".join(MODELS), help=f"built-in models (default {','.join(MODELS)})")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--verbose", "-v", action="store_true", help="print every run, not only findings")
    args = ap.parse_args(argv)
    fuzzer = Fuzzer(args.models.split(","), args.backends.split(","))

    def log(o: Outcome) -> None:
        if args.verbose or o.kind in FINDINGS:
            print(o.line(), flush=True)

    outcomes = fuzzer.fuzz(args.seed, args.count, log=log)
    print(f"seed {args.seed}: {summary(outcomes)}")
    return 1 if any(o.kind in FINDINGS for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
