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


def propagate_meta(graph, *, recompute: bool = False) -> int:
    """Fill ``meta["val"]`` where it is missing (or everywhere, with
    ``recompute``); return how many nodes were filled."""
    mode = fake_mode_of(graph)
    filled = 0

    def val(n: fx.Node):
        return n.meta["val"]

    for node in graph.fx.nodes:
        if node.op in ("output",) or ("val" in node.meta and not recompute):
            continue
        if node.op == "placeholder":
            if "val" not in node.meta:
                raise MetaError(node, RuntimeError("a placeholder without metadata"))
            continue
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
        filled += 1
    return filled
