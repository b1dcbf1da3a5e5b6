"""Quantized linear ops: eager CPU kernels and ONNX Runtime lowerings.

* ``fxopt::linear_dynamic_int8(x, w_q, w_scale, bias)``: dynamic W8A8 with
  one activation scale per call. ``w_q`` int8 ``[N, K]`` symmetric codes within
  +-63 (:data:`DYNAMIC_W_QMAX`), ``w_scale`` float32 ``[N]``; ``x`` quantized
  at run time to 8-bit codes (:func:`act_qparams`). Eager: fbgemm's prepacked
  ``quantized::linear_dynamic``; ONNX: DynamicQuantizeLinear +
  MatMulIntegerToFloat.
* ``fxopt::linear_dynamic_int8_per_token(x, w_u8, w_scale, w_rowsum, bias)``:
  dynamic W8A8 with a scale and zero point per row of ``x``
  (:func:`token_act_qparams`). ``w_u8`` the int8 codes + 128 as uint8,
  ``w_rowsum[n] = sum_k(q[n, k]) * w_scale[n]``, which takes the activation zero
  point out after a zero-point-free GEMM. Eager: the activation rounded onto
  its integer grid in float, then ``F.linear`` with a cached dequantized weight;
  ONNX: MatMulIntegerToFloat on uint8 weights (MLAS's exact U8U8 kernel).
* ``fxopt::linear_nbits(x, B, scales, zero_points, bias, K, N, bits,
  block_size, accuracy_level)``: weight-only 4/8-bit in MatMulNBits form
  (:func:`fxopt.ir.quant.to_nbits`). Eager: unpack, dequantize, ``F.linear``;
  ONNX: com.microsoft MatMulNBits.

Every op returns ``x``'s dtype and shape with the last dimension ``N``, and
equals ``F.linear(x, dequantized weight, bias)`` up to the activation rounding.
Why these kernels (saturation of the u8 x s8 multiply-add without VNNI, which
side gets 7 bits, the speed of each candidate): docs/kernels.md.
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F
from onnxscript import opset18 as op

from .onnx_contrib import msft
from .ops import define_op
from .quant import nbits_dequantize

# -- weight-only: MatMulNBits ----------------------------------------------------


def _linear_nbits_fake(x, B, scales, zero_points, bias, K, N, bits, block_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], N))


def linear_nbits_onnx(x, B, scales, zero_points=None, bias=None, K: int = 0, N: int = 0, bits: int = 4,
                       block_size: int = 128, accuracy_level: int = 0):
    # MatMulNBits adds the bias itself (its optional input 5, after g_idx),
    # so no separate Add pass over the output.
    return msft.MatMulNBits(x, B, scales, zero_points, None, bias, K=K, N=N, bits=bits, block_size=block_size,
                            accuracy_level=accuracy_level)


@define_op("linear_nbits", fake=_linear_nbits_fake, onnx=linear_nbits_onnx, onnx_float32=True)
def linear_nbits(
    x: torch.Tensor, B: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, bias: torch.Tensor | None,
    K: int, N: int, bits: int, block_size: int, accuracy_level: int,
) -> torch.Tensor:
    """Weight-only quantized linear ``x @ W.T + bias`` with ``W`` stored in
    ONNX Runtime's MatMulNBits form (4 or 8 bits, blocks along K; see
    :mod:`fxopt.ir.quant`). Lowers to ``com.microsoft::MatMulNBits``;
    ``accuracy_level`` 4 lets ONNX Runtime quantize ``x`` to int8 inside the
    kernel. Eager dequantizes and runs ``F.linear`` (always exact)."""
    w = nbits_dequantize(B, scales, zero_points, K, N, bits, block_size)
    return F.linear(x, w.to(x.dtype), bias)


# -- dynamic W8A8 ------------------------------------------------------------------

ACT_QMAX = 127  # 7-bit activations of static W8A8 (8-bit weights): see ops_quant_static
DYNAMIC_ACT_QMAX = 255  # dynamic per-tensor W8A8: 8-bit activations ...
DYNAMIC_W_QMAX = 63  # ... with weight codes within +-63: see the module docstring

# fbgemm's packed weights are not tensors; they live here, keyed by the
# identity of the int8 weight and bias tensors, so the graph itself keeps plain
# tensors (it still re-exports and saves) and each weight is packed once per
# process. The bias goes into the packed weight, so fbgemm adds it in the GEMM
# epilogue (as torch.ao's dynamic linear does).
_PACKED: dict[tuple[int, int], tuple[weakref.ref, int, object]] = {}


def _version(t: torch.Tensor) -> int:
    """``t``'s in-place write counter; inference tensors (weights made inside
    ``torch.inference_mode()``) keep none, and cannot be written outside it."""
    return 0 if t.is_inference() else t._version


def packed_weight(w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None, check=None):
    """fbgemm's prepacked form of int8 ``w_q [N, K]`` with per-channel
    ``w_scale`` (and ``bias``), packed once per weight and bias tensor while
    ``w_q`` lives and is not written; ``check(w_q)`` runs before a new packing."""
    key = (id(w_q), id(bias))
    hit = _PACKED.get(key)
    if hit is not None and hit[0]() is w_q and hit[1] == _version(w_q):
        return hit[2]
    if check is not None:
        check(w_q)
    n = w_q.shape[0]
    with warnings.catch_warnings():  # quantized dtypes are deprecated; fbgemm's packing still takes them
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(w_q, w_scale.to(torch.float64), torch.zeros(n, dtype=torch.int64), 0)
        packed = torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float().contiguous())
    _PACKED[key] = (weakref.ref(w_q, lambda _r, k=key: _PACKED.pop(k, None)), _version(w_q), packed)
    return packed


def packed_weight_count() -> int:
    """How many packed weights the cache holds."""
    return len(_PACKED)


def act_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor activation scale and zero point mapping the range of ``x``,
    widened to hold 0, onto ``0..255`` (ONNX's DynamicQuantizeLinear)."""
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = torch.clamp((hi - lo) / DYNAMIC_ACT_QMAX, min=torch.finfo(torch.float32).eps)
    zp = torch.clamp(torch.round(-lo / scale), 0, DYNAMIC_ACT_QMAX)
    return scale, zp


def linear_dynamic_reference(x, w_q, w_scale, bias):
    """What ``linear_dynamic_int8`` computes, in float: the definition tests compare with."""
    scale, zp = act_qparams(x)
    xq = (torch.clamp(torch.round(x / scale) + zp, 0, DYNAMIC_ACT_QMAX) - zp) * scale
    return F.linear(xq, w_q.to(torch.float32) * w_scale[:, None], bias)


def check_dynamic_weight(w_q: torch.Tensor) -> None:
    """The kernels' contract (module docstring): codes within +-63."""
    if w_q.dtype != torch.int8 or int(w_q.abs().max()) > DYNAMIC_W_QMAX:
        raise ValueError(f"linear_dynamic_int8 takes int8 weight codes within +-{DYNAMIC_W_QMAX} (8-bit activations "
                         f"would saturate the int8 kernels otherwise); got {w_q.dtype} codes up to {int(w_q.abs().max())}")


def _linear_dynamic_fake(x, w_q, w_scale, bias):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


def linear_dynamic_onnx(x, w_q, w_scale, bias=None):
    xq, scale, zp = op.DynamicQuantizeLinear(x)
    # The transpose of the constant weight is folded into the initializer.
    return msft.MatMulIntegerToFloat(xq, op.Transpose(w_q, perm=[1, 0]), scale, w_scale, zp, None, bias)


@define_op("linear_dynamic_int8", fake=_linear_dynamic_fake, onnx=linear_dynamic_onnx, onnx_float32=True)
def linear_dynamic_int8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Dynamic W8A8 linear: ``w_q`` int8 ``[N, K]`` codes within +-63 with
    per-output-channel ``w_scale [N]`` (symmetric); ``x`` is quantized at run
    time per tensor to 8-bit unsigned codes with a zero point (see
    :func:`linear_dynamic_reference`). Eager runs fbgemm's prepacked dynamic
    linear; ONNX lowers to DynamicQuantizeLinear +
    ``com.microsoft::MatMulIntegerToFloat``."""
    if x.dtype != torch.float32:
        # the bias as it is: the packed weight holds a float32 copy, cached
        # under this tensor's identity (a fresh .float() each call would
        # repack and cache the weight again on every call)
        return linear_dynamic_int8(x.float(), w_q, w_scale, bias).to(x.dtype)
    return torch.ops.quantized.linear_dynamic(x.contiguous(), packed_weight(w_q, w_scale, bias, check_dynamic_weight), False)


# -- dynamic W8A8, per-token activations ---------------------------------------------

TOKEN_QMAX = 255  # full 8-bit codes: the U8U8 kernel does not saturate
W_ZERO_POINT = 128  # int8 weight codes stored as uint8 (+128) for the U8U8 kernel

# Dequantized float weights for the eager per-token kernel, keyed like _PACKED.
_DEQUANTIZED: dict[tuple[int, int], tuple[weakref.ref, int, torch.Tensor]] = {}


def _dequantized(w_u8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    key = (id(w_u8), id(w_scale))
    hit = _DEQUANTIZED.get(key)
    if hit is not None and hit[0]() is w_u8 and hit[1] == _version(w_u8) + _version(w_scale):
        return hit[2]
    w = (w_u8.to(torch.float32) - W_ZERO_POINT) * w_scale.to(torch.float32)[:, None]
    _DEQUANTIZED[key] = (weakref.ref(w_u8, lambda _r, k=key: _DEQUANTIZED.pop(k, None)), _version(w_u8) + _version(w_scale), w)
    return w


def token_act_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last axis) scale and zero point ``[..., 1]`` mapping each
    row's range, widened to hold 0, onto ``0..255``."""
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / TOKEN_QMAX, min=torch.finfo(torch.float32).eps)
    zp = torch.clamp(torch.round(-lo / scale), 0, TOKEN_QMAX)
    return scale, zp


def _token_codes(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale) + zp, 0, TOKEN_QMAX)


def weight_to_uint8(w_q: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 weight codes as the uint8 codes (zero point 128) the
    per-token op stores."""
    return (w_q.to(torch.int16) + W_ZERO_POINT).to(torch.uint8)


def linear_dynamic_per_token_reference(x, w_q, w_scale, bias):
    """What ``linear_dynamic_int8_per_token`` computes, in float, from the
    symmetric int8 weight codes ``w_q [N, K]`` and ``w_scale [N]``: the
    definition tests compare with."""
    scale, zp = token_act_qparams(x)
    xq = (_token_codes(x, scale, zp) - zp) * scale
    return F.linear(xq, w_q.to(torch.float32) * w_scale[:, None], bias)


def _linear_per_token_fake(x, w_u8, w_scale, w_rowsum, bias):
    return x.new_empty((*x.shape[:-1], w_u8.shape[0]))


def linear_per_token_onnx(x, w_u8, w_scale, w_rowsum, bias=None):
    zero = op.CastLike(0.0, x)
    qmax = op.CastLike(float(TOKEN_QMAX), x)
    last = op.Constant(value_ints=[-1])
    lo = op.Min(op.ReduceMin(x, last, keepdims=1), zero)
    hi = op.Max(op.ReduceMax(x, last, keepdims=1), zero)
    scale = op.Max(op.Div(op.Sub(hi, lo), qmax), op.CastLike(1.1920928955078125e-07, x))
    zp = op.Clip(op.Round(op.Div(op.Neg(lo), scale)), zero, qmax)
    # Round, like torch.round, rounds halves to even: the codes match eager's.
    xq = op.Cast(op.Clip(op.Add(op.Round(op.Div(x, scale)), zp), zero, qmax), to=2)  # uint8
    w_zp = op.Cast(op.Constant(value_int=W_ZERO_POINT), to=2)
    # a_scale [..., 1] times b_scale [N] scales each row; the transpose of the
    # constant weight is folded into the initializer. The bias is added
    # separately: with a non-scalar a_scale, ONNX Runtime (1.32) multiplies its
    # bias input by a_scale too.
    y = msft.MatMulIntegerToFloat(xq, op.Transpose(w_u8, perm=[1, 0]), scale, w_scale, None, w_zp)
    y = op.Sub(y, op.Mul(op.Mul(scale, zp), w_rowsum))
    return y if bias is None else op.Add(y, bias)


@define_op("linear_dynamic_int8_per_token", fake=_linear_per_token_fake, onnx=linear_per_token_onnx, onnx_float32=True)
def linear_dynamic_int8_per_token(
    x: torch.Tensor, w_u8: torch.Tensor, w_scale: torch.Tensor, w_rowsum: torch.Tensor, bias: torch.Tensor | None,
) -> torch.Tensor:
    """Dynamic W8A8 linear with per-token activations: ``x`` is quantized at
    run time to 8-bit unsigned codes with one scale and zero point per row
    (:func:`token_act_qparams`); the weight is symmetric int8 per output
    channel, stored as ``w_u8 = w_q + 128`` (uint8 ``[N, K]``) with
    ``w_scale [N]``; ``w_rowsum [N]`` is the dequantized weight's row sum
    (it removes the activation zero point after the GEMM on ONNX Runtime).
    Definition: :func:`linear_dynamic_per_token_reference`. ONNX lowers to the
    row quantization + ``com.microsoft::MatMulIntegerToFloat`` (U8U8) + the
    zero-point correction; eager runs the same grid in float, about as fast as
    fp32 and slower than torch.ao's per-tensor ``quantize_dynamic`` (a fast
    fbgemm variant lost too much accuracy: see the module docstring)."""
    if x.dtype != torch.float32:
        out = linear_dynamic_int8_per_token(x.float(), w_u8, w_scale, w_rowsum, None if bias is None else bias.float())
        return out.to(x.dtype)
    scale, zp = token_act_qparams(x)
    # clamp(round(x / s) + zp, 0, 255) - zp in one clamp: zp is an integer, so
    # the codes are the reference's, with two passes over x fewer.
    xq = torch.clamp(torch.round(x / scale), min=-zp, max=TOKEN_QMAX - zp).mul_(scale)
    return F.linear(xq, _dequantized(w_u8, w_scale), bias)
