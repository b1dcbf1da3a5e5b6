"""The user's model is never changed by fxopt, and what the graph shares
with it: by default the graph owns a copy of the weights (later edits of the
model do not reach it); ``share_weights=True`` reads the model's weights
(one copy in memory) but still copies the buffers the graph writes."""

import pytest
import torch

import fxopt
from conftest import BASE_PIPELINE


class CountingLinear(torch.nn.Module):
    """A buffer written on every call (as a step counter or a static KV cache is)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.proj(x) + self.calls


class TiedLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)
        self.head = torch.nn.Linear(8, 32, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.embed(ids)))


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _unchanged(model, snapshot):
    state = model.state_dict(keep_vars=True)
    return state.keys() == snapshot.keys() and all(torch.equal(state[k], v) for k, v in snapshot.items())


@pytest.mark.parametrize("share_weights", [False, True], ids=["copied", "shared"])
def test_calling_the_optimized_model_never_changes_the_users_model(share_weights):
    torch.manual_seed(0)
    model, x = CountingLinear().eval(), torch.randn(2, 8)
    before = _snapshot(model)
    graph = fxopt.trace(model, (x,), share_weights=share_weights)
    compiled = fxopt.compile(fxopt.PassManager(BASE_PIPELINE).run(graph).graph, "eager")
    for _ in range(3):
        compiled(x)
    assert _unchanged(model, before), f"the model's calls buffer is {model.calls.item()}"
    # The state lives in the graph: its counter went on as the model's would have.
    assert torch.equal(compiled(x), model.proj(x).detach() + 4)

    torch.manual_seed(0)
    plain, x = TiedLM().eval(), torch.randint(0, 32, (2, 5))
    before = _snapshot(plain)
    graph = fxopt.trace(plain, (x,), share_weights=share_weights)
    for backend in ("eager", "onnxruntime"):
        fxopt.compile(fxopt.PassManager(BASE_PIPELINE + ",quantize(mode=dynamic)").run(graph).graph, backend)(x)
    assert _unchanged(plain, before)


def test_editing_the_model_after_tracing_does_not_reach_the_graph():
    torch.manual_seed(0)
    model, x = TiedLM().eval(), torch.randint(0, 32, (2, 5))
    graph = fxopt.trace(model, (x,))
    compiled = {backend: fxopt.compile(graph, backend) for backend in ("eager", "onnxruntime")}
    expected = model(x).detach()
    with torch.no_grad():
        model.embed.weight.mul_(-3.0)
    for backend, c in compiled.items():
        assert torch.allclose(c(x), expected, atol=1e-5), backend
    # The copy keeps the model's tying: one storage for the embedding and the head.
    storages = {t.untyped_storage().data_ptr() for t in graph.tensor_attributes().values()}
    assert len(storages) == 1 and model.embed.weight.untyped_storage().data_ptr() not in storages


def test_share_weights_reads_the_models_weights_in_place():
    """What ``share_weights=True`` trades for its memory: the eager graph reads
    the model's own weights, so in-place edits of them reach it; an ONNX
    Runtime model holds the weights it was compiled with."""
    torch.manual_seed(0)
    model, x = TiedLM().eval(), torch.randint(0, 32, (2, 5))
    graph = fxopt.trace(model, (x,), share_weights=True)
    ptrs = {t.untyped_storage().data_ptr() for t in graph.tensor_attributes().values()}
    assert ptrs == {model.embed.weight.untyped_storage().data_ptr()}
    eager, ort = fxopt.compile(graph, "eager"), fxopt.compile(graph, "onnxruntime")
    compiled_with = model(x).detach()
    with torch.no_grad():
        model.embed.weight.mul_(-3.0)
    assert torch.allclose(eager(x), model(x), atol=1e-5)
    assert torch.allclose(ort(x), compiled_with, atol=1e-5)


def test_running_the_optimized_graph_leaves_the_input_graphs_state_alone():
    model, x = CountingLinear().eval(), torch.randn(2, 8)
    graph = fxopt.trace(model, (x,))
    optimized = fxopt.PassManager(BASE_PIPELINE).run(graph).graph
    optimized(x)
    optimized(x)
    assert graph.get_attr("calls").item() == 0  # the pipeline ran on a copy, state included
    assert optimized.get_attr("calls").item() == 2
