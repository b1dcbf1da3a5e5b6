"""Accuracy of fxopt's pruning, structured shrinking, clustering and
quantization without fine-tuning, on two trained models:

* ``minilm``: the real all-MiniLM-L6-v2 (``fxopt.models.minilm()``): cosine
  (``fxopt.compare``) of each of the 56 evaluation sentences' embeddings
  (``benchmarks/sentences.py``, which no test uses) to the fp32 model's;
  calibration on ``--calib`` sentences: the 32 calibration sentences of
  ``sentences.py``, then prose sentences of the decoder's training corpus.
* ``minilm-sparsity``: MiniLM at 50% sparsity (unstructured and 2:4) under
  every technique fxopt has for it: calibration size, SparseGPT's options,
  OWL's per-layer ratios, attention against MLP, the least-squares refit; the
  linear sparsity of the whole model is counted on each result.
* ``decoder``: the byte-level decoder ``train_decoder.py`` trains (trained on
  first use, cached): perplexity on held-out text (windows of files it never
  saw); calibration on ``--calib`` training windows of 128 bytes.

Every linear but the LM head is pruned, clustered or quantized (the passes'
default filters); ``shrink`` removes the same fraction of MLP channels and of
attention heads (each attention keeps ``ceil((1 - r) * heads)``).

    python benchmarks/prune_accuracy.py                                   # both models, every row
    python benchmarks/prune_accuracy.py --models minilm --rows "prune(method=sparsegpt,ratio=0.5)"
    python benchmarks/prune_accuracy.py --models minilm-sparsity --jobs 2  # what reaches MiniLM's 50% goals
    python benchmarks/prune_accuracy.py --models decoder --decoder-size small   # the 10.8M decoder (section decoder-small)

Writes ``benchmarks/results/prune_accuracy.md``, one section per model
(command, CPU model and core count in each).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import write_result  # noqa: E402

BASE = "canonicalize,dce,constant-fold,cse"
PRUNE = [
    "prune(method=magnitude,ratio=0.5)",
    "prune(method=wanda,ratio=0.5)",
    "prune(method=sparsegpt,ratio=0.5)",
    "prune(method=magnitude,pattern='2:4')",
    "prune(method=wanda,pattern='2:4')",
    "prune(method=sparsegpt,pattern='2:4')",
]
# k-means codebooks against the uniform grid at the same width: plain, fitted to the output
# (weighted by the inputs' mean square), and chosen with GPTQ's error feedback like the grid's GPTQ row
SHARE = [
    "cluster(bits=4,granularity=channel)",
    "cluster(bits=4,granularity=channel,weighting=activation)",
    "cluster(bits=4,granularity=channel,assign=gptq)",
    "quantize(bits=4,granularity=channel,accuracy_level=0)",
    "quantize(bits=4,granularity=channel,method=gptq,accuracy_level=0)",
]
# MLP channels and attention heads, by calibrated importance; with and without FLAP's bias compensation (MLP channels)
SHRINK = [f"shrink(ratio={r},heads={r},importance=activation{c})" for r in (0.1, 0.2, 0.3) for c in ("", ",compensate=true")]
QUANTIZE = [
    "quantize(bits=8,granularity=channel)",
    "quantize(mode=dynamic)",
    "quantize(bits=4,granularity=group,group_size=32,accuracy_level=0)",
    "quantize(bits=4,granularity=group,group_size=32,method=gptq,accuracy_level=0)",
]
# What gets MiniLM's 50% sparsity closest to dense: calibration size (`@N` sentences), the
# least-squares refit (toward the layer's or the unpruned model's output, with mask rounds), OWL's
# per-layer ratios, attention against MLP under one budget (attention is a third of MiniLM's linear
# weights: 30% of it and 60% of the MLP remove half). Most important first: rows run in that order.
STUDY = [
    "prune(method=sparsegpt,ratio=0.5,refit=model,refit_rounds=8)@2048",
    "prune(method=sparsegpt,pattern='2:4',refit=model,refit_rounds=3)@2048",
    "prune(method=sparsegpt,ratio=0.5,refit=model,refit_rounds=3)@512",
    "prune(method=sparsegpt,ratio=0.5,refit=model)@2048",
    "prune(method=sparsegpt,pattern='2:4',refit=model)@2048",
    "prune(method=sparsegpt,ratio=0.5,refit=model)",
    "prune(method=sparsegpt,pattern='2:4',refit=model)",
    "prune(method=sparsegpt,ratio=0.5,refit=model)@512",
    "prune(method=sparsegpt,pattern='2:4',refit=model)@512",
    "prune(method=sparsegpt,ratio=0.5,allocation=owl,refit=model)@512",
    "prune(method=sparsegpt,ratio=0.5,allocation=owl)",
    "prune(method=sparsegpt,ratio=0.5,refit=model,refit_rounds=3)",
    "prune(method=sparsegpt,ratio=0.5,refit=layer)",
    "prune(method=sparsegpt,ratio=0.3,include=attention),prune(method=sparsegpt,ratio=0.6,exclude=attention)",
    "prune(method=sparsegpt,ratio=0.5)@512",
    "prune(method=sparsegpt,ratio=0.5)",
]
ROWS = {"minilm": PRUNE + SHARE + SHRINK, "decoder": PRUNE + SHARE + SHRINK + QUANTIZE, "minilm-sparsity": STUDY}
DEFAULT_CALIB = {"minilm": 128, "decoder": 64, "minilm-sparsity": 128}


def size_of(record) -> str:
    """The sparsity a prune left, else the parameter bytes kept."""
    sparsity = record.stats.get("sparsity")
    if sparsity is not None:
        return f"sparsity {sparsity:.3f}"
    return f"{record.param_bytes_after / record.param_bytes_before:.3f} of bytes"


def measure(graph, rows, calibration, score, log) -> list[tuple[str, tuple, str, float]]:
    import fxopt

    out = []
    for row in rows:
        start = time.perf_counter()
        result = fxopt.PassManager(row, calibration_data=calibration).run(graph)
        seconds = time.perf_counter() - start
        out.append((row, score(result.graph), size_of(result.records[0]), seconds))
        log(f"{row}: {out[-1][1]} ({out[-1][2]}, {seconds:.1f} s)")
    return out


def minilm_calibration(calib: int) -> list[dict]:
    """``calib`` sentences, none of them an evaluation sentence: ``sentences.py``'s
    calibration list, then prose sentences of the docstring corpus."""
    from fxopt.models import minilm_tokenize
    from sentences import CALIBRATION, EVAL
    from train_decoder import corpus_sentences, docstring_corpus

    sentences = CALIBRATION[:calib]
    if calib > len(sentences):
        sentences += corpus_sentences(docstring_corpus().train, calib - len(sentences))
    assert not set(sentences) & set(EVAL), "a calibration sentence is an evaluation sentence"
    return [minilm_tokenize([s]) for s in sentences]  # one sentence per input: no padding rows in the statistics


def minilm_setup():
    """The traced MiniLM graph and its scorer: mean and min cosine to fp32 over the evaluation sentences."""
    import fxopt
    from fxopt.models import minilm, minilm_tokenize
    from sentences import EVAL

    spec = minilm()
    graph = fxopt.PassManager(BASE).run(fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)).graph
    evaluation = minilm_tokenize(EVAL)
    with torch.no_grad():
        ref = spec.model(**evaluation)

    def score(g):
        out = g(**evaluation)
        cos = torch.tensor([fxopt.compare(r, o).cosine for r, o in zip(ref, out)])
        return cos.mean().item(), cos.min().item()

    return graph, score


def minilm(rows, calib: int, log) -> str:
    from sentences import CALIBRATION, EVAL

    graph, score = minilm_setup()
    calibration = minilm_calibration(calib)
    dense = score(graph)
    table = measure(graph, rows, calibration, score, log)
    lines = [
        f"all-MiniLM-L6-v2 (real weights), eager. Cosine of each of {len(EVAL)} evaluation sentences' embedding to the fp32 "
        f"model's; calibration on {calib} sentences ({min(calib, len(CALIBRATION))} from `sentences.py`, "
        f"{max(0, calib - len(CALIBRATION))} prose sentences of the docstring corpus), one sentence per input.",
        "",
        "| pipeline | mean cosine | min cosine | size | pass s |",
        "|---|---:|---:|---|---:|",
        f"| dense (traced) | {dense[0]:.4f} | {dense[1]:.4f} | | |",
    ]
    lines += [f"| `{row}` | {m:.4f} | {lo:.4f} | {size} | {s:.1f} |" for row, (m, lo), size, s in table]
    return "\n".join(lines)


def decoder(rows, calib: int, log, size: str = "mini", eval_windows: int = 64) -> str:
    import fxopt
    from train_decoder import load_decoder, perplexity

    dec = load_decoder(size, log=log)
    held = dec.held_out(eval_windows)
    spec = dec.spec()
    graph = fxopt.PassManager(BASE).run(fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, name=spec.name)).graph

    def score(g):
        return (perplexity(lambda inputs: g(**inputs), held),)

    (dense,) = score(graph)
    table = measure(graph, rows, dec.calibration(calib), score, log)
    params = sum(p.numel() for p in dec.model.parameters())
    lines = [
        f"The byte-level decoder of `train_decoder.py` ({dec.size}, {params / 1e6:.1f}M parameters, {dec.steps} steps), eager. "
        f"Perplexity on {eval_windows} held-out windows of 128 bytes (files the training never saw; uniform: 256); "
        f"calibration on {calib} training windows.",
        "",
        "| pipeline | perplexity | vs dense | size | pass s |",
        "|---|---:|---:|---|---:|",
        f"| dense (traced) | {dense:.3f} | 1.000 | | |",
    ]
    lines += [f"| `{row}` | {p:.3f} | {p / dense:.3f} | {size} | {s:.1f} |" for row, (p,), size, s in table]
    return "\n".join(lines)


def linear_sparsity(graph) -> float:
    """Zeros over elements of every linear weight of ``graph`` (the whole model, pruned or not)."""
    weights = {n.args[1]: graph.constant(n.args[1]) for n in graph.fx.nodes if n.target == torch.ops.aten.linear.default}
    weights = [w for w in weights.values() if w is not None]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


_STUDY: dict = {}


def _study_row(row: str, calib: int) -> tuple:
    import fxopt

    torch.set_num_threads(1)
    if "graph" not in _STUDY:
        _STUDY["graph"], _STUDY["score"] = minilm_setup()
    if calib not in _STUDY:
        _STUDY[calib] = minilm_calibration(calib)
    start = time.perf_counter()
    result = fxopt.PassManager(row, calibration_data=_STUDY[calib]).run(_STUDY["graph"])
    seconds = time.perf_counter() - start
    return _STUDY["score"](result.graph), linear_sparsity(result.graph), seconds


def minilm_sparsity(rows, calib: int, log, jobs: int = 1, partial=None) -> str:
    """MiniLM at 50% sparsity, row by row (``pipeline@N``: N calibration sentences), in ``jobs`` processes."""
    from concurrent.futures import ProcessPoolExecutor

    plan = [(r.rsplit("@", 1)[0], int(r.rsplit("@", 1)[1])) if "@" in r else (r, calib) for r in rows]
    with ProcessPoolExecutor(jobs) as pool:
        futures = [pool.submit(_study_row, row, n) for row, n in plan]
        table = []
        for (row, n), future in zip(plan, futures):
            (m, lo), sparsity, seconds = future.result()
            table.append((row, n, m, lo, sparsity, seconds))
            log(f"{row} @{n}: {m:.4f} / {lo:.4f} (linear sparsity {sparsity:.4f}, {seconds:.1f} s)")
            if partial is not None and len(table) < len(plan):  # what finished so far, should the run be cut short
                partial(_sparsity_table(table, len(plan)))
    return _sparsity_table(table, len(plan))


def _sparsity_table(table, planned: int) -> str:
    from sentences import EVAL

    lines = [
        f"all-MiniLM-L6-v2 (real weights), eager: every linear pruned to half its weights in total. Cosine of each of "
        f"{len(EVAL)} evaluation sentences' embedding to the fp32 model's; calibration on the first N sentences of 32 from "
        "`sentences.py` and then prose sentences of the docstring corpus (none an evaluation sentence), one sentence per input. "
        "`linear sparsity`: zeros over all linear weights of the model, counted on the result (0.5000: exactly half, "
        "also with OWL's or the attention/MLP split's uneven per-layer ratios). Goals: 50% unstructured >= 0.95 mean "
        "cosine, 2:4 >= 0.90.",
        "",
        "| pipeline | calib | mean cosine | min cosine | linear sparsity | pass s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| `{row}` | {n} | {m:.4f} | {lo:.4f} | {sp:.4f} | {s:.1f} |" for row, n, m, lo, sp, s in table]
    if len(table) < planned:
        lines += ["", f"{len(table)} of {planned} rows measured (the run stopped there)."]
    return "\n".join(lines)


MODELS = {"minilm": minilm, "decoder": decoder, "minilm-sparsity": minilm_sparsity}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", choices=sorted(MODELS), default=list(MODELS))
    ap.add_argument("--rows", nargs="*", default=None, help="pipelines to measure (default: each model's rows)")
    ap.add_argument("--calib", type=int, default=None, help="calibration inputs (default: minilm 128, decoder 64)")
    ap.add_argument("--decoder-size", default="mini", help="train_decoder.py's size: mini (1.9M parameters), small (10.8M), tiny")
    ap.add_argument("--eval-windows", type=int, default=64, help="decoder: held-out windows of 128 bytes")
    ap.add_argument("--print-only", action="store_true", help="print the tables, leave the result file as it is")
    ap.add_argument("--jobs", type=int, default=1, help="minilm-sparsity: rows measured in this many processes at once")
    args = ap.parse_args()
    log = lambda s: print(s, flush=True)  # noqa: E731
    for name in args.models:
        extra = {"size": args.decoder_size, "eval_windows": args.eval_windows} if name == "decoder" else {}
        if name == "minilm-sparsity":
            title = "Accuracy of pruning, shrinking, clustering and quantization (no fine-tuning)"
            extra = {"jobs": args.jobs, "partial": None if args.print_only else
                     (lambda body: write_result("prune_accuracy", title, body, section="minilm-sparsity"))}
        body = MODELS[name](args.rows or ROWS[name], args.calib or DEFAULT_CALIB[name], log, **extra)
        print(body, flush=True)
        if not args.print_only:
            # each decoder size its own section (mini, the default, keeps the name "decoder")
            section = f"decoder-{args.decoder_size}" if name == "decoder" and args.decoder_size != "mini" else name
            write_result("prune_accuracy", "Accuracy of pruning, shrinking, clustering and quantization (no fine-tuning)", body,
                         section=section)


if __name__ == "__main__":
    main()
