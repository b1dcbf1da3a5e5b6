"""How to run ``cluster``'s k-means codebooks on ONNX Runtime, which has no
CPU kernel for arbitrary codebooks: the lowerings of ``cluster(lowering=...)``
on GPT-2 small (124M, random weights), batch 1, against fp32 and against
round-to-nearest int4 in the same run.

* ``decode``: the file stores uint8 indices and codebooks; ONNX Runtime folds
  the decode into float weights when it creates the session;
* ``gather``: the same file form, decoded (Cast + GatherElements) at every
  call before each MatMul;
* ``nbits``: the codebooks snapped onto MatMulNBits' uniform 4-bit grid
  (per block scale and zero point), run by MatMulNBits.

Every row runs ``canonicalize,dce,constant-fold,cse,<row>,share-weights`` (the
tied LM head stored once, as it should be) and clusters every linear but the
LM head. Per row: the ONNX file's size (against the model's unique parameter
bytes); the resident memory its session adds, in a fresh process (VmRSS after
creating the session, and after a prefill and a one-token run, minus before);
one-token and prefill-128 times, all rows' sessions in one process taking
turns round by round, as the median time and the median of each round's ratio
to the fp32 row; the mean relative weight error over the clustered layers (for
``nbits`` also the codebook's before snapping: the snapping's cost); the
logits' cosine to eager fp32 at prefill (random weights: a check, not a
quality figure).

    python benchmarks/cluster_lowering.py                       # GPT-2 small, full run
    python benchmarks/cluster_lowering.py --model gpt2-tiny --rounds 3   # a quick check

Writes its section (per model) of ``benchmarks/results/cluster_lowering.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import write_result  # noqa: E402

BASE = "canonicalize,dce,constant-fold,cse"
ROWS = {
    "fp32": "",
    "cluster decode": "cluster(bits=4)",
    "cluster gather": "cluster(bits=4,lowering=gather)",
    "cluster nbits": "cluster(bits=4,lowering=nbits,accuracy_level=4)",
    "RTN int4 per channel": "quantize(bits=4,granularity=channel,accuracy_level=4)",
}
SHAPES = {"one-token": 1, "prefill-128": 128}


def _rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _inputs(seq: int, vocab: int):
    import torch

    return {"input_ids": torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(seq))}


def child(path: str, vocab: int, threads: int, reference: str) -> dict:
    """Load the saved model in a fresh process: the memory its session adds,
    at creation and after a prefill and a one-token run; the logits' cosine."""
    import numpy as np
    import torch

    import fxopt
    from fxopt.backends.onnxruntime import OnnxRuntimeModel
    from fxopt.ir.parity import output_tensors

    torch.set_num_threads(threads)
    before = _rss_kib()
    model = OnnxRuntimeModel.load(path, intra_op_threads=threads)
    out = {"rss_session_mib": (_rss_kib() - before) / 1024}
    with torch.inference_mode():
        model(**_inputs(SHAPES["one-token"], vocab))
        logits = model(**_inputs(SHAPES["prefill-128"], vocab))
    logits = logits.logits if hasattr(logits, "logits") else output_tensors(logits)[0]
    out["cosine"] = fxopt.compare(torch.from_numpy(np.load(reference)), logits).cosine
    out["rss_after_runs_mib"] = (_rss_kib() - before) / 1024
    return out


def interleaved_ms(paths: dict[str, str], vocab: int, threads: int, rounds: int) -> dict[str, dict[str, float]]:
    """Per row and shape: the median time over ``rounds`` rounds in which the
    rows take turns (two runs each, the second timed), and the median of
    each round's ratio to the fp32 row; all sessions in this one process."""
    import torch

    from fxopt.backends.onnxruntime import OnnxRuntimeModel

    models = {name: OnnxRuntimeModel.load(path, intra_op_threads=threads) for name, path in paths.items()}
    out = {name: {} for name in models}
    with torch.inference_mode():
        for shape, seq in SHAPES.items():
            inputs = _inputs(seq, vocab)
            times = {name: [] for name in models}
            for r in range(rounds + 2):
                for name, model in models.items():
                    model(**inputs)
                    start = time.perf_counter()
                    model(**inputs)
                    if r >= 2:
                        times[name].append((time.perf_counter() - start) * 1e3)
            for name in models:
                out[name][f"{shape}_ms"] = statistics.median(times[name])
                if "fp32" in times:
                    out[name][f"{shape}_ratio"] = statistics.median(t / b for t, b in zip(times[name], times["fp32"]))
    return out


def weight_errors(stats: dict) -> dict:
    """Mean relative weight error of the clustered layers (and of their
    codebooks before snapping)."""
    layers = {k: r for k, r in stats.get("layers", {}).items() if isinstance(r, dict) and "rel_err" in r}
    if not layers:
        return {}
    out = {"rel_err": statistics.mean(r["rel_err"] for r in layers.values())}
    if all("kmeans_rel_err" in r for r in layers.values()):
        out["kmeans_rel_err"] = statistics.mean(r["kmeans_rel_err"] for r in layers.values())
    return out


def rtn_errors(graph) -> dict:
    """RTN int4 of the layers ``cluster`` selects (every linear but the LM
    head), per channel and per MatMulNBits block."""
    from fxopt.ir.quant import QuantConfig, quantize, relative_error
    from fxopt.passes.cluster import nbits_block
    from fxopt.passes.layers import select_layers

    channel, block = [], []
    for layer in select_layers(graph).selected:
        w = layer.weight
        channel.append(relative_error(w, quantize(w, QuantConfig(4, "asym", "channel")).dequantize()))
        b = nbits_block(w.shape[1], w.shape[1])
        block.append(relative_error(w, quantize(w, QuantConfig(4, "asym", "group", b)).dequantize()))
    return {"rtn_channel": statistics.mean(channel), "rtn_block": statistics.mean(block)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2", help="built-in model (gpt2: GPT-2 small; gpt2-tiny for a quick check)")
    ap.add_argument("--rounds", type=int, default=50, help="timed rounds per shape (median)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    ap.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args._child:
        path, vocab, reference = args._child
        print("RESULT " + json.dumps(child(path, int(vocab), args.threads, reference)))
        return

    import numpy as np
    import torch

    import fxopt
    from fxopt.models import load_model

    torch.set_num_threads(args.threads)
    spec = load_model(args.model)
    vocab = spec.model.config.vocab_size
    base = fxopt.PassManager(BASE).run(fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                                                   name=args.model)).graph
    rows, paths = [], {}
    errors = rtn_errors(base)
    unique = {p.untyped_storage().data_ptr(): p for p in spec.model.parameters()}
    errors["unique_mib"] = sum(p.untyped_storage().nbytes() for p in unique.values()) / 2**20
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        reference = os.path.join(tmp, "reference.npy")
        np.save(reference, spec.model(**_inputs(SHAPES["prefill-128"], vocab)).logits.numpy())
        for name in args.rows.split(","):
            pipeline = ",".join(p for p in (ROWS[name], "share-weights") if p)
            result = fxopt.PassManager(pipeline).run(base)
            path = os.path.join(tmp, f"{name.replace(' ', '_')}.onnx")
            fxopt.compile(result.graph, "onnxruntime", intra_op_threads=args.threads).save(path)
            row = {"row": name, "pipeline": pipeline, "file_mib": Path(path).stat().st_size / 2**20}
            row.update(weight_errors(result.records[0].stats if ROWS[name] else {}))
            del result
            cmd = [sys.executable, __file__, "--_child", path, str(vocab), reference, "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line:
                row.update(json.loads(line[7:]))
                paths[name] = path
            else:
                row["failed"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(row, file=sys.stderr)
            rows.append(row)
        del base
        times = interleaved_ms(paths, vocab, args.threads, args.rounds)
        for row in rows:
            row.update(times.get(row["row"], {}))
    body = table(rows, errors)
    print(body)
    write_result("cluster_lowering", "Lowerings of cluster's k-means codebooks on ONNX Runtime", body, section=args.model,
                 intro=__doc__.split("\n\n    python")[0])


def table(rows: list[dict], errors: dict) -> str:
    def ratio(r, shape):
        return f" ({r[shape + '_ratio']:.2f}x)" if shape + "_ratio" in r else ""

    lines = ["| row | file MiB | session RSS MiB (after runs) | one token ms | prefill 128 ms | weight rel. err | logits cosine |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['row']} | {r['file_mib']:.1f} | failed: {r['failed']} | | | | |")
            continue
        err = f"{r['rel_err']:.4f}" if "rel_err" in r else "0"
        if "kmeans_rel_err" in r:
            err += f" (codebook {r['kmeans_rel_err']:.4f})"
        lines.append(f"| {r['row']} | {r['file_mib']:.1f} | {r['rss_session_mib']:.0f} ({r['rss_after_runs_mib']:.0f}) | "
                     f"{r['one-token_ms']:.2f}{ratio(r, 'one-token')} | {r['prefill-128_ms']:.1f}{ratio(r, 'prefill-128')} | "
                     f"{err} | {r['cosine']:.5f} |")
    lines.append("")
    fp32 = next((r for r in rows if r["row"] == "fp32"), None)
    lines.append(f"The model's unique parameters: {errors['unique_mib']:.2f} MiB"
                 + (f"; the fp32 file is {fp32['file_mib'] / errors['unique_mib']:.4f} of that (the tied table stored once)." if fp32 else "."))
    lines.append("")
    lines.append(f"Round-to-nearest int4 (asymmetric min-max) of the same layers: mean relative weight error "
                 f"{errors['rtn_channel']:.4f} per channel, {errors['rtn_block']:.4f} per MatMulNBits block (the block "
                 "`cluster(lowering=nbits)` snaps per channel codebooks onto).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
