"""Fusion benchmark: fused vs unfused graphs on eager PyTorch and ONNX Runtime,
and fxopt -> ONNX Runtime against the peer pipeline
``torch.onnx.export`` + ``onnxruntime.transformers.optimizer.optimize_model``.

Every time is a ratio against eager fp32 PyTorch on the same model, measured in
the same run (the machine is shared; absolute times are noise). Variants are
timed round-robin and each ratio is taken within a round. ONNX Runtime
sessions run with ``allow_spinning=False`` so their idle threads do not tax the
variant measured next. A variant that fails (export error, peer crash) is a
result row, not a crash.

    python benchmarks/fusion.py                      # all models
    python benchmarks/fusion.py --models gpt2 minilm --reps 10
    python benchmarks/fusion.py --models minilm minilm-padded   # with and without padding

Each model is a section of ``benchmarks/results/fusion.md`` (its latest run);
``fusion.png`` plots every model in the file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import track

import fxopt
from fxopt.ir.trace import split_inputs
from fxopt.models import ModelSpec, bert, gpt2, llama, minilm, minilm_tokenize
from fxopt.passes import REGISTRY, PassManager

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import read_sections, write_result  # noqa: E402

BASE = "canonicalize,dce,constant-fold,cse"
FUSIONS = [p for p in ("fuse-attention", "merge-linears", "pack-attention", "fuse-linear-act", "fuse-norm") if p in REGISTRY]
# Fused + W8A8 dynamic: merge-linears before quantize (Q/K/V quantized as one
# matrix), quantize before fuse-linear-act (the README's recommended order).
# pack-attention runs after quantize; it packs a per-tensor int8 QKV projection
# (QAttention), not a per-token one, so it is in the per-tensor rows only.
_PRE_QUANT = [BASE, *(p for p in FUSIONS if p not in ("fuse-linear-act", "pack-attention"))]
FUSED_W8A8 = ",".join([*_PRE_QUANT, "quantize(mode=dynamic)", "fuse-linear-act", "dce"])
_PER_TENSOR = "quantize(mode=dynamic,act_granularity=tensor)"
FUSED_W8A8_TENSOR = ",".join([*_PRE_QUANT, _PER_TENSOR, "fuse-linear-act", "dce"])
FUSED_W8A8_TENSOR_PACKED = ",".join([*_PRE_QUANT, _PER_TENSOR, "pack-attention", "fuse-linear-act", "dce"])
# remove-padding replaces pack-attention (whose attention op would run the QKV
# GEMM on padded rows); attention then lowers to MultiHeadAttention.
REMOVE_PADDING = ",".join([BASE, *(p for p in FUSIONS if p != "pack-attention"), "remove-padding", "dce"])
GOALS = {"gpt2": 0.60, "gpt2-sdpa": 0.60, "minilm": 0.70, "minilm-padded": 0.70}
GOAL_ROW = "fxopt ORT, fused + pack-attention (Attention / GroupQueryAttention)"
REMOVE_PADDING_ROW = "fxopt ORT, fused + remove-padding (MultiHeadAttention)"
GOAL_ROWS = {"minilm-padded": REMOVE_PADDING_ROW}
LINEARS_ROW = "the linears alone, eager fp32 (GEMM share of eager)"


def _tokens(vocab, batch, seq, mask):
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}
    if mask:
        inputs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    return inputs


def models(names) -> list[tuple[ModelSpec, dict, str, dict]]:
    """(spec traced with eager attention, benchmark inputs, peer model_type, peer args)."""
    out = []
    for name in names:
        if name == "gpt2":
            spec = gpt2(attn_implementation="eager")
            out.append((spec, _tokens(50257, 1, 128, False), "gpt2", dict(num_heads=12, hidden_size=768)))
        elif name == "gpt2-sdpa":  # transformers' default attention: already SDPA in the graph
            spec = gpt2()
            spec.name = "gpt2-sdpa"
            out.append((spec, _tokens(50257, 1, 128, False), "gpt2", dict(num_heads=12, hidden_size=768)))
        elif name == "llama":
            spec = llama(attn_implementation="eager")
            out.append((spec, _tokens(1024, 1, 128, False), "gpt2", dict(num_heads=8, hidden_size=256)))
        elif name == "bert":
            spec = bert(attn_implementation="eager")
            out.append((spec, _tokens(2048, 8, 128, True), "bert", dict(num_heads=4, hidden_size=256)))
        elif name == "minilm":
            spec = minilm()
            spec.model.encoder.set_attn_implementation("eager")
            sentences = [f"Sentence number {i} is about graph rewriting, quantization and fused attention kernels "
                         f"that make transformer inference on a CPU cheaper than running every small op one by one, "
                         f"measured {i} times." for i in range(32)]
            spec.name = "minilm"
            out.append((spec, minilm_tokenize(sentences), "bert", dict(num_heads=12, hidden_size=384)))
        elif name == "minilm-padded":  # mixed lengths: 32 x 43 with 31% real tokens
            from sentences import BATCH

            spec = minilm()
            spec.model.encoder.set_attn_implementation("eager")
            spec.name = "minilm-padded"
            out.append((spec, minilm_tokenize(BATCH), "bert", dict(num_heads=12, hidden_size=384)))
        else:
            raise SystemExit(f"unknown model {name!r}")
    return out


def ort_session(path_or_bytes, threads):
    from fxopt.backends.onnxruntime import new_session, session_options

    return new_session(path_or_bytes, session_options(threads, 1, "all", False))


def peer(spec, inputs, model_type, peer_args, threads, workdir):
    """torch.onnx.export (dynamo) + onnxruntime.transformers optimize_model."""
    from onnxruntime.transformers.optimizer import optimize_model

    args, kwargs = split_inputs(spec.example_inputs)
    raw = Path(workdir) / f"{spec.name}_peer.onnx"
    opt = Path(workdir) / f"{spec.name}_peer_opt.onnx"
    torch.onnx.export(spec.model, args, kwargs=kwargs, dynamo=True, dynamic_shapes=spec.dynamic_shapes).save(str(raw))
    optimized = optimize_model(str(raw), model_type=model_type, **peer_args)
    fused_ops = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    optimized.save_model_to_file(str(opt))
    session = ort_session(str(opt), threads)
    names = [i.name for i in session.get_inputs()]
    feed = {n: inputs[n].numpy() for n in names}
    return (lambda: session.run(None, feed)), fused_ops


def first_output(out):
    if isinstance(out, (list, tuple)) and not isinstance(out, torch.Tensor):
        return torch.as_tensor(np.asarray(out[0]))
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out


def linears_alone(graph, args, kwargs):
    """A callable running only the graph's linears (fp32 F.linear, each on a
    random input of the shape it gets from the benchmark inputs): the GEMMs'
    share of the eager model, which fusing the other ops cannot remove (ONNX
    Runtime's GEMM kernels may be faster or slower than these)."""
    import torch.nn.functional as F

    calls = []

    class Recorder(torch.fx.Interpreter):
        def call_function(self, target, a, kw):
            if target == torch.ops.aten.linear.default:
                calls.append((torch.randn(a[0].shape), a[1], a[2] if len(a) > 2 else None))
            return super().call_function(target, a, kw)

    with torch.no_grad():
        Recorder(graph.module).run(*graph.flatten_inputs(*args, **kwargs))

    def run():
        with torch.no_grad():
            for x, w, b in calls:
                F.linear(x, w, b)
    return run


def run_model(spec, inputs, model_type, peer_args, reps, threads, workdir):
    """Builds every variant, then times them round-robin (one run of each per
    round) so that load from other jobs falls on all of them alike; a
    variant's ratio is the median over rounds of its time / the baseline's
    time in the same round."""
    args, kwargs = split_inputs(inputs)
    with torch.no_grad():
        ref = first_output(spec.model(*args, **kwargs))

    def eager_fp32():
        with torch.no_grad():
            return spec.model(*args, **kwargs)

    built = [dict(variant="eager fp32 (baseline)", fn=eager_fp32, err=0.0, note="")]
    failed = []

    graph = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
    unfused = PassManager(BASE).run(graph)
    fused = PassManager(",".join([BASE, *FUSIONS, "dce"])).run(graph)
    attn = next((r.stats for r in fused.records if r.name == "fuse-attention"), {})
    note = f"attention fused {attn.get('fused', 0)} (causal {attn.get('causal', 0)}, masked {attn.get('masked', 0)})"
    no_pack = ",".join([BASE, *(p for p in FUSIONS if p != "pack-attention"), "dce"])
    variants = [
        ("fxopt eager, unfused", unfused.graph, "eager", {}),
        ("fxopt eager, fused", fused.graph, "eager", {}),
        ("fxopt ORT, unfused", unfused.graph, "onnxruntime", {}),
        ("fxopt ORT, fused, generic SDPA lowering", no_pack, "onnxruntime", {"disable_lowerings": ["contrib-attention"]}),
        ("fxopt ORT, fused + MultiHeadAttention", no_pack, "onnxruntime", {}),
        (GOAL_ROW, fused.graph, "onnxruntime", {}),
        ("fxopt ORT, fused + W8A8 dynamic", FUSED_W8A8, "onnxruntime", {}),
        ("fxopt ORT, fused + W8A8 per tensor (MultiHeadAttention)", FUSED_W8A8_TENSOR, "onnxruntime", {}),
        ("fxopt ORT, fused + W8A8 per tensor + pack-attention (QAttention)", FUSED_W8A8_TENSOR_PACKED, "onnxruntime", {}),
    ]
    if "attention_mask" in inputs:  # an encoder batch: padding to remove
        variants += [("fxopt eager, fused + remove-padding", REMOVE_PADDING, "eager", {}),
                     (REMOVE_PADDING_ROW, REMOVE_PADDING, "onnxruntime", {})]
    for label, g, backend, opts in variants:
        try:
            if isinstance(g, str):  # a pipeline, run here so that a failure is a result row
                g = PassManager(g).run(graph).graph
            if backend == "onnxruntime":
                opts = dict(opts, intra_op_threads=threads, inter_op_threads=1, allow_spinning=False, providers=["CPUExecutionProvider"])
            model = fxopt.compile(g, backend, **opts)
            out = first_output(model(*args, **kwargs))
            built.append(dict(variant=label, fn=lambda m=model: m(*args, **kwargs), err=fxopt.compare(ref, out).max_abs_err,
                              note=note if label.startswith("fxopt") and "unfused" not in label else ""))
        except Exception as e:  # recorded as a result
            failed.append(dict(variant=label, note=f"failed: {type(e).__name__}: {str(e)[:120]}"))
    label = "peer: torch.onnx.export + optimize_model"
    try:
        fn, fused_ops = peer(spec, inputs, model_type, peer_args, threads, workdir)
        out = first_output(fn())
        built.append(dict(variant=label, fn=fn, err=fxopt.compare(ref, out).max_abs_err,
                          note="fused: " + ", ".join(f"{k} {v}" for k, v in fused_ops.items())))
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)[-1]
        failed.append(dict(variant=label, note=f"failed: {type(e).__name__}: {str(e)[:80]} ({Path(tb.filename).name}:{tb.lineno})"))

    built.append(dict(variant=LINEARS_ROW, fn=linears_alone(unfused.graph, args, kwargs), err=None,
                      note="every linear of the graph on a random input of its shape, nothing else"))
    for b in built:  # warm-up
        b["fn"]()
    times = {b["variant"]: [] for b in built}
    for _ in track(range(reps), description=f"{spec.name}: timing {len(built)} variants", console=Console(stderr=True), transient=True):
        for b in built:
            t = time.perf_counter()
            b["fn"]()
            times[b["variant"]].append(time.perf_counter() - t)
    base = times[built[0]["variant"]]
    rows = []
    for b in built:
        ts = times[b["variant"]]
        rows.append(dict(model=spec.name, variant=b["variant"], ratio=statistics.median(t / t0 for t, t0 in zip(ts, base)),
                         ms=statistics.median(ts) * 1e3, err=b["err"], note=b["note"]))
    rows += [dict(model=spec.name, ratio=None, ms=None, err=None, **f) for f in failed]
    return rows


def table(rows) -> str:
    lines = ["| model | variant | time / eager fp32 | ms | max abs err | notes |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "—"
        ms = f"{r['ms']:.1f}" if r["ms"] is not None else "—"
        err = f"{r['err']:.1e}" if r["err"] is not None else "—"
        lines.append(f"| {r['model']} | {r['variant']} | {ratio} | {ms} | {err} | {r['note']} |")
    return "\n".join(lines)


def goals(rows) -> str:
    out = []
    for model, goal in GOALS.items():
        got = [r for r in rows if r["model"] == model and r["variant"] == GOAL_ROWS.get(model, GOAL_ROW) and r["ratio"]]
        if got:
            ratio = got[0]["ratio"]
            out.append(f"- {model}: {GOAL_ROWS.get(model, GOAL_ROW)} {ratio:.2f} of eager fp32, goal <= {goal:.2f}: "
                       f"{'met' if ratio <= goal else 'MISSED'}")
    return "\n".join(out)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models_ = list(dict.fromkeys(r["model"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(14, 4.8))
    width = 0.8 / len(variants)
    colors = plt.get_cmap("tab20").colors
    for i, v in enumerate(variants):
        ys = [next((r["ratio"] or 0 for r in rows if r["model"] == m and r["variant"] == v), 0) for m in models_]
        ax.bar([j + i * width for j in range(len(models_))], ys, width, label=v, color=colors[i % len(colors)])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models_))], models_)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_ylabel("time / eager fp32 (lower is better; 0 = failed)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gpt2", "llama", "bert", "minilm"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for spec, inputs, model_type, peer_args in models(a.models):
            print(f"# {spec.name}", file=sys.stderr)
            rows += run_model(spec, inputs, model_type, peer_args, a.reps, a.threads, workdir)
    shapes = {"gpt2": "GPT-2 small (124M, eager attention), prefill 1x128", "gpt2-sdpa": "GPT-2 small, default SDPA attention, prefill 1x128", "llama": "Llama config (4 layers, 256 wide, GQA 8/2, eager), prefill 1x128",
              "bert": "BERT (4 layers, 256 wide, eager), batch 8x128", "minilm": "real all-MiniLM-L6-v2 (eager attention), batch of 32 equal-length sentences (32x41, no padding)",
              "minilm-padded": "real all-MiniLM-L6-v2 (eager attention), batch of 32 mixed-length texts "
                               "(benchmarks/sentences.py BATCH) padded to 32x43, 31% real tokens"}
    intro = (f"Fusions: {', '.join(FUSIONS)}. Every time is a ratio against eager fp32 PyTorch on the same model in the "
             "same run: variants run round-robin, and each ratio is the median over rounds of the variant's time / the "
             "baseline's in the same round. ONNX Runtime sessions run with spinning off.")
    for m in a.models:
        model_rows = [r for r in rows if r["model"] == m]
        body = (f"torch and ONNX Runtime on {a.threads} threads; {a.reps} rounds.\n\n" + table(model_rows)
                + ("\n\nGoal: " + goals(model_rows)[2:] if goals(model_rows) else ""))
        path = write_result("fusion", "Fusion benchmark", body, section=f"{m}: {shapes[m]}", intro=intro)
        print(f"\n## {m}: {shapes[m]}\n\n{body}")
    try:
        plot(rows_from_results(path), path.with_suffix(".png"))
    except ImportError as e:
        print(f"no plot: {e}", file=sys.stderr)


def rows_from_results(path: Path) -> list[dict]:
    """Every model's latest rows from the result file (for the plot)."""
    rows = []
    for body in read_sections(path).values():
        for line in body.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 6 and cells[0] not in ("model", "---"):
                ratio = float(cells[2]) if cells[2] not in ("—", "") else None
                rows.append(dict(model=cells[0], variant=cells[1], ratio=ratio))
    return rows


if __name__ == "__main__":
    main()
