"""Structural checks run after tracing and after every pass.

The op set fxopt's IR admits (``DOCUMENTED_OP_SET``):

* ATen operators (``torch.ops.aten.*`` overloads), the form torch.export emits;
* fxopt's own operators (``torch.ops.fxopt.*``, see :mod:`fxopt.ir.ops`);
* the functional collectives of a tensor-parallel rank graph
  (``_c10d_functional.all_reduce`` / ``all_gather_into_tensor`` / ``wait_tensor``,
  see :mod:`fxopt.ir.collectives`);
* ``operator.getitem`` on multi-output ops and Python/SymInt arithmetic on
  symbolic sizes (``operator.add`` ... and ``torch.sym_*``), which torch.export
  emits for dynamic shapes.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from .collectives import COLLECTIVES
from .ops import is_fxopt_op

_PYTHON_OPS = {
    operator.getitem, operator.add, operator.sub, operator.mul, operator.truediv,
    operator.floordiv, operator.mod, operator.neg, operator.pow, operator.eq,
    operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.and_, operator.or_, math.ceil, math.floor, math.sqrt,
    torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not,
    torch.sym_sqrt, torch.sym_ite,
}
ALLOWED_NAMESPACES = ("aten",)
DOCUMENTED_OP_SET = "aten.* overloads, fxopt.* ops, _c10d_functional collectives, operator.getitem, SymInt arithmetic"


class VerificationError(RuntimeError):
    def __init__(self, message: str, node: fx.Node | None = None):
        where = f"node {node.name!r} ({node.format_node()}): " if node is not None else ""
        super().__init__(where + message)
        self.node = node


def op_allowed(target) -> bool:
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace in ALLOWED_NAMESPACES or is_fxopt_op(target) or target in COLLECTIVES
    return target in _PYTHON_OPS


def verify(graph) -> None:
    """Raise :class:`VerificationError` naming the first node at fault."""
    try:
        graph.fx.lint()
    except Exception as e:
        raise VerificationError(f"graph lint failed: {e}") from e
    for node in graph.fx.nodes:
        if node.op in ("call_module", "call_method"):
            raise VerificationError(f"{node.op} is not part of fxopt's IR (allowed: {DOCUMENTED_OP_SET})", node)
        if node.op == "call_function" and not op_allowed(node.target):
            raise VerificationError(f"op {node.target} is outside the documented op set ({DOCUMENTED_OP_SET})", node)
        if node.op == "get_attr":
            try:
                graph.get_attr(node.target)
            except AttributeError:
                raise VerificationError(f"reads attribute {node.target!r}, which the module does not have", node)
        if node.op != "output" and "val" not in node.meta:
            raise VerificationError("has no shape/dtype metadata (meta['val'])", node)
    used = {n.target for n in graph.fx.nodes if n.op == "get_attr"}
    dangling = sorted(set(graph.tensor_attributes()) - used)
    if dangling:
        raise VerificationError(f"tensor attributes no node reads (dangling): {dangling[:5]}")
