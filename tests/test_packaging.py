"""`pip install .` installs every subpackage: pyproject's explicit package list
names each folder of fxopt/, ir/, passes/ and backends/ that holds an
__init__.py, and torch is a range, not a pin (the set-up scripts pin it)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    for package, folder in config["tool"]["setuptools"]["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            assert ".".join((package, *relative)) in listed, f"{init.parent} is not installed (add it to pyproject's packages)"


def test_dependencies_are_ranges_and_the_exact_torch_pin_lives_in_the_constraints():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in dependencies if "==" in d]
    assert any(d.startswith("torch>=") for d in dependencies)
    assert "torch==" in (ROOT / "scripts" / "constraints.txt").read_text()
