"""The eager backend: runs the GraphModule with PyTorch, optionally under torch.compile."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..ir.collectives import (ALL_REDUCE, GROUP, REDUCE_OPS, WAIT, bind_process_group, group_names, in_place_all_reduce,
                              process_group_named, reduce_op)
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
    """``x`` reduced over the process group named ``group_name`` by the group's
    own in-place all-reduce, on a copy (the functional all-reduce it replaces
    leaves ``x`` as it was). The name is resolved at every call, as the
    functional collective does: process groups made again after a
    ``destroy_process_group`` may reuse a name; a group without its own
    all-reduce gets the functional collective."""

    def __init__(self, group_name: str, op: str):
        super().__init__()
        self.group_name, self.op = group_name, op
        self._group = self._reduce = self._op = None

    def forward(self, x):
        group = process_group_named(self.group_name)
        if group is not self._group:
            self._group, self._reduce, self._op = group, in_place_all_reduce(group), reduce_op(self.op)
        if self._reduce is None:
            return WAIT(ALL_REDUCE(x, self.op, self.group_name))
        out = x.clone(memory_format=torch.contiguous_format)
        self._reduce(out, self._op)
        return out

    def __getstate__(self):  # the group and its method stay with the process that resolved them
        return {**self.__dict__, "_group": None, "_reduce": None, "_op": None}


def reducing_in_place(graph: Graph) -> torch.nn.Module:
    """The module that runs ``graph``: its own, or, where an all-reduce runs on
    a group with its own in-place all-reduce
    (:func:`~fxopt.ir.collectives.in_place_all_reduce`), one that shares its
    attributes and in which that all-reduce and its ``wait_tensor`` are one
    :class:`InPlaceAllReduce`. ``graph`` itself (what is saved and printed)
    keeps the functional collectives."""
    if not any(n.op == "call_function" and n.target == ALL_REDUCE for n in graph.fx.nodes):
        return graph.module
    fx_graph = copy.deepcopy(graph.fx)
    replaced = []
    for node in [n for n in fx_graph.nodes if n.op == "call_function" and n.target == ALL_REDUCE]:
        if len(node.args) != 3 or node.kwargs or node.args[1] not in REDUCE_OPS:
            continue
        x, op, name = node.args
        try:
            group = process_group_named(name)
        except (RuntimeError, ValueError):  # no such group here: the functional collective says so when it runs
            continue
        waits = list(node.users)
        if in_place_all_reduce(group) is None or not waits or any(w.target != WAIT for w in waits):
            continue
        target = f"all_reduce_{len(replaced)}"
        with fx_graph.inserting_before(node):
            reduced = fx_graph.call_module(target, (x,))
        reduced.meta = dict(node.meta)
        for wait in waits:
            wait.replace_all_uses_with(reduced)
            fx_graph.erase_node(wait)
        fx_graph.erase_node(node)
        replaced.append((target, InPlaceAllReduce(name, op)))
    if not replaced:
        return graph.module
    # built on the unchanged graph (which names every attribute to take over), then given the rewritten one
    module = fx.GraphModule(graph.module, copy.deepcopy(graph.fx), class_name=type(graph.module).__name__)
    for target, reduce in replaced:
        module.add_submodule(target, reduce)
    module.graph = fx_graph
    return module
