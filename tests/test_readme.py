"""The README's Python examples run as written."""

import re
from pathlib import Path

import fxopt

README = Path(__file__).parent.parent / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace = {"fxopt": fxopt}
    for name in ("fuse-swish", "fold-double-neg"):  # the example file may have registered them
        fxopt.REGISTRY.unregister(name)
    registered = set(fxopt.REGISTRY.names())
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    finally:
        for name in set(fxopt.REGISTRY.names()) - registered:
            fxopt.REGISTRY.unregister(name)
    assert (tmp_path / "out" / "gpt2-tiny.onnx").exists()
