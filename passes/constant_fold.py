"""``constant-fold``: evaluate ahead of time what depends on constants only."""

from __future__ import annotations

import torch
import torch.fx as fx

from ..ir.nodes import is_pure
from .base import Option, Pass, PassResult
from .registry import register_pass


@register_pass("constant-fold")
class ConstantFold(Pass):
    """Replaces every pure computation whose inputs are all constants
    (parameters, buffers, literals) by one precomputed constant.

    Matches: maximal constant subgraphs, folded at their frontier (the constant
    nodes a non-constant node uses). Produces: a new buffer read by ``get_attr``;
    a folded view of a parameter keeps sharing its storage.
    Refuses: random and in-place ops, anything that touches a symbolic size (so
    dynamic shapes stay dynamic), non-tensor results, results larger than the
    constants they read (an ``expand`` grown to full size, or a dequantized
    low-bit weight, would cost memory for nothing), and results computed from
    literals alone that are larger than ``max_bytes``.
    """

    max_bytes = Option(1 << 20, int, check=lambda v: None if v >= 0 else "must be >= 0",
                       help="fold a result that grows past its inputs only up to this size")

    def run(self, graph) -> PassResult:
        constant: set[fx.Node] = set()
        for node in graph.fx.nodes:
            if node.op == "get_attr" and graph.constant(node) is not None:
                constant.add(node)
            elif node.op == "call_function" and is_pure(node) and self._inputs_constant(node, constant):
                constant.add(node)
        frontier = [n for n in constant if n.op == "call_function" and any(u not in constant for u in n.users)]
        order = {n: i for i, n in enumerate(graph.fx.nodes)}
        frontier.sort(key=order.__getitem__)
        values: dict[fx.Node, object] = {}
        folded, skipped, bytes_added = 0, 0, 0
        for node in frontier:
            self.current_node = node
            result = self._evaluate(graph, node, values)
            if not isinstance(result, torch.Tensor):
                skipped += 1
                continue
            # Logical size, not storage: an expanded view is cheap in eager
            # but is written out in full by an exporter.
            size = result.numel() * result.element_size()
            inputs = self._input_bytes(graph, node)
            grown = size > inputs
            # Growing past the constants it reads undoes compression (a
            # dequantized int4 weight folded back to float); growing from
            # literals alone (a mask from arange) is allowed up to max_bytes.
            if grown and (inputs > 0 or size > self.max_bytes):
                skipped += 1
                continue
            attr = graph.add_constant(result, f"folded_{node.name}")
            node.replace_all_uses_with(attr)
            folded += 1
            bytes_added += size if grown else 0
        self.current_node = None
        # The folded subgraphs are now dead; remove them right away.
        removed = 0
        for node in reversed(list(graph.fx.nodes)):
            if node in constant and not node.users:
                graph.fx.erase_node(node)
                removed += 1
        return PassResult(folded > 0, {"folded": folded, "skipped": skipped, "nodes_removed": removed, "bytes_added": bytes_added})

    @staticmethod
    def _inputs_constant(node: fx.Node, constant: set[fx.Node]) -> bool:
        ok = True

        def visit(a):
            nonlocal ok
            if a not in constant:
                ok = False
            return a

        fx.node.map_arg((node.args, node.kwargs), visit)
        if not ok:
            return False
        v = node.meta.get("val")
        has_sym = isinstance(v, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in v.shape)
        return not has_sym and not isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool))

    def _evaluate(self, graph, node: fx.Node, values: dict):
        if node in values:
            return values[node]
        if node.op == "get_attr":
            return graph.get_attr(node.target)
        args = fx.node.map_arg(node.args, lambda n: self._evaluate(graph, n, values))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self._evaluate(graph, n, values))
        with torch.no_grad():
            out = node.target(*args, **kwargs)
        values[node] = out
        return out

    def _input_bytes(self, graph, node: fx.Node) -> int:
        """Bytes of the distinct constant storages the folded subgraph reads."""
        seen, stack, total = set(), [node], 0
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "get_attr":
                t = graph.constant(n)
                total += t.untyped_storage().nbytes() if t is not None else 0
            else:
                stack.extend(n.all_input_nodes)
        return total
