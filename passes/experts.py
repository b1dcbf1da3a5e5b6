"""``fuse-experts``: a mixture of experts' batched form -> one
``fxopt.experts_swiglu`` op (ir/ops_experts.py)."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from ..ir.nodes import val
from .registry import register_pass
from .rewrite import Match, Pattern, Reject, RewritePass, Size, is_constant

aten = torch.ops.aten
fxopt_ops = torch.ops.fxopt


def _batched_swiglu_experts(x, chosen, weights, gate_up, down, k: int, i: int, t: Size, h: Size):
    # transformers' ``batched_mm`` experts (fxopt.trace's choice for them):
    # each token repeated once per chosen expert, that expert's weights
    # gathered, two batched matmuls, the outputs weighted and summed per token
    expert = chosen.view(-1)
    hidden = torch.bmm(gate_up[expert], x.repeat_interleave(k, 0).unsqueeze(-1)).squeeze(-1)
    gate, up = hidden.split(i, -1)
    y = torch.bmm(down[expert], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
    return (y * weights.view(-1).unsqueeze(-1)).view(t, k, h).sum(1)


# Ops a routing weight may pass through after topk without changing sign: a
# renormalization by its own sum, a cast, a view, a positive scale.
_SIGN_KEEPING = {aten.div.Tensor, aten.mul.Tensor, aten.mul.Scalar, aten._to_copy.default, aten.view.default,
                 aten.reshape.default}
_NON_NEGATIVE_SCORES = {aten.softmax.int, aten._softmax.default, aten.sigmoid.default}


def _routing_topk(node):
    """The ``topk`` that chose the experts ``node`` weights, where ``node`` is
    provably non-negative: that topk's values over softmax / sigmoid scores
    (Mixtral, Qwen-MoE, OLMoE), a softmax of its values (GraniteMoE), or
    softmax / sigmoid scores gathered at its indices (DeepSeek-V3, whose topk
    runs on biased scores), through renormalizations, casts, views and
    positive constant scales. None where the sign is not proven."""
    while node.target in _SIGN_KEEPING:
        others = [a for a in node.args[1:] if not isinstance(a, (list, tuple))]
        if node.target in (aten.div.Tensor, aten.mul.Tensor, aten.mul.Scalar) and not all(
                isinstance(a, (int, float)) and a > 0 or _sums_of(a, node.args[0]) for a in others):
            return None
        node = node.args[0]
    if node.target is aten.gather.default:
        scores, _dim, index = node.args[:3]
        if scores.target in _NON_NEGATIVE_SCORES and _topk_output(index, 1) is not None:
            return _topk_output(index, 1)
        return None
    if node.target in _NON_NEGATIVE_SCORES:  # a softmax of the topk's values (GraniteMoE)
        return _topk_output(node.args[0], 0)
    topk = _topk_output(node, 0)
    return topk if topk is not None and topk.args[0].target in _NON_NEGATIVE_SCORES else None


def _topk_output(node, which: int):
    """The ``topk`` over the last dim (distinct experts per row) whose output
    ``which`` (0 values, 1 indices) ``node`` is, or None."""
    if node.target is not operator.getitem or node.args[1] != which or node.args[0].target != aten.topk.default:
        return None
    topk = node.args[0]
    scores = val(topk.args[0])
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    return topk if scores is not None and dim in (-1, scores.dim() - 1) else None


def _sums_of(divisor, weights) -> bool:
    """``divisor`` is ``weights.sum(-1, keepdim=True)``, or that plus a positive
    constant (DeepSeek's ``+ 1e-20``)."""
    if getattr(divisor, "target", None) == aten.add.Tensor and isinstance(divisor.args[1], (int, float)) \
            and divisor.args[1] > 0 and divisor.kwargs.get("alpha", 1) > 0:
        divisor = divisor.args[0]
    return getattr(divisor, "target", None) == aten.sum.dim_IntList and divisor.args[0] is weights


def _fuse(m: Match, graph):
    gate_up, down = m.constant("gate_up"), m.constant("down")
    half, k = m["i"], m["k"]
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[1] != 2 * half \
            or tuple(down.shape) != (gate_up.shape[0], gate_up.shape[2], half):
        raise Reject(f"expert weights {tuple(gate_up.shape)} and {tuple(down.shape)} are not gate/up and down of one MLP")
    x, chosen, weights = (val(m[name]) for name in ("x", "chosen", "weights"))
    if x is None or chosen is None or weights is None:
        raise Reject("tokens, chosen experts or weights without shape metadata")
    if x.dim() != 2 or chosen.dim() != 2 or weights.dim() != 2 or chosen.shape[1] != k or weights.shape[1] != k:
        raise Reject(f"tokens {tuple(x.shape)}, chosen experts {tuple(chosen.shape)} and weights "
                     f"{tuple(weights.shape)} are not [T, H], [T, {k}], [T, {k}]")
    topk = _routing_topk(m["weights"])
    if topk is None:
        raise Reject("routing weights not proven non-negative (a topk of softmax or sigmoid scores)")
    if _topk_output(m["chosen"], 1) is not topk:
        # the ONNX lowering scatters weights at the chosen experts: distinct ones, as one topk gives
        raise Reject("the chosen experts are not the indices of the topk the routing weights come from")
    # ONNX Runtime's MoE reads gate and up rows interleaved
    experts, rows, width = gate_up.shape
    interleaved = torch.stack(gate_up.split(half, dim=1), dim=2).reshape(experts, rows, width)
    fused = graph.add_constant(interleaved, "interleaved_" + m["gate_up"].target)
    out = graph.fx.call_function(fxopt_ops.experts_swiglu.default, (m["x"], m["chosen"], m["weights"], fused, m["down"], k))
    dtype = val(m.outputs[0]).dtype
    if dtype != x.dtype:  # float32 routing weights promote the traced sum (Mixtral in float16): keep its dtype
        out = graph.fx.call_function(aten._to_copy.default, (out,), {"dtype": dtype})
    return out


_SHAPES = {"x": (3, 8), "chosen": torch.zeros(3, 2, dtype=torch.long), "weights": (3, 2), "gate_up": (4, 10, 8),
           "down": (4, 8, 5), "k": 2, "i": 5, "t": 3, "h": 8}


@register_pass("fuse-experts")
class FuseExperts(RewritePass):
    """Fuses a mixture of experts with SwiGLU experts into one op.

    Matches the batched form ``fxopt.trace`` gives Hugging Face's experts
    (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GraniteMoE, DeepSeek-V3, ...): per
    token and chosen expert, the expert's gate/up and down weights gathered by index and applied by
    ``bmm``, ``silu(gate) * up`` between them, outputs weighted by the
    routing weights and summed per token.
    Produces ``fxopt.experts_swiglu(x, chosen, weights, gate_up, down, k)``
    with gate and up rows interleaved in a new constant: eager runs each
    expert once on its tokens (no weight copies); ONNX Runtime runs its
    ``MoE`` kernel.
    Refuses: expert weights that are not constants or not gate/up and down
    of one MLP, tokens and routing not ``[T, H]`` / ``[T, k]``, routing
    weights it cannot prove non-negative (the ONNX lowering routes through
    their logarithm) and chosen experts that are not the indices of the same
    ``topk``. The interleaved gate/up weights are a new constant: one more
    copy of them beside the model's own.
    """

    runs_after = ("canonicalize",)

    patterns = [Pattern("batched-swiglu-experts", _batched_swiglu_experts, build=_fuse,
                        where={"gate_up": is_constant, "down": is_constant}, inputs=_SHAPES)]
