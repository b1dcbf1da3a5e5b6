"""fxopt's own ops: eager kernel, fake kernel and ONNX lowering, used by a pass."""

import onnx
import pytest
import torch
import torch.nn.functional as F

import fxopt
from fxopt.ir.ops import ACTIVATIONS, registered_ops
from fxopt.passes import Pass, PassManager, PassResult, register_pass
from fxopt.passes.registry import PassRegistry
from conftest import model_spec, reference, run, trace_once

aten = torch.ops.aten


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_linear_act_eager_matches_its_definition(activation):
    x, w, b = torch.randn(2, 3, 8), torch.randn(5, 8), torch.randn(5)
    expected = ACTIVATIONS[activation](F.linear(x, w, b))
    torch.testing.assert_close(torch.ops.fxopt.linear_act(x, w, b, activation), expected)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = torch.ops.fxopt.linear_act(mode.from_tensor(x), mode.from_tensor(w), None, activation)
    assert fake.shape == (2, 3, 5)


def test_linear_act_rejects_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        torch.ops.fxopt.linear_act(torch.randn(2, 4), torch.randn(3, 4), None, "tanh")


def test_registered_ops_have_all_three_parts():
    ops = registered_ops()
    assert "linear_act" in ops and ops["linear_act"].onnx is not None and ops["linear_act"].doc


# A small pass written against the public API: it rewrites linear -> gelu into
# the fused op, so the op travels through the pass manager and both backends.
_local = PassRegistry()


@register_pass("test-linear-gelu", registry=_local)
class LinearGelu(Pass):
    """linear followed by gelu -> fxopt.linear_act."""

    def run(self, graph):
        n = 0
        for gelu in self.walk(graph, target=aten.gelu.default):
            lin = gelu.args[0]
            if lin.target != aten.linear.default or len(lin.users) != 1:
                continue
            approx = gelu.kwargs.get("approximate", "none")
            x, w, b = (list(lin.args) + [None])[:3]
            with graph.fx.inserting_before(gelu):
                fused = graph.fx.call_function(torch.ops.fxopt.linear_act.default, (x, w, b, "gelu" if approx == "none" else "gelu_tanh"))
            gelu.replace_all_uses_with(fused)
            graph.fx.erase_node(gelu)
            graph.fx.erase_node(lin)
            n += 1
        return PassResult(n > 0, {"fused": n})


@pytest.mark.parametrize("name,activation_op", [("mlp", "BiasGelu"), ("tiny-gpt", "FastGelu")])
def test_fxopt_op_runs_on_both_backends_and_lowers_to_contrib_ops(name, activation_op):
    spec = model_spec(name)
    graph = trace_once(spec)
    pm = PassManager([fxopt.REGISTRY.create("canonicalize"), LinearGelu()])
    result = pm.run(graph)
    fused = result.records[-1].stats["fused"]
    assert fused == 2
    for backend in ("eager", "onnxruntime"):
        compiled = fxopt.compile(result.graph, backend)
        assert fxopt.compare(reference(spec), run(compiled, spec.example_inputs)).within(1e-4)
    proto = compiled.program.model_proto  # the ONNX Runtime model's
    ops = [(n.domain, n.op_type) for n in proto.graph.node]
    assert ("com.microsoft", activation_op) in ops
    onnx.checker.check_model(proto)
