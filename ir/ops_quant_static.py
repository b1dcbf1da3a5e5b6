"""Static W8A8 linear: int8 weights and int8 activations whose scale and zero
point were fixed by calibration (:mod:`fxopt.passes.quantize.calibration`).

Activations use the same unsigned 7-bit grid as dynamic W8A8
(:data:`fxopt.ir.ops_quant.ACT_QMAX`, ``reduce_range``: on CPUs without VNNI
the u8 x s8 multiply-add saturates int16 with 8-bit activations). The
calibrated range maps to ``0..127`` and values beyond it are clamped to it:
fbgemm given codes above 127 saturates and returns wrong results
(docs/kernels.md), so inputs are clipped before the kernel, and the ONNX
lowering clips the same way.

Eager: fbgemm's ``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``
on the prepacked weight dynamic W8A8 uses too (docs/kernels.md for why).

ONNX: QuantizeLinear -> DequantizeLinear on the activation and
DequantizeLinear (per output channel) on the int8 weight around a float
MatMul — the QDQ form ONNX Runtime's graph optimizer fuses into an integer
matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnxscript import opset18 as op

from .ops import define_op
from .ops_quant import ACT_QMAX, packed_weight

def static_act_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point mapping a calibrated ``[lo, hi]`` (``lo <= 0 <= hi``)
    onto ``0..ACT_QMAX``."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / ACT_QMAX
    if not scale > 0:
        return 1.0, 0
    return float(scale), int(min(ACT_QMAX, max(0, round(-lo / scale))))


def act_bounds(x_scale: float, x_zero_point: int) -> tuple[float, float]:
    """The float range codes ``0..ACT_QMAX`` stand for."""
    return -x_zero_point * x_scale, (ACT_QMAX - x_zero_point) * x_scale


def fake_quantize_activation(x: torch.Tensor, x_scale: float, x_zero_point: int) -> torch.Tensor:
    return (torch.clamp(torch.round(x / x_scale) + x_zero_point, 0, ACT_QMAX) - x_zero_point) * x_scale


def linear_static_reference(x, w_q, w_scale, bias, x_scale: float, x_zero_point: int):
    """What ``linear_static_int8`` computes, in float: the definition tests compare with."""
    return F.linear(fake_quantize_activation(x, x_scale, x_zero_point), w_q.to(torch.float32) * w_scale[:, None], bias)


def _linear_static_fake(x, w_q, w_scale, bias, x_scale, x_zero_point):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


def _linear_static_onnx(x, w_q, w_scale, bias=None, x_scale: float = 1.0, x_zero_point: int = 0):
    scale = op.CastLike(x_scale, x)
    zp = op.Cast(x_zero_point, to=2)  # uint8
    lo, hi = act_bounds(x_scale, x_zero_point)
    x = op.Clip(x, op.CastLike(lo, x), op.CastLike(hi, x))
    xq = op.DequantizeLinear(op.QuantizeLinear(x, scale, zp), scale, zp)
    # The transpose of the constant int8 weight is folded into the initializer.
    wq = op.DequantizeLinear(op.Transpose(w_q, perm=[1, 0]), w_scale, axis=1)
    y = op.MatMul(xq, wq)
    return y if bias is None else op.Add(y, bias)


@define_op("linear_static_int8", fake=_linear_static_fake, onnx=_linear_static_onnx, onnx_float32=True)
def linear_static_int8(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, x_scale: float, x_zero_point: int
) -> torch.Tensor:
    """Static W8A8 linear: ``w_q`` int8 ``[N, K]`` with symmetric
    per-output-channel ``w_scale [N]``; ``x`` quantized to uint8 with the
    calibrated ``x_scale`` / ``x_zero_point`` (see
    :func:`linear_static_reference`). Eager runs fbgemm's prepacked
    static-input linear; ONNX lowers to QuantizeLinear/DequantizeLinear around
    MatMul (QDQ)."""
    if x.dtype != torch.float32:
        return linear_static_int8(x.float(), w_q, w_scale, None if bias is None else bias.float(), x_scale, x_zero_point).to(x.dtype)
    shape = x.shape
    lo, hi = act_bounds(x_scale, x_zero_point)
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        x.reshape(-1, shape[-1]).clamp(lo, hi), x_scale, x_zero_point, packed_weight(w_q, w_scale)
    )
    y = y.reshape(*shape[:-1], w_q.shape[0])
    return y if bias is None else y + bias
