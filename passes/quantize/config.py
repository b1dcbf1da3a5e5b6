"""How one layer is quantized: the pass's options, then the first per-layer
override whose regex matches the layer's name (``overrides=['up$:bits=8']``).

:func:`layer_config` is the one place defaults are decided: a scheme or
granularity nobody set follows the bits and mode in force for that layer, so
``quantize(bits=4,overrides=['up$:bits=8'])`` gives ``up`` per-channel 8-bit
weights and the rest 4-bit groups.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from ...ir.quant import QuantConfig
from ..base import Option, OptionError

# The options an override may set.
OVERRIDABLE = ("bits", "scheme", "granularity", "group_size", "mode", "method", "accuracy_level", "act_granularity")


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


def layer_config(options: Mapping[str, Any], override: Mapping[str, Any] | None = None) -> LayerConfig:
    """The config of a layer: ``override``'s settings over the pass's
    ``options`` (both keyed by option name; None means "not set"). Unset, the
    scheme is ``sym`` for the W8A8 modes (their int8 kernels take no weight
    zero point) and ``asym`` otherwise; the granularity is ``channel`` at 8
    bits and for ``dynamic``, ``group`` below 8 bits; activations are
    quantized per token."""
    given = {k: options.get(k) for k in OVERRIDABLE}
    given.update({k: v for k, v in (override or {}).items() if v is not None})
    bits, mode = given["bits"], given["mode"]
    return LayerConfig(
        bits=bits,
        scheme=given["scheme"] or ("sym" if mode in ("dynamic", "static") else "asym"),
        granularity=given["granularity"] or ("channel" if bits == 8 or mode == "dynamic" else "group"),
        group_size=given["group_size"],
        mode=mode,
        method=given["method"],
        accuracy_level=given["accuracy_level"],
        act_granularity=given["act_granularity"] or "token",
    )


def parse_override(item: str, options: Mapping[str, Option], owner: str = "quantize") -> tuple[re.Pattern, dict[str, Any]]:
    """``'regex:key=value[;key=value]'`` -> (compiled regex, {key: value}),
    each value checked by the pass's own option."""
    pattern, _, body = item.partition(":")
    where = f"pass {owner!r}: option 'overrides' entry {item!r}"
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise OptionError(f"{where}: invalid regular expression: {e}") from None
    values: dict[str, Any] = {}
    for part in filter(None, (s.strip() for s in body.split(";"))):
        key, eq, raw = part.partition("=")
        key = key.strip()
        if not eq or key not in OVERRIDABLE:
            raise OptionError(f"{where}: expected key=value with key one of {list(OVERRIDABLE)}, got {part!r}")
        opt = options[key]
        value: Any = raw.strip()
        if opt.type is int:
            try:
                value = int(value)
            except ValueError:
                raise OptionError(f"{where}: {key} must be an integer, got {raw!r}") from None
        opt.validate(owner, value)
        values[key] = value
    if not values:
        raise OptionError(f"{where}: no key=value settings after the ':'")
    return regex, values


def overrides_problem(value) -> str | None:
    for item in value:
        if not isinstance(item, str) or ":" not in item:
            return f"each override is 'regex:key=value[;key=value]', got {item!r}"
    return None


def numerics_tolerance(bits: int) -> float:
    """Relative output error (x output scale) ``bits``-bit weights may add:
    it grows with the weight error (~2^-bits of the range) and the depth."""
    return min(1.0, 16.0 * 2.0**-bits)
