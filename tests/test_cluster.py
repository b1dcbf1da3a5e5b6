"""``cluster``: k-means codebooks at least as accurate as round-to-nearest at
the same width, indices and codebooks stored in the graph, parity between
eager and ONNX Runtime."""

import pytest
import torch

import fxopt
from conftest import base_graph, model_spec, reference, run
from fxopt.ir.quant import QuantConfig, quantize
from fxopt.passes import PassError, PipelineError
from fxopt.passes.cluster import decode, gptq_assign, kmeans_codebook

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


def test_weighted_kmeans_moves_each_entry_to_its_members_weighted_mean():
    # one row, two entries: {0, 1} and {9, 10}; the second input column counts three times
    w = torch.tensor([[0.0, 1.0, 9.0, 10.0]])
    _, plain = kmeans_codebook(w, 1, "channel")
    _, weighted = kmeans_codebook(w, 1, "channel", importance=torch.tensor([1.0, 3.0, 1.0, 1.0]))
    assert plain.tolist() == [[0.5, 9.5]]
    assert weighted.tolist() == [[0.75, 9.5]]
    with pytest.raises(ValueError, match="importance"):
        kmeans_codebook(w, 1, "channel", importance=torch.tensor([1.0, -1.0, 1.0, 1.0]))


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_gptq_assignment_is_the_nearest_entry_for_uncorrelated_inputs(granularity):
    # a diagonal X^T X feeds no column's error into another: every weight keeps its nearest entry
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    indices, codebook = kmeans_codebook(w, 3, granularity, group_size=16)
    scales = torch.linspace(0.5, 2.0, 64)
    assert torch.equal(gptq_assign(w, codebook, granularity, 16, torch.diag(scales)), indices)


def test_gptq_assignment_lowers_the_output_error_on_correlated_inputs():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=gen)
    x = torch.randn(512, 8, generator=gen) @ torch.randn(8, 64, generator=gen) + 0.1 * torch.randn(512, 64, generator=gen)
    indices, codebook = kmeans_codebook(w, 3, "channel")
    fed = gptq_assign(w, codebook, "channel", 128, x.T @ x / len(x))

    def output_error(i):
        return (x @ (w - decode(i, codebook, "channel", 128)).T).norm() / (x @ w.T).norm()

    assert output_error(fed) < 0.5 * output_error(indices)


def test_gptq_assignment_keeps_pruned_weights_at_the_entry_nearest_zero():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(32, 64, generator=gen)
    w[torch.rand(32, 64, generator=gen) < 0.5] = 0.0
    x = torch.randn(512, 8, generator=gen) @ torch.randn(8, 64, generator=gen) + 0.1 * torch.randn(512, 64, generator=gen)
    nearest, codebook = kmeans_codebook(w, 3, "channel")
    fed = gptq_assign(w, codebook, "channel", 128, x.T @ x / len(x))
    pruned = w == 0
    assert torch.equal(fed[pruned], nearest[pruned])
    assert not torch.equal(fed[~pruned], nearest[~pruned])  # the feedback did move the others


def _matches_on_both_backends(g, spec, compiled_ort=None):
    """Eager and ONNX Runtime agree, and stay close to the original model."""
    eager = run(fxopt.compile(g, "eager"), spec.example_inputs)
    ort = run(compiled_ort or fxopt.compile(g, "onnxruntime"), spec.example_inputs)
    assert fxopt.compare(eager, ort).within(1e-4)
    assert fxopt.compare(reference(spec), eager).cosine > 0.99


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
    _matches_on_both_backends(g, spec)


def _token_batches(vocab=256, batches=4, seq=32):
    g = torch.Generator().manual_seed(7)
    return [{"input_ids": torch.randint(0, vocab, (2, seq), generator=g)} for _ in range(batches)]


def test_calibrated_codebooks_run_on_both_backends_closer_to_the_model():
    spec = model_spec("llama-tiny")
    g = base_graph("llama-tiny")
    nearest = fxopt.PassManager("cluster(bits=4)").run(g).graph
    weighted = fxopt.PassManager("cluster(bits=4,weighting=activation)", calibration_data=_token_batches()).run(g).graph
    _matches_on_both_backends(weighted, spec)
    result = fxopt.PassManager("cluster(bits=4,weighting=activation,assign=gptq)", calibration_data=_token_batches()).run(g)
    assert result.records[0].stats["clustered"] == 14
    _matches_on_both_backends(result.graph, spec)
    ref = reference(spec)
    error = {name: fxopt.compare(ref, run(fxopt.compile(graph, "eager"), spec.example_inputs)).max_abs_err
             for name, graph in (("nearest", nearest), ("gptq", result.graph))}
    assert error["gptq"] < error["nearest"], error


def test_calibrated_codebooks_need_calibration_data_and_refuse_the_nbits_grid():
    with pytest.raises(PipelineError, match="cluster.*calibration_data"):
        fxopt.PassManager("cluster(assign=gptq)").run(base_graph("mlp"))
    with pytest.raises(PipelineError, match="cluster.*calibration_data"):
        fxopt.PassManager("cluster(weighting=activation)").run(base_graph("mlp"))
    with pytest.raises(PipelineError, match="assign=gptq.*lowering=nbits"):
        fxopt.PassManager("cluster(assign=gptq,lowering=nbits)", calibration_data=_token_batches())


def test_group_size_that_does_not_divide_names_the_layer():
    with pytest.raises(PassError, match=r"layer 'layers\.0'.*group size 48"):
        fxopt.PassManager("cluster(granularity=group,group_size=48)").run(base_graph("mlp"))


# -- the codebook op and the lowerings ----------------------------------------------------

def test_codebook_weight_picks_each_block_s_entry_and_decodes_once_at_load():
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 16, (6, 8), dtype=torch.uint8, generator=g)
    for group, rows in ((48, 1), (8, 6), (4, 12)):  # one codebook, one per row, one per 4 columns
        codebook = torch.randn(rows, 16, generator=g)
        expected = torch.stack([codebook[(i * 8 + j) // group, int(indices[i, j])] for i in range(6) for j in range(8)]).view(6, 8)
        call = torch.ops.fxopt.codebook_weight(indices, codebook, group, "call")
        assert torch.equal(call, expected)
        first = torch.ops.fxopt.codebook_weight(indices, codebook, group, "load")
        assert torch.equal(first, expected) and torch.ops.fxopt.codebook_weight(indices, codebook, group, "load") is first
    with pytest.raises(ValueError, match=r"codebook \[5, 16\] does not fit indices \[6, 8\] with group_size 8"):
        torch.ops.fxopt.codebook_weight(indices, torch.randn(5, 16), 8, "load")



def test_a_new_codebook_is_decoded_even_where_a_freed_one_had_its_id():
    # decode="load" keeps its decoded weight by the tensors' identity; a freed
    # codebook's id is soon reused by the next tensor, which must not get its weight
    g = torch.Generator().manual_seed(1)
    indices = torch.randint(0, 16, (6, 8), dtype=torch.uint8, generator=g)
    for _ in range(20):
        codebook = torch.randn(6, 16, generator=g)
        got = torch.ops.fxopt.codebook_weight(indices, codebook, 8, "load")
        assert torch.equal(got, torch.ops.fxopt.codebook_weight(indices, codebook, 8, "call"))
        del codebook, got

def _onnx_runtime_graph(path, tmp_path):
    """The nodes ONNX Runtime runs after its load-time optimizations."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # constant folding, no layout changes
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


# gpt2-tiny: c_attn [192, 64], c_fc [256, 64], mlp c_proj [64, 256] are over the
# 8192 weights torch's exporter folds itself; attn c_proj [64, 64] is not.
BIG = 2 * (192 * 64 + 256 * 64 + 64 * 256)


# decode: the large layers' indices are in the file, and ONNX Runtime folds every
# decode when it loads it; gather: every layer's indices, gathered at every run.
@pytest.mark.parametrize("lowering,indices_stored,gathers_at_run", [("decode", BIG, 0), ("gather", BIG + 2 * 64 * 64, 8)])
def test_the_file_stores_indices_decoded_at_load_or_at_every_call(lowering, indices_stored, gathers_at_run, tmp_path):
    import onnx

    spec = model_spec("gpt2-tiny")
    result = fxopt.PassManager(f"cluster(bits=4,lowering={lowering})").run(base_graph("gpt2-tiny"))
    g = result.graph
    assert sum(1 for n in g.fx.nodes if n.target == torch.ops.fxopt.codebook_weight.default) == 8
    compiled = fxopt.compile(g, "onnxruntime")
    path = compiled.save(tmp_path / "clustered.onnx")
    stored = onnx.load(str(path))
    uint8 = [i for i in stored.graph.initializer if i.data_type == onnx.TensorProto.UINT8]
    assert sum(onnx.numpy_helper.to_array(i).size for i in uint8) == indices_stored
    ran = _onnx_runtime_graph(path, tmp_path)
    assert sum(1 for n in ran.graph.node if n.op_type == "GatherElements") == gathers_at_run
    _matches_on_both_backends(g, spec, compiled)


def test_snapping_a_codebook_that_is_a_uniform_grid_keeps_it_exactly():
    from fxopt.passes.cluster import snap_to_grid

    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 16, (4, 64), dtype=torch.uint8, generator=g)
    scale = torch.rand(4, 1, generator=g) + 0.1
    codebook = scale * (torch.arange(16.0) - torch.tensor([[3.0], [8.0], [0.0], [15.0]]))  # a grid per row
    w = decode(indices, codebook, "channel", 64)
    qt = snap_to_grid(w, indices, codebook, 64, 4, 32)
    assert torch.allclose(qt.dequantize(), w, atol=1e-6)
    assert torch.equal(qt.q, indices)


def test_nbits_lowering_runs_matmulnbits_at_a_small_accuracy_cost():
    spec = model_spec("llama-tiny")
    result = fxopt.PassManager("cluster(bits=4,lowering=nbits,accuracy_level=0)").run(base_graph("llama-tiny"))
    g = result.graph
    nbits = [n for n in g.fx.nodes if n.target == torch.ops.fxopt.linear_nbits.default]
    assert len(nbits) == 14 and not any(n.target == torch.ops.fxopt.codebook_weight.default for n in g.fx.nodes)
    for name, layer in result.records[0].stats["layers"].items():
        # the grid costs accuracy over the free codebook, a bounded amount
        assert layer["kmeans_rel_err"] <= layer["rel_err"] < 1.5 * layer["kmeans_rel_err"], name
    _matches_on_both_backends(g, spec)


def test_nbits_lowering_refuses_a_layer_without_a_matmulnbits_block():
    with pytest.raises(PassError, match=r"layer 'layers\.0'.*lowering=nbits needs a MatMulNBits block"):
        fxopt.PassManager("cluster(granularity=group,group_size=8,lowering=nbits)").run(base_graph("mlp"))
