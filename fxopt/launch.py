"""Running fxopt on several processes: joining the process group that
``torchrun`` sets up, splitting its ranks into a data-parallel x
tensor-parallel mesh, and relaunching a command under ``torchrun``.

    # under torchrun --nproc-per-node 4:
    mesh = fxopt.launch.init(tensor_parallel=2, data_parallel=2, timeout=30)
    mesh.tp_group, mesh.dp_group, mesh.tp_rank, mesh.dp_rank

Ranks ``r`` of a ``data_parallel x tensor_parallel`` mesh are laid out row by
row: ``dp_rank = r // tensor_parallel``, ``tp_rank = r % tensor_parallel``, so
the ranks of one tensor-parallel group are neighbours (one machine, when
torchrun starts ``tensor_parallel`` processes per node).
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch

# What torchrun (and torch.distributed's env:// rendezvous) sets in every process.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 60.0


class LaunchError(RuntimeError):
    """The processes are not set up as the parallel run needs (no process
    group, a world size that is not data_parallel x tensor_parallel)."""


def how_to_launch(world_size: int | str = "N") -> str:
    return (f"start one process per rank with `torchrun --nproc-per-node {world_size} -m fxopt optimize MODEL ...` "
            f"(or `fxopt optimize MODEL --tensor-parallel N [--data-parallel M]`, which starts them itself), "
            f"or from Python under torchrun call fxopt.launch.init()")


def under_launcher() -> bool:
    """This process was started by torchrun (or another env:// launcher)."""
    return all(k in os.environ for k in LAUNCH_ENV)


@dataclass(frozen=True)
class Mesh:
    """This rank's place in a ``data_parallel x tensor_parallel`` mesh and its
    two process groups (``tp_group``: the ranks that hold the shards of one
    replica; ``dp_group``: the ranks that hold the same shard of different
    replicas)."""

    tensor_parallel: int
    data_parallel: int
    rank: int
    tp_rank: int
    dp_rank: int
    tp_group: object
    dp_group: object
    timeout_s: float
    transport: str = "gloo"  # what the tensor-parallel group runs on: gloo, nccl or fxopt_shm
    dp_transport: str = "gloo"  # what the data-parallel group runs on

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.data_parallel


TRANSPORTS = ("auto", "gloo", "shm")


def init(tensor_parallel: int = 1, data_parallel: int | None = None, *, timeout: float = DEFAULT_TIMEOUT_S,
         backend: str | None = None, transport: str = "auto") -> Mesh:
    """Join the default process group (initializing it from torchrun's
    environment if nobody has: gloo on CPU, NCCL with CUDA) and build the
    mesh's groups. ``timeout`` (seconds) bounds every collective: when a rank
    dies or stops answering, the others fail with an error within it instead
    of waiting forever. ``data_parallel`` defaults to the world size over
    ``tensor_parallel``. Every rank must call it with the same arguments.

    ``transport`` is what the mesh's groups run on when the default group is
    gloo: ``shm``, fxopt's shared-memory group
    (:mod:`fxopt.shared_memory_group`; the ranks of each group on one x86-64
    host, sharing its shared-memory folder, which every rank checks with a
    probe file), ``gloo``, or ``auto`` (default): ``shm`` for the
    tensor-parallel groups (several small collectives per layer and token)
    where every one meets those conditions, gloo otherwise. The data-parallel
    groups stay on gloo unless ``transport="shm"``, and then take it where
    they meet the conditions: their exchanges are whole batches of outputs,
    which the shared-memory group maps at twice the group's size (a
    container's small ``/dev/shm`` may not hold them), and measured no faster
    than gloo (``benchmarks/results/parallel.md``). With ``shm`` the
    tensor-parallel groups must meet the conditions."""
    import torch.distributed as dist

    if tensor_parallel < 1 or (data_parallel is not None and data_parallel < 1):
        raise LaunchError(f"tensor_parallel and data_parallel must be at least 1, got {tensor_parallel} and {data_parallel}")
    if not dist.is_available():
        raise LaunchError("this PyTorch build has no torch.distributed")
    wait = timedelta(seconds=float(timeout))
    if not dist.is_initialized():
        missing = [k for k in LAUNCH_ENV if k not in os.environ]
        if missing:
            world = tensor_parallel * (data_parallel or 1)
            raise LaunchError(f"no process group: this process was not started by a distributed launcher "
                              f"({', '.join(missing)} not set); {how_to_launch(world)}")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=wait)
    world, rank = dist.get_world_size(), dist.get_rank()
    data_parallel = data_parallel or max(1, world // tensor_parallel)
    if tensor_parallel * data_parallel != world:
        raise LaunchError(f"{world} processes cannot form a mesh of data_parallel={data_parallel} x "
                          f"tensor_parallel={tensor_parallel} ({tensor_parallel * data_parallel} ranks); "
                          f"{how_to_launch(tensor_parallel * data_parallel)}")
    if transport not in TRANSPORTS:
        raise LaunchError(f"transport={transport!r}: use one of {', '.join(TRANSPORTS)}")
    tp_ranks = [[d * tensor_parallel + t for t in range(tensor_parallel)] for d in range(data_parallel)]
    dp_ranks = [[d * tensor_parallel + t for d in range(data_parallel)] for t in range(tensor_parallel)]
    reports = _shared_memory_reports() if transport != "gloo" and dist.get_backend() == "gloo" and world > 1 else None
    tp_backend = _local_backend(reports, tp_ranks, "tensor-parallel", required=transport == "shm")
    dp_backend = _local_backend(reports, dp_ranks, "data-parallel", required=False) if transport == "shm" else None
    tp_group = dp_group = dist.group.WORLD
    # new_group must be called by every rank for every group, in the same order.
    if tensor_parallel < world or tp_backend is not None:
        for ranks in tp_ranks:
            group = dist.new_group(ranks, timeout=wait, backend=tp_backend)
            if rank in ranks:
                tp_group = group
    if data_parallel < world or dp_backend is not None:
        for ranks in dp_ranks:
            group = dist.new_group(ranks, timeout=wait, backend=dp_backend)
            if rank in ranks:
                dp_group = group
    return Mesh(tensor_parallel, data_parallel, rank, rank % tensor_parallel, rank // tensor_parallel,
                tp_group, dp_group, float(timeout), tp_backend or dist.get_backend(), dp_backend or dist.get_backend())


def _local_backend(reports, groups: list[list[int]], what: str, required: bool) -> str | None:
    """fxopt's shared-memory backend for ``groups`` (the mesh's tensor- or
    data-parallel groups) where every rank of each sees the others' probe
    files; None (the default group's backend) where they do not, where a group
    has one rank, or without ``reports`` (gloo asked for, or a default group
    that is not gloo). ``required``: refuse instead of falling back. Decided
    alike on every rank, from what every rank reports."""
    from . import shared_memory_group as shm

    if reports is None or all(len(g) == 1 for g in groups):
        return None
    local = all(reports[r][0] and set(g) <= reports[r][1] for g in groups for r in g)
    if required and not local:
        described = "; ".join(f"rank {r}: {'x86-64' if ok else 'not x86-64'}, sees the files of ranks {sorted(seen)}"
                              for r, (ok, seen) in enumerate(reports))
        raise LaunchError(f"transport='shm' needs the ranks of each {what} group on one x86-64 host, sharing "
                          f"{shm.directory()}: {described}; use transport='gloo' (or 'auto')")
    if not local:
        return None
    shm.register()
    return shm.BACKEND


def _shared_memory_reports() -> list[tuple[bool, set[int]]]:
    """Per rank: whether it can run the shared-memory group, and the ranks
    whose probe file it sees in its shared-memory folder (the same host name
    is not enough: containers may share one and not the folder)."""
    import uuid

    import torch.distributed as dist

    from . import shared_memory_group as shm

    nonce = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(nonce)
    prefix = f"fxopt-probe-{nonce[0]}-"
    path = os.path.join(shm.directory(), f"{prefix}{dist.get_rank()}")
    try:
        open(path, "x").close()
    except OSError:
        path = None
    dist.barrier()
    try:
        seen = {int(n[len(prefix):]) for n in os.listdir(shm.directory()) if n.startswith(prefix)}
    except OSError:
        seen = set()
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (shm.supported() and path is not None, seen))
    if path is not None:
        os.unlink(path)
    return reports


def relaunch(argv: list[str], nproc: int, *, module: str = "fxopt") -> int:
    """Run ``python -m <module> <argv>`` as ``nproc`` processes under
    torchrun on the local host (``--standalone``: a local rendezvous on a free
    port) and return its exit status. torchrun gives each process one
    OpenMP thread unless OMP_NUM_THREADS is set."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", module, *argv]
    return subprocess.call(command)


# -- processes of one host, without torchrun ------------------------------------------
class RankFailed(RuntimeError):
    """One or more ranks of :func:`run_local` raised or did not report."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(fn, rank, world, port, results, tensor_parallel, timeout, threads, transport, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS=str(threads))
    try:
        torch.set_num_threads(threads)
        mesh = init(tensor_parallel=tensor_parallel, timeout=timeout, transport=transport)
        results.put((rank, "ok", fn(mesh, *args)))
    except BaseException as e:  # noqa: BLE001 - sent to the parent, which reports it
        results.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run_local(fn, world: int, *args, tensor_parallel: int | None = None, timeout: float = DEFAULT_TIMEOUT_S,
              threads: int = 1, wall: float = 600.0, check: bool = True, start: str = "spawn", transport: str = "auto"):
    """Run ``fn(mesh, *args)`` in ``world`` new processes of this host, each
    a rank of a gloo process group (``timeout`` seconds per collective) with
    ``threads`` threads, ``tensor_parallel`` ranks per model (default: all);
    ``fn`` must be importable (a module-level function); ``transport`` as in
    :func:`init`. Returns what each
    rank returned, in rank order. With ``check=False``, returns ``{rank:
    ("ok", value) | ("error", traceback)}`` for the ranks that reported
    within ``wall`` seconds instead of raising :class:`RankFailed`. Processes
    still running after ``wall`` seconds are killed.

    ``start="fork"`` (POSIX) starts the ranks as copies of this process: no
    fresh interpreter imports torch again, and what this process has built
    (traced rewrite patterns, models) is there already, which saves seconds
    per rank. Only from a process that is not itself a rank of a process
    group."""
    import multiprocessing as mp

    if start not in ("spawn", "fork", "forkserver"):
        raise ValueError(f"run_local: start={start!r}; use 'spawn', 'fork' or 'forkserver' (multiprocessing start methods)")
    if start == "fork":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            raise RuntimeError("run_local(start='fork') from a rank of a process group: the copies would share its "
                               "connections; use start='spawn'")
    ctx = mp.get_context(start)
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_entry, args=(fn, r, world, port, results, tensor_parallel or world, timeout, threads,
                                                    transport, args))
             for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, tuple[str, object]] = {}
    deadline = time.monotonic() + wall
    while len(out) < world and time.monotonic() < deadline:
        try:
            rank, status, value = results.get(timeout=0.5)
            out[rank] = (status, value)
        except queue_module.Empty:
            if not any(p.is_alive() for p in procs) and results.empty():
                break
    for p in procs:
        p.join(timeout=5 if len(out) == world else 0.1)
        if p.is_alive():
            p.kill()
            p.join()
    if not check:
        return out
    errors = [f"rank {r}: {v}" for r, (status, v) in sorted(out.items()) if status != "ok"]
    missing = [r for r in range(world) if r not in out]
    if errors or missing:
        raise RankFailed("\n".join(errors + ([f"ranks {missing} did not report within {wall:.0f} s"] if missing else [])))
    return [out[r][1] for r in range(world)]
