"""ONNX Runtime's MLP time per weight byte at the widths ``shrink`` leaves:
does a channel count that is not a multiple of the kernel's tile (GPT-2's
3072 MLP channels at 70%: 2151) cost more per weight than a rounded one?

Each model is GPT-2 small's MLP stack as the fused graph runs it: 12 layers
of ``MatMul(768 x n) -> FastGelu -> MatMul(n x 768) -> Add`` (the residual),
each layer with its own weights, so the 12 layers' weights (57 to 113 MiB in
fp32) stream from memory at every run as in the whole model (one layer alone
would sit in the last-level cache). The widths: the full 3072, shrink's
``ceil(0.7 * 3072) = 2151``, and 2151 rounded to multiples of 16, 64 and 256
(2160, 2176, 2304) and down (2048). ``--int8`` adds the W8A8 form
(``DynamicQuantizeMatMul``, int8 weights).

All models run round-robin in each round; per width the table gives the
median over rounds of its time over the full width's time in the same round,
the weight bytes ratio, and their quotient: time per weight byte against the
full width's (1.0: the time fell exactly with the bytes; above 1: the width
costs more per byte).

    python benchmarks/matmul_widths.py                       # 1 and 128 rows, fp32 and int8, 30 rounds
    python benchmarks/matmul_widths.py --rows 1 --reps 5     # a quick check

Results: ``benchmarks/results/matmul_widths.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from fxopt.backends.onnxruntime import new_session, session_options

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

HIDDEN, LAYERS, FULL = 768, 12, 3072
WIDTHS = (3072, 2151, 2160, 2176, 2304, 2048)


def mlp_stack(width: int, int8: bool, seed: int = 0) -> bytes:
    """``LAYERS`` layers of ``x + W2(FastGelu(W1 x + b1))`` with their own weights."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i in range(LAYERS):
        w1 = rng.standard_normal((HIDDEN, width), dtype=np.float32) * 0.02
        w2 = rng.standard_normal((width, HIDDEN), dtype=np.float32) * 0.02
        inits.append(numpy_helper.from_array(rng.standard_normal(width, dtype=np.float32) * 0.02, f"b1_{i}"))
        h, g, y = f"h{i}", f"g{i}", f"y{i}"
        nodes += [_matmul(x, w1, f"w1_{i}", h, int8, inits),
                  helper.make_node("FastGelu", [h, f"b1_{i}"], [g], domain="com.microsoft"),
                  _matmul(g, w2, f"w2_{i}", y, int8, inits)]
        nodes.append(helper.make_node("Add", [x, y], [f"r{i}"]))
        x = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, HIDDEN])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [None, HIDDEN])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
                             ).SerializeToString()


def _matmul(x: str, w: np.ndarray, name: str, out: str, int8: bool, inits: list):
    if not int8:
        inits.append(numpy_helper.from_array(w, name))
        return helper.make_node("MatMul", [x, name], [out])
    scale = np.float32(np.abs(w).max() / 127)
    inits += [numpy_helper.from_array(np.clip(np.round(w / scale), -127, 127).astype(np.int8), name),
              numpy_helper.from_array(np.array(scale, dtype=np.float32), f"{name}_scale"),
              numpy_helper.from_array(np.array(0, dtype=np.int8), f"{name}_zero")]
    return helper.make_node("DynamicQuantizeMatMul", [x, name, f"{name}_scale", f"{name}_zero"], [out], domain="com.microsoft")


def measure(rows: int, int8: bool, reps: int, threads: int) -> list[str]:
    options = session_options(threads, 1, "all", False)
    options.log_severity_level = 3
    sessions = {w: new_session(mlp_stack(w, int8), options) for w in WIDTHS}
    x = {"x": np.random.default_rng(1).standard_normal((rows, HIDDEN), dtype=np.float32)}
    for s in sessions.values():  # warm-up: prepacking, arena
        s.run(None, x)
        s.run(None, x)
    ratios = {w: [] for w in WIDTHS}
    for r in range(reps):
        order = WIDTHS if r % 2 == 0 else WIDTHS[::-1]  # alternate the order so no width always follows another
        times = {}
        for w in order:
            t = time.perf_counter()
            sessions[w].run(None, x)
            times[w] = time.perf_counter() - t
        for w in WIDTHS:
            ratios[w].append(times[w] / times[FULL])
    kind = "int8 (DynamicQuantizeMatMul)" if int8 else "fp32 (MatMul)"
    lines = [f"#### {kind}, {rows} row(s)", "", "| width n | n mod 16 / 64 | time / full | bytes / full | time per byte / full's |",
             "|---|---|---|---|---|"]
    for w in WIDTHS:
        t = statistics.median(ratios[w])
        lines.append(f"| {w} | {w % 16} / {w % 64} | {t:.3f} | {w / FULL:.3f} | {t / (w / FULL):.3f} |")
    return lines + [""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 128], help="rows of x (1: one token; 128: a prefill)")
    p.add_argument("--reps", type=int, default=30, help="rounds (each runs every width once)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="fp32 only")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    lines = []
    for int8 in (False, True) if args.int8 else (False,):
        for rows in args.rows:
            lines += measure(rows, int8, args.reps, args.threads)
    body = "\n".join(lines)
    print(body)
    write_result("matmul_widths", "MLP time per weight byte at shrunk widths, ONNX Runtime", body,
                 argv=[sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
                 intro=f"GPT-2 small's MLP stack ({LAYERS} layers, hidden {HIDDEN}) at each intermediate width, "
                       f"against the full {FULL}; ratios within one run, median over rounds (see benchmarks/matmul_widths.py).")


if __name__ == "__main__":
    main()
