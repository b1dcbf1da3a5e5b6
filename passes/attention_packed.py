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

from ..ir.nodes import VIEWS, call_args, dim_index, is_call, same_shape, val
from .analyses import CausalMasks, KeyPaddingMasks, Liveness, NotKeyPadding
from .base import Option, Pass, PassResult
from .registry import register_pass

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}
LINEAR_INT8 = torch.ops.fxopt.linear_dynamic_int8.default


class Refuse(Exception):
    """The block cannot be lowered exactly; the message says why."""


def _users(node: fx.Node, dead: set) -> set[fx.Node]:
    return {u for u in node.users if u not in dead}


def _only_user(node: fx.Node, user: fx.Node, dead: set) -> None:
    users = _users(node, dead)
    if users != {user}:
        others = sorted(u.name for u in users if u is not user)
        raise Refuse(f"%{node.name} is also used by {others}")


def _split_heads_of(t: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    """``t = transpose(view(src, [B, S, n, H]), 1, 2)`` -> (src, view, transpose)."""
    if is_call(t, {aten.transpose.int}):
        if sorted(dim_index(d, 4) for d in t.args[1:3]) != [1, 2]:
            raise Refuse(f"%{t.name} transposes dims {t.args[1:3]}, not the head and sequence dims")
    elif is_call(t, {aten.permute.default}):
        if [dim_index(d, 4) for d in t.args[1]] != [0, 2, 1, 3]:
            raise Refuse(f"%{t.name} permutes {t.args[1]}, not [0, 2, 1, 3]")
    else:
        raise Refuse(f"%{t.name} is not a head split (transpose of a [B, S, N, H] view)")
    v = t.args[0]
    if not is_call(v, VIEWS):
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
    if not (is_call(t, {aten.transpose.int}) and sorted(dim_index(d, 4) for d in t.args[1:3]) == [1, 2]) or len(_users(t, dead)) != 1:
        return None
    (nxt,) = _users(t, dead)
    if is_call(nxt, {aten.clone.default}):
        if len(_users(nxt, dead)) != 1:
            return None
        (nxt,) = _users(nxt, dead)
    if not is_call(nxt, VIEWS):
        return None
    o, m = val(out), val(nxt)
    if m.dim() != 3 or not same_shape(m.shape, (o.shape[0], o.shape[2], o.shape[1] * o.shape[3])):
        return None
    return nxt


def _static_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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
        self._dead = self.analysis(Liveness, graph).dead
        for node in self.walk(graph, target=SDPA):
            try:
                kind = self._lower(graph, node, stats)
            except Refuse as e:
                stats["refused"][node.name] = str(e)
                continue
            stats[kind] += 1
        return PassResult(stats["packed"] + stats["gqa"] > 0, stats)

    def _lower(self, graph, sdpa: fx.Node, stats) -> str:
        q, k, v, mask, dropout, causal, scale, enable_gqa = call_args(sdpa)
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
        if mask is not None and not causal and self.analysis(CausalMasks, graph).is_constant_causal(mask, qv.shape[2]):
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
        if [i.args[1] for i in items] != [0, 1, 2] or not is_call(split, _SPLITS):
            raise Refuse("q, k, v are not parts 0, 1, 2 of one split")
        width = heads * head
        sizes = split.args[1] if split.target == aten.split_with_sizes.default else [split.args[1]] * 3
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        qkv = split.args[0]
        if list(sizes) != [width] * 3 or val(qkv).dim() != 3 or dim_index(dim, 3) != 2 or val(qkv).shape[2] != 3 * width:
            raise Refuse(f"%{split.name} does not cut the last dim into three parts of {width}")
        _only_user(qkv, split, dead)
        if _users(split, dead) != set(items):
            raise Refuse(f"%{split.name} has other users")
        if is_call(qkv, {aten.linear.default}):
            x, w, b = (list(qkv.args) + [None])[:3]
            weights, target = (w,), torch.ops.fxopt.packed_attention.default
        elif is_call(qkv, {LINEAR_INT8}):
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
            try:
                kp = self.analysis(KeyPaddingMasks, graph).prove(mask, xv.shape[0], xv.shape[1])
            except NotKeyPadding as e:
                raise Refuse(str(e)) from None
            m, fill, sliced = kp.source, kp.fill, kp.sliced
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
    if not is_call(r, VIEWS):
        return t
    e = r.args[0]
    if is_call(e, {aten.clone.default}):
        e = e.args[0]
    if not is_call(e, {aten.expand.default}) or not is_call(e.args[0], {aten.unsqueeze.default}):
        return t
    u = e.args[0]
    src = u.args[0]
    sv, ev, rv = val(src), val(e), val(r)
    if dim_index(u.args[1], 5) != 2 or sv.dim() != 4 or ev.dim() != 5 or rv.dim() != 4:
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
