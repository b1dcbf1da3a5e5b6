"""fxopt's shared-memory process group (``fxopt_shm``): the tensor-parallel
group of ranks of one host. Its collectives against the ranks' inputs reduced
locally (and the same checks on gloo, which shows the checks are right), a
rank graph's logits equal on both transports, refusals, and the choice that
``fxopt.launch.init`` makes."""

from __future__ import annotations

import pytest
import torch

import parallel_models as pm
from conftest import once_per_run
from fxopt import shared_memory_group
from fxopt.launch import LaunchError, run_local

pytestmark = pytest.mark.skipif(not shared_memory_group.supported(), reason="the shared-memory group needs x86-64")


@pytest.fixture(scope="module")
def both_transports():
    def run():
        return {t: run_local(pm.check_collectives, 2, start="fork", transport=t, timeout=30) for t in ("shm", "gloo")}

    return once_per_run("shared-memory-collectives", run)


def test_every_collective_equals_the_inputs_reduced_in_rank_order(both_transports):
    for rank in both_transports["shm"]:
        assert rank["transport"] == "fxopt_shm"
        assert rank["wrong"] == []


def test_three_ranks_oversubscribing_two_cores_on_auto():
    # the group chosen by transport="auto", and the torch.sum reduction of more than two slots
    for rank in run_local(pm.check_collectives, 3, start="fork", timeout=60):
        assert rank["transport"] == "fxopt_shm"
        assert rank["wrong"] == []


# Two replicas, no tensor parallelism: the data-parallel group (every rank) carries whole batches
# of outputs; on shared memory only when asked (the mapping is twice the group's largest exchange).
@pytest.mark.parametrize("transport, expected", [("shm", "fxopt_shm"), ("auto", "gloo"), ("gloo", "gloo")])
def test_data_parallel_groups_run_on_shared_memory_when_asked(transport, expected):
    rank0, rank1 = run_local(pm.data_parallel_transports, 2, tensor_parallel=1, start="fork", transport=transport)
    for rank in (rank0, rank1):
        assert rank["transports"] == ("gloo", expected) and rank["dp_size"] == 2
    assert len(rank0["stream"]) == 3 and max(rank0["stream"]) <= 1e-6
    assert rank1["stream"][:2] == [None, None] and rank1["stream"][2] <= 1e-6


def test_a_late_rank_never_reads_the_next_round():
    for rank in run_local(pm.stress_rounds, 2, start="fork", transport="shm"):
        assert rank["wrong"] == []


def test_ranks_giving_different_sizes_fail_with_the_sizes():
    for message in run_local(pm.mismatched_sizes, 2, start="fork", transport="shm"):
        assert "the ranks gave [12, 16] bytes (rank order)" in message


def test_the_same_checks_pass_on_gloo(both_transports):
    for rank in both_transports["gloo"]:
        assert rank["transport"] == "gloo"
        assert rank["wrong"] == []


def test_rank_graph_logits_are_bitwise_equal_on_both_transports():
    logits = {t: run_local(pm.tiny_logits, 2, start="fork", transport=t) for t in ("shm", "gloo")}
    reference = pm.reference(pm.ids())
    for shm, gloo in zip(logits["shm"], logits["gloo"]):
        assert (shm["transport"], gloo["transport"]) == ("fxopt_shm", "gloo")
        # both backends reduce on the shared-memory group through its own in-place all-reduce;
        # ONNX Runtime's rank runner reduces on gloo through dist.all_reduce
        assert shm["eager through torch.distributed"] == shm["onnxruntime through torch.distributed"] == 0
        assert gloo["onnxruntime through torch.distributed"] > 0
        for backend in ("eager", "onnxruntime"):
            # two ranks: a + b in either order is the same float
            assert (shm[backend] == gloo[backend]).all(), backend
            assert pm.max_err(torch.from_numpy(shm[backend]), reference) <= 1e-5


def test_an_unsupported_collective_is_named():
    messages = run_local(pm.refuse_point_to_point, 2, start="fork", transport="shm")
    for message in messages:
        assert "fxopt_shm group" in message and "send is not supported" in message and "gloo group" in message


def survivor(check, timeout: float) -> dict:
    """Rank 0's report of ``check`` (rank 1 exits or hangs), which must have
    failed with a CollectiveError."""
    status, report = run_local(check, 2, timeout=timeout, wall=120.0, check=False, start="fork", transport="shm")[0]
    assert status == "ok", report
    assert report["error"] == "CollectiveError", report
    return report


def test_a_rank_that_dies_is_named_at_once():
    report = survivor(pm.check_dead_peer, timeout=30.0)
    assert "rank(s) [1] exited before reaching it" in report["message"]
    assert report["seconds"] < 5, report  # its process is gone: no need to wait out the 30 s


def test_a_rank_that_hangs_fails_the_others_after_the_timeout():
    report = survivor(pm.check_stuck_peer, timeout=2.0)
    assert "rank(s) [1] did not reach it within the group's timeout (2 s)" in report["message"]
    assert 2 <= report["seconds"] < 7, report


def test_init_refuses_an_unknown_transport():
    import torch.distributed as dist

    import fxopt.launch

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(LaunchError, match=r"transport='tcp': use one of auto, gloo, shm"):
            fxopt.launch.init(transport="tcp")
    finally:
        dist.destroy_process_group()


def test_cli_runs_tensor_parallel_on_shared_memory(tmp_path):
    import json
    import subprocess
    import sys

    report = tmp_path / "tp.json"
    done = subprocess.run([sys.executable, "-m", "fxopt", "optimize", "mlp", "--tensor-parallel", "2", "--transport", "shm",
                           "--backend", "onnxruntime", "--report", str(report)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tensor-parallel collectives on fxopt_shm" in done.stdout
    r = json.loads(report.read_text())
    assert r["transport"] == "fxopt_shm" and r["tensor_parallel"] == 2
    assert r["max_abs_err"] <= 1e-5 * max(1.0, r["output_scale"])
