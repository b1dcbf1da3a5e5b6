"""The eager backend: runs the GraphModule with PyTorch, optionally under torch.compile."""

from __future__ import annotations

from pathlib import Path

import torch

from ..ir.graph import Graph
from .base import CompiledModel


class EagerModel(CompiledModel):
    backend = "eager"

    def __init__(self, graph: Graph, *, torch_compile: bool = False, compile_options: dict | None = None):
        self.graph = graph
        module = graph.module
        self._fn = torch.compile(module, **(compile_options or {})) if torch_compile else module

    def __call__(self, *args, **kwargs):
        with torch.inference_mode():
            return self._fn(*args, **kwargs)

    def save(self, path) -> Path:
        """Writes the graph as a torch.export archive (.pt2) that ``fxopt.load`` reads."""
        path = Path(path)
        self.graph.save(path)
        return path

    def artifact_bytes(self) -> int:
        return self.graph.param_bytes()
