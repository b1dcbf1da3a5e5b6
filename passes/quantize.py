"""``quantize``: int8 / int4 (any width 2..8) quantization of linear layers and,
optionally, embeddings.

Extension points (small tables, one entry per mode / method):

* ``MODES[name] = Mode(lower, needs_calibration=False, check=None)``
  - ``lower(pass_, graph, layer, qt, act_scale) -> fx.Node``: builds the
    quantized replacement of ``layer.node`` (an ``aten.linear``) before it and
    returns the node that stands for its output. ``layer`` is a :class:`Layer`
    (node, name, x, weight tensor, bias node, its :class:`LayerConfig`);
    ``qt`` the :class:`~fxopt.ir.quant.QuantizedTensor` the method returned;
    ``act_scale`` an optional ``[K]`` tensor the activation must be divided by
    (use :func:`scaled_input`).
  - ``check(cfg) -> str | None``: why this mode cannot take a layer config.
* ``METHODS[name] = Method(quantize, needs_calibration=False, collect=None)``
  - ``quantize(weight [N, K] float, cfg: LayerConfig, stats) ->
    (QuantizedTensor, act_scale [K] | None)``: ``stats`` is what ``collect``
    returned for this layer (None without calibration). When ``act_scale`` is
    given, ``qt`` must quantize ``weight * act_scale`` (the activation is divided
    by it, so the product is unchanged).
  - ``collect(pass_, graph, layers, calibration_data) -> {layer name: stats}``.

A mode or method that needs calibration makes the pass require the
``calibration_data`` input (a list of example inputs, each like the model's
``example_inputs``), read as ``self.context["calibration_data"]``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.fx as fx

from ..ir.nodes import module_path
from ..ir.ops_quant import weight_to_uint8
from ..ir.targets import target
from ..ir.timing import median_ms
from ..ir.trace import trace
from ..ir.quant import QuantConfig, QuantizationError, QuantizedTensor, nbits_block_size, quantize, relative_error, sqnr_db, to_nbits
from .base import Option, OptionError, Pass, PassResult
from .fusion import fuse_linear_act, split_linear_act
from .registry import register_pass

aten = torch.ops.aten


@dataclass(frozen=True)
class LayerConfig:
    """The options that decide how one layer is quantized (after overrides)."""

    bits: int
    scheme: str
    granularity: str
    group_size: int
    mode: str
    method: str
    accuracy_level: int
    act_granularity: str = "token"  # mode=dynamic: activation scales per row or per tensor

    def quant_config(self) -> QuantConfig:
        if self.mode == "dynamic" and self.act_granularity == "tensor":
            # int8 codes within +-63 next to 8-bit activations: the int8 kernels
            # of CPUs without VNNI saturate otherwise (ir/ops_quant.py).
            return QuantConfig(7, self.scheme, self.granularity, self.group_size)
        return QuantConfig(self.bits, self.scheme, self.granularity, self.group_size)


@dataclass
class Layer:
    node: fx.Node  # aten.linear(x, weight, bias) or aten.embedding(weight, ids)
    name: str
    kind: str  # "linear" | "embedding"
    weight_node: fx.Node
    weight: torch.Tensor
    cfg: LayerConfig | None = None

    @property
    def x(self) -> fx.Node:
        return self.node.args[0]

    @property
    def bias(self) -> fx.Node | None:
        return self.node.args[2] if len(self.node.args) > 2 else None


@dataclass(frozen=True)
class Mode:
    lower: Callable[..., fx.Node]
    needs_calibration: bool = False
    check: Callable[[LayerConfig], str | None] | None = None


@dataclass(frozen=True)
class Method:
    quantize: Callable[..., tuple[QuantizedTensor, torch.Tensor | None]]
    needs_calibration: bool = False
    collect: Callable[..., dict[str, Any]] | None = None


# -- shared lowering helpers ------------------------------------------------------

def _call(graph, target, args, name: str) -> fx.Node:
    node = graph.fx.call_function(target, args)
    node.meta["quantized_layer"] = name
    return node


def _cast(graph, node: fx.Node, dtype: torch.dtype, name: str) -> fx.Node:
    """``node.to(dtype)`` as torch.export writes it."""
    cast = _call(graph, aten._to_copy.default, (node,), name)
    cast.kwargs = {"dtype": dtype}
    return cast


def scaled_input(graph, layer: Layer, act_scale: torch.Tensor | None) -> fx.Node:
    """``x / act_scale`` (as a multiply by the reciprocal), or ``x``."""
    if act_scale is None:
        return layer.x
    # In the layer's dtype: a float32 factor would promote a float16 model's activations.
    inv = graph.add_constant((1.0 / act_scale.to(torch.float32)).to(layer.weight.dtype), f"{layer.name}.act_inv_scale")
    return _call(graph, aten.mul.Tensor, (layer.x, inv), layer.name)


def dequantized_weight(graph, layer: Layer, qt: QuantizedTensor) -> fx.Node:
    """Graph nodes computing ``qt.dequantize()`` from the integer codes: the
    portable form for widths without a fused kernel."""
    n, k = qt.shape
    groups = qt.scale.shape[1]
    name = layer.name
    q = graph.add_constant(qt.q, f"{name}.qweight")
    w = _cast(graph, q, torch.float32, name)
    w = _call(graph, aten.view.default, (w, [n, groups, k // groups]), name)
    if qt.zero_point is not None:
        zp = graph.add_constant(qt.zero_point.to(torch.float32).unsqueeze(-1), f"{name}.zero_point")
        w = _call(graph, aten.sub.Tensor, (w, zp), name)
    scale = graph.add_constant(qt.scale.unsqueeze(-1), f"{name}.scale")
    w = _call(graph, aten.mul.Tensor, (w, scale), name)
    w = _call(graph, aten.view.default, (w, [n, k]), name)
    if layer.weight.dtype != torch.float32:  # dequantized in float32, used in the layer's dtype
        w = _cast(graph, w, layer.weight.dtype, name)
    return w


def _lower_weight_only(p: "Quantize", graph, layer: Layer, qt: QuantizedTensor, act_scale) -> fx.Node:
    x = scaled_input(graph, layer, act_scale)
    block = nbits_block_size(qt) if qt.bits in (4, 8) else 0
    if not block:
        w = dequantized_weight(graph, layer, qt)
        return _call(graph, aten.linear.default, (x, w, layer.bias), layer.name)
    nb = to_nbits(qt, block)
    B = graph.add_constant(nb.B, f"{layer.name}.qweight")
    scales = graph.add_constant(nb.scales, f"{layer.name}.scales")
    zps = None if nb.zero_points is None else graph.add_constant(nb.zero_points, f"{layer.name}.zero_points")
    args = (x, B, scales, zps, layer.bias, nb.k, nb.n, nb.bits, nb.block_size, layer.cfg.accuracy_level)
    return _call(graph, torch.ops.fxopt.linear_nbits.default, args, layer.name)


def _lower_dynamic(p: "Quantize", graph, layer: Layer, qt: QuantizedTensor, act_scale) -> fx.Node:
    x = scaled_input(graph, layer, act_scale)
    n = qt.shape[0]
    w_scale = qt.scale.expand(n, 1).reshape(n).contiguous()
    scale = graph.add_constant(w_scale, f"{layer.name}.scale")
    if layer.cfg.act_granularity == "tensor":
        w = graph.add_constant(qt.q, f"{layer.name}.qweight")
        return _call(graph, torch.ops.fxopt.linear_dynamic_int8.default, (x, w, scale, layer.bias), layer.name)
    # Per token: uint8 weight codes for ONNX Runtime's exact U8U8 kernel, and the
    # dequantized row sums that take the activation zero point out afterwards.
    w = graph.add_constant(weight_to_uint8(qt.q), f"{layer.name}.qweight")
    rowsum = (qt.q.to(torch.float64).sum(dim=1) * w_scale.to(torch.float64)).to(torch.float32)
    rowsum = graph.add_constant(rowsum, f"{layer.name}.rowsum")
    return _call(graph, torch.ops.fxopt.linear_dynamic_int8_per_token.default, (x, w, scale, rowsum, layer.bias), layer.name)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _check_dynamic(cfg: LayerConfig) -> str | None:
    if cfg.bits != 8 or cfg.scheme != "sym" or cfg.granularity == "group":
        return (f"mode 'dynamic' runs int8 x int8 kernels: it needs bits=8, scheme='sym' and granularity "
                f"'channel' or 'tensor' (got bits={cfg.bits}, scheme={cfg.scheme!r}, granularity={cfg.granularity!r})")
    return None


def _rtn(weight: torch.Tensor, cfg: LayerConfig, stats) -> tuple[QuantizedTensor, None]:
    """Round-to-nearest with the reference quantizer."""
    return quantize(weight, cfg.quant_config()), None


MODES: dict[str, Mode] = {
    "weight-only": Mode(_lower_weight_only),
    "dynamic": Mode(_lower_dynamic, check=_check_dynamic),
}
METHODS: dict[str, Method] = {"rtn": Method(_rtn)}
KNOWN_MODES = ("weight-only", "dynamic", "static")
KNOWN_METHODS = ("rtn", "awq", "gptq")

_OVERRIDABLE = ("bits", "scheme", "granularity", "group_size", "mode", "method", "accuracy_level", "act_granularity")
_LM_HEAD = re.compile(r"(^|[._])(lm_head|head|output|classifier)$")


def _regex_problem(v) -> str | None:
    try:
        re.compile(v)
    except re.error as e:
        return f"invalid regular expression: {e}"
    return None


def _overrides_problem(v) -> str | None:
    for item in v:
        if not isinstance(item, str) or ":" not in item:
            return f"each override is 'regex:key=value[;key=value]', got {item!r}"
    return None


def _numerics_tolerance(bits: int) -> float:
    # Output error grows with the weight error (~2^-bits of the range) and depth.
    return min(1.0, 16.0 * 2.0**-bits)


def _cut_out(graph, x: fx.Node, out: fx.Node) -> tuple[torch.nn.Module, fx.Graph]:
    """The nodes computing ``out`` from ``x`` and constants, as a (root, graph)
    pair for ``fx.GraphModule``: ``x`` becomes the only input."""
    needed, work = set(), [out]
    while work:
        n = work.pop()
        if n in needed or n is x:
            continue
        if n.op == "placeholder":
            raise ValueError(f"{out.name} depends on graph input {n.name}, not only on {x.name}")
        needed.add(n)
        work.extend(n.all_input_nodes)
    root, cut = torch.nn.Module(), fx.Graph()
    env = {x: cut.placeholder("x")}
    for n in graph.fx.nodes:
        if n not in needed:
            continue
        if n.op == "get_attr":
            name = f"c{len(env)}"
            constant = graph.constant(n)
            # a weight made inside torch.inference_mode() cannot be traced outside it
            root.register_buffer(name, constant.clone() if constant.is_inference() else constant)
            env[n] = cut.get_attr(name)
        else:
            env[n] = cut.node_copy(n, lambda a: env[a])
    cut.output(env[out])
    return root, cut


@register_pass("quantize")
class Quantize(Pass):
    """Quantizes the weights of ``aten.linear`` layers (and, with
    ``quantize_embeddings``, ``aten.embedding`` tables).

    Matches: ``linear(x, W, b)`` with a constant 2-D ``W`` (after ``canonicalize``,
    every linear form a traced model shows); layer names come from
    ``nn_module_stack`` (e.g. ``transformer.h.0.attn.c_attn``), else the node name.
    An ``fxopt.linear_act`` (``fuse-linear-act`` ran first) is quantized as its
    linear and fused again with its activation (``fxopt.linear_nbits_act``,
    ``fxopt.linear_dynamic_int8*_act``; float where the layer is not selected).

    Produces, per mode:

    * ``weight-only``, 4 or 8 bits: ``fxopt.linear_nbits`` (MatMulNBits form,
      block = group size; per-channel and per-tensor scales are repeated over
      power-of-two blocks); other widths, or group sizes MatMulNBits cannot
      take: integer codes dequantized by ``aten`` ops feeding ``aten.linear``;
      embeddings: ``fxopt.embedding_nbits`` (4 or 8 bits: packed rows, only the
      gathered ones dequantized; GatherBlockQuantized on ONNX Runtime), other
      widths integer rows gathered and dequantized by ``aten`` ops;
    * ``dynamic`` (W8A8, bits=8, sym, channel or tensor):
      ``act_granularity=token`` (default) ``fxopt.linear_dynamic_int8_per_token``
      (8-bit activation codes, a scale and zero point per row, computed at run
      time); ``act_granularity=tensor`` ``fxopt.linear_dynamic_int8`` (8-bit
      activation codes with one scale per call, weight codes within +-63 so the
      non-VNNI u8 x s8 kernels cannot saturate: fbgemm eager, DynamicQuantizeLinear
      + MatMulIntegerToFloat on ONNX Runtime; faster, less accurate: MiniLM
      mean/min embedding cosine 0.992/0.971 against 0.999/0.995 per token).

    Stats: per layer (a module called twice also reports ``name#2``) the error
    (SQNR, relative) and ``bytes_saved``, the change in stored bytes that call
    made; equal codes and scales (a weight read by several calls) are stored
    once and counted in ``shared_constants``.

    Refuses (leaves float, counted in stats): weights that are not constants,
    layers outside ``include``/inside ``exclude``, smaller than ``min_size``
    elements, the LM head with ``skip_lm_head``, and with ``guard`` layers whose
    quantized kernel is not faster than the float one on ``guard_backend``
    (each distinct layer shape timed once; the times are in the layer's stats).
    Errors: a filter or override that matches no layer; a group size that does
    not divide a selected layer's K; a mode or method that is not available.
    """

    bits = Option(8, int, check=lambda v: None if 2 <= v <= 8 else "bits must be from 2 to 8", help="weight bits (2..8)")
    scheme = Option(None, str, choices=("asym", "sym"), help="asym (min-max, zero point) or sym; default: asym, sym for dynamic")
    granularity = Option(None, str, choices=("tensor", "channel", "group"),
                         help="scale granularity; default: channel for 8 bits, group below")
    group_size = Option(128, int, check=lambda v: None if v >= 1 else "must be >= 1", help="input columns per scale (granularity=group)")
    mode = Option("weight-only", str, choices=KNOWN_MODES, help="weight-only | dynamic (W8A8) | static")
    method = Option("rtn", str, choices=KNOWN_METHODS, help="rtn | awq | gptq")
    include = Option(None, str, check=_regex_problem, help="regex: only layers whose name matches (re.search)")
    exclude = Option(None, str, check=_regex_problem, help="regex: skip layers whose name matches")
    min_size = Option(0, int, check=lambda v: None if v >= 0 else "must be >= 0", help="skip weights with fewer elements")
    skip_lm_head = Option(True, help="leave the LM head (output projection or tied embedding) in float")
    quantize_embeddings = Option(False, help="quantize embedding tables too (weight-only, groups along the embedding dimension)")
    overrides = Option((), tuple, check=_overrides_problem,
                       help="per-layer options: ['regex:bits=8;group_size=32', ...]; the first matching entry wins")
    accuracy_level = Option(4, int, choices=(0, 1, 2, 3, 4), help="MatMulNBits accuracy level (4: int8 compute)")
    act_granularity = Option(None, str, choices=("token", "tensor"),
                             help="mode=dynamic: activation scales per token (8-bit, default) or per tensor (weight codes within +-63, fbgemm on eager)")
    guard = Option(False, help="time each quantized layer against float on guard_backend; keep float where it does not pay")
    guard_backend = Option("eager", str, choices=("eager", "onnxruntime"), help="the backend the guard times layers on")
    guard_tokens = Option(1, int, check=lambda v: None if v >= 1 else "must be >= 1", help="rows of the input the guard times with")
    observer = Option("minmax", str, choices=("minmax", "percentile", "moving-average"),
                      help="mode=static: how calibration sets each activation range (passes/calibration.py)")
    percentile = Option(99.99, float, check=lambda v: None if 50 < v <= 100 else "must be in (50, 100]",
                        help="observer=percentile: the percentile kept")

    runs_after = ("canonicalize",)
    requires = ("canonical-linear",)

    # -- options --------------------------------------------------------------------
    def validate_options(self) -> None:
        self._overrides = [self._parse_override(item) for item in self.overrides]
        configs = [self._base_config()] + [replace(self._base_config(), **kv) for _, kv in self._overrides]
        if self.act_granularity is not None and not any(c.mode == "dynamic" for c in configs):
            raise OptionError(f"pass 'quantize': option 'act_granularity={self.act_granularity}' applies to mode=dynamic only "
                              f"(mode={self.mode!r}; static activations use calibrated per-tensor ranges)")
        if "group_size" in self.given_options and not any(c.granularity == "group" for c in configs):
            raise OptionError(f"pass 'quantize': option 'group_size={self.group_size}' applies to granularity=group only, and this "
                              f"pipeline quantizes with granularity={configs[0].granularity} (the default for "
                              f"{'mode=dynamic' if self.mode == 'dynamic' else f'{self.bits} bits'}); add granularity=group or drop group_size")
        for cfg in configs:
            self._check_config(cfg)
        self.numerics_tolerance = max(_numerics_tolerance(c.bits) for c in configs)
        if any(c.mode in ("dynamic", "static") for c in configs):
            self.numerics_tolerance = max(self.numerics_tolerance, _numerics_tolerance(7))

    def _default(self, key: str, bits: int, mode: str):
        if key == "scheme":
            return self.scheme or ("sym" if mode in ("dynamic", "static") else "asym")
        return self.granularity or ("channel" if bits == 8 or mode == "dynamic" else "group")

    def _base_config(self) -> LayerConfig:
        return LayerConfig(self.bits, self._default("scheme", self.bits, self.mode), self._default("granularity", self.bits, self.mode),
                           self.group_size, self.mode, self.method, self.accuracy_level, self.act_granularity or "token")

    def _parse_override(self, item: str) -> tuple[re.Pattern, dict]:
        pattern, _, body = item.partition(":")
        where = f"pass 'quantize': option 'overrides' entry {item!r}"
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise OptionError(f"{where}: invalid regular expression: {e}") from None
        values: dict[str, Any] = {}
        for part in filter(None, (s.strip() for s in body.split(";"))):
            key, eq, raw = part.partition("=")
            key = key.strip()
            if not eq or key not in _OVERRIDABLE:
                raise OptionError(f"{where}: expected key=value with key one of {list(_OVERRIDABLE)}, got {part!r}")
            opt = self.options[key]
            value: Any = raw.strip()
            if opt.type is int:
                try:
                    value = int(value)
                except ValueError:
                    raise OptionError(f"{where}: {key} must be an integer, got {raw!r}") from None
            opt.validate(self.name, value)
            values[key] = value
        if not values:
            raise OptionError(f"{where}: no key=value settings after the ':'")
        bits, mode = values.get("bits", self.bits), values.get("mode", self.mode)
        # Defaults that depend on bits/mode follow the override, unless given.
        values.setdefault("scheme", self.scheme or ("sym" if mode in ("dynamic", "static") else "asym"))
        values.setdefault("granularity", self.granularity or ("channel" if bits == 8 or mode == "dynamic" else "group"))
        return regex, values

    def _check_config(self, cfg: LayerConfig) -> None:
        if cfg.mode not in MODES:
            raise OptionError(f"pass 'quantize': mode {cfg.mode!r} is not available yet (available: {sorted(MODES)})")
        if cfg.method not in METHODS:
            raise OptionError(f"pass 'quantize': method {cfg.method!r} is not available yet (available: {sorted(METHODS)})")
        check = MODES[cfg.mode].check
        problem = check(cfg) if check else None
        if problem:
            raise OptionError(f"pass 'quantize': {problem}")

    def required_inputs(self) -> tuple[str, ...]:
        configs = [self._base_config()] + [replace(self._base_config(), **kv) for _, kv in self._overrides]
        needs = any(MODES[c.mode].needs_calibration or METHODS[c.method].needs_calibration for c in configs)
        return ("calibration_data",) if needs else ()

    # -- selection --------------------------------------------------------------------
    @staticmethod
    def layer_name(node: fx.Node) -> str:
        return module_path(node)

    def _candidates(self, graph) -> tuple[list[Layer], dict[str, int]]:
        skipped: dict[str, int] = {}
        layers: list[Layer] = []
        targets = [aten.linear.default] + ([aten.embedding.default] if self.quantize_embeddings else [])
        embedding_weights = {id(graph.constant(n.args[0])) for n in graph.fx.nodes if n.target == aten.embedding.default and graph.constant(n.args[0]) is not None}
        for node in self.walk(graph, op="call_function", target=targets):
            kind = "linear" if node.target == aten.linear.default else "embedding"
            wnode = node.args[1] if kind == "linear" else node.args[0]
            weight = graph.constant(wnode)
            if weight is None or weight.dim() != 2 or not weight.is_floating_point():
                skipped["weight-not-constant"] = skipped.get("weight-not-constant", 0) + 1
                continue
            layer = Layer(node, self.layer_name(node), kind, wnode, weight)
            if kind == "linear" and self.skip_lm_head and (_LM_HEAD.search(layer.name) or id(weight) in embedding_weights):
                skipped["lm-head"] = skipped.get("lm-head", 0) + 1
                continue
            if kind == "embedding" and self.skip_lm_head and any(
                    n.target == aten.linear.default and graph.constant(n.args[1]) is weight for n in graph.fx.nodes):
                skipped["tied-lm-head"] = skipped.get("tied-lm-head", 0) + 1
                continue
            layers.append(layer)
        return layers, skipped

    def select(self, graph) -> tuple[list[Layer], dict[str, int]]:
        """The layers this pass's filters (include, exclude, min_size,
        skip_lm_head, quantize_embeddings) select, and why the others were
        skipped (reason -> count). Other passes that take the same filters
        (``prune``) select their layers with it."""
        layers, skipped = self._candidates(graph)
        return self._select(layers, skipped), skipped

    def _select(self, layers: list[Layer], skipped: dict[str, int]) -> list[Layer]:
        names = [l.name for l in layers]
        for label, pattern in (("include", self.include), ("exclude", self.exclude)):
            if pattern is not None and not any(re.search(pattern, n) for n in names):
                raise self.fail(f"option {label}={pattern!r} matches no layer; layers: {names}")
        for (regex, _), text in zip(self._overrides, self.overrides):
            if not any(regex.search(n) for n in names):
                raise self.fail(f"override {text!r} matches no layer; layers: {names}")
        selected = []
        for layer in layers:
            reason = None
            if self.include is not None and not re.search(self.include, layer.name):
                reason = "not-included"
            elif self.exclude is not None and re.search(self.exclude, layer.name):
                reason = "excluded"
            elif layer.weight.numel() < self.min_size:
                reason = "below-min-size"
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            cfg = self._base_config()
            for regex, values in self._overrides:
                if regex.search(layer.name):
                    cfg = replace(cfg, **values)
                    break
            if layer.kind == "embedding":  # lookups have no activation to quantize
                cfg = replace(cfg, mode="weight-only", method="rtn")
            layer.cfg = cfg
            selected.append(layer)
        return selected

    # -- running ----------------------------------------------------------------------
    def run(self, graph) -> PassResult:
        self._guard_times: dict[tuple, tuple[float, float]] = {}
        # A linear already fused with its activation (fuse-linear-act) is split,
        # quantized as a linear and fused again, on the fusion pass's own patterns.
        split = split_linear_act(graph, pass_=self)
        again = None
        try:
            result = self._run(graph)
        finally:
            if split:
                again = fuse_linear_act(graph, split, pass_=self)
        if again is not None:
            result.stats["activations_fused_again"] = again.rewritten
        return result

    def _run(self, graph) -> PassResult:
        layers, skipped = self._candidates(graph)
        selected = self._select(layers, skipped)
        # Check every selected layer before the first edit.
        for layer in selected:
            self.current_node = layer.node
            try:
                layer.cfg.quant_config().num_groups(layer.weight.shape[1])
            except QuantizationError as e:
                raise self.fail(f"layer {layer.name!r} (weight {tuple(layer.weight.shape)}): {e}; leave the layer out "
                                f"(exclude=..., min_size=...) or give it its own group size (overrides=...)") from None
        self.current_node = None
        stats = self._collect_stats(graph, selected)
        per_layer: dict[str, dict] = {}
        bytes_saved = 0
        self._constants_kept: dict = {}
        self._constants_shared = 0
        for layer in selected:
            self.current_node = layer.node
            record = self._quantize_layer(graph, layer, stats.get(layer.name))
            # A module called more than once (shared layers) reports each call.
            key, calls = layer.name, 1
            while key in per_layer:
                calls += 1
                key = f"{layer.name}#{calls}"
            per_layer[key] = record
            bytes_saved += record.get("bytes_saved", 0)
        self.current_node = None
        quantized = sum(1 for r in per_layer.values() if not r.get("kept_float"))
        kept = {n: r["kept_float"] for n, r in per_layer.items() if r.get("kept_float")}
        out = {"quantized": quantized, "skipped": skipped, "bytes_saved": bytes_saved, "layers": per_layer}
        if self._constants_shared:
            out["shared_constants"] = self._constants_shared
        if self.guard:
            out["kept_float_by_guard"] = kept
        sqnrs = [r["sqnr_db"] for r in per_layer.values() if not r.get("kept_float") and math.isfinite(r["sqnr_db"])]
        if sqnrs:
            out["min_sqnr_db"] = round(min(sqnrs), 2)
        return PassResult(quantized > 0, out)

    def _collect_stats(self, graph, selected: list[Layer]) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        for method_name in sorted({l.cfg.method for l in selected}):
            method = METHODS[method_name]
            if method.collect is not None:
                group = [l for l in selected if l.cfg.method == method_name]
                stats.update(method.collect(self, graph, group, self.context.get("calibration_data")))
        return stats

    def _quantize_layer(self, graph, layer: Layer, layer_stats) -> dict:
        cfg = layer.cfg
        qt, act_scale = METHODS[cfg.method].quantize(layer.weight, cfg, layer_stats)
        effective = qt.dequantize() if act_scale is None else qt.dequantize() / act_scale.to(torch.float32)
        record = {
            "bits": cfg.bits, "scheme": cfg.scheme, "granularity": cfg.granularity, "mode": cfg.mode, "method": cfg.method,
            "sqnr_db": round(sqnr_db(layer.weight, effective), 2), "rel_err": relative_error(layer.weight, effective),
        }
        if cfg.mode == "dynamic" and layer.kind == "linear":
            record["act_granularity"] = cfg.act_granularity
        attrs_before = {n for n in graph.fx.nodes if n.op == "get_attr"}
        with graph.fx.inserting_before(layer.node):
            if layer.kind == "embedding":
                new = self._lower_embedding(graph, layer, qt)
            else:
                new = MODES[cfg.mode].lower(self, graph, layer, qt, act_scale)
        if self.guard and layer.kind == "linear":
            float_ms, quant_ms = self._time_layer(graph, layer, new)
            record.update(float_ms=round(float_ms, 4), quant_ms=round(quant_ms, 4))
            if quant_ms >= float_ms:
                self._erase_chain(graph, new, stop=layer.node)
                record["kept_float"] = f"{self.guard_backend}: quantized {quant_ms:.3f} ms >= float {float_ms:.3f} ms"
                return record
        new.meta.update({k: v for k, v in layer.node.meta.items() if k != "val"})
        new.meta["quantized_layer"] = layer.name
        layer.node.replace_all_uses_with(new)
        graph.fx.erase_node(layer.node)
        # A weight read by several linears (a layer called twice, a tied weight) is
        # quantized once per call: keep one copy of equal codes and scales.
        added = [n for n in graph.fx.nodes if n.op == "get_attr" and n not in attrs_before]
        merged = graph.merge_equal_constants(added, self._constants_kept)
        self._constants_shared += len(merged)
        stored = sum(_nbytes(graph.constant(n)) for n in added if n not in merged)
        freed = 0 if layer.weight_node.users else _nbytes(layer.weight)
        record["bytes_saved"] = freed - stored  # what this call changed in the stored bytes
        if not layer.weight_node.users:
            graph.fx.erase_node(layer.weight_node)
        return record

    def _lower_embedding(self, graph, layer: Layer, qt: QuantizedTensor) -> fx.Node:
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
            return _call(graph, torch.ops.fxopt.embedding_nbits.default, args, layer.name)
        name, ids = layer.name, layer.node.args[1]
        groups = qt.scale.shape[-1]

        def per_row(table: torch.Tensor, what: str) -> fx.Node:
            """Gather a [N, groups] table's rows: [..., groups, 1]."""
            t = graph.add_constant(table.to(torch.float32).expand(n, groups).contiguous(), f"{name}.{what}")
            return _call(graph, aten.unsqueeze.default, (_call(graph, aten.embedding.default, (t, ids), name), -1), name)

        q = graph.add_constant(qt.q, f"{name}.qweight")
        rows = _call(graph, aten.embedding.default, (q, ids), name)
        rows = _cast(graph, rows, torch.float32, name)
        rows = _call(graph, aten.unflatten.int, (rows, -1, [groups, k // groups]), name)
        if qt.zero_point is not None:
            rows = _call(graph, aten.sub.Tensor, (rows, per_row(qt.zero_point, "zero_point")), name)
        rows = _call(graph, aten.mul.Tensor, (rows, per_row(qt.scale, "scale")), name)
        rows = _call(graph, aten.flatten.using_ints, (rows, -2, -1), name)
        if layer.weight.dtype != torch.float32:  # dequantized in float32, returned in the table's dtype
            rows = _cast(graph, rows, layer.weight.dtype, name)
        return rows

    # -- guard ------------------------------------------------------------------------
    def _time_layer(self, graph, layer: Layer, new: fx.Node) -> tuple[float, float]:
        """Median time of the float linear and of the nodes replacing it on the
        ``guard_backend``, each cut out of the graph as a one-input model and run
        on a random input of ``guard_tokens`` rows. Layers alike in shape and
        config are timed once per run."""
        key = (tuple(layer.weight.shape), layer.bias is not None, layer.cfg, self.guard_tokens, self.guard_backend)
        if key not in self._guard_times:
            compile_for = target(self.guard_backend)
            x = torch.randn(self.guard_tokens, layer.weight.shape[1])
            times = []
            for out in (layer.node, new):
                module = fx.GraphModule(*_cut_out(graph, layer.x, out))
                model = compile_for(trace(module, (x,), name=f"{layer.name}-guard"))
                times.append(median_ms(lambda: model(x)))
            self._guard_times[key] = tuple(times)
        return self._guard_times[key]

    @staticmethod
    def _erase_chain(graph, node: fx.Node, stop: fx.Node) -> None:
        """Erase ``node`` and the now-unused nodes it was built from."""
        work = [node]
        while work:
            n = work.pop()
            if n.users or n is stop or n.op == "placeholder" or n.graph is not graph.fx:
                continue
            inputs = [a for a in n.all_input_nodes]
            graph.fx.erase_node(n)
            work.extend(inputs)
