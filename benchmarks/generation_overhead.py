"""The Python cost of a decode step on ONNX Runtime: the generation loop's
time per step minus the time of the step's ONNX Runtime run alone, on a tiny
model where that cost shows.

Three loops over the same compiled generator, in one run:

* ``session only``: the decode session run back to back with everything bound
  in advance (the cache output of one run bound as the next run's input): the
  floor;
* ``Generator.generate``: fxopt's loop (one I/O binding per session, the mask,
  positions and sequences allocated once, numpy step inputs);
* ``per-step rebuild``: the loop as first written (a new I/O binding per
  step, the ids, mask and positions made as torch tensors and converted, the
  mask and sequences grown with ``torch.cat``, stop checks row by row).

    python benchmarks/generation_overhead.py [--new-tokens 64] [--layers 2] [--hidden 64] [--batch 1]

Writes ``benchmarks/results/generation_overhead.md``: milliseconds per step and
the overhead of each loop over the session alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from common import captured, write_result


def _model(layers: int, hidden: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_embd=hidden, n_head=4, vocab_size=512, n_positions=512,
                                     bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(config).eval()


def session_only(gen, prompt, new_tokens: int) -> float:
    """ms per decode step: only ONNX Runtime runs, inputs prepared beforehand."""
    batch = prompt.shape[0]
    _, cache = gen._steps.prefill(prompt, torch.ones_like(prompt), torch.arange(prompt.shape[1]).expand_as(prompt).contiguous())
    model = gen.decode_model
    session, names = model.session, model.input_names
    ids = np.zeros((batch, 1), np.int64)
    masks = [np.ones((batch, prompt.shape[1] + i + 1), np.int64) for i in range(new_tokens)]
    positions = [np.full((batch, 1), prompt.shape[1] + i, np.int64) for i in range(new_tokens)]
    binding = session.io_binding()
    start = time.perf_counter()
    for i in range(new_tokens):
        binding.bind_cpu_input(names[0], ids)
        binding.bind_cpu_input(names[1], masks[i])
        binding.bind_cpu_input(names[2], positions[i])
        for name, value in zip(names[3:], cache):
            binding.bind_ortvalue_input(name, value)
        binding.clear_binding_outputs()
        for name in model.output_names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        cache = binding.get_outputs()[1:]
    return (time.perf_counter() - start) * 1e3 / new_tokens


def per_step_rebuild(gen, prompt, new_tokens: int) -> float:
    """ms per decode step of the loop as first written (greedy, no stop tokens)."""
    model = gen.decode_model
    batch = prompt.shape[0]
    ids, mask = prompt.clone(), torch.ones_like(prompt)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    logits, cache = gen._steps.prefill(ids, mask, positions)
    token = logits.argmax(-1)
    done = torch.zeros(batch, dtype=torch.bool)
    new = [[] for _ in range(batch)]
    next_position = positions[:, -1:] + 1
    start = time.perf_counter()
    for step in range(new_tokens):
        token = torch.where(done, torch.full_like(token, 0), token)
        for row in range(batch):
            if not done[row]:
                new[row].append(int(token[row]))
        ids = torch.cat([ids, token[:, None]], dim=1)
        done |= torch.tensor([int(t) in set() for t in token.tolist()], dtype=torch.bool)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
        binding = model.session.io_binding()
        for name, value in zip(model.input_names, [token[:, None], mask, next_position]):
            binding.bind_cpu_input(name, np.ascontiguousarray(value.numpy()))
        for name, value in zip(model.input_names[3:], cache):
            binding.bind_ortvalue_input(name, value)
        for name in model.output_names:
            binding.bind_output(name, "cpu")
        model.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits, cache = torch.from_numpy(outputs[0].numpy())[:, -1], list(outputs[1:])
        next_position = next_position + 1
        token = logits.argmax(-1)
    return (time.perf_counter() - start) * 1e3 / new_tokens


def generator_loop(gen, prompt, new_tokens: int) -> float:
    out = gen.generate(prompt, max_new_tokens=new_tokens + 1)
    return out.decode_ms / out.decode_steps


def main(argv=None):
    from fxopt.generation import compile_generator

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7, help="interleaved repeats; the median is reported")
    args = p.parse_args(argv)
    pipeline = "canonicalize,dce,constant-fold,cse,fuse-attention,merge-linears,pack-attention,fuse-linear-act,fuse-norm,dce"
    gen = compile_generator(_model(args.layers, args.hidden), pipeline, "onnxruntime", intra_op_threads=args.threads)
    prompt = torch.randint(0, 512, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    loops = {"session only": session_only, "Generator.generate": generator_loop, "per-step rebuild": per_step_rebuild}
    times = {name: [] for name in loops}
    for _ in range(args.repeats):  # interleaved: load on the machine hits every loop alike
        for name, loop in loops.items():
            times[name].append(loop(gen, prompt, args.new_tokens))
    ms = {name: statistics.median(t) for name, t in times.items()}
    floor = ms["session only"]
    with captured() as out:
        print(f"GPT-2 config, {args.layers} layers, hidden {args.hidden}, batch {args.batch}, prompt {args.prompt_tokens}, "
              f"{args.new_tokens} steps, {args.threads} thread(s); median of {args.repeats} interleaved repeats\n")
        print("| loop | ms / step | overhead over the session (ms / step) |")
        print("|---|---|---|")
        for name, value in ms.items():
            print(f"| {name} | {value:.3f} | {value - floor:.3f} |")
        before, after = ms["per-step rebuild"] - floor, ms["Generator.generate"] - floor
        print(f"\nper-step overhead, Generator.generate / per-step rebuild: {after / before:.2f}")
    write_result("generation_overhead", "Python overhead of a decode step on ONNX Runtime", out.text)


if __name__ == "__main__":
    main()
