"""Quantized GPT-2 small (124M, random weights) at batch 1: prefill of 128
tokens and a one-token forward, as ratios to eager fp32 measured in the same run.

Each variant runs in its own subprocess, one after the other, so no variant's
threads tax another's timing. Inside it the variant and eager fp32 take turns
in blocks of runs: a block's first run follows the other model's block, whose
weights have pushed this model's out of the caches ("cold"); the block goes on
repeating the forward as a decode loop does, and its runs after the tenth are
"warm": the int8 and int4 weights (124 MB and 70 MB) then sit in this
machine's L3, which fp32's 500 MB does not fit. Each ratio is the median over
blocks of the block's ratio, so the machine's speed drifting during the run
cancels out. ONNX Runtime sessions (fxopt's and the peers') spin during a run
and park their threads when it returns (``session.force_spinning_stop``), so
they do not tax the eager model that runs next. The ONNX Runtime peers start
from fxopt's own fp32 export of the canonicalized graph.

    python benchmarks/quant_speed.py            # full run
    python benchmarks/quant_speed.py --quick    # fewer repetitions

Writes ``benchmarks/results/quant_speed.md`` and ``quant_speed.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = os.cpu_count() or 1  # for PyTorch and ONNX Runtime alike (--threads)
SHAPES = {"prefill-128": 128, "one-token": 1}

# name -> (label, backend, description)
VARIANTS = {
    "eager-fp32": ("eager fp32", "eager"),
    "torchao-dynamic-int8": ("torch.ao quantize_dynamic int8 (Conv1D -> Linear by hand)", "eager"),
    "ort-fp32": ("ONNX Runtime fp32", "onnxruntime"),
    "ort-quantize-dynamic-int8": ("ONNX Runtime quantize_dynamic int8, per-tensor", "onnxruntime"),
    "ort-matmulnbits-int4": ("ONNX Runtime MatMulNBitsQuantizer int4, block 128, accuracy level 4", "onnxruntime"),
    "fxopt-int8-eager": ("fxopt W8A8 dynamic int8, per-tensor 8-bit act. + 7-bit weights, eager (fbgemm)", "eager"),
    "fxopt-int8-ort": ("fxopt W8A8 dynamic int8, per-tensor 8-bit act. + 7-bit weights, ONNX Runtime (MatMulIntegerToFloat)", "onnxruntime"),
    "fxopt-int8tok-eager": ("fxopt W8A8 dynamic int8, per-token 8-bit act., eager (int8 grid in float + F.linear)", "eager"),
    "fxopt-int8tok-ort": ("fxopt W8A8 dynamic int8, per-token 8-bit act., ONNX Runtime (MatMulIntegerToFloat U8U8)", "onnxruntime"),
    "fxopt-w8-ort": ("fxopt weight-only int8, ONNX Runtime (MatMulNBits, acc. level 4)", "onnxruntime"),
    "fxopt-int4-eager": ("fxopt weight-only int4 g128, eager (dequantize + F.linear)", "eager"),
    "fxopt-int4-ort": ("fxopt weight-only int4 g128, ONNX Runtime (MatMulNBits, acc. level 4)", "onnxruntime"),
    "fxopt-fused-int8-ort": ("fxopt fused + W8A8 dynamic int8, per-tensor 8-bit act. + 7-bit weights, ONNX Runtime", "onnxruntime"),
    "fxopt-fused-int8tok-ort": ("fxopt fused + W8A8 dynamic int8, per-token 8-bit act., ONNX Runtime", "onnxruntime"),
    "fxopt-fused-int4-ort": ("fxopt fused + weight-only int4 g128, ONNX Runtime (MatMulNBits, acc. level 4)", "onnxruntime"),
}
# "Fused + quantized": the README's recommended order (merge before quantize, so
# Q/K/V would be quantized as one matrix; quantize before pack-attention, which
# packs a per-tensor int8 QKV projection into QAttention, and before fuse-linear-act).
FUSED = "canonicalize,dce,constant-fold,cse,fuse-attention,merge-linears,{quantize},pack-attention,fuse-linear-act,fuse-norm,dce"
FXOPT_PIPELINES = {
    "fxopt-int8": "canonicalize,quantize(mode=dynamic,act_granularity=tensor,skip_lm_head=false)",
    "fxopt-int8tok": "canonicalize,quantize(mode=dynamic,act_granularity=token,skip_lm_head=false)",
    "fxopt-w8": "canonicalize,quantize(bits=8,scheme=sym,skip_lm_head=false)",
    "fxopt-int4": "canonicalize,quantize(bits=4,group_size=128,skip_lm_head=false)",
    "fxopt-fused-int8": FUSED.format(quantize="quantize(mode=dynamic,act_granularity=tensor,skip_lm_head=false)"),
    "fxopt-fused-int8tok": FUSED.format(quantize="quantize(mode=dynamic,act_granularity=token,skip_lm_head=false)"),
    "fxopt-fused-int4": FUSED.format(quantize="quantize(bits=4,group_size=128,skip_lm_head=false)"),
}


def _cpu_name() -> str:
    """The CPU model and whether it has int8 dot-product instructions: the
    ratios depend on both (the dev VMs have come as AVX2 EPYCs and as VNNI Xeons)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "CPU unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "CPU unknown")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extras = [f for f in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{name} ({', '.join(extras) or 'no AVX2'})"


def _inputs(seq: int):
    import torch

    return {"input_ids": torch.randint(0, 50257, (1, seq), generator=torch.Generator().manual_seed(seq))}


def _gpt2_graph():
    import fxopt
    from fxopt.models import gpt2

    spec = gpt2()
    return spec, fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, name="gpt2")


def _ort_session(path: str):
    from fxopt.backends.onnxruntime import _session_options, new_session

    return new_session(path, _session_options(THREADS, None, "all", True))


def _ort_runner(path: str):
    sess = _ort_session(path)
    names = [i.name for i in sess.get_inputs()]

    def run(inputs):
        return sess.run(None, {n: inputs[n].numpy() for n in names})

    return run


def _conv1d_to_linear(model):
    """torch.ao quantize_dynamic only knows nn.Linear; GPT-2 uses Conv1D."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                lin = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
                lin.weight.data = child.weight.data.t().contiguous()
                lin.bias.data = child.bias.data
                setattr(module, child_name, lin)
    return model


def build(variant: str, fp32_onnx: str, workdir: str):
    """Return (callable(inputs), note)."""
    import torch

    import fxopt

    if variant == "eager-fp32":
        spec, _ = _gpt2_graph()
        return (lambda inp: spec.model(**inp)), ""
    if variant == "torchao-dynamic-int8":
        spec, _ = _gpt2_graph()
        model = _conv1d_to_linear(spec.model)
        q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        n = sum(1 for m in q.modules() if type(m).__name__ == "Linear" and "quantized" in type(m).__module__)
        return (lambda inp: q(**inp)), f"{n} linears quantized"
    if variant == "ort-fp32":
        return _ort_runner(fp32_onnx), ""
    if variant == "ort-quantize-dynamic-int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        out = os.path.join(workdir, "dyn.onnx")
        quantize_dynamic(fp32_onnx, out, weight_type=QuantType.QInt8, per_channel=False)
        import onnx

        ops = [n.op_type for n in onnx.load(out, load_external_data=False).graph.node]
        return _ort_runner(out), f"{sum(o in ('MatMulInteger', 'DynamicQuantizeMatMul') for o in ops)} int8 matmuls"
    if variant == "ort-matmulnbits-int4":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        model = onnx.load(fp32_onnx)
        qz = MatMulNBitsQuantizer(model, bits=4, block_size=128, is_symmetric=False, accuracy_level=4)
        qz.process()
        out = os.path.join(workdir, "nbits.onnx")
        qz.model.save_model_to_file(out, use_external_data_format=False)
        ops = [n.op_type for n in onnx.load(out).graph.node]
        left = sum(o in ("MatMul", "Gemm") for o in ops)
        return _ort_runner(out), f"{ops.count('MatMulNBits')} MatMulNBits, {left} float MatMul/Gemm left"
    base, _, backend = variant.rpartition("-")
    _, graph = _gpt2_graph()
    result = fxopt.PassManager(FXOPT_PIPELINES[base]).run(graph)
    stats = next(r.stats for r in result.records if r.name.startswith("quantize"))
    note = f"{stats['quantized']} layers quantized, min SQNR {stats.get('min_sqnr_db')} dB"
    fused = {r.name: r.stats.get("rewritten", r.stats.get("fused", r.stats.get("packed")))
             for r in result.records if r.name.startswith(("fuse", "merge", "pack"))}
    if fused:
        note += "; " + ", ".join(f"{k} {v}" for k, v in fused.items())
    if backend == "eager":
        compiled = fxopt.compile(result.graph, "eager")
        return (lambda inp: compiled(**inp)), note
    path = os.path.join(workdir, f"{variant}.onnx")
    fxopt.export_onnx(result.graph, path)
    import onnx

    ops = [n.op_type for n in onnx.load(path).graph.node]
    note += f"; {ops.count('MatMulNBits')} MatMulNBits, {ops.count('MatMulIntegerToFloat')} MatMulIntegerToFloat"
    if fused:
        note += ", " + ", ".join(f"{ops.count(o)} {o}" for o in ("MultiHeadAttention", "Attention", "QAttention", "FastGelu", "SkipLayerNormalization") if o in ops)
    return _ort_runner(path), note


# Runs per block. The quantized weights do not all come back into L3 on the
# first run after another model's: the runs speed up over about ten (int8 GPT-2
# one token, 7.6 ms falling to 4.7 ms; the same after sweeping 600 MB through
# the caches instead, with fxopt or plain ONNX Runtime sessions), so warm is
# taken from the runs after the tenth.
BLOCK = 30
WARM_FROM = 10


def _block_ms(fn, inputs) -> list[float]:
    times = []
    for _ in range(BLOCK):
        start = time.perf_counter()
        fn(inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure(variant: str, fp32_onnx: str, repeat: int) -> dict:
    """Time ``variant`` against eager fp32 in ``repeat`` pairs of blocks (see the
    module docstring): warm is the median of a block's runs after the
    tenth, cold its first run; each ratio is the median of the blocks' ratios, so a machine whose
    speed drifts during the run (a shared VM) moves both sides of every ratio alike."""
    import torch

    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as workdir:
        fn, note = build(variant, fp32_onnx, workdir)
        baseline = fn if variant == "eager-fp32" else build("eager-fp32", fp32_onnx, workdir)[0]
        out = {"variant": variant, "note": note}
        with torch.inference_mode():
            for shape, seq in SHAPES.items():
                inputs = _inputs(seq)
                for _ in range(3):
                    fn(inputs)
                    baseline(inputs)
                pairs = [(_block_ms(baseline, inputs), _block_ms(fn, inputs)) for _ in range(repeat)]
                by_kind = {"warm": [(statistics.median(b[WARM_FROM:]), statistics.median(v[WARM_FROM:])) for b, v in pairs],
                           "cold": [(b[0], v[0]) for b, v in pairs]}
                for kind, times in by_kind.items():
                    out[f"{shape}/{kind}"] = statistics.median(v for _, v in times)
                    out[f"{shape}/{kind}/base"] = statistics.median(b for b, _ in times)
                    ratios = [v / b for b, v in times]
                    out[f"{shape}/{kind}/ratio"] = statistics.median(ratios)
                    quartiles = statistics.quantiles(ratios, n=4)
                    out[f"{shape}/{kind}/ratio_iqr"] = [quartiles[0], quartiles[2]]
    return out


def main() -> None:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--output", default="quant_speed", help="results/<output>.md and .png")
    ap.add_argument("--threads", type=int, default=THREADS, help="threads for every variant (default: all cores)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_onnx", help=argparse.SUPPRESS)
    ap.add_argument("--_repeat", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    THREADS = args.threads
    import torch

    torch.set_num_threads(THREADS)
    if args._child:
        print("RESULT " + json.dumps(measure(args._child, args._onnx, args._repeat)))
        return
    repeat = 3 if args.quick else 10
    variants = args.variants.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32_onnx = os.path.join(tmp, "gpt2_fp32.onnx")
        warnings.filterwarnings("ignore")
        import fxopt

        _, graph = _gpt2_graph()
        fxopt.export_onnx(fxopt.PassManager("canonicalize").run(graph).graph, fp32_onnx)
        del graph
        for v in variants:
            cmd = [sys.executable, __file__, "--_child", v, "--_onnx", fp32_onnx, "--_repeat", str(repeat), "--threads", str(THREADS)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                rows.append({"variant": v, "note": "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                rows.append(json.loads(line[7:]))
            print(f"{v}: {rows[-1]}", file=sys.stderr)
    lines = [
        "| variant | prefill 128 warm (ms) | ratio | one-token warm (ms) | ratio "
        "| prefill 128 cold (ms) | ratio | one-token cold (ms) | ratio | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for kind in ("warm", "cold"):
            for shape in SHAPES:
                key = f"{shape}/{kind}"
                if key in r:
                    low, high = r[key + "/ratio_iqr"]
                    cells += [f"{r[key]:.2f}", f"{r[key + '/ratio']:.3f} ({low:.2f}-{high:.2f})"]
                else:
                    cells += ["-", "-"]
        lines.append(f"| {VARIANTS[r['variant']][0]} | " + " | ".join(cells) + f" | {r['note']} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    header = (
        "# Quantized GPT-2 small (124M, random weights), batch 1\n\n"
        f"`python benchmarks/quant_speed.py{' --quick' if args.quick else ''} --threads {THREADS} --variants {args.variants}`; each variant in its own subprocess, "
        f"taking turns with eager fp32 in {repeat} pairs of blocks of {BLOCK} runs per shape. Warm: the median of a block's "
        f"last {BLOCK - WARM_FROM} runs (the weights back in the caches, as in a decode loop); cold: a block's first run, after the "
        "other model's block. A ratio is the median of the blocks' ratios (below 1 is faster; in brackets the blocks' "
        "interquartile range), so the machine's drift cancels. ONNX Runtime sessions spin during a run and park their threads when it returns. "
        f"{THREADS} thread(s) for every variant. Machine: {os.cpu_count()} cores, {_cpu_name()}.\n\n"
        "Goals (warm): one-token fxopt int8 <= 0.20 and int4 <= 0.15; prefill-128 fxopt int8 <= 0.30.\n\n"
    )
    (RESULTS / f"{args.output}.md").write_text(header + table + "\n")
    _plot(rows, RESULTS / f"{args.output}.png")


def _plot(rows, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    done = [r for r in rows if "one-token/warm" in r]
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.4
    for i, shape in enumerate(SHAPES):
        ax.barh([j + i * width for j in range(len(done))], [r[shape + "/warm/ratio"] for r in done], width, label=shape)
    ax.set_yticks([j + width / 2 for j in range(len(done))], [r["variant"] for r in done])
    ax.axvline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("time / eager fp32 (lower is faster)")
    ax.set_title("GPT-2 small, batch 1, warm")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
