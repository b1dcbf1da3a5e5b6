"""``fuse-attention``: written-out attention -> ``aten.scaled_dot_product_attention``.

One pattern on the rewrite engine (:mod:`.rewrite`), anchored on the value
matmul, whose spots may each be written in several *forms* (the tables below)::

    out    = matmul(probs, v)
    probs  = sm | sm.to(own dtype)                                    _PROBS
    sm     = softmax(scores, last dim)  [dtype= its own | _softmax]   _SOFTMAX_FORMS
    scores = s | s + mask | s + bias + mask | s.masked_fill(blocked, -inf)
           | where(blocked, -inf, s)                                     _MASKS
    s      = q @ kt | (q @ kt) * c | (q @ kt) / c                     _SCALES
    q      = q | q * c | q / c          kt = kt0 | kt0 * c | kt0 / c
    kt0    = k.transpose(-2, -1) | k.permute(0, 1, 3, 2) | kt0 (a key given transposed)

as GPT-2's and BERT's eager attention (Hugging Face, ``attn_implementation="eager"``),
Llama's eager attention (after ``repeat_kv``), MPNet's (a relative position bias,
then the padding mask: both become one additive ``attn_mask``) and fxopt's
``tiny_gpt`` write it. (Also checked, SDPA form or eager: OPT, Mistral, Qwen2/3,
Phi-3, Gemma, GPT-NeoX, GPT-J, Falcon, GPT-BigCode, DistilBERT, RoBERTa, ELECTRA,
ALBERT, ViT, CLIP text; not fused, with the reason in ``misses``: BLOOM's ALiBi
attention (3-D ``baddbmm``/``bmm``) and DeBERTa's disentangled attention (the
probabilities reshaped before the value matmul).)
A scale ``c`` is a python number or a one-element constant (the engine's float
capture takes both); ``-inf`` may be any fill <= -1e30, as a number or a
one-element constant; ``add`` takes the mask on either side. Predicates check what
is not structural: q, k, v 4-D, the softmax over the last dim, the transpose
over the last two dims, the fill very negative; the check: no dtype change in
the softmax or the cast, the query at least ``min_seq`` long.

Produces ``scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale=s)``
(``s`` the product of every scale found, 1 when none).
``is_causal=True`` is set only when the mask is *proved* causal from the graph:
the mask's backward slice is evaluated symbolically (:class:`_IndexAlgebra`: index
tensors as sympy expressions over the output position) and must reduce to
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
is not a form (it is 3-D, and attention here is 4-D).
"""

from __future__ import annotations

import functools
import math
import operator

import sympy
import torch
import torch.fx as fx

from ..ir.nodes import call_args, same_shape, val
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


def _masked_fill_tensor(s, blocked, fill_t):
    return s.masked_fill(blocked, fill_t)


def _where(s, blocked, fill_t):
    return torch.where(blocked, fill_t, s)


_MASKS = {"additive": _additive, "additive-bias": _additive_bias, "masked_fill": _masked_fill, "masked_fill-tensor": _masked_fill_tensor,
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


def _very_negative(f: float) -> bool:
    return f == -math.inf or f <= -1e30


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

    def run(self, graph) -> PassResult:
        softmaxes = sum(1 for n in graph.fx.nodes if n.op == "call_function" and n.target in _SOFTMAX)
        stats = {"fused": 0, "causal": 0, "masked": 0, "unmasked": 0, "gqa": 0, "softmax": softmaxes, "misses": {},
                 # attention the model already wrote as SDPA (Hugging Face's default implementation)
                 "sdpa_present": sum(1 for n in graph.fx.nodes if n.target == SDPA)}
        stats["sdpa_made_causal"] = self._causal_sdpa(graph, self.min_seq) if self.causal else 0
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

    @staticmethod
    def _causal_sdpa(graph, min_seq: int) -> int:
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
            if not same_shape([sq], [sk]) or (isinstance(sq, int) and sq < min_seq):
                continue
            if not (is_causal_mask(graph, mask) or is_constant_causal_mask(graph, mask, sq, blocked_max=-1e30)):
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
            fill = m["fill"] if "fill" in m else float(m.constant("fill_t").reshape(()).item())
        if "bias" in m:  # one additive mask: the bias plus the mask (a biased mask is never just causal)
            mask = g.call_function(aten.add.Tensor, (m["bias"], mask))
        causal = False
        if mask is not None and "bias" not in m and self.causal:
            sq = val(m.anchor).shape[-2]
            if same_shape([sq], [sk]) and is_causal_mask(graph, mask, blocked=blocked, fill=fill):
                causal, mask = True, None
        if mask is not None and blocked:
            if fill == -math.inf:
                mask = g.call_function(aten.logical_not.default, (mask,))
            else:  # a finite fill replaces the score; as a bias it dominates it the same way
                mask = g.call_function(aten.where.ScalarOther, (mask, fill, 0.0))
                mask = g.call_function(aten.to.dtype, (mask, val(m.anchor).dtype))
        fused = g.call_function(SDPA, (m["q"], k, m["v"]), {"attn_mask": mask, "dropout_p": 0.0, "is_causal": causal, "scale": scale})
        kinds.append("causal" if causal else ("masked" if mask is not None else "unmasked"))
        if _via_repeat_kv(m["k"] if "k" in m else m["kt0"]) or _via_repeat_kv(m["v"]):
            kinds.append("gqa")
        return fused

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


# ------------------------------------------------------------------------------------
# Proving a mask causal: symbolic evaluation of its backward slice.


class _Opaque(Exception):
    """The mask depends on something the algebra does not model (an input, an op)."""


class _IndexAlgebra:
    """Evaluates the nodes a mask is computed from as sympy expressions over the
    position in the result. Dimension ``j`` counted from the right is the symbol
    ``r{j}``, so broadcasting needs no bookkeeping; a dimension of size 1 never
    depends on its position (the symbol is substituted by 0).

    Models ``arange``, ``tril``/``triu``, unsqueeze/expand/view-to-same-size, ``slice``,
    ``index.Tensor``, ``diff``, ``cumsum`` of zeros, arithmetic, comparisons,
    boolean logic, ``where``, casts, scalar constants and two-valued triangular
    tables (:meth:`_triangle`); anything else (a graph
    input, a data-dependent op) makes the mask opaque, so it is never called causal.
    """

    def __init__(self, graph):
        self.graph = graph
        self.memo: dict[fx.Node, sympy.Expr] = {}

    @staticmethod
    def r(j: int) -> sympy.Symbol:
        return sympy.Symbol(f"r{j}", integer=True, nonnegative=True)

    def value(self, a):
        if isinstance(a, fx.Node):
            if a not in self.memo:
                self.memo[a] = self._fix_unit_dims(a, self._eval(a))
            return self.memo[a]
        if isinstance(a, torch.SymInt):
            return a.node.expr
        if isinstance(a, bool):
            return sympy.true if a else sympy.false
        if isinstance(a, (int, float)):
            return sympy.Integer(a) if isinstance(a, int) or float(a).is_integer() and abs(a) < 2**53 else sympy.Float(a)
        raise _Opaque(f"argument {a!r}")

    def _fix_unit_dims(self, node, expr):
        v = val(node)
        if isinstance(v, torch.Tensor):
            subs = {self.r(j): 0 for j, size in enumerate(reversed(v.shape)) if isinstance(size, int) and size == 1}
            expr = expr.subs(subs) if subs else expr
        return expr

    def _rank(self, node) -> int:
        v = val(node)
        if not isinstance(v, torch.Tensor):
            raise _Opaque(f"{node.name} has no tensor metadata")
        return v.dim()

    def _shift(self, expr, from_j: int, by: int):
        """Renumber right-indexed symbols r_j (j >= from_j) to r_{j+by}."""
        syms = sorted((s for s in expr.free_symbols if s.name.startswith("r") and s.name[1:].isdigit() and int(s.name[1:]) >= from_j),
                      key=lambda s: -int(s.name[1:]) * (1 if by > 0 else -1))
        return expr.xreplace({s: self.r(int(s.name[1:]) + by) for s in syms})

    def _triangle(self, name: str, t: torch.Tensor):
        """A constant mask table (minGPT / nanoGPT register ``tril(ones(N, N))``):
        one value where column <= row and another elsewhere, as an expression."""
        if t.dim() < 2 or any(size != 1 for size in t.shape[:-2]):
            raise _Opaque(f"constant {name} is not a 2-D table")
        table = t.reshape(t.shape[-2:])
        lower = torch.ones(table.shape, dtype=torch.bool).tril()
        on, off = table[lower].unique(), table[~lower].unique()
        if on.numel() != 1 or off.numel() > 1:
            raise _Opaque(f"constant {name} is not one value on and below the diagonal and one above")
        if off.numel() == 0 or on.item() == off.item():  # one value throughout
            return self.value(on.item())
        keep = sympy.Le(self.r(0) - self.r(1), 0)  # column (key) <= row (query)
        if t.dtype == torch.bool:
            return keep if on.item() else sympy.Not(keep)
        return sympy.Piecewise((self.value(on.item()), keep), (self.value(off.item()), True))

    def _eval(self, n: fx.Node):
        if isinstance(val(n), torch.SymInt):
            return val(n).node.expr
        if n.op == "get_attr":
            t = self.graph.constant(n)
            if t is not None and t.numel() == 1:
                return self.value(t.reshape(()).item())
            if t is not None:
                return self._triangle(n.name, t)
            raise _Opaque(f"{n.name} is not a tensor constant")
        if n.op != "call_function":
            raise _Opaque(f"{n.op} {n.name}")
        t, args = n.target, n.args
        A = lambda i: self.value(args[i])
        if t == aten.arange.default:
            return self.r(0)
        if t == aten.arange.start:
            return A(0) + self.r(0)
        if t in (aten.new_ones.default, aten.ones.default, aten.ones_like.default):
            return sympy.true if n.kwargs.get("dtype") == torch.bool else sympy.Integer(1)
        if t in (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default):
            return sympy.false if n.kwargs.get("dtype") == torch.bool else sympy.Integer(0)
        if t in (aten.add.Tensor, aten.add.Scalar, operator.add):
            alpha = n.kwargs.get("alpha", 1)
            return A(0) + alpha * A(1)
        if t in (aten.sub.Tensor, aten.sub.Scalar, operator.sub):
            return A(0) - n.kwargs.get("alpha", 1) * A(1)
        if t in (aten.mul.Tensor, aten.mul.Scalar, operator.mul):
            return A(0) * A(1)
        if t in (aten.neg.default, operator.neg):
            return -A(0)
        rel = {aten.le: sympy.Le, aten.lt: sympy.Lt, aten.ge: sympy.Ge, aten.gt: sympy.Gt, aten.eq: sympy.Eq, aten.ne: sympy.Ne}
        for packet, fn in rel.items():
            if t in (packet.Tensor, packet.Scalar):
                return _compare(fn, A(0), A(1))
        if t in (aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default, aten.mul.Tensor):
            return sympy.And(_as_bool(A(0)), _as_bool(A(1)))
        if t in (aten.__or__.Tensor, aten.bitwise_or.Tensor, aten.logical_or.default):
            return sympy.Or(_as_bool(A(0)), _as_bool(A(1)))
        if t in (aten.logical_not.default, aten.bitwise_not.default):
            return sympy.Not(_as_bool(A(0)))
        if t in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar):
            return sympy.Piecewise((A(1), _as_bool(A(0))), (A(2), True))
        if t in (aten.to.dtype, aten.to.device, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default,
                 aten.clone.default, aten.contiguous.default, aten.alias.default):
            x = A(0)
            dtype = val(n).dtype
            if dtype == torch.bool and not isinstance(x, sympy.logic.boolalg.Boolean):
                return _compare(sympy.Ne, x, 0)
            if dtype != torch.bool and isinstance(x, sympy.logic.boolalg.Boolean):
                return sympy.Piecewise((1, x), (0, True))
            return x
        if t == aten.unsqueeze.default:
            rank = self._rank(n)
            d = args[1] % rank
            # dims left of the new one move one further from the right
            return self._shift(A(0), rank - 1 - d, 1)
        if t == aten.expand.default:
            in_rank, out_rank = self._rank(args[0]), self._rank(n)
            if in_rank != out_rank:
                raise _Opaque("expand adding dimensions")
            return A(0)
        if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            iv, ov = val(args[0]), val(n)
            if list(s for s in iv.shape if not (isinstance(s, int) and s == 1)) == list(s for s in ov.shape if not (isinstance(s, int) and s == 1)) and not any(isinstance(s, int) and s == 1 for s in iv.shape):
                # only unit dims added: same as unsqueezes on the right-indexed view
                x, j_in = A(0), 0
                subs = {}
                j_out = 0
                for size in reversed(ov.shape):
                    if isinstance(size, int) and size == 1:
                        j_out += 1
                        continue
                    subs[self.r(j_in)] = self.r(j_out)
                    j_in, j_out = j_in + 1, j_out + 1
                return x.xreplace(subs)
            raise _Opaque(f"reshape {n.name}")
        if t == aten.slice.Tensor:
            rank = self._rank(n)
            d = (args[1] if len(args) > 1 else 0) % rank
            start = args[2] if len(args) > 2 and args[2] is not None else 0
            step = args[4] if len(args) > 4 else 1
            j = rank - 1 - d
            return A(0).xreplace({self.r(j): self.value(start) + step * self.r(j)})
        if t == aten.index.Tensor:
            base, indices = args[0], args[1]
            if any(i is None for i in indices):
                raise _Opaque("index with None")
            b_rank, out_rank = self._rank(base), self._rank(n)
            rest = b_rank - len(indices)
            x = self.value(base)
            # the broadcast index dims sit left of the base's remaining dims
            idx = [self._shift(self.value(i), 0, rest) for i in indices]
            subs = {self.r(b_rank - 1 - k): e for k, e in enumerate(idx)}
            return x.xreplace(subs)
        if t == aten.diff.default:
            x = A(0)
            n_ = args[1] if len(args) > 1 else 1
            rank = self._rank(n)
            d = (args[2] if len(args) > 2 else -1) % rank
            prepend = args[3] if len(args) > 3 else None
            append = args[4] if len(args) > 4 else None
            if n_ != 1 or append is not None:
                raise _Opaque("diff with n != 1 or append")
            rj = self.r(rank - 1 - d)
            if prepend is None:
                return sympy.expand(x.xreplace({rj: rj + 1}) - x)
            inner = sympy.expand(x - x.xreplace({rj: rj - 1}))
            first = sympy.expand(x.xreplace({rj: 0}) - self.value(prepend).xreplace({rj: 0}))
            if sympy.simplify(first - inner.xreplace({rj: 0})) != 0:
                raise _Opaque("diff whose first element differs from the rest")
            return inner
        if t in (aten.tril.default, aten.triu.default):
            x, d = A(0), self.value(args[1] if len(args) > 1 else 0)
            keep = sympy.Le(self.r(0) - self.r(1), d) if t == aten.tril.default else sympy.Ge(self.r(0) - self.r(1), d)
            if val(n).dtype == torch.bool:
                return sympy.And(_as_bool(x), keep)
            return sympy.Piecewise((x, keep), (0, True))
        if t == aten.cumsum.default:
            x = A(0)
            if x in (sympy.false, sympy.Integer(0)):
                return sympy.Integer(0)
            raise _Opaque("cumsum of a non-zero value")
        raise _Opaque(f"op {t} ({n.name})")


def _compare(fn, a, b):
    """``fn(a, b)``, taken inside a two-valued Piecewise with number pieces
    compared to a number (``tril(ones) == 0`` is the condition's negation)."""
    if isinstance(a, sympy.Piecewise) and len(a.args) == 2 and a.args[1][1] == sympy.true and sympy.sympify(b).is_number:
        (x, cond), (y, _) = a.args
        if x.is_number and y.is_number:
            on, off = bool(fn(x, b)), bool(fn(y, b))
            return cond if on and not off else sympy.Not(cond) if off and not on else sympy.sympify(on)
    return fn(a, b)


def _as_bool(e):
    if isinstance(e, sympy.logic.boolalg.Boolean):
        return e
    if e == 1:
        return sympy.true
    if e == 0:
        return sympy.false
    return sympy.Ne(e, 0)


def is_causal_mask(graph, mask: fx.Node, *, blocked: bool = False, fill: float | None = None) -> bool:
    """True when ``mask`` (additive float, boolean "attend", or with ``blocked``
    a boolean "do not attend") provably allows key ``k`` for query ``q`` exactly
    when ``k <= q``, for every batch, head and size."""
    try:
        e = _IndexAlgebra(graph).value(mask)
    except (_Opaque, TypeError, ValueError, AttributeError):
        return False
    v = val(mask)
    if not isinstance(v, torch.Tensor):
        return False
    if v.dtype == torch.bool:
        allowed = sympy.Not(e) if blocked else e
    else:
        if blocked:
            return False
        allowed = _zero_where(e)
        if allowed is None:
            return False
    q, k = _IndexAlgebra.r(1), _IndexAlgebra.r(0)
    return _equivalent_le(sympy.simplify(allowed), k, q)


def is_constant_causal_mask(graph, mask, q_len, *, blocked_max: float = -1e4) -> bool:
    """A constant mask (static shapes: constant-fold folds the causal mask
    before attention passes see it) that is causal: attend (0 / True) on and
    below the diagonal, blocked (<= ``blocked_max`` or -inf / False) above.
    Blocked scores then weigh exactly 0 (exp(-1e4) underflows float32), as
    with ``is_causal``."""
    c = graph.constant(mask) if isinstance(mask, fx.Node) else None
    if c is None or c.dim() < 2 or not isinstance(q_len, int) or tuple(c.shape[-2:]) != (q_len, q_len):
        return False
    above = torch.ones(q_len, q_len, dtype=torch.bool).triu(1)
    if c.dtype == torch.bool:
        return bool((c == ~above).all())
    if not c.dtype.is_floating_point:
        return False
    return bool((c.masked_select(~above.expand(c.shape)) == 0).all() and (c.masked_select(above.expand(c.shape)) <= blocked_max).all())


def _zero_where(e) -> sympy.Basic | None:
    """For an additive mask ``Piecewise((0, c), (very negative, True))`` (either order), ``c``."""
    if not isinstance(e, sympy.Piecewise) or len(e.args) != 2:
        return None
    (a, ca), (b, cb) = e.args
    big = lambda x: x.is_number and (x == -sympy.oo or float(x) <= -1e30)
    if a == 0 and big(b) and cb == sympy.true:
        return ca
    if big(a) and b == 0 and cb == sympy.true:
        return sympy.Not(ca)
    return None


def _equivalent_le(cond, k, q) -> bool:
    """``cond`` is one integer relation that normalizes to ``k - q <= 0``."""
    if not isinstance(cond, sympy.core.relational.Relational) or isinstance(cond, (sympy.Eq, sympy.Ne)):
        return False
    lhs, rhs = cond.lhs, cond.rhs
    if isinstance(cond, (sympy.Ge, sympy.Gt)):
        lhs, rhs, strict = rhs, lhs, isinstance(cond, sympy.Gt)
    else:
        strict = isinstance(cond, sympy.Lt)
    d = sympy.expand(lhs - rhs + (1 if strict else 0))  # integers: a < b  <=>  a - b + 1 <= 0
    return sympy.expand(d - (k - q)) == 0
