"""benchmarks/results/ holds one current result file per benchmark, each part
naming the command and the machine it ran on; a rerun of one configuration
replaces its own section and keeps the others."""

import re
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import common  # noqa: E402

HELPERS = {"common", "sentences"}


def test_one_result_file_per_benchmark_and_nothing_else():
    scripts = {p.stem for p in BENCHMARKS.glob("*.py")} - HELPERS
    results = {p.stem for p in (BENCHMARKS / "results").iterdir()}
    assert results <= scripts, f"result files no benchmark writes: {sorted(results - scripts)}"
    for path in (BENCHMARKS / "results").glob("*.png"):
        assert path.with_suffix(".md").exists()


def test_every_result_names_its_command_cpu_and_core_count():
    for path in (BENCHMARKS / "results").glob("*.md"):
        text = path.read_text()
        sections = common.read_sections(path) or {"": text}
        for key, body in sections.items():
            assert re.search(r"`(?:\w+=\S+ )*python benchmarks/\w+\.py[^`]*`", body), f"{path.name} [{key}]: no command"
            assert re.search(r"\d+ cores", body), f"{path.name} [{key}]: no core count"
            assert re.search(r"AMD|Intel|CPU|Processor|ARM", body), f"{path.name} [{key}]: no CPU model"


def test_write_result_replaces_only_its_own_section(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    argv = [str(BENCHMARKS / "fusion.py"), "--models", "gpt2"]
    common.write_result("fusion", "Fusion", "| a | 1 |", section="gpt2", argv=argv)
    common.write_result("fusion", "Fusion", "| b | 2 |", section="minilm", argv=argv[:2] + ["minilm"])
    common.write_result("fusion", "Fusion", "| a | 3 |", section="gpt2", argv=argv)
    sections = common.read_sections(tmp_path / "fusion.md")
    assert list(sections) == ["gpt2", "minilm"]
    assert "| a | 3 |" in sections["gpt2"] and "| a | 1 |" not in sections["gpt2"] and "| b | 2 |" in sections["minilm"]
    first = sections["gpt2"].splitlines()[0]
    assert first.startswith("`python benchmarks/fusion.py --models gpt2` on ") and f"{common.machine()};" in first
    assert (tmp_path / "fusion.md").read_text().startswith("# Fusion\n")
    assert f"{__import__('os').cpu_count()} cores" in common.machine()
