"""Quantization: the ``quantize`` and ``smooth-quant`` passes and what they
are built from.

* ``config.py``: :class:`LayerConfig` and :func:`layer_config`, the one
  function that decides a layer's settings from the pass's options and its
  per-layer override;
* layer selection (include / exclude / min_size / skip_lm_head) is
  :func:`fxopt.passes.layers.select_layers`, shared with other per-layer passes;
* ``registry.py``: the mode and method registries (:data:`MODES`,
  :data:`METHODS`, :func:`register_mode`, :func:`register_method`), which refuse
  a name taken twice;
* ``lowering.py``: one lowering per mode (``weight-only``, ``dynamic``,
  ``static``) and for embedding tables;
* ``methods.py``: ``rtn``, ``awq``, ``gptq``;
* ``calibration.py``: observers and :func:`collect_linear_stats`, what the
  calibrated modes and methods and ``smooth-quant`` read;
* ``guard.py``: ``guard=true``'s per-layer timing;
* ``quantize_pass.py``: the :class:`Quantize` pass; ``smoothquant.py``: the
  :class:`SmoothQuant` pass.
"""

from .registry import METHODS, MODES, Method, Mode, QuantRegistry, UnknownEntryError, register_method, register_mode
from .config import LayerConfig, layer_config
from .calibration import CalibrationError, LinearStats, collect_linear_stats
from . import lowering, methods  # noqa: F401  (register the built-in modes and methods)
from .lowering import dequantized_weight, quantized_node, scaled_input
from .methods import awq_search, gptq_quantize
from .quantize_pass import AlreadyQuantizedWarning, Quantize, is_quantized_op
from .smoothquant import SmoothQuant
from ..layers import Layer

__all__ = [
    "METHODS", "MODES", "Method", "Mode", "QuantRegistry", "UnknownEntryError", "register_method", "register_mode",
    "LayerConfig", "layer_config", "Layer", "CalibrationError", "LinearStats", "collect_linear_stats",
    "dequantized_weight", "quantized_node", "scaled_input", "awq_search", "gptq_quantize",
    "AlreadyQuantizedWarning", "Quantize", "is_quantized_op", "SmoothQuant",
]
