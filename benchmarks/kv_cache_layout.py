"""The key/value cache of a decode step on ONNX Runtime, three layouts, timed
alone: every layer's attention of one new token against a cache of P
positions, on GPT-2 small's shapes (12 layers, 12 heads of 64) by default.

* ``concat + MultiHeadAttention``: the cache grown with Concat, then attention
  (what fxopt lowered a decode step to before ``pack-attention`` took it);
* ``GQA, growing``: com.microsoft GroupQueryAttention with past_key/past_value
  of P positions, writing a present of P + 1 (fxopt's lowering,
  ``fxopt.attention_with_past``): one copy of the cache per layer and step;
* ``GQA, shared buffer``: the same kernel on a preallocated buffer of
  ``--max-length`` positions bound as both past and present (I/O binding), which
  it writes in place: no copy.

    python benchmarks/kv_cache_layout.py [--contexts 128,512,1024] [--batch 1] [--threads 2]

Writes ``benchmarks/results/kv_cache_layout.md`` (median of ``--runs`` steps,
microseconds for all layers together, and the cache bytes a step reads).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from fxopt.backends.onnxruntime import new_session, session_options

from common import captured, write_result


def _model(layers: int, heads: int, kv_heads: int, head: int, kind: str):
    n, nodes, inputs, outputs = helper.make_node, [], [], []
    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    inputs += [helper.make_tensor_value_info("q", f, ["b", 1, heads * head]),
               helper.make_tensor_value_info("k", f, ["b", 1, kv_heads * head]),
               helper.make_tensor_value_info("v", f, ["b", 1, kv_heads * head]),
               helper.make_tensor_value_info("bias", f, ["b", 1, 1, "t"])]
    if kind != "mha":
        inputs += [helper.make_tensor_value_info("seqlens_k", i32, ["b"]), helper.make_tensor_value_info("total", i32, [])]
    for layer in range(layers):
        pk, pv, ok, ov, y = (f"{x}{layer}" for x in ("past_k", "past_v", "present_k", "present_v", "y"))
        inputs += [helper.make_tensor_value_info(x, f, ["b", kv_heads, "p", head]) for x in (pk, pv)]
        outputs += [helper.make_tensor_value_info(x, f, None) for x in (y, ok, ov)]
        if kind == "mha":  # the cache as the graph wrote it, then MultiHeadAttention on BNSH key/value
            for src, past, new in (("k", pk, ok), ("v", pv, ov)):
                nodes += [n("Reshape", [src, "bnsh_shape"], [f"{src}r{layer}"]),
                          n("Transpose", [f"{src}r{layer}"], [f"{src}t{layer}"], perm=[0, 2, 1, 3]),
                          n("Concat", [past, f"{src}t{layer}"], [new], axis=2)]
            nodes.append(n("MultiHeadAttention", ["q", ok, ov, "", "", "bias"], [y], domain="com.microsoft", num_heads=heads))
        else:
            nodes.append(n("GroupQueryAttention", ["q", "k", "v", pk, pv, "seqlens_k", "total", "", "", "", "bias"],
                           [y, ok, ov], domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads))
    inits = [helper.make_tensor("bnsh_shape", TensorProto.INT64, [4], [0, 1, kv_heads, head])] if kind == "mha" else []
    graph = helper.make_graph(nodes, "cache", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])


def _median_us(step, runs: int) -> float:
    for _ in range(5):
        step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def measure(kind: str, *, layers, heads, kv_heads, head, batch, context, max_length, threads, runs) -> float:
    so = session_options(threads, 1, "all", True)
    so.log_severity_level = 3
    session = new_session(_model(layers, heads, kv_heads, head, kind).SerializeToString(), so)
    rng = np.random.default_rng(0)
    total = context + 1
    feed = {"q": rng.standard_normal((batch, 1, heads * head), dtype=np.float32),
            "k": rng.standard_normal((batch, 1, kv_heads * head), dtype=np.float32),
            "v": rng.standard_normal((batch, 1, kv_heads * head), dtype=np.float32),
            "bias": np.zeros((batch, 1, 1, total), np.float32)}
    if kind != "mha":
        feed |= {"seqlens_k": np.full(batch, context, np.int32), "total": np.array(total, np.int32)}
    length = max_length if kind == "shared" else context
    cache = [ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((batch, kv_heads, length, head), dtype=np.float32))
             for _ in range(2 * layers)]
    binding = session.io_binding()
    for name, value in feed.items():
        binding.bind_cpu_input(name, value)
    for i in range(layers):
        binding.bind_ortvalue_input(f"past_k{i}", cache[2 * i])
        binding.bind_ortvalue_input(f"past_v{i}", cache[2 * i + 1])
        binding.bind_output(f"y{i}", "cpu")

    def step():
        # growing: ONNX Runtime allocates each present (P + 1 positions); shared: the buffer itself
        for i in range(layers):
            if kind == "shared":
                binding.bind_ortvalue_output(f"present_k{i}", cache[2 * i])
                binding.bind_ortvalue_output(f"present_v{i}", cache[2 * i + 1])
            else:
                binding.bind_output(f"present_k{i}", "cpu")
                binding.bind_output(f"present_v{i}", "cpu")
        session.run_with_iobinding(binding)

    return _median_us(step, runs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="128,512,1024")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=12)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=2048, help="positions of the preallocated buffer")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=200)
    args = p.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    if max(contexts) >= args.max_length:
        p.error(f"--max-length {args.max_length} must exceed the longest context {max(contexts)}")
    shape = dict(layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, head=args.head_size, batch=args.batch,
                 max_length=args.max_length, threads=args.threads, runs=args.runs)
    kinds = {"mha": "concat + MultiHeadAttention", "growing": "GQA, growing", "shared": "GQA, shared buffer"}
    if args.kv_heads != args.heads:  # MultiHeadAttention takes as many kv heads as query heads
        del kinds["mha"]
    with captured() as out:
        print(f"{args.layers} layers, {args.heads} heads ({args.kv_heads} kv) of {args.head_size}, batch {args.batch}, "
              f"{args.threads} threads, ONNX Runtime {ort.__version__}; median of {args.runs} steps, all layers (us)\n")
        print("| context | cache read (MB) | " + " | ".join(kinds.values()) + " | shared / growing |")
        print("|---" * (len(kinds) + 3) + "|")
        for context in contexts:
            us = {k: measure(k, context=context, **shape) for k in kinds}
            mb = 2 * args.layers * args.batch * args.kv_heads * context * args.head_size * 4 / 1e6
            print(f"| {context} | {mb:.1f} | " + " | ".join(f"{us[k]:.0f}" for k in kinds)
                  + f" | {us['shared'] / us['growing']:.2f} |")
    write_result("kv_cache_layout", "Decode-step KV cache layouts on ONNX Runtime", out.text,
                 section=f"batch {args.batch}, {args.kv_heads}/{args.heads} kv heads")


if __name__ == "__main__":
    main()
