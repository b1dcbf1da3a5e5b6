"""The reference quantizer: the one place fxopt's quantization math lives.

Weights are 2-D ``[N, K]`` (output channels x input channels, the layout of
``aten.linear``). Two schemes:

* ``asym`` (min-max with a zero point): ``scale = (max - min) / (2^bits - 1)``,
  ``Q(x) = clamp(round((x - min) / scale), 0, 2^bits - 1)``, dequantized as
  ``min + Q * scale``. Integer kernels (ONNX Runtime's MatMulNBits, fbgemm)
  need an integer zero point, so ``min`` is nudged to ``-zp * scale`` with
  ``zp = round(-min / scale)``; the formula is then exact for the nudged range
  and ``dequantize`` is ``(Q - zp) * scale``. When ``max == min`` the block is
  constant: ``scale`` is taken as ``|min|`` (or 1 for zeros) so the value is
  reproduced exactly.
* ``sym``: ``scale = max|x| / (2^(bits-1) - 1)``, ``Q = clamp(round(x / scale),
  -(2^(bits-1) - 1), 2^(bits-1) - 1)``, no zero point.

Granularity: ``tensor`` (one scale), ``channel`` (one per output row) or
``group`` (one per ``group_size`` consecutive input columns of a row; the group
size must divide K). Any width from 2 to 8 bits.

Packing helpers produce the layout ONNX Runtime's ``com.microsoft::MatMulNBits``
reads: ``B [N, K/block, block*bits/8]`` uint8 (4-bit: two per byte, low nibble
first), ``scales [N * K/block]``, zero points packed the same way per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEMES = ("asym", "sym")
GRANULARITIES = ("tensor", "channel", "group")


class QuantizationError(ValueError):
    pass


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize one weight."""

    bits: int = 8
    scheme: str = "asym"
    granularity: str = "channel"
    group_size: int = 128

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise QuantizationError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if self.scheme not in SCHEMES:
            raise QuantizationError(f"scheme must be one of {list(SCHEMES)}, got {self.scheme!r}")
        if self.granularity not in GRANULARITIES:
            raise QuantizationError(f"granularity must be one of {list(GRANULARITIES)}, got {self.granularity!r}")
        if self.granularity == "group" and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise QuantizationError(f"group_size must be a positive integer, got {self.group_size!r}")

    def qrange(self) -> tuple[int, int]:
        if self.scheme == "sym":
            m = 2 ** (self.bits - 1) - 1
            return -m, m
        return 0, 2**self.bits - 1

    def num_groups(self, k: int) -> int:
        if self.granularity != "group":
            return 1
        if k % self.group_size:
            raise QuantizationError(f"group size {self.group_size} does not divide the input dimension K={k}")
        return k // self.group_size


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized ``[N, K]`` weight.

    ``q``: integer codes ``[N, K]`` (uint8 for asym, int8 for sym);
    ``scale``: float32 ``[rows, groups]`` with rows 1 (tensor) or N;
    ``zero_point``: int32 like ``scale`` (asym) or None (sym).
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    scheme: str
    granularity: str
    group_size: int  # columns per scale: K for tensor/channel

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        groups = self.scale.shape[1]
        q = self.q.to(torch.float32).view(n, groups, k // groups)
        if self.zero_point is not None:
            q = q - self.zero_point.to(torch.float32).unsqueeze(-1)
        return (q * self.scale.unsqueeze(-1)).view(n, k)

    def block_scales(self, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scales and zero points as ``[N, K/block]``, one per block of
        ``block`` columns; ``block`` must divide this tensor's group size (a
        coarser scale repeated over finer blocks is the same quantization)."""
        n, k = self.q.shape
        if self.group_size % block:
            raise QuantizationError(f"block {block} does not divide the group size {self.group_size}")
        rep = self.group_size // block
        scale = self.scale.expand(n, -1).repeat_interleave(rep, dim=1).contiguous()
        zp = None if self.zero_point is None else self.zero_point.expand(n, -1).repeat_interleave(rep, dim=1).contiguous()
        return scale, zp

    def nbytes(self) -> int:
        """Storage at ``bits`` per code plus float32 scales and packed zero points."""
        codes = math.ceil(self.q.numel() * self.bits / 8)
        zps = 0 if self.zero_point is None else math.ceil(self.zero_point.numel() * self.bits / 8)
        return codes + self.scale.numel() * 4 + zps


def quantize(weight: torch.Tensor, config: QuantConfig) -> QuantizedTensor:
    """Round-to-nearest quantization of a 2-D weight (see the module docstring)."""
    if weight.dim() != 2:
        raise QuantizationError(f"expected a 2-D [N, K] weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise QuantizationError(f"expected a floating-point weight, got {weight.dtype}")
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    groups = config.num_groups(k)
    if config.granularity == "tensor":
        blocks = w.reshape(1, 1, n * k)
    else:
        blocks = w.reshape(n, groups, k // groups)
    lo, hi = config.qrange()
    if config.scheme == "sym":
        amax = blocks.abs().amax(-1)
        scale = torch.where(amax > 0, amax / hi, torch.ones_like(amax))
        q = torch.clamp(torch.round(blocks / scale.unsqueeze(-1)), lo, hi)
        zero_point = None
        qdtype = torch.int8
    else:
        mn, mx = blocks.amin(-1), blocks.amax(-1)
        span = mx - mn
        # A constant block: any scale reproduces it; |min| keeps zp in range.
        flat = mn.abs()
        scale = torch.where(span > 0, span / hi, torch.where(flat > 0, flat, torch.ones_like(flat)))
        zero_point = torch.clamp(torch.round(-mn / scale), lo, hi)
        q = torch.clamp(torch.round(blocks / scale.unsqueeze(-1)) + zero_point.unsqueeze(-1), lo, hi)
        zero_point = zero_point.to(torch.int32)
        qdtype = torch.uint8
    group_size = k // groups
    return QuantizedTensor(q.to(qdtype).reshape(n, k), scale.to(torch.float32), zero_point, config.bits, config.scheme, config.granularity, group_size)


# -- error metrics -----------------------------------------------------------------

def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact)."""
    ref = reference.detach().to(torch.float64)
    noise = (ref - approx.detach().to(torch.float64)).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """``||ref - approx|| / ||ref||`` (Frobenius)."""
    ref = reference.detach().to(torch.float64)
    denom = ref.norm().item()
    err = (ref - approx.detach().to(torch.float64)).norm().item()
    return err / denom if denom > 0 else (0.0 if err == 0 else math.inf)


# -- packing for ONNX Runtime's MatMulNBits -----------------------------------------

def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes along the last dim: 8 bits one per byte, 4 bits two
    per byte, low nibble first (the order MatMulNBits reads); an odd count is
    padded with a zero nibble."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    if bits != 4:
        raise QuantizationError(f"packing supports 4 and 8 bits, got {bits}")
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` codes along the last dim."""
    if bits == 8:
        return packed[..., :count]
    if bits != 4:
        raise QuantizationError(f"packing supports 4 and 8 bits, got {bits}")
    out = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
    return out[..., :count]


@dataclass(frozen=True)
class NBitsWeight:
    """A weight in MatMulNBits form: ``B [N, K/block, block*bits/8]`` uint8,
    ``scales [N*K/block]`` float32, ``zero_points [N, ceil(K/block*bits/8)]``
    uint8 packed (None: the default zero point ``2^(bits-1)``, i.e. symmetric)."""

    B: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    k: int
    n: int
    bits: int
    block_size: int


def nbits_block_size(qt: QuantizedTensor) -> int:
    """The block size to store ``qt`` with: its group size when ONNX Runtime
    accepts it (a power of two >= 16), else the largest such divisor of the
    group size (per-channel scales repeated over blocks); 0 when there is none."""
    g = qt.group_size
    if g >= 16 and g & (g - 1) == 0:
        return g
    block = g & -g  # largest power of two dividing g
    return block if block >= 16 else 0


def to_nbits(qt: QuantizedTensor, block_size: int | None = None) -> NBitsWeight:
    """Repack a 4- or 8-bit quantized weight for MatMulNBits."""
    if qt.bits not in (4, 8):
        raise QuantizationError(f"MatMulNBits form needs 4 or 8 bits, got {qt.bits}")
    block = block_size or nbits_block_size(qt)
    if not block:
        raise QuantizationError(f"group size {qt.group_size} has no power-of-two divisor >= 16 that MatMulNBits accepts")
    n, k = qt.q.shape
    scale, zp = qt.block_scales(block)
    codes = qt.q.to(torch.int16)
    if qt.scheme == "sym":
        codes = codes + 2 ** (qt.bits - 1)  # MatMulNBits' default zero point
    B = pack_bits(codes.view(n, k // block, block), qt.bits)
    zero_points = None if zp is None else pack_bits(zp, qt.bits)
    return NBitsWeight(B, scale.reshape(-1).contiguous(), zero_points, k, n, qt.bits, block)


def nbits_dequantize(B: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, k: int, n: int, bits: int, block_size: int) -> torch.Tensor:
    """The float ``[N, K]`` weight a MatMulNBits triple stands for."""
    nb = k // block_size
    codes = unpack_bits(B, bits, block_size).to(torch.float32)  # [N, nb, block]
    if zero_points is None:
        zp = torch.full((1, 1, 1), float(2 ** (bits - 1)))
    else:
        zp = unpack_bits(zero_points, bits, nb).to(torch.float32).view(n, nb, 1)
    return ((codes - zp) * scales.view(n, nb, 1)).view(n, k)
