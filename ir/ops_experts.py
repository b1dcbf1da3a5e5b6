"""The mixture-of-experts op that ``fuse-experts`` produces.

``fxopt::experts_swiglu(x[T, H], chosen[T, K], weights[T, K], gate_up[E, 2I, H],
down[E, H, I], top_k)``: each token ``t`` goes through the ``K`` experts
``chosen[t]`` and their outputs are summed, weighted by ``weights[t]``::

    out[t] = sum_j weights[t, j] * down[e] @ (silu(g) * u),  e = chosen[t, j]
    g = gate_up[e][0::2] @ x[t],  u = gate_up[e][1::2] @ x[t]

``gate_up`` holds each expert's gate and up rows interleaved (row ``2i`` gate
row ``i``, row ``2i + 1`` up row ``i``): the layout ONNX Runtime's CPU ``MoE``
kernel reads. The eager kernel runs each expert once on the tokens routed to
it; the traced form it replaces (transformers' ``batched_mm`` experts) copies
each token's experts' weights before multiplying.

ONNX lowering: ``com.microsoft.MoE`` with interleaved SwiGLU. That kernel
chooses the experts itself, as the top ``K`` of a softmax over router logits;
the logits it is given are ``log(weights)`` at the chosen experts and ``-inf``
elsewhere, so it picks exactly ``chosen`` with softmax weights
``weights / sum(weights)``, and the output is multiplied back by ``sum(weights)``
(equal up to rounding; a zero weight's route the kernel skips, as it should).
That needs non-negative weights: ``fuse-experts`` fuses only weights it proves
come from a softmax or sigmoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnxscript import opset18 as op

from .onnx_contrib import FLOAT_TYPES, Attr, AttrType, Param, declare, msft, optional_param
from .ops import define_op

declare(
    "MoE",
    [
        Param("input", "T"), Param("router_probs", "T"), Param("fc1_experts_weights", "T"),
        optional_param("fc1_experts_bias", "T"), Param("fc2_experts_weights", "T"), optional_param("fc2_experts_bias", "T"),
    ],
    [Param("output", "T")],
    [("T", FLOAT_TYPES, "")],
    [
        Attr("k", AttrType.INT, "experts per token"),
        Attr("activation_type", AttrType.STRING, "relu, gelu, silu, swiglu or identity"),
        Attr("normalize_routing_weights", AttrType.INT, "renormalize the top-k softmax weights", required=False),
        Attr("swiglu_fusion", AttrType.INT, "1: gate and up rows interleaved in fc1", required=False),
        Attr("activation_alpha", AttrType.FLOAT, "SwiGLU's sigmoid scale", required=False),
        Attr("activation_beta", AttrType.FLOAT, "SwiGLU's up offset", required=False),
    ],
)


def _experts_fake(x, chosen, weights, gate_up, down, top_k):
    return torch.empty_like(x)


def _experts_onnx(x, chosen, weights, gate_up, down, top_k: int):
    rows = op.Concat(op.Shape(x, start=0, end=1), op.Shape(down, start=0, end=1), axis=0)
    never = op.Expand(op.CastLike(float("-inf"), x), rows)
    # log of the weights over their row's largest, in the weights' own dtype: the kernel's softmax
    # is blind to the shift, and the dominant weights keep full precision in a float16 model
    relative = op.Log(op.Div(weights, op.ReduceMax(weights, op.Constant(value_ints=[-1]), keepdims=1)))
    logits = op.ScatterElements(never, chosen, op.CastLike(relative, x), axis=1)
    y = msft.MoE(x, logits, gate_up, None, down, k=top_k, activation_type="swiglu", swiglu_fusion=1,
                 activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=1)
    total = op.ReduceSum(op.CastLike(weights, x), op.Constant(value_ints=[-1]), keepdims=1)
    return op.Mul(y, total)


@define_op("experts_swiglu", fake=_experts_fake, onnx=_experts_onnx)
def experts_swiglu(x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor, top_k: int) -> torch.Tensor:
    """Each token through its ``top_k`` chosen SwiGLU experts, outputs summed
    with the routing weights in float32 at least (as transformers sums them)
    and cast back to ``x``'s dtype; ``gate_up`` rows interleaved (module docstring)."""
    out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    for e in torch.unique(chosen).tolist():
        token, slot = (chosen == e).nonzero(as_tuple=True)
        h = F.linear(x[token], gate_up[e])
        y = F.linear(F.silu(h[:, 0::2]) * h[:, 1::2], down[e])
        out.index_add_(0, token, y.to(out.dtype) * weights[token, slot].unsqueeze(-1).to(out.dtype))
    return out.to(x.dtype)
