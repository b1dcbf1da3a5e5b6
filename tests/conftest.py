import functools
import os
import pickle
import warnings
from pathlib import Path

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

# The run's temporary folder, shared by its pytest-xdist workers (None in a
# run without workers): where ``once_per_run`` leaves what it computed.
_RUN_FOLDER: Path | None = None
_ONCE: dict[str, object] = {}


def pytest_configure(config):
    global _RUN_FOLDER
    # xdist gives each worker <the run's basetemp>/popen-gwN as its basetemp
    if hasattr(config, "workerinput") and config.option.basetemp:
        _RUN_FOLDER = Path(config.option.basetemp).parent


# Files that take minutes, longest first. scripts/test.sh hands whole files to
# its two workers (--dist loadfile) in collection order, each worker taking
# the next file when it is free: starting with the longest leaves only short
# files for the end, so the workers finish together.
LONGEST_FILES = (
    "test_generation.py", "test_parallel_runtime.py", "test_parallel_generation.py", "test_tensor_parallel.py",
    "test_shrink.py", "test_models_backends.py", "test_cli.py", "test_attention_lowering.py",
    "test_compress_compose.py", "test_prune.py", "test_bench_generate_peers.py", "test_cluster.py",
    "test_architectures.py", "test_quant_methods.py", "test_share_weights.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))  # stable: a file's own order stays


def once_per_run(key: str, compute):
    """``compute()`` once per test run, for every worker: results that cost
    tens of seconds (processes of ranks started and run to the end,
    reference generations) read by tests of several files, which the two
    workers may run. The first worker to ask computes it while the others wait
    on a lock, and leaves it pickled in the run's temporary folder."""
    if key in _ONCE:
        return _ONCE[key]
    if _RUN_FOLDER is None:
        value = compute()
    else:
        import filelock

        path = _RUN_FOLDER / f"once-{key}.pkl"
        with filelock.FileLock(f"{path}.lock"):
            if path.exists():
                value = pickle.loads(path.read_bytes())
            else:
                value = compute()
                path.write_bytes(pickle.dumps(value))
    _ONCE[key] = value
    return value


@functools.lru_cache(maxsize=None)
def model_spec(name: str):
    """Built-in model specs, built once per session (minilm needs its package)."""
    try:
        return BUILTIN[name]()
    except MissingModelError as e:
        pytest.fail(f"{name}: {e}")


@functools.lru_cache(maxsize=None)
def built(factory, *args, **kwargs):
    """``factory(*args, **kwargs)`` (a ModelSpec factory of fxopt.models),
    built once per test process and shared: a test must not change its model."""
    return factory(*args, **kwargs)


_TRACED: dict = {}


def trace_once(spec, *, dynamic: bool = True, graph_name: str | None = None):
    """``fxopt.trace`` of ``spec`` (a ModelSpec, or the name of a built-in
    model) with its dynamic dimensions unless ``dynamic=False`` and
    ``graph_name`` as trace's ``name``, traced once per test process for
    each spec (``model_spec`` and ``built`` give a test the shared ones). Each call
    returns its own copy, nodes and tensors alike, so a test may edit it
    without another test seeing the edit."""
    spec = model_spec(spec) if isinstance(spec, str) else spec
    key = (id(spec), dynamic)
    if key not in _TRACED:  # the spec is kept with its graph, so its id stays its own
        _TRACED[key] = spec, fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes if dynamic else None)
    graph = _TRACED[key][1].copy()
    graph.own_tensors()
    if graph_name is not None:
        graph.name = graph_name
    return graph


@functools.lru_cache(maxsize=None)
def base_graph(name: str):
    """A built-in model traced and run through the base pipeline, once per session."""
    return PassManager(BASE_PIPELINE).run(trace_once(name, graph_name=name)).graph


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
    return trace_once("mlp", graph_name="mlp")
