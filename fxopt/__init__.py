"""fxopt: graph optimization passes for LLM inference.

    graph = fxopt.trace(model, example_inputs)
    result = fxopt.PassManager("canonicalize,dce,constant-fold,cse").run(graph)
    compiled = fxopt.compile(result.graph, backend="onnxruntime")
"""

from .ir import Graph, LoadError, ParityError, TraceError, VerificationError, compare, load, trace
from .passes import (
    REGISTRY, FixedPoint, Instrument, Option, Pass, PassError, PassManager, PassResult,
    PipelineError, parse_pipeline, register_pass,
)
from .backends import BackendError, compile, export_onnx, load_compiled
from .generation import GenerationError, Generator, compile_generator, generate
from . import launch, parallel  # noqa: E402  (fxopt.launch.init, fxopt.parallel.rank_graph, ...)
from .data_parallel import DataParallel

__version__ = "0.1.0"

__all__ = [
    "trace", "load", "load_compiled", "LoadError", "Graph", "compare", "PassManager", "Pass", "PassResult", "PassError", "Option",
    "register_pass", "REGISTRY", "parse_pipeline", "PipelineError", "FixedPoint", "Instrument",
    "compile", "export_onnx", "BackendError", "TraceError", "VerificationError", "ParityError",
    "compile_generator", "generate", "Generator", "GenerationError", "launch", "parallel", "DataParallel",
]
