"""Every code block of the README runs as written: each python block in a
fresh interpreter namespace (so a missing import fails), and each shell
command is checked — scripts exist and CI runs the README's test command,
pipelines parse, and the cheap ``fxopt`` commands run (a full-size model is
swapped for its tiny sibling; MiniLM's calibrated pipelines are parsed and
their files checked, the suite runs them in tests/test_cli.py)."""

import os
import re
import shlex
import sys
from pathlib import Path

import pytest

import fxopt
from fxopt.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TINY = {"gpt2": "gpt2-tiny", "llama": "llama-tiny", "bert": "bert-tiny"}


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def shell_commands() -> list[str]:
    commands = []
    for block in blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip() if not line.strip().startswith("#") else ""
            if line:
                commands.append(line)
    return commands


def test_every_block_is_python_or_shell_or_a_diagram():
    fences = re.findall(r"^```(\w*)$", README.read_text(), re.M)
    openings = fences[::2]
    assert set(openings) <= {"python", "sh", ""}
    assert openings.count("") == 1  # the data-flow diagram


def test_readme_is_a_short_user_document():
    text = README.read_text()
    assert len(text.splitlines()) <= 260
    for heading in ("## Set up", "## Python API", "## Cookbook", "## Passes", "## Writing a pass", "## Command line",
                    "## Results", "## More"):
        assert heading in text
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        assert (ROOT / link).exists(), f"README links to a missing file: {link}"


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs_in_a_fresh_namespace(index, tmp_path, monkeypatch):
    block = blocks("python")[index]
    monkeypatch.chdir(tmp_path)
    registered = set(fxopt.REGISTRY.names())
    for name in re.findall(r'@register_pass\("([^"]+)"\)', block):
        if name in registered:  # the example script may have registered it in this process
            fxopt.REGISTRY.unregister(name)
            registered.discard(name)
    try:
        exec(compile(block, f"README.md python block {index}", "exec"), {"__name__": f"readme_block_{index}"})
    finally:
        for name in set(fxopt.REGISTRY.names()) - registered:
            fxopt.REGISTRY.unregister(name)
    if "export_onnx" in block:
        assert (tmp_path / "out" / "gpt2-tiny.onnx").exists()


def test_setup_commands_exist_and_ci_runs_the_readme_test_command():
    commands = shell_commands()
    scripts = [c.split()[0] for c in commands if c.startswith("./scripts/")]
    assert scripts == ["./scripts/quickstart.sh", "./scripts/test.sh"]
    for script in scripts:
        assert os.access(ROOT / script, os.X_OK), script
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1] == "./scripts/test.sh"
    assert "constraints.txt" in (ROOT / "scripts" / "setup.sh").read_text()


def fxopt_commands() -> list[list[str]]:
    return [shlex.split(c)[1:] for c in shell_commands() if c.startswith("fxopt ")]


def test_fxopt_commands_parse_and_their_pipelines_and_files_are_valid():
    commands = fxopt_commands()
    assert len(commands) >= 8
    for argv in commands:
        args = build_parser().parse_args(argv)  # exits on a bad flag
        if getattr(args, "pipeline", None):
            fxopt.PassManager(args.pipeline)  # unknown passes, bad options
        calibration = getattr(args, "calibration", None)
        if calibration and ":" not in calibration:
            assert (ROOT / calibration).is_file(), calibration


@pytest.mark.parametrize("argv", [a for a in fxopt_commands() if a[0] != "optimize" or a[1] in TINY
                                  or a[1].endswith("-tiny") or a[1].startswith("examples.")], ids=" ".join)
def test_fxopt_command_runs(argv, tmp_path, monkeypatch):
    from fxopt.cli import main

    argv = [TINY.get(a, a) if i == 1 else a for i, a in enumerate(argv)]
    if argv[0] == "optimize":
        argv = [str(tmp_path / a) if a.startswith("out/") else a for a in argv] + ["--repeats", "1"]
    monkeypatch.chdir(ROOT)  # as a user runs them: from the repository root
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(argv) == 0
