"""Running rank graphs on torch.distributed (gloo, CPU, processes of one
host): ONNX Runtime sessions cut at the collectives, data parallelism, the
data-parallel x tensor-parallel mesh, launching, and failing instead of
hanging. Each fixture starts its processes once per test run, whichever
worker runs its tests; the tests read what the ranks returned. Errors are
max abs errors relative to the largest logit of the model run whole in one
process."""

from __future__ import annotations

import pytest
import torch

import parallel_models as pm
from conftest import once_per_run
from fxopt.launch import run_local

TOL = 1e-5


@pytest.fixture(scope="module")
def two_ranks():
    def run():
        pm.prepare_ranks(pm.TWO_RANK_MODELS)
        return run_local(pm.check_two_ranks, 2, start="fork")

    return once_per_run("parallel-runtime-2-ranks", run)


@pytest.fixture(scope="module")
def four_ranks():
    def run():
        pm.prepare_ranks(["llama-tiny"])
        return run_local(pm.check_four_ranks, 4, start="fork")

    return once_per_run("parallel-runtime-4-ranks", run)


def test_onnxruntime_rank_graph_matches_single_process_at_2_ranks(two_ranks):
    for result in two_ranks:
        for shape, (ort_err, eager_err) in result["hand"]["errors"].items():
            assert ort_err <= TOL, (shape, ort_err)
            assert eager_err <= TOL, (shape, eager_err)


def test_onnxruntime_rank_graph_is_cut_at_each_collective(two_ranks):
    # two all-reduces (one per block) and the LM head's all-gather: three cuts, four ONNX Runtime sessions
    for result in two_ranks:
        hand = result["hand"]
        assert hand["collectives"] == ["_c10d_functional::all_reduce", "_c10d_functional::all_reduce",
                                       "_c10d_functional::all_gather_into_tensor"]
        assert hand["segments"] == 4
        # the row-parallel products have no other reader: summed where ONNX Runtime wrote them
        assert hand["in_place"] == [True, True, False]


def test_tensor_parallel_gpt2_and_llama_on_onnxruntime_at_2_ranks(two_ranks):
    for result in two_ranks:
        # 1023 tokens over 2 ranks: each keeps 512 rows, the padding's logits sliced off after the gather
        assert set(result["pass"]) == {"llama-tiny", "gpt2-tiny-odd-vocabulary"}
        for name, r in result["pass"].items():
            assert max(r["errors"]) <= TOL, (name, r["errors"])
            # a session before each all-reduce, one before the all-gather of the logits and one after it
            assert r["segments"] == r["all_reduces"] + 2, (name, r)


def test_vocabulary_parallel_tied_head_on_onnxruntime_folds_its_transpose_once(two_ranks):
    for result in two_ranks:
        r = result["vocab"]["gpt2-tiny-odd-vocabulary"]
        assert max(r["errors"]) <= TOL, r["errors"]
        # the LM head reads the rank's half of the token table transposed: folded at load in the
        # session that reads it, not computed in segment 0 each call and handed to the last segment
        assert r["head_folded"], r


def test_onnxruntime_rank_graphs_match_single_process_at_4_ranks(four_ranks):
    # 4 query heads over 2 KV heads on 4 ranks: each rank keeps one query head and a copy of its KV head
    for result in four_ranks:
        r = result["pass"]["llama-tiny"]
        assert max(r["errors"]) <= TOL, result["pass"]
        assert r["segments"] == r["all_reduces"] + 2, r


TRANSPORTS = ("gloo", "shm")


def data_parallel(result: dict, transport: str) -> dict:
    if transport not in result["data_parallel"]:
        pytest.skip("fxopt's shared-memory group needs x86-64 ranks sharing one shared-memory folder")
    return result["data_parallel"][transport]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_data_parallel_uneven_batch_gathers_rows_in_order(two_ranks, transport):
    # batch 5 on 2 ranks: rows 0-2 and 3-4; batch 1: one rank computes, both return it
    for result in two_ranks:
        assert data_parallel(result, transport)["batch"] <= TOL
        assert data_parallel(result, transport)["small_batch"] <= TOL


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_data_parallel_stream_returns_every_request_in_order(two_ranks, transport):
    for result in two_ranks:
        stream = data_parallel(result, transport)["stream"]
        assert len(stream) == 3 and max(stream) <= TOL
        # outputs of mixed dtypes, sizes and plain values travel packed in one buffer per rank
        assert data_parallel(result, transport)["mixed"] == [True] * 5


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_data_parallel_outputs_outlive_the_next_exchange(two_ranks, transport):
    # each rank packs into, and gathers its own part into, buffers it keeps from call to call;
    # what a call returned is not among them: two later calls leave it as it was
    for result in two_ranks:
        unchanged, errors = data_parallel(result, transport)["kept"]
        assert unchanged and len(errors) == 3 and max(errors) <= TOL


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_data_parallel_stream_to_one_rank_or_none(two_ranks, transport):
    # 3 requests on 2 ranks: rank 0 runs requests 0 and 1, rank 1 request 2
    rank0, rank1 = (data_parallel(r, transport) for r in two_ranks)
    assert len(rank0["to_rank_0"]) == 3 and max(rank0["to_rank_0"]) <= TOL
    assert rank1["to_rank_0"][:2] == [None, None] and rank1["to_rank_0"][2] <= TOL
    assert rank0["none"][2] is None and max(rank0["none"][:2]) <= TOL
    assert rank1["none"][:2] == [None, None] and rank1["none"][2] <= TOL


def test_data_parallel_over_tensor_parallel_mesh_2x2(four_ranks):
    results = [r["mesh"] for r in four_ranks]
    assert sorted((r["dp_rank"], r["tp_rank"]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert max(r["err"] for r in results) <= TOL
    # transport="auto": the tensor-parallel groups of one host on shared memory, the data-parallel ones on gloo
    from fxopt import shared_memory_group

    assert {r["transports"] for r in results} == {("fxopt_shm" if shared_memory_group.supported() else "gloo", "gloo")}
    for r in results:
        if r["dp_rank"] == 0:
            assert len(r["stream"]) == 3 and max(r["stream"]) <= TOL
        else:
            assert r["stream"][:2] == [None, None] and r["stream"][2] <= TOL


def test_a_rank_that_dies_fails_the_others_within_the_timeout():
    # gloo: the peer's connections close (the shared-memory group's case: tests/test_shared_memory_group.py)
    results = run_local(pm.check_dead_peer, 2, timeout=5.0, wall=120.0, check=False, start="fork", transport="gloo")
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


def test_mesh_refuses_a_world_that_is_not_data_times_tensor_parallel():
    import torch.distributed as dist

    import fxopt.launch

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(fxopt.launch.LaunchError, match=r"1 processes cannot form a mesh of data_parallel=1 x tensor_parallel=2"):
            fxopt.launch.init(tensor_parallel=2)
    finally:
        dist.destroy_process_group()


def test_run_local_refuses_an_unknown_start_and_a_fork_from_a_rank():
    import torch.distributed as dist

    with pytest.raises(ValueError, match="start='thread'"):
        run_local(pm.check_dead_peer, 2, start="thread")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="from a rank of a process group"):
            run_local(pm.check_dead_peer, 2, start="fork")
    finally:
        dist.destroy_process_group()


def test_data_parallel_map_refuses_a_destination_outside_the_group():
    import torch.distributed as dist

    from fxopt.data_parallel import DataParallel, DataParallelError

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        dp = DataParallel(lambda x: x + 1)
        for to in (1, True, "rank0"):
            with pytest.raises(DataParallelError, match=r"'all', 'none' or a rank of the group \(0 to 0\)"):
                dp.map([torch.ones(2)], to=to)
        assert [t.tolist() for t in dp.map([torch.ones(2), torch.zeros(1)], to=0)] == [[2.0, 2.0], [1.0]]
    finally:
        dist.destroy_process_group()


def test_optimize_refuses_out_for_a_parallel_run(tmp_path, capsys):
    from fxopt.cli import main

    assert main(["optimize", "mlp", "--tensor-parallel", "2", "--out", str(tmp_path / "m.onnx")]) == 1
    assert "one graph per rank" in capsys.readouterr().err
