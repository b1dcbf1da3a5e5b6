"""Calibration: observers on hand-computed values, and statistics collected
from a real graph without changing it."""

import pytest
import torch

import fxopt
from fxopt.passes.quantize.calibration import (
    CalibrationError,
    MinMaxObserver,
    MovingAverageObserver,
    PercentileObserver,
    collect_linear_stats,
    linear_nodes,
)
from conftest import BASE_PIPELINE, model_spec, trace_once


def test_minmax_observer_keeps_extremes_and_zero():
    obs = MinMaxObserver()
    obs.update(torch.tensor([1.0, 2.0, 3.0]))
    obs.update(torch.tensor([0.5, 6.0]))
    # 0 is kept inside the range so that it stays exactly representable.
    assert obs.range() == (0.0, 6.0)
    obs.update(torch.tensor([-2.0]))
    assert obs.range() == (-2.0, 6.0)
    # asymmetric int8: scale = 8 / 255, zero point = -128 - (-2) / scale = -64.25 -> -64
    scale, zp = obs.qparams(8)
    assert scale == pytest.approx(8 / 255)
    assert zp == -64
    # symmetric: scale = 6 / 127, zero point 0
    assert obs.qparams(8, symmetric=True) == (pytest.approx(6 / 127), 0)


def test_moving_average_observer_follows_torch_ao_formula():
    obs = MovingAverageObserver(momentum=0.5)
    obs.update(torch.tensor([-1.0, 1.0]))  # first batch sets the range
    obs.update(torch.tensor([-3.0, 5.0]))  # -1 + 0.5 * (-3 + 1) = -2 ; 1 + 0.5 * (5 - 1) = 3
    assert obs.range() == (-2.0, 3.0)
    # and matches torch.ao's own observer
    ref = torch.ao.quantization.MovingAverageMinMaxObserver(averaging_constant=0.5)
    ref(torch.tensor([-1.0, 1.0]))
    ref(torch.tensor([-3.0, 5.0]))
    assert (ref.min_val.item(), ref.max_val.item()) == obs.range()


def test_percentile_observer_clips_outliers():
    values = torch.arange(1, 10001, dtype=torch.float32)  # 1 .. 10000
    values[-1] = 1e6  # one outlier
    obs = PercentileObserver(percentile=99.9)
    obs.update(-values)
    obs.update(values)
    # nearest rank: the 9990-th smallest of 10000 is 9990 (per batch, averaged)
    lo, hi = obs.range()
    assert hi == pytest.approx((9990 + -11) / 2)  # batch 1 (negated) p99.9 = -11, batch 2 = 9990
    assert lo == pytest.approx((-9990 + 11) / 2)
    minmax = MinMaxObserver()
    minmax.update(values)
    assert minmax.range()[1] == 1e6  # min-max would spend the whole grid on the outlier


def test_bad_observer_options_are_clear():
    with pytest.raises(CalibrationError, match="percentile must be"):
        PercentileObserver(percentile=20)
    with pytest.raises(CalibrationError, match="momentum"):
        MovingAverageObserver(momentum=0)
    with pytest.raises(CalibrationError, match="saw no data"):
        MinMaxObserver().range()


def _mlp_graph():
    spec = model_spec("mlp")
    g = trace_once(spec, graph_name="mlp")
    return spec, fxopt.PassManager(BASE_PIPELINE).run(g).graph


def test_collect_linear_stats_matches_hooks_on_the_model_and_leaves_graph_unchanged():
    spec, g = _mlp_graph()
    before = str(g)
    data = [(torch.randn(5, 32),), (torch.randn(3, 32) * 4,)]
    stats = collect_linear_stats(g, data, hessian=True, keep_rows=6)
    assert str(g) == before
    names = [n.name for n in linear_nodes(g)]
    assert list(stats) == names and len(names) == 3

    # the same inputs seen through forward hooks on the original nn.Module
    seen = {i: [] for i in range(3)}
    hooks = [m.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0])) for i, m in enumerate(spec.model.layers)]
    with torch.no_grad():
        for (x,) in data:
            spec.model(x)
    for h in hooks:
        h.remove()
    for i, name in enumerate(names):
        x = torch.cat(seen[i])
        s = stats[name]
        assert s.rows == 8
        assert s.observer.range() == (pytest.approx(min(x.min().item(), 0)), pytest.approx(max(x.max().item(), 0)))
        torch.testing.assert_close(s.channel_absmax, x.abs().amax(0))
        torch.testing.assert_close(s.hessian, (x.double().T @ x.double()) / 8)
        torch.testing.assert_close(s.sample(), x[:6])


def test_collect_selected_nodes_with_percentile_observer():
    _, g = _mlp_graph()
    first = linear_nodes(g)[0]
    stats = collect_linear_stats(g, [torch.randn(64, 32)], [first.name], observer="percentile", percentile=99.0)
    assert list(stats) == [first.name]
    lo, hi = stats[first.name].observer.range()
    assert lo < 0 < hi and stats[first.name].hessian is None


def test_collect_on_a_transformer_with_keyword_inputs():
    spec = model_spec("bert-tiny")
    g = fxopt.PassManager(BASE_PIPELINE).run(trace_once(spec)).graph
    stats = collect_linear_stats(g, [spec.example_inputs] + spec.other_inputs, observer="moving-average")
    assert len(stats) == len(linear_nodes(g)) == 12
    assert all(s.rows == 2 * 16 + 3 * 11 for s in stats.values())


def test_collect_rejects_bad_calibration_input():
    _, g = _mlp_graph()
    with pytest.raises(CalibrationError, match="empty"):
        collect_linear_stats(g, [])
    with pytest.raises(CalibrationError, match="not in graph"):
        collect_linear_stats(g, [torch.randn(2, 32)], ["nope"])
    relu_or_gelu = next(n for n in g.fx.nodes if n.op == "call_function" and n.target != torch.ops.aten.linear.default)
    with pytest.raises(CalibrationError, match="not aten.linear"):
        collect_linear_stats(g, [torch.randn(2, 32)], [relu_or_gelu])
    with pytest.raises(CalibrationError, match=r"calibration_data\[0\] does not fit"):
        collect_linear_stats(g, [{"y": torch.randn(2, 32)}])


@pytest.mark.parametrize("pipeline,steps", [
    ("canonicalize,quantize(mode=static)", {"quantize: calibrating": 3, "quantize: quantizing layers": 3}),
    ("canonicalize,quantize(bits=4,group_size=16,method=gptq)", {"quantize: calibrating": 3, "quantize: quantizing layers": 3}),
])
def test_long_steps_report_progress_to_the_runs_progress_input(pipeline, steps):
    spec = model_spec("mlp")
    graph = trace_once(spec)
    calibration = [(torch.randn(4, 32),) for _ in range(3)]
    seen = {}

    def progress(items, description):
        for item in items:
            seen[description] = seen.get(description, 0) + 1
            yield item

    result = fxopt.PassManager(pipeline, calibration_data=calibration).run(graph, progress=progress)
    assert seen == steps and result.records[-1].stats["quantized"] == 3
    # Without a progress input the same run reports nothing and gives the same graph.
    plain = fxopt.PassManager(pipeline, calibration_data=calibration).run(graph)
    assert str(plain.graph) == str(result.graph)
