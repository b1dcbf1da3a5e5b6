"""Quantized GPT-2 small (124M, random weights) at batch 1, fxopt against its
peers: prefill of 128 tokens and a one-token forward without a KV cache (the
whole model on one token: the weight traffic of a decode step, without its
attention over a cache), as ratios to eager fp32 measured in the same run, each
with its accuracy against eager fp32 on the same inputs (cosine of the logits
and their max abs error): a fast wrong result shows as such.

Each variant runs in its own subprocess, one after the other, so no variant's
threads tax another's timing. Inside it the variant and eager fp32 take turns
in blocks of runs: a block's first run follows the other model's block, whose
weights have pushed this model's out of the caches ("cold"); the block goes on
repeating the forward, as a generation loop reads the same weights again and
again, and its runs after the tenth are "warm": the int8 and int4 weights
(124 MB and 70 MB) then sit in a large L3, which fp32's 500 MB does not fit.
Each ratio is the median over blocks of the block's ratio, so the CPU's speed
drifting during the run cancels out. ONNX Runtime sessions (fxopt's and the
peers') spin during a run and park their threads when it returns
(``session.force_spinning_stop``), so they do not tax the eager model that runs
next.

Every peer gets its best documented preparation (``PREPARATION`` below, printed
under the table). The ONNX Runtime peers start from fxopt's own fp32 export of
the canonicalized graph, in which GPT-2's tied LM head is
``MatMul(x, Transpose(W))``: ONNX Runtime's quantizers only touch a MatMul whose
weight is an initializer, so the transpose is folded into one first
(:func:`fold_transposed_initializers`).

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

# name -> (label, backend)
VARIANTS = {
    "eager-fp32": ("eager fp32", "eager"),
    "torchao-dynamic-int8": ("torch.ao quantize_dynamic int8 (Conv1D -> Linear by hand)", "eager"),
    "torchao-int8-compile": ("torchao quantize_ W8A8 dynamic int8 + torch.compile", "eager"),
    "torchao-int4-compile": ("torchao quantize_ weight-only int4 g128 + torch.compile", "eager"),
    "ort-fp32": ("ONNX Runtime fp32", "onnxruntime"),
    "ort-quantize-dynamic-int8": ("ONNX Runtime quantize_dynamic int8, per-channel", "onnxruntime"),
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
# How each peer is prepared: its own documentation's recipe for a CPU, printed
# under the table. "{vnni}" is filled in for the CPU the run is on.
PREPARATION = {
    "torchao-dynamic-int8": "`torch.ao.quantization.quantize_dynamic(model, {{nn.Linear}}, dtype=torch.qint8)` on the "
        "fbgemm engine (its x86 default; its qconfig reduces the activation range to 7 bits for CPUs without VNNI); "
        "GPT-2's Conv1D layers converted to nn.Linear first, since it only knows nn.Linear.",
    "torchao-int8-compile": "torchao's CPU recipe: Conv1D converted to nn.Linear; `quantize_(model, "
        "Int8DynamicActivationInt8WeightConfig(reduce_range=should_reduce_range(cpu)))` (per-token symmetric int8 "
        "activations, per-channel int8 weights, LM head included; {reduce_range}); then "
        "`torch.compile(model)` with inductor's `freezing` on, as its x86 CPU guides recommend, and the config's "
        "own recommended inductor settings (`set_inductor_config=True`).",
    "torchao-int4-compile": "Conv1D converted to nn.Linear; `quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=128))` "
        "(torchao's CPU int4 weight-only path: Int4OpaqueTensor, `_weight_int4pack_mm_for_cpu`), on every linear whose "
        "output width is a multiple of 16, as that kernel requires (the tied LM head, 50257 rows, stays fp32), then "
        "`torch.compile(model)` with `freezing` on.",
    "ort-fp32": "fxopt's fp32 export, ONNX Runtime graph optimization level `all`.",
    "ort-quantize-dynamic-int8": "`Transpose(W)` of the tied LM head folded into an initializer; ONNX Runtime's "
        "documented pre-processing `quant_pre_process` (ONNX shape inference and ONNX Runtime's graph optimizations; its "
        "symbolic shape inference stops on this export's contrib ops, so it is skipped, as the tool allows); then "
        "`quantize_dynamic(per_channel=True, reduce_range={reduce_range_flag}, weight_type=QInt8)`: per-channel for "
        "accuracy and 7-bit weights on CPUs without VNNI, as its documentation advises.",
    "ort-matmulnbits-int4": "`Transpose(W)` folded into an initializer; `MatMulNBitsQuantizer(bits=4, block_size=128, "
        "is_symmetric=False, accuracy_level=4)` (int8 activations inside the kernel, its fastest CPU setting).",
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


def _cpu_info() -> tuple[str, list[str]]:
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "CPU unknown", []
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "CPU unknown")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return name, flags


def _has_vnni() -> bool:
    """Whether the CPU has int8 dot-product instructions: without them the
    peers' documentation asks for 7-bit ranges (AVX2's VPMADDUBSW saturates)."""
    return any(f in _cpu_info()[1] for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _cpu_name() -> str:
    """The CPU model and whether it has int8 dot-product instructions: the
    ratios depend on both (AVX2-only CPUs and VNNI CPUs rank the int8 kernels differently)."""
    name, flags = _cpu_info()
    extras = [f for f in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{name} ({', '.join(extras) or 'no AVX2'})"


def _inputs(seq: int):
    import torch

    return {"input_ids": torch.randint(0, 50257, (1, seq), generator=torch.Generator().manual_seed(seq))}


def _gpt2_model():
    """GPT-2 small, seeded: every call gives the same weights, so a variant and
    its eager fp32 baseline in another object compute from the same model."""
    from fxopt.models import gpt2

    return gpt2()


def _gpt2_graph():
    import fxopt

    spec = _gpt2_model()
    return spec, fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, name="gpt2")


def _logits(outputs):
    """The logits of a Hugging Face output, an fxopt model's or an ONNX Runtime run's."""
    from fxopt.ir.parity import output_tensors

    return outputs.logits if hasattr(outputs, "logits") else output_tensors(outputs)[0]


def fold_transposed_initializers(src: str, dst: str) -> int:
    """Fold every ``Transpose`` of an initializer into a new initializer holding
    the transposed weight, save the model to ``dst`` and return how many were
    folded. ONNX Runtime's quantizers only quantize a MatMul whose weight is an
    initializer, so they skip a tied LM head exported as ``MatMul(x, Transpose(W))``."""
    import numpy as np
    import onnx_ir as ir

    model = ir.load(src)
    folded = 0
    for node in list(model.graph):
        weight = node.inputs[0] if node.op_type == "Transpose" and node.domain in ("", "ai.onnx") else None
        if weight is None or not weight.is_initializer() or weight.const_value is None:
            continue
        perm = node.attributes.get("perm")
        array = np.ascontiguousarray(weight.const_value.numpy().transpose(None if perm is None else perm.as_ints()))
        value = ir.Value(name=f"{weight.name}_transposed", shape=ir.Shape(array.shape),
                         type=ir.TensorType(weight.dtype), const_value=ir.tensor(array))
        model.graph.register_initializer(value)
        node.outputs[0].replace_all_uses_with(value)
        model.graph.remove(node, safe=True)
        folded += 1
    ir.save(model, dst)
    return folded


def _ort_session(path: str):
    from fxopt.backends.onnxruntime import new_session, session_options

    return new_session(path, session_options(THREADS, None, "all", True))


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


def _onnx_ops(path: str) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(path, load_external_data=False).graph.node]


def _ort_pre_process(src: str, dst: str) -> str:
    """ONNX Runtime's documented pre-processing for quantization, symbolic shape
    inference included where it runs; returns what was done, for the notes."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(src, dst)
        return "quant_pre_process"
    except Exception as error:  # noqa: BLE001  the tool's own failure, reported in the notes
        quant_pre_process(src, dst, skip_symbolic_shape=True)
        return f"quant_pre_process without symbolic shape inference ({type(error).__name__} in it)"


def _torchao(variant: str):
    """GPT-2 quantized with torchao's ``quantize_`` and compiled, its CPU recipe (``PREPARATION``)."""
    import torch
    import torch._inductor.config as inductor_config
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    from torchao.utils import should_reduce_range

    model = _conv1d_to_linear(_gpt2_model().model)
    if variant == "torchao-int8-compile":
        quantize_(model, Int8DynamicActivationInt8WeightConfig(reduce_range=should_reduce_range(torch.device("cpu"))))
    else:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        # The CPU int4 kernel packs output rows in tiles of 16 and refuses other
        # widths (GPT-2's tied LM head has 50257 rows): such layers stay fp32.
        quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=128),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and m.out_features % 16 == 0)
    kinds = {type(m.weight).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)}
    quantized = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear) and type(m.weight).__name__ not in ("Parameter", "Tensor"))
    inductor_config.freezing = True
    compiled = torch.compile(model)
    return (lambda inp: compiled(**inp)), f"{quantized} linears quantized ({', '.join(sorted(kinds))})"


def build(variant: str, fp32_onnx: str, workdir: str):
    """Return (callable(inputs), note)."""
    import torch

    import fxopt

    if variant == "eager-fp32":
        model = _gpt2_model().model
        return (lambda inp: model(**inp)), ""
    if variant == "torchao-dynamic-int8":
        model = _conv1d_to_linear(_gpt2_model().model)
        q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        n = sum(1 for m in q.modules() if type(m).__name__ == "Linear" and "quantized" in type(m).__module__)
        return (lambda inp: q(**inp)), f"{n} linears quantized"
    if variant.startswith("torchao-"):
        return _torchao(variant)
    if variant == "ort-fp32":
        return _ort_runner(fp32_onnx), ""
    if variant in ("ort-quantize-dynamic-int8", "ort-matmulnbits-int4"):
        folded_path = os.path.join(workdir, "folded.onnx")
        folded = fold_transposed_initializers(fp32_onnx, folded_path)
        out = os.path.join(workdir, "quantized.onnx")
        if variant == "ort-quantize-dynamic-int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            pre_path = os.path.join(workdir, "pre.onnx")
            pre = _ort_pre_process(folded_path, pre_path)
            quantize_dynamic(pre_path, out, per_channel=True, reduce_range=not _has_vnni(), weight_type=QuantType.QInt8)
            done = f"{pre}; "
        else:
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            qz = MatMulNBitsQuantizer(onnx.load(folded_path), bits=4, block_size=128, is_symmetric=False, accuracy_level=4)
            qz.process()
            qz.model.save_model_to_file(out, use_external_data_format=False)
            done = ""
        ops = _onnx_ops(out)
        quantized = sum(o in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits") for o in ops)
        left = sum(o in ("MatMul", "Gemm") for o in ops)
        return _ort_runner(out), f"{folded} Transpose(W) folded; {done}{quantized} quantized MatMuls, {left} float MatMul/Gemm left"
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
    ops = _onnx_ops(path)
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
    tenth, cold its first run; each ratio is the median of the blocks' ratios, so a CPU whose
    speed drifts during the run moves both sides of every ratio alike. Accuracy: the logits'
    cosine and max abs error against eager fp32 on the same inputs."""
    import torch

    import fxopt

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
                parity = fxopt.compare(_logits(baseline(inputs)), _logits(fn(inputs)))
                out[f"{shape}/cosine"], out[f"{shape}/max_abs_err"], out[f"{shape}/scale"] = parity.cosine, parity.max_abs_err, parity.scale
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
    ap.add_argument("--threads", type=int, default=THREADS, help="threads for every variant (default: all cores)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    ap.add_argument("--variant-timeout", type=float, default=1200.0, help="seconds a variant may take before its row says it did not finish")
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
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.variant_timeout)
            except subprocess.TimeoutExpired:
                rows.append({"variant": v, "note": f"did not finish within {args.variant_timeout:.0f} s ({repeat} pairs of blocks of {BLOCK} runs per shape)"})
                print(f"{v}: {rows[-1]}", file=sys.stderr)
                _write(rows, variants, args.quick, repeat)
                continue
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                rows.append({"variant": v, "note": "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                rows.append(json.loads(line[7:]))
            print(f"{v}: {rows[-1]}", file=sys.stderr)
            # Written after every variant, so that a long run stopped early keeps what it measured.
            _write(rows, variants, args.quick, repeat)
    print(_table(rows))


def _write(rows: list[dict], variants: list[str], quick: bool, repeat: int) -> None:
    table = _table(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/quant_speed.py" + (" --quick" if quick else "") + f" --threads {THREADS}"
    if variants != list(VARIANTS):
        command += f" --variants {','.join(variants)}"
    if len(rows) < len(variants):
        command += f" (stopped after {len(rows)} of {len(variants)} variants)"
    scale = next((r["one-token/scale"] for r in rows if "one-token/scale" in r), None)
    fp32_ms = {shape: statistics.median(r[f"{shape}/warm/base"] for r in rows if f"{shape}/warm/base" in r)
               for shape in SHAPES if any(f"{shape}/warm/base" in r for r in rows)}
    header = (
        "# Quantized GPT-2 small (124M, random weights), batch 1\n\n"
        f"CPU: {_cpu_name()}, {os.cpu_count()} cores; {THREADS} thread(s) for every variant. Command: `{command}`.\n\n"
        "Prefill: one forward over 128 tokens. One token: a one-token forward without a KV cache (every weight read "
        "once for one token, as in a decode step, without the attention over a cache). "
        f"Each variant runs in its own subprocess, taking turns with eager fp32 in {repeat} pairs of blocks of {BLOCK} runs per shape. "
        f"Warm: the median of a block's last {BLOCK - WARM_FROM} runs (the weights back in the caches, as when a generation loop "
        "reads them again and again); cold: a block's first run, after the other model's block. A ratio is the median of the "
        "blocks' ratios to eager fp32 (below 1 is faster; in brackets the blocks' interquartile range), so the CPU's drift "
        "cancels"
        + (f" (eager fp32 itself, warm: {fp32_ms['prefill-128']:.1f} ms prefill, {fp32_ms['one-token']:.2f} ms one token, "
           "the median over the rows)" if len(fp32_ms) == 2 else "")
        + ". ONNX Runtime sessions spin during a run and park their threads when it returns. Accuracy: cosine of the "
        "variant's logits to eager fp32's on the same input, and their max abs error"
        + (f" (fp32's logits reach {scale:.3g} in magnitude)" if scale is not None else "")
        + f"; a cosine below {WRONG_BELOW} is marked WRONG: such a row's speed does not count. fxopt's rows quantize the "
        "LM head too (`skip_lm_head=false`), as every peer here does.\n\n"
    )
    preparation = "\n".join(f"- {VARIANTS[v][0]}: {_preparation(v)}" for v in variants if v in PREPARATION)
    if preparation:
        preparation = "\n\nHow each peer was prepared (its documentation's recipe for a CPU):\n\n" + preparation
    (RESULTS / "quant_speed.md").write_text(header + table + preparation + "\n")
    _plot(rows, RESULTS / "quant_speed.png")


# Logits this far from fp32's (cosine) are not a quantized GPT-2 any more.
WRONG_BELOW = 0.9


def _preparation(variant: str) -> str:
    vnni = _has_vnni()
    return PREPARATION[variant].format(
        reduce_range_flag=not vnni,
        reduce_range="7-bit ranges, the CPU having no VNNI" if not vnni else "full 8-bit ranges, the CPU having VNNI")


def _accuracy(r: dict, shape: str) -> str:
    if f"{shape}/cosine" not in r:
        return "-"
    cosine = r[f"{shape}/cosine"]
    text = f"{cosine:.4f} / {r[f'{shape}/max_abs_err']:.3g}"
    return f"**WRONG** {text}" if not cosine >= WRONG_BELOW else text


def _table(rows) -> str:
    lines = [
        "| variant | prefill 128 warm (ms) | ratio | one token warm (ms) | ratio "
        "| prefill 128 accuracy: cosine / max abs err | one token accuracy: cosine / max abs err "
        "| prefill 128 cold (ms) | ratio | one token cold (ms) | ratio | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = {}
        for kind in ("warm", "cold"):
            cells[kind] = []
            for shape in SHAPES:
                key = f"{shape}/{kind}"
                if key in r:
                    low, high = r[key + "/ratio_iqr"]
                    cells[kind] += [f"{r[key]:.2f}", f"{r[key + '/ratio']:.3f} ({low:.2f}-{high:.2f})"]
                else:
                    cells[kind] += ["-", "-"]
        accuracy = [_accuracy(r, shape) for shape in SHAPES]
        lines.append(f"| {VARIANTS[r['variant']][0]} | " + " | ".join(cells["warm"] + accuracy + cells["cold"]) + f" | {r['note']} |")
    return "\n".join(lines)


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
    for i, (shape, label) in enumerate((("prefill-128", "prefill 128"), ("one-token", "one token, no KV cache"))):
        ax.barh([j + i * width for j in range(len(done))], [r[shape + "/warm/ratio"] for r in done], width, label=label)
    wrong = {r["variant"] for r in done if not all(r.get(f"{s}/cosine", 1.0) >= WRONG_BELOW for s in SHAPES)}
    ax.set_yticks([j + width / 2 for j in range(len(done))],
                  [r["variant"] + (" (WRONG output)" if r["variant"] in wrong else "") for r in done])
    ax.axvline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("time / eager fp32 (lower is faster)")
    ax.set_title("GPT-2 small, batch 1, warm")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
