"""Accuracy of fxopt's quantization against fp32 and against the peers.

Encoder: the real all-MiniLM-L6-v2 weights (``fxopt.models.minilm()``) on 56
evaluation sentences (``benchmarks/sentences.py``), calibrated on 32 other
sentences. Metrics against the fp32 model's mean-pooled, normalized
embeddings: mean and min cosine (``fxopt.ir.parity.row_cosines``, the parity
check's per-row form), and the Spearman rank correlation of the
pairwise sentence similarities (ranks computed with torch).

Causal: GPT-2 small (124M) and the small Llama config, random weights,
calibrated on random token ids and evaluated on others: logits cosine (mean
over positions) and top-1 agreement with fp32.

    python benchmarks/quant_accuracy.py                  # everything
    python benchmarks/quant_accuracy.py --models minilm  # the encoder only

Each model is a section of ``benchmarks/results/quant_accuracy.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import write_result  # noqa: E402

from fxopt.ir.parity import row_cosines  # noqa: E402

BASE = "canonicalize,dce,constant-fold,cse"
W8A8 = [
    ("fxopt W8A8 dynamic, per-token 8-bit act. (default; per-channel int8 W)", "quantize(mode=dynamic)"),
    ("fxopt W8A8 dynamic, per-token + SmoothQuant(0.5)", "smooth-quant(alpha=0.5),quantize(mode=dynamic)"),
    ("fxopt W8A8 dynamic, per-tensor act. (8-bit act., 7-bit weight codes)", "quantize(mode=dynamic,act_granularity=tensor)"),
    ("fxopt W8A8 dynamic, per-tensor + SmoothQuant(0.5)", "smooth-quant(alpha=0.5),quantize(mode=dynamic,act_granularity=tensor)"),
    ("fxopt W8A8 static, min-max observer", "quantize(mode=static)"),
    ("fxopt W8A8 static, percentile 99.99 observer", "quantize(mode=static,observer=percentile)"),
    ("fxopt W8A8 static + SmoothQuant(0.5)", "smooth-quant(alpha=0.5),quantize(mode=static)"),
    ("fxopt W8A8 static + SmoothQuant(0.75, unfoldable=scale)", "smooth-quant(alpha=0.75,unfoldable=scale),quantize(mode=static)"),
]
WEIGHT_ONLY = [
    ("fxopt W8 weight-only (per-channel asym)", "quantize(bits=8)"),
    ("fxopt W4 g32 RTN", "quantize(bits=4,group_size=32)"),
    ("fxopt W4 g32 AWQ", "quantize(bits=4,group_size=32,method=awq)"),
    ("fxopt W4 g32 GPTQ", "quantize(bits=4,group_size=32,method=gptq)"),
]
GOALS = {  # variant prefix -> (metric, threshold)
    "W8A8": (0.995, 0.99),
    "W8 weight-only": (0.999, None),
    "W4 g32": (0.98, None),
}


# -- metrics ------------------------------------------------------------------------

def ranks(v: torch.Tensor) -> torch.Tensor:
    return v.argsort().argsort().double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = ranks(a.flatten()), ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def embedding_metrics(ref: torch.Tensor, out: torch.Tensor) -> dict:
    cos = row_cosines(ref, out)  # one per sentence
    ref, out = ref.double(), out.double()
    iu = torch.triu_indices(ref.shape[0], ref.shape[0], offset=1)
    sims_ref = (ref @ ref.T)[iu[0], iu[1]]
    sims_out = (out @ out.T)[iu[0], iu[1]]
    return {"mean cos": cos.mean().item(), "min cos": cos.min().item(), "spearman": spearman(sims_ref, sims_out)}


def logits_metrics(ref: torch.Tensor, out: torch.Tensor) -> dict:
    cos = row_cosines(ref, out)  # one per position
    ref, out = ref.flatten(0, -2), out.flatten(0, -2)
    top1 = (ref.argmax(-1) == out.argmax(-1)).double().mean()
    return {"mean cos": cos.mean().item(), "min cos": cos.min().item(), "top-1": top1.item()}


# -- running ------------------------------------------------------------------------

def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _ort_session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ort_run(sess, inputs: dict) -> torch.Tensor:
    feeds = {}
    names = [i.name for i in sess.get_inputs()]
    for name, value in zip(names, inputs.values()):
        feeds[name] = inputs.get(name, value).numpy()
    return torch.from_numpy(sess.run(None, feeds)[0])


def _fxopt_rows(graph, rows, calib, evaluate, backends, log):
    import fxopt

    out = []
    for label, pipeline in rows:
        start = time.perf_counter()
        try:
            result = fxopt.PassManager(pipeline, calibration_data=calib).run(graph)
        except Exception as e:  # reported in the table, not hidden
            out.append((label, "-", {"error": f"{type(e).__name__}: {getattr(e, 'reason', str(e)).splitlines()[0][:160]}"}))
            continue
        secs = time.perf_counter() - start
        for backend in backends:
            try:
                options = {"intra_op_threads": 2, "allow_spinning": False} if backend == "onnxruntime" else {}
                compiled = fxopt.compile(result.graph, backend, **options)
                metrics = evaluate(compiled)
            except Exception as e:
                metrics = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
            metrics["quantize s"] = secs
            out.append((label, backend, metrics))
            log(label, backend, metrics)
    return out


def bench_minilm(log) -> list:
    import fxopt
    from fxopt.models import minilm, minilm_tokenize
    from sentences import CALIBRATION, EVAL

    spec = minilm()
    model = spec.model
    evaluation = minilm_tokenize(EVAL)
    calib = [minilm_tokenize(CALIBRATION[i:i + 8]) for i in range(0, len(CALIBRATION), 8)]
    with torch.no_grad():
        ref = model(**evaluation)
    graph = fxopt.PassManager(BASE).run(fxopt.trace(model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, name="minilm")).graph

    def evaluate(compiled):
        with torch.no_grad():
            return embedding_metrics(ref, compiled(**evaluation))

    rows = _fxopt_rows(graph, W8A8 + WEIGHT_ONLY, calib, evaluate, ("eager", "onnxruntime"), log)

    # torch.ao dynamic int8 (fbgemm, 7-bit activations on x86)
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    for label, qconfig in (("torch.ao quantize_dynamic int8, per-tensor", default_dynamic_qconfig),
                           ("torch.ao quantize_dynamic int8, per-channel", per_channel_dynamic_qconfig)):
        q = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear: qconfig}, dtype=torch.qint8)
        with torch.no_grad():
            rows.append((label, "eager", embedding_metrics(ref, q(**evaluation))))
        log(*rows[-1])

    # ONNX Runtime's own tools, starting from fxopt's fp32 export
    from onnxruntime.quantization import QuantType, quantize_dynamic as ort_quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        try:
            fxopt.export_onnx(graph, fp32)
        except Exception as e:
            rows.append(("ONNX Runtime peers", "onnxruntime", {"error": f"fp32 export failed: {str(e)[:120]}"}))
            return rows
        peers = [("ONNX Runtime fp32", fp32)]
        dyn = Path(tmp) / "dyn.onnx"
        ort_quantize_dynamic(str(fp32), str(dyn), per_channel=True, weight_type=QuantType.QInt8)
        peers.append(("ONNX Runtime quantize_dynamic int8, per-channel", dyn))
        nbits = Path(tmp) / "int4.onnx"
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=4, block_size=32, is_symmetric=False)
        quantizer.process()
        quantizer.model.save_model_to_file(str(nbits))
        peers.append(("ONNX Runtime MatMulNBitsQuantizer int4, block 32", nbits))
        for label, path in peers:
            out = _ort_run(_ort_session(path), evaluation)
            rows.append((label, "onnxruntime", embedding_metrics(ref, out)))
            log(*rows[-1])
    return rows


def bench_causal(name, log) -> list:
    import fxopt
    from fxopt.models import gpt2, llama

    spec = {"gpt2": gpt2, "llama": llama}[name]()
    vocab = spec.model.config.vocab_size
    gen = torch.Generator().manual_seed(1234)
    evaluation = {"input_ids": torch.randint(0, vocab, (4, 64), generator=gen)}
    calib = [{"input_ids": torch.randint(0, vocab, (4, 64), generator=gen)} for _ in range(4)]
    with torch.no_grad():
        ref = spec.model(**evaluation).logits
    graph = fxopt.PassManager(BASE).run(fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, name=name)).graph

    def evaluate(compiled):
        with torch.no_grad():
            return logits_metrics(ref, _logits(compiled(**evaluation)))

    weight_only = WEIGHT_ONLY
    if name == "llama":  # K = 688 in the MLP's down projection: 32 does not divide it, 16 does
        weight_only = [(label + (" (down_proj g16)" if "g32" in label else ""),
                        pipe.replace(")", ",overrides=['down_proj:group_size=16'])") if "group_size=32" in pipe else pipe)
                       for label, pipe in WEIGHT_ONLY]
    rows = _fxopt_rows(graph, W8A8 + weight_only, calib, evaluate, ("eager",), log)
    if name == "llama":  # GPT-2's Conv1D layers are not nn.Linear: torch.ao would quantize only its LM head
        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

        for label, qconfig in (("torch.ao quantize_dynamic int8, per-tensor", default_dynamic_qconfig),
                               ("torch.ao quantize_dynamic int8, per-channel", per_channel_dynamic_qconfig)):
            model = copy.deepcopy(spec.model)
            # like fxopt's default (skip_lm_head), leave the LM head in float
            q = quantize_dynamic(model, {f"model.layers.{i}": qconfig for i in range(len(model.model.layers))}, dtype=torch.qint8)
            with torch.no_grad():
                rows.append((label, "eager", logits_metrics(ref, q(**evaluation).logits)))
            log(*rows[-1])
    return rows


# -- report ---------------------------------------------------------------------------

def table(rows, metrics) -> str:
    lines = ["| variant | backend | " + " | ".join(metrics) + " |", "|---|---|" + "---:|" * len(metrics)]
    for label, backend, m in rows:
        if "error" in m:
            lines.append(f"| {label} | {backend} | " + m["error"] + " |" + " |" * (len(metrics) - 1))
            continue
        cells = [f"{m[k]:.4f}" if k in m and not k.endswith(" s") else (f"{m[k]:.1f}" if k in m else "") for k in metrics]
        lines.append(f"| {label} | {backend} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_lines(rows) -> list[str]:
    out = []
    for prefix, (mean_goal, min_goal) in GOALS.items():
        best = None
        for label, backend, m in rows:
            if label.startswith(f"fxopt {prefix}") and "error" not in m:
                if best is None or m["mean cos"] > best[2]["mean cos"]:
                    best = (label, backend, m)
        if best is None:
            out.append(f"- {prefix}: no result")
            continue
        label, backend, m = best
        ok = m["mean cos"] >= mean_goal and (min_goal is None or m["min cos"] >= min_goal)
        goal = f"mean cos >= {mean_goal}" + (f", min >= {min_goal}" if min_goal else "")
        out.append(f"- {prefix} ({goal}): best is {label} on {backend}: mean {m['mean cos']:.4f}, min {m['min cos']:.4f} "
                   f"-> {'met' if ok else 'MISSED'}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,gpt2,llama")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    os.environ.setdefault("OMP_NUM_THREADS", "2")

    def log(label, backend, m):
        print(f"  {label} [{backend}]: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()), flush=True)

    for name in args.models.split(","):
        print(f"== {name}", flush=True)
        if name == "minilm":
            rows = bench_minilm(log)
            section = "all-MiniLM-L6-v2 (real weights), 56 sentences vs fp32 embeddings"
            text = (table(rows, ["mean cos", "min cos", "spearman", "quantize s"])
                    + "\n\nGoals:\n" + "\n".join(goal_lines(rows)) + "\n")
        else:
            rows = bench_causal(name, log)
            section = f"{name} (random weights), 4 x 64 tokens vs fp32 logits"
            text = table(rows, ["mean cos", "min cos", "top-1", "quantize s"]) + "\n"
        print("\n" + text, flush=True)
        # One file; each model's section holds its latest run (models run separately keep theirs).
        write_result("quant_accuracy", "Quantization accuracy", text, section=section,
                     argv=[sys.argv[0], "--models", name],
                     intro="fxopt rows skip the LM head (the default, `skip_lm_head=true`). "
                           "`quantize s`: seconds the pipeline took, calibration included.")


if __name__ == "__main__":
    main()
