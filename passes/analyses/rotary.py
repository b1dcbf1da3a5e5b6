"""Rotary position embeddings, read from the graph as the tables an attention
kernel takes (ONNX Runtime's GroupQueryAttention ``do_rotary``: ``cos_cache``
and ``sin_cache`` rows indexed by each token's position)::

    rope = self.analysis(RotaryEmbeddings, graph)
    r = rope.rotation(node)     # Rotation(x, cos, sin): node is x * cos + rotate_half(x) * sin
    t = rope.tables(r)          # RotaryTables(cos [rows, H/2], sin [rows, H/2], positions)
                                # or raises NotRotary(why)

**The rotation** (:meth:`RotaryFacts.rotation`) is transformers'
``apply_rotary_pos_emb`` on a ``[B, n, S, H]`` value, matched with the
rewrite engine::

    x ─┬──────────────────────────────── mul(cos) ─┐
       └ cat([-x[..., H/2:], x[..., :H/2]], -1) ─ mul(sin) ─ add

over the whole head (a partial rotation, ``x[..., :R]`` with ``R < H``, is not
this pattern). ``cos`` and ``sin`` must be ``[B|1, 1, S, H]``.

**The tables** (:meth:`RotaryFacts.tables`): the backward slice of ``cos`` and
``sin`` must read one graph input (the positions, integers ``[B, S]``) and
constants (``inv_freq``) through position-wise ops only (casts, products and
sums, cos, sin, unsqueeze, concatenation on the last dim, ...): each row of the
result is then a function of that token's position. The slice is evaluated at
positions ``0 .. n-1``, where ``n`` is the bound the graph declares for that
input (``Graph.value_bounds``: a decoder's ``max_position_embeddings``), and
checked at random positions against the rows so found. The standard half
rotation repeats its angles (``cat(freqs, freqs)``): both halves of each row
must be equal, and the first half is the kernel's table. Refused (``NotRotary``
with the reason): another input or an op that is not position-wise in the
slice, positions that are not an integer input with a bound, tables whose
halves differ (interleaved or other layouts), a dtype other than the
query's.

**Fixed tables**: a forward traced without a positions input computes its
positions itself (``arange`` of the sequence length). When the slice reads no
graph input at all and its shapes are static, it is evaluated once: row ``s``
of the result is the angle of query ``s`` of every sequence, which is what a
prompt kernel that counts positions from 0 reads at row ``s``
(``RotaryTables.positions`` is None). Refused: a symbolic sequence length (the
tables' length is not known), sequences of the batch rotated differently, an
op that is not pure in the slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ...ir.nodes import is_call, is_pure, same_shape, val
from ..analysis import Analysis
from ..rewrite import Match, Pattern, Reject, match_at

aten = torch.ops.aten


class NotRotary(Exception):
    """The rotation's tables cannot be read as a kernel's; the message says why."""


@dataclass(frozen=True)
class Rotation:
    """``node == x * cos + rotate_half(x) * sin`` (a whole-head half rotation)."""

    node: fx.Node
    x: fx.Node
    cos: fx.Node
    sin: fx.Node


@dataclass(frozen=True)
class RotaryTables:
    """``cos_node[b, 0, s] == cat(cos[p], cos[p])`` with ``p = positions[b, s]``
    (and the same for sin): ``cos`` and ``sin`` are ``[rows, H/2]``. Fixed
    tables (``positions`` None): ``p = s`` for every sequence, ``rows`` the
    traced sequence length."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: fx.Node | None


def _rotate_half(x, cos, sin, half: int):  # transformers' apply_rotary_pos_emb, one of q / k
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _whole_head(m: Match) -> bool:
    xv, cv, sv = val(m["x"]), val(m["cos"]), val(m["sin"])
    if not (isinstance(xv, torch.Tensor) and xv.dim() == 4 and m["half"] * 2 == xv.shape[3]):
        raise Reject("not a half rotation of the whole head of a [B, n, S, H] value")
    for name, t in (("cos", cv), ("sin", sv)):
        if not (isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] == 1 and same_shape(t.shape[2:], xv.shape[2:])):
            raise Reject(f"{name} is not [B, 1, S, H]")
    return True


ROTATE_HALF = Pattern("rotate-half", _rotate_half, build=lambda m, g: None, check=_whole_head,
                      inputs={"x": (2, 3, 5, 12), "cos": (2, 1, 5, 12), "sin": (2, 1, 5, 12), "half": 6})

# Ops whose output row for a token reads only that token's rows of their inputs
# (and constants): the slice behind a rotary table may hold only these.
_POSITION_WISE = {
    aten.unsqueeze.default, aten._to_copy.default, aten.to.dtype, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor,
    aten.div.Scalar, aten.add.Tensor, aten.sub.Tensor, aten.neg.default, aten.cos.default, aten.sin.default,
    aten.pow.Tensor_Scalar, aten.reciprocal.default, aten.clone.default, aten.alias.default,
}


class RotaryFacts:
    """Rotations and their tables on one graph, each read once."""

    def __init__(self, graph):
        self.graph = graph
        self._tables: dict[tuple[fx.Node, fx.Node], RotaryTables | NotRotary] = {}

    def rotation(self, node) -> Rotation | None:
        if not is_call(node, ROTATE_HALF.anchor_ops):
            return None
        m = match_at(ROTATE_HALF, node, self.graph)
        return None if m is None else Rotation(node, m["x"], m["cos"], m["sin"])

    def tables(self, rotation: Rotation) -> RotaryTables:
        key = (rotation.cos, rotation.sin)
        if key not in self._tables:
            try:
                self._tables[key] = self._read(rotation)
            except NotRotary as e:
                self._tables[key] = e
        found = self._tables[key]
        if isinstance(found, NotRotary):
            raise found
        return found

    # -- reading the tables ---------------------------------------------------------
    def _read(self, r: Rotation) -> RotaryTables:
        nodes, inputs, mixing = self._slice([r.cos, r.sin])
        if not inputs:
            return self._fixed(r, nodes)
        sizes = [n for n in nodes if is_call(n, {aten.sym_size.int})]
        if sizes and all(u in sizes for p in inputs for u in p.users if u in nodes):
            raise NotRotary(f"the rotary tables read only the symbolic length of {sorted(p.name for p in inputs)} "
                            "(positions counted from 0 by the graph): their length is not known before a call")
        if mixing is not None:
            raise NotRotary(f"%{mixing.name} ({mixing.target}) is not a position-wise op: the rotary tables could mix "
                            "positions")
        if len(inputs) != 1:
            raise NotRotary(f"the rotary tables read {len(inputs)} graph inputs "
                            f"({sorted(p.name for p in inputs)}), not one (the positions)")
        (positions,) = inputs
        pv, xv = val(positions), val(r.x)
        if pv.dtype.is_floating_point or pv.dtype == torch.bool or pv.dim() != 2 \
                or not same_shape(pv.shape, (xv.shape[0], xv.shape[2])):
            raise NotRotary(f"%{positions.name} is not [B, S] integer positions")
        rows = self.graph.value_bounds.get(positions.name)
        if not rows:
            raise NotRotary(f"the graph declares no bound on %{positions.name} (Graph.value_bounds): "
                            "the rotary table's length is unknown")
        env = self._evaluate(nodes, positions, torch.arange(rows, dtype=pv.dtype)[None])
        cos, sin = env[r.cos][0, 0], env[r.sin][0, 0]  # [rows, H]
        at = torch.randint(0, rows, (2, 3), generator=torch.Generator().manual_seed(0), dtype=pv.dtype)
        env = self._evaluate(nodes, positions, at)
        for table, spot in ((cos, env[r.cos]), (sin, env[r.sin])):
            if not torch.allclose(spot[:, 0], table[at], rtol=1e-6, atol=1e-6):
                raise NotRotary("the rotary tables are not a function of each token's position alone")
        return self._halves(cos, sin, xv, positions)

    def _fixed(self, r: Rotation, nodes: list[fx.Node]) -> RotaryTables:
        impure = [n for n in nodes if n.op == "call_function" and not is_pure(n)]
        if impure:
            raise NotRotary(f"%{impure[0].name} ({impure[0].target}) is not a pure op: the rotary tables cannot be "
                            "evaluated ahead of time")
        xv = val(r.x)
        if not all(isinstance(d, int) for t in (r.cos, r.sin) for d in val(t).shape):
            raise NotRotary(f"the rotary tables read no positions input and their shape {tuple(val(r.cos).shape)} is "
                            "symbolic: they cannot be evaluated before a call")
        env = self._evaluate(nodes, None, None)
        cos, sin = env[r.cos], env[r.sin]  # [B|1, 1, S, H]
        if not (torch.equal(cos, cos[:1].expand_as(cos)) and torch.equal(sin, sin[:1].expand_as(sin))):
            raise NotRotary("the sequences of the batch are rotated by different tables")
        return self._halves(cos[0, 0], sin[0, 0], xv, None)

    @staticmethod
    def _halves(cos, sin, xv, positions) -> RotaryTables:
        """The kernel's tables: the first half of ``cos`` / ``sin`` ``[rows, H]``
        rows, whose halves must be equal (the standard half rotation)."""
        half = cos.shape[1] // 2
        for name, table in (("cos", cos), ("sin", sin)):
            if not torch.allclose(table[:, :half], table[:, half:], rtol=1e-6, atol=1e-6):
                raise NotRotary(f"the {name} table's halves differ (not the half rotation's cat(freqs, freqs))")
        if cos.dtype != xv.dtype:
            raise NotRotary(f"rotary tables in {cos.dtype}, the query in {xv.dtype}")
        return RotaryTables(cos[:, :half].contiguous(), sin[:, :half].contiguous(), positions)

    def _slice(self, roots: list[fx.Node]) -> tuple[list[fx.Node], set[fx.Node], fx.Node | None]:
        """The backward slice of ``roots`` in graph order, the graph inputs it
        reads, and its first op that is not position-wise (None if none)."""
        seen, inputs, stack, mixing = set(), set(), list(roots), None
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "placeholder":
                inputs.add(n)
            elif n.op == "get_attr":
                if self.graph.constant(n) is None:
                    raise NotRotary(f"%{n.name} is not a constant")
            elif n.op == "call_function":
                if mixing is None and not (n.target in _POSITION_WISE or self._last_dim_cat(n)):
                    mixing = n
                stack += n.all_input_nodes
            else:
                raise NotRotary(f"%{n.name} ({n.op}) cannot be read as part of a rotary table")
        order = {n: i for i, n in enumerate(self.graph.fx.nodes)}
        return sorted(seen, key=order.__getitem__), inputs, mixing

    @staticmethod
    def _last_dim_cat(n: fx.Node) -> bool:
        if n.target is not aten.cat.default:
            return False
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        return dim in (-1, val(n).dim() - 1)

    def _evaluate(self, nodes: list[fx.Node], positions: fx.Node, at: torch.Tensor) -> dict[fx.Node, object]:
        """Every node of the slice, run with ``positions`` = ``at``."""
        env: dict[fx.Node, object] = {} if positions is None else {positions: at}
        with torch.no_grad():
            for n in nodes:
                if n.op == "get_attr":
                    env[n] = self.graph.constant(n)
                elif n.op == "call_function":
                    args = fx.node.map_arg(n.args, env.__getitem__)
                    kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
                    env[n] = n.target(*args, **kwargs)
        return env


class RotaryEmbeddings(Analysis):
    """Rotary embeddings and their tables (:class:`RotaryFacts`)."""

    def run(self, graph) -> RotaryFacts:
        return RotaryFacts(graph)
