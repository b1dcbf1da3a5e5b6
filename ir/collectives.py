"""Collectives as nodes of fxopt's IR.

A tensor-parallel rank graph communicates through the functional collectives
that ``torch.export`` traces, each followed by its ``wait_tensor``::

    ar = torch.ops._c10d_functional.all_reduce.default(x, "sum", "tp")
    y = torch.ops._c10d_functional.wait_tensor.default(ar)
    ag = torch.ops._c10d_functional.all_gather_into_tensor.default(x, N, "tp")
    z = torch.ops._c10d_functional.wait_tensor.default(ag)       # [N * x.shape[0], ...]

These are the ops torch's functional collectives trace to
(``torch.distributed._functional_collectives.all_reduce`` and
``all_gather_single``, which replaces the deprecated ``all_gather_tensor`` and
still traces to ``all_gather_into_tensor``); at run time outside a graph the
ONNX Runtime rank runner calls ``torch.distributed.all_gather_single``.

The group is written as the literal :data:`GROUP` (``"tp"``), a name no real
process group has: a graph is bound to the process group it runs in by
:func:`bind_group`, which rewrites the literal into that group's
``group_name``. Shapes of these ops are known without a process group (their
fake kernels need none), so passes, printing and saving work on unbound graphs.
"""

from __future__ import annotations

import torch
import torch.fx as fx

c10d = torch.ops._c10d_functional
ALL_REDUCE = c10d.all_reduce.default
ALL_GATHER = c10d.all_gather_into_tensor.default
WAIT = c10d.wait_tensor.default
COLLECTIVES = (ALL_REDUCE, ALL_GATHER, WAIT)
GROUP = "tp"


def is_collective(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in COLLECTIVES


def insert_all_reduce(graph, x: fx.Node, group: str = GROUP) -> fx.Node:
    """``wait_tensor(all_reduce(x, "sum", group))`` placed right after ``x``;
    returns the wait node (the summed value)."""
    with graph.fx.inserting_after(x):
        reduced = graph.fx.call_function(ALL_REDUCE, (x, "sum", group))
    with graph.fx.inserting_after(reduced):
        return graph.fx.call_function(WAIT, (reduced,))


def insert_all_gather(graph, x: fx.Node, world_size: int, group: str = GROUP) -> fx.Node:
    """``wait_tensor(all_gather_into_tensor(x, world_size, group))`` right after
    ``x``: the ranks' tensors stacked along dim 0."""
    with graph.fx.inserting_after(x):
        gathered = graph.fx.call_function(ALL_GATHER, (x, world_size, group))
    with graph.fx.inserting_after(gathered):
        return graph.fx.call_function(WAIT, (gathered,))


def group_names(graph) -> set[str]:
    """The group names the graph's collectives use."""
    return {n.args[2] for n in graph.fx.nodes if n.op == "call_function" and n.target in (ALL_REDUCE, ALL_GATHER)}


def count(graph, target) -> int:
    return sum(1 for n in graph.fx.nodes if n.op == "call_function" and n.target == target)


def bind_group(graph, group_name: str, placeholder: str = GROUP):
    """A copy of ``graph`` whose collectives on ``placeholder`` run in the
    process group named ``group_name`` (``ProcessGroup.group_name``)."""
    bound = graph.copy()
    for node in bound.fx.nodes:
        if node.op == "call_function" and node.target in (ALL_REDUCE, ALL_GATHER) and node.args[2] == placeholder:
            node.args = (*node.args[:2], group_name)
    bound.recompile()
    return bound


REDUCE_OPS = ("sum", "avg", "max", "min", "product")  # the ``op`` strings of ``all_reduce``


def reduce_op(name: str):
    """``torch.distributed.ReduceOp`` of an ``all_reduce``'s ``op`` string."""
    import torch.distributed as dist

    return {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
            "product": dist.ReduceOp.PRODUCT}[name]


def process_group_named(name: str):
    """This process's process group named ``name`` (``ProcessGroup.group_name``,
    what a bound graph's collectives name); raises if there is none."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def in_place_all_reduce(group):
    """``group``'s own all-reduce of a tensor in place, ``fn(tensor, op)``
    (``op`` a ``torch.distributed.ReduceOp``), where the group offers one
    (``all_reduce_tensor``: fxopt's shared-memory group), else None. The
    backends call it instead of torch.distributed's entry points, whose way into
    a group written in Python (the dispatcher calling back into Python, a
    ``Work`` per call) costs more than the exchange of one token's hidden state."""
    try:
        backend = group._get_backend(torch.device("cpu"))
    except (AttributeError, RuntimeError):  # the group is the backend itself
        backend = group
    return getattr(backend, "all_reduce_tensor", None)


class ProcessGroupError(RuntimeError):
    """A graph with collectives was run without a process group that fits it."""


def rank_of(graph) -> tuple[int, int] | None:
    """``(rank, world_size)`` the ``tensor-parallel`` pass built ``graph`` for (None if it did not)."""
    for prop in graph.properties:
        if prop.startswith("tensor-parallel-rank="):
            rank, _, n = prop.partition("=")[2].partition("/")
            return int(rank), int(n)
    return None


def bind_process_group(graph, group=None):
    """A copy of ``graph`` whose ``"tp"`` collectives run in ``group`` (default:
    the default process group of ``torch.distributed``). Raises
    :class:`ProcessGroupError` saying how to launch when no process group is
    initialized, or when the group's size is not the graph's world size."""
    import torch.distributed as dist

    rank, n = rank_of(graph) or (None, None)
    if not (dist.is_available() and dist.is_initialized()):
        nproc = n if n is not None else "N"
        raise ProcessGroupError(
            f"graph {graph.name!r} holds tensor-parallel collectives (group {GROUP!r}) but no torch.distributed process "
            f"group is initialized: launch one process per rank with `torchrun --nproc-per-node {nproc} your_script.py` "
            "and call torch.distributed.init_process_group('gloo') (or 'nccl') before running it")
    group = group if group is not None else dist.group.WORLD
    size = dist.get_world_size(group)
    if n is not None and size != n:
        raise ProcessGroupError(f"graph {graph.name!r} is a rank of a {n}-way tensor-parallel split, "
                                f"but the process group has {size} ranks")
    if rank is not None and dist.get_rank(group) != rank:
        raise ProcessGroupError(f"graph {graph.name!r} is rank {rank}'s graph, but this process is rank "
                                f"{dist.get_rank(group)} of the group: give each process its own rank's graph")
    return bind_group(graph, group.group_name)
