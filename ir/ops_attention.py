"""ONNX Runtime lowering of fused attention.

``aten.scaled_dot_product_attention`` (what ``fuse-attention`` produces, and what
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
"""

from __future__ import annotations

import math

import torch
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention as _generic_sdpa

from .onnx_contrib import _FLOATS, _Attr, _AttrType, _optional, _Param, declare, msft
from .ops import register_onnx_lowering

declare(
    "MultiHeadAttention",
    [
        _Param("query", "T"), _optional("key", "T"), _optional("value", "T"), _optional("bias", "T"),
        _optional("key_padding_mask", "M"), _optional("attention_bias", "T"), _optional("past_key", "T"),
        _optional("past_value", "T"), _optional("past_sequence_length", "M"), _optional("cache_indirection", "M"),
    ],
    # Only the first output: onnxscript gives a node as many outputs as its schema
    # lists, and the KV-cache outputs (present_key/value, qk) would cost copies.
    [_Param("output", "T")],
    [("T", _FLOATS, ""), ("M", ["tensor(int32)"], "")],
    [
        _Attr("num_heads", _AttrType.INT, "number of attention heads", required=True),
        _Attr("scale", _AttrType.FLOAT, "scale of q k^T; default 1/sqrt(head_size)", required=False),
        _Attr("mask_filter_value", _AttrType.FLOAT, "value for masked positions", required=False),
        _Attr("unidirectional", _AttrType.INT, "1: causal", required=False),
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
    if not ok:
        return _generic_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    heads, head = qs[1], qs[3]
    batch, q_len = op.Shape(query, start=0, end=1), op.Shape(query, start=2, end=3)
    q = op.Reshape(op.Transpose(query, perm=[0, 2, 1, 3]), op.Concat(batch, q_len, op.Constant(value_ints=[heads * head]), axis=0))
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == 9:  # BOOL: True means attend
            bias = op.Where(attn_mask, op.CastLike(0.0, query), op.CastLike(-math.inf, query))
        else:
            bias = op.CastLike(attn_mask, query)
        rank = len(attn_mask.shape) if attn_mask.shape is not None else 4
        if rank < 4:
            bias = op.Unsqueeze(bias, op.Constant(value_ints=list(range(4 - rank))))
        # MultiHeadAttention wants the last two dims of the bias at full size
        seq = op.Concat(op.Constant(value_ints=[1, 1]), q_len, op.Shape(key, start=2, end=3), axis=0)
        bias = op.Expand(bias, seq)
    out = msft.MultiHeadAttention(
        q, key, value, None, None, bias,
        num_heads=heads,
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(head),
        unidirectional=1 if is_causal else 0,
    )
    return op.Transpose(op.Reshape(out, op.Concat(batch, q_len, op.Constant(value_ints=[heads, head]), axis=0)), perm=[0, 2, 1, 3])


register_onnx_lowering(torch.ops.aten.scaled_dot_product_attention.default, sdpa_to_multihead_attention, group="contrib-attention")
