"""A small trained GPT-style decoder to measure compression quality on, and its
perplexity after pruning, clustering and quantization.

Random-weight decoders make accuracy figures meaningless, and no trained
causal LM ships as an installable package. This script trains one: a
byte-level GPT-2 configuration on the docstrings of the Python packages
installed beside fxopt (every machine that runs fxopt has them), with a fixed
seed, single-threaded data order and a held-out split by file, and caches the
weights outside the repository (``--cache``, default
``~/.cache/fxopt/decoder-<size>-<steps>.pt``); a second run loads them.

    python benchmarks/train_decoder.py                       # ~11M parameters, the table below
    python benchmarks/train_decoder.py --size tiny --steps 30 --eval-windows 8   # a smoke run

Then every pipeline of ``ROWS`` runs on the traced model (calibrated on
training windows) and the held-out perplexity is written to
``benchmarks/results/prune_perplexity_<size>.md`` (CPU model and core count
in the header).
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from prune_accuracy import ROWS, cpu_name  # noqa: E402  (the same pipelines as the MiniLM table)

SIZES = {
    "tiny": dict(n_layer=2, n_embd=128, n_head=4),
    "small": dict(n_layer=6, n_embd=384, n_head=6),  # ~11M parameters with the 256-byte vocabulary
}
PACKAGES = ("torch", "transformers", "onnx", "onnxscript", "numpy", "rich", "safetensors", "tokenizers")
BASE = "canonicalize,dce,constant-fold,cse"


def docstrings(packages=PACKAGES) -> tuple[bytes, bytes]:
    """Docstrings of every module, class and function of the installed
    ``packages`` (files in sorted order), as UTF-8 bytes; every tenth file
    is held out."""
    import importlib.util

    train, held = [], []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        for i, path in enumerate(sorted(root.rglob("*.py"))):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
            except (SyntaxError, ValueError):
                continue
            docs = [ast.get_docstring(n) for n in ast.walk(tree)
                    if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            text = "\n\n".join(d for d in docs if d)
            if text:
                (held if i % 10 == 9 else train).append(text)
    return "\n\n".join(train).encode("utf-8"), "\n\n".join(held).encode("utf-8")


def windows(data: bytes, length: int, count: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    starts = torch.randint(0, len(t) - length - 1, (count,), generator=g)
    return torch.stack([t[s: s + length + 1] for s in starts.tolist()]).long()


def build(size: str, context: int):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=context, use_cache=False, **SIZES[size])
    cfg.bos_token_id = cfg.eos_token_id = None
    return transformers.GPT2LMHeadModel(cfg)


def train(model, data: bytes, steps: int, batch: int, context: int, lr: float) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for step in range(steps):
        xb = windows(data, context, batch, seed=step)
        loss = model(input_ids=xb[:, :-1], labels=xb[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)
    model.eval()
    return losses


def perplexity(run, held: torch.Tensor) -> float:
    """exp of the mean next-byte cross-entropy over the held-out windows."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(held), 4):
            xb = held[i: i + 4]
            logits = run({"input_ids": xb[:, :-1]})
            logits = logits.logits if hasattr(logits, "logits") else logits[0] if isinstance(logits, (tuple, list)) else logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256).float(), xb[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += xb[:, 1:].numel()
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--rows", nargs="*", default=ROWS)
    ap.add_argument("--cache", default=None, help="weights file (default ~/.cache/fxopt/decoder-<size>-<steps>.pt)")
    args = ap.parse_args()

    import fxopt
    from torch.export import Dim

    cache = Path(args.cache or Path.home() / ".cache" / "fxopt" / f"decoder-{args.size}-{args.steps}.pt")
    train_text, held_text = docstrings()
    print(f"corpus: {len(train_text)} training bytes, {len(held_text)} held-out bytes", flush=True)
    model = build(args.size, args.context)
    start = time.perf_counter()
    if cache.exists():
        model.load_state_dict(torch.load(cache))
        model.eval()
        trained = f"loaded from {cache}"
    else:
        train(model, train_text, args.steps, args.batch, args.context, args.lr)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache)
        trained = f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s, cached at {cache}"
    params = sum(p.numel() for p in model.parameters())
    held = windows(held_text, args.context, args.eval_windows, seed=10_000)
    calib = [{"input_ids": w[None, :-1]} for w in windows(train_text, args.context, args.calib_windows, seed=20_000)]
    example = {"input_ids": held[:2, :-1]}
    dyn = {"input_ids": {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}}
    graph = fxopt.PassManager(BASE).run(fxopt.trace(model, example, dynamic_shapes=dyn, name="decoder")).graph
    dense = perplexity(lambda inputs: graph(**inputs), held)
    lines = [
        f"# Held-out perplexity of a trained byte-level decoder ({args.size}, {params / 1e6:.1f}M parameters)",
        "",
        f"CPU: {cpu_name()}, {os.cpu_count()} cores. Command: `python benchmarks/train_decoder.py --size {args.size} "
        f"--steps {args.steps}`; weights {trained}. Corpus: docstrings of {', '.join(PACKAGES)}; "
        f"{args.eval_windows} held-out windows of {args.context} bytes, {args.calib_windows} calibration windows.",
        "",
        "| pipeline | perplexity | vs dense |",
        "|---|---|---|",
        f"| dense | {dense:.3f} | 1.000 |",
    ]
    print(lines[-1], flush=True)
    for row in args.rows:
        out = fxopt.PassManager(row, calibration_data=calib).run(graph).graph
        ppl = perplexity(lambda inputs: out(**inputs), held)
        lines.append(f"| `{row}` | {ppl:.3f} | {ppl / dense:.3f} |")
        print(lines[-1], flush=True)
    result = HERE / "results" / f"prune_perplexity_{args.size}.md"
    result.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
