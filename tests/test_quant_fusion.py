"""Quantization and fusion compose: a quantized linear fuses with its activation
whichever of ``quantize`` and ``fuse-linear-act`` runs first; merged Q/K/V and
gate/up linears are quantized as one layer; parity with the original model on
eager and ONNX Runtime, and the fused ONNX Runtime kernels in the export."""

import pytest
import torch
import torch.nn.functional as F

import fxopt
from fxopt.passes import PassManager, PipelineError
from fxopt.passes.fusion import ACTIVATION_OPS, LINEAR_ACT_PATTERNS, LINEAR_VARIANTS
from conftest import base_graph, count, model_spec, reference, run

aten = torch.ops.aten
fx_ops = torch.ops.fxopt

QUANT = {  # name -> (quantize options, the plain quantized op, its fused form, tolerance x output scale)
    "int4": ("quantize(bits=4,group_size=32)", fx_ops.linear_nbits.default, fx_ops.linear_nbits_act.default, 0.15),
    "int8": ("quantize(bits=8)", fx_ops.linear_nbits.default, fx_ops.linear_nbits_act.default, 0.02),
    "w8a8": ("quantize(mode=dynamic)", fx_ops.linear_dynamic_int8_per_token.default,
             fx_ops.linear_dynamic_int8_per_token_act.default, 0.02),
}
# The ONNX Runtime kernels each (model, quantization) must lower to.
ORT_OPS = {
    "int4": {"MatMulNBits"}, "int8": {"MatMulNBits"}, "w8a8": {"MatMulIntegerToFloat"},
    "gpt2-tiny": {"FastGelu"}, "bert-tiny": {"Gelu"}, "llama-tiny": set(),
}
# Per model: (quantized layers, of which fused with their activation).
EXPECTED = {
    "gpt2-tiny": (8, 2),  # c_attn is one Conv1D already; the two MLP GELUs (gelu_new) fuse
    "bert-tiny": (8, 2),  # Q/K/V merged; two intermediate GELUs (exact)
    "llama-tiny": (8, 0),  # Q/K/V and gate/up merged: SiLU then follows a split, not a linear
}



def quantize_record(result):
    (record,) = [r for r in result.records if r.name.startswith("quantize")]
    return record


def assert_parity_on_both_backends(spec, graph, tol):
    """Returns the exported ONNX model's op types."""
    original = reference(spec)
    for backend in ("eager", "onnxruntime"):
        compiled = fxopt.compile(graph, backend)
        parity = fxopt.compare(original, run(compiled, spec.example_inputs))
        assert parity.within(tol) and parity.cosine > 0.99, (backend, parity)
    return {node.op_type for node in compiled.program.model_proto.graph.node}


@pytest.mark.parametrize("quant", sorted(QUANT))
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_quantized_linears_fuse_in_either_order_with_parity(name, quant):
    options, plain, fused, tol = QUANT[quant]
    graph = base_graph(name)
    fuse_first = PassManager(f"merge-linears,fuse-linear-act,{options},dce").run(graph)
    quantize_first = PassManager(f"merge-linears,{options},fuse-linear-act,dce").run(graph)
    layers, with_act = EXPECTED[name]
    for result in (fuse_first, quantize_first):
        g = result.graph
        assert quantize_record(result).stats["quantized"] == layers
        assert (count(g, plain), count(g, fused)) == (layers - with_act, with_act)
        assert count(g, fx_ops.linear_act.default) == 0  # no float linear_act left behind
    if with_act:
        assert quantize_record(fuse_first).stats["activations_fused_again"] == with_act
    # The two orders build the same graph.
    spec = model_spec(name)
    assert fxopt.compare(run(fuse_first.graph, spec.example_inputs), run(quantize_first.graph, spec.example_inputs)).within(1e-6)
    onnx_ops = assert_parity_on_both_backends(spec, quantize_first.graph, tol)
    assert ORT_OPS[quant] | ORT_OPS[name] <= onnx_ops


def test_gpt2_stats_name_the_fused_patterns_and_layers():
    result = PassManager("fuse-linear-act,quantize(bits=4,group_size=32)").run(base_graph("gpt2-tiny"))
    assert result.records[0].stats["linear+gelu_tanh#1"]["rewritten"] == 2
    layers = quantize_record(result).stats["layers"]
    assert "transformer.h.0.mlp.c_fc" in layers and "transformer.h.1.mlp.c_fc" in layers
    # The fused node keeps the linear's module name, not the activation's.
    fused = [n for n in result.graph.fx.nodes if n.target == fx_ops.linear_nbits_act.default]
    assert sorted(n.meta["quantized_layer"] for n in fused) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    after = PassManager("quantize(mode=dynamic),fuse-linear-act").run(base_graph("gpt2-tiny"))
    assert after.records[1].stats["dynamic-int8-per-token+gelu_tanh#1"]["rewritten"] == 2


def test_a_fused_layer_left_float_by_quantize_keeps_its_linear_act():
    result = PassManager("fuse-linear-act,quantize(bits=4,group_size=32,exclude='mlp')").run(base_graph("gpt2-tiny"))
    g = result.graph
    assert count(g, fx_ops.linear_act.default) == 2 and count(g, fx_ops.linear_nbits_act.default) == 0
    assert quantize_record(result).stats["quantized"] == 4


def test_llama_silu_fuses_on_quantized_gate_when_gate_and_up_are_not_merged():
    spec = model_spec("llama-tiny")
    for pipeline in ("fuse-linear-act,quantize(bits=4,group_size=32)", "quantize(bits=4,group_size=32),fuse-linear-act"):
        g = PassManager(pipeline).run(base_graph("llama-tiny")).graph
        assert count(g, fx_ops.linear_nbits_act.default) == 2 and count(g, aten.silu.default) == 0
    onnx_ops = assert_parity_on_both_backends(spec, g, QUANT["int4"][3])
    assert "QuickGelu" in onnx_ops  # x * sigmoid(x) in one kernel (alpha=1)


def test_merged_linears_are_quantized_as_one_named_layer():
    result = PassManager("merge-linears,quantize(bits=4,group_size=32,include='q_proj|gate_proj')").run(base_graph("llama-tiny"))
    layers = quantize_record(result).stats["layers"]
    assert sorted(layers) == [
        "model.layers.0.mlp.gate_proj+up_proj", "model.layers.0.self_attn.q_proj+k_proj+v_proj",
        "model.layers.1.mlp.gate_proj+up_proj", "model.layers.1.self_attn.q_proj+k_proj+v_proj",
    ]
    out_features = sorted({n.args[6] for n in result.graph.fx.nodes if n.target == fx_ops.linear_nbits.default})
    assert out_features == [64 + 32 + 32, 128 + 128]


def test_merge_linears_after_quantize_is_a_pipeline_error():
    with pytest.raises(PipelineError, match="'merge-linears' must run before 'quantize'"):
        PassManager("canonicalize,quantize,merge-linears").check()


class LinearGeluShared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(64, 64)

    def forward(self, x):
        h = self.a(x)
        return F.gelu(h) * h


@pytest.mark.parametrize("options,pattern", [("quantize(bits=4,group_size=32)", "nbits+gelu"),
                                             ("quantize(mode=dynamic)", "dynamic-int8-per-token+gelu")])
def test_a_quantized_linear_with_a_second_user_is_not_fused(options, pattern):
    x = torch.randn(3, 64)
    graph = PassManager("canonicalize,dce").run(fxopt.trace(LinearGeluShared().eval(), (x,))).graph
    result = PassManager(f"{options},fuse-linear-act", check_numerics=True).run(graph)
    stats = result.records[1].stats[pattern]
    assert (stats["found"], stats["rewritten"], stats["skipped"]) == (1, 0, {"escaping": 1})
    assert count(result.graph, aten.gelu.default) == 1
    # Fusing first refuses too; quantize then sees a plain linear.
    first = PassManager(f"fuse-linear-act,{options}").run(graph)
    assert first.records[0].stats["rewritten"] == 0 and "activations_fused_again" not in first.records[1].stats


def test_matmulnbits_takes_the_bias_as_its_own_input():
    g = PassManager("quantize(bits=4,group_size=32),fuse-linear-act").run(base_graph("gpt2-tiny")).graph
    proto = fxopt.compile(g, "onnxruntime").program.model_proto
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 8 and all(len(n.input) == 6 and n.input[5] for n in nodes)
    consumers = {i: n.op_type for n in proto.graph.node for i in n.input}
    assert {consumers[n.output[0]] for n in nodes if n.output[0] in consumers} >= {"FastGelu"}


def test_fused_quantized_op_rejects_an_unknown_activation():
    x = torch.randn(2, 8)
    w_q, w_scale = torch.randint(-127, 127, (16, 8), dtype=torch.int8), torch.rand(16)
    with pytest.raises(ValueError, match="linear_dynamic_int8_act: unknown activation 'tanh'"):
        fx_ops.linear_dynamic_int8_act(x, w_q, w_scale, None, "tanh")


def test_per_tensor_w8a8_fuses_too():
    spec = model_spec("gpt2-tiny")
    g = PassManager("quantize(mode=dynamic,act_granularity=tensor),fuse-linear-act").run(base_graph("gpt2-tiny")).graph
    assert count(g, fx_ops.linear_dynamic_int8_act.default) == 2 and count(g, fx_ops.linear_dynamic_int8.default) == 6
    eager = run(fxopt.compile(g, "eager"), spec.example_inputs)
    ort = run(fxopt.compile(g, "onnxruntime"), spec.example_inputs)
    assert fxopt.compare(eager, ort).within(1e-4)  # the same integer arithmetic on both
    assert fxopt.compare(reference(spec), eager).cosine > 0.99


def test_each_activation_form_contains_the_op_that_selects_its_patterns():
    # fuse-linear-act skips an activation's patterns when the graph lacks its op.
    for act, pairs in LINEAR_ACT_PATTERNS.items():
        for variant, pattern in pairs:
            if variant is LINEAR_VARIANTS["linear"]:
                assert {n.target for n in pattern.traced.nodes} & ACTIVATION_OPS[act], pattern.name
