"""Static W8A8 (quantize(mode=static)): int8 weights and int8 activations with
ranges calibrated on sample inputs, on eager (fbgemm) and ONNX Runtime (QDQ)."""

import onnx
import pytest
import torch
import torch.fx as fx

import fxopt
from conftest import BASE_PIPELINE, model_spec, reference, run, trace_once
from fxopt.ir.ops_quant_static import linear_static_int8, linear_static_reference, static_act_qparams
from fxopt.ir.quant import QuantConfig, quantize
from fxopt.passes import PipelineError

STATIC_OP = torch.ops.fxopt.linear_static_int8.default


def _base(name):
    spec = model_spec(name)
    g = trace_once(spec, graph_name=name)
    return spec, fxopt.PassManager(BASE_PIPELINE).run(g).graph


class _Dequantized(fx.Interpreter):
    """Runs a quantized graph with each static op replaced by its float
    definition: the reference built from the same int8 weights and the same
    calibrated activation grid."""

    def call_function(self, target, args, kwargs):
        if target == STATIC_OP:
            return linear_static_reference(*args, **kwargs)
        return super().call_function(target, args, kwargs)


def _dequantized_reference(graph, inputs):
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    with torch.no_grad():
        flat = _Dequantized(graph.module).run(*graph.flatten_inputs(*args, **kwargs))
    return graph.unflatten_outputs(flat if isinstance(flat, (list, tuple)) else [flat])


def test_kernel_matches_its_float_definition_and_clamps_outside_the_calibrated_range():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    qt = quantize(w, QuantConfig(8, "sym", "channel"))
    w_q, w_scale, bias = qt.q, qt.scale[:, 0], torch.randn(48)
    x = torch.randn(2, 5, 64)
    scale, zp = static_act_qparams(x.min().item(), x.max().item())
    # hand-computed: 7-bit grid over [min, max], zero point -min / scale
    assert scale == pytest.approx((x.max() - x.min()).item() / 127)
    assert zp == round(-x.min().item() / scale)
    for factor in (1.0, 3.0):  # 3x: most values fall outside the calibrated range and must clamp
        y = linear_static_int8(x * factor, w_q, w_scale, bias, scale, zp)
        ref = linear_static_reference(x * factor, w_q, w_scale, bias, scale, zp)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    # and the quantization error is that of 7-bit activations, not more
    exact = torch.nn.functional.linear(x, w, bias)
    assert fxopt.compare(exact, linear_static_int8(x, w_q, w_scale, bias, scale, zp)).cosine > 0.999


@pytest.mark.parametrize("name,pipeline", [
    ("mlp", "quantize(mode=static)"),
    ("bert-tiny", "smooth-quant,quantize(mode=static,scheme=sym,observer=percentile,percentile=99.9)"),
    ("llama-tiny", "smooth-quant,quantize(mode=static,scheme=sym,observer=moving-average)"),
])
def test_static_quantization_on_both_backends(name, pipeline, tmp_path):
    spec, graph = _base(name)
    calib = spec.other_inputs + [spec.example_inputs]
    before = str(graph)
    result = fxopt.PassManager(pipeline, calibration_data=calib).run(graph)
    assert str(graph) == before  # the caller's graph is untouched
    q = result.graph
    stats = result.records[-1].stats
    statics = [n for n in q.fx.nodes if n.target == STATIC_OP]
    assert len(statics) == stats["quantized"] > 0
    assert not any(n.target == torch.ops.aten.linear.default for n in q.fx.nodes if n.meta.get("quantized_layer"))
    inputs = spec.other_inputs[0]
    tight = _dequantized_reference(q, inputs)
    for backend in ("eager", "onnxruntime"):
        out = run(fxopt.compile(q, backend), inputs)
        p_tight = fxopt.compare(tight, out)
        assert p_tight.within(2e-3), f"{backend} vs dequantized reference: {p_tight}"
        p_loose = fxopt.compare(reference(spec, inputs), out)
        assert p_loose.cosine > 0.995 and p_loose.within(0.1), f"{backend} vs original: {p_loose}"
    path = fxopt.export_onnx(q, tmp_path / f"{name}.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # linears reading the same input with the same calibrated grid (q/k/v) share one QuantizeLinear
    # after the exporter's common-subexpression elimination; every weight keeps its DequantizeLinear.
    activations = {(n.args[0], n.args[4], n.args[5]) for n in statics}
    assert ops.count("QuantizeLinear") == len(activations) < len(statics) + (name == "mlp"), ops
    assert ops.count("DequantizeLinear") == len(activations) + len(statics)


def test_static_mode_needs_calibration_data_and_int8_sym_weights():
    spec, graph = _base("mlp")
    with pytest.raises(PipelineError, match="needs input 'calibration_data'"):
        fxopt.PassManager("quantize(mode=static,scheme=sym)").run(graph)
    with pytest.raises(PipelineError, match="mode 'static'.*bits=8"):
        fxopt.PassManager("quantize(mode=static,bits=4,scheme=sym)")
    with pytest.raises(PipelineError, match="mode 'static'.*method 'rtn'"):
        fxopt.PassManager("quantize(mode=static,scheme=sym,method=awq)")


def test_layers_outside_the_filter_stay_float():
    spec, graph = _base("mlp")
    result = fxopt.PassManager("quantize(mode=static,scheme=sym,include='layers\\.0')", calibration_data=[spec.example_inputs]).run(graph)
    kinds = [n.target for n in result.graph.fx.nodes if n.target in (STATIC_OP, torch.ops.aten.linear.default)]
    assert kinds == [STATIC_OP, torch.ops.aten.linear.default, torch.ops.aten.linear.default]
