"""Quantized linears fused with the activation that follows them.

``fuse-linear-act`` produces these from a quantized linear whose only user is
an activation (and ``quantize`` re-fuses into them when it quantizes an
``fxopt.linear_act``):

* ``fxopt::linear_nbits_act(x, B, scales, zero_points, bias, K, N, bits,
  block_size, accuracy_level, activation)``: ``fxopt::linear_nbits`` then the
  activation;
* ``fxopt::linear_dynamic_int8_act(x, w_q, w_scale, bias, activation)``:
  ``fxopt::linear_dynamic_int8`` then the activation;
* ``fxopt::linear_dynamic_int8_per_token_act(x, w_u8, w_scale, w_rowsum, bias,
  activation)``: ``fxopt::linear_dynamic_int8_per_token`` then the activation.

``activation`` is one of :data:`fxopt.ir.ops.ACTIVATIONS` (as for
``fxopt::linear_act``).

Eager: the quantized kernel, then the activation on its output. ONNX Runtime:
the quantized matmul adds the bias itself (MatMulNBits' optional ``bias``
input, MatMulIntegerToFloat's ``bias``), then one com.microsoft activation
kernel: ``Gelu`` (exact), ``FastGelu`` (tanh), ``QuickGelu`` with
``alpha=1`` (SiLU: ``x * sigmoid(x)``) or ``Relu`` (why not BiasGelu:
docs/kernels.md).
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op

from .onnx_contrib import FLOAT_TYPES, Attr, AttrType, Param, declare, msft
from .ops import ACTIVATIONS, QUICK_GELU_ALPHA, define_op
from .ops_quant import linear_dynamic_onnx, linear_nbits_onnx, linear_per_token_onnx

declare("Gelu", [Param("X", "T")], [Param("Y", "T")], [("T", FLOAT_TYPES, "")])
declare(
    "QuickGelu", [Param("X", "T")], [Param("Y", "T")], [("T", FLOAT_TYPES, "")],
    [Attr("alpha", AttrType.FLOAT, "Y = X * sigmoid(alpha * X)", required=False)],
)


def _activation(op_name: str, activation: str):
    fn = ACTIVATIONS.get(activation)
    if fn is None or activation == "none":
        raise ValueError(f"fxopt::{op_name}: unknown activation {activation!r}; valid: {sorted(set(ACTIVATIONS) - {'none'})}")
    return fn


def activation_onnx(y, activation: str):
    """One ONNX Runtime kernel for ``activation(y)`` (the bias already added)."""
    if activation == "gelu":
        return msft.Gelu(y)
    if activation == "gelu_tanh":
        return msft.FastGelu(y)
    if activation == "silu":
        return msft.QuickGelu(y, alpha=1.0)
    if activation == "quick_gelu":
        return msft.QuickGelu(y, alpha=QUICK_GELU_ALPHA)
    if activation == "relu":
        return op.Relu(y)
    raise ValueError(f"no ONNX lowering for activation {activation!r}")


# -- weight-only (MatMulNBits) + activation -----------------------------------------

def _linear_nbits_act_fake(x, B, scales, zero_points, bias, K, N, bits, block_size, accuracy_level, activation):
    return x.new_empty((*x.shape[:-1], N))


def _linear_nbits_act_onnx(x, B, scales, zero_points=None, bias=None, K: int = 0, N: int = 0, bits: int = 4,
                           block_size: int = 128, accuracy_level: int = 0, activation: str = "gelu"):
    y = linear_nbits_onnx(x, B, scales, zero_points, bias, K=K, N=N, bits=bits, block_size=block_size,
                           accuracy_level=accuracy_level)
    return activation_onnx(y, activation)


@define_op("linear_nbits_act", fake=_linear_nbits_act_fake, onnx=_linear_nbits_act_onnx, onnx_float32=True)
def linear_nbits_act(
    x: torch.Tensor, B: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, bias: torch.Tensor | None,
    K: int, N: int, bits: int, block_size: int, accuracy_level: int, activation: str,
) -> torch.Tensor:
    """``activation(linear_nbits(...))``: a weight-only 4/8-bit linear and its
    activation. Lowers to com.microsoft MatMulNBits (bias as its input) and
    Gelu / FastGelu / QuickGelu / Relu."""
    act = _activation("linear_nbits_act", activation)
    return act(torch.ops.fxopt.linear_nbits(x, B, scales, zero_points, bias, K, N, bits, block_size, accuracy_level))


# -- dynamic W8A8 (MatMulIntegerToFloat) + activation -------------------------------

def _linear_dynamic_int8_act_fake(x, w_q, w_scale, bias, activation):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


def _linear_dynamic_int8_act_onnx(x, w_q, w_scale, bias=None, activation: str = "gelu"):
    return activation_onnx(linear_dynamic_onnx(x, w_q, w_scale, bias), activation)


@define_op("linear_dynamic_int8_act", fake=_linear_dynamic_int8_act_fake, onnx=_linear_dynamic_int8_act_onnx, onnx_float32=True)
def linear_dynamic_int8_act(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> torch.Tensor:
    """``activation(linear_dynamic_int8(...))``: a dynamic W8A8 linear (bias in
    fbgemm's epilogue) and its activation. Lowers to DynamicQuantizeLinear +
    com.microsoft MatMulIntegerToFloat (with bias) and Gelu / FastGelu /
    QuickGelu / Relu."""
    act = _activation("linear_dynamic_int8_act", activation)
    return act(torch.ops.fxopt.linear_dynamic_int8(x, w_q, w_scale, bias))


# -- dynamic W8A8, per-token activations + activation -------------------------------

def _linear_per_token_act_fake(x, w_u8, w_scale, w_rowsum, bias, activation):
    return x.new_empty((*x.shape[:-1], w_u8.shape[0]))


def _linear_per_token_act_onnx(x, w_u8, w_scale, w_rowsum, bias=None, activation: str = "gelu"):
    return activation_onnx(linear_per_token_onnx(x, w_u8, w_scale, w_rowsum, bias), activation)


@define_op("linear_dynamic_int8_per_token_act", fake=_linear_per_token_act_fake, onnx=_linear_per_token_act_onnx, onnx_float32=True)
def linear_dynamic_int8_per_token_act(
    x: torch.Tensor, w_u8: torch.Tensor, w_scale: torch.Tensor, w_rowsum: torch.Tensor, bias: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """``activation(linear_dynamic_int8_per_token(...))``: a per-token dynamic
    W8A8 linear and its activation. Lowers to the per-row quantization +
    com.microsoft MatMulIntegerToFloat (with bias) + the zero-point
    correction, then Gelu / FastGelu / QuickGelu / Relu."""
    act = _activation("linear_dynamic_int8_per_token_act", activation)
    return act(torch.ops.fxopt.linear_dynamic_int8_per_token(x, w_u8, w_scale, w_rowsum, bias))
