"""The non-attention fusions (fxopt.passes.fusion) on the test models and on
near-misses they must leave alone; parity on eager and ONNX Runtime."""

import pytest
import torch
import torch.nn.functional as F

import fxopt
from fxopt.ir.trace import split_inputs
from fxopt.passes import OptionError, PassManager
from fxopt.passes.fusion import FuseLinearAct
from conftest import base_graph, count, model_spec

aten = torch.ops.aten
fx_ops = torch.ops.fxopt
FUSIONS = "merge-linears,fuse-linear-act,fuse-norm"


def assert_parity_on_both_backends(before, after, inputs_list, tol=1e-4):
    """Returns the ONNX Runtime model's op types."""
    for backend in ("eager", "onnxruntime"):
        compiled = fxopt.compile(after, backend)
        for inputs in inputs_list:
            args, kwargs = split_inputs(inputs)
            parity = fxopt.compare(before(*args, **kwargs), compiled(*args, **kwargs))
            assert parity.within(tol), (backend, parity)
    return {node.op_type for node in compiled.program.model_proto.graph.node}


# ORT's kernels that each model's fused graph must lower to (residual norms go
# to Add + the norm, faster here than Skip*LayerNormalization: ir/ops_fused.py).
ORT_OPS = {
    "tiny-gpt": {"LayerNormalization", "FastGelu"},
    "gpt2-tiny": {"LayerNormalization", "FastGelu"},
    "bert-tiny": {"LayerNormalization", "BiasGelu"},
    "llama-tiny": {"SimplifiedLayerNormalization"},
}

# Per model: what each fusion finds (pattern -> rewritten) and the ops left.
EXPECTED = {
    "tiny-gpt": {
        "merge-linears": {"3-linears": 2},
        "fuse-linear-act": {"linear+gelu_tanh": 2},
        "fuse-norm": {"add+layer-norm": 5},  # 4 residual adds + the embeddings' add
    },
    "gpt2-tiny": {  # c_attn is already merged; GELU is written out (gelu_new)
        "merge-linears": {},
        "fuse-linear-act": {"linear+gelu_tanh#1": 2},
        "fuse-norm": {"add+layer-norm": 5},  # with the embeddings' add
    },
    "bert-tiny": {
        "merge-linears": {"3-linears": 2},
        "fuse-linear-act": {"linear+gelu": 2},
        "fuse-norm": {"add+layer-norm": 5},  # 4 residual adds + the embeddings' add
    },
    "llama-tiny": {  # gate/up merge first, so SiLU then follows a split, not a linear
        "merge-linears": {"3-linears-nobias": 2, "2-linears-nobias": 2},
        "fuse-linear-act": {},
        "fuse-norm": {"rms-norm#0": 5, "add+rms-norm": 4},
    },
}


def rewritten_counts(stats):
    return {k: v["rewritten"] for k, v in stats.items() if isinstance(v, dict) and v["rewritten"]}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fusions_on_the_test_models(name):
    graph = base_graph(name)
    result = PassManager(FUSIONS, check_numerics=True).run(graph)
    for record in result.records:
        assert rewritten_counts(record.stats) == EXPECTED[name][record.name], record.name
    fused = result.graph
    norms = sum(EXPECTED[name]["fuse-norm"].values()) - EXPECTED[name]["fuse-norm"].get("add+rms-norm", 0)
    assert count(fused, fx_ops.add_layer_norm.default) + count(fused, fx_ops.rms_norm.default) + count(fused, fx_ops.add_rms_norm.default) == norms
    spec = model_spec(name)
    onnx_ops = assert_parity_on_both_backends(graph, fused, [spec.example_inputs, *spec.other_inputs[:1]])
    assert ORT_OPS[name] <= onnx_ops


class MixedDtypeResidual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x, y):
        return self.norm(x + y)


def test_embedding_add_with_a_broadcast_operand_is_fused():
    # GPT-2 adds position embeddings [1, S, H] to token embeddings [B, S, H].
    stats = PassManager("fuse-norm").run(base_graph("gpt2-tiny")).records[0].stats["add+layer-norm"]
    assert stats["found"] == 5 and stats["rewritten"] == 5


def test_residual_add_of_two_dtypes_is_not_fused():
    # torch promotes float16 + float32; ONNX's Add would refuse the pair.
    x, y = torch.randn(2, 3, 8), torch.randn(2, 3, 8).half()
    stats = PassManager("fuse-norm").run(traced(MixedDtypeResidual(), x, y)).records[0].stats["add+layer-norm"]
    assert stats["found"] == 1 and stats["skipped"] == {"check": 1}


def test_linear_act_fuses_silu_when_gate_and_up_are_not_merged():
    graph = base_graph("llama-tiny")
    result = PassManager("fuse-linear-act", check_numerics=True).run(graph)
    assert rewritten_counts(result.records[0].stats) == {"linear-nobias+silu": 2}
    assert count(result.graph, aten.silu.default) == 0  # parity checked by check_numerics


def test_linear_act_honours_its_activation_list_and_rejects_unknown_names():
    result = PassManager("fuse-linear-act(activations=[relu,silu])").run(base_graph("bert-tiny"))
    assert result.records[0].stats["rewritten"] == 0
    with pytest.raises(OptionError, match="option 'activations': unknown activation"):
        FuseLinearAct(activations=("tanh",))


class SigmoidGatedMLP(torch.nn.Module):
    """``h * sigmoid(alpha * h)`` after a linear: CLIP's QuickGELU at alpha = 1.702."""

    def __init__(self, alpha):
        super().__init__()
        self.alpha, self.up, self.down = alpha, torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        h = self.up(x)
        return self.down(h * torch.sigmoid(self.alpha * h))


def test_quick_gelu_fuses_with_its_linear_on_both_backends_and_quantized():
    torch.manual_seed(0)
    model, x = SigmoidGatedMLP(1.702).eval(), torch.randn(3, 16)
    graph = traced(model, x)
    fused = PassManager("fuse-linear-act").run(graph)
    assert rewritten_counts(fused.records[0].stats) == {"linear+quick_gelu": 1}
    (node,) = [n for n in fused.graph.fx.nodes if n.target == fx_ops.linear_act.default]
    assert node.args[3] == "quick_gelu" and count(fused.graph, aten.sigmoid.default) == 0
    assert "QuickGelu" in assert_parity_on_both_backends(model, fused.graph, [(x,)])
    # quantize splits the fused op, quantizes the linear and fuses it again
    quantized = PassManager("quantize(mode=dynamic,act_granularity=tensor,min_size=0)").run(fused.graph).graph
    assert count(quantized, fx_ops.linear_dynamic_int8_act.default) == 1
    assert "QuickGelu" in assert_parity_on_both_backends(model, quantized, [(x,)], tol=0.05)


def test_a_sigmoid_gate_with_another_slope_is_not_quick_gelu():
    graph = traced(SigmoidGatedMLP(1.5), torch.randn(3, 16))
    result = PassManager("fuse-linear-act").run(graph)
    assert result.records[0].stats["rewritten"] == 0 and count(result.graph, aten.sigmoid.default) == 1


# --- near-misses ------------------------------------------------------------------------

def traced(module, *inputs):
    return PassManager("canonicalize,dce").run(fxopt.trace(module.eval(), inputs)).graph


class SharedInput(torch.nn.Module):
    """Two linears on x: one with a weight parameter, one with a weight input."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(8, 8)

    def forward(self, x, w, b):
        return self.q(x) + F.linear(x, w, b)


def test_a_linear_whose_weight_is_a_graph_input_is_not_merged():
    x, w, b = torch.randn(2, 3, 8), torch.randn(8, 8), torch.randn(8)
    graph = traced(SharedInput(), x, w, b)
    result = PassManager("merge-linears").run(graph)
    stats = result.records[0].stats
    assert stats["rewritten"] == 0 and count(result.graph, aten.linear.default) == 2
    assert "where['w1'] (is_constant) rejected %w (placeholder)" in stats["2-linears"]["nearest_miss"]


class Norms(torch.nn.Module):
    """RMSNorm and a hand-written LayerNorm, each with its own epsilon, and an
    RMSNorm over the wrong dim that must stay as it is."""

    def __init__(self):
        super().__init__()
        self.g1, self.g2 = torch.nn.Parameter(torch.rand(8) + 0.5), torch.nn.Parameter(torch.rand(8) + 0.5)
        self.ln_w, self.ln_b = torch.nn.Parameter(torch.rand(8) + 0.5), torch.nn.Parameter(torch.randn(8))

    def forward(self, x, r):
        h = self.g1 * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
        h = (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)) * self.g2
        u = h.mean(-1, keepdim=True)
        s = (h - u).pow(2).mean(-1, keepdim=True)
        h = self.ln_w * ((h - u) / torch.sqrt(s + 1e-3)) + self.ln_b
        odd = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)  # over the sequence dim
        return h + odd


def test_norms_are_fused_and_each_keeps_its_epsilon():
    x, r = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    graph = traced(Norms(), x, r)
    result = PassManager("fuse-norm", check_numerics=True).run(graph)
    fused = result.graph
    assert sorted(n.args[2] for n in fused.fx.nodes if n.target == fx_ops.rms_norm.default) == [1e-6, 1e-5]
    assert [n.args[4] for n in fused.fx.nodes if n.target == aten.layer_norm.default] == [1e-3]
    assert count(fused, aten.rsqrt.default) == 1  # the norm over dim 1 is left alone
    assert {"SimplifiedLayerNormalization", "LayerNormalization"} <= assert_parity_on_both_backends(graph, fused, [(x, r)])


class Residual(torch.nn.Module):
    def __init__(self, eps=1e-6):
        super().__init__()
        self.w = torch.nn.Parameter(torch.rand(8) + 0.5)
        self.eps = eps

    def forward(self, x, y):
        s = x + y
        n = self.w * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + self.eps))
        return s, n


def test_residual_add_and_rms_norm_become_one_op_with_both_outputs():
    x, y = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    graph = traced(Residual(), x, y)
    fused = PassManager("fuse-norm").run(graph).graph
    assert count(fused, fx_ops.add_rms_norm.default) == 1 and count(fused, aten.add.Tensor) == 0
    ops = assert_parity_on_both_backends(graph, fused, [(x, y)])
    assert "SimplifiedLayerNormalization" in ops and "SkipSimplifiedLayerNormalization" not in ops
    unfused = PassManager("fuse-norm(residual=false)").run(graph).graph
    assert count(unfused, fx_ops.rms_norm.default) == 1 and count(unfused, fx_ops.add_rms_norm.default) == 0


class LinearGeluShared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        return F.gelu(h) * h


def test_a_linear_whose_output_is_also_used_elsewhere_is_not_fused():
    graph = traced(LinearGeluShared(), torch.randn(2, 8))
    stats = PassManager("fuse-linear-act").run(graph).records[0].stats["linear+gelu"]
    assert (stats["found"], stats["rewritten"], stats["skipped"]) == (1, 0, {"escaping": 1})


def test_fusions_compose_with_weight_quantization():
    # Merged Q/K/V and gate/up are quantized as one matrix each; norms still fuse.
    graph = base_graph("llama-tiny")
    result = PassManager("merge-linears,quantize(bits=4,group_size=32),fuse-norm,dce").run(graph)
    fused = result.graph
    out_features = {n.args[6] for n in fused.fx.nodes if n.target == fx_ops.linear_nbits.default}
    assert {64 + 32 + 32, 128 + 128} <= out_features
    assert rewritten_counts(result.records[2].stats) == EXPECTED["llama-tiny"]["fuse-norm"]
    spec = model_spec("llama-tiny")
    args, kwargs = split_inputs(spec.example_inputs)
    assert fxopt.compare(graph(*args, **kwargs), fused(*args, **kwargs)).cosine > 0.99


def test_onnx_runtime_sessions_keep_add_and_layer_norm_apart(tmp_path):
    # ONNX Runtime would fold Add + LayerNormalization into its slower
    # SkipLayerNormalization (ir/ops_fused.py); fxopt's sessions turn that off.
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from fxopt.backends.onnxruntime import new_session, session_options

    nodes = [helper.make_node("Add", ["x", "r"], ["s"]), helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1)]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8]) for n in ("x", "r", "y")]
    weights = [numpy_helper.from_array(torch.ones(8).numpy(), "g"), numpy_helper.from_array(torch.zeros(8).numpy(), "b")]
    model = helper.make_model(helper.make_graph(nodes, "g", io[:2], io[2:], weights), opset_imports=[helper.make_opsetid("", 17)])

    def optimized_ops(make):
        options = session_options(1, 1, "all", False)
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        make(model.SerializeToString(), options)
        return {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}

    assert "SkipLayerNormalization" in optimized_ops(lambda m, o: ort.InferenceSession(m, o, providers=["CPUExecutionProvider"]))
    assert optimized_ops(new_session) == {"Add", "LayerNormalization"}
