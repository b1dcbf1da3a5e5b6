"""fxopt's main job: GPT-2 small (124M, built from its config) through the
recommended fused + quantized pipeline, lowered to ONNX Runtime, and compared
with the original PyTorch model: latency at prefill and at a one-token forward
(batch 1; the whole model on one new token, without a KV cache), size, and
accuracy of the logits.

    python examples/quickstart.py [--model gpt2] [--pipeline ...] [--prefill 128] [--rounds 20]

``./scripts/quickstart.sh`` sets everything up and runs it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

import fxopt
from fxopt.models import load_model

RECOMMENDED = ("canonicalize,dce,constant-fold,cse,fuse-attention,merge-linears,"
               "quantize(bits=4,group_size=128,skip_lm_head=false,quantize_embeddings=true),pack-attention,fuse-linear-act,fuse-norm,dce")


def interleaved_ms(fns: dict, inputs: dict, rounds: int) -> dict[str, float]:
    """Median ms of each callable, timed in turn within each round so that a
    busy CPU slows them alike; two warm-up rounds first."""
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for r in range(rounds + 2):
            for k, fn in fns.items():
                start = time.perf_counter()
                fn(**inputs)
                if r >= 2:
                    times[k].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def logits(out) -> torch.Tensor:
    return (out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out).float()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2", help="a built-in causal LM (gpt2, gpt2-tiny, llama, ...)")
    ap.add_argument("--pipeline", default=RECOMMENDED)
    ap.add_argument("--prefill", type=int, default=128, help="prompt length timed at prefill")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds per shape")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="out/quickstart.onnx", help="where the optimized ONNX model is saved")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's pytree deprecation notices

    spec = load_model(args.model)
    model = spec.model.eval()
    vocab = model.config.vocab_size
    print(f"{spec.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters; pipeline:\n  {args.pipeline}")
    graph = fxopt.trace(model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, name=spec.name)
    result = fxopt.PassManager(args.pipeline).run(graph)
    quantized = sum(r.stats.get("quantized", 0) for r in result.records if r.name.startswith("quantize"))
    compiled = fxopt.compile(result.graph, "onnxruntime", intra_op_threads=args.threads)
    saved = compiled.save(args.out)
    onnx_bytes = sum(p.stat().st_size for p in saved.parent.glob(saved.name + "*"))

    g = torch.Generator().manual_seed(0)
    prompt = {"input_ids": torch.randint(0, vocab, (1, args.prefill), generator=g)}
    token = {"input_ids": prompt["input_ids"][:, -1:]}
    with torch.inference_mode():
        ref, opt = logits(model(**prompt)), logits(compiled(**prompt))
    cosine = fxopt.compare(ref, opt).cosine
    top1 = (ref.argmax(-1) == opt.argmax(-1)).float().mean().item()

    fns = {"original": model, "fxopt": compiled}
    prefill = interleaved_ms(fns, prompt, args.rounds)
    one = interleaved_ms(fns, token, args.rounds * 5)

    size_before, size_after = graph.param_bytes(), result.graph.param_bytes()
    rows = [
        ("", "original (PyTorch eager, fp32)", "fxopt (ONNX Runtime)", "ratio"),
        (f"prefill {args.prefill} tokens (ms)", f"{prefill['original']:.1f}", f"{prefill['fxopt']:.1f}",
         f"{prefill['fxopt'] / prefill['original']:.2f}"),
        ("one-token forward (ms)", f"{one['original']:.2f}", f"{one['fxopt']:.2f}", f"{one['fxopt'] / one['original']:.2f}"),
        ("weights (MB)", f"{size_before / 1e6:.1f}", f"{size_after / 1e6:.1f}", f"{size_after / size_before:.2f}"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"\n{quantized} weights quantized (linears and embeddings); ONNX model {onnx_bytes / 1e6:.1f} MB in {saved}; "
          f"batch 1, {args.threads} thread(s), median of {args.rounds} / {args.rounds * 5} interleaved runs")
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print(f"accuracy against the original, logits at prefill: cosine {cosine:.4f}, top-1 agreement {top1:.3f}")
    print("(one-token forward: the whole model on one new token, without a KV cache; random weights, so top-1 is a harsh measure)")
    return {"prefill_ms": prefill, "one_token_ms": one, "param_bytes": (size_before, size_after),
            "onnx_bytes": onnx_bytes, "cosine": cosine, "top1": top1, "quantized": quantized}


if __name__ == "__main__":
    main()
