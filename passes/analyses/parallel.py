"""``ParallelPairs``: Megatron's column/row pairs of linears, found on the graph
(never from module names).

A pair is a channel group of :class:`~.channels.ChannelAnalysis` whose
channels flow from the *column* linears (their output channels, rows of the
weight) into the *row* linears (their input channels, columns of the weight)
and nowhere else: an MLP's first linear (or gate and up, separate or merged)
with its down projection; Q, K and V (separate or merged) with the attention
output projection, where the channel walk follows heads through attention
(and through a generation step's key/value cache: its inputs and outputs are
split by the same heads).
Splitting a pair's channels (or heads) across ``N`` ranks leaves each row linear with a
partial sum that one all-reduce completes.

Pairs never overlap: a linear that is the row side of one pair is not the
column side of another (an MLP of three linears gives one pair, the third
linear stays whole). Groups that cannot pair are listed with the reason.
The LM head candidates are the linears outside every pair whose output
reaches a graph output through element-wise ops alone (a cast, a logit
soft-cap): split by output channel (the vocabulary) and gathered, their
result is the whole model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..analysis import Analysis
from .channels import AttentionHeads, ChannelAnalysis, ChannelGroup

aten = torch.ops.aten

# Ops between an LM head and the graph output that act on each logit alone.
_PER_LOGIT = {aten._to_copy.default, aten.clone.default, aten.tanh.default, aten.mul.Tensor, aten.div.Tensor,
              aten.mul.Scalar, aten.div.Scalar}


@dataclass
class ParallelPair:
    """Channels split across ranks: ``columns`` are split by output channel,
    ``rows`` by input channel. An MLP pair splits the channels of ``group``;
    an attention pair splits the heads of ``attention`` (whole KV groups with
    their query heads)."""

    columns: list[fx.Node]
    rows: list[fx.Node]
    group: ChannelGroup | None = None
    attention: AttentionHeads | None = None

    @property
    def name(self) -> str:
        return (self.attention or self.group).name

    @property
    def kind(self) -> str:
        return "attention" if self.attention is not None else "mlp"


@dataclass
class ParallelPlan:
    """The analysis result: the pairs in graph order, the groups and
    attentions that did not pair (name -> why) and the LM head candidates."""

    pairs: list[ParallelPair]
    unpaired: dict[str, str] = field(default_factory=dict)
    lm_heads: list[fx.Node] = field(default_factory=list)


class ParallelPairs(Analysis):
    """Column/row pairs for tensor parallelism (:class:`ParallelPlan`), built
    on the channel groups and attention heads of :class:`ChannelAnalysis`."""

    name = "ParallelPairs"

    def run(self, graph) -> ParallelPlan:
        deps = self.manager.get(ChannelAnalysis, graph)
        readers = _readers(graph)
        order = {n: i for i, n in enumerate(graph.fx.nodes)}
        candidates = [ParallelPair(list(dict.fromkeys(s.producer for s in g.spans)), list(g.consumers), group=g)
                      for g in deps.groups if g.refused is None]
        candidates += [ParallelPair(list(dict.fromkeys(s.producer for s in (a.q, a.k, a.v))), list(a.consumers), attention=a)
                       for a in deps.splittable_attentions()]
        plan = ParallelPlan([], deps.refused(cache=True))  # q/k/v groups an accepted attention covers are not listed
        columns: set[fx.Node] = set()
        rows: set[fx.Node] = set()
        for pair in sorted(candidates, key=lambda p: min(order[c] for c in p.columns)):
            why = None
            if not pair.rows:
                why = "no linear reads the channels (nothing to split by input channel)"
            elif any(c in rows for c in pair.columns):
                why = "its column linear is already the row side of another pair"
            elif any(r in columns or r in rows for r in pair.rows):
                why = "its row linear is already part of another pair"
            else:
                tied = next((n for n in pair.columns + pair.rows if readers.get(_key(graph, n.args[1]), 0) > 1), None)
                if tied is not None:
                    why = f"the weight of {tied.name!r} is read by another node too (tied)"
            if why is not None:
                plan.unpaired[pair.name] = why
                continue
            columns.update(pair.columns)
            rows.update(pair.rows)
            plan.pairs.append(pair)
        paired = columns | rows
        for node in graph.fx.nodes:
            if node.op == "call_function" and node.target == aten.linear.default and node not in paired \
                    and graph.constant(node.args[1]) is not None and _reaches_output(node):
                plan.lm_heads.append(node)
        return plan


def _key(graph, node) -> int | None:
    t = graph.constant(node) if isinstance(node, fx.Node) else None
    return None if t is None else id(t)


def _readers(graph) -> dict[int, int]:
    """Constant tensor -> how many nodes read it (tied weights read twice)."""
    counts: dict[int, int] = {}
    for n in graph.fx.nodes:
        for a in n.args:
            k = _key(graph, a)
            if k is not None:
                counts[k] = counts.get(k, 0) + 1
    return counts


def _reaches_output(node: fx.Node) -> bool:
    """Every path from ``node`` ends in the graph output through per-logit ops."""
    users = list(node.users)
    if not users:
        return False
    for user in users:
        if user.op == "output":
            continue
        scalar_operands = all(not isinstance(a, fx.Node) or a is node for a in user.args)
        if user.target in _PER_LOGIT and scalar_operands and _reaches_output(user):
            continue
        return False
    return True
