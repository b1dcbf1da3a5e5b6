"""Running rank graphs on torch.distributed (gloo, CPU, processes of one
host): ONNX Runtime sessions cut at the collectives, data parallelism, the
data-parallel x tensor-parallel mesh, launching, and failing instead of
hanging. Each fixture starts its processes once; the tests read what the
ranks returned."""

from __future__ import annotations

import pytest
import torch

import parallel_models as pm
from fxopt.launch import run_local

TOL = 1e-5


def relative(err: float, ref: torch.Tensor) -> float:
    return err / ref.abs().max().item()


@pytest.fixture(scope="module")
def two_ranks():
    return run_local(pm.check_onnxruntime_rank, 2)


@pytest.fixture(scope="module")
def four_ranks():
    return run_local(pm.check_onnxruntime_rank, 4)


def test_onnxruntime_rank_graph_matches_single_process_at_2_ranks(two_ranks):
    for result in two_ranks:
        for shape, (ort_err, eager_err) in result["errors"].items():
            ref = pm.reference(pm.ids(*shape))
            assert relative(ort_err, ref) <= TOL, (shape, ort_err)
            assert relative(eager_err, ref) <= TOL, (shape, eager_err)


def test_onnxruntime_rank_graph_is_cut_at_each_collective(two_ranks):
    # two all-reduces (one per block) and the LM head's all-gather: three cuts, four sessions
    for result in two_ranks:
        assert result["collectives"] == ["_c10d_functional::all_reduce", "_c10d_functional::all_reduce",
                                         "_c10d_functional::all_gather_into_tensor"]
        assert result["segments"] == 4
        # the row-parallel outputs have no other reader: summed in the memory ONNX Runtime wrote them to
        assert result["in_place"] == [True, True, False]


def test_onnxruntime_rank_graph_matches_single_process_at_4_ranks(four_ranks):
    for result in four_ranks:
        for shape, (ort_err, _) in result["errors"].items():
            assert relative(ort_err, pm.reference(pm.ids(*shape))) <= TOL, (shape, ort_err)


@pytest.fixture(scope="module")
def data_parallel():
    return run_local(pm.check_data_parallel, 2)


def test_data_parallel_uneven_batch_gathers_rows_in_order(data_parallel):
    # batch 5 on 2 ranks: rows 0-2 and 3-4; batch 1: one rank computes, both return it
    for result in data_parallel:
        assert result["batch"] <= TOL * 10
        assert result["small_batch"] <= TOL * 10


def test_data_parallel_stream_returns_every_request_in_order(data_parallel):
    for result in data_parallel:
        assert len(result["stream"]) == 3 and max(result["stream"]) <= TOL * 10


def test_data_parallel_over_tensor_parallel_mesh_2x2():
    results = run_local(pm.check_mesh, 4, tensor_parallel=2)
    assert sorted((r["dp_rank"], r["tp_rank"]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert max(r["err"] for r in results) <= TOL * 10


def test_a_rank_that_dies_fails_the_others_within_the_timeout():
    results = run_local(pm.check_dead_peer, 2, timeout=5.0, wall=120.0, check=False)
    status, survivor = results[0]
    assert status == "ok", survivor
    assert survivor["error"] == "CollectiveError", survivor
    assert "another rank exited or did not answer" in survivor["message"]
    assert survivor["seconds"] < 10, survivor


def test_missing_process_group_says_how_to_launch(monkeypatch):
    import fxopt.launch

    for key in fxopt.launch.LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(fxopt.launch.LaunchError, match="torchrun --nproc-per-node 2"):
        fxopt.launch.init(tensor_parallel=2)
