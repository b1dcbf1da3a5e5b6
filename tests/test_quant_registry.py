"""``quantize``'s registries (modes, methods, backend targets) and the inputs
it must refuse rather than turn into plausible numbers: non-finite weights,
and a graph that is already quantized."""

import math

import pytest
import torch

import fxopt
from fxopt.ir.quant import quantize as reference_quantize
from fxopt.ir.targets import register_target, target
from fxopt.passes import OptionError, PassError
from fxopt.passes.layers import LayerSelectionError, select_layers
from fxopt.passes.quantize import METHODS, MODES, AlreadyQuantizedWarning, Quantize, register_method

FX_NBITS = torch.ops.fxopt.linear_nbits.default


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def canonical(model, x=None):
    graph = fxopt.trace(model, (torch.randn(4, 32) if x is None else x,))
    return fxopt.PassManager("canonicalize").run(graph).graph


# -- registries -----------------------------------------------------------------------

def test_a_method_name_is_taken_once():
    with pytest.raises(ValueError, match="quantize method 'rtn' is already registered by .*methods.rtn"):
        register_method("rtn")(lambda weight, cfg, stats: None)
    with pytest.raises(ValueError, match="quantize mode 'dynamic' is already registered"):
        MODES.register("dynamic", MODES["dynamic"])


def test_a_registered_method_is_usable_by_name_from_pipeline_text():
    calls = []

    @register_method("test-halved-rtn")
    def halved(weight, cfg, stats):
        calls.append(tuple(weight.shape))
        return reference_quantize(weight * 0.5, cfg.quant_config()), None

    try:
        result = fxopt.PassManager("quantize(bits=8,method=test-halved-rtn)").run(canonical(TwoLayers()))
        stats = result.records[-1].stats
        assert calls == [(64, 32), (32, 64)]
        assert {r["method"] for r in stats["layers"].values()} == {"test-halved-rtn"}
        # the stats measure the codes the method chose: half the weight is 6 dB off
        assert all(r["sqnr_db"] < 7 for r in stats["layers"].values())
    finally:
        METHODS.unregister("test-halved-rtn")
    with pytest.raises(OptionError, match="unknown quantize method 'test-halved-rtn'.*registered: awq, gptq, rtn"):
        Quantize(method="test-halved-rtn")


def test_an_unknown_method_suggests_the_closest_name():
    with pytest.raises(OptionError, match="unknown quantize method 'gtpq' \\(did you mean 'gptq'\\?\\)"):
        Quantize(method="gtpq")


def test_a_backend_target_name_is_taken_once():
    with pytest.raises(ValueError, match="backend target 'eager' is already registered"):
        register_target("eager", lambda graph: graph)
    assert callable(target("eager"))


# -- layer selection, the filters other per-layer passes reuse ------------------------

def test_select_layers_is_the_filter_quantize_uses():
    graph = canonical(TwoLayers())
    selection = select_layers(graph, exclude="down")
    assert [l.name for l in selection.candidates] == ["up", "down"]
    assert [l.name for l in selection.selected] == ["up"] and selection.skipped == {"excluded": 1}
    assert [l.name for l in select_layers(graph, min_size=64 * 32 + 1).selected] == []
    with pytest.raises(LayerSelectionError, match="include='mlp' matches no layer; layers: \\['up', 'down'\\]"):
        select_layers(graph, include="mlp")


class Experts(torch.nn.Module):
    """A mixture of experts written by hand: ``router`` scores 4 experts and
    ``topk`` keeps 2 (``sigmoid`` + a bias, DeepSeek's way, or ``softmax``);
    ``classify``'s softmax picks nothing."""

    def __init__(self, scoring: str):
        super().__init__()
        torch.manual_seed(0)
        self.scoring = scoring
        self.router = torch.nn.Linear(32, 4, bias=False)
        self.bias = torch.nn.Parameter(torch.randn(4))
        self.experts = torch.nn.Parameter(torch.randn(4, 32, 32))
        self.classify = torch.nn.Linear(32, 32)

    def forward(self, x):
        logits = self.router(x)
        scores = torch.sigmoid(logits) + self.bias if self.scoring == "sigmoid" else torch.softmax(logits.float(), -1)
        weights, chosen = torch.topk(scores, 2, dim=-1)
        y = torch.einsum("tk,tkio,ti->to", weights, self.experts[chosen], x)
        return torch.softmax(self.classify(y), -1)


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_a_router_that_picks_experts_is_left_float(scoring):
    graph = canonical(Experts(scoring))
    assert [l.name for l in select_layers(graph).selected] == ["classify"]  # its softmax feeds no topk
    assert select_layers(graph).skipped == {"router": 1}
    assert [l.name for l in select_layers(graph, skip_router=False).selected] == ["router", "classify"]
    result = fxopt.PassManager("quantize(mode=dynamic)").run(graph)
    assert result.records[0].stats["skipped"] == {"router": 1}
    targets = {n.target for n in result.graph.fx.nodes}
    assert torch.ops.aten.linear.default in targets  # the router's


# -- non-finite weights ----------------------------------------------------------------

@pytest.mark.parametrize("value,options,message", [
    (math.nan, dict(mode="dynamic"), "1 NaN and 0 infinite values"),
    (math.inf, dict(bits=4, group_size=32), "0 NaN and 1 infinite values"),
    (-math.inf, dict(bits=8), "0 NaN and 1 infinite values"),
])
def test_a_non_finite_weight_is_refused_by_name(value, options, message):
    model = TwoLayers()
    with torch.no_grad():
        model.down.weight[3, 5] = value
    graph = canonical(model)
    before = str(graph)
    with pytest.raises(PassError, match=f"layer 'down': weight .* \\(32, 64\\) holds {message} \\(first at \\[3, 5\\]\\)"):
        fxopt.PassManager([Quantize(**options)]).run(graph)
    assert str(graph) == before
    # Left out by name, the rest quantizes, and the output stays as non-finite as the original's.
    result = fxopt.PassManager([Quantize(exclude="down", **options)]).run(graph)
    stats = result.records[-1].stats
    assert list(stats["layers"]) == ["up"] and math.isfinite(stats["min_sqnr_db"])
    x = torch.randn(4, 32)
    assert not torch.isfinite(result.graph(x)).all() and not torch.isfinite(model(x)).all()


# -- a second quantize ------------------------------------------------------------------

def test_a_second_quantize_says_it_found_nothing_to_do():
    once = fxopt.PassManager("quantize(bits=4,group_size=32)").run(canonical(TwoLayers())).graph
    assert sum(n.target == FX_NBITS for n in once.fx.nodes) == 2
    with pytest.warns(AlreadyQuantizedWarning, match="already holds 2 quantized layers"):
        result = fxopt.PassManager("quantize(mode=dynamic)").run(once)
    record = result.records[-1]
    assert not record.changed and record.stats["quantized"] == 0 and record.stats["already_quantized"] == 2


def test_quantizing_the_rest_of_a_partly_quantized_graph_does_not_warn(recwarn):
    once = fxopt.PassManager("quantize(bits=8,include=up)").run(canonical(TwoLayers())).graph
    result = fxopt.PassManager("quantize(bits=8)").run(once)
    stats = result.records[-1].stats
    assert stats["quantized"] == 1 and stats["already_quantized"] == 1
    assert not [w for w in recwarn if issubclass(w.category, AlreadyQuantizedWarning)]


def test_a_method_that_returns_non_finite_scales_is_refused_by_name():
    @register_method("test-nan-scales")
    def nan_scales(weight, cfg, stats):
        qt = reference_quantize(weight, cfg.quant_config())
        return type(qt)(qt.q, qt.scale * float("nan"), qt.zero_point, qt.bits, qt.scheme, qt.granularity, qt.group_size), None

    try:
        with pytest.raises(PassError, match="layer 'up': method 'test-nan-scales' returned .* NaN or infinite"):
            fxopt.PassManager("quantize(bits=8,method=test-nan-scales)").run(canonical(TwoLayers()))
    finally:
        METHODS.unregister("test-nan-scales")
