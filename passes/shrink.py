"""``shrink``: structured pruning that removes MLP channels and attention heads,
so the matrices really get smaller."""

from __future__ import annotations

import math
import re

import torch
import torch.fx as fx

from .base import Option, Pass, PassResult
from .analyses.channels import AttentionHeads, ChannelAnalysis, ChannelGroup, Span
from .layers import regex_problem
from .quantize.calibration import collect_linear_stats
from .registry import register_pass

aten = torch.ops.aten


@register_pass("shrink")
class Shrink(Pass):
    """Removes the least important channels of each group, and the least
    important heads of each attention, that the channel-dependency analysis
    (:class:`~fxopt.passes.analyses.ChannelAnalysis`) proves removable: MLP
    intermediate channels through activations, SwiGLU's gate times up, and
    merged ``gate_up`` projections split in two; attention heads whole (query,
    key and value heads together; under grouped-query attention a whole
    key/value group with its query heads), through merged QKV projections,
    rotary embeddings and ``repeat_kv``.

    Matches: every group and attention the analysis accepts, selected by
    ``include`` / ``exclude`` (regular expressions on the name, e.g.
    ``model.layers.0.mlp.gate_proj[0:128]+model.layers.0.mlp.up_proj[0:128]``
    for a channel group, ``model.layers.0.self_attn.q_proj[0:64]+...k_proj[0:32]+...v_proj[0:32]``
    for an attention).

    Produces: smaller constants: the producers' weight rows and bias entries,
    the consumers' weight columns and the element-wise constants of the
    removed channels or heads are dropped; splits and slices of a producer's
    output get their new sizes; the shape entries that count heads (views into
    heads, ``repeat_kv``'s expand and reshape, a merge written with a literal
    width) get the new counts. The result is an ordinary smaller model
    (exports to ONNX, fuses, quantizes).

    Importance of channel ``c``: ``magnitude``: ``sum ||producer row c|| *
    sum ||consumer column c||``; ``activation`` (needs ``calibration_data``):
    ``||X_c|| * sum ||consumer column c||`` with ``X`` the consumers' input on
    the calibration inputs. A key/value group (a head without GQA) scores the
    same over its channels: ``magnitude``: ``||its q, k and v rows|| * ||its
    output-projection columns||`` (Frobenius norms); ``activation``:
    ``sum_c ||X_c|| * ||column c||`` over its output-projection columns. With
    ``compensate`` (needs ``calibration_data``), each consumer's bias takes the
    removed channels' mean contribution ``W[:, removed] @ mean(x[removed])``
    (FLAP, An et al. 2024); MLP channels only. Each group keeps
    ``ceil((1 - ratio) * size)`` channels, rounded up to a multiple of
    ``multiple_of``; each attention keeps ``ceil((1 - heads) * kv_heads)`` key/value
    groups (at least one).

    Refuses (counted in stats ``refused``, with the node that stops the walk):
    groups whose channels reach an op the analysis cannot follow (norms, the
    residual stream, graph outputs), and attentions whose heads it cannot
    prove (a per-head bias, a key/value cache read from an input, fused
    attention ops: shrink runs before ``fuse-attention``). Errors: an
    ``include`` that selects nothing shrinkable (the message lists the
    refused groups and why); a producer or consumer weight shared with another
    reader. ``ratio=0`` with ``heads=0`` leaves the graph as it was.
    """

    ratio = Option(0.25, float, check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
                   help="fraction of each MLP channel group's channels removed")
    heads = Option(0.0, float, check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
                   help="fraction of each attention's heads removed (whole key/value groups under GQA)")
    importance = Option("magnitude", str, choices=("magnitude", "activation"), help="magnitude | activation (calibrated)")
    multiple_of = Option(1, int, check=lambda v: None if v >= 1 else "must be >= 1", help="keep a multiple of this many channels")
    compensate = Option(False, help="fold the removed channels' mean contribution on calibration_data into the consumers' bias (FLAP)")
    include = Option(None, str, check=regex_problem, help="regex: only groups whose name matches (re.search)")
    exclude = Option(None, str, check=regex_problem, help="regex: skip groups whose name matches")

    runs_after = ("canonicalize", "prune")
    runs_before = ("quantize", "merge-linears", "fuse-linear-act", "fuse-attention", "pack-attention", "share-weights")
    requires = ("canonical-linear",)
    numerics_tolerance = 1.0  # removing channels changes outputs by design

    def required_inputs(self) -> tuple[str, ...]:
        return ("calibration_data",) if self.importance == "activation" or self.compensate else ()

    def run(self, graph) -> PassResult:
        if self.ratio == 0 and self.heads == 0:
            return PassResult(False, {"groups_shrunk": 0, "attentions_shrunk": 0})
        deps = self.analysis(ChannelAnalysis, graph)
        refused = deps.refused()
        groups = [g for g in deps.shrinkable() if self._selected(g.name)] if self.ratio > 0 else []
        attentions = [a for a in deps.shrinkable_attentions() if self._selected(a.name)] if self.heads > 0 else []
        if self.include is not None and not groups and not attentions:
            listed = "; ".join(f"{k}: {v}" for k, v in list(refused.items())[:8])
            raise self.fail(f"option include={self.include!r} selects no shrinkable channel group or attention; refused: {listed}")
        self._check_weights(graph, [({s.producer for s in g.spans}, g.consumers, g.name) for g in groups]
                            + [({a.q.producer, a.k.producer, a.v.producer}, a.consumers, a.name) for a in attentions])
        norms = self._activation_norms(graph, [c for g in groups for c in g.consumers] + [c for a in attentions for c in a.consumers]) \
            if self.importance == "activation" else {}
        means = self._input_means(graph, groups) if self.compensate else {}
        # The rows each producer keeps, per group and attention first, then per producer.
        keep_rows: dict[fx.Node, torch.Tensor] = {}

        def keep_span(span: Span, kept: torch.Tensor) -> None:
            rows = keep_rows.setdefault(span.producer, torch.ones(graph.constant(span.producer.args[1]).shape[0], dtype=torch.bool))
            rows[span.offset: span.offset + span.size] = False
            rows[kept] = True

        kept: dict[int, torch.Tensor] = {}
        for group in groups:
            keep = self._choose(graph, group, norms)
            kept[id(group)] = keep
            for span in group.spans:
                keep_span(span, span.offset + keep)
        kept_groups: dict[int, list[int]] = {}
        for attn in attentions:
            keep = kept_groups[id(attn)] = self._choose_heads(graph, attn, norms)
            keep_span(attn.q, attn.q_rows(keep))
            keep_span(attn.k, attn.k_rows(keep))
            keep_span(attn.v, attn.v_rows(keep))
        before = graph.param_bytes()
        for producer, rows in keep_rows.items():
            self._take(graph, producer, 1, rows, dim=0)
            if len(producer.args) > 2 and producer.args[2] is not None:
                self._take(graph, producer, 2, rows, dim=0)
        per_group = {}
        for group in groups:
            keep = kept[id(group)]
            for consumer in group.consumers:
                if self.compensate:
                    self._fold_removed(graph, consumer, keep, means[consumer])
                self._take(graph, consumer, 1, keep, dim=1)
            for user, const in group.constants:
                self._take(graph, user, list(user.args).index(const), keep, dim=-1)
            per_group[group.name] = {"kept": int(keep.numel()), "of": group.size}
        per_attention = {}
        for attn in attentions:
            keep = kept_groups[id(attn)]
            for consumer in attn.consumers:
                self._take(graph, consumer, 1, attn.columns(keep), dim=1)
            for edit in attn.shape_edits:
                shape = list(edit.node.args[1])
                shape[edit.index] = attn.count(edit.kind, len(keep)) * edit.factor
                edit.node.args = (edit.node.args[0], shape, *edit.node.args[2:])
            per_attention[attn.name] = {"heads": attn.count("q", len(keep)), "of": attn.num_heads,
                                        "kv_heads": len(keep), "kv_of": attn.num_kv_heads}
        for node, pieces in deps.pieces.items():
            self._resize(node, pieces, keep_rows)
        stats = {"groups_shrunk": len(groups), "channels_removed": sum(v["of"] - v["kept"] for v in per_group.values()),
                 "attentions_shrunk": len(attentions), "heads_removed": sum(v["of"] - v["heads"] for v in per_attention.values()),
                 "bytes_removed": before - graph.param_bytes(), "groups": per_group, "attentions": per_attention, "refused": refused}
        return PassResult(bool(groups or attentions), stats)

    def _selected(self, name: str) -> bool:
        return (self.include is None or re.search(self.include, name) is not None) and \
            (self.exclude is None or re.search(self.exclude, name) is None)

    def _check_weights(self, graph, units: list[tuple[set, list, str]]) -> None:
        """Each (producers, consumers, name) unit owns its weights: no other node reads them."""
        readers: dict[int, int] = {}
        for n in graph.fx.nodes:
            for a in n.args:
                t = graph.constant(a) if isinstance(a, fx.Node) else None
                if t is not None:
                    readers[id(t)] = readers.get(id(t), 0) + 1
        for producers, consumers, name in units:
            for node in set(producers) | set(consumers):
                if readers.get(id(graph.constant(node.args[1])), 0) > 1:
                    raise self.fail(f"the weight of {node.name!r} is read by another node too (tied): shrinking it would change "
                                    f"that reader; exclude {name!r}", node)

    def _activation_norms(self, graph, consumers: list[fx.Node]) -> dict[fx.Node, torch.Tensor]:
        stats = collect_linear_stats(graph, self.context.get("calibration_data"), consumers, hessian=True)
        return {c: torch.diag(stats[c.name].hessian).clamp(min=0).sqrt().float() for c in consumers}

    def _input_means(self, graph, groups: list[ChannelGroup]) -> dict[fx.Node, torch.Tensor]:
        consumers = [c for g in groups for c in g.consumers]
        stats = collect_linear_stats(graph, self.context.get("calibration_data"), consumers, keep_rows=1 << 30)
        return {c: stats[c.name].sample().double().mean(0) for c in consumers}

    @staticmethod
    def _fold_removed(graph, consumer: fx.Node, keep: torch.Tensor, mean: torch.Tensor) -> None:
        """``b += W[:, removed] @ mean(x[removed])``: what the removed input
        channels added on average stays in the output (FLAP's compensation)."""
        w = graph.constant(consumer.args[1])
        removed = torch.ones(w.shape[1], dtype=torch.bool)
        removed[keep] = False
        delta = w.double()[:, removed] @ mean[removed]
        bias_node = consumer.args[2] if len(consumer.args) > 2 else None
        bias = graph.constant(bias_node) if bias_node is not None else None
        if bias_node is not None and bias is None:
            return  # a computed bias: nothing to fold into
        new = (delta if bias is None else bias.double() + delta).to(w.dtype)
        node = graph.add_constant(new, f"{consumer.name}.bias_compensated")
        consumer.args = (consumer.args[0], consumer.args[1], node)
        if bias_node is not None and not bias_node.users:
            graph.fx.erase_node(bias_node)

    def _choose(self, graph, group: ChannelGroup, norms) -> torch.Tensor:
        """Indices (sorted) of the channels the group keeps."""
        cols = sum(graph.constant(c.args[1]).float().norm(dim=0) for c in group.consumers)
        if self.importance == "activation" and group.consumers:
            score = cols * sum(norms[c] for c in group.consumers)
        else:
            rows = sum(graph.constant(s.producer.args[1])[s.offset: s.offset + s.size].float().norm(dim=1) for s in group.spans)
            score = rows * (cols if group.consumers else 1.0)
        keep_n = min(group.size, self.multiple_of * math.ceil((1 - self.ratio) * group.size / self.multiple_of))
        order = torch.argsort(score, descending=True, stable=True)[:keep_n]
        return torch.sort(order).values

    def _choose_heads(self, graph, attn: AttentionHeads, norms) -> list[int]:
        """The key/value groups (sorted) the attention keeps."""
        n = attn.num_kv_heads
        score = torch.zeros(n)
        with torch.no_grad():
            self._score_heads(graph, attn, norms, score)
        keep_n = max(1, math.ceil((1 - self.heads) * n))
        return sorted(torch.argsort(score, descending=True, stable=True)[:keep_n].tolist())

    def _score_heads(self, graph, attn: AttentionHeads, norms, score: torch.Tensor) -> None:
        for g in range(attn.num_kv_heads):
            cols = attn.columns([g])
            col = sum(graph.constant(c.args[1])[:, cols].float().norm(dim=0) for c in attn.consumers)
            if self.importance == "activation":
                score[g] = float((col * sum(norms[c][cols] for c in attn.consumers)).sum())
            else:
                rows = torch.cat([graph.constant(s.producer.args[1])[idx].float().flatten()
                                  for s, idx in ((attn.q, attn.q_rows([g])), (attn.k, attn.k_rows([g])), (attn.v, attn.v_rows([g])))])
                score[g] = float(rows.norm() * col.norm())

    @staticmethod
    def _take(graph, user: fx.Node, index: int, keep: torch.Tensor, dim: int) -> None:
        """``user.args[index]`` (a constant) replaced by its entries ``keep`` along ``dim``."""
        old = user.args[index]
        t = graph.constant(old)
        idx = keep.nonzero().flatten() if keep.dtype == torch.bool else keep
        new = graph.add_constant(t.index_select(dim % t.dim(), idx).contiguous(), f"{old.target}.shrunk")
        args = list(user.args)
        args[index] = new
        user.args = tuple(args)
        if not old.users:
            graph.fx.erase_node(old)

    @staticmethod
    def _resize(node: fx.Node, pieces: list[Span], keep_rows: dict[fx.Node, torch.Tensor]) -> None:
        """New sizes of a split or slice of a producer's output."""
        rows = keep_rows.get(pieces[0].producer)
        if rows is None:
            return
        new = [int(rows[p.offset: p.offset + p.size].sum()) for p in pieces]
        if node.target == aten.slice.Tensor:
            first = pieces[0]
            parent_start = first.offset - node.args[2] if len(node.args) > 2 and node.args[2] else first.offset
            start = int(rows[parent_start: first.offset].sum())
            args = list(node.args) + [None] * (4 - len(node.args))
            args[2], args[3] = start, start + new[0]
            node.args = tuple(args)
        else:
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            if node.target == aten.split.Tensor and all(n == new[0] for n in new):
                node.args, node.kwargs = (node.args[0], new[0], dim), {}  # equal pieces stay one split size
            else:
                node.target = aten.split_with_sizes.default
                node.args = (node.args[0], new, dim)
                node.kwargs = {}
