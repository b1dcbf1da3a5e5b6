"""Random pipelines end within tolerance or with a clear refusal, and leave the
original model bit-identical (a few seeded cases of fxopt/fuzz.py; the long
run is ``scripts/fuzz_pipelines.py``)."""

import random

import pytest
import torch

import fxopt
from fxopt.fuzz import FINDINGS, Fuzzer, random_pipeline, summary
from fxopt.passes import Pass, PassResult, parse_pipeline, register_pass
from fxopt.passes.registry import PassRegistry

aten = torch.ops.aten


@pytest.fixture(scope="module")
def fuzzer():
    return Fuzzer(models=("mlp", "tiny-gpt"), backends=("eager", "onnxruntime"))


def test_seeded_random_pipelines_end_within_tolerance_or_refused(fuzzer):
    outcomes = fuzzer.fuzz(seed=18, count=6)
    findings = [o.line() for o in outcomes if o.kind in FINDINGS]
    assert not findings, "\n".join(findings)
    assert {o.kind for o in outcomes} == {"ok", "refused"}, summary(outcomes)  # the seed exercises both


def test_random_pipelines_are_seeded_and_parse_or_name_the_fault():
    texts = [random_pipeline(random.Random(7)) for _ in range(2)]
    assert texts[0] == texts[1]
    for seed in range(40):
        text = random_pipeline(random.Random(seed))
        try:
            parse_pipeline(text)
        except fxopt.PipelineError as e:  # a bad option value now and then, named
            assert "pass '" in str(e) and "^" in str(e)


# The fuzz must see each kind of fault: passes that break the model quietly.
REG = PassRegistry()
for cls in fxopt.REGISTRY:
    REG.register(cls, cls.name)


@register_pass("skew", registry=REG)
class Skew(Pass):
    """Adds 1 to every gelu's input, with no error: a silent mismatch."""

    def run(self, graph):
        for gelu in self.walk(graph, target=aten.gelu.default):
            with graph.fx.inserting_before(gelu):
                shifted = graph.fx.call_function(aten.add.Tensor, (gelu.args[0], 1.0))
            gelu.replace_input_with(gelu.args[0], shifted)
        return PassResult(True)


@register_pass("scribble", registry=REG)
class Scribble(Pass):
    """Writes into a weight the graph shares with the user's model."""

    def run(self, graph):
        node = next(n for n in graph.fx.nodes if n.op == "get_attr")
        with torch.no_grad():
            graph.constant(node).add_(0.0).mul_(1.0 + 2 ** -10)
        return PassResult(False)


@register_pass("typo", registry=REG)
class Typo(Pass):
    """Crashes with an internal AttributeError, which the manager wraps in a PassError."""

    def run(self, graph):
        return graph.nodez


@pytest.mark.parametrize("pipeline,kind", [("skew", "mismatch"), ("scribble", "mutated"), ("typo", "crash"), ("dce", "ok")])
def test_the_fuzz_reports_each_kind_of_finding(pipeline, kind):
    (outcome,) = Fuzzer(models=("mlp",), backends=("eager",), registry=REG).run("mlp", pipeline)
    assert outcome.kind == kind, outcome.line()
