import functools
import os
import warnings

import pytest
import torch

import fxopt
from fxopt.ir.trace import split_inputs
from fxopt.models import BUILTIN, MissingModelError
from fxopt.passes import PassManager

warnings.filterwarnings("ignore", category=FutureWarning)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers share the cores (scripts/test.sh runs one per core): one
    # PyTorch thread each keeps them from oversubscribing the machine.
    torch.set_num_threads(1)

BASE_PIPELINE = "canonicalize,dce,constant-fold,cse"


@functools.lru_cache(maxsize=None)
def model_spec(name: str):
    """Built-in model specs, built once per session (minilm needs its package)."""
    try:
        return BUILTIN[name]()
    except MissingModelError as e:
        pytest.fail(f"{name}: {e}")


@functools.lru_cache(maxsize=None)
def base_graph(name: str):
    """A built-in model traced and run through the base pipeline, once per session."""
    spec = model_spec(name)
    g = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, name=name)
    return PassManager(BASE_PIPELINE).run(g).graph


def count(graph, target) -> int:
    return sum(1 for n in graph.fx.nodes if n.target == target)


def reference(spec, inputs=None):
    args, kwargs = split_inputs(spec.example_inputs if inputs is None else inputs)
    with torch.no_grad():
        return spec.model(*args, **kwargs)


def run(model, inputs):
    args, kwargs = split_inputs(inputs)
    return model(*args, **kwargs)


@pytest.fixture
def mlp_graph():
    spec = model_spec("mlp")
    return fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, name="mlp")
