"""``shrink``: structured pruning that removes MLP channels and attention heads,
so the matrices really get smaller."""

from __future__ import annotations

import math
import re

import torch
import torch.fx as fx

from ..ir.decoder import GENERATION_CACHE
from .base import Option, Pass, PassResult
from .analyses.channels import AttentionHeads, ChannelAnalysis, ChannelGroup, HeadBlock, Span
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
    key/value group with its query heads), through merged QKV projections
    (split before the heads, or laid out head by head or by KV group), rotary
    embeddings, ``repeat_kv`` and per-head biases (the kept heads' part of
    ALiBi's slopes or T5's position bias stays).

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
    (FLAP, An et al. 2024): for MLP channels the down projection's, for heads
    the output projection's (a bias is added where it had none; a removed
    head's output is its probability-weighted values, whose mean is what
    the output projection keeps). Each group keeps
    ``ceil((1 - ratio) * size)`` channels, rounded up to a multiple of
    ``multiple_of``; each attention keeps ``ceil((1 - heads) * kv_heads)`` key/value
    groups (at least one); an attention where that is all of them is left
    untouched (listed in stats ``attentions``, not counted as shrunk).

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
    compensate = Option(False, help="fold the removed channels' and heads' mean contribution on calibration_data into the consumers' bias (FLAP)")
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
        # a generation pair's cache may lose heads, if the prefill and the decode step choose the same ones:
        # weight magnitudes do, calibrated activations of the two graphs need not
        pair = GENERATION_CACHE in graph.properties
        same_choice = self.importance == "magnitude" and not self.compensate
        refused = deps.refused(cache=pair and same_choice)
        if pair and not same_choice:
            refused.update({a.name: "a generation graph's heads (and its cache's) go with importance=magnitude and no "
                                    "compensate only: the prefill and the decode step must remove the same ones"
                            for a in deps.splittable_attentions() if a.has_cache})
        candidates = deps.splittable_attentions() if pair and same_choice else deps.shrinkable_attentions()
        groups = [g for g in deps.shrinkable() if self._selected(g.name)] if self.ratio > 0 else []
        attentions = [a for a in candidates if self._selected(a.name)] if self.heads > 0 else []
        if self.include is not None and not groups and not attentions:
            listed = "; ".join(f"{k}: {v}" for k, v in list(refused.items())[:8])
            raise self.fail(f"option include={self.include!r} selects no shrinkable channel group or attention; refused: {listed}")
        tied = self._tied(graph, [({s.producer for s in g.spans}, g.consumers, g.name) for g in groups]
                          + [({a.q.producer, a.k.producer, a.v.producer}, a.consumers, a.name) for a in attentions])
        refused = {**refused, **tied}
        groups = [g for g in groups if g.name not in tied]
        attentions = [a for a in attentions if a.name not in tied]
        norms = self._activation_norms(graph, [c for g in groups for c in g.consumers] + [c for a in attentions for c in a.consumers]) \
            if self.importance == "activation" else {}
        kept = [(group, self._choose(graph, group, norms)) for group in groups]
        heads = []
        for attn in attentions:
            keep = self._choose_heads(graph, attn, norms)
            if len(keep) < attn.num_kv_heads:  # else the fraction rounds to no whole key/value group: left untouched
                heads.append((attn, attn.query_heads(keep), keep))
        if self.compensate:
            # each consumer with the input channels it keeps: a group's channels, or the kept heads' columns
            folds = [(c, keep) for group, keep in kept for c in group.consumers] + \
                    [(c, head_channels(q, attn.v_head_dim)) for attn, q, _ in heads for c in attn.consumers]
            means = self._input_means(graph, [c for c, _ in folds])
            for consumer, keep in folds:
                self._fold_removed(graph, consumer, keep, means[consumer])
        before = graph.param_bytes()
        resized = keep_channels(graph, deps, kept, heads)
        per_group = {group.name: {"kept": int(keep.numel()), "of": group.size} for group, keep in kept}
        per_attention = {a.name: {"heads": a.num_heads, "of": a.num_heads, "kv_heads": a.num_kv_heads, "kv_of": a.num_kv_heads}
                         for a in attentions}
        per_attention.update({attn.name: {"heads": len(q), "of": attn.num_heads, "kv_heads": len(kv), "kv_of": attn.num_kv_heads}
                              for attn, q, kv in heads})
        stats = {"groups_shrunk": len(groups), "channels_removed": sum(v["of"] - v["kept"] for v in per_group.values()),
                 "attentions_shrunk": len(heads), "heads_removed": sum(v["of"] - v["heads"] for v in per_attention.values()),
                 "bytes_removed": before - graph.param_bytes(), "groups": per_group, "attentions": per_attention, "refused": refused}
        return PassResult(bool(groups or heads), stats, sharded_outputs=resized)

    def _selected(self, name: str) -> bool:
        return (self.include is None or re.search(self.include, name) is not None) and \
            (self.exclude is None or re.search(self.exclude, name) is None)

    @staticmethod
    def _tied(graph, units: list[tuple[set, list, str]]) -> dict[str, str]:
        """The (producers, consumers, name) units that do not own their
        weights, each with the reason: a weight another node reads too
        (ALBERT's layers share theirs) would change under that reader."""
        readers: dict[int, int] = {}
        for n in graph.fx.nodes:
            for a in n.args:
                t = graph.constant(a) if isinstance(a, fx.Node) else None
                if t is not None:
                    readers[id(t)] = readers.get(id(t), 0) + 1
        tied = {}
        for producers, consumers, name in units:
            shared = sorted(node.name for node in set(producers) | set(consumers)
                            if readers.get(id(graph.constant(node.args[1])), 0) > 1)
            if shared:
                tied[name] = f"node {shared[0]!r}: its weight is read by another node too (tied); shrinking it would change that reader"
        return tied

    def _activation_norms(self, graph, consumers: list[fx.Node]) -> dict[fx.Node, torch.Tensor]:
        stats = collect_linear_stats(graph, self.context.get("calibration_data"), consumers, hessian=True)
        return {c: torch.diag(stats[c.name].hessian).clamp(min=0).sqrt().float() for c in consumers}

    def _input_means(self, graph, consumers: list[fx.Node]) -> dict[fx.Node, torch.Tensor]:
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


def keep_channels(graph, deps, kept=(), heads=(), suffix: str = "shrunk") -> tuple[int, ...]:
    """Keep channels ``keep`` (sorted indices) of each ``(group, keep)`` in
    ``kept``, and query heads ``q`` and key/value heads ``kv`` (sorted) of each
    ``(attention, q, kv)`` in ``heads``; drop the rest: the producers' weight
    rows and bias entries, the consumers' weight columns and the element-wise
    constants of the other channels go; splits and slices of a producer's
    output get their new sizes, and the shape entries that count heads the
    new counts (``repeat_kv`` repeats each kept KV head ``len(q) // len(kv)``
    times). An attention's key/value cache inputs keep the same heads: their
    shape metadata and the graph's example inputs change with them (its cache
    outputs follow from the shapes). ``deps`` is the :class:`ChannelAnalysis`
    result they come from. Structured pruning keeps the important channels; a
    tensor-parallel rank keeps its shard. New constants are named
    ``<old name>.<suffix>``. Returns the flat positions of the graph outputs
    whose shapes change: the cache outputs of the attentions in ``heads``."""
    keep_rows: dict[fx.Node, torch.Tensor] = {}

    def keep_span(span: Span | HeadBlock, keep: torch.Tensor) -> None:
        """Of ``span``'s rows, keep only ``keep`` (the producer's row indices)."""
        rows = keep_rows.setdefault(span.producer, torch.ones(graph.constant(span.producer.args[1]).shape[0], dtype=torch.bool))
        rows[span.offset: span.offset + span.size] = False
        rows[keep] = True

    for group, keep in kept:
        for span in group.spans:
            keep_span(span, span.offset + keep)
    for attn, q, kv in heads:
        # q, k and v may share their blocks (one per head): the same heads of each are kept
        keep_span(attn.q, attn.q.rows(q))
        keep_span(attn.k, attn.k.rows(kv))
        keep_span(attn.v, attn.v.rows(kv))
    for producer, rows in keep_rows.items():
        _take(graph, producer, 1, rows, 0, suffix)
        if len(producer.args) > 2 and producer.args[2] is not None:
            _take(graph, producer, 2, rows, 0, suffix)
    for group, keep in kept:
        for consumer in group.consumers:
            _take(graph, consumer, 1, keep, 1, suffix)
        for user, const in group.constants:
            _take(graph, user, list(user.args).index(const), keep, -1, suffix)
    for attn, q, kv in heads:
        for consumer in attn.consumers:
            _take(graph, consumer, 1, head_channels(q, attn.v_head_dim), 1, suffix)
        _count_heads(attn, len(q), len(kv))
        for cache in attn.cache_inputs:
            _keep_input_heads(graph, cache, q if cache.kind == "q" else kv)
        for operand in attn.head_operands:
            _read_heads(graph, operand, q if operand.kind == "q" else kv, suffix)
    for node, pieces in deps.pieces.items():
        _resize(node, pieces, keep_rows)
    return _output_positions(graph, [c for attn, _, _ in heads for c in attn.cache_outputs])


def _output_positions(graph, caches) -> tuple[int, ...]:
    """Flat positions of the graph outputs that are ``caches``' values."""
    from torch.utils._pytree import tree_leaves

    values = {c.node for c in caches}
    out = next(n for n in reversed(graph.fx.nodes) if n.op == "output")
    return tuple(i for i, leaf in enumerate(tree_leaves(out.args[0])) if leaf in values)


def head_channels(heads, dim: int) -> torch.Tensor:
    """Channels of ``heads`` (head ``h``: ``h * dim .. h * dim + dim - 1``)."""
    return (torch.as_tensor(list(heads), dtype=torch.long)[:, None] * dim + torch.arange(dim)).flatten()


def _count_heads(attn, n_q: int, n_kv: int) -> None:
    """Shape entries that count heads get the kept counts; a ``repeat_kv``
    expand repeats each KV head ``n_q // n_kv`` times instead of ``attn.group``."""
    for edit in attn.shape_edits:
        shape = list(edit.node.args[1])
        # a repeat_kv merge counts KV heads times their repeat, which follows the new grouping
        factor = n_q // n_kv if edit.kind == "kv" and edit.factor == attn.group > 1 else edit.factor
        shape[edit.index] = (n_q if edit.kind == "q" else n_kv) * factor
        if edit.kind == "kv" and edit.node.target == aten.expand.default and n_q // n_kv != attn.group:
            source = edit.node.args[0].meta["val"].shape
            for i, entry in enumerate(shape):
                if i != edit.index and entry == attn.group and source[i] == 1:
                    shape[i] = n_q // n_kv
        edit.node.args = (edit.node.args[0], shape, *edit.node.args[2:])


def _read_heads(graph, operand, heads, suffix: str) -> None:
    """``operand.user`` reads the values of ``heads`` alone of its per-head
    operand: a constant's are taken now, a computed one's are selected by an
    ``index_select`` before the user (the operand may have other readers)."""
    index = torch.as_tensor(list(heads), dtype=torch.long)
    if graph.constant(operand.node) is not None and isinstance(operand.index, int):
        return _take(graph, operand.user, operand.index, index, operand.axis, suffix)
    with graph.fx.inserting_before(operand.user):
        chosen = graph.fx.call_function(aten.index_select.default, (
            operand.node, operand.axis, graph.add_constant(index, f"{operand.user.name}.heads.{suffix}")))
    if isinstance(operand.index, int):
        args = list(operand.user.args)
        args[operand.index] = chosen
        operand.user.args = tuple(args)
    else:
        operand.user.kwargs = {**operand.user.kwargs, operand.index: chosen}


def _keep_input_heads(graph, cache, heads) -> None:
    """Graph input ``cache.node`` holds only ``heads`` along ``cache.axis``:
    its shape metadata and example value say so."""
    import torch.utils._pytree as pytree

    ph = cache.node
    val = ph.meta["val"]
    shape = list(val.shape)
    shape[cache.axis] = len(heads)
    ph.meta["val"] = val.new_empty(shape)
    leaves, spec = pytree.tree_flatten((graph.example_args, graph.example_kwargs))
    i = graph.placeholders().index(ph)
    if i < len(leaves) and isinstance(leaves[i], torch.Tensor):
        leaves[i] = leaves[i].index_select(cache.axis, torch.as_tensor(list(heads), dtype=torch.long)).contiguous()
        graph.example_args, graph.example_kwargs = pytree.tree_unflatten(leaves, spec)


def _take(graph, user: fx.Node, index: int, keep: torch.Tensor, dim: int, suffix: str) -> None:
    """``user.args[index]`` (a constant) replaced by its entries ``keep`` along ``dim``."""
    old = user.args[index]
    t = graph.constant(old)
    idx = keep.nonzero().flatten() if keep.dtype == torch.bool else keep
    new = graph.add_constant(t.index_select(dim % t.dim(), idx).contiguous(), f"{old.target}.{suffix}")
    args = list(user.args)
    args[index] = new
    user.args = tuple(args)
    if not old.users:
        graph.fx.erase_node(old)


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
