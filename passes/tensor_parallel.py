"""``tensor-parallel``: one rank's graph of a model split Megatron-style.

Contract of a rank graph (the eager runtime in :mod:`fxopt.parallel` and the
ONNX Runtime runner both rely on it):

* it is an ordinary fxopt Graph for one rank, holding only that rank's shards
  of the split weights (the replicated ones whole);
* it communicates only through ``torch.ops._c10d_functional.all_reduce.default(x,
  "sum", "tp")`` and ``torch.ops._c10d_functional.all_gather_into_tensor.default(x,
  N, "tp")``, each followed by ``torch.ops._c10d_functional.wait_tensor.default``;
  the group is the literal ``"tp"``, bound to a real process group's
  ``group_name`` at run time (``fxopt.parallel.bind_process_group``);
* all-gather stacks the ranks' tensors along dim 0; a vocabulary-parallel LM
  head's logits are gathered and laid out again along the last dimension in
  the graph (``chunk`` / ``cat``), so a rank graph's outputs equal the whole
  model's on every rank.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..ir.collectives import insert_all_gather, insert_all_reduce
from .analyses.channels import ChannelAnalysis
from .analyses.parallel import ParallelPairs
from .base import Option, Pass, PassResult
from .registry import register_pass
from .shrink import keep_channels

aten = torch.ops.aten


def _positive(v: int) -> str | None:
    return None if v >= 1 else "must be >= 1"


def _rank_of_process() -> int | None:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


@register_pass("tensor-parallel")
class TensorParallel(Pass):
    """Rewrites the graph into rank ``rank``'s part of a ``world_size``-way
    Megatron tensor-parallel split.

    Matches: the column/row pairs of :class:`~fxopt.passes.analyses.ParallelPairs`
    (found on the graph, never from module names): an MLP's first linear, or
    gate and up (separate or merged), with its down projection; Q, K and V
    (separate, merged, laid out head by head or by KV group) with the
    attention output projection, split by heads (a bias per head, such as
    ALiBi's, read for the rank's heads; a key part every head shares, such as
    DeepSeek's rotary part, computed whole on every rank); a generation step's key/value cache (graph inputs concatenated
    with the new keys and values, and the graph outputs returning them) goes
    with its heads, so each rank takes and returns only its heads' cache
    (``[B, kv_heads / N, T, D]``; with more ranks than KV heads, the one KV
    head its query heads read). The LM head (a linear outside every pair whose output is a graph
    output) is split by vocabulary.

    Produces: each column linear keeps its shard of output channels (weight
    rows and bias entries, splits of a merged projection resized); each row
    linear keeps the matching input channels, computes a partial sum without
    its bias, and is followed by ``all_reduce`` + ``wait_tensor`` and then the
    bias, added once: one all-reduce per pair, two per transformer layer. The
    LM head keeps its shard of the vocabulary; its logits are gathered
    (``all_gather_into_tensor`` along dim 0) and laid out along the last
    dimension, so every rank returns the whole model's logits
    (``lm_head=replicated`` keeps it whole). Norms stay whole; embeddings
    too, unless ``embeddings=vocab``: then each rank keeps its rows of a
    token table (one looked up by a graph input), looks up the ids that fall in them (zeros for the others) and an
    all-reduce sums the ranks' rows (one more all-reduce per table; a table
    tied to the LM head then stores one shard for both).
    Collectives use the group ``"tp"``, bound at run time.

    A vocabulary that ``world_size`` does not divide is padded with zero rows
    to the next multiple; the padding's logits are dropped after the gather.

    Refuses: ``world_size`` that does not divide a pair's channels (or heads),
    with the node at fault, before changing anything.
    Groups the analysis cannot pair stay whole (stats ``unpaired`` gives the
    reason). ``world_size=1`` leaves the graph as it was.
    """

    world_size = Option(2, int, check=_positive, help="number of tensor-parallel ranks")
    rank = Option(None, int, help="the rank whose graph to build (default: this process's rank under torch.distributed)")
    lm_head = Option("vocab", str, choices=("vocab", "replicated"),
                     help="vocab: split the LM head by vocabulary and all-gather its logits; replicated: keep it whole")

    embeddings = Option("replicated", str, choices=("replicated", "vocab"),
                        help="replicated: every rank keeps the whole table; vocab: split by rows, all-reduce the lookups")

    runs_after = ("canonicalize", "prune", "shrink")
    runs_before = ("quantize", "merge-linears", "fuse-linear-act", "fuse-attention", "pack-attention", "share-weights")
    requires = ("canonical-linear",)
    preserves = ()

    def run(self, graph) -> PassResult:
        n = self.world_size
        rank = self.rank if self.rank is not None else _rank_of_process()
        if rank is None:
            raise self.fail("option rank is needed outside a process group (or run under "
                            f"torchrun --nproc-per-node {n} with torch.distributed initialized)")
        if not 0 <= rank < n:
            raise self.fail(f"option rank={rank} is outside 0..{n - 1} (world_size={n})")
        if n == 1:
            return PassResult(False, {"pairs": 0})
        plan = self.analysis(ParallelPairs, graph)
        deps = self.analysis(ChannelAnalysis, graph)
        lm_heads = plan.lm_heads if self.lm_head == "vocab" else []
        tables = [e for e in graph.fx.nodes if e.op == "call_function" and e.target == aten.embedding.default
                  and graph.constant(e.args[0]) is not None and e.args[1].op == "placeholder"] if self.embeddings == "vocab" else []
        self._check_fits(plan, n)
        before = graph.param_bytes()
        kept = [(p.group, _shard(p.group.size, rank, n)) for p in plan.pairs if p.attention is None]
        heads = [(p.attention, *_head_shard(p.attention, rank, n)) for p in plan.pairs if p.attention is not None]
        sharded = keep_channels(graph, deps, kept, heads, suffix=f"rank{rank}")
        reduces = 0
        for pair in plan.pairs:
            for row in pair.rows:
                self._reduce_after(graph, row)
                reduces += 1
        shards: dict[int, fx.Node] = {}  # a table tied to the LM head: one shard for both
        for head in lm_heads:
            self._vocab_parallel(graph, head, rank, n, shards)
        for table in tables:
            self._vocab_embedding(graph, table, rank, n, shards)
            reduces += 1
        graph.properties.add(f"tensor-parallel-rank={rank}/{n}")
        caches = [c for p in plan.pairs if p.attention is not None for c in p.attention.cache_outputs]
        stats = {"rank": rank, "world_size": n, "pairs": len(plan.pairs), "all_reduces": reduces,
                 "all_gathers": len(lm_heads), "vocab_parallel_embeddings": len(tables), "bytes_before": before, "bytes_after": graph.param_bytes(),
                 "split": {p.name: p.kind for p in plan.pairs}, "unpaired": dict(plan.unpaired),
                 "cache_inputs": sum(len(p.attention.cache_inputs) for p in plan.pairs if p.attention is not None),
                 "cache_outputs": len(caches)}
        return PassResult(bool(plan.pairs or lm_heads or tables), stats, sharded_outputs=sharded)

    def _check_fits(self, plan, n: int) -> None:
        for pair in plan.pairs:
            if pair.attention is not None:
                a = pair.attention
                if a.num_heads % n:
                    raise self.fail(f"world_size={n} does not divide the {a.num_heads} heads of {a.name}", a.q.producer)
                if a.num_kv_heads % n and n % a.num_kv_heads:
                    raise self.fail(f"world_size={n} neither divides nor is a multiple of the {a.num_kv_heads} key/value "
                                    f"heads of {a.name}", a.k.producer)
                if a.num_kv_heads % n and len(a.q.slots) > 1:
                    raise self.fail(f"world_size={n} does not divide the {a.num_kv_heads} key/value groups of {a.name}, "
                                    "whose query, key and value heads share one block of rows per group", a.k.producer)
            elif pair.group.size % n:
                raise self.fail(f"world_size={n} does not divide the {pair.group.size} channels of {pair.name}", pair.columns[0])

    @staticmethod
    def _reduce_after(graph, row: fx.Node) -> None:
        """``linear(x, W, b)`` -> ``all_reduce(linear(x, W)) + b``: the partial
        sums of the ranks add up, and the bias is added once."""
        bias = row.args[2] if len(row.args) > 2 else None
        users = list(row.users)
        if bias is not None:
            row.args = (row.args[0], row.args[1])
        total = insert_all_reduce(graph, row)
        if bias is not None:
            with graph.fx.inserting_after(total):
                total = graph.fx.call_function(aten.add.Tensor, (total, bias))
        for user in users:
            user.replace_input_with(row, total)

    def _shard_rows(self, graph, user: fx.Node, index: int, rank: int, n: int, shards: dict) -> None:
        """``user.args[index]`` (a constant) replaced by its rows ``rank`` of
        ``n``: ``ceil(rows / n)`` of them, the last ranks' padded with zero rows."""
        old = user.args[index]
        full = graph.constant(old)
        if full is None:
            raise self.fail("a weight or bias to split by vocabulary is computed, not a constant", user)
        if id(full) not in shards:
            size = _vocab_shard_size(full.shape[0], n)
            rows = full[rank * size:(rank + 1) * size]
            padding = rows.new_zeros((size - rows.shape[0], *rows.shape[1:]))
            shards[id(full)] = graph.add_constant(torch.cat([rows, padding]).contiguous(), f"{old.target}.rank{rank}")
        user.replace_input_with(old, shards[id(full)])
        if not old.users:
            graph.fx.erase_node(old)

    def _vocab_parallel(self, graph, head: fx.Node, rank: int, n: int, shards: dict) -> None:
        """The LM head keeps rows ``rank`` of ``n`` of its weight; its logits are
        all-gathered (stacked along dim 0) and put back side by side, less the
        padding's columns when ``n`` does not divide the vocabulary."""
        vocab = graph.constant(head.args[1] if head.target == aten.linear.default else head.args[0]).shape[0]
        for i in (1, 2):
            if i < len(head.args) and head.args[i] is not None:
                self._shard_rows(graph, head, i, rank, n, shards)
        users = list(head.users)
        gathered = insert_all_gather(graph, head, n)
        with graph.fx.inserting_after(gathered):
            chunks = graph.fx.call_function(aten.chunk.default, (gathered, n, 0))
        pieces = []
        last = chunks
        for i in range(n):
            with graph.fx.inserting_after(last):
                last = graph.fx.call_function(operator.getitem, (chunks, i))
            pieces.append(last)
        with graph.fx.inserting_after(last):
            logits = graph.fx.call_function(aten.cat.default, (pieces, -1))
        if vocab % n:
            with graph.fx.inserting_after(logits):
                logits = graph.fx.call_function(aten.slice.Tensor, (logits, -1, 0, vocab))
        for user in users:
            user.replace_input_with(head, logits)

    def _vocab_embedding(self, graph, table: fx.Node, rank: int, n: int, shards: dict) -> None:
        """``embedding(W, ids)`` -> ``all_reduce(embedding(W_r, local) * in_shard)``
        with ``local = ids - start`` where the id falls in rank ``rank``'s rows
        ``start ..`` and 0 elsewhere; the ranks' rows add up to the lookup."""
        size = _vocab_shard_size(graph.constant(table.args[0]).shape[0], n)
        self._shard_rows(graph, table, 0, rank, n, shards)
        ids = table.args[1]
        users = list(table.users)
        g = graph.fx
        with g.inserting_before(table):
            local = g.call_function(aten.sub.Tensor, (ids, rank * size))
            below = g.call_function(aten.lt.Scalar, (local, 0))
            above = g.call_function(aten.ge.Scalar, (local, size))
            outside = g.call_function(aten.logical_or.default, (below, above))
            safe = g.call_function(aten.masked_fill.Scalar, (local, outside, 0))
        table.args = (table.args[0], safe)  # padding_idx only matters to training
        with g.inserting_after(table):
            mask = g.call_function(aten.unsqueeze.default, (outside, -1))
        with g.inserting_after(mask):
            rows = g.call_function(aten.masked_fill.Scalar, (table, mask, 0.0))
        total = insert_all_reduce(graph, rows)
        for user in users:
            user.replace_input_with(table, total)


def _vocab_shard_size(rows: int, n: int) -> int:
    """Rows of a table each of ``n`` ranks keeps: GPT-2's 50257 do not split
    evenly, so every rank keeps ``ceil(rows / n)``, the padding zeros (Megatron
    pads its vocabulary the same way)."""
    return -(-rows // n)


def _shard(size: int, rank: int, n: int) -> torch.Tensor:
    """The channels of rank ``rank``: the ``rank``-th of ``n`` equal runs."""
    per = size // n
    return torch.arange(rank * per, (rank + 1) * per)


def _head_shard(attn, rank: int, n: int) -> tuple[list[int], list[int]]:
    """(query heads, key/value heads) of rank ``rank``: its ``1/n`` of the KV
    groups with their query heads; with more ranks than KV heads, its ``1/n``
    of the query heads and the one KV head they read (replicated)."""
    per_q = attn.num_heads // n
    q = list(range(rank * per_q, (rank + 1) * per_q))
    if attn.num_kv_heads >= n:
        per_kv = attn.num_kv_heads // n
        return q, list(range(rank * per_kv, (rank + 1) * per_kv))
    return q, [q[0] // attn.group]
