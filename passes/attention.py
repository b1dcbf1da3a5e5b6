"""``fuse-attention``: written-out attention -> ``aten.scaled_dot_product_attention``.

Matches (anchored on each ``softmax`` over the last dimension)::

    q ──────────────┐
    k ─ transpose ─ matmul ─ [mul|div by scale] ─ [add mask | masked_fill] ─ softmax ─ [cast] ─ matmul ─ out
                                                                                       v ─────┘

as GPT-2's and BERT's eager attention (Hugging Face, ``attn_implementation="eager"``),
Llama's eager attention (after ``repeat_kv``) and fxopt's ``tiny_gpt`` write it.
Tolerated variants: the scale multiplied or divided, applied to the scores or to
``q`` / ``k`` before the first matmul, a python number or a 0-d constant; no
scale; the key given already transposed or transposed by ``permute``; an
additive float mask, a boolean ``masked_fill(-inf)`` or ``where`` mask; a cast of
the probabilities to their own dtype.

Produces ``scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale=s)``.
``is_causal=True`` is set only when the mask is *proved* causal from the graph:
the mask's backward slice is evaluated symbolically (:class:`_IndexAlgebra`: index
tensors as sympy expressions over the output position) and must reduce to
"key position <= query position" with as many queries as keys. A padding mask,
a mask read from an input, or a causal mask with a KV-cache offset (query ``i``
at absolute position ``past + i``) stays an explicit ``attn_mask``.

Refuses, and says why in ``stats["misses"]`` (node name -> first reason):
softmax not over the last dimension or with a dtype change; scores that are not
a 4-D ``q @ k^T``; a scale that is not a constant; intermediate values used
outside the subgraph (e.g. attention weights returned as an output); a mask
added before the scale; dropout still present in training mode.

GQA: ``repeat_kv`` (expand + reshape of k and v) is left in front of the fused
op, so the result is exact for any layout; ``stats["gqa"]`` counts such matches.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx

from ..ir.nodes import same_shape, val
from .base import Option, Pass, PassResult
from .registry import register_pass

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default

_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_MATMUL = {aten.matmul.default, aten.bmm.default}
_SAME_DTYPE_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default}
_REPEAT_KV = {aten.expand.default, aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.unsqueeze.default, aten.clone.default}


class Miss(Exception):
    """A pattern node that did not match; the message says which and why."""


@dataclass
class AttentionMatch:
    softmax: fx.Node
    out: fx.Node  # the second matmul, replaced by the fused op
    q: fx.Node
    k: fx.Node  # [B, N, T, H], not transposed
    k_transposed: bool  # True when ``k`` is still [.., H, T] and needs a transpose
    v: fx.Node
    scale: float
    mask: fx.Node | None  # additive float mask or boolean "attend" mask
    mask_kind: str  # none | additive | blocked-fill (masked_fill / where(m, -inf, s))
    fill: float | None
    internal: list[fx.Node]  # nodes of the subgraph that only the subgraph uses


def _scalar(graph, arg) -> float | None:
    """A python number, or the value of a 0-d / one-element constant."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    t = graph.constant(arg) if isinstance(arg, fx.Node) else None
    if t is not None and t.numel() == 1:
        return float(t.reshape(()).item())
    return None


def _is_last_two_transpose(node: fx.Node) -> bool:
    v = val(node)
    if not isinstance(v, torch.Tensor):
        return False
    r = v.dim()
    if node.target == aten.transpose.int:
        return {d % r for d in node.args[1:3]} == {r - 1, r - 2}
    if node.target == aten.permute.default:
        perm = [d % r for d in node.args[1]]
        return perm == list(range(r - 2)) + [r - 1, r - 2]
    return False


@register_pass("fuse-attention")
class FuseAttention(Pass):
    __doc__ = __doc__

    causal = Option(True, help="set is_causal (and drop the mask) where the mask is proved causal")
    min_seq = Option(1, check=lambda v: "must be >= 1" if v < 1 else None,
                     help="leave attention alone when the traced query length is below this")

    runs_after = ("canonicalize",)

    def run(self, graph) -> PassResult:
        stats = {"fused": 0, "causal": 0, "masked": 0, "unmasked": 0, "gqa": 0, "softmax": 0, "misses": {},
                 # attention the model already wrote as SDPA (Hugging Face's default implementation)
                 "sdpa_present": sum(1 for n in graph.fx.nodes if n.target == SDPA)}
        for sm in self.walk(graph, op="call_function", target=_SOFTMAX):
            stats["softmax"] += 1
            try:
                m = self._match(graph, sm)
            except Miss as why:
                stats["misses"][sm.name] = str(why)
                continue
            kind = self._rewrite(graph, m)
            stats["fused"] += 1
            stats[kind] += 1
            if _via_repeat_kv(m.k) or _via_repeat_kv(m.v):
                stats["gqa"] += 1
        return PassResult(stats["fused"] > 0, stats)

    # -- matching ------------------------------------------------------------------
    def _match(self, graph, sm: fx.Node) -> AttentionMatch:
        internal = [sm]
        x = sm.args[0]
        dim = sm.args[1] if len(sm.args) > 1 else sm.kwargs.get("dim")
        sv = val(sm)
        if not isinstance(sv, torch.Tensor) or sv.dim() != 4:
            raise Miss(f"softmax output is not 4-D ({getattr(sv, 'shape', None)})")
        if dim % 4 != 3:
            raise Miss(f"softmax over dim {dim}, not the last")
        if sm.target == aten._softmax.default and sm.args[2]:
            raise Miss("softmax computed in half precision into float (half_to_float)")
        if sm.target == aten.softmax.int and len(sm.args) > 2 and sm.args[2] not in (None, sv.dtype):
            raise Miss("softmax changes dtype")

        # probabilities -> [cast] -> matmul(p, v)
        p = sm
        while len(p.users) == 1:
            (u,) = p.users
            if u.target in _SAME_DTYPE_CASTS and val(u) is not None and val(u).dtype == sv.dtype:
                internal.append(u)
                p = u
                continue
            if u.target == aten.dropout.default:
                raise Miss("dropout between softmax and the value matmul (run canonicalize; train mode is not fused)")
            break
        if len(p.users) != 1:
            raise Miss(f"attention probabilities {p.name} are used {len(p.users)} times (e.g. returned as an output)")
        (out,) = p.users
        if out.target not in _MATMUL or out.args[0] is not p:
            raise Miss(f"softmax result feeds {out.target}, not matmul(probs, v)")
        v = out.args[1]

        # scores: [mask] <- [scale] <- matmul(q, kT)
        mask, kind, fill = None, "none", None
        s = x
        if s.op == "call_function" and s.target in (aten.add.Tensor,) and len(s.users) == 1:
            a, b = s.args[:2]
            if isinstance(a, fx.Node) and self._scores_like(a):
                s, mask = a, b
            elif isinstance(b, fx.Node) and self._scores_like(b):
                s, mask = b, a
            else:
                raise Miss("an add feeds softmax but neither operand is the scores")
            if not isinstance(mask, fx.Node):
                raise Miss(f"scalar {mask!r} added to the scores")
            kind = "additive"
            internal.append(x)
        elif s.op == "call_function" and s.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) and len(s.users) == 1:
            fill = _scalar(graph, s.args[2])
            if fill is None or not (fill == -math.inf or fill <= -1e30):
                raise Miss(f"masked_fill with {s.args[2]!r}, not -inf or a very negative number")
            internal.append(s)
            s, mask, kind = s.args[0], s.args[1], "blocked"
        elif s.op == "call_function" and s.target == aten.where.self and len(s.users) == 1:
            fill = _scalar(graph, s.args[1])
            if fill is None or not (fill == -math.inf or fill <= -1e30):
                raise Miss("where(mask, x, scores) with x not -inf or a very negative number")
            internal.append(s)
            s, mask, kind = s.args[2], s.args[0], "blocked"

        scale = 1.0
        if s.op == "call_function" and s.target in (aten.mul.Tensor, aten.div.Tensor) and len(s.users) == 1:
            c = _scalar(graph, s.args[1])
            if c is None and s.target == aten.mul.Tensor:
                c = _scalar(graph, s.args[0])
                base = s.args[1]
            else:
                base = s.args[0]
            if c is None:
                raise Miss(f"scores scaled by a non-constant ({s.name})")
            scale = c if s.target == aten.mul.Tensor else 1.0 / c
            internal.append(s)
            s = base
        if s.op != "call_function" or s.target not in _MATMUL:
            raise Miss(f"softmax input is not (scaled, masked) q @ k^T: found {s.target if s.op == 'call_function' else s.op} {s.name}")
        if len(s.users) != 1:
            raise Miss(f"scores {s.name} are used outside the attention")
        internal.append(s)
        q, kt = s.args[:2]
        q, scale = self._peel_scale(graph, q, scale, internal)
        kt, scale = self._peel_scale(graph, kt, scale, internal)
        for name, t in (("q", q), ("k^T", kt), ("v", v)):
            tv = val(t)
            if not isinstance(tv, torch.Tensor) or tv.dim() != 4:
                raise Miss(f"{name} ({getattr(t, 'name', t)}) is not 4-D")
        if val(q).shape[-2] is not None and isinstance(val(q).shape[-2], int) and val(q).shape[-2] < self.min_seq:
            raise Miss(f"query length {val(q).shape[-2]} below min_seq={self.min_seq}")
        if _is_last_two_transpose(kt) and len(kt.users) == 1:
            internal.append(kt)
            k, transposed = kt.args[0], False
        else:
            k, transposed = kt, True
        return AttentionMatch(sm, out, q, k, transposed, v, scale, mask, kind, fill, internal)

    def _scores_like(self, node: fx.Node) -> bool:
        return node.op == "call_function" and (node.target in _MATMUL or node.target in (aten.mul.Tensor, aten.div.Tensor))

    def _peel_scale(self, graph, t, scale: float, internal: list) -> tuple:
        """q * c or q / c feeding the first matmul (scale applied before q @ k^T)."""
        if isinstance(t, fx.Node) and t.op == "call_function" and t.target in (aten.mul.Tensor, aten.div.Tensor) and len(t.users) == 1:
            c = _scalar(graph, t.args[1])
            if c is not None:
                internal.append(t)
                return t.args[0], scale * (c if t.target == aten.mul.Tensor else 1.0 / c)
        return t, scale

    # -- rewriting -------------------------------------------------------------------
    def _rewrite(self, graph, m: AttentionMatch) -> str:
        g = graph.fx
        causal = False
        mask = m.mask
        if mask is not None and self.causal:
            sq, sk = val(m.out).shape[-2], val(m.k).shape[-1 if m.k_transposed else -2]
            if same_shape([sq], [sk]) and is_causal_mask(graph, mask, blocked=(m.mask_kind == "blocked"), fill=m.fill):
                causal, mask = True, None
        with g.inserting_before(m.out):
            k = m.k
            if m.k_transposed:
                k = g.call_function(aten.transpose.int, (m.k, -2, -1))
            if mask is not None and m.mask_kind == "blocked":
                if m.fill == -math.inf:
                    mask = g.call_function(aten.logical_not.default, (mask,))
                else:  # a finite fill replaces the score; as a bias it dominates it the same way
                    mask = g.call_function(aten.where.ScalarOther, (mask, m.fill, 0.0))
                    mask = g.call_function(aten.to.dtype, (mask, val(m.softmax).dtype))
            kwargs = {"scale": m.scale}
            fused = g.call_function(SDPA, (m.q, k, m.v), {"attn_mask": mask, "dropout_p": 0.0, "is_causal": causal, **kwargs})
        fused.meta.update({key: v for key, v in m.out.meta.items() if key not in ("val",)})
        m.out.replace_all_uses_with(fused)
        g.erase_node(m.out)
        for node in reversed(m.internal):  # sources last: users were erased first
            if node.graph is g and not node.users:
                g.erase_node(node)
        graph.refresh_meta()
        return "causal" if causal else ("masked" if mask is not None else "unmasked")


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
    boolean logic, ``where``, casts and constants; anything else (a graph
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

    def _eval(self, n: fx.Node):
        if isinstance(val(n), torch.SymInt):
            return val(n).node.expr
        if n.op == "get_attr":
            t = self.graph.constant(n)
            if t is not None and t.numel() == 1:
                return self.value(t.reshape(()).item())
            raise _Opaque(f"constant {n.name} is not a scalar")
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
                return fn(A(0), A(1))
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
                return sympy.Ne(x, 0)
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
