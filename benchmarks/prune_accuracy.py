"""Accuracy of fxopt's pruning, clustering and structured shrinking on the
real all-MiniLM-L6-v2 (``fxopt.models.minilm()``), without fine-tuning.

Mean and min cosine of the mean-pooled, normalized embeddings of 56
evaluation sentences (``benchmarks/sentences.py``) against the fp32 model,
on eager PyTorch; calibration (Wanda, SparseGPT, activation importance) on
``--calib`` of the 32 other sentences. All linears of the encoder are pruned.

    python benchmarks/prune_accuracy.py                   # every row
    python benchmarks/prune_accuracy.py --rows "prune(method=sparsegpt,ratio=0.5)"

Writes ``benchmarks/results/prune_accuracy.md`` (command, CPU model and core
count in the header).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import write_result  # noqa: E402

BASE = "canonicalize,dce,constant-fold,cse"
ROWS = [
    "prune(method=magnitude,ratio=0.5)",
    "prune(method=wanda,ratio=0.5)",
    "prune(method=sparsegpt,ratio=0.5)",
    "prune(method=magnitude,pattern='2:4')",
    "prune(method=wanda,pattern='2:4')",
    "prune(method=sparsegpt,pattern='2:4')",
    "cluster(bits=4)",
    "quantize(bits=4,granularity=channel,accuracy_level=0)",
    "shrink(ratio=0.1)",
    "shrink(ratio=0.2)",
    "shrink(ratio=0.3)",
    "shrink(ratio=0.3,importance=activation)",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="*", default=ROWS, help="pipelines to measure")
    ap.add_argument("--calib", type=int, default=16, help="calibration sentences")
    args = ap.parse_args()

    import fxopt
    from fxopt.models import minilm, minilm_tokenize
    from sentences import CALIBRATION, EVAL

    spec = minilm()
    graph = fxopt.PassManager(BASE).run(fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)).graph
    evaluation = minilm_tokenize(EVAL)
    calibration = [minilm_tokenize([s]) for s in CALIBRATION[: args.calib]]
    with torch.no_grad():
        ref = spec.model(**evaluation)
    lines = [
        f"{args.calib} calibration sentences, {len(EVAL)} evaluation sentences, eager.",
        "",
        "| pipeline | mean cosine | min cosine | sparsity / bytes | pass time (s) |",
        "|---|---|---|---|---|",
    ]
    for row in args.rows:
        start = time.perf_counter()
        result = fxopt.PassManager(row, calibration_data=calibration).run(graph)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            out = result.graph(**evaluation)
        cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
        stats = result.records[0].stats
        size = stats.get("sparsity", None)
        size = f"{size:.3f}" if size is not None else f"{result.records[0].param_bytes_after / result.records[0].param_bytes_before:.3f} of bytes"
        lines.append(f"| `{row}` | {cos.mean():.4f} | {cos.min():.4f} | {size} | {seconds:.1f} |")
        print(lines[-1], flush=True)
    # One file per benchmark; the header names the command, CPU and cores (benchmarks/common.py).
    write_result("prune_accuracy", "Pruning accuracy: all-MiniLM-L6-v2, no fine-tuning", "\n".join(lines))


if __name__ == "__main__":
    main()
