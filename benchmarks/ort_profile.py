"""Where ONNX Runtime spends its time on fxopt's fused graph: kernel time per op
type from ONNX Runtime's profiler (2 threads, spinning off, 6 runs after one
warm-up), for the models and fused pipeline of ``benchmarks/fusion.py``.

    python benchmarks/ort_profile.py gpt2      # or minilm, llama, bert
    python benchmarks/ort_profile.py gpt2 --pipeline "canonicalize,quantize(mode=dynamic)"
    python benchmarks/ort_profile.py gpt2-sdpa --tokens 1   # a one-token forward

Each model, token count and pipeline is a section of
``benchmarks/results/ort_profile.md``; "MatMul is N% of ONNX Runtime's kernel
time" in docs/ comes from here.
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fusion  # noqa: E402  the benchmark's models and pipeline

import fxopt  # noqa: E402
from fxopt.backends.onnxruntime import export_onnx_program, new_session, session_options  # noqa: E402
from fxopt.ir.trace import split_inputs  # noqa: E402
from fxopt.passes import PassManager  # noqa: E402

RUNS = 6
RUN = "(whole run)"  # kernel_times' key for the runs' own time: kernels plus the executor between them


def profiled_session(graph, threads: int, prefix: str):
    """An ONNX Runtime session on ``graph`` (2 threads by default, spinning
    off, every optimization but :data:`DISABLED_OPTIMIZERS`) that records each
    kernel's time."""
    options = session_options(threads, 1, "all", False)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / prefix)
    return new_session(export_onnx_program(graph).model_proto.SerializeToString(), options)


def feed(session, graph, inputs: dict) -> dict:
    """``inputs`` (keyword tensors of the traced model) as the session's feed."""
    args, kwargs = split_inputs(inputs)
    tensors = [x for x in graph.flatten_inputs(*args, **kwargs) if isinstance(x, torch.Tensor)]
    return {i.name: t.numpy() for i, t in zip(session.get_inputs(), tensors)}


def kernel_times(session, key=lambda event: event["args"]["op_name"], skip_runs: int = 0
                 ) -> tuple[collections.Counter, collections.Counter]:
    """End the session's profile: total kernel microseconds and node-run
    counts per ``key(event)`` (default: the op type), and the runs' own under
    :data:`RUN`, leaving out the first ``skip_runs`` runs (warm-ups)."""
    events = json.load(open(session.end_profiling()))
    runs = sorted(e["ts"] + e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    start = runs[skip_runs - 1] if 0 < skip_runs <= len(runs) else -1
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > start:
            total[key(e)] += e["dur"]
            count[key(e)] += 1
        elif e.get("cat") == "Session" and e["name"] == "model_run" and e["ts"] + e["dur"] > start:
            total[RUN] += e["dur"]
            count[RUN] += 1
    return total, count


def width_key(event) -> str:
    """``op[K->N]`` for a MatMul-like node (the last dimension of its input
    and of its output; a prepacked weight is not among the profiler's input
    shapes): nodes of one shape are summed together."""
    args = event["args"]
    op = args["op_name"]
    ins, outs = args.get("input_type_shape") or [], args.get("output_type_shape") or []
    if op in ("MatMul", "Attention", "Gemm", "FusedMatMul", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat") \
            and ins and outs:
        return f"{op}[{list(ins[0].values())[0][-1]}->{list(outs[0].values())[0][-1]}]"
    return op


def main(name: str, pipeline: str | None = None, threads: int = 2, tokens: int | None = None) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    spec, inputs, *_ = fusion.models([name])[0]
    if tokens:  # the first `tokens` positions of every sequence input
        inputs = {k: v[:, :tokens] for k, v in inputs.items()}
    graph = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
    fused = PassManager(pipeline or ",".join([fusion.BASE, *fusion.FUSIONS, "dce"])).run(graph).graph
    session = profiled_session(fused, threads, name)
    data = feed(session, fused, inputs)
    session.run(None, data)
    for _ in range(RUNS):
        session.run(None, data)
    total, count = kernel_times(session)
    del total[RUN], count[RUN]
    all_us = sum(total.values())
    print(f"| op | ms per run | share | nodes |  ({name}, {pipeline or 'fused'}, {threads} threads, {tokens or 'all'} tokens)\n|---|---|---|---|")
    for op, us in total.most_common():
        print(f"| {op} | {us / (RUNS + 1) / 1e3:.2f} | {100 * us / all_us:.1f}% | {count[op] // (RUNS + 1)} |")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="gpt2", choices=["gpt2", "gpt2-sdpa", "minilm", "minilm-padded", "llama", "bert"])
    ap.add_argument("--pipeline", help="fxopt pipeline to profile (default: the fusion benchmark's fused pipeline)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, help="profile only the first N tokens of each sequence (1: one-token forward)")
    a = ap.parse_args()
    from common import captured, write_result  # noqa: E402

    with captured() as out:
        main(a.model, a.pipeline, a.threads, a.tokens)
    write_result("ort_profile", "ONNX Runtime kernel time per op type", out.text,
                 section=f"{a.model}, {f'{a.tokens} token(s)' if a.tokens else 'all tokens'}: {a.pipeline or 'the fusion benchmark pipeline'}")
