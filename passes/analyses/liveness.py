"""Liveness: which values are still needed, and by whom.

``self.analysis(Liveness, graph)`` gives :class:`LiveRanges`: each value's
last user in graph order, and the *dead* nodes, pure nodes whose results reach
nothing (what a later ``dce`` removes, e.g. the scores matmul that
``fuse-attention`` leaves behind). A pass asking "is this value used only by
that node?" asks about live users, so leftovers do not count as uses."""

from __future__ import annotations

import torch.fx as fx

from ...ir.nodes import is_pure
from ..analysis import Analysis


class LiveRanges:
    def __init__(self, graph):
        nodes = list(graph.fx.nodes)
        self.order = {n: i for i, n in enumerate(nodes)}
        dead: set[fx.Node] = set()
        for node in reversed(nodes):
            if is_pure(node) and all(u in dead for u in node.users):
                dead.add(node)
        self.dead = frozenset(dead)
        self.last_use: dict[fx.Node, fx.Node | None] = {
            n: max((u for u in n.users if u not in dead), key=self.order.get, default=None) for n in nodes}

    def users(self, node: fx.Node) -> set[fx.Node]:
        """The users of ``node`` that are not dead."""
        return {u for u in node.users if u not in self.dead}

    def only_user(self, node: fx.Node, user: fx.Node) -> bool:
        return self.users(node) == {user}

    def live_after(self, node: fx.Node, at: fx.Node) -> bool:
        """``node``'s value is still read after ``at`` (by a node later in graph order)."""
        last = self.last_use.get(node)
        return last is not None and self.order.get(last, -1) > self.order.get(at, -1)


class Liveness(Analysis):
    """Live users and last uses of every value (:class:`LiveRanges`)."""

    def run(self, graph) -> LiveRanges:
        return LiveRanges(graph)
