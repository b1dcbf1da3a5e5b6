"""Tracing: ``torch.export.export(strict=False)`` then the unlifted GraphModule.

``torch.fx.symbolic_trace`` fails on Hugging Face models; non-strict export
runs the model's Python for real on fake tensors and records ATen ops.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any

import torch

from .graph import Graph
from .verify import VerificationError


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


def trace(model: torch.nn.Module, example_inputs: Any, *, dynamic_shapes: Any = None, name: str | None = None,
          share_weights: bool = False) -> Graph:
    """Trace ``model`` into an fxopt :class:`Graph`.

    ``example_inputs``: a tensor, a tuple of positional inputs or a dict of
    keyword inputs. ``dynamic_shapes``: torch.export's spec (e.g.
    ``{"input_ids": {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}}``); dimensions marked
    there stay symbolic through every pass and both backends.
    The model is traced in eval mode (its mode is restored afterwards).

    The graph owns a copy of the model's weights and buffers: nothing fxopt
    does with it (passes, compiled models, their calls) writes into the
    model, and editing the model afterwards does not change the graph.
    ``share_weights=True`` reads the model's weights instead of copying them
    (no second copy in memory); buffers the graph writes are still copied, so
    calls still leave the model untouched, but in-place edits of the model's
    weights then reach an eager graph (docs/loading.md).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fxopt.trace expects a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = split_inputs(example_inputs)
    name = name or type(model).__name__
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), traceable_experts(model):
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
            # Functionalize (an empty decomposition table keeps linear, sdpa,
            # layer_norm... whole): in-place ops would make constant folding and
            # CSE unsafe, since a shared or folded tensor could be written into.
            ep = ep.run_decompositions({})
    except Exception as e:
        hint = ""
        if "Cache'> in output" in str(e):
            hint = ("\n  hint: the model returns a Hugging Face KV cache object, which torch.export cannot flatten; "
                    "trace it with use_cache=False (model.config.use_cache = False, or use_cache=False in the inputs)")
        elif "0/1 specialized" in str(e) or re.search(r"specialized it to be a constant \([01]\)", str(e)):  # Dim.DYNAMIC / a named Dim
            hint = ("\n  hint: torch.export takes a size of 0 or 1 in the example inputs as fixed; trace with at least 2 "
                    "along each dynamic dimension (e.g. batch 2), and the traced model still runs batch 1")
        raise TraceError(f"torch.export could not trace {name}: {type(e).__name__}: {_summary(e)}{hint}") from e
    finally:
        model.train(was_training)
    try:
        graph = graph_from_exported_program(ep, args, kwargs, name=name)
    except VerificationError as e:
        raise TraceError(f"{name} traced, but its graph is outside fxopt's IR: {e}") from e
    graph.own_tensors(share_weights=share_weights)
    graph.dim_names = _user_dim_names(graph)
    return graph


# Hugging Face's mixture-of-experts layers run their experts through a
# selectable implementation. The default on CPU ("grouped_mm") calls a custom
# op (``transformers::grouped_mm_fallback``) that no backend lowers, and
# "eager" loops over the tokens routed to each expert, a data-dependent size
# torch.export cannot trace. "batched_mm" gathers each token's chosen experts'
# weights and multiplies them batched: plain ATen ops, the same result.
TRACEABLE_EXPERTS = "batched_mm"


@contextlib.contextmanager
def traceable_experts(model: torch.nn.Module):
    """Runs the experts of every Hugging Face model in ``model`` (itself or
    wrapped) as ``TRACEABLE_EXPERTS`` inside the block and restores each
    model's own choice after it. Models without experts (Hugging Face leaves
    their setting as it is) and other modules are left alone; so is an
    implementation that cannot be switched after loading (the trace then names
    the op it stops at)."""
    switched = []
    try:
        for module in model.modules():
            get = getattr(module, "get_experts_implementation", None)
            current = get() if callable(get) else None
            if current and any(v != TRACEABLE_EXPERTS for v in current.values()):
                switched.append((module, current))  # before switching: a switch that fails halfway is undone too
                try:
                    module.set_experts_implementation(TRACEABLE_EXPERTS)
                except (ValueError, RuntimeError, KeyError):
                    pass
        yield
    finally:
        for module, current in reversed(switched):
            try:
                module.set_experts_implementation(current)
            except Exception as e:  # the others are still restored; an export error in flight stays the error
                warnings.warn(f"could not restore {type(module).__name__}'s experts implementation {current}: {e}")


def _user_dim_names(graph: Graph) -> dict[str, str]:
    """Symbol name -> the name of the user's ``Dim`` it stands for."""
    from .meta import fake_mode_of

    env = fake_mode_of(graph).shape_env
    if env is None:
        return {}
    names = {}
    for symbol, sources in env.var_to_sources.items():
        debug = [env.source_name_to_debug_name.get(s.name) for s in sources]
        target = env.replacements.get(symbol, symbol)
        if any(debug) and getattr(target, "is_Symbol", False):
            names.setdefault(str(target), next(d for d in debug if d))
    return names


def _summary(e: BaseException, max_lines: int = 12) -> str:
    """torch.export's message without the long graph dumps, but with the lines that say how to fix it."""
    noise = ("TORCH_LOGS", "TORCHDYNAMO", "For more", "For C++", "docs.google", "For extended logs")
    lines = [line for line in str(e).strip().splitlines() if line.strip() and not any(n in line for n in noise)]
    if not lines:
        return type(e).__name__
    text = "\n  ".join(lines[:max_lines])
    return text + (f"\n  ... ({len(lines) - max_lines} more lines; rerun with --debug or catch TraceError for all)" if len(lines) > max_lines else "")


def graph_from_exported_program(ep: torch.export.ExportedProgram, args: tuple, kwargs: dict, name: str = "model") -> Graph:
    module = ep.module(check_guards=False)
    graph = Graph(module, args, kwargs, name)
    graph.prune_unreferenced_attributes()
    graph.refresh_meta()
    graph.verify()
    return graph
