"""pack-attention: whole attention blocks -> fxopt.packed_attention (com.microsoft
Attention) and fxopt.group_query_attention (com.microsoft GroupQueryAttention)."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

import fxopt
from fxopt.ir.trace import split_inputs
from fxopt.models import ModelSpec, bert, gpt2, llama, tiny_gpt
from fxopt.passes import PassManager
from conftest import built, trace_once

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
PACKED = torch.ops.fxopt.packed_attention.default
PACKED_INT8 = torch.ops.fxopt.packed_attention_dynamic_int8.default
LINEAR_INT8 = torch.ops.fxopt.linear_dynamic_int8.default
GQA = torch.ops.fxopt.group_query_attention.default
BASE = "canonicalize,dce,constant-fold,cse"
PIPELINE = f"{BASE},fuse-attention,merge-linears,pack-attention,fuse-linear-act,fuse-norm,dce"


def pack(spec, pipeline=PIPELINE, dynamic=True):
    graph = trace_once(spec, dynamic=dynamic)
    result = PassManager(pipeline, check_numerics=True).run(graph)
    stats = next((r.stats for r in result.records if r.name.startswith("pack-attention")), None)
    return result.graph, stats


def count(graph, target) -> int:
    return sum(n.target == target for n in graph.fx.nodes)


def assert_parity(spec, graph, inputs=None, tol=1e-4, models=None):
    """Matches the original model on eager and ONNX Runtime (``models``: the
    graph compiled for both, if the test has them already); returns the ONNX
    Runtime model (for :func:`onnx_ops`)."""
    models = models or {backend: fxopt.compile(graph, backend) for backend in ("eager", "onnxruntime")}
    for example in inputs or [spec.example_inputs, *spec.other_inputs]:
        args, kwargs = split_inputs(example)
        with torch.no_grad():
            ref = spec.model(*args, **kwargs)
        for backend, model in models.items():
            parity = fxopt.compare(ref, model(*args, **kwargs))
            assert parity.within(tol), (backend, parity)
    return models["onnxruntime"]


def onnx_ops(model) -> list[tuple[str, str]]:
    """(domain, op) of every node of the ONNX model that ``model`` (compiled
    for ONNX Runtime) runs; Transpose only counts when it moves an activation
    (ONNX Runtime folds one of an initializer at load time)."""
    model = model.program.model_proto
    weights = {i.name for i in model.graph.initializer}
    nodes = [*model.graph.node, *(n for f in model.functions for n in f.node)]
    return [(n.domain, n.op_type) for n in nodes if not (n.op_type == "Transpose" and n.input[0] in weights)]


# -- the models: before / after ---------------------------------------------------------------


def test_gpt2_causal_attention_becomes_one_attention_op():
    spec = built(gpt2, "tiny", attn_implementation="eager")
    before, _ = pack(spec, pipeline=PIPELINE.replace("pack-attention,", ""))
    graph, stats = pack(spec)
    assert (count(before, SDPA), count(before, aten.transpose.int)) == (2, 8)
    assert (stats["packed"], stats["causal"], stats["refused"]) == (2, 2, {})
    # the QKV linear, split, head split/merge and SDPA are all inside the op
    assert (count(graph, PACKED), count(graph, SDPA), count(graph, aten.transpose.int), count(graph, aten.split.Tensor)) == (2, 0, 0, 0)
    assert all(n.args[5] is True and n.args[3] is None for n in graph.fx.nodes if n.target == PACKED)
    ops = onnx_ops(assert_parity(spec, graph))  # traced inputs and another batch/length: dynamic shapes
    assert ops.count(("com.microsoft", "Attention")) == 2
    assert ("com.microsoft", "MultiHeadAttention") not in ops and ("", "Transpose") not in ops


@pytest.mark.parametrize("name, form", [("gpt2", "packed"), ("llama", "gqa")])
def test_default_sdpa_attention_is_packed(name, form):
    # transformers' default attention: SDPA with a boolean causal mask, which
    # fuse-attention proves causal, so pack-attention can take it
    spec = built({"gpt2": gpt2, "llama": llama}[name], "tiny")
    graph, stats = pack(spec)
    assert (stats[form], stats["refused"]) == (2, {})
    assert_parity(spec, graph)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_static_shapes_folded_causal_mask(name):
    # traced without dynamic dims, constant-fold turns the causal mask into a
    # constant: it is recognised from its values
    spec = built({"gpt2": gpt2, "llama": llama}[name], "tiny", attn_implementation="eager")
    graph, stats = pack(spec, dynamic=False)
    assert (stats["packed"] + stats["gqa"], stats["refused"]) == (2, {})
    assert_parity(spec, graph, inputs=[spec.example_inputs])


def test_bert_key_padding_mask_becomes_the_mask_input():
    spec = built(bert, "tiny", attn_implementation="eager")
    graph, stats = pack(spec)
    assert (stats["packed"], stats["masked"], stats["refused"]) == (2, 2, {})
    nodes = [n for n in graph.fx.nodes if n.target == PACKED]
    # HF indexes the [B, T] mask with arange(batch of input_ids): the op reads mask[:B, :T]
    assert all(n.args[5] is False and n.args[3] is not None for n in nodes)
    assert all(n.args[7] == torch.finfo(torch.float32).min for n in nodes)  # HF's fill, kept exactly
    assert not any(n.target == aten.where.ScalarOther and n.users for n in graph.fx.nodes)
    assert spec.example_inputs["attention_mask"].min() == 0  # padding is exercised
    assert onnx_ops(assert_parity(spec, graph)).count(("com.microsoft", "Attention")) == 2


def test_bert_fully_padded_row_matches():
    # every key of a row masked: HF spreads attention evenly; so must the kernel
    spec = built(bert, "tiny", attn_implementation="eager")
    graph, _ = pack(spec)
    inputs = {k: v.clone() for k, v in spec.example_inputs.items()}
    inputs["attention_mask"][0] = 0
    assert_parity(spec, graph, inputs=[inputs])


@pytest.mark.parametrize("quant", ["", "quantize(mode=dynamic,act_granularity=tensor),"], ids=["float", "int8"])
def test_default_sdpa_boolean_padding_mask_is_packed(quant):
    # transformers' default attention hands SDPA the boolean attention_mask[b, k] != 0:
    # fill -inf, so an all-padding sequence gives 0 (torch), not the mean of the values
    spec = built(bert, "tiny")
    graph, stats = pack(spec, pipeline=PIPELINE.replace("pack-attention,", quant + "pack-attention,"))
    assert (stats["packed"], stats["masked"], stats["refused"]) == (2, 2, {})
    target = PACKED_INT8 if quant else PACKED
    assert [n.args[-1] for n in graph.fx.nodes if n.target == target] == [-torch.inf] * 2
    all_padding = {k: v.clone() for k, v in spec.example_inputs.items()}
    all_padding["attention_mask"][0] = 0
    ort = assert_parity(spec, graph, inputs=[spec.example_inputs, *spec.other_inputs, all_padding], tol=1e-4 if not quant else 5e-3)
    kernel = ("com.microsoft", "QAttention" if quant else "Attention")
    assert onnx_ops(ort).count(kernel) == 2


def left_padded(spec: ModelSpec) -> ModelSpec:
    """The decoder spec traced with an ``attention_mask`` whose first row is
    left-padded, as in batched generation: its padded queries see no key."""

    def inputs(batch, seq, pad, seed):
        ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, :pad] = 0
        return {"input_ids": ids, "attention_mask": mask}

    dyn = {k: {0: Dim.DYNAMIC, 1: Dim.DYNAMIC} for k in ("input_ids", "attention_mask")}
    return ModelSpec(spec.model, inputs(2, 12, 5, 0), dyn, f"{spec.name}-left-padded", [inputs(3, 9, 8, 1)])


@pytest.mark.parametrize("make", [llama, gpt2])
@pytest.mark.parametrize("pipeline", [BASE, PIPELINE])
def test_left_padded_batch_matches_on_every_row(make, pipeline):
    # transformers' default attention, causal + padding as one boolean mask: the
    # padded queries' rows are all False, where torch's SDPA returns 0. A -inf
    # bias made ONNX Runtime's softmax NaN there, and the next layer's keys
    # spread the NaN to every real token.
    spec = left_padded(make("tiny"))
    graph, _ = pack(spec, pipeline=pipeline)
    # the padding keeps the mask (not provably causal); with fewer kv heads, pack-attention gives it to
    # GroupQueryAttention (causal, the mask as its bias), else SDPA stays for MultiHeadAttention
    masked_gqa = pipeline == PIPELINE and make is llama
    assert (count(graph, SDPA), count(graph, GQA)) == ((0, 2) if masked_gqa else (2, 0))
    assert_parity(spec, graph)


class MaskedSDPA(torch.nn.Module):
    def __init__(self, kv_heads: int = 2):
        super().__init__()
        self.kv_heads = kv_heads

    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k[:, : self.kv_heads], v[:, : self.kv_heads], attn_mask=mask,
                                              enable_gqa=self.kv_heads < q.shape[1])


class PaddedGQA(torch.nn.Module):
    """SDPA over 4 query heads and 2 key/value heads with a mask built from a
    ``[B, S]`` padding input: ``causal&padding`` (a left-padded prompt's),
    ``padding`` (bidirectional), ``prefix`` (the first two keys seen by every
    query, causal after them: not within the causal triangle); boolean, or
    additive with ``fill`` where masked."""

    def __init__(self, kind: str, fill: float | None = None):
        super().__init__()
        self.kind, self.fill = kind, fill

    def forward(self, q, k, v, padding):
        s = q.shape[2]
        query, key = torch.arange(s)[:, None], torch.arange(s)[None, :]
        keep = padding.bool()[:, None, None, :]
        seen = {"causal&padding": key <= query, "padding": torch.ones(s, s, dtype=torch.bool),
                "prefix": (key <= query) | (key < 2)}[self.kind]
        mask = seen & keep
        if self.fill is not None:
            mask = torch.zeros(mask.shape).masked_fill(~mask, self.fill)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def padded_gqa_inputs(batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(batch, 4, seq, 16, generator=g), *(torch.randn(batch, 2, seq, 16, generator=g) for _ in range(2))
    padding = torch.ones(batch, seq, dtype=torch.long)
    padding[0, :3] = 0  # row 0 left-padded
    return q, k, v, padding


@pytest.mark.parametrize("kind, fill, within", [
    ("causal&padding", None, 1), ("causal&padding", -torch.inf, 1),
    # a finite fill: the padded query that sees no key averages every key in torch, not keys 0..q
    ("causal&padding", torch.finfo(torch.float32).min, 0),
    ("padding", None, 0), ("prefix", None, 0)], ids=["bool", "-inf", "finite-fill", "padding", "prefix"])
def test_gqa_mask_within_the_causal_triangle_runs_the_causal_kernel(kind, fill, within):
    model = PaddedGQA(kind, fill).eval()
    batch, seq = Dim("batch"), Dim("seq")
    graph = fxopt.trace(model, padded_gqa_inputs(2, 7, 0), dynamic_shapes=(
        {0: batch, 2: seq}, {0: batch, 2: seq}, {0: batch, 2: seq}, {0: batch, 1: seq}))
    result = PassManager(f"{BASE},fuse-attention,pack-attention,dce", check_numerics=True).run(graph)
    stats = next(r.stats for r in result.records if r.name.startswith("pack-attention"))
    assert (stats["gqa"], stats["causal_mask"], stats["refused"]) == (1, within, {})
    (node,) = [n for n in result.graph.fx.nodes if n.target == GQA]
    assert node.args[7] is bool(within)  # causal, with the mask as the kernel's bias
    for backend in ("eager", "onnxruntime"):
        run = fxopt.compile(result.graph, backend)
        for inputs in (padded_gqa_inputs(2, 7, 0), padded_gqa_inputs(3, 11, 1)):
            with torch.no_grad():
                assert fxopt.compare(model(*inputs), run(*inputs)).within(1e-5), (backend, kind)


@pytest.mark.parametrize("inference", [False, True], ids=["tracked", "inference-mode"])
def test_group_query_attention_runs_a_mask_that_is_causal_as_is_causal(monkeypatch, inference):
    """An unpadded prompt's mask is exactly causal: the eager kernel gives it to
    SDPA as ``is_causal`` (whose kernel skips the blocks above the diagonal);
    a padded one, or one changed in place since, stays a mask."""
    torch.manual_seed(0)
    q, (k, v) = torch.randn(2, 6, 4 * 16), (torch.randn(2, 6, 2 * 16) for _ in range(2))
    calls, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append((kw["attn_mask"] is None, kw["is_causal"])) or sdpa(*a, **kw))
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].clone()
    padded = causal.expand(2, 1, 6, 6).clone()
    padded[1, :, :, 0] = False  # row 1 left-padded by one token
    additive = torch.zeros(1, 1, 6, 6).masked_fill(~causal, -torch.inf)
    with torch.inference_mode(inference):
        for mask, as_causal in ((causal, True), (causal, True), (padded, False), (additive, True)):
            calls.clear()
            out = torch.ops.fxopt.group_query_attention(q, k, v, 4, 2, 0.25, mask, False)
            assert calls == [(as_causal, as_causal)]
            ref = sdpa(*(t.view(2, 6, -1, 16).transpose(1, 2) for t in (q, k, v)), attn_mask=mask, scale=0.25, enable_gqa=True)
            torch.testing.assert_close(out, ref.transpose(1, 2).reshape(2, 6, -1), atol=1e-6, rtol=1e-6)
        calls.clear()
        torch.ops.fxopt.group_query_attention(q, k, v, 4, 2, 0.25, causal, False)
        causal[0, 0, 5, 2] = False  # the tensor just found causal, changed in place: checked again
        torch.ops.fxopt.group_query_attention(q, k, v, 4, 2, 0.25, causal, False)
        assert calls == [(True, True), (False, False)]
        one = torch.ones(1, 1, 1, 1, dtype=torch.bool)  # causal for one query, all-attend broadcast over six
        calls.clear()
        torch.ops.fxopt.group_query_attention(q[:, :1], k[:, :1], v[:, :1], 4, 2, 0.25, one, False)
        torch.ops.fxopt.group_query_attention(q, k, v, 4, 2, 0.25, one, False)
        assert calls == [(True, True), (False, False)]


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["multihead-attention", "generic-lowering"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_query_rows_give_zeros_on_onnxruntime(kind, kv_heads):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    allowed = torch.rand(2, 1, 5, 5) > 0.3
    allowed[0, 0, 1] = False  # query 1 of batch 0 sees no key
    allowed[1, 0, 3] = False
    allowed[..., 0, 0] = True
    mask = allowed if kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, -torch.inf)
    model = MaskedSDPA(kv_heads).eval()
    graph = fxopt.trace(model, (q, k, v, mask))
    out = fxopt.compile(graph, "onnxruntime")(q, k, v, mask)
    ref = model(q, k, v, mask)
    assert ref[0, :, 1].abs().max() == 0 and ref[1, :, 3].abs().max() == 0  # torch: zeros there
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_llama_gqa_drops_repeat_kv():
    spec = built(llama, "tiny", attn_implementation="eager")
    before, _ = pack(spec, pipeline=PIPELINE.replace("pack-attention,", ""))
    graph, stats = pack(spec)
    assert (count(before, SDPA), count(before, aten.expand.default)) == (2, 4)  # repeat_kv of k and v
    assert (stats["gqa"], stats["packed"], stats["refused"]) == (2, 0, {})
    assert (count(graph, GQA), count(graph, SDPA), count(graph, aten.expand.default)) == (2, 0, 0)
    heads = [(n.args[3], n.args[4]) for n in graph.fx.nodes if n.target == GQA]
    assert heads == [(4, 2), (4, 2)]
    ops = onnx_ops(assert_parity(spec, graph))
    assert ops.count(("com.microsoft", "GroupQueryAttention")) == 2


# -- must not fire ------------------------------------------------------------------------------


class Block(torch.nn.Module):
    """An attention block written with SDPA; ``kind`` picks what makes it unusual."""

    def __init__(self, kind: str, heads: int = 2, dim: int = 16):
        super().__init__()
        self.kind, self.heads = kind, heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.q, self.k, self.v = (torch.nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x, bias):
        b, s, d = x.shape
        if self.kind == "separate":  # q, k, v from three linears (no merge-linears)
            parts = self.q(x), self.k(x), self.v(x)
        else:
            parts = self.qkv(x).split(d, -1)
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in parts)
        if self.kind == "float-bias":  # an arbitrary float bias, e.g. ALiBi or relative positions
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        elif self.kind == "causal+bias":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=False) + F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(b, s, d)


def block(kind: str) -> ModelSpec:
    torch.manual_seed(0)
    x, bias = torch.randn(2, 6, 16), torch.randn(2, 1, 6, 6)
    dyn = ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC}, {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC})
    return ModelSpec(Block(kind).eval(), (x, bias), dyn, f"block-{kind}", [(torch.randn(3, 9, 16), torch.randn(3, 1, 9, 9))])


def test_arbitrary_float_mask_is_refused_with_the_reason():
    spec = block("float-bias")
    graph, stats = pack(spec)
    assert (stats["packed"], count(graph, SDPA)) == (0, 1)
    (reason,) = stats["refused"].values()
    assert "arbitrary float mask" in reason
    assert_parity(spec, graph)


def test_qkv_from_separate_linears_is_refused_without_merge_linears():
    spec = block("separate")
    graph, stats = pack(spec, pipeline=f"{BASE},pack-attention,dce")
    assert stats["packed"] == 0 and "not parts of one split" in next(iter(stats["refused"].values()))
    # with merge-linears first, the three become one packed projection
    graph, stats = pack(spec, pipeline=f"{BASE},merge-linears,pack-attention,dce")
    assert (stats["packed"], count(graph, PACKED)) == (1, 1)
    assert_parity(spec, graph)


def test_shared_projection_is_refused():
    # two SDPAs read the same q/k/v: packing one would run the projection twice
    spec = block("causal+bias")
    graph, stats = pack(spec)
    assert stats["packed"] == 0 and len(stats["refused"]) == 2
    assert all("also used by" in r for r in stats["refused"].values())
    assert_parity(spec, graph)


def test_kv_cache_offset_mask_goes_to_the_cache_kernel_or_is_refused():
    spec = tiny_gpt()  # query i sits at past + i against concat(past, new): an explicit mask, not a padding mask
    graph, stats = pack(spec)
    assert (stats["packed"], stats["gqa"], stats["cache"], stats["refused"]) == (0, 0, 2, {})
    assert_parity(spec, graph)
    graph, stats = pack(spec, pipeline=f"{BASE},fuse-attention,merge-linears,pack-attention(cache=false),dce")
    assert (stats["packed"], stats["gqa"], stats["cache"]) == (0, 0, 0) and len(stats["refused"]) == 2
    assert all("cache=false" in reason for reason in stats["refused"].values())
    assert_parity(spec, graph)


def test_quantized_projection_stays_quantized():
    # pack-attention runs after quantize, which keeps the QKV weight quantized
    with pytest.raises(Exception, match="must run after 'quantize'"):
        PassManager(f"{BASE},merge-linears,pack-attention,quantize(bits=4,group_size=32)").check()
    spec = built(gpt2, "tiny", attn_implementation="eager")
    graph, stats = pack(spec, pipeline=f"{BASE},fuse-attention,merge-linears,quantize(bits=4,group_size=32),pack-attention,dce")
    assert stats["packed"] == 0 and all("is not a linear" in r for r in stats["refused"].values())


W8A8 = "quantize(mode=dynamic,act_granularity=tensor)"


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_dynamic_int8_projection_becomes_one_qattention(name):
    # quantize, then pack-attention: the int8 QKV linear moves into the op
    spec = built({"gpt2": gpt2, "bert": bert}[name], "tiny", attn_implementation="eager")
    quantized = f"{BASE},fuse-attention,merge-linears,{W8A8}"
    before, _ = pack(spec, pipeline=f"{quantized},dce")
    graph, stats = pack(spec, pipeline=f"{quantized},pack-attention,dce")
    assert (stats["packed"], stats["dynamic_int8"], stats["causal" if name == "gpt2" else "masked"], stats["refused"]) == (2, 2, 2, {})
    assert (count(graph, PACKED_INT8), count(graph, PACKED), count(graph, SDPA)) == (2, 0, 0)
    assert count(graph, LINEAR_INT8) == count(before, LINEAR_INT8) - 2  # the QKV linears, and only those
    # against the unpacked int8 graph (the same quantized weights): tight, on both backends
    unpacked = {backend: fxopt.compile(before, backend) for backend in ("eager", "onnxruntime")}
    packed = {backend: fxopt.compile(graph, backend) for backend in ("eager", "onnxruntime")}
    for example in [spec.example_inputs, *spec.other_inputs]:
        args, kwargs = split_inputs(example)
        for backend in ("eager", "onnxruntime"):
            assert fxopt.compare(unpacked[backend](*args, **kwargs), packed[backend](*args, **kwargs)).within(1e-5), backend
    ops = onnx_ops(assert_parity(spec, graph, tol=0.05, models=packed))  # against the float original: W8A8's error
    assert ops.count(("com.microsoft", "QAttention")) == 2
    assert ("com.microsoft", "MultiHeadAttention") not in ops and ("", "Transpose") not in ops


def test_per_token_int8_projection_is_refused():
    # QAttention takes one activation scale: a per-token projection stays as it is
    spec = built(gpt2, "tiny", attn_implementation="eager")
    graph, stats = pack(spec, pipeline=f"{BASE},fuse-attention,merge-linears,quantize(mode=dynamic,act_granularity=token),pack-attention,dce")
    assert stats["packed"] == 0 and all("per-tensor dynamic int8" in r for r in stats["refused"].values())
    assert count(graph, SDPA) == 2


def test_options_switch_each_form_off():
    graph, stats = pack(built(llama, "tiny", attn_implementation="eager"), pipeline=PIPELINE.replace("pack-attention", "pack-attention(gqa=false)"))
    assert stats["gqa"] == 0 and all("gqa=false" in r for r in stats["refused"].values())
    graph, stats = pack(built(gpt2, "tiny", attn_implementation="eager"), pipeline=PIPELINE.replace("pack-attention", "pack-attention(packed=false)"))
    assert stats["packed"] == 0 and count(graph, SDPA) == 2


# -- the ops ------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_packed_attention_kernel_matches_the_composition(causal):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 5, 16), torch.randn(48, 16), torch.randn(48)
    mask = None if causal else torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    q, k, v = (t.view(2, 5, 4, 4).transpose(1, 2) for t in F.linear(x, w, b).split(16, -1))
    bias = None if mask is None else torch.where(mask[:, None, None, :].bool(), 0.0, -1e9)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal, scale=0.3).transpose(1, 2).reshape(2, 5, 16)
    out = torch.ops.fxopt.packed_attention(x, w, b, mask, 4, causal, 0.3, -1e9)
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="num_heads"):
        torch.ops.fxopt.packed_attention(x, w, b, None, 5, causal, 0.3, -1e9)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_attention_dynamic_int8_kernel_matches_the_composition(causal):
    from fxopt.ir.ops_quant import linear_dynamic_reference

    torch.manual_seed(0)
    x, b = torch.randn(2, 5, 16), torch.randn(48)
    w_q, w_scale = torch.randint(-63, 64, (48, 16), dtype=torch.int8), torch.rand(48) * 0.05 + 0.01
    mask = None if causal else torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    qkv = linear_dynamic_reference(x, w_q, w_scale, b)
    q, k, v = (t.view(2, 5, 4, 4).transpose(1, 2) for t in qkv.split(16, -1))
    bias = None if mask is None else torch.where(mask[:, None, None, :].bool(), 0.0, -1e9)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal, scale=0.3).transpose(1, 2).reshape(2, 5, 16)
    out = torch.ops.fxopt.packed_attention_dynamic_int8(x, w_q, w_scale, b, mask, 4, causal, 0.3, -1e9)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="num_heads"):
        torch.ops.fxopt.packed_attention_dynamic_int8(x, w_q, w_scale, b, None, 5, causal, 0.3, -1e9)


class MaskedFillBlock(torch.nn.Module):
    """Attention with the padding bias written ``zeros.masked_fill(mask == 0, fill)``."""

    def __init__(self, fill: float, heads: int = 2, dim: int = 16):
        super().__init__()
        self.fill, self.heads, self.qkv = fill, heads, torch.nn.Linear(dim, 3 * dim)

    def forward(self, x, attention_mask):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(d, -1))
        bias = torch.zeros(attention_mask.shape, dtype=x.dtype).masked_fill(attention_mask == 0, self.fill)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :]).transpose(1, 2).reshape(b, s, d)


@pytest.mark.parametrize("fill", [-1e9, float("-inf")])
def test_masked_fill_padding_bias_is_a_key_padding_mask(fill):
    torch.manual_seed(0)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    other = torch.tensor([[1] * 9, [1] * 2 + [0] * 7, [0] * 9])  # the last row all padding
    dyn = ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC}, {0: Dim.DYNAMIC, 1: Dim.DYNAMIC})
    spec = ModelSpec(MaskedFillBlock(fill).eval(), (torch.randn(2, 6, 16), mask), dyn, "masked-fill",
                     [(torch.randn(3, 9, 16), other)])
    graph, stats = pack(spec)
    assert (stats["packed"], stats["masked"], count(graph, SDPA)) == (1, 1, 0)
    # all padding: -1e9 spreads attention evenly, -inf gives 0 (torch's SDPA); the kernels follow
    assert [n.args[-1] for n in graph.fx.nodes if n.target == PACKED] == [fill]
    assert_parity(spec, graph)


# -- a decode step against its KV cache -> fxopt.attention_with_past (GroupQueryAttention with past) ----------

WITH_PAST = torch.ops.fxopt.attention_with_past.default


class CachedAttention(torch.nn.Module):
    """One decode step as transformers writes it: the new key/value appended to
    the cache (``cat`` on the sequence dim), repeat_kv, SDPA with a padding
    mask over every position; returns the output and the grown cache. ``merge``:
    how the output's heads are merged ('transpose', 'permute' as BLOOM writes it,
    or 'none': the [B, H, S, D] output returned as it is)."""

    def __init__(self, heads: int = 4, kv_heads: int = 2, head: int = 8, causal: bool = False, merge: str = "transpose"):
        super().__init__()
        self.heads, self.kv_heads, self.head, self.causal, self.merge = heads, kv_heads, head, causal, merge
        self.q = torch.nn.Linear(32, heads * head)
        self.kv = torch.nn.Linear(32, 2 * kv_heads * head)

    def forward(self, x, mask, past_k, past_v):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head).transpose(1, 2)
        k, v = (t.view(b, s, self.kv_heads, self.head).transpose(1, 2) for t in self.kv(x).chunk(2, -1))
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        rep, t = self.heads // self.kv_heads, k.shape[2]
        kr, vr = (c[:, :, None].expand(b, self.kv_heads, rep, t, self.head).reshape(b, self.heads, t, self.head) for c in (k, v))
        out = F.scaled_dot_product_attention(q, kr, vr, attn_mask=None if self.causal else mask[:, None, None, :].bool(),
                                             is_causal=self.causal)
        if self.merge == "none":
            return out, k, v
        out = out.permute(0, 2, 1, 3) if self.merge == "permute" else out.transpose(1, 2)
        return out.reshape(b, s, -1), k, v


def cached_inputs(batch: int, queries: int, past: int, kv_heads: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, past + queries, dtype=torch.long)
    mask[0, :3] = 0  # a left-padded row
    return (torch.randn(batch, queries, 32, generator=g), mask, torch.randn(batch, kv_heads, past, 8, generator=g),
            torch.randn(batch, kv_heads, past, 8, generator=g))


def trace_cached(model, queries: int = 1):
    batch = Dim("batch")
    return fxopt.trace(model.eval(), cached_inputs(2, queries, 6, model.kv_heads),
                       dynamic_shapes=({0: batch}, {0: batch, 1: Dim.AUTO}, {0: batch, 2: Dim.AUTO}, {0: batch, 2: Dim.AUTO}))


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_decode_step_attention_becomes_group_query_attention_with_past(kv_heads):
    torch.manual_seed(0)
    model = CachedAttention(kv_heads=kv_heads)
    graph = trace_cached(model)
    result = PassManager(f"{BASE},fuse-attention,pack-attention,dce", check_numerics=True).run(graph)
    stats = next(r.stats for r in result.records if r.name.startswith("pack-attention"))
    out = result.graph
    assert (stats["cache"], stats["refused"]) == (1, {})
    assert (count(out, WITH_PAST), count(out, SDPA), count(out, aten.cat.default), count(out, aten.expand.default)) == (1, 0, 0, 0)
    assert [n.args[6:8] for n in out.fx.nodes if n.target == WITH_PAST] == [(4, kv_heads)]
    compiled = {backend: fxopt.compile(out, backend) for backend in ("eager", "onnxruntime")}
    ops = onnx_ops(compiled["onnxruntime"])
    assert ops.count(("com.microsoft", "GroupQueryAttention")) == 1 and ("com.microsoft", "MultiHeadAttention") not in ops
    for batch, past in ((2, 6), (3, 11)):  # other batch and cache lengths: dynamic
        inputs = cached_inputs(batch, 1, past, kv_heads, seed=past)
        with torch.no_grad():
            ref = model(*inputs)
        for backend, run in compiled.items():
            assert fxopt.compare(ref, run(*inputs)).within(1e-5), backend


# The op's output replaces SDPA's merged heads, or, when nothing merges them, is viewed back to [B, H, S, D]
# right where SDPA was.
@pytest.mark.parametrize("merge", ["permute", "none"])
def test_decode_step_attention_output_merged_by_a_permute_or_not_at_all(merge):
    torch.manual_seed(0)
    model = CachedAttention(merge=merge)
    result = PassManager(f"{BASE},fuse-attention,pack-attention,dce").run(trace_cached(model))
    stats = next(r.stats for r in result.records if r.name.startswith("pack-attention"))
    assert (stats["cache"], stats["refused"], count(result.graph, aten.permute.default)) == (1, {}, 0)
    inputs = cached_inputs(3, 1, 11, seed=11)
    with torch.no_grad():
        ref = model(*inputs)
    for backend in ("eager", "onnxruntime"):
        assert fxopt.compare(ref, fxopt.compile(result.graph, backend)(*inputs)).within(1e-5), backend


@pytest.mark.parametrize("causal, queries, reason", [(True, 1, "is_causal"), (False, 2, "2 queries")])
def test_cache_attention_refuses_what_the_kernel_would_change(causal, queries, reason):
    # torch aligns is_causal with the first key (one query sees only key 0);
    # GroupQueryAttention with a past takes several queries only at batch 1
    graph = trace_cached(CachedAttention(causal=causal), queries)
    result = PassManager(f"{BASE},fuse-attention,pack-attention,dce").run(graph)
    stats = next(r.stats for r in result.records if r.name.startswith("pack-attention"))
    assert stats["cache"] == 0 and count(result.graph, SDPA) == 1
    assert [reason in r for r in stats["refused"].values()] == [True]
    disabled = PassManager(f"{BASE},fuse-attention,pack-attention(cache=false),dce").run(trace_cached(CachedAttention()))
    assert "cache=false" in str(next(r.stats for r in disabled.records if r.name.startswith("pack-attention"))["refused"])


# -- the rotary embedding of a decode step -> GroupQueryAttention's do_rotary ----------------------------------

class RotaryCachedAttention(CachedAttention):
    """A decode step of a Llama-style attention: q and the new k rotated by
    transformers' ``apply_rotary_pos_emb`` at each row's positions before the
    cache append. ``second_half_scale`` != 1 makes tables whose halves differ
    (not the standard half rotation's ``cat(freqs, freqs)``)."""

    def __init__(self, second_half_scale: float = 1.0, head: int = 16):
        super().__init__(head=head)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, self.head, 2).float() / self.head))
        self.second_half_scale = second_half_scale

    @staticmethod
    def rotate_half(x):
        return torch.cat([-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]], -1)

    def forward(self, x, mask, position_ids, past_k, past_v):
        b, s, _ = x.shape
        freqs = position_ids[:, :, None].float() * self.inv_freq
        emb = torch.cat([freqs, freqs * self.second_half_scale], -1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        q = self.q(x).view(b, s, self.heads, self.head).transpose(1, 2)
        k, v = (t.view(b, s, self.kv_heads, self.head).transpose(1, 2) for t in self.kv(x).chunk(2, -1))
        q, k = (t * cos + self.rotate_half(t) * sin for t in (q, k))
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        rep, t = self.heads // self.kv_heads, k.shape[2]
        kr, vr = (c[:, :, None].expand(b, self.kv_heads, rep, t, self.head).reshape(b, self.heads, t, self.head) for c in (k, v))
        out = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask[:, None, None, :].bool())
        return out.transpose(1, 2).reshape(b, s, -1), k, v


def rotary_inputs(batch: int, past: int, seed: int = 0, head: int = 16):
    x, mask, _, _ = cached_inputs(batch, 1, past, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    past_k, past_v = (torch.randn(batch, 2, past, head, generator=g) for _ in range(2))
    positions = (mask.sum(-1, keepdim=True) - 1)  # each row's real tokens counted from 0 (row 0 is padded)
    return x, mask, positions, past_k, past_v


def trace_rotary(model, bound: int | None = 64):
    batch = Dim("batch")
    graph = fxopt.trace(model.eval(), rotary_inputs(2, 6, head=model.head), dynamic_shapes=(
        {0: batch}, {0: batch, 1: Dim.AUTO}, {0: batch}, {0: batch, 2: Dim.AUTO}, {0: batch, 2: Dim.AUTO}))
    if bound:
        graph.value_bounds["position_ids"] = bound
    return graph


def pack_rotary(graph):
    result = PassManager(f"{BASE},fuse-attention,pack-attention,dce", check_numerics=True).run(graph)
    return result.graph, next(r.stats for r in result.records if r.name.startswith("pack-attention"))


def test_decode_rotary_moves_into_group_query_attention(tmp_path):
    torch.manual_seed(0)
    model = RotaryCachedAttention()
    out, stats = pack_rotary(trace_rotary(model))
    assert (stats["cache"], stats["rotary"], stats["rotary_refused"]) == (1, 1, {})
    # the rotation's ops are gone: the op rotates q and k itself, from tables of 64 positions
    assert all(count(out, op) == 0 for op in (aten.cos.default, aten.sin.default, aten.neg.default, aten.cat.default))
    (node,) = [n for n in out.fx.nodes if n.target == WITH_PAST]
    assert node.args[11].name == "position_ids" and tuple(out.constant(node.args[9]).shape) == (64, 8)
    model_onnx = onnx.load(str(fxopt.export_onnx(out, tmp_path / "m.onnx")))
    (gqa,) = [n for n in model_onnx.graph.node if n.op_type == "GroupQueryAttention"]
    assert {a.name: a.i for a in gqa.attribute if a.name in ("do_rotary", "rotary_interleaved")} == {"do_rotary": 1, "rotary_interleaved": 0}
    assert not {"Sin", "Cos", "Neg"} & {n.op_type for n in model_onnx.graph.node}
    compiled = {backend: fxopt.compile(out, backend) for backend in ("eager", "onnxruntime")}
    for batch, past in ((2, 6), (3, 11)):  # rows at different positions (row 0 left-padded), other sizes
        inputs = rotary_inputs(batch, past, seed=past)
        with torch.no_grad():
            ref = model(*inputs)
        for backend, run in compiled.items():
            assert fxopt.compare(ref, run(*inputs)).within(1e-5), backend
    with pytest.raises(Exception, match="position_ids"):  # a position outside the tables is an input error
        compiled["onnxruntime"](*rotary_inputs(2, 6)[:2], torch.tensor([[64], [3]]), *rotary_inputs(2, 6)[3:])


@pytest.mark.parametrize("model, bound, reason", [
    (RotaryCachedAttention(), None, "no bound on %position_ids"),
    (RotaryCachedAttention(second_half_scale=2.0), 64, "halves differ"),
    (RotaryCachedAttention(head=8), 64, "multiple of 16"),  # what GroupQueryAttention's rotary takes
], ids=["no-bound", "not-half-rotation", "head-8"])
def test_decode_rotary_stays_in_the_graph_when_the_tables_cannot_be_read(model, bound, reason):
    out, stats = pack_rotary(trace_rotary(model, bound))  # check_numerics: the graph still computes the model
    assert (stats["cache"], stats["rotary"]) == (1, 0)
    assert [reason in r for r in stats["rotary_refused"].values()] == [True], stats["rotary_refused"]
    assert count(out, aten.cos.default) == 1 and [len(n.args) for n in out.fx.nodes if n.target == WITH_PAST] == [9]


# -- the rotary embedding of a prompt at fixed positions -> group_query_attention's do_rotary ------------------

class RotaryPromptAttention(torch.nn.Module):
    """A Llama-style prompt attention (4 query heads over 2 KV heads, causal):
    q and k rotated by transformers' ``apply_rotary_pos_emb``. ``positions``:
    ``"counted"`` (``arange`` of the length, as a forward without a positions
    input), ``"input"`` (read from ``position_ids``); ``emit_key`` also
    returns the rotated key (as a prefill returns its cache); ``padded``
    attends through the causal mask and'ed with the ``keep`` padding input."""

    def __init__(self, positions: str = "counted", emit_key: bool = False, padded: bool = False, heads: int = 4,
                 kv_heads: int = 2, head: int = 16):
        super().__init__()
        self.positions, self.emit_key, self.padded = positions, emit_key, padded
        self.heads, self.kv_heads, self.head = heads, kv_heads, head
        self.q = torch.nn.Linear(32, heads * head, bias=False)
        self.kv = torch.nn.Linear(32, 2 * kv_heads * head, bias=False)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head, 2).float() / head))

    def forward(self, x, position_ids, keep):
        b, s, _ = x.shape
        pos = position_ids if self.positions == "input" else torch.arange(s)[None].expand(b, s)
        freqs = pos[:, :, None].float() * self.inv_freq
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        q = self.q(x).view(b, s, self.heads, self.head).transpose(1, 2)
        k, v = (t.view(b, s, self.kv_heads, self.head).transpose(1, 2) for t in self.kv(x).chunk(2, -1))
        q, k = (t * cos + RotaryCachedAttention.rotate_half(t) * sin for t in (q, k))
        rep = self.heads // self.kv_heads
        kr, vr = (c[:, :, None].expand(b, self.kv_heads, rep, s, self.head).reshape(b, self.heads, s, self.head) for c in (k, v))
        if self.padded:
            mask = (torch.arange(s)[None, :] <= torch.arange(s)[:, None]) & keep.bool()[:, None, None, :]
            out = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
        out = out.transpose(1, 2).reshape(b, s, -1)
        return (out, k) if self.emit_key else out


def prompt_inputs(batch=2, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(batch, seq, dtype=torch.long)
    keep[0, :2] = 0  # row 0 left-padded (read only by the padded model)
    return torch.randn(batch, seq, 32, generator=g), torch.arange(seq)[None].expand(batch, seq).contiguous(), keep


def trace_prompt(model, dynamic=False):
    torch.manual_seed(0)
    dims = tuple({0: Dim("batch"), 1: Dim("seq")} for _ in range(3)) if dynamic else None
    graph = fxopt.trace(model.eval(), prompt_inputs(), dynamic_shapes=dims)
    graph.value_bounds["position_ids"] = 64
    return graph


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "causal&padding-mask"])
def test_prompt_rotary_at_counted_positions_moves_into_group_query_attention(tmp_path, padded):
    model = RotaryPromptAttention(padded=padded)
    out, stats = pack_rotary(trace_prompt(model))
    assert (stats["gqa"], stats["rotary"], stats["rotary_refused"], stats["causal_mask"]) == (1, 1, {}, int(padded))
    assert all(count(out, op) == 0 for op in (aten.cos.default, aten.sin.default, aten.neg.default, aten.cat.default))
    (node,) = [n for n in out.fx.nodes if n.target == GQA]
    assert tuple(out.constant(node.args[8]).shape) == (7, 8)  # the rows of positions 0 .. 6, half a head each
    model_onnx = onnx.load(str(fxopt.export_onnx(out, tmp_path / "m.onnx")))
    (gqa,) = [n for n in model_onnx.graph.node if n.op_type == "GroupQueryAttention"]
    assert {a.name: a.i for a in gqa.attribute if a.name in ("do_rotary", "rotary_interleaved")} == {"do_rotary": 1, "rotary_interleaved": 0}
    assert not {"Sin", "Cos", "Neg"} & {n.op_type for n in model_onnx.graph.node}
    for seed in (0, 1):
        inputs = prompt_inputs(seed=seed)
        with torch.no_grad():
            ref = model(*inputs)
        for backend in ("eager", "onnxruntime"):
            assert fxopt.compare(ref, fxopt.compile(out, backend)(*inputs)).within(1e-5), backend


def test_static_llama_prompt_rotation_runs_inside_the_attention_op():
    spec = built(llama, "tiny", attn_implementation="eager")
    graph, stats = pack(spec, dynamic=False)
    assert (stats["gqa"], stats["rotary"], stats["rotary_refused"]) == (2, 2, {})
    assert count(graph, aten.neg.default) == 0
    assert len({n.args[8] for n in graph.fx.nodes if n.target == GQA}) == 1  # one pair of tables for both layers
    ops = onnx_ops(assert_parity(spec, graph, inputs=[spec.example_inputs]))
    assert ops.count(("com.microsoft", "GroupQueryAttention")) == 2 and ("", "Neg") not in ops


@pytest.mark.parametrize("model, dynamic, reason", [
    (RotaryPromptAttention(positions="input"), False, "a prompt rotated at the positions of %position_ids"),
    (RotaryPromptAttention(emit_key=True), False, "read elsewhere"),
    (RotaryPromptAttention(), True, "symbolic length"),
], ids=["positions-input", "key-emitted", "dynamic-length"])
def test_prompt_rotary_stays_in_the_graph_when_the_kernel_would_differ(model, dynamic, reason):
    out, stats = pack_rotary(trace_prompt(model, dynamic))  # check_numerics: the graph still computes the model
    assert (stats["gqa"], stats["rotary"]) == (1, 0)
    assert [reason in r for r in stats["rotary_refused"].values()] == [True], stats["rotary_refused"]
    assert count(out, aten.neg.default) == 2 and [len(n.args) for n in out.fx.nodes if n.target == GQA] == [6]
