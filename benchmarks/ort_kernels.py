"""ONNX Runtime CPU kernels that fxopt's lowering chooses between, timed alone:
a fused com.microsoft op against the standard ops it replaces, on the shapes of
the benchmark models (2 threads, spinning off, median of 200 runs).

    python benchmarks/ort_kernels.py      # writes benchmarks/results/ort_kernels.md

The ONNX lowering of ``fxopt.add_layer_norm`` (ir/ops_fused.py) follows this
table: ONNX Runtime 1.32's SkipLayerNormalization ran up to 4x slower than Add +
LayerNormalization on more than a few rows here. The GEMM table shows how
much an int8 GEMM gains over fp32 on the CPU it runs on (large on CPUs with
VNNI, small on AVX2 alone).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from fxopt.backends.onnxruntime import new_session, session_options

from common import captured, write_result

SHAPES = [(1, 768), (128, 256), (128, 768), (1376, 384)]  # one token; Llama; GPT-2 prefill; MiniLM 32x43
GELU_SHAPES = [(1, 3072), (128, 3072), (1376, 1536)]


def _session(nodes, inputs, initializers):
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    model = helper.make_model(helper.make_graph(nodes, "g", ins, out, initializers),
                              opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    # fxopt's own session: ONNX Runtime's SkipLayerNormFusion off, so "Add +
    # LayerNormalization" is timed as written.
    so = session_options(2, 1, "all", False)
    so.log_severity_level = 3
    return new_session(model.SerializeToString(), so)


def _time_us(session, feed, runs=200):
    for _ in range(10):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def norm_variants(h):
    g = numpy_helper.from_array(np.ones(h, np.float32), "g")
    b = numpy_helper.from_array(np.zeros(h, np.float32), "b")
    n = helper.make_node
    # Both forms also return the sum: the residual stream goes on.
    return {
        "Add + LayerNormalization": ([n("Add", ["x", "r"], ["s"]), n("LayerNormalization", ["s", "g", "b"], ["ln"], axis=-1, epsilon=1e-5),
                                      n("Add", ["ln", "s"], ["y"])], [g, b]),
        "SkipLayerNormalization": ([n("SkipLayerNormalization", ["x", "r", "g", "b"], ["ln", "", "", "s"], domain="com.microsoft", epsilon=1e-5),
                                    n("Add", ["ln", "s"], ["y"])], [g, b]),
        "Add + SimplifiedLayerNormalization": ([n("Add", ["x", "r"], ["s"]), n("SimplifiedLayerNormalization", ["s", "g"], ["ln"], axis=-1, epsilon=1e-5),
                                                n("Add", ["ln", "s"], ["y"])], [g]),
        "SkipSimplifiedLayerNormalization": ([n("SkipSimplifiedLayerNormalization", ["x", "r", "g"], ["ln", "", "", "s"], domain="com.microsoft", epsilon=1e-5),
                                              n("Add", ["ln", "s"], ["y"])], [g]),
    }


def gelu_variants(h):
    b = numpy_helper.from_array(np.random.default_rng(0).standard_normal(h).astype(np.float32), "b")
    n = helper.make_node
    return {
        "Add + Gelu (erf)": ([n("Add", ["x", "b"], ["s"]), n("Gelu", ["s"], ["y"])], [b]),
        "BiasGelu": ([n("BiasGelu", ["x", "b"], ["y"], domain="com.microsoft")], [b]),
        "Add + Gelu (tanh)": ([n("Add", ["x", "b"], ["s"]), n("Gelu", ["s"], ["y"], approximate="tanh")], [b]),
        "FastGelu": ([n("FastGelu", ["x", "b"], ["y"], domain="com.microsoft")], [b]),
    }


GEMM_SHAPES = [(1, 768, 3072), (128, 768, 3072), (1376, 384, 1536)]  # rows x in x out


def gemm_table():
    """fp32 MatMul against the int8 forms ONNX Runtime offers: U8S8 (what
    fxopt's per-tensor W8A8 lowers to: DynamicQuantizeLinear +
    MatMulIntegerToFloat, weight codes within +-63), U8U8 (uint8 weights with
    zero point 128: per-token W8A8's kernel) and 8-bit MatMulNBits (block 128,
    accuracy level 4: int8 compute)."""
    rng = np.random.default_rng(0)
    n = helper.make_node
    print("\nGEMM (weight constant, prepacked by ONNX Runtime), us and GMAC/s\n")
    print("| rows x in x out | fp32 MatMul | U8S8 MatMulIntegerToFloat | U8U8 MatMulIntegerToFloat | MatMulNBits 8-bit b128 |")
    print("|---|---|---|---|---|")
    for m, k, nout in GEMM_SHAPES:
        w = numpy_helper.from_array(rng.standard_normal((k, nout)).astype(np.float32), "w")
        wq = numpy_helper.from_array(rng.integers(-63, 64, (k, nout)).astype(np.int8), "wq")
        wu = numpy_helper.from_array(rng.integers(0, 256, (k, nout)).astype(np.uint8), "wu")
        wz = numpy_helper.from_array(np.full(nout, 128, np.uint8), "wz")
        ws = numpy_helper.from_array(np.full(nout, 0.01, np.float32), "ws")
        packed = numpy_helper.from_array(rng.integers(0, 256, (nout, k // 128, 128)).astype(np.uint8), "pb")
        nb_scales = numpy_helper.from_array(np.full(nout * (k // 128), 0.01, np.float32), "sc")
        quantize = n("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])
        feed = {"x": rng.standard_normal((1, m, k)).astype(np.float32)}
        times = [
            _time_us(_session([n("MatMul", ["x", "w"], ["y"])], ["x"], [w]), feed),
            _time_us(_session([quantize, n("MatMulIntegerToFloat", ["q", "wq", "s", "ws", "z"], ["y"], domain="com.microsoft")],
                              ["x"], [wq, ws]), feed),
            _time_us(_session([quantize, n("MatMulIntegerToFloat", ["q", "wu", "s", "ws", "z", "wz"], ["y"], domain="com.microsoft")],
                              ["x"], [wu, ws, wz]), feed),
            _time_us(_session([n("MatMulNBits", ["x", "pb", "sc"], ["y"], domain="com.microsoft", K=k, N=nout, bits=8,
                                 block_size=128, accuracy_level=4)], ["x"], [packed, nb_scales]), feed),
        ]
        macs = m * k * nout / 1e3  # per us -> GMAC/s
        print(f"| {m} x {k} x {nout} | " + " | ".join(f"{t:.0f} ({macs / t:.0f})" for t in times) + " |")


def table(title, shapes, variants, inputs):
    rng = np.random.default_rng(0)
    names = list(variants(shapes[0][1]))
    print(f"\n{title}\n\n| rows x width | " + " | ".join(f"{v} (us)" for v in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for rows, width in shapes:
        feed = {i: rng.standard_normal((1, rows, width)).astype(np.float32) for i in inputs}
        cells = [f"{_time_us(_session(nodes, inputs, inits), feed):.0f}" for nodes, inits in variants(width).values()]
        print(f"| {rows} x {width} | " + " | ".join(cells) + " |")


def main():
    with captured() as out:
        print(f"ONNX Runtime {ort.__version__}, CPU, 2 threads, median of 200 runs")
        table("Residual add + norm", SHAPES, norm_variants, ["x", "r"])
        table("Bias + GELU", GELU_SHAPES, gelu_variants, ["x"])
        gemm_table()
    write_result("ort_kernels", "ONNX Runtime kernels, timed alone", out.text)


if __name__ == "__main__":
    main()
