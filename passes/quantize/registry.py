"""The registries of quantization modes and methods.

A **mode** says how a quantized layer runs (``weight-only``, ``dynamic``
W8A8, ``static`` W8A8): it lowers one layer to fxopt's ops. A **method**
says how the weight's integer codes are chosen (``rtn``, ``awq``, ``gptq``).
Built-in and user entries register the same way, and a name can be taken
once, as in the pass registry::

    @register_method("my-rtn")
    def my_rtn(weight, cfg, stats):
        return fxopt.ir.quant.quantize(weight, cfg.quant_config()), None

    fxopt.PassManager("canonicalize,quantize(method=my-rtn)")

* ``register_mode(name, *, needs_calibration=False, check=None)`` decorates
  ``lower(pass_, graph, layer, qt, act_scale) -> fx.Node``, which builds the
  quantized replacement of ``layer.node`` (an ``aten.linear``) before it and
  returns the node standing for its output. ``layer`` is a
  :class:`~fxopt.passes.layers.Layer` whose ``cfg`` is its
  :class:`~fxopt.passes.quantize.LayerConfig`; ``qt`` the
  :class:`~fxopt.ir.quant.QuantizedTensor` the method returned;
  ``act_scale`` an optional ``[K]`` tensor the activation must be divided by
  (:func:`~fxopt.passes.quantize.lowering.scaled_input`). ``check(cfg) -> str
  | None`` says why the mode cannot take a layer config.
* ``register_method(name, *, needs_calibration=False, collect=None)``
  decorates ``quantize(weight [N, K], cfg, stats) -> (QuantizedTensor,
  act_scale [K] | None)``; ``stats`` is what ``collect(pass_, graph, layers,
  calibration_data) -> {layer name: stats}`` returned for the layer (None
  without ``collect``). With ``act_scale``, ``qt`` quantizes ``weight *
  act_scale`` (the activation is divided by it, so the product is unchanged).

An entry that needs calibration makes the pass require the
``calibration_data`` input (``PassManager(..., calibration_data=[...])``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

import torch
import torch.fx as fx

from ...ir.quant import QuantizedTensor
from ..base import did_you_mean


@dataclass(frozen=True)
class Mode:
    lower: Callable[..., fx.Node]
    needs_calibration: bool = False
    check: Callable[[Any], str | None] | None = None


@dataclass(frozen=True)
class Method:
    quantize: Callable[..., tuple[QuantizedTensor, torch.Tensor | None]]
    needs_calibration: bool = False
    collect: Callable[..., dict[str, Any]] | None = None


T = TypeVar("T")


class UnknownEntryError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


class QuantRegistry(Generic[T]):
    """Entries of one kind (``mode`` or ``method``) by name; a second
    registration of a name is an error, not a silent overwrite."""

    def __init__(self, kind: str, entry_type: type) -> None:
        self.kind = kind
        self.entry_type = entry_type
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if not isinstance(entry, self.entry_type):
            raise TypeError(f"quantize {self.kind} {name!r}: expected a {self.entry_type.__name__}, got {entry!r}")
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"quantize {self.kind} name {name!r} must be non-empty and use letters, digits, '-' or '_'")
        if name in self._entries:
            prev = self._entries[name]
            fn = getattr(prev, "lower", None) or getattr(prev, "quantize", None)
            raise ValueError(f"quantize {self.kind} {name!r} is already registered by {fn.__module__}.{fn.__qualname__}")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownEntryError(self.unknown(name)) from None

    __getitem__ = get

    def unknown(self, name: str) -> str:
        return (f"unknown quantize {self.kind} {name!r}{did_you_mean(name, self._entries)}; "
                f"registered: {', '.join(self.names())}")

    def problem(self, name: str) -> str | None:
        """None when ``name`` is registered, else why not (an Option check)."""
        return None if name in self._entries else self.unknown(name)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


MODES: QuantRegistry[Mode] = QuantRegistry("mode", Mode)
METHODS: QuantRegistry[Method] = QuantRegistry("method", Method)


def register_mode(name: str, *, needs_calibration: bool = False, check: Callable[[Any], str | None] | None = None):
    """Function decorator: registers ``lower`` as quantize mode ``name``."""

    def wrap(lower):
        MODES.register(name, Mode(lower, needs_calibration, check))
        return lower

    return wrap


def register_method(name: str, *, needs_calibration: bool = False, collect: Callable[..., dict[str, Any]] | None = None):
    """Function decorator: registers ``quantize`` as quantize method ``name``."""

    def wrap(quantize):
        METHODS.register(name, Method(quantize, needs_calibration, collect))
        return quantize

    return wrap
