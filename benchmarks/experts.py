"""Mixture-of-experts generation: the experts as traced (transformers'
``batched_mm``: every token's chosen experts' weights copied, then batched
matmuls) against ``fuse-experts`` (one op: each expert once on its tokens on
eager, ONNX Runtime's ``MoE`` kernel), in the fused pipeline, beside Hugging
Face's own ``generate`` (its default experts on CPU).

A Mixtral config with random weights (hidden 512, 8 experts of 1024, top 2,
4 layers, 8 query / 4 key-value heads, vocabulary 8192), batch 1, a random
prompt, greedy tokens; every variant runs in turns ``--repeats`` times after a
warm-up, a row is the median prefill and median step.

    python benchmarks/experts.py [--prompt 128] [--new-tokens 32] [--threads 2] [--repeats 3]

Writes ``benchmarks/results/experts.md``.
"""

from __future__ import annotations

import argparse

import torch

from common import captured, write_result
from generate import FUSED, median_run, prompt_ids, run_fxopt, run_hf

WITH_EXPERTS = FUSED.replace("cse,", "cse,fuse-experts,")
CONFIG = dict(hidden_size=512, intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=4, vocab_size=8192, max_position_embeddings=2048,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    import transformers

    from fxopt.generation import compile_generator, optimize_decoder
    from fxopt.ir.decoder import trace_decoder

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**CONFIG)).eval()
    traced = trace_decoder(model)
    graphs = {"batched": optimize_decoder(traced, FUSED), "fuse-experts": optimize_decoder(traced, WITH_EXPERTS)}
    variants = {"hf-eager-fp32": None}
    for backend in ("eager", "onnxruntime"):
        for experts, g in graphs.items():
            # as generate.py's rows: eager linears on packed weights (the experts' are not linears)
            options = dict(intra_op_threads=args.threads, inter_op_threads=1) if backend == "onnxruntime" else {"prepack": "all"}
            variants[f"fxopt {backend}, {experts}"] = compile_generator(g, backend=backend, **options)
    ids = prompt_ids(CONFIG["vocab_size"], 1, args.prompt)
    runs = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, gen in variants.items():
            runs[name].append(run_hf(model, ids, args.new_tokens) if gen is None else run_fxopt(gen, ids, args.new_tokens))
    rows = {name: median_run(r) for name, r in runs.items()}
    reference = rows["hf-eager-fp32"]
    with captured() as out:
        print(f"Mixtral config ({CONFIG['num_hidden_layers']} layers, {CONFIG['num_local_experts']} experts of "
              f"{CONFIG['intermediate_size']}, top {CONFIG['num_experts_per_tok']}, hidden {CONFIG['hidden_size']}), "
              f"batch 1, prompt {args.prompt}, {args.new_tokens} greedy tokens, {args.threads} threads; "
              f"median of {args.repeats} runs in turns. `agree`: greedy tokens equal to Hugging Face's.\n")
        print("| variant | prefill ms | step ms | prefill vs HF | step vs HF | agree |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, run in rows.items():
            step = run.decode_ms / run.steps
            agree = (run.tokens == reference.tokens).float().mean().item()
            print(f"| {name} | {run.prefill_ms:.1f} | {step:.2f} | {run.prefill_ms / reference.prefill_ms:.2f} | "
                  f"{step / (reference.decode_ms / reference.steps):.2f} | {agree:.3f} |")
        for backend in ("eager", "onnxruntime"):
            batched, fused = rows[f"fxopt {backend}, batched"], rows[f"fxopt {backend}, fuse-experts"]
            print(f"\n{backend}: fuse-experts / batched: prefill {fused.prefill_ms / batched.prefill_ms:.3f}, "
                  f"step {(fused.decode_ms / fused.steps) / (batched.decode_ms / batched.steps):.3f}", end="")
        print()
    write_result("experts", "Mixture-of-experts generation: batched experts against fuse-experts", out.text)


if __name__ == "__main__":
    main()
