"""Ops that move a padded batch ``[B, S, ...]`` to its real tokens ``[T, ...]``
and back (made by ``remove-padding``, passes/padding.py).

* ``fxopt::padding_index(mask) -> int64[T]``: the flattened positions
  ``b * S + s`` where ``mask[b, s] != 0``, in order. ``T`` is known only at run
  time (an unbacked size in the graph's metadata).
* ``fxopt::unpad(x, index) -> [T, ...]``: the rows of ``x [B, S, ...]`` at those
  positions.
* ``fxopt::pad(y, index, batch, seq) -> [B, S, ...]``: ``y``'s rows put back at
  their positions, zeros elsewhere.

ONNX lowering: NonZero, Gather and ScatterND (standard ops; ONNX Runtime's
RemovePadding / RestorePadding contrib ops exist for CUDA only).
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op

from .ops import define_op


def _padding_index_fake(mask):
    tokens = torch.library.get_ctx().new_dynamic_size()
    return mask.new_empty((tokens,), dtype=torch.int64)


def _padding_index_onnx(mask):
    flat = op.Reshape(mask, op.Constant(value_ints=[-1]))
    real = op.Not(op.Equal(flat, op.CastLike(op.Constant(value_int=0), flat)))
    return op.Reshape(op.NonZero(real), op.Constant(value_ints=[-1]))


@define_op("padding_index", fake=_padding_index_fake, onnx=_padding_index_onnx)
def padding_index(mask: torch.Tensor) -> torch.Tensor:
    """Flattened positions ``b * S + s`` of the real tokens (``mask[b, s] != 0``) of a
    ``[B, S]`` mask, as int64 ``[T]``. Lowers to NonZero."""
    return mask.reshape(-1).nonzero().reshape(-1)


def _unpad_fake(x, index):
    return x.new_empty((index.shape[0], *x.shape[2:]))


def _trailing_shape(x):
    return op.Slice(op.Shape(x), op.Constant(value_ints=[2]), op.Constant(value_ints=[2**62]))


def _unpad_onnx(x, index):
    rows = op.Reshape(x, op.Concat(op.Constant(value_ints=[-1]), _trailing_shape(x), axis=0))
    return op.Gather(rows, index, axis=0)


@define_op("unpad", fake=_unpad_fake, onnx=_unpad_onnx)
def unpad(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rows ``x.flatten(0, 1)[index]`` of ``x [B, S, ...]``: ``[T, ...]``. Lowers to Gather."""
    return x.flatten(0, 1).index_select(0, index)


def _pad_fake(y, index, batch, seq):
    return y.new_empty((batch, seq, *y.shape[1:]))


def _pad_onnx(y, index, batch, seq):
    one = op.Constant(value_ints=[1])
    b, s = op.Reshape(batch, one), op.Reshape(seq, one)
    rest = op.Slice(op.Shape(y), one, op.Constant(value_ints=[2**62]))
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), y), op.Concat(op.Mul(b, s), rest, axis=0))
    rows = op.ScatterND(zeros, op.Unsqueeze(index, op.Constant(value_ints=[-1])), y)
    return op.Reshape(rows, op.Concat(b, s, rest, axis=0))


@define_op("pad", fake=_pad_fake, onnx=_pad_onnx)
def pad(y: torch.Tensor, index: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """``y [T, ...]`` scattered back to ``[batch, seq, ...]`` at the flattened positions
    ``index``, zeros elsewhere. Lowers to ScatterND."""
    out = y.new_zeros((batch * seq, *y.shape[1:]))
    out.index_copy_(0, index, y)
    return out.view(batch, seq, *y.shape[1:])
