"""Shape and dtype metadata: every node carries ``meta["val"]`` (a FakeTensor,
a SymInt, or a tuple of them), as torch.export leaves it.

Passes that create nodes need not compute it: :func:`propagate_meta` fills in
what is missing by running the node's op on fake tensors in the graph's own fake
mode, so symbolic (dynamic) dimensions flow through new nodes too.
"""

from __future__ import annotations

import torch
import torch.fx as fx
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
                with mode, torch.no_grad():
                    node.meta["val"] = node.target(*args, **kwargs)
            else:
                raise RuntimeError(f"op kind {node.op!r} is not part of fxopt's IR")
        except MetaError:
            raise
        except Exception as e:  # surfaced with the node that caused it
            raise MetaError(node, e) from e
        filled += 1
    return filled
