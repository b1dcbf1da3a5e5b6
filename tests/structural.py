"""Before/expected structural tests, as torch.fx's and TVM's pass tests are
written: run a pipeline on a small model, trace the graph the pipeline should
produce from a Python function written with the expected ops, and compare the
two node by node::

    def before(x):
        return torch.relu(x) + 0 * x        # what the pass sees
    def expected(x):
        return torch.relu(x)                 # what it must leave
    assert_rewrites_to("my-pass", before, (torch.randn(4),), expected)

Two graphs are equal when, walked from their outputs, they apply the same op
targets to the same arguments (in the op's schema order, defaults filled in):
graph inputs by position,
constants by dtype and shape (and by value with ``constant_values=True``),
literals by value, other nodes by structure. Node names and the order in
which independent nodes were written do not matter; dead nodes do (they are
listed after the live ones, in graph order). ``torch.export``'s shape asserts
and the size computations only they read are left out of both sides.

:func:`assert_unchanged` is the should-not-fire companion; both also check
the rewritten graph against the original on the example inputs.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

import fxopt
from fxopt.ir.nodes import call_args, is_assert


class _Function(torch.nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def graph_of(model_or_fn, example_inputs, *, dynamic_shapes=None, name: str | None = None) -> fxopt.Graph:
    """Trace a module, or a plain function (its closed-over tensors become
    constants); a :class:`fxopt.Graph` (built or edited by hand) is taken as it is."""
    if isinstance(model_or_fn, fxopt.Graph):
        return model_or_fn
    model = model_or_fn if isinstance(model_or_fn, torch.nn.Module) else _Function(model_or_fn)
    label = name or getattr(model_or_fn, "__name__", type(model).__name__)
    return fxopt.trace(model.eval(), example_inputs, dynamic_shapes=dynamic_shapes, name=label)


def _target(t) -> str:
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(t)
    return f"{getattr(t, '__module__', '')}.{getattr(t, '__qualname__', repr(t))}".lstrip(".")


def _assert_nodes(graph: fxopt.Graph) -> set[fx.Node]:
    """Shape asserts and the size computations only they read."""
    ignored = {n for n in graph.fx.nodes if is_assert(n)}
    for n in reversed(graph.fx.nodes):
        if n.op == "call_function" and n.users and all(u in ignored for u in n.users):
            ignored.add(n)
    return ignored


def structure(graph: fxopt.Graph, *, ignore_asserts: bool = True) -> tuple[list[str], list[torch.Tensor]]:
    """One line per node (``%3 = aten.linear.default(%in0, const0, None)``),
    numbered by a post-order walk from the outputs, and the constants in the
    order the lines name them."""
    ignored = _assert_nodes(graph) if ignore_asserts else set()
    nodes = [n for n in graph.fx.nodes if n not in ignored]
    inputs = {n: f"%in{i}" for i, n in enumerate(n for n in nodes if n.op == "placeholder")}
    names: dict[fx.Node, str] = dict(inputs)
    constants: list[torch.Tensor] = []
    lines: list[str] = []

    def ref(a) -> str:
        if isinstance(a, fx.Node):
            return names[a]
        if isinstance(a, (list, tuple)):
            inner = ", ".join(ref(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k}: {ref(v)}" for k, v in a.items()) + "}"
        if isinstance(a, float):
            return repr(round(a, 6))
        return repr(a)

    def visit(node: fx.Node) -> None:
        stack = [(node, False)]
        while stack:
            n, ready = stack.pop()
            if n in names:
                continue
            if n.op == "get_attr":
                t = graph.constant(n)
                names[n] = f"const{len(constants)}[{str(t.dtype).removeprefix('torch.')}{list(t.shape)}]" \
                    if isinstance(t, torch.Tensor) else f"attr({n.target})"
                if isinstance(t, torch.Tensor):
                    constants.append(t)
                continue
            if not ready:
                stack.append((n, True))
                # reversed, so that the first argument is numbered first
                stack.extend((a, False) for a in reversed([a for a in tree_leaves((n.args, n.kwargs)) if isinstance(a, fx.Node)]))
                continue
            names[n] = f"%{len(lines)}"
            # in the schema's order with defaults filled in: sum(x, 0) is sum(x, 0, keepdim=False)
            args = ", ".join(ref(a) for a in call_args(n))
            lines.append(f"{names[n]} = {_target(n.target)}({args})")

    output = next(n for n in reversed(nodes) if n.op == "output")
    for leaf in tree_leaves(output.args[0]):
        if isinstance(leaf, fx.Node):
            visit(leaf)
    lines.append(f"return {ref(output.args[0])}")
    dead = [n for n in nodes if n not in names and n.op not in ("placeholder", "output")]
    for n in dead:
        visit(n)
        lines.append(f"dead {names[n]}")
    return lines, constants


def assert_structurally_equal(actual: fxopt.Graph, expected: fxopt.Graph, *, constant_values: bool = False,
                              atol: float = 0.0) -> None:
    got, got_constants = structure(actual)
    want, want_constants = structure(expected)
    if got != want:
        diff = "\n".join(difflib.unified_diff(want, got, "expected", "actual", lineterm=""))
        raise AssertionError(f"graphs differ:\n{diff}\n\nactual:\n" + "\n".join(got))
    if constant_values:
        for i, (a, b) in enumerate(zip(got_constants, want_constants)):
            if atol:
                torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"const{i}: {m}")
            elif not torch.equal(a, b):
                raise AssertionError(f"const{i} differs: max abs difference "
                                     f"{(a.double() - b.double()).abs().max().item():.3g}")


def _run(pipeline, graph: fxopt.Graph, context: dict[str, Any]):
    manager = pipeline if isinstance(pipeline, fxopt.PassManager) else fxopt.PassManager(pipeline)
    return manager.run(graph, **context)


def _check_parity(before: fxopt.Graph, after: fxopt.Graph, example_inputs, tolerance: float | None) -> None:
    if tolerance is None:
        return
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with torch.no_grad():
        parity = fxopt.compare(before(*args), after(*args))
    assert parity.within(tolerance), f"the rewritten graph drifted from the original: {parity}"


def assert_rewrites_to(pipeline, before, example_inputs, expected, *, dynamic_shapes=None, constant_values: bool = False,
                       atol: float = 0.0, tolerance: float | None = 1e-5, **context):
    """Run ``pipeline`` (text or a PassManager) on ``before`` (a module or a
    function) traced with ``example_inputs``; assert the result is
    structurally the graph of ``expected`` traced with the same inputs, and
    (unless ``tolerance`` is None) that it computes what ``before`` computes
    within ``tolerance`` x the output scale. ``context``: the run's inputs
    (``calibration_data=...``). Returns the :class:`PipelineResult`."""
    graph = graph_of(before, example_inputs, dynamic_shapes=dynamic_shapes)
    result = _run(pipeline, graph, context)
    assert_structurally_equal(result.graph, graph_of(expected, example_inputs, dynamic_shapes=dynamic_shapes),
                              constant_values=constant_values, atol=atol)
    _check_parity(graph, result.graph, example_inputs, tolerance)
    return result


def assert_unchanged(pipeline, before, example_inputs, *, prepare: str | None = None, dynamic_shapes=None, **context):
    """The should-not-fire case: no pass of ``pipeline`` reports a change and
    the graph is structurally the one traced (after the ``prepare`` pipeline,
    e.g. ``canonicalize`` for passes that require it)."""
    graph = graph_of(before, example_inputs, dynamic_shapes=dynamic_shapes)
    if prepare:
        graph = _run(prepare, graph, {}).graph
    result = _run(pipeline, graph, context)
    changed = [r.name for r in result.records if r.changed]
    assert not changed, f"expected no change, but {changed} changed the graph: {[r.stats for r in result.records]}"
    assert_structurally_equal(result.graph, graph, constant_values=True)
    return result
