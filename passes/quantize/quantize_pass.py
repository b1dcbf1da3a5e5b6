"""The ``quantize`` pass: select layers, decide each one's config, let its
method choose the integer codes and its mode lower them."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx

from ...ir.quant import QuantizationError, relative_error, sqnr_db
from ..base import Option, OptionError, PassResult
from ..fusion import fuse_linear_act, split_linear_act
from ..layers import Layer, LayerFilterOptions, layer_name
from ..registry import register_pass
from .config import LayerConfig, layer_config, numerics_tolerance, overrides_problem, parse_override
from .guard import erase_chain, time_float_and_quantized
from .lowering import lower_embedding
from .registry import METHODS, MODES

aten = torch.ops.aten


class AlreadyQuantizedWarning(UserWarning):
    """``quantize`` ran on a graph whose layers are already quantized."""


def is_quantized_op(node: fx.Node) -> bool:
    """A node that runs a quantized layer: one of fxopt's integer ops, or the
    ``aten.linear`` over dequantized codes that ``quantize`` makes for widths
    without a kernel."""
    if node.op != "call_function":
        return False
    t = node.target
    if isinstance(t, torch._ops.OpOverload) and t.namespace == "fxopt":
        return "int8" in t._opname or "nbits" in t._opname
    return t == aten.linear.default and "quantized_layer" in node.meta


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def non_finite_problem(layer: Layer) -> str | None:
    """Why ``layer``'s weight cannot be quantized honestly: NaN or infinite
    values have no integer code (min-max scales become NaN or inf, and the
    kernels turn them into finite numbers on one backend, NaN on another)."""
    weight = layer.weight.detach()  # an inference-mode Parameter cannot go through isfinite's autograd path
    finite = torch.isfinite(weight)
    if bool(finite.all()):
        return None
    nan = int(torch.isnan(weight).sum())
    inf = int((~finite).sum()) - nan
    where = tuple(int(i) for i in (~finite).nonzero()[0])
    return (f"layer {layer.name!r}: weight {layer.weight_node.name!r} {tuple(layer.weight.shape)} holds "
            f"{nan} NaN and {inf} infinite values (first at {list(where)}); quantizing would hide them behind finite "
            f"codes. Fix the weights, or leave the layer in float with exclude=...")


@register_pass("quantize")
class Quantize(LayerFilterOptions):
    """Quantizes the weights of ``aten.linear`` layers (and, with
    ``quantize_embeddings``, ``aten.embedding`` tables).

    Matches: ``linear(x, W, b)`` with a constant 2-D ``W`` (after ``canonicalize``,
    every linear form a traced model shows); layer names come from
    ``nn_module_stack`` (e.g. ``transformer.h.0.attn.c_attn``), else the node name.
    An ``fxopt.linear_act`` (``fuse-linear-act`` ran first) is quantized as its
    linear and fused again with its activation (``fxopt.linear_nbits_act``,
    ``fxopt.linear_dynamic_int8*_act``; float where the layer is not selected).

    Produces, per mode (passes/quantize/lowering.py):

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
      non-VNNI u8 x s8 kernels cannot saturate; faster, less accurate:
      docs/kernels.md);
    * ``static`` (W8A8 with calibrated activation ranges): ``fxopt.linear_static_int8``.

    Methods (passes/quantize/methods.py): ``rtn``, ``awq``, ``gptq``; modes
    and methods are registries (``register_mode``, ``register_method``).

    Stats: per layer (a module called twice also reports ``name#2``) the error
    (SQNR, relative) and ``bytes_saved``, the change in stored bytes that call
    made; equal codes and scales (a weight read by several calls) are stored
    once and counted in ``shared_constants``; ``min_sqnr_db`` over the
    quantized layers; ``already_quantized``: quantized layers the graph held
    before (a second ``quantize`` that finds nothing to do also warns).

    Refuses (leaves float, counted in stats): weights that are not constants,
    layers outside ``include``/inside ``exclude``, smaller than ``min_size``
    elements, the LM head with ``skip_lm_head``, mixture-of-experts routers with
    ``skip_router`` (passes/layers.py), and with
    ``guard`` layers whose quantized kernel is not faster than the float one on
    ``guard_backend`` (each distinct layer shape timed once; the times are in
    the layer's stats).
    A group size wider than a layer's K falls back to the widest group
    dividing both when that is at least 16 (``group_size_adjusted`` in the
    stats: a 64-wide model under ``group_size=128`` gets groups of 64).
    Errors: a filter or override that matches no layer; a group size with no
    such fallback (the message lists the ones that divide K); a selected
    weight holding NaN or infinite values, or a method whose result
    dequantizes to them; a mode or method that is not registered.
    """

    bits = Option(8, int, check=lambda v: None if 2 <= v <= 8 else "bits must be from 2 to 8", help="weight bits (2..8)")
    scheme = Option(None, str, choices=("asym", "sym"), help="asym (min-max, zero point) or sym; default: asym, sym for dynamic")
    granularity = Option(None, str, choices=("tensor", "channel", "group"),
                         help="scale granularity; default: channel for 8 bits, group below")
    group_size = Option(128, int, check=lambda v: None if v >= 1 else "must be >= 1", help="input columns per scale (granularity=group)")
    mode = Option("weight-only", str, check=MODES.problem, help="weight-only | dynamic (W8A8) | static, or a registered mode")
    method = Option("rtn", str, check=METHODS.problem, help="rtn | awq | gptq, or a registered method")
    quantize_embeddings = Option(False, help="quantize embedding tables too (weight-only, groups along the embedding dimension)")
    overrides = Option((), tuple, check=overrides_problem,
                       help="per-layer options: ['regex:bits=8;group_size=32', ...]; the first matching entry wins")
    accuracy_level = Option(4, int, choices=(0, 1, 2, 3, 4), help="MatMulNBits accuracy level (4: int8 compute)")
    act_granularity = Option(None, str, choices=("token", "tensor"),
                             help="mode=dynamic: activation scales per token (8-bit, default) or per tensor (weight codes within +-63, fbgemm on eager)")
    guard = Option(False, help="time each quantized layer against float on guard_backend; keep float where it does not pay")
    guard_backend = Option("eager", str, choices=("eager", "onnxruntime"), help="the backend the guard times layers on")
    guard_tokens = Option(1, int, check=lambda v: None if v >= 1 else "must be >= 1", help="rows of the input the guard times with")
    observer = Option("minmax", str, choices=("minmax", "percentile", "moving-average"),
                      help="mode=static: how calibration sets each activation range (passes/quantize/calibration.py)")
    percentile = Option(99.99, float, check=lambda v: None if 50 < v <= 100 else "must be in (50, 100]",
                        help="observer=percentile: the percentile kept")

    runs_after = ("canonicalize",)
    requires = ("canonical-linear",)

    # -- options --------------------------------------------------------------------
    def validate_options(self) -> None:
        self._overrides = [parse_override(item, self.options, self.name or "quantize") for item in self.overrides]
        configs = [self._base_config()] + [layer_config(self._settings(), kv) for _, kv in self._overrides]
        if self.act_granularity is not None and not any(c.mode == "dynamic" for c in configs):
            raise OptionError(f"pass 'quantize': option 'act_granularity={self.act_granularity}' applies to mode=dynamic only "
                              f"(mode={self.mode!r}; static activations use calibrated per-tensor ranges)")
        if "group_size" in self.given_options and not any(c.granularity == "group" for c in configs):
            raise OptionError(f"pass 'quantize': option 'group_size={self.group_size}' applies to granularity=group only, and this "
                              f"pipeline quantizes with granularity={configs[0].granularity} (the default for "
                              f"{'mode=dynamic' if self.mode == 'dynamic' else f'{self.bits} bits'}); add granularity=group or drop group_size")
        for cfg in configs:
            self._check_config(cfg)
        self.numerics_tolerance = max(numerics_tolerance(c.bits) for c in configs)
        if any(c.mode in ("dynamic", "static") for c in configs):
            self.numerics_tolerance = max(self.numerics_tolerance, numerics_tolerance(7))
        self._configs = configs

    def _settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.options}

    def _base_config(self) -> LayerConfig:
        return layer_config(self._settings())

    def _check_config(self, cfg: LayerConfig) -> None:
        for registry, name in ((MODES, cfg.mode), (METHODS, cfg.method)):
            if name not in registry:
                raise OptionError(f"pass 'quantize': {registry.unknown(name)}")
        check = MODES[cfg.mode].check
        problem = check(cfg) if check else None
        if problem:
            raise OptionError(f"pass 'quantize': {problem}")

    def required_inputs(self) -> tuple[str, ...]:
        needs = any(MODES[c.mode].needs_calibration or METHODS[c.method].needs_calibration for c in self._configs)
        return ("calibration_data",) if needs else ()

    @staticmethod
    def layer_name(node: fx.Node) -> str:
        return layer_name(node)

    # -- selection --------------------------------------------------------------------
    def _select(self, graph) -> tuple[list[Layer], dict[str, int]]:
        kinds = ("linear", "embedding") if self.quantize_embeddings else ("linear",)
        selection = self.select_layers(graph, kinds)
        names = [l.name for l in selection.candidates]
        for (regex, _), text in zip(self._overrides, self.overrides):
            if not any(regex.search(n) for n in names):
                raise self.fail(f"override {text!r} matches no layer; layers: {names}")
        for layer in selection.selected:
            override = next((values for regex, values in self._overrides if regex.search(layer.name)), None)
            cfg = layer_config(self._settings(), override)
            if layer.kind == "embedding":  # lookups have no activation to quantize
                cfg = replace(cfg, mode="weight-only", method="rtn")
            layer.cfg = cfg
        return selection.selected, selection.skipped

    # -- running ----------------------------------------------------------------------
    def run(self, graph) -> PassResult:
        self._guard_times: dict[tuple, tuple[float, float]] = {}
        already = sum(1 for n in graph.fx.nodes if is_quantized_op(n))
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
        if already:
            result.stats["already_quantized"] = already
            if not result.stats["quantized"]:
                warnings.warn(f"quantize: the graph already holds {already} quantized layers and none is left to quantize "
                              f"(skipped: {result.stats['skipped']}); this quantize changed nothing",
                              AlreadyQuantizedWarning, stacklevel=2)
        return result

    def _run(self, graph) -> PassResult:
        selected, skipped = self._select(graph)
        # Check every selected layer before the first edit. A group wider than
        # a layer's K (a narrow model's 64 columns under the usual 128) falls
        # back to the widest group dividing both, if that is at least 16.
        group_size_adjusted: dict[str, int] = {}
        for layer in selected:
            self.current_node = layer.node
            problem = non_finite_problem(layer)
            if problem:
                raise self.fail(problem)
            k = layer.weight.shape[1]
            if layer.cfg.granularity == "group" and layer.cfg.group_size > k and math.gcd(k, layer.cfg.group_size) >= 16:
                layer.cfg = replace(layer.cfg, group_size=math.gcd(k, layer.cfg.group_size))
                group_size_adjusted[layer.name] = layer.cfg.group_size
            try:
                layer.cfg.quant_config().num_groups(k)
            except QuantizationError as e:
                usable = [g for g in (256, 128, 64, 32, 16) if k % g == 0] or [g for g in range(min(k, 256), 0, -1) if k % g == 0][:4]
                raise self.fail(f"layer {layer.name!r} (weight {tuple(layer.weight.shape)}): {e}; use group_size={usable[0]} "
                                f"(group sizes that divide {k}: {', '.join(map(str, usable))}), leave the layer out "
                                f"(exclude=..., min_size=...) or give it its own group size (overrides=...)") from None
        self.current_node = None
        stats = self._collect_stats(graph, selected)
        per_layer: dict[str, dict] = {}
        bytes_saved = 0
        self._constants_kept: dict = {}
        self._constants_shared = 0
        for layer in self.progress(selected, "quantizing layers"):
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
        if group_size_adjusted:
            out["group_size_adjusted"] = group_size_adjusted
        if self.guard:
            out["kept_float_by_guard"] = kept
        # An exact layer (+inf dB) says nothing about the worst one; any other value counts.
        sqnrs = [r["sqnr_db"] for r in per_layer.values() if not r.get("kept_float") and r["sqnr_db"] != math.inf]
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
        if not bool(torch.isfinite(effective).all()):
            raise self.fail(f"layer {layer.name!r}: method {cfg.method!r} returned codes, scales or an activation scale "
                            f"that dequantize to NaN or infinite values from a finite weight")
        record = {
            "bits": cfg.bits, "scheme": cfg.scheme, "granularity": cfg.granularity, "mode": cfg.mode, "method": cfg.method,
            "sqnr_db": round(sqnr_db(layer.weight, effective), 2), "rel_err": relative_error(layer.weight, effective),
        }
        if cfg.mode == "dynamic" and layer.kind == "linear":
            record["act_granularity"] = cfg.act_granularity
        attrs_before = {n for n in graph.fx.nodes if n.op == "get_attr"}
        with graph.fx.inserting_before(layer.node):
            if layer.kind == "embedding":
                new = lower_embedding(graph, layer, qt)
            else:
                new = MODES[cfg.mode].lower(self, graph, layer, qt, act_scale)
        if self.guard and layer.kind == "linear":
            float_ms, quant_ms = self._time_layer(graph, layer, new)
            record.update(float_ms=round(float_ms, 4), quant_ms=round(quant_ms, 4))
            if quant_ms >= float_ms:
                erase_chain(graph, new, stop=layer.node)
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

    def _time_layer(self, graph, layer: Layer, new: fx.Node) -> tuple[float, float]:
        """Float and quantized time of one layer on ``guard_backend``; layers
        alike in shape and config are timed once per run."""
        key = (tuple(layer.weight.shape), layer.bias is not None, layer.cfg, self.guard_tokens, self.guard_backend)
        if key not in self._guard_times:
            self._guard_times[key] = time_float_and_quantized(graph, layer, new, self.guard_backend, self.guard_tokens)
        return self._guard_times[key]
