"""Which int8/int4 linear kernel to use: one linear layer, each candidate kernel
timed against fp32 on the same backend in the same run, plus its error against
the exact result of the same quantized arithmetic (saturation shows up here).

    python benchmarks/quant_kernels.py [--quick] [--shape 3072x768] [--threads 2]

Writes ``benchmarks/results/quant_kernels.md``. These measurements chose the
kernels in ``fxopt/ir/ops_quant.py``.
"""

from __future__ import annotations

import argparse
import os
import warnings

import onnxruntime as ort
import torch
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from fxopt.ir import timing

from common import write_result  # noqa: E402


def median_ms(fn, repeat):
    return timing.median_ms(fn, repeat=repeat)


def session(nodes, inits, k, threads):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("X", TP.FLOAT, [None, k])],
                     [h.make_tensor_value_info("Y", TP.FLOAT, None)], initializer=inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shape", default="3072x768", help="N x K of the linear")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    repeat = 10 if args.quick else 50
    n, k = map(int, args.shape.split("x"))
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.05
    w_scale = w.abs().amax(1) / 127
    w_q = torch.round(w / w_scale[:, None]).to(torch.int8)
    w_deq = w_q.float() * w_scale[:, None]
    from fxopt.ir.ops_quant import linear_dynamic_reference, packed_weight
    from fxopt.ir.quant import QuantConfig, quantize, to_nbits

    packed = packed_weight(w_q, w_scale)
    rows = []
    for m in (1, 128):
        x = torch.randn(m, k)
        exact_dyn = linear_dynamic_reference(x, w_q, w_scale, None)
        x_s = x.abs().amax(-1, keepdim=True) / 127
        x_q = torch.round(x / x_s).to(torch.int8)
        exact_tok = (x_q.float() * x_s) @ w_deq.T

        def err(y, ref):
            return float((torch.as_tensor(y) - ref).abs().max() / ref.abs().max())

        base = median_ms(lambda: torch.nn.functional.linear(x, w), repeat)
        torch_rows = [
            ("torch fbgemm linear_dynamic, 7-bit act (fxopt eager W8A8)", lambda: torch.ops.quantized.linear_dynamic(x, packed, True), exact_dyn),
            ("torch fbgemm linear_dynamic, 8-bit act", lambda: torch.ops.quantized.linear_dynamic(x, packed, False), act8_reference(x, w_deq)),
            ("torch._int_mm per-token, weight as transposed view", lambda: torch._int_mm(x_q, w_q.t()).float() * (x_s * w_scale), exact_tok),
            ("torch._weight_int8pack_mm (weight-only int8)", lambda: torch._weight_int8pack_mm(x, w_q, w_scale), x @ w_deq.T),
            ("dequantize + F.linear (weight-only, fxopt eager)", lambda: torch.nn.functional.linear(x, w_q.float() * w_scale[:, None]), x @ w_deq.T),
        ]
        for name, fn, ref in torch_rows:
            t = median_ms(fn, repeat)
            rows.append((m, "torch", name, t / base, err(fn(), ref)))
        # ONNX Runtime
        xn = x.numpy()
        s = session([h.make_node("MatMul", ["X", "Wt"], ["Y"])], [nh.from_array(w.T.contiguous().numpy(), "Wt")], k, args.threads)
        ort_base = median_ms(lambda: s.run(None, {"X": xn}), repeat)
        wq_t = nh.from_array(w_q.T.contiguous().numpy(), "Bq")
        bs = nh.from_array(w_scale.numpy(), "bs")
        candidates = {
            "ORT DynamicQuantizeMatMul (8-bit act)": ([h.make_node("DynamicQuantizeMatMul", ["X", "Bq", "bs"], ["Y"], domain="com.microsoft")], [wq_t, bs], act8_reference(x, w_deq)),
            "ORT QuantizeLinear 7-bit + MatMulIntegerToFloat (fxopt ORT W8A8)": (None, None, exact_dyn),
        }
        for name, (nodes, inits, ref) in candidates.items():
            if nodes is None:
                import fxopt
                from fxopt.backends.onnxruntime import export_onnx_program

                class L(torch.nn.Module):
                    def forward(self, x):
                        return torch.ops.fxopt.linear_dynamic_int8(x, w_q, w_scale, None)

                prog = export_onnx_program(fxopt.trace(L(), (x,)))
                so = ort.SessionOptions()
                so.intra_op_num_threads = args.threads
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
                s = ort.InferenceSession(prog.model_proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
                feed = {s.get_inputs()[0].name: xn}
            else:
                s = session(nodes, inits, k, args.threads)
                feed = {"X": xn}
            t = median_ms(lambda: s.run(None, feed), repeat)
            rows.append((m, "onnxruntime", name, t / ort_base, err(s.run(None, feed)[0], ref)))
        for bits, level in ((4, 0), (4, 4), (8, 4)):
            qt = quantize(w, QuantConfig(bits, "asym", "group", 128))
            nb = to_nbits(qt)
            node = h.make_node("MatMulNBits", ["X", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                               block_size=nb.block_size, accuracy_level=level)
            s = session([node], [nh.from_array(nb.B.numpy(), "B"), nh.from_array(nb.scales.numpy(), "S"), nh.from_array(nb.zero_points.numpy(), "Z")], k, args.threads)
            t = median_ms(lambda: s.run(None, {"X": xn}), repeat)
            rows.append((m, "onnxruntime", f"ORT MatMulNBits {bits}-bit g128 asym, accuracy level {level}", t / ort_base,
                         err(s.run(None, {"X": xn})[0], x @ qt.dequantize().T)))
    lines = ["| rows | backend | kernel | time / fp32 same backend | max err / output scale |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {b} | {name} | {r:.2f} | {e:.2g} |" for m, b, name, r, e in rows]
    table = "\n".join(lines)
    print(table)
    write_result("quant_kernels", "Quantized linear kernels, one linear", section=f"{n}x{k}", body=(
        f"Median of {repeat} runs; CPU capability {torch.backends.cpu.get_cpu_capability()}. "
        "The error column is against the exact result of the same quantized arithmetic "
        "(8-bit activations on a CPU without VNNI saturate int16 sums).\n\n" + table))


def act8_reference(x, w_deq):
    """Per-tensor 8-bit asymmetric activations, exact integer sums, in float."""
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / 255
    zp = round(-lo / scale)
    return ((torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale) @ w_deq.T


if __name__ == "__main__":
    main()
