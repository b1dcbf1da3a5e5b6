"""Dynamic W8A8 with per-token 8-bit activations (``quantize(mode=dynamic)``,
``act_granularity=token``, the default): the scheme on hand-computed values,
full-range codes and outlier tokens without int16 saturation on both backends,
parity with the original models, the exported integer ops, and bad options."""

import onnx
import pytest
import torch
from torch.export import Dim

import fxopt
from fxopt.ir.ops_quant import (
    linear_dynamic_per_token_reference, linear_dynamic_reference, token_act_qparams, weight_to_uint8,
)
from fxopt.ir.quant import QuantConfig, quantize
from fxopt.passes import OptionError
from fxopt.passes.quantize import Quantize
from conftest import model_spec, reference, run, trace_once

aten = torch.ops.aten
FX_TOKEN = torch.ops.fxopt.linear_dynamic_int8_per_token.default
FX_TENSOR = torch.ops.fxopt.linear_dynamic_int8.default


class PerTokenLinear(torch.nn.Module):
    """The per-token op on its own, from symmetric int8 codes, as the pass builds it."""

    def __init__(self, w_q, w_scale, bias=None):
        super().__init__()
        self.register_buffer("w_u8", weight_to_uint8(w_q))
        self.register_buffer("w_scale", w_scale.float())
        self.register_buffer("w_rowsum", (w_q.double().sum(1) * w_scale.double()).float())
        self.register_buffer("bias", bias)

    def forward(self, x):
        return torch.ops.fxopt.linear_dynamic_int8_per_token(x, self.w_u8, self.w_scale, self.w_rowsum, self.bias)


def both_backends(module, x):
    """(eager op, ONNX Runtime) outputs of ``module`` on ``x`` (rows dynamic)."""
    graph = fxopt.trace(module, (x,), dynamic_shapes=({0: Dim.DYNAMIC},))
    return module(x), run(fxopt.compile(graph, "onnxruntime"), (x,))


def quantized(name, options):
    spec = model_spec(name)
    graph = trace_once(spec, graph_name=name)
    canon = fxopt.PassManager("canonicalize").run(graph).graph
    result = fxopt.PassManager([Quantize(**options)]).run(canon)
    return spec, result.graph, result.records[-1].stats


# -- the scheme --------------------------------------------------------------------------

def test_scheme_on_hand_computed_values():
    # Row 0 spans [-0.25, 1]: scale 1.25/255, zero point round(0.25 / scale) = 51.
    # Row 1 is all positive: the range widens to hold 0, zero point 0, scale 2/255.
    x = torch.tensor([[0.5, -0.25, 1.0, 0.1], [2.0, 0.3, 0.0, 1.1]])
    scale, zp = token_act_qparams(x)
    assert torch.allclose(scale.flatten(), torch.tensor([1.25 / 255, 2.0 / 255]))
    assert zp.flatten().tolist() == [51.0, 0.0]
    # 0.1 / (1.25/255) = 20.4 -> 20; 0.3 / (2/255) = 38.25 -> 38; 1.1 / (2/255) = 140.25 -> 140
    codes = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    assert codes.tolist() == [[153, 0, 255, 71], [255, 38, 0, 140]]
    w_q = torch.tensor([[127, -64, 32, 1], [-127, 0, 5, 127]], dtype=torch.int8)
    w_scale = torch.tensor([0.01, 0.02])
    bias = torch.tensor([0.5, -1.0])
    x0 = [0.5, -0.25, 1.0, 20 * 1.25 / 255]  # what row 0 dequantizes to
    x1 = [2.0, 38 * 2 / 255, 0.0, 140 * 2 / 255]
    want = torch.tensor([
        [0.01 * (127 * x0[0] - 64 * x0[1] + 32 * x0[2] + x0[3]) + 0.5, 0.02 * (-127 * x0[0] + 5 * x0[2] + 127 * x0[3]) - 1.0],
        [0.01 * (127 * x1[0] - 64 * x1[1] + 32 * x1[2] + x1[3]) + 0.5, 0.02 * (-127 * x1[0] + 5 * x1[2] + 127 * x1[3]) - 1.0],
    ])
    assert torch.allclose(linear_dynamic_per_token_reference(x, w_q, w_scale, bias), want, atol=1e-6)
    eager, ort = both_backends(PerTokenLinear(w_q, w_scale, bias), x)
    assert torch.allclose(eager, want, atol=1e-6)
    assert torch.allclose(ort, want, atol=1e-5)


def test_full_range_codes_and_outlier_tokens_do_not_saturate_on_either_backend():
    # Worst case for an int16 multiply-add: activation codes at 0 and 255 whose
    # signs line up with weights at +-127 (a u8 x s8 kernel is off by 20-50% here).
    # Token 1 is an outlier 1000x larger than the others, and per token it
    # costs the small tokens nothing.
    k, n = 256, 64
    gen = torch.Generator().manual_seed(0)
    w_q = torch.where(torch.rand(n, k, generator=gen) < 0.5, -127, 127).to(torch.int8)
    w_scale = torch.rand(n, generator=gen) * 0.01 + 0.001
    signs = w_q[:4].float() / 127
    x = torch.cat([signs * 3.0, signs * 3000.0, torch.randn(6, k, generator=gen) * 0.01, torch.rand(2, k, generator=gen)])
    x[0, 0], x[4, 0] = -3.0, 0.0
    scale, zp = token_act_qparams(x)
    codes = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    assert (codes == 255).any(1).all() and (codes[:8] == 0).any(1).all()  # every row spans the full 8 bits
    want = linear_dynamic_per_token_reference(x, w_q, w_scale, None)
    eager, ort = both_backends(PerTokenLinear(w_q, w_scale), x)
    for got in (eager, ort):
        rel = ((got - want).abs() / want.abs().amax(-1, keepdim=True)).max()
        assert rel < 1e-5, rel
    exact = torch.nn.functional.linear(x, w_q.float() * w_scale[:, None])
    small = slice(8, 14)
    rel_small = ((eager[small] - exact[small]).norm(dim=-1) / exact[small].norm(dim=-1)).max()
    assert rel_small < 0.01  # 8-bit rounding of each small token's own range
    # One scale per tensor, set by the outlier, flattens the small tokens to ~0.
    per_tensor = linear_dynamic_reference(x, w_q, w_scale, None)
    assert ((per_tensor[small] - exact[small]).norm(dim=-1) / exact[small].norm(dim=-1)).min() > 0.5


# -- the pass on models ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "bert-tiny"])
def test_per_token_is_the_default_and_matches_the_original_on_both_backends(name):
    spec, q, stats = quantized(name, dict(mode="dynamic"))
    assert sum(1 for n in q.fx.nodes if n.target == FX_TOKEN) == stats["quantized"] > 0
    assert not any(n.target == FX_TENSOR for n in q.fx.nodes)
    assert {r["act_granularity"] for r in stats["layers"].values()} == {"token"}
    eager = run(fxopt.compile(q, "eager"), spec.example_inputs)
    ort = run(fxopt.compile(q, "onnxruntime"), spec.example_inputs)
    # The same integer grid on both backends (ONNX Runtime adds the zero-point correction in float).
    assert fxopt.compare(eager, ort).within(1e-4)
    original = reference(spec)
    for out in (eager, ort):
        parity = fxopt.compare(original, out)
        assert parity.cosine > 0.9995 and parity.within(0.05), parity
    other = spec.other_inputs[0]
    assert fxopt.compare(reference(spec, other), run(q, other)).cosine > 0.9995


def test_exported_onnx_runs_uint8_matmuls_with_a_zero_point_correction(tmp_path):
    spec, q, stats = quantized("gpt2-tiny", dict(mode="dynamic"))
    model = onnx.load(fxopt.export_onnx(q, tmp_path / "q.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(matmuls) == stats["quantized"] == 8
    for node in matmuls:
        assert node.domain == "com.microsoft"
        b, b_zp = inits[node.input[1]], inits[node.input[5]]
        assert b.data_type == onnx.TensorProto.UINT8 and len(b.dims) == 2  # the U8U8 kernel: exact
        assert onnx.numpy_helper.to_array(b_zp).tolist() == 128
        assert node.input[4] == ""  # per-row zero points are taken out after the GEMM
    ops = [n.op_type for n in model.graph.node]
    mins = {n.input[0] for n in model.graph.node if n.op_type == "ReduceMin"}
    maxes = [n for n in model.graph.node if n.op_type == "ReduceMax" and n.input[0] in mins]
    assert len(mins) == len(maxes) == 8  # per-token ranges at run time (other ReduceMax: attention masks' rows)
    assert "DynamicQuantizeLinear" not in ops and "MatMul" in ops  # only the float LM head is a MatMul


def test_act_granularity_tensor_keeps_the_fbgemm_op_and_overrides_mix_them():
    spec, q, stats = quantized("gpt2-tiny", dict(mode="dynamic", act_granularity="tensor"))
    assert sum(1 for n in q.fx.nodes if n.target == FX_TENSOR) == stats["quantized"] == 8
    spec, q, stats = quantized("gpt2-tiny", dict(mode="dynamic", overrides=["mlp:act_granularity=tensor"]))
    mlp = {name for name in stats["layers"] if ".mlp." in name}
    assert {stats["layers"][name]["act_granularity"] for name in mlp} == {"tensor"}
    assert sum(1 for n in q.fx.nodes if n.target == FX_TENSOR) == len(mlp) == 4
    assert sum(1 for n in q.fx.nodes if n.target == FX_TOKEN) == 4
    eager = run(fxopt.compile(q, "eager"), spec.example_inputs)
    # Codes are computed at run time: the backends' float ops differ in the
    # last bit, which can move an activation across a rounding boundary of the
    # next layer (one code: ~1e-3 here), so not bit-for-bit.
    parity = fxopt.compare(eager, run(fxopt.compile(q, "onnxruntime"), spec.example_inputs))
    assert parity.within(5e-3) and parity.cosine > 0.99999, parity


def test_weight_only_model_does_not_get_the_per_token_op():
    spec, q, stats = quantized("gpt2-tiny", dict(bits=8))
    assert stats["quantized"] == 8
    assert not any(n.target in (FX_TOKEN, FX_TENSOR) for n in q.fx.nodes)


@pytest.mark.parametrize("options,message", [
    (dict(mode="dynamic", act_granularity="channel"), r"option 'act_granularity' must be one of \['token', 'tensor'\]"),
    (dict(act_granularity="token"), "option 'act_granularity=token' applies to mode=dynamic only"),
    (dict(mode="dynamic", overrides=["mlp:act_granularity=row"]), "option 'act_granularity' must be one of"),
])
def test_bad_act_granularity_fails_at_construction_naming_the_option(options, message):
    with pytest.raises(OptionError, match=message):
        Quantize(**options)


def test_weight_codes_round_trip_through_uint8():
    w = torch.randn(16, 32)
    qt = quantize(w, QuantConfig(8, "sym", "channel"))
    assert torch.equal((weight_to_uint8(qt.q).to(torch.int16) - 128).to(torch.int8), qt.q)
