"""``ChannelDependencies``: which output channels of which linears must be
removed together, found on the graph (never from module names).

A channel of a linear's output (a row of its weight) can be removed when
every value computed from it is either dropped or read only as an input
channel of another linear (a column of its weight). The analysis follows each
linear's output forward, along the last dimension:

* through element-wise ops with one tensor operand (activations, casts,
  scaling by a number or by a constant broadcast along the channels);
* through element-wise ops with two computed operands whose channels are
  tracked (SwiGLU's ``silu(gate(x)) * up(x)``, a GELU written out as
  ``0.5 * x * (1 + tanh(...))``): both sides' channels are tied into one group;
* through ``split`` / ``slice`` of the last dimension (a merged ``gate_up``
  projection): each piece is a range of the producer's rows;
* into linears, whose weight columns are the group's consumers.

Anything else that reads a tracked channel (a view into heads, a norm, a
reduction, an add with an untracked tensor such as the residual stream, a
graph output) stops the walk: the group is refused with the node and the
reason, and no pass may shrink it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ...ir.nodes import module_path
from ..analysis import Analysis

aten = torch.ops.aten

# Element-wise ops of one tensor operand (other arguments are numbers).
_UNARY = {
    aten.gelu.default, aten.relu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default, aten.erf.default,
    aten.exp.default, aten.neg.default, aten.abs.default, aten.pow.Tensor_Scalar, aten.clone.default, aten._to_copy.default,
    aten.hardtanh.default, aten.leaky_relu.default, aten.elu.default, aten.gelu.default, aten.sqrt.default, aten.rsqrt.default,
}
# Element-wise ops of two operands (tensor or number).
_BINARY = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.add.Scalar,
           aten.sub.Scalar, aten.div.Scalar, aten.maximum.default, aten.minimum.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}


@dataclass(frozen=True)
class Span:
    """Rows ``offset .. offset + size`` of ``producer``'s weight (its output channels)."""

    producer: fx.Node
    offset: int
    size: int


@dataclass
class ChannelGroup:
    """Channels removed together: channel ``c`` of the group is row
    ``span.offset + c`` of every span's producer, column ``c`` of every
    consumer linear, and entry ``c`` along the last dimension of every
    constant operand."""

    size: int
    spans: list[Span] = field(default_factory=list)
    consumers: list[fx.Node] = field(default_factory=list)
    constants: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)  # (element-wise user, constant operand)
    refused: str | None = None  # why the group cannot be shrunk (names the node)

    @property
    def name(self) -> str:
        return "+".join(dict.fromkeys(f"{module_path(s.producer)}[{s.offset}:{s.offset + s.size}]" for s in self.spans))


@dataclass
class ChannelDependencies:
    """The analysis result: every group, and each split/slice of a producer's
    output with the spans of its pieces (a shrink rewrites their sizes)."""

    groups: list[ChannelGroup]
    pieces: dict[fx.Node, list[Span]]

    def shrinkable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.refused is None]

    def refused(self) -> dict[str, str]:
        return {g.name: g.refused for g in self.groups if g.refused is not None}

    def group_of(self, span: Span) -> ChannelGroup | None:
        return next((g for g in self.groups if span in g.spans), None)


class _Walk:
    """The forward walk from one linear's output."""

    def __init__(self, graph, producer: fx.Node):
        self.graph = graph
        self.producer = producer
        self.leaves: list[Span] = []
        self.children: dict[Span, list[Span]] = {}  # a span split into pieces
        self.pieces: dict[fx.Node, list[Span]] = {}
        self.arrivals: list[tuple[fx.Node, fx.Node, Span]] = []  # (two-operand op, operand, span)
        self.consumers: dict[Span, list[fx.Node]] = {}
        self.constants: dict[Span, list[tuple[fx.Node, fx.Node]]] = {}
        self.refusals: dict[Span, str] = {}

    def run(self) -> None:
        n = self.graph.constant(self.producer.args[1]).shape[0]
        self._follow(self.producer, Span(self.producer, 0, n), set())
        for span in list(self.children):  # read whole and in pieces: refuse the whole
            if span in self.leaves:
                self.leaves.remove(span)

    def refuse(self, span: Span, node: fx.Node, why: str) -> None:
        self.refusals.setdefault(span, f"node {node.name!r} ({node.target}): {why}")

    def _follow(self, node: fx.Node, span: Span, seen: set) -> None:
        if span not in self.leaves:
            self.leaves.append(span)
        for user in node.users:
            if (user, node, span) not in seen:
                seen.add((user, node, span))
                self._step(node, user, span, seen)

    def _step(self, node: fx.Node, user: fx.Node, span: Span, seen: set) -> None:
        t = user.target
        if user.op != "call_function":
            return self.refuse(span, user, "a graph output reads the channels")
        if t == aten.linear.default:
            if user.args[0] is node and all(a is not node for a in user.args[1:]) and self.graph.constant(user.args[1]) is not None:
                self.consumers.setdefault(span, []).append(user)
                return None
            return self.refuse(span, user, "read as a weight or bias, or by a linear whose weight is not a constant")
        if t in _UNARY and user.args[0] is node and not any(isinstance(a, fx.Node) for a in list(user.args[1:]) + list(user.kwargs.values())):
            return self._follow(user, span, seen)
        if t in _BINARY and len(user.args) == 2 and not user.kwargs:
            other = user.args[1] if user.args[0] is node else user.args[0]
            const = self.graph.constant(other) if isinstance(other, fx.Node) else None
            if other is node or not isinstance(other, fx.Node) or (const is not None and (const.dim() == 0 or const.shape[-1] == 1)):
                return self._follow(user, span, seen)
            if const is not None:
                if const.shape[-1] == span.size:
                    self.constants.setdefault(span, []).append((user, other))
                    return self._follow(user, span, seen)
                return self.refuse(span, user, f"a constant of shape {tuple(const.shape)} does not broadcast along the channels")
            self.arrivals.append((user, node, span))
            return self._follow(user, span, seen)
        if t in _SPLITS and user.args[0] is node and _is_last_dim(user, 2, default=0):
            sizes = _split_sizes(user, span.size)
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            pieces = [Span(span.producer, span.offset + a, b) for a, b in zip(starts, sizes)]
            self.children[span] = pieces
            self.pieces[user] = pieces
            for item in user.users:
                if item.target is not operator.getitem:
                    return self.refuse(span, user, "a split read other than by indexing")
            for item in user.users:
                self._follow(item, pieces[item.args[1]], seen)
            return None
        if t == aten.slice.Tensor and user.args[0] is node and _is_last_dim(user, 1, default=0):
            start = user.args[2] if len(user.args) > 2 and user.args[2] is not None else 0
            end = user.args[3] if len(user.args) > 3 and user.args[3] is not None else span.size
            step = user.args[4] if len(user.args) > 4 else 1
            if not (isinstance(start, int) and isinstance(end, int) and step == 1 and 0 <= start < min(end, span.size)):
                return self.refuse(span, user, "a slice with symbolic or negative bounds or a step")
            piece = Span(span.producer, span.offset + start, min(end, span.size) - start)
            self.children.setdefault(span, []).append(piece)
            self.pieces[user] = [piece]
            return self._follow(user, piece, seen)
        return self.refuse(span, user, "the analysis cannot follow channels through this op")


def _is_last_dim(user: fx.Node, index: int, default: int) -> bool:
    dim = user.args[index] if len(user.args) > index else user.kwargs.get("dim", default)
    val = user.args[0].meta.get("val")
    return isinstance(dim, int) and isinstance(val, torch.Tensor) and dim % val.dim() == val.dim() - 1


def _split_sizes(user: fx.Node, size: int) -> list[int]:
    if user.target == aten.split_with_sizes.default:
        return [int(s) for s in user.args[1]]
    step = int(user.args[1])
    return [min(step, size - s) for s in range(0, size, step)]


class ChannelAnalysis(Analysis):
    """Groups of linear output channels that must be removed together
    (:class:`ChannelDependencies`); a group the walk cannot follow carries the
    node that stopped it."""

    name = "ChannelDependencies"

    def run(self, graph) -> ChannelDependencies:
        walks = []
        for node in graph.fx.nodes:
            if node.op == "call_function" and node.target == aten.linear.default:
                w = graph.constant(node.args[1])
                if w is not None and w.dim() == 2:
                    walk = _Walk(graph, node)
                    walk.run()
                    walks.append(walk)
        parent: dict[Span, Span] = {}

        def find(s: Span) -> Span:
            parent.setdefault(s, s)
            while parent[s] != s:
                parent[s] = parent[parent[s]]
                s = parent[s]
            return s

        refusals: dict[Span, str] = {}
        arrivals: dict[fx.Node, list[tuple[fx.Node, Span]]] = {}
        for walk in walks:
            for user, operand, span in walk.arrivals:
                arrivals.setdefault(user, []).append((operand, span))
            for span, why in walk.refusals.items():
                # a refused span refuses every piece cut from it
                for s in _descendants(walk.children, span):
                    refusals.setdefault(s, why)
        # Two-operand element-wise ops tie the spans arriving on each side, if both sides carry channels.
        for user, arrived in arrivals.items():
            operands = {id(a) for a in user.args if isinstance(a, fx.Node) and graph.constant(a) is None}
            if {id(o) for o, _ in arrived} != operands:
                why = (f"node {user.name!r} ({user.target}): the other operand carries no linear's channels "
                       "(a residual stream, a norm), so they cannot be removed on one side only")
                for _, s in arrived:
                    refusals.setdefault(s, why)
            for _, s in arrived[1:]:
                parent[find(s)] = find(arrived[0][1])
        groups: dict[Span, ChannelGroup] = {}
        pieces: dict[fx.Node, list[Span]] = {}
        for walk in walks:
            pieces.update(walk.pieces)
            for span in walk.leaves:
                group = groups.setdefault(find(span), ChannelGroup(span.size))
                if span not in group.spans:
                    group.spans.append(span)
                if span.size != group.size:
                    group.refused = group.refused or f"ranges of {span.size} and {group.size} channels meet element-wise"
                group.consumers += [c for c in walk.consumers.get(span, []) if c not in group.consumers]
                group.constants += [c for c in walk.constants.get(span, []) if c not in group.constants]
                if span in refusals:
                    group.refused = group.refused or refusals[span]
        return ChannelDependencies(list(groups.values()), pieces)


def _descendants(children: dict[Span, list[Span]], span: Span) -> list[Span]:
    out, work = [], [span]
    while work:
        s = work.pop()
        out.append(s)
        work.extend(children.get(s, []))
    return out
