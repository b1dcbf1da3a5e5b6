"""The README's custom-pass example (examples/custom_pass.py) runs as written
and does what it says."""

import importlib.util
from pathlib import Path

import torch

from fxopt.passes import REGISTRY

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom_pass.py"


def load_example():
    spec = importlib.util.spec_from_file_location("fxopt_example_custom_pass", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    if "fuse-swish" in REGISTRY:  # registered by an earlier import in this process
        REGISTRY.unregister("fuse-swish")
    spec.loader.exec_module(module)
    return module


def test_custom_pass_example(capsys):
    example = load_example()
    # The user's pass itself stays short.
    source = EXAMPLE.read_text().splitlines()
    start = next(i for i, line in enumerate(source) if line.startswith("def swish"))
    end = next(i for i, line in enumerate(source) if line.startswith("class Swish"))
    assert end - start < 25
    assert "fuse-swish" in REGISTRY
    result, parity = example.main()
    assert parity.within(1e-5)
    swish = result.records[1].stats["swish"]
    assert (swish["found"], swish["rewritten"]) == (1, 1)
    fused = result.graph
    ops = [n.target for n in fused.fx.nodes if n.op == "call_function"]
    assert torch.ops.fxopt.linear_act.default in ops and torch.ops.aten.sigmoid.default not in ops
    assert any(n.args[3] == "silu" for n in fused.fx.nodes if n.target == torch.ops.fxopt.linear_act.default)
    out = capsys.readouterr().out
    assert "{'found': 1, 'rewritten': 1, 'skipped': {}}" in out and "Parity(max_abs_err=" in out


def test_walking_pass_example_runs_and_folds():
    import runpy

    if "fold-double-neg" in REGISTRY:  # registered by an earlier run in this process
        REGISTRY.unregister("fold-double-neg")
    example = runpy.run_path(str(EXAMPLE.parent / "walk_pass.py"))
    assert example["out"].records[0].stats == {"folded": 1}
    assert not any(n.target is torch.ops.aten.neg.default for n in example["out"].graph.fx.nodes)
