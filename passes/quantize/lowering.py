"""Lowering per mode: the nodes that replace one quantized layer.

* ``weight-only``, 4 or 8 bits with a block MatMulNBits accepts:
  ``fxopt.linear_nbits``; other widths and group sizes: integer codes
  dequantized by ``aten`` ops feeding ``aten.linear``
  (:func:`dequantized_weight`);
* ``dynamic`` (W8A8): ``fxopt.linear_dynamic_int8_per_token`` (per-token
  activations) or ``fxopt.linear_dynamic_int8`` (per-tensor);
* ``static`` (W8A8, calibrated activation range): ``fxopt.linear_static_int8``;
* embedding tables (always weight-only): ``fxopt.embedding_nbits``, or integer
  rows gathered and dequantized by ``aten`` ops (:func:`lower_embedding`).

Every node made here carries ``meta["quantized_layer"]`` (the layer's name).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ...ir.ops_quant import weight_to_uint8
from ...ir.ops_quant_static import static_act_qparams
from ...ir.quant import QuantizedTensor, nbits_block_size, to_nbits
from ..layers import Layer
from .calibration import collect_linear_stats
from .registry import register_mode

aten = torch.ops.aten


# -- building blocks -------------------------------------------------------------------

def quantized_node(graph, target, args, layer_name: str) -> fx.Node:
    """``graph.fx.call_function(target, args)`` marked as part of ``layer_name``."""
    node = graph.fx.call_function(target, args)
    node.meta["quantized_layer"] = layer_name
    return node


def cast(graph, node: fx.Node, dtype: torch.dtype, layer_name: str) -> fx.Node:
    """``node.to(dtype)`` as torch.export writes it."""
    out = quantized_node(graph, aten._to_copy.default, (node,), layer_name)
    out.kwargs = {"dtype": dtype}
    return out


def scaled_input(graph, layer: Layer, act_scale: torch.Tensor | None) -> fx.Node:
    """``x / act_scale`` (as a multiply by the reciprocal), or ``x``."""
    if act_scale is None:
        return layer.x
    # In the layer's dtype: a float32 factor would promote a float16 model's activations.
    inv = graph.add_constant((1.0 / act_scale.to(torch.float32)).to(layer.weight.dtype), f"{layer.name}.act_inv_scale")
    return quantized_node(graph, aten.mul.Tensor, (layer.x, inv), layer.name)


def dequantized_weight(graph, layer: Layer, qt: QuantizedTensor) -> fx.Node:
    """Graph nodes computing ``qt.dequantize()`` from the integer codes: the
    portable form for widths without a fused kernel."""
    n, k = qt.shape
    groups = qt.scale.shape[1]
    name = layer.name
    q = graph.add_constant(qt.q, f"{name}.qweight")
    w = cast(graph, q, torch.float32, name)
    w = quantized_node(graph, aten.view.default, (w, [n, groups, k // groups]), name)
    if qt.zero_point is not None:
        zp = graph.add_constant(qt.zero_point.to(torch.float32).unsqueeze(-1), f"{name}.zero_point")
        w = quantized_node(graph, aten.sub.Tensor, (w, zp), name)
    scale = graph.add_constant(qt.scale.unsqueeze(-1), f"{name}.scale")
    w = quantized_node(graph, aten.mul.Tensor, (w, scale), name)
    w = quantized_node(graph, aten.view.default, (w, [n, k]), name)
    if layer.weight.dtype != torch.float32:  # dequantized in float32, used in the layer's dtype
        w = cast(graph, w, layer.weight.dtype, name)
    return w


def per_channel_scale(qt: QuantizedTensor) -> torch.Tensor:
    """The weight scale as one value per output channel ``[N]`` (a per-tensor
    scale repeated), the form the int8 x int8 kernels take."""
    n = qt.shape[0]
    return qt.scale.expand(n, 1).reshape(n).contiguous()


def check_int8_kernel(mode: str, cfg) -> str | None:
    if cfg.bits != 8 or cfg.scheme != "sym" or cfg.granularity == "group":
        return (f"mode {mode!r} runs int8 x int8 kernels: it needs bits=8, scheme='sym' and granularity "
                f"'channel' or 'tensor' (got bits={cfg.bits}, scheme={cfg.scheme!r}, granularity={cfg.granularity!r})")
    return None


# -- modes -------------------------------------------------------------------------------

@register_mode("weight-only")
def lower_weight_only(p, graph, layer: Layer, qt: QuantizedTensor, act_scale) -> fx.Node:
    x = scaled_input(graph, layer, act_scale)
    block = nbits_block_size(qt) if qt.bits in (4, 8) else 0
    if not block:
        w = dequantized_weight(graph, layer, qt)
        return quantized_node(graph, aten.linear.default, (x, w, layer.bias), layer.name)
    nb = to_nbits(qt, block)
    B = graph.add_constant(nb.B, f"{layer.name}.qweight")
    scales = graph.add_constant(nb.scales, f"{layer.name}.scales")
    zps = None if nb.zero_points is None else graph.add_constant(nb.zero_points, f"{layer.name}.zero_points")
    args = (x, B, scales, zps, layer.bias, nb.k, nb.n, nb.bits, nb.block_size, layer.cfg.accuracy_level)
    return quantized_node(graph, torch.ops.fxopt.linear_nbits.default, args, layer.name)


@register_mode("dynamic", check=lambda cfg: check_int8_kernel("dynamic", cfg))
def lower_dynamic(p, graph, layer: Layer, qt: QuantizedTensor, act_scale) -> fx.Node:
    x = scaled_input(graph, layer, act_scale)
    w_scale = per_channel_scale(qt)
    scale = graph.add_constant(w_scale, f"{layer.name}.scale")
    if layer.cfg.act_granularity == "tensor":
        w = graph.add_constant(qt.q, f"{layer.name}.qweight")
        return quantized_node(graph, torch.ops.fxopt.linear_dynamic_int8.default, (x, w, scale, layer.bias), layer.name)
    # Per token: uint8 weight codes for ONNX Runtime's exact U8U8 kernel, and the
    # dequantized row sums that take the activation zero point out afterwards.
    w = graph.add_constant(weight_to_uint8(qt.q), f"{layer.name}.qweight")
    rowsum = (qt.q.to(torch.float64).sum(dim=1) * w_scale.to(torch.float64)).to(torch.float32)
    rowsum = graph.add_constant(rowsum, f"{layer.name}.rowsum")
    target = torch.ops.fxopt.linear_dynamic_int8_per_token.default
    return quantized_node(graph, target, (x, w, scale, rowsum, layer.bias), layer.name)


def _check_static(cfg) -> str | None:
    problem = check_int8_kernel("static", cfg)
    if problem is None and cfg.method != "rtn":
        problem = f"mode 'static' calibrates the activation as the model computes it; use method 'rtn' (got {cfg.method!r})"
    return problem


def static_ranges(p, graph) -> dict[str, tuple[float, float]]:
    """Calibrated input range of every linear of ``graph``, by node name,
    computed once per run (before the first layer is rewritten, on the float
    graph) and kept on the pass for the rest of that run."""
    cached = getattr(p, "_static_ranges", None)
    if cached is not None and cached[0] is graph.fx:
        return cached[1]
    observer = p.observer
    options = {"percentile": p.percentile} if observer == "percentile" else {}
    stats = collect_linear_stats(graph, p.context.get("calibration_data"), observer=observer, progress=p.progress, **options)
    ranges = {name: s.observer.range() for name, s in stats.items()}
    p._static_ranges = (graph.fx, ranges)
    return ranges


@register_mode("static", needs_calibration=True, check=_check_static)
def lower_static(p, graph, layer: Layer, qt: QuantizedTensor, act_scale) -> fx.Node:
    lo, hi = static_ranges(p, graph)[layer.node.name]
    x_scale, x_zp = static_act_qparams(lo, hi)
    w = graph.add_constant(qt.q, f"{layer.name}.qweight")
    scale = graph.add_constant(per_channel_scale(qt), f"{layer.name}.scale")
    x = scaled_input(graph, layer, act_scale)
    target = torch.ops.fxopt.linear_static_int8.default
    return quantized_node(graph, target, (x, w, scale, layer.bias, x_scale, x_zp), layer.name)


# -- embedding tables ----------------------------------------------------------------------

def lower_embedding(graph, layer: Layer, qt: QuantizedTensor) -> fx.Node:
    """4 or 8 bits with a block ONNX Runtime accepts: ``fxopt.embedding_nbits``
    (packed rows, GatherBlockQuantized); other widths: gather integer rows
    and their scales with ``aten`` ops, dequantize the gathered rows."""
    n, k = qt.shape
    block = nbits_block_size(qt) if qt.bits in (4, 8) else 0
    if block:
        nb = to_nbits(qt, block)
        B = graph.add_constant(nb.B, f"{layer.name}.qweight")
        # The op returns rows of its scales' dtype: the table's (float16 stays float16).
        scales = graph.add_constant(nb.scales.to(layer.weight.dtype), f"{layer.name}.scales")
        zps = None if nb.zero_points is None else graph.add_constant(nb.zero_points, f"{layer.name}.zero_points")
        args = (layer.node.args[1], B, scales, zps, nb.k, nb.n, nb.bits, nb.block_size)
        return quantized_node(graph, torch.ops.fxopt.embedding_nbits.default, args, layer.name)
    name, ids = layer.name, layer.node.args[1]
    groups = qt.scale.shape[-1]

    def per_row(table: torch.Tensor, what: str) -> fx.Node:
        """Gather a [N, groups] table's rows: [..., groups, 1]."""
        t = graph.add_constant(table.to(torch.float32).expand(n, groups).contiguous(), f"{name}.{what}")
        rows = quantized_node(graph, aten.embedding.default, (t, ids), name)
        return quantized_node(graph, aten.unsqueeze.default, (rows, -1), name)

    q = graph.add_constant(qt.q, f"{name}.qweight")
    rows = quantized_node(graph, aten.embedding.default, (q, ids), name)
    rows = cast(graph, rows, torch.float32, name)
    rows = quantized_node(graph, aten.unflatten.int, (rows, -1, [groups, k // groups]), name)
    if qt.zero_point is not None:
        rows = quantized_node(graph, aten.sub.Tensor, (rows, per_row(qt.zero_point, "zero_point")), name)
    rows = quantized_node(graph, aten.mul.Tensor, (rows, per_row(qt.scale, "scale")), name)
    rows = quantized_node(graph, aten.flatten.using_ints, (rows, -2, -1), name)
    if layer.weight.dtype != torch.float32:  # dequantized in float32, returned in the table's dtype
        rows = cast(graph, rows, layer.weight.dtype, name)
    return rows
