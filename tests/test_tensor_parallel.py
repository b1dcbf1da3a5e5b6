"""tensor-parallel: each rank's graph, run in its own process under
torch.distributed (gloo on CPU), gives the whole model's logits.

The rank graphs are built once in the test process; the ranks are forked
from it, so they start with the graphs in memory and only communicate."""

import functools
import multiprocessing
import os
import tempfile
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

import fxopt
from fxopt.ir.collectives import ALL_GATHER, ALL_REDUCE, WAIT
from fxopt.models import hf_spec
from fxopt.parallel import ProcessGroupError, all_reduce_count, compile_tensor_parallel, tensor_parallel_graphs
from conftest import model_spec, once_per_run, reference, run, trace_once
from structural import assert_structurally_equal, graph_of

transformers = pytest.importorskip("transformers")


def _rank_main(rank: int, n: int, store: str, cases: dict, queue) -> None:
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=n)
        try:
            out = {}
            for name, (graphs, inputs) in cases.items():
                # a whole graph: split here for this process's rank, as a script under torchrun does
                model = compile_tensor_parallel(graphs) if isinstance(graphs, fxopt.Graph) else fxopt.compile(graphs[rank], "eager")
                out[name] = tree_leaves(run(model, inputs))[0].numpy()
            queue.put((rank, out))
        finally:
            torch.distributed.destroy_process_group()
    except BaseException:
        queue.put((rank, traceback.format_exc()))


def run_ranks(n: int, cases: dict, timeout: float = 120) -> dict:
    """Run ``cases`` (name -> (rank graphs, inputs)) on ``n`` forked ranks;
    returns name -> each rank's first output."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank_main, args=(r, n, os.path.join(tmp, "store"), cases, queue)) for r in range(n)]
        for p in procs:
            p.start()
        try:
            results = dict(queue.get(timeout=timeout) for _ in procs)
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    failed = {r: v for r, v in results.items() if isinstance(v, str)}
    assert not failed, "\n".join(f"rank {r}:\n{v}" for r, v in failed.items())
    return {name: [torch.from_numpy(results[r][name]) for r in range(n)] for name in cases}


def _hf(config: str, model: str, name: str, *, mask: bool = True, max_len: int = 128, **cfg):
    """A tiny Hugging Face model with random weights, no cache and no special tokens."""
    c = getattr(transformers, config)(use_cache=False, pad_token_id=None, bos_token_id=None, eos_token_id=None, **cfg)
    return hf_spec(getattr(transformers, model)(c), 256, name, mask=mask, max_len=max_len)


DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
               max_position_embeddings=128)


def phi3():
    return _hf("Phi3Config", "Phi3ForCausalLM", "phi3", mask=False, num_key_value_heads=4, **DECODER)


def gemma():
    return _hf("GemmaConfig", "GemmaForCausalLM", "gemma", mask=False, num_key_value_heads=1, head_dim=16, **DECODER)


def qwen3():
    """Qwen3: q_norm / k_norm over each head's channels."""
    return _hf("Qwen3Config", "Qwen3ForCausalLM", "qwen3", num_key_value_heads=2, head_dim=16, **DECODER)


def gemma2():
    """Gemma 2: eager attention whose scores go through a tanh soft cap."""
    return _hf("Gemma2Config", "Gemma2ForCausalLM", "gemma2", num_key_value_heads=2, head_dim=16, sliding_window=16, **DECODER)


def gptj():
    """GPT-J: rotary on interleaved channel pairs (a stack and a view within each head)."""
    return _hf("GPTJConfig", "GPTJForCausalLM", "gptj", n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128,
               rotary_dim=8)


def gpt_neox():
    """GPT-NeoX: one QKV projection laid out head by head (each head's q, k, v rows together), partial rotary."""
    return _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", "gpt-neox", rotary_pct=0.25, **DECODER)


def gpt_bigcode():
    """GPT-BigCode: multi-query attention, one key/value head cut from the QKV projection after the queries."""
    return _hf("GPTBigCodeConfig", "GPTBigCodeForCausalLM", "gpt-bigcode", max_len=64, n_embd=64, n_layer=2, n_head=4,
               vocab_size=256, n_positions=128)


def falcon():
    """Falcon (7B's layout): [B, S, H + 2, D] split along the heads into the queries, one key and one value head."""
    return _hf("FalconConfig", "FalconForCausalLM", "falcon", max_len=64, hidden_size=64, num_hidden_layers=2,
               num_attention_heads=4, vocab_size=256)


def deepseek_v3():
    """DeepSeek-V3: latent attention (heads from a low-rank projection; a rotary key part shared by every head,
    written with the heads' part into one buffer), and a mixture of experts after a dense first layer."""
    return _hf("DeepseekV3Config", "DeepseekV3ForCausalLM", "deepseek-v3", mask=False, moe_intermediate_size=32,
               n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
               n_shared_experts=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
               v_head_dim=16, num_key_value_heads=4, **DECODER)


def falcon_grouped():
    """Falcon (40B's layout): a block of rows per KV group holding its query heads, its key and its value head."""
    return _hf("FalconConfig", "FalconForCausalLM", "falcon-grouped", max_len=64, hidden_size=64, num_hidden_layers=2,
               num_attention_heads=4, vocab_size=256, new_decoder_architecture=True, num_kv_heads=2)


def bloom():
    """BLOOM: each head's q, k and v slots in one projection, the heads folded into the batch for
    ``baddbmm`` / ``bmm`` (canonicalize unfolds them), an ALiBi bias computed from the mask."""
    return _hf("BloomConfig", "BloomForCausalLM", "bloom", hidden_size=64, n_layer=2, n_head=4, vocab_size=256,
               attn_implementation="eager")


def mpt():
    """MPT: ALiBi, a bias of the scores per head (each rank keeps its heads' slopes)."""
    return _hf("MptConfig", "MptForCausalLM", "mpt", max_len=64, d_model=64, n_heads=4, n_layers=2, vocab_size=256,
               max_seq_len=128)


def t5_encoder():
    """T5's encoder: a relative position bias per head, computed once from an embedding table and read by every layer."""
    return _hf("T5Config", "T5EncoderModel", "t5-encoder", d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
               vocab_size=256)


def gpt2_odd_vocabulary():
    """GPT-2's own vocabulary (50257) is odd, as this one is: no world size divides it."""
    return fxopt.models.gpt2("tiny", vocab_size=255)


# A built-in model's name, or a factory of a ModelSpec.
MODELS = {"gpt2": "gpt2-tiny", "llama": "llama-tiny", "phi3": phi3, "gemma": gemma, "qwen3": qwen3, "gemma2": gemma2,
          "gptj": gptj, "gpt-neox": gpt_neox, "gpt-bigcode": gpt_bigcode, "falcon": falcon,
          "falcon-grouped": falcon_grouped,
          "mpt": mpt, "bloom": bloom, "deepseek-v3": deepseek_v3}
ENCODERS = {"bert": "bert-tiny", "t5-encoder": t5_encoder}
ODD = {"gpt2-odd-vocabulary": gpt2_odd_vocabulary}  # no LM head: the hidden states are the output


@functools.lru_cache(maxsize=None)
def spec_and_graph(name: str):
    source = {**MODELS, **ENCODERS, **ODD}[name]
    if isinstance(source, str):  # traced once per test process, shared with other files' tests
        spec = model_spec(source)
        graph = trace_once(spec, graph_name=name)
    else:
        torch.manual_seed(0)
        spec = source()
        graph = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, name=name)
    return spec, fxopt.PassManager("canonicalize,dce").run(graph).graph


@functools.lru_cache(maxsize=None)
def split(name: str, n: int):
    return tensor_parallel_graphs(spec_and_graph(name)[1], n)


# Split first, then the fusions and 8-bit quantization in groups of 32 input
# channels, which lie inside one rank's shard (the down projection keeps 64 of 128).
AFTER_SPLIT = "fuse-attention,merge-linears,quantize(granularity=group,group_size=32),fuse-linear-act,fuse-norm,dce"


@functools.lru_cache(maxsize=None)
def cases(n: int) -> dict:
    names = (*MODELS, *ENCODERS) if n == 2 else ("gpt2", "llama")
    out = {name: (split(name, n), spec_and_graph(name)[0].example_inputs) for name in names}
    if n == 2:
        spec, graph = spec_and_graph("llama")
        out["llama-quantized"] = (tensor_parallel_graphs(graph, 2, pipeline=AFTER_SPLIT), spec.example_inputs)
        out["gemma-vocab-embeddings"] = (tensor_parallel_graphs(spec_and_graph("gemma")[1], 2, embeddings="vocab"),
                                         spec_and_graph("gemma")[0].example_inputs)
        out["gpt2-whole"] = spec_and_graph("gpt2")[1], spec_and_graph("gpt2")[0].example_inputs
        spec, graph = spec_and_graph("gpt2-odd-vocabulary")
        out["gpt2-odd-vocabulary"] = tensor_parallel_graphs(graph, 2, embeddings="vocab"), spec.example_inputs
    return out


@functools.lru_cache(maxsize=None)
def logits(n: int) -> dict:
    """Every case of ``n`` ranks, run in one group of ``n`` forked processes,
    once per test run."""
    return once_per_run(f"tensor-parallel-{n}-ranks", lambda: run_ranks(n, cases(n)))


LAYERS = 2  # every test config has two transformer layers


# Every rank returns the whole model's logits, within 1e-5 of one process (fp32).
@pytest.mark.parametrize("name", list(MODELS))
def test_two_ranks_match_the_model(name):
    spec, _ = spec_and_graph(name)
    want = tree_leaves(reference(spec))[0]
    for got in logits(2)[name]:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# An encoder with a padding mask (broadcast over the heads) splits the same way; T5's
# position bias, one value per head, is read for the rank's heads only.
@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoder_with_mask(name):
    spec, _ = spec_and_graph(name)
    ranks = split(name, 2)
    assert all(all_reduce_count(g) == 2 * LAYERS and not any(n.target == ALL_GATHER for n in g.fx.nodes) for g in ranks)
    want = tree_leaves(reference(spec))[0]
    for got in logits(2)[name]:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# Four ranks: Llama's 2 KV heads are replicated (2 ranks share each), GPT-2's 4 heads one per rank.
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_four_ranks_match_the_model(name):
    spec, _ = spec_and_graph(name)
    want = tree_leaves(reference(spec))[0]
    for got in logits(4)[name]:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# Two all-reduces per transformer layer (attention output, MLP down projection), one all-gather (the LM head).
@pytest.mark.parametrize("name", list(MODELS))
def test_two_all_reduces_per_layer(name):
    for g in split(name, 2):
        assert all_reduce_count(g) == 2 * LAYERS
        assert sum(1 for node in g.fx.nodes if node.target == ALL_GATHER) == 1
        assert sum(1 for node in g.fx.nodes if node.target == WAIT) == 2 * LAYERS + 1


# Vocabulary-parallel embeddings: Gemma's table, tied to its LM head, is split
# by rows; both read one shard, and one more all-reduce sums the lookups.
def test_vocab_parallel_embeddings():
    spec, graph = spec_and_graph("gemma")
    ranks = cases(2)["gemma-vocab-embeddings"][0]
    table = graph.constant(next(n for n in graph.fx.nodes if n.target == torch.ops.aten.embedding.default).args[0])
    for g in ranks:
        assert all_reduce_count(g) == 2 * LAYERS + 1
        lookup = next(n for n in g.fx.nodes if n.target == torch.ops.aten.embedding.default)
        head = [n for n in g.fx.nodes if n.target == torch.ops.aten.linear.default][-1]
        assert lookup.args[0] is head.args[1] and g.constant(lookup.args[0]).shape[0] == table.shape[0] // 2
    want = tree_leaves(reference(spec))[0]
    for got in logits(2)["gemma-vocab-embeddings"]:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# A vocabulary the ranks do not divide (255 over 2): each keeps 128 rows of the
# tied table, the last padded with a zero row; the padding's logits are dropped.
def test_odd_vocabulary_is_padded_and_its_logits_dropped():
    spec, graph = spec_and_graph("gpt2-odd-vocabulary")
    table = graph.constant(next(n for n in graph.fx.nodes if n.target == torch.ops.aten.embedding.default).args[0])
    padded = torch.cat([table, table.new_zeros(1, 64)])
    for rank, g in enumerate(cases(2)["gpt2-odd-vocabulary"][0]):
        head = [n for n in g.fx.nodes if n.target == torch.ops.aten.linear.default][-1]
        torch.testing.assert_close(g.constant(head.args[1]), padded[rank * 128:(rank + 1) * 128], atol=0, rtol=0)
        assert any(n.target == torch.ops.aten.slice.Tensor and n.args[1:] == (-1, 0, 255) for n in g.fx.nodes)
    want = tree_leaves(reference(spec))[0]
    assert want.shape[-1] == 255
    for got in logits(2)["gpt2-odd-vocabulary"]:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# compile_tensor_parallel(graph) in each process splits for that process's rank.
def test_compile_for_this_process_rank():
    spec, _ = spec_and_graph("gpt2")
    want = tree_leaves(reference(spec))[0]
    for got in logits(2)["gpt2-whole"]:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# Composition: the quantized, fused rank graphs keep their two all-reduces per
# layer and stay within the quantization tolerance of the model.
def test_split_then_quantize_and_fuse():
    spec, _ = spec_and_graph("llama")
    ranks = cases(2)["llama-quantized"][0]
    assert all(all_reduce_count(g) == 2 * LAYERS for g in ranks)
    assert all(any(str(n.target).startswith("fxopt.linear_nbits") for n in g.fx.nodes) for g in ranks)
    want = tree_leaves(reference(spec))[0]
    for got in logits(2)["llama-quantized"]:
        parity = fxopt.compare(want, got)
        assert parity.within(0.03) and parity.cosine > 0.999, parity


# Each rank holds its shard: about half the split weights at N=2 (embeddings and norms stay whole).
def test_rank_graphs_hold_their_shards():
    _, graph = spec_and_graph("llama")
    ranks = split("llama", 2)
    assert all(g.param_bytes() < graph.param_bytes() for g in ranks)
    q = [n for n in ranks[1].fx.nodes if n.target == torch.ops.aten.linear.default][0]
    assert ranks[1].constant(q.args[1]).shape[0] == 32  # 2 of 4 query heads of 16


# Before/expected: an MLP's first linear splits by output channel, the second by input
# channel, followed by the all-reduce and then its bias, added once.
def test_mlp_pair_structure():
    w1, b1, w2, b2 = torch.randn(16, 8), torch.randn(16), torch.randn(4, 16), torch.randn(4)

    def before(x):
        return F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)

    w1_1, b1_1, w2_1 = w1[8:].contiguous(), b1[8:].contiguous(), w2[:, 8:].contiguous()  # rank 1's shards

    def rank1(x):
        h = F.relu(F.linear(x, w1_1, b1_1))
        partial = F.linear(h, w2_1)
        total = torch.ops._c10d_functional.wait_tensor.default(
            torch.ops._c10d_functional.all_reduce.default(partial, "sum", "tp"))
        return total + b2

    x = torch.randn(3, 8)
    graph = fxopt.PassManager("canonicalize").run(graph_of(before, (x,))).graph
    result = fxopt.PassManager("tensor-parallel(world_size=2,rank=1)").run(graph)
    assert_structurally_equal(result.graph, graph_of(rank1, (x,)), constant_values=True)
    assert result.records[0].stats["all_reduces"] == 1


# Should not fire: channels that reach a norm cannot be split by a pair, and the
# LM head is kept whole on request: the graph is left as it was.
def test_no_pair_leaves_the_graph_alone():
    w1, w2 = torch.randn(16, 8), torch.randn(4, 16)

    def model(x):
        return F.linear(F.layer_norm(F.linear(x, w1), (16,)), w2)

    graph = fxopt.PassManager("canonicalize").run(graph_of(model, (torch.randn(3, 8),))).graph
    result = fxopt.PassManager("tensor-parallel(world_size=2,rank=0,lm_head=replicated)").run(graph)
    assert not result.records[0].changed
    assert_structurally_equal(result.graph, graph, constant_values=True)
    assert "layer_norm" in str(result.records[0].stats["unpaired"])


# A world size that does not divide the heads fails before anything changes,
# naming the node; the user's graph is untouched.
def test_world_size_that_does_not_fit():
    _, graph = spec_and_graph("gpt2")
    text = str(graph)
    with pytest.raises(fxopt.PassError, match=r"failed at node 'linear.*world_size=3 does not divide the 4 heads"):
        fxopt.PassManager("tensor-parallel(world_size=3,rank=0)").run(graph)
    assert str(graph) == text


# Uneven heads: 4 heads over 8 ranks is refused with the reason (the MLP's 256 channels would fit).
def test_uneven_heads_are_refused():
    _, graph = spec_and_graph("gpt2")
    with pytest.raises(fxopt.PassError, match=r"world_size=8 does not divide the 4 heads"):
        fxopt.PassManager("tensor-parallel(world_size=8,rank=0)").run(graph)


# Running a rank graph without a process group says how to launch.
def test_missing_process_group_says_how_to_launch():
    with pytest.raises(ProcessGroupError, match=r"torchrun --nproc-per-node 2"):
        fxopt.compile(split("gpt2", 2)[0], "eager")
    with pytest.raises(ProcessGroupError, match=r"torchrun --nproc-per-node N"):
        compile_tensor_parallel(spec_and_graph("gpt2")[1])


# The collectives are nodes of the text IR, on the literal group "tp".
def test_collectives_in_text_ir():
    text = str(split("gpt2", 2)[0])
    assert "_c10d_functional.all_reduce" in text and "'tp'" in text and "all_gather_into_tensor" in text
    assert ALL_REDUCE in {n.target for n in split("gpt2", 2)[0].fx.nodes}


class CachedAttention(torch.nn.Module):
    """A decode step of one layer: 4 query heads over 2 KV heads of 8, keys and
    values concatenated with their cache inputs and returned with the logits."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(32, n) for n in (32, 16, 16, 32))
        self.head = torch.nn.Linear(32, 24, bias=False)

    def forward(self, x, past_k, past_v):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, 4, 8).transpose(1, 2)
        k = torch.cat([past_k, self.k(x).view(b, s, 2, 8).transpose(1, 2)], 2)
        v = torch.cat([past_v, self.v(x).view(b, s, 2, 8).transpose(1, 2)], 2)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.head(x + self.o(out.transpose(1, 2).reshape(b, s, 32))), k, v


# The cache goes with the heads: rank 1 of 2 takes and returns KV head 1 only;
# the graph's example cache is its slice, the logits keep their shape.
def test_key_value_cache_is_split_by_heads():
    torch.manual_seed(0)
    x, past = torch.randn(2, 1, 32), torch.randn(2, 2, 5, 8)
    graph = fxopt.trace(CachedAttention().eval(), (x, past, past + 1))
    result = fxopt.PassManager("canonicalize,tensor-parallel(world_size=2,rank=1,lm_head=replicated)").run(graph)
    ranked, stats = result.graph, result.records[-1].stats
    assert (stats["cache_inputs"], stats["cache_outputs"], stats["all_reduces"]) == (2, 2, 1)
    assert [tuple(p.meta["val"].shape) for p in ranked.placeholders()] == [(2, 1, 32), (2, 1, 5, 8), (2, 1, 5, 8)]
    assert torch.equal(ranked.example_args[1], past[:, 1:]) and torch.equal(ranked.example_args[2], past[:, 1:] + 1)
    out = next(n for n in ranked.fx.nodes if n.op == "output").args[0]
    assert [tuple(n.meta["val"].shape) for n in out] == [(2, 1, 24), (2, 1, 6, 8), (2, 1, 6, 8)]
    # the user's graph keeps its whole cache
    assert [tuple(p.meta["val"].shape) for p in graph.placeholders()][1:] == [(2, 2, 5, 8)] * 2
