"""Generation speed: prefill time and decode tokens/s through fxopt's prefill and
decode-step graphs, against Hugging Face ``generate`` and ONNX Runtime GenAI.

    python benchmarks/generate.py --models gpt2,smollm2-135m --contexts 128,512,1024 --batches 1,8 \\
        --new-tokens 64 --threads 2 --out benchmarks/results/generate.md

Rows (each at its best documented setup; greedy tokens compared with Hugging
Face eager fp32, the agreement printed beside the speed):

* ``hf-eager-fp32``: ``model.generate(do_sample=False)``; prefill is one forward
  over the prompt with ``use_cache=True``, decode the rest of ``generate``'s time.
* ``fxopt-fp32-eager`` / ``fxopt-fp32-ort``: the fusion pipeline on both graphs.
* ``fxopt-int4-ort``: the same with ``quantize(bits=4,group_size=32)`` (MatMulNBits).
* ``ortgenai-fp32`` / ``ortgenai-int4``: ``onnxruntime-genai``'s model builder on the
  checkpoint saved with ``save_pretrained`` and a word-level tokenizer (Llama-family
  only: the builder has no GPT-2).
* ``optimum-ort-fp32``: optimum's ``ORTModelForCausalLM`` when it is installed.

Beside each fxopt decode step: the time to stream its weights and its KV cache
once at the copy bandwidth measured here (``limit ms``), the physical floor of a
memory-bound step. Models: GPT-2 small (124M config) and a Llama shaped like
SmolLM2-135M, random weights; ``gpt2-tiny`` / ``llama-tiny`` for a quick check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FUSED = "canonicalize,dce,constant-fold,cse,fuse-attention,merge-linears,fuse-linear-act,fuse-norm,dce"
INT4 = "canonicalize,dce,constant-fold,cse,fuse-attention,merge-linears,quantize(bits=4,group_size=32),fuse-linear-act,fuse-norm,dce"
FXOPT = {"fxopt-fp32-eager": (FUSED, "eager"), "fxopt-fp32-ort": (FUSED, "onnxruntime"), "fxopt-int4-ort": (INT4, "onnxruntime")}
VARIANTS = ["hf-eager-fp32", *FXOPT, "ortgenai-fp32", "ortgenai-int4", "optimum-ort-fp32"]


def build_model(name: str):
    import transformers as tf

    torch.manual_seed(0)
    if name == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config())
    elif name == "gpt2-tiny":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=1024))
    elif name == "smollm2-135m":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
            vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048, rope_theta=100000.0))
    elif name == "llama-tiny":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, tie_word_embeddings=True, max_position_embeddings=1024))
    else:
        raise SystemExit(f"unknown model {name!r}: gpt2, smollm2-135m, gpt2-tiny, llama-tiny")
    model.config.bos_token_id = model.config.eos_token_id = model.config.pad_token_id = None
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = None
    return model.eval()


def copy_bandwidth_gbs() -> float:
    """Bytes read + written per second by a large tensor copy (median of 5)."""
    src = torch.empty(64 * 2 ** 20, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / sorted(times[1:])[2] / 1e9


def kv_bytes(model, batch: int, context: int) -> int:
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return 2 * layers * batch * kv_heads * context * head_dim * 4


def run_hf(model, ids, new_tokens):
    mask = torch.ones_like(ids)
    kwargs = dict(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(**kwargs, max_new_tokens=2, min_new_tokens=2)
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, use_cache=True)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(**kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        total = time.perf_counter() - start
    decode = max(total - prefill, 1e-9)
    return out[:, ids.shape[1]:], prefill * 1e3, (new_tokens - 1) / decode, None


def run_fxopt(gen, ids, new_tokens):
    gen.generate(ids, max_new_tokens=2, eos_token_id=())
    out = gen.generate(ids, max_new_tokens=new_tokens, eos_token_id=())
    step_bytes = gen.graphs.decode.param_bytes()
    return out.sequences[:, ids.shape[1]:], out.prefill_ms, out.decode_tokens_per_s, step_bytes


def word_level_tokenizer(vocab_size: int, folder: Path) -> None:
    """A tokenizer file (one word per id) beside the checkpoint: the model builder reads one."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "w0"}))


def build_ortgenai(model, precision: str, work: Path, threads: int):
    import onnxruntime_genai as og  # noqa: F401  (the builder needs it)
    import subprocess

    if model.config.model_type not in ("llama", "mistral", "qwen2", "phi3", "gemma"):
        raise RuntimeError(f"onnxruntime-genai's model builder does not support {model.config.model_type}")
    src = work / "hf"
    if not src.exists():
        # the builder requires an EOS id; the runs below set min_length so it never stops early
        model.config.eos_token_id = model.config.vocab_size - 1
        try:
            model.save_pretrained(src)
        finally:
            model.config.eos_token_id = None
        word_level_tokenizer(model.config.vocab_size, src)
    out = work / f"genai-{precision}"
    if not out.exists():
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out), "-p", precision,
               "-e", "cpu", "-c", str(work / "cache")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"model builder failed: {(done.stderr or done.stdout).strip().splitlines()[-1]}")
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=2))
    import onnxruntime_genai as og

    return og.Model(str(out))


def run_ortgenai(og_model, ids, new_tokens):
    import numpy as np
    import onnxruntime_genai as og

    def once(n):
        params = og.GeneratorParams(og_model)
        params.set_search_options(do_sample=False, max_length=ids.shape[1] + n, min_length=ids.shape[1] + n,
                                  batch_size=ids.shape[0])
        gen = og.Generator(og_model, params)
        start = time.perf_counter()
        gen.append_tokens(ids.numpy().astype(np.int32))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        steps = 0
        # append_tokens runs the prefill; each generate_next_token appends one token
        while not gen.is_done() and steps < n:
            gen.generate_next_token()
            steps += 1
        decode = time.perf_counter() - start
        seqs = torch.tensor(np.stack([np.asarray(gen.get_sequence(b)) for b in range(ids.shape[0])]))
        return seqs[:, ids.shape[1]:], prefill * 1e3, steps / max(decode, 1e-9)

    once(2)
    tokens, prefill, rate = once(new_tokens)
    return tokens, prefill, rate, None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="gpt2,smollm2-135m")
    p.add_argument("--contexts", default="128,512,1024")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="benchmarks/results/generate.md")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from fxopt.generation import compile_generator
    from fxopt.ir.decoder import trace_decoder

    variants = a.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {VARIANTS}")
    bandwidth = copy_bandwidth_gbs()
    rows = []
    for name in a.models.split(","):
        model = build_model(name)
        traced = trace_decoder(model) if any(v in FXOPT for v in variants) else None
        built: dict = {}
        failed: dict = {}
        work = Path(tempfile.mkdtemp(prefix=f"fxopt-generate-{name}-"))
        for batch in map(int, a.batches.split(",")):
            for context in map(int, a.contexts.split(",")):
                ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(context))
                reference = None
                for variant in variants:
                    if variant in failed:
                        rows.append(dict(model=name, variant=variant, batch=batch, context=context, note=failed[variant]))
                        continue
                    try:
                        if variant == "hf-eager-fp32":
                            result = run_hf(model, ids, a.new_tokens)
                        elif variant in FXOPT:
                            if variant not in built:
                                pipeline, backend = FXOPT[variant]
                                opts = {"intra_op_threads": a.threads} if backend == "onnxruntime" else {}
                                built[variant] = compile_generator(traced, pipeline, backend, **opts)
                            result = run_fxopt(built[variant], ids, a.new_tokens)
                        elif variant.startswith("ortgenai"):
                            if variant not in built:
                                built[variant] = build_ortgenai(model, variant.split("-")[1], work, a.threads)
                            result = run_ortgenai(built[variant], ids, a.new_tokens)
                        else:
                            raise RuntimeError(_optimum_unavailable())
                    except Exception as e:  # a peer that cannot run is a row saying why
                        failed[variant] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}" if str(e).strip() else type(e).__name__
                        rows.append(dict(model=name, variant=variant, batch=batch, context=context, note=failed[variant]))
                        continue
                    tokens, prefill_ms, rate, weight_bytes = result
                    if variant == "hf-eager-fp32":
                        reference = tokens
                    agree = float((tokens == reference).float().mean()) if reference is not None and tokens.shape == reference.shape else float("nan")
                    row = dict(model=name, variant=variant, batch=batch, context=context, prefill_ms=prefill_ms,
                               tokens_per_s=rate, agreement=agree)
                    if weight_bytes is not None:
                        step_bytes = weight_bytes + kv_bytes(model, batch, context + a.new_tokens // 2)
                        row["limit_ms"] = step_bytes / (bandwidth * 1e9) * 1e3
                        row["step_ms"] = 1e3 / rate
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    write(a, rows, bandwidth)


def _optimum_unavailable() -> str:
    try:
        from optimum.onnxruntime import ORTModelForCausalLM  # noqa: F401
    except ImportError as e:
        return (f"optimum-onnx is not installed ({e}); its release (0.1.0) requires transformers < 4.58, "
                "which would replace the transformers 5 that fxopt's models use")
    return "optimum-onnx's exporter needs a model id or folder with a tokenizer; not wired up here"


def write(a, rows, bandwidth) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    lines = [
        "# Generation: prefill and decode speed", "",
        f"CPU: {cpu}, {os.cpu_count()} cores; {a.threads} threads for every variant; copy bandwidth {bandwidth:.1f} GB/s", "",
        "Command: `python benchmarks/generate.py " + " ".join(sys.argv[1:]) + "`", "",
        f"{a.new_tokens} greedy new tokens after a random prompt of `context` tokens. `agree`: fraction of new tokens equal to "
        "Hugging Face eager fp32's. `limit ms`: weights + KV cache streamed once at the copy bandwidth.", "",
        "| model | variant | batch | context | prefill ms | decode tokens/s | step ms | limit ms | agree | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = lambda k, fmt: (fmt.format(r[k]) if k in r else "")
        lines.append(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['context']} | {f('prefill_ms', '{:.1f}')} | "
                     f"{f('tokens_per_s', '{:.1f}')} | {f('step_ms', '{:.2f}')} | {f('limit_ms', '{:.2f}')} | "
                     f"{f('agreement', '{:.3f}')} | {r.get('note', '')} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {out} (no plot: matplotlib is not installed)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for (model, variant, batch) in sorted({(r["model"], r["variant"], r["batch"]) for r in rows if "tokens_per_s" in r}):
        pts = sorted((r["context"], r["tokens_per_s"]) for r in rows if (r["model"], r["variant"], r["batch"]) == (model, variant, batch) and "tokens_per_s" in r)
        ax.plot(*zip(*pts), marker="o", label=f"{model} {variant} b{batch}")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s per sequence")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
