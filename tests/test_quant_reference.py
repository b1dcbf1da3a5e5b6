"""The reference quantizer (fxopt.ir.quant): the formulas on hand-computed
values, error bounds per scheme and width, and MatMulNBits packing."""

import math

import pytest
import torch

from fxopt.ir.quant import (
    QuantConfig, QuantizationError, nbits_block_size, nbits_dequantize, pack_bits, quantize, relative_error, sqnr_db,
    to_nbits, unpack_bits,
)


def test_asym_min_max_on_hand_computed_values():
    # 2 bits: scale = (max - min) / 3 per row; Q = round((x - min) / scale).
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-4.0, 0.0, 4.0, 8.0], [-1.0, 0.0, 0.4, 2.0]])
    qt = quantize(w, QuantConfig(bits=2, scheme="asym", granularity="channel"))
    assert qt.scale.flatten().tolist() == [1.0, 4.0, 1.0]
    assert qt.zero_point.flatten().tolist() == [0, 1, 1]
    assert qt.q.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 1, 3]]
    # dequantized = min + Q * scale
    assert qt.dequantize().tolist() == [[0.0, 1.0, 2.0, 3.0], [-4.0, 0.0, 4.0, 8.0], [-1.0, 0.0, 0.0, 2.0]]


def test_asym_nudges_min_so_the_zero_point_is_an_integer():
    # min -0.3, max 0.9, 2 bits: scale 0.4, -min/scale = 0.75 -> zp 1, so the
    # range the codes cover is [-0.4, 0.8] and 0.9 clamps to the top code.
    qt = quantize(torch.tensor([[-0.3, 0.0, 0.9]]), QuantConfig(bits=2, scheme="asym", granularity="tensor"))
    assert qt.zero_point.item() == 1
    assert math.isclose(qt.scale.item(), 0.4, rel_tol=1e-6)
    assert qt.q.tolist() == [[0, 1, 3]]
    torch.testing.assert_close(qt.dequantize(), torch.tensor([[-0.4, 0.0, 0.8]]))


def test_sym_on_hand_computed_values():
    # 3 bits: scale = max|x| / 3; Q = round(x / scale) (half to even).
    qt = quantize(torch.tensor([[-2.0, -1.0, 0.5, 1.9]]), QuantConfig(bits=3, scheme="sym", granularity="tensor"))
    assert math.isclose(qt.scale.item(), 2 / 3, rel_tol=1e-6)
    assert qt.zero_point is None
    assert qt.q.tolist() == [[-3, -2, 1, 3]]
    torch.testing.assert_close(qt.dequantize(), torch.tensor([[-2.0, -4 / 3, 2 / 3, 2.0]]))


def test_constant_and_zero_rows_are_exact():
    w = torch.tensor([[0.7, 0.7, 0.7, 0.7], [0.0, 0.0, 0.0, 0.0], [-2.0, -2.0, -2.0, -2.0]])
    for scheme in ("asym", "sym"):
        qt = quantize(w, QuantConfig(bits=4, scheme=scheme, granularity="channel"))
        torch.testing.assert_close(qt.dequantize(), w)


def test_group_granularity_shapes_and_bad_group_size():
    w = torch.randn(6, 64)
    qt = quantize(w, QuantConfig(bits=4, granularity="group", group_size=16))
    assert qt.scale.shape == (6, 4) and qt.zero_point.shape == (6, 4) and qt.group_size == 16
    assert quantize(w, QuantConfig(bits=4, granularity="tensor")).scale.shape == (1, 1)
    with pytest.raises(QuantizationError, match="group size 48 does not divide the input dimension K=64"):
        quantize(w, QuantConfig(bits=4, granularity="group", group_size=48))


@pytest.mark.parametrize("bad", [dict(bits=1), dict(bits=9), dict(scheme="nf4"), dict(granularity="row"), dict(granularity="group", group_size=0)])
def test_bad_configs_are_rejected(bad):
    with pytest.raises(QuantizationError):
        QuantConfig(**bad)


@pytest.mark.parametrize("scheme", ["asym", "sym"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_is_at_most_half_a_step(scheme, granularity, bits):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits)) * torch.linspace(0.1, 2.0, 16)[:, None]
    qt = quantize(w, QuantConfig(bits=bits, scheme=scheme, granularity=granularity, group_size=32))
    err = (w - qt.dequantize()).abs().view(16, -1, qt.group_size) if granularity != "tensor" else (w - qt.dequantize()).abs().view(1, 1, -1)
    # Rounding moves a value by at most scale/2; asym's nudged range may clamp
    # the top value by at most one more half step.
    slack = 1.0 if scheme == "asym" else 0.5
    assert (err <= qt.scale.unsqueeze(-1) * slack + 1e-6).all()
    lo, hi = QuantConfig(bits=bits, scheme=scheme).qrange()
    assert qt.q.min() >= lo and qt.q.max() <= hi


def test_sqnr_grows_about_6db_per_bit_and_finer_granularity_helps():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    s = {b: sqnr_db(w, quantize(w, QuantConfig(bits=b, granularity="channel")).dequantize()) for b in (2, 4, 8)}
    assert s[4] - s[2] > 9 and s[8] - s[4] > 20
    g = sqnr_db(w, quantize(w, QuantConfig(bits=4, granularity="group", group_size=32)).dequantize())
    t = sqnr_db(w, quantize(w, QuantConfig(bits=4, granularity="tensor")).dequantize())
    assert g > s[4] > t
    assert sqnr_db(w, w) == math.inf and relative_error(w, w) == 0.0
    assert math.isclose(relative_error(w, 1.1 * w), 0.1, rel_tol=1e-6)


def test_pack_bits_low_nibble_first_and_round_trip():
    codes = torch.tensor([[1, 2, 15, 0, 7]], dtype=torch.uint8)
    packed = pack_bits(codes, 4)
    assert packed.tolist() == [[0x21, 0x0F, 0x07]]
    assert unpack_bits(packed, 4, 5).tolist() == codes.tolist()
    assert pack_bits(codes, 8).tolist() == codes.tolist()


@pytest.mark.parametrize("scheme", ["asym", "sym"])
@pytest.mark.parametrize("bits,granularity,k,block", [(4, "group", 256, 32), (4, "channel", 768, 256), (8, "channel", 64, 64), (8, "tensor", 96, 32)])
def test_matmulnbits_form_stands_for_the_same_weight(scheme, bits, granularity, k, block):
    w = torch.randn(10, k)
    qt = quantize(w, QuantConfig(bits=bits, scheme=scheme, granularity=granularity, group_size=32))
    assert nbits_block_size(qt) == block  # per-channel K=768 -> largest power-of-two divisor
    nb = to_nbits(qt)
    assert nb.B.dtype == torch.uint8 and nb.B.shape == (10, k // block, block * bits // 8)
    assert nb.scales.shape == (10 * k // block,)
    assert (nb.zero_points is None) == (scheme == "sym")
    torch.testing.assert_close(nbits_dequantize(nb.B, nb.scales, nb.zero_points, k, 10, bits, block), qt.dequantize())


def test_matmulnbits_form_refuses_what_onnx_runtime_cannot_take():
    qt = quantize(torch.randn(4, 24), QuantConfig(bits=4, granularity="channel"))
    assert nbits_block_size(qt) == 0  # 24 has no power-of-two divisor >= 16
    with pytest.raises(QuantizationError, match="no power-of-two divisor"):
        to_nbits(qt)
    with pytest.raises(QuantizationError, match="4 or 8 bits"):
        to_nbits(quantize(torch.randn(4, 32), QuantConfig(bits=3)))
