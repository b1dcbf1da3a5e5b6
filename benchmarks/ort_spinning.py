"""What ONNX Runtime's thread spinning is worth and what it costs the model run
after it: GPT-2 small, fxopt's fused + quantized graph on ONNX Runtime, in three
session settings — spinning off, plain spinning (ONNX Runtime's default), and
fxopt's default: spin during a run and park when it returns
(``session.force_spinning_stop``).

For each setting: the session's one-token run alternating with eager fp32's
(the session's time and eager's time right after it: the tax), and the session
alone, warm (median of 30 back-to-back runs after 10), a one-token forward (no KV cache) and prefill 128.

    python benchmarks/ort_spinning.py                 # fused W8A8 per tensor
    python benchmarks/ort_spinning.py --quantize int4 # fused int4 g128
    OMP_WAIT_POLICY=PASSIVE python benchmarks/ort_spinning.py   # PyTorch's threads not spinning

Each quantization and OMP_WAIT_POLICY is a section of
``benchmarks/results/ort_spinning.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant_speed  # noqa: E402  the benchmark's model, inputs and pipelines

import fxopt  # noqa: E402
from fxopt.backends.onnxruntime import new_session, session_options  # noqa: E402

from common import write_result  # noqa: E402

SETTINGS = {"spinning off": False, "plain spinning": "plain", "spin and park (fxopt)": True}
PIPELINES = {"int8": "fxopt-fused-int8", "int4": "fxopt-fused-int4"}


def _session(path: str, setting, threads: int):
    options = session_options(threads, None, "all", bool(setting))
    if setting == "plain":  # fxopt's options park the threads; undo that for the comparison
        options.log_severity_level = 3  # (ONNX Runtime warns that the entry is overwritten)
        options.add_session_config_entry("session.force_spinning_stop", "0")
    return new_session(path, options)


def _ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantize", choices=sorted(PIPELINES), default="int8")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    spec, graph = quant_speed._gpt2_graph()
    model = spec.model
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "gpt2.onnx")
        fxopt.export_onnx(fxopt.PassManager(quant_speed.FXOPT_PIPELINES[PIPELINES[args.quantize]]).run(graph).graph, path)
        del graph
        one, prefill = quant_speed._inputs(1), quant_speed._inputs(128)
        with torch.inference_mode():
            for label, setting in SETTINGS.items():
                sess = _session(path, setting, args.threads)

                def run(inputs, sess=sess):
                    return sess.run(None, {"input_ids": inputs["input_ids"].numpy()})

                pairs = []
                for i in range(30):
                    ort_ms = _ms(lambda: run(one))
                    eager_ms = _ms(lambda: model(**one))
                    if i >= 5:
                        pairs.append((ort_ms, eager_ms))
                warm = {}
                for shape, inputs in (("one token", one), ("prefill 128", prefill)):
                    times = [_ms(lambda: run(inputs)) for _ in range(40)][10:]
                    warm[shape] = statistics.median(times)
                rows.append((label, statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs),
                             warm["one token"], warm["prefill 128"]))
                del sess
                time.sleep(1)  # let the last setting's threads settle
    lines = ["| session | alternating: ONNX Runtime one-token forward (ms) | eager fp32 right after (ms) "
             "| alone, warm: one-token forward (ms) | prefill 128 (ms) |", "|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    # PyTorch's OpenMP threads spin after each parallel region too (libgomp's
    # default), taxing the session's run right after eager's; OMP_WAIT_POLICY=PASSIVE
    # stops that at eager's expense: the results name the policy.
    policy = os.environ.get("OMP_WAIT_POLICY", "")
    write_result("ort_spinning", "ONNX Runtime thread spinning, GPT-2 small fused + quantized, batch 1",
                 f"{args.threads} thread(s), OMP_WAIT_POLICY={policy or 'unset'}.\n\n{table}",
                 section=f"{args.quantize}, OMP_WAIT_POLICY={policy or 'unset'}")


if __name__ == "__main__":
    main()
