"""fuse-attention: written-out attention -> scaled_dot_product_attention, and its
ONNX Runtime lowering to com.microsoft.MultiHeadAttention."""

from __future__ import annotations

import math

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

import fxopt
from fxopt.ir.trace import split_inputs
from fxopt.models import bert, gpt2, llama, tiny_gpt
from fxopt.passes import OptionError, PassManager, PipelineError
from fxopt.passes.attention import FuseAttention
from conftest import built, trace_once

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
PIPELINE = "canonicalize,dce,constant-fold,cse,fuse-attention,dce"


def fuse(spec, pipeline=PIPELINE):
    graph = trace_once(spec)
    result = PassManager(pipeline, check_numerics=True).run(graph)
    stats = next(r.stats for r in result.records if r.name.startswith("fuse-attention"))
    return result.graph, stats


def sdpa_nodes(graph):
    return [n for n in graph.fx.nodes if n.target == SDPA]


def assert_parity_on_backends(spec, graph, backends=("eager", "onnxruntime"), tol=1e-4, **options):
    """The fused graph matches the original model on every backend, on the
    traced inputs and on inputs of other sizes (dynamic dims stay dynamic);
    returns the compiled models, by backend."""
    models = {b: fxopt.compile(graph, b, **(options if b == "onnxruntime" else {})) for b in backends}
    for inputs in [spec.example_inputs, *spec.other_inputs]:
        args, kwargs = split_inputs(inputs)
        with torch.no_grad():
            ref = spec.model(*args, **kwargs)
        for backend, model in models.items():
            out = model(*args, **kwargs)
            parity = fxopt.compare(ref, out)
            assert parity.within(tol), (backend, parity)
    return models


# -- the models: match counts, causal proof, parity -------------------------------------------


def test_gpt2_eager_attention_is_fused_and_proved_causal():
    # transformers 5 builds GPT-2's causal mask from position ids (index/le/cumsum);
    # the symbolic evaluation reduces it to "key <= query", so the mask is dropped.
    spec = built(gpt2, "tiny", attn_implementation="eager")
    graph, stats = fuse(spec)
    assert (stats["fused"], stats["causal"], stats["masked"], stats["misses"]) == (2, 2, 0, {})
    assert all(n.kwargs["is_causal"] and n.kwargs["attn_mask"] is None for n in sdpa_nodes(graph))
    assert not any(n.target == aten.softmax.int for n in graph.fx.nodes)
    assert_parity_on_backends(spec, graph)


def test_bert_padding_mask_stays_an_attn_mask():
    spec = built(bert, "tiny", attn_implementation="eager")
    graph, stats = fuse(spec)
    assert (stats["fused"], stats["causal"], stats["masked"]) == (2, 0, 2)
    assert all(not n.kwargs["is_causal"] and n.kwargs["attn_mask"] is not None for n in sdpa_nodes(graph))
    assert_parity_on_backends(spec, graph)


def test_tiny_gpt_kv_cache_offset_mask_is_not_plain_causal():
    # query i sits at absolute position past + i: causal with an offset, so it stays a mask
    spec = tiny_gpt()
    graph, stats = fuse(spec)
    assert (stats["fused"], stats["causal"], stats["masked"]) == (2, 0, 2)
    assert_parity_on_backends(spec, graph)


def test_llama_gqa_eager_attention_keeps_repeat_kv():
    spec = built(llama, "tiny", attn_implementation="eager")
    graph, stats = fuse(spec)
    assert (stats["fused"], stats["causal"], stats["gqa"]) == (2, 2, 2)
    assert_parity_on_backends(spec, graph)


def test_sdpa_models_have_nothing_to_fuse_and_say_so():
    spec = built(gpt2, "tiny")  # transformers' default implementation already exports SDPA
    graph, stats = fuse(spec)
    assert (stats["fused"], stats["softmax"], stats["sdpa_present"]) == (0, 0, 2)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_default_sdpa_boolean_causal_mask_becomes_is_causal(name):
    # transformers' default attention passes SDPA a boolean mask built from
    # index comparisons: proved causal, it is dropped for is_causal
    spec = built({"gpt2": gpt2, "llama": llama}[name], "tiny")
    before = PassManager("canonicalize,dce,constant-fold,cse").run(trace_once(spec)).graph
    assert all(n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None) is not None for n in sdpa_nodes(before))
    graph, stats = fuse(spec)
    assert (stats["fused"], stats["sdpa_made_causal"]) == (0, 2)
    assert all(n.kwargs["is_causal"] and n.kwargs["attn_mask"] is None for n in sdpa_nodes(graph))
    assert len(graph.fx.nodes) < len(before.fx.nodes)  # what built the mask is gone after dce
    assert_parity_on_backends(spec, graph)


class SdpaWithMask(torch.nn.Module):
    """SDPA called with a mask the model builds itself (``mask`` picks it)."""

    def __init__(self, mask: str, heads: int = 2, dim: int = 16):
        super().__init__()
        self.mask, self.heads, self.qkv = mask, heads, torch.nn.Linear(dim, 3 * dim)

    def forward(self, x, keep=None):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(d, -1))
        pos = torch.arange(s, device=x.device)
        if self.mask == "causal":
            m = pos[None, :] <= pos[:, None]
        elif self.mask == "one-ahead":  # each query sees one future key
            m = pos[None, :] <= pos[:, None] + 1
        else:  # causal and a key-padding input
            m = (pos[None, :] <= pos[:, None])[None, None] & keep[:, None, None, :].bool()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m).transpose(1, 2).reshape(b, s, d)


@pytest.mark.parametrize("mask, made_causal", [("causal", 1), ("one-ahead", 0), ("causal+padding", 0)])
def test_sdpa_mask_is_made_causal_only_when_proved(mask, made_causal):
    torch.manual_seed(0)
    x, keep = torch.randn(2, 6, 16), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    inputs, dyn = ((x, keep), ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},) * 2) if "padding" in mask else ((x,), ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},))
    other = [(torch.randn(3, 9, 16), torch.ones(3, 9, dtype=torch.long))] if "padding" in mask else [(torch.randn(3, 9, 16),)]
    spec = fxopt.models.ModelSpec(SdpaWithMask(mask).eval(), inputs, dyn, f"sdpa-{mask}", other)
    graph, stats = fuse(spec)
    (node,) = sdpa_nodes(graph)
    assert stats["sdpa_made_causal"] == made_causal
    assert node.kwargs.get("is_causal", False) == bool(made_causal)
    assert_parity_on_backends(spec, graph)
    if made_causal:  # the options turn it off: causal, and min_seq above a static traced length
        _, stats = fuse(spec, PIPELINE.replace("fuse-attention", "fuse-attention(causal=false)"))
        assert stats["sdpa_made_causal"] == 0
        static = fxopt.models.ModelSpec(spec.model, inputs, None, spec.name)
        assert fuse(static)[1]["sdpa_made_causal"] == 1
        assert fuse(static, PIPELINE.replace("fuse-attention", "fuse-attention(min_seq=64)"))[1]["sdpa_made_causal"] == 0


# -- small models: before / after, near misses ---------------------------------------------------


class Attention(torch.nn.Module):
    """One attention head group written out; ``mask`` picks how the mask is built."""

    def __init__(self, mask: str = "tril", scale_on: str = "scores", heads: int = 2, dim: int = 16):
        super().__init__()
        self.mask, self.scale_on, self.heads, self.dim = mask, scale_on, heads, dim
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.rel_bias = torch.nn.Embedding(9, heads)  # per-head bias by clamped relative distance (T5, MPNet)
        # minGPT / nanoGPT keep the causal mask as a table and slice it to the length.
        table = torch.ones(16, 16).tril(diagonal=1 if mask == "buffer+1" else 0)
        if mask == "buffer-additive":
            table = torch.zeros(16, 16).masked_fill(table == 0, float("-inf"))
        self.register_buffer("table", table.view(1, 1, 16, 16))

    def forward(self, x, pad=None):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(d, -1))
        hd = d // self.heads
        if self.scale_on == "q":
            scores = (q * hd**-0.5) @ k.transpose(-1, -2)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        if self.mask == "tril":
            keep = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        elif self.mask == "tril+1":  # sees one future token: not causal
            keep = torch.ones(s, s, dtype=torch.bool, device=x.device).tril(diagonal=1)
            scores = scores.masked_fill(~keep, float("-inf"))
        elif self.mask == "arange":
            pos = torch.arange(s, device=x.device)
            scores = scores + torch.where(pos[None, :] <= pos[:, None], 0.0, torch.finfo(x.dtype).min)
        elif self.mask in ("buffer", "buffer+1"):
            scores = scores.masked_fill(self.table[:, :, :s, :s] == 0, float("-inf"))
        elif self.mask == "buffer-additive":
            scores = scores + self.table[:, :, :s, :s]
        elif self.mask == "input":
            scores = scores + pad[:, None, None, :]
        elif self.mask == "bias+input":
            pos = torch.arange(s, device=x.device)
            rel = (pos[None, :] - pos[:, None]).clamp(-4, 4) + 4
            scores = scores + self.rel_bias(rel).permute(2, 0, 1)[None] + pad[:, None, None, :]
        elif self.mask == "bias+blocked":  # MPT: a bias per head (ALiBi), then the causal mask filled in
            pos = torch.arange(s, device=x.device)
            rel = (pos[None, :] - pos[:, None]).clamp(-4, 4) + 4
            scores = scores + self.rel_bias(rel).permute(2, 0, 1)[None]
            scores = scores.masked_fill(pos[None, :] > pos[:, None], torch.finfo(x.dtype).min)
        probs = F.softmax(scores, dim=-1)
        out = probs @ v
        out = out.transpose(1, 2).reshape(b, s, d)
        return (out, probs) if self.mask == "return-probs" else out


def small(mask="tril", scale_on="scores"):
    torch.manual_seed(0)
    model = Attention(mask, scale_on).eval()
    x = torch.randn(2, 6, 16)
    if mask in ("input", "bias+input"):
        pad = torch.zeros(2, 6)
        pad[0, 4:] = -1e9
        inputs = (x, pad)
        dyn = ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC}, {0: Dim.DYNAMIC, 1: Dim.DYNAMIC})
        other = [(torch.randn(3, 9, 16), torch.zeros(3, 9))]
    else:
        inputs, dyn, other = (x,), ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},), [(torch.randn(3, 9, 16),)]
    return fxopt.models.ModelSpec(model, inputs, dyn, f"attention-{mask}", other)


@pytest.mark.parametrize("mask", ["tril", "arange", "buffer", "buffer-additive"])
def test_causal_masks_written_four_ways_become_is_causal(mask):
    spec = small(mask)
    graph, stats = fuse(spec)
    (node,) = sdpa_nodes(graph)
    assert stats["causal"] == 1 and node.kwargs["is_causal"] and node.kwargs["attn_mask"] is None
    assert node.kwargs["scale"] == pytest.approx(1 / math.sqrt(8))
    assert_parity_on_backends(spec, graph, backends=("eager", "onnxruntime") if mask in ("tril", "buffer") else ("eager",))


@pytest.mark.parametrize("mask", ["tril+1", "buffer+1"])
def test_tril_with_offset_is_not_made_causal(mask):
    spec = small(mask)  # each query sees one future token
    graph, stats = fuse(spec)
    (node,) = sdpa_nodes(graph)
    assert stats["masked"] == 1 and not node.kwargs["is_causal"] and node.kwargs["attn_mask"] is not None
    assert_parity_on_backends(spec, graph, backends=("eager",))


def test_mask_from_an_input_and_scale_on_q():
    spec = small("input", scale_on="q")
    graph, stats = fuse(spec)
    (node,) = sdpa_nodes(graph)
    assert stats["masked"] == 1 and node.kwargs["scale"] == pytest.approx(8**-0.5)
    assert_parity_on_backends(spec, graph, backends=("eager",))


def test_causal_option_off_keeps_the_mask():
    spec = small("tril")
    graph, stats = fuse(spec, PIPELINE.replace("fuse-attention", "fuse-attention(causal=false)"))
    assert (stats["causal"], stats["masked"]) == (0, 1)
    assert_parity_on_backends(spec, graph, backends=("eager",))


def test_probabilities_used_outside_are_not_fused_and_the_miss_is_explained():
    spec = small("return-probs")
    graph, stats = fuse(spec)
    assert stats["fused"] == 0 and not sdpa_nodes(graph)
    (reason,) = stats["misses"].values()
    assert "used 2 times" in reason


def test_softmax_over_another_dim_is_a_miss():
    class NotAttention(torch.nn.Module):
        def forward(self, a, b):
            return F.softmax(a @ b, dim=1) @ b

    x = torch.randn(2, 2, 4, 4)
    graph = fxopt.trace(NotAttention(), (x, x))
    result = PassManager("fuse-attention").run(graph)
    assert result.records[0].stats["misses"] == {"softmax": "softmax over dim 1, not the last"}


def test_bad_option_is_named():
    with pytest.raises(PipelineError, match="option 'min_seq': must be >= 1"):
        PassManager("fuse-attention(min_seq=0)")
    with pytest.raises(OptionError, match="min_seq"):
        FuseAttention(min_seq=0)


# -- ONNX Runtime lowering ---------------------------------------------------------------------


def onnx_ops(graph, **options):
    """(domain, op) of each node of ``graph``'s ONNX export, or of the model a
    compiled ONNX Runtime model runs."""
    program = graph.program if hasattr(graph, "program") else fxopt.backends.onnxruntime.export_onnx_program(graph, **options)
    proto = program.model_proto
    onnx.checker.check_model(proto)
    return [(n.domain, n.op_type) for n in proto.graph.node]


def test_onnx_model_uses_multihead_attention_and_can_opt_out():
    spec = built(bert, "tiny", attn_implementation="eager")
    graph, _ = fuse(spec)
    ops = onnx_ops(graph)
    assert ops.count(("com.microsoft", "MultiHeadAttention")) == 2
    assert ("", "Softmax") not in ops
    plain = assert_parity_on_backends(spec, graph, backends=("onnxruntime",), disable_lowerings=["contrib-attention"])
    plain = onnx_ops(plain["onnxruntime"])
    assert ("com.microsoft", "MultiHeadAttention") not in plain and ("", "Softmax") in plain


def test_unknown_lowering_group_is_an_error():
    with pytest.raises(ValueError, match="unknown ONNX lowering group"):
        fxopt.ir.ops.onnx_translation_table(["contrib-atention"])


def test_sdpa_the_contrib_op_cannot_express_falls_back_to_the_generic_lowering():
    class GroupedCausal(torch.nn.Module):
        def forward(self, q, k, v):  # 4 query heads over 2 KV heads, queries fewer than keys
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8)
    graph = fxopt.trace(GroupedCausal(), (q, k, k))
    assert ("com.microsoft", "MultiHeadAttention") not in onnx_ops(graph)
    out = fxopt.compile(graph, "onnxruntime")(q, k, k)
    assert fxopt.compare(GroupedCausal()(q, k, k), out).within(1e-5)


# -- on the rewrite engine: the same counts as the hand-written matcher had, the forms ----------

# What the hand-written matcher fused before the rewrite engine took over: static shapes fold
# the masks into constants, which cannot be proved causal, so they stay masks.
COUNTS = {
    ("gpt2-tiny", False): (2, 0, 2, 0), ("gpt2-tiny", True): (2, 2, 0, 0),
    ("bert-tiny", False): (2, 0, 2, 0), ("bert-tiny", True): (2, 0, 2, 0),
    ("llama-tiny", False): (2, 0, 2, 2), ("llama-tiny", True): (2, 2, 0, 2),
    ("tiny-gpt", False): (2, 0, 2, 0), ("tiny-gpt", True): (2, 0, 2, 0),
}
MODELS = {
    "gpt2-tiny": lambda: built(gpt2, "tiny", attn_implementation="eager"),
    "bert-tiny": lambda: built(bert, "tiny", attn_implementation="eager"),
    "llama-tiny": lambda: built(llama, "tiny", attn_implementation="eager"),
    "tiny-gpt": lambda: built(tiny_gpt),
}


@pytest.mark.parametrize("name,dynamic", list(COUNTS))
def test_fused_counts_are_unchanged(name, dynamic):
    graph = trace_once(MODELS[name](), dynamic=dynamic)
    stats = PassManager(PIPELINE).run(graph).records[4].stats
    assert (stats["fused"], stats["causal"], stats["masked"], stats["gqa"]) == COUNTS[(name, dynamic)]
    assert stats["misses"] == {} and stats["softmax"] == 2


@pytest.mark.parametrize("mask", ["bias+input", "bias+blocked"])
def test_position_bias_and_mask_become_one_float_mask(mask):
    spec = small(mask)
    graph, stats = fuse(spec)
    (node,) = sdpa_nodes(graph)
    assert (stats["fused"], stats["masked"], stats["causal"]) == (1, 1, 0) and not node.kwargs["is_causal"]
    mask = node.kwargs["attn_mask"]
    assert mask.target == torch.ops.aten.add.Tensor  # bias + padding or the filled causal mask, one additive mask
    assert_parity_on_backends(spec, graph)


class Forms(torch.nn.Module):
    """Key permuted and scaled by a one-element constant, a where(-inf tensor) mask, softmax with dtype=."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.register_buffer("scale", torch.tensor(8**-0.5))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, 2, 8).transpose(1, 2) for t in self.qkv(x).split(d, -1))
        scores = q @ (k.permute(0, 1, 3, 2) * self.scale)
        blocked = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        scores = torch.where(blocked, torch.tensor(float("-inf")), scores)
        probs = torch.softmax(scores, -1, dtype=torch.float32)
        return (probs @ v).transpose(1, 2).reshape(b, s, d)


def test_forms_permuted_key_constant_scale_where_mask():
    torch.manual_seed(0)
    spec = fxopt.models.ModelSpec(Forms().eval(), (torch.randn(2, 6, 16),), ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},), "forms",
                                  [(torch.randn(3, 9, 16),)])
    graph, stats = fuse(spec)
    (node,) = sdpa_nodes(graph)
    assert (stats["fused"], stats["causal"]) == (1, 1) and node.kwargs["is_causal"]
    assert node.kwargs["scale"] == pytest.approx(8**-0.5)
    assert_parity_on_backends(spec, graph)


class FoldedHeads(torch.nn.Module):
    """DeBERTa-v2's attention: heads folded into the batch ([B * 2, S, 8]), the key
    divided by a 0-d scale, ``bmm``, viewed back, a padding mask applied by
    ``masked_fill`` with a finite fill, the probabilities folded again for ``bmm``."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.register_buffer("scale", torch.tensor(8.0))

    def forward(self, x, keep):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, 2, 8).permute(0, 2, 1, 3).contiguous().view(-1, s, 8) for t in self.qkv(x).split(d, -1))
        scores = torch.bmm(q, k.transpose(-1, -2) / torch.sqrt(self.scale)).view(-1, 2, s, s)
        scores = scores.masked_fill(~keep[:, None, None, :].bool(), torch.finfo(x.dtype).min)
        out = torch.bmm(scores.softmax(-1).view(-1, s, s), v).view(b, 2, s, 8)
        return out.transpose(1, 2).reshape(b, s, d)


# canonicalize unfolds the folded heads; the finite fill (the dtype's lowest value, which in float16
# is -65504) becomes an additive mask of the model's dtype, at half that value so that a score added
# to it stays finite.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_attention_over_heads_folded_into_the_batch(dtype):
    torch.manual_seed(0)
    keep = torch.ones(2, 6)
    keep[1, 4:] = 0
    dyn = ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC}, {0: Dim.DYNAMIC, 1: Dim.DYNAMIC})
    spec = fxopt.models.ModelSpec(FoldedHeads().eval().to(dtype), (torch.randn(2, 6, 16, dtype=dtype), keep), dyn,
                                  "folded", [(torch.randn(3, 9, 16, dtype=dtype), torch.ones(3, 9))])
    graph, stats = fuse(spec)
    (node,) = sdpa_nodes(graph)
    mask = node.kwargs["attn_mask"]
    assert (stats["fused"], stats["masked"]) == (1, 1) and mask.target == torch.ops.aten.where.ScalarOther
    assert mask.meta["val"].dtype == dtype
    assert not {torch.ops.aten.bmm.default, torch.ops.aten.masked_fill.Scalar} & {n.target for n in graph.fx.nodes}
    assert_parity_on_backends(spec, graph, backends=("eager", "onnxruntime") if dtype == torch.float32 else ("eager",),
                              tol=1e-2 if dtype == torch.float16 else 1e-4)


def test_nothing_fused_gives_the_engines_nearest_miss():
    class NotAttention(torch.nn.Module):
        def forward(self, a, b):
            return F.softmax(a @ b, dim=1) @ b

    x = torch.randn(2, 2, 4, 4)
    stats = PassManager("fuse-attention").run(fxopt.trace(NotAttention(), (x, x))).records[0].stats
    assert stats["nearest_miss"].startswith("pattern 'attention': no match among 2 aten.matmul.default node(s)")
    assert "pattern node %softmax vs graph %softmax (aten.softmax.int): softmax over dim 1, not the last" in stats["nearest_miss"]
