"""Backends lower an fxopt Graph to something that runs: eager PyTorch or ONNX Runtime."""

from __future__ import annotations

from ..ir.graph import Graph
from ..ir.targets import register_target
from .base import BackendError, CompiledModel, InputRangeError
from .eager import EagerModel
from .onnxruntime import OnnxRuntimeModel, export_onnx, export_onnx_program
from .onnxruntime_ranks import CollectiveError, OnnxRuntimeRankModel, has_collectives

BACKENDS: dict[str, type[CompiledModel]] = {"eager": EagerModel, "onnxruntime": OnnxRuntimeModel}


def compile(graph: Graph, backend: str = "eager", **options) -> CompiledModel:
    """Lower ``graph`` to ``backend`` ("eager" or "onnxruntime"); options go to the
    backend (eager: ``torch_compile``, ``prepack``, ``cache_in_buffer``;
    onnxruntime: threads, optimization level, providers, ``allow_spinning``). Returns a callable with the model's
    input/output structure and a ``.save(path)``."""
    if not isinstance(graph, Graph):
        raise TypeError(f"fxopt.compile expects an fxopt Graph (from fxopt.trace), got {type(graph).__name__}")
    try:
        cls = BACKENDS[backend]
        if cls is OnnxRuntimeModel and has_collectives(graph):
            cls = OnnxRuntimeRankModel
    except KeyError:
        raise BackendError(f"unknown backend {backend!r}; valid: {sorted(BACKENDS)}") from None
    try:
        return cls(graph, **options)
    except TypeError as e:
        raise BackendError(f"backend {backend!r}: {e}") from e


def load_compiled(path, **options) -> CompiledModel:
    """A compiled model back from the file its ``.save`` wrote: a .pt2 archive
    loads as an eager model, an ONNX file as an ONNX Runtime one; either takes
    the same inputs and returns the same output structure as the model that
    was saved. ``options`` as for :func:`compile` (session options for ONNX
    Runtime, ``torch_compile`` for eager)."""
    import zipfile
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    cls = EagerModel if zipfile.is_zipfile(path) else OnnxRuntimeModel
    try:
        return cls.load(path, **options)
    except TypeError as e:
        raise BackendError(f"backend {cls.backend!r}: {e}") from e


def _measuring_compile(backend: str):
    """How a pass measures on ``backend``: torch's thread count and one
    inter-op thread (ONNX Runtime's threads spin only during a run, see
    ``session_options``, so the float and quantized forms timed in turn do
    not tax each other)."""
    import torch

    def compile_for_measuring(graph: Graph):
        if backend == "onnxruntime":
            return compile(graph, backend, intra_op_threads=torch.get_num_threads(), inter_op_threads=1)
        return compile(graph, backend)

    return compile_for_measuring


for _name in BACKENDS:
    register_target(_name, _measuring_compile(_name))

__all__ = ["compile", "load_compiled", "export_onnx", "export_onnx_program", "BACKENDS", "BackendError", "CompiledModel", "InputRangeError", "EagerModel", "OnnxRuntimeModel", "OnnxRuntimeRankModel", "CollectiveError"]
