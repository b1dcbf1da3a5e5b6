"""Tracing, metadata, verification, the text IR, and saving/loading graphs."""

import operator

import pytest
import torch
from torch.export import Dim

import fxopt
from fxopt.ir import VerificationError
from conftest import model_spec, reference, run


def test_trace_keeps_parameters_as_attributes_and_inputs_as_the_models():
    spec = model_spec("tiny-gpt")
    graph = fxopt.trace(spec.model, spec.example_inputs)
    # ids, past_k, past_v: no lifted parameters among the inputs
    assert [p.name for p in graph.placeholders()] == ["ids", "past_k", "past_v"]
    assert graph.param_bytes() > 0
    assert all("val" in n.meta for n in graph.fx.nodes if n.op != "output")
    assert fxopt.compare(reference(spec), run(graph, spec.example_inputs)).max_abs_err == 0


def test_dynamic_dims_are_symbolic_and_run_with_other_shapes():
    spec = model_spec("tiny-gpt")
    graph = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
    dims = graph.symbolic_dims()
    assert dims["ids"] == [0] and dims["past_k"] == [1, 3]
    other = spec.other_inputs[0]
    assert fxopt.compare(reference(spec, other), run(graph, other)).within(1e-6)


def test_text_ir_shows_ops_and_shapes():
    spec = model_spec("mlp")
    graph = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, name="mlp")
    text = str(graph)
    assert text.startswith("graph mlp(%x: f32[s")
    assert "= aten.linear(%x, %layers_0_weight, %layers_0_bias)" in text
    assert "f32[64, 32] = param layers.0.weight" in text
    assert text.rstrip().endswith("}")


def test_verify_names_the_node_at_fault():
    spec = model_spec("mlp")
    graph = fxopt.trace(spec.model, spec.example_inputs)
    graph.verify()
    relu = next(n for n in graph.fx.nodes if n.target == torch.ops.aten.gelu.default)

    bad = graph.copy()
    node = next(n for n in bad.fx.nodes if n.name == relu.name)
    node.target = torch.nn.functional.gelu  # a Python function is outside the op set
    with pytest.raises(VerificationError, match=f"node '{relu.name}'.*outside the documented op set"):
        bad.verify()

    bad = graph.copy()
    del next(n for n in bad.fx.nodes if n.name == relu.name).meta["val"]
    with pytest.raises(VerificationError, match="no shape/dtype metadata"):
        bad.verify()

    bad = graph.copy()
    bad.module.register_buffer("orphan", torch.zeros(3))
    with pytest.raises(VerificationError, match="dangling.*orphan"):
        bad.verify()

    bad = graph.copy()
    attr = next(n for n in bad.fx.nodes if n.op == "get_attr")
    attr.target = "no_such_weight"
    with pytest.raises(VerificationError, match="no_such_weight"):
        bad.verify()


def test_copy_is_independent_but_shares_constants():
    spec = model_spec("mlp")
    graph = fxopt.trace(spec.model, spec.example_inputs)
    before = str(graph)
    twin = graph.copy()
    for n in list(twin.fx.nodes):
        if n.target == torch.ops.aten.gelu.default:
            n.replace_all_uses_with(n.args[0])
            twin.fx.erase_node(n)
    twin.recompile()
    assert str(graph) == before
    assert twin.get_attr("layers.0.weight") is graph.get_attr("layers.0.weight")


def test_add_constant_avoids_names_torch_export_would_lift_onto_another():
    # torch.export lifts attribute "w" as input "b_w": a new "b_w" (or, the other
    # way round, a new "w" beside "b_w") would make two tensors share one name.
    graph = fxopt.trace(model_spec("mlp").model, model_spec("mlp").example_inputs)
    first = graph.add_constant(torch.zeros(2), "w")
    second = graph.add_constant(torch.ones(2), "b_w")
    third = graph.add_constant(torch.ones(3), "qweight")
    fourth = graph.add_constant(torch.ones(3), "b_qweight")
    assert first.target == "w" and second.target != "b_w"
    assert third.target == "qweight" and fourth.target != "b_qweight"
    later = graph.add_constant(torch.ones(2), "p_layers_0_weight")  # lifted name of parameter layers.0.weight
    assert later.target != "p_layers_0_weight"


def test_merge_equal_constants_keeps_one_of_equal_tensors():
    graph = fxopt.trace(model_spec("mlp").model, model_spec("mlp").example_inputs)
    a = graph.add_constant(torch.arange(6.0).reshape(2, 3), "a")
    b = graph.add_constant(torch.arange(6.0).reshape(2, 3), "b")  # equal values, other storage
    c = graph.add_constant(torch.arange(6.0).reshape(3, 2), "c")  # same values, other shape
    d = graph.add_constant(torch.arange(6).reshape(2, 3), "d")  # other dtype
    users = [graph.fx.call_function(torch.ops.aten.clone.default, (n,)) for n in (a, b, c, d)]
    assert graph.merge_equal_constants([a, b, c, d]) == [b]
    assert [u.args[0] for u in users] == [a, a, c, d]
    assert b not in set(graph.fx.nodes)
    # Kept nodes carry over to a later call.
    kept: dict = {}
    graph.merge_equal_constants([a], kept)
    e = graph.add_constant(torch.arange(6.0).reshape(2, 3), "e")
    assert graph.merge_equal_constants([e], kept) == [e]


def test_save_and_load_roundtrip_with_an_fxopt_op(tmp_path):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 4))
            self.b = torch.nn.Parameter(torch.randn(8))

        def forward(self, x):
            return torch.ops.fxopt.linear_act(x, self.w, self.b, "gelu_tanh") * 2

    x = torch.randn(3, 4)
    graph = fxopt.trace(M(), (x,), dynamic_shapes=({0: Dim.DYNAMIC},))
    assert any(n.target == torch.ops.fxopt.linear_act.default for n in graph.fx.nodes)
    graph.save(tmp_path / "g.pt2")
    loaded = fxopt.load(tmp_path / "g.pt2")
    loaded.verify()
    x2 = torch.randn(5, 4)
    torch.testing.assert_close(loaded(x2), graph(x2))
    assert loaded.symbolic_dims() == graph.symbolic_dims()


def test_untraceable_model_gives_a_trace_error():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # control flow on data cannot be traced
                return x + 1
            return x - 1

    with pytest.raises(fxopt.TraceError, match="torch.export could not trace DataDependent"):
        fxopt.trace(DataDependent(), (torch.randn(3),))


def test_trace_restores_training_mode():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train()
    graph = fxopt.trace(model, (torch.randn(2, 4),))
    assert model.training
    x = torch.randn(2, 4)
    torch.testing.assert_close(graph(x), model.eval()(x))


def test_documented_op_set_admits_symint_arithmetic():
    from fxopt.ir.verify import op_allowed

    assert op_allowed(operator.getitem) and op_allowed(operator.mul)
    assert op_allowed(torch.ops.aten.add.Tensor) and op_allowed(torch.ops.fxopt.linear_act.default)
    assert not op_allowed(torch.add)


def test_row_cosines_find_the_one_bad_row_a_global_cosine_hides():
    from fxopt.ir import ParityError, row_cosines

    ref = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    out = ref.clone()
    out[1, 3] = -out[1, 3]  # one position's logits turned around
    cos = row_cosines({"logits": ref}, {"logits": out})
    assert cos.shape == (16,) and cos.dtype == torch.float64
    assert cos.min().item() == pytest.approx(-1.0) and (cos > 0.999).sum() == 15
    assert fxopt.compare(ref, out).cosine > 0.8  # the whole tensor's cosine barely notices
    with pytest.raises(ParityError, match="shape"):
        row_cosines(ref, out[:, :4])
