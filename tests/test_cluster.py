"""``cluster``: k-means codebooks at least as accurate as round-to-nearest at
the same width, indices and codebooks stored in the graph, parity between
eager and ONNX Runtime."""

import pytest
import torch

import fxopt
from conftest import base_graph, model_spec, reference, run
from fxopt.ir.quant import QuantConfig, quantize
from fxopt.passes import PassError
from fxopt.passes.cluster import decode, kmeans_codebook

aten = torch.ops.aten


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("bits", [2, 4])
def test_kmeans_beats_round_to_nearest_at_the_same_width(bits, granularity):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    indices, codebook = kmeans_codebook(w, bits, granularity, group_size=32)
    approx = decode(indices, codebook, granularity, 32)
    rtn = quantize(w, QuantConfig(bits, "asym", granularity, 32)).dequantize()
    assert int(indices.max()) < 2**bits and indices.dtype == torch.uint8
    rows_or_blocks = {"tensor": 1, "channel": 64, "group": 64 * 4}[granularity]
    assert codebook.shape == (rows_or_blocks, 2**bits)
    assert (approx - w).norm() < (rtn - w).norm()


def test_clustered_model_runs_on_both_backends_and_stores_indices():
    spec = model_spec("llama-tiny")
    result = fxopt.PassManager("cluster(bits=4)").run(base_graph("llama-tiny"))
    stats = result.records[0].stats
    assert stats["clustered"] == 14 and stats["skipped"] == {"lm-head": 1}
    g = result.graph
    decoded = [n.args[1] for n in g.fx.nodes if n.target == aten.linear.default and n.args[1].op == "call_function"]
    assert len(decoded) == 14
    # the graph stores one byte per weight plus the codebooks
    assert sum(g.constant(n).numel() for n in g.fx.nodes if n.op == "get_attr" and g.constant(n).dtype == torch.uint8) == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)  # q, o; k, v; gate, up, down
    eager = run(fxopt.compile(g, "eager"), spec.example_inputs)
    ort = run(fxopt.compile(g, "onnxruntime"), spec.example_inputs)
    assert fxopt.compare(eager, ort).within(1e-4)
    assert fxopt.compare(reference(spec), eager).cosine > 0.99


def test_group_size_that_does_not_divide_names_the_layer():
    with pytest.raises(PassError, match=r"layer 'layers\.0'.*group size 48"):
        fxopt.PassManager("cluster(granularity=group,group_size=48)").run(base_graph("mlp"))
