"""fxopt's own operators and the one table that knows how to lower them.

An fxopt op is a ``torch.library`` custom op in the ``fxopt`` namespace with
three parts, all declared in one call to :func:`define_op`:

* the eager kernel (the Python function itself) that the eager backend runs,
* a fake kernel that gives shape and dtype without computing (tracing, metadata),
* an ONNX lowering, an onnxscript-traceable function that the ONNX Runtime
  backend hands to ``torch.onnx.export(custom_translation_table=...)``.

Passes create these ops; the backends consult :func:`onnx_translation_table`.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from onnxscript import opset18 as op

from .onnx_contrib import msft

NAMESPACE = "fxopt"


@dataclass(frozen=True)
class OpDef:
    name: str
    overload: torch._ops.OpOverload
    onnx: Callable | None
    doc: str
    kernel: Callable  # the eager kernel as a plain function, without the op's dispatch


_REGISTRY: dict[str, OpDef] = {}


def _is_other_float(value) -> bool:
    """A symbolic ONNX value of a floating type other than float32."""
    dtype = getattr(value, "dtype", None)
    return dtype is not None and dtype.is_floating_point() and int(dtype) != 1  # 1: FLOAT


def float32_lowering(fn: Callable) -> Callable:
    """An ONNX lowering whose kernels take float32 only (DynamicQuantizeLinear,
    MatMulIntegerToFloat, MatMulNBits with float32 scales), made to take a
    float16 / bfloat16 / double model too: such inputs are cast to float32 and
    the result back to the type of the first input, as the eager kernels do.
    A float32 graph gets no Cast."""

    @functools.wraps(fn)
    def lowering(x, *args, **kwargs):
        if not _is_other_float(x):
            return fn(x, *args, **kwargs)

        def to_float(a):
            return op.Cast(a, to=1) if _is_other_float(a) else a

        out = fn(to_float(x), *map(to_float, args), **{k: to_float(v) for k, v in kwargs.items()})
        return op.Cast(out, to=int(x.dtype))

    return lowering


def define_op(name: str, *, fake: Callable, onnx: Callable | None = None, onnx_float32: bool = False):
    """Decorator: register ``fn`` as the eager kernel of ``fxopt::name``;
    ``onnx_float32``: the lowering runs in float32 (:func:`float32_lowering`)."""

    def wrap(fn: Callable) -> torch._ops.OpOverload:
        if name in _REGISTRY:
            raise ValueError(f"fxopt op {name!r} is already defined")
        custom = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())(fn)
        custom.register_fake(fake)
        overload = getattr(getattr(torch.ops, NAMESPACE), name).default
        lowering = float32_lowering(onnx) if onnx is not None and onnx_float32 else onnx
        _REGISTRY[name] = OpDef(name, overload, lowering, (fn.__doc__ or "").strip(), fn)
        # The decorated name becomes the op: the kernel gets a module-level name
        # of its own, which code calling it directly (the eager backend's) names.
        fn.__name__ = fn.__qualname__ = f"{fn.__name__}_kernel"
        setattr(sys.modules[fn.__module__], fn.__name__, fn)
        return overload

    return wrap


def is_fxopt_op(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace == NAMESPACE


def registered_ops() -> dict[str, OpDef]:
    return dict(_REGISTRY)


# Lowerings of aten ops that replace the exporter's generic ones (e.g. SDPA ->
# com.microsoft.MultiHeadAttention), by group name so a backend can turn one off.
_ATEN_LOWERINGS: dict[torch._ops.OpOverload, tuple[str, Callable]] = {}


def register_onnx_lowering(overload: torch._ops.OpOverload, fn: Callable, *, group: str) -> None:
    """Lower ``overload`` (an aten op) with ``fn`` instead of the exporter's default."""
    if overload in _ATEN_LOWERINGS:
        raise ValueError(f"{overload} already has an ONNX lowering ({_ATEN_LOWERINGS[overload][0]})")
    _ATEN_LOWERINGS[overload] = (group, fn)


def onnx_lowering_groups() -> list[str]:
    return sorted({g for g, _ in _ATEN_LOWERINGS.values()})


def onnx_translation_table(disable: tuple[str, ...] | list[str] = ()) -> dict[torch._ops.OpOverload, Callable]:
    """fxopt ops' lowerings plus the aten lowerings whose group is not in ``disable``."""
    unknown = sorted(set(disable) - set(onnx_lowering_groups()))
    if unknown:
        raise ValueError(f"unknown ONNX lowering group(s) {unknown}; known: {onnx_lowering_groups()}")
    table = {ov: fn for ov, (g, fn) in _ATEN_LOWERINGS.items() if g not in disable}
    table.update({d.overload: d.onnx for d in _REGISTRY.values() if d.onnx is not None})
    return table


# --------------------------------------------------------------------------
# linear + bias + activation

QUICK_GELU_ALPHA = 1.702  # CLIP's QuickGELU: t * sigmoid(1.702 t)

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda t: t,
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": lambda t: t * torch.sigmoid(QUICK_GELU_ALPHA * t),
}


def _linear_act_fake(x, weight, bias, activation):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_act_onnx(x, weight, bias=None, activation: str = "none"):
    # The transpose of a constant weight is folded into the initializer by the
    # exporter's optimizer, leaving a plain MatMul that MLAS runs.
    y = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    if activation == "gelu" and bias is not None:
        return msft.BiasGelu(y, bias)
    if activation == "gelu_tanh":
        return msft.FastGelu(y, bias) if bias is not None else msft.FastGelu(y)
    if bias is not None:
        y = op.Add(y, bias)
    if activation == "relu":
        return op.Relu(y)
    if activation == "gelu":
        return op.Mul(op.Mul(y, op.CastLike(0.5, y)), op.Add(op.CastLike(1.0, y), op.Erf(op.Mul(y, op.CastLike(0.7071067811865476, y)))))
    if activation == "silu":
        return op.Mul(y, op.Sigmoid(y))
    if activation == "quick_gelu":
        return msft.QuickGelu(y, alpha=QUICK_GELU_ALPHA)
    return y


@define_op("linear_act", fake=_linear_act_fake, onnx=_linear_act_onnx)
def linear_act(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> torch.Tensor:
    """``activation(x @ weight.T + bias)`` in one op; activation is one of
    none, relu, gelu (exact), gelu_tanh, silu, quick_gelu (``t * sigmoid(1.702 t)``).
    Lowers to MatMul + com.microsoft BiasGelu / FastGelu / QuickGelu on ONNX Runtime."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"fxopt::linear_act: unknown activation {activation!r}; valid: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[activation](F.linear(x, weight, bias))
