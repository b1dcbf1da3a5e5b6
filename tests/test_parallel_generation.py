"""Greedy generation split by tensor parallelism over two gloo processes: each
rank runs the prefill and decode-step graphs of its heads, holds only its
heads' key/value cache, and generates the same tokens as one process and as
Hugging Face. The processes start once for the module; the tests read what
the ranks returned."""

from __future__ import annotations

import pytest
import torch

import parallel_models as pm
from conftest import once_per_run
from fxopt.launch import run_local

pytest.importorskip("transformers")

# What each rank's prefill returns and decode step takes per layer, [B, heads, T, width] for keys and values:
# tiny configs, GPT-2 and GPT-NeoX 4 heads, Llama and Cohere 4 query heads over 2 KV heads (each rank half of them);
# DeepSeek-V3 caches its attention's latent and rotary key part, one "head" that every rank holds whole
PRESENT = {**{name: [(2, kv_heads // 2, 6, 16)] * 4 for name, kv_heads in
              {"gpt2": 4, "llama": 2, "cohere": 2, "gpt-neox": 4}.items()},
           "deepseek-v3": [(2, 1, 6, 16), (2, 1, 6, 8)] * 2}
# Cohere: its prompt's interleaved rotary, split and fused, exports with the prompt's length still dynamic;
# GPT-NeoX: q, k and v of each head in one block of rows; DeepSeek-V3: latent attention
CASES = ["gpt2-eager", "gpt2-onnxruntime", "llama-eager", "llama-fused-onnxruntime", "llama-fused-eager",
         "cohere-fused-onnxruntime", "gpt-neox-eager", "deepseek-v3-onnxruntime"]


def _model(case: str) -> str:
    return case.rsplit("-", 1)[0].removesuffix("-fused")


@pytest.fixture(scope="module")
def two_ranks():
    def run():
        pm.prepare_generation()
        return run_local(pm.check_generation, 2, start="fork")

    return once_per_run("parallel-generation-2-ranks", run)


@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_equal_one_process_and_hugging_face(two_ranks, case):
    for rank, result in enumerate(two_ranks):
        r = {k: torch.tensor(r[k]) for k in ("sequences", "whole", "hf") for r in [result[case]]}
        assert r["sequences"].shape == r["hf"].shape == (2, 6 + pm.GEN_NEW_TOKENS)
        assert torch.equal(r["whole"], r["hf"]), case  # the single-process generator, as a baseline
        assert torch.equal(r["sequences"], r["whole"]), \
            f"{case} rank {rank}: first difference at {(r['sequences'] != r['whole']).nonzero()[0].tolist()}"


@pytest.mark.parametrize("case", CASES)
def test_each_rank_holds_its_heads_of_the_cache(two_ranks, case):
    present = PRESENT[_model(case)]
    for result in two_ranks:
        r = result[case]
        assert r["present_shapes"] == present, r["present_shapes"]
        assert r["past_heads"] == [shape[1] for shape in present]
        # attention and MLP split in both graphs: two all-reduces per layer
        assert r["all_reduces"] == {"prefill": 4, "decode": 4}


def test_fused_pipeline_after_the_split_lowers_each_ranks_attention_against_its_cache(two_ranks):
    # pack-attention on the rank's decode graph: fxopt.attention_with_past (ONNX Runtime
    # GroupQueryAttention) with the rank's 2 query heads over its 1 KV head, in both layers
    for result in two_ranks:
        for backend in ("onnxruntime", "eager"):
            assert result[f"llama-fused-{backend}"]["attention_with_past"] == [(2, 1), (2, 1)]
        # on eager the rank's step grows its cache in place in one process: buffers; ONNX Runtime's
        # sessions joined by collectives cannot share one bound buffer: growing
        assert (result["llama-fused-eager"]["cache"], result["llama-fused-onnxruntime"]["cache"]) == ("buffer", "growing")
        # and its linears packed: per layer the merged QKV, the output, the merged gate/up and the down shard; the head
        assert result["llama-fused-eager"]["packed"] == 2 * 4 + 1


def test_onnxruntime_rank_step_is_cut_at_each_collective(two_ranks):
    # two all-reduces per layer and the LM head's all-gather: a session before each, one after the gather
    for result in two_ranks:
        assert result["gpt2-onnxruntime"]["segments"] == 4 + 2
