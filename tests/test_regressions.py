"""Bugs found in review, each pinned by the smallest model that showed it."""

import math

import pytest
import torch

import fxopt
from fxopt.passes import NumericsError, Pass, PassError, PassManager, PassResult, parse_pipeline
from fxopt.passes.registry import PassRegistry

BASE = "canonicalize,dce,constant-fold,cse"


class InPlace(torch.nn.Module):
    """In-place writes into fresh tensors (T5's relative-position buckets do this)."""

    def forward(self, x):
        buckets = torch.zeros(4)
        buckets += 1  # constant-folding this into a shared buffer would grow it every call
        a, b = x.clone(), x.clone()
        a.add_(1)  # CSE must not merge the two clones
        c = torch.full((4, 4), 2.0).triu_()  # an in-place op on a constant-only value
        return a + b + buckets + c.sum(0)


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_in_place_ops_survive_folding_and_cse_across_calls(backend):
    model, x = InPlace(), torch.randn(4)
    compiled = fxopt.compile(PassManager(BASE).run(fxopt.trace(model, (x,))).graph, backend)
    for _ in range(3):
        assert fxopt.compare(model(x), compiled(x)).max_abs_err < 1e-6


def test_nan_outputs_never_pass_parity():
    ref = torch.ones(3)
    assert not fxopt.compare(ref, torch.tensor([1.0, float("nan"), 1.0])).within(1e-4)
    assert math.isnan(fxopt.compare(ref, torch.full((3,), float("nan"))).max_abs_err)
    assert fxopt.compare(torch.tensor([float("nan")]), torch.tensor([float("nan")])).within(1e-4)


def test_canonicalize_makes_one_transposed_copy_per_shared_weight():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(64, 64))

        def forward(self, x):
            return x @ self.w + (x * 2) @ self.w + (x * 3) @ self.w

    model, x = Shared(), torch.randn(2, 64)
    graph = fxopt.trace(model, (x,))
    out = PassManager(BASE).run(graph).graph
    assert out.param_bytes() == graph.param_bytes()
    assert sum(n.target == torch.ops.aten.linear.default for n in out.fx.nodes) == 3
    torch.testing.assert_close(out(x), model(x))


def test_onnxruntime_handles_an_input_that_is_also_an_output():
    class PassThrough(torch.nn.Module):
        def forward(self, x, y):
            return x + 1, y

    x, y = torch.randn(2), torch.randn(3)
    compiled = fxopt.compile(PassManager(BASE).run(fxopt.trace(PassThrough(), (x, y))).graph, "onnxruntime")
    a, b = compiled(x, y)
    torch.testing.assert_close(a, x + 1)
    torch.testing.assert_close(b, y)


def test_onnxruntime_refuses_a_changed_non_tensor_input():
    class Scale(torch.nn.Module):
        def forward(self, x, n: int):
            return x * n

    compiled = fxopt.compile(fxopt.trace(Scale(), (torch.randn(2), 2)), "onnxruntime")
    torch.testing.assert_close(compiled(torch.ones(2), 2), torch.full((2,), 2.0))
    with pytest.raises(fxopt.BackendError, match="input #1 was 2 when traced"):
        compiled(torch.ones(2), 5)


def test_a_pass_that_changes_the_outputs_interface_is_refused():
    reg = PassRegistry()

    class ToHalf(Pass):
        """Casts the output to float16: the model's interface changes."""

        def run(self, graph):
            out = next(n for n in graph.fx.nodes if n.op == "output")
            (value,) = out.args[0]
            with graph.fx.inserting_before(out):
                half = graph.fx.call_function(torch.ops.aten._to_copy.default, (value,), {"dtype": torch.float16})
            out.args = ((half,),)
            return PassResult(True)

    reg.register(ToHalf, "to-half")
    graph = fxopt.trace(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.raises(PassError, match="pass 'to-half' failed: changed the model's outputs \\(output 0: f32\\[2, 4\\] -> f16\\[2, 4\\]\\)"):
        PassManager("to-half", registry=reg).run(graph)


def test_pipeline_round_trips_infinite_and_nan_floats():
    reg = PassRegistry()

    class Tol(Pass):
        """Holds a float option."""

        limit = fxopt.Option(1.0)

        def run(self, graph):
            return PassResult(False)

    reg.register(Tol, "tol")
    for value in (float("inf"), float("-inf")):
        (p,) = parse_pipeline(str(Tol(limit=value)), reg)
        assert p.limit == value
    (p,) = parse_pipeline(str(Tol(limit=float("nan"))), reg)
    assert math.isnan(p.limit)
    with pytest.raises(fxopt.PipelineError, match="max_iterations"):
        parse_pipeline("fixed-point(tol,max_iterations=true)", reg)
    with pytest.raises(fxopt.PipelineError, match="given twice"):
        parse_pipeline("fixed-point(tol,max_iterations=2,max_iterations=3)", reg)


class Counter(torch.nn.Module):
    """State in a buffer (a call counter; a running average or a static KV cache alike)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count += 1
        return x * self.count


def test_a_buffer_the_model_writes_is_state_not_a_constant():
    # constant-fold froze count + 1 at its traced value (every call returned x * 1),
    # and the ONNX export dropped the write without a word
    graph = fxopt.trace(Counter(), (torch.ones(2),))
    assert graph.written_attributes() == ["count"]
    model = Counter()
    # check_numerics runs the graphs more than once: each run starts from the same state
    result = PassManager(BASE, check_numerics=True).run(graph)
    assert any(n.target == torch.ops.aten.add.Tensor for n in result.graph.fx.nodes)  # not folded
    compiled = fxopt.compile(result.graph, "eager")
    assert [compiled(torch.ones(2))[0].item() for _ in range(3)] == [model(torch.ones(2))[0].item() for _ in range(3)] == [1, 2, 3]
    with pytest.raises(fxopt.BackendError, match=r"writes its buffer\(s\) \['count'\].*eager backend"):
        fxopt.compile(result.graph, "onnxruntime")


def test_check_numerics_tolerance_follows_the_output_dtype():
    # float16 GPT-2's logits move by one float16 rounding step when a pass
    # reorders an op: within 5e-3 of the scale, beyond float32's 1e-4
    from fxopt.models import gpt2

    spec = gpt2("tiny")
    model = spec.model.half()
    graph = fxopt.trace(model, spec.example_inputs)
    assert PassManager(BASE, check_numerics=True).run(graph).records[-1].numerics is not None

    # A drift of 2e-3 of the scale, made on purpose (whether a real pass moves
    # float16 logits by a rounding step depends on the CPU's float16 kernels)
    reg = PassRegistry()

    class Nudge(Pass):
        """Scales the first output by 1.002."""

        def run(self, graph):
            out = next(n for n in graph.fx.nodes if n.op == "output")
            first, *rest = out.args[0]
            with graph.fx.inserting_before(out):
                nudged = graph.fx.call_function(torch.ops.aten.mul.Tensor, (first, 1.002))
            out.args = ((nudged, *rest),)
            return PassResult(True)

    reg.register(Nudge, "nudge")
    assert PassManager("nudge", registry=reg, check_numerics=True).run(graph).records[-1].numerics is not None
    with pytest.raises(NumericsError, match="drifted"):  # an explicit tolerance still wins
        PassManager("nudge", registry=reg, check_numerics=True, tolerance=1e-4).run(graph)
    float_graph = fxopt.trace(gpt2("tiny").model, spec.example_inputs)
    with pytest.raises(NumericsError, match="drifted"):  # float32 outputs: 1e-4 by default
        PassManager("nudge", registry=reg, check_numerics=True).run(float_graph)


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_the_whole_flow_runs_inside_inference_mode(backend):
    """Users wrap inference in torch.inference_mode(); there torch.randn made
    pattern-tracing inputs that torch.export refused (fuse-linear-act failed),
    and quantized weights became inference tensors without a version counter."""
    pipeline = ("canonicalize,dce,constant-fold,cse,fuse-attention,merge-linears,"
                "quantize(mode=dynamic,act_granularity=tensor),pack-attention,fuse-linear-act,fuse-norm,dce")
    with torch.inference_mode():
        # built inside inference mode, so its weights are inference tensors too
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(approximate="tanh"),
                                    torch.nn.LayerNorm(128), torch.nn.Linear(128, 64)).eval()
        x = torch.randn(3, 64)
        result = PassManager(pipeline).run(fxopt.trace(model, (x,)))
        fused = [r for r in result.records if r.name == "fuse-linear-act"][0]
        assert fused.stats["rewritten"] == 1
        compiled = fxopt.compile(result.graph, backend)
        expected = model(x)
        for _ in range(2):  # the second call reuses the packed weight
            assert fxopt.compare(expected, compiled(x)).within(0.05)
        # the guard re-traces each layer cut out of the graph, weights included
        guarded = PassManager(f"canonicalize,quantize(guard=true,guard_backend={backend})").run(fxopt.trace(model, (x,)))
        assert fxopt.compare(expected, fxopt.compile(guarded.graph, backend)(x)).within(0.05)
