"""``fuse-attention``: written-out attention -> ``aten.scaled_dot_product_attention``.

One pattern on the rewrite engine (:mod:`.rewrite`), anchored on the value
matmul, whose spots may each be written in several *forms* (the tables below)::

    out    = matmul(probs, v)
    probs  = sm | sm.to(own dtype)                                    _PROBS
    sm     = softmax(scores, last dim)  [dtype= its own | _softmax]   _SOFTMAX_FORMS
    scores = s | s + mask | s + bias + mask | s.masked_fill(blocked, -inf)
           | (s + bias).masked_fill(blocked, -inf) | where(blocked, -inf, s)   _MASKS
    s      = q @ kt | (q @ kt) * c | (q @ kt) / c                     _SCALES
    q      = q | q * c | q / c          kt = kt0 | kt0 * c | kt0 / c
    kt0    = k.transpose(-2, -1) | k.permute(0, 1, 3, 2) | kt0 (a key given transposed)

as GPT-2's and BERT's eager attention (Hugging Face, ``attn_implementation="eager"``),
Llama's eager attention (after ``repeat_kv``), MPNet's (a relative position bias,
then the padding mask: both become one additive ``attn_mask``) and fxopt's
``tiny_gpt`` write it. (Also checked, SDPA form or eager: OPT, Mistral, Qwen2/3,
Phi-3, Gemma, GPT-NeoX, GPT-J, Falcon, GPT-BigCode, DistilBERT, RoBERTa, ELECTRA,
ALBERT, ViT, CLIP text, MPT (ALiBi), and, once ``canonicalize`` has unfolded their heads
from the batch, BLOOM's ALiBi attention and DeBERTa-v2's without relative attention; not
fused, with the reason in ``misses``: XGLM's, whose scores are clamped by ``max``
before the softmax.)
A scale ``c`` is a python number or a one-element constant (the engine's float
capture takes both); ``-inf`` may be any fill <= -1e30 (in float16, its lowest
value -65504 too), as a number or a
one-element constant; ``add`` takes the mask on either side. Predicates check what
is not structural: q, k, v 4-D, the softmax over the last dim, the transpose
over the last two dims, the fill very negative; the check: no dtype change in
the softmax or the cast, the query at least ``min_seq`` long.

Produces ``scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale=s)``
(``s`` the product of every scale found, 1 when none).
``is_causal=True`` is set only when the mask is *proved* causal from the graph:
the mask's backward slice is evaluated symbolically (the :class:`CausalMasks`
analysis, :mod:`.analyses.masks`: index tensors as sympy expressions over the
output position) and must reduce to
"key position <= query position" with as many queries as keys (a constant
table, minGPT's ``tril(ones(N, N))`` sliced to the length, counts when it holds
one value on and below the diagonal and another above). A padding mask,
a mask read from an input, or a causal mask with a KV-cache offset (query ``i``
at absolute position ``past + i``) stays an explicit ``attn_mask``.

Refuses, and says why in ``stats["misses"]`` (softmax node name -> reason; the
engine's nearest miss, or why a found match was skipped):
softmax not over the last dimension or with a dtype change; scores that are not
a 4-D ``q @ k^T``; a scale that is not a constant; intermediate values used
outside the subgraph (e.g. attention weights returned as an output); a mask
added before the scale; dropout still present in training mode. When nothing
fuses although softmaxes exist, ``stats["nearest_miss"]`` is the engine's
explanation.

GQA: ``repeat_kv`` (expand + reshape of k and v) is left in front of the fused
op, so the result is exact for any layout; ``stats["gqa"]`` counts such matches.

Attention the model already wrote as SDPA (Hugging Face's default
implementation: GPT-2, Llama and most decoders pass a boolean mask built from
index comparisons) goes through the same causal proof: a mask proved causal, or a
folded constant causal table, becomes ``is_causal=True`` without the mask
(``stats["sdpa_made_causal"]``); any other mask is left as it is.

No hand-written matching is left: the pass's options reach the pattern through
``Pattern.variant`` (``min_seq`` in the check, ``causal`` in the builder), and
the causal proof runs in the builder, which decides between ``is_causal`` and an
explicit mask. The cast form is ``_to_copy`` as torch.export writes it; ``bmm``
is not a form (attention here is 4-D: ``canonicalize`` rewrites ``bmm`` /
``baddbmm`` over heads folded into the batch into the 4-D ``matmul``).
"""

from __future__ import annotations

import functools
import math
import operator

import torch
import torch.fx as fx

from ..ir.nodes import call_args, same_shape, val
from .analyses import CausalMasks, KeyPaddingMasks
from .base import Option, Pass, PassResult
from .registry import register_pass
from .rewrite import Match, Pattern, Reject, nearest_misses, rewrite

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default

_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_REPEAT_KV = {aten.expand.default, aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.unsqueeze.default, aten.clone.default}


def _attention(probs, v):
    return torch.matmul(probs, v)


# -- the forms of each spot ---------------------------------------------------------------

def _cast(sm, probs_dtype: torch.dtype):
    return sm.to(probs_dtype)


_PROBS = {"cast": _cast, "plain": "sm"}


def _softmax(scores, dim: int):
    return torch.softmax(scores, dim)


def _softmax_dtype(scores, dim: int, softmax_dtype: torch.dtype):
    return torch.softmax(scores, dim, dtype=softmax_dtype)


def _softmax_aten(scores, dim: int):
    return torch.ops.aten._softmax(scores, dim, False)


_SOFTMAX_FORMS = {"softmax": _softmax, "softmax-dtype": _softmax_dtype, "_softmax": _softmax_aten}


def _additive(s, mask):
    return s + mask


def _additive_bias(s, bias, mask):
    # a position bias and then the mask (MPNet's relative attention bias, T5-style)
    return s + bias + mask


def _masked_fill(s, blocked, fill: float):
    return s.masked_fill(blocked, fill)


def _bias_masked_fill(s, bias, blocked, fill: float):
    # a position bias and then a boolean mask (MPT's ALiBi)
    return (s + bias).masked_fill(blocked, fill)


def _masked_fill_tensor(s, blocked, fill_t):
    return s.masked_fill(blocked, fill_t)


def _where(s, blocked, fill_t):
    return torch.where(blocked, fill_t, s)


_MASKS = {"additive": _additive, "additive-bias": _additive_bias, "masked_fill": _masked_fill,
          "bias-masked_fill": _bias_masked_fill, "masked_fill-tensor": _masked_fill_tensor,
          "where": _where, "none": "s"}


def _scaled_mul(q, kt, s_scale: float):
    return torch.matmul(q, kt) * s_scale


def _scaled_div(q, kt, s_scale: float):
    return torch.matmul(q, kt) / s_scale


def _unscaled(q, kt):
    return torch.matmul(q, kt)


_SCALES = {"mul": _scaled_mul, "div": _scaled_div, "none": _unscaled}


def _q_mul(q, q_scale: float):
    return q * q_scale


def _q_div(q, q_scale: float):
    return q / q_scale


def _k_mul(kt0, k_scale: float):
    return kt0 * k_scale


def _k_div(kt0, k_scale: float):
    return kt0 / k_scale


def _transpose(k, d0: int, d1: int):
    return k.transpose(d0, d1)


def _permute(k, p0: int, p1: int, p2: int, p3: int):
    return k.permute(p0, p1, p2, p3)


_KEYS = {"transpose": _transpose, "permute": _permute, "given": "kt0"}


# -- predicates: what is not structural ----------------------------------------------------

def _require(ok: bool, reason: str) -> bool:
    if not ok:
        raise Reject(reason)
    return True


def _four_d(what: str):
    def pred(node) -> bool:
        v = val(node)
        return _require(isinstance(v, torch.Tensor) and v.dim() == 4, f"{what} ({getattr(node, 'name', node)}) is not 4-D")

    pred.__name__ = f"{what} is 4-D"
    return pred


def _very_negative(f: float, dtype: torch.dtype = torch.float16) -> bool:
    """-inf, or a fill that masks in ``dtype``: <= -1e30, or its lowest value where that
    is higher (float16's -65504, which transformers fills with). The default, float16's,
    is the loosest: the predicates take it, the check the attention's own dtype."""
    return f == -math.inf or f <= max(-1e30, torch.finfo(dtype).min)


def _fill_of(m: Match) -> float | None:
    """The fill of a masked_fill / where form, a number or a one-element constant."""
    if "fill" in m:
        return m["fill"]
    return float(m.constant("fill_t").reshape(())) if "fill_t" in m else None


def _fill_constant(node) -> bool:
    """A fill given as a tensor: a one-element constant, very negative."""
    t = None
    if isinstance(node, fx.Node) and node.op == "get_attr":
        t = operator.attrgetter(node.target)(node.graph.owning_module)
    _require(isinstance(t, torch.Tensor) and t.numel() == 1, f"masked with {_name(node)}, not a one-element constant")
    return _require(_very_negative(float(t.reshape(()).item())), f"masked with {_name(node)} = {float(t.reshape(()).item())!r}, not -inf or a very negative number")


def _name(node) -> str:
    return getattr(node, "name", repr(node))


def _dim(position: int):
    return lambda d: _require(d % 4 == position, f"permute puts dim {d} at {position}: not a swap of the last two")


_WHERE = {
    "q": _four_d("q"), "v": _four_d("v"), "k": _four_d("k"), "kt0": _four_d("k^T"),
    "dim": lambda d: _require(d in (-1, 3), f"softmax over dim {d}, not the last"),
    "d0": lambda d: _require(d % 4 in (2, 3), f"transpose of dim {d}, not of the last two"),
    "d1": lambda d: _require(d % 4 in (2, 3), f"transpose of dim {d}, not of the last two"),
    **{f"p{i}": _dim(i if i < 2 else 5 - i) for i in range(4)},
    "fill_t": _fill_constant,
    "fill": lambda f: _require(_very_negative(f), f"masked_fill with {f!r}, not -inf or a very negative number"),
}

_INPUTS = {"probs": (2, 2, 4, 4), "v": (2, 2, 4, 8), "sm": (2, 2, 4, 4), "scores": (2, 2, 4, 4), "s": (2, 2, 4, 4),
           "mask": (2, 2, 4, 4), "bias": (2, 2, 4, 4), "blocked": torch.zeros(2, 2, 4, 4, dtype=torch.bool), "fill_t": torch.tensor(-1e9),
           "q": (2, 2, 4, 8), "kt": (2, 2, 8, 4), "kt0": (2, 2, 8, 4), "k": (2, 2, 4, 8),
           "dim": -1, "d0": -2, "d1": -1, "p0": 0, "p1": 1, "p2": 3, "p3": 2}

_ATTENTION = Pattern(
    "attention", _attention, build=lambda m, graph: None, where=_WHERE, inputs=_INPUTS,
    alternatives={"probs": _PROBS, "sm": _SOFTMAX_FORMS, "scores": _MASKS, "s": _SCALES,
                  "q": {"mul": _q_mul, "div": _q_div, "given": "q"},
                  "kt": {"mul": _k_mul, "div": _k_div, "plain": "kt0"}, "kt0": _KEYS},
)


@register_pass("fuse-attention")
class FuseAttention(Pass):
    __doc__ = __doc__

    causal = Option(True, help="set is_causal (and drop the mask) where the mask is proved causal")
    min_seq = Option(1, check=lambda v: "must be >= 1" if v < 1 else None,
                     help="leave attention alone when the traced query length is below this")

    runs_after = ("canonicalize",)
    # facts about a mask are facts about its value, which fusing attention keeps
    preserves = (CausalMasks, KeyPaddingMasks)

    def run(self, graph) -> PassResult:
        softmaxes = sum(1 for n in graph.fx.nodes if n.op == "call_function" and n.target in _SOFTMAX)
        stats = {"fused": 0, "causal": 0, "masked": 0, "unmasked": 0, "gqa": 0, "softmax": softmaxes, "misses": {},
                 # attention the model already wrote as SDPA (Hugging Face's default implementation)
                 "sdpa_present": sum(1 for n in graph.fx.nodes if n.target == SDPA)}
        stats["sdpa_made_causal"] = self._causal_sdpa(graph) if self.causal else 0
        if not softmaxes:
            return PassResult(stats["sdpa_made_causal"] > 0, stats)
        kinds: list[str] = []
        pattern = _ATTENTION.variant(check=self._check, build=functools.partial(self._build, kinds))
        st = rewrite(graph, [pattern], pass_=self).stats[pattern.name]
        stats["fused"] = st.rewritten
        for kind in kinds:
            stats[kind] += 1
        stats["misses"] = self._misses(graph, pattern, st)
        if st.nearest_miss:
            stats["nearest_miss"] = st.nearest_miss
        return PassResult(st.rewritten + stats["sdpa_made_causal"] > 0, stats)

    def _causal_sdpa(self, graph) -> int:
        """SDPA the model already wrote (Hugging Face's default attention builds a
        boolean mask and passes it) whose ``attn_mask`` is proved causal, by the
        same proof as a fused match's or as a folded constant table: set
        ``is_causal`` and drop the mask (``dce`` removes what built it). ONNX
        Runtime's attention then runs unidirectional without a mask tensor, and
        ``pack-attention`` can take the block."""
        made = 0
        for node in list(graph.fx.nodes):
            if node.target != SDPA:
                continue
            q, k, v, mask, dropout, causal, scale, enable_gqa = call_args(node)
            if mask is None or causal:
                continue
            sq, sk = val(q).shape[-2], val(k).shape[-2]
            if not same_shape([sq], [sk]) or (isinstance(sq, int) and sq < self.min_seq):
                continue
            facts = self.analysis(CausalMasks, graph)
            if not (facts.is_causal(mask) or facts.is_constant_causal(mask, sq, blocked_max=-1e30)):
                continue
            kwargs = {"attn_mask": None, "dropout_p": dropout, "is_causal": True, "scale": scale}
            if enable_gqa:
                kwargs["enable_gqa"] = True
            with graph.fx.inserting_before(node):
                new = graph.fx.call_function(SDPA, (q, k, v), kwargs)
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            graph.fx.erase_node(node)
            made += 1
        return made

    def _check(self, m: Match) -> bool:
        dtype = m.val("q").dtype
        for cap, what in (("softmax_dtype", "softmax changes dtype"), ("probs_dtype", "the probabilities are cast to another dtype")):
            if cap in m:
                _require(m[cap] == dtype, f"{what} ({str(dtype).replace('torch.', '')} -> {str(m[cap]).replace('torch.', '')})")
        if "d0" in m:
            _require(m["d0"] % 4 != m["d1"] % 4, f"transpose({m['d0']}, {m['d1']}) swaps nothing")
        fill = _fill_of(m)
        if fill is not None:
            _require(_very_negative(fill, dtype), f"masked_fill with {fill!r}, not -inf or a very negative {dtype} number")
        out = val(m.anchor)
        _require(isinstance(out, torch.Tensor) and out.dim() == 4, "the attention output is not 4-D (a mask broadcasts it up)")
        lq = m.val("q").shape[-2]
        _require(not (isinstance(lq, int) and lq < self.min_seq), f"query length {lq} below min_seq={self.min_seq}")
        return True

    def _build(self, kinds: list, m: Match, graph):
        g = graph.fx
        scale = 1.0
        for cap, spot in (("s_scale", "s"), ("q_scale", "q"), ("k_scale", "kt")):
            if cap in m:
                scale = scale * m[cap] if m.chosen[spot] == "mul" else scale / m[cap]
        if "k" in m:
            k, sk = m["k"], val(m["k"]).shape[-2]
        else:  # the key was given transposed
            k, sk = g.call_function(aten.transpose.int, (m["kt0"], -2, -1)), val(m["kt0"]).shape[-1]
        mask, blocked, fill = None, False, None
        if "mask" in m:
            mask = m["mask"]
        elif "blocked" in m:
            mask, blocked = m["blocked"], True
            fill = _fill_of(m)
        if "bias" in m:  # one additive mask: the bias plus the mask (a biased mask is never just causal)
            if blocked:
                mask, blocked = self._additive_mask(g, mask, fill, val(m.anchor).dtype), False
            mask = g.call_function(aten.add.Tensor, (m["bias"], mask))
        causal = False
        if mask is not None and "bias" not in m and self.causal:
            sq = val(m.anchor).shape[-2]
            if same_shape([sq], [sk]) and self.analysis(CausalMasks, graph).is_causal(mask, blocked=blocked, fill=fill):
                causal, mask = True, None
        if mask is not None and blocked:
            if fill == -math.inf:
                mask = g.call_function(aten.logical_not.default, (mask,))
            else:
                mask = self._additive_mask(g, mask, fill, val(m.anchor).dtype)
        fused = g.call_function(SDPA, (m["q"], k, m["v"]), {"attn_mask": mask, "dropout_p": 0.0, "is_causal": causal, "scale": scale})
        kinds.append("causal" if causal else ("masked" if mask is not None else "unmasked"))
        if _via_repeat_kv(m["k"] if "k" in m else m["kt0"]) or _via_repeat_kv(m["v"]):
            kinds.append("gqa")
        return fused

    @staticmethod
    def _additive_mask(g, blocked, fill: float, dtype: torch.dtype):
        """``blocked`` (boolean) as a mask of ``dtype``: ``fill`` where blocked, 0
        elsewhere. A finite fill replaces the score; added to it instead, it
        dominates it the same way, at most half the dtype's lowest value so that
        the sum stays finite (float16's -65504 plus a score of -17 is -inf)."""
        fill = max(fill, torch.finfo(dtype).min / 2)
        device = val(blocked).device
        fill_t = g.call_function(aten.full.default, ([], fill), {"dtype": dtype, "device": device})
        return g.call_function(aten.where.ScalarOther, (blocked, fill_t, 0.0))

    @staticmethod
    def _misses(graph, pattern: Pattern, st) -> dict[str, str]:
        """softmax node name -> why the attention around it was not fused."""
        left = [n for n in graph.fx.nodes if n.op == "call_function" and n.target in _SOFTMAX]
        reasons: dict[fx.Node, str] = {}
        for _, detail, m in st.skips:
            for n in m.matched_nodes():
                if n.target in _SOFTMAX:
                    reasons.setdefault(n, detail)
        pending = [n for n in left if n not in reasons]
        if pending:
            misses = nearest_misses(pattern, graph)
            for sm in pending:
                near = [mi for mi in misses if sm in mi.matched or mi.graph_node is sm]
                if near:
                    reasons[sm] = max(near, key=lambda mi: mi.progress).reason
                else:
                    users = ", ".join(f"{u.name} ({getattr(u.target, '__name__', u.target)})" for u in sm.users) or "nothing"
                    reasons[sm] = f"softmax result feeds {users}, not matmul(probs, v)"
        return {n.name: reasons[n] for n in left}


def _via_repeat_kv(node) -> bool:
    """k or v produced by Llama's repeat_kv: reshape(expand(x[:, :, None]))."""
    seen = 0
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _REPEAT_KV and seen < 4:
        if node.target == aten.expand.default:
            return True
        node, seen = node.args[0], seen + 1
    return False
