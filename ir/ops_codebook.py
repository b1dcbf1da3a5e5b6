"""Codebook weights: a float ``[N, K]`` weight stored as ``uint8`` indices
into small codebooks (``cluster``'s k-means).

``fxopt::codebook_weight(indices, codebook, group_size, decode)`` is the
weight the indices stand for: ``codebook[block, indices[i, j]]`` with one
codebook row per block of ``group_size`` consecutive weights in row-major
order (``codebook [N * K / group_size, L]``): ``group_size`` is a group of
columns, ``K`` for a codebook per output row, ``N * K`` for one codebook.

ONNX Runtime has no kernel that multiplies by a codebook weight; the two
lowerings differ in when the float weight is made (measured in
``benchmarks/cluster_lowering.py``, chosen in docs/pruning.md):

* ``decode="load"``: ``Cast`` of the indices to int32 and ``GatherElements``
  into the codebook, reading constants only: ONNX Runtime folds them into a
  float initializer when it creates the session. The file holds indices and
  codebooks; the running model holds float weights and runs MLAS's float GEMM.
  (torch's exporter itself folds a layer of at most 8192 weights, whose float
  weight then sits in the file: a few KiB.) Eager decodes once and keeps the
  float weight while the indices live.
* ``decode="call"``: the indices first pass through ``DequantizeLinear``,
  which neither the exporter nor ONNX Runtime folds, so the float weight is
  gathered at every run and freed after its MatMul: memory holds one byte
  per weight, every call pays the decode. Eager decodes at every call too.
"""

from __future__ import annotations

import weakref

import torch
from onnxscript import opset18 as op

from .ops import define_op

DECODES = ("load", "call")

# Float weights decoded by the eager kernel of decode="load", keyed by the
# identity of the indices and the codebook and their write counters.
_DECODED: dict[tuple[int, int], tuple[weakref.ref, tuple[int, int], torch.Tensor]] = {}


def decode_codebook(indices: torch.Tensor, codebook: torch.Tensor, group_size: int) -> torch.Tensor:
    """``codebook[block_of(i, j), indices[i, j]]`` as a ``[N, K]`` tensor of the codebook's dtype."""
    return torch.gather(codebook, 1, indices.long().reshape(-1, group_size)).reshape(indices.shape)


def _versions(*ts: torch.Tensor) -> tuple[int, ...]:
    return tuple(0 if t.is_inference() else t._version for t in ts)


def _decoded_once(indices: torch.Tensor, codebook: torch.Tensor, group_size: int) -> torch.Tensor:
    key = (id(indices), id(codebook))
    hit = _DECODED.get(key)
    if hit is not None and hit[0]() is indices and hit[1] == _versions(indices, codebook):
        return hit[2]
    w = decode_codebook(indices, codebook, group_size)
    _DECODED[key] = (weakref.ref(indices, lambda _r, k=key: _DECODED.pop(k, None)), _versions(indices, codebook), w)
    return w


def _check(indices: torch.Tensor, codebook: torch.Tensor, group_size: int, decode: str) -> None:
    if decode not in DECODES:
        raise ValueError(f"fxopt::codebook_weight: decode must be one of {list(DECODES)}, got {decode!r}")
    if group_size < 1 or indices.numel() % group_size or codebook.dim() != 2 or codebook.shape[0] != indices.numel() // group_size:
        raise ValueError(f"fxopt::codebook_weight: codebook {list(codebook.shape)} does not fit indices {list(indices.shape)} "
                         f"with group_size {group_size} (one codebook row per {group_size} weights)")


def _codebook_weight_fake(indices, codebook, group_size, decode):
    return codebook.new_empty(indices.shape)


def _codebook_weight_onnx(indices, codebook, group_size: int = 1, decode: str = "load"):
    if decode == "call":
        # DequantizeLinear is kept by both the exporter's and ONNX Runtime's
        # constant folding (they keep quantization nodes for QDQ fusions).
        idx = op.Cast(op.DequantizeLinear(indices, op.Constant(value_float=1.0)), to=6)  # int32
    else:
        idx = op.Cast(indices, to=6)
    rows = op.GatherElements(codebook, op.Reshape(idx, op.Constant(value_ints=[-1, group_size])), axis=1)
    return op.Reshape(rows, op.Shape(indices))


@define_op("codebook_weight", fake=_codebook_weight_fake, onnx=_codebook_weight_onnx)
def codebook_weight(indices: torch.Tensor, codebook: torch.Tensor, group_size: int, decode: str) -> torch.Tensor:
    """The ``[N, K]`` weight that ``uint8`` ``indices`` pick from ``codebook``
    (``[N * K / group_size, L]``: a row per ``group_size`` consecutive
    weights, row-major). ``decode="load"``: decoded once
    (ONNX Runtime folds it when it loads the model; eager keeps it);
    ``decode="call"``: gathered at every call."""
    _check(indices, codebook, group_size, decode)
    if decode == "load":
        return _decoded_once(indices, codebook, group_size)
    return decode_codebook(indices, codebook, group_size)
