"""The pass base, registry, pipeline syntax and pass manager."""

import pytest
import torch

import fxopt
from fxopt.passes import (
    FixedPoint, Option, OptionError, Pass, PassError, PassManager, PassResult, PipelineError,
    format_pipeline, parse_pipeline, register_pass,
)
from fxopt.passes.manager import NumericsError
from fxopt.passes.registry import PassRegistry
from conftest import model_spec, trace_once

aten = torch.ops.aten

# A registry of its own keeps these test passes out of the built-in list.
REG = PassRegistry()
for cls in fxopt.REGISTRY:
    REG.register(cls, cls.name)

CALLS = []


@register_pass("scale-outputs", registry=REG)
class ScaleOutputs(Pass):
    """Multiplies every gelu's input by ``factor`` (1.0 keeps numerics; other values break them)."""

    factor = Option(1.0, help="multiplier")
    mode = Option("mul", choices=("mul", "add"))
    tags = Option(None, tuple, help="a list option")

    def run(self, graph):
        CALLS.append(self.name)
        n = 0
        for gelu in self.walk(graph, target=aten.gelu.default):
            with graph.fx.inserting_before(gelu):
                scaled = graph.fx.call_function(aten.mul.Tensor, (gelu.args[0], self.factor))
            gelu.replace_input_with(gelu.args[0], scaled)
            n += 1
        return PassResult(n > 0, {"scaled": n})


@register_pass("explode", registry=REG)
class Explode(Pass):
    """Rewrites one node, then fails on the second linear: the caller's graph must survive."""

    def run(self, graph):
        CALLS.append(self.name)
        seen = 0
        for node in self.walk(graph, target=aten.linear.default):
            node.args = (node.args[0], node.args[1])  # drop the bias: a half-done rewrite
            seen += 1
            if seen == 2:
                raise RuntimeError("boom")
        return PassResult(True)


@register_pass("needs-calib", registry=REG)
class NeedsCalibration(Pass):
    """Declares an input it needs and an ordering constraint."""

    needs = ("calibration_data",)
    runs_after = ("canonicalize",)
    requires = ("canonical-linear",)

    def run(self, graph):
        CALLS.append(self.name)
        assert len(self.context["calibration_data"]) == 2
        return PassResult(False)


@register_pass("countdown", registry=REG)
class Countdown(Pass):
    """Reports a change the first ``times`` runs (per instance), then none."""

    times = Option(3)

    def run(self, graph):
        self.times -= 1
        return PassResult(self.times >= 0)


@pytest.fixture
def graph():
    spec = model_spec("mlp")
    return trace_once(spec, graph_name="mlp")


# -- options ---------------------------------------------------------------------------

def test_options_are_typed_and_validated_at_construction():
    p = ScaleOutputs(factor=2, tags=["a", "b"])
    assert p.factor == 2.0 and isinstance(p.factor, float) and p.tags == ("a", "b")
    with pytest.raises(OptionError, match="option 'factor' expects float, got 'x'"):
        ScaleOutputs(factor="x")
    with pytest.raises(OptionError, match=r"option 'mode' must be one of \['mul', 'add'\]"):
        ScaleOutputs(mode="div")
    with pytest.raises(OptionError, match="no option 'factr' \\(did you mean 'factor'\\?\\); valid options: factor, mode, tags"):
        ScaleOutputs(factr=2)
    with pytest.raises(OptionError, match="expects bool"):
        fxopt.REGISTRY.create("cse", merge_tied=1)


def test_registry_refuses_duplicate_names_and_lists_passes():
    with pytest.raises(ValueError, match="'cse' is already registered by fxopt.passes.cse"):
        register_pass("cse")(type("MyCSE", (Pass,), {}))
    names = [d["name"] for d in fxopt.REGISTRY.describe()]
    assert {"canonicalize", "dce", "constant-fold", "cse"} <= set(names)
    assert all(d["summary"] for d in fxopt.REGISTRY.describe())


# -- pipeline text -------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "canonicalize,dce,constant-fold,cse",
    "scale-outputs(factor=2.5,mode=add),dce",
    "fixed-point(cse,dce,max_iterations=3),scale-outputs(tags=[a,'b c'])",
    "constant-fold(max_bytes=0)",
    "",
])
def test_pipeline_text_round_trips(text):
    items = parse_pipeline(text, REG)
    assert format_pipeline(items) == text
    assert format_pipeline(parse_pipeline(format_pipeline(items), REG)) == text


def test_pipeline_values_parse_to_python_types():
    (p,) = parse_pipeline("scale-outputs(factor=1e-3,tags=[x,'h\\.0',none])", REG)
    assert p.factor == 1e-3 and p.tags == ("x", "h\\.0", None)
    (p,) = parse_pipeline("cse(merge_tied=false)", REG)
    assert p.merge_tied is False
    assert str(p) == "cse(merge_tied=false)"


@pytest.mark.parametrize("text,message", [
    ("canonicalize,dcee", "unknown pass 'dcee' \\(did you mean 'dce'\\?\\); registered passes: "),
    ("canonicalize,DCE", "unknown pass 'DCE' \\(did you mean 'dce'\\?\\)"),  # case: too far for difflib alone
    ("constant_fold", "unknown pass 'constant_fold' \\(did you mean 'constant-fold'\\?\\)"),
    ("cse(Merge-Tied=false)", "no option 'Merge-Tied' \\(did you mean 'merge_tied'\\?\\)"),
    ("cse(merge_tied=maybe)", "pass 'cse': option 'merge_tied' expects bool, got 'maybe'"),
    ("cse(bogus=1)", "pass 'cse' has no option 'bogus'"),
    ("cse(", "expected 'name' but found end of text"),
    ("cse dce", "unexpected 'dce' after the end of a pass"),
    ("cse;dce", "unexpected character ';'"),
    ("fixed-point(cse,limit=3)", "fixed-point takes only max_iterations"),
])
def test_bad_pipelines_name_the_token(text, message):
    with pytest.raises(PipelineError, match=message) as info:
        parse_pipeline(text, REG)
    assert text in str(info.value) and "^" in str(info.value)


# -- checks before anything runs ------------------------------------------------------------------

def test_ordering_requires_and_inputs_fail_before_any_pass_runs(graph):
    CALLS.clear()
    with pytest.raises(PipelineError, match="'needs-calib' must run after 'canonicalize'"):
        PassManager("scale-outputs,needs-calib,canonicalize", registry=REG, calibration_data=[1, 2]).run(graph)
    with pytest.raises(PipelineError, match="requires 'canonical-linear'.*run one of \\['canonicalize'\\]"):
        PassManager("scale-outputs,needs-calib", registry=REG, calibration_data=[1, 2]).run(graph)
    with pytest.raises(PipelineError, match="needs input 'calibration_data'"):
        PassManager("scale-outputs,canonicalize,needs-calib", registry=REG).run(graph)
    assert CALLS == []
    PassManager("scale-outputs,canonicalize,needs-calib", registry=REG).run(graph, calibration_data=[1, 2])
    assert CALLS == ["scale-outputs", "needs-calib"]


# -- failures leave the caller's graph alone -------------------------------------------------------

def test_failing_pass_names_pass_and_node_and_leaves_graph_untouched(graph):
    before = str(graph)
    with pytest.raises(PassError, match="pass 'explode' failed at node 'linear_1' .*RuntimeError: boom"):
        PassManager("scale-outputs,explode", registry=REG).run(graph)
    assert str(graph) == before
    x = torch.randn(3, 32)
    torch.testing.assert_close(graph(x), model_spec("mlp").model(x))


@register_pass("specialize", registry=REG)
class Specialize(Pass):
    """Reads the batch dimension as an int: torch pins the dynamic size to the traced one."""

    def run(self, graph):
        int(graph.placeholders()[0].meta["val"].shape[0])
        return PassResult(True)


def test_a_pass_that_pins_a_dynamic_dimension_fails_and_the_graph_stays_dynamic():
    spec = model_spec("tiny-gpt")
    graph = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
    before = str(graph)
    assert "s" in str(graph.placeholders()[0].meta["val"].shape[0])
    with pytest.raises(PassError, match="pass 'specialize' failed: changed the model's outputs"):
        PassManager("specialize", registry=REG).run(graph)
    # The graph and its copies share one ShapeEnv: the pinned size is rolled back.
    assert str(graph) == before
    result = PassManager("dce", registry=REG).run(graph)
    assert str(result.graph.placeholders()[0].meta["val"].shape[0]) == str(graph.placeholders()[0].meta["val"].shape[0])


def test_verification_failure_after_a_pass_names_the_pass(graph):
    @register_pass("bad-op", registry=REG)
    class BadOp(Pass):
        """Inserts a call outside the op set."""

        def run(self, g):
            node = next(n for n in g.fx.nodes if n.target == aten.gelu.default)
            node.target = torch.nn.functional.gelu
            return PassResult(True)

    try:
        with pytest.raises(PassError, match="pass 'bad-op' failed at node 'gelu'.*outside the documented op set"):
            PassManager("bad-op", registry=REG).run(graph)
    finally:
        REG.unregister("bad-op")


def test_numerics_check_names_the_first_pass_that_breaks_outputs(graph):
    result = PassManager("canonicalize,scale-outputs(factor=1.0),cse", registry=REG, check_numerics=True).run(graph)
    assert all(r.numerics["max_abs_err"] < 1e-6 for r in result.records)
    with pytest.raises(NumericsError, match="pass 'scale-outputs\\(factor=1.1\\)' failed: outputs drifted"):
        PassManager("canonicalize,scale-outputs(factor=1.1),cse", registry=REG, check_numerics=True).run(graph)


def test_a_lossy_pass_raises_the_tolerance_from_where_it_runs(graph):
    pm = PassManager("canonicalize,quantize(bits=4,group_size=16),cse")
    canonicalize, quantize, _ = pm.passes()
    assert pm.tolerance_for(graph, ran=[canonicalize]) == 1e-4
    assert pm.tolerance_for(graph) == pm.tolerance_for(graph, ran=[canonicalize, quantize]) == quantize.numerics_tolerance > 1e-4
    assert PassManager("canonicalize", tolerance=1e-3).tolerance_for(graph) == 1e-3
    assert PassManager("canonicalize,quantize(bits=4,group_size=16)", tolerance=1.0).tolerance_for(graph) == 1.0


# -- records, dumps, fixed points ----------------------------------------------------------------------

def test_records_time_nodes_bytes_and_stats(graph):
    result = PassManager("scale-outputs,dce", registry=REG).run(graph)
    first = result.records[0]
    assert first.name == "scale-outputs" and first.changed and first.stats == {"scaled": 2}
    assert first.nodes_after == first.nodes_before + 2 and first.ms >= 0
    assert first.param_bytes_before == first.param_bytes_after == graph.param_bytes()
    assert result.pipeline == "scale-outputs,dce"
    made = [n for n in result.graph.fx.nodes if n.meta.get("created_by") == "scale-outputs"]
    assert len(made) == 2 and all(n.target == aten.mul.Tensor for n in made)


def test_ir_dump_before_and_after_each_pass(graph, tmp_path):
    PassManager("scale-outputs,dce", registry=REG, dump_dir=tmp_path).run(graph)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["001_scale-outputs.after.txt", "001_scale-outputs.before.txt", "002_dce.after.txt", "002_dce.before.txt"]
    assert "aten.mul" in (tmp_path / "001_scale-outputs.after.txt").read_text()
    assert "aten.mul" not in (tmp_path / "001_scale-outputs.before.txt").read_text()


def test_fixed_point_repeats_until_nothing_changes(graph):
    countdown = Countdown(times=3)
    result = PassManager([FixedPoint([countdown, fxopt.REGISTRY.create("dce")])], registry=REG).run(graph)
    assert [r.changed for r in result.records if r.name.startswith("countdown")] == [True, True, True, False]
    stuck = PassManager([FixedPoint([Countdown(times=100)], max_iterations=4)], registry=REG).run(graph)
    assert len(stuck.records) == 4 and "did not reach a fixed point" in stuck.warnings[0]


# -- analyses: computed once per run, dropped by a pass that changes the graph ----------------
from fxopt.passes import Analysis  # noqa: E402


class GeluCount(Analysis):
    """The number of gelu nodes: cheap, and visibly stale if a cache keeps it too long."""

    def run(self, graph):
        return sum(1 for n in graph.fx.nodes if n.target is aten.gelu.default)


SEEN = []


@register_pass("read-gelus", registry=REG)
class ReadGelus(Pass):
    """Reads the analysis and changes nothing: every cached result stays valid."""

    def run(self, graph):
        SEEN.append(self.analysis(GeluCount, graph))
        return PassResult(False)


@register_pass("drop-gelus", registry=REG)
class DropGelus(Pass):
    """Replaces each gelu by its input; ``keep`` claims GeluCount survives (a lie, to show the contract)."""

    keep = Option(False)

    def run(self, graph):
        for gelu in self.walk(graph, target=aten.gelu.default):
            gelu.replace_all_uses_with(gelu.args[0])
            graph.fx.erase_node(gelu)
        return PassResult(True, preserved=(GeluCount,) if self.keep else None)


def test_an_analysis_is_computed_once_until_a_pass_changes_the_graph(mlp_graph):
    SEEN.clear()
    result = PassManager("read-gelus,read-gelus,drop-gelus,read-gelus", registry=REG).run(mlp_graph)
    before = sum(1 for n in mlp_graph.fx.nodes if n.target is aten.gelu.default)
    assert before > 0
    assert SEEN == [before, before, 0]
    assert result.analyses.computed == {"GeluCount": 2}


def test_a_preserved_analysis_is_kept_across_a_changing_pass(mlp_graph):
    SEEN.clear()
    result = PassManager("read-gelus,drop-gelus(keep=true),read-gelus", registry=REG).run(mlp_graph)
    assert SEEN[0] == SEEN[1] > 0  # kept, as the pass declared (here wrongly: the graph has none left)
    assert result.analyses.computed == {"GeluCount": 1}


def test_a_pass_run_alone_computes_its_analyses_itself(mlp_graph):
    SEEN.clear()
    ReadGelus().run(mlp_graph)
    assert SEEN == [sum(1 for n in mlp_graph.fx.nodes if n.target is aten.gelu.default)]


@register_pass("respawn-gelus", registry=REG)
class RespawnGelus(Pass):
    """Replaces each gelu by a new, equal gelu and reports no change (as a split and re-fuse does)."""

    def run(self, graph):
        for gelu in self.walk(graph, target=aten.gelu.default):
            with graph.fx.inserting_before(gelu):
                twin = graph.fx.call_function(aten.gelu.default, gelu.args, gelu.kwargs)
            gelu.replace_all_uses_with(twin)
            graph.fx.erase_node(gelu)
        return PassResult(False)


def test_analyses_are_dropped_when_nodes_were_replaced_though_nothing_changed(mlp_graph):
    SEEN.clear()
    result = PassManager("read-gelus,respawn-gelus,read-gelus", registry=REG).run(mlp_graph)
    assert result.analyses.computed == {"GeluCount": 2}


# After a changing pass the manager recomputes the metadata of what changed and
# of what lies downstream of a changed shape, not of the whole graph.

class MetaAsIfRecomputed(fxopt.passes.manager.Instrument):
    """After each pass: every node's value equals a full recompute's."""

    def __init__(self):
        self.checked = []

    def after_pass(self, p, graph, record):
        from fxopt.ir.meta import same_value  # the comparison the manager itself makes

        kept = {n.name: n.meta.get("val") for n in graph.fx.nodes}
        again = graph.copy()
        again.refresh_meta_all()
        stale = [n.name for n in again.fx.nodes if n.op != "output" and not same_value(kept[n.name], n.meta["val"])]
        assert not stale, f"after {p}: stale metadata on {stale[:5]}"
        self.checked.append(str(p))


@register_pass("double-hidden", registry=REG)
class DoubleHidden(Pass):
    """Doubles the first linear's outputs by replacing its parameters (no node
    changes), and the next linear's inputs to match: every shape in between
    changes though no node's arguments do."""

    def run(self, graph):
        weights = [n for n in graph.fx.nodes if n.op == "get_attr" and n.target.endswith("weight")]
        biases = [n for n in graph.fx.nodes if n.op == "get_attr" and n.target.endswith("bias")]
        w0, b0, w1 = (graph.get_attr(n.target).detach() for n in (weights[0], biases[0], weights[1]))
        for node, value in [(weights[0], torch.cat([w0, w0])), (biases[0], torch.cat([b0, b0])),
                            (weights[1], torch.cat([w1, w1], dim=1) / 2)]:
            owner, _, name = node.target.rpartition(".")
            module = graph.get_attr(owner) if owner else graph.module
            delattr(module, name)
            module.register_buffer(name, value)
        return PassResult(True)


def test_metadata_downstream_of_a_replaced_parameter_is_recomputed(mlp_graph):
    check = MetaAsIfRecomputed()
    result = PassManager("double-hidden", registry=REG, instruments=[check]).run(mlp_graph)
    gelu = next(n for n in result.graph.fx.nodes if n.target is aten.gelu.default)
    assert gelu.meta["val"].shape[-1] == 2 * next(n for n in mlp_graph.fx.nodes if n.target is aten.gelu.default).meta["val"].shape[-1]
    assert check.checked == ["double-hidden"]
    x = torch.randn(5, 32)
    torch.testing.assert_close(result.graph(x), mlp_graph(x))


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_metadata_after_each_pass_of_a_quantized_fused_pipeline_equals_a_full_recompute(name):
    check = MetaAsIfRecomputed()
    pipeline = ("canonicalize,dce,constant-fold,cse,fuse-attention,merge-linears,"
                "quantize(bits=4,group_size=16,skip_lm_head=false),pack-attention,fuse-linear-act,fuse-norm,dce")
    PassManager(pipeline, instruments=[check]).run(trace_once(name))
    assert len(check.checked) == 11


@register_pass("gelu-reads-a-weight", registry=REG)
class GeluReadsAWeight(Pass):
    """Points the first gelu at the second linear's [64, 64] weight, an existing
    node whose value does not change: only the gelu's arguments tell that its
    shape, and every shape after it, changed."""

    def run(self, graph):
        gelu = next(n for n in graph.fx.nodes if n.target is aten.gelu.default)
        weight = [n for n in graph.fx.nodes if n.op == "get_attr" and n.target.endswith("weight")][1]
        gelu.replace_input_with(gelu.args[0], weight)
        return PassResult(True)


def test_metadata_after_an_argument_edit_follows_the_new_input(mlp_graph):
    check = MetaAsIfRecomputed()
    result = PassManager("gelu-reads-a-weight", registry=REG, instruments=[check], verify=False).run(mlp_graph)
    last = [n for n in result.graph.fx.nodes if n.op == "call_function"][-1]
    assert tuple(last.meta["val"].shape) == (64, 16)  # was (batch, 16)
    assert check.checked == ["gelu-reads-a-weight"]
