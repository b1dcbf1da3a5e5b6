"""``cse``: common subexpression elimination."""

from __future__ import annotations

import math

import torch.fx as fx

from ..ir.nodes import is_pure
from .base import Option, Pass, PassResult
from .registry import register_pass


def _key(value, rep: dict):
    """A hashable stand-in for an argument, telling 1, 1.0 and True apart."""
    if isinstance(value, fx.Node):
        return ("node", rep.get(value, value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v, rep) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v, rep)) for k, v in value.items())))
    if isinstance(value, float):
        return ("float", "nan") if value != value else ("float", value, math.copysign(1.0, value))
    if isinstance(value, slice):
        return ("slice", _key(value.start, rep), _key(value.stop, rep), _key(value.step, rep))
    return (type(value).__name__, value)


@register_pass("cse")
class CommonSubexpressionElimination(Pass):
    """Merges nodes that compute the same thing.

    Matches: pure calls with the same op and the same (already merged)
    arguments; ``get_attr`` reads of the same attribute; and, with
    ``merge_tied``, reads of different attributes that are the same tensor
    (tied weights, such as an LM head sharing the embedding).
    Refuses: random, in-place and assert ops, and placeholders.
    """

    merge_tied = Option(True, help="merge get_attr nodes whose tensors are one and the same (same storage and view)")

    def run(self, graph) -> PassResult:
        seen: dict = {}
        rep: dict[fx.Node, fx.Node] = {}
        merged = tied = 0
        for node in self.walk(graph):
            if node.op == "get_attr":
                t = graph.constant(node)
                if self.merge_tied and t is not None and t.untyped_storage().data_ptr():
                    key = ("tensor", t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
                else:
                    key = ("attr", node.target)
            elif node.op == "call_function" and is_pure(node):
                try:
                    key = ("call", node.target, _key(node.args, rep), _key(node.kwargs, rep))
                    hash(key)
                except TypeError:
                    continue
            else:
                continue
            first = seen.get(key)
            if first is None:
                seen[key] = node
                continue
            if node.op == "get_attr" and node.target != first.target:
                tied += 1
            node.replace_all_uses_with(first)
            graph.fx.erase_node(node)
            rep[node] = first
            merged += 1
        return PassResult(merged > 0, {"merged": merged, "tied_weights_merged": tied})
