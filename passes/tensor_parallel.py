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
    (separate or merged) with the attention output projection, split by
    heads. The LM head (a linear outside every pair whose output is a graph
    output) is split by vocabulary.

    Produces: each column linear keeps its shard of output channels (weight
    rows and bias entries, splits of a merged projection resized); each row
    linear keeps the matching input channels, computes a partial sum without
    its bias, and is followed by ``all_reduce`` + ``wait_tensor`` and then the
    bias, added once: one all-reduce per pair, two per transformer layer. The
    LM head keeps its shard of the vocabulary; its logits are gathered
    (``all_gather_into_tensor`` along dim 0) and laid out along the last
    dimension, so every rank returns the whole model's logits
    (``lm_head=replicated`` keeps it whole). Embeddings and norms stay whole.
    Collectives use the group ``"tp"``, bound at run time.

    Refuses: ``world_size`` that does not divide a pair's channels (or heads)
    or the vocabulary, with the node at fault, before changing anything.
    Groups the analysis cannot pair stay whole (stats ``unpaired`` gives the
    reason). ``world_size=1`` leaves the graph as it was.
    """

    world_size = Option(2, int, check=_positive, help="number of tensor-parallel ranks")
    rank = Option(None, int, help="the rank whose graph to build (default: this process's rank under torch.distributed)")
    lm_head = Option("vocab", str, choices=("vocab", "replicated"),
                     help="vocab: split the LM head by vocabulary and all-gather its logits; replicated: keep it whole")

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
        self._check_fits(graph, plan, lm_heads, n)
        before = graph.param_bytes()
        kept = [(p.group, _shard(p.group.size, rank, n)) for p in plan.pairs if p.attention is None]
        heads = [(p.attention, *_head_shard(p.attention, rank, n)) for p in plan.pairs if p.attention is not None]
        keep_channels(graph, deps, kept, heads, suffix=f"rank{rank}")
        reduces = 0
        for pair in plan.pairs:
            for row in pair.rows:
                self._reduce_after(graph, row)
                reduces += 1
        for head in lm_heads:
            self._vocab_parallel(graph, head, rank, n)
        graph.properties.add(f"tensor-parallel-rank={rank}/{n}")
        stats = {"rank": rank, "world_size": n, "pairs": len(plan.pairs), "all_reduces": reduces,
                 "all_gathers": len(lm_heads), "bytes_before": before, "bytes_after": graph.param_bytes(),
                 "split": {p.name: p.kind for p in plan.pairs}, "unpaired": dict(plan.unpaired)}
        return PassResult(bool(plan.pairs or lm_heads), stats)

    def _check_fits(self, graph, plan, lm_heads, n: int) -> None:
        for pair in plan.pairs:
            if pair.attention is not None:
                a = pair.attention
                if a.num_heads % n:
                    raise self.fail(f"world_size={n} does not divide the {a.num_heads} heads of {a.name}", a.q.producer)
                if a.num_kv_heads % n and n % a.num_kv_heads:
                    raise self.fail(f"world_size={n} neither divides nor is a multiple of the {a.num_kv_heads} key/value "
                                    f"heads of {a.name}", a.k.producer)
            elif pair.group.size % n:
                raise self.fail(f"world_size={n} does not divide the {pair.group.size} channels of {pair.name}", pair.columns[0])
        for head in lm_heads:
            vocab = graph.constant(head.args[1]).shape[0]
            if vocab % n:
                raise self.fail(f"world_size={n} does not divide the LM head's {vocab} output channels "
                                "(option lm_head=replicated keeps it whole)", head)

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

    def _vocab_parallel(self, graph, head: fx.Node, rank: int, n: int) -> None:
        """The LM head keeps rows ``rank`` of ``n`` of its weight; its logits are
        all-gathered (stacked along dim 0) and put back side by side."""
        weight = graph.constant(head.args[1])
        size = weight.shape[0] // n
        args = list(head.args)
        for i in (1, 2):
            if i < len(args) and args[i] is not None:
                full = graph.constant(args[i])
                if full is None:
                    raise self.fail("the LM head's bias is computed, not a constant", head)
                args[i] = graph.add_constant(full[rank * size:(rank + 1) * size].contiguous(), f"{args[i].target}.rank{rank}")
        old = [a for a in head.args[1:] if isinstance(a, fx.Node)]
        head.args = tuple(args)
        for node in old:
            if not node.users:
                graph.fx.erase_node(node)
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
        for user in users:
            user.replace_input_with(head, logits)


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
