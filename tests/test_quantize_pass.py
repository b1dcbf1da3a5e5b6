"""The ``quantize`` pass: every scheme x mode x backend on small models, checked
tightly against a float model built from the same dequantized weights and
loosely against the original; saving, ONNX export, bad options, and cases where
the pass must not fire."""

import onnx
import pytest
import torch
import torch.nn.functional as F

import fxopt
from fxopt.ir.ops_quant import linear_dynamic_reference
from fxopt.ir.quant import QuantConfig, quantize
from fxopt.passes import OptionError, PassError, PipelineError
from fxopt.passes.quantize import METHODS, MODES, Quantize
from conftest import model_spec, reference, run, trace_once

aten = torch.ops.aten
FX_NBITS = torch.ops.fxopt.linear_nbits.default
FX_DYNAMIC = torch.ops.fxopt.linear_dynamic_int8.default


def traced(name):
    spec = model_spec(name)
    return spec, trace_once(spec, graph_name=name)


def quantized(name, options):
    spec, graph = traced(name)
    canon = fxopt.PassManager("canonicalize").run(graph).graph
    result = fxopt.PassManager([Quantize(**options)]).run(canon)
    return spec, canon, result.graph, result.records[-1].stats


def dequantized_reference(canon, stats):
    """The canonical float graph with each quantized layer's weight replaced by
    its dequantized form, computed independently with the reference quantizer."""
    ref = canon.copy()
    for node in list(ref.fx.nodes):
        if node.target != aten.linear.default:
            continue
        rec = stats["layers"].get(Quantize.layer_name(node))
        if rec is None or rec.get("kept_float"):
            continue
        w = ref.constant(node.args[1])
        qt = quantize(w, QuantConfig(rec["bits"], rec["scheme"], rec["granularity"], GROUP))
        with ref.fx.inserting_before(node):
            node.replace_input_with(node.args[1], ref.add_constant(qt.dequantize(), "deq"))
    ref.recompile()
    return ref


GROUP = 32
# (model, options, loose tolerance vs the original as a fraction of the output scale)
CASES = [
    ("tiny-gpt", dict(bits=4, scheme="asym", granularity="group", group_size=GROUP), 0.15),
    ("tiny-gpt", dict(bits=8, scheme="sym", granularity="channel"), 0.02),
    ("gpt2-tiny", dict(bits=4, scheme="sym", granularity="group", group_size=GROUP), 0.15),
    ("gpt2-tiny", dict(bits=8, scheme="asym", granularity="tensor"), 0.02),
    ("llama-tiny", dict(bits=4, scheme="asym", granularity="channel"), 0.3),
    ("llama-tiny", dict(bits=3, scheme="sym", granularity="group", group_size=GROUP), 0.5),
]


@pytest.mark.parametrize("name,options,loose", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_weight_only_matches_dequantized_reference_on_both_backends(name, options, loose):
    spec, canon, q, stats = quantized(name, {**options, "accuracy_level": 0})
    n_linear = sum(1 for n in canon.fx.nodes if n.target == aten.linear.default)
    assert stats["quantized"] == n_linear - stats["skipped"].get("lm-head", 0) > 0
    fused = sum(1 for n in q.fx.nodes if n.target == FX_NBITS)
    assert fused == (stats["quantized"] if options["bits"] in (4, 8) else 0)  # 3 bits: dequantize form
    expected = run(dequantized_reference(canon, stats), spec.example_inputs)
    original = reference(spec)
    eager = run(fxopt.compile(q, "eager"), spec.example_inputs)
    assert fxopt.compare(expected, eager).within(1e-5)
    ort = run(fxopt.compile(q, "onnxruntime"), spec.example_inputs)
    assert fxopt.compare(expected, ort).within(1e-4)
    assert fxopt.compare(original, eager).within(loose)
    # Dynamic dimensions survive: other shapes run too.
    other = spec.other_inputs[0]
    assert fxopt.compare(run(dequantized_reference(canon, stats), other), run(q, other)).within(1e-5)


@pytest.mark.parametrize("name", ["tiny-gpt", "gpt2-tiny", "llama-tiny"])
def test_dynamic_w8a8_on_both_backends(name):
    # Per-tensor activations (fbgemm); the per-token default: tests/test_quant_per_token.py
    spec, canon, q, stats = quantized(name, dict(mode="dynamic", act_granularity="tensor"))
    assert sum(1 for n in q.fx.nodes if n.target == FX_DYNAMIC) == stats["quantized"] > 0
    eager = run(fxopt.compile(q, "eager"), spec.example_inputs)
    ort = run(fxopt.compile(q, "onnxruntime"), spec.example_inputs)
    # Both backends compute the same integer arithmetic.
    assert fxopt.compare(eager, ort).within(1e-4)
    # Against float with the same int8 weights: only activation rounding (8 bits) differs.
    expected = run(dequantized_reference(canon, stats), spec.example_inputs)
    assert fxopt.compare(expected, eager).within(0.03)
    assert fxopt.compare(reference(spec), eager).cosine > 0.999


class DynamicLinear(torch.nn.Module):
    def __init__(self, w_q, w_scale, bias):
        super().__init__()
        self.w_q, self.w_scale, self.bias = w_q, w_scale, bias

    def forward(self, x):
        return torch.ops.fxopt.linear_dynamic_int8(x, self.w_q, self.w_scale, self.bias)


def test_dynamic_op_matches_its_definition_on_both_backends():
    x, w = torch.randn(2, 5, 64) * 3 + 1, torch.randn(48, 64)
    qt = quantize(w, QuantConfig(7, "sym", "channel"))  # codes within +-63, as the pass stores them
    bias = torch.randn(48)
    want = linear_dynamic_reference(x, qt.q, qt.scale.view(-1), bias)
    graph = fxopt.trace(DynamicLinear(qt.q, qt.scale.view(-1), bias), (x,))
    for backend in ("eager", "onnxruntime"):  # fbgemm; DynamicQuantizeLinear + MatMulIntegerToFloat
        assert fxopt.compare(want, fxopt.compile(graph, backend)(x)).within(1e-5), backend


def test_dynamic_op_refuses_weight_codes_that_would_saturate_the_kernel():
    # 8-bit activations x full-range int8 weights overflow the int16 pair sums
    # of the int8 kernels on CPUs without VNNI.
    qt = quantize(torch.randn(48, 64), QuantConfig(8, "sym", "channel"))
    with pytest.raises(ValueError, match="codes within \\+-63"):
        torch.ops.fxopt.linear_dynamic_int8(torch.randn(3, 64), qt.q, qt.scale.view(-1), None)


def test_dynamic_per_tensor_layers_store_codes_within_63_on_both_backends():
    spec, canon, q, stats = quantized("gpt2-tiny", dict(mode="dynamic", act_granularity="tensor"))
    weights = [n.args[1] for n in q.fx.nodes if n.target == FX_DYNAMIC]
    assert len(weights) == 8
    for w in weights:
        codes = getattr(q.module, w.target)
        assert codes.dtype == torch.int8 and int(codes.abs().max()) == 63
    ort = run(fxopt.compile(q, "onnxruntime"), spec.example_inputs)
    assert fxopt.compare(run(fxopt.compile(q, "eager"), spec.example_inputs), ort).within(5e-3)
    assert fxopt.compare(reference(spec), ort).cosine > 0.999


def test_accuracy_level_4_lets_onnx_runtime_quantize_activations():
    spec, canon, q, stats = quantized("mlp", dict(bits=4, group_size=GROUP, accuracy_level=4))
    expected = run(dequantized_reference(canon, stats), spec.example_inputs)
    parity = fxopt.compare(expected, run(fxopt.compile(q, "onnxruntime"), spec.example_inputs))
    assert parity.within(0.02) and not parity.within(1e-6)


def test_quantized_model_saves_loads_and_exports_with_matmulnbits(tmp_path):
    spec, canon, q, stats = quantized("gpt2-tiny", dict(bits=4, group_size=GROUP))
    q.save(tmp_path / "q.pt2")
    loaded = fxopt.load(tmp_path / "q.pt2")
    assert fxopt.compare(run(q, spec.example_inputs), run(loaded, spec.example_inputs)).within(1e-6)
    path = fxopt.export_onnx(loaded, tmp_path / "q.onnx")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("MatMulNBits") == stats["quantized"] == 8
    assert "MatMulNBits" in [n.op_type for n in onnx.load(path).graph.node if n.domain == "com.microsoft"]


def test_dynamic_model_saves_and_exports_with_integer_matmuls(tmp_path):
    spec, canon, q, stats = quantized("tiny-gpt", dict(mode="dynamic"))
    q.save(tmp_path / "q.pt2")
    loaded = fxopt.load(tmp_path / "q.pt2")
    assert fxopt.compare(run(q, spec.example_inputs), run(loaded, spec.example_inputs)).within(1e-6)
    ops = [n.op_type for n in onnx.load(fxopt.export_onnx(loaded, tmp_path / "q.onnx")).graph.node]
    assert ops.count("MatMulIntegerToFloat") == stats["quantized"] == 12


class WideMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(256, 512)
        self.down = torch.nn.Linear(512, 256)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def test_int4_export_is_under_a_third_of_fp32(tmp_path):
    torch.manual_seed(0)
    graph = fxopt.trace(WideMLP().eval(), (torch.randn(2, 256),))
    fp32 = fxopt.export_onnx(fxopt.PassManager("canonicalize").run(graph).graph, tmp_path / "fp32.onnx").stat().st_size
    q = fxopt.PassManager("canonicalize,quantize(bits=4,group_size=64)").run(graph)
    int4 = fxopt.export_onnx(q.graph, tmp_path / "int4.onnx").stat().st_size
    assert int4 <= 0.3 * fp32
    assert q.records[-1].stats["bytes_saved"] > 0.7 * (256 * 512 * 2 * 4)


def test_stats_report_error_and_bytes_per_layer():
    _, _, _, stats = quantized("tiny-gpt", dict(bits=4, group_size=GROUP))
    layer = stats["layers"]["blocks.0.q"]
    assert layer["bits"] == 4 and 15 < layer["sqnr_db"] < 40 and 0 < layer["rel_err"] < 0.2
    assert layer["bytes_saved"] == 64 * 64 * 4 - (64 * 64 // 2 + 64 * 2 * 4 + 64 * 2 // 2)
    assert stats["bytes_saved"] == sum(r["bytes_saved"] for r in stats["layers"].values())
    assert stats["skipped"] == {"lm-head": 1}  # the head is tied to the embedding


def test_pipeline_text_selection_and_overrides():
    spec, graph = traced("tiny-gpt")
    text = "canonicalize,quantize(bits=4,group_size=32,include='blocks\\.0\\.',exclude='proj',overrides=['up$:bits=8'])"
    result = fxopt.PassManager(text, check_numerics=True).run(graph)
    stats = result.records[-1].stats
    assert sorted(stats["layers"]) == ["blocks.0.down", "blocks.0.k", "blocks.0.q", "blocks.0.up", "blocks.0.v"]
    assert stats["layers"]["blocks.0.up"]["bits"] == 8 and stats["layers"]["blocks.0.up"]["granularity"] == "channel"
    assert stats["layers"]["blocks.0.q"]["bits"] == 4
    assert stats["skipped"] == {"lm-head": 1, "not-included": 6, "excluded": 1}
    # min_size and the LM head switch
    _, _, _, s2 = quantized("tiny-gpt", dict(bits=8, min_size=64 * 96, skip_lm_head=False))
    assert sorted(s2["layers"]) == ["blocks.0.down", "blocks.0.up", "blocks.1.down", "blocks.1.up", "head"]
    assert s2["skipped"] == {"below-min-size": 8}


def test_guard_times_layers_and_keeps_float_where_quantizing_does_not_pay():
    spec, canon, q, stats = quantized("gpt2-tiny", dict(mode="dynamic", act_granularity="tensor", guard=True))
    assert all("float_ms" in r and "quant_ms" in r for r in stats["layers"].values())
    kept = stats["kept_float_by_guard"]
    assert all((r["quant_ms"] >= r["float_ms"]) == (name in kept) for name, r in stats["layers"].items())
    assert sum(1 for n in q.fx.nodes if n.target == FX_DYNAMIC) == stats["quantized"] == 8 - len(kept)
    assert sum(1 for n in q.fx.nodes if n.target == aten.linear.default) == len(kept) + 1  # + the LM head
    assert fxopt.compare(reference(spec), run(q, spec.example_inputs)).cosine > 0.999


# -- bad options: clear errors, graph untouched ----------------------------------------

@pytest.mark.parametrize("options,message", [
    (dict(bits=1), "option 'bits': bits must be from 2 to 8"),
    (dict(scheme="nf4"), "option 'scheme' must be one of"),
    (dict(mode="dynamic", bits=4), "mode 'dynamic' runs int8 x int8 kernels"),
    (dict(include="(unclosed"), "invalid regular expression"),
    (dict(overrides=["attn"]), "each override is 'regex:key=value"),
    (dict(overrides=["attn:bitz=4"]), "expected key=value with key one of"),
    (dict(overrides=["attn:bits=12"]), "bits must be from 2 to 8"),
    # was accepted and ignored: per-channel weights came out
    (dict(mode="dynamic", group_size=32), r"'group_size=32' applies to granularity=group only.*mode=dynamic"),
    (dict(bits=8, group_size=64), r"'group_size=64' applies to granularity=group only.*8 bits"),
])
def test_bad_options_fail_at_construction(options, message):
    with pytest.raises(OptionError, match=message):
        Quantize(**options)


def test_modes_and_methods_not_yet_available_fail_clearly():
    for key, value, table in (("mode", "static", MODES), ("method", "awq", METHODS), ("method", "gptq", METHODS)):
        if value in table:  # plugged in: then it needs calibration data
            spec, graph = traced("mlp")
            with pytest.raises(PipelineError, match="needs input 'calibration_data'"):
                fxopt.PassManager(f"canonicalize,quantize({key}={value})").run(graph)
        else:
            with pytest.raises(OptionError, match=f"{key} '{value}' is not available yet"):
                Quantize(**{key: value})


@pytest.mark.parametrize("options,message", [
    (dict(bits=4, group_size=48), "layer 'blocks.0.q' .*group size 48 does not divide the input dimension K=64"),
    (dict(include="no_such_layer"), "include='no_such_layer' matches no layer"),
    (dict(exclude="no_such_layer"), "exclude='no_such_layer' matches no layer"),
    (dict(overrides=["nothing:bits=4"]), "override 'nothing:bits=4' matches no layer"),
])
def test_run_time_errors_name_the_problem_and_leave_the_graph_untouched(options, message):
    _, graph = traced("tiny-gpt")
    canon = fxopt.PassManager("canonicalize").run(graph).graph
    before = str(canon)
    with pytest.raises(PassError, match=message):
        Quantize(**options).run(canon)
    assert str(canon) == before
    with pytest.raises(PassError, match="pass 'quantize"):
        fxopt.PassManager([Quantize(**options)]).run(canon)


def test_a_group_wider_than_a_layer_falls_back_to_the_widest_that_divides_it():
    # gpt2-tiny is 64 wide (MLP down 256): group_size=128, the usual int4 setting,
    # gives its 64-column layers groups of 64 and keeps 128 where K allows.
    spec, canon, q, stats = quantized("gpt2-tiny", dict(bits=4, group_size=128))
    widths = {Quantize.layer_name(n): canon.constant(n.args[1]).shape[1]
              for n in canon.fx.nodes if n.target == aten.linear.default}
    assert stats["group_size_adjusted"] and all(widths[name] == 64 == g for name, g in stats["group_size_adjusted"].items())
    assert all(widths[name] >= 128 for name in stats["layers"] if name not in stats["group_size_adjusted"])
    for backend in ("eager", "onnxruntime"):
        model = q if backend == "eager" else fxopt.compile(q, "onnxruntime")
        assert fxopt.compare(reference(spec), run(model, spec.example_inputs)).cosine > 0.98


def test_a_group_that_does_not_divide_k_says_which_group_sizes_do():
    _, graph = traced("tiny-gpt")
    canon = fxopt.PassManager("canonicalize").run(graph).graph
    with pytest.raises(PassError, match=r"use group_size=64 \(group sizes that divide 64: 64, 32, 16\)"):
        Quantize(bits=4, group_size=48).run(canon)


def test_quantize_requires_canonicalize_first():
    _, graph = traced("mlp")
    with pytest.raises(PipelineError, match="requires 'canonical-linear'"):
        fxopt.PassManager("quantize").run(graph)


# -- where the pass must not fire ----------------------------------------------------------

class WeightAsInput(torch.nn.Module):
    def forward(self, x, w):
        return F.linear(x, w) + x @ w.t()


def test_linear_whose_weight_is_a_graph_input_is_left_alone():
    graph = fxopt.trace(WeightAsInput(), (torch.randn(3, 8), torch.randn(8, 8)))
    canon = fxopt.PassManager("canonicalize").run(graph).graph
    result = fxopt.PassManager([Quantize(bits=4, group_size=8)]).run(canon)
    record = result.records[-1]
    assert not record.changed and record.stats["quantized"] == 0
    assert record.stats["skipped"] == {"weight-not-constant": 1}
    assert str(result.graph) == str(canon)


def test_include_one_layer_quantizes_only_that_layer():
    spec, canon, q, stats = quantized("tiny-gpt", dict(bits=8, include=r"^blocks\.1\.v$"))
    assert list(stats["layers"]) == ["blocks.1.v"] and stats["quantized"] == 1
    (node,) = [n for n in q.fx.nodes if n.target == FX_NBITS]
    assert node.meta["quantized_layer"] == "blocks.1.v"
    assert sum(1 for n in q.fx.nodes if n.target == aten.linear.default) == 12


class SharedLayer(torch.nn.Module):
    """One linear applied four times (ALBERT shares its layers this way)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(64, 64)

    def forward(self, x):
        for _ in range(4):
            x = torch.tanh(self.a(x))
        return x


@pytest.mark.parametrize("options", [dict(mode="dynamic"), dict(bits=4, group_size=32), dict(bits=3, group_size=32)],
                         ids=["w8a8", "int4", "int3-portable"])
def test_a_layer_called_four_times_keeps_one_quantized_copy(options):
    torch.manual_seed(0)
    model, x = SharedLayer().eval(), torch.randn(2, 8, 64)
    canon = fxopt.PassManager("canonicalize").run(fxopt.trace(model, (x,))).graph
    result = fxopt.PassManager([Quantize(**options)]).run(canon)
    record, q = result.records[-1], result.graph
    assert list(record.stats["layers"]) == ["a", "a#2", "a#3", "a#4"]
    # One copy of the codes and scales, read by all four calls (four copies of
    # 4096 codes would hold more than half the float weight's 16 KiB).
    assert record.stats["shared_constants"] > 0
    assert record.param_bytes_after < 64 * 64 * 4 // 2
    assert record.param_bytes_before - record.param_bytes_after == record.stats["bytes_saved"]
    assert [r["bytes_saved"] < 0 for r in record.stats["layers"].values()] == [True, False, False, False]
    expected = model(x)
    for backend in ("eager", "onnxruntime"):
        assert fxopt.compare(expected, fxopt.compile(q, backend)(x)).within(0.3 if options.get("bits", 8) < 8 else 0.03)


class MergedTopLevelMatmuls(torch.nn.Module):
    """Two top-level matmuls that merge-linears joins next to a linear named ``b``:
    the merged layer's codes were once named ``qweight``, which torch.export
    lifts as ``b_qweight``, the name of ``b``'s codes, and the ONNX file lost one."""

    def __init__(self):
        super().__init__()
        self.b = torch.nn.Linear(32, 32)
        self.W = torch.nn.Parameter(torch.randn(32, 32) / 6)
        self.V = torch.nn.Parameter(torch.randn(32, 32) / 6)

    def forward(self, x):
        return self.b(x) + x @ self.W + x @ self.V


def test_merged_top_level_layers_are_named_and_export_beside_a_layer_named_b():
    torch.manual_seed(0)
    model, x = MergedTopLevelMatmuls().eval(), torch.randn(2, 4, 32)
    pipeline = "canonicalize,merge-linears,quantize(mode=dynamic,act_granularity=tensor),dce"
    result = fxopt.PassManager(pipeline).run(fxopt.trace(model, (x,)))
    assert sorted(result.records[2].stats["layers"]) == ["b", "linear_default+linear_default_1"]
    for backend in ("eager", "onnxruntime"):
        assert fxopt.compare(model(x), fxopt.compile(result.graph, backend)(x)).within(0.03)
