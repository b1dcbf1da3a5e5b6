"""Shape and dtype metadata: every node carries ``meta["val"]`` (a FakeTensor,
a SymInt, or a tuple of them), as torch.export leaves it.

Passes that create nodes need not compute it: :func:`propagate_meta` fills in
what is missing by running the node's op on fake tensors in the graph's own fake
mode, so symbolic (dynamic) dimensions flow through new nodes too.
"""

from __future__ import annotations

import contextlib

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode

from .nodes import size_expr


def fake_mode_of(graph) -> FakeTensorMode:
    mode = getattr(graph, "_fake_mode", None)
    if mode is not None:
        return mode
    vals = [n.meta.get("val") for n in graph.fx.nodes if "val" in n.meta]
    mode = detect_fake_mode(vals)
    if mode is None:
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    graph._fake_mode = mode
    return mode


def fake_value_of_constant(graph, tensor: torch.Tensor):
    return fake_mode_of(graph).from_tensor(tensor, static_shapes=True)


class MetaError(RuntimeError):
    def __init__(self, node: fx.Node, cause: BaseException):
        super().__init__(f"cannot infer shape/dtype of node {node.name!r} ({node.format_node()}): {cause}")
        self.node = node


@contextlib.contextmanager
def shape_env_rollback(graph):
    """Undo what the block taught the graph's ShapeEnv if it raises.

    A graph and its copies share one ShapeEnv, so a pass that specializes a
    dynamic dimension (evaluating a symbolic size as an int) changes the
    shapes of the original graph too; a failed pipeline must not."""
    env = fake_mode_of(graph).shape_env
    if env is None:
        yield
        return
    saved = (dict(env.replacements), dict(env.var_to_range), set(env.divisible), len(env.guards))
    try:
        yield
    except BaseException:
        env.replacements, env.var_to_range, env.divisible = dict(saved[0]), dict(saved[1]), set(saved[2])
        del env.guards[saved[3]:]
        # Invalidate the ShapeEnv's caches of simplified expressions.
        env._replacements_version_counter += 1
        env._version_counter += 1
        env._prev_cache_key = env._get_key()
        raise


def _fill(graph, node: fx.Node, mode) -> None:
    """Compute ``node.meta["val"]`` from its inputs' values."""
    def val(n: fx.Node):
        return n.meta["val"]

    try:
        if node.op == "get_attr":
            value = graph.get_attr(node.target)
            node.meta["val"] = mode.from_tensor(value, static_shapes=True) if isinstance(value, torch.Tensor) else value
        elif node.op == "call_function":
            args = fx.node.map_arg(node.args, val)
            kwargs = fx.node.map_arg(node.kwargs, val)
            # The Python dispatcher lets composite ops (aten.pad, ...) decompose
            # on symbolic sizes; without it the fake kernel reads each size as an
            # int and specializes the graph's dynamic dimensions.
            with mode, torch.no_grad(), enable_python_dispatcher():
                node.meta["val"] = node.target(*args, **kwargs)
        else:
            raise RuntimeError(f"op kind {node.op!r} is not part of fxopt's IR")
    except MetaError:
        raise
    except Exception as e:  # surfaced with the node that caused it
        raise MetaError(node, e) from e


def propagate_meta(graph, *, recompute: bool = False) -> int:
    """Fill ``meta["val"]`` where it is missing (or everywhere, with
    ``recompute``); return how many nodes were filled."""
    mode = fake_mode_of(graph)
    filled = 0
    for node in graph.fx.nodes:
        if node.op in ("output",) or ("val" in node.meta and not recompute):
            continue
        if node.op == "placeholder":
            if "val" not in node.meta:
                raise MetaError(node, RuntimeError("a placeholder without metadata"))
            continue
        _fill(graph, node, mode)
        filled += 1
    return filled


def meta_snapshot(graph) -> dict:
    """Each node's op, inputs and value: :func:`refresh_changed_meta` compares
    the graph against it after a pass."""
    return {n: (n.target, n.args, n.kwargs, n.meta.get("val")) for n in graph.fx.nodes}


def _same_inputs(before: tuple, node: fx.Node) -> bool:
    try:
        return before[0] == node.target and before[1] == node.args and before[2] == node.kwargs
    except Exception:  # an argument without a plain == (a tensor): call it changed
        return False


def same_value(a, b) -> bool:
    """Same kind, dtype, shape and strides (symbolic sizes by expression)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a.dtype == b.dtype and a.device == b.device and [size_expr(x) for x in a.shape] == [size_expr(x) for x in b.shape]
                and [size_expr(x) for x in a.stride()] == [size_expr(x) for x in b.stride()])
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, (torch.SymInt, int)) and isinstance(b, (torch.SymInt, int)):
        return type(a) is type(b) and size_expr(a) == size_expr(b)
    return type(a) is type(b) and isinstance(a, (float, bool, str, type(None))) and a == b


def refresh_changed_meta(graph, before: dict) -> int:
    """After a pass, recompute ``meta["val"]`` of the nodes it added or whose
    op or inputs it changed, of every parameter (it may have been replaced),
    and of the nodes downstream of a value whose dtype, shape or strides
    changed: what :func:`propagate_meta` with ``recompute`` would give, at the
    cost of what changed (recomputing a node on symbolic sizes costs
    milliseconds, and pipelines of a dozen passes over a decoder's thousand
    nodes spent most of their time there). A placeholder keeps the value a pass
    gave it; other nodes are recomputed."""
    mode = fake_mode_of(graph)
    changed: set[fx.Node] = set()
    filled = 0
    for node in graph.fx.nodes:
        if node.op == "output":
            continue
        old = before.get(node)
        val_set_by_pass = old is not None and node.meta.get("val") is not old[3]
        if node.op == "placeholder":
            if "val" not in node.meta:
                raise MetaError(node, RuntimeError("a placeholder without metadata"))
            if old is None or val_set_by_pass:
                changed.add(node)
            continue
        edited = old is None or not _same_inputs(old, node)
        if not (edited or val_set_by_pass or node.op == "get_attr" or "val" not in node.meta
                or any(i in changed for i in node.all_input_nodes)):
            continue
        previous = node.meta.get("val")
        _fill(graph, node, mode)
        filled += 1
        if old is None or val_set_by_pass or not same_value(previous, node.meta["val"]):
            changed.add(node)
    return filled
