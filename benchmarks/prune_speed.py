"""Structured pruning speed: a model with a fraction of its attention heads
and MLP channels removed by ``shrink``, against the same model unpruned, both
fused (fuse-attention, merge-linears, pack-attention, fuse-linear-act,
fuse-norm) on ONNX Runtime.

Per model it prints and writes: the parameter bytes ratio, the prefill MACs
ratio (every multiply-accumulate of one forward at the prefill length,
counted by ``torch.utils.flop_counter`` on the eager graph; the embedding and
the LM head are never shrunk), the heads and channels left, and the fused ONNX
Runtime time of the pruned model over the unpruned one at prefill (batch 1,
``--prefill`` tokens) and at one token (a one-token forward: the GEMV-bound
step a decode step is made of). Time that does not fall with the work means
the pruned graph lost a fusion or a kernel: the table also compares the op
kinds of the two fused graphs, and the op types ONNX Runtime runs after its
own optimizations, and lists the head counts of their attention ops.

Times are ratios within one run: both variants are timed round-robin and
each ratio is the median over rounds of pruned / unpruned in the same round.

    python benchmarks/prune_speed.py                          # GPT-2 small (25% heads) and fxopt's Llama (50%), 30% MLP
    python benchmarks/prune_speed.py --size tiny --reps 5     # a quick check at test sizes
    python benchmarks/prune_speed.py --models gpt2 --threads 2 --profile 20   # and where the time goes
    python benchmarks/prune_speed.py --models gpt2 --multiple-of 64           # MLP widths rounded up to 64
    python benchmarks/prune_speed.py --reps 0                 # bytes and MACs only, no timing

``--profile RUNS`` adds, per length, ONNX Runtime's profile of both fused
graphs run interleaved: kernel time per op type and MatMul width, the time
between kernels and the whole runs' ratio. The "linear weight bytes" row is
the one-token work: the weights every linear streams, the tied LM head once.

Under grouped-query attention heads go by whole key/value groups: fxopt's
Llama (8 query heads over 2 KV heads) cannot lose 25% of its heads, only 0 or
50%, so ``--heads`` defaults to 0.5 for it; the table says how many were removed. Results: one section per model
and configuration in ``benchmarks/results/prune_speed.md``.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import fxopt
from fxopt.models import gpt2, llama
from fxopt.passes import PassManager

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

BASE = "canonicalize,dce,constant-fold,cse"
FUSED = "fuse-attention,merge-linears,pack-attention,fuse-linear-act,fuse-norm,dce"
GOALS = {"params": 0.81, "macs": 0.80, "time": 0.82}  # GPT-2 small, 25% heads and 30% MLP channels
MODELS = {"gpt2": gpt2, "llama": llama}
# Under grouped-query attention heads go by whole key/value groups: 25% of
# Llama's 2 groups rounds to none, 50% is its smallest step.
DEFAULT_HEADS = {"gpt2": 0.25, "llama": 0.5}


def token_inputs(vocab: int, seq: int) -> dict:
    return {"input_ids": torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))}


def macs(graph, inputs) -> int:
    """Multiply-accumulates of one forward (FLOPs / 2), linears and attention matmuls."""
    model = fxopt.compile(graph, "eager")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**inputs)
    return counter.get_total_flops() // 2


def linear_weight_bytes(graph) -> int:
    """Bytes of the weights the linears read (each distinct weight once): what
    a one-token forward streams from memory, the tied LM head included."""
    seen = {}
    for n in graph.fx.nodes:
        if n.op == "call_function" and n.target == torch.ops.aten.linear.default:
            w = graph.constant(n.args[1])
            if w is not None:
                seen[w.untyped_storage().data_ptr() or id(w)] = w.numel() * w.element_size()
    return sum(seen.values())


def profile_pair(a_graph, b_graph, inputs: dict, runs: int, threads: int) -> list[str]:
    """Kernel time per op type (MatMuls and Attentions by width) of
    the two fused graphs on ONNX Runtime's profiler, their runs interleaved so
    a load on the CPU falls on both alike: a table of each one's share and of
    pruned / unpruned time per row."""
    from ort_profile import RUN, feed, kernel_times, profiled_session, width_key

    sessions = [profiled_session(g, threads or 2, label) for g, label in ((a_graph, "unpruned"), (b_graph, "pruned"))]
    feeds = [feed(s, g, inputs) for s, g in zip(sessions, (a_graph, b_graph))]
    for _ in range(runs + 1):  # the first run of each is a warm-up, left out
        for s, f in zip(sessions, feeds):
            s.run(None, f)
    (ta, ca), (tb, cb) = (kernel_times(s, width_key, skip_runs=1) for s in sessions)
    run_a, run_b = ta.pop(RUN), tb.pop(RUN)
    del ca[RUN], cb[RUN]
    all_a, all_b = sum(ta.values()), sum(tb.values())
    # a pruned shape sits beside its unpruned one: rows in the unpruned order, then the pruned-only ones
    order = [k for k, _ in ta.most_common()] + [k for k, _ in tb.most_common() if k not in ta]
    lines = ["| kernel (width in->out) | unpruned share | nodes | pruned share | nodes | pruned / unpruned time |",
             "|---|---|---|---|---|---|"]
    for k in order:
        ratio = f"{tb[k] / ta[k]:.3f}" if ta[k] and tb[k] else "-"
        lines.append(f"| {k} | {100 * ta[k] / all_a:.1f}% | {ca[k] // runs} | {100 * tb[k] / all_b:.1f}% | "
                     f"{cb[k] // runs} | {ratio} |")
    lines.append(f"| all kernels | 100% | {sum(ca.values()) // runs} | 100% | {sum(cb.values()) // runs} | "
                 f"{all_b / all_a:.3f} |")
    lines.append(f"| between kernels (run time less kernel time) | {100 * (run_a - all_a) / all_a:.1f}% | | "
                 f"{100 * (run_b - all_b) / all_b:.1f}% | | {(run_b - all_b) / max(run_a - all_a, 1):.3f} |")
    lines.append(f"| whole runs | | | | | {run_b / run_a:.3f} |")
    return lines


def attention_heads(graph) -> list[str]:
    """``op(num_heads[/kv_num_heads])`` for each fused attention op of the graph."""
    out = []
    for n in graph.fx.nodes:
        if n.op == "call_function" and "attention" in str(n.target) and hasattr(n.target, "_schema"):
            names = [a.name for a in n.target._schema.arguments]
            args = dict(zip(names, list(n.args) + [n.kwargs.get(k) for k in names[len(n.args):]]))
            heads = "/".join(str(args[k]) for k in ("num_heads", "kv_num_heads") if args.get(k) is not None)
            out.append(f"{str(n.target).split('.')[1]}({heads})" if heads else str(n.target).split(".")[1])
    return out


def kinds(graph) -> collections.Counter:
    return collections.Counter(str(n.target) for n in graph.fx.nodes if n.op == "call_function")


def ort_op_types(compiled) -> collections.Counter:
    """The op types of the model ONNX Runtime runs, after its own graph optimizations (its fusions)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(d) / "optimized.onnx")
        options.log_severity_level = 3  # the saved model is read here only: no hardware-specific warning
        ort.InferenceSession(compiled.program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        model = onnx.load(options.optimized_model_filepath, load_external_data=False)
    return collections.Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.node)


def time_pair(a, b, reps: int) -> float:
    """Median over rounds of time(b) / time(a), the two run one after the other in each round."""
    a(), b(), a(), b()
    ratios = []
    for _ in range(reps):
        t = time.perf_counter()
        a()
        ta = time.perf_counter() - t
        t = time.perf_counter()
        b()
        ratios.append((time.perf_counter() - t) / ta)
    return statistics.median(ratios)


def run_model(name: str, size: str, heads: float, ratio: float, prefill: int, reps: int, threads: int,
              multiple_of: int = 1, profile: int = 0) -> tuple[list[str], list[str]]:
    spec = MODELS[name](size)
    vocab = spec.model.config.vocab_size
    shrink = f"shrink(heads={heads},ratio={ratio}" + (f",multiple_of={multiple_of})" if multiple_of != 1 else ")")
    lines, goals = [], []
    rows, profiles = {}, {}
    for label, seq in (("prefill", prefill), ("one token", 1)):
        inputs = token_inputs(vocab, seq)
        # traced at this length (static shapes): the unpruned and pruned graphs get the same treatment
        graph = PassManager(BASE).run(fxopt.trace(spec.model, inputs, name=spec.name)).graph
        result = PassManager(shrink).run(graph)
        pruned = result.graph
        fused = PassManager(FUSED).run(graph).graph
        fused_pruned = PassManager(FUSED).run(pruned).graph
        opts = dict(intra_op_threads=threads, inter_op_threads=1, allow_spinning=False, providers=["CPUExecutionProvider"])
        a, b = fxopt.compile(fused, "onnxruntime", **opts), fxopt.compile(fused_pruned, "onnxruntime", **opts)
        err = fxopt.compare(fxopt.compile(pruned, "eager")(**inputs), b(**inputs)).max_abs_err
        rows[label] = dict(time=time_pair(lambda: a(**inputs), lambda: b(**inputs), reps) if reps else None, err=err)
        if profile:
            profiles[label] = profile_pair(fused, fused_pruned, inputs, profile, threads)
        if label == "one token":
            rows["streamed"] = linear_weight_bytes(pruned) / linear_weight_bytes(graph)
        if label == "prefill":
            stats = result.records[0].stats
            rows["params"] = pruned.param_bytes() / graph.param_bytes()
            rows["macs"] = macs(pruned, inputs) / macs(graph, inputs)
            heads_left = sum(v["heads"] for v in stats["attentions"].values())
            heads_all = sum(v["of"] for v in stats["attentions"].values()) or 0
            ch_left = sum(v["kept"] for v in stats["groups"].values())
            ch_all = sum(v["of"] for v in stats["groups"].values())
            lost = kinds(fused) - kinds(fused_pruned)
            gained = kinds(fused_pruned) - kinds(fused)
            ort_a, ort_b = ort_op_types(a), ort_op_types(b)
            rows["structure"] = (
                f"heads left {heads_left} of {heads_all}, MLP channels left {ch_left} of {ch_all}; "
                f"attention ops unpruned {', '.join(sorted(set(attention_heads(fused))))}, "
                f"pruned {', '.join(sorted(set(attention_heads(fused_pruned))))}; "
                + ("same op kinds in both fused graphs" if not lost and not gained
                   else f"op kinds lost {dict(lost)}, gained {dict(gained)}")
                + ("; ONNX Runtime runs the same op types in both after its optimizations" if ort_a == ort_b
                   else f"; ONNX Runtime op types lost {dict(ort_a - ort_b)}, gained {dict(ort_b - ort_a)}"))
    lines += [
        f"### {spec.name}: {shrink}", "",
        f"{rows['structure']}.", "",
        "| measure | pruned / unpruned | goal (GPT-2 small) |", "|---|---|---|",
        f"| parameter bytes | {rows['params']:.3f} | {GOALS['params']} |",
        f"| prefill MACs ({prefill} tokens) | {rows['macs']:.3f} | {GOALS['macs']} |",
        f"| linear weight bytes (streamed per token) | {rows['streamed']:.3f} | |",
        f"| fused ORT time, prefill {prefill} | {_ratio(rows['prefill']['time'])} | <= {GOALS['time']} |",
        f"| fused ORT time, one token | {_ratio(rows['one token']['time'])} | <= {GOALS['time']} |",
        "",
        f"Pruned fused ORT vs pruned float eager, max abs error: prefill {rows['prefill']['err']:.2e}, "
        f"one token {rows['one token']['err']:.2e}.", "",
    ]
    for label, table in profiles.items():
        tokens = prefill if label == "prefill" else 1
        lines += [f"ONNX Runtime's profiler, {tokens} token(s), {profile} interleaved runs of each:", "", *table, ""]
    if name == "gpt2" and size == "small" and heads == 0.25 and ratio == 0.3 and multiple_of == 1:
        worst = max(rows["prefill"]["time"], rows["one token"]["time"]) if reps else None
        goals += [f"parameter bytes {rows['params']:.3f} (goal {GOALS['params']})", f"MACs {rows['macs']:.3f} (goal {GOALS['macs']})",
                  f"time {_ratio(worst)} (goal <= {GOALS['time']})"]
    return lines, goals


def _ratio(x) -> str:
    return "not timed (--reps 0)" if x is None else f"{x:.3f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--size", default="small", choices=("small", "tiny"))
    p.add_argument("--heads", type=float, default=None,
                   help="fraction of each attention's heads removed (default: GPT-2 0.25; Llama 0.5, its smallest step: "
                        "8 query heads over 2 KV groups)")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of each MLP's channels removed")
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--reps", type=int, default=30, help="timing rounds; 0: sizes and MACs only")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: every core)")
    p.add_argument("--multiple-of", type=int, default=1, help="shrink's multiple_of: each MLP keeps a multiple of this many channels")
    p.add_argument("--profile", type=int, default=0, metavar="RUNS",
                   help="also profile both fused graphs (RUNS interleaved runs each): kernel time per op type and weight shape")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    for name in args.models:
        heads = args.heads if args.heads is not None else DEFAULT_HEADS[name]
        lines, goals = run_model(name, args.size, heads, args.ratio, args.prefill, args.reps, args.threads,
                                 args.multiple_of, args.profile)
        body = "\n".join(lines + ([f"Goals: {'; '.join(goals)}."] if goals else []))
        print(body)
        write_result("prune_speed", "Structured pruning speed (shrink), fused ONNX Runtime", body,
                     section=f"{name}-{args.size} heads={heads} ratio={args.ratio} prefill={args.prefill}"
                             + (f" multiple_of={args.multiple_of}" if args.multiple_of != 1 else ""),
                     argv=[sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
                     intro="Ratios of the pruned model to the unpruned one, both fused, measured in one run "
                           "(see benchmarks/prune_speed.py). Embedding and LM head are never shrunk.")


if __name__ == "__main__":
    main()
