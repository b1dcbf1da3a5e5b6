"""Analyses several passes read (fxopt.passes.analyses): the causal-mask and
key-padding-mask proofs and liveness, on small graphs; and their caching by
the pass manager (computed once across the passes of a run, recomputed after
a pass that changes the graph without preserving them)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

import fxopt
from fxopt.ir.nodes import call_args, val
from fxopt.passes import AnalysisManager, Pass, PassError, PassManager, PassResult, register_pass
from fxopt.passes.analyses import CausalMasks, ChannelAnalysis, KeyPaddingMasks, Liveness, NotKeyPadding
from fxopt.passes.padding import RemovePadding
from fxopt.passes.registry import PassRegistry

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def sdpa_mask(graph):
    (node,) = [n for n in graph.fx.nodes if n.target == SDPA]
    q, k, _v, mask = call_args(node)[:4]
    return mask, val(q).shape[0], val(k).shape[2]


def traced(fn, *inputs, dynamic=False):
    class M(torch.nn.Module):
        def forward(self, *xs):
            return fn(*xs)

    dyn = (tuple({0: Dim.DYNAMIC, 2 if x.dim() == 4 else 1: Dim.DYNAMIC} for x in inputs),) if dynamic else None
    return PassManager("canonicalize,dce").run(fxopt.trace(M().eval(), inputs, dynamic_shapes=dyn)).graph


Q = torch.randn(2, 2, 6, 8)
PAD = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])


def causal_tril(q, k, v):
    n = q.shape[-2]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(n, n, dtype=torch.bool).tril())


def causal_arange(q, k, v):  # key position <= query position, from aranges
    n = q.shape[-2]
    pos = torch.arange(n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=pos[None, :] <= pos[:, None])


def given_mask(q, k, v, m):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


@pytest.mark.parametrize("fn", [causal_tril, causal_arange])
def test_a_causal_mask_is_proved_for_every_size(fn):
    graph = traced(fn, Q, Q, Q, dynamic=True)
    mask, _, _ = sdpa_mask(graph)
    assert AnalysisManager().get(CausalMasks, graph).is_causal(mask)


def test_a_mask_read_from_an_input_is_not_causal():
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    graph = traced(given_mask, Q, Q, Q, causal)  # causal values, but an input: nothing to prove
    mask, _, _ = sdpa_mask(graph)
    facts = AnalysisManager().get(CausalMasks, graph)
    assert not facts.is_causal(mask) and not facts.is_constant_causal(mask, 6)


def test_an_off_by_one_mask_is_not_causal():
    def strict(q, k, v):  # key < query: the diagonal blocked too
        pos = torch.arange(q.shape[-2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=pos[None, :] < pos[:, None])

    graph = traced(strict, Q, Q, Q, dynamic=True)
    assert not AnalysisManager().get(CausalMasks, graph).is_causal(sdpa_mask(graph)[0])


def test_a_folded_causal_table_is_a_constant_causal_mask():
    graph = traced(causal_tril, Q, Q, Q)  # static shapes: constant-fold folds the table
    graph = PassManager("constant-fold").run(graph).graph
    mask, _, _ = sdpa_mask(graph)
    assert graph.constant(mask) is not None
    assert AnalysisManager().get(CausalMasks, graph).is_constant_causal(mask, 6)


def padding_where(q, k, v, attention_mask):  # transformers' eager BERT: 0 to attend, a large negative elsewhere
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(attention_mask[:, None, None, :] != 0, 0.0, -1e4))


def padding_bool(q, k, v, attention_mask):  # transformers' SDPA path: True to attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask[:, None, None, :] != 0)


@pytest.mark.parametrize("fn, fill", [(padding_where, -1e4), (padding_bool, -math.inf)])
def test_a_key_padding_mask_is_proved_with_its_source_and_fill(fn, fill):
    graph = traced(fn, Q, Q, Q, PAD, dynamic=True)
    mask, batch, keys = sdpa_mask(graph)
    kp = AnalysisManager().get(KeyPaddingMasks, graph).prove(mask, batch, keys)
    placeholders = [n for n in graph.fx.nodes if n.op == "placeholder"]
    assert kp.source is placeholders[3] and kp.fill == fill  # the fourth input: the [batch, keys] padding mask
    assert val(kp.source).ndim == 2 and val(kp.source).shape[-1] == val(mask).shape[-1]  # [batch, keys]
    assert not kp.sliced


def test_a_float_mask_from_an_input_is_not_key_padding():
    graph = traced(given_mask, Q, Q, Q, torch.randn(2, 1, 6, 6))
    mask, batch, keys = sdpa_mask(graph)
    facts = AnalysisManager().get(KeyPaddingMasks, graph)
    with pytest.raises(NotKeyPadding, match="arbitrary float mask"):
        facts.prove(mask, batch, keys)
    assert not facts.holds(mask, batch, keys)


def test_a_mask_over_queries_is_not_key_padding():
    def per_query(q, k, v, attention_mask):  # the 2-D mask broadcast over keys, not queries
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask[:, None, :, None] != 0)

    graph = traced(per_query, Q, Q, Q, PAD)
    with pytest.raises(NotKeyPadding, match="not a key-padding mask broadcast over heads and queries"):
        AnalysisManager().get(KeyPaddingMasks, graph).prove(*sdpa_mask(graph))


def test_liveness_names_last_users_and_dead_values():
    class M(torch.nn.Module):
        def forward(self, x):
            y = x + 1
            z = y * 2
            return z + y

    graph = fxopt.trace(M().eval(), (torch.randn(3),))
    (x,) = graph.placeholders()
    add1, mul, final = [n for n in graph.fx.nodes if n.op == "call_function" and n.target in (aten.add.Tensor, aten.mul.Tensor)]
    with graph.fx.inserting_after(x):
        dead = graph.fx.call_function(aten.sin.default, (x,))  # a value nothing reads (dce would drop it)
    live = AnalysisManager().get(Liveness, graph)
    assert dead in live.dead and add1 not in live.dead
    assert live.users(x) == {add1}  # the dead sin does not count
    assert live.last_use[add1] is final and live.last_use[mul] is final and live.last_use[final].op == "output"
    assert live.live_after(add1, mul) and not live.live_after(mul, final)


# -- caching: computed once across passes, recomputed after a changing pass ----------------------
REG = PassRegistry()
PROVED = []


@register_pass("prove-masks", registry=REG)
class ProveMasks(Pass):
    """Reads the key-padding analysis for every SDPA mask; changes nothing."""

    def run(self, graph):
        facts = self.analysis(KeyPaddingMasks, graph)
        for node in graph.fx.nodes:
            if node.target == SDPA and call_args(node)[3] is not None:
                q, k, _v, mask = call_args(node)[:4]
                PROVED.append((facts, facts.holds(mask, val(q).shape[0], val(k).shape[2])))
        return PassResult(False)


@register_pass("touch", registry=REG)
class Touch(Pass):
    """Changes the graph (an identity clone of the first input) and preserves nothing."""

    def run(self, graph):
        x = graph.placeholders()[0]
        with graph.fx.inserting_after(x):
            graph.fx.call_function(aten.clone.default, (x,))
        return PassResult(True)


@pytest.fixture(scope="module")
def encoder_graph():
    from fxopt.models import SentenceEmbedder, bert

    model = SentenceEmbedder(bert("tiny").model).eval()
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    inputs = {"input_ids": torch.randint(1, 100, (2, 8)) * mask, "attention_mask": mask}
    dyn = {k: {0: Dim.DYNAMIC, 1: Dim.DYNAMIC} for k in inputs}
    graph = fxopt.trace(model, inputs, dynamic_shapes=dyn)
    return PassManager("canonicalize,dce,constant-fold,cse,fuse-attention").run(graph).graph


def test_mask_proofs_are_computed_once_across_passes(encoder_graph):
    PROVED.clear()
    # remove-padding changes the graph but declares the mask proofs preserved
    result = PassManager([ProveMasks(), RemovePadding(), ProveMasks()], registry=REG).run(encoder_graph)
    assert [r.changed for r in result.records] == [False, True, False]
    assert [ok for _, ok in PROVED] == [True] * 4  # two layers, read twice
    assert PROVED[0][0] is PROVED[-1][0]
    assert result.analyses.computed["KeyPaddingMasks"] == 1
    assert result.analyses.computed["Liveness"] == 1  # read by remove-padding


def test_mask_proofs_are_recomputed_after_a_pass_that_does_not_preserve_them(encoder_graph):
    PROVED.clear()
    result = PassManager([ProveMasks(), Touch(), ProveMasks()], registry=REG).run(encoder_graph)
    assert PROVED[0][0] is not PROVED[-1][0]
    assert result.analyses.computed["KeyPaddingMasks"] == 2


def test_fuse_attention_reads_the_causal_analysis_once_per_run():
    from fxopt.models import gpt2

    spec = gpt2("tiny", attn_implementation="eager")
    graph = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
    result = PassManager("canonicalize,dce,cse,fuse-attention").run(graph)
    stats = next(r.stats for r in result.records if r.name == "fuse-attention")
    assert stats["causal"] + stats["sdpa_made_causal"] == 2  # both layers proved causal
    assert result.analyses.computed["CausalMasks"] == 1


def test_a_pass_called_directly_drops_what_it_does_not_preserve(encoder_graph):
    graph = encoder_graph.copy()
    p = RemovePadding()
    masks, live = p.analysis(KeyPaddingMasks, graph), p.analysis(Liveness, graph)
    assert p(graph).changed
    assert p.analysis(KeyPaddingMasks, graph) is masks  # declared preserved
    assert p.analysis(Liveness, graph) is not live  # dropped: the graph changed
    t = Touch()
    live = t.analysis(Liveness, graph)
    t(graph)
    assert t.analysis(Liveness, graph) is not live


# -- attention heads (ChannelAnalysis) ----------------------------------------------------

class HeadAttention(torch.nn.Module):
    """Four heads of 8 over a 32-wide stream; ``kv_heads`` < 4 repeats keys and
    values as Llama's repeat_kv does. ``form``: 'sdpa', 'eager', 'per-head-bias'
    (scores plus a constant per head, as ALiBi), 'position-bias' (scores plus a bias per
    head and position pair computed from the sequence length, as T5's relative bias), 'leak' (the queries are an output
    too), 'cache' (keys and values concatenated with one cache read from an input),
    'kv-cache' (a decode step: keys and values each concatenated with their own cache input, and returned),
    'head-norm' (q and k normalized per head, as Qwen3's q_norm / k_norm), 'clamped' (eager scores
    through ``max`` with the dtype's lowest value, as XGLM), 'soft-cap' (eager scores
    through ``c * tanh(s / c)``, as Gemma 2), 'interleaved-rotary' (GPT-J's rotate_every_two: a stack
    and a view within each head), 'width-norm' (q normalized over all heads together, as OLMo2's
    q_norm), 'cross-head-norm' (over the heads axis and each head's channels), 'per-head-qkv'
    (GPT-NeoX's layout: one projection holding each head's q, k and v together, a block of 24 rows
    per head, split after the view into heads), 'overlapping-qkv' (that layout with q and k
    reading overlapping channels of each block), 'split-heads' (Falcon's multi-query layout: one
    projection viewed as 6 heads, split along the heads into 4 query heads, one key and one value
    head), 'split-counted-heads' (that, with the view spelling out the 6) and 'grouped-qkv'
    (InternLM2's and Falcon-40B's layout: a block of 32 rows per KV group holding its 2 query
    heads, its key head and its value head, viewed as [B, S, 2, 4, 8]) and 'folded-heads' (BLOOM's
    layout and attention: one projection viewed as [B, S, 4, 3, 8], q, k and v selected from each
    head's three slots, the heads folded into the batch for ``baddbmm`` with an ALiBi bias of
    [B * 4, 1, S], a softmax between a fold and its unfold as XGLM writes it, and ``bmm``)."""

    def __init__(self, kv_heads=4, form="sdpa"):
        super().__init__()
        self.kv, self.form = kv_heads, form
        self.q = torch.nn.Linear(32, 32)
        self.k = torch.nn.Linear(32, 8 * kv_heads)
        self.v = torch.nn.Linear(32, 8 * kv_heads)
        self.o = torch.nn.Linear(32, 32)
        self.register_buffer("slopes", torch.arange(1.0, 5.0).view(4, 1, 1))
        if form in ("per-head-qkv", "overlapping-qkv", "folded-heads"):
            self.qkv = torch.nn.Linear(32, 96)
        if form in ("split-heads", "split-counted-heads"):
            self.qkv = torch.nn.Linear(32, 48)
        if form == "grouped-qkv":
            self.qkv = torch.nn.Linear(32, 64)

    def forward(self, x, cache=None, past_v=None):
        b, s, _ = x.shape
        if self.form in ("per-head-qkv", "overlapping-qkv"):
            blocks = self.qkv(x).view(b, s, 4, 24).transpose(1, 2)
            if self.form == "per-head-qkv":
                q, k, v = blocks.split(8, -1)
            else:
                q, k, v = blocks[..., 0:8], blocks[..., 4:12], blocks[..., 16:24]
        elif self.form == "folded-heads":
            slots = self.qkv(x).view(b, s, 4, 3, 8)
            q, k, v = (slots[..., i, :].transpose(1, 2).reshape(b * 4, s, 8) for i in range(3))
            alibi = (self.slopes * torch.arange(s)).repeat(b, 1, 1)  # [B * 4, 1, S]
            scores = torch.baddbmm(alibi, q, k.transpose(-1, -2), beta=1.0, alpha=8**-0.5).view(b, 4, s, s)
            probs = torch.softmax(scores.view(b * 4, s, s), -1).view(b, 4, s, s)
            out = torch.bmm(probs.view(b * 4, s, s), v).view(b, 4, s, 8)
            return self.o(out.permute(0, 2, 1, 3).reshape(b, s, 32))
        elif self.form == "grouped-qkv":
            groups = self.qkv(x).view(b, s, 2, 4, 8)
            q = groups[:, :, :, :2].reshape(b, s, 4, 8).transpose(1, 2)
            k, v = (groups[:, :, :, i].transpose(1, 2) for i in (2, 3))
            k, v = (t[:, :, None].expand(b, 2, 2, s, 8).reshape(b, 4, s, 8) for t in (k, v))
        elif self.form in ("split-heads", "split-counted-heads"):
            heads = self.qkv(x).view(b, s, -1 if self.form == "split-heads" else 6, 8)
            q, k, v = (t.transpose(1, 2) for t in heads.split([4, 1, 1], dim=2))
            k, v = (t[:, :, None].expand(b, 1, 4, s, 8).reshape(b, 4, s, 8) for t in (k, v))
        else:
            q = self.q(x)
            if self.form == "width-norm":
                q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)
            q = q.view(b, s, -1, 8).transpose(1, 2)
            k = self.k(x).view(b, s, self.kv, 8).transpose(1, 2)
            v = self.v(x).view(b, s, -1, 8).transpose(1, 2)
        if self.form == "cache":
            k = torch.cat([cache, k], dim=2)
            v = torch.cat([cache, v], dim=2)
        if self.form == "kv-cache":
            k = torch.cat([cache, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
            present = (k, v)
        if self.form in ("head-norm", "cross-head-norm"):
            dims = (-1,) if self.form == "head-norm" else (1, -1)  # [B, H, S, D]: channels, or heads and channels
            q = q * torch.rsqrt(q.pow(2).mean(dims, keepdim=True) + 1e-6)
            k = k * torch.rsqrt(k.pow(2).mean(dims, keepdim=True) + 1e-6)
        if self.form == "interleaved-rotary":
            def every_two(t):  # [B, H, S, 8]: pairs (x0, x1) -> (-x1, x0) within each head
                return torch.stack((-t[..., 1::2], t[..., ::2]), -1).reshape(t.shape)
            q, k = q * 0.5 + every_two(q) * 0.25, k * 0.5 + every_two(k) * 0.25
        if self.kv != 4:
            k = k[:, :, None].expand(b, self.kv, 4 // self.kv, -1, 8).reshape(b, 4, -1, 8)
            v = v[:, :, None].expand(b, self.kv, 4 // self.kv, -1, 8).reshape(b, 4, -1, 8)
        if self.form not in ("eager", "per-head-bias", "position-bias", "soft-cap", "clamped"):
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(8)
            if self.form == "per-head-bias":
                scores = scores + self.slopes
            if self.form == "position-bias":
                distance = (torch.arange(s)[None, :] - torch.arange(s)[:, None]).float()
                scores = scores + self.slopes * distance  # [4, S, S]
            if self.form == "clamped":  # XGLM: the scores kept above the dtype's lowest value
                scores = torch.max(scores, torch.tensor(torch.finfo(scores.dtype).min))
            if self.form == "soft-cap":
                scores = torch.tanh(scores / 2.0) * 2.0
            out = torch.softmax(scores, -1) @ v
        out = self.o(out.transpose(1, 2).reshape(b, s, 32))
        if self.form == "kv-cache":
            return (out, *present)
        return (out, q) if self.form == "leak" else out


def head_analysis(module, *inputs):
    graph = PassManager("canonicalize,dce").run(fxopt.trace(module.eval(), inputs)).graph
    return graph, AnalysisManager().get(ChannelAnalysis, graph)


X = torch.randn(2, 5, 32)


def shrink_exactly(module, columns):
    """With the output projection's ``columns`` zero, ``shrink(heads=0.5)`` removes
    the two heads that read them and the output stays the model's on both
    backends. Returns the graph before and after."""
    with torch.no_grad():
        module.o.weight[:, columns] = 0.0
    graph = PassManager("canonicalize,dce").run(fxopt.trace(module, (X,))).graph
    shrunk = PassManager("shrink(ratio=0,heads=0.5)").run(graph)
    assert shrunk.records[0].stats["heads_removed"] == 2
    want = module(X)
    for backend in ("eager", "onnxruntime"):
        assert fxopt.compare(want, fxopt.compile(shrunk.graph, backend)(X)).within(1e-5), backend
    return graph, shrunk.graph


@pytest.mark.parametrize("form", ["sdpa", "eager"])
def test_heads_are_followed_from_the_projections_through_attention_to_the_output_projection(form):
    graph, deps = head_analysis(HeadAttention(kv_heads=2, form=form), X)
    (heads,) = deps.attentions
    assert heads.refused is None, heads.refused
    linears = {n.args[1].target: n for n in graph.fx.nodes if n.target == aten.linear.default}
    assert (heads.q.producer, heads.k.producer, heads.v.producer) == (linears["q.weight"], linears["k.weight"], linears["v.weight"])
    assert (heads.q.size, heads.k.size, heads.v.size) == (32, 16, 16)
    assert (heads.num_heads, heads.num_kv_heads, heads.group, heads.head_dim, heads.v_head_dim) == (4, 2, 2, 8, 8)
    assert heads.consumers == [linears["o.weight"]]
    # KV group 1 = key/value head 1 with query heads 2 and 3
    assert heads.query_heads([1]) == [2, 3]
    assert heads.q_rows([1]).tolist() == list(range(16, 32)) and heads.k_rows([1]).tolist() == list(range(8, 16))
    assert heads.columns([0]).tolist() == list(range(16))
    # the literal head counts to rewrite (kind, factor, value): k's view and repeat_kv's two expands
    # (2 KV heads), repeat_kv's two merges (2 KV heads x 2 repeats) and the output's merge (4 heads x 8)
    edits = sorted((e.kind, e.factor, e.node.args[1][e.index]) for e in heads.shape_edits)
    assert edits == [("kv", 1, 2)] * 3 + [("kv", 2, 4)] * 2 + [("q", 8, 32)]
    assert not any(k.startswith(("q[", "k[", "v[")) for k in deps.refused())


# Ops within each head: a per-head norm, a clamp or a soft cap of the scores, a rotation of each head's
# channel pairs, a bias of the scores per head (a constant, or computed: its kept heads are
# selected). Removing a key/value group whose output columns are zero changes nothing.
@pytest.mark.parametrize("form", ["head-norm", "clamped", "soft-cap", "interleaved-rotary", "per-head-bias",
                                  "position-bias"])
def test_heads_are_followed_through_ops_within_each_head(form):
    module = HeadAttention(kv_heads=2, form=form).eval()
    graph, deps = head_analysis(module, X)
    (heads,) = deps.attentions
    assert heads.refused is None, heads.refused
    assert (heads.num_heads, heads.num_kv_heads, heads.q.size, heads.k.size) == (4, 2, 32, 16)
    # the bias of the [B, 4, S, S] scores: [4, 1, 1] or [4, S, S], one value per query head along axis 0
    assert [(op.axis, op.kind) for op in heads.head_operands] == ([(0, "q")] if "bias" in form else [])
    _, shrunk = shrink_exactly(module, slice(16, 32))  # KV group 1: query heads 2 and 3
    selects = [n for n in shrunk.fx.nodes if n.target == aten.index_select.default]
    assert len(selects) == (form == "position-bias")  # a constant bias is cut at once


# GPT-NeoX's QKV projection holds each head's q, k and v together: head h owns rows
# 24h .. 24h + 23, of which q reads the first 8, k the next 8 and v the last 8. Removing
# a head removes its whole block; with the output columns of heads 1 and 3 zero,
# shrinking half the heads changes nothing.
def test_heads_whose_q_k_v_share_one_block_per_head():
    module = HeadAttention(form="per-head-qkv").eval()
    graph, deps = head_analysis(module, X)
    (heads,) = deps.attentions
    assert heads.refused is None, heads.refused
    assert heads.q.producer is heads.k.producer is heads.v.producer
    assert [(b.offset, b.size, b.stride, b.channels) for b in (heads.q, heads.k, heads.v)] == [
        (0, 96, 24, tuple(range(0, 8))), (0, 96, 24, tuple(range(8, 16))), (0, 96, 24, tuple(range(16, 24)))]
    assert (heads.num_heads, heads.num_kv_heads, heads.head_dim) == (4, 4, 8)
    assert heads.q_rows([1]).tolist() == list(range(24, 32)) and heads.v_rows([1]).tolist() == list(range(40, 48))
    assert heads.q.rows([1]).tolist() == list(range(24, 48))  # what removing head 1 removes
    assert heads.name not in deps.refused() and not any(k.startswith("qkv[") for k in deps.refused())
    _, shrunk = shrink_exactly(module, [*range(8, 16), *range(24, 32)])  # heads 1 and 3
    (linear,) = [n for n in shrunk.fx.nodes if n.target == aten.linear.default and n.args[1].target.startswith("qkv")]
    torch.testing.assert_close(shrunk.constant(linear.args[1]), torch.cat([module.qkv.weight[:24], module.qkv.weight[48:72]]))


# InternLM2's and Falcon-40B's layout: each KV group's block of 32 rows holds its two query
# heads (rows 0-15), its key head (16-23) and its value head (24-31). Removing a group removes
# its block; with the output columns of group 1 (query heads 2 and 3) zero, nothing changes.
def test_heads_grouped_in_one_block_per_key_value_group():
    module = HeadAttention(form="grouped-qkv").eval()
    graph, deps = head_analysis(module, X)
    (heads,) = deps.attentions
    assert heads.refused is None, heads.refused
    assert (heads.num_heads, heads.num_kv_heads, heads.head_dim) == (4, 2, 8)
    assert [(b.offset, b.size, b.stride, b.slots, b.channels) for b in (heads.q, heads.k, heads.v)] == [
        (0, 64, 32, (0, 8), tuple(range(8))), (0, 64, 32, (0,), tuple(range(16, 24))),
        (0, 64, 32, (0,), tuple(range(24, 32)))]
    assert heads.q_rows([1]).tolist() == list(range(32, 48)) and heads.k_rows([1]).tolist() == list(range(48, 56))
    assert heads.q.rows([2, 3]).tolist() == list(range(32, 64))
    graph, _ = shrink_exactly(module, slice(16, 32))  # group 1: query heads 2 and 3
    # four ranks would cut the two groups' blocks apart
    with pytest.raises(PassError, match="does not divide the 2 key/value groups"):
        PassManager("tensor-parallel(world_size=4,rank=0)").run(graph)


# BLOOM's attention: canonicalize unfolds the [B * 4, S, D] bmm / baddbmm into 4-D matmuls,
# its ALiBi bias becomes a computed per-head operand of the scores, and q, k and v are the
# three slots of each head's block of 24 rows. With heads 1 and 3 unread, shrinking half the
# heads keeps the output, the bias read for the kept heads.
def test_heads_folded_into_the_batch():
    module = HeadAttention(form="folded-heads").eval()
    graph, deps = head_analysis(module, X)
    assert not {aten.bmm.default, aten.baddbmm.default} & {n.target for n in graph.fx.nodes}
    (heads,) = deps.attentions
    assert heads.refused is None, heads.refused
    assert heads.q.producer is heads.k.producer is heads.v.producer
    assert (heads.num_heads, heads.num_kv_heads, heads.head_dim) == (4, 4, 8)
    assert heads.q.rows([1]).tolist() == list(range(24, 48))
    assert [(op.axis, op.kind) for op in heads.head_operands] == [(1, "q")]
    _, shrunk = shrink_exactly(module, [*range(8, 16), *range(24, 32)])  # heads 1 and 3
    assert any(n.target == aten.index_select.default for n in shrunk.fx.nodes)  # the computed bias's kept heads


# Reading shapes must not guard on them: with 4 positions traced, GPT-J's pairs view
# [B, H, S, 4, 2] -> [B, H, S, 8] once compared S with 4 and pinned the sequence to 4
# for every later pass and the export.
def test_the_head_walk_leaves_dynamic_dimensions_dynamic():
    from torch.export import Dim

    x = torch.randn(2, 4, 32)
    graph = fxopt.trace(HeadAttention(kv_heads=2, form="interleaved-rotary").eval(), (x,),
                        dynamic_shapes={"x": {0: Dim("batch", max=64), 1: Dim("seq", max=64)}})
    graph = PassManager("canonicalize,dce").run(graph).graph
    (heads,) = AnalysisManager().get(ChannelAnalysis, graph).attentions
    assert heads.refused is None, heads.refused
    sizes = [graph.placeholders()[0].meta["val"].shape[d] for d in (0, 1)]
    assert all(isinstance(s, torch.SymInt) for s in sizes) and str(sizes[1].node.expr) != "4", sizes
    shrunk = PassManager("shrink(ratio=0,heads=0.5)").run(graph).graph
    assert isinstance(shrunk.placeholders()[0].meta["val"].shape[1], torch.SymInt)


def test_merged_qkv_gives_three_spans_of_one_projection():
    deps = AnalysisManager().get(ChannelAnalysis, _gpt2_tiny())
    heads = deps.attentions[0]
    assert heads.refused is None
    assert heads.q.producer is heads.k.producer is heads.v.producer
    assert [(s.offset, s.size) for s in (heads.q, heads.k, heads.v)] == [(0, 64), (64, 64), (128, 64)]
    assert (heads.num_heads, heads.num_kv_heads, heads.head_dim) == (4, 4, 16)


# Multi-query attention as Falcon writes it: the 6 heads of one projection split along the
# heads into 4 query heads and one key and one value head, the split's sizes counting them.
def test_heads_split_along_the_head_axis():
    graph, deps = head_analysis(HeadAttention(form="split-heads"), X)
    (heads,) = deps.attentions
    assert heads.refused is None, heads.refused
    assert (heads.num_heads, heads.num_kv_heads, heads.head_dim) == (4, 1, 8)
    assert [(b.offset, b.size, b.stride) for b in (heads.q, heads.k, heads.v)] == [(0, 32, 8), (32, 8, 8), (40, 8, 8)]
    split = next(n for n in graph.fx.nodes if n.target == aten.split_with_sizes.default)
    assert sorted((e.index, e.kind) for e in heads.shape_edits if e.node is split) == [(0, "q"), (1, "kv"), (2, "kv")]
    _, deps = head_analysis(HeadAttention(form="split-counted-heads"), X)
    (heads,) = deps.attentions
    assert heads.refused.startswith("node 'split_with_sizes'") and "left to the view (-1)" in heads.refused, heads.refused


# Multi-query attention as GPT-BigCode writes it: [B, S, 96] -> [B, 1, S, 96] split into
# 64 query channels (4 heads) and one key and one value head of 16.
def test_one_key_value_head_cut_after_the_queries():
    import transformers

    cfg = transformers.GPTBigCodeConfig(n_embd=64, n_layer=1, n_head=4, vocab_size=64, n_positions=32, use_cache=False)
    graph, deps = head_analysis(transformers.GPTBigCodeModel(cfg).eval(), torch.randint(0, 64, (2, 5)))
    (heads,) = deps.attentions
    assert heads.refused is None, heads.refused
    assert (heads.num_heads, heads.num_kv_heads, heads.head_dim) == (4, 1, 16)
    assert [(b.offset, b.size, b.stride) for b in (heads.q, heads.k, heads.v)] == [(0, 64, 16), (64, 16, 16), (80, 16, 16)]
    assert heads.k.producer is heads.q.producer


# DeepSeek's latent attention: q from q_b_proj (4 heads of 16); k and v from one block of
# 24 rows per head of kv_b_proj (k's 8 channels, v's 16), k's other 8 channels a rotary part
# every head shares (an expand of one head), the two written into an empty buffer.
def test_latent_attention_heads_and_a_key_part_every_head_shares():
    import transformers

    cfg = transformers.DeepseekV3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=4, vocab_size=64, kv_lora_rank=16, q_lora_rank=32,
                                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
                                        use_cache=False)
    graph, deps = head_analysis(transformers.DeepseekV3Model(cfg).eval(), torch.randint(0, 64, (2, 5)))
    (heads,) = deps.attentions
    assert heads.refused is None, heads.refused
    weights = [b.producer.args[1].target for b in (heads.q, heads.k, heads.v)]
    assert weights == ["layers.0.self_attn.q_b_proj.weight"] + ["layers.0.self_attn.kv_b_proj.weight"] * 2
    assert [(b.size, b.stride, b.channels) for b in (heads.q, heads.k, heads.v)] == [
        (64, 16, tuple(range(16))), (96, 24, tuple(range(8))), (96, 24, tuple(range(8, 24)))]
    assert (heads.num_heads, heads.num_kv_heads, heads.head_dim, heads.v_head_dim) == (4, 4, 16, 16)


def _gpt2_tiny():
    from conftest import base_graph

    return base_graph("gpt2-tiny")  # Conv1D c_attn, split in three


@pytest.mark.parametrize("form, node, why", [
    ("leak", "output", "from outside the attention"),
    ("cache", "cat", "besides its concatenation"),  # one input for keys and values
    ("cross-head-norm", "mul", "does not carry the heads along axis 1"),  # the norm over heads is one value for all
    ("width-norm", "mul", "cannot follow a projection's channels into heads"),  # before the view into heads
    ("overlapping-qkv", "scaled_dot_product_attention", "read the same rows of one projection"),
])
def test_heads_the_analysis_cannot_prove_are_refused_with_the_node(form, node, why):
    inputs = (X, torch.randn(2, 4, 3, 8)) if form == "cache" else (X,)
    _, deps = head_analysis(HeadAttention(form=form), *inputs)
    (heads,) = deps.attentions
    assert heads.refused is not None and f"node '{node}" in heads.refused and why in heads.refused, heads.refused
    assert deps.shrinkable_attentions() == [] and deps.refused()[heads.name] == heads.refused


# A decode step's cache: the inputs concatenated with the new keys and values,
# and the outputs returning them, carry the KV heads along axis 1. The heads
# can be split among ranks with the cache, not removed (that changes the inputs).
def test_a_key_value_cache_goes_with_the_heads():
    past = torch.randn(2, 2, 3, 8)
    graph, deps = head_analysis(HeadAttention(kv_heads=2, form="kv-cache"), X, past, past.clone())
    (heads,) = deps.attentions
    assert heads.refused is None, heads.refused
    assert (heads.num_heads, heads.num_kv_heads) == (4, 2)
    assert [(c.node.name, c.axis, c.kind) for c in heads.cache_inputs] == [("cache", 1, "kv"), ("past_v", 1, "kv")]
    returned = list(next(n for n in graph.fx.nodes if n.op == "output").args[0][1:])
    assert [c.node for c in heads.cache_outputs] == returned and all(c.axis == 1 for c in heads.cache_outputs)
    assert deps.splittable_attentions() == [heads] and deps.shrinkable_attentions() == []
    assert "key/value cache (cache, past_v, output cat, output cat_1)" in deps.refused()[heads.name]
    assert heads.name not in deps.refused(cache=True)


def test_fused_attention_ops_are_refused_with_the_node():
    from conftest import base_graph

    fused = PassManager("fuse-attention,pack-attention").run(base_graph("llama-tiny")).graph
    deps = AnalysisManager().get(ChannelAnalysis, fused)
    assert len(deps.attentions) == 2 and deps.shrinkable_attentions() == []
    assert all(a.refused.startswith(f"node '{a.node.name}'") and "fused attention op" in a.refused for a in deps.attentions)


# No pass may pin a dynamic dimension to the traced example's size: a comparison of two
# sizes that happen to be equal there adds a replacement to the graph's shape environment,
# and every later pass and the export then take the dimension as that constant.
def test_passes_leave_a_decoders_dynamic_dimensions_unpinned():
    import transformers

    from fxopt.ir.decoder import trace_decoder
    from fxopt.ir.meta import fake_mode_of

    torch.manual_seed(0)
    cfg = transformers.CohereConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                                    bos_token_id=None, eos_token_id=None, pad_token_id=None)
    graphs = trace_decoder(transformers.CohereForCausalLM(cfg).eval())  # rotary on interleaved pairs: a [.., 8, 2] view
    base = "canonicalize,dce,constant-fold,cse"
    for kind in ("prefill", "decode"):
        graph = getattr(graphs, kind)
        env = fake_mode_of(graph).shape_env
        before = dict(env.replacements)

        def dynamic(g):  # which input dimensions are symbolic
            return [[isinstance(d, torch.SymInt) for d in p.meta["val"].shape] for p in g.placeholders()]

        for pipeline in (f"{base},fuse-attention,merge-linears,quantize(mode=dynamic),pack-attention,fuse-linear-act,fuse-norm",
                         f"{base},tensor-parallel(world_size=2,rank=1)", f"{base},shrink(ratio=0.25,heads=0.5)"):
            result = PassManager(pipeline).run(graph)
            out = result.graph
            stats = result.records[-1].stats
            if "tensor-parallel" in pipeline:  # the attention was split, not left whole
                assert "attention" in stats["split"].values(), stats["unpaired"]
            if "shrink" in pipeline:  # the MLP (heads with a cache output stay: they are the graph's interface)
                assert stats["groups_shrunk"] > 0, stats["refused"]
            assert fake_mode_of(out).shape_env is env
            assert env.replacements == before, (kind, pipeline, {k: v for k, v in env.replacements.items() if k not in before})
            assert dynamic(out) == dynamic(graph), (kind, pipeline)
