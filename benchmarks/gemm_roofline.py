"""How close GPT-2 small's prefill-128 GEMMs run to this CPU's arithmetic limit,
fp32 and int8: how much of int8's prefill time is the GEMMs' own (the limit on int8 at prefill).

    python benchmarks/gemm_roofline.py [--threads 2] [--reps 20]

1. SIMD peak of the cores (a small C probe, built with the machine's ``cc``, one
   copy per thread running at once): fp32 FMA (``vfmadd231ps``) and the AVX2 int8
   dot product (``vpmaddubsw`` + ``vpmaddwd`` + ``vpaddd``, 32 u8 x s8 products; a
   CPU with AVX-512 VNNI or AVX-VNNI does the same in one ``vpdpbusd``).
2. The rate (GMAC/s) of every GEMM shape of GPT-2 small at 128 tokens: torch fp32
   as the eager model runs it (``addmm`` on Conv1D's ``[in, out]`` weight, ``linear``
   for the LM head), torch's dynamic int8 linear (fbgemm and the x86 engine), and
   ONNX Runtime's ``DynamicQuantizeLinear`` + ``MatMulIntegerToFloat`` (fxopt's W8A8
   lowering; ONNX Runtime fuses the pair into ``DynamicQuantizeMatMul``).
3. GPT-2's GEMM time (12 layers + LM head) for each, against torch fp32's: the
   ratio the GEMMs alone allow, before attention, norms and the rest.

Writes ``benchmarks/results/gemm_roofline.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from onnx import helper as h
from onnx import numpy_helper as nh
from common import write_result
from quant_kernels import session  # the same one-node-graph ONNX Runtime session

from fxopt.ir.timing import median_ms

ROWS = 128
# (name, in, out, count in GPT-2 small)
SHAPES = [("attn c_attn", 768, 2304, 12), ("attn c_proj", 768, 768, 12), ("mlp c_fc", 768, 3072, 12),
          ("mlp c_proj", 3072, 768, 12), ("lm_head", 768, 50257, 1)]

PROBE = r"""
#include <stdio.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(void) {
  long n = 100000000, m; double t;
  /* six independent chains of the AVX2 int8 dot product: 32 u8 x s8 MACs each */
  m = n; t = now();
  __asm__ volatile(
    "1:\n"
    "vpmaddubsw %%ymm14, %%ymm15, %%ymm0\n vpmaddwd %%ymm13, %%ymm0, %%ymm0\n vpaddd %%ymm0, %%ymm6, %%ymm6\n"
    "vpmaddubsw %%ymm14, %%ymm15, %%ymm1\n vpmaddwd %%ymm13, %%ymm1, %%ymm1\n vpaddd %%ymm1, %%ymm7, %%ymm7\n"
    "vpmaddubsw %%ymm14, %%ymm15, %%ymm2\n vpmaddwd %%ymm13, %%ymm2, %%ymm2\n vpaddd %%ymm2, %%ymm8, %%ymm8\n"
    "vpmaddubsw %%ymm14, %%ymm15, %%ymm3\n vpmaddwd %%ymm13, %%ymm3, %%ymm3\n vpaddd %%ymm3, %%ymm9, %%ymm9\n"
    "vpmaddubsw %%ymm14, %%ymm15, %%ymm4\n vpmaddwd %%ymm13, %%ymm4, %%ymm4\n vpaddd %%ymm4, %%ymm10, %%ymm10\n"
    "vpmaddubsw %%ymm14, %%ymm15, %%ymm5\n vpmaddwd %%ymm13, %%ymm5, %%ymm5\n vpaddd %%ymm5, %%ymm11, %%ymm11\n"
    "sub $1, %0\n jnz 1b\n" : "+r"(m) :: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
    "xmm9", "xmm10", "xmm11", "xmm13", "xmm14", "xmm15");
  printf("int8 %f\n", n * 6 * 32 / (now() - t) / 1e9);
  /* eight independent fp32 FMA chains: 8 MACs each */
  m = n; t = now();
  __asm__ volatile(
    "1:\n"
    "vfmadd231ps %%ymm14, %%ymm15, %%ymm0\n vfmadd231ps %%ymm14, %%ymm15, %%ymm1\n"
    "vfmadd231ps %%ymm14, %%ymm15, %%ymm2\n vfmadd231ps %%ymm14, %%ymm15, %%ymm3\n"
    "vfmadd231ps %%ymm14, %%ymm15, %%ymm4\n vfmadd231ps %%ymm14, %%ymm15, %%ymm5\n"
    "vfmadd231ps %%ymm14, %%ymm15, %%ymm6\n vfmadd231ps %%ymm14, %%ymm15, %%ymm7\n"
    "sub $1, %0\n jnz 1b\n" : "+r"(m) :: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
    "xmm14", "xmm15");
  printf("fp32 %f\n", n * 8 * 8 / (now() - t) / 1e9);
  return 0;
}
"""


def simd_peaks(threads: int) -> dict[str, float] | None:
    """GMAC/s of all ``threads`` cores together; None without cc or AVX2."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or platform.machine() not in ("x86_64", "AMD64") or "avx2" not in Path("/proc/cpuinfo").read_text():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp, "probe.c"), Path(tmp, "probe")
        src.write_text(PROBE)
        subprocess.run([cc, "-O2", str(src), "-o", str(exe)], check=True)
        procs = [subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True) for _ in range(threads)]
        total: dict[str, float] = {}
        for p in procs:
            for line in p.communicate()[0].splitlines():
                kind, rate = line.split()
                total[kind] = total.get(kind, 0.0) + float(rate)
    return total


def ort_int8(k: int, n: int, threads: int):
    w = np.random.default_rng(0).integers(-63, 64, (k, n), dtype=np.int8)
    nodes = [h.make_node("DynamicQuantizeLinear", ["X"], ["xq", "xs", "xz"]),
             h.make_node("MatMulIntegerToFloat", ["xq", "W", "xs", "ws", "xz"], ["Y"], domain="com.microsoft")]
    inits = [nh.from_array(w, "W"), nh.from_array(np.full((n,), 0.01, np.float32), "ws")]
    sess = session(nodes, inits, k, threads)
    x = np.random.default_rng(1).standard_normal((ROWS, k), dtype=np.float32)
    return lambda: sess.run(None, {"X": x})


def torch_int8(k: int, n: int, engine: str):
    torch.backends.quantized.engine = engine
    w = torch.randn(n, k) * 0.05
    packed = torch.ops.quantized.linear_prepack(torch.quantize_per_tensor(w, float(w.abs().max()) / 127, 0, torch.qint8), None)
    x = torch.randn(ROWS, k)
    return lambda: torch.ops.quantized.linear_dynamic(x, packed, True)


def torch_fp32(name: str, k: int, n: int):
    x = torch.randn(ROWS, k)
    if name == "lm_head":  # nn.Linear, weight [out, in]
        w = torch.randn(n, k)
        return lambda: torch.nn.functional.linear(x, w)
    w, b = torch.randn(k, n), torch.randn(n)  # Conv1D: addmm with the weight [in, out]
    return lambda: torch.addmm(b, x, w)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    engines = [e for e in ("fbgemm", "x86") if e in torch.backends.quantized.supported_engines]
    kernels = {"torch fp32 (eager)": None, **{f"torch int8 {e}": e for e in engines}, "ORT int8 MatMulIntegerToFloat": "ort"}
    ms = {kernel: {} for kernel in kernels}
    for name, k, n, _count in SHAPES:
        for kernel, how in kernels.items():
            fn = torch_fp32(name, k, n) if how is None else ort_int8(k, n, args.threads) if how == "ort" else torch_int8(k, n, how)
            ms[kernel][name] = median_ms(fn, repeat=args.reps)
            print(f"{name:12s} {kernel:32s} {ms[kernel][name]:8.2f} ms", flush=True)
    peaks = simd_peaks(args.threads)

    gmac = {name: ROWS * k * n / 1e9 for name, k, n, _ in SHAPES}
    total_gmac = sum(gmac[name] * count for name, _, _, count in SHAPES)
    total_ms = {kernel: sum(ms[kernel][name] * count for name, _, _, count in SHAPES) for kernel in kernels}
    fp32_ms = total_ms["torch fp32 (eager)"]
    lines = [
        f"Median of {args.reps} runs per kernel and shape; {args.threads} thread(s); CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}. Rate: multiply-accumulates per second of the GEMM alone.", "",
        "| shape (rows x in x out, count) | " + " | ".join(kernels) + " |",
        "|---|" + "---|" * len(kernels),
    ]
    for name, k, n, count in SHAPES:
        cells = [f"{ms[kernel][name]:.2f} ms, {gmac[name] / ms[kernel][name] * 1e3:.0f} GMAC/s" for kernel in kernels]
        lines.append(f"| {name} {ROWS} x {k} x {n}, x{count} | " + " | ".join(cells) + " |")
    lines.append(f"| **GPT-2: {total_gmac:.1f} GMAC** | " + " | ".join(
        f"**{total_ms[kernel]:.0f} ms, {total_gmac / total_ms[kernel] * 1e3:.0f} GMAC/s, {total_ms[kernel] / fp32_ms:.2f} of fp32**"
        for kernel in kernels) + " |")
    lines.append("")
    if peaks:
        best = min((kernel for kernel in kernels if kernel != "torch fp32 (eager)"), key=total_ms.get)
        at_peak = total_gmac / peaks["int8"] * 1e3
        lines += [
            f"SIMD peak of {args.threads} core(s) (C probe, AVX2): fp32 FMA {peaks['fp32']:.0f} GMAC/s, "
            f"int8 `vpmaddubsw`+`vpmaddwd` {peaks['int8']:.0f} GMAC/s ({peaks['int8'] / peaks['fp32']:.1f}x fp32). "
            f"Eager fp32's GEMMs run at {total_gmac / fp32_ms * 1e3 / peaks['fp32']:.0%} of the fp32 peak; "
            f"the fastest int8 kernel ({best}) at {total_gmac / total_ms[best] * 1e3 / peaks['int8']:.0%} of the int8 peak. "
            f"GPT-2's GEMMs at the int8 peak itself would take {at_peak:.0f} ms, {at_peak / fp32_ms:.2f} of eager fp32's GEMM time.",
            "",
        ]
    text = "\n".join(lines)
    print(text)
    write_result("gemm_roofline", "GEMM roofline, GPT-2 small prefill 128 tokens", text)


if __name__ == "__main__":
    main()
