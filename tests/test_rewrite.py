"""The pattern-rewrite engine (fxopt.passes.rewrite): each test is a small
model, a pattern written as plain Python, and what the engine must do with it."""

import operator

import pytest
import torch
import torch.nn.functional as F

import fxopt
from fxopt.passes import PassManager, register_pass
from fxopt.passes.registry import PassRegistry
from fxopt.passes.rewrite import (
    Pattern, PatternError, RewritePass, explain, find_matches, has_rank, is_constant, rewrite,
)

aten = torch.ops.aten


def traced(module, *inputs):
    g = fxopt.trace(module.eval(), inputs)
    return PassManager("canonicalize,dce").run(g).graph


def rewritten(graph, patterns):
    g = graph.copy()
    result = rewrite(g, patterns)
    g.recompile()
    g.refresh_meta_all()
    g.verify()
    return g, result


def targets(graph):
    return [n.target for n in graph.fx.nodes if n.op == "call_function"]


def assert_same_outputs(graph, new, *inputs, backends=("eager",)):
    ref = graph(*inputs)
    for backend in backends:
        out = fxopt.compile(new, backend)(*inputs)
        assert fxopt.compare(ref, out).within(1e-5), backend


# --- patterns used below ------------------------------------------------------------------

def linear_gelu(x, w, b):
    return F.gelu(F.linear(x, w, b))


def linear_gelu_fused(x, w, b):
    return torch.ops.fxopt.linear_act(x, w, b, "gelu")


LINEAR_SHAPES = {"x": (2, 8), "w": (16, 8), "b": (16,)}
LINEAR_GELU = Pattern("linear-gelu", linear_gelu, linear_gelu_fused, where={"w": is_constant}, inputs=LINEAR_SHAPES)


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


def test_wildcards_and_a_predicate_rewrite_a_model_on_both_backends():
    graph = traced(MLP(), torch.randn(3, 8))
    new, result = rewritten(graph, [LINEAR_GELU])
    assert result.as_dict()["linear-gelu"] == {"found": 1, "rewritten": 1, "skipped": {}}
    assert aten.gelu.default not in targets(new) and torch.ops.fxopt.linear_act.default in targets(new)
    assert_same_outputs(graph, new, torch.randn(3, 8), backends=("eager", "onnxruntime"))


class WeightAsInput(torch.nn.Module):
    def forward(self, x, w, b):
        return F.gelu(F.linear(x, w, b))


def test_predicate_refuses_and_the_nearest_miss_says_why():
    graph = traced(WeightAsInput(), torch.randn(3, 8), torch.randn(16, 8), torch.randn(16))
    new, result = rewritten(graph, [LINEAR_GELU])
    stats = result.stats["linear-gelu"]
    assert (stats.found, stats.rewritten) == (0, 0)
    assert targets(new) == targets(graph)
    # The anchor (gelu) occurs, so the engine explains which check failed where.
    assert "nearest miss at anchor %gelu" in stats.nearest_miss
    assert "where['w'] (is_constant) rejected %w (placeholder)" in stats.nearest_miss
    assert explain(LINEAR_GELU, graph) == stats.nearest_miss


def test_nearest_miss_names_the_pattern_node_and_graph_node_that_differ():
    def linear_tanh_gelu(x, w, b):
        return F.gelu(F.linear(x, w, b), approximate="tanh")

    p = Pattern("linear-gelu-tanh", linear_tanh_gelu, linear_gelu_fused, inputs=LINEAR_SHAPES)
    text = explain(p, traced(MLP(), torch.randn(3, 8)))
    assert "no match among 1 aten.gelu.default node(s)" in text
    assert "pattern node %gelu vs graph %gelu (aten.gelu.default): argument 1: literal 'tanh' expected, found 'none'" in text
    absent = Pattern("relu", lambda x: torch.relu(x), lambda x: x)
    assert "the anchor op aten.relu.default does not occur" in explain(absent, traced(MLP(), torch.randn(3, 8)))


class RMSNorm(torch.nn.Module):
    """Writes the weight product both ways round, and two epsilons."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = torch.nn.Parameter(torch.rand(8) + 0.5), torch.nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w1
        return self.w2 * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))


def rms(x, w, eps: float):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rms_explicit(x, w, eps: float):
    return (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)) * w


def test_commutative_ops_and_captured_scalars():
    graph = traced(RMSNorm(), torch.randn(2, 3, 8))
    p = Pattern("rms", rms, rms_explicit, inputs={"x": (2, 8), "w": (8,)})
    matches = find_matches(p, graph)
    # mul(w, n) and mul(n, w) both match; each norm keeps its own epsilon.
    assert sorted(m["eps"] for m in matches) == [1e-6, 1e-5]
    assert all(is_constant(m["w"]) for m in matches)
    new, result = rewritten(graph, [p])
    assert result.stats["rms"].rewritten == 2
    eps_used = sorted(n.args[1] for n in new.fx.nodes if n.target == aten.add.Tensor)
    assert eps_used == [1e-6, 1e-5]
    assert_same_outputs(graph, new, torch.randn(2, 3, 8), backends=("eager", "onnxruntime"))


def test_predicate_on_a_scalar_capture():
    graph = traced(RMSNorm(), torch.randn(2, 3, 8))
    p = Pattern("rms-small-eps", rms, rms_explicit, where={"eps": lambda v: v < 3e-6}, inputs={"x": (2, 8), "w": (8,)})
    new, result = rewritten(graph, [p])
    assert (result.stats["rms-small-eps"].found, result.stats["rms-small-eps"].rewritten) == (1, 1)


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = torch.nn.Linear(8, 6), torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.q(x).relu(), self.k(x).sigmoid()


def two_linears(x, w1, b1, w2, b2):
    return F.linear(x, w1, b1), F.linear(x, w2, b2)


def merge_two(match, graph):
    """Concatenates the two weights into new constants: tracing cannot do that."""
    w1, w2 = match.constant("w1"), match.constant("w2")
    b1, b2 = match.constant("b1"), match.constant("b2")
    w = graph.add_constant(torch.cat([w1, w2]), "merged_weight")
    b = graph.add_constant(torch.cat([b1, b2]), "merged_bias")
    y = graph.fx.call_function(aten.linear.default, (match["x"], w, b))
    parts = graph.fx.call_function(aten.split_with_sizes.default, (y, [w1.shape[0], w2.shape[0]], -1))
    return tuple(graph.fx.call_function(operator.getitem, (parts, i)) for i in range(2))


def test_multi_output_pattern_with_a_constant_computing_replacement():
    graph = traced(TwoHeads(), torch.randn(3, 8))
    p = Pattern(
        "two-linears", two_linears, build=merge_two,
        where={"w1": is_constant, "w2": is_constant},
        check=lambda m: m["w1"] is not m["w2"],
        inputs={"x": (2, 8), "w1": (6, 8), "b1": (6,), "w2": (10, 8), "b2": (10,)},
    )
    new, result = rewritten(graph, [p])
    # (q, k) and (k, q) bind the same nodes: one occurrence.
    assert result.as_dict()["two-linears"] == {"found": 1, "rewritten": 1, "skipped": {}}
    assert targets(new).count(aten.linear.default) == 1
    assert new.constant(next(n for n in new.fx.nodes if n.target == "merged_weight")).shape == (16, 8)
    assert_same_outputs(graph, new, torch.randn(3, 8), backends=("eager", "onnxruntime"))


class ReluChain(torch.nn.Module):
    def forward(self, x):
        return torch.relu(torch.relu(torch.relu(x)))


def test_overlapping_matches_are_skipped():
    graph = traced(ReluChain(), torch.randn(4))
    p = Pattern("double-relu", lambda x: torch.relu(torch.relu(x)), lambda x: torch.relu(x))
    new, result = rewritten(graph, [p])
    assert result.as_dict()["double-relu"]["found"] == 2
    assert result.stats["double-relu"].rewritten == 1
    assert result.stats["double-relu"].skipped == {"overlap": 1}
    assert targets(new).count(aten.relu.default) == 2
    assert_same_outputs(graph, new, torch.randn(4))


class LinearUsedTwice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)

    def forward(self, x):
        h = self.a(x)
        return F.gelu(h) + h


def test_a_match_whose_intermediate_escapes_is_skipped():
    graph = traced(LinearUsedTwice(), torch.randn(3, 8))
    new, result = rewritten(graph, [LINEAR_GELU])
    stats = result.stats["linear-gelu"]
    assert (stats.found, stats.rewritten, stats.skipped) == (1, 0, {"escaping": 1})
    assert "%linear (aten.linear.default) is also used by %add" in stats.examples[0]
    assert targets(new) == targets(graph)


def test_a_custom_rewrite_pass_runs_from_pipeline_text_and_reports_stats():
    registry = PassRegistry()

    @register_pass("fuse-linear-gelu", registry=registry)
    class FuseLinearGelu(RewritePass):
        """linear(x, W, b) -> gelu  ==>  fxopt.linear_act(x, W, b, 'gelu')."""

        patterns = [LINEAR_GELU]

    graph = traced(MLP(), torch.randn(3, 8))
    result = PassManager("fuse-linear-gelu", registry=registry, check_numerics=True).run(graph)
    stats = result.records[0].stats
    assert stats["rewritten"] == 1 and stats["linear-gelu"]["found"] == 1
    assert all(n.meta.get("created_by") == "fuse-linear-gelu" for n in result.graph.fx.nodes if n.target == torch.ops.fxopt.linear_act.default)


def test_bad_patterns_fail_clearly():
    with pytest.raises(PatternError, match=r"where= names \['weight'\], which are not parameters"):
        Pattern("p", linear_gelu, linear_gelu_fused, where={"weight": is_constant})
    with pytest.raises(PatternError, match="exactly one of replacement="):
        Pattern("p", linear_gelu)
    bad = Pattern("p", linear_gelu, lambda x, w, b: (F.linear(x, w, b), F.linear(x, w, b)), inputs=LINEAR_SHAPES)
    graph = traced(MLP(), torch.randn(3, 8))
    with pytest.raises(PatternError, match="returns 2 values but the pattern returns 1"):
        rewrite(graph.copy(), [bad])
    doubled = Pattern("p", rms, lambda x, w, eps: rms_explicit(x, w, eps * 2), inputs={"x": (2, 8), "w": (8,)})
    with pytest.raises(PatternError, match=r"scalar parameter\(s\) \['eps'\] do not reach an op as they are"):
        doubled.replacement_traced
    unshaped = Pattern("p", linear_gelu, linear_gelu_fused, inputs={"w": (16, 4)})  # x (8, 8) cannot meet w
    with pytest.raises(PatternError, match="pattern 'p': tracing 'linear_gelu' failed"):
        unshaped.traced


def test_predicates_see_shapes():
    graph = traced(MLP(), torch.randn(2, 3, 8))
    p = Pattern("linear-gelu-2d", linear_gelu, linear_gelu_fused, where={"x": has_rank(2)}, inputs=LINEAR_SHAPES)
    assert find_matches(p, graph) == []
    assert "where['x'] (has_rank(2,)) rejected %x" in explain(p, graph)


# --- alternatives: the forms of one spot -------------------------------------------------

def _scaled(x, c: float):
    return x * c


def _shifted(x, b):
    return x + b


def relu_of(h):
    return torch.relu(h)


def clamp_build(chosen: list):
    """Rebuilds the form that matched, then clamps: the builder reads ``m.chosen``."""

    def build(m, graph):
        chosen.append(m.chosen["h"])
        x = m["x"]
        if m.chosen["h"] == "scaled":
            x = graph.fx.call_function(aten.mul.Tensor, (x, m["c"]))
        elif m.chosen["h"] == "shifted":
            x = graph.fx.call_function(aten.add.Tensor, (x, m["b"]))
        return graph.fx.call_function(aten.clamp_min.default, (x, 0.0))

    return build


def relu_forms(chosen, **kw):
    return Pattern("relu-forms", relu_of, build=clamp_build(chosen),
                   alternatives={"h": {"scaled": _scaled, "shifted": _shifted, "plain": "x"}}, **kw)


class ThreeRelus(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("c", torch.tensor(3.0))  # a one-element constant: a float capture takes it

    def forward(self, x, y):
        return torch.relu(x * 2.0) + torch.relu(y + x) + torch.relu(x * self.c) + torch.relu(x)


def test_alternatives_match_each_form_and_the_builder_sees_which():
    graph = traced(ThreeRelus(), torch.randn(3, 8), torch.randn(3, 8))
    chosen = []
    new, result = rewritten(graph, [relu_forms(chosen)])
    assert result.as_dict()["relu-forms"] == {"found": 4, "rewritten": 4, "skipped": {}}
    assert sorted(chosen) == ["plain", "scaled", "scaled", "shifted"]
    assert aten.relu.default not in targets(new)
    assert sorted(n.args[1] for n in new.fx.nodes if n.target == aten.mul.Tensor) == [2.0, 3.0]
    assert_same_outputs(graph, new, torch.randn(3, 8), torch.randn(3, 8), backends=("eager", "onnxruntime"))


class SharedSum(torch.nn.Module):
    def forward(self, x, y):
        h = x + y
        return torch.relu(h), h * 2


def test_one_occurrence_per_anchor_the_first_safe_form_wins():
    # "shifted" would remove x + y, which is used outside: the plain form is taken instead.
    graph = traced(SharedSum(), torch.randn(3, 8), torch.randn(3, 8))
    chosen = []
    new, result = rewritten(graph, [relu_forms(chosen)])
    assert result.as_dict()["relu-forms"] == {"found": 1, "rewritten": 1, "skipped": {}}
    assert chosen == ["plain"]
    assert_same_outputs(graph, new, torch.randn(3, 8), torch.randn(3, 8), backends=("eager", "onnxruntime"))


def test_alternatives_that_make_no_sense_are_refused():
    with pytest.raises(PatternError, match=r"alternatives= names \['y'\], which are not tensor parameters"):
        Pattern("p", relu_of, build=clamp_build([]), alternatives={"y": {"plain": "x"}})
    loop = Pattern("p", relu_of, build=clamp_build([]), alternatives={"h": {"a": "x"}, "x": {"b": "h"}})
    with pytest.raises(PatternError, match="in a cycle"):
        loop.traced_alternatives
    # a traced replacement reads parameters that not every form binds
    p = Pattern("p", relu_of, lambda x, c: torch.clamp_min(x * c, 0.0), alternatives={"h": {"scaled": _scaled, "plain": "x"}})
    with pytest.raises(PatternError, match=r"the replacement reads \['c'\], which this match did not bind"):
        rewrite(traced(ThreeRelus(), torch.randn(3, 8), torch.randn(3, 8)).copy(), [p])


def test_reject_gives_the_reason_in_the_nearest_miss_and_the_skip():
    from fxopt.passes.rewrite import Reject, nearest_misses

    def small_scale(c):
        if c > 2.5:
            raise Reject(f"scale {c} is too large")
        return True

    graph = traced(ThreeRelus(), torch.randn(3, 8), torch.randn(3, 8))
    p = Pattern("relu-scaled", relu_of, build=clamp_build([]), where={"c": small_scale}, alternatives={"h": {"scaled": _scaled}})
    misses = nearest_misses(p, graph)
    assert any(mi.reason == "scale 3.0 is too large" for mi in misses)
    assert len(misses) == 3  # every relu but relu(x * 2.0), each with its own furthest failure

    def refuse(m):
        raise Reject("not today")

    new, result = rewritten(graph, [p.variant(check=refuse)])
    st = result.stats["relu-scaled"]
    assert (st.found, st.rewritten, st.skipped) == (1, 0, {"check": 1}) and st.examples == ["check: not today"]
    assert p.variant(check=refuse).traced is p.traced  # a variant shares the traces


class CastRelu(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x.to(torch.float64))


def test_dtype_capture():
    def cast_relu(x, dt: torch.dtype):
        return torch.relu(x.to(dt))

    (m,) = find_matches(Pattern("cast-relu", cast_relu, build=lambda m, g: None), traced(CastRelu(), torch.randn(3, 8)))
    assert m["dt"] == torch.float64


# --- the driver, sizes, op classes, the function factory, the clean-up -----------------------
from fxopt.passes.rewrite import PatternSet, Size, explain_at, function, match_at  # noqa: E402


def gelu_to_relu(y):
    return F.gelu(y)


def relu_to_sigmoid(y):
    return torch.relu(y)


GELU_RELU = Pattern("gelu-relu", gelu_to_relu, lambda y: torch.relu(y))
RELU_SIGMOID = Pattern("relu-sigmoid", relu_to_sigmoid, lambda y: torch.sigmoid(y))
TANH_ABS = Pattern("tanh-abs", lambda y: torch.tanh(y), lambda y: torch.abs(y))


def test_a_pattern_set_walks_once_when_nothing_changes_and_again_after_a_rewrite():
    graph = traced(MLP(), torch.randn(3, 8))
    idle = PatternSet([RELU_SIGMOID, TANH_ABS])  # neither op occurs: one walk serves both
    assert not idle.rewrite(graph).changed and idle.walks == 1
    # The second pattern sees what the first one rewrote (gelu -> relu -> sigmoid): a second walk.
    chained = PatternSet([GELU_RELU, RELU_SIGMOID, TANH_ABS])
    new = graph.copy()
    result = chained.rewrite(new)
    assert [result.stats[n].rewritten for n in ("gelu-relu", "relu-sigmoid", "tanh-abs")] == [1, 1, 0]
    assert chained.walks == 3  # one per pattern that changed the graph, and the first
    assert aten.sigmoid.default in targets(new) and aten.relu.default not in targets(new)


def test_a_pattern_set_keys_patterns_by_their_anchor_op():
    by_op = PatternSet([GELU_RELU, RELU_SIGMOID, TANH_ABS]).anchored([GELU_RELU, RELU_SIGMOID, TANH_ABS])
    assert by_op == {aten.gelu.default: [GELU_RELU], aten.relu.default: [RELU_SIGMOID], aten.tanh.default: [TANH_ABS]}
    with pytest.raises(PatternError, match="two patterns are named 'tanh-abs'"):
        PatternSet([TANH_ABS, TANH_ABS])


class SplitHeads(torch.nn.Module):
    def forward(self, x):
        b, s, _ = x.shape
        return x.view(b, s, 2, 4).transpose(1, 2).reshape(b * 2, s, 4)


def heads(x, b: Size, s: Size, n: Size, h: Size):
    return x.view(b, s, n, h).transpose(1, 2)


HEADS = Pattern("heads", heads, build=lambda m, g: None, inputs={"x": (3, 5, 42), "b": 3, "s": 5, "n": 6, "h": 7},
                op_classes=[{aten.view.default, aten.reshape.default, aten._unsafe_view.default}])


def test_a_size_wildcard_binds_symbolic_and_static_sizes():
    dyn = ({0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC},)
    graph = PassManager("canonicalize,dce").run(fxopt.trace(SplitHeads().eval(), (torch.randn(2, 3, 8),), dynamic_shapes=dyn)).graph
    (m,) = find_matches(HEADS, graph)
    assert isinstance(m["b"], torch.fx.Node) and m["b"].target == aten.sym_size.int  # the batch, symbolic
    assert (m["n"], m["h"]) == (2, 4)  # the heads, static
    static = traced(SplitHeads(), torch.randn(2, 3, 8))
    (m,) = find_matches(HEADS, static)
    assert (m["b"], m["s"], m["n"], m["h"]) == (2, 3, 2, 4)


def test_a_size_wildcard_refuses_a_tensor_and_says_so():
    class ViewAsTensor(torch.nn.Module):
        def forward(self, x):
            return x.view(2, 3, 2, 4).transpose(1, 3)  # transposes other dims: no match

    graph = traced(ViewAsTensor(), torch.randn(2, 3, 8))
    t = next(n for n in graph.fx.nodes if n.target == aten.transpose.int)
    assert match_at(HEADS, t, graph) is None
    assert "argument 2: literal 2 expected, found 3" in explain_at(HEADS, t, graph)


def test_op_classes_let_one_traced_op_stand_for_its_equivalents():
    g = traced(SplitHeads(), torch.randn(2, 3, 8))
    for n in g.fx.nodes:  # as other passes write it (tracing writes every reshape of a contiguous value as view)
        if n.target == aten.view.default:
            n.target = aten.reshape.default
    assert aten.view.default not in targets(g)
    node = next(n for n in g.fx.nodes if n.target == aten.transpose.int)
    assert match_at(HEADS, node, g) is not None
    strict = Pattern("heads-view-only", heads, build=lambda m, g: None, inputs=HEADS.inputs)
    assert match_at(strict, node, g) is None and "expected aten.view.default" in explain_at(strict, node, g)


def test_the_function_factory_makes_patterns_with_a_given_number_of_parameters():
    fn = function("two_linears", ["x", "w0", "w1"], lambda x, w0, w1: (F.linear(x, w0), F.linear(x, w1)))
    p = Pattern("two", fn, build=lambda m, g: None, inputs={"x": (2, 8), "w0": (4, 8), "w1": (5, 8)}, where={"w0": is_constant})
    assert list(p.traced.params) == ["x", "w0", "w1"] and len(p.traced.outputs) == 2
    ints = function("scaled", {"x": inspect_empty(), "k": int}, lambda x, k: x * k)
    assert Pattern("scaled", ints, build=lambda m, g: None).scalar_kinds == {"k": int}


def inspect_empty():
    import inspect

    return inspect.Parameter.empty


def test_the_clean_up_is_a_parameter():
    calls = []

    def clean(graph):  # a callable clean-up: here only recording that it ran
        calls.append(len(list(graph.fx.nodes)))

    def gelu_then_identity_view(y):
        return F.gelu(y).view(8, 8)

    raw = Pattern("raw", gelu_then_identity_view, build=lambda m, g: None, cleanup=clean)
    assert [n.target for n in raw.traced.nodes] == [aten.gelu.default, aten.view.default] and calls
    # the default pipeline (canonicalize, dce) drops the identity view
    cleaned = Pattern("cleaned", gelu_then_identity_view, build=lambda m, g: None)
    assert [n.target for n in cleaned.traced.nodes] == [aten.gelu.default]
