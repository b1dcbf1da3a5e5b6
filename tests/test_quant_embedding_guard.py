"""Quantized embedding tables (packed 4/8-bit rows, GatherBlockQuantized on
ONNX Runtime) and the quantize guard measured on either backend."""

import onnx
import pytest
import torch

import fxopt
from fxopt.ir.quant import QuantConfig, quantize, to_nbits
from fxopt.passes.quantize import Quantize
from conftest import model_spec, reference, run, trace_once

aten = torch.ops.aten
FX_EMBEDDING = torch.ops.fxopt.embedding_nbits.default
EMBEDDINGS = r"embed|wte|wpe|embeddings"


def quantized(name, **options):
    spec = model_spec(name)
    graph = trace_once(spec, graph_name=name)
    canon = fxopt.PassManager("canonicalize").run(graph).graph
    result = fxopt.PassManager([Quantize(**options)]).run(canon)
    return spec, canon, result.graph, result.records[-1].stats


@pytest.mark.parametrize("bits,scheme,group", [(4, "asym", 32), (4, "sym", 16), (8, "asym", 64)])
def test_embedding_op_gathers_then_dequantizes_exactly(bits, scheme, group):
    table = torch.randn(50, 64)
    qt = quantize(table, QuantConfig(bits, scheme, "group", group))
    nb = to_nbits(qt)
    ids = torch.tensor([[0, 49, 7], [7, 7, 1]])
    out = torch.ops.fxopt.embedding_nbits(ids, nb.B, nb.scales, nb.zero_points, nb.k, nb.n, nb.bits, nb.block_size)
    torch.testing.assert_close(out, qt.dequantize()[ids], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llama-tiny", "bert-tiny", "gpt2-tiny"])
def test_4bit_embeddings_are_packed_and_match_on_both_backends(name):
    spec, canon, q, stats = quantized(name, bits=4, group_size=32, quantize_embeddings=True, include=EMBEDDINGS, skip_lm_head=False)
    tables = [n for n in q.fx.nodes if n.target == FX_EMBEDDING]
    assert len(tables) == stats["quantized"] >= 1
    assert not any(n.target == aten.embedding.default for n in q.fx.nodes)
    for n in tables:  # two codes per byte
        B, k, vocab = q.constant(n.args[1]), n.args[5], n.args[4]
        assert B.dtype == torch.uint8 and B.numel() == vocab * k // 2
    # tight: the graph against the float model with the same dequantized tables
    ref = canon.copy()
    for node in list(ref.fx.nodes):
        if node.target == aten.embedding.default:
            deq = quantize(ref.constant(node.args[0]), QuantConfig(4, "asym", "group", 32)).dequantize()
            with ref.fx.inserting_before(node):
                node.replace_input_with(node.args[0], ref.add_constant(deq, "deq"))
    ref.recompile()
    expected = run(ref, spec.example_inputs)
    eager, ort = run(q, spec.example_inputs), run(fxopt.compile(q, "onnxruntime"), spec.example_inputs)
    assert fxopt.compare(expected, eager).within(1e-5)
    assert fxopt.compare(expected, ort).within(1e-4)
    # loose: against the original model
    assert fxopt.compare(reference(spec), eager).cosine > 0.98


def test_embedding_export_holds_gather_block_quantized_and_is_small(tmp_path):
    spec, canon, q, _ = quantized("gpt2-tiny", bits=4, group_size=32, quantize_embeddings=True, include="wte", skip_lm_head=False)
    path = fxopt.export_onnx(q, tmp_path / "q.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("GatherBlockQuantized") == 1
    float_path = fxopt.export_onnx(canon, tmp_path / "f.onnx")
    wte = spec.model.transformer.wte.weight
    # the tied LM head keeps a float copy; the embedding itself shrinks to 1/8 (+ scales)
    saved = float_path.stat().st_size - path.stat().st_size
    assert saved < wte.numel() * 4 and saved > -wte.numel() * 4 * 0.2


def test_other_widths_and_per_row_scales_fall_back_to_aten_gathers():
    spec, canon, q, stats = quantized("bert-tiny", bits=3, group_size=32, quantize_embeddings=True, include=EMBEDDINGS)
    assert not any(n.target == FX_EMBEDDING for n in q.fx.nodes)
    assert stats["quantized"] == 3 and all(r["bits"] == 3 for r in stats["layers"].values())
    eager, ort = run(q, spec.example_inputs), run(fxopt.compile(q, "onnxruntime"), spec.example_inputs)
    assert fxopt.compare(eager, ort).within(1e-4)
    assert fxopt.compare(reference(spec), eager).cosine > 0.95


def test_embedding_group_size_must_divide_the_embedding_dimension():
    with pytest.raises(fxopt.passes.PassError, match="group size 48"):
        quantized("bert-tiny", bits=4, group_size=48, quantize_embeddings=True, include=EMBEDDINGS)


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_guard_times_on_the_chosen_backend_and_keeps_float_where_it_does_not_pay(backend):
    spec, canon, q, stats = quantized("mlp", bits=4, group_size=16, guard=True, guard_backend=backend)
    layers = stats["layers"]
    assert layers and all(r["float_ms"] > 0 and r["quant_ms"] > 0 for r in layers.values())
    kept = stats["kept_float_by_guard"]
    for name, r in layers.items():
        assert (r["quant_ms"] >= r["float_ms"]) == (name in kept)
        if name in kept:
            assert kept[name].startswith(f"{backend}: quantized")
    assert sum(1 for n in q.fx.nodes if n.target == torch.ops.fxopt.linear_nbits.default) == len(layers) - len(kept)
    assert fxopt.compare(reference(spec), run(q, spec.example_inputs)).cosine > 0.99


def test_guard_backend_must_be_known():
    with pytest.raises(fxopt.passes.OptionError, match="guard_backend"):
        Quantize(guard=True, guard_backend="tvm")
