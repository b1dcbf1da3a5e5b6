"""The parallel benchmark's DTensor peer runs GPT-2 as a DTensor user prepares
it: Conv1D as nn.Linear, the fused QKV ordered so that a column split hands
each rank its own heads' Q, K and V."""

import importlib.util
from pathlib import Path

import pytest
import torch

from fxopt.models import gpt2

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "parallel.py"
_spec = importlib.util.spec_from_file_location("parallel_bench", _PATH)
parallel_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parallel_bench)


def test_gpt2_as_linears_computes_the_same_logits():
    spec = gpt2("tiny")
    ids = torch.randint(0, spec.model.config.vocab_size, (1, 9))
    with torch.no_grad():
        want = spec.model(input_ids=ids).logits
        model = parallel_bench.linear_gpt2(spec.model, 1)
        assert all(type(m).__name__ != "Conv1D" for m in model.modules())
        assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5)


def test_each_ranks_block_of_the_fused_qkv_holds_its_own_heads():
    spec = gpt2("tiny")
    conv = spec.model.transformer.h[0].attn.c_attn
    original, bias = conv.weight.t().clone(), conv.bias.clone()  # [3E, E]: Q, K, V rows
    width = spec.model.config.n_embd
    attn = parallel_bench.linear_gpt2(spec.model, 2).transformer.h[0].attn
    assert attn.split_size == width // 2
    half = width // 2
    for rank in range(2):
        block = attn.c_attn.weight[rank * 3 * half:(rank + 1) * 3 * half]  # what ColwiseParallel gives this rank
        rows = torch.cat([original[part * width + rank * half:part * width + (rank + 1) * half] for part in range(3)])
        assert torch.equal(block, rows)
        assert torch.equal(attn.c_attn.bias[rank * 3 * half:(rank + 1) * 3 * half],
                           torch.cat([bias[part * width + rank * half:part * width + (rank + 1) * half] for part in range(3)]))
    plan = parallel_bench.dtensor_plan(spec.model)
    assert {name.rpartition(".")[2]: type(style).__name__ for name, style in plan.items()} == {
        "c_attn": "ColwiseParallel", "c_fc": "ColwiseParallel", "c_proj": "RowwiseParallel"}


def test_heads_that_do_not_split_are_refused():
    with pytest.raises(ValueError, match="do not split"):
        parallel_bench.linear_gpt2(gpt2("tiny").model, 5)
