"""Tensor parallelism on torch.distributed.

The ``tensor-parallel(world_size=N, rank=r)`` pass
(:mod:`fxopt.passes.tensor_parallel`) turns a traced model into rank ``r``'s
graph. A rank graph:

* is an ordinary fxopt Graph for one rank, holding only that rank's weight
  shards (replicated weights whole);
* communicates through ``torch.ops._c10d_functional.all_reduce.default(x, "sum",
  "tp")`` and ``torch.ops._c10d_functional.all_gather_into_tensor.default(x, N,
  "tp")``, each followed by ``torch.ops._c10d_functional.wait_tensor.default``;
  ``"tp"`` is a literal group name that :func:`bind_process_group` rewrites
  into a real process group's ``group_name``;
* gathers along dim 0; a vocabulary-parallel LM head's logits are gathered
  and laid out again along the last dimension in the graph (``chunk`` /
  ``cat``), so every rank's outputs equal the whole model's.

Under ``torchrun --nproc-per-node N`` (one process per rank)::

    torch.distributed.init_process_group("gloo")
    graph = fxopt.trace(model, example_inputs)
    run = fxopt.parallel.compile_tensor_parallel(graph)      # this process's rank
    logits = run(**inputs)                                    # the whole model's logits

    gen = fxopt.parallel.compile_tensor_parallel_generator(hf_causal_lm)   # generation, cache split by heads
    tokens = gen.generate([[5, 9, 2]], max_new_tokens=64).new_tokens      # the same on every rank
"""

from __future__ import annotations

from .ir.collectives import GROUP, ProcessGroupError, bind_process_group, count, rank_of
from .ir.graph import Graph

__all__ = [
    "GROUP", "ProcessGroupError", "bind_process_group", "rank_graph", "tensor_parallel_graphs",
    "compile_tensor_parallel", "compile_tensor_parallel_generator", "rank_of", "all_reduce_count",
]


def rank_graph(graph: Graph, rank: int, world_size: int, *, pipeline: str = "", **options) -> Graph:
    """Rank ``rank``'s graph of a ``world_size``-way tensor-parallel split of
    ``graph`` (which is left as it was). ``options``: the pass's
    (``lm_head="replicated"``, ``embeddings="vocab"``); ``pipeline``: passes
    run after the split, e.g. ``"quantize,fuse-linear-act"``."""
    from .passes import PassManager
    from .passes.pipeline import format_value

    steps = [] if "canonical-linear" in graph.properties else ["canonicalize"]
    extra = "".join(f",{k}={format_value(v)}" for k, v in options.items())
    steps.append(f"tensor-parallel(world_size={world_size},rank={rank}{extra})")
    if pipeline:
        steps.append(pipeline)
    return PassManager(",".join(steps)).run(graph).graph


def tensor_parallel_graphs(graph: Graph, world_size: int, **options) -> list[Graph]:
    """Every rank's graph (see :func:`rank_graph`), rank 0 first."""
    return [rank_graph(graph, r, world_size, **options) for r in range(world_size)]


def compile_tensor_parallel(graph: Graph, *, group=None, backend: str = "eager", pipeline: str = "",
                            split_options: dict | None = None, **options):
    """This process's rank graph of ``graph``, split over ``group`` (default:
    the default process group), bound to it and compiled for ``backend``.
    Every rank calls it with the same graph and then runs the result on the
    same inputs. ``split_options`` go to the pass, ``options`` to the
    backend. Raises :class:`ProcessGroupError` saying how to launch when
    no process group is initialized."""
    from .backends import compile

    group, rank, n = _this_rank(group, "compile_tensor_parallel")
    bound = bind_process_group(rank_graph(graph, rank, n, pipeline=pipeline, **(split_options or {})), group)
    return compile(bound, backend, **options)


def compile_tensor_parallel_generator(model, *, group=None, backend: str = "eager", pipeline: str = "",
                                      split_options: dict | None = None, **options):
    """This process's rank of a causal LM split for generation: the prefill
    and decode-step graphs (:func:`fxopt.ir.decoder.trace_decoder`, or the
    ``DecoderGraphs`` given) each split for this rank over ``group``, then
    ``pipeline`` run on them, bound and compiled for ``backend``. Returns a
    :class:`fxopt.generation.Generator`; every rank calls ``generate`` with the
    same prompts and options and gets the same tokens. Each rank's key/value
    cache holds only its heads (``[B, kv_heads / N, T, D]``). ``split_options``
    go to the pass, ``options`` to :func:`fxopt.compile_generator` (backend
    options; on ONNX Runtime each rank's step runs as sessions cut at its
    collectives, with ``cache="growing"``)."""
    from .generation import compile_generator
    from .ir.decoder import DecoderGraphs, trace_decoder
    from .passes import PassManager

    group, rank, n = _this_rank(group, "compile_tensor_parallel_generator")
    if pipeline:
        PassManager(pipeline)  # a bad pipeline fails before tracing
    graphs = model if isinstance(model, DecoderGraphs) else trace_decoder(model)
    ranked = {kind: bind_process_group(rank_graph(getattr(graphs, kind), rank, n, pipeline=pipeline, **(split_options or {})), group)
              for kind in ("prefill", "decode")}
    return compile_generator(DecoderGraphs(ranked["prefill"], ranked["decode"], graphs.info, graphs.name, graphs.records,
                                           graphs.pipeline), None, backend, **options)


def _this_rank(group, what: str):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ProcessGroupError(f"{what} needs an initialized torch.distributed process group: launch one "
                                "process per rank with `torchrun --nproc-per-node N your_script.py` and call "
                                "torch.distributed.init_process_group('gloo') (or 'nccl') first")
    group = group if group is not None else dist.group.WORLD
    return group, dist.get_rank(group), dist.get_world_size(group)


def all_reduce_count(graph: Graph) -> int:
    """The number of all-reduces in a rank graph."""
    from .ir.collectives import ALL_REDUCE

    return count(graph, ALL_REDUCE)
