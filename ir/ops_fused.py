"""Fused normalization ops that the fusion passes (``fuse-norm``) produce.

* ``fxopt::rms_norm(x, weight, eps)``: ``weight * x * rsqrt(mean(x^2, -1) + eps)``,
  as Hugging Face Llama's ``LlamaRMSNorm`` and T5's norm compute it;
* ``fxopt::add_rms_norm(a, b, weight, eps) -> (a + b, rms_norm(a + b))``;
* ``fxopt::add_layer_norm(a, b, weight, bias, eps) -> (a + b, layer_norm(a + b))``:
  the residual add and the next block's norm in one op.

ONNX lowering: ONNX Runtime's own fused kernels (``SimplifiedLayerNormalization``,
which ORT registers in the ONNX domain, and the ``com.microsoft``
``SkipSimplifiedLayerNormalization`` / ``SkipLayerNormalization``). Standard
``RMSNormalization`` needs opset 23 while torch's exporter writes opset 20, and
one model imports one version of the ONNX domain, so it is not used.
"""

from __future__ import annotations

import onnxscript
import torch
import torch.nn.functional as F
from onnx.defs import OpSchema

from .onnx_contrib import _FLOATS, _Attr, _AttrType, _optional, _Param, declare, msft
from .ops import define_op

_EPS = [_Attr("epsilon", _AttrType.FLOAT, "added to the variance")]
_STATS = [_optional("mean", "U"), _optional("inv_std_var", "U")]
_TYPES = [("T", _FLOATS, ""), ("U", ["tensor(float)"], "")]

declare(
    "SkipSimplifiedLayerNormalization",
    [_Param("input", "T"), _Param("skip", "T"), _Param("gamma", "T"), _optional("bias", "T")],
    [_Param("output", "T"), *_STATS, _optional("input_skip_bias_sum", "T")],
    _TYPES,
    _EPS,
)
declare(
    "SkipLayerNormalization",
    [_Param("input", "T"), _Param("skip", "T"), _Param("gamma", "T"), _optional("beta", "T"), _optional("bias", "T")],
    [_Param("output", "T"), *_STATS, _optional("input_skip_bias_sum", "T")],
    _TYPES,
    _EPS,
)


def _declare_onnx_domain_simplified_layer_norm() -> onnxscript.values.Opset:
    """ORT registers SimplifiedLayerNormalization (version 1) in the ONNX domain;
    onnx does not know it, so its schema is declared there for onnxscript."""
    import onnx

    try:
        onnx.defs.get_schema("SimplifiedLayerNormalization", 1, "")
    except onnx.defs.SchemaError:
        onnx.defs.register_schema(
            OpSchema(
                "SimplifiedLayerNormalization", "", 1,
                inputs=[_Param("X", "T"), _Param("scale", "V")],
                # Only Y: onnxscript would otherwise hand the exporter two outputs.
                outputs=[_Param("Y", "V")],
                type_constraints=[("T", _FLOATS, ""), ("U", ["tensor(float)"], ""), ("V", _FLOATS, "")],
                attributes=[*_EPS, _Attr("axis", _AttrType.INT, "first normalized axis", required=False),
                            _Attr("stash_type", _AttrType.INT, "type of the statistics", required=False)],
            )
        )
    return onnxscript.values.Opset("", 1)


_onnx_v1 = _declare_onnx_domain_simplified_layer_norm()


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


# -- rms_norm ---------------------------------------------------------------------------

def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x)


def _rms_norm_onnx(x, weight, eps: float):
    return _onnx_v1.SimplifiedLayerNormalization(x, weight, epsilon=eps, axis=-1)


@define_op("rms_norm", fake=_rms_norm_fake, onnx=_rms_norm_onnx)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x * rsqrt(mean(x^2 over the last dim) + eps)``. Lowers to
    ONNX Runtime's SimplifiedLayerNormalization."""
    return _rms(x, weight, eps)


# -- add + rms_norm ----------------------------------------------------------------------

def _add_norm_fake(a, b, weight, *rest):
    s = torch.empty_like(a + b)
    return s, torch.empty_like(s)


def _add_rms_norm_onnx(a, b, weight, eps: float):
    normed, _mean, _inv, total = msft.SkipSimplifiedLayerNormalization(a, b, weight, epsilon=eps, _num_outputs=4)
    return total, normed


@define_op("add_rms_norm", fake=_add_norm_fake, onnx=_add_rms_norm_onnx)
def add_rms_norm(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, rms_norm(s, weight, eps))`` with ``s = a + b``: a residual add and
    the following RMSNorm. Lowers to com.microsoft SkipSimplifiedLayerNormalization."""
    s = a + b
    return s, _rms(s, weight, eps)


# -- add + layer_norm --------------------------------------------------------------------

def _add_layer_norm_onnx(a, b, weight, bias, eps: float):
    normed, _mean, _inv, total = msft.SkipLayerNormalization(a, b, weight, bias, epsilon=eps, _num_outputs=4)
    return total, normed


@define_op("add_layer_norm", fake=_add_norm_fake, onnx=_add_layer_norm_onnx)
def add_layer_norm(
    a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, layer_norm(s, weight, bias, eps))`` over the last dim with
    ``s = a + b``. Lowers to com.microsoft SkipLayerNormalization."""
    s = a + b
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
