"""Tracing: ``torch.export.export(strict=False)`` then the unlifted GraphModule.

``torch.fx.symbolic_trace`` fails on Hugging Face models; non-strict export
runs the model's Python for real on fake tensors and records ATen ops.
"""

from __future__ import annotations

from typing import Any

import torch

from .graph import Graph


class TraceError(RuntimeError):
    pass


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """A tensor is one positional input, a tuple/list the positional inputs,
    a dict the keyword inputs."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def trace(model: torch.nn.Module, example_inputs: Any, *, dynamic_shapes: Any = None, name: str | None = None) -> Graph:
    """Trace ``model`` into an fxopt :class:`Graph`.

    ``example_inputs``: a tensor, a tuple of positional inputs or a dict of
    keyword inputs. ``dynamic_shapes``: torch.export's spec (e.g.
    ``{"input_ids": {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}}``); dimensions marked
    there stay symbolic through every pass and both backends.
    The model is traced in eval mode (its mode is restored afterwards).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fxopt.trace expects a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = split_inputs(example_inputs)
    name = name or type(model).__name__
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(f"torch.export could not trace {name}: {type(e).__name__}: {first}") from e
    finally:
        model.train(was_training)
    return graph_from_exported_program(ep, args, kwargs, name=name)


def graph_from_exported_program(ep: torch.export.ExportedProgram, args: tuple, kwargs: dict, name: str = "model") -> Graph:
    module = ep.module(check_guards=False)
    graph = Graph(module, args, kwargs, name)
    graph.prune_unreferenced_attributes()
    graph.refresh_meta()
    graph.verify()
    return graph
