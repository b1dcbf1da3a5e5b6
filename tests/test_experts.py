"""``fuse-experts``: a mixture of experts' batched form (gathered expert
weights, two ``bmm``) -> one ``fxopt.experts_swiglu`` op, ONNX Runtime's
``MoE`` on that backend; the routing it refuses; parity on both backends."""

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

import fxopt
from fxopt.models import hf_spec
from conftest import run

transformers = pytest.importorskip("transformers")
aten = torch.ops.aten
EXPERTS = torch.ops.fxopt.experts_swiglu.default
PREPARE = "canonicalize,dce,constant-fold,cse"


def moe_model(kind: str):
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=256, max_position_embeddings=128, use_cache=False)
    torch.manual_seed(0)
    if kind == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**small, num_local_experts=4, num_experts_per_tok=2))
    elif kind == "qwen2_moe":  # renormalization off, a sigmoid-gated shared expert beside the routed ones
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            **small, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64))
    elif kind == "granitemoe":  # topk of the router logits, then a softmax of the k values
        model = transformers.GraniteMoeForCausalLM(transformers.GraniteMoeConfig(
            **{**small, "intermediate_size": 32}, num_local_experts=4, num_experts_per_tok=2))
    else:  # DeepSeek-V3: sigmoid scores, group-limited topk on biased scores, weights gathered at its indices,
        # then renormalized and scaled; its first layer dense, latent attention
        model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
            **{**small, "num_key_value_heads": 4}, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
            n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=32,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16))
    return hf_spec(model, 256, kind, mask=False, max_len=128)


MOE_LAYERS = {"mixtral": 2, "qwen2_moe": 2, "granitemoe": 2, "deepseek_v3": 1}


def onnx_ops(compiled) -> list[str]:
    return [n.op_type for n in compiled.program.model_proto.graph.node]


@pytest.mark.parametrize("kind", list(MOE_LAYERS))
def test_batched_experts_become_one_op_and_onnx_runtime_moe(kind):
    spec = moe_model(kind)
    layers = MOE_LAYERS[kind]
    graph = fxopt.PassManager(PREPARE).run(fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)).graph
    assert sum(n.target == aten.bmm.default for n in graph.fx.nodes) >= 2 * layers  # before: two bmm per MoE layer
    result = fxopt.PassManager("fuse-experts,dce").run(graph)
    assert result.records[0].stats["batched-swiglu-experts"] == {"found": layers, "rewritten": layers, "skipped": {}}
    targets = [n.target for n in result.graph.fx.nodes]
    assert targets.count(EXPERTS) == layers
    gathered = [n for n in result.graph.fx.nodes if n.target == aten.bmm.default and n.args[0].target == aten.index.Tensor]
    assert gathered == []
    gathers = [n for n in result.graph.fx.nodes if n.target == aten.index.Tensor and n.args[0].op == "get_attr"]
    assert gathers == []  # no expert weights copied per token any more
    for backend in ("eager", "onnxruntime"):
        compiled = fxopt.compile(result.graph, backend=backend)
        if backend == "onnxruntime":
            assert onnx_ops(compiled).count("MoE") == layers
        for inputs in (spec.example_inputs, *spec.other_inputs):
            with torch.no_grad():
                ref = run(spec.model, inputs).logits
            out = run(compiled, inputs)
            out = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
            assert ((out - ref).norm() / ref.norm()).item() < 1e-5, backend


class RoutedExperts(torch.nn.Module):
    """Experts written in the batched form, routed by ``scoring``: a softmax
    or a sigmoid (weights >= 0); the raw router logits, a softmax scaled by -1
    or divided by its sum minus a constant (weights of any sign); experts
    chosen by another topk than the one the weights come from."""

    def __init__(self, scoring: str):
        super().__init__()
        torch.manual_seed(0)
        self.scoring = scoring
        self.router = torch.nn.Linear(16, 4, bias=False)
        self.gate_up = torch.nn.Parameter(torch.randn(4, 16, 16) * 0.2)  # [experts, gate rows | up rows, hidden]
        self.down = torch.nn.Parameter(torch.randn(4, 16, 8) * 0.2)

    def forward(self, x):
        logits = self.router(x)
        scores = {"sigmoid": torch.sigmoid(logits), "logits": logits}.get(self.scoring, torch.softmax(logits, -1))
        weights, chosen = torch.topk(scores, 2, dim=-1)
        if self.scoring == "negated":
            weights = weights * -1.0
        if self.scoring == "sum minus a constant":  # negative where the sum is below it
            weights = weights / torch.add(weights.sum(-1, keepdim=True), 1e-20, alpha=-1)
        if self.scoring == "experts of another topk":
            chosen = torch.topk(logits, 2, dim=-1).indices
        expert = chosen.view(-1)
        hidden = torch.bmm(self.gate_up[expert], x.repeat_interleave(2, 0).unsqueeze(-1)).squeeze(-1)
        gate, up = hidden.split(8, -1)
        y = torch.bmm(self.down[expert], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        return (y * weights.view(-1).unsqueeze(-1)).view(x.shape[0], 2, 16).sum(1)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_hand_written_experts_fuse_with_the_same_output(scoring):
    model = RoutedExperts(scoring).eval()
    x = torch.randn(6, 16)
    graph = fxopt.trace(model, (x,), dynamic_shapes=({0: Dim("tokens")},))
    fused = fxopt.PassManager(PREPARE + ",fuse-experts,dce").run(graph).graph
    assert [n.target for n in fused.fx.nodes].count(EXPERTS) == 1
    for backend in ("eager", "onnxruntime"):
        compiled = fxopt.compile(fused, backend=backend)
        for inputs in (x, torch.randn(3, 16), torch.randn(1, 16)):
            assert fxopt.compare(model(inputs), compiled(inputs)).within(1e-5), backend


NOT_NON_NEGATIVE = "routing weights not proven non-negative (a topk of softmax or sigmoid scores)"


@pytest.mark.parametrize("scoring, reason", [
    ("logits", NOT_NON_NEGATIVE),  # the ONNX lowering routes through log(weights)
    ("negated", NOT_NON_NEGATIVE),
    ("sum minus a constant", NOT_NON_NEGATIVE),
    # the lowering scatters the weights at the chosen experts: they must be one topk's distinct picks
    ("experts of another topk", "the chosen experts are not the indices of the topk the routing weights come from"),
])
def test_routing_the_lowering_cannot_reproduce_is_refused(scoring, reason):
    model = RoutedExperts(scoring).eval()
    graph = fxopt.trace(model, (torch.randn(6, 16),), dynamic_shapes=({0: Dim("tokens")},))
    result = fxopt.PassManager(PREPARE + ",fuse-experts").run(graph)
    stats = result.records[-1].stats["batched-swiglu-experts"]
    assert (stats["rewritten"], stats["skipped"]) == (0, {"declined": 1})
    assert stats["skip_reasons"] == [f"declined: {reason}"]
    assert EXPERTS not in [n.target for n in result.graph.fx.nodes]


def test_merge_linears_leaves_the_router_alone():
    # Qwen2-MoE's router reads the same input as the shared expert's gate/up
    # and its own gate: merged with them, quantize would no longer see it
    spec = moe_model("qwen2_moe")
    graph = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
    result = fxopt.PassManager(PREPARE + ",merge-linears,quantize(mode=dynamic)").run(graph)
    assert result.records[-1].stats["skipped"]["router"] == 2
    routers = [n for n in result.graph.fx.nodes if n.target == aten.linear.default and n.args[1].target.endswith("mlp.gate.weight")]
    assert len(routers) == 2


def test_a_float16_model_keeps_float16_experts():
    spec = moe_model("mixtral")
    spec.model.half()
    graph = fxopt.PassManager(PREPARE + ",fuse-experts,dce").run(
        fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)).graph
    assert [n.target for n in graph.fx.nodes].count(EXPERTS) == 2
    with torch.no_grad():
        ref = run(spec.model, spec.example_inputs).logits
    for backend, tol in (("eager", 1e-3), ("onnxruntime", 2e-3)):
        out = run(fxopt.compile(graph, backend=backend), spec.example_inputs)
        out = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
        assert out.dtype == torch.float16
        assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < tol, backend
