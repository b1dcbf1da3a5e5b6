"""What every benchmark writes: one current result file per benchmark,
``benchmarks/results/<benchmark>.md``, each part headed by the command that
produced it and the machine it ran on (CPU model, core count). A benchmark run
with a configuration option (a model, a quantization) replaces only its own
section of the file, so the file always holds the latest run of each; earlier
runs live in git history."""

from __future__ import annotations

import datetime
import os
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
_SECTION = re.compile(r"<!-- section: (.*?) -->\n")


def cpu_name() -> str:
    """The CPU model and whether it has int8 dot-product instructions: the
    int8 speed-ups depend on it."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or platform.machine() or "CPU unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "CPU unknown")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extras = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{name} ({', '.join(extras)})" if extras else name


def machine() -> str:
    """``<CPU model> (<int8-relevant flags>), <n> cores``."""
    return f"{cpu_name()}, {os.cpu_count()} cores"


def command(argv: list[str] | None = None) -> str:
    """The command line that reproduces this run, from the repository root."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", str(script), *map(shlex.quote, argv[1:])])


def provenance(argv: list[str] | None = None) -> str:
    """One line: the command, the machine, the library versions and the date."""
    import onnxruntime
    import torch

    return (f"`{command(argv)}` on {machine()}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
            f"{datetime.date.today().isoformat()}.")


def write_result(name: str, title: str, body: str, *, section: str | None = None, intro: str = "",
                 argv: list[str] | None = None) -> Path:
    """Write ``results/<name>.md``: ``# title``, ``intro``, then one section per
    configuration (``section``; None for a benchmark with a single one), each
    starting with its :func:`provenance`. Sections of other configurations
    already in the file are kept."""
    path = RESULTS / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    sections = read_sections(path) if section is not None and path.exists() else {}
    key = section or ""
    sections[key] = f"{provenance(argv)}\n\n{body.strip()}\n"
    parts = [f"# {title}\n"] + ([intro.strip() + "\n"] if intro.strip() else [])
    for k, text in sections.items():
        parts.append(f"<!-- section: {k} -->\n" + (f"## {k}\n\n" if k else "") + text)
    path.write_text("\n".join(parts))
    return path


def read_sections(path: Path) -> dict[str, str]:
    """The sections of a result file written by :func:`write_result`, by key,
    each without its ``## key`` heading."""
    text = path.read_text()
    marks = list(_SECTION.finditer(text))
    out = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        body = text[m.end():end]
        heading = f"## {m.group(1)}\n\n"
        out[m.group(1)] = (body[len(heading):] if body.startswith(heading) else body).rstrip() + "\n"
    return out


class captured:
    """``with captured() as out:`` prints as usual and keeps a copy of what
    was printed in ``out.text``, for a benchmark that reports by printing."""

    def __enter__(self):
        import io

        self._stdout, self._buffer = sys.stdout, io.StringIO()
        outer, buffer = self._stdout, self._buffer

        class Tee:
            def write(self, s):
                buffer.write(s)
                return outer.write(s)

            def flush(self):
                outer.flush()

        sys.stdout = Tee()
        return self

    def __exit__(self, *exc):
        sys.stdout = self._stdout
        self.text = self._buffer.getvalue()
        return False


def _median_seconds(fn, threads: int) -> float:
    """Seconds of ``fn()`` on ``threads`` threads: the median of 5 after one warm-up."""
    import time

    import torch

    torch.set_num_threads(threads)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[2]


def copy_bandwidth_gbs(threads: int) -> float:
    """Bytes read plus written per second by a 256 MiB tensor copy, on ``threads`` threads."""
    import torch

    src = torch.ones(64 * 2 ** 20, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _median_seconds(lambda: dst.copy_(src), threads) / 1e9


def read_gbs(threads: int) -> float:
    """Bytes read per second summing a 256 MiB float32 tensor on ``threads``
    threads: the rate at which a forward can stream its weights at best."""
    import torch

    w = torch.ones(64 << 20)
    return w.numel() * 4 / _median_seconds(lambda: w.sum(), threads) / 1e9
