"""``remove-padding``: an encoder's token-wise work done on its real tokens only.

A batch of sentences is padded to its longest one, and every linear, norm and
activation of an encoder computes the padded rows too (69% of the rows in
``benchmarks/fusion.py``'s batch of 32 texts of 4 to 43 tokens: MiniLM on
ONNX Runtime 0.87 -> 0.38 of eager fp32 with this pass). Attention is the only op
that mixes tokens, and a key-padding mask already keeps padded keys out of it.
The same idea as ONNX Runtime's packing mode (CUDA only) and PyTorch's
nested-tensor fast path of ``nn.TransformerEncoder``, here on the graph.

Matches: self-attentions under one key-padding mask ``m`` — ``scaled_dot_product_attention``
(``fuse-attention``'s output) or ``fxopt.packed_attention`` whose mask is proved,
op by op (the ``KeyPaddingMasks`` analysis, :mod:`.analyses.masks`), to be ``where(m[b, k] != 0, 0, fill)``
(or ``zeros.masked_fill(m == 0, fill)``, or the boolean ``m != 0``)
with ``m`` a 2-D graph input — and around them the *token-wise region*: every
op whose ``[B, S, ...]`` value is computed row by row (pointwise ops with
operands broadcast over rows, linears, norms, softmax and reductions over
trailing dims, views / splits / transposes of trailing dims, fxopt's fused
linears and norms, and the quantized linears whose activation scales are per
row or fixed).

Produces: the region on ``[T, ...]`` rows (``T`` real tokens, known at run
time): ``fxopt.unpad`` where it reads a padded value (once per value),
``fxopt.pad`` (zeros at padding) where a padded value is needed again — around
each attention — and ``fxopt.padding_index(m)`` once.

Exact: a value leaves the padded layout only if its padded rows never reach an
output: they are read by row-wise ops whose own padded rows are unread in turn,
by attention as padded keys (the mask weighs them exactly 0) or padded queries
(which give padded rows again), or the value is zero at padding anyway
(``hidden * mask``, as masked mean pooling writes it), so padding it back with
zeros is exact. ``padded_outputs=zero`` also lets outputs' padded rows become 0
(a model returning ``last_hidden_state`` whose caller pools with the mask);
by default they stay exact, which leaves such a model padded.

How it matches: attention is found by its op and its mask by the analysis;
the region is a data-flow analysis over a table of row-wise rules
(:func:`_row_rule`), walked backwards from the outputs, not a pattern: which
ops join depends on who reads their padded rows, over any number of ops.
The small chains it also reads (the mask behind casts and unsqueezes in
``hidden * mask``, the ``m[:B, :S]`` slices ``pack-attention`` adds) have no
fixed length, which the rewrite engine's patterns cannot say.

Refuses (no change; ``stats["reason"]``): no attention with a key-padding mask
(a decoder, or ``fuse-attention`` has not run), causal attention, masks that are
not plain key-padding masks; values whose padded rows something else reads
(positional slicing like BERT's pooler reading token 0, a per-tensor quantized
linear whose scale sees every row) stay padded, with everything they depend on.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

from ..ir.nodes import CASTS, VIEWS, call_args, dim_index, is_call, same_shape, val
from .analyses import CausalMasks, KeyPaddingMasks, Liveness, NotKeyPadding
from .base import Option, Pass, PassResult
from .registry import register_pass

aten = torch.ops.aten
fxopt_ops = torch.ops.fxopt
SDPA = aten.scaled_dot_product_attention.default


class Refuse(Exception):
    """No attention here to remove padding around; the message says why."""


# Linears that compute each output row from the same input row and the layer's
# parameters. Not row-wise: fxopt.linear_dynamic_int8(_act), whose activation
# scale is taken over the whole tensor, padded rows included.
_LINEARS = {
    aten.linear.default, fxopt_ops.linear_act.default,
    fxopt_ops.linear_nbits.default, fxopt_ops.linear_nbits_act.default,  # activations quantized per row block
    fxopt_ops.linear_dynamic_int8_per_token.default, fxopt_ops.linear_dynamic_int8_per_token_act.default,
    fxopt_ops.linear_static_int8.default,  # calibrated, fixed activation scale
}
# Row-wise ops on trailing dims with parameters: how many leading operands are rows.
_ROW_LINEAR = {
    **dict.fromkeys(_LINEARS, 1),
    fxopt_ops.rms_norm.default: 1,
    fxopt_ops.add_rms_norm.default: 2,
    fxopt_ops.add_layer_norm.default: 2,
}
_UNARY = {aten._to_copy.default, aten.to.dtype, aten.alias.default, aten.detach.default,
          aten.contiguous.default, aten.dropout.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default}
_REDUCE = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default,
           aten.var.dim, aten.var.correction, aten.std.dim, aten.std.correction}
_SPLIT = {aten.split.Tensor, aten.split_with_sizes.default}
_MIN_FILL = -1e4  # exp(-1e4) is 0 in float32: blocked keys weigh exactly 0


class _Layout:
    """The padded layout ``[B, S, ...]`` of one batch of sequences."""

    def __init__(self, batch, seq):
        self.batch, self.seq = batch, seq

    def padded(self, x, rank: int | None = None) -> bool:
        v = val(x)
        if isinstance(v, (tuple, list)):
            return bool(v) and all(isinstance(t, torch.Tensor) and self._tensor(t, rank) for t in v)
        return isinstance(v, torch.Tensor) and self._tensor(v, rank)

    def _tensor(self, t, rank) -> bool:
        return t.dim() >= 2 and same_shape(t.shape[:2], (self.batch, self.seq)) and (rank is None or t.dim() == rank)


def _shift(d: int, rank: int) -> int | None:
    """Dim ``d`` of a rank-``rank`` padded value on its ``[T, ...]`` form, or
    None when ``d`` is the batch or sequence dim."""
    n = dim_index(d, rank)
    if n < 2:
        return None
    return d if d < 0 else d - 1


# --------------------------------------------------------------------------
# row-wise ops: each rule returns a builder of the op on [T, ...] rows, or None

Builder = Callable[[fx.Graph, Callable], fx.Node]


def _row_rule(node: fx.Node, lay: _Layout) -> Builder | None:
    """How to compute ``node`` on ``[T, ...]`` rows, when its padded value is
    row by row: each output row from the same input rows (and operands
    constant over batch and sequence); None otherwise."""
    if node.op != "call_function" or not lay.padded(node):
        return None
    t = node.target
    if t is operator.getitem:
        return _same_op(node, rows=[node.args[0]])
    if not isinstance(t, torch._ops.OpOverload):
        return None
    a = call_args(node)
    out = val(node)
    rank = out[0].dim() if isinstance(out, (tuple, list)) else out.dim()
    if t in _ROW_LINEAR:
        rows = a[:_ROW_LINEAR[t]]
        if rank < 3 or not all(lay.padded(x, rank) for x in rows) or any(lay.padded(x) for x in a[len(rows):]):
            return None
        return _same_op(node, rows=rows)
    if t == aten.layer_norm.default:
        if rank < 3 or not lay.padded(a[0], rank) or len(a[1]) > rank - 2 or any(lay.padded(x) for x in a[2:4]):
            return None
        return _same_op(node, rows=[a[0]])
    if t in _UNARY:
        return _same_op(node, rows=[a[0]]) if lay.padded(a[0], rank) and (t != aten.dropout.default or not a[2]) else None
    if torch.Tag.pointwise in t.tags:
        return _pointwise(node, a, rank, lay)
    if t in _SOFTMAX:
        d = _shift(a[1], rank)
        return None if d is None or not lay.padded(a[0], rank) else _same_op(node, {1: d}, rows=[a[0]])
    if t in _REDUCE:
        if a[1] is None:  # over every dim
            return None
        dims = a[1] if isinstance(a[1], (list, tuple)) else [a[1]]
        new = [_shift(d, val(a[0]).dim()) for d in dims] if dims else [None]
        if None in new or not lay.padded(a[0]):
            return None
        return _same_op(node, {1: new if isinstance(a[1], (list, tuple)) else new[0]}, rows=[a[0]])
    if t in VIEWS:
        rest = list(out.shape[2:])
        if not lay.padded(a[0]) or not all(isinstance(d, int) for d in rest):
            return None
        return _same_op(node, {1: [-1, *rest]}, rows=[a[0]])
    if t in _SPLIT:
        d = _shift(a[2], val(a[0]).dim())
        return None if d is None or not lay.padded(a[0]) else _same_op(node, {2: d}, rows=[a[0]])
    if t == aten.transpose.int:
        d0, d1 = _shift(a[1], rank), _shift(a[2], rank)
        return None if d0 is None or d1 is None or not lay.padded(a[0]) else _same_op(node, {1: d0, 2: d1}, rows=[a[0]])
    if t == aten.permute.default:
        dims = [dim_index(d, rank) for d in a[1]]
        if dims[:2] != [0, 1] or not lay.padded(a[0]):
            return None
        return _same_op(node, {1: [0, *(d - 1 for d in dims[2:])]}, rows=[a[0]])
    if t == aten.unsqueeze.default:
        d = _shift(a[1], rank)
        return None if d is None or not lay.padded(a[0]) else _same_op(node, {1: d}, rows=[a[0]])
    return None


def _same_op(node, changes: dict | None = None, *, rows) -> Builder:
    """The op itself on the rows: the operands in ``rows`` replaced by their
    row form (through the builder's ``f``), and the schema arguments at the
    positions in ``changes`` (dims, shapes) replaced by the given values.
    ``build.rows`` lists the row operands."""
    args, kwargs = list(node.args), dict(node.kwargs)
    for i, v in (changes or {}).items():
        if i < len(args):
            args[i] = v
        else:
            kwargs[node.target._schema.arguments[i].name] = v

    def build(g: fx.Graph, f: Callable) -> fx.Node:
        def row(x):
            return f(x) if x in build.rows else x
        return g.call_function(node.target, tuple(fx.node.map_arg(args, row)), fx.node.map_arg(kwargs, row))
    build.rows = list(rows)
    return build


def _pointwise(node, args, rank, lay: _Layout) -> Builder | None:
    """A pointwise op: every tensor operand is padded with the output's rank,
    or constant over batch and sequence (broadcast: size 1 there, or fewer
    dims); a full-rank broadcast operand loses its leading 1."""
    squeeze = []
    for x in args:
        if not isinstance(x, fx.Node) or not isinstance(val(x), torch.Tensor) or lay.padded(x, rank):
            continue
        shape = val(x).shape
        lead = list(shape[: max(0, len(shape) - (rank - 2))])  # dims that line up with B, S
        if not all(isinstance(d, int) and d == 1 for d in lead) or len(shape) > rank:
            return None
        if len(shape) == rank:
            squeeze.append(x)
    rows = [x for x in args if isinstance(x, fx.Node) and lay.padded(x, rank)]
    if not rows:
        return None
    same = _same_op(node, rows=rows + squeeze)

    def build(g: fx.Graph, f: Callable) -> fx.Node:
        return same(g, lambda x: g.call_function(aten.squeeze.dim, (x, 0)) if x in squeeze else f(x))
    build.rows = rows
    return build


def _zero_at_padding(node: fx.Node, mask: fx.Node, lay: _Layout) -> bool:
    """``node = x * c`` with ``c`` built from ``mask[b, s]`` by casts, ``!= 0``
    and trailing unsqueezes: 0 on every padded row (``x`` finite)."""
    if not is_call(node, {aten.mul.Tensor}):
        return False
    rank = val(node).dim()
    for c in node.args[:2]:
        if not lay.padded(c, rank):  # mask rows, not the mask broadcast along another dim
            continue
        while isinstance(c, fx.Node) and c is not mask:
            if is_call(c, CASTS) or (is_call(c, {aten.ne.Scalar, aten.gt.Scalar}) and c.args[1] == 0):
                c = c.args[0]
            elif is_call(c, {aten.unsqueeze.default}) and dim_index(c.args[1], val(c).dim()) >= 2:
                c = c.args[0]
            else:
                break
        if c is mask and lay.padded(mask, 2):
            return True
    return False


def _strip_slices(x):
    """The mask behind pack-attention's ``m[:B, :S]`` (slices from 0 of dims 0, 1)."""
    while is_call(x, {aten.slice.Tensor}) and x.args[1] in (0, 1) and (len(x.args) < 3 or x.args[2] in (None, 0)):
        x = x.args[0]
    return x


def _head_transpose(node: fx.Node) -> bool:
    """``[B, S, N, H] -> [B, N, S, H]`` and back."""
    if is_call(node, {aten.transpose.int}):
        return val(node).dim() == 4 and sorted(dim_index(d, 4) for d in node.args[1:3]) == [1, 2]
    return is_call(node, {aten.permute.default}) and [dim_index(d, 4) for d in node.args[1]] == [0, 2, 1, 3]


# --------------------------------------------------------------------------
# the pass

@register_pass("remove-padding")
class RemovePadding(Pass):
    """Token-wise ops of a padded batch -> the same ops on its real tokens.

    Matches self-attention under one key-padding mask and the row-wise ops
    around it; produces ``fxopt.unpad`` / ``fxopt.pad`` at the region's edges
    and ``fxopt.padding_index`` once; refuses (``stats["reason"]``) graphs
    without such attention. Exact unless ``padded_outputs=zero``. See the
    module docstring.
    """

    padded_outputs = Option("exact", choices=("exact", "zero"),
                            help="exact: outputs' padded rows stay as computed; zero: they may become 0")
    runs_after = ("fuse-attention",)  # attention is found as SDPA
    # pack-attention's op would run its QKV GEMM on padded rows: run this first,
    # and pack-attention refuses these attentions (MultiHeadAttention then).
    runs_before = ("pack-attention",)
    # A mask's proofs are facts about its value: running rows on real tokens keeps them.
    preserves = (CausalMasks, KeyPaddingMasks)

    def run(self, graph) -> PassResult:
        try:
            attention, mask, lay = self._attention(graph)
        except Refuse as e:
            return PassResult(False, {"reason": str(e)})
        region, blockers = self._region(graph, attention, mask, lay)
        if not any(n.target in _LINEARS for n in region):
            readers = sorted(("output" if u.op == "output" else f"%{u.name} ({getattr(u.target, '__name__', u.target)})")
                             for u in blockers)
            readers.sort(key=lambda r: r != "output")
            return PassResult(False, {"reason": "no linear can run on the real tokens alone: their padded rows are read by ops "
                                                "not known to be row-wise: "
                                                + (", ".join(readers[:4]) or "nothing known")
                                                + (" (padded_outputs=zero lets outputs' padded rows become 0)"
                                                   if "output" in readers else ""),
                                      "attention": len(attention)})
        stats = self._rewrite(graph, region, mask, lay)
        stats["attention"] = len(attention)
        return PassResult(True, stats)

    # -- analysis -------------------------------------------------------------
    def _attention(self, graph) -> tuple[set, fx.Node, _Layout]:
        """Self-attentions under one key-padding mask, the mask input, the layout."""
        found, mask, lay, why = set(), None, None, "no scaled_dot_product_attention or fxopt.packed_attention (run fuse-attention first)"
        for node in graph.fx.nodes:
            try:
                if is_call(node, {SDPA}):
                    q, k, v, attn_mask, dropout, causal = call_args(node)[:6]
                    qv, kv = val(q), val(k)
                    if attn_mask is None or causal or dropout:
                        raise Refuse(f"%{node.name}: not a key-padding-masked, non-causal attention without dropout")
                    if not same_shape(qv.shape[2:3], kv.shape[2:3]):
                        raise Refuse(f"%{node.name}: queries and keys differ in length")
                    try:
                        kp = self.analysis(KeyPaddingMasks, graph).prove(attn_mask, kv.shape[0], kv.shape[2])
                    except NotKeyPadding as e:
                        raise Refuse(str(e)) from None
                    m, fill = kp.source, kp.fill
                    here = _Layout(qv.shape[0], qv.shape[2])
                elif is_call(node, {fxopt_ops.packed_attention.default}):
                    x, _w, _b, m, _heads, causal, _scale, fill = node.args[:8]
                    if m is None or causal:
                        raise Refuse(f"%{node.name}: not key-padding-masked")
                    m = _strip_slices(m)
                    here = _Layout(*val(x).shape[:2])
                elif is_call(node, {fxopt_ops.packed_attention_dynamic_int8.default}):
                    raise Refuse(f"%{node.name}: its per-tensor int8 QKV projection takes one activation scale over "
                                 "every row, padded ones too (run remove-padding before quantize and pack-attention)")
                else:
                    continue
                if fill > _MIN_FILL:  # padded keys (zeros once padded back) must weigh exactly 0
                    raise Refuse(f"%{node.name}: mask fill {fill:g} leaves padded keys a weight")
            except Refuse as e:
                why = str(e)
                continue
            if mask is None:
                mask, lay = m, here
            if m is not mask or not same_shape((here.batch, here.seq), (lay.batch, lay.seq)):
                continue
            found.add(node)
        if not found:
            raise Refuse(why)
        return found, mask, lay

    def _region(self, graph, attention, mask, lay) -> tuple[list[fx.Node], set[fx.Node]]:
        """The nodes to run on real rows, in graph order.

        Walks backwards: a padded value's padded rows are *unread* when every
        use ignores them (an output with padded_outputs=zero; attention;
        a region op whose own padded rows are unread); a row-wise node joins the
        region when its padded rows are unread or zero anyway. Also returns the
        ops that keep row-wise values padded by reading their padded rows."""
        nodes = list(graph.fx.nodes)
        moved = self._moved(nodes, attention, lay)
        rules = {n: r for n in nodes if n not in moved and (r := _row_rule(n, lay)) is not None}
        region: set[fx.Node] = set()
        unread: set[fx.Node] = set()
        blockers: set[fx.Node] = set()
        dead = self.analysis(Liveness, graph).dead  # e.g. the scores matmul fuse-attention left for dce

        def heads_merged_unread(sdpa):  # a query's padded rows give padded rows
            return all(w in dead or (_head_transpose(w) and lay.padded(w) and w in unread) for w in sdpa.users)

        def ignores_padding(user, v) -> bool:
            if user.op == "output":
                return self.padded_outputs == "zero"
            if user in region:
                return True
            if _head_transpose(user) and lay.padded(v, 4):
                return all(u in dead or (u in attention and is_call(u, {SDPA}) and call_args(u)[3] is not user
                                         and (call_args(u)[0] is not user or heads_merged_unread(u))) for u in user.users)
            if user in attention and is_call(user, {fxopt_ops.packed_attention.default}):
                return user.args[0] is v and user in unread
            return False

        for n in reversed(nodes):
            if not lay.padded(n):
                continue
            users = [u for u in n.users if u not in dead]
            if isinstance(val(n), (tuple, list)):
                # a tuple result moves with all its items, or not at all
                items = list(n.users)  # dead items too: they move with it
                if (n in rules and all(u.target is operator.getitem and u in rules for u in items)
                        and all(u in unread for u in users)):
                    region.update([n, *items])
                    unread.add(n)
                continue
            readers = [u for u in users if not ignores_padding(u, n)]
            if not readers:
                unread.add(n)
            elif n in rules:  # what keeps it padded (attention only when its output is read in turn)
                blockers.update(u for u in readers if not (u in rules or _head_transpose(u) or u in attention))
            if n in rules and n.target is not operator.getitem and (n in unread or _zero_at_padding(n, mask, lay)):
                region.add(n)
        return [n for n in nodes if n in region], blockers

    @staticmethod
    def _moved(nodes, attention, lay) -> set[fx.Node]:
        """Values shaped [B, S, ...] whose first two dims are not the batch's
        tokens (with static shapes ``x.transpose(1, 2)`` is [B, D, S], which
        looks [B, S, ...] when D == S): made by a transpose / permute that moves
        dim 0 or 1 or a view of a value not laid out [B, S, ...], or computed
        from such a value. Attention's output with its heads merged back is
        token rows again."""
        moved: set[fx.Node] = set()
        for n in nodes:
            if n.op != "call_function" or not lay.padded(n):
                continue
            if n in attention or (_head_transpose(n) and n.args[0] in attention):
                continue
            t, rank = n.target, (val(n)[0] if isinstance(val(n), (tuple, list)) else val(n)).dim()
            moves = ((t == aten.transpose.int and min(dim_index(d, rank) for d in n.args[1:3]) < 2 and n.args[1] != n.args[2])
                     or (t == aten.permute.default and [dim_index(d, rank) for d in n.args[1]][:2] != [0, 1])
                     or (t in VIEWS and not lay.padded(n.args[0])))
            if moves or any(x in moved for x in n.all_input_nodes):
                moved.add(n)
        return moved

    # -- rewrite --------------------------------------------------------------
    def _rewrite(self, graph, region, mask, lay) -> dict:
        g = graph.fx
        rules = {n: _row_rule(n, lay) for n in region}
        inside = set(region)
        rows: dict[fx.Node, fx.Node] = {}
        entries: dict[fx.Node, fx.Node] = {}
        index = sizes = None

        def row_of(x):
            if x in rows:
                return rows[x]
            if not (isinstance(x, fx.Node) and lay.padded(x)):
                return x
            if x not in entries:
                entries[x] = g.call_function(fxopt_ops.unpad.default, (x, index))
            return entries[x]

        for n in region:
            with g.inserting_before(n):
                if index is None:
                    first = next(a for a in n.all_input_nodes if lay.padded(a))
                    sizes = [d if isinstance(d, int) else g.call_function(aten.sym_size.int, (first, i))
                             for i, d in enumerate((lay.batch, lay.seq))]
                    m = mask
                    if not same_shape(val(mask).shape, (lay.batch, lay.seq)):
                        m = g.call_function(aten.slice.Tensor, (m, 0, 0, sizes[0]))
                        m = g.call_function(aten.slice.Tensor, (m, 1, 0, sizes[1]))
                    index = g.call_function(fxopt_ops.padding_index.default, (m,))
                rows[n] = rules[n](g, row_of)
                rows[n].meta["stack_trace"] = n.meta.get("stack_trace")
        exits = 0
        for n in region:
            outside = [u for u in n.users if u not in inside]
            if not outside:
                continue
            with g.inserting_after(rows[n]):
                padded = g.call_function(fxopt_ops.pad.default, (rows[n], index, *sizes))
            exits += 1
            for u in outside:
                u.replace_input_with(n, padded)
        for n in reversed(region):
            g.erase_node(n)
        return {"rows": len(region), "unpad": len(entries), "pad": exits,
                "linears": sum(1 for n in region if n.target in _LINEARS)}
