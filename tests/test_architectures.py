"""Architectures beyond the built-in models (random weights, tiny configs): the
fusion pipeline and fused W8A8 run on each, on both backends, and match the
original. Each brings a form the built-ins do not: T5 (RMSNorm without a mean,
relative position bias, a view of SDPA's output that plain
``torch.onnx.export`` cannot decompose), OPT (scaled Q projection, ReLU MLP),
Qwen2 (eager GQA attention with biased QKV), Mixtral (a mixture of experts), ViT (image patches, no tokens),
MobileBERT (trigram embedding through ``aten.pad``, whose fake kernel once
specialized the dynamic dimensions when shapes were recomputed)."""

import collections

import pytest
import torch
from torch.export import Dim

import fxopt
from fxopt.models import ModelSpec, hf_spec
from conftest import run

transformers = pytest.importorskip("transformers")

# The fusion pipeline and fused W8A8 share their first passes: those run once
# per model, and each pipeline's own passes continue from that graph.
MERGED = "canonicalize,dce,constant-fold,cse,fuse-attention,merge-linears"
THEN_FUSED = "pack-attention,fuse-linear-act,fuse-norm,dce"
THEN_W8A8 = "quantize(mode=dynamic,act_granularity=tensor),fuse-linear-act,fuse-norm,dce"
SMALL = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=256)


def t5_encoder():
    cfg = transformers.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=256)
    return hf_spec(transformers.T5EncoderModel(cfg), 256, "t5-encoder", mask=True)


def opt():
    cfg = transformers.OPTConfig(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=128,
                                 use_cache=False, **SMALL)
    return hf_spec(transformers.OPTForCausalLM(cfg), 256, "opt", mask=False, max_len=cfg.max_position_embeddings)


def qwen2_eager():
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_key_value_heads=2, use_cache=False,
                                   max_position_embeddings=128, **SMALL)
    cfg._attn_implementation = "eager"
    return hf_spec(transformers.Qwen2ForCausalLM(cfg), 256, "qwen2", mask=False, max_len=cfg.max_position_embeddings)


def mixtral():
    cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, use_cache=False, max_position_embeddings=128, **SMALL)
    return hf_spec(transformers.MixtralForCausalLM(cfg), 256, "mixtral", mask=False, max_len=cfg.max_position_embeddings)


def mobilebert():
    cfg = transformers.MobileBertConfig(hidden_size=64, intermediate_size=64, embedding_size=32, intra_bottleneck_size=32,
                                        true_hidden_size=32, num_feedforward_networks=2, max_position_embeddings=128, **SMALL)
    cfg._attn_implementation = "eager"
    return hf_spec(transformers.MobileBertModel(cfg), 256, "mobilebert", mask=True)


def vit():
    cfg = transformers.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=32, patch_size=8)
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    return ModelSpec(transformers.ViTModel(cfg, add_pooling_layer=False).eval(), inputs,
                     {"pixel_values": {0: Dim.DYNAMIC}}, "vit", [{"pixel_values": torch.randn(3, 3, 32, 32)}])


# model -> (builder, fxopt ops the fusion pipeline must produce, at least this many each)
MODELS = {
    "t5-encoder": (t5_encoder, {"add_rms_norm": 4, "linear_act": 2}),
    "opt": (opt, {"add_layer_norm": 1, "linear_act": 2, "packed_attention": 2}),  # its query scale folded
    "qwen2": (qwen2_eager, {"group_query_attention": 2, "add_rms_norm": 4}),
    "vit": (vit, {"add_layer_norm": 4, "linear_act": 2}),
    "mixtral": (mixtral, {"group_query_attention": 2, "add_rms_norm": 4}),  # top-2 of 4 experts
    "mobilebert": (mobilebert, {"linear_act": 4}),
}


def main_output(out):
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out[0] if isinstance(out, (tuple, list)) else out


def fxopt_ops(graph):
    return collections.Counter(n.target._opname for n in graph.fx.nodes
                               if n.op == "call_function" and getattr(n.target, "namespace", None) == "fxopt")


@pytest.mark.parametrize("name", list(MODELS))
def test_fusions_and_w8a8_on_other_architectures(name):
    torch.manual_seed(0)
    build, expected = MODELS[name]
    spec = build()
    graph = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, name=name)
    merged = fxopt.PassManager(MERGED).run(graph).graph
    fused = fxopt.PassManager(THEN_FUSED).run(merged).graph
    ops = fxopt_ops(fused)
    assert all(ops[op] >= n for op, n in expected.items()), ops
    quantized = fxopt.PassManager(THEN_W8A8).run(merged).graph
    assert fxopt_ops(quantized)["linear_dynamic_int8"] > 0
    for backend in ("eager", "onnxruntime"):
        models = {"fused": (fxopt.compile(fused, backend=backend), 1e-4),
                  "fused+W8A8": (fxopt.compile(quantized, backend=backend), 0.05)}
        for inputs in (spec.example_inputs, *spec.other_inputs):  # the traced shapes and others
            with torch.no_grad():
                ref = main_output(run(spec.model, inputs))
            for variant, (model, tol) in models.items():
                out = main_output(run(model, inputs))
                err = ((out - ref).norm() / ref.norm()).item()
                assert err < tol, (backend, variant, err)


def test_experts_trace_as_aten_ops_and_the_models_own_choice_is_restored():
    # transformers runs experts on CPU through a custom op by default
    # ("grouped_mm"), which no backend lowers: the trace switches to batched
    # matmuls for its duration only
    torch.manual_seed(0)
    spec = mixtral()
    assert spec.model.get_experts_implementation() == {"": "grouped_mm"}
    graph = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, name="mixtral")
    assert spec.model.get_experts_implementation() == {"": "grouped_mm"}
    namespaces = {n.target.namespace for n in graph.fx.nodes if n.op == "call_function" and hasattr(n.target, "namespace")}
    assert namespaces <= {"aten", "fxopt"}
    assert {str(n.target) for n in graph.fx.nodes} >= {"aten.bmm.default"}
    with torch.no_grad():
        ref = main_output(run(spec.model, spec.example_inputs))
        out = main_output(run(fxopt.compile(graph, backend="onnxruntime"), spec.example_inputs))
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_a_failed_trace_still_restores_the_models_experts():
    spec = mixtral()

    class Failing(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            self.inner(input_ids=input_ids)
            raise ValueError("stop here")

    with pytest.raises(fxopt.TraceError, match="stop here"):
        fxopt.trace(Failing(spec.model), (spec.example_inputs["input_ids"],))
    assert spec.model.get_experts_implementation() == {"": "grouped_mm"}
