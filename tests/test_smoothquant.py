"""smooth-quant: exact in float, shrinks the activation range the int8 grid
must cover, folds into LayerNorm and RMSNorm, and refuses what it cannot fold."""

import copy

import pytest
import torch

import fxopt
from conftest import BASE_PIPELINE, model_spec, reference, run
from fxopt.passes import PipelineError
from fxopt.passes.quantize.calibration import collect_linear_stats, linear_nodes
from fxopt.passes.quantize.smoothquant import SmoothQuant

aten = torch.ops.aten


def _with_outliers(name):
    """The tiny model with a few norm channels scaled up 30x: the activation
    outliers real LLMs show, which SmoothQuant exists for."""
    spec = copy.copy(model_spec(name))
    spec.model = copy.deepcopy(spec.model)
    with torch.no_grad():
        for mod_name, p in spec.model.named_parameters():
            if "norm" in mod_name.lower() and p.dim() == 1:
                p[[3, 17]] *= 30.0
    return spec


def _graph(spec):
    g = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
    return fxopt.PassManager(BASE_PIPELINE).run(g).graph


def _max_abs_linear_input(graph, data):
    return {k: s.channel_absmax.max().item() for k, s in collect_linear_stats(graph, data).items()}


@pytest.mark.parametrize("name", ["llama-tiny", "bert-tiny"])
def test_smoothing_is_exact_and_shrinks_activation_range(name):
    spec = _with_outliers(name)
    graph = _graph(spec)
    calib = spec.other_inputs
    result = fxopt.PassManager("smooth-quant(alpha=0.5)", check_numerics=True, calibration_data=calib).run(graph)
    stats = result.records[0].stats
    # llama: q/k/v share input_layernorm, gate/up share post_attention_layernorm, lm_head reads the final
    # norm; o/down are refused. bert: q/k/v and the FFN-in read LayerNorms that also feed a residual.
    expected_smoothed = {"llama-tiny": 2 * 5 + 1, "bert-tiny": 2 * 4}[name]
    assert stats["smoothed"] == expected_smoothed
    assert stats["norms_duplicated"] == (0 if name == "llama-tiny" else 4)
    assert len(stats["refused"]) == len(linear_nodes(graph)) - expected_smoothed
    assert all("not a LayerNorm/RMSNorm" in why for why in stats["refused"].values())
    # the largest activation a smoothed linear sees is several times smaller
    before = _max_abs_linear_input(graph, calib)
    after = _max_abs_linear_input(result.graph, calib)
    smoothed = [n.name for n in linear_nodes(result.graph) if "smoothed" in n.args[1].target]
    assert len(smoothed) == expected_smoothed
    assert all(after[n] < before[n] / 3 for n in smoothed), (before, after)
    assert all(v > 3 for v in stats["activation_range_reduction"].values())
    # exact in float, on both backends, on inputs the calibration never saw
    for backend in ("eager", "onnxruntime"):
        out = run(fxopt.compile(result.graph, backend), spec.example_inputs)
        parity = fxopt.compare(reference(spec), out)
        assert parity.within(1e-5 * 10) and parity.cosine > 0.999999, (backend, parity)


def test_rmsnorm_weight_is_divided_and_weight_columns_multiplied():
    spec = _with_outliers("llama-tiny")
    graph = _graph(spec)
    result = fxopt.PassManager("smooth-quant(alpha=0.5)", calibration_data=spec.other_inputs).run(graph)
    g = result.graph
    q = next(n for n in linear_nodes(g) if "q_proj" in n.args[1].target)
    norm = q.args[0]
    assert norm.target == aten.mul.Tensor
    gamma = next(g.constant(a) for a in norm.args if g.constant(a) is not None)
    w_new = g.constant(q.args[1])
    w_old = spec.model.model.layers[0].self_attn.q_proj.weight.detach()
    gamma_old = spec.model.model.layers[0].input_layernorm.weight.detach()
    s = gamma_old / gamma
    torch.testing.assert_close(w_new, w_old * s[None, :])
    # s follows the formula on the calibration statistics (alpha = 0.5)
    stats = collect_linear_stats(graph, spec.other_inputs)
    q_old = next(n for n in linear_nodes(graph) if "q_proj" in n.args[1].target)  # layer 0 comes first
    layer = spec.model.model.layers[0].self_attn
    w_max = torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]).abs().amax(0)
    torch.testing.assert_close(s, SmoothQuant.factors(stats[q_old.name].channel_absmax, w_max.detach(), 0.5))


def test_does_not_fire_without_a_norm_before_the_linear():
    spec = model_spec("mlp")
    graph = _graph(spec)
    result = fxopt.PassManager("smooth-quant", calibration_data=[spec.example_inputs]).run(graph)
    rec = result.records[0]
    assert not rec.changed and rec.stats["smoothed"] == 0 and len(rec.stats["refused"]) == 3
    assert str(result.graph) == str(graph)


def test_shared_norm_is_refused_when_duplication_is_off():
    spec = _with_outliers("bert-tiny")
    graph = _graph(spec)
    result = fxopt.PassManager("smooth-quant(duplicate_shared_norm=false)", calibration_data=spec.other_inputs).run(graph)
    stats = result.records[0].stats
    assert stats["smoothed"] == 0 and not result.records[0].changed
    assert sum("duplicate_shared_norm=False" in why for why in stats["refused"].values()) == 8


def test_needs_calibration_data_and_valid_alpha():
    spec = model_spec("mlp")
    graph = _graph(spec)
    with pytest.raises(PipelineError, match="needs input 'calibration_data'"):
        fxopt.PassManager("smooth-quant").run(graph)
    with pytest.raises(PipelineError, match="alpha.*must be in"):
        fxopt.PassManager("smooth-quant(alpha=1.5)")
    with pytest.raises(PipelineError, match="must run before 'quantize'|requires"):
        # ordering is declared: smoothing after canonicalize, before quantize
        fxopt.PassManager("smooth-quant", calibration_data=[spec.example_inputs]).run(
            fxopt.trace(spec.model, spec.example_inputs))


def test_unfoldable_inputs_are_scaled_by_an_explicit_multiply_when_asked():
    # mlp: no norm anywhere; unfoldable=scale smooths every linear with one multiply per input
    spec = model_spec("mlp")
    graph = _graph(spec)
    muls_before = sum(1 for n in graph.fx.nodes if n.target == aten.mul.Tensor)
    result = fxopt.PassManager("smooth-quant(alpha=0.5,unfoldable=scale)", check_numerics=True,
                               calibration_data=[(torch.randn(16, 32),)]).run(graph)
    stats = result.records[0].stats
    assert stats["smoothed"] == 3 and stats["inputs_scaled"] == 3 and not stats["refused"]
    assert sum(1 for n in result.graph.fx.nodes if n.target == aten.mul.Tensor) == muls_before + 3
    for backend in ("eager", "onnxruntime"):
        out = run(fxopt.compile(result.graph, backend), spec.example_inputs)
        assert fxopt.compare(reference(spec), out).within(1e-5), backend
