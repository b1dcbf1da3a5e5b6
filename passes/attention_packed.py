"""``pack-attention``: a whole attention block -> one fxopt op that ONNX Runtime
runs as one contrib kernel (``com.microsoft`` Attention / GroupQueryAttention).

Runs after ``fuse-attention`` (its ``scaled_dot_product_attention`` is the
contract) and ``merge-linears`` (which packs separate Q/K/V linears into one).
Anchored on each SDPA node, it matches::

    x ─ linear(W [3D, Din], b) ─ split(D) ─┬ q ─ view [B,S,N,H] ─ transpose(1,2) ─┐
                                           ├ k ─ view ─ transpose ─────────────────┼ SDPA ─ transpose(1,2) ─ [clone] ─ view [B,S,D]
                                           └ v ─ view ─ transpose ─────────────────┘

and produces ``fxopt.packed_attention(x, W, b, mask, N, causal, scale, fill)``
(com.microsoft Attention: the QKV GEMM, the heads and attention in one kernel;
no Split, Transpose or Reshape left around it). The attention must be causal
(``is_causal``, GPT-2) or carry a *key-padding* mask (BERT, MiniLM): a mask
proved, op by op, to be ``where(attention_mask[b, k] != 0, 0, fill)`` (or
``zeros.masked_fill(attention_mask == 0, fill)``; aranges and all-true parts
may be constants that constant-fold folded) broadcast over heads and queries,
with ``attention_mask`` a 2-D graph value, or the boolean ``attention_mask[b,
k] != 0`` itself (transformers' default SDPA attention, ``fill = -inf``);
``fill`` is kept as the kernel's ``mask_filter_value``. A constant mask that is
causal (static shapes, where constant-fold folded it) counts as ``is_causal``.

After ``quantize(mode=dynamic, act_granularity=tensor)`` the projection is an
``fxopt.linear_dynamic_int8``; the block then becomes
``fxopt.packed_attention_dynamic_int8(x, W_q, w_scale, b, ...)`` (com.microsoft
QAttention: the int8 QKV GEMM writes the heads itself), so the projection stays
int8.

GQA (Llama): SDPA with ``is_causal`` and no mask whose key and value are
``repeat_kv`` of fewer heads (unsqueeze, expand, [clone], reshape), or that has
``enable_gqa``, becomes ``fxopt.group_query_attention`` on ``[B, S, heads*H]``
tensors (com.microsoft GroupQueryAttention); repeat_kv is dropped, and a
``view + transpose`` head split is read through instead of copied back.

Refuses (the SDPA stays, for the generic MultiHeadAttention lowering; the
reason is in ``stats["refused"]``, node name -> reason): a float or boolean
mask that is not a key-padding one, a mask together with ``is_causal``, dropout,
q/k/v that are not the three equal parts of one linear with a constant weight,
intermediate values used elsewhere (the projection would run twice), non-static
heads or head size,
GQA with a mask or without ``is_causal``, queries and keys of different
lengths (a KV cache with past), a QKV projection that ``quantize`` replaced by
anything but a per-tensor dynamic int8 linear (per-token scales, weight-only
int4/int8, static: no ONNX Runtime attention kernel takes them; ``pack-attention``
runs after ``quantize`` so such a projection stays quantized).

Why a graph walk and not the rewrite engine (:mod:`.rewrite`): the head split
and merge are views whose shape lists hold symbolic sizes (``[B, S, N, H]``
with dynamic ``B``, ``S``), which the engine compares as literals, and the
key-padding proof follows a chain of varying length back to the input mask.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from ..ir.nodes import call_args, is_pure, same_shape, val
from .attention import is_constant_causal_mask
from .base import Option, Pass, PassResult
from .registry import register_pass

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}
_TO = {aten._to_copy.default, aten.to.dtype}
_AND = {aten.__and__.Tensor, aten.logical_and.default, aten.bitwise_and.Tensor}
LINEAR_INT8 = torch.ops.fxopt.linear_dynamic_int8.default


class Refuse(Exception):
    """The block cannot be lowered exactly; the message says why."""


_args = call_args


def _is(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _dead_nodes(graph) -> set[fx.Node]:
    """Pure nodes whose results reach nothing (what a later ``dce`` removes,
    e.g. the scores matmul ``fuse-attention`` left): not users that count."""
    dead: set[fx.Node] = set()
    for node in reversed(list(graph.fx.nodes)):
        if is_pure(node) and all(u in dead for u in node.users):
            dead.add(node)
    return dead


def _users(node: fx.Node, dead: set) -> set[fx.Node]:
    return {u for u in node.users if u not in dead}


def _only_user(node: fx.Node, user: fx.Node, dead: set) -> None:
    users = _users(node, dead)
    if users != {user}:
        others = sorted(u.name for u in users if u is not user)
        raise Refuse(f"%{node.name} is also used by {others}")


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _split_heads_of(t: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    """``t = transpose(view(src, [B, S, n, H]), 1, 2)`` -> (src, view, transpose)."""
    if _is(t, {aten.transpose.int}):
        if sorted(_dim(d, 4) for d in t.args[1:3]) != [1, 2]:
            raise Refuse(f"%{t.name} transposes dims {t.args[1:3]}, not the head and sequence dims")
    elif _is(t, {aten.permute.default}):
        if [_dim(d, 4) for d in t.args[1]] != [0, 2, 1, 3]:
            raise Refuse(f"%{t.name} permutes {t.args[1]}, not [0, 2, 1, 3]")
    else:
        raise Refuse(f"%{t.name} is not a head split (transpose of a [B, S, N, H] view)")
    v = t.args[0]
    if not _is(v, _VIEWS):
        raise Refuse(f"%{v.name} is not a view of [B, S, N*H] into heads")
    src = v.args[0]
    sv, vv = val(src), val(v)
    if not (isinstance(sv, torch.Tensor) and sv.dim() == 3 and vv.dim() == 4 and same_shape(vv.shape[:2], sv.shape[:2])
            and isinstance(vv.shape[2], int) and isinstance(vv.shape[3], int) and vv.shape[2] * vv.shape[3] == sv.shape[2]):
        raise Refuse(f"%{v.name} is not a [B, S, N*H] -> [B, S, N, H] view")
    return src, v, t


def _merge_of(out: fx.Node, dead: set) -> fx.Node | None:
    """The node that holds ``out`` with its heads merged back to [B, S, N*H]
    (transpose(1, 2), optional contiguous clone, view), or None."""
    if len(_users(out, dead)) != 1:
        return None
    (t,) = _users(out, dead)
    if not (_is(t, {aten.transpose.int}) and sorted(_dim(d, 4) for d in t.args[1:3]) == [1, 2]) or len(_users(t, dead)) != 1:
        return None
    (nxt,) = _users(t, dead)
    if _is(nxt, {aten.clone.default}):
        if len(_users(nxt, dead)) != 1:
            return None
        (nxt,) = _users(nxt, dead)
    if not _is(nxt, _VIEWS):
        return None
    o, m = val(out), val(nxt)
    if m.dim() != 3 or not same_shape(m.shape, (o.shape[0], o.shape[2], o.shape[1] * o.shape[3])):
        return None
    return nxt


def _static_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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
        raise Refuse(f"literal {node!r} in the mask")
    v = val(node)
    if node.op == "placeholder":
        if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.dtype.is_floating_point and not v.dtype.is_complex:
            return _Desc("pad" if v.dtype == torch.bool else "raw", ("b", "k"), node)
        raise Refuse(f"mask input %{node.name} is not a 2-D integer or boolean tensor")
    if node.op == "get_attr":  # static shapes: constant-fold folded the aranges and "every position"
        c = graph.constant(node)
        if c is not None and c.dtype == torch.bool and bool(c.all()):
            return _Desc("true", ("*",) * c.dim())
        if c is not None and c.dtype in (torch.int32, torch.int64):
            long = [d for d, n in enumerate(c.shape) if n > 1]
            if len(long) == 1 and bool((c.flatten() == torch.arange(c.numel(), dtype=c.dtype)).all()):
                return _Desc("ar", tuple("i" if d == long[0] else "*" for d in range(c.dim())), size=c.shape[long[0]])
    if node.op != "call_function":
        raise Refuse(f"mask reads %{node.name} ({node.op})")
    t, a = node.target, _args(node) if isinstance(node.target, torch._ops.OpOverload) else list(node.args)
    if t in _TO and a[0] is not None:
        src = _describe(a[0], graph, seen)
        if src.kind in ("raw", "pad") and v.dtype == torch.bool:
            return _Desc("pad", src.dims, src.src, rows=src.rows, cols=src.cols)
        if src.kind == "ar" and not v.dtype.is_floating_point:
            return src
        raise Refuse(f"%{node.name} casts the mask to {v.dtype}")
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
        dims.insert(_dim(a[1], len(dims) + 1), "*")
        return src.with_dims(dims)
    if t == aten.expand.default:
        src = _describe(a[0], graph, seen)
        return src.with_dims(_left_pad(src.dims, len(a[1])))
    if t in (aten.arange.default, aten.arange.start, aten.arange.start_step):
        start, step = (0, 1) if t == aten.arange.default else (a[0], a[2] if t == aten.arange.start_step else 1)
        if start != 0 or step != 1:
            raise Refuse(f"%{node.name}: arange not from 0 by 1")
        return _Desc("ar", ("i",), size=v.shape[0])
    if t == aten.add.Tensor and _is(a[0], {aten.arange.default}) and a[1] == 0:
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
        raise Refuse(f"%{node.name} combines two masks")
    if t == aten.index.Tensor:
        src, idx = _describe(a[0], graph, seen), a[1]
        if src.kind not in ("raw", "pad") or src.dims != ("b", "k") or len(idx) != 2 or any(i is None for i in idx):
            raise Refuse(f"%{node.name} indexes the mask other than mask[arange(B), arange(T)]")
        out, sizes = ["*"] * v.dim(), []
        for which, i in zip(("b", "k"), idx):
            d = _describe(i, graph, seen)
            dims = _left_pad(d.dims, v.dim())
            if d.kind != "ar" or dims.count("i") != 1:
                raise Refuse(f"%{node.name}: index %{i.name} is not an arange")
            out[dims.index("i")] = which
            sizes.append(d.size)
        return _Desc(src.kind, tuple(out), src.src, rows=sizes[0], cols=sizes[1])
    raise Refuse(f"%{node.name} ({getattr(t, '__name__', t)}) is not part of a key-padding mask")


def _zeros(node, graph) -> bool:
    """A tensor of zeros: a constant, or zeros / new_zeros / zeros_like / full(0)."""
    if _is(node, {aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default}):
        return True
    if _is(node, {aten.full.default}) and node.args[1] == 0:
        return True
    c = graph.constant(node) if isinstance(node, fx.Node) else None
    return c is not None and not bool(c.any())


def _key_padding_mask(mask: fx.Node, graph, batch, keys) -> tuple[fx.Node, float, bool]:
    """``mask`` (an SDPA attn_mask) as ``(m, fill, sliced)`` where ``mask[b, h,
    q, k] == (0 if m[b, k] != 0 else fill)``, reading ``m[:batch, :keys]`` when
    ``sliced``; raises :class:`Refuse` otherwise. A boolean mask ``m[b, k] !=
    0`` gives ``fill = -inf``: a row whose every key is masked is then 0 (torch's
    SDPA), where a finite fill gives the mean of the values."""
    mv = val(mask)
    if mv.dtype == torch.bool:
        return _padding_source(_describe(mask, graph, {}), mask, batch, keys, -math.inf)
    if not _is(mask, {aten.where.ScalarOther, aten.where.Scalar, aten.where.self}):
        try:
            d = _describe(mask, graph, {})
        except Refuse:
            d = None
        if d is None or d.kind != "additive" or not d.fill < math.inf:
            raise Refuse(f"attn_mask %{mask.name} is an arbitrary float mask, not where(padding, 0, fill)")
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
        raise Refuse(f"attn_mask %{mask.name} is not where(padding, 0, fill) with fill finite or -inf")
    return _padding_source(_describe(cond, graph, {}), mask, batch, keys, number(fill))


def _padding_source(d: _Desc, mask, batch, keys, fill: float) -> tuple[fx.Node, float, bool]:
    """The 2-D input behind a described key-padding condition ``d``."""
    if d.kind != "pad" or len(d.dims) != 4 or d.dims[0] != "b" or d.dims[3] != "k" or "i" in d.dims:
        raise Refuse(f"attn_mask %{mask.name} is not a key-padding mask broadcast over heads and queries ({d.kind} {d.dims})")
    sv = val(d.src).shape
    read = (sv[0] if d.rows is None else d.rows, sv[1] if d.cols is None else d.cols)
    if not same_shape(read, (batch, keys)):
        raise Refuse(f"padding mask %{d.src.name} is read as {tuple(read)}, not [batch, keys] = [{batch}, {keys}]")
    # HF indexes the mask with arange(batch of input_ids), whose symbol may
    # differ from the mask's own batch symbol: that reads its first rows.
    return d.src, fill, not same_shape(sv, (batch, keys))


# --------------------------------------------------------------------------
# the pass

@register_pass("pack-attention")
class PackAttention(Pass):
    """Whole attention blocks -> ``fxopt.packed_attention`` / ``fxopt.group_query_attention``.

    Matches: SDPA whose q, k, v are the head-split thirds of one linear (float,
    or per-tensor dynamic int8) with a constant weight, causal or with a proved
    key-padding mask (``packed``);
    causal SDPA whose key/value have fewer heads behind repeat_kv or
    ``enable_gqa`` (``gqa``). Produces the fxopt ops (ONNX Runtime: com.microsoft
    Attention / QAttention, GroupQueryAttention); the head merge after SDPA is
    absorbed.
    Refuses (stats ``refused``: node -> reason) anything the kernels would not
    compute exactly: masks other than key padding, mask plus causal, dropout,
    KV caches (queries and keys of different lengths), GQA with a mask, shared
    intermediates. See the module docstring.
    """

    packed = Option(True, help="lower packed-QKV attention to fxopt.packed_attention")
    gqa = Option(True, help="lower grouped-query attention to fxopt.group_query_attention")
    # After quantize: a per-tensor dynamic int8 QKV projection moves into the
    # int8 packed op; any other quantized one is kept (its attention refused)
    # rather than left in float inside the packed op.
    runs_after = ("fuse-attention", "merge-linears", "quantize")
    requires = ("canonical-linear",)

    def run(self, graph) -> PassResult:
        stats = {"packed": 0, "gqa": 0, "causal": 0, "masked": 0, "dynamic_int8": 0, "refused": {}}
        self._dead = _dead_nodes(graph)
        for node in self.walk(graph, target=SDPA):
            try:
                kind = self._lower(graph, node, stats)
            except Refuse as e:
                stats["refused"][node.name] = str(e)
                continue
            stats[kind] += 1
        return PassResult(stats["packed"] + stats["gqa"] > 0, stats)

    def _lower(self, graph, sdpa: fx.Node, stats) -> str:
        q, k, v, mask, dropout, causal, scale, enable_gqa = _args(sdpa)
        if dropout:
            raise Refuse("dropout")
        qv, kv, vv = val(q), val(k), val(v)
        if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (qv, kv, vv)):
            raise Refuse("q, k, v are not 4-D")
        heads, head = qv.shape[1], qv.shape[3]
        if not (_static_int(heads) and _static_int(head)):
            raise Refuse("heads or head size not static")
        if not same_shape(qv.shape[2:3], kv.shape[2:3]):
            raise Refuse(f"queries ({qv.shape[2]}) and keys ({kv.shape[2]}) differ in length (a KV cache)")
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(head)
        if mask is not None and not causal and is_constant_causal_mask(graph, mask, qv.shape[2]):
            mask, causal = None, True
        k_src, v_src = _unrepeat(k), _unrepeat(v)
        kv_heads = val(k_src).shape[1]
        if kv_heads != heads or val(v_src).shape[1] != heads:
            if not self.gqa:
                raise Refuse("grouped-query attention (gqa=false)")
            return self._lower_gqa(graph, sdpa, q, k, v, k_src, v_src, mask, causal, scale)
        if enable_gqa and kv.shape[1] != heads:
            raise Refuse("enable_gqa with mismatched heads")
        if not self.packed:
            raise Refuse("packed=false")
        return self._lower_packed(graph, sdpa, q, k, v, mask, causal, scale, heads, head, stats)

    # -- packed QKV ---------------------------------------------------------------
    def _lower_packed(self, graph, sdpa, q, k, v, mask, causal, scale, heads, head, stats) -> str:
        parts = [_split_heads_of(t) for t in (q, k, v)]
        dead = self._dead
        for src, view, tr in parts:
            _only_user(tr, sdpa, dead)
            _only_user(view, tr, dead)
            _only_user(src, view, dead)
        items = [p[0] for p in parts]
        if not all(i.target is operator.getitem for i in items) or len({i.args[0] for i in items}) != 1:
            raise Refuse("q, k, v are not parts of one split")
        split = items[0].args[0]
        if [i.args[1] for i in items] != [0, 1, 2] or not _is(split, _SPLITS):
            raise Refuse("q, k, v are not parts 0, 1, 2 of one split")
        width = heads * head
        sizes = split.args[1] if split.target == aten.split_with_sizes.default else [split.args[1]] * 3
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        qkv = split.args[0]
        if list(sizes) != [width] * 3 or val(qkv).dim() != 3 or _dim(dim, 3) != 2 or val(qkv).shape[2] != 3 * width:
            raise Refuse(f"%{split.name} does not cut the last dim into three parts of {width}")
        _only_user(qkv, split, dead)
        if _users(split, dead) != set(items):
            raise Refuse(f"%{split.name} has other users")
        if _is(qkv, {aten.linear.default}):
            x, w, b = (list(qkv.args) + [None])[:3]
            weights, target = (w,), torch.ops.fxopt.packed_attention.default
        elif _is(qkv, {LINEAR_INT8}):
            x, w, w_scale, b = qkv.args
            weights, target = (w, w_scale), torch.ops.fxopt.packed_attention_dynamic_int8.default
        else:
            raise Refuse(f"%{qkv.name} is not a linear or a per-tensor dynamic int8 linear (q, k, v from one packed projection)")
        consts = [graph.constant(c) for c in weights]
        if any(c is None for c in consts) or consts[0].dim() != 2 or (b is not None and graph.constant(b) is None):
            raise Refuse(f"%{qkv.name}: weight or bias is not a constant")
        if val(x).dim() != 3:
            raise Refuse(f"%{qkv.name}: input is not [B, S, D]")
        m, fill, sliced = None, -10000.0, False
        if mask is not None:
            if causal:
                raise Refuse("is_causal together with an attn_mask")
            xv = val(x)
            m, fill, sliced = _key_padding_mask(mask, graph, xv.shape[0], xv.shape[1])
        merged = _merge_of(sdpa, dead)
        with graph.fx.inserting_before(merged or sdpa):
            if sliced:
                m = graph.fx.call_function(aten.slice.Tensor, (m, 0, 0, _size(graph, x, 0)))
                m = graph.fx.call_function(aten.slice.Tensor, (m, 1, 0, _size(graph, x, 1)))
            if b is None:  # both kernels take a bias; the float weight's dtype, or the int8 scales'
                b = graph.add_constant(torch.zeros(consts[0].shape[0], dtype=consts[-1].dtype), f"{w.target}_zero_bias")
            out = graph.fx.call_function(target, (x, *weights, b, m, heads, bool(causal), scale, fill))
            self._replace(graph, sdpa, merged, out, heads, head)
        if target == torch.ops.fxopt.packed_attention_dynamic_int8.default:
            stats["dynamic_int8"] += 1
        if causal:
            stats["causal"] += 1
        elif m is not None:
            stats["masked"] += 1
        return "packed"

    # -- grouped-query ------------------------------------------------------------
    def _lower_gqa(self, graph, sdpa, q, k, v, k_src, v_src, mask, causal, scale) -> str:
        if mask is not None or not causal:
            raise Refuse("GQA is lowered for causal attention without a mask only")
        qv, kv = val(q), val(k_src)
        heads, kv_heads, head = qv.shape[1], kv.shape[1], qv.shape[3]
        if not (_static_int(kv_heads) and heads % kv_heads == 0) or val(v_src).shape[1] != kv_heads:
            raise Refuse(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
        merged = _merge_of(sdpa, self._dead)
        with graph.fx.inserting_before(merged or sdpa):
            qs, ks, vs = (_to_bsd(graph, t) for t in (q, k_src, v_src))
            out = graph.fx.call_function(torch.ops.fxopt.group_query_attention.default, (qs, ks, vs, heads, kv_heads, scale))
            self._replace(graph, sdpa, merged, out, heads, head)
        return "gqa"

    @staticmethod
    def _replace(graph, sdpa, merged, out, heads, head) -> None:
        if merged is not None:
            merged.replace_all_uses_with(out)
            # dce keeps SDPA (its dropout makes it a seeded op): erase the
            # merge chain and SDPA here; the head splits before it are pure.
            node = merged
            while node is not sdpa:
                prev = node.args[0]
                if not node.users:
                    graph.fx.erase_node(node)
                node = prev
        else:
            # No head merge to absorb: give SDPA's users their [B, N, S, H] back.
            q = sdpa.args[0]
            view = graph.fx.call_function(aten.view.default, (out, [_size(graph, q, 0), _size(graph, q, 2), heads, head]))
            sdpa.replace_all_uses_with(graph.fx.call_function(aten.transpose.int, (view, 1, 2)))
        if not sdpa.users:
            graph.fx.erase_node(sdpa)


def _unrepeat(t: fx.Node) -> fx.Node:
    """The kv tensor before ``repeat_kv`` (unsqueeze(2), expand, [clone],
    reshape to [B, N, T, H]); ``t`` itself when it is not repeated."""
    r = t
    if not _is(r, _VIEWS):
        return t
    e = r.args[0]
    if _is(e, {aten.clone.default}):
        e = e.args[0]
    if not _is(e, {aten.expand.default}) or not _is(e.args[0], {aten.unsqueeze.default}):
        return t
    u = e.args[0]
    src = u.args[0]
    sv, ev, rv = val(src), val(e), val(r)
    if _dim(u.args[1], 5) != 2 or sv.dim() != 4 or ev.dim() != 5 or rv.dim() != 4:
        return t
    if not (same_shape(ev.shape[:2], sv.shape[:2]) and same_shape(ev.shape[3:], sv.shape[2:])
            and same_shape(rv.shape, (sv.shape[0], sv.shape[1] * ev.shape[2], sv.shape[2], sv.shape[3]))):
        return t
    return src


def _to_bsd(graph, t: fx.Node) -> fx.Node:
    """``t`` [B, n, S, H] as [B, S, n*H]: read through a head split when there is
    one (no copy), else transpose and reshape."""
    try:
        src, _view, _tr = _split_heads_of(t)
        return src
    except Refuse:
        pass
    tv = val(t)
    tr = graph.fx.call_function(aten.transpose.int, (t, 1, 2))
    return graph.fx.call_function(aten.reshape.default, (tr, [_size(graph, t, 0), _size(graph, t, 2), tv.shape[1] * tv.shape[3]]))


def _size(graph, t: fx.Node, d: int):
    """Dim ``d`` of ``t``: the number when static, else a ``sym_size`` node."""
    n = val(t).shape[d]
    return n if isinstance(n, int) else graph.fx.call_function(aten.sym_size.int, (t, d))
