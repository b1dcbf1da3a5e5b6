"""Tracing the functions of a pattern: signatures, scalar captures (with their
sentinels), the symbolic-size wildcard, and one export for all functions of a
pattern. The clean-up that makes a traced function look like a model's graph
(canonicalize, dce) is a parameter: a pipeline text or a callable."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

DEFAULT_SHAPE = (8, 8)
# What a traced pattern is cleaned with, so that it holds the op set a
# canonicalized model graph holds (identity views, casts and asserts dropped).
DEFAULT_CLEANUP = "canonicalize(linear=false),dce"


class PatternError(ValueError):
    """A pattern or replacement that cannot be traced or does not fit its pattern."""


class Size:
    """Annotation of a pattern parameter that is a *size*: it matches a literal
    int or a symbolic size of the graph (a ``sym_size`` node, as views of a
    dynamic batch or sequence write ``[B, S, N, H]``), and binds it. Traced as an
    int (``inputs={"b": 2}`` gives the example value)::

        def split_heads(x, b: Size, s: Size, n: Size, h: Size):
            return x.view(b, s, n, h).transpose(1, 2)
    """


@dataclass(frozen=True)
class Capture:
    """A scalar parameter's spot in a traced function (its sentinel replaced)."""

    name: str


@dataclass
class Traced:
    graph: Any  # fxopt Graph
    params: dict[str, fx.Node]  # tensor parameter -> placeholder
    outputs: list  # output nodes (or placeholders / literals)
    nodes: list[fx.Node]  # computing nodes, in order


def scalar_kind(param: inspect.Parameter) -> type | None:
    ann = param.annotation
    if ann in (float, "float"):
        return float
    if ann in (int, "int"):
        return int
    if ann in (torch.dtype, "torch.dtype"):
        return torch.dtype
    if ann in (Size, "Size"):
        return Size
    return None


def signature(fn: Callable, what: str) -> tuple[list[str], dict[str, type]]:
    """(tensor parameters, scalar parameter -> kind) of ``fn``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise PatternError(f"{what}: cannot read the signature of {fn!r}: {e}") from e
    tensors, scalars = [], {}
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise PatternError(f"{what}: *args/**kwargs are not supported in patterns ({name})")
        kind = scalar_kind(p)
        if kind is None:
            tensors.append(name)
        else:
            scalars[name] = kind
    return tensors, scalars


def function(name: str, params: list[str] | dict[str, Any], body: Callable[..., Any]) -> Callable:
    """A pattern function with the given parameters (names, or name -> annotation
    such as ``int``), whose result is ``body(**params)``: for patterns whose
    number of parameters depends on a setting (``n`` linears on one input need
    ``n`` weights), where writing each function out is repetitive."""
    annotations = params if isinstance(params, dict) else dict.fromkeys(params, inspect.Parameter.empty)
    P = inspect.Parameter

    def fn(**kwargs):
        return body(**kwargs)

    fn.__signature__ = inspect.Signature([P(n, P.POSITIONAL_OR_KEYWORD, annotation=a) for n, a in annotations.items()])
    fn.__name__ = fn.__qualname__ = name
    return fn


def replace_literals(value, table: dict):
    """Sentinel literals -> captures (or captures -> values), through lists and keyword dicts."""
    if isinstance(value, (list, tuple)):
        return type(value)(replace_literals(v, table) for v in value)
    if isinstance(value, dict):
        return {k: replace_literals(v, table) for k, v in value.items()}
    if isinstance(value, (bool, fx.Node)) or not isinstance(value, (int, float, torch.dtype, Capture)):
        return value
    key = (type(value), value)
    return table.get(key, value)


def uses_capture(t: Traced, name: str) -> bool:
    found = []
    for node in t.graph.fx.nodes:
        fx.node.map_aggregate((node.args, node.kwargs), lambda a: found.append(a) if a == Capture(name) else None)
    return bool(found)


def run_cleanup(cleanup, graph) -> None:
    """Apply ``cleanup`` (pipeline text, or a callable taking the graph) to ``graph``."""
    if cleanup is None:
        return
    if callable(cleanup):
        cleanup(graph)
        return
    from ..pipeline import parse_pipeline  # the pipeline syntax, not any pass: passes come from the registry

    for item in parse_pipeline(cleanup):
        item(graph)


class _ManyModule(torch.nn.Module):
    def __init__(self, calls: list[tuple[Callable, list[str], dict[str, Any]]]):
        super().__init__()
        self.calls = calls

    def forward(self, *tensors):
        outs, i = [], 0
        for fn, names, scalars in self.calls:
            out = fn(**dict(zip(names, tensors[i:i + len(names)])), **scalars)
            i += len(names)
            outs += list(out) if isinstance(out, (tuple, list)) else [out]
        return tuple(outs)

    def counts(self, tensors) -> list[int]:
        """How many values each function returns (export runs the module on a copy)."""
        counts, i = [], 0
        with torch.no_grad():
            for fn, names, scalars in self.calls:
                out = fn(**dict(zip(names, tensors[i:i + len(names)])), **scalars)
                i += len(names)
                counts.append(len(out) if isinstance(out, (tuple, list)) else 1)
        return counts


def trace_function(fn: Callable, what: str, inputs: dict[str, Any], sentinels: dict[str, Any], cleanup=DEFAULT_CLEANUP) -> Traced:
    """Trace ``fn``; its parameters named in ``sentinels`` are scalar captures."""
    return trace_functions([(fn, what, sentinels)], inputs, cleanup)[0]


# Passes run inside a user's torch.inference_mode() too, where torch.randn makes
# inference tensors that torch.export refuses as inputs.
@torch.inference_mode(False)
def trace_functions(calls: list[tuple[Callable, str, dict[str, Any]]], inputs: dict[str, Any], cleanup=DEFAULT_CLEANUP) -> list[Traced]:
    """Trace several functions with one export (tracing is what costs: the
    forms of a pattern are traced together); each keeps its own placeholders,
    nodes and outputs in the shared graph. ``calls``: (fn, what, sentinels)."""
    from ...ir.trace import trace

    prepared, examples = [], []
    for fn, what, sentinels in calls:
        tensors, scalar_kinds = signature(fn, what)
        tensor_names = [n for n in [*tensors, *scalar_kinds] if n not in sentinels]
        scalar_names = [n for n in [*tensors, *scalar_kinds] if n in sentinels]
        for name in tensor_names:
            spec = inputs.get(name, DEFAULT_SHAPE)
            # a copy per use: export would make one input of a tensor passed twice
            examples.append(spec.clone() if isinstance(spec, torch.Tensor) else torch.randn(*spec))
        prepared.append((fn, tensor_names, {name: sentinels[name] for name in scalar_names}))
    whats = " / ".join(what for _, what, _ in calls)
    module = _ManyModule(prepared)
    try:
        counts = module.counts(examples)
        graph = trace(module, tuple(examples), name=calls[0][1])
        run_cleanup(cleanup, graph)
        graph.recompile()
    except Exception as e:
        names = ", ".join(repr(getattr(fn, "__name__", fn)) for fn, _, _ in calls)
        raise PatternError(f"{whats}: tracing {names} failed: {type(e).__name__}: {e}") from e
    phs = graph.placeholders()
    (out,) = [n for n in graph.fx.nodes if n.op == "output"]
    outs = out.args[0]
    all_outputs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    order = {n: i for i, n in enumerate(graph.fx.nodes)}
    result, owner, p_at, o_at = [], {}, 0, 0
    for (fn, what, _), (_, tensor_names, scalars), count in zip(calls, prepared, counts):
        my_phs = phs[p_at:p_at + len(tensor_names)]
        outputs = all_outputs[o_at:o_at + count]
        p_at, o_at = p_at + len(tensor_names), o_at + count
        nodes, stack = set(), [o for o in outputs if isinstance(o, fx.Node)]
        while stack:
            n = stack.pop()
            if n in nodes or n.op == "placeholder":
                continue
            nodes.add(n)
            stack.extend(n.all_input_nodes)
        for n in nodes:
            if owner.setdefault(n, what) != what:
                raise PatternError(f"{whats}: {owner[n]} and {what} share the traced node %{n.name}; trace them apart")
        table = {(type(v), v): Capture(k) for k, v in scalars.items()}
        found: set[str] = set()
        for node in nodes:
            if node.op == "call_function":
                node.args = replace_literals(node.args, table)
                node.kwargs = replace_literals(node.kwargs, table)
            fx.node.map_aggregate((node.args, node.kwargs), lambda a: found.add(a.name) if isinstance(a, Capture) else None)
        lost = sorted(set(scalars) - found)
        if lost:
            # Python arithmetic on a capture bakes a number derived from its
            # sentinel into the graph, which would then never match (or, in a
            # replacement, be written into the model).
            raise PatternError(
                f"{what}: scalar parameter(s) {lost} do not reach an op as they are (unused, or changed by Python "
                f"arithmetic); pass them to ops unchanged, or compute with them in a build= callback"
            )
        for name, ph in zip(tensor_names, my_phs):
            ph._rename(name)  # so that explanations name the parameter
        ordered = sorted((n for n in nodes if n.op in ("call_function", "get_attr")), key=order.__getitem__)
        result.append(Traced(graph, dict(zip(tensor_names, my_phs)), outputs, ordered))
    return result
