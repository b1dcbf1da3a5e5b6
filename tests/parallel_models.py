"""A small model and its tensor-parallel rank modules written by hand with
``torch.distributed._functional_collectives`` (the collectives torch.export
traces), and the per-rank checks of tests/test_parallel_runtime.py (run in
spawned processes, so they live in an importable module)."""

from __future__ import annotations

import functools
import time

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch.export import Dim

VOCAB, HIDDEN, FFN, LAYERS = 24, 16, 32, 2


class Tiny(torch.nn.Module):
    """Embedding, residual GELU MLP blocks and an LM head."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=g))
        self.w1 = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(FFN, HIDDEN, generator=g) * 0.3) for _ in range(LAYERS)])
        self.b1 = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(FFN, generator=g) * 0.1) for _ in range(LAYERS)])
        self.w2 = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(HIDDEN, FFN, generator=g) * 0.3) for _ in range(LAYERS)])
        self.head = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=g))

    def forward(self, ids):
        x = F.embedding(ids, self.emb)
        for w1, b1, w2 in zip(self.w1, self.b1, self.w2):
            x = x + F.linear(F.gelu(F.linear(x, w1, b1)), w2)
        return F.linear(x, self.head)


class TinyRank(torch.nn.Module):
    """Rank ``rank`` of ``n`` of :class:`Tiny`, Megatron style: the first MLP
    linear split by output channel, the second by input channel and summed
    with an all-reduce, the LM head split by vocabulary and all-gathered."""

    def __init__(self, full: Tiny, rank: int, n: int, group: str):
        super().__init__()
        shard = lambda t, dim: torch.nn.Parameter(t.detach().chunk(n, dim)[rank].clone())  # noqa: E731
        self.group = group
        self.emb = torch.nn.Parameter(full.emb.detach().clone())
        self.w1 = torch.nn.ParameterList([shard(w, 0) for w in full.w1])
        self.b1 = torch.nn.ParameterList([shard(b, 0) for b in full.b1])
        self.w2 = torch.nn.ParameterList([shard(w, 1) for w in full.w2])
        self.head = shard(full.head, 0)

    def forward(self, ids):
        x = F.embedding(ids, self.emb)
        for w1, b1, w2 in zip(self.w1, self.b1, self.w2):
            x = x + funcol.all_reduce(F.linear(F.gelu(F.linear(x, w1, b1)), w2), "sum", self.group)
        logits = F.linear(x, self.head)  # [B, S, VOCAB / n]
        gathered = funcol.all_gather_single(logits.permute(2, 0, 1).contiguous(), 0, self.group)
        return gathered.permute(1, 2, 0)


DYNAMIC = ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},)


def ids(batch: int = 3, seq: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def reference(inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return Tiny().eval()(inputs)


def rank_graph(mesh):
    """This rank's graph of :class:`TinyRank`, traced by fxopt, with its
    collectives on the unbound group name ``"tp"``, then bound to the
    mesh's tensor-parallel group."""
    import fxopt
    from fxopt.parallel import bind_process_group

    module = TinyRank(Tiny(), mesh.tp_rank, mesh.tensor_parallel, mesh.tp_group.group_name).eval()
    graph = fxopt.trace(module, (ids(),), dynamic_shapes=DYNAMIC, name="tiny-rank")
    for node in graph.fx.nodes:  # traced with the real group's name; a pass writes "tp"
        if node.op == "call_function" and node.target.namespace == "_c10d_functional" and len(node.args) > 2:
            node.args = (*node.args[:2], "tp")
    graph.recompile()
    return bind_process_group(graph, mesh.tp_group)


def max_err(a, b) -> float:
    """Max abs error relative to the reference's largest magnitude."""
    return ((a - b).abs().max() / b.abs().max()).item()


# -- per-rank checks -------------------------------------------------------------
def check_onnxruntime_rank(mesh):
    """The ONNX Runtime rank model against the single-process model and the
    eager rank graph, on two shapes; its cut."""
    import fxopt

    graph = rank_graph(mesh)
    model = fxopt.compile(graph, "onnxruntime", intra_op_threads=1)
    errs = {}
    for shape in ((3, 5), (2, 7)):
        x = ids(*shape)
        errs[shape] = (max_err(model(x), reference(x)), max_err(graph.module(x), reference(x)))
    return {"errors": errs, "segments": model.num_segments,
            "collectives": [c.kind.name() for s in model.segments for c in s.collectives],
            "in_place": [c.in_place for s in model.segments for c in s.collectives]}


def check_data_parallel(mesh):
    """A replica per rank: an uneven batch and a stream of requests of
    different lengths, gathered in order, on gloo and (where it runs) on the
    shared-memory group. The replicas are all the ranks (the group the
    processes started as is one tensor-parallel group, on shared memory)."""
    groups = {"gloo": dist.group.WORLD}
    if mesh.transport == "fxopt_shm":  # x86-64, one shared-memory folder
        groups["shm"] = mesh.tp_group
    return {name: _data_parallel_on(mesh, group) for name, group in groups.items()}


def _data_parallel_on(mesh, group):
    import fxopt
    from fxopt.data_parallel import DataParallel

    graph = fxopt.trace(Tiny(), (ids(),), dynamic_shapes=DYNAMIC, name="tiny")
    dp = DataParallel(fxopt.compile(graph, "onnxruntime", intra_op_threads=1), group)
    assert dp.size == mesh.world_size == 2, (dp.size, mesh.world_size)
    batch = ids(5, 6)
    requests = [(ids(2, s, seed=s),) for s in (3, 4, 5)]
    stream = dp.map(requests)
    errors = lambda outs: [None if out is None else max_err(out, reference(r[0])) for out, r in zip(outs, requests)]  # noqa: E731
    # later exchanges reuse each rank's kept buffers: the outputs already returned stay as they were
    longer = [(ids(2, s, seed=s),) for s in (9, 8, 7)]
    kept = dp.map(longer)
    kept_copy = [out.clone() for out in kept]
    to_rank_0 = dp.map(requests, to=0)
    dp.map(longer[::-1])

    def mixed(x):  # outputs of several dtypes and sizes (packed into one buffer) and a plain value
        return {"half": x[..., :3].half() / 7, "sum": x.sum(-1), "big": x > 5, "length": x.shape[-1], "none": None}

    packed = DataParallel(mixed, group).map([ids(2, s, seed=s) for s in (3, 4, 5, 6, 7)])
    want = [mixed(ids(2, s, seed=s)) for s in (3, 4, 5, 6, 7)]
    return {"batch": max_err(dp(batch), reference(batch)),
            "stream": errors(stream), "to_rank_0": errors(to_rank_0), "none": errors(dp.map(requests, to="none")),
            "kept": (all(torch.equal(a, b) for a, b in zip(kept, kept_copy)), [max_err(o, reference(r[0])) for o, r in zip(kept, longer)]),
            "mixed": [all(torch.equal(o[k], w[k]) and o[k].dtype == w[k].dtype for k in ("half", "sum", "big"))
                      and (o["length"], o["none"]) == (w["length"], None) for o, w in zip(packed, want)],
            "small_batch": max_err(dp(ids(1, 4)), reference(ids(1, 4)))}


def check_mesh(mesh):
    """Data parallel over tensor-parallel ONNX Runtime rank models."""
    import fxopt
    from fxopt.data_parallel import DataParallel

    model = fxopt.compile(rank_graph(mesh), "onnxruntime", intra_op_threads=1)
    dp = DataParallel(model, mesh.dp_group)
    batch = ids(3, 4)
    requests = [ids(2, s) for s in (3, 4, 5)]
    return {"err": max_err(dp(batch), reference(batch)), "tp_rank": mesh.tp_rank, "dp_rank": mesh.dp_rank,
            "transports": (mesh.transport, mesh.dp_transport),
            # every replica's tensor-parallel ranks send their part to the replica of dp rank 0
            "stream": [None if out is None else max_err(out, reference(r)) for out, r in zip(dp.map(requests, to=0), requests)]}


def check_dead_peer(mesh):
    """Rank 1 exits; rank 0 must fail in its first collective, not wait."""
    import os

    return _forward_without_rank_1(mesh, lambda: os._exit(3), settle=0.5)


def _forward_without_rank_1(mesh, rank_1_does, settle: float = 0.0):
    """Rank 0 runs the rank model while rank 1 does ``rank_1_does()``
    instead; how rank 0's forward ended and how long it took."""
    import fxopt

    model = fxopt.compile(rank_graph(mesh), "onnxruntime", intra_op_threads=1)
    dist.barrier()
    if mesh.rank == 1:
        rank_1_does()
        return {"error": None}
    time.sleep(settle)
    start = time.monotonic()
    try:
        model(ids())
    except Exception as e:  # noqa: BLE001 - the error is what is checked
        return {"error": type(e).__name__, "message": str(e), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def check_tensor_parallel_pass(mesh, names, **split_options):
    """The ``tensor-parallel`` pass's rank graphs of built-in decoders on ONNX
    Runtime against the whole model, on the traced inputs and on another shape."""
    import fxopt
    from fxopt.models import BUILTIN
    from fxopt.parallel import all_reduce_count, compile_tensor_parallel

    out = {}
    for name in names:
        spec, graph = traced_builtin(name)
        model = compile_tensor_parallel(graph, group=mesh.tp_group, backend="onnxruntime", intra_op_threads=1,
                                        split_options=split_options)
        errs = []
        for inputs in (spec.example_inputs, *spec.other_inputs):
            with torch.no_grad():
                errs.append(max_err(model(**inputs).logits, spec.model(**inputs).logits))
        out[name] = {"errors": errs, "segments": model.num_segments, "all_reduces": all_reduce_count(model.graph),
                     # what the session before the logits' all-gather (the LM head's) folds at load
                     "head_folded": next(s.folded for s in model.segments
                                         if any(c.kind.name().endswith("all_gather_into_tensor") for c in s.collectives))}
    return out


@functools.lru_cache(maxsize=None)
def traced_builtin(name: str):
    """A built-in model's spec and graph; a parent that calls this before
    ``run_local(..., start="fork")`` hands its ranks the trace."""
    import fxopt
    from fxopt.models import BUILTIN

    # 1023 tokens: an odd count, and each rank's half of the tied table too large for the
    # exporter's optimizer to fold its transpose (ONNX Runtime does, where the LM head reads it)
    factories = {**BUILTIN, "gpt2-tiny-odd-vocabulary": lambda: fxopt.models.gpt2("tiny", vocab_size=1023)}
    spec = factories[name]()
    return spec, fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, name=name)


TWO_RANK_MODELS = ["llama-tiny", "gpt2-tiny-odd-vocabulary"]


def prepare_ranks(names) -> None:
    """Trace the models every rank splits, once, in a parent that then forks the ranks."""
    for name in names:
        traced_builtin(name)


def check_two_ranks(mesh):
    """Everything the 2-rank tests read, from one start of the processes."""
    # GPT-2 with 1023 tokens: everything gpt2-tiny checks, plus the padded vocabulary shards
    return {"hand": check_onnxruntime_rank(mesh), "pass": check_tensor_parallel_pass(mesh, TWO_RANK_MODELS),
            "vocab": check_tensor_parallel_pass(mesh, ["gpt2-tiny-odd-vocabulary"], embeddings="vocab"),
            "data_parallel": check_data_parallel(mesh)}


def check_four_ranks(mesh):
    """Everything the 4-rank tests read, from one start of the processes:
    tensor parallel over all four (llama-tiny's 2 KV heads are replicated),
    then the same processes as a mesh of 2 data-parallel x 2 tensor-parallel."""
    from fxopt.launch import init

    out = {"pass": check_tensor_parallel_pass(mesh, ["llama-tiny"])}
    out["mesh"] = check_mesh(init(tensor_parallel=2, timeout=mesh.timeout_s))
    return out



# -- generation with the key/value cache split by heads ----------------------------------
GEN_PROMPTS = [[5, 9, 2, 7, 1, 3], [7, 8]]  # a left-padded batch of two
GEN_NEW_TOKENS = 64


def causal_lm(name: str):
    """Tiny Hugging Face decoders of random weights: GPT-2 (4 heads, merged
    c_attn), Llama (4 query heads, 2 KV heads), Cohere (as Llama, with
    rotary on interleaved channel pairs and a view of the attention's output),
    GPT-NeoX (each head's q, k and v rows together in one projection) and
    DeepSeek-V3 (latent attention: a rotary key part every head shares)."""
    import transformers as tf

    no_tokens = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    if name == "gpt-neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                      num_attention_heads=4, vocab_size=256, max_position_embeddings=128,
                                                      rotary_pct=0.25, **no_tokens)).eval()
    if name == "deepseek-v3":
        return tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=256, max_position_embeddings=128, moe_intermediate_size=32, n_routed_experts=8,
            num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=16,
            q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, **no_tokens)).eval()
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128,
                                                **no_tokens)).eval()
    if name == "cohere":
        return tf.CohereForCausalLM(tf.CohereConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                                    max_position_embeddings=128, **no_tokens)).eval()
    return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                              max_position_embeddings=128, **no_tokens)).eval()


def left_padded(prompts):
    length = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


# after the split: each rank's decode attention against its cache lowered to
# fxopt.attention_with_past (ONNX Runtime GroupQueryAttention) with its own head counts
FUSED_AFTER_SPLIT = "dce,constant-fold,cse,fuse-attention,merge-linears,pack-attention,fuse-linear-act,fuse-norm,dce"


@functools.lru_cache(maxsize=None)
def generation_baseline(name: str):
    """The model, its traced prefill/decode graphs, Hugging Face's greedy
    tokens and one process's: the same on every rank, so a parent computes it
    once before ``run_local(..., start="fork")``."""
    from fxopt.generation import compile_generator
    from fxopt.ir.decoder import trace_decoder

    model = causal_lm(name)
    graphs = trace_decoder(model)
    ids, mask = left_padded(GEN_PROMPTS)
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=GEN_NEW_TOKENS,
                            min_new_tokens=GEN_NEW_TOKENS, do_sample=False, pad_token_id=0)
    whole = compile_generator(graphs).generate(GEN_PROMPTS, max_new_tokens=GEN_NEW_TOKENS).sequences
    return graphs, hf.tolist(), whole.tolist()


def prepare_generation() -> None:
    """What every rank of :func:`check_generation` computes alike, done once
    in a parent that then forks the ranks: the baselines, and the fused
    pipeline's rewrite patterns (traced on first use, kept per process)."""
    from fxopt.generation import optimize_decoder

    for name in ("gpt2", "llama", "cohere", "gpt-neox", "deepseek-v3"):
        generation_baseline(name)
    optimize_decoder(generation_baseline("llama")[0], f"canonicalize,{FUSED_AFTER_SPLIT}")


def check_generation(mesh, backends={"gpt2": ("eager", "onnxruntime"), "llama": ("eager",), "cohere": ("fused-onnxruntime",),
                                      "gpt-neox": ("eager",), "deepseek-v3": ("onnxruntime",)}):
    """Greedy generation split over the group against one process and
    Hugging Face; the cache each rank holds. Llama and Cohere on ONNX
    Runtime through the fused pipeline after the split (its attention then
    runs as GroupQueryAttention against the rank's cache)."""
    from fxopt.generation import compile_generator
    from fxopt.parallel import all_reduce_count, compile_tensor_parallel_generator

    out = {}
    ids, mask = left_padded(GEN_PROMPTS)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    for name, on in backends.items():
        graphs, hf, whole = generation_baseline(name)
        split = None
        for variant in on:
            backend = variant.removeprefix("fused-")
            options = {"intra_op_threads": 1} if backend == "onnxruntime" else {}
            if variant != backend:  # the fused pipeline after the split
                gen = compile_tensor_parallel_generator(graphs, group=mesh.tp_group, backend=backend,
                                                        pipeline=FUSED_AFTER_SPLIT, **options)
            elif split is None:
                gen = compile_tensor_parallel_generator(graphs, group=mesh.tp_group, backend=backend, **options)
                split = gen.graphs
            else:  # the same bound rank graphs on another backend
                gen = compile_generator(split, None, backend, **options)
            sequences = gen.generate(GEN_PROMPTS, max_new_tokens=GEN_NEW_TOKENS).sequences
            present = gen.prefill_model(ids, mask, positions)[1:]
            out[f"{name}-{variant}"] = {
                # lists, not tensors: a tensor's memory would be shared with a process that exits
                "sequences": sequences.tolist(), "whole": whole, "hf": hf,
                "present_shapes": [tuple(t.shape) for t in present],
                "past_heads": [int(p.meta["val"].shape[1]) for p in gen.graphs.decode.placeholders()[3:]],
                "all_reduces": {kind: all_reduce_count(getattr(gen.graphs, kind)) for kind in ("prefill", "decode")},
                "segments": getattr(gen.decode_model, "num_segments", None)}
        if name == "llama":
            fused = None
            for backend in ("onnxruntime", "eager"):  # eager: the rank's cache in buffers grown in place
                if fused is None:
                    gen = compile_tensor_parallel_generator(graphs, group=mesh.tp_group, backend=backend,
                                                            pipeline=FUSED_AFTER_SPLIT, intra_op_threads=1)
                    fused = gen.graphs
                else:  # and its shards' linears on packed weights, beside the in-place all-reduces
                    gen = compile_generator(fused, None, backend, prepack="all")
                packed = [tuple(n.args[6:8]) for n in gen.graphs.decode.fx.nodes  # (num_heads, kv_num_heads)
                          if n.target == torch.ops.fxopt.attention_with_past.default]
                out[f"llama-fused-{backend}"] = {
                    "sequences": gen.generate(GEN_PROMPTS, max_new_tokens=GEN_NEW_TOKENS).sequences.tolist(),
                    "whole": whole, "hf": hf,
                    "present_shapes": [tuple(t.shape) for t in gen.prefill_model(ids, mask, positions)[1:]],
                    "past_heads": [int(p.meta["val"].shape[1]) for p in gen.graphs.decode.placeholders()[3:]],
                    "all_reduces": {kind: all_reduce_count(getattr(gen.graphs, kind)) for kind in ("prefill", "decode")},
                    "attention_with_past": packed, "segments": getattr(gen.decode_model, "num_segments", None),
                    "cache": gen.cache, "packed": len(getattr(gen.decode_model, "packed", None) or ())}
    return out


# -- the shared-memory process group ------------------------------------------------
def rank_input(rank: int, shape=(3, 5), dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """What rank ``rank`` contributes: every rank can compute every rank's."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100 + rank)).to(dtype)


def check_collectives(mesh):
    """Every collective of the tensor-parallel group against what the ranks'
    inputs give computed locally, in rank order; returns the mismatches."""
    g, r, n = mesh.tp_group, mesh.tp_rank, mesh.tensor_parallel
    everyone = lambda **kw: [rank_input(q, **kw) for q in range(n)]  # noqa: E731
    wrong = []

    def check(what, got, want, exact=n == 2):  # two ranks: a + b in either order is the same float
        tol = 1e-2 if got.dtype == torch.bfloat16 else 1e-5  # more than two ranks: the order of the sum may differ
        ok = torch.equal(got, want) if exact else torch.allclose(got, want, rtol=tol, atol=tol)
        if not ok:
            wrong.append(what)

    ops = {"sum": (dist.ReduceOp.SUM, lambda xs: functools.reduce(torch.add, xs)),
           "max": (dist.ReduceOp.MAX, lambda xs: torch.stack(xs).amax(0)),
           "min": (dist.ReduceOp.MIN, lambda xs: torch.stack(xs).amin(0)),
           "product": (dist.ReduceOp.PRODUCT, lambda xs: functools.reduce(torch.mul, xs))}
    if mesh.transport != "gloo":  # gloo has no AVG
        ops["avg"] = (dist.ReduceOp.AVG, lambda xs: functools.reduce(torch.add, xs) / n)
    from fxopt.backends.eager import InPlaceAllReduce

    for name, (op, local) in ops.items():
        x = rank_input(r)
        dist.all_reduce(x, op, group=g)
        check(f"all_reduce {name}", x, local(everyone()), exact=n == 2 and name != "avg")
        # the eager backend's all-reduce (the group's own in place, or on gloo the functional one), of a view
        x = rank_input(r, (5, 3)).t()
        with torch.inference_mode():
            got = InPlaceAllReduce(g.group_name, name)(x)
        check(f"eager backend's all_reduce {name}", got, local(everyone(shape=(5, 3))).t(), exact=n == 2 and name != "avg")
        check(f"eager backend's all_reduce {name} leaves its input", x, rank_input(r, (5, 3)).t())
    x = rank_input(r, dtype=torch.bfloat16)
    dist.all_reduce(x, group=g)
    check("all_reduce bfloat16", x, functools.reduce(torch.add, everyone(dtype=torch.bfloat16)))
    # in place through a transposed view, and on an inference tensor outside inference mode
    x = rank_input(r, (5, 3)).t()
    dist.all_reduce(x, group=g)
    check("all_reduce of a view", x, functools.reduce(torch.add, everyone(shape=(5, 3))).t())
    with torch.inference_mode():
        x = rank_input(r)
    dist.all_reduce(x, group=g)
    check("all_reduce of an inference tensor", x, functools.reduce(torch.add, everyone()))
    # sizes that outgrow the shared slots, then small ones again, alternating (two rounds in flight)
    for k, numel in enumerate([7, 1 << 20, 3, 3 << 19, 11, 5]):
        x = rank_input(r, (numel,), seed=k + 1)
        dist.all_reduce(x, group=g)
        check(f"all_reduce of {numel}", x, functools.reduce(torch.add, everyone(shape=(numel,), seed=k + 1)))
    outs = [torch.empty(3, 5) for _ in range(n)]
    dist.all_gather(outs, rank_input(r), group=g)
    check("all_gather", torch.stack(outs), torch.stack(everyone()))
    out = torch.empty(n * 3, 5)
    dist.all_gather_into_tensor(out, rank_input(r), group=g)
    check("all_gather_into_tensor", out, torch.cat(everyone()))
    got = funcol.wait_tensor(torch.ops._c10d_functional.all_gather_into_tensor(rank_input(r), n, g.group_name))
    check("functional all_gather_into_tensor", got, torch.cat(everyone()))
    got = funcol.wait_tensor(torch.ops._c10d_functional.all_reduce(rank_input(r), "sum", g.group_name))
    check("functional all_reduce", got, functools.reduce(torch.add, everyone()))
    x = rank_input(r, (12, 5))
    out = torch.empty(12 // n, 5)  # 12 rows: whole shares for 2, 3 or 4 ranks
    dist.reduce_scatter_tensor(out, x, group=g)
    check("reduce_scatter_tensor", out, functools.reduce(torch.add, everyone(shape=(12, 5))).chunk(n)[r])
    got = funcol.wait_tensor(torch.ops._c10d_functional.reduce_scatter_tensor(x, "sum", n, g.group_name))
    check("functional reduce_scatter_tensor", got, functools.reduce(torch.add, everyone(shape=(12, 5))).chunk(n)[r])
    x = rank_input(r)
    dist.broadcast(x, src=dist.get_global_rank(g, n - 1), group=g)
    check("broadcast", x, rank_input(n - 1))
    out = torch.empty(3, 5)
    pieces = [rank_input(n - 1, seed=10 + q) for q in range(n)] if r == n - 1 else None
    dist.scatter(out, pieces, src=dist.get_global_rank(g, n - 1), group=g)
    check("scatter", out, rank_input(n - 1, seed=10 + r))
    gathered = [torch.empty(3, 5) for _ in range(n)] if r == 0 else None
    dist.gather(rank_input(r), gathered, dst=dist.get_global_rank(g, 0), group=g)
    if r == 0:
        check("gather", torch.stack(gathered), torch.stack(everyone()))
    dist.barrier(group=g)
    return {"transport": mesh.transport, "wrong": wrong}


def tiny_logits(mesh):
    """The hand-written rank graph's logits on both backends, run on the mesh's
    group, and how often each backend went through torch.distributed's entry
    points into the group (``dist.all_reduce``, or the group's ``allreduce``
    that torch.distributed calls) rather than the group's own in-place
    all-reduce."""
    import fxopt
    from fxopt.shared_memory_group import SharedMemoryGroup

    graph = rank_graph(mesh)
    models = {"eager": fxopt.compile(graph, "eager"), "onnxruntime": fxopt.compile(graph, "onnxruntime", intra_op_threads=1)}
    report = {"transport": mesh.transport}
    all_reduce, allreduce = dist.all_reduce, SharedMemoryGroup.allreduce
    for backend, model in models.items():
        entries = []
        dist.all_reduce = lambda *args, **kwargs: (entries.append(1), all_reduce(*args, **kwargs))[1]
        SharedMemoryGroup.allreduce = lambda self, *args, **kwargs: (entries.append(1), allreduce(self, *args, **kwargs))[1]
        try:
            with torch.no_grad():  # numpy arrays: they travel to the parent by value
                report[backend] = model(ids()).numpy()
        finally:
            dist.all_reduce, SharedMemoryGroup.allreduce = all_reduce, allreduce
        # (gloo's own allreduce is not Python: on gloo only dist.all_reduce is counted)
        report[f"{backend} through torch.distributed"] = len(entries)
    return report


def refuse_point_to_point(mesh):
    try:
        dist.send(torch.ones(2), dst=dist.get_global_rank(mesh.tp_group, 1 - mesh.tp_rank), group=mesh.tp_group)
    except RuntimeError as e:
        return str(e)
    return None


def check_stuck_peer(mesh):
    """Rank 1 stops answering for longer than the timeout; rank 0 must give up."""
    return _forward_without_rank_1(mesh, lambda: time.sleep(8))


def stress_rounds(mesh, rounds: int = 40, numel: int = 1 << 16):
    """All-reduces with the last rank slow to read the slots (it sleeps
    between the exchange and its sum): the others run ahead and write the
    next round meanwhile, which two alternating rounds of slots must keep
    apart. Returns the rounds whose result was wrong."""
    from fxopt.shared_memory_group import SharedMemoryGroup

    g, r, n = mesh.tp_group, mesh.tp_rank, mesh.tensor_parallel
    if r == n - 1:
        exchange = SharedMemoryGroup._exchange

        def slow_reader(self, *args, **kwargs):
            parts = exchange(self, *args, **kwargs)
            time.sleep(0.003)
            return parts

        SharedMemoryGroup._exchange = slow_reader
    wrong = []
    for k in range(rounds):
        x = torch.full((numel,), float(k * 10 + r))
        dist.all_reduce(x, group=g)
        if not bool((x == float(sum(k * 10 + q for q in range(n)))).all()):
            wrong.append(k)
    return {"transport": mesh.transport, "wrong": wrong}


def mismatched_sizes(mesh):
    try:
        dist.all_reduce(torch.ones(3 + mesh.tp_rank), group=mesh.tp_group)
    except RuntimeError as e:
        return str(e)
    return None


def data_parallel_transports(mesh):
    """What ``init`` put the mesh's groups on, and a stream gathered to rank 0 over the data-parallel group."""
    from fxopt.data_parallel import DataParallel

    requests = [ids(2, s) for s in (3, 4, 5)]
    outs = DataParallel(reference, mesh.dp_group).map(requests, to=0)
    return {"transports": (mesh.transport, mesh.dp_transport), "dp_size": dist.get_world_size(mesh.dp_group),
            "stream": [None if out is None else max_err(out, reference(r)) for out, r in zip(outs, requests)]}
