"""Tensor and data parallelism on torch.distributed (processes of one host).

    python benchmarks/parallel.py --models gpt2,llama --repeats 20 --requests 32

Per model (random weights; GPT-2 small, and a Llama config of GPT-2 small's
size with grouped-query attention):

* parameter bytes of one rank's graph at N=2 against the whole model's;
* latency of one forward of one token and of a 128-token prefill (batch 1):
  fxopt's graph in one process with 1 and 2 threads, and its tensor-parallel
  rank graphs at N=2 with one thread per rank, on eager PyTorch (linears on
  packed weights: ``prepack=True``) and on ONNX Runtime (sessions between the
  collectives), with the tensor-parallel group
  on each transport (``--transports``: fxopt's shared-memory group
  ``fxopt_shm``, and gloo); the peer, PyTorch DTensor's
  ``parallelize_module`` with ColwiseParallel / RowwiseParallel on the same
  Hugging Face model (GPT-2 prepared as its users do: :func:`linear_gpt2`),
  at N=2 with one thread per rank on the same groups, beside the model in one
  process;
* the all-reduce on its own, on each transport: an all_reduce of one token's
  hidden state (and of 128 tokens') between the two ranks, times the
  all-reduces per forward; on paper, the all-reduce bytes per token per layer
  at 8 ranks;
* data-parallel throughput: a stream of requests through 2 replicas (one
  thread each) against one process with one thread, the outputs gathered on
  each transport (median of 3 passes each).

Every row prints the max abs error of its logits: a tensor-parallel row against
the same pipeline run whole in one process (eager), the other rows against the
Hugging Face model (a quantizing pipeline's own error). ``--models gpt2-tiny,llama-tiny`` checks
that it all runs; ``--backends eager`` (or ``onnxruntime``) times one fxopt
backend only, about halving the time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BASE = "canonicalize,dce,constant-fold,cse"
AFTER_SPLIT = "dce,constant-fold,cse"  # the graph is canonical already: the split needs it first
LLAMA_GPT2_SIZE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, vocab_size=32000)
SHAPES = {"one-token": 1, "prefill-128": 128}


def backend_options(backend: str, threads: int) -> dict:
    """Each fxopt backend at its best documented setup: ONNX Runtime's
    threads; eager linears on packed weights (``prepack``)."""
    return {"intra_op_threads": threads} if backend == "onnxruntime" else {"prepack": True}
BACKENDS = ("eager", "onnxruntime")
TRANSPORTS = ("shm", "gloo")  # fxopt.launch.init's names, timed in this order


def model_spec(name: str):
    from fxopt import models

    if name == "llama":
        return models.llama("small", **LLAMA_GPT2_SIZE)
    return models.BUILTIN[name]()


def hidden_size(model) -> int:
    cfg = model.config
    return getattr(cfg, "hidden_size", None) or cfg.n_embd


def layers(model) -> int:
    cfg = model.config
    return getattr(cfg, "num_hidden_layers", None) or cfg.n_layer


def token_ids(model, seq: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(seq))


def logits(out) -> torch.Tensor:
    return out["logits"] if isinstance(out, dict) or hasattr(out, "keys") else out[0] if isinstance(out, (tuple, list)) else out


def timed(fn, repeats: int, group=None) -> float:
    """Median ms of ``fn()``; with a group, every rank starts each call together."""
    import torch.distributed as dist

    with torch.inference_mode():
        for _ in range(2):
            fn()
        times = []
        for _ in range(repeats):
            if group is not None:
                dist.barrier(group)
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def traced(spec):
    import fxopt
    from fxopt.passes import PassManager

    graph = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, name=spec.name)
    return PassManager(BASE).run(graph).graph


def whole(graph, pipeline: str):
    """The model in one process: the traced graph through the passes each rank
    runs after its split, so that both sides of a ratio ran the same pipeline."""
    from fxopt.passes import PassManager

    return PassManager(pipeline).run(graph).graph if pipeline else graph


# -- rank processes ---------------------------------------------------------------------
def tensor_parallel_rank(mesh, name: str, pipeline: str, repeats: int, backends=BACKENDS, embeddings: str = "vocab") -> dict:
    """This rank's graph at N=2 on both backends, the all-reduce alone, and the DTensor peer."""
    import torch.distributed as dist

    import fxopt
    from fxopt.parallel import all_reduce_count, bind_process_group, rank_graph

    spec = model_spec(name)
    base = traced(spec)
    graph = bind_process_group(rank_graph(base, mesh.tp_rank, mesh.tensor_parallel, pipeline=pipeline,
                                          embeddings=embeddings), mesh.tp_group)
    out = {"param_bytes": graph.param_bytes(), "all_reduces": all_reduce_count(graph), "rows": {}, "transport": mesh.transport,
           "turns": {}}
    # The split is checked against the same pipeline in one process (eager): a quantizing
    # pipeline's own error is the one-process rows' to show.
    one_process = whole(base, pipeline)
    with torch.no_grad():
        expected = {seq: logits(fxopt.compile(one_process, "eager")(input_ids=token_ids(spec.model, seq)))
                    for seq in SHAPES.values()}
    if mesh.rank != 0:  # only rank 0 times the model in one process
        one_process = None
    for backend in backends:
        options = backend_options(backend, 1)
        model = fxopt.compile(graph, backend, **options)
        for shape, seq in SHAPES.items():
            ids = token_ids(spec.model, seq)
            with torch.no_grad():
                err = (logits(model(input_ids=ids)) - expected[seq]).abs().max().item()
            out["rows"][(f"fxopt {backend}, tensor-parallel", shape)] = (timed(lambda: model(input_ids=ids), repeats, mesh.tp_group), err)
        single = fxopt.compile(one_process, backend, **options) if mesh.rank == 0 else None
        ids = token_ids(spec.model, 1)
        out["turns"][backend] = in_turns(mesh, lambda: single(input_ids=ids), lambda: model(input_ids=ids), repeats)
    hidden = hidden_size(spec.model)
    for shape, seq in SHAPES.items():
        x = torch.randn(seq * hidden)
        out[("all_reduce", shape)] = timed(lambda: dist.all_reduce(x, group=mesh.tp_group), max(repeats * 5, 50), mesh.tp_group)
    out["dtensor"] = dtensor_peer(mesh, name, repeats)
    return out


def in_turns(mesh, one_process, split, repeats: int, rounds: int = 3) -> tuple[float, float]:
    """Median ms of ``one_process()`` on rank 0 (the other rank waiting in a
    gloo barrier, which sleeps) and of ``split()`` on both ranks, timed in
    turns ``rounds`` times, so that a CPU whose speed drifts during the run
    gives both the same conditions."""
    import torch.distributed as dist

    alone, together = [], []
    with torch.inference_mode():
        if mesh.rank == 0:
            one_process()
        for _ in range(rounds):
            dist.barrier()  # the default group: gloo
            if mesh.rank == 0:
                alone.append(timed(one_process, repeats))
            dist.barrier()
            together.append(timed(split, repeats, mesh.tp_group))
    return (statistics.median(alone) if alone else float("nan"), statistics.median(together))


def linear_gpt2(model, world_size: int):
    """GPT-2 ``model`` (changed in place) made shardable by ColwiseParallel /
    RowwiseParallel, as a DTensor user does by hand: each Conv1D becomes the
    ``nn.Linear`` with its transposed weight; ``c_attn``'s output rows are
    ordered so that each of the ``world_size`` contiguous blocks a column
    split gives holds one rank's heads of Q, then K, then V; and each
    attention splits its ``c_attn`` output in one rank's share
    (``split_size``; the heads of a view are counted from the width).
    Returns ``model``; a model without Conv1D is returned as it is."""
    from transformers.pytorch_utils import Conv1D

    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None or not any(isinstance(m, Conv1D) for m in model.modules()):
        return model
    for block in blocks:
        attn = block.attn
        width = attn.embed_dim
        if getattr(attn, "is_cross_attention", False):
            raise ValueError("cross-attention GPT-2 (c_attn holds K and V only, q_attn Q) is not prepared")
        if attn.num_heads % world_size:
            raise ValueError(f"{attn.num_heads} heads do not split over {world_size} ranks")
        for parent, name in ((attn, "c_attn"), (attn, "c_proj"), (block.mlp, "c_fc"), (block.mlp, "c_proj")):
            conv = getattr(parent, name)
            linear = torch.nn.Linear(*conv.weight.shape, dtype=conv.weight.dtype, device=conv.weight.device)
            with torch.no_grad():
                linear.weight.copy_(conv.weight.t())
                linear.bias.copy_(conv.bias)
            setattr(parent, name, linear)
        share = width // world_size
        order = torch.cat([torch.arange(part * width + rank * share, part * width + (rank + 1) * share)
                           for rank in range(world_size) for part in range(3)])
        with torch.no_grad():
            attn.c_attn.weight.copy_(attn.c_attn.weight[order])
            attn.c_attn.bias.copy_(attn.c_attn.bias[order])
        attn.split_size = share
    return model


def dtensor_plan(model) -> dict:
    """ColwiseParallel / RowwiseParallel by module name, Megatron's layout: the
    Q/K/V (GPT-2's ``c_attn``), gate/up and first MLP linears by output
    channel, the attention output and down projections by input channel.
    Raises ValueError where those linears are not ``nn.Linear`` (GPT-2's
    Conv1D before :func:`linear_gpt2`)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "c_attn", "c_fc", "c_proj", "o_proj",
                    "down_proj") and not isinstance(module, torch.nn.Linear):
            raise ValueError(f"{type(model).__name__}.{name} is {type(module).__name__}, not nn.Linear: "
                             "ColwiseParallel / RowwiseParallel shard nn.Linear and nn.Embedding only")
        if leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "c_attn", "c_fc"):
            plan[name] = ColwiseParallel()
        elif leaf in ("o_proj", "down_proj", "c_proj"):
            plan[name] = RowwiseParallel()
    if not plan:
        raise ValueError(f"no Q/K/V, gate/up, output or down projections found in {type(model).__name__}")
    return plan


def dtensor_peer(mesh, name: str, repeats: int) -> dict:
    """PyTorch DTensor ``parallelize_module`` on the Hugging Face model."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.parallel import parallelize_module

    spec = model_spec(name)
    reference = {shape: logits(spec.model(input_ids=token_ids(spec.model, seq))).detach() for shape, seq in SHAPES.items()}
    try:
        prepared = linear_gpt2(spec.model, mesh.tp_group.size())
        plan = dtensor_plan(prepared)
    except ValueError as e:
        return {"not_run": str(e)}
    device_mesh = DeviceMesh.from_group(mesh.tp_group, "cpu")
    model = parallelize_module(prepared, device_mesh, plan)
    rows = {}
    for shape, seq in SHAPES.items():
        ids = token_ids(spec.model, seq)
        with torch.no_grad():
            err = (logits(model(input_ids=ids)) - reference[shape]).abs().max().item()
        rows[shape] = (timed(lambda: model(input_ids=ids), repeats, mesh.tp_group), err)
    return rows


ROUNDS = 3  # each data-parallel stream (and the one-process stream it is against): the median of this many
DP_MODES = {"all": "every output to every rank", 0: "every output to rank 0", "none": "each rank keeps its own"}


def data_parallel_rank(mesh, name: str, backend: str, requests: int, seq: int, pipeline: str = AFTER_SPLIT) -> dict:
    """Requests through this rank's replica, once per ``DataParallel.map``
    destination (``DP_MODES``) after one warm-up pass; the stream's time on
    the slowest rank."""
    import torch.distributed as dist

    import fxopt
    from fxopt.data_parallel import DataParallel

    spec = model_spec(name)
    model = fxopt.compile(whole(traced(spec), pipeline), backend, **backend_options(backend, 1))
    stream = [{"input_ids": token_ids(spec.model, seq + i % 2)} for i in range(requests)]
    dp = DataParallel(model, mesh.dp_group)
    if dp.size != 2:
        raise RuntimeError(f"data-parallel group of {dp.size} ranks, expected 2 replicas")
    # warm-up: the whole stream once, so the buffers each rank keeps between exchanges (and the
    # shared-memory group's mapping) exist, as in a server's steady state
    dp.map(stream, to="all")
    out = {"transport": mesh.dp_transport}
    for to in DP_MODES:
        times = []
        for _ in range(ROUNDS):
            dist.barrier()
            start = time.perf_counter()
            outputs = dp.map(stream, to=to)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        with torch.no_grad():
            err = max((logits(o) - logits(spec.model(**r))).abs().max().item()
                      for o, r in zip(outputs, stream) if o is not None)
        out[to] = {"seconds": seconds, "err": err, "received": sum(o is not None for o in outputs)}
        del outputs
    return out


# -- one process ---------------------------------------------------------------------------
def single_process(name: str, repeats: int, requests: int, seq: int, backends=BACKENDS, pipeline: str = AFTER_SPLIT) -> dict:
    import fxopt
    from fxopt.parallel import rank_graph

    spec = model_spec(name)
    graph = traced(spec)
    from common import read_gbs

    one_process = whole(graph, pipeline)
    out = {"model_bytes": one_process.param_bytes(), "rows": {}, "hidden": hidden_size(spec.model), "layers": layers(spec.model),
           "bandwidth": {t: read_gbs(t) for t in (1, 2)}}
    # bytes per rank of both token-table settings (the timed split uses --embeddings)
    out["rank_bytes"] = {e: max(rank_graph(graph, r, 2, pipeline=pipeline, embeddings=e).param_bytes() for r in range(2))
                         for e in ("replicated", "vocab")}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out["rows"][("Hugging Face eager, one process", threads)] = {
            shape: (timed(lambda: spec.model(input_ids=token_ids(spec.model, seq_)), repeats), 0.0)
            for shape, seq_ in SHAPES.items()}
        for backend in backends:
            model = fxopt.compile(one_process, backend, **backend_options(backend, threads))
            rows = {}
            for shape, seq_ in SHAPES.items():
                ids = token_ids(spec.model, seq_)
                with torch.no_grad():
                    err = (logits(model(input_ids=ids)) - logits(spec.model(input_ids=ids))).abs().max().item()
                rows[shape] = (timed(lambda: model(input_ids=ids), repeats), err)
            out["rows"][(f"fxopt {backend}, one process", threads)] = rows
            if threads == 1:
                stream = [{"input_ids": token_ids(spec.model, seq + i % 2)} for i in range(requests)]
                model(**stream[0])
                times = []
                for _ in range(ROUNDS):
                    start = time.perf_counter()
                    with torch.inference_mode():
                        outputs = [model(**r) for r in stream]  # kept, as DataParallel.map keeps them
                    times.append(time.perf_counter() - start)
                    del outputs
                out[("stream", backend)] = statistics.median(times)
    torch.set_num_threads(1)
    return out


def report(name: str, one: dict, tps: dict[str, list[dict]], dp: dict, requests: int, seq: int, backends=BACKENDS,
           embeddings: str = "vocab") -> str:
    """``tps``: each transport's tensor-parallel ranks' results."""
    tp = next(iter(tps.values()))
    rank0 = tp[0]
    model = one["model_bytes"]
    other = {"vocab": "replicated", "replicated": "vocab"}[embeddings]
    lines = [f"Parameter bytes per rank at N=2 (`embeddings={embeddings}`, timed below): {max(r['param_bytes'] for r in tp) / 1e6:.1f} MB "
             f"of {model / 1e6:.1f} MB ({max(r['param_bytes'] for r in tp) / model:.3f} of the model; goal <= 0.55); "
             f"with `embeddings={other}`: {one['rank_bytes'][other] / model:.3f}. "
             f"All-reduces per forward: {rank0['all_reduces']}.", "",
             "| variant | processes x threads | one-token ms | prefill-128 ms | max abs err (one-token, prefill) |",
             "|---|---|---|---|---|"]

    def row(label, procs, cells):
        ms = " | ".join(f"{cells[s][0]:.2f}" for s in SHAPES)
        errs = ", ".join(f"{cells[s][1]:.1e}" for s in SHAPES)
        lines.append(f"| {label} | {procs} | {ms} | {errs} |")

    for (label, threads), cells in one["rows"].items():
        row(label, f"1 x {threads}", cells)
    for tp in tps.values():
        for backend in backends:
            label = f"fxopt {backend}, tensor-parallel"
            # a forward takes as long as its slowest rank
            cells = {s: (max(r["rows"][(label, s)][0] for r in tp), max(r["rows"][(label, s)][1] for r in tp)) for s in SHAPES}
            row(f"{label} N=2, {tp[0]['transport']}", "2 x 1", cells)
    for tp in tps.values():
        peer = tp[0]["dtensor"]
        label = f"DTensor parallelize_module (Hugging Face eager) N=2, {tp[0]['transport']}"
        if "not_run" in peer:
            lines.append(f"| {label} | 2 x 1 | not run | not run | {peer['not_run']} |")
        else:
            row(label, "2 x 1", {s: (max(r["dtensor"][s][0] for r in tp), max(r["dtensor"][s][1] for r in tp)) for s in SHAPES})
    lines.append("")
    for tp in tps.values():
        for backend in backends:
            base = one["rows"][(f"fxopt {backend}, one process", 1)]
            cells = {s: max(r["rows"][(f"fxopt {backend}, tensor-parallel", s)][0] for r in tp) for s in SHAPES}
            lines.append(f"- fxopt {backend}, {tp[0]['transport']}: tensor-parallel N=2 / one process 1 thread: "
                         + ", ".join(f"{s} {cells[s] / base[s][0]:.2f}" for s in SHAPES) + " (goal one-token <= 0.65)")
    lines += ["", "One token in turns (one process with one thread on rank 0's core while the other rank sleeps, then "
              "the split; 3 rounds, median; a forward takes as long as its slowest rank):", ""]
    for tp in tps.values():
        for backend in backends:
            alone = tp[0]["turns"][backend][0]
            split = max(r["turns"][backend][1] for r in tp)
            lines.append(f"- fxopt {backend}, {tp[0]['transport']}: one process {alone:.2f} ms, tensor-parallel N=2 "
                         f"{split:.2f} ms: {split / alone:.2f} (goal <= 0.65)")
    bw = one["bandwidth"]
    lines += ["", f"Memory: reading 256 MiB (a sum) runs at {bw[1]:.1f} GB/s on one thread and {bw[2]:.1f} GB/s on two "
              f"({bw[2] / bw[1]:.2f}x). A one-token forward streams its weights: one that streams them at one core's full "
              f"rate in one process falls to no less than {bw[1] / bw[2]:.2f} of its time when two ranks each read half "
              "and share the memory, before any all-reduce, whatever the transport."]
    lines += ["", "All-reduce alone (2 ranks of one host; median per call, times the all-reduces per forward):", ""]
    hidden, count = one["hidden"], rank0["all_reduces"]
    for tp in tps.values():
        for s, seq_ in SHAPES.items():
            per = max(r[("all_reduce", s)] for r in tp)
            lines.append(f"- {tp[0]['transport']}, {s}: {seq_ * hidden} floats ({seq_ * hidden * 4 / 1024:.1f} KiB) in "
                         f"{per:.3f} ms per all-reduce, x {count} = {per * count:.2f} ms per forward")
    per_layer = count / one["layers"]
    payload = per_layer * hidden * 4
    lines += ["", f"On paper at 8 ranks: {per_layer:g} all-reduce(s) of {hidden} floats per layer per token = "
              f"{payload / 1024:.1f} KiB of payload; a ring all-reduce sends 2 x 7/8 of it from each rank: "
              f"{2 * 7 / 8 * payload / 1024:.1f} KiB per rank per layer per token "
              f"({2 * 7 / 8 * payload * one['layers'] / 1024:.0f} KiB per token over {one['layers']} layers).", ""]
    lines += [f"Data parallel: {requests} requests of {seq}-{seq + 1} tokens (each output the logits of every position), "
              f"2 ranks x 1 thread against one process x 1 thread, after one warm-up pass of the stream; median of {ROUNDS} passes (goal >= 1.8x):", "",
              "| backend | data-parallel group | outputs (`DataParallel.map(to=...)`) | one process requests/s | 2 ranks requests/s "
              "| ratio | max abs err |",
              "|---|---|---|---:|---:|---:|---:|"]
    for (_, backend), ranks in dp.items():
        single = one[("stream", backend)]
        for to, label in DP_MODES.items():
            seconds = max(p[to]["seconds"] for p in ranks)  # the stream ends with its slowest rank
            lines.append(f"| {backend} | {ranks[0]['transport']} | {label} (`{to!r}`) | {requests / single:.1f} | "
                         f"{requests / seconds:.1f} | {single / seconds:.2f}x | {max(p[to]['err'] for p in ranks):.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from common import captured, write_result
    from fxopt.launch import run_local

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="gpt2,llama")
    p.add_argument("--pipeline", default=AFTER_SPLIT, help="passes after the tensor-parallel split, on every rank")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--requests", type=int, default=32, help="requests in the data-parallel stream")
    p.add_argument("--seq", type=int, default=64, help="tokens per request of the stream")
    p.add_argument("--timeout", type=float, default=300.0, help="timeout per collective, seconds")
    p.add_argument("--transports", default=",".join(TRANSPORTS),
                   help="what the tensor- and data-parallel groups run on: shm (fxopt's shared-memory group), gloo, or both")
    p.add_argument("--backends", default=",".join(BACKENDS), help="fxopt backends to time (eager, onnxruntime or both)")
    p.add_argument("--embeddings", default="vocab", choices=("vocab", "replicated"),
                   help="the token table in the timed split: vocabulary-parallel (one more all-reduce) or replicated")
    a = p.parse_args(argv)
    backends = tuple(b for b in a.backends.split(",") if b)
    if not backends or set(backends) - set(BACKENDS):
        p.error(f"--backends takes {', '.join(BACKENDS)} (comma-separated), got {a.backends!r}")
    transports = tuple(t for t in a.transports.split(",") if t)
    if not transports or set(transports) - set(TRANSPORTS):
        p.error(f"--transports takes {', '.join(TRANSPORTS)} (comma-separated), got {a.transports!r}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for name in a.models.split(","):
        with captured() as out:
            print(f"{name}: measuring ...", file=sys.stderr)
            one = single_process(name, a.repeats, a.requests, a.seq, backends, a.pipeline)
            tps = {t: run_local(tensor_parallel_rank, 2, name, a.pipeline, a.repeats, backends, a.embeddings,
                                timeout=a.timeout, wall=3600, transport=t)
                   for t in transports}
            # tensor_parallel=1: two replicas (run_local's default makes every rank one tensor-parallel shard)
            dp = {(t, backend): run_local(data_parallel_rank, 2, name, backend, a.requests, a.seq, a.pipeline, tensor_parallel=1,
                                          timeout=a.timeout, wall=3600, transport=t)
                  for t in transports for backend in backends}
            print(report(name, one, tps, dp, a.requests, a.seq, backends, a.embeddings))
        # so that a run with another pipeline leaves the default pipeline's numbers in place
        section = name if a.pipeline == AFTER_SPLIT else f"{name}, {a.pipeline}"
        write_result("parallel", "Tensor and data parallelism (processes of one host)", out.text,
                     section=section, intro=__doc__.split("\n\n")[2].replace("\n", " "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
