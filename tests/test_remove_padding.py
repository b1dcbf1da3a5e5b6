"""remove-padding: an encoder's linears, norms and activations on its real
tokens only; attention and outputs see the padded layout again."""

from __future__ import annotations

import functools

import onnx
import pytest
import torch
from torch.export import Dim

import fxopt
from fxopt.models import ModelSpec, SentenceEmbedder, bert, gpt2
from fxopt.passes import PassManager, PipelineError
from conftest import trace_once

fxopt_ops = torch.ops.fxopt
FUSED = "canonicalize,dce,constant-fold,cse,fuse-attention,merge-linears,fuse-linear-act,fuse-norm"


def padded_batch(lengths, seq, vocab=256, seed=0):
    """Token ids with right padding: row i has lengths[i] real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(lengths), seq), generator=g)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


@functools.lru_cache(maxsize=None)
def embedder(attention="eager") -> ModelSpec:
    """A tiny BERT + masked mean pooling (sentence-transformers' recipe),
    built once per test process."""
    model = SentenceEmbedder(bert("tiny", attn_implementation=attention).model).eval()
    inputs = padded_batch([16, 9, 3], 16)
    return ModelSpec(model, inputs, {k: {0: Dim.DYNAMIC, 1: Dim.DYNAMIC} for k in inputs}, f"embedder-{attention}")


def optimize(spec: ModelSpec, pipeline: str, dynamic: bool = True):
    """``pipeline`` on ``spec`` traced (with its dynamic dimensions unless
    ``dynamic=False``); the graph and remove-padding's stats."""
    result = PassManager(pipeline).run(trace_once(spec, dynamic=dynamic))
    return result.graph, next(r.stats for r in result.records if r.name.startswith("remove-padding"))


def count(graph, target):
    return sum(1 for n in graph.fx.nodes if n.target == target)


BATCHES = [padded_batch([16, 9, 3], 16), padded_batch([5, 1, 12, 7, 2], 12, seed=1), padded_batch([6, 6], 6, seed=2)]


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])  # a float or a boolean padding mask
def test_sentence_embedder_runs_its_layers_on_real_tokens(backend, attention):
    spec = embedder(attention)
    graph, stats = optimize(spec, FUSED + ",remove-padding,dce")
    # 2 layers x (merged QKV, attention output, FFN up + GELU, FFN down)
    assert (stats["attention"], stats["linears"]) == (2, 8)
    assert count(graph, fxopt_ops.padding_index.default) == 1
    # padded again for attention's q, k, v (3 per layer) and for the pooling sum
    assert stats["pad"] == 2 * 3 + 1 == count(graph, fxopt_ops.pad.default)
    compiled = fxopt.compile(graph, backend)
    for batch in BATCHES:  # other batch sizes, lengths and paddings, no padding at all
        with torch.no_grad():
            ref = spec.model(**batch)
        parity = fxopt.compare(ref, compiled(**batch))
        assert parity.max_abs_err < 1e-5, (batch["attention_mask"].sum(1).tolist(), parity)


def test_onnx_graph_gathers_and_scatters_rows(tmp_path):
    graph, _ = optimize(embedder(), FUSED + ",remove-padding,pack-attention,dce")
    path = fxopt.export_onnx(graph, tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("NonZero") == 1 and ops.count("ScatterND") == 7 and "Gather" in ops
    # pack-attention refuses: its op would run the QKV GEMM on the padded rows
    assert ops.count("MultiHeadAttention") == 2 and "Attention" not in ops


def test_pack_attention_before_remove_padding_is_an_ordering_error():
    with pytest.raises(PipelineError, match="'remove-padding' must run before 'pack-attention'"):
        PassManager(FUSED + ",pack-attention,remove-padding").check()


def test_hidden_state_output_keeps_its_padded_rows_by_default():
    spec = bert("tiny", attn_implementation="eager")  # returns last_hidden_state [B, S, D]
    graph, stats = optimize(spec, FUSED + ",remove-padding")
    assert "padded rows are read by ops not known to be row-wise: output" in stats["reason"]
    assert "padded_outputs=zero" in stats["reason"] and count(graph, fxopt_ops.pad.default) == 0


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_padded_outputs_zero_gives_zero_rows_and_exact_real_rows(backend):
    spec = bert("tiny", attn_implementation="eager")
    graph, stats = optimize(spec, FUSED + ",remove-padding(padded_outputs=zero),dce")
    assert stats["linears"] == 8
    compiled = fxopt.compile(graph, backend)
    for batch in BATCHES:
        with torch.no_grad():
            ref = spec.model(**batch).last_hidden_state
        out = compiled(**batch)
        out = out.last_hidden_state if hasattr(out, "last_hidden_state") else torch.as_tensor(out[0])
        real = batch["attention_mask"].bool()
        assert (out[~real] == 0).all()
        assert (out[real] - ref[real]).abs().max() < 1e-5


def test_pooling_by_position_keeps_everything_padded():
    """BERT's pooler reads token 0 of every row: remove-padding cannot prove it real."""
    import transformers

    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=256, attn_implementation="eager")

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = transformers.BertModel(cfg).eval()

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    inputs = padded_batch([16, 9, 3], 16)
    graph, stats = optimize(ModelSpec(Pooled().eval(), inputs, {k: {0: Dim.DYNAMIC, 1: Dim.DYNAMIC} for k in inputs}),
                            FUSED + ",remove-padding(padded_outputs=zero)")
    assert "(select.int)" in stats["reason"] and count(graph, fxopt_ops.unpad.default) == 0


def test_decoder_without_key_padding_mask_is_refused():
    spec = gpt2("tiny", attn_implementation="eager")
    graph, stats = optimize(spec, FUSED + ",remove-padding")
    assert "key-padding" in stats["reason"]
    assert count(graph, fxopt_ops.padding_index.default) == 0


def test_per_tensor_activation_scales_keep_the_layers_padded_per_token_ones_do_not():
    spec = embedder()
    per_tensor = FUSED + ",quantize(mode=dynamic,act_granularity=tensor),remove-padding"
    _, stats = optimize(spec, per_tensor)
    assert "(linear_dynamic_int8" in stats["reason"]  # its scale sees padded rows
    # the same once pack-attention (an earlier pipeline) moved the int8 QKV projection into the attention op
    packed = PassManager(per_tensor.replace(",remove-padding", ",pack-attention")).run(trace_once(spec))
    stats = PassManager("remove-padding").run(packed.graph).records[-1].stats
    assert "per-tensor int8 QKV projection" in stats["reason"]

    per_token = FUSED + ",quantize(mode=dynamic,act_granularity=token)"
    graph = trace_once(spec)
    quantized = PassManager(per_token).run(graph).graph
    unpadded = PassManager(per_token + ",remove-padding,dce").run(graph)
    stats = next(r.stats for r in unpadded.records if r.name == "remove-padding")
    assert stats["linears"] == 8
    for backend in ("eager", "onnxruntime"):
        want, got = fxopt.compile(quantized, backend), fxopt.compile(unpadded.graph, backend)
        for batch in BATCHES[:2]:
            assert fxopt.compare(want(**batch), got(**batch)).max_abs_err < 1e-5, backend


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_static_shapes_with_the_mask_partly_constant_folded(attention):
    """Traced without dynamic dims, constant-fold folds the mask's aranges and
    its all-true part into constants; the padding proof reads through them."""
    spec = embedder(attention)
    model, inputs = spec.model, spec.example_inputs
    graph, stats = optimize(spec, FUSED + ",remove-padding,dce", dynamic=False)
    assert stats["linears"] == 8
    compiled = {b: fxopt.compile(graph, b) for b in ("eager", "onnxruntime")}
    for batch in (inputs, padded_batch([2, 16, 7], 16, seed=3)):  # same shape, other lengths
        with torch.no_grad():
            ref = model(**batch)
        for backend, m in compiled.items():
            assert fxopt.compare(ref, m(**batch)).max_abs_err < 1e-5, backend


class HandWrittenEncoder(torch.nn.Module):
    """Not from transformers: RMSNorm written out, a SwiGLU MLP, heads split
    with reshape/permute, the padding mask as an additive -inf bias, a
    per-feature scale stored [1, 1, D], and masked mean pooling."""

    def __init__(self, d=32, heads=4, vocab=100):
        super().__init__()
        self.emb, self.heads = torch.nn.Embedding(vocab, d), heads
        self.qkv, self.out = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.gate, self.up, self.down = torch.nn.Linear(d, 64), torch.nn.Linear(d, 64), torch.nn.Linear(64, d)
        self.norm_w = torch.nn.Parameter(torch.rand(d) + 0.5)
        self.scale = torch.nn.Parameter(torch.rand(1, 1, d) + 0.5)

    def rms(self, x):
        return self.norm_w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def forward(self, input_ids, attention_mask):
        x = self.emb(input_ids)
        b, s, d = x.shape
        q, k, v = self.qkv(self.rms(x)).reshape(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = torch.zeros(attention_mask.shape, dtype=x.dtype).masked_fill(attention_mask == 0, float("-inf"))
        scores = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5 + bias[:, None, None, :]
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
        x = x + self.out(att)
        h = self.rms(x)
        x = (x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))) * self.scale
        m = attention_mask[..., None].float()
        return (x * m).sum(1) / m.sum(1)


def test_hand_written_encoder_with_a_masked_fill_padding_bias():
    model = HandWrittenEncoder().eval()
    inputs = padded_batch([16, 9, 3], 16, vocab=100)
    dyn = {k: {0: Dim.DYNAMIC, 1: Dim.DYNAMIC} for k in inputs}
    graph, stats = optimize(ModelSpec(model, inputs, dyn), "canonicalize,dce,constant-fold,cse,fuse-attention,remove-padding,dce")
    # out, gate, up, down on real rows; the QKV projection stays padded: its
    # heads are split by a permute across the q/k/v axis, not read through.
    assert stats.get("linears") == 4, stats
    for backend in ("eager", "onnxruntime"):
        compiled = fxopt.compile(graph, backend)
        for batch in (inputs, padded_batch([5, 1, 12, 7, 2], 12, vocab=100, seed=1)):
            with torch.no_grad():
                ref = model(**batch)
            assert fxopt.compare(ref, compiled(**batch)).max_abs_err < 1e-5, backend


class TinyEncoder(torch.nn.Module):
    """One attention layer (heads by view + transpose, a masked_fill padding
    bias) whose output feeds the head the tests below vary."""

    def __init__(self, head: str, d=16, vocab=50):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.q, self.k, self.v = torch.nn.Embedding(vocab, d), *(torch.nn.Linear(d, d) for _ in range(3))
        self.p, self.head = torch.nn.Linear(d, d), head

    def forward(self, input_ids, attention_mask):
        x = self.emb(input_ids)
        b, s, d = x.shape
        q, k, v = (t.view(b, s, 2, d // 2).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        bias = torch.zeros(attention_mask.shape).masked_fill(attention_mask == 0, float("-inf"))
        x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :]).transpose(1, 2).reshape(b, s, d)
        if self.head == "mix":  # MLP-Mixer-like: a linear across tokens, [B, D, S]
            return self.p(x.transpose(1, 2))
        m = attention_mask[..., None].float()
        sim = x @ x.transpose(1, 2)  # [B, S, S], its keys masked below, summed over queries
        return (self.p(x) * m).sum(1) / m.sum(1), (sim * attention_mask[:, None, :]).sum(1)


def static_run(model, pipeline, batches):
    graph, stats = optimize(ModelSpec(model, batches[0]), pipeline, dynamic=False)
    compiled = fxopt.compile(graph, "eager")
    for batch in batches:
        with torch.no_grad():
            assert fxopt.compare(model(**batch), compiled(**batch)).max_abs_err < 1e-5
    return stats


def test_batch_of_one_static_key_masked_product_is_not_a_padded_row():
    """With B == 1 a [1, S] mask broadcast over keys has the padded layout's
    shape; it is neither unpadded as rows nor taken as zeroing padded rows."""
    batches = [padded_batch([5], 8, vocab=50), padded_batch([1], 8, vocab=50, seed=1)]
    stats = static_run(TinyEncoder("pool").eval(), FUSED + ",remove-padding,dce", batches)
    assert stats["linears"] == 1  # x's padded rows reach sim's sum over queries: only the pooled linear moves


def test_static_token_mixing_tensor_that_only_looks_padded_is_left_alone():
    """S == D with static shapes: x.transpose(1, 2) is [B, D, S], shaped like
    [B, S, ...] but not token rows; zeroing its "padded rows" would be wrong."""
    batches = [padded_batch([16, 9, 3], 16, vocab=50)]
    stats = static_run(TinyEncoder("mix").eval(), FUSED + ",remove-padding(padded_outputs=zero),dce", batches)
    assert "reason" in stats


def test_attention_already_packed_by_an_earlier_pipeline():
    """pack-attention's op runs its QKV GEMM on padded rows; the rest moves."""
    spec = embedder()
    model = spec.model
    packed = PassManager(FUSED + ",pack-attention,dce").run(trace_once(spec)).graph
    assert count(packed, fxopt_ops.packed_attention.default) == 2
    result = PassManager("remove-padding,dce").run(packed)
    stats = result.records[0].stats
    assert (stats["attention"], stats["linears"]) == (2, 6)  # output, FFN up, FFN down per layer
    for backend in ("eager", "onnxruntime"):
        compiled = fxopt.compile(result.graph, backend)
        for batch in BATCHES:
            with torch.no_grad():
                assert fxopt.compare(model(**batch), compiled(**batch)).max_abs_err < 1e-5, backend
