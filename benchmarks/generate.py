"""Generation speed: prefill time and decode tokens/s through fxopt's prefill and
decode-step graphs, against Hugging Face ``generate`` and the peers that run an
ONNX model with a KV cache (onnxruntime-genai, optimum-onnx).

    python benchmarks/generate.py --models gpt2,llama-135m --contexts 128,512,1024 --batches 1,8 \\
        --max-batch-tokens 1024 --new-tokens 64 --threads 2 --optimum-python /tmp/optimum-venv/bin/python

(about 20 minutes on 2 idle cores, most of it building the variants; batch 8
runs at context 128 only: ``--max-batch-tokens 4096`` adds context 512, a few
minutes more.)

Variants, each at its best documented setup, all with ``--threads`` threads:

* ``hf-eager-fp32``: ``model.generate(do_sample=False)``, the reference for the
  ``agree`` column (fraction of greedy new tokens equal to it).
* ``fxopt-fp32-eager`` / ``fxopt-fp32-ort``: the fused pipeline (``FUSED``) on
  both graphs, on eager PyTorch / ONNX Runtime. Eager runs both graphs'
  linears on one oneDNN-packed copy of their weights
  (``compile_generator(..., prepack="all")``); ``fxopt-fp32-ort``'s decode
  session prepacks the weights it shares with the prefill (``prepack="decode"``).
* ``fxopt-int8-ort`` / ``fxopt-int4-ort``: the README's fused W8A8 and fused int4
  pipelines (``INT8``; ``INT4`` symmetric in groups of 64), LM head quantized too, on ONNX Runtime.
  fxopt keeps the cache as ``--cache`` says (default ``buffer``: preallocated,
  written in place by the decode step's attention, GroupQueryAttention on ONNX Runtime).
* ``ortgenai-fp32`` / ``ortgenai-int4``: onnxruntime-genai's model builder
  (``python -m onnxruntime_genai.models.builder -i CHECKPOINT -o OUT -p fp32|int4 -e cpu``)
  on the model saved with ``save_pretrained`` beside a word-level tokenizer, its
  special token ids set in the config, the generation config and the tokenizer
  (:func:`save_checkpoint`). The builder has Llama, not GPT-2.
* ``optimum-ort-fp32``: optimum-onnx's ``ORTModelForCausalLM`` (exported from the
  same checkpoint, with its KV cache) driven by its ``generate``. optimum-onnx
  requires transformers < 4.58 and fxopt's models run on transformers 5, so it
  runs in its own virtual environment (``--optimum-python``, see
  ``generate_optimum_peer.py``); without one the row says so.

Timing: every variant is built first; then for each (batch, context) every
variant runs in turns, ``--repeats`` times (default 3), each run after a
warm-up generate (a short prompt at the same batch), and a row is the median
run (optimum's peer runs once, in its own process): prefill is the time to the first new token, decode
the time of the other ``new_tokens - 1`` steps. ``tokens/s`` counts every
sequence of the batch. ``limit ms``: the time to stream the weights a step reads
(embedding tables that are only gathered from excluded) plus the KV cache at the
step's mean length once at the copy bandwidth measured at the start; ``x limit``
is the step's time over it. ``--max-batch-tokens`` skips batches whose prompt
tokens exceed it (their prefill dominates the run's time), and says so.
Goals (batch 1, context 512) are printed with met / not met.

Models: ``gpt2`` (GPT-2 small, 124M config) and ``llama-135m`` (a Llama shaped
like SmolLM2-135M), random weights; ``gpt2-tiny`` / ``llama-tiny`` for a quick check.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from generate_optimum_peer import FirstTokenTimer  # noqa: E402  (the peer script imports nothing from fxopt)

# The README's fused pipelines: pack-attention lowers a decode step's attention
# against the cache to GroupQueryAttention with a past.
FUSED = "canonicalize,dce,constant-fold,cse,fuse-attention,merge-linears,pack-attention,fuse-linear-act,fuse-norm,dce"
INT8 = ("canonicalize,dce,constant-fold,cse,fuse-attention,merge-linears,"
        "quantize(mode=dynamic,act_granularity=tensor,skip_lm_head=false),pack-attention,fuse-linear-act,fuse-norm,dce")
# Groups of 64 divide both models' widths (the Llama's hidden size 576 is not a
# multiple of 128); onnxruntime-genai's builder quantizes in blocks of 32.
# Symmetric (no zero points), as the builder's default: MatMulNBits' one-row
# kernel then skips the zero points' work.
INT4 = ("canonicalize,dce,constant-fold,cse,fuse-attention,merge-linears,"
        "quantize(bits=4,scheme=sym,group_size=64,skip_lm_head=false),pack-attention,fuse-linear-act,fuse-norm,dce")
FXOPT = {
    "fxopt-fp32-eager": (FUSED, "eager"),
    "fxopt-fp32-ort": (FUSED, "onnxruntime"),
    "fxopt-int8-ort": (INT8, "onnxruntime"),
    "fxopt-int4-ort": (INT4, "onnxruntime"),
}
# fp32 on ONNX Runtime: the decode step's session prepacks the weights it
# shares with the prefill (``prepack="decode"``: MLAS's packed GEMM, one packed
# copy of the weights beside the shared arrays); on eager both graphs' linears
# run on one oneDNN-packed copy (``prepack="all"``).
FXOPT_OPTIONS = {"fxopt-fp32-ort": {"prepack": "decode"}, "fxopt-fp32-eager": {"prepack": "all"}}
REFERENCE = "hf-eager-fp32"
VARIANTS = [REFERENCE, *FXOPT, "ortgenai-fp32", "ortgenai-int4", "optimum-ort-fp32"]
MODELS = {"gpt2": "gpt2", "gpt2-tiny": "gpt2-tiny", "llama-135m": "llama-135m", "llama-tiny": "llama-tiny"}
# model types onnxruntime-genai's model builder converts (of the ones built here)
BUILDER_TYPES = {"llama", "mistral", "qwen2", "phi3", "gemma"}
GOAL_BATCH, GOAL_CONTEXT = 1, 512
T0 = time.perf_counter()


# -- models and their sizes ---------------------------------------------------------------

def build_model(name: str):
    """A built-in causal LM (random weights) ready for ``generate``: the cache on,
    no special tokens, so every variant generates exactly the tokens asked for."""
    from fxopt.models import BUILTIN

    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}: {', '.join(MODELS)}")
    model = BUILTIN[MODELS[name]]().model.eval()
    model.config.use_cache = True
    model.generation_config.use_cache = True
    model.config.bos_token_id = model.config.eos_token_id = model.config.pad_token_id = None
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


def max_positions(model) -> int | None:
    cfg = model.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def prompt_length(model, context: int, new_tokens: int) -> int:
    """``context``, or the longest prompt that leaves room for ``new_tokens``
    within the model's positions (GPT-2 small has 1024)."""
    limit = max_positions(model)
    return context if limit is None else min(context, limit - new_tokens + 1)


def kv_bytes(model, batch: int, length: int, element_size: int = 4) -> int:
    """Bytes of the key/value cache of ``batch`` sequences of ``length`` positions."""
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return 2 * layers * batch * kv_heads * length * head_dim * element_size


def module_streamed_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters one decode step reads: every storage except
    embedding tables that are only gathered from (a tied table is read whole by
    the LM head, so it counts once)."""
    owners: dict[int, tuple[int, set]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            storage = p.untyped_storage()
            size, kinds = owners.setdefault(storage.data_ptr(), (storage.nbytes(), set()))
            kinds.add(isinstance(module, torch.nn.Embedding))
    return sum(size for size, kinds in owners.values() if kinds != {True})


def _gathers_from(node) -> bool:
    return "embedding" in str(node.target) and node.args and node.args[0] is not None


def graph_streamed_bytes(graph) -> int:
    """:func:`module_streamed_bytes` for an fxopt graph: the storages behind its
    constants, without those only an embedding lookup reads."""
    seen: dict[int, int] = {}
    for n in graph.fx.nodes:
        t = graph.constant(n)
        if t is None or (n.users and all(_gathers_from(u) for u in n.users)):
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(seen.values())


def onnx_streamed_bytes(path: str | Path) -> int:
    """:func:`module_streamed_bytes` for an ONNX model (external data included):
    its initializers, without those only ``Gather`` / ``GatherBlockQuantized``
    read as their table."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    gathered, read = set(), set()
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if node.op_type in ("Gather", "GatherBlockQuantized") and not (node.op_type == "Gather" and i == 1) \
                    and not (node.op_type == "GatherBlockQuantized" and i == 1):
                gathered.add(name)
            else:
                read.add(name)
    total = 0
    for init in model.graph.initializer:
        if init.name in gathered and init.name not in read:
            continue
        if init.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in init.external_data if e.key == "length"), 0))
        else:
            total += len(init.raw_data) if init.raw_data else onnx.numpy_helper.to_array(init).nbytes
    return total


# -- the peers' preparation -----------------------------------------------------------------

def special_token_ids(vocab_size: int) -> dict[str, int]:
    """The ids written into a saved checkpoint: tools that read one need an EOS.
    The runs never stop early (fixed token counts on every side)."""
    return {"bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": 0}


def word_level_tokenizer(vocab_size: int):
    """A tokenizer with one word per id (``w0`` ... ``w{V-1}``), split on
    whitespace; its BOS / EOS / PAD are :func:`special_token_ids`' ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = WhitespaceSplit()
    ids = special_token_ids(vocab_size)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token=f"w{ids['bos_token_id']}",
                                   eos_token=f"w{ids['eos_token_id']}", pad_token=f"w{ids['pad_token_id']}")


def save_checkpoint(model, folder: Path) -> Path:
    """``model`` as a Hugging Face checkpoint folder the peers' exporters read:
    ``save_pretrained`` output with BOS / EOS / PAD set in the config and the
    generation config, and a word-level tokenizer (``tokenizer.json`` +
    ``tokenizer_config.json``) with the same ids. ``model`` is left as it was.
    ``rope_theta`` is also written at the top level of ``config.json`` for
    readers older than transformers 5 (which keeps it in ``rope_parameters``)."""
    folder = Path(folder)
    ids = special_token_ids(model.config.vocab_size)
    saved = {k: getattr(model.config, k, None) for k in ids}
    saved_gen = {k: getattr(model.generation_config, k, None) for k in ids}
    try:
        for k, v in ids.items():
            setattr(model.config, k, v)
            setattr(model.generation_config, k, v)
        model.save_pretrained(folder)
    finally:
        for k, v in saved.items():
            setattr(model.config, k, v)
        for k, v in saved_gen.items():
            setattr(model.generation_config, k, v)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
    config.update(ids)
    config_path.write_text(json.dumps(config, indent=2))
    word_level_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


def builder_command(checkpoint: Path, out: Path, precision: str, cache: Path) -> list[str]:
    """onnxruntime-genai's documented model-builder invocation for a local checkpoint on CPU."""
    return [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
            "-p", precision, "-e", "cpu", "-c", str(cache)]


def build_ortgenai(model, checkpoint: Path, precision: str, work: Path, threads: int):
    """An ``onnxruntime_genai.Model`` built from ``checkpoint`` at ``precision``
    (fp32 / int4: MatMulNBits, block 32, int8 activations: the builder's CPU
    defaults), its session on ``threads`` threads. Returns (model, onnx path)."""
    import onnxruntime_genai as og

    if model.config.model_type not in BUILDER_TYPES:
        raise PeerUnavailable(f"onnxruntime-genai's model builder has no {model.config.model_type} "
                              f"(it converts {', '.join(sorted(BUILDER_TYPES))}, ...)")
    out = work / f"genai-{precision}"
    if not (out / "genai_config.json").exists():
        done = subprocess.run(builder_command(checkpoint, out, precision, work / "builder-cache"), capture_output=True, text=True)
        if done.returncode:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise PeerUnavailable(f"model builder failed: {lines[-1] if lines else done.returncode}")
    set_genai_threads(out / "genai_config.json", threads)
    return og.Model(str(out)), out / json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["filename"]


def set_genai_threads(config_path: Path, threads: int) -> None:
    """Writes ``threads`` as the decoder session's intra-op thread count in a
    ``genai_config.json``."""
    cfg = json.loads(config_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    opts["inter_op_num_threads"] = 1
    config_path.write_text(json.dumps(cfg, indent=2))


class PeerUnavailable(RuntimeError):
    """A peer that cannot run here; the message says why and becomes the row's note."""


def describe(e: Exception) -> str:
    """A row's note for a variant that failed: the reason a peer gave, or the
    error's type and first line."""
    lines = str(e).strip().splitlines()
    first = (lines[0] if lines else "")[:300].replace("|", "/")
    return first if isinstance(e, PeerUnavailable) else f"{type(e).__name__}: {first}"


def optimum_unavailable(optimum_python: str | None) -> str | None:
    """Why the optimum-onnx peer cannot run (None: it can)."""
    import transformers

    if optimum_python:
        if not Path(optimum_python).exists():
            return f"--optimum-python {optimum_python}: no such file"
        return None
    try:
        import optimum.onnxruntime  # noqa: F401
    except ImportError:
        return (f"optimum-onnx 0.1.0 (the latest) requires transformers<4.58 and fxopt's models run on transformers "
                f"{transformers.__version__}: install it in its own virtual environment and give its python as "
                "--optimum-python (python -m venv /tmp/optimum-venv && /tmp/optimum-venv/bin/pip install "
                "torch==2.13.0 'optimum-onnx[onnxruntime]' 'transformers<4.58')")
    return None


# -- the runs ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    tokens: torch.Tensor  # [B, new_tokens]
    prefill_ms: float
    decode_ms: float  # the new_tokens - 1 steps after the first token
    steps: int


def run_hf(model, ids: torch.Tensor, new_tokens: int) -> Run:
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    with torch.inference_mode():
        model.generate(ids[:, : min(16, ids.shape[1])], **{**kwargs, "attention_mask": mask[:, :16], "max_new_tokens": 4,
                                                            "min_new_tokens": 4})
        timer = FirstTokenTimer()
        start = time.perf_counter()
        out = model.generate(ids, streamer=timer, **kwargs)
        end = time.perf_counter()
    return Run(out[:, ids.shape[1]:], (timer.times[1] - start) * 1e3, (end - timer.times[1]) * 1e3, new_tokens - 1)


def run_fxopt(gen, ids: torch.Tensor, new_tokens: int) -> Run:
    gen.generate(ids[:, :16], max_new_tokens=4, eos_token_id=())
    out = gen.generate(ids, max_new_tokens=new_tokens, eos_token_id=())
    return Run(out.sequences[:, ids.shape[1]:], out.prefill_ms, out.decode_ms, out.decode_steps)


def run_ortgenai(og_model, ids: torch.Tensor, new_tokens: int) -> Run:
    """Greedy with onnxruntime-genai's generator: ``append_tokens`` runs the
    prefill, the first ``generate_next_token`` picks a token from its logits,
    each later one runs a decode step and picks the next."""
    import onnxruntime_genai as og

    def once(prompt: torch.Tensor, n: int) -> Run:
        params = og.GeneratorParams(og_model)
        params.set_search_options(do_sample=False, max_length=prompt.shape[1] + n, min_length=prompt.shape[1] + n,
                                  batch_size=prompt.shape[0])
        gen = og.Generator(og_model, params)
        start = time.perf_counter()
        gen.append_tokens(prompt.numpy().astype(np.int32))
        gen.generate_next_token()
        first = time.perf_counter()
        steps = 0
        while not gen.is_done():
            gen.generate_next_token()
            steps += 1
        end = time.perf_counter()
        seqs = torch.tensor(np.stack([np.asarray(gen.get_sequence(b)) for b in range(prompt.shape[0])]))
        return Run(seqs[:, prompt.shape[1]:].long(), (first - start) * 1e3, (end - first) * 1e3, steps)

    once(ids[:, :16], 4)
    return once(ids, new_tokens)


def run_optimum(python: str, checkpoint: Path, prompts: dict[str, torch.Tensor], new_tokens: int, threads: int,
                work: Path) -> tuple[dict[str, Run], Path]:
    """All of optimum's runs in one process of its own environment
    (``generate_optimum_peer.py``), which exports the model once."""
    np.savez(work / "prompts.npz", **{k: v.numpy() for k, v in prompts.items()})
    out = work / "optimum-result.json"
    cmd = [python, str(Path(__file__).with_name("generate_optimum_peer.py")), "--checkpoint", str(checkpoint),
           "--prompts", str(work / "prompts.npz"), "--new-tokens", str(new_tokens), "--threads", str(threads),
           "--export-dir", str(work / "optimum-onnx"), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise PeerUnavailable(f"optimum-onnx failed: {lines[-1] if lines else done.returncode}")
    result = json.loads(out.read_text())
    runs = {k: Run(torch.tensor(r["tokens"]), r["prefill_ms"], r["decode_ms"], r["steps"]) for k, r in result["runs"].items()}
    return runs, Path(result["onnx"])


# -- the benchmark ------------------------------------------------------------------------------

def configurations(model, contexts, batches, new_tokens, max_batch_tokens):
    """(batch, prompt length, note) for every configuration asked for; a
    prompt longer than the model's positions is shortened (and noted)."""
    out = []
    for batch in batches:
        for context in contexts:
            prompt = prompt_length(model, context, new_tokens)
            note = f"prompt {prompt}: {max_positions(model)} positions" if prompt != context else ""
            if max_batch_tokens and batch > 1 and batch * prompt > max_batch_tokens:
                note = f"skipped: {batch} x {prompt} prompt tokens > --max-batch-tokens {max_batch_tokens}"
            out.append((batch, prompt, note))
    return out


def prompt_ids(vocab: int, batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1000 * batch + length))


def row_from_run(name, variant, batch, prompt, run: Run, weight_bytes, model, new_tokens, bandwidth, reference, note):
    step_ms = run.decode_ms / max(run.steps, 1)
    row = dict(model=name, variant=variant, batch=batch, context=prompt, prefill_ms=run.prefill_ms, step_ms=step_ms,
               tokens_per_s=batch * 1e3 / step_ms, note=note)
    if weight_bytes is not None:
        streamed = weight_bytes + kv_bytes(model, batch, prompt + new_tokens // 2)
        row["limit_ms"] = streamed / (bandwidth * 1e9) * 1e3
    if reference is not None and reference.shape == run.tokens.shape:
        row["agree"] = float((run.tokens == reference).float().mean())
    return row


def median_run(runs: list[Run]) -> Run:
    """One run standing for several of the same variant: the median prefill
    and the median decode step (tokens from the first: greedy repeats them)."""
    step = float(np.median([r.decode_ms / r.steps for r in runs])) if runs[0].steps else 0.0
    return Run(runs[0].tokens, float(np.median([r.prefill_ms for r in runs])), step * runs[0].steps, runs[0].steps)


def bench_model(name: str, a, variants: list[str], bandwidth: float) -> list[dict]:
    from fxopt.generation import compile_generator
    from fxopt.ir.decoder import trace_decoder

    model = build_model(name)
    configs = configurations(model, a.contexts, a.batches, a.new_tokens, a.max_batch_tokens)
    runnable = [(b, p, n) for b, p, n in configs if not n.startswith("skipped")]
    prompts = {(b, p): prompt_ids(model.config.vocab_size, b, p) for b, p, _ in runnable}
    work = Path(tempfile.mkdtemp(prefix=f"generate-{name}-"))
    rows: list[dict] = [dict(model=name, variant=v, batch=b, context=p, note=n) for v in variants for b, p, n in configs
                        if n.startswith("skipped")]
    references: dict = {}
    traced = None
    checkpoint = None
    ready: dict = {}  # variant -> (built, weight_bytes, precomputed runs)
    reasons: dict = {}
    try:
        # Every variant is built first, then each (batch, context) runs them
        # all in turns, ``--repeats`` times: the ratios the goals read come
        # from runs minutes apart at most, not from one variant's minutes
        # against another's.
        for variant in variants:
            runs: dict = {}
            weight_bytes = None
            built = None
            start = time.perf_counter()
            try:
                if variant == REFERENCE:
                    weight_bytes = module_streamed_bytes(model)
                elif variant in FXOPT:
                    if traced is None:
                        traced = trace_decoder(model)
                    pipeline, backend = FXOPT[variant]
                    opts = {"intra_op_threads": a.threads, "inter_op_threads": 1} if backend == "onnxruntime" else {}
                    if "cache" in inspect.signature(compile_generator).parameters:
                        opts["cache"] = a.cache
                    built = compile_generator(traced, pipeline, backend, **opts, **FXOPT_OPTIONS.get(variant, {}))
                    weight_bytes = graph_streamed_bytes(built.graphs.decode)
                elif variant.startswith("ortgenai") or variant.startswith("optimum"):
                    if variant.startswith("optimum") and (why := optimum_unavailable(a.optimum_python)):
                        raise PeerUnavailable(why)
                    if checkpoint is None:
                        checkpoint = save_checkpoint(model, work / "hf")
                    if variant.startswith("ortgenai"):
                        built, onnx_path = build_ortgenai(model, checkpoint, variant.split("-")[1], work, a.threads)
                    else:
                        by_key, onnx_path = run_optimum(a.optimum_python, checkpoint,
                                                        {f"b{b}_c{p}": ids for (b, p), ids in prompts.items()},
                                                        a.new_tokens, a.threads, work)
                        runs = {(b, p): by_key[f"b{b}_c{p}"] for b, p in prompts}
                    weight_bytes = onnx_streamed_bytes(onnx_path)
                ready[variant] = (built, weight_bytes, runs)
                print(f"[{name}] {variant}: ready in {time.perf_counter() - start:.1f} s (at {time.perf_counter() - T0:.0f} s)",
                      flush=True)
            except Exception as e:  # a variant that cannot run is a row saying why
                reasons[variant] = describe(e)
                print(f"[{name}] {variant}: {reasons[variant]}", flush=True)
        timed: list[dict] = []
        for batch, prompt, note in runnable:
            ids = prompts[(batch, prompt)]
            taken: dict = {v: [] for v in ready}
            failed: dict = {}
            for _ in range(a.repeats):
                for variant, (built, _, runs) in ready.items():
                    if variant in failed or (taken[variant] and (batch, prompt) in runs):
                        continue
                    try:
                        if (batch, prompt) in runs:  # the optimum peer ran in its own process
                            run = runs[(batch, prompt)]
                        elif variant == REFERENCE:
                            run = run_hf(model, ids, a.new_tokens)
                        elif variant in FXOPT:
                            run = run_fxopt(built, ids, a.new_tokens)
                        else:
                            run = run_ortgenai(built, ids, a.new_tokens)
                    except Exception as e:
                        failed[variant] = describe(e)
                        continue
                    taken[variant].append(run)
            for variant in ready:
                if variant in failed:
                    timed.append(dict(model=name, variant=variant, batch=batch, context=prompt, note=failed[variant]))
                    continue
                run = median_run(taken[variant])
                if variant == REFERENCE:
                    references[(batch, prompt)] = run.tokens
                row = row_from_run(name, variant, batch, prompt, run, ready[variant][1], model, a.new_tokens, bandwidth,
                                   references.get((batch, prompt)), note)
                timed.append(row)
                print(f"[{name}] {variant} batch {batch} context {prompt}: prefill {row['prefill_ms']:.1f} ms, "
                      f"{row['tokens_per_s']:.1f} tokens/s, agree {row.get('agree', float('nan')):.3f} "
                      f"({len(taken[variant])} run(s), at {time.perf_counter() - T0:.0f} s)", flush=True)
        for variant, reason in reasons.items():
            timed += [dict(model=name, variant=variant, batch=b, context=p, note=reason) for b, p, _ in runnable]
        order = {v: i for i, v in enumerate(variants)}
        rows += sorted(timed, key=lambda r: order[r["variant"]])
        ready.clear()
        gc.collect()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


# -- goals, table, plot ---------------------------------------------------------------------------

def goals(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(goal, measured, met / not met / n/a) at batch 1, context 512 (the prompt
    nearest to 512 a model has), from the rows of one run."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        timed = [r for r in rows if r["model"] == model and r["batch"] == GOAL_BATCH and "step_ms" in r]
        if not timed:
            continue
        contexts = sorted({r["context"] for r in timed})
        at = min(contexts, key=lambda c: abs(c - GOAL_CONTEXT))
        get = {r["variant"]: r for r in timed if r["context"] == at}

        def ratio(goal, num, den, bound, key="tokens_per_s"):
            if num in get and den in get:
                value = get[num][key] / get[den][key]
                out.append((f"{model}: {goal}", f"{value:.2f}x", "met" if value >= bound else "not met"))
            else:
                missing = ", ".join(v for v in (num, den) if v not in get)
                out.append((f"{model}: {goal}", f"no row for {missing}", "n/a"))

        ratio(f"fxopt-int4-ort decode >= 1.3x ortgenai-int4 (batch 1, context {at})", "fxopt-int4-ort", "ortgenai-int4", 1.3)
        ratio(f"fxopt-int4-ort decode >= 6x hf-eager-fp32 (batch 1, context {at})", "fxopt-int4-ort", REFERENCE, 6.0)
        ratio(f"fxopt-fp32-ort decode >= ortgenai-fp32 (batch 1, context {at})", "fxopt-fp32-ort", "ortgenai-fp32", 1.0)
        for variant in (v for v in FXOPT if v in get):
            if REFERENCE in get:
                value = get[variant]["prefill_ms"] / get[REFERENCE]["prefill_ms"]
                out.append((f"{model}: {variant} prefill <= hf-eager-fp32 prefill (batch 1, context {at})",
                            f"{value:.2f}x its time", "met" if value <= 1.0 else "not met"))
            steps = {r["context"]: r["step_ms"] for r in timed if r["variant"] == variant}
            if len(steps) > 1:
                lo, hi = min(steps), max(steps)
                value = steps[hi] / steps[lo]
                out.append((f"{model}: {variant} step at context {hi} <= 1.3x step at context {lo} (batch 1)",
                            f"{value:.2f}x", "met" if value <= 1.3 else "not met"))
            if "limit_ms" in get[variant]:
                value = get[variant]["step_ms"] / get[variant]["limit_ms"]
                out.append((f"{model}: {variant} step <= 1.3x its copy-bandwidth limit (batch 1, context {at})",
                            f"{value:.2f}x ({get[variant]['step_ms']:.1f} / {get[variant]['limit_ms']:.1f} ms)",
                            "met" if value <= 1.3 else "not met"))
    return out


def table(rows: list[dict]) -> str:
    def f(r, k, fmt):
        return fmt.format(r[k]) if k in r and not (isinstance(r[k], float) and math.isnan(r[k])) else ""

    lines = ["| model | variant | batch | context | prefill ms | decode tokens/s | step ms | limit ms | x limit | agree | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = f"{r['step_ms'] / r['limit_ms']:.2f}" if "step_ms" in r and "limit_ms" in r else ""
        lines.append(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['context']} | {f(r, 'prefill_ms', '{:.1f}')} | "
                     f"{f(r, 'tokens_per_s', '{:.1f}')} | {f(r, 'step_ms', '{:.2f}')} | {f(r, 'limit_ms', '{:.2f}')} | {x} | "
                     f"{f(r, 'agree', '{:.3f}')} | {r.get('note', '')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    """Decode tokens/s against context, one panel per model, one line per
    variant and batch: one colour per variant (the same in every panel),
    circles and solid lines for batch 1, squares and dashes for larger batches."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    timed = [r for r in rows if "tokens_per_s" in r]
    models = list(dict.fromkeys(r["model"] for r in timed))
    if not models:
        return False
    colours = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(dict.fromkeys(r["variant"] for r in timed))}
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for variant, batch in dict.fromkeys((r["variant"], r["batch"]) for r in timed if r["model"] == model):
            pts = sorted((r["context"], r["tokens_per_s"]) for r in timed
                         if (r["model"], r["variant"], r["batch"]) == (model, variant, batch))
            ax.plot(*zip(*pts), color=colours[variant], marker="o" if batch == 1 else "s",
                    linestyle="-" if batch == 1 else "--", label=f"{variant} b{batch}")
        ax.set_title(model)
        ax.set_xlabel("context (prompt tokens)")
        ax.set_ylabel("decode tokens/s (all sequences)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="gpt2,llama-135m", help=f"of {', '.join(MODELS)}")
    p.add_argument("--contexts", default="128,512,1024", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--batches", default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--max-batch-tokens", type=int, default=0,
                   help="skip batch > 1 configurations with more prompt tokens than this (0: none skipped)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each variant per (batch, context), in turns; the row is their median")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--cache", default="buffer", choices=("growing", "buffer"),
                   help="fxopt's KV cache layout, both backends (buffer: preallocated, written in place)")
    p.add_argument("--optimum-python", default=os.environ.get("FXOPT_OPTIMUM_PYTHON"),
                   help="python of a virtual environment with optimum-onnx (it needs transformers < 4.58)")
    a = p.parse_args(argv)
    variants = a.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {VARIANTS}")
    if REFERENCE in variants:  # the reference runs first: every other row is compared with it
        variants = [REFERENCE] + [v for v in variants if v != REFERENCE]
    torch.set_num_threads(a.threads)
    bandwidth = common.copy_bandwidth_gbs(a.threads)
    print(f"copy bandwidth: {bandwidth:.1f} GB/s on {a.threads} threads", flush=True)
    start = time.perf_counter()
    rows = [row for name in a.models.split(",") for row in bench_model(name, a, variants, bandwidth)]
    order = {v: i for i, v in enumerate(variants)}
    rows.sort(key=lambda r: (a.models.split(",").index(r["model"]), order[r["variant"]], r["batch"], r["context"]))
    minutes = (time.perf_counter() - start) / 60
    write(a, rows, bandwidth, minutes, [__file__, *(sys.argv[1:] if argv is None else argv)])


def write(a, rows: list[dict], bandwidth: float, minutes: float, argv: list[str]) -> None:
    full = set(a.models.split(",")) >= {"gpt2", "llama-135m"} and set(a.contexts) >= {128, 512, 1024}
    skipped = sorted({(r["batch"], r["context"]) for r in rows if r.get("note", "").startswith("skipped")})
    body = [
        f"{a.threads} threads for every variant; copy bandwidth {bandwidth:.1f} GB/s (read + written, "
        f"{a.threads} threads); the run took {minutes:.1f} min.",
        "",
        f"{a.new_tokens} greedy new tokens after a random prompt of `context` tokens; every variant runs in turns, "
        f"{a.repeats} time(s) per (batch, context), each run after a warm-up, and a row is the median prefill and "
        "median step (optimum's peer runs once, in its own process). `decode tokens/s`: all sequences of the batch; `step ms`: one decode step; `limit ms`: the weights the "
        "step reads plus the KV cache, streamed once at the copy bandwidth; `x limit`: step / limit; `agree`: fraction "
        f"of greedy new tokens equal to {REFERENCE}'s.",
    ]
    if skipped:
        body += ["", "Not run (prefill time): " + ", ".join(f"batch {b} at context {c}" for b, c in skipped)
                 + f" (`--max-batch-tokens {a.max_batch_tokens}`)."]
    if not full:
        body += ["", "**Check run at reduced sizes** (models, contexts or token counts below the benchmark's): it shows "
                 "that every variant runs; its timings are not the benchmark's result."]
    body += ["", table(rows), "", "## Goals", "", "| goal | measured | |", "|---|---|---|"]
    body += [f"| {g} | {m} | {s} |" for g, m, s in goals(rows)]
    intro = ("fxopt's prefill and decode-step graphs against Hugging Face `generate` and the ONNX Runtime "
             "generation peers; see the docstring of `benchmarks/generate.py` for each variant's setup.")
    path = common.write_result("generate", "Generation: prefill and decode speed", "\n".join(body), intro=intro, argv=argv)
    if plot(rows, path.with_suffix(".png")):
        body_text = path.read_text().rstrip() + f"\n\n![decode tokens/s against context]({path.with_suffix('.png').name})\n"
        path.write_text(body_text)
    print(f"wrote {path}")
    for g, m, s in goals(rows):
        print(f"{s:>8}  {g}: {m}")


if __name__ == "__main__":
    main()
