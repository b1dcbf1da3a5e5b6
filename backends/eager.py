"""The eager backend: runs the GraphModule with PyTorch, optionally under torch.compile."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.utils._pytree as pytree

from ..ir.collectives import GROUP, bind_process_group, group_names
from ..ir.graph import Graph
from .base import CompiledModel


class EagerModel(CompiledModel):
    backend = "eager"

    def __init__(self, graph: Graph, *, torch_compile: bool = False, compile_options: dict | None = None):
        if GROUP in group_names(graph):
            # a tensor-parallel rank graph runs its collectives in this process's group
            graph = bind_process_group(graph)
        self.graph = graph
        module = graph.module
        self._fn = torch.compile(module, **(compile_options or {})) if torch_compile else module

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
