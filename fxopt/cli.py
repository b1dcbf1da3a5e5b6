"""The ``fxopt`` command line: ``optimize``, ``generate``, ``passes``, ``show``. A thin layer
over the Python API (trace -> PassManager -> compile)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

EXIT_ERROR = 1


class CliError(Exception):
    pass


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 150)


def _load(model: str, dynamic: bool, debug: bool = False):
    from .ir.trace import split_inputs, trace
    from .models import MissingModelError, load_model

    try:
        spec = load_model(model)
    except (ValueError, MissingModelError) as e:
        raise CliError(str(e)) from e
    # torch.export prints the failing graph's code on stderr; the TraceError says what failed.
    noise = io.StringIO()
    with contextlib.redirect_stderr(noise) if not debug else contextlib.nullcontext():
        graph = trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes if dynamic else None, name=spec.name)
    return spec, graph, split_inputs(spec.example_inputs)


def _import_plugins(a) -> None:
    """Import modules that register passes: those named by --plugin, and the
    module of a ``package.module:factory`` model (its passes may be used).
    The current folder is searched first, as ``python -m`` does."""
    import importlib
    import os

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    named = [(name, f"--plugin {name}") for name in a.plugin or []]
    for source in (a.model, getattr(a, "calibration", None) or ""):
        if _is_factory(source):
            named.append((source.partition(":")[0], repr(source)))
    for name, given in named:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise CliError(f"cannot import module {name!r} (from {given}): {e}; the module must be importable: "
                           f"run fxopt from the folder that holds it or add that folder to PYTHONPATH") from e


def _is_factory(text: str) -> bool:
    """``package.module:factory`` (not a file path such as C:\\data.txt)."""
    module, colon, attr = text.partition(":")
    return bool(colon) and attr.isidentifier() and all(part.isidentifier() for part in module.split("."))


def _needs_calibration(pm) -> list[str]:
    return [str(p) for p in pm.passes() if "calibration_data" in pm.required_inputs(p)]


def _calibration_inputs(source: str, spec, batch: int) -> list:
    """Calibration inputs from ``--calibration``: a ``package.module:factory``
    returning a list of model inputs, or a text file (one text per line,
    tokenized with the model's tokenizer, ``batch`` lines per input)."""
    import importlib

    if _is_factory(source):
        module, _, attr = source.partition(":")
        factory = getattr(importlib.import_module(module), attr, None)
        if not callable(factory):
            raise CliError(f"--calibration {source}: module {module!r} has no callable {attr!r}")
        data = list(factory())
        if not data:
            raise CliError(f"--calibration {source}: the factory returned no inputs")
        return data
    path = Path(source)
    if not path.is_file():
        raise CliError(f"--calibration {source}: no such file (give a text file, one text per line, "
                       f"or package.module:factory returning a list of model inputs)")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise CliError(f"--calibration {source}: the file holds no text")
    if spec.tokenize is None:
        raise CliError(f"--calibration {source}: model {spec.name!r} has no tokenizer to read a text file with; "
                       f"give package.module:factory returning a list of model inputs instead")
    return [spec.tokenize(lines[i:i + batch]) for i in range(0, len(lines), batch)]


def _median_ms(fn, args, kwargs, repeats: int) -> float:
    from .ir.timing import median_ms

    return median_ms(lambda: fn(*args, **kwargs), repeat=repeats, warmup=2)


def _progress_instrument(total: int, console):
    """A rich progress bar, and the pass-manager instrument that drives it."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .passes import Instrument

    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=console, transient=True)
    task = progress.add_task("passes", total=total)

    class ShowProgress(Instrument):
        def before_pass(self, p, graph):
            progress.update(task, description=f"running {p}")

        def after_pass(self, p, graph, record):
            progress.advance(task)

    return progress, ShowProgress()


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_optimize(a) -> int:
    if a.tensor_parallel * a.data_parallel > 1:
        return cmd_optimize_parallel(a)
    from rich.table import Table

    from .backends import compile as compile_graph
    from .ir.parity import compare
    from .passes import PassManager

    console = _console()
    suffix = {"onnxruntime": ".onnx", "eager": ".pt2"}[a.backend]
    if a.out and Path(a.out).suffix != suffix:
        raise CliError(f"--out {a.out}: the {a.backend} backend saves a {suffix} file"
                       + (" (a torch.export archive; --backend onnxruntime writes .onnx)" if a.backend == "eager" else ""))
    if a.report:
        Path(a.report).parent.mkdir(parents=True, exist_ok=True)
    _import_plugins(a)
    pm = PassManager(a.pipeline, check_numerics=a.check_numerics, dump_dir=a.dump_ir)  # bad pipelines fail here, before tracing
    needs = _needs_calibration(pm)
    if needs and not a.calibration:
        raise CliError(f"pass {needs[0]!r} needs calibration data: give --calibration FILE.txt (one text per line, "
                       f"tokenized with the model's tokenizer) or --calibration package.module:factory "
                       f"(returns a list of model inputs)")
    # Calibration texts come in their own lengths: trace with the model's dynamic dims.
    spec, graph, (args, kwargs) = _load(a.model, a.dynamic or bool(needs), a.debug)
    context = {"calibration_data": _calibration_inputs(a.calibration, spec, a.calibration_batch)} if needs else {}
    spec.model.eval()
    with torch.inference_mode():
        reference = spec.model(*args, **kwargs)
    # The reference is timed before any optimized variant runs, so that ONNX
    # Runtime's spinning worker threads cannot tax its timing.
    ref_ms = _median_ms(spec.model, args, kwargs, a.repeats)
    progress, hook = _progress_instrument(len(pm.passes()), console)
    pm.instruments.append(hook)
    def report(items, description):
        items = list(items)
        return progress.track(items, total=len(items), description=f"  {description}")

    with progress:
        result = pm.run(graph, progress=report, **context)
    options = {}
    if a.backend == "onnxruntime" and a.threads:
        options["intra_op_threads"] = a.threads
    compiled = compile_graph(result.graph, a.backend, **options)
    parity = compare(reference, compiled(*args, **kwargs))
    opt_ms = _median_ms(compiled, args, kwargs, a.repeats)
    artifact = compiled.artifact_bytes()
    if a.out:
        out = compiled.save(a.out)
        artifact = sum(p.stat().st_size for p in out.parent.glob(out.name + "*"))

    table = Table(title=f"{spec.name}: {pm}  ->  {a.backend}")
    for col in ("pass", "ms", "changed", "nodes", "param bytes", "stats"):
        table.add_column(col, justify="right" if col in ("ms", "nodes", "param bytes") else "left")
    for r in result.records:
        items = [f"{k}={v}" for k, v in r.stats.items() if not isinstance(v, (dict, list))]
        stats = ", ".join(items[:next((i for i in range(len(items)) if len(", ".join(items[:i + 1])) > 60), len(items))])
        table.add_row(r.name, f"{r.ms:.1f}", "yes" if r.changed else "no", f"{r.nodes_before} -> {r.nodes_after}",
                      f"{_bytes(r.param_bytes_before)} -> {_bytes(r.param_bytes_after)}", stats)
    console.print(table)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    console.print(
        f"nodes {graph.num_nodes()} -> {result.graph.num_nodes()}, params {_bytes(graph.param_bytes())} -> "
        f"{_bytes(result.graph.param_bytes())}, artifact {_bytes(artifact)}\n"
        f"max abs err {parity.max_abs_err:.3g} (output scale {parity.scale:.3g}), cosine {parity.cosine:.6f}\n"
        f"latency (median of {a.repeats}): reference {ref_ms:.2f} ms, optimized {opt_ms:.2f} ms"
    )
    if a.report:
        report = {
            "model": spec.name, "pipeline": str(pm), "backend": a.backend, "dynamic": a.dynamic or bool(needs),
            "nodes_before": graph.num_nodes(), "nodes_after": result.graph.num_nodes(),
            "param_bytes_before": graph.param_bytes(), "param_bytes_after": result.graph.param_bytes(),
            "artifact_bytes": artifact, "max_abs_err": parity.max_abs_err, "output_scale": parity.scale,
            "cosine": parity.cosine, "latency_ms": {"reference": ref_ms, "optimized": opt_ms, "repeats": a.repeats},
            "passes": [{"name": r.name, "ms": r.ms, "changed": r.changed, "nodes_before": r.nodes_before,
                        "nodes_after": r.nodes_after, "param_bytes_before": r.param_bytes_before,
                        "param_bytes_after": r.param_bytes_after, "stats": r.stats} for r in result.records],
            "warnings": result.warnings,
        }
        Path(a.report).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


def cmd_optimize_parallel(a) -> int:
    """``optimize --tensor-parallel N [--data-parallel M]``: outside a
    launcher, start N x M processes of this same command under torchrun;
    inside, each process traces the model, keeps its rank's graph (the
    pipeline runs after the split), compiles it, and checks and times it
    against the whole model; rank 0 reports."""
    from . import launch

    world = a.tensor_parallel * a.data_parallel
    if a.out:
        raise CliError("--out: a tensor- or data-parallel model is one graph per rank; save rank graphs from Python "
                       "(fxopt.parallel.rank_graph(...).save(path))")
    if not launch.under_launcher():
        return launch.relaunch(a.argv, world)
    from .backends import compile as compile_graph
    from .data_parallel import DataParallel
    from .ir.parity import compare
    from .parallel import all_reduce_count, bind_process_group, rank_graph

    mesh = launch.init(a.tensor_parallel, a.data_parallel, timeout=a.timeout, transport=a.transport)
    if a.threads:
        torch.set_num_threads(a.threads)
    _import_plugins(a)
    spec, graph, (args, kwargs) = _load(a.model, a.dynamic or a.data_parallel > 1, a.debug)
    spec.model.eval()
    with torch.inference_mode():
        reference = spec.model(*args, **kwargs)
    ref_ms = _median_ms(spec.model, args, kwargs, a.repeats)
    model_bytes = graph.param_bytes()
    if a.tensor_parallel > 1:
        graph = bind_process_group(rank_graph(graph, mesh.tp_rank, a.tensor_parallel, pipeline=a.pipeline), mesh.tp_group)
    else:
        from .passes import PassManager

        graph = PassManager(a.pipeline).run(graph).graph
    options = {"intra_op_threads": a.threads} if a.backend == "onnxruntime" and a.threads else {}
    compiled = compile_graph(graph, a.backend, **options)
    run = DataParallel(compiled, mesh.dp_group) if a.data_parallel > 1 else compiled
    parity = compare(reference, run(*args, **kwargs))
    opt_ms = _median_ms(run, args, kwargs, a.repeats)
    rank_bytes = graph.param_bytes()
    if mesh.rank == 0:
        print(f"{spec.name}: tensor-parallel {a.tensor_parallel} x data-parallel {a.data_parallel} -> {a.backend} "
              f"({world} processes, tensor-parallel collectives on {mesh.transport})\n"
              f"params per rank {_bytes(rank_bytes)} of {_bytes(model_bytes)} ({rank_bytes / model_bytes:.2f}), "
              f"all-reduces per forward {all_reduce_count(graph)}\n"
              f"max abs err {parity.max_abs_err:.3g} (output scale {parity.scale:.3g}), cosine {parity.cosine:.6f}\n"
              f"latency (median of {a.repeats}): reference (one process) {ref_ms:.2f} ms, parallel {opt_ms:.2f} ms")
        if a.report:
            Path(a.report).parent.mkdir(parents=True, exist_ok=True)
            Path(a.report).write_text(json.dumps({
                "model": spec.name, "pipeline": a.pipeline, "backend": a.backend, "tensor_parallel": a.tensor_parallel,
                "data_parallel": a.data_parallel, "transport": mesh.transport, "param_bytes_model": model_bytes, "param_bytes_rank": rank_bytes,
                "all_reduces": all_reduce_count(graph), "max_abs_err": parity.max_abs_err, "output_scale": parity.scale,
                "cosine": parity.cosine, "latency_ms": {"reference": ref_ms, "parallel": opt_ms, "repeats": a.repeats},
            }, indent=2) + "\n")
    return 0


def _pipeline_value(value) -> str:
    """A default as it would be written in pipeline text."""
    if value is None or isinstance(value, bool):
        return {None: "none", True: "true", False: "false"}[value]
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_pipeline_value, value)) + "]"
    return str(value)


def cmd_passes(a) -> int:
    import shutil
    import textwrap

    from .passes import REGISTRY

    described = REGISTRY.describe()
    if a.json:
        print(json.dumps(described, indent=2, default=str))
        return 0
    # Plain wrapped text, not a table: each pass's summary whole on its own
    # lines, its options below, readable at 80 columns.
    width = max(60, min(shutil.get_terminal_size((80, 24)).columns, 100))
    out = []
    for d in described:
        out.append(d["name"])
        out.extend(textwrap.wrap(d["summary"], width, initial_indent="  ", subsequent_indent="  "))
        for key, o in d["options"].items():
            default = _pipeline_value(o["default"])
            choices = f" ({' | '.join(map(str, o['choices']))})" if o.get("choices") else ""
            out.append(f"    {key}: {o['type']} = {default}{choices}")
            if o["help"]:
                out.extend(textwrap.wrap(o["help"], width, initial_indent="        ", subsequent_indent="        "))
        out.append("")
    print("\n".join(out).rstrip())
    return 0


def cmd_show(a) -> int:
    from .passes import PassManager

    _import_plugins(a)
    pm = PassManager(a.pipeline) if a.pipeline else None
    _, graph, _ = _load(a.model, a.dynamic, a.debug)
    if pm is not None:
        graph = pm.run(graph).graph
    print(graph)
    return 0


def cmd_generate(a) -> int:
    """Prefill + greedy decode through the optimized graphs, timed, with the
    tokens checked against the original model's ``generate``."""
    from .generation import compile_generator
    from .models import MissingModelError, load_model

    console = _console()
    if a.report:
        Path(a.report).parent.mkdir(parents=True, exist_ok=True)
    _import_plugins(a)
    if a.pipeline:
        from .passes import PassManager

        PassManager(a.pipeline)  # bad pipelines fail here, before tracing
    try:
        model = load_model(a.model).model.eval()
    except (ValueError, MissingModelError) as e:
        raise CliError(str(e)) from e
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise CliError(f"{a.model} is not a causal language model with a config (vocab_size); generate needs a *ForCausalLM model")
    ids = torch.randint(0, vocab, (a.batch, a.prompt_tokens), generator=torch.Generator().manual_seed(a.seed))
    options = {}
    if a.threads:  # the same count for the reference, eager and ONNX Runtime
        torch.set_num_threads(a.threads)
        options = {"intra_op_threads": a.threads} if a.backend == "onnxruntime" else {}
    noise = io.StringIO()
    with contextlib.redirect_stderr(noise) if not a.debug else contextlib.nullcontext():
        gen = compile_generator(model, a.pipeline, a.backend, cache=a.cache, prepack=a.prepack, **options)
    # no stop token on either side: both generate exactly --max-new-tokens
    run = lambda n: gen.generate(ids, max_new_tokens=n, eos_token_id=())
    gen_kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(**gen_kwargs, max_new_tokens=2, min_new_tokens=2)  # warm-up
        start = time.perf_counter()
        reference = model.generate(**gen_kwargs, max_new_tokens=a.max_new_tokens, min_new_tokens=a.max_new_tokens)
        reference_ms = (time.perf_counter() - start) * 1e3
    run(2)  # warm-up
    out = run(a.max_new_tokens)
    same = torch.equal(out.sequences, reference)
    agree = (out.sequences[:, ids.shape[1]:] == reference[:, ids.shape[1]:]).float().mean().item()
    console.print(
        f"{a.model}: {gen.graphs.pipeline or 'traced graphs'} -> {a.backend}, batch {a.batch}, prompt {a.prompt_tokens}, "
        f"{a.max_new_tokens} new tokens\n"
        f"prefill {out.prefill_ms:.1f} ms, decode {out.decode_tokens_per_s:.1f} tokens/s per sequence "
        f"({out.decode_steps} steps in {out.decode_ms:.0f} ms)\n"
        f"reference generate (eager PyTorch, fp32) {reference_ms:.0f} ms in all\n"
        f"greedy tokens equal the reference's: {'yes' if same else f'no ({agree:.1%} of new tokens agree)'}")
    if a.report:
        report = {"model": a.model, "pipeline": gen.graphs.pipeline, "backend": a.backend, "batch": a.batch,
                  "prompt_tokens": a.prompt_tokens, "max_new_tokens": a.max_new_tokens, "prefill_ms": out.prefill_ms,
                  "decode_ms": out.decode_ms, "decode_steps": out.decode_steps,
                  "decode_tokens_per_s": out.decode_tokens_per_s, "reference_generate_ms": reference_ms,
                  "tokens_equal_reference": same, "token_agreement": agree, "shared_constant_bytes": gen.shared_bytes,
                  "threads": a.threads or None}
        Path(a.report).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxopt", description="Graph optimization for LLM inference.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser("optimize", help="trace MODEL, run a pipeline, lower to a backend, compare and time")
    o.add_argument("model", help="built-in name (tiny-gpt, gpt2, llama, bert, minilm, ...) or package.module:factory "
                                   "(importable from the current folder or PYTHONPATH)")
    o.add_argument("--pipeline", default="canonicalize,dce,constant-fold,cse", help="pass pipeline text")
    o.add_argument("--backend", choices=("eager", "onnxruntime"), default="eager")
    o.add_argument("--out", help="save the compiled model here (.onnx for onnxruntime, .pt2 for eager)")
    o.add_argument("--report", help="write a JSON report here")
    o.add_argument("--dynamic", action="store_true", help="trace with the model's dynamic batch/sequence dims")
    o.add_argument("--dump-ir", help="write the IR before/after each pass into this folder")
    o.add_argument("--check-numerics", action="store_true", help="compare outputs after every pass")
    o.add_argument("--repeats", type=_positive, default=10, help="timed runs per variant (median reported)")
    o.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    o.add_argument("--plugin", action="append", help="import this module first (it may register passes); repeatable")
    o.add_argument("--calibration", metavar="FILE|module:factory",
                   help="calibration inputs for static W8A8, SmoothQuant, AWQ and GPTQ: a text file (one text per line, "
                        "tokenized with the model's tokenizer) or package.module:factory returning a list of model inputs; "
                        "the model is then traced with its dynamic dimensions")
    o.add_argument("--calibration-batch", type=_positive, default=8, help="lines of the text file per calibration input")
    o.add_argument("--tensor-parallel", type=_positive, default=1, metavar="N",
                   help="split the model over N processes (tensor-parallel pass, then --pipeline on each rank's graph); "
                        "outside torchrun, starts the processes itself")
    o.add_argument("--data-parallel", type=_positive, default=1, metavar="M",
                   help="M replicas (of the N-rank split), each running its part of the batch; N x M processes in all")
    o.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a rank waits for the others in a collective before failing (a dead or stuck rank)")
    o.add_argument("--transport", choices=("auto", "shm", "gloo"), default="auto",
                   help="what the tensor-parallel collectives run on: shm (fxopt's shared-memory group, ranks of one "
                        "x86-64 host; the data-parallel gathers too), gloo, or auto (shm for tensor parallelism where it can)")
    o.set_defaults(func=cmd_optimize)

    g = sub.add_parser("generate", help="prefill + greedy decode of a causal LM through the optimized graphs, timed and checked")
    g.add_argument("model", help="built-in causal LM (gpt2, gpt2-tiny, llama, llama-tiny) or package.module:factory")
    g.add_argument("--pipeline", default="canonicalize,dce,constant-fold,cse", help="pass pipeline text (applied to both graphs)")
    g.add_argument("--backend", choices=("eager", "onnxruntime"), default="eager")
    g.add_argument("--prompt-tokens", type=_positive, default=32, help="random prompt length")
    g.add_argument("--max-new-tokens", type=_positive, default=32)
    g.add_argument("--batch", type=_positive, default=1)
    g.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    g.add_argument("--threads", type=int, default=0, help="threads for PyTorch and ONNX Runtime alike (0: their defaults)")
    g.add_argument("--cache", choices=("auto", "growing", "buffer"), default="auto",
                   help="KV cache layout (buffer: preallocated, written in place; needs pack-attention in the pipeline; "
                        "auto: buffer where it applies)")
    g.add_argument("--prepack", choices=("none", "decode", "all"), default="none",
                   help="weights in the kernels' packed layout, one more copy in memory: onnxruntime 'decode' (the "
                        "decode session); eager 'decode' or 'all' (oneDNN-packed linears, one copy both graphs read)")
    g.add_argument("--report", help="write a JSON report here")
    g.add_argument("--plugin", action="append", help="import this module first (it may register passes); repeatable")
    g.set_defaults(func=cmd_generate)

    ps = sub.add_parser("passes", help="list registered passes and their options")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=cmd_passes)

    s = sub.add_parser("show", help="print the text IR of MODEL (after --pipeline, if given)")
    s.add_argument("model")
    s.add_argument("--pipeline")
    s.add_argument("--dynamic", action="store_true")
    s.add_argument("--plugin", action="append", help="import this module first (it may register passes)")
    s.set_defaults(func=cmd_show)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to start the same command on every rank
    if not args.debug:
        # torch's pytree and exporter deprecation notices are not the user's concern.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # torch.export logs the failing graph's code at error level; the one-line
        # message below says what failed, --debug shows everything.
        torch._logging.set_logs(all=logging.CRITICAL)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("fxopt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        message = str(e).strip() or type(e).__name__
        if not isinstance(e, CliError):
            message = f"{message}" if ":" in message.splitlines()[0] else f"{type(e).__name__}: {message}"
        print(f"fxopt: error: {message}", file=sys.stderr)
        print("(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
