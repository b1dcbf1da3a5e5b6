"""Generation through the prefill and decode-step graphs: greedy tokens equal
Hugging Face's ``generate`` on every architecture, backend and batch shape;
sampling, stop tokens, streaming and the errors a bad request gets."""

import functools
import os

import pytest
import torch

import fxopt
from fxopt.generation import GenerationError, compile_generator, next_tokens, optimize_decoder, SamplingOptions
from fxopt.ir.decoder import NotACausalLMError, trace_decoder
from conftest import once_per_run

# pack-attention lowers the decode step's attention against its cache to GroupQueryAttention with past
FUSED = "canonicalize,dce,constant-fold,cse,fuse-attention,merge-linears,pack-attention,fuse-linear-act,fuse-norm,dce"
NEW_TOKENS = 64
# A left-padded batch of 4 (lengths 6, 2, 10, 1) and one prompt alone.
PROMPTS = [[5, 9, 2, 7, 1, 3], [7, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [3]]
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256, max_position_embeddings=128)


def _config(name: str):
    import transformers as tf

    if name == "gpt2":
        return tf.GPT2LMHeadModel, tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128)
    if name == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(**SMALL)
    if name == "mistral":
        # the window is shorter than prompt + new tokens: the mask must cut it
        return tf.MistralForCausalLM, tf.MistralConfig(**SMALL, sliding_window=16)
    if name == "gemma":
        return tf.GemmaForCausalLM, tf.GemmaConfig(**SMALL, head_dim=16, tie_word_embeddings=True)
    if name == "phi3":
        return tf.Phi3ForCausalLM, tf.Phi3Config(**SMALL)
    # mixtures of experts: top-2 of 4 experts; Qwen2-MoE adds a shared expert behind a sigmoid gate
    if name == "mixtral":
        return tf.MixtralForCausalLM, tf.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)
    if name == "qwen2_moe":
        return tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                         shared_expert_intermediate_size=64)
    # ALiBi, and attention over heads folded into the batch (bmm / baddbmm)
    if name == "bloom":
        return tf.BloomForCausalLM, tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=256)
    # ALiBi written out with a table of max_seq_len positions sliced from its end
    if name == "mpt":
        return tf.MptForCausalLM, tf.MptConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=256, max_seq_len=128)
    # a sinusoidal position table that bounds the prompt's length, heads folded as BLOOM's
    if name == "xglm":
        return tf.XGLMForCausalLM, tf.XGLMConfig(d_model=64, ffn_dim=128, num_layers=2, attention_heads=4, vocab_size=256,
                                                 max_position_embeddings=128)
    raise KeyError(name)


@functools.lru_cache(maxsize=None)
def causal_lm(name: str):
    cls, cfg = _config(name)
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = None
    torch.manual_seed(0)
    return cls(cfg).eval()


def left_padded(prompts):
    length = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def hf_tokens(name: str, batch: int) -> torch.Tensor:
    """Hugging Face's greedy tokens, generated once per test run."""
    def generate():
        ids, mask = left_padded(PROMPTS if batch == 4 else PROMPTS[:1])
        with torch.no_grad():
            return causal_lm(name).generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                            min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)

    return once_per_run(f"hf-tokens-{name}-{batch}", generate)


@functools.lru_cache(maxsize=None)
def traced(name: str):
    return trace_decoder(causal_lm(name))


@functools.lru_cache(maxsize=None)
def fused(name: str):
    return optimize_decoder(traced(name), FUSED)


@functools.lru_cache(maxsize=None)
def fused_generator(name: str, backend: str):
    return compile_generator(fused(name), backend=backend)


def onnx_op_types(model) -> list[str]:
    return [n.op_type for n in model.program.model.graph]


def cache_readers(model) -> set[str]:
    """The ONNX ops that read the decode step's past key/value inputs."""
    graph = model.program.model.graph
    past = {v.name for v in graph.inputs[3:]}
    return {n.op_type for n in graph if any(i is not None and i.name in past for i in n.inputs)}


@functools.lru_cache(maxsize=None)
def traced_generator(name: str, backend: str):
    """Compiled once per model and backend, like ``fused_generator``, and
    shared by the tests: ``generate`` keeps no state between calls."""
    return compile_generator(traced(name), backend=backend)


ARCHS = ["gpt2", "llama", "mistral", "gemma", "phi3", "mixtral", "qwen2_moe"]
GQA_ARCHS = {"llama", "mistral", "gemma", "phi3", "mixtral", "qwen2_moe"}  # fewer key/value heads than query heads (SMALL)
NOT_FOLDED_ROTARY = {"gpt2"}  # learned positions, no rotary embedding


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
@pytest.mark.parametrize("name", ARCHS)
def test_fused_greedy_tokens_equal_hugging_face(name, backend):
    gen = fused_generator(name, backend)
    cache = next(r.stats for r in gen.graphs.records["decode"] if r.name.startswith("pack-attention"))
    assert (cache["cache"], cache["refused"]) == (2, {})  # every layer's attention against its cache
    # rotary models: the decode step's rotation runs inside the attention op (GroupQueryAttention's do_rotary)
    assert (cache["rotary"], cache["rotary_refused"]) == (0 if name in NOT_FOLDED_ROTARY else 2, {})
    prefill = next(r.stats for r in gen.graphs.records["prefill"] if r.name.startswith("pack-attention"))
    if name in GQA_ARCHS:  # a left-padded prompt's GQA with its causal + padding mask: one kernel, no repeat_kv,
        # run causal (the mask and's a causal part: no key after its query is read)
        assert (prefill["gqa"], prefill["causal_mask"], prefill["refused"]) == (2, 2, {})
    # the default cache: a preallocated buffer the attention reads and writes in place
    # (GroupQueryAttention on ONNX Runtime, attention_with_past_in_buffer on eager)
    assert gen.cache == "buffer"
    if backend == "eager":
        from fxopt.ir.ops_attention import attention_with_past_in_buffer

        targets = [n.target for n in gen.decode_model.running_graph.nodes if n.op == "call_function"]
        assert targets.count(attention_with_past_in_buffer) == 2
        assert torch.ops.fxopt.attention_with_past.default not in targets
    if backend == "onnxruntime":
        ops = onnx_op_types(gen.decode_model)
        assert ops.count("GroupQueryAttention") == 2 and "MultiHeadAttention" not in ops
        assert cache_readers(gen.decode_model) <= {"GroupQueryAttention", "Shape"}  # no Concat copies the cache
        if name not in NOT_FOLDED_ROTARY:
            assert not {"Sin", "Cos", "Neg"} & set(ops)
            assert all(any(a.name == "do_rotary" and a.value == 1 for a in n.attributes.values())
                       for n in gen.decode_model.program.model.graph if n.op_type == "GroupQueryAttention")
        if name in GQA_ARCHS:
            prefill_ops = onnx_op_types(gen.prefill_model)
            assert prefill_ops.count("GroupQueryAttention") == 2 and "MultiHeadAttention" not in prefill_ops
    for batch in (1, 4):
        out = gen.generate(PROMPTS[:batch], max_new_tokens=NEW_TOKENS)
        expected = hf_tokens(name, batch)
        assert out.sequences.shape == expected.shape
        assert torch.equal(out.sequences, expected), f"{name} {backend} batch {batch}: first difference at " \
            f"{(out.sequences != expected).nonzero()[0].tolist()}"


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_fused_experts_give_the_same_tokens(backend):
    # each expert runs once on its tokens (ONNX Runtime: its MoE kernel) in the prompt and in every step
    graphs = optimize_decoder(traced("mixtral"), FUSED.replace("cse,", "cse,fuse-experts,"))
    for graph in (graphs.prefill, graphs.decode):
        assert [n.target for n in graph.fx.nodes].count(torch.ops.fxopt.experts_swiglu.default) == 2
    gen = compile_generator(graphs, backend=backend)
    for batch in (1, 4):
        assert torch.equal(gen.generate(PROMPTS[:batch], max_new_tokens=NEW_TOKENS).sequences, hf_tokens("mixtral", batch))


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_traced_graphs_without_a_pipeline_equal_hugging_face(backend):
    gen = traced_generator("llama", backend)
    assert gen.cache == "growing"  # no attention lowered against the cache: it grows by Concat
    out = gen.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out.sequences, hf_tokens("llama", 4))


# BLOOM (ALiBi; attention over heads folded into the batch, which canonicalize unfolds) and MPT
# (ALiBi) are lowered against their cache, the bias their mask; XGLM's attention stays in the graph
# (its scores are clamped by max before the softmax). MPT's and XGLM's position tables bound the prompt.
@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
@pytest.mark.parametrize("name", ["bloom", "mpt", "xglm"])
def test_alibi_and_position_bounded_decoders_equal_hugging_face(name, backend):
    gen = fused_generator(name, backend)
    assert gen.cache == ("growing" if name == "xglm" else "buffer")
    assert torch.equal(gen.generate(PROMPTS, max_new_tokens=NEW_TOKENS).sequences, hf_tokens(name, 4))


# MPT slices its table of 128 positions from the end, and its code guards the prompt below 128:
# the prefill takes 127 tokens at most, and a longer prompt is refused before it runs.
def test_a_prompt_longer_than_the_prefill_takes_is_refused():
    gen = fused_generator("mpt", "eager")
    assert (gen.info.max_positions, gen.info.max_prompt) == (128, 127)
    assert len(gen.generate([[1] * 127], max_new_tokens=1).new_tokens[0]) == 1
    with pytest.raises(GenerationError, match="prefill takes at most 127"):
        gen.generate([[1] * 128], max_new_tokens=1)


def test_fused_pipeline_changed_both_graphs():
    graphs = fused("llama")
    for kind in ("prefill", "decode"):
        names = {r.name for r in graphs.records[kind] if r.changed}
        assert {"fuse-norm", "merge-linears"} <= names, (kind, names)
    decode_inputs = [p.name for p in graphs.decode.placeholders()]
    assert decode_inputs[:3] == ["input_ids", "attention_mask", "position_ids"] and len(decode_inputs) == 3 + 2 * 2


def test_prefill_computes_logits_at_the_last_position_only():
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=64))
    graphs = trace_decoder(model.eval())
    ids, mask = left_padded(PROMPTS)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = graphs.prefill(ids, mask, positions)
    assert out[0].shape == (4, 1, 300)
    # every [B, S, vocab] value in the graph has S = 1: the head multiplies one row per sequence
    vocab_wide = [n for n in graphs.prefill.fx.nodes if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)
                  and n.meta["val"].dim() == 3 and n.meta["val"].shape[-1] == 300]
    assert vocab_wide and all(n.meta["val"].shape[1] == 1 for n in vocab_wide)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1:]
    assert torch.allclose(out[0], full, atol=1e-5)
    assert [tuple(t.shape) for t in out[1:]] == [(4, 2, 10, 16)] * 2


def test_weights_are_held_once_for_both_graphs():
    gen = fused_generator("llama", "eager")
    prefill = {t.untyped_storage().data_ptr() for t in gen.graphs.prefill.tensor_attributes().values()}
    decode = {t.untyped_storage().data_ptr() for t in gen.graphs.decode.tensor_attributes().values()}
    big = {t.untyped_storage().data_ptr() for t in gen.graphs.decode.tensor_attributes().values() if t.numel() >= 64 * 64}
    # the merged QKV and gate/up matrices too, though each pipeline run built its own
    # (gen.shared_bytes counts them only on the first compile of these graphs)
    assert big and big <= prefill and decode


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k():
    gen = traced_generator("gpt2", "eager")
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=5, top_p=0.9)
    a = gen.generate(PROMPTS, seed=3, **kw).new_tokens
    b = gen.generate(PROMPTS, seed=3, **kw).new_tokens
    c = gen.generate(PROMPTS, seed=4, **kw).new_tokens
    assert a == b and a != c
    logits = torch.randn(3, 50)
    allowed = torch.topk(logits, 2).indices
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        tok = next_tokens(logits, SamplingOptions(do_sample=True, top_k=2), g)
        assert all(t in row for t, row in zip(tok.tolist(), allowed.tolist()))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(next_tokens(logits, SamplingOptions(do_sample=True, top_p=0.7), g)) for _ in range(200)}
    assert seen == {0, 1}


@pytest.mark.parametrize("cache", ["growing", "buffer"])
def test_stop_tokens_end_a_row_and_pad_it_while_others_go_on(cache):
    gen = traced_generator("gpt2", "eager") if cache == "growing" else fused_generator("gpt2", "eager")
    assert gen.cache == cache
    free = gen.generate(PROMPTS, max_new_tokens=12).new_tokens
    stop = free[0][3]
    streamed = []
    out = gen.generate(PROMPTS, max_new_tokens=12, stop_tokens=[stop], pad_token_id=255,
                       streamer=lambda step, toks: streamed.append(toks))
    first = free[0].index(stop)
    assert out.new_tokens[0] == free[0][: first + 1]
    for row in range(1, 4):
        cut = free[row].index(stop) + 1 if stop in free[row] else 12
        assert out.new_tokens[row] == free[row][:cut]
    assert [s[0] for s in streamed[: first + 1]] == free[0][: first + 1]
    assert all(s[0] is None for s in streamed[first + 1:])
    assert out.prompt_lengths == [len(p) for p in PROMPTS]  # row 0 ended first: its count says nothing of them
    # sequences keep Hugging Face's form: ended rows are padded
    if len(streamed) > first + 1:
        assert int(out.sequences[0, -1]) == 255


def test_generation_ends_when_every_row_hit_eos():
    gen = traced_generator("gpt2", "eager")
    free = gen.generate(PROMPTS[:1], max_new_tokens=8).new_tokens[0]
    out = gen.generate(PROMPTS[:1], max_new_tokens=8, eos_token_id=free[2])
    assert out.new_tokens[0] == free[: free.index(free[2]) + 1]
    assert out.sequences.shape[1] == len(PROMPTS[0]) + len(out.new_tokens[0])


@pytest.mark.parametrize("call, message", [
    (lambda g: g.generate([[1, 2]], max_new_tokens=128), "positions"),
    (lambda g: g.generate([[]], max_new_tokens=4), "empty prompt"),
    (lambda g: g.generate([[1], []], max_new_tokens=4), "empty prompt"),
    (lambda g: g.generate([[1, 256]], max_new_tokens=4), "token id 256 is out of the vocabulary"),
    (lambda g: g.generate([[1, -1]], max_new_tokens=4), "token id -1"),
    (lambda g: g.generate([[1]], max_new_tokens=0), "max_new_tokens"),
    (lambda g: g.generate([[1]], do_sample=True, temperature=0.0), "temperature"),
    (lambda g: g.generate([[1]], do_sample=True, top_p=1.5), "top_p"),
    (lambda g: g.generate([[1]], do_sample=True, top_k=-2), "top_k"),
    (lambda g: g.generate([[1]], stop_tokens=[999]), "stop token 999"),
    (lambda g: g.generate(torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1, 0]])), "left-padded"),
])
def test_bad_requests_get_clear_errors(call, message):
    gen = traced_generator("gpt2", "eager")
    with pytest.raises(GenerationError, match=message):
        call(gen)


def test_longest_request_that_fits_the_positions_runs():
    gen = traced_generator("gpt2", "eager")
    out = gen.generate([[1, 2]], max_new_tokens=127)  # positions 0..127
    assert len(out.new_tokens[0]) == 127


def test_a_model_without_a_causal_lm_head_is_refused():
    import transformers

    bare = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(NotACausalLMError, match="no causal language-model head"):
        trace_decoder(bare)
    with pytest.raises(NotACausalLMError, match="ForCausalLM"):
        fxopt.compile_generator(torch.nn.Linear(4, 4))


def test_unknown_backend_and_bad_pipeline_fail_before_tracing():
    with pytest.raises(GenerationError, match="backend"):
        compile_generator(causal_lm("gpt2"), backend="tensorrt")
    with pytest.raises(fxopt.PipelineError):
        compile_generator(causal_lm("gpt2"), pipeline="no-such-pass")


def test_cli_generate_reports_speed_and_equal_tokens(tmp_path, capsys):
    import json

    from fxopt.cli import main

    report = tmp_path / "r.json"
    rc = main(["generate", "llama-tiny", "--pipeline", FUSED, "--backend", "onnxruntime", "--prompt-tokens", "12",
               "--max-new-tokens", "8", "--batch", "2", "--threads", "1", "--report", str(report)])
    assert rc == 0
    r = json.loads(report.read_text())
    assert r["tokens_equal_reference"] is True and r["decode_steps"] == 7 and r["prefill_ms"] > 0
    assert "greedy tokens equal the reference's: yes" in capsys.readouterr().err


def test_cli_generate_eager_with_packed_linears(tmp_path, capsys):
    import json

    from fxopt.cli import main

    report = tmp_path / "r.json"
    assert main(["generate", "gpt2-tiny", "--pipeline", FUSED, "--prepack", "all", "--prompt-tokens", "12",
                 "--max-new-tokens", "8", "--threads", "1", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["tokens_equal_reference"] is True
    assert main(["generate", "gpt2-tiny", "--backend", "onnxruntime", "--prepack", "all"]) == 1
    assert "prepack='all' runs on eager" in capsys.readouterr().err


def test_cli_generate_refuses_a_model_without_a_causal_lm_head(capsys):
    from fxopt.cli import main

    assert main(["generate", "bert-tiny", "--max-new-tokens", "2"]) == 1
    assert "no causal language-model head" in capsys.readouterr().err


# -- ONNX Runtime: weights held once, in memory and on disk ------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_decode_step_computes_the_cache_length_once_for_every_layer():
    gen = fused_generator("llama", "onnxruntime")
    graph = gen.decode_model.program.model.graph
    gqa = [n for n in graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2
    # seqlens_k and total_sequence_length: one value each, read by every layer
    assert gqa[0].inputs[5] is gqa[1].inputs[5] and gqa[0].inputs[6] is gqa[1].inputs[6]
    assert cache_readers(gen.decode_model) == {"GroupQueryAttention"}


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident size from /proc")
def test_onnxruntime_generator_holds_the_weights_once():
    import gc

    import numpy as np
    import transformers

    # ~60 MB of weights, most of them in the (tied) embedding: a copy is well above the noise
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=512, n_head=8, vocab_size=16384, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    params = [p.detach().numpy() for p in model.parameters()]
    weights = sum(p.nbytes for p in params)
    graphs = trace_decoder(model)
    # the graphs read the model's own tensors
    assert all(any(t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() for p in model.parameters())
               for t in graphs.decode.tensor_attributes().values() if t.numel() >= 1 << 16)
    compile_generator(graphs, backend="onnxruntime")  # the exporter's and ONNX Runtime's one-time set-up
    gc.collect()
    before = _rss()
    gen = compile_generator(graphs, backend="onnxruntime")
    gc.collect()
    grown = _rss() - before
    # both sessions read arrays over the model's memory, or the one transposed copy of a weight that
    # ONNX Runtime's MatMul reads as [in, out] (here the tied LM head: 0.57 of the weights)
    for arr in gen.shared_initializers.arrays().values():
        if arr.nbytes >= 1 << 20:
            assert any(np.shares_memory(arr, p) for p in params) or any(
                p.shape == arr.shape[::-1] and np.array_equal(p.T, arr) for p in params), arr.shape
    out = gen.generate([[1, 2, 3]], max_new_tokens=4, eos_token_id=())
    assert len(out.new_tokens[0]) == 4
    # measured: 0.8 (the transposed head and the sessions' own memory); 3.0 when ONNX Runtime copied
    # every initializer into each session (add_external_initializers) and folded the head's transpose in each
    assert grown < 1.2 * weights, f"grew by {grown / weights:.2f} copies of the weights"


def test_onnx_export_writes_each_weight_once(tmp_path):
    import onnx

    gen = fused_generator("llama", "onnxruntime")
    paths = gen.save_onnx(tmp_path)
    weights = tmp_path / "weights.bin"
    models = {kind: onnx.load(str(path), load_external_data=False) for kind, path in paths.items()}
    referenced = {kind: sum(int(e.value) for t in m.graph.initializer for e in t.external_data if e.key == "length")
                  for kind, m in models.items()}
    # both graphs read (almost) every weight; the file holds each once
    assert min(referenced.values()) > 0.9 * weights.stat().st_size
    assert weights.stat().st_size <= 1.01 * gen.shared_initializers.nbytes
    assert weights.stat().st_size < 0.6 * sum(referenced.values())
    reloaded = fxopt.load_compiled(paths["decode"])
    steps = [gen.decode_model, reloaded]
    ids, mask = left_padded(PROMPTS[:1])
    past = [torch.randn(1, 2, 6, 16) for _ in range(4)]
    inputs = (ids[:, -1:], torch.ones(1, 7, dtype=torch.long), torch.tensor([[6]]), tuple(past))
    a, b = (m(*inputs) for m in steps)
    for x, y in zip(a, b):  # the reloaded session prepacks its weights: another GEMM kernel, rounding apart
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


# -- quantized pipelines ------------------------------------------------------------------------------

QUANTIZED = {
    "int8": FUSED.replace("merge-linears,", "merge-linears,quantize(mode=dynamic),"),
    "int4": FUSED.replace("merge-linears,", "merge-linears,quantize(bits=4,group_size=32),"),
}


@functools.lru_cache(maxsize=None)
def quantized(scheme: str):
    return optimize_decoder(traced("llama"), QUANTIZED[scheme])


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
@pytest.mark.parametrize("scheme", sorted(QUANTIZED))
def test_quantized_pipelines_generate(scheme, backend):
    gen = compile_generator(quantized(scheme), backend=backend)
    out = gen.generate(PROMPTS, max_new_tokens=16)
    assert [len(t) for t in out.new_tokens] == [16] * 4
    assert all(0 <= t < 256 for row in out.new_tokens for t in row)
    # agreement with fp32 is a benchmark figure (benchmarks/generate.py), not a bound here
    if backend == "onnxruntime":
        ops = onnx_op_types(gen.decode_model)
        assert ops.count("GroupQueryAttention") == 2
        assert ("MatMulNBits" in ops) == (scheme == "int4")
        assert gen.shared_initializers is None  # quantized kernels keep their prepacked weights


# -- ONNX Runtime: the cache in a preallocated buffer written in place ---------------------------------


def test_a_cache_grows_in_place_only_as_a_prefix_of_a_buffer_with_room():
    from fxopt.ir.ops_attention import grown_in_buffer

    torch.manual_seed(0)
    buffer, new = torch.randn(2, 3, 8, 4), torch.randn(2, 3, 1, 4)
    for past, in_place in [(buffer[:, :, :5], True),  # the generator's case: written at position 5, no copy
                           (buffer[:, :, :8], False),  # no room left
                           (buffer[:, :, :5].clone(), False),  # a tensor of its own
                           (torch.randn(2, 8, 3, 4).transpose(1, 2)[:, :, :5], False)]:  # positions strided apart
        want = torch.cat([past, new], dim=2)
        before = buffer.clone()
        got = grown_in_buffer(past, new)
        assert torch.equal(got, want)
        assert (got.data_ptr() == past.data_ptr() and got.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()) == in_place
        if not in_place:
            assert torch.equal(buffer, before)  # nothing outside past was written


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral"])
def test_preallocated_cache_gives_the_same_tokens(name):
    gen = compile_generator(fused(name), backend="onnxruntime", cache="buffer")
    for batch in (1, 4):
        out = gen.generate(PROMPTS[:batch], max_new_tokens=NEW_TOKENS)
        assert torch.equal(out.sequences, hf_tokens(name, batch)), f"{name} batch {batch}"


def test_decode_session_alone_prepacks_the_shared_weights():
    gen = compile_generator(fused("llama"), backend="onnxruntime", prepack="decode")
    disabled = {kind: model.session.get_session_options().get_session_config_entry("session.disable_prepacking")
                for kind, model in (("prefill", gen.prefill_model), ("decode", gen.decode_model))}
    assert disabled == {"prefill": "1", "decode": "0"}
    assert gen.shared_initializers is not None  # both sessions still read one set of arrays
    for batch in (1, 4):
        out = gen.generate(PROMPTS[:batch], max_new_tokens=NEW_TOKENS)
        assert torch.equal(out.sequences, hf_tokens("llama", batch)), f"batch {batch}"


def test_a_past_two_attentions_read_is_not_grown_in_place():
    from fxopt.generation import cache_read_in_place

    decode = fused("llama").decode.copy()
    assert cache_read_in_place(decode)
    first = next(n for n in decode.fx.nodes if n.target == torch.ops.fxopt.attention_with_past.default)
    with decode.fx.inserting_after(first):  # a second attention on the first layer's cache: both would write it
        decode.fx.call_function(first.target, first.args, first.kwargs)
    assert not cache_read_in_place(decode)


def test_eager_decode_step_grows_its_buffer_in_place():
    gen = fused_generator("llama", "eager")
    assert gen.cache == "buffer"
    plain = fxopt.compile(gen.graphs.decode, "eager")  # the graph as traced: the cache concatenated
    torch.manual_seed(0)
    layers, held, room = len(gen.graphs.decode.placeholders()) - 3, 5, 9
    buffers = [torch.randn(1, 2, room, 16) for _ in range(layers)]  # SMALL: 2 kv heads of 16
    for step in range(3):
        length = held + step
        inputs = (torch.tensor([[3 + step]]), torch.ones(1, length + 1, dtype=torch.long), torch.tensor([[length]]))
        want = plain(*inputs, tuple(b[:, :, :length].clone() for b in buffers))
        got = gen.decode_model(*inputs, tuple(b[:, :, :length] for b in buffers))
        assert torch.allclose(got[0], want[0], atol=1e-5)
        for present, expected, buffer in zip(got[1:], want[1:], buffers):
            assert present.data_ptr() == buffer.data_ptr() and present.shape[2] == length + 1  # a view of the buffer
            assert torch.equal(present, expected) and torch.equal(buffer[:, :, :length + 1], expected)


@pytest.mark.parametrize("name", ["gpt2", "gemma", "phi3"])
def test_eager_packed_linears_give_the_same_tokens(name):
    from fxopt.backends.eager import packed_linear

    for prepack in ("decode", "all"):
        gen = compile_generator(fused(name), backend="eager", prepack=prepack)
        linears = {kind: sum(n.target in (torch.ops.aten.linear.default, torch.ops.fxopt.linear_act.default)
                             for n in getattr(gen.graphs, kind).fx.nodes) for kind in ("prefill", "decode")}
        running = {kind: [n.target for n in model.running_graph.nodes if n.op == "call_function"]
                   for kind, model in (("prefill", gen.prefill_model), ("decode", gen.decode_model))}
        assert running["decode"].count(packed_linear) == linears["decode"] > 0
        assert running["prefill"].count(packed_linear) == (linears["prefill"] if prepack == "all" else 0)
        if prepack == "all":  # one packed copy of each weight, read by both graphs (gemma's head is its embedding)
            assert gen.prefill_model.packed is gen.decode_model.packed
            assert len(gen.decode_model.packed) == linears["decode"]
        for batch in (1, 4):
            out = gen.generate(PROMPTS[:batch], max_new_tokens=NEW_TOKENS)
            assert torch.equal(out.sequences, hf_tokens(name, batch)), f"{name} prepack={prepack} batch {batch}"


@pytest.mark.parametrize("options, message", [
    (dict(prepack="prefill"), "prepack must be"),
    (dict(prepack="decode", share_weights=False), "sharing their weights"),
    (dict(prepack="all"), "runs on eager"),
    (dict(prepack="all", backend="eager", torch_compile=True), "not with torch_compile"),
    (dict(cache="buffer", backend="eager", torch_compile=True), "use cache='growing'"),
    (dict(backend="eager", cache_in_buffer=True), "set by cache="),
])
def test_prepack_option_is_checked(options, message):
    with pytest.raises(GenerationError, match=message):
        compile_generator(fused("llama"), **{"backend": "onnxruntime", **options})


def test_preallocated_cache_needs_every_attention_lowered():
    with pytest.raises(GenerationError, match="pack-attention"):
        compile_generator(traced("gpt2"), backend="onnxruntime", cache="buffer")
    with pytest.raises(GenerationError, match="pack-attention"):
        compile_generator(traced("gpt2"), backend="eager", cache="buffer")
