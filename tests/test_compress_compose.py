"""Compression passes composed with quantization and the fusion pipeline:
2:4 pruning + int4 and structured shrinking + W8A8, each fused, on both
backends, against the pruned (shrunk) float model; pruned zeros survive every
quantization mode."""

import pytest
import torch

import fxopt
from conftest import base_graph, model_spec, run
from fxopt.ir.quant import nbits_dequantize

fx_ops = torch.ops.fxopt
aten = torch.ops.aten

FUSED = "fuse-attention,merge-linears,{quantize},pack-attention,fuse-linear-act,fuse-norm,dce"
NBITS = (fx_ops.linear_nbits.default, fx_ops.linear_nbits_act.default)
PER_TOKEN = (fx_ops.linear_dynamic_int8_per_token.default, fx_ops.linear_dynamic_int8_per_token_act.default)
PER_TENSOR = (fx_ops.linear_dynamic_int8.default, fx_ops.linear_dynamic_int8_act.default)


def _both_backends_match(graph, float_graph, inputs, cosine: float):
    expected = run(float_graph, inputs)
    eager = run(fxopt.compile(graph, "eager"), inputs)
    ort = run(fxopt.compile(graph, "onnxruntime"), inputs)
    assert fxopt.compare(eager, ort).within(1e-3)
    assert fxopt.compare(expected, eager).cosine > cosine and fxopt.compare(expected, ort).cosine > cosine


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_2_4_pruned_int4_fused_keeps_the_pattern_on_both_backends(name):
    spec = model_spec(name)
    pruned = fxopt.PassManager("prune(pattern='2:4')").run(base_graph(name)).graph
    fused = fxopt.PassManager(FUSED.format(quantize="quantize(bits=4,group_size=32,accuracy_level=0)")).run(pruned).graph
    checked = 0
    for node in fused.fx.nodes:
        if node.target in NBITS:
            _, B, scales, zps, _, k, n, bits, block = node.args[:9]
            w = nbits_dequantize(fused.constant(B), fused.constant(scales), None if zps is None else fused.constant(zps), k, n, bits, block)
            # merged Q/K/V and fused activations still hold at most 2 non-zeros in every 4 inputs
            assert ((w != 0).reshape(n, -1, 4).sum(-1) <= 2).all(), node.name
            checked += 1
    assert checked >= 4 and any(n.target == fx_ops.linear_nbits_act.default for n in fused.fx.nodes) == (name == "gpt2-tiny")
    _both_backends_match(fused, pruned, spec.example_inputs, 0.98)


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_shrunk_w8a8_fused_on_both_backends(name):
    spec = model_spec(name)
    shrunk = fxopt.PassManager("shrink(ratio=0.3,multiple_of=8)").run(base_graph(name)).graph
    fused = fxopt.PassManager(FUSED.format(quantize="quantize(mode=dynamic)")).run(shrunk).graph
    ops = [n.target for n in fused.fx.nodes]
    assert sum(t in PER_TOKEN for t in ops) >= 4 and ops.count(aten.linear.default) == 1  # all but the LM head
    _both_backends_match(fused, shrunk, spec.example_inputs, 0.99)


@pytest.mark.parametrize("act_granularity,targets", [("token", PER_TOKEN), ("tensor", PER_TENSOR)])
def test_pruned_weights_stay_zero_through_w8a8(act_granularity, targets):
    pruned = fxopt.PassManager("prune(ratio=0.5)").run(base_graph("llama-tiny")).graph
    zeros = {n.meta.get("nn_module_stack") and list(n.meta["nn_module_stack"].values())[-1][0]: pruned.constant(n.args[1]) == 0
             for n in pruned.fx.nodes if n.target == aten.linear.default}
    q = fxopt.PassManager(f"quantize(mode=dynamic,act_granularity={act_granularity})").run(pruned).graph
    checked = 0
    for node in q.fx.nodes:
        if node.target in targets:
            codes = q.constant(node.args[1])
            zero_code = 128 if codes.dtype == torch.uint8 else 0  # per-token stores int8 codes + 128
            mask = zeros[node.meta["quantized_layer"]]
            assert mask.float().mean() == 0.5 and (codes[mask] == zero_code).all(), node.meta["quantized_layer"]
            checked += 1
    assert checked == 14
