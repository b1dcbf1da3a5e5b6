"""The eager backend's packed linears (``prepack``) against torch's own
``torch.nn.functional.linear``, on the linears of a decoder's fused decode
graph: every float32 linear on a constant weight there (Q/K/V merged, the
attention output, gate/up merged, down, the LM head), each with its own weight,
so that the weights stream from memory at every pass as in a decode step (one
layer's alone would sit in the last-level cache).

For each row count (1: a decode step at batch 1; 8: batch 8; 512: a prompt),
both forms run in turns for ``--reps`` rounds; the table gives each form's
median time over all the linears, the ratio packed / torch, and the read
bandwidth each reaches on the weights.

    python benchmarks/eager_linears.py                      # llama-135m, 1 / 8 / 64 / 512 rows
    python benchmarks/eager_linears.py --models gpt2,llama-135m --reps 5

Results: ``benchmarks/results/eager_linears.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from generate import FUSED, build_model  # noqa: E402

from fxopt.backends.eager import LINEARS, PackedLinearWeights, packed_linear  # noqa: E402
from fxopt.generation import optimize_decoder  # noqa: E402
from fxopt.ir.decoder import trace_decoder  # noqa: E402


def decode_linears(name: str) -> list[tuple[torch.Tensor, torch.Tensor | None, str]]:
    """(weight, bias, activation) of each float32 linear on a constant weight in
    ``name``'s fused decode graph, in graph order."""
    graph = optimize_decoder(trace_decoder(build_model(name)), FUSED).decode
    found = []
    for node in graph.fx.nodes:
        if node.op != "call_function" or node.target not in LINEARS or node.args[1].op != "get_attr":
            continue
        bias = node.args[2] if len(node.args) > 2 else None
        activation = node.args[3] if node.target != torch.ops.aten.linear.default else "none"
        found.append((graph.get_attr(node.args[1].target), graph.get_attr(bias.target) if bias is not None else None,
                      activation))
    return found


def measure(name: str, rows_list: list[int], reps: int) -> list[str]:
    from fxopt.ir.ops import ACTIVATIONS

    linears = decode_linears(name)
    packed = PackedLinearWeights()
    forms = {
        "torch": [(w, b, a) for w, b, a in linears],
        "packed": [(packed(w), b, a) for w, b, a in linears],
    }
    run = {"torch": lambda x, w, b, a: ACTIVATIONS[a](torch.nn.functional.linear(x, w, b)),
           "packed": packed_linear}
    weight_bytes = sum(w.numel() * w.element_size() for w, _, _ in linears)
    lines = [f"### {name}: {len(linears)} linears, {weight_bytes / 1e6:.0f} MB of float32 weights", "",
             "| rows | torch ms | packed ms | packed / torch | torch GB/s | packed GB/s |", "|---|---|---|---|---|---|"]
    for rows in rows_list:
        inputs = [torch.randn(rows, w.shape[1]) for w, _, _ in linears]
        times = {form: [] for form in forms}
        with torch.inference_mode():
            for _ in range(reps + 1):  # the first round warms up
                for form, layers in forms.items():
                    start = time.perf_counter()
                    for x, (w, b, a) in zip(inputs, layers):
                        run[form](x, w, b, a)
                    times[form].append(time.perf_counter() - start)
        t = {form: statistics.median(v[1:]) * 1e3 for form, v in times.items()}
        lines.append(f"| {rows} | {t['torch']:.2f} | {t['packed']:.2f} | {t['packed'] / t['torch']:.3f} | "
                     f"{weight_bytes / t['torch'] / 1e6:.1f} | {weight_bytes / t['packed'] / 1e6:.1f} |")
        print(lines[-1], flush=True)
    return lines + [""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llama-135m", help="comma-separated: gpt2, llama-135m (and their -tiny forms)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 512])
    p.add_argument("--reps", type=int, default=15, help="rounds (each runs both forms once)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    lines = [f"{args.threads} threads; median of {args.reps} rounds, the two forms in turns.", ""]
    for name in args.models.split(","):
        lines += measure(name, args.rows, args.reps)
    write_result("eager_linears", "Eager linears: oneDNN-packed weights against torch.nn.functional.linear",
                 "\n".join(lines), argv=[sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
                 intro="Each float32 linear of a fused decode graph, with its own weight (see benchmarks/eager_linears.py).")


if __name__ == "__main__":
    main()
