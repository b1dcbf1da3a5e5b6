"""Small graph helpers that passes share."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

# Ops whose result is not a function of their inputs, or that act on state.
_NONDETERMINISTIC = {
    aten.rand.default, aten.randn.default, aten.randint.default, aten.randint.low, aten.rand_like.default,
    aten.randn_like.default, aten.randint_like.default, aten.bernoulli.default, aten.bernoulli.p,
    aten.normal.Tensor_float, aten.multinomial.default, aten.randperm.default,
    aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default, aten.new_empty.default,
}
_ASSERTS = {
    aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten._assert_async.msg,
    aten.sym_constrain_range.default, aten.sym_constrain_range_for_size.default,
}


def is_assert(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _ASSERTS


def is_pure(node: fx.Node) -> bool:
    """A call whose result depends on its inputs alone and that has no effect:
    safe to remove when unused, to merge with a twin, to evaluate ahead of time."""
    if node.op != "call_function" or node.target in _NONDETERMINISTIC or node.target in _ASSERTS:
        return False
    if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "_c10d_functional":
        return False  # communicates with other processes: never folded ahead of time or merged
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        schema = t._schema
        if schema.is_mutable or any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
            return False
        if t.namespace == "aten" and t._opname.endswith("_") and not t._opname.startswith("_"):
            return False  # in-place variants
        if torch.Tag.nondeterministic_seeded in t.tags:
            return False
        return True
    return t is operator.getitem or callable(t)


def module_path(node: fx.Node) -> str:
    """The path of the innermost module that called ``node`` (torch.export's
    ``nn_module_stack``, e.g. ``transformer.h.0.attn.c_attn``); the node's own
    name for ops of the top-level module, which have no path."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return path
    return node.name


def size_expr(size):
    """A size as an int, or a symbolic one as its sympy expression: compared
    structurally, without the guard a ``SymInt`` comparison adds to the
    graph's shape environment (which pins the dimension to the traced
    example's size when the two happen to agree there)."""
    return size.node.expr if isinstance(size, torch.SymInt) else size


def same_shape(a, b) -> bool:
    """True when two (possibly symbolic) shapes are provably equal."""
    if len(a) != len(b):
        return False
    return all(statically_known_true(x == y) if isinstance(x, torch.SymInt) or isinstance(y, torch.SymInt) else x == y for x, y in zip(a, b))


def val(node) -> object:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def replace_with(node: fx.Node, replacement) -> None:
    """Route every use of ``node`` to ``replacement`` and erase ``node``."""
    node.replace_all_uses_with(replacement)
    node.graph.erase_node(node)


def call_args(node: fx.Node) -> list:
    """Positional view of a call's arguments with schema defaults filled in, so
    that ``mean(x, [-1], True)`` and ``mean(x, dim=[-1], keepdim=True)`` compare
    equal; calls without a schema give their args then their kwargs by name."""
    t = node.target
    if not isinstance(t, torch._ops.OpOverload):
        return list(node.args) + [node.kwargs[k] for k in sorted(node.kwargs)]
    out = []
    for i, a in enumerate(t._schema.arguments):
        if i < len(node.args):
            out.append(node.args[i])
        elif a.name in node.kwargs:
            out.append(node.kwargs[a.name])
        else:
            out.append(a.default_value if a.has_default_value() else None)
    return out


# Ops that reshape without moving data, and casts, as torch.export writes them.
VIEWS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
CASTS = frozenset({aten._to_copy.default, aten.to.dtype})


def is_call(node, targets) -> bool:
    """``node`` is a call of one of ``targets``."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def size_value(graph, t: fx.Node, d: int):
    """Dim ``d`` of ``t`` as a value a new node can take: the number when
    static, else a ``sym_size`` node (at the graph's insertion point, so it
    comes after ``t`` wherever the new node goes)."""
    n = t.meta["val"].shape[d]
    return n if isinstance(n, int) else graph.fx.call_function(aten.sym_size.int, (t, d))


def dim_index(d: int, rank: int) -> int:
    """A dim argument (possibly negative) as an index into a rank-``rank`` shape."""
    return d + rank if d < 0 else d
