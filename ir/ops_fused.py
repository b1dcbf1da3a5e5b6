"""Fused normalization ops that the fusion passes (``fuse-norm``) produce.

* ``fxopt::rms_norm(x, weight, eps)``: ``weight * x * rsqrt(mean(x^2, -1) + eps)``,
  as Hugging Face Llama's ``LlamaRMSNorm`` and T5's norm compute it;
* ``fxopt::add_rms_norm(a, b, weight, eps) -> (a + b, rms_norm(a + b))``;
* ``fxopt::add_layer_norm(a, b, weight, bias, eps) -> (a + b, layer_norm(a + b))``:
  the residual add and the next block's norm in one op.

ONNX lowering: ``rms_norm`` to ONNX Runtime's ``SimplifiedLayerNormalization``
(which ORT registers in the ONNX domain; standard ``RMSNormalization`` needs
opset 23 while torch's exporter writes opset 20, and one model imports one
version of the ONNX domain). The residual forms lower to ``Add`` followed by
``LayerNormalization`` / ``SimplifiedLayerNormalization``, not to the
``com.microsoft`` SkipLayerNormalization / SkipSimplifiedLayerNormalization
fused kernels, which ran slower than Add + the norm from a few rows up
(docs/kernels.md, ``python benchmarks/ort_kernels.py``). The fused ops stay in the graph: one op is what a
backend with a faster fused kernel would take.
"""

from __future__ import annotations

import onnxscript
import torch
from onnxscript import opset18 as op
import torch.nn.functional as F
from onnx.defs import OpSchema

from .onnx_contrib import FLOAT_TYPES, Attr, AttrType, Param
from .ops import define_op

_EPS = [Attr("epsilon", AttrType.FLOAT, "added to the variance")]


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
                inputs=[Param("X", "T"), Param("scale", "V")],
                # Only Y: onnxscript would otherwise hand the exporter two outputs.
                outputs=[Param("Y", "V")],
                type_constraints=[("T", FLOAT_TYPES, ""), ("U", ["tensor(float)"], ""), ("V", FLOAT_TYPES, "")],
                attributes=[*_EPS, Attr("axis", AttrType.INT, "first normalized axis", required=False),
                            Attr("stash_type", AttrType.INT, "type of the statistics", required=False)],
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
    total = op.Add(a, b)
    return total, _onnx_v1.SimplifiedLayerNormalization(total, weight, epsilon=eps, axis=-1)


@define_op("add_rms_norm", fake=_add_norm_fake, onnx=_add_rms_norm_onnx)
def add_rms_norm(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, rms_norm(s, weight, eps))`` with ``s = a + b``: a residual add and
    the following RMSNorm. Lowers to Add + SimplifiedLayerNormalization (faster
than ONNX Runtime's SkipSimplifiedLayerNormalization here: module docstring)."""
    s = a + b
    return s, _rms(s, weight, eps)


# -- add + layer_norm --------------------------------------------------------------------

def _add_layer_norm_onnx(a, b, weight, bias, eps: float):
    total = op.Add(a, b)
    normed, _mean, _inv_std = op.LayerNormalization(total, weight, bias, epsilon=eps, axis=-1)
    return total, normed


@define_op("add_layer_norm", fake=_add_norm_fake, onnx=_add_layer_norm_onnx)
def add_layer_norm(
    a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, layer_norm(s, weight, bias, eps))`` over the last dim with
    ``s = a + b``. Lowers to Add + LayerNormalization (faster than ONNX
Runtime's SkipLayerNormalization here: module docstring)."""
    s = a + b
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
