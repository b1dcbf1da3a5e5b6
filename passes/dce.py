"""``dce``: dead code elimination."""

from __future__ import annotations

from ..ir.nodes import is_pure
from .base import Pass, PassResult
from .registry import register_pass


@register_pass("dce")
class DeadCodeElimination(Pass):
    """Removes nodes whose results nobody uses.

    Matches: pure calls and ``get_attr`` reads with no users (constants no node
    reads are then dropped from the module by the pass manager).
    Refuses: placeholders (the model's inputs stay), the output, and anything
    with an effect: in-place and random ops, runtime asserts.
    """

    def run(self, graph) -> PassResult:
        removed = 0
        for node in reversed(list(graph.fx.nodes)):
            self.current_node = node
            if node.users or node.op in ("placeholder", "output"):
                continue
            if node.op == "get_attr" or is_pure(node):
                graph.fx.erase_node(node)
                removed += 1
        self.current_node = None
        return PassResult(removed > 0, {"removed": removed})
