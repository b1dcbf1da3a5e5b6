"""pack-attention's effect on GPT-2 small (transformers' default attention) on
ONNX Runtime: the same pipeline with and without ``pack-attention``, both
sessions in one process, timed interleaved (2 threads, spinning off), so the
machine's drift falls on both alike. A ratio is the median of the rounds'
packed / unpacked times.

    python benchmarks/pack_attention_ab.py                # int8 (W8A8 per tensor: QAttention)
    python benchmarks/pack_attention_ab.py --quant fp32   # float (Attention)
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch

import fxopt
from fxopt.backends.onnxruntime import _session_options, export_onnx_program
from fxopt.models import gpt2
from fxopt.passes import PassManager

QUANT = {"int8": "quantize(mode=dynamic,act_granularity=tensor,skip_lm_head=false),", "fp32": ""}
PIPELINE = "canonicalize,dce,constant-fold,cse,fuse-attention,merge-linears,{quant}{pack}fuse-linear-act,fuse-norm,dce"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", choices=list(QUANT), default="int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, nargs=2, default=[40, 400], help="rounds at prefill 128 and at one token")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    spec = gpt2()
    graph = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
    sessions = {}
    for name, pack in (("without", ""), ("with pack-attention", "pack-attention,")):
        result = PassManager(PIPELINE.format(quant=QUANT[args.quant], pack=pack)).run(graph)
        ops = [n.op_type for n in export_onnx_program(result.graph).model_proto.graph.node]
        attn = {o: ops.count(o) for o in ("MultiHeadAttention", "Attention", "QAttention") if o in ops}
        sessions[name] = (ort.InferenceSession(export_onnx_program(result.graph).model_proto.SerializeToString(),
                                               _session_options(args.threads, 1, "all", False), providers=["CPUExecutionProvider"]), attn)
    print(f"GPT-2 small, {args.quant}, {args.threads} threads; attention ops: "
          + "; ".join(f"{k}: {v}" for k, (_, v) in sessions.items()))
    print("| tokens | without (ms) | with pack-attention (ms) | ratio |\n|---|---|---|---|")
    for tokens, rounds in zip((128, 1), args.rounds):
        feed = {"input_ids": np.random.default_rng(tokens).integers(0, 50257, (1, tokens)).astype(np.int64)}
        times = {k: [] for k in sessions}
        for s, _ in sessions.values():
            s.run(None, feed)
        for _ in range(rounds):
            for k, (s, _) in sessions.items():
                t = time.perf_counter()
                s.run(None, feed)
                times[k].append(time.perf_counter() - t)
        a, b = times["without"], times["with pack-attention"]
        ratio = statistics.median(y / x for x, y in zip(a, b))
        print(f"| {tokens} | {statistics.median(a) * 1e3:.2f} | {statistics.median(b) * 1e3:.2f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
