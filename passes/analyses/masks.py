"""Mask proofs: which attention masks are causal, and which are key-padding
masks over a 2-D input, proved from the graph.

Two analyses (:mod:`..analysis`), each giving a small facts object that
proves masks on request and remembers every node it evaluated, so the passes
of one run (``fuse-attention``, ``remove-padding``, ``pack-attention``) share
the work::

    causal = self.analysis(CausalMasks, graph)
    causal.is_causal(mask)                      # key <= query, every size
    causal.is_constant_causal(mask, q_len)      # a folded causal table

    padding = self.analysis(KeyPaddingMasks, graph)
    kp = padding.prove(mask, batch, keys)       # KeyPadding(source, fill, sliced)
                                                # or raises NotKeyPadding(why)

A fact about a mask is a fact about its value: an exact rewrite elsewhere in
the graph keeps it, so the attention passes declare these analyses preserved.

**Causal** (:class:`CausalMasks`): the mask's backward slice is evaluated
symbolically (index tensors as sympy expressions over the output position,
:class:`_IndexAlgebra`) and must reduce to "key position <= query position".
A constant table (minGPT's ``tril(ones(N, N))``) counts when it holds one value
on and below the diagonal and another above. A mask read from an input, or a
causal mask with a KV-cache offset, is not causal.

**Key padding** (:class:`KeyPaddingMasks`): the mask is proved, op by op, to be
``where(m[b, k] != 0, 0, fill)`` (or ``zeros.masked_fill(m == 0, fill)``;
aranges and all-true parts may be constants that constant-fold folded)
broadcast over heads and queries, with ``m`` a 2-D graph value, or the
boolean ``m[b, k] != 0`` itself (``fill = -inf``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx

from ...ir.nodes import CASTS, call_args, dim_index, is_call, same_shape, size_expr, val
from ..analysis import Analysis


def _non_unit(shape) -> list:
    """The sizes other than a literal 1, a symbolic one as its expression."""
    return [size_expr(d) for d in shape if not (isinstance(d, int) and d == 1)]


aten = torch.ops.aten
_AND = {aten.__and__.Tensor, aten.logical_and.default, aten.bitwise_and.Tensor}


class NotKeyPadding(Exception):
    """The mask is not (provably) a key-padding mask; the message says why."""


@dataclass(frozen=True)
class KeyPadding:
    """``mask[b, h, q, k] == (0 if source[b, k] != 0 else fill)``, reading
    ``source[:batch, :keys]`` when ``sliced``."""

    source: fx.Node
    fill: float
    sliced: bool


class CausalMaskFacts:
    """Causal proofs on one graph, each node evaluated once."""

    def __init__(self, graph):
        self.graph = graph
        self._algebra = _IndexAlgebra(graph)

    def is_causal(self, mask: fx.Node, *, blocked: bool = False, fill: float | None = None) -> bool:
        """True when ``mask`` (additive float, boolean "attend", or with ``blocked``
        a boolean "do not attend") provably allows key ``k`` for query ``q`` exactly
        when ``k <= q``, for every batch, head and size."""
        return _is_causal(self._algebra, mask, blocked)

    def within_causal(self, mask: fx.Node) -> bool:
        """True when ``mask`` (boolean "attend", or additive 0 / -inf) provably
        allows no key after its query (``k > q`` always masked): its condition
        is a conjunction one of whose terms is ``k <= q``, whatever the others
        read (padding, a window, an integer input). A causal kernel may then
        skip the blocks above the diagonal and apply the mask to the rest. A
        finite fill is refused: a query that sees no key averages every key."""
        return _within_causal(self._algebra, mask)

    def is_constant_causal(self, mask, q_len, *, blocked_max: float = -1e4) -> bool:
        """A constant mask (static shapes: constant-fold folds the causal mask
        before attention passes see it) that is causal: attend (0 / True) on and
        below the diagonal, blocked (<= ``blocked_max`` or -inf / False) above.
        Blocked scores then weigh exactly 0 (exp(-1e4) underflows float32), as
        with ``is_causal``."""
        return is_constant_causal_mask(self.graph, mask, q_len, blocked_max=blocked_max)


class CausalMasks(Analysis):
    """Which attention masks are causal (:class:`CausalMaskFacts`)."""

    def run(self, graph) -> CausalMaskFacts:
        return CausalMaskFacts(graph)


class KeyPaddingFacts:
    """Key-padding proofs on one graph, each node described once."""

    def __init__(self, graph):
        self.graph = graph
        self._seen: dict[fx.Node, _Desc] = {}

    def prove(self, mask: fx.Node, batch, keys) -> KeyPadding:
        """``mask`` (an SDPA ``attn_mask``) as a :class:`KeyPadding` over
        ``[batch, keys]``; raises :class:`NotKeyPadding` otherwise. A boolean mask
        ``m[b, k] != 0`` gives ``fill = -inf``: a row whose every key is masked is
        then 0 (torch's SDPA), where a finite fill gives the mean of the values."""
        return _key_padding_mask(mask, self.graph, batch, keys, self._seen)

    def holds(self, mask: fx.Node, batch, keys) -> bool:
        try:
            self.prove(mask, batch, keys)
        except NotKeyPadding:
            return False
        return True


class KeyPaddingMasks(Analysis):
    """Which attention masks are key-padding masks (:class:`KeyPaddingFacts`)."""

    def run(self, graph) -> KeyPaddingFacts:
        return KeyPaddingFacts(graph)


def is_causal_mask(graph, mask: fx.Node, *, blocked: bool = False, fill: float | None = None) -> bool:
    """:meth:`CausalMaskFacts.is_causal` without an analysis cache."""
    return _is_causal(_IndexAlgebra(graph), mask, blocked)




class _Opaque(Exception):
    """The mask depends on something the algebra does not model (an input, an op)."""


class _IndexAlgebra:
    """Evaluates the nodes a mask is computed from as sympy expressions over the
    position in the result. Dimension ``j`` counted from the right is the symbol
    ``r{j}``, so broadcasting needs no bookkeeping; a dimension of size 1 never
    depends on its position (the symbol is substituted by 0).

    Models ``arange``, ``tril``/``triu``, unsqueeze/expand/view-to-same-size, ``slice``,
    ``index.Tensor``, ``diff``, ``cumsum`` of zeros, arithmetic, comparisons,
    boolean logic, ``where``, ``masked_fill``, casts, scalar constants and two-valued triangular
    tables (:meth:`_triangle`). A tensor graph input is an uninterpreted function
    of its position (``attention_mask[b, k]`` stays that, unknown but exact), so
    a mask that and's one with a causal part is still known to stay within the
    causal triangle; anything else (a data-dependent op) makes the mask opaque,
    so it is never called causal.
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
        # integers and booleans only: x - x == 0 and x * 0 == 0 do not hold for a float's inf and NaN
        if n.op == "placeholder" and isinstance(val(n), torch.Tensor) and not val(n).dtype.is_floating_point \
                and not val(n).dtype.is_complex:
            rank = val(n).dim()
            return sympy.Function(f"input_{n.name}")(*(self.r(j) for j in reversed(range(rank)))) if rank else \
                sympy.Symbol(f"input_{n.name}")
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
        if t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            return sympy.Piecewise((A(2), _as_bool(A(1))), (A(0), True))
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
            # sizes compared as expressions: == on two SymInts would guard on the traced example
            if _non_unit(iv.shape) == _non_unit(ov.shape) and not any(isinstance(s, int) and s == 1 for s in iv.shape):
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




def _allowed(algebra: "_IndexAlgebra", mask: fx.Node, blocked: bool = False):
    """The condition under which ``mask`` lets a key through (boolean "attend",
    with ``blocked`` boolean "do not attend", or an additive 0 / very negative
    mask), as an expression over the positions; None when it cannot be read."""
    try:
        e = algebra.value(mask)
    except (_Opaque, TypeError, ValueError, AttributeError):
        return None
    v = val(mask)
    if not isinstance(v, torch.Tensor):
        return None
    if v.dtype == torch.bool:
        return sympy.Not(e) if blocked else e
    return None if blocked else _zero_where(e)


def _is_causal(algebra: "_IndexAlgebra", mask: fx.Node, blocked: bool) -> bool:
    allowed = _allowed(algebra, mask, blocked)
    q, k = _IndexAlgebra.r(1), _IndexAlgebra.r(0)
    return allowed is not None and _equivalent_le(sympy.simplify(allowed), k, q)


def _within_causal(algebra: "_IndexAlgebra", mask: fx.Node) -> bool:
    allowed = _allowed(algebra, mask)
    if not isinstance(allowed, sympy.logic.boolalg.Boolean):
        return False
    if val(mask).dtype != torch.bool and -sympy.oo not in (piece for piece, _ in algebra.value(mask).args):
        # a finite fill: a query with every key masked averages all of them (torch's SDPA), which a
        # causal kernel reading keys 0..q would not
        return False
    q, k = _IndexAlgebra.r(1), _IndexAlgebra.r(0)
    terms = allowed.args if isinstance(allowed, sympy.And) else (allowed,)
    return any(_equivalent_le(sympy.simplify(t), k, q) for t in terms)


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


# --------------------------------------------------------------------------
# key-padding masks, proved op by op

class _Desc:
    """What a mask-building value is, element by element.

    ``kind``: ``raw`` (the 2-D mask input's values), ``pad`` (``mask != 0``),
    ``blocked`` (``mask == 0``), ``additive`` (0 where ``pad``, ``fill``
    elsewhere), ``true`` (all true), ``ar`` (``arange(n)`` along one dim, values >= 0).
    ``dims``: per dim, ``b`` / ``k`` (indexes the mask's row / column), ``i``
    (the arange's own dim) or ``*`` (the value does not depend on it).
    """

    def __init__(self, kind: str, dims: tuple, src: fx.Node | None = None, size=None, rows=None, cols=None, fill=None):
        self.kind, self.dims, self.src, self.size, self.fill = kind, dims, src, size, fill
        # mask[arange(rows), arange(cols)] reads the first rows x cols of the mask
        self.rows, self.cols = rows, cols

    def with_dims(self, dims) -> "_Desc":
        return _Desc(self.kind, tuple(dims), self.src, self.size, self.rows, self.cols, self.fill)

    def as_kind(self, kind: str) -> "_Desc":
        return _Desc(kind, self.dims, self.src, self.size, self.rows, self.cols, self.fill)


def _left_pad(dims: tuple, rank: int) -> tuple:
    return ("*",) * (rank - len(dims)) + tuple(dims)


def _describe(node, graph, seen: dict) -> _Desc:
    if node in seen:
        return seen[node]
    d = _describe_uncached(node, graph, seen)
    seen[node] = d
    return d


def _describe_uncached(node, graph, seen) -> _Desc:
    if not isinstance(node, fx.Node):
        raise NotKeyPadding(f"literal {node!r} in the mask")
    v = val(node)
    if node.op == "placeholder":
        if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.dtype.is_floating_point and not v.dtype.is_complex:
            return _Desc("pad" if v.dtype == torch.bool else "raw", ("b", "k"), node)
        raise NotKeyPadding(f"mask input %{node.name} is not a 2-D integer or boolean tensor")
    if node.op == "get_attr":  # static shapes: constant-fold folded the aranges and "every position"
        c = graph.constant(node)
        if c is not None and c.dtype == torch.bool and bool(c.all()):
            return _Desc("true", ("*",) * c.dim())
        if c is not None and c.dtype in (torch.int32, torch.int64):
            long = [d for d, n in enumerate(c.shape) if n > 1]
            if len(long) == 1 and bool((c.flatten() == torch.arange(c.numel(), dtype=c.dtype)).all()):
                return _Desc("ar", tuple("i" if d == long[0] else "*" for d in range(c.dim())), size=c.shape[long[0]])
    if node.op != "call_function":
        raise NotKeyPadding(f"mask reads %{node.name} ({node.op})")
    t, a = node.target, call_args(node) if isinstance(node.target, torch._ops.OpOverload) else list(node.args)
    if t in CASTS and a[0] is not None:
        src = _describe(a[0], graph, seen)
        if src.kind in ("raw", "pad") and v.dtype == torch.bool:
            return _Desc("pad", src.dims, src.src, rows=src.rows, cols=src.cols)
        if src.kind == "ar" and not v.dtype.is_floating_point:
            return src
        raise NotKeyPadding(f"%{node.name} casts the mask to {v.dtype}")
    if t in (aten.ne.Scalar, aten.eq.Scalar) and a[1] == 0:
        src = _describe(a[0], graph, seen)
        if src.kind in ("raw", "pad"):
            return src.as_kind("pad" if t == aten.ne.Scalar else "blocked")
    if t in (aten.logical_not.default, aten.bitwise_not.default):
        src = _describe(a[0], graph, seen)
        if src.kind in ("pad", "blocked"):
            return src.as_kind("blocked" if src.kind == "pad" else "pad")
    if t == aten.masked_fill.Scalar and _zeros(a[0], graph):  # zeros.masked_fill(mask == 0, fill)
        cond = _describe(a[1], graph, seen)
        if cond.kind == "blocked" and isinstance(a[2], (int, float)):
            return _Desc("additive", _left_pad(cond.dims, v.dim()), cond.src, rows=cond.rows, cols=cond.cols, fill=float(a[2]))
    if t == aten.slice.Tensor and a[2] in (None, 0) and a[4] == 1 and same_shape(val(a[0]).shape, v.shape):
        return _describe(a[0], graph, seen)  # x[:, None, None, :] keeps whole-dim slices
    if t == aten.unsqueeze.default:
        src = _describe(a[0], graph, seen)
        dims = list(src.dims)
        dims.insert(dim_index(a[1], len(dims) + 1), "*")
        return src.with_dims(dims)
    if t == aten.expand.default:
        src = _describe(a[0], graph, seen)
        return src.with_dims(_left_pad(src.dims, len(a[1])))
    if t in (aten.arange.default, aten.arange.start, aten.arange.start_step):
        start, step = (0, 1) if t == aten.arange.default else (a[0], a[2] if t == aten.arange.start_step else 1)
        if start != 0 or step != 1:
            raise NotKeyPadding(f"%{node.name}: arange not from 0 by 1")
        return _Desc("ar", ("i",), size=v.shape[0])
    if t == aten.add.Tensor and is_call(a[0], {aten.arange.default}) and a[1] == 0:
        return _describe(a[0], graph, seen)
    if t == aten.ge.Scalar and a[1] == 0 and _describe(a[0], graph, seen).kind == "ar":
        return _Desc("true", ("*",) * v.dim())
    if t in (aten.new_ones.default, aten.ones.default) and v.dtype == torch.bool:
        return _Desc("true", ("*",) * v.dim())
    if t in _AND:
        x, y = _describe(a[0], graph, seen), _describe(a[1], graph, seen)
        if x.kind == "true":
            x, y = y, x
        if y.kind == "true" and x.kind in ("pad", "true"):
            return x.with_dims(_left_pad(x.dims, v.dim()))
        raise NotKeyPadding(f"%{node.name} combines two masks")
    if t == aten.index.Tensor:
        src, idx = _describe(a[0], graph, seen), a[1]
        if src.kind not in ("raw", "pad") or src.dims != ("b", "k") or len(idx) != 2 or any(i is None for i in idx):
            raise NotKeyPadding(f"%{node.name} indexes the mask other than mask[arange(B), arange(T)]")
        out, sizes = ["*"] * v.dim(), []
        for which, i in zip(("b", "k"), idx):
            d = _describe(i, graph, seen)
            dims = _left_pad(d.dims, v.dim())
            if d.kind != "ar" or dims.count("i") != 1:
                raise NotKeyPadding(f"%{node.name}: index %{i.name} is not an arange")
            out[dims.index("i")] = which
            sizes.append(d.size)
        return _Desc(src.kind, tuple(out), src.src, rows=sizes[0], cols=sizes[1])
    raise NotKeyPadding(f"%{node.name} ({getattr(t, '__name__', t)}) is not part of a key-padding mask")


def _zeros(node, graph) -> bool:
    """A tensor of zeros: a constant, or zeros / new_zeros / zeros_like / full(0)."""
    if is_call(node, {aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default}):
        return True
    if is_call(node, {aten.full.default}) and node.args[1] == 0:
        return True
    c = graph.constant(node) if isinstance(node, fx.Node) else None
    return c is not None and not bool(c.any())


def _key_padding_mask(mask: fx.Node, graph, batch, keys, seen: dict) -> KeyPadding:
    """See :meth:`KeyPaddingFacts.prove`."""
    mv = val(mask)
    if mv.dtype == torch.bool:
        return _padding_source(_describe(mask, graph, seen), mask, batch, keys, -math.inf)
    if not is_call(mask, {aten.where.ScalarOther, aten.where.Scalar, aten.where.self}):
        try:
            d = _describe(mask, graph, seen)
        except NotKeyPadding:
            d = None
        if d is None or d.kind != "additive" or not d.fill < math.inf:
            raise NotKeyPadding(f"attn_mask %{mask.name} is an arbitrary float mask, not where(padding, 0, fill)")
        return _padding_source(d.as_kind("pad"), mask, batch, keys, d.fill)
    cond, zero, fill = mask.args[:3]

    def number(x):
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return float(x)
        c = graph.constant(x) if isinstance(x, fx.Node) else None
        if c is not None and c.numel() >= 1 and bool((c == c.flatten()[0]).all()):
            return float(c.flatten()[0])
        return None

    if number(zero) != 0.0 or number(fill) is None or not number(fill) < math.inf:
        raise NotKeyPadding(f"attn_mask %{mask.name} is not where(padding, 0, fill) with fill finite or -inf")
    return _padding_source(_describe(cond, graph, seen), mask, batch, keys, number(fill))


def _padding_source(d: _Desc, mask, batch, keys, fill: float) -> KeyPadding:
    """The 2-D input behind a described key-padding condition ``d``."""
    if d.kind != "pad" or len(d.dims) != 4 or d.dims[0] != "b" or d.dims[3] != "k" or "i" in d.dims:
        raise NotKeyPadding(f"attn_mask %{mask.name} is not a key-padding mask broadcast over heads and queries ({d.kind} {d.dims})")
    sv = val(d.src).shape
    read = (sv[0] if d.rows is None else d.rows, sv[1] if d.cols is None else d.cols)
    if not same_shape(read, (batch, keys)):
        raise NotKeyPadding(f"padding mask %{d.src.name} is read as {tuple(read)}, not [batch, keys] = [{batch}, {keys}]")
    # HF indexes the mask with arange(batch of input_ids), whose symbol may
    # differ from the mask's own batch symbol: that reads its first rows.
    return KeyPadding(d.src, fill, not same_shape(sv, (batch, keys)))


