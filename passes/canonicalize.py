"""``canonicalize``: one form for each thing, and nothing inference does not need."""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from ..ir.nodes import dim_index, is_assert, is_pure, same_shape, size_value, val
from .base import Option, Pass, PassResult
from .registry import register_pass


def _is_zero(size) -> bool:
    """A size known to be 0 without a guard (an unbacked one, rows left after
    remove-padding, cannot be compared at all)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(size == 0)

aten = torch.ops.aten
_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SAME_VALUE = {aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default}
_SCALINGS = {aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.to.device, aten.type_as.default}


def _is_2d_transpose(node: fx.Node) -> bool:
    if node.target in (aten.t.default, aten.numpy_T.default):
        return True
    if node.target == aten.transpose.int:
        dims = {d % 2 for d in node.args[1:3]}
        return len(val(node).shape) == 2 and dims == {0, 1}
    if node.target == aten.permute.default:
        return list(node.args[1]) in ([1, 0], [-1, -2], [1, -2], [-1, 0])
    return False


def _scalar(graph, x) -> float | None:
    """``x`` as a python float when it is a number or a one-element constant."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    c = graph.constant(x) if isinstance(x, fx.Node) else None
    if c is not None and c.numel() == 1 and c.dtype.is_floating_point:
        return float(c)
    return None


def _fold_source(x) -> fx.Node | None:
    """The 4-D ``[P, Q, m, n]`` tensor that ``x``, a view to ``[P * Q, m, n]``, folds."""
    if not (isinstance(x, fx.Node) and x.target in _VIEWS and isinstance(x.args[0], fx.Node)):
        return None
    source, folded = val(x.args[0]), val(x)
    if not (isinstance(source, torch.Tensor) and isinstance(folded, torch.Tensor)
            and source.dim() == 4 and folded.dim() == 3):
        return None
    if same_shape(source.shape[2:], folded.shape[1:]) and same_shape((source.shape[0] * source.shape[1],),
                                                                     folded.shape[:1]):
        return x.args[0]
    return None


def _unfolded_operand(x, lead) -> tuple[fx.Node, list] | None:
    """``(source, steps)``: ``x`` is a fold of the 4-D ``source`` with leading
    dims ``lead``, after ``steps`` (outermost first) that commute with the fold:
    a transpose of the last two dims, a multiply or divide by a scalar."""
    steps = []
    while isinstance(x, fx.Node):
        if x.target == aten.transpose.int and {dim_index(d, 3) for d in x.args[1:3]} == {1, 2}:
            steps.append((aten.transpose.int, 2, 3))
        elif x.target in _SCALINGS and len(x.args) == 2 and not x.kwargs and isinstance(x.args[0], fx.Node) and (
                isinstance(x.args[1], (int, float)) or (isinstance(val(x.args[1]), torch.Tensor) and val(x.args[1]).dim() == 0)):
            steps.append((x.target, x.args[1]))
        else:
            break
        x = x.args[0]
    source = _fold_source(x)
    if source is None or not same_shape(val(source).shape[:2], lead):
        return None
    return source, steps


def _replay(graph, x: fx.Node, steps: list) -> fx.Node:
    for target, *rest in reversed(steps):
        x = graph.fx.call_function(target, (x, *rest))
    return x


def _unfolded_rest(x, batch) -> tuple[bool, list] | None:
    """How ``x`` (broadcast against ``[batch, m, n]``, ``batch`` = P * Q) is
    viewed as ``[P, Q, ...]``: ``(per_batch, rest)``, the size list ``[P, Q,
    *rest]`` when ``per_batch``, else ``[1, 1, *rest]``; None when it cannot be
    spelled (two symbolic trailing dims, a batch dim neither 1 nor P * Q)."""
    shape = val(x).shape if isinstance(x, fx.Node) and isinstance(val(x), torch.Tensor) else None
    if shape is None or len(shape) > 3:
        return None
    shape = (1,) * (3 - len(shape)) + tuple(shape)
    rest = [d if isinstance(d, int) else -1 for d in shape[1:]]
    if rest.count(-1) > 1:
        return None
    if isinstance(shape[0], int) and shape[0] == 1:
        return False, rest
    return (True, rest) if same_shape(shape[:1], (batch,)) else None


def _only_read_by(graph, param, user: fx.Node) -> bool:
    """``param`` is a constant whose tensor no node but ``user`` reads."""
    tensor = graph.constant(param)
    if tensor is None:
        return False
    reads = [n for n in graph.fx.nodes if n.op == "get_attr" and n.target == param.target]
    return all(set(n.users) <= {user} for n in reads) and not any(
        t is tensor for name, t in graph.tensor_attributes().items() if name != param.target)


@register_pass("canonicalize")
class Canonicalize(Pass):
    """Rewrites the graph into fxopt's canonical inference form.

    Matches and produces:

    * ``addmm(b, x, W)``, ``mm(x, W)``, ``matmul(x, W)`` with a constant 2-D
      ``W`` (or a transpose of one) -> ``linear(x, W^T, b)``; when ``x`` was
      flattened by a view and the result is viewed back (GPT-2's Conv1D), the
      views are dropped and ``linear`` takes the N-d input;
    * ``dropout(x, train=False)``, ``clone`` (layout kept), ``alias``/``detach``, casts to the dtype and
      device ``x`` already has, and views, reshapes, expands and full slices that
      keep the shape -> ``x``; ``cat([x, empty, ...])`` whose other parts are
      statically empty on the concatenated dim (Phi-3's rotary appends the
      zero-width ``q[..., head:]``) -> ``x``;
    * runtime asserts (``_assert_tensor_metadata``, ``_assert_scalar``,
      ``sym_constrain_range*``) -> removed;
    * ``linear(x, W, b) * c`` (or ``/ c``) with ``c`` a constant scalar ->
      ``linear(x, W * c, b * c)`` (OPT scales its query projection's output so;
      folded, that projection merges with K and V and its attention packs);
    * attention over heads folded into the batch (BLOOM, XGLM, DeBERTa-v2: ``[B, H, S, D]``
      viewed as ``[B * H, S, D]``, ``bmm`` / ``baddbmm``, viewed back) -> the
      4-D ``matmul`` on the unfolded tensors (``baddbmm``'s added term viewed
      as ``[B, H, ...]``), and a softmax over the last dim taken between a fold and
      its unfold -> the softmax of the 4-D tensor: one form of attention, which
      ``fuse-attention`` and the channel analysis's head walk follow.

    Refuses: matmuls whose weight is not a constant (a graph input stays a
    matmul), ``addmm`` with alpha/beta other than 1, dropout in training mode,
    a folded matmul whose result is read other than viewed back to ``[B, H, ...]``,
    whose operands do not both fold the same ``[B, H]`` (through transposes of the
    last two dims and scalings only), or whose added term cannot be viewed as
    ``[B, H, ...]``,
    and a scale fold whose weight or bias is read elsewhere too (tied: the fold
    would keep a second copy).
    """

    keep_asserts = Option(False, help="leave runtime asserts in the graph")
    linear = Option(True, help="rewrite matmul/addmm/mm with a constant weight into linear")
    fold_scale = Option(True, help="fold a constant scalar multiply/divide of a linear's output into its weight and bias")
    unfold_heads = Option(True, help="rewrite bmm/baddbmm/softmax over [B * H, ...] folds of 4-D tensors into 4-D ops")

    ensures = ("canonical-linear",)

    def run(self, graph) -> PassResult:
        counts: dict[str, int] = {}
        self._transposed: dict[str, fx.Node] = {}  # one W^T copy per weight, however many matmuls read it
        rules: list[tuple[str, Callable]] = [("identity", self._identity), ("identity", self._one_part_concat)]
        if self.linear:
            rules.append(("linear", self._to_linear))
        if self.unfold_heads:
            rules.append(("heads-unfolded", self._unfold_heads))
        if not self.keep_asserts:
            rules.append(("assert", self._drop_assert))
        for node in self.walk(graph, op="call_function"):
            for rule_name, rule in rules:
                if rule(graph, node):
                    counts[rule_name] = counts.get(rule_name, 0) + 1
                    break
        if self.linear or self.unfold_heads:
            graph.refresh_meta()  # shapes of the new nodes
        if self.linear:
            for node in self.walk(graph, op="call_function", target=aten.linear.default):
                if self._absorb_flatten(graph, node):
                    counts["flatten-absorbed"] = counts.get("flatten-absorbed", 0) + 1
        if self.fold_scale:
            for node in self.walk(graph, op="call_function", target=aten.linear.default):
                if self._fold_scale(graph, node):
                    counts["scale-folded"] = counts.get("scale-folded", 0) + 1
        return PassResult(bool(counts), {"rewritten": counts, "linear_ops": sum(1 for n in graph.fx.nodes if n.target == aten.linear.default)})

    # -- rules: each returns True when it rewrote ``node`` -------------------------------
    def _drop_assert(self, graph, node) -> bool:
        if is_assert(node) and not node.users:
            graph.fx.erase_node(node)
            return True
        return False

    def _identity(self, graph, node) -> bool:
        t, args = node.target, node.args
        source = args[0] if args and isinstance(args[0], fx.Node) else None
        if source is None:
            return False
        out, inp = val(node), val(source)
        if not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor):
            return False
        keep = False
        if t == aten.dropout.default:
            keep = not (len(args) > 2 and args[2]) or (len(args) > 1 and args[1] == 0)
        elif t in _SAME_VALUE:
            keep = True
        elif t == aten.clone.default:
            # The traced graph is functional, so a copy is only a copy (eval
            # dropout becomes one); a clone that changes the layout stays.
            keep = node.kwargs.get("memory_format") in (None, torch.preserve_format)
        elif t in _CASTS:
            keep = out.dtype == inp.dtype and out.device == inp.device and not node.kwargs.get("memory_format")
        elif t in _VIEWS or t == aten.expand.default:
            keep = same_shape(out.shape, inp.shape)
        elif t == aten.slice.Tensor:
            start = args[2] if len(args) > 2 else node.kwargs.get("start", 0)
            step = args[4] if len(args) > 4 else node.kwargs.get("step", 1)
            keep = start in (0, None) and step == 1 and same_shape(out.shape, inp.shape)
        if keep and all(is_pure(u) or u.op == "output" for u in node.users):
            node.replace_all_uses_with(source)
            graph.fx.erase_node(node)
            return True
        return False

    def _one_part_concat(self, graph, node) -> bool:
        if node.target != aten.cat.default or not isinstance(val(node), torch.Tensor):
            return False
        out = val(node)
        dim = dim_index(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), out.dim())
        parts = [p for p in node.args[0] if not (isinstance(p, fx.Node) and isinstance(val(p), torch.Tensor)
                                                 and val(p).dim() == out.dim() and _is_zero(val(p).shape[dim]))]
        if len(parts) != 1 or not isinstance(parts[0], fx.Node) or len(node.args[0]) == 1:
            return False
        source, inp = parts[0], val(parts[0])
        # the concatenation was a new tensor: no user may write into what replaces it
        writes = any(getattr(getattr(u.target, "_schema", None), "is_mutable", False) for u in node.users)
        if not (inp.dtype == out.dtype and same_shape(inp.shape, out.shape)) or writes:
            return False
        node.replace_all_uses_with(source)
        graph.fx.erase_node(node)
        return True

    def _constant_weight(self, graph, node) -> tuple[fx.Node, bool] | None:
        """``(get_attr node, is_transposed)`` when ``node`` is a constant 2-D
        matrix or a 2-D transpose of one."""
        if graph.constant(node) is not None and graph.constant(node).dim() == 2:
            return node, False
        if isinstance(node, fx.Node) and node.op == "call_function" and node.target in _TRANSPOSES and _is_2d_transpose(node):
            base = node.args[0]
            if graph.constant(base) is not None and graph.constant(base).dim() == 2:
                return base, True
        return None

    def _to_linear(self, graph, node) -> bool:
        t = node.target
        if t == aten.addmm.default:
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                return False
            bias, x, w = node.args[:3]
        elif t == aten.mm.default or t == aten.matmul.default:
            x, w = node.args[:2]
            bias = None
        else:
            return False
        found = self._constant_weight(graph, w)
        if found is None:
            return False
        if isinstance(bias, fx.Node) and (not isinstance(val(bias), torch.Tensor) or val(bias).dim() != 1):
            return False
        base, transposed = found
        if t == aten.matmul.default and val(x).dim() < 1:
            return False
        if transposed:
            weight = base  # W^T of a transposed constant is the constant itself
        elif base.target in self._transposed:
            weight = self._transposed[base.target]
        else:
            tensor = graph.constant(base)
            weight = graph.add_constant(tensor.t().contiguous(), f"{base.target}_t")
            self._transposed[base.target] = weight
        with graph.fx.inserting_before(node):
            new = graph.fx.call_function(aten.linear.default, (x, weight, bias))
        new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        node.replace_all_uses_with(new)
        graph.fx.erase_node(node)
        # Drop the old weight read (and its transpose) now, so the copy made
        # above does not sit beside the original until dce runs.
        for stale in dict.fromkeys((w, base)):
            if isinstance(stale, fx.Node) and stale.graph is graph.fx and not stale.users:
                graph.fx.erase_node(stale)
        return True

    def _unfold_heads(self, graph, node) -> bool:
        """bmm(fold(a), fold(b)) viewed back to [P, Q, m, n]  ==>  matmul(a, b);
        baddbmm(c, ...) also adds ``beta * c`` viewed as [P, Q, ...]; softmax(fold(x))
        over the last dim viewed back  ==>  softmax(x)."""
        t = node.target
        if t not in (aten.bmm.default, aten.baddbmm.default, aten.softmax.int, aten._softmax.default):
            return False
        out = val(node)
        backs = list(node.users)
        if not (isinstance(out, torch.Tensor) and out.dim() == 3 and backs and all(
                u.target in _VIEWS and isinstance(val(u), torch.Tensor) and val(u).dim() == 4 for u in backs)):
            return False
        shape = val(backs[0]).shape
        if not (all(same_shape(val(u).shape, shape) for u in backs) and same_shape(shape[2:], out.shape[1:])
                and same_shape((shape[0] * shape[1],), out.shape[:1])):
            return False
        if t in (aten.softmax.int, aten._softmax.default):
            source = _fold_source(node.args[0])
            if source is None or dim_index(node.args[1], 3) != 2 or not same_shape(val(source).shape, shape):
                return False
            with graph.fx.inserting_before(node):
                new = graph.fx.call_function(t, (source, -1, *node.args[2:]), dict(node.kwargs))
        else:
            added, a, b = node.args if t == aten.baddbmm.default else (None, *node.args)
            operands = [_unfolded_operand(x, shape[:2]) for x in (a, b)]
            beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
            if None in operands or not isinstance(beta, (int, float)) or not isinstance(alpha, (int, float)):
                return False
            added_rest = _unfolded_rest(added, out.shape[0]) if added is not None and beta != 0 else None
            if added is not None and beta != 0 and added_rest is None:
                return False
            with graph.fx.inserting_before(node):
                a4, b4 = (_replay(graph, source, steps) for source, steps in operands)
                new = graph.fx.call_function(aten.matmul.default, (a4, b4))
                if alpha != 1:
                    new = graph.fx.call_function(aten.mul.Tensor, (new, alpha))
                if added_rest is not None:
                    per_batch, rest = added_rest
                    lead = [size_value(graph, operands[0][0], d) for d in (0, 1)] if per_batch else [1, 1]
                    term = graph.fx.call_function(aten.reshape.default, (added, [*lead, *rest]))
                    if beta != 1:
                        term = graph.fx.call_function(aten.mul.Tensor, (term, beta))
                    new = graph.fx.call_function(aten.add.Tensor, (new, term))
        for back in backs:
            back.replace_all_uses_with(new)
            graph.fx.erase_node(back)
        graph.fx.erase_node(node)
        graph.refresh_meta()  # a later fold of ``new`` is recognized by its shape
        return True

    def _fold_scale(self, graph, node) -> bool:
        """linear(x, W, b) * c  ==>  linear(x, W * c, b * c)."""
        if len(node.users) != 1:
            return False
        (scaled,) = node.users
        if scaled.target in (aten.mul.Tensor, aten.mul.Scalar) and len(scaled.args) == 2:
            other = scaled.args[1] if scaled.args[0] is node else scaled.args[0]
            invert = False
        elif scaled.target in (aten.div.Tensor, aten.div.Scalar) and scaled.args[0] is node and not scaled.kwargs:
            other, invert = scaled.args[1], True
        else:
            return False
        c = _scalar(graph, other)
        x, w, b = (list(node.args) + [None])[:3]
        params = [p for p in (w, b) if p is not None]
        out, res = val(node), val(scaled)
        if c is None or (invert and c == 0) or not all(_only_read_by(graph, p, node) for p in params):
            return False
        if not (isinstance(res, torch.Tensor) and res.dtype == out.dtype and same_shape(res.shape, out.shape)):
            return False
        with graph.fx.inserting_before(node):
            folded = [graph.add_constant(graph.constant(p) / c if invert else graph.constant(p) * c, f"{p.target}_scaled")
                      for p in params]
            new = graph.fx.call_function(aten.linear.default, (x, *folded))
        new.meta.update(scaled.meta)
        scaled.replace_all_uses_with(new)
        graph.fx.erase_node(scaled)
        graph.fx.erase_node(node)
        for p in params:
            if not p.users:
                graph.fx.erase_node(p)
        return True

    def _absorb_flatten(self, graph, node) -> bool:
        """view(x, [-1, K]) -> linear -> view(.., [*x.shape[:-1], N])  ==>  linear(x)."""
        flat = node.args[0]
        if not (isinstance(flat, fx.Node) and flat.target in _VIEWS and len(node.users) == 1):
            return False
        (back,) = node.users
        if back.target not in _VIEWS:
            return False
        x = flat.args[0]
        x_val, out_val, back_val = val(x), val(node), val(back)
        if not all(isinstance(v, torch.Tensor) for v in (x_val, out_val, back_val)) or x_val.dim() < 2:
            return False
        want = (*x_val.shape[:-1], out_val.shape[-1])
        if not same_shape(back_val.shape, want) or not same_shape(x_val.shape[-1:], val(flat).shape[-1:]):
            return False
        node.replace_input_with(flat, x)
        back.replace_all_uses_with(node)
        graph.fx.erase_node(back)
        if not flat.users:
            graph.fx.erase_node(flat)
        node.meta.pop("val", None)
        return True
