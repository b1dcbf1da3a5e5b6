"""optimum-onnx's ``ORTModelForCausalLM`` as a row of ``benchmarks/generate.py``.

optimum-onnx requires transformers < 4.58, and fxopt's models run on
transformers 5, so this script runs in a virtual environment of its own::

    python -m venv /tmp/optimum-venv
    /tmp/optimum-venv/bin/pip install torch==2.13.0 'optimum-onnx[onnxruntime]' 'transformers<4.58'
    python benchmarks/generate.py ... --optimum-python /tmp/optimum-venv/bin/python

``generate.py`` saves the model as a checkpoint folder (``save_checkpoint``) and
the prompts as an ``.npz``; this script exports the checkpoint once with its KV
cache (optimum's ``text-generation-with-past``), then, for each prompt, runs one
warm-up and one timed greedy ``generate`` and writes the new tokens and the
times to a JSON file. It imports nothing from fxopt.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


class FirstTokenTimer:
    """A ``generate`` streamer: the first ``put`` is the prompt, the second the first new token."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        self.times.append(time.perf_counter())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompts", required=True, help=".npz of [batch, length] int arrays")
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--export-dir", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    options = ort.SessionOptions()
    options.intra_op_num_threads = a.threads
    options.inter_op_num_threads = 1
    model = ORTModelForCausalLM.from_pretrained(a.checkpoint, export=True, use_cache=True, provider="CPUExecutionProvider",
                                                session_options=options)
    model.save_pretrained(a.export_dir)
    # No EOS, as on the reference side: every run generates exactly the tokens asked for, none masked.
    model.generation_config.eos_token_id = model.config.eos_token_id = None
    onnx_path = next(Path(a.export_dir).glob("*.onnx"))
    prompts = np.load(a.prompts)
    n = a.new_tokens
    runs = {}
    for key in prompts.files:
        ids = torch.from_numpy(prompts[key]).long()
        kwargs = dict(do_sample=False, max_new_tokens=n, pad_token_id=0)
        short = ids[:, :16]
        model.generate(short, attention_mask=torch.ones_like(short), **{**kwargs, "max_new_tokens": 4})
        timer = FirstTokenTimer()
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=timer, **kwargs)
        end = time.perf_counter()
        runs[key] = {"tokens": out[:, ids.shape[1]:].tolist(), "prefill_ms": (timer.times[1] - start) * 1e3,
                     "decode_ms": (end - timer.times[1]) * 1e3, "steps": n - 1}
        print(key, f"prefill {runs[key]['prefill_ms']:.1f} ms", flush=True)
    Path(a.out).write_text(json.dumps({"onnx": str(onnx_path), "runs": runs}))


if __name__ == "__main__":
    main()
