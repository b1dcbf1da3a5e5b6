"""``share-weights``: one stored tensor where the graph holds several equal
ones, or one that is another's transpose (a tied LM head)."""

from __future__ import annotations

import torch
import torch.fx as fx

from .base import Pass, PassResult
from .registry import register_pass

aten = torch.ops.aten


def _is_linear_weight(user: fx.Node, node: fx.Node) -> bool:
    return user.target == aten.linear.default and len(user.args) > 1 and user.args[1] is node and user.args[0] is not node


def _is_embedding_table(user: fx.Node, node: fx.Node) -> bool:
    return user.target == aten.embedding.default and user.args[0] is node and user.args[1] is not node


@register_pass("share-weights")
class ShareWeights(Pass):
    """Stores each distinct weight once, in the graph and in the ONNX file.

    Matches:

    * constants equal in dtype, shape and values (copies of one tensor):
      every reader reads the first;
    * 2-D constants where one is the other's transpose, and a 2-D table read
      both by ``aten.embedding`` and as an ``aten.linear`` weight (an LM
      head tied to the embedding): ONNX export stores a linear's weight
      transposed (``MatMul`` reads ``[K, N]``), so a tied table is written
      twice (small ones folded into a transposed copy) or transposed at every
      run (large ones).

    Produces, for a tie through a transpose, one ``[K, N]`` tensor ``S`` (the
    orientation ``MatMul`` reads): ``linear(x, S^T, b)`` becomes
    ``matmul(x, S)`` (``+ b``), ``embedding(S^T, ids)`` becomes
    ``index_select(S, 1, ids)`` transposed back to ``[..., K]`` (the gather
    moves only the looked-up rows), any other reader of ``S^T`` reads
    ``aten.t(S)``.

    Refuses (leaves as they are): buffers the graph writes, tensors of other
    ranks for the transpose tie, and weights already tied to one storage with
    only linear readers (the exporter stores those once already). Run it last
    before a backend: later passes (``quantize``, ``canonicalize``) expect
    ``linear`` and would make a transposed copy again.

    Stats: ``merged`` (equal constants read through one), ``tied_transposes``
    (tensors now read through another's transpose), ``readers_rewritten``,
    ``bytes_saved`` in the graph.
    """

    runs_after = ("canonicalize", "quantize", "prune", "constant-fold", "cse")

    def run(self, graph) -> PassResult:
        before = graph.param_bytes()
        attrs = [n for n in graph.fx.nodes if n.op == "get_attr" and graph.constant(n) is not None]
        merged = set(graph.merge_equal_constants(attrs))
        # Several get_attr nodes of one storage (an attribute read twice, two names of one tensor) act as one.
        by_storage: dict[tuple, list[fx.Node]] = {}
        for n in attrs:
            if n not in merged:
                t = graph.constant(n)
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
                by_storage.setdefault(key, []).append(n)
        for group in by_storage.values():
            for other in group[1:]:
                other.replace_all_uses_with(group[0])
                graph.fx.erase_node(other)
        ties, rewritten = 0, 0
        matrices = [g[0] for g in by_storage.values() if graph.constant(g[0]).dim() == 2]
        done: set[fx.Node] = set()
        for node in matrices:
            if node in done:
                continue
            t = graph.constant(node)
            partners = [m for m in matrices if m is not node and m not in done and self._transposed(t, graph.constant(m))]
            done.update(partners)
            mixed = any(_is_embedding_table(u, node) for u in node.users) and any(_is_linear_weight(u, node) for u in node.users)
            if not partners and not mixed:
                continue
            self.current_node = node
            rewritten += self._store_once(graph, [node] + partners)
            ties += len(partners) + int(mixed)
        self.current_node = None
        changed = bool(merged) or rewritten > 0 or any(len(g) > 1 for g in by_storage.values())
        stats = {"merged": len(merged), "tied_transposes": ties, "readers_rewritten": rewritten}
        graph.prune_unreferenced_attributes()
        stats["bytes_saved"] = before - graph.param_bytes()
        return PassResult(changed, stats)

    @staticmethod
    def _transposed(a: torch.Tensor, b: torch.Tensor) -> bool:
        return b.dim() == 2 and a.dtype == b.dtype and tuple(b.shape) == tuple(a.shape)[::-1] and torch.equal(a.T, b)

    def _store_once(self, graph, members: list[fx.Node]) -> int:
        """``members`` hold one matrix ``B`` or its transpose. Store ``S = B^T``
        once, ``B`` being a member a linear reads as its weight (MatMul's
        orientation), and rewrite every reader; returns the readers rewritten."""
        base = next((m for m in members if any(_is_linear_weight(u, m) for u in m.users)), members[0])
        b = graph.constant(base)
        stored = graph.add_constant(b.T.contiguous(), f"{base.target}.t")
        count = 0
        for member in members:
            if not torch.equal(graph.constant(member), b):
                member.replace_all_uses_with(stored)  # equal to S: read S itself
                graph.fx.erase_node(member)
                continue
            for user in list(member.users):  # reads S^T
                with graph.fx.inserting_before(user):
                    new = self._read_transposed(graph, user, member, stored)
                if new is not None:
                    new.meta.update({k: v for k, v in user.meta.items() if k != "val"})
                    user.replace_all_uses_with(new)
                    graph.fx.erase_node(user)
                    count += 1
            if member.users:  # any other reader: through a transpose at run time
                with graph.fx.inserting_after(stored):
                    t_node = graph.fx.call_function(aten.t.default, (stored,))
                member.replace_all_uses_with(t_node)
            graph.fx.erase_node(member)
        return count

    @staticmethod
    def _read_transposed(graph, user: fx.Node, src: fx.Node, stored: fx.Node) -> fx.Node | None:
        """The replacement of ``user``, which reads ``src == stored^T``; None
        to keep ``user`` (it will read ``aten.t(stored)``)."""
        call = graph.fx.call_function
        if _is_linear_weight(user, src) and not user.kwargs:
            out = call(aten.matmul.default, (user.args[0], stored))
            bias = user.args[2] if len(user.args) > 2 else None
            return out if bias is None else call(aten.add.Tensor, (out, bias))
        if _is_embedding_table(user, src) and len(user.args) == 2 and not user.kwargs:
            ids = user.args[1]
            ids_val = ids.meta.get("val")
            if not isinstance(ids_val, torch.Tensor):
                return None
            sizes = [call(aten.sym_size.int, (ids, i)) if isinstance(s, torch.SymInt) else int(s) for i, s in enumerate(ids_val.shape)]
            flat = call(aten.reshape.default, (ids, [-1]))
            rows = call(aten.t.default, (call(aten.index_select.default, (stored, 1, flat)),))
            return call(aten.reshape.default, (rows, sizes + [graph.constant(stored).shape[0]]))
        return None
