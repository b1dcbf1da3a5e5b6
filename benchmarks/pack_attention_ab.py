"""pack-attention's effect on ONNX Runtime: the same pipeline with and without
``pack-attention``, both sessions in one process, timed interleaved (2
threads, spinning off), so the machine's drift falls on both alike. A ratio is
the median of the rounds' packed / unpacked times. Models: GPT-2 small
(transformers' default attention; prefill 128 and a one-token forward without a KV cache) or the real
MiniLM batches of ``benchmarks/fusion.py`` (32 x 41, and 32 x 43 padded).

    python benchmarks/pack_attention_ab.py                # GPT-2, int8 (W8A8 per tensor: QAttention)
    python benchmarks/pack_attention_ab.py --quant fp32   # float (Attention)
    python benchmarks/pack_attention_ab.py --model minilm --rounds 30

Each model and precision is a section of ``benchmarks/results/pack_attention_ab.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import fxopt
from fxopt.backends.onnxruntime import export_onnx_program, session_options
from fxopt.ir.trace import split_inputs
from fxopt.models import gpt2
from fxopt.passes import PassManager

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fusion  # noqa: E402  the MiniLM benchmark batches

QUANT = {"int8": "quantize(mode=dynamic,act_granularity=tensor,skip_lm_head=false),", "fp32": ""}
PIPELINE = "canonicalize,dce,constant-fold,cse,fuse-attention,merge-linears,{quant}{pack}fuse-linear-act,fuse-norm,dce"


def _cases(model: str):
    """(label, spec, feeds: [(shape label, inputs, rounds)]) for ``model``."""
    if model == "gpt2":
        spec = gpt2()
        return spec, [(f"1 x {n}", {"input_ids": torch.from_numpy(np.random.default_rng(n).integers(0, 50257, (1, n)))}, i)
                      for i, n in enumerate((128, 1))]
    out = []
    for name in ("minilm", "minilm-padded"):
        spec, inputs, *_ = fusion.models([name])[0]
        out.append((f"{name} {'x'.join(map(str, inputs['input_ids'].shape))}", inputs, 0))
    return spec, out


def main() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["gpt2", "minilm"], default="gpt2")
    ap.add_argument("--quant", choices=list(QUANT), default="int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, nargs="+", default=[40, 400],
                    help="rounds per input (GPT-2: prefill 128, one token; MiniLM: the first value for both batches)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    spec, feeds = _cases(args.model)
    graph = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
    sessions = {}
    for name, pack in (("without", ""), ("with pack-attention", "pack-attention,")):
        result = PassManager(PIPELINE.format(quant=QUANT[args.quant], pack=pack)).run(graph)
        proto = export_onnx_program(result.graph).model_proto
        ops = [n.op_type for n in proto.graph.node]
        attn = {o: ops.count(o) for o in ("MultiHeadAttention", "Attention", "QAttention") if o in ops}
        session = ort.InferenceSession(proto.SerializeToString(), session_options(args.threads, 1, "all", False),
                                       providers=["CPUExecutionProvider"])
        sessions[name] = (session, attn, result.graph)
    print(f"{args.model}, {args.quant}, {args.threads} threads; attention ops: "
          + "; ".join(f"{k}: {v}" for k, (_, v, _) in sessions.items()))
    print("| input | without (ms) | with pack-attention (ms) | ratio |\n|---|---|---|---|")
    for label, inputs, which in feeds:
        rounds = args.rounds[min(which, len(args.rounds) - 1)]
        feed = {}
        for k, (s, _, g) in sessions.items():
            a, kw = split_inputs(inputs)
            tensors = [x for x in g.flatten_inputs(*a, **kw) if isinstance(x, torch.Tensor)]
            feed[k] = {i.name: t.numpy() for i, t in zip(s.get_inputs(), tensors)}
            s.run(None, feed[k])
        times = {k: [] for k in sessions}
        for _ in range(rounds):
            for k, (s, _, _) in sessions.items():
                t = time.perf_counter()
                s.run(None, feed[k])
                times[k].append(time.perf_counter() - t)
        a, b = times["without"], times["with pack-attention"]
        ratio = statistics.median(y / x for x, y in zip(a, b))
        print(f"| {label} | {statistics.median(a) * 1e3:.2f} | {statistics.median(b) * 1e3:.2f} | {ratio:.3f} |")
    return args


if __name__ == "__main__":
    from common import captured, write_result  # noqa: E402

    with captured() as out:
        args = main()
    write_result("pack_attention_ab", "pack-attention A/B on ONNX Runtime", out.text, section=f"{args.model}, {args.quant}")
