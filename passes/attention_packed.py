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

GQA (Llama): SDPA whose key and value are ``repeat_kv`` of fewer heads
(unsqueeze, expand, [clone], reshape), or that has ``enable_gqa``, with
``is_causal`` or with a mask (a left-padded prompt's causal + padding mask, any
mask: the kernel takes it as its bias), becomes
``fxopt.group_query_attention`` on ``[B, S, heads*H]`` tensors (com.microsoft
GroupQueryAttention); repeat_kv is dropped, and a ``view + transpose`` head
split is read through instead of copied back. A mask proved to stay within
the causal triangle (``CausalMasks.within_causal``: a causal part and'ed with
padding, a window, anything; stats ``causal_mask``) goes with ``causal`` set:
the kernel then reads no key after its query and applies the mask to the rest.

A decode step (a KV cache): SDPA whose key and value are ``cat([past, new],
dim=2)`` (behind repeat_kv or not), one query per sequence, no ``is_causal``,
any mask, becomes ``fxopt.attention_with_past(q, k_new, v_new, past_k, past_v,
mask, N, kvN, scale)`` (com.microsoft GroupQueryAttention with past_key /
past_value: the kernel appends the new keys and values itself and takes the
mask as ``attention_bias``; GQA without repeat_kv, MHA as kvN = N), whose
present key/value replace the concatenations' other uses (the graph's cache
outputs). When the query and the new key are transformers' rotary embedding
(``x * cos + rotate_half(x) * sin``) by tables that are a function of the
positions input alone (:mod:`.analyses.rotary`), the rotation moves into the op
too: ``fxopt.attention_with_past(..., cos_cache, sin_cache, position_ids)``,
GroupQueryAttention's ``do_rotary`` with the tables as constants and the
model's positions per row, for heads of a multiple of 16 (the kernel's
rotary; stats ``rotary``; why a rotation stayed in the graph:
``rotary_refused``). A prompt's rotation moves into
``fxopt.group_query_attention(..., cos_cache, sin_cache)`` when its tables
read no input (a forward traced with static shapes that counts its positions
from 0 itself: the tables, evaluated, are the rows of positions 0 .. S-1,
which the kernel reads for a prompt) and nothing else reads the rotated query
and key; a prompt at the positions of an input stays rotated in the graph: the
kernel counts every row of a prompt from 0, and a left-padded batch's rows
start elsewhere.

Refuses (the SDPA stays, for the generic MultiHeadAttention lowering; the
reason is in ``stats["refused"]``, node name -> reason): a float or boolean
mask that is not a key-padding one, a mask together with ``is_causal``, dropout,
q/k/v that are not the three equal parts of one linear with a constant weight,
intermediate values used elsewhere (the projection would run twice), non-static
heads or head size,
GQA with both a mask and ``is_causal``, queries and keys of different
lengths that are not a cache concatenation, a cache with more than one query
or with ``is_causal``, a QKV projection that ``quantize`` replaced by
anything but a per-tensor dynamic int8 linear (per-token scales, weight-only
int4/int8, static: no ONNX Runtime attention kernel takes them; ``pack-attention``
runs after ``quantize`` so such a projection stays quantized).

How it matches: the pieces of the block are patterns on the rewrite engine
(:mod:`.rewrite`): the head split (``view`` with :class:`~.rewrite.Size`
wildcards for the symbolic ``[B, S, N, H]``, then ``transpose`` or
``permute``), the QKV split into three parts, the head merge after SDPA and
transformers' ``repeat_kv``, each with a check on shapes, asked about one node
with :func:`~.rewrite.match_at`. The pass itself decides about the block: it
starts from each SDPA (whose mask, causality and dropout decide the kernel),
reads the projection's op (one node: which kernel takes it), checks through
the :class:`~.analyses.Liveness` analysis that no piece is used elsewhere, and
asks the :mod:`mask analyses <.analyses.masks>` whether a mask is key padding
or a folded causal table. The block is not one pattern: its three head splits,
optional merge and the mask and GQA choices would be dozens of traced
variants, and the replacement depends on proofs about the mask.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from ..ir.nodes import VIEWS, call_args, dim_index, is_call, same_shape, size_value, val
from .analyses import CausalMasks, KeyPaddingMasks, Liveness, NotKeyPadding, NotRotary, RotaryEmbeddings
from .base import Option, Pass, PassResult
from .registry import register_pass
from .rewrite import Match, Pattern, Reject, Size, explain_at, match_at

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
LINEAR_INT8 = torch.ops.fxopt.linear_dynamic_int8.default
ATTENTION_WITH_PAST = torch.ops.fxopt.attention_with_past.default


class Refuse(Exception):
    """The block cannot be lowered exactly; the message says why."""


def _users(node: fx.Node, dead: set) -> set[fx.Node]:
    return {u for u in node.users if u not in dead}


def _only_user(node: fx.Node, user: fx.Node, dead: set) -> None:
    users = _users(node, dead)
    if users != {user}:
        others = sorted(u.name for u in users if u is not user)
        raise Refuse(f"%{node.name} is also used by {others}")


# --------------------------------------------------------------------------
# the pieces of an attention block, as patterns on the rewrite engine. Sizes
# of views are symbolic with a dynamic batch or sequence (Size wildcards);
# example sizes differ from every dim literal of the same function, so that
# tracing captures only the sizes.

def _require(ok: bool, reason: str) -> bool:
    if not ok:
        raise Reject(reason)
    return True


def _heads_transpose(src, b: Size, s: Size, n: Size, h: Size, d0: int, d1: int):
    return src.view(b, s, n, h).transpose(d0, d1)


def _heads_permute(src, b: Size, s: Size, n: Size, h: Size, p0: int, p1: int, p2: int, p3: int):
    return src.view(b, s, n, h).permute(p0, p1, p2, p3)


def _heads_fit(m: Match) -> bool:
    """``[B, S, N*H] -> [B, S, N, H]`` with static ``N``, ``H``."""
    view = m.anchor.args[0]
    sv, vv = val(m["src"]), val(view)
    return _require(isinstance(sv, torch.Tensor) and sv.dim() == 3 and vv.dim() == 4 and same_shape(vv.shape[:2], sv.shape[:2])
                    and _static_int(vv.shape[2]) and _static_int(vv.shape[3]) and vv.shape[2] * vv.shape[3] == sv.shape[2],
                    f"%{view.name} is not a [B, S, N*H] -> [B, S, N, H] view")


_HEAD_DIMS = lambda d: _require(dim_index(d, 4) in (1, 2), f"transpose of dim {d}, not of the head and sequence dims")
_HEADS_SHAPES = {"src": (4, 5, 42), "b": 4, "s": 5, "n": 6, "h": 7, "d0": 1, "d1": 2, "p0": 0, "p1": 2, "p2": 1, "p3": 3}
_HEAD_SPLITS = {  # by the op that moves the heads
    aten.transpose.int: Pattern("heads-transpose", _heads_transpose, build=lambda m, g: None, inputs=_HEADS_SHAPES, op_classes=[VIEWS],
            where={"d0": _HEAD_DIMS, "d1": _HEAD_DIMS},
            check=lambda m: _require(m["d0"] % 4 != m["d1"] % 4, "transpose swaps nothing") and _heads_fit(m)),
    aten.permute.default: Pattern("heads-permute", _heads_permute, build=lambda m, g: None, inputs=_HEADS_SHAPES, op_classes=[VIEWS],
            where={f"p{i}": (lambda i: lambda d: _require(dim_index(d, 4) == (0, 2, 1, 3)[i], "not a permute(0, 2, 1, 3)"))(i)
                   for i in range(4)},
            check=_heads_fit),
}


def _merge(moved, b: Size, s: Size, d: Size):
    return moved.view(b, s, d)


def _moved(out, e0: int, e1: int):
    return out.transpose(e0, e1)


def _moved_contiguous(out, e0: int, e1: int):
    return out.transpose(e0, e1).contiguous()


def _permuted(out):
    return out.permute(0, 2, 1, 3)


def _permuted_contiguous(out):
    return out.permute(0, 2, 1, 3).contiguous()


def _merge_fits(m: Match) -> bool:
    o, merged = val(m["out"]), val(m.anchor)
    if "e0" in m:
        _require(sorted(dim_index(d, 4) for d in (m["e0"], m["e1"])) == [1, 2], "transpose of other dims than heads and sequence")
    return _require(merged.dim() == 3 and same_shape(merged.shape, (o.shape[0], o.shape[2], o.shape[1] * o.shape[3])),
                    f"%{m.anchor.name} is not [B, S, N*H]")


_HEAD_MERGE = Pattern(
    "heads-merge", _merge, build=lambda m, g: None, op_classes=[VIEWS], check=_merge_fits,
    inputs={"moved": (2, 3, 4, 5), "out": (2, 4, 3, 5), "b": 2, "s": 3, "d": 20, "e0": 1, "e1": 2},
    alternatives={"moved": {"contiguous": _moved_contiguous, "plain": _moved, "permuted": _permuted,
                            "permuted-contiguous": _permuted_contiguous}})


def _qkv_split(qkv, d: int, dim: int):
    return tuple(qkv.split(d, dim))


def _qkv_split_sizes(qkv, d: int, dim: int):
    return tuple(torch.split(qkv, [d, d, d], dim))


_QKV_SHAPES = {"qkv": (2, 3, 12), "d": 4, "dim": -1}
_QKV_SPLITS = {  # by the split op
    aten.split.Tensor: Pattern("qkv-split", _qkv_split, build=lambda m, g: None, inputs=_QKV_SHAPES),
    aten.split_with_sizes.default: Pattern("qkv-split-sizes", _qkv_split_sizes, build=lambda m, g: None, inputs=_QKV_SHAPES),
}


def _repeated(rep, b: Size, nr: Size, t: Size, h: Size):  # transformers' repeat_kv
    return rep.view(b, nr, t, h)


def _expand(src, u: int, b: Size, n: Size, r: Size, t: Size, h: Size):
    return src.unsqueeze(u).expand(b, n, r, t, h)


def _expand_contiguous(src, u: int, b: Size, n: Size, r: Size, t: Size, h: Size):
    return src.unsqueeze(u).expand(b, n, r, t, h).contiguous()


def _repeat_fits(m: Match) -> bool:
    sv, rv = val(m["src"]), val(m.anchor)
    _require(dim_index(m["u"], 5) == 2 and sv.dim() == 4 and rv.dim() == 4, "not an unsqueeze of dim 2 of a 4-D value")
    ev = val(m.anchor.args[0]) if m.chosen["rep"] == "plain" else val(m.anchor.args[0].args[0])
    return _require(same_shape(ev.shape[:2], sv.shape[:2]) and same_shape(ev.shape[3:], sv.shape[2:])
                    and same_shape(rv.shape, (sv.shape[0], sv.shape[1] * ev.shape[2], sv.shape[2], sv.shape[3])),
                    "the reshape does not fold the repeats into the heads")


_REPEAT_KV = Pattern(
    "repeat-kv", _repeated, build=lambda m, g: None, op_classes=[VIEWS], check=_repeat_fits,
    inputs={"rep": (3, 5, 7, 11, 13), "src": (3, 5, 11, 13), "u": 2, "b": 3, "n": 5, "r": 7, "t": 11, "h": 13, "nr": 35},
    alternatives={"rep": {"plain": _expand, "contiguous": _expand_contiguous}})  # a plain clone is canonicalized away


def _head_split(graph, t: fx.Node) -> Match:
    """``t = transpose(view(src, [B, S, n, H]), 1, 2)`` (or permute), as a match
    binding ``src``; raises :class:`Refuse` with the engine's reason."""
    pattern = _HEAD_SPLITS.get(t.target) if isinstance(t, fx.Node) else None
    if pattern is None:
        raise Refuse(f"%{getattr(t, 'name', t)} is not a head split (transpose of a [B, S, N, H] view)")
    m = match_at(pattern, t, graph)
    if m is None:
        raise Refuse(f"%{t.name} is not a head split (transpose of a [B, S, N, H] view): {explain_at(pattern, t, graph)}")
    return m


def _merge_of(graph, out: fx.Node, dead: set) -> fx.Node | None:
    """The node that holds ``out`` with its heads merged back to [B, S, N*H]
    (transpose(1, 2), optional contiguous clone, view), or None."""
    chain = [out]
    while len(chain) < 4 and len(_users(chain[-1], dead)) == 1:
        (nxt,) = _users(chain[-1], dead)
        chain.append(nxt)
        if nxt.target in _HEAD_MERGE.anchor_ops:
            m = match_at(_HEAD_MERGE, nxt, graph)
            return nxt if m is not None and m["out"] is out else None
    return None


def _unrepeat(graph, t: fx.Node) -> fx.Node:
    """The kv tensor before ``repeat_kv`` (unsqueeze(2), expand, [clone],
    reshape to [B, N, T, H]); ``t`` itself when it is not repeated."""
    m = match_at(_REPEAT_KV, t, graph) if is_call(t, VIEWS) else None  # (the pattern is traced on first use)
    return m["src"] if m is not None else t


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
    ``enable_gqa`` (``gqa``); a decode step's SDPA against ``cat(past, new)``
    (``cache``). Produces the fxopt ops (ONNX Runtime: com.microsoft
    Attention / QAttention, GroupQueryAttention, with past for ``cache``); the
    head merge after SDPA is absorbed.
    Refuses (stats ``refused``: node -> reason) anything the kernels would not
    compute exactly: masks other than key padding, mask plus causal, dropout,
    KV caches (queries and keys of different lengths), GQA with a mask and
    is_causal, shared intermediates. A decode step's rotary embedding moves
    into its op (``rotary``). See the module docstring.
    """

    packed = Option(True, help="lower packed-QKV attention to fxopt.packed_attention")
    gqa = Option(True, help="lower grouped-query attention to fxopt.group_query_attention")
    cache = Option(True, help="lower a decode step's attention against concat(past, new) to fxopt.attention_with_past")
    rotary = Option(True, help="fold the rotary embedding of the query and key into the attention op "
                               "(GroupQueryAttention's do_rotary): a decode step's, and a prompt's of fixed positions")
    # After quantize: a per-tensor dynamic int8 QKV projection moves into the
    # int8 packed op; any other quantized one is kept (its attention refused)
    # rather than left in float inside the packed op.
    runs_after = ("fuse-attention", "merge-linears", "quantize")
    requires = ("canonical-linear",)
    # facts about a mask are facts about its value, which packing attention keeps
    preserves = (CausalMasks, KeyPaddingMasks, RotaryEmbeddings)

    def run(self, graph) -> PassResult:
        stats = {"packed": 0, "gqa": 0, "cache": 0, "causal": 0, "masked": 0, "dynamic_int8": 0, "rotary": 0,
                 "causal_mask": 0, "refused": {}, "rotary_refused": {}}
        self._dead = self.analysis(Liveness, graph).dead
        self._tables: dict[int, tuple[fx.Node, fx.Node]] = {}  # rotary tables -> their constants
        for node in self.walk(graph, target=SDPA):
            try:
                kind = self._lower(graph, node, stats)
            except Refuse as e:
                stats["refused"][node.name] = str(e)
                continue
            stats[kind] += 1
        return PassResult(stats["packed"] + stats["gqa"] + stats["cache"] > 0, stats)

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
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(head)
        k_src, v_src = _unrepeat(graph, k), _unrepeat(graph, v)
        k_cat, v_cat = _reshaped_cache(k_src), _reshaped_cache(v_src)
        if _cache_parts(k_cat) and _cache_parts(v_cat):
            if not self.cache:
                raise Refuse("attention with a KV cache (cache=false)")
            return self._lower_cache(graph, sdpa, q, k, k_cat, v, v_cat, mask, causal, scale, heads, head, stats)
        if not same_shape(qv.shape[2:3], kv.shape[2:3]):
            raise Refuse(f"queries ({qv.shape[2]}) and keys ({kv.shape[2]}) differ in length (a KV cache that is not "
                         "concat(past, new) on the sequence dim)")
        if mask is not None and not causal and self.analysis(CausalMasks, graph).is_constant_causal(mask, qv.shape[2]):
            mask, causal = None, True
        kv_heads = val(k_src).shape[1]
        if kv_heads != heads or val(v_src).shape[1] != heads:
            if not self.gqa:
                raise Refuse("grouped-query attention (gqa=false)")
            return self._lower_gqa(graph, sdpa, q, k, v, k_src, v_src, mask, causal, scale, stats)
        if enable_gqa and kv.shape[1] != heads:
            raise Refuse("enable_gqa with mismatched heads")
        if not self.packed:
            raise Refuse("packed=false")
        return self._lower_packed(graph, sdpa, q, k, v, mask, causal, scale, heads, head, stats)

    # -- packed QKV ---------------------------------------------------------------
    def _lower_packed(self, graph, sdpa, q, k, v, mask, causal, scale, heads, head, stats) -> str:
        dead = self._dead
        items = []
        for t in (q, k, v):
            hm = _head_split(graph, t)
            view = t.args[0]
            _only_user(t, sdpa, dead)
            _only_user(view, t, dead)
            _only_user(hm["src"], view, dead)
            items.append(hm["src"])
        if not all(i.target is operator.getitem for i in items) or len({i.args[0] for i in items}) != 1:
            raise Refuse("q, k, v are not parts of one split")
        split = items[0].args[0]
        pattern = _QKV_SPLITS.get(getattr(split, "target", None))
        sm = match_at(pattern, items[0], graph) if pattern is not None else None
        if sm is None or sm.outputs != items:
            why = f": {explain_at(pattern, items[0], graph)}" if pattern is not None and sm is None else ""
            raise Refuse(f"q, k, v are not parts 0, 1, 2 of one split{why}")
        width = heads * head
        qkv = sm["qkv"]
        if sm["d"] != width or val(qkv).dim() != 3 or dim_index(sm["dim"], 3) != 2 or val(qkv).shape[2] != 3 * width:
            raise Refuse(f"%{split.name} does not cut the last dim into three parts of {width}")
        _only_user(qkv, split, dead)
        if _users(split, dead) != set(items):
            raise Refuse(f"%{split.name} has other users")
        # the projection is one node: its op says which kernel takes it
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
        merged = _merge_of(graph, sdpa, dead)
        with graph.fx.inserting_before(merged or sdpa):
            if sliced:
                m = graph.fx.call_function(aten.slice.Tensor, (m, 0, 0, size_value(graph, x, 0)))
                m = graph.fx.call_function(aten.slice.Tensor, (m, 1, 0, size_value(graph, x, 1)))
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
    def _lower_gqa(self, graph, sdpa, q, k, v, k_src, v_src, mask, causal, scale, stats) -> str:
        if mask is not None and causal:
            raise Refuse("GQA with both a mask and is_causal")
        if mask is not None and val(mask).dim() > 4:
            raise Refuse("mask of more than 4 dims")
        qv, kv = val(q), val(k_src)
        heads, kv_heads, head = qv.shape[1], kv.shape[1], qv.shape[3]
        if not (_static_int(kv_heads) and heads % kv_heads == 0) or val(v_src).shape[1] != kv_heads:
            raise Refuse(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
        merged = _merge_of(graph, sdpa, self._dead)
        if mask is not None and self.analysis(CausalMasks, graph).within_causal(mask):
            causal = True  # the kernel runs causal and applies the mask to the keys it reads
            stats["causal_mask"] += 1
        q_in, k_in, rotary = self._rotary(graph, sdpa, q, k_src, stats, prompt=True)
        with graph.fx.inserting_before(merged or sdpa):
            qs, ks, vs = (_to_bsd(graph, t) for t in (q_in, k_in, v_src))
            args = (qs, ks, vs, heads, kv_heads, scale) + (() if causal and mask is None and not rotary
                                                           else (mask, bool(causal)))
            out = graph.fx.call_function(torch.ops.fxopt.group_query_attention.default, args + rotary)
            self._replace(graph, sdpa, merged, out, heads, head)
        return "gqa"

    # -- a decode step against its KV cache ----------------------------------------
    def _lower_cache(self, graph, sdpa, q, k, k_all, v, v_all, mask, causal, scale, heads, head, stats) -> str:
        (past_k, new_k), (past_v, new_v) = _cache_parts(k_all), _cache_parts(v_all)
        if causal:
            raise Refuse("is_causal against a KV cache (torch aligns that mask with the first key, not the last)")
        q_len = val(q).shape[2]
        if not (_static_int(q_len) and q_len == 1):
            raise Refuse(f"{q_len} queries against a KV cache: GroupQueryAttention takes one query per sequence of a "
                         "batch with a past (a decode step)")
        pk, pv = val(past_k), val(past_v)
        kv_heads = pk.shape[1]
        if not (_static_int(kv_heads) and heads % kv_heads == 0 and pv.shape[1] == kv_heads):
            raise Refuse(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
        if not (pk.shape[3] == head and pv.shape[3] == head):
            raise Refuse(f"key/value head size {pk.shape[3]}/{pv.shape[3]} differs from the query's {head}")
        if mask is not None and val(mask).dim() > 4:
            raise Refuse("mask of more than 4 dims")
        # the cache tensors' other users (the graph's present outputs) read the
        # op's present instead: they must come after it
        chain = _chain(k, k_all) | _chain(v, v_all) | {sdpa}
        order = {n: i for i, n in enumerate(graph.fx.nodes)}
        early = [u.name for t in (k_all, v_all) for u in _users(t, self._dead) if u not in chain and order[u] < order[sdpa]]
        if early:
            raise Refuse(f"the grown cache is read before the attention by {early}")
        merged = _merge_of(graph, sdpa, self._dead)
        q_in, k_in, rotary = self._rotary(graph, sdpa, q, new_k, stats, prompt=False)
        with graph.fx.inserting_before(sdpa):
            qs, ks, vs = (_to_bsd(graph, t) for t in (q_in, k_in, new_v))
            node = graph.fx.call_function(ATTENTION_WITH_PAST, (qs, ks, vs, past_k, past_v, mask, heads, kv_heads, scale,
                                                                *rotary))
            out, present_k, present_v = (graph.fx.call_function(operator.getitem, (node, i)) for i in range(3))
            k_all.replace_all_uses_with(present_k, delete_user_cb=lambda u: u not in chain)
            v_all.replace_all_uses_with(present_v, delete_user_cb=lambda u: u not in chain)
            self._replace(graph, sdpa, merged, out, heads, head)
        return "cache"

    def _rotary(self, graph, sdpa, q, k, stats, prompt: bool) -> tuple[fx.Node, fx.Node, tuple]:
        """``(x_q, x_k, (cos table, sin table[, positions]))`` when ``q`` and
        ``k`` are the rotary embedding of ``x_q`` and ``x_k`` by one pair of
        tables the kernel can take (:mod:`.analyses.rotary`): a decode step's
        indexed by a positions input, a prompt's fixed (positions 0 .. S-1, what
        the kernel counts for a prompt); else ``(q, k, ())``, the rotation left
        in the graph (why in ``stats["rotary_refused"]``)."""
        if not self.rotary:
            return q, k, ()
        rope = self.analysis(RotaryEmbeddings, graph)
        rq, rk = rope.rotation(q), rope.rotation(k)
        if rq is None and rk is None:
            return q, k, ()
        try:
            if rq is None or rk is None:
                raise NotRotary(f"only the {'key' if rq is None else 'query'} is rotated")
            if (rq.cos, rq.sin) != (rk.cos, rk.sin):
                raise NotRotary("the query and the key are rotated by different tables")
            head = val(rq.x).shape[3]
            if head % 16:
                raise NotRotary(f"head size {head}: GroupQueryAttention rotates heads of a multiple of 16 only")
            tables = rope.tables(rq)
            if prompt and tables.positions is not None:
                raise NotRotary(f"a prompt rotated at the positions of %{tables.positions.name}: GroupQueryAttention "
                                "rotates a prompt from position 0 in every row (a left-padded row starts elsewhere)")
            if not prompt and tables.positions is None:
                raise NotRotary("the rotary tables read no positions input: a decode step's positions are not fixed")
            if prompt and (_users(q, self._dead) - {sdpa} or _users(k, self._dead) - _chain(sdpa.args[1], k) - {sdpa}):
                raise NotRotary("the rotated query or key is read elsewhere (a cache output): the rotation would run twice")
        except NotRotary as e:
            stats["rotary_refused"][sdpa.name] = str(e)
            return q, k, ()
        if id(tables) not in self._tables:
            self._tables[id(tables)] = (graph.add_constant(tables.cos, "rotary_cos_cache"),
                                        graph.add_constant(tables.sin, "rotary_sin_cache"))
        stats["rotary"] += 1
        return rq.x, rk.x, (*self._tables[id(tables)], *(() if prompt else (tables.positions,)))

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
            view = graph.fx.call_function(aten.view.default, (out, [size_value(graph, q, 0), size_value(graph, q, 2), heads, head]))
            sdpa.replace_all_uses_with(graph.fx.call_function(aten.transpose.int, (view, 1, 2)))
        if not sdpa.users:
            graph.fx.erase_node(sdpa)


def _cache_parts(t) -> tuple[fx.Node, fx.Node] | None:
    """``(past, new)`` when ``t`` is ``cat([past, new], dim=2)`` of 4-D
    ``[B, heads, length, H]`` tensors (a KV cache grown by one step), else None."""
    if not is_call(t, {aten.cat.default}):
        return None
    tensors, dim = (list(t.args) + [0])[:2]
    if len(tensors) != 2 or val(t).dim() != 4 or dim_index(t.kwargs.get("dim", dim), 4) != 2:
        return None
    return tensors[0], tensors[1]


_SAME_VIEWS = {aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten.expand.default, aten.clone.default,
               aten._unsafe_view.default}


def _reshaped_cache(t):
    """The cache concatenation that ``t`` is a same-shape view of (repeat_kv
    with one repeat, canonicalized to unsqueeze + view), else ``t``."""
    node = t
    for _ in range(4):
        if not is_call(node, _SAME_VIEWS):
            break
        node = node.args[0]
        if _cache_parts(node) and same_shape(val(node).shape, val(t).shape):
            return node
    return t


def _chain(node: fx.Node, stop: fx.Node) -> set[fx.Node]:
    """The nodes from ``node`` back to ``stop`` through first arguments (repeat_kv)."""
    seen = set()
    while isinstance(node, fx.Node) and node is not stop and len(seen) < 8:
        seen.add(node)
        node = node.args[0] if node.args else None
    return seen


def _to_bsd(graph, t: fx.Node) -> fx.Node:
    """``t`` [B, n, S, H] as [B, S, n*H]: read through a head split when there is
    one (no copy), else transpose and reshape."""
    try:
        return _head_split(graph, t)["src"]
    except Refuse:
        pass
    tv = val(t)
    tr = graph.fx.call_function(aten.transpose.int, (t, 1, 2))
    return graph.fx.call_function(aten.reshape.default, (tr, [size_value(graph, t, 0), size_value(graph, t, 2), tv.shape[1] * tv.shape[3]]))
