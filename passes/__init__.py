"""Passes: the base class, the registry, the pipeline syntax, the manager and
the built-in passes (one module per pass family)."""

from .analysis import Analysis, AnalysisManager
from .base import Option, OptionError, Pass, PassContext, PassError, PassResult
from .registry import REGISTRY, PassRegistry, UnknownPassError, register_pass
from .pipeline import FixedPoint, PipelineError, format_pipeline, parse_pipeline
from .manager import Instrument, IRDump, NumericsError, PassManager, PassRecord, PipelineResult

# Built-in passes register themselves on import.
from . import canonicalize, constant_fold, cse, dce, quantize  # noqa: E402,F401
from . import attention  # noqa: E402,F401
from . import fusion  # noqa: E402,F401
from . import attention_packed  # noqa: E402,F401
from . import padding  # noqa: E402,F401
from . import cluster, prune, share_weights, shrink  # noqa: E402,F401
from . import tensor_parallel  # noqa: E402,F401
from . import experts  # noqa: E402,F401

__all__ = [
    "Analysis", "AnalysisManager",
    "Pass", "Option", "OptionError", "PassResult", "PassError", "PassContext", "register_pass",
    "REGISTRY", "PassRegistry", "UnknownPassError", "FixedPoint", "PipelineError", "parse_pipeline",
    "format_pipeline", "PassManager", "PassRecord", "PipelineResult", "Instrument", "IRDump", "NumericsError",
]
