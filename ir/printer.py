"""Readable text IR: one line per node with its shape and dtype.

    graph tiny-gpt(%ids: i64[s0, 1], %past_k: f32[2, s0, 4, s1, 16], ...) {
      %wte_weight: f32[96, 64] = param wte.weight
      %embedding: f32[s0, 1, 64] = aten.embedding(%wte_weight, %ids)
      ...
      return (%linear, %cat, %cat_1)
    }
"""

from __future__ import annotations

import torch
import torch.fx as fx

_DTYPES = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "bool",
}


def format_value(val) -> str:
    if isinstance(val, torch.Tensor):
        dims = ", ".join(str(d) for d in val.shape)
        return f"{_DTYPES.get(val.dtype, str(val.dtype).replace('torch.', ''))}[{dims}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(format_value(v) for v in val) + ")"
    if isinstance(val, torch.SymInt):
        return f"sym {val}"
    if val is None:
        return "?"
    return type(val).__name__


def _arg(a) -> str:
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, (tuple, list)):
        inner = ", ".join(_arg(x) for x in a)
        return f"[{inner}]"
    if isinstance(a, torch.dtype):
        return _DTYPES.get(a, str(a))
    return repr(a)


def _target(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        name = f"{t.namespace}.{t._opname}"
        return name if t._overloadname == "default" else f"{name}.{t._overloadname}"
    return getattr(t, "__name__", str(t))


def format_node(node: fx.Node) -> str:
    ty = format_value(node.meta.get("val"))
    if node.op == "get_attr":
        return f"%{node.name}: {ty} = param {node.target}"
    args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
    return f"%{node.name}: {ty} = {_target(node)}({', '.join(args)})"


def format_graph(graph) -> str:
    inputs = ", ".join(f"%{p.name}: {format_value(p.meta.get('val'))}" for p in graph.placeholders())
    lines = [f"graph {graph.name}({inputs}) {{"]
    for node in graph.fx.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            lines.append(f"  return {_arg(node.args[0])}")
        else:
            lines.append("  " + format_node(node))
    lines.append("}")
    return "\n".join(lines)
