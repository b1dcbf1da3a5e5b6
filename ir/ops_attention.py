"""Attention ops and their ONNX Runtime lowerings.

**Generic SDPA.** ``aten.scaled_dot_product_attention`` (what ``fuse-attention`` produces, and what
Hugging Face's SDPA attention exports as) becomes ONNX Runtime's
``com.microsoft.MultiHeadAttention``: one kernel for ``softmax(q k^T * s + bias) v``
with the causal mask (``unidirectional``) built in, instead of the MatMul,
Softmax, Where, IsNaN chain the generic lowering emits. The query goes in as
``[B, S, N*H]``; key and value stay ``[B, N, T, H]`` (the BNSH layout
MultiHeadAttention accepts for them), so no copy of the KV tensors is added.

Falls back to the generic lowering (onnxscript's torchlib) when the lowering
would not be exact: heads or head size not static, dropout, a key with fewer
heads than the query (GQA without repeat_kv), a causal flag with queries and keys
of different lengths, or inputs that are not 4-D.

Masks go in without ``-inf``: a query whose every key is masked (the padded
rows of a left-padded decoder batch, or an all-padding sequence) gets weight 0
from torch's SDPA, while ONNX Runtime's softmax over a row of ``-inf`` gives NaN,
and the next layer's keys carry that NaN into every real token. Both lowerings
therefore take the mask as a finite bias and zero those rows afterwards.

**Whole attention blocks** (made by ``pack-attention``, passes/attention_packed.py):

* ``fxopt::packed_attention(x, weight, bias, mask, num_heads, causal, scale,
  mask_filter_value)``: the packed QKV projection, the head split, attention and
  the head merge in one op, ``[B, S, Din] -> [B, S, D]``. Lowers to com.microsoft
  ``Attention``, which runs the QKV GEMM itself on prepacked weights and writes
  BSNH output, so no Split, Transpose or Reshape is left around it (faster
  than MatMul + Split + MultiHeadAttention: docs/kernels.md).
* ``fxopt::packed_attention_dynamic_int8(x, w_q, w_scale, bias, mask, num_heads,
  causal, scale, mask_filter_value)``: the same block with the QKV projection a
  dynamic W8A8 linear (``fxopt::linear_dynamic_int8``: int8 codes within +-63,
  per-channel scales, ``x`` quantized per tensor at run time). Lowers to
  DynamicQuantizeLinear + com.microsoft ``QAttention``, whose int8 QKV GEMM
  writes the heads itself (timings, and the whole-model effect measured by
  ``python benchmarks/pack_attention_ab.py``: docs/kernels.md).
* ``fxopt::group_query_attention(q, k, v, num_heads, kv_num_heads, scale, mask,
  causal, cos_cache, sin_cache)``: grouped-query attention on ``[B, S, heads *
  H]`` tensors, kv head ``j`` shared by query heads ``j * N/kvN ..``, causal or
  with a mask, optionally rotating q and k first at positions 0 .. S-1; lowers
  to com.microsoft ``GroupQueryAttention`` (prefill: no past, ``seqlens_k = S -
  1``; a mask goes in as the finite ``attention_bias``, with ``causal=1`` when
  the mask masks every key after its query; the tables with ``do_rotary``).
* ``fxopt::attention_with_past(q, k, v, past_k, past_v, mask, num_heads,
  kv_num_heads, scale, cos_cache, sin_cache, position_ids)``: a decode step
  against its key/value cache, optionally rotating q and k first (the rotary
  tables indexed by each row's positions); lowers to ``GroupQueryAttention``
  with past/present (and ``do_rotary``).
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention as _generic_sdpa

from .onnx_contrib import FLOAT_TYPES, Attr, AttrType, Param, declare, msft, optional_param
from .graph import register_lookup, static_size
from .ops import define_op, register_onnx_lowering
from .ops_quant import linear_dynamic_int8

declare(
    "MultiHeadAttention",
    [
        Param("query", "T"), optional_param("key", "T"), optional_param("value", "T"), optional_param("bias", "T"),
        optional_param("key_padding_mask", "M"), optional_param("attention_bias", "T"), optional_param("past_key", "T"),
        optional_param("past_value", "T"), optional_param("past_sequence_length", "M"), optional_param("cache_indirection", "M"),
    ],
    # Only the first output: onnxscript gives a node as many outputs as its schema
    # lists, and the KV-cache outputs (present_key/value, qk) would cost copies.
    [Param("output", "T")],
    [("T", FLOAT_TYPES, ""), ("M", ["tensor(int32)"], "")],
    [
        Attr("num_heads", AttrType.INT, "number of attention heads", required=True),
        Attr("scale", AttrType.FLOAT, "scale of q k^T; default 1/sqrt(head_size)", required=False),
        Attr("mask_filter_value", AttrType.FLOAT, "value for masked positions", required=False),
        Attr("unidirectional", AttrType.INT, "1: causal", required=False),
    ],
)


def _static(*dims) -> bool:
    return all(isinstance(d, int) for d in dims)


def sdpa_to_multihead_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                                scale: float | None = None, enable_gqa: bool = False):
    qs, ks, vs = query.shape, key.shape, value.shape
    ok = (
        qs is not None and ks is not None and vs is not None
        and len(qs) == 4 and len(ks) == 4 and len(vs) == 4
        and _static(qs[1], qs[3], ks[1], ks[3], vs[1], vs[3])
        and qs[1] == ks[1] == vs[1] and qs[3] == ks[3] == vs[3]
        and not dropout_p
        and not (is_causal and not (isinstance(qs[2], int) and qs[2] == ks[2] or qs[2] is ks[2] or str(qs[2]) == str(ks[2])))
    )
    bias = keeps_row = None
    if attn_mask is not None:
        bias, keeps_row = _finite_mask(attn_mask, query)
    if not ok:
        out = _generic_sdpa(query, key, value, bias, dropout_p, is_causal, scale, enable_gqa)
        return out if keeps_row is None else op.Mul(out, keeps_row)
    heads, head = qs[1], qs[3]
    batch, q_len = op.Shape(query, start=0, end=1), op.Shape(query, start=2, end=3)
    q = op.Reshape(op.Transpose(query, perm=[0, 2, 1, 3]), op.Concat(batch, q_len, op.Constant(value_ints=[heads * head]), axis=0))
    if bias is not None:
        # MultiHeadAttention wants the last two dims of the bias at full size
        seq = op.Concat(op.Constant(value_ints=[1, 1]), q_len, op.Shape(key, start=2, end=3), axis=0)
        bias = op.Expand(bias, seq)
    out = msft.MultiHeadAttention(
        q, key, value, None, None, bias,
        num_heads=heads,
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(head),
        unidirectional=1 if is_causal else 0,
    )
    out = op.Transpose(op.Reshape(out, op.Concat(batch, q_len, op.Constant(value_ints=[heads, head]), axis=0)), perm=[0, 2, 1, 3])
    return out if keeps_row is None else op.Mul(out, keeps_row)


# Half the lowest finite value of each ONNX float type (FLOAT, FLOAT16,
# BFLOAT16, DOUBLE): exp() of a score plus this is exactly 0, as for -inf, and
# adding a score to it cannot overflow to -inf.
_MASKED_SCORE = {1: -1.7014118e38, 10: -32752.0, 16: -1.6947657e38, 11: -8.98846567431158e307}


def _finite_mask(attn_mask, query):
    """An SDPA ``attn_mask`` (bool: True attends; float: added to the
    scores) as a 4-D additive bias with no ``-inf``, and a 4-D ``[.., S, 1]``
    factor, 0 on the query rows whose every key is masked and 1 elsewhere."""
    masked = op.CastLike(_MASKED_SCORE.get(query.dtype, -32752.0), query)
    last = op.Constant(value_ints=[-1])
    if attn_mask.dtype == 9:  # BOOL
        bias = op.Where(attn_mask, op.CastLike(0.0, query), masked)
        keeps_row = op.ReduceMax(op.CastLike(attn_mask, query), last, keepdims=1)
    else:
        scores = op.CastLike(attn_mask, query)
        bias = op.Max(scores, masked)
        keeps_row = op.CastLike(op.Greater(op.ReduceMax(scores, last, keepdims=1), op.CastLike(-math.inf, query)), query)
    rank = len(attn_mask.shape) if attn_mask.shape is not None else 4
    if rank < 4:
        lead = op.Constant(value_ints=list(range(4 - rank)))
        bias, keeps_row = op.Unsqueeze(bias, lead), op.Unsqueeze(keeps_row, lead)
    return bias, keeps_row


register_onnx_lowering(torch.ops.aten.scaled_dot_product_attention.default, sdpa_to_multihead_attention, group="contrib-attention")


# --------------------------------------------------------------------------
# packed QKV attention -> com.microsoft.Attention

declare(
    "Attention",
    [Param("input", "T"), Param("weights", "T"), optional_param("bias", "T"), optional_param("mask_index", "M")],
    [Param("output", "T")],  # not ``present``: only the KV-cache form has it
    [("T", FLOAT_TYPES, ""), ("M", ["tensor(int32)"], "")],
    [
        Attr("num_heads", AttrType.INT, "number of attention heads", required=True),
        Attr("unidirectional", AttrType.INT, "1: causal", required=False),
        Attr("scale", AttrType.FLOAT, "scale of q k^T; default 1/sqrt(head_size)", required=False),
        Attr("mask_filter_value", AttrType.FLOAT, "added to masked scores", required=False),
    ],
)


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).flatten(-2)


def _packed_attention_fake(x, weight, bias, mask, num_heads, causal, scale, mask_filter_value):
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 3))


def _packed_attention_onnx(x, weight, bias, mask=None, num_heads: int = 1, causal: bool = False, scale: float = 1.0,
                           mask_filter_value: float = -10000.0):
    # Attention reads the weight as [Din, 3D]; the transpose of the constant is
    # folded into the initializer by the exporter's optimizer.
    w = op.Transpose(weight, perm=[1, 0])
    attrs = dict(num_heads=num_heads, unidirectional=1 if causal else 0, scale=float(scale))
    if mask is None:
        return msft.Attention(x, w, bias, **attrs)
    index, fill, keeps_row = _kernel_mask(mask, x, mask_filter_value)
    out = msft.Attention(x, w, bias, index, mask_filter_value=fill, **attrs)
    return out if keeps_row is None else op.Mul(out, keeps_row)


@define_op("packed_attention", fake=_packed_attention_fake, onnx=_packed_attention_onnx)
def packed_attention(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None, num_heads: int, causal: bool,
    scale: float, mask_filter_value: float,
) -> torch.Tensor:
    """Self-attention from one packed projection: ``q, k, v = split(linear(x,
    weight, bias), 3)``, each split into ``num_heads`` heads, ``softmax(q k^T *
    scale + m) v`` with the heads merged back, ``[B, S, Din] -> [B, S, D]``.
    ``m``: causal (``causal``) and/or a key-padding mask ``[B, S]`` (key ``j`` of
    row ``b`` is masked where ``mask[b, j] == 0``; masked scores get
    ``mask_filter_value`` added; -inf, as a boolean mask, makes an all-padding
    row 0). Lowers to com.microsoft Attention."""
    _check_qkv_rows("packed_attention", weight.shape[0], num_heads)
    return _attend(torch.nn.functional.linear(x, weight, bias), mask, num_heads, causal, scale, mask_filter_value)


def _check_qkv_rows(op_name: str, rows: int, num_heads: int) -> None:
    if rows % 3 or rows // 3 % num_heads:
        raise ValueError(f"fxopt::{op_name}: weight rows {rows} are not 3 x num_heads ({num_heads}) x head size")


def _attend(qkv, mask, num_heads, causal, scale, mask_filter_value):
    """Attention of the packed projection ``qkv [B, S, 3D]``, heads merged back."""
    q, k, v = (_split_heads(t, num_heads) for t in qkv.chunk(3, -1))
    bias_mask = None
    if mask is not None:
        zero = torch.zeros((), dtype=q.dtype)
        bias_mask = torch.where(mask[:, None, None, :] != 0, zero, torch.full((), mask_filter_value, dtype=q.dtype))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias_mask, is_causal=causal, scale=scale)
    return _merge_heads(out)


def _kernel_mask(mask, x, mask_filter_value: float):
    """A ``[B, T]`` key-padding mask as the kernels' int32 ``mask_index``, their
    finite ``mask_filter_value``, and, for a fill of -inf, the ``[B, 1, 1]``
    factor that zeroes the rows of an all-padding sequence (torch's SDPA gives
    0 there; the kernels' finite fill, the mean of the values); else None."""
    # ORT attends where mask > 0; torch's bool(mask) is mask != 0.
    index = op.Cast(op.Not(op.Equal(mask, op.CastLike(0, mask))), to=6)  # INT32
    if mask_filter_value > -math.inf:
        return index, float(mask_filter_value), None
    keeps_row = op.ReduceMax(op.CastLike(index, x), op.Constant(value_ints=[-1]), keepdims=1)
    return index, _MASKED_SCORE.get(x.dtype, -32752.0), op.Unsqueeze(keeps_row, op.Constant(value_ints=[-1]))


# --------------------------------------------------------------------------
# packed QKV attention, dynamic int8 projection -> com.microsoft.QAttention

declare(
    "QAttention",
    [
        Param("input", "T1"), Param("weight", "T2"), Param("bias", "T3"), Param("input_scale", "T3"),
        Param("weight_scale", "T3"), optional_param("mask_index", "T4"), optional_param("input_zero_point", "T1"),
        optional_param("weight_zero_point", "T2"),
    ],
    [Param("output", "T3")],  # not ``present``: only the KV-cache form has it
    [("T1", ["tensor(int8)", "tensor(uint8)"], ""), ("T2", ["tensor(int8)", "tensor(uint8)"], ""), ("T3", FLOAT_TYPES, ""),
     ("T4", ["tensor(int32)"], "")],
    [
        Attr("num_heads", AttrType.INT, "number of attention heads", required=True),
        Attr("unidirectional", AttrType.INT, "1: causal", required=False),
        Attr("scale", AttrType.FLOAT, "scale of q k^T; default 1/sqrt(head_size)", required=False),
        Attr("mask_filter_value", AttrType.FLOAT, "added to masked scores", required=False),
    ],
)


def _packed_attention_int8_fake(x, w_q, w_scale, bias, mask, num_heads, causal, scale, mask_filter_value):
    return x.new_empty((*x.shape[:-1], w_q.shape[0] // 3))


def _packed_attention_int8_onnx(x, w_q, w_scale, bias, mask=None, num_heads: int = 1, causal: bool = False,
                                scale: float = 1.0, mask_filter_value: float = -10000.0):
    # The codes and zero point DynamicQuantizeLinear gives are those
    # linear_dynamic_int8 lowers with; the weight zero point is 0 (symmetric).
    xq, x_scale, x_zp = op.DynamicQuantizeLinear(x)
    w = op.Transpose(w_q, perm=[1, 0])  # [Din, 3D]; folded into the initializer
    attrs = dict(num_heads=num_heads, unidirectional=1 if causal else 0, scale=float(scale))
    if mask is None:
        return msft.QAttention(xq, w, bias, x_scale, w_scale, None, x_zp, **attrs)
    index, fill, keeps_row = _kernel_mask(mask, x, mask_filter_value)
    out = msft.QAttention(xq, w, bias, x_scale, w_scale, index, x_zp, mask_filter_value=fill, **attrs)
    return out if keeps_row is None else op.Mul(out, keeps_row)


@define_op("packed_attention_dynamic_int8", fake=_packed_attention_int8_fake, onnx=_packed_attention_int8_onnx,
           onnx_float32=True)
def packed_attention_dynamic_int8(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None,
    num_heads: int, causal: bool, scale: float, mask_filter_value: float,
) -> torch.Tensor:
    """``fxopt::packed_attention`` whose packed QKV projection is
    ``fxopt::linear_dynamic_int8(x, w_q, w_scale, bias)`` (int8 ``[3D, Din]``
    codes within +-63, per-channel ``w_scale``; ``x`` quantized per tensor at
    run time), then the same heads, mask and attention. Lowers to
    DynamicQuantizeLinear + com.microsoft QAttention."""
    _check_qkv_rows("packed_attention_dynamic_int8", w_q.shape[0], num_heads)
    return _attend(linear_dynamic_int8(x, w_q, w_scale, bias), mask, num_heads, causal, scale, mask_filter_value)


# --------------------------------------------------------------------------
# grouped-query attention -> com.microsoft.GroupQueryAttention

declare(
    "GroupQueryAttention",
    [
        Param("query", "T"), optional_param("key", "T"), optional_param("value", "T"), optional_param("past_key", "T"),
        optional_param("past_value", "T"), Param("seqlens_k", "M"), Param("total_sequence_length", "M"),
        optional_param("cos_cache", "T"), optional_param("sin_cache", "T"), optional_param("position_ids", "P"),
        optional_param("attention_bias", "T"),
    ],
    # present_key / present_value: the cache with this step's keys and values
    # appended (unused after a prefill without a past: the ONNX export drops
    # unused trailing outputs of contrib ops, and the kernel then writes none)
    [Param("output", "T"), optional_param("present_key", "T"), optional_param("present_value", "T")],
    [("T", FLOAT_TYPES, ""), ("M", ["tensor(int32)"], ""), ("P", ["tensor(int64)"], "")],
    [
        Attr("num_heads", AttrType.INT, "number of query heads", required=True),
        Attr("kv_num_heads", AttrType.INT, "number of key/value heads", required=True),
        Attr("scale", AttrType.FLOAT, "scale of q k^T; default 1/sqrt(head_size)", required=False),
        Attr("causal", AttrType.INT, "1 (default): causal; 0: bidirectional (attention_bias only)", required=False),
        Attr("do_rotary", AttrType.INT, "1: rotate q and k by cos_cache / sin_cache at their positions", required=False),
        Attr("rotary_interleaved", AttrType.INT, "0 (default): rotate the two halves of each head", required=False),
    ],
)


def _gqa_fake(q, k, v, num_heads, kv_num_heads, scale, mask=None, causal=True, cos_cache=None, sin_cache=None):
    return torch.empty_like(q)


def _gqa_onnx(q, k, v, num_heads: int = 1, kv_num_heads: int = 1, scale: float = 1.0, mask=None, causal: bool = True,
              cos_cache=None, sin_cache=None):
    # Prefill without a cache: every row holds all S keys (left padding
    # included), so the last valid key index (seqlens_k) is S - 1 for each row
    # and the total length is S; padding reaches the kernel as the mask's bias.
    # A first prompt's rotary positions are 0 .. S-1 in the kernel too.
    seq = op.Shape(q, start=1, end=2)
    total = op.Cast(seq, to=6)  # INT32
    seqlens = op.Expand(op.Sub(total, op.CastLike(1, total)), op.Shape(q, start=0, end=1))
    bias = keeps_row = None
    if mask is not None:
        bias, keeps_row = _finite_mask(mask, q)
        bias = op.Expand(bias, op.Concat(op.Constant(value_ints=[1, 1]), seq, seq, axis=0))
    rotary = {} if cos_cache is None else dict(do_rotary=1, rotary_interleaved=0)
    out, _, _ = msft.GroupQueryAttention(
        q, k, v, None, None, seqlens, op.Squeeze(total), cos_cache, sin_cache, None, bias,
        num_heads=num_heads, kv_num_heads=kv_num_heads, scale=float(scale), causal=1 if causal else 0, **rotary,
    )
    return _zero_masked_rows(out, keeps_row)


def _zero_masked_rows(out, keeps_row):
    """``out [B, S, D]`` with the queries that see no key zeroed, as torch's
    SDPA gives them (``keeps_row`` ``[B|1, N|1, S, 1]`` from :func:`_finite_mask`)."""
    if keeps_row is None:
        return out
    return op.Mul(out, op.ReduceMax(keeps_row, op.Constant(value_ints=[1]), keepdims=0))


@define_op("group_query_attention", fake=_gqa_fake, onnx=_gqa_onnx)
def group_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, kv_num_heads: int, scale: float,
    mask: torch.Tensor | None = None, causal: bool = True, cos_cache: torch.Tensor | None = None,
    sin_cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped-query attention on ``[B, S, heads * H]`` tensors: ``q`` has
    ``num_heads`` heads, ``k`` and ``v`` have ``kv_num_heads``, and query head
    ``i`` reads kv head ``i // (num_heads // kv_num_heads)``. Causal
    (``causal``), or with ``mask``: an SDPA ``attn_mask`` (boolean: True
    attends; float: added) broadcastable to ``[B, num_heads, S, S]`` (a
    left-padded prompt's causal and padding mask), where a query whose every
    key is masked gives 0, as torch's SDPA does; ``causal`` with a mask says
    the mask masks every key after its query (the kernel may skip them). Returns ``[B, S, num_heads *
    H]``. With ``cos_cache`` / ``sin_cache`` ``[rows >= S, R/2]``, query and
    key ``s`` of every sequence are first rotated by row ``s`` (Hugging Face's
    rotary embedding, the two halves of each head: positions counted from 0,
    as in a prompt). A mask that is exactly causal at the call (a prompt
    without padding) runs as ``is_causal``. Lowers to com.microsoft
    GroupQueryAttention (with a mask: the mask as a finite ``attention_bias``,
    ``causal`` as given; with the tables: ``do_rotary``)."""
    if num_heads % kv_num_heads:
        raise ValueError(f"fxopt::group_query_attention: num_heads {num_heads} is not a multiple of kv_num_heads {kv_num_heads}")
    qh, kh, vh = _split_heads(q, num_heads), _split_heads(k, kv_num_heads), _split_heads(v, kv_num_heads)
    if mask is not None:
        causal = False  # the mask masks every key after its query itself
    if cos_cache is not None:
        seq = q.shape[1]
        if sin_cache is None or cos_cache.shape[0] < seq:
            raise ValueError(f"fxopt::group_query_attention: rotary tables of {cos_cache.shape[0]} rows (and a sin_cache) "
                             f"needed for {seq} positions")
        positions = torch.arange(seq, device=q.device)[None]
        cos, sin = _rotary_angles(cos_cache, sin_cache, positions)
        qh, kh = _rotate(qh, cos, sin), _rotate(kh, cos, sin)
    if mask is not None and _mask_is_causal(mask, q.shape[1]):
        mask, causal = None, True  # the causal kernel skips the blocks above the diagonal
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal, scale=scale,
                                                           enable_gqa=num_heads != kv_num_heads)
    return _merge_heads(out)


class _LastMask(threading.local):
    tensor: "weakref.ref | None" = None
    key: tuple = ()
    causal: bool = False
    lower: torch.Tensor | None = None  # the causal mask of the last length checked


_LAST_MASK = _LastMask()


def _mask_is_causal(mask: torch.Tensor, seq: int) -> bool:
    """Whether a prompt's ``mask`` ``[B|1, N|1, S, S]`` is, at this call,
    exactly the causal mask (boolean: True on and below the diagonal only;
    float: 0 there and <= -1e30 above, which weighs exactly 0), as it is for
    a batch without padding. One mask goes to every layer of a forward: the
    answer for the last mask is kept, named by the tensor's identity (a weak
    reference: a tensor freed since cannot match), its version counter (which
    in-place writes through any view bump; writes through ``.data`` or numpy
    do not), its shape and ``seq``. An inference-mode tensor has no version
    counter and is checked at each call; none is checked while a CUDA graph is
    being captured (the check reads the mask on the host)."""
    if mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    last = _LAST_MASK
    tracked = not mask.is_inference()
    key = (mask._version, tuple(mask.shape), seq) if tracked else ()
    if tracked and last.tensor is not None and last.tensor() is mask and last.key == key:
        return last.causal
    causal = False
    if mask.dim() == 4 and tuple(mask.shape[-2:]) == (seq, seq):
        lower = last.lower
        if lower is None or lower.shape[0] != seq or lower.device != mask.device:
            lower = last.lower = torch.ones(seq, seq, dtype=torch.bool, device=mask.device).tril()
        if mask.dtype == torch.bool:
            causal = torch.equal(mask, lower.expand(mask.shape))
        elif mask.is_floating_point():
            causal = bool(((mask == 0) == lower).all()) and bool((mask.masked_fill(lower, -math.inf) <= -1e30).all())
    if tracked:
        last.tensor, last.key, last.causal = weakref.ref(mask), key, causal
    return causal


# --------------------------------------------------------------------------
# attention of a decode step against its key/value cache -> com.microsoft.GroupQueryAttention

def _attention_with_past_fake(q, k, v, past_k, past_v, mask, num_heads, kv_num_heads, scale, cos_cache=None,
                              sin_cache=None, position_ids=None):
    # each past keeps its own length symbol (a traced cache tensor's dim is its own)
    present_k = past_k.new_empty((*past_k.shape[:2], past_k.shape[2] + k.shape[1], past_k.shape[3]))
    present_v = past_v.new_empty((*past_v.shape[:2], past_v.shape[2] + v.shape[1], past_v.shape[3]))
    return torch.empty_like(q), present_k, present_v


def _attention_with_past_onnx(q, k, v, past_k, past_v, mask=None, num_heads: int = 1, kv_num_heads: int = 1,
                              scale: float = 1.0, cos_cache=None, sin_cache=None, position_ids=None):
    # Every row of a left-padded batch holds the same number of positions
    # (padding included): seqlens_k = past + S - 1 for each row; the padding
    # reaches the kernel as the finite bias of the mask. The rotary positions
    # are the model's own (real tokens counted from 0), given per row.
    total = op.Cast(op.Add(op.Shape(past_k, start=2, end=3), op.Shape(k, start=1, end=2)), to=6)  # INT32 [1]
    seqlens = op.Expand(op.Sub(total, op.CastLike(1, total)), op.Shape(q, start=0, end=1))
    bias = keeps_row = None
    if mask is not None:
        bias, keeps_row = _finite_mask(mask, q)
        # GroupQueryAttention reads the bias as (B or 1, N or 1, S, total): broadcast the last two dims
        size = op.Concat(op.Constant(value_ints=[1, 1]), op.Shape(q, start=1, end=2), op.Cast(total, to=7), axis=0)
        bias = op.Expand(bias, size)
    rotary = {}
    if cos_cache is not None:
        position_ids = op.Cast(position_ids, to=7)  # INT64 (a no-op for the int64 positions of a decoder)
        rotary = dict(do_rotary=1, rotary_interleaved=0)
    out, present_k, present_v = msft.GroupQueryAttention(
        q, k, v, past_k, past_v, seqlens, op.Squeeze(total), cos_cache, sin_cache, position_ids, bias,
        num_heads=num_heads, kv_num_heads=kv_num_heads, scale=float(scale), **rotary,
    )
    return _zero_masked_rows(out, keeps_row), present_k, present_v


def _rotary_angles(cos_cache, sin_cache, position_ids):
    """``cos``, ``sin`` ``[B, 1, S, R]``: ``cat(c, c)`` with ``c =
    cos_cache[position_ids]`` ``[B, S, R/2]`` (and the same for sin), looked up
    once for the queries and the keys."""
    return (torch.cat([t[position_ids]] * 2, -1).unsqueeze(1) for t in (cos_cache, sin_cache))


def _rotate(x, cos, sin):
    """``x`` ``[B, n, S, H]`` rotated as Hugging Face's ``apply_rotary_pos_emb``:
    ``x * cos + rotate_half(x) * sin`` on the first ``R`` dims of each head
    (its two halves), the rest passed through."""
    half = cos.shape[-1] // 2
    rot, rest = x[..., :2 * half], x[..., 2 * half:]
    out = rot * cos + torch.cat([-rot[..., half:], rot[..., :half]], -1) * sin
    return out if rest.shape[-1] == 0 else torch.cat([out, rest], -1)


@define_op("attention_with_past", fake=_attention_with_past_fake, onnx=_attention_with_past_onnx)
def attention_with_past(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
    mask: torch.Tensor | None, num_heads: int, kv_num_heads: int, scale: float,
    cos_cache: torch.Tensor | None = None, sin_cache: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of new queries against a key/value cache, the cache grown by
    the new keys and values. ``q`` ``[B, S, num_heads * H]``; ``k``, ``v``
    ``[B, S, kv_num_heads * H]`` (this step's); ``past_k``, ``past_v`` ``[B,
    kv_num_heads, P, H]``. Returns ``(out [B, S, num_heads * H], present_k,
    present_v)`` with ``present = cat(past, new)`` ``[B, kv_num_heads, P + S,
    H]``, and ``out = softmax(q k^T * scale + mask) v`` over the ``P + S``
    present keys, query head ``i`` reading kv head ``i // (num_heads //
    kv_num_heads)``; ``mask`` (optional): an SDPA ``attn_mask`` (boolean: True
    attends; float: added) broadcastable to ``[B, num_heads, S, P + S]``; a
    query whose every key is masked gives 0, as torch's SDPA does.

    With ``cos_cache`` / ``sin_cache`` ``[max positions, R/2]`` and
    ``position_ids`` ``[B, S]``, the new queries and keys are first rotated
    (Hugging Face's rotary embedding, the two halves of each head), and the cache holds the rotated keys. Lowers to com.microsoft
    GroupQueryAttention with past/present (and ``do_rotary``)."""
    return _attend_with_past(q, k, v, past_k, past_v, mask, num_heads, kv_num_heads, scale, cos_cache, sin_cache,
                             position_ids, lambda past, new: torch.cat([past, new], dim=2))


def _attend_with_past(q, k, v, past_k, past_v, mask, num_heads, kv_num_heads, scale, cos_cache, sin_cache, position_ids,
                      grow):
    if num_heads % kv_num_heads:
        raise ValueError(f"fxopt::attention_with_past: num_heads {num_heads} is not a multiple of kv_num_heads {kv_num_heads}")
    qh, kh_new = _split_heads(q, num_heads), _split_heads(k, kv_num_heads)
    if cos_cache is not None:
        if sin_cache is None or position_ids is None:
            raise ValueError("fxopt::attention_with_past: cos_cache needs sin_cache and position_ids")
        cos, sin = _rotary_angles(cos_cache, sin_cache, position_ids)
        # the query and key heads rotated as one tensor: half the small kernels of a decode step
        rotated = _rotate(torch.cat([qh, kh_new], 1), cos, sin)
        qh, kh_new = rotated[:, :num_heads], rotated[:, num_heads:]
    present_k, present_v = grow(past_k, kh_new), grow(past_v, _split_heads(v, kv_num_heads))
    # SDPA reads each kv head for its group of query heads: no copy of the cache per query head
    out = torch.nn.functional.scaled_dot_product_attention(qh, present_k, present_v, attn_mask=mask, scale=scale,
                                                           enable_gqa=num_heads != kv_num_heads)
    return _merge_heads(out), present_k, present_v


def grown_in_buffer(past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``cat(past, new)`` along the positions (dim 2) of ``[B, heads, P, H]``
    caches, written in place after ``past`` when ``past`` is the first ``P``
    positions of a longer buffer ``[B, heads, L, H]`` (its strides) with room
    for ``new``: the result is then a view of that buffer, and no position is
    copied. Any other ``past`` (a tensor of its own) is concatenated."""
    b, heads, held, width = past.shape
    total = held + new.shape[2]
    s0, s1, s2, s3 = past.stride()
    end = past.storage_offset() + (b - 1) * s0 + (heads - 1) * s1 + total * s2
    if (s3 != 1 or s2 != width or s1 < total * width or s0 < heads * s1 or new.dtype != past.dtype
            or new.device != past.device or new.shape[:2] != past.shape[:2] or new.shape[3] != width
            or end * past.element_size() > past.untyped_storage().nbytes()):
        return torch.cat([past, new], dim=2)
    grown = past.as_strided((b, heads, total, width), past.stride())
    grown[:, :, held:].copy_(new)
    return grown


def attention_with_past_in_buffer(q, k, v, past_k, past_v, mask, num_heads, kv_num_heads, scale, cos_cache=None,
                                  sin_cache=None, position_ids=None):
    """:func:`attention_with_past` whose cache grows in place when each past
    is a prefix view of a longer buffer (:func:`grown_in_buffer`): the eager
    backend runs a generator's decode step with it (``cache_in_buffer``),
    where the generator owns the buffers. Not an op: it writes memory its
    inputs only view."""
    return _attend_with_past(q, k, v, past_k, past_v, mask, num_heads, kv_num_heads, scale, cos_cache, sin_cache,
                             position_ids, grown_in_buffer)


# The rotary tables are indexed by the positions: a position outside them is
# an input error, checked before a call as token ids are.
register_lookup(attention_with_past, lambda n: (n.args[11] if len(n.args) > 11 else None,
                                                static_size(n.args[9], 0) if len(n.args) > 9 else None))
