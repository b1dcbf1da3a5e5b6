"""fxopt's fused int4 GPT-2 against ONNX Runtime's own int4 recipe, in one
process: the two ONNX graphs after ONNX Runtime's optimizer node by node, the
kernel time per op type from ONNX Runtime's profiler, and the time of one
against the other taken in turns (blocks of runs, median of the blocks'
ratios: the CPU's drift and other processes' load move both sides alike).

The peer is ``quant_speed.py``'s: fxopt's fp32 export with the tied LM head's
``Transpose(W)`` folded into an initializer, then ONNX Runtime's
``MatMulNBitsQuantizer(bits=4, block_size, is_symmetric=False,
accuracy_level=4)``. fxopt: the README's fused pipeline with
``quantize(bits=4, group_size=block_size, skip_lm_head=false)``.

    python benchmarks/int4_head_to_head.py                 # GPT-2 small, one token, 2 threads
    python benchmarks/int4_head_to_head.py --tokens 128
    python benchmarks/int4_head_to_head.py --size tiny     # a quick check of the script

Writes a section of ``benchmarks/results/int4_head_to_head.md``.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("quant_speed", HERE / "quant_speed.py")
quant_speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quant_speed)

FUSED_INT4 = quant_speed.FUSED.format(quantize="quantize(bits=4,group_size={block},skip_lm_head=false)")


def build(spec, workdir: Path, block: int):
    """Write ``peer.onnx`` (ONNX Runtime's MatMulNBits quantizer on fxopt's
    fp32 export, transpose folded) and ``fxopt.onnx`` (fxopt's fused int4);
    return their paths and fxopt's optimized graph."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    import fxopt

    graph = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
    fp32, folded = workdir / "fp32.onnx", workdir / "folded.onnx"
    fxopt.export_onnx(fxopt.PassManager("canonicalize").run(graph).graph, fp32)
    quant_speed.fold_transposed_initializers(str(fp32), str(folded))
    qz = MatMulNBitsQuantizer(onnx.load(str(folded)), bits=4, block_size=block, is_symmetric=False, accuracy_level=4)
    qz.process()
    paths = {"peer": workdir / "peer.onnx", "fxopt": workdir / "fxopt.onnx"}
    qz.model.save_model_to_file(str(paths["peer"]), use_external_data_format=False)
    fused = fxopt.PassManager(FUSED_INT4.format(block=block)).run(graph).graph
    fxopt.export_onnx(fused, paths["fxopt"])
    return paths, fused


def session(path: Path, threads: int, **extra):
    from fxopt.backends.onnxruntime import new_session, session_options

    options = session_options(threads, None, "all", True)
    for key, value in extra.items():
        setattr(options, key, value)
    return new_session(str(path), options)


def optimized_graph(path: Path, threads: int = 1):
    """The graph ONNX Runtime runs: ``path`` after its optimizer (level ``all``,
    fxopt's session settings)."""
    import onnx

    out = path.with_suffix(".optimized.onnx")
    session(path, threads, optimized_model_filepath=str(out))
    return onnx.load(str(out))


def matmulnbits_signatures(model) -> collections.Counter:
    """Each MatMulNBits as (K, N, bits, block_size, accuracy_level, has zero
    points, has bias, has g_idx), counted: what decides which MLAS kernel runs."""
    out = collections.Counter()
    for n in model.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in n.attribute}
        present = [i < len(n.input) and bool(n.input[i]) for i in (3, 5, 4)]
        out[(attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"], attrs.get("accuracy_level", 0), *present)] += 1
    return out


def op_counts(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def profile(path: Path, feed: dict, threads: int, runs: int = 20) -> dict[str, float]:
    """Kernel time per op type as shares of the run (ONNX Runtime's profiler,
    ``runs`` runs after 5 warm-up runs that are left out)."""
    s = session(path, threads, enable_profiling=True, profile_file_prefix=str(path.with_suffix("")) + "_profile")
    for _ in range(5 + runs):
        s.run(None, feed)
    events = json.load(open(s.end_profiling()))
    start = sorted(e["ts"] for e in events if e.get("name") == "model_run")[5]  # the profiled runs after the warm-up
    total = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            total[e["args"]["op_name"]] += e["dur"]
    whole = sum(total.values()) or 1
    return {op: us / whole for op, us in total.most_common()}


def head_to_head(paths: dict[str, Path], feed: dict, threads: int, rounds: int, block_runs: int) -> dict:
    """fxopt's time over the peer's, taken in turns: per round, a block of each
    (the order alternating), the block's median; the median and quartiles of
    the rounds' ratios."""
    sessions = {k: session(p, threads) for k, p in paths.items()}
    ratios = []
    for r in range(rounds):
        medians = {}
        for name in (("peer", "fxopt") if r % 2 == 0 else ("fxopt", "peer")):
            s = sessions[name]
            for _ in range(3):
                s.run(None, feed)
            times = []
            for _ in range(block_runs):
                t0 = time.perf_counter()
                s.run(None, feed)
                times.append(time.perf_counter() - t0)
            medians[name] = statistics.median(times)
        ratios.append(medians["fxopt"] / medians["peer"])
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    outputs = {k: s.run(None, feed)[0] for k, s in sessions.items()}
    return {"ratio": statistics.median(ratios), "iqr": (q[0], q[2]), "outputs": outputs}


def main(size: str, tokens: int, threads: int, rounds: int) -> str:
    import numpy as np
    import torch

    import fxopt
    from fxopt.models import gpt2

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    spec = gpt2(size)
    block = 128 if spec.model.config.n_embd % 128 == 0 else 32
    ids = torch.randint(0, spec.model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    feed = {"input_ids": ids.numpy()}
    with torch.inference_mode():
        reference = spec.model(input_ids=ids).logits
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        paths, _ = build(spec, Path(tmp), block)
        graphs = {k: optimized_graph(p) for k, p in paths.items()}
        sig = {k: matmulnbits_signatures(g) for k, g in graphs.items()}
        counts = {k: op_counts(g) for k, g in graphs.items()}
        lines.append(f"MatMulNBits after ONNX Runtime's optimizer, (K, N, bits, block, accuracy level, zero points, bias, g_idx): "
                     f"{'identical' if sig['peer'] == sig['fxopt'] else 'DIFFERENT'} in both graphs")
        for key in sorted(set(sig["peer"]) | set(sig["fxopt"])):
            lines.append(f"- {key}: peer {sig['peer'][key]}, fxopt {sig['fxopt'][key]}")
        lines.append(f"\nNodes after ONNX Runtime's optimizer: peer {sum(counts['peer'].values())}, fxopt {sum(counts['fxopt'].values())}\n")
        lines.append("| op | peer nodes | fxopt nodes | peer kernel time share | fxopt kernel time share |\n|---|---|---|---|---|")
        shares = {k: profile(p, feed, threads) for k, p in paths.items()}
        for op in sorted(set(counts["peer"]) | set(counts["fxopt"]), key=lambda o: -max(shares["peer"].get(o, 0), shares["fxopt"].get(o, 0))):
            lines.append(f"| {op} | {counts['peer'][op]} | {counts['fxopt'][op]} | "
                         f"{100 * shares['peer'].get(op, 0):.1f}% | {100 * shares['fxopt'].get(op, 0):.1f}% |")
        result = head_to_head(paths, feed, threads, rounds, 20 if tokens == 1 else 5)
    cos = {k: fxopt.compare(reference, torch.from_numpy(v)).cosine for k, v in result["outputs"].items()}
    low, high = result["iqr"]
    lines.insert(0, f"GPT-2 {size}, batch 1, {tokens} token(s), {threads} threads, block {block}. fxopt time / peer time, "
                    f"in turns: **{result['ratio']:.3f}** (quartiles of {rounds} rounds {low:.3f}-{high:.3f}); cosine of the "
                    f"logits to eager fp32: peer {cos['peer']:.4f}, fxopt {cos['fxopt']:.4f}.\n")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=["small", "tiny"])
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from common import write_result  # noqa: E402

    body = main(a.size, a.tokens, a.threads, a.rounds)
    print(body)
    write_result("int4_head_to_head", "fxopt int4 against ONNX Runtime's MatMulNBits quantizer, head to head", body,
                 section=f"GPT-2 {a.size}, {a.tokens} token(s), {a.threads} threads")
