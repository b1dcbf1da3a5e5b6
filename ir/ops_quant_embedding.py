"""Quantized embedding tables: 4- or 8-bit rows, gathered and then dequantized.

``fxopt::embedding_nbits`` stores the table in the same packed form as
MatMulNBits weights (:func:`fxopt.ir.quant.to_nbits`: codes packed two per byte
at 4 bits, low nibble first, one scale per block of the embedding dimension,
optional packed zero points), so a tied LM head and its embedding can share
one packing routine. Only the gathered rows are dequantized: a lookup reads
``ids.numel() * K * bits / 8`` bytes of codes instead of a float row each.

ONNX lowering: ``com.microsoft.GatherBlockQuantized`` (uint8 data with
``bits``, ``quantize_axis`` the last axis, ``block_size`` the group size),
which ONNX Runtime's CPU provider runs; its default zero point for uint8 data
is ``2^(bits-1)``, the same convention as MatMulNBits, so symmetric tables need
no zero-point input.
"""

from __future__ import annotations

import torch

from .onnx_contrib import FLOAT_TYPES, Attr, AttrType, Param, declare, msft, optional_param
from .graph import register_lookup
from .ops import define_op
from .quant import nbits_dequantize

declare(
    "GatherBlockQuantized",
    [Param("data", "T1"), Param("indices", "Tind"), Param("scales", "T2"), optional_param("zero_points", "T1")],
    [Param("output", "T2")],
    [("T1", ["tensor(uint8)", "tensor(int4)", "tensor(uint4)"], ""), ("T2", FLOAT_TYPES, ""),
     ("Tind", ["tensor(int32)", "tensor(int64)"], "")],
    [
        Attr("gather_axis", AttrType.INT, "axis of data the indices select", required=False),
        Attr("quantize_axis", AttrType.INT, "axis of data the blocks run along", required=False),
        Attr("block_size", AttrType.INT, "elements per scale along quantize_axis", required=False),
        Attr("bits", AttrType.INT, "bits per element of uint8 data (4 or 8)", required=False),
    ],
)


def _embedding_nbits_fake(ids, B, scales, zero_points, K, N, bits, block_size):
    return torch.empty((*ids.shape, K), dtype=scales.dtype, device=ids.device)


def _embedding_nbits_onnx(ids, B, scales, zero_points=None, K: int = 0, N: int = 0, bits: int = 4, block_size: int = 32):
    # The exporter hands B as [N, K/block, block*bits/8] and scales flat: the
    # kernel wants rows of packed codes and a [N, K/block] scale table (both
    # reshapes of constants fold into the initializers).
    from onnxscript import opset18 as op

    data = op.Reshape(B, op.Constant(value_ints=[N, K * bits // 8]))
    table = op.Reshape(scales, op.Constant(value_ints=[N, K // block_size]))
    zps = None if zero_points is None else op.Reshape(zero_points, op.Constant(value_ints=[N, -1]))
    return msft.GatherBlockQuantized(data, ids, table, zps, gather_axis=0, quantize_axis=1, block_size=block_size, bits=bits)


@define_op("embedding_nbits", fake=_embedding_nbits_fake, onnx=_embedding_nbits_onnx)
def embedding_nbits(ids: torch.Tensor, B: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                    K: int, N: int, bits: int, block_size: int) -> torch.Tensor:
    """``embedding(ids, W)`` with ``W [N, K]`` stored in MatMulNBits form (4 or 8
    bits, blocks along K). Eager gathers the packed rows of ``ids`` and
    dequantizes only those; ONNX lowers to ``com.microsoft.GatherBlockQuantized``."""
    flat = ids.reshape(-1)
    nb = K // block_size
    rows = B.view(N, nb, -1).index_select(0, flat)
    row_scales = scales.view(N, nb).index_select(0, flat).reshape(-1)
    row_zps = None if zero_points is None else zero_points.view(N, -1).index_select(0, flat)
    w = nbits_dequantize(rows, row_scales, row_zps, K, flat.numel(), bits, block_size)
    return w.to(scales.dtype).view(*ids.shape, K)


register_lookup(embedding_nbits, lambda n: (n.args[0], n.args[5] if isinstance(n.args[5], int) else None))
