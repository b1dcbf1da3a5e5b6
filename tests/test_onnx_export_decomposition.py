"""The ONNX Runtime backend skips torch.onnx's decomposition re-trace of the
whole program when none of its ops needs decomposing: Hugging Face's mask code
(``&``, ``diff`` with a prepended column) is first written with ops the
exporter translates. A program with an op only the decomposition handles
(``var``) still goes through it. Both match eager PyTorch."""

import pytest
import torch
from torch.export import Dim

import fxopt


class MaskLogic(torch.nn.Module):
    """The shapes of Hugging Face's padding and packed-sequence checks."""

    def forward(self, x, ids):
        keep = (x > 0) & (x < 1) | (x > 2)
        steps = torch.diff(ids, dim=-1, prepend=ids[:, :1])  # int64, a prepended column
        edges = torch.diff(keep, dim=1)  # booleans: True where a row flips
        return x * keep + steps.unsqueeze(-1), edges


class Variance(MaskLogic):
    def forward(self, x, ids):
        out, edges = super().forward(x, ids)
        return out / (x.var(-1, keepdim=True) + 1), edges


def inputs(batch, length):
    return (torch.randn(batch, length, 8) * 2, torch.randint(0, 50, (batch, length)))


@pytest.fixture
def retraces(monkeypatch):
    """How many times ExportedProgram.run_decompositions runs."""
    calls = []
    original = torch.export.ExportedProgram.run_decompositions

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", counted)
    return calls


@pytest.mark.parametrize("model, retraced", [(MaskLogic(), 0), (Variance(), 1)], ids=["translatable", "needs-var"])
def test_decomposition_runs_only_when_an_op_needs_it_and_both_match_eager(model, retraced, retraces):
    batch, length = Dim("batch", min=2), Dim("length", min=3)
    graph = fxopt.trace(model, inputs(2, 5), dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length}))
    targets = {n.target for n in graph.fx.nodes}
    assert {torch.ops.aten.diff.default, torch.ops.aten.__and__.Tensor} <= targets
    retraces.clear()
    compiled = fxopt.compile(graph, "onnxruntime")
    assert len(retraces) == retraced
    for shape in [(2, 5), (3, 9)]:
        args = inputs(*shape)
        for got, want in zip(compiled(*args), model(*args)):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class MixedTypes(torch.nn.Module):
    """ATen promotes implicitly where ONNX needs casts: int64 times float32,
    float16 plus float32, an int64 tensor divided by a Python float."""

    def forward(self, x, ids, h):
        scaled = x * ids.unsqueeze(-1) + h.unsqueeze(-1)
        return scaled.relu().sum(-1), ids / 3.0


def test_type_promotion_runs_only_the_promoted_nodes_and_matches_eager(monkeypatch):
    runs = []
    original = torch.fx.Interpreter.run_node

    def counted(self, n):  # the nodes the exporter's type promotion runs on fake tensors
        if n.op == "call_function" and type(self).__name__ == "_TypePromotionInterpreter":
            runs.append(n.target)
        return original(self, n)

    model = MixedTypes()
    example = (torch.randn(2, 5, 8), torch.randint(0, 9, (2, 5)), torch.randn(2, 5).half())
    graph = fxopt.trace(model, example, dynamic_shapes=({0: Dim("batch")}, {0: Dim("batch")}, {0: Dim("batch")}))
    monkeypatch.setattr(torch.fx.Interpreter, "run_node", counted)
    compiled = fxopt.compile(graph, "onnxruntime")
    monkeypatch.undo()
    # only the promoted mul, add and div and the three casts inserted before them run on fake tensors
    assert sorted(map(str, runs)) == sorted(["aten.mul.Tensor", "aten.add.Tensor", "aten.div.Scalar"]
                                            + ["prims.convert_element_type.default"] * 3), runs
    for batch in (2, 5):
        args = (torch.randn(batch, 5, 8), torch.randint(0, 9, (batch, 5)), torch.randn(batch, 5).half())
        for got, want in zip(compiled(*args), model(*args)):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
