"""The project speaks of itself, not of how it was built: no numbered rounds
of work, issue numbers, "the port" or the machine a figure came from in any
tracked file (code, comments, docs, results, test names). ONNX Runtime's own
words ("InferenceSession", "an ONNX Runtime session") are allowed."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Ordinals only: "two sessions" may be two ONNX Runtime sessions; "the ninth session" is history.
ORDINAL = r"first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|\d+(?:st|nd|rd|th)"
HISTORY = re.compile("|".join([
    r"(?<![a-z])sessions?[ _-]?\d+",                               # "session 9", "quant_speed_session8"
    rf"\b(?:{ORDINAL})[ _-]+(?:\w+[ _-]+)?(?:dev\w* )?sessions?\b",  # "the ninth session", "first eight sessions"
    r"\bissues?[ _-]?#?\d+",                                 # "issue 3", "issue #4"
    r"\b(?:this|shared|loaded|development|dev) machine",    # where a figure was taken belongs in a result header
    r"\bthe port\b",
    r"\brounds? \d+ of (?:the )?work",
]), re.I)

TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".sh", ".cfg", ".ini", ".yaml", ".yml", ".json", ""}


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.decode().split("\0") if name]


def history_hits(text: str) -> list[str]:
    return [m.group(0) for m in HISTORY.finditer(text)]


def test_the_pattern_catches_development_history_and_spares_onnx_runtime_words():
    for bad in ("measured in session 9", "the ninth session's CPU", "quant_speed_session10_run2.md",
                "the first eight sessions", "Goals (issue 3, warm)", "on this machine", "one thread, shared machine",
                "loaded machine", "measured before the port"):
        assert history_hits(bad), bad
    for fine in ("ort.InferenceSession(path)", "an ONNX Runtime session per model", "session.run(None, feed)",
                 "both sessions in one process", "the weights once per session (two sessions)", "session_options(2, 1)", "fixtures built once per test session",
                 "export_onnx_program", "the report of a portable model"):
        assert not history_hits(fine), fine


def test_no_tracked_file_speaks_of_how_the_project_was_developed():
    hits = []
    for path in tracked_files():
        if path.suffix not in TEXT_SUFFIXES or path == Path(__file__).resolve() or not path.is_file():
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            hits += [f"{path.relative_to(ROOT)}:{lineno}: {hit!r}" for hit in history_hits(line)]
        hits += [f"{path.relative_to(ROOT)}: file name" for _ in history_hits(path.name)]
    assert not hits, "development history in the product:\n" + "\n".join(hits)
