"""AWQ and GPTQ: activation-aware int4 weight quantization that beats
round-to-nearest where it matters, on a layer with outlier input channels."""

import pytest
import torch

import fxopt
from conftest import BASE_PIPELINE, model_spec, reference, run, trace_once
from fxopt.ir.quant import QuantConfig, quantize
from fxopt.passes import PipelineError
from fxopt.passes.quantize.methods import awq_search, gptq_quantize

NBITS = torch.ops.fxopt.linear_nbits.default


def _outlier_layer(seed=0, k=128, n=64, rows=1024):
    """Correlated activations with three outlier channels (20x), as LLM
    activations show; calibration and held-out rows from the same source."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.1 * torch.randn(k, k, generator=g)
    x = torch.randn(2 * rows, k, generator=g)
    x[:, [5, k // 3, k - 7]] *= 20
    x = x @ mix
    w = 0.05 * torch.randn(n, k, generator=g)
    return w, x[:rows], x[rows:]


def _out_err(x, w, w_q):
    return ((x @ (w - w_q).T).pow(2).mean() / (x @ w.T).pow(2).mean()).item()


@pytest.mark.parametrize("config", [QuantConfig(4, "asym", "group", 32), QuantConfig(4, "sym", "channel"), QuantConfig(3, "asym", "group", 64)],
                         ids=["int4-g32-asym", "int4-channel-sym", "int3-g64"])
def test_awq_and_gptq_beat_round_to_nearest_on_held_out_rows(config):
    w, calib, held_out = _outlier_layer()
    rtn = _out_err(held_out, w, quantize(w, config).dequantize())
    qt, s, alpha, errors = awq_search(w, calib, config)
    awq = _out_err(held_out, w, qt.dequantize() / s)
    hessian = calib.double().T @ calib.double() / calib.shape[0]
    gptq = _out_err(held_out, w, gptq_quantize(w, hessian, config).dequantize())
    # alpha = 0 is round-to-nearest; the search must find a better alpha
    assert alpha > 0 and min(errors) < errors[0]
    assert awq < 0.9 * rtn, (rtn, awq)
    assert gptq < 0.5 * rtn, (rtn, gptq)


def test_gptq_result_is_a_regular_quantized_tensor():
    w, calib, _ = _outlier_layer(k=64, n=16, rows=256)
    config = QuantConfig(4, "asym", "group", 32)
    qt = gptq_quantize(w, calib.double().T @ calib.double(), config)
    assert qt.q.dtype == torch.uint8 and qt.q.min() >= 0 and qt.q.max() <= 15
    assert qt.scale.shape == (16, 2) and qt.zero_point.shape == (16, 2)
    # codes and scales re-dequantize exactly like round-to-nearest's (same formula, other rounding choices)
    assert (qt.dequantize() - w).abs().max() < 2 * qt.scale.max()


def test_gptq_with_identity_hessian_is_round_to_nearest():
    # with uncorrelated unit-variance inputs there is no error to feed forward
    w, _, _ = _outlier_layer(k=64, n=16, rows=8)
    config = QuantConfig(4, "sym", "channel")
    qt = gptq_quantize(w, torch.eye(64, dtype=torch.float64), config, damp=0.0)
    torch.testing.assert_close(qt.dequantize(), quantize(w, config).dequantize())


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_methods_through_the_pass_on_both_backends(method):
    spec = model_spec("llama-tiny")
    g = fxopt.PassManager(BASE_PIPELINE).run(trace_once(spec)).graph
    g2 = torch.Generator().manual_seed(3)
    calib = [{"input_ids": torch.randint(0, 256, (4, 32), generator=g2)} for _ in range(4)]
    pipeline = f"quantize(bits=4,group_size=32,method={method},accuracy_level=0)"
    result = fxopt.PassManager(pipeline, calibration_data=calib).run(g)
    q = result.graph
    stats = result.records[0].stats
    assert stats["quantized"] == sum(1 for n in q.fx.nodes if n.target == NBITS) == 14
    assert all(layer["method"] == method for layer in stats["layers"].values())
    eager = run(fxopt.compile(q, "eager"), spec.example_inputs)  # exact dequantized weights: the tight reference
    ort = run(fxopt.compile(q, "onnxruntime"), spec.example_inputs)
    assert fxopt.compare(eager, ort).within(1e-3)
    assert fxopt.compare(reference(spec), eager).cosine > 0.98


def test_methods_need_calibration_data():
    spec = model_spec("mlp")
    g = fxopt.PassManager(BASE_PIPELINE).run(trace_once(spec, dynamic=False)).graph
    for method in ("awq", "gptq"):
        with pytest.raises(PipelineError, match="needs input 'calibration_data'"):
            fxopt.PassManager(f"quantize(bits=4,group_size=32,method={method})").run(g)
