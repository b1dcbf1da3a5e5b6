"""A torch.distributed process group for the ranks of one host, through shared memory.

gloo carries every collective over TCP sockets, even between two processes of
one machine, and hands it to its own I/O threads: an all-reduce of one token's
hidden state (768 floats) costs a large part of a millisecond
(benchmarks/results/parallel.md), and a tensor-parallel decoder does two per
layer. Ranks of
one host can exchange through memory instead: each rank writes its tensor into
its own slot of a file mapped by all of them, publishes a sequence number, and
waits, spinning, until every rank has published the same one; then every rank
reduces the slots in rank order, so all ranks hold bitwise-equal results.

The group is an ordinary torch.distributed process group, registered as the
backend ``fxopt_shm`` (:data:`BACKEND`)::

    fxopt.shared_memory_group.register()
    group = torch.distributed.new_group(ranks, backend="fxopt_shm")

so ``torch.distributed.all_reduce(x, group=group)`` and the functional
collectives of a bound rank graph (``_c10d_functional.all_reduce(x, "sum",
group.group_name)``) run through it; rendezvous goes through the store of the
default (gloo) group. :func:`fxopt.launch.init` builds the tensor-parallel group
on it when every rank of that group sees the others' files in the same
shared-memory folder (``transport="auto"``).

Supported: ``all_reduce`` (sum, avg, max, min, product), ``all_gather`` /
``all_gather_into_tensor``, ``reduce_scatter_tensor`` (sum), ``broadcast``,
``scatter``, ``gather`` and ``barrier``; the others raise and name the
collective. Every rank must call each collective with the same sizes (checked:
a rank that does not raises). A rank that stops answering makes the others
raise after the group's timeout, and one whose process is gone within a tenth
of a second (where the ranks share a PID namespace). Only on x86-64: it relies on stores becoming visible to other
cores in program order (the slot before the sequence number), which x86's
memory model guarantees and weaker ones (ARM, POWER) do not.
"""

from __future__ import annotations

import mmap
import os
import platform
import tempfile
import threading
import time
import uuid
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

BACKEND = "fxopt_shm"
_LINE = 64  # one cache line per rank's sequence number: ranks never write the same line
_SPIN = 2000  # busy polls before the waiting rank starts yielding its core
_DOZE_S = 1e-3  # after yielding this long, a waiting rank sleeps between polls instead of burning its core
_PREFIX = "fxopt-shm-"


def supported() -> bool:
    """This process can use the shared-memory group (x86-64, torch.distributed)."""
    return platform.machine().lower() in ("x86_64", "amd64") and dist.is_available()


def register() -> None:
    """Make ``backend="fxopt_shm"`` known to torch.distributed in this process
    (idempotent; every rank that creates such a group must call it)."""
    if not supported():
        raise RuntimeError(f"the {BACKEND} process group needs x86-64 (this is {platform.machine()}); use gloo")
    if BACKEND.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(BACKEND, SharedMemoryGroup, devices=["cpu"])
        _sweep()


def directory() -> str:
    """Where the shared files live: ``/dev/shm`` (memory), else the temporary folder."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _sweep() -> None:
    """Remove the files of creators that died before every rank had mapped
    them (the name holds the creator's process id)."""
    try:
        names = [n for n in os.listdir(directory()) if n.startswith(_PREFIX)]
    except OSError:
        return
    for name in names:
        pid = name[len(_PREFIX):].partition("-")[0]
        if pid.isdigit() and not _exists(int(pid)):
            try:
                os.unlink(os.path.join(directory(), name))
            except OSError:
                pass


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "unknown"


def _exists(pid: int) -> bool:
    """A process ``pid`` runs (an exited one not yet reaped by its parent does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: signal 0 tells whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def _shared_map(store, rank: int, world: int, key: str, size: int) -> mmap.mmap:
    """A file of ``size`` bytes that every rank maps: rank 0 creates it and
    publishes its path in the store, the others open it, and the last rank to
    map it unlinks the name (the mappings stay valid). The memory is
    allocated up front, so a full ``/dev/shm`` raises here rather than killing
    a rank with SIGBUS at its first write. The mapping is unmapped when the
    last tensor viewing it goes (tensors keep the mmap object alive)."""
    if rank == 0:
        path = os.path.join(directory(), f"{_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            raise RuntimeError(f"{BACKEND}: cannot allocate {size} bytes in {directory()} ({e}); free space there or "
                               "use transport='gloo'") from None
        store.set(key, path)
    else:
        path = store.get(key).decode()
        fd = os.open(path, os.O_RDWR)
    try:
        mapped = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    if store.add(f"{key}/mapped", 1) == world:
        os.unlink(path)
    return mapped


class SharedMemoryGroup(dist.ProcessGroup):
    """The ``fxopt_shm`` process group: collectives of ranks on one host
    through one shared mapping (see the module docstring). Created by
    torch.distributed (``new_group(..., backend="fxopt_shm")``) with the
    group's prefixed store, this rank's place, the group size and timeout."""

    def __init__(self, store, rank: int, world: int, timeout: timedelta):
        super().__init__(rank, world)
        self._store, self._rank, self._world = store, rank, world
        self._timeout_s = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
        self._name = ""
        self._seq = 0
        self._others = [r for r in range(world) if r != rank]
        # Per rank, one cache line each: [sequence number, bytes of the even round's, of the odd round's collective].
        self._flags = np.ndarray((world, _LINE // 8), dtype=np.int64,
                                 buffer=_shared_map(store, rank, world, "control", _LINE * world))
        self._slots: torch.Tensor | None = None  # [2, world, capacity] bytes: two rounds, one slot per rank
        self._capacity = 0
        self._generation = 0
        self._views: dict = {}  # (shape, dtype) -> each round's (this rank's slot, all slots)
        # Process ids, to fail at once when a peer exits; only where every rank is in
        # this PID namespace (elsewhere a peer's id means another process or none).
        store.set(f"pid/{rank}", f"{os.getpid()} {_pid_namespace()}")
        pids = [store.get(f"pid/{q}").decode().split() for q in range(world)]
        self._pids = [int(p) for p, _ in pids] if len({ns for _, ns in pids}) == 1 else []
        # A lock-prefixed instruction (taking a lock) drains this core's store buffer,
        # non-temporal stores of a large copy included, before the sequence number is written.
        self._fence = threading.Lock()

    # torch.distributed names the group after creating it; the binding's own
    # group_name does not read back what a Python subclass was given.
    def _set_group_name(self, name: str) -> None:
        self._name = name
        super()._set_group_name(name)

    @property
    def group_name(self) -> str:
        return self._name

    def getBackendName(self) -> str:  # noqa: N802 - torch.distributed's name
        return BACKEND

    # -- the exchange ---------------------------------------------------------
    def _grow(self, nbytes: int) -> None:
        """Every rank reaches the same collectives with the same sizes, so all
        grow the mapping at the same call; a rank still reading the previous
        round keeps its old mapping until it grows too."""
        capacity = max(1 << 16, 1 << (nbytes - 1).bit_length())
        self._generation += 1
        data = _shared_map(self._store, self._rank, self._world, f"data{self._generation}", 2 * self._world * capacity)
        self._views.clear()
        self._slots = torch.frombuffer(data, dtype=torch.uint8).view(2, self._world, capacity)
        self._capacity = capacity

    def _exchange(self, x: torch.Tensor, what: str, contribute: bool = True) -> torch.Tensor:
        """Every rank's ``x`` (same shape and dtype on all), as a ``[world,
        x.numel()]`` view of the shared slots, valid until this rank's next
        collective but one. With ``contribute=False`` this rank's slot is left
        unwritten (only ``x``'s shape and dtype count: a rooted collective's
        other ranks)."""
        key = (x.shape, x.dtype)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = self._slot_views(x)
        self._seq += 1
        seq = self._seq
        mine, parts = views[seq & 1]
        if mine is not None and contribute:
            mine.copy_(x)
        nbytes = x.numel() * x.element_size()
        # A rank may already be one collective ahead: sizes are kept per round, like the slots.
        with self._fence:
            self._flags[self._rank, 1 + (seq & 1)] = nbytes
            self._flags[self._rank, 0] = seq
        self._wait(seq, what)
        sizes = self._flags[:, 1 + (seq & 1)]
        if (sizes != nbytes).any():
            raise RuntimeError(f"{BACKEND} group {self._name!r}: {what} #{seq}: the ranks gave {sizes.tolist()} bytes "
                               f"(rank order); every rank must give the same shape and dtype")
        return parts

    def _slot_views(self, x: torch.Tensor):
        """For each of the two rounds: this rank's slot shaped like ``x``, and
        every rank's slot flattened, ``[world, numel]``."""
        nbytes = x.numel() * x.element_size()
        if nbytes > self._capacity:
            self._grow(nbytes)
        if nbytes == 0:
            return [(None, x.new_empty((self._world, 0)))] * 2
        rounds = []
        for half in self._slots:
            parts = half[:, :nbytes].view(x.dtype)
            rounds.append((parts[self._rank].view(x.shape), parts))
        return rounds

    def _wait(self, seq: int, what: str) -> None:
        """Until every rank has published ``seq``: spinning, then yielding the
        core (ranks may outnumber cores), then sleeping between polls; failing
        after the timeout, or once a late rank's process is gone."""
        flags = self._flags
        spins, start, checked = 0, 0.0, 0.0
        for r in self._others:
            while flags[r, 0] < seq:
                spins += 1
                if spins <= _SPIN:
                    continue
                if spins == _SPIN + 1:
                    start = time.monotonic()
                waited = time.monotonic() - start
                if waited < _DOZE_S:
                    os.sched_yield()
                    continue
                time.sleep(50e-6)
                if waited > self._timeout_s:
                    self._fail(seq, what, f"did not reach it within the group's timeout ({self._timeout_s:g} s); "
                                          "they exited or stopped")
                if waited - checked > 0.1:
                    checked = waited
                    gone = [q for q in self._others if flags[q, 0] < seq and not self._alive(q)]
                    if gone:
                        self._fail(seq, what, "exited before reaching it", late=gone)

    def _alive(self, rank: int) -> bool:
        """Whether rank ``rank``'s process still exists (True where this
        process cannot see the others' process ids)."""
        return not self._pids or _exists(self._pids[rank])

    def _fail(self, seq: int, what: str, reason: str, late=None):
        late = late if late is not None else [q for q in self._others if self._flags[q, 0] < seq]
        raise RuntimeError(f"{BACKEND} group {self._name!r}: {what} #{seq} on rank {self._rank}: rank(s) {late} {reason}")

    @staticmethod
    def _done(result) -> dist.Work:
        fut = torch.futures.Future()
        fut.set_result(result)
        return torch._C._distributed_c10d._create_work_from_future(fut)

    # -- collectives ------------------------------------------------------------
    # Each runs in inference mode: the tensors may be inference tensors (a KV
    # cache made under torch.inference_mode), which only it may write in place.
    @torch.inference_mode()
    def allreduce(self, tensors, opts=None):
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        for t in tensors:
            self.all_reduce_tensor(t, op)
        return self._done(tensors)

    @torch.inference_mode()
    def all_reduce_tensor(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        """``t`` reduced over the group in place: ``dist.all_reduce(t, op,
        group)`` without torch.distributed's round trip (its dispatcher calling
        back into Python and a ``Work`` per call, which cost more than the
        exchange itself). Both backends call it directly
        (:func:`fxopt.ir.collectives.in_place_all_reduce`)."""
        parts = self._exchange(t, "all_reduce")
        out = t.view(-1) if t.is_contiguous() else torch.empty(t.numel(), dtype=t.dtype)
        if op == dist.ReduceOp.SUM or op == dist.ReduceOp.AVG:
            torch.add(parts[0], parts[1], out=out) if self._world == 2 else torch.sum(parts, 0, out=out)
            if op == dist.ReduceOp.AVG:
                out.div_(self._world)
        elif op == dist.ReduceOp.MAX:
            torch.amax(parts, 0, out=out)
        elif op == dist.ReduceOp.MIN:
            torch.amin(parts, 0, out=out)
        elif op == dist.ReduceOp.PRODUCT:
            torch.prod(parts, 0, out=out)
        else:
            raise RuntimeError(f"{BACKEND} group {self._name!r}: all_reduce with {op} is not supported; "
                               "use sum, avg, max, min or product, or a gloo group")
        if not t.is_contiguous():
            t.copy_(out.view(t.shape))

    @torch.inference_mode()
    def allgather(self, output_tensors, input_tensors, opts=None):
        for outs, x in zip(output_tensors, input_tensors):
            parts = self._exchange(x, "all_gather")
            for r, out in enumerate(outs):
                out.copy_(parts[r].view(x.shape))
        return self._done(output_tensors)

    @torch.inference_mode()
    def all_gather_single(self, output, input, opts=None):
        parts = self._exchange(input, "all_gather_into_tensor")
        if output.is_contiguous():
            output.view(self._world, -1).copy_(parts)
        else:
            output.copy_(parts.reshape(output.shape))
        return self._done([output])

    _allgather_base = all_gather_single

    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        for output, x in zip(outputs, inputs):  # what the functional all_gather_into_tensor reaches
            self.all_gather_single(output, x, opts)
        return self._done(outputs)

    allgather_into_tensor_coalesced = all_gather_single_coalesced  # its name in older torch

    @torch.inference_mode()
    def broadcast(self, tensors, opts=None):
        root = opts.rootRank if opts is not None else 0
        for t in tensors:
            parts = self._exchange(t, "broadcast", contribute=self._rank == root)
            if self._rank != root:
                t.copy_(parts[root].view(t.shape))
        return self._done(tensors)

    @torch.inference_mode()
    def scatter(self, output_tensors, input_tensors, opts=None):
        """The root's ``input_tensors[0][r]`` to rank ``r`` (DTensor shards weights with it)."""
        root = opts.rootRank if opts is not None else 0
        out = output_tensors[0]
        if self._rank == root:
            parts = self._exchange(torch.stack(list(input_tensors[0])), "scatter")
        else:
            parts = self._exchange(out.new_empty((self._world, *out.shape)), "scatter", contribute=False)
        out.copy_(parts[root].view(self._world, *out.shape)[self._rank])
        return self._done(output_tensors)

    @torch.inference_mode()
    def gather(self, output_tensors, input_tensors, opts=None):
        """Every rank's ``input_tensors[0]`` into the root's ``output_tensors[0]`` list."""
        root = opts.rootRank if opts is not None else 0
        x = input_tensors[0]
        parts = self._exchange(x, "gather")
        if self._rank == root:
            for r, out in enumerate(output_tensors[0]):
                out.copy_(parts[r].view(x.shape))
        return self._done(output_tensors)

    @torch.inference_mode()
    def barrier(self, opts=None):
        self._exchange(torch.empty(0), "barrier")
        return self._done([])

    @torch.inference_mode()
    def reduce_scatter_single(self, output, input, opts=None):
        """Sum over ranks, then this rank's ``output.numel()`` elements (rank order)."""
        if opts is not None and opts.reduceOp != dist.ReduceOp.SUM:
            raise RuntimeError(f"{BACKEND} group {self._name!r}: reduce_scatter supports sum only, not {opts.reduceOp}")
        parts = self._exchange(input, "reduce_scatter")
        n = output.numel()
        mine = parts[:, self._rank * n:(self._rank + 1) * n]
        torch.sum(mine, 0, out=output.view(-1)) if output.is_contiguous() else output.copy_(mine.sum(0).view(output.shape))
        return self._done([output])

    _reduce_scatter_base = reduce_scatter_single  # its name in older torch

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        for output, x in zip(outputs, inputs):  # what the functional reduce_scatter_tensor reaches
            self.reduce_scatter_single(output, x, opts)
        return self._done(outputs)

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced


def _unsupported(name: str):
    def refuse(self, *args, **kwargs):
        raise RuntimeError(f"{BACKEND} group {self._name!r}: {name} is not supported (all_reduce, all_gather, "
                           "reduce_scatter, broadcast, scatter, gather and barrier are); run it on a gloo group")

    refuse.__name__ = name
    return refuse


# The point-to-point and rooted collectives a tensor-parallel graph does not use.
for _name in ("send", "recv", "recv_anysource", "alltoall", "alltoall_base", "all_to_all_single", "reduce",
              "reduce_scatter", "allreduce_coalesced", "allgather_coalesced"):
    setattr(SharedMemoryGroup, _name, _unsupported(_name))
