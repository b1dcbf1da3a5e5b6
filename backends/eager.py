"""The eager backend: runs the GraphModule with PyTorch, optionally under torch.compile."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.utils._pytree as pytree

from ..ir.collectives import ALL_REDUCE, GROUP, WAIT, bind_process_group, group_names, in_place_all_reduce
from ..ir.graph import Graph
from .base import CompiledModel


class EagerModel(CompiledModel):
    backend = "eager"

    def __init__(self, graph: Graph, *, torch_compile: bool = False, compile_options: dict | None = None):
        if GROUP in group_names(graph):
            # a tensor-parallel rank graph runs its collectives in this process's group
            graph = bind_process_group(graph)
        self.graph = graph
        if torch_compile:
            self._fn = torch.compile(graph.module, **(compile_options or {}))
        else:
            self._fn = reducing_in_place(graph)

    def __call__(self, *args, **kwargs):
        # Rebuilt in the traced structure, so that a model traced with keyword
        # inputs can be called positionally too, as the original can.
        leaves = self.graph_inputs(self.graph, args, kwargs, self.index_bounds)
        args, kwargs = pytree.tree_unflatten(leaves, self.graph.fx._codegen.pytree_info.in_spec)
        with torch.inference_mode():
            return self._fn(*args, **kwargs)

    def save(self, path) -> Path:
        """Writes the graph as a torch.export archive (.pt2) that ``fxopt.load`` reads."""
        path = Path(path)
        self.graph.save(path)
        return path

    @classmethod
    def load(cls, path, **options) -> "EagerModel":
        """A compiled model from a file :meth:`save` wrote (``fxopt.load``
        of the graph, compiled with ``options``)."""
        return cls(Graph.load(path), **options)

    def artifact_bytes(self) -> int:
        return self.graph.param_bytes()


class InPlaceAllReduce(torch.nn.Module):
    """``x`` reduced over a group by the group's own in-place all-reduce, on a
    copy (the functional all-reduce it replaces leaves ``x`` as it was)."""

    def __init__(self, reduce, op):
        super().__init__()
        self.reduce, self.op = reduce, op

    def forward(self, x):
        out = x.clone(memory_format=torch.contiguous_format)
        self.reduce(out, self.op)
        return out


def reducing_in_place(graph: Graph) -> torch.nn.Module:
    """The module that runs ``graph``: its own, or, where an all-reduce runs on
    a group with its own in-place all-reduce
    (:func:`~fxopt.ir.collectives.in_place_all_reduce`), a copy in which that
    all-reduce and its ``wait_tensor`` are one call of it. ``graph`` itself
    (what is saved and printed) keeps the functional collectives."""
    import torch.distributed as dist

    reduces = [n for n in graph.fx.nodes if n.op == "call_function" and n.target == ALL_REDUCE]
    if not reduces:
        return graph.module
    from torch.distributed.distributed_c10d import _resolve_process_group

    ops = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
           "product": dist.ReduceOp.PRODUCT}
    run = graph.copy()
    replaced = 0
    for node in [n for n in run.fx.nodes if n.op == "call_function" and n.target == ALL_REDUCE]:
        x, op, name = node.args
        try:
            reduce = in_place_all_reduce(_resolve_process_group(name))
        except Exception:  # no such group here: the functional collective says so when it runs
            continue
        waits = list(node.users)
        if reduce is None or op not in ops or not waits or any(w.target != WAIT for w in waits):
            continue
        target = f"all_reduce_{replaced}"
        run.module.add_submodule(target, InPlaceAllReduce(reduce, ops[op]))
        with run.fx.inserting_before(node):
            reduced = run.fx.call_module(target, (x,))
        reduced.meta = dict(node.meta)
        for wait in waits:
            wait.replace_all_uses_with(reduced)
            run.fx.erase_node(wait)
        run.fx.erase_node(node)
        replaced += 1
    if not replaced:
        return graph.module
    run.recompile()
    return run.module

