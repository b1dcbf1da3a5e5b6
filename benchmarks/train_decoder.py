"""A small trained GPT-style decoder to measure compression quality on.

Random-weight decoders make accuracy figures meaningless, and no trained
causal LM ships as an installable package. This script trains one: a
byte-level GPT-2 configuration on the docstrings of Python's standard library
and of the packages fxopt depends on (every machine that runs fxopt has them),
with a fixed seed (model, batches) and a held-out split by file (every tenth
file), and caches the weights outside the repository
(``~/.cache/fxopt/decoder-<size>-<steps>-<corpus digest>.pt``; ``FXOPT_CACHE``
moves the folder). Other benchmarks call :func:`load_decoder`, which trains on
first use and loads afterwards.

Sizes: ``mini`` (4 layers, width 192, 1.9M parameters, 2000 steps; the
default: a few minutes on two cores, the time is in the results file),
``small`` (6 layers, width 384, 10.8M parameters, 1000 steps, each about
four times a mini step), ``tiny`` (a smoke model).

    python benchmarks/train_decoder.py                   # train (or load) and measure held-out perplexity
    python benchmarks/train_decoder.py --size small
    python benchmarks/train_decoder.py --size tiny --steps 30 --eval-windows 8   # a smoke run

Writes ``benchmarks/results/train_decoder.md``: held-out perplexity against
the uniform (256) and unigram byte baselines, the training loss and time.
The compression tables on this model are in ``prune_accuracy.py``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import math
import os
import re
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import write_result  # noqa: E402

SIZES = {
    "tiny": dict(n_layer=2, n_embd=128, n_head=4),
    "mini": dict(n_layer=4, n_embd=192, n_head=4),  # 1.9M parameters
    "small": dict(n_layer=6, n_embd=384, n_head=6),  # 10.8M parameters with the 256-byte vocabulary
}
STEPS = {"tiny": 300, "mini": 2000, "small": 1000}  # batch 8 of 128 bytes
CONTEXT = 128
# Python's standard library and fxopt's own dependencies: present wherever fxopt runs.
PACKAGES = ("stdlib", "numpy", "onnx", "onnxscript", "rich")
HELD_OUT_SEED, CALIBRATION_SEED = 10_000, 20_000


# -- the corpus -------------------------------------------------------------------------

def _package_root(name: str) -> Path | None:
    if name == "stdlib":
        return Path(sysconfig.get_paths()["stdlib"])
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _files(root: Path, name: str) -> list[Path]:
    files = sorted(root.rglob("*.py"))
    if name == "stdlib":  # the standard library's own folder holds site-packages and its test suite
        skip = ("site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3")
        files = [f for f in files if not set(f.relative_to(root).parts[:-1]) & set(skip)]
    return files


def _docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return ""
    docs = [ast.get_docstring(n) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return "\n\n".join(d for d in docs if d)


@dataclass(frozen=True)
class Corpus:
    train: bytes
    held: bytes
    digest: str  # of both texts: names the cached weights

    def __str__(self) -> str:
        return (f"docstrings of {', '.join(PACKAGES)} ({len(self.train) / 1e6:.1f} MB training text, "
                f"{len(self.held) / 1e6:.1f} MB held out by file; digest {self.digest})")


def docstring_corpus(packages=PACKAGES) -> Corpus:
    """The docstrings of every module, class and function of ``packages``
    (files in sorted order), UTF-8; every tenth file of each package is held
    out. Cached beside the weights (parsing takes a while)."""
    listing = []
    for name in packages:
        root = _package_root(name)
        if root is not None:
            listing += [(name, f) for f in _files(root, name)]
    key = hashlib.sha256("\n".join(f"{n}:{f}:{f.stat().st_size}" for n, f in listing).encode()).hexdigest()[:12]
    cached = cache_dir() / f"docstrings-{key}.pt"
    if cached.exists():
        train, held = torch.load(cached)
    else:
        train_parts, held_parts, index = [], [], {}
        for name, path in listing:
            i = index[name] = index.get(name, -1) + 1
            text = _docstrings(path)
            if text:
                (held_parts if i % 10 == 9 else train_parts).append(text)
        train, held = "\n\n".join(train_parts).encode("utf-8"), "\n\n".join(held_parts).encode("utf-8")
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save((train, held), cached)
    digest = hashlib.sha256(train + b"\0" + held).hexdigest()[:12]
    return Corpus(train, held, digest)


def corpus_sentences(text: bytes, count: int, min_words: int = 6, max_words: int = 40) -> list[str]:
    """``count`` prose sentences of ``text`` (lines of code, doctest and
    parameter tables left out), spread evenly over it: calibration text for
    models that read sentences."""
    words = re.compile(r"^[A-Z][a-z]+(?: [\w'(),:-]+)+[.]$")
    found = []
    for paragraph in text.decode("utf-8", errors="replace").split("\n\n"):
        flat = " ".join(line.strip() for line in paragraph.splitlines())
        for sentence in re.split(r"(?<=\.)\s+", flat):
            n = len(sentence.split())
            if min_words <= n <= max_words and words.match(sentence) and "``" not in sentence and ">>>" not in sentence:
                found.append(sentence)
    if len(found) < count:
        raise ValueError(f"the corpus has {len(found)} prose sentences, {count} asked for")
    step = len(found) / count
    return [found[int(i * step)] for i in range(count)]


def windows(data: bytes, count: int, seed: int, length: int = CONTEXT) -> torch.Tensor:
    """``count`` random windows of ``length + 1`` bytes (inputs and next-byte targets)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    starts = torch.randint(0, len(t) - length - 1, (count,), generator=g)
    return torch.stack([t[s: s + length + 1] for s in starts.tolist()]).long()


# -- the model ----------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("FXOPT_CACHE", Path.home() / ".cache" / "fxopt"))


def build(size: str):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=CONTEXT, use_cache=False, bos_token_id=None, eos_token_id=None,
                                  loss_type="ForCausalLM", **SIZES[size])
    return transformers.GPT2LMHeadModel(cfg)


def train(model, data: bytes, steps: int, batch: int, lr: float, log=print) -> list[float]:
    """AdamW with a one-cycle schedule on random windows of ``data`` (window
    ``i`` of step ``s`` from seed ``s``: the same batches on every machine)."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for step in range(steps):
        xb = windows(data, batch, seed=step)
        loss = model(input_ids=xb[:, :-1], labels=xb[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            log(f"step {step}: loss {loss.item():.3f}")
    model.eval()
    return losses


@dataclass
class Decoder:
    model: torch.nn.Module
    corpus: Corpus
    size: str
    steps: int
    info: dict  # training loss (last 20 steps' mean), seconds, cache path

    def held_out(self, count: int = 64) -> torch.Tensor:
        return windows(self.corpus.held, count, HELD_OUT_SEED)

    def calibration(self, count: int = 32) -> list[dict]:
        """Training windows, one model input each (``input_ids`` ``[1, CONTEXT]``)."""
        return [{"input_ids": w[None, :-1]} for w in windows(self.corpus.train, count, CALIBRATION_SEED)]

    def spec(self):
        """The model as a :class:`fxopt.models.ModelSpec` (token ids of a dynamic batch and length), to trace."""
        from fxopt.models import hf_spec

        return hf_spec(self.model, 256, f"decoder-{self.size}", mask=False, max_len=CONTEXT)


def load_decoder(size: str = "mini", steps: int | None = None, batch: int = 8, lr: float = 2e-3, log=print) -> Decoder:
    """The trained decoder, from the cache; trained (and cached) when missing."""
    steps = steps or STEPS[size]
    corpus = docstring_corpus()
    model = build(size)
    path = cache_dir() / f"decoder-{size}-{steps}-{corpus.digest}.pt"
    if path.exists():
        saved = torch.load(path)
        model.load_state_dict(saved["state_dict"])
        model.eval()
        return Decoder(model, corpus, size, steps, saved["info"])
    log(f"training the {size} decoder ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {steps} steps) "
        f"on {corpus}; cached at {path}")
    start = time.perf_counter()
    losses = train(model, corpus.train, steps, batch, lr, log=log)
    info = {"final_loss": sum(losses[-20:]) / len(losses[-20:]), "seconds": time.perf_counter() - start,
            "batch": batch, "lr": lr, "threads": torch.get_num_threads(), "cache": str(path)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "info": info}, path)
    return Decoder(model, corpus, size, steps, info)


def perplexity(run, held: torch.Tensor, batch: int = 8) -> float:
    """exp of the mean next-byte cross-entropy over the held-out windows;
    ``run(inputs)`` returns the logits (or a structure whose first tensor they are)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(held), batch):
            xb = held[i: i + batch]
            out = run({"input_ids": xb[:, :-1]})
            logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), xb[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += xb[:, 1:].numel()
    return math.exp(total / count)


def unigram_perplexity(train_text: bytes, held: torch.Tensor) -> float:
    """The best context-free byte model: training byte frequencies (add-one), on the held-out targets."""
    counts = torch.bincount(torch.frombuffer(bytearray(train_text), dtype=torch.uint8).long(), minlength=256).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[held[:, 1:].reshape(-1)].mean().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="mini")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: 300 tiny, 400 mini, 160 small)")
    ap.add_argument("--eval-windows", type=int, default=64)
    args = ap.parse_args()

    log = lambda s: print(s, flush=True)  # noqa: E731
    dec = load_decoder(args.size, args.steps, log=log)
    held = dec.held_out(args.eval_windows)
    dense = perplexity(lambda inputs: dec.model(**inputs), held)
    params = sum(p.numel() for p in dec.model.parameters())
    info = dec.info
    body = "\n".join([
        f"Byte-level GPT-2 configuration `{args.size}` ({', '.join(f'{k}={v}' for k, v in SIZES[args.size].items())}, "
        f"context {CONTEXT}; {params / 1e6:.1f}M parameters), {dec.steps} steps of batch {info['batch']}, AdamW, "
        f"one-cycle lr {info['lr']}, seed 0, on the {dec.corpus}. Trained in {info['seconds']:.0f} s on "
        f"{info['threads']} threads (beside other jobs: not a timing figure).",
        "",
        f"| model | held-out perplexity ({args.eval_windows} windows of {CONTEXT} bytes) |",
        "|---|---:|",
        "| uniform over 256 bytes | 256.0 |",
        f"| unigram byte frequencies | {unigram_perplexity(dec.corpus.train, held):.2f} |",
        f"| trained decoder (final training loss {info['final_loss']:.3f}, perplexity {math.exp(info['final_loss']):.2f}) | {dense:.2f} |",
    ])
    log(body)
    write_result("train_decoder", "Trained byte-level decoder", body, section=args.size)


if __name__ == "__main__":
    main()
