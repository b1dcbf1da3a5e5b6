"""The channel-dependency analysis and ``shrink``: groups found on the graph
(GPT-2's Conv1D MLP, Llama's SwiGLU, Phi-3's merged gate_up, BERT), refusals
that name the node, and shrunk models that compute what the original does
when the removed channels carried nothing, on both backends, fused and
quantized."""

import collections

import pytest
import torch
import torch.nn.functional as F

import fxopt
from conftest import BASE_PIPELINE, base_graph, model_spec, run
from fxopt.ir.nodes import call_args
from structural import assert_rewrites_to, assert_unchanged, graph_of
from fxopt.models import BUILTIN, ModelSpec, hf_spec, seeded
from fxopt.passes import AnalysisManager, PassError, PipelineError
from fxopt.passes.analyses import ChannelAnalysis

aten = torch.ops.aten


def _phi3() -> ModelSpec:
    import transformers

    seeded()
    cfg = transformers.Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, use_cache=False, pad_token_id=None)
    return hf_spec(transformers.Phi3ForCausalLM(cfg), 256, "phi3-tiny", mask=False, max_len=256)


def _decoder(config: str, model: str, name: str, **kw):
    def build() -> ModelSpec:
        import transformers

        seeded()
        cfg = getattr(transformers, config)(num_hidden_layers=2, num_attention_heads=4, vocab_size=256, use_cache=False,
                                            max_position_embeddings=128, **kw)
        return hf_spec(getattr(transformers, model)(cfg), 256, name, mask=False, max_len=128)
    return build


SPECS = {"llama-tiny": BUILTIN["llama-tiny"], "gpt2-tiny": BUILTIN["gpt2-tiny"], "bert-tiny": BUILTIN["bert-tiny"], "phi3-tiny": _phi3,
         "qwen2-tiny": _decoder("Qwen2Config", "Qwen2ForCausalLM", "qwen2-tiny", hidden_size=64, intermediate_size=128,
                                num_key_value_heads=2),
         "gemma-tiny": _decoder("GemmaConfig", "GemmaForCausalLM", "gemma-tiny", hidden_size=64, intermediate_size=128,
                                num_key_value_heads=2, head_dim=16),  # ties the LM head to the embedding
         "opt-tiny": _decoder("OPTConfig", "OPTForCausalLM", "opt-tiny", hidden_size=64, ffn_dim=128, word_embed_proj_dim=64)}

# The MLP's output projection of each layer, and how its input channels are laid out
# (GPT-2's Conv1D stores [in, out]).
DOWN = {
    "llama-tiny": (lambda m, i: m.model.layers[i].mlp.down_proj.weight, 1),
    "qwen2-tiny": (lambda m, i: m.model.layers[i].mlp.down_proj.weight, 1),
    "gemma-tiny": (lambda m, i: m.model.layers[i].mlp.down_proj.weight, 1),
    "phi3-tiny": (lambda m, i: m.model.layers[i].mlp.down_proj.weight, 1),
    "gpt2-tiny": (lambda m, i: m.transformer.h[i].mlp.c_proj.weight, 0),
    "opt-tiny": (lambda m, i: m.model.decoder.layers[i].fc2.weight, 1),
    "bert-tiny": (lambda m, i: m.encoder.layer[i].output.dense.weight, 1),
}
# The attention's output projection of each layer (its input columns are the heads, 16 each)
# and the key/value heads of the model (4 query heads).
ATTN_OUT = {
    "llama-tiny": (lambda m, i: m.model.layers[i].self_attn.o_proj.weight, 1, 2),
    "qwen2-tiny": (lambda m, i: m.model.layers[i].self_attn.o_proj.weight, 1, 2),
    "gemma-tiny": (lambda m, i: m.model.layers[i].self_attn.o_proj.weight, 1, 2),
    "phi3-tiny": (lambda m, i: m.model.layers[i].self_attn.o_proj.weight, 1, 2),
    "gpt2-tiny": (lambda m, i: m.transformer.h[i].attn.c_proj.weight, 0, 4),
    "opt-tiny": (lambda m, i: m.model.decoder.layers[i].self_attn.out_proj.weight, 1, 4),
    "bert-tiny": (lambda m, i: m.encoder.layer[i].attention.output.dense.weight, 1, 4),
}


def _graph(spec):
    g = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, name=spec.name)
    return fxopt.PassManager(BASE_PIPELINE).run(g).graph


def _groups(graph):
    return AnalysisManager().get(ChannelAnalysis, graph)


def test_groups_follow_swiglu_and_a_split_gate_up():
    llama = _groups(base_graph("llama-tiny"))
    ok = llama.shrinkable()
    assert [g.name for g in ok] == [f"model.layers.{i}.mlp.gate_proj[0:128]+model.layers.{i}.mlp.up_proj[0:128]" for i in range(2)]
    assert all(len(g.consumers) == 1 and g.size == 128 for g in ok)
    phi3 = _groups(_graph(_phi3()))
    assert [g.name for g in phi3.shrinkable()] == [
        f"model.layers.{i}.mlp.gate_up_proj[0:128]+model.layers.{i}.mlp.gate_up_proj[128:256]" for i in range(2)]


def test_refusals_name_the_node_that_stops_the_walk():
    deps = _groups(base_graph("gpt2-tiny"))
    refused = deps.refused()
    # c_attn's pieces go into a view into heads, which the attention's head walk follows: not refused;
    # the residual stream goes into layer norms; the head to the output
    assert not any("c_attn" in k for k in refused) and len(deps.shrinkable_attentions()) == 2
    residual = next(k for k in refused if k.startswith("transformer.h.0.attn.c_proj"))
    assert "layer_norm" in refused[residual]
    assert refused["lm_head[0:256]"] == "node 'output' (output): a graph output reads the channels"


def _zero_channels(spec, name, fraction=0.25):
    """Zero the MLP output projection's input columns for a quarter of the channels:
    those channels carry nothing, so removing them must not change the output."""
    get, dim = DOWN[name]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in range(2):
            w = get(spec.model, i)
            idx = torch.randperm(w.shape[dim], generator=g)[: int(fraction * w.shape[dim])]
            w.index_fill_(dim, idx, 0.0)


def _zero_heads(spec, name):
    """Zero the attention output projection's columns of half the key/value groups
    (a group's query heads under GQA): those heads carry nothing."""
    get, dim, kv = ATTN_OUT[name]
    group = 4 // kv
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for i in range(2):
            w = get(spec.model, i)
            for kv_head in torch.randperm(kv, generator=g)[: kv // 2].tolist():
                w.narrow(dim, kv_head * group * 16, group * 16).zero_()


@pytest.mark.parametrize("name", list(SPECS))
def test_shrink_removes_dead_heads_and_channels_exactly_on_both_backends(name):
    spec = SPECS[name]()
    _zero_channels(spec, name)
    _zero_heads(spec, name)
    kv = ATTN_OUT[name][2]
    g = _graph(spec)
    result = fxopt.PassManager("shrink(ratio=0.25,heads=0.5)").run(g)
    stats = result.records[0].stats
    assert stats["groups_shrunk"] == 2 and all(v["kept"] == 0.75 * v["of"] for v in stats["groups"].values())
    assert stats["attentions_shrunk"] == 2 and stats["heads_removed"] == 4
    assert all(v == {"heads": 2, "of": 4, "kv_heads": kv // 2, "kv_of": kv} for v in stats["attentions"].values())
    assert stats["bytes_removed"] == g.param_bytes() - result.graph.param_bytes() > 0
    # the result is an ordinary model with fewer heads: the analysis of the shrunk graph counts them
    after = _groups(result.graph).shrinkable_attentions()
    assert [(a.num_heads, a.num_kv_heads, a.head_dim) for a in after] == [(2, kv // 2, 16)] * 2
    assert all(tuple(result.graph.constant(c.args[1]).shape) == (64, 32) for a in after for c in a.consumers)
    ref = run(g, spec.example_inputs)
    for backend in ("eager", "onnxruntime"):
        assert fxopt.compare(ref, run(fxopt.compile(result.graph, backend), spec.example_inputs)).within(1e-4), backend
    # and on inputs of another shape: nothing was specialized
    other = spec.other_inputs[0]
    assert fxopt.compare(run(g, other), run(fxopt.compile(result.graph, "eager"), other)).within(1e-4)


FUSED_W8A8 = "fuse-attention,merge-linears,quantize(mode=dynamic,act_granularity=tensor),pack-attention,fuse-linear-act,fuse-norm,dce"


def _kinds(graph) -> collections.Counter:
    return collections.Counter(str(n.target) for n in graph.fx.nodes if n.op == "call_function")


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_shrunk_model_keeps_every_fusion_and_quantizes_on_both_backends(name):
    spec, graph = model_spec(name), base_graph(name)
    shrunk = fxopt.PassManager("shrink(ratio=0.3,heads=0.5,multiple_of=8)").run(graph).graph
    widths = {tuple(shrunk.constant(n.args[1]).shape) for n in shrunk.fx.nodes if n.target == aten.linear.default}
    if name == "llama-tiny":  # ceil(0.7 * 128) = 90, rounded up to a multiple of 8; 2 of 4 query heads, 1 of 2 KV heads
        assert {(96, 64), (64, 96), (32, 64), (16, 64), (64, 32)} <= widths
    fused = fxopt.PassManager(FUSED_W8A8).run(shrunk).graph
    # the same kernels as the unshrunk model's: no fusion lost to the new shapes
    assert _kinds(fused) == _kinds(fxopt.PassManager(FUSED_W8A8).run(graph).graph)
    # fxopt's fused attention ops count the heads left: 2 of 4 (and 1 of 2 key/value heads under GQA)
    attention = [n for n in fused.fx.nodes if n.op == "call_function" and str(n.target).startswith("fxopt.")
                 and "attention" in str(n.target)]
    assert len(attention) == 2
    for node in attention:
        named = dict(zip((a.name for a in node.target._schema.arguments), call_args(node)))
        assert named["num_heads"] == 2 and named.get("kv_num_heads", 2) == (1 if name == "llama-tiny" else 2)
    float_out = run(shrunk, spec.example_inputs)
    eager = run(fxopt.compile(fused, "eager"), spec.example_inputs)
    ort = run(fxopt.compile(fused, "onnxruntime"), spec.example_inputs)
    assert fxopt.compare(float_out, eager).cosine > 0.99 and fxopt.compare(float_out, ort).cosine > 0.99


def test_activation_importance_needs_calibration_and_ratio_zero_does_nothing():
    g = base_graph("llama-tiny")
    with pytest.raises(PipelineError, match="needs input 'calibration_data'"):
        fxopt.PassManager("shrink(importance=activation)").run(g)
    calib = [{"input_ids": torch.randint(0, 256, (2, 16))}]
    out = fxopt.PassManager("shrink(importance=activation,ratio=0.5,heads=0.5)", calibration_data=calib).run(g)
    assert out.records[0].stats["channels_removed"] == 128 and out.records[0].stats["heads_removed"] == 4
    same = fxopt.PassManager("shrink(ratio=0,heads=0)").run(g)
    assert not same.records[0].changed and str(same.graph) == str(g)


def test_a_group_the_analysis_refuses_is_never_shrunk():
    g = base_graph("gpt2-tiny")
    with pytest.raises(PassError, match=r"include='attn.c_proj' selects no shrinkable channel group.*attn.c_proj\[0:64\].*: node 'layer_norm"):
        fxopt.PassManager("shrink(include='attn.c_proj')").run(g)
    out = fxopt.PassManager("shrink(exclude='h\\.0\\.')").run(g).graph
    widths = sorted(tuple(out.constant(n.args[1]).shape) for n in out.fx.nodes if n.target == aten.linear.default)
    assert widths.count((256, 64)) == 2  # lm_head and layer 0's c_fc untouched
    assert (192, 64) in widths and widths.count((192, 64)) == 3  # c_attn x2 untouched, layer 1's c_fc now 192 wide


def test_compensation_folds_constant_channels_into_the_bias():
    # GPT-2's c_fc has a bias: channels whose weight rows are zero carry the
    # constant gelu(b_c), which compensation folds into c_proj's bias exactly.
    spec = SPECS["gpt2-tiny"]()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for block in spec.model.transformer.h:
            idx = torch.randperm(256, generator=g)[:64]
            block.mlp.c_fc.weight[:, idx] = 0.0  # Conv1D [in, out]: the columns are the output channels
            block.mlp.c_fc.bias[idx] = 0.01 * torch.randn(64, generator=g)
    graph = _graph(spec)
    calib = [spec.example_inputs]
    ref = run(graph, spec.example_inputs)
    shrunk = fxopt.PassManager("shrink(ratio=0.25,compensate=true)", calibration_data=calib).run(graph).graph
    assert fxopt.compare(ref, run(fxopt.compile(shrunk, "onnxruntime"), spec.example_inputs)).within(1e-4)
    plain = fxopt.PassManager("shrink(ratio=0.25)").run(graph).graph
    assert not fxopt.compare(ref, run(plain, spec.example_inputs)).within(1e-4)  # without it the constant is lost


def _constant_heads(spec, heads=(1, 3)):
    """GPT-2 tiny (4 heads of 16) whose ``heads`` have zero q, k and v weights
    and a value bias of their own: their output is that bias at every
    position (the probabilities sum to 1), a constant compensation can fold."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for block in spec.model.transformer.h:
            for h in heads:
                cols = [part * 64 + h * 16 + i for part in range(3) for i in range(16)]  # Conv1D [in, out]: q, k, v columns
                block.attn.c_attn.weight[:, cols] = 0.0
                block.attn.c_attn.bias[128 + h * 16: 128 + (h + 1) * 16] = torch.randn(16, generator=g)
    return spec


def test_compensation_folds_constant_heads_into_the_output_projection_bias():
    spec = _constant_heads(SPECS["gpt2-tiny"]())
    graph = _graph(spec)
    calib = [spec.example_inputs]
    ref = run(graph, spec.example_inputs)
    result = fxopt.PassManager("shrink(ratio=0,heads=0.5,compensate=true)", calibration_data=calib).run(graph)
    assert result.records[0].stats["heads_removed"] == 4  # heads 1 and 3 of both layers, the zero-weight ones
    shrunk = result.graph
    for backend in ("eager", "onnxruntime"):
        assert fxopt.compare(ref, run(fxopt.compile(shrunk, backend), spec.example_inputs)).within(1e-4), backend
    plain = fxopt.PassManager("shrink(ratio=0,heads=0.5)").run(graph).graph
    assert not fxopt.compare(ref, run(plain, spec.example_inputs)).within(1e-4)  # without it the heads' constant is lost


def test_compensation_with_no_head_removed_changes_nothing():
    # heads=0.2 keeps ceil(0.8 * 4) = 4 heads: nothing is removed, so no bias changes either
    spec = _constant_heads(SPECS["gpt2-tiny"]())
    graph = _graph(spec)
    result = fxopt.PassManager("shrink(ratio=0,heads=0.2,compensate=true)", calibration_data=[spec.example_inputs]).run(graph)
    assert not result.records[0].changed and str(result.graph) == str(graph)
    assert all(torch.equal(result.graph.constant(a), graph.constant(b))
               for a, b in zip(result.graph.fx.nodes, graph.fx.nodes) if graph.constant(b) is not None)


# -- heads: before / expected, and where shrink must not fire -----------------------------

def _gqa(wq, wk, wv, wo, heads, kv_heads, bias=None):
    """Grouped-query attention written as Llama writes it (repeat_kv's expand and reshape),
    on weights given as closed-over constants; ``bias``: added to the scores, a constant per
    head or a function of the input."""
    def attention(x):
        b, s, _ = x.shape
        q = F.linear(x, wq).view(b, s, heads, 8).transpose(1, 2)
        k = F.linear(x, wk).view(b, s, kv_heads, 8).transpose(1, 2)
        v = F.linear(x, wv).view(b, s, kv_heads, 8).transpose(1, 2)
        k = k[:, :, None].expand(b, kv_heads, heads // kv_heads, s, 8).reshape(b, heads, s, 8)
        v = v[:, :, None].expand(b, kv_heads, heads // kv_heads, s, 8).reshape(b, heads, s, 8)
        if bias is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5 + (bias(x) if callable(bias) else bias), -1) @ v
        return F.linear(out.transpose(1, 2).reshape(b, s, heads * 8), wo)
    return attention


_g = torch.Generator().manual_seed(3)
WQ, WK, WV, WO = (torch.randn(n, m, generator=_g) for n, m in ((64, 32), (32, 32), (32, 32), (32, 64)))
WO[:, 16:32] = WO[:, 48:] = 0.0  # KV groups 1 and 3 (query heads 2, 3, 6, 7) add nothing: removing them is exact
XH = torch.randn(2, 5, 32, generator=_g)


def _rows(w, heads):
    return torch.cat([w[h * 8:(h + 1) * 8] for h in heads])


def test_shrink_heads_before_and_expected():
    # 8 query heads over 4 key/value heads -> KV groups 0 and 2 with their query heads 0, 1, 4, 5
    expected = _gqa(_rows(WQ, [0, 1, 4, 5]), _rows(WK, [0, 2]), _rows(WV, [0, 2]), _rows(WO.T, [0, 1, 4, 5]).T, 4, 2)
    assert_rewrites_to("canonicalize,shrink(ratio=0,heads=0.5)", _gqa(WQ, WK, WV, WO, 8, 4), (XH,), expected, constant_values=True)


def test_shrink_heads_with_their_own_score_bias():
    # an ALiBi-like constant per head: the kept heads keep their values of it
    per_head = torch.randn(8, 1, 1, generator=_g)
    expected = _gqa(_rows(WQ, [0, 1, 4, 5]), _rows(WK, [0, 2]), _rows(WV, [0, 2]), _rows(WO.T, [0, 1, 4, 5]).T, 4, 2,
                    per_head[[0, 1, 4, 5]])
    assert_rewrites_to("canonicalize,shrink(ratio=0,heads=0.5)", _gqa(WQ, WK, WV, WO, 8, 4, per_head), (XH,), expected,
                       constant_values=True)


def test_shrink_leaves_heads_whose_scores_read_another_projection():
    # a bias per head and position computed by a linear from the input: not the heads' own
    wb = torch.randn(8, 32, generator=_g)
    model = _gqa(WQ, WK, WV, WO, 8, 4, lambda x: F.linear(x, wb).transpose(1, 2)[..., None])
    result = assert_unchanged("shrink(ratio=0,heads=0.5)", model, (XH,), prepare="canonicalize")
    why = result.records[0].stats["refused"]["matmul_1"]  # a refused attention is named by its node: the value matmul
    assert why.startswith("node 'add") and "scores combined with another computed tensor" in why
    with pytest.raises(PassError, match=r"include='q' selects no shrinkable channel group or attention.*another computed tensor"):
        fxopt.PassManager("canonicalize,shrink(ratio=0,heads=0.5,include=q)").run(graph_of(model, (XH,)))


def _partly_repeated(wq, wk, wv, wo, heads, kv_heads):
    """Key/value heads repeated twice by repeat_kv, the rest of the grouping left to
    SDPA's ``enable_gqa``: 8 query heads over 2 key/value heads seen as 4."""
    def attention(x):
        b, s, _ = x.shape
        q = F.linear(x, wq).view(b, s, heads, 8).transpose(1, 2)
        k = F.linear(x, wk).view(b, s, kv_heads, 8).transpose(1, 2)
        v = F.linear(x, wv).view(b, s, kv_heads, 8).transpose(1, 2)
        k = k[:, :, None].expand(b, kv_heads, 2, s, 8).reshape(b, kv_heads * 2, s, 8)
        v = v[:, :, None].expand(b, kv_heads, 2, s, 8).reshape(b, kv_heads * 2, s, 8)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.linear(out.transpose(1, 2).reshape(b, s, heads * 8), wo)
    return attention


def test_shrink_heads_of_a_partly_repeated_key_value_for_enable_gqa():
    # the merge after the repeat counts kept KV heads times the repeat (2), not the query heads (4)
    wo = WO.clone()
    wo[:, 32:] = 0.0  # KV head 1 (query heads 4..7) adds nothing: removing it is exact
    before = graph_of(_partly_repeated(WQ, WK[:16], WV[:16], wo, 8, 2), (XH,))
    after = fxopt.PassManager("canonicalize,shrink(ratio=0,heads=0.5)").run(before).graph
    merges = [n.args[1] for n in after.fx.nodes if n.target in (aten.view.default, aten._unsafe_view.default)
              and n.args[0].target in (aten.expand.default, aten.clone.default)]
    assert merges == [[2, 2, 5, 8]] * 2
    expected = _partly_repeated(_rows(WQ, [0, 1, 2, 3]), WK[:8], WV[:8], wo[:, :32], 4, 1)
    assert fxopt.compare(expected(XH), run(fxopt.compile(after, "eager"), (XH,))).within(1e-5)
    assert fxopt.compare(expected(XH), run(fxopt.compile(after, "onnxruntime"), (XH,))).within(1e-4)


def test_a_heads_fraction_too_small_to_remove_a_key_value_group_changes_nothing():
    # 4 key/value groups: heads=0.2 keeps ceil(0.8 * 4) = 4 of them, so no head goes
    result = assert_unchanged("shrink(ratio=0,heads=0.2)", _gqa(WQ, WK, WV, WO, 8, 4), (XH,), prepare="canonicalize")
    stats = result.records[0].stats
    assert stats["attentions_shrunk"] == 0 and stats["heads_removed"] == 0
    assert list(stats["attentions"].values()) == [{"heads": 8, "of": 8, "kv_heads": 4, "kv_of": 4}]


# ALBERT shares one layer's weights among all its layers: shrinking a shared weight would
# change its other readers, so that group is left whole and listed, and the rest shrinks.
class SharedLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.own_up, self.own_down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        for _ in range(2):  # the same two linears read twice
            x = x + self.down(torch.relu(self.up(x)))
        return x + self.own_down(torch.relu(self.own_up(x)))


def test_a_group_whose_weights_other_nodes_read_is_left_whole():
    x = torch.randn(2, 3, 16)
    graph = fxopt.PassManager("canonicalize,dce").run(fxopt.trace(SharedLayer().eval(), (x,))).graph
    result = fxopt.PassManager("shrink(ratio=0.5)").run(graph)
    stats = result.records[0].stats
    assert list(stats["groups"]) == ["own_up[0:32]"] and stats["groups"]["own_up[0:32]"] == {"kept": 16, "of": 32}
    tied = {k: v for k, v in stats["refused"].items() if "(tied)" in v}
    assert list(tied) == ["up[0:32]"] and "its weight is read by another node too" in tied["up[0:32]"], stats["refused"]
    shapes = [tuple(result.graph.constant(n.args[1]).shape) for n in result.graph.fx.nodes
              if n.target == torch.ops.aten.linear.default]
    # the shared pair read twice, whole; the layer's own pair with half its channels
    assert shapes == [(32, 16), (16, 32), (32, 16), (16, 32), (16, 16), (16, 16)]


# -- a generation pair --------------------------------------------------------------------

def _llama_without_kv_group_1():
    import transformers

    seeded()
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 32:] = 0.0  # KV group 1 (query heads 2 and 3) adds nothing
    return model


# The prefill and the decode step remove the same heads (chosen by weight magnitude), and
# the key/value cache between them holds the kept ones: one KV head per layer. The removed
# group added nothing, so the greedy tokens stay Hugging Face's, fused on ONNX Runtime too.
@pytest.mark.parametrize("backend, after", [("eager", ""), ("onnxruntime", ",fuse-attention,merge-linears,pack-attention,dce")])
def test_shrink_removes_heads_from_a_generation_pair_and_its_cache(backend, after):
    from fxopt.generation import compile_generator
    from fxopt.ir.decoder import trace_decoder

    model = _llama_without_kv_group_1()
    prompts = [[5, 9, 2, 7], [3, 4, 5, 6, 7, 8]]
    ids = torch.tensor([[0, 0, 5, 9, 2, 7], [3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=(ids != 0).long() | (torch.arange(2) == 1)[:, None],
                              max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    gen = compile_generator(trace_decoder(model), "canonicalize,shrink(ratio=0,heads=0.5)" + after, backend)
    assert [r[1].stats["heads_removed"] for r in gen.graphs.records.values()] == [4, 4]
    assert [p.meta["val"].shape[1] for p in gen.graphs.decode.placeholders()[3:]] == [1] * 4
    assert torch.equal(gen.generate(prompts, max_new_tokens=24).sequences, want)


# Calibrated choices (activation importance, compensation) could differ between the two
# graphs, whose cache must agree: their heads stay, and the stats say why.
def test_shrink_keeps_a_generation_graphs_heads_when_its_choice_is_calibrated():
    from fxopt.ir.decoder import trace_decoder

    prefill = trace_decoder(_llama_without_kv_group_1()).prefill
    ids = torch.tensor([[5, 9, 2, 7]])
    data = [(ids, torch.ones_like(ids), torch.arange(4)[None])]
    result = fxopt.PassManager("canonicalize,shrink(ratio=0,heads=0.5,compensate=true)", calibration_data=data).run(prefill)
    stats = result.records[1].stats
    assert stats["heads_removed"] == 0
    assert sum("importance=magnitude and no compensate only" in why for why in stats["refused"].values()) == 2  # both layers
