"""Every built-in model x backend x static/dynamic shapes: trace, run the base
pipeline, and match the original model within 1e-4 x the output's scale."""

import importlib

import onnx
import pytest
import torch

import fxopt
from conftest import BASE_PIPELINE, model_spec, reference, run, trace_once

MODELS = ["mlp", "tiny-gpt", "gpt2-tiny", "llama-tiny", "bert-tiny", "minilm"]
TOL = 1e-4


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", MODELS)
def test_base_pipeline_matches_original_on_both_backends(name, dynamic):
    spec = model_spec(name)
    graph = trace_once(spec, dynamic=dynamic, graph_name=name)
    result = fxopt.PassManager(BASE_PIPELINE).run(graph)
    assert result.graph.num_nodes() <= graph.num_nodes()
    if dynamic:
        assert any(result.graph.symbolic_dims().values()), "dynamic dimensions were lost"
    for backend in ("eager", "onnxruntime"):
        compiled = fxopt.compile(result.graph, backend)
        parity = fxopt.compare(reference(spec), run(compiled, spec.example_inputs))
        assert parity.within(TOL), f"{name}/{backend}: {parity}"
        if dynamic:
            for other in spec.other_inputs:
                parity = fxopt.compare(reference(spec, other), run(compiled, other))
                assert parity.within(TOL), f"{name}/{backend} on other shapes: {parity}"


def test_output_structure_is_the_models_own():
    spec = model_spec("gpt2-tiny")
    graph = trace_once(spec, dynamic=False)
    out_ref = reference(spec)
    for backend in ("eager", "onnxruntime"):
        out = run(fxopt.compile(graph, backend), spec.example_inputs)
        assert type(out) is type(out_ref) and list(out.keys()) == list(out_ref.keys())
    tiny = model_spec("tiny-gpt")
    out = run(fxopt.compile(trace_once(tiny, dynamic=False), "onnxruntime"), tiny.example_inputs)
    assert isinstance(out, tuple) and len(out) == 3


def test_export_onnx_keeps_dynamic_axes_and_passes_checker(tmp_path):
    spec = model_spec("bert-tiny")
    graph = trace_once(spec)
    path = fxopt.export_onnx(graph, tmp_path / "bert.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_param, f"{inp.name} lost its dynamic axes"
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path))
    other = spec.other_inputs[0]
    out = sess.run(None, {k: v.numpy() for k, v in other.items()})
    assert fxopt.compare(reference(spec, other).last_hidden_state, out[0].__array__()).within(TOL)


def test_onnxruntime_session_options_and_save(tmp_path):
    spec = model_spec("mlp")
    graph = trace_once(spec, dynamic=False)
    compiled = fxopt.compile(graph, "onnxruntime", intra_op_threads=1, graph_optimization_level="basic", allow_spinning=False)
    assert compiled.session.get_providers() == ["CPUExecutionProvider"]
    assert fxopt.compare(reference(spec), run(compiled, spec.example_inputs)).within(TOL)
    path = compiled.save(tmp_path / "mlp.onnx")
    onnx.checker.check_model(str(path))
    with pytest.raises(fxopt.BackendError, match="graph_optimization_level"):
        fxopt.compile(graph, "onnxruntime", graph_optimization_level="max")
    with pytest.raises(fxopt.BackendError, match="not available"):
        fxopt.compile(graph, "onnxruntime", providers=["NoSuchExecutionProvider"])
    with pytest.raises(fxopt.BackendError, match="unknown backend 'tvm'"):
        fxopt.compile(graph, "tvm")


def _cpu_seconds_while_idle(run, x, idle_s=0.2):
    """CPU time this process burns in ``idle_s`` of sleep right after 30 runs:
    what ONNX Runtime's worker threads take from whatever runs next."""
    import time

    for _ in range(30):
        run(x)
    start = time.process_time()
    time.sleep(idle_s)
    return time.process_time() - start


def test_onnxruntime_threads_spin_during_a_run_but_not_after_it():
    import torch

    from fxopt.backends.onnxruntime import new_session

    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512)).eval()
    x = torch.randn(16, 512)
    compiled = fxopt.compile(fxopt.trace(model, (x,)), "onnxruntime", intra_op_threads=2)
    assert compiled.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert _cpu_seconds_while_idle(compiled, x) < 0.005
    # Control: the same model in a session with ONNX Runtime's defaults keeps
    # spinning after Run returns (0.025 s of the 0.2 s measured here).
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    plain = new_session(compiled.program.model_proto.SerializeToString(), options)
    name = plain.get_inputs()[0].name
    assert _cpu_seconds_while_idle(lambda t: plain.run(None, {name: t.numpy()}), x) > 0.005


def test_eager_backend_save_loads_back(tmp_path):
    spec = model_spec("tiny-gpt")
    graph = trace_once(spec)
    compiled = fxopt.compile(fxopt.PassManager(BASE_PIPELINE).run(graph).graph, "eager")
    path = compiled.save(tmp_path / "tiny.pt2")
    loaded = fxopt.load(path)
    assert fxopt.compare(reference(spec, spec.other_inputs[0]), run(loaded, spec.other_inputs[0])).within(TOL)


def test_eager_backend_with_torch_compile():
    spec = model_spec("mlp")
    graph = trace_once(spec, dynamic=False)
    compiled = fxopt.compile(graph, "eager", torch_compile=True)
    assert fxopt.compare(reference(spec), run(compiled, spec.example_inputs)).within(TOL)


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_calls_the_traced_model_cannot_take_fail_naming_the_input(backend):
    spec = model_spec("bert-tiny")
    graph = trace_once(spec)
    compiled = fxopt.compile(graph, backend)
    ids, mask = spec.other_inputs[0]["input_ids"], spec.other_inputs[0]["attention_mask"]
    # traced with keyword inputs, called positionally: fine, as for the original (eager used to refuse)
    assert fxopt.compare(spec.model(ids, mask), compiled(ids, mask)).within(TOL)
    with pytest.raises(fxopt.BackendError, match=r"input 'input_ids' is torch.int32 .* traced with torch.int64"):
        compiled(input_ids=ids.int(), attention_mask=mask)
    with pytest.raises((fxopt.BackendError, RuntimeError), match="attention_mask"):  # sizes that disagree
        compiled(input_ids=ids, attention_mask=mask[:, :-2])


def test_tracing_a_dynamic_dim_of_size_one_says_to_trace_with_two():
    spec = model_spec("bert-tiny")
    batch_one = {k: v[:1] for k, v in spec.example_inputs.items()}
    with pytest.raises(fxopt.TraceError, match="trace with at least 2 along each dynamic dimension"):
        fxopt.trace(spec.model, batch_one, dynamic_shapes=spec.dynamic_shapes)


class Linears(torch.nn.Module):
    """A float32 linear on a constant weight (packed), one with a GELU (fxopt's
    linear_act after fusion, packed), one on a computed weight and one in
    bfloat16 (both left as they are)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16, bias=False)
        self.narrow = torch.nn.Linear(16, 8).to(torch.bfloat16)

    def forward(self, x, w):
        h = self.down(torch.nn.functional.gelu(self.up(x)))
        return torch.nn.functional.linear(h, w), self.narrow(h.bfloat16())


def test_eager_runs_fxopt_kernels_without_the_op_dispatch():
    from fxopt.ir.ops import is_fxopt_op, registered_ops

    torch.manual_seed(0)
    model, inputs = Linears().eval(), (torch.randn(2, 3, 16), torch.randn(4, 16))
    unfused = fxopt.PassManager("canonicalize,dce").run(fxopt.trace(model, inputs)).graph
    graph = fxopt.PassManager("fuse-linear-act").run(unfused).graph
    compiled = fxopt.compile(graph, "eager")
    running = [n.target for n in compiled.running_graph.nodes if n.op == "call_function"]
    assert running.count(registered_ops()["linear_act"].kernel) == 1 and not any(map(is_fxopt_op, running))
    assert torch.ops.fxopt.linear_act.default in {n.target for n in graph.fx.nodes}  # the graph keeps its op
    assert not [n for n in compiled.running_graph.nodes if n.op == "get_attr" and not n.users]
    for want, got in zip(graph.module(*inputs), compiled(*inputs)):
        assert torch.equal(want, got)
    # the code fx generates names each kernel by a module-level name that is the kernel, not the op
    for kernel in (d.kernel for d in registered_ops().values()):
        assert getattr(importlib.import_module(kernel.__module__), kernel.__name__) is kernel
    # nothing to rewrite: the graph's own module runs
    assert fxopt.compile(unfused, "eager").running_graph is unfused.fx


def test_eager_checks_calls_against_the_interface_read_once(monkeypatch):
    # reading a graph's interface prints its symbols: a compiled model reads it once, not per call
    torch.manual_seed(0)
    model, inputs = Linears().eval(), (torch.randn(2, 3, 16), torch.randn(4, 16))
    graph = fxopt.trace(model, inputs)
    compiled = fxopt.compile(graph, "eager")

    def rebuilt(self):
        raise AssertionError("interface read again")

    monkeypatch.setattr(fxopt.Graph, "interface", rebuilt)
    assert torch.equal(compiled(*inputs)[0], model(*inputs)[0])
    with pytest.raises(fxopt.BackendError, match="input 'x' is torch.float64"):
        compiled(inputs[0].double(), inputs[1])


def test_eager_prepack_runs_constant_float_linears_on_packed_weights():
    from fxopt.backends.eager import packed_linear

    torch.manual_seed(0)
    model, inputs = Linears().eval(), (torch.randn(2, 3, 16), torch.randn(4, 16))
    graph = fxopt.PassManager("canonicalize,fuse-linear-act").run(fxopt.trace(model, inputs)).graph
    plain, packed = fxopt.compile(graph, "eager"), fxopt.compile(graph, "eager", prepack=True)
    targets = [n.target for n in packed.running_graph.nodes if n.op == "call_function"]
    assert targets.count(packed_linear) == 2 and len(packed.packed) == 2
    assert targets.count(torch.ops.aten.linear.default) == 2  # the computed weight and the bfloat16 one
    assert torch.ops.fxopt.linear_act.default in {n.target for n in graph.fx.nodes}  # the graph itself is unchanged
    # the packed weights' own reads are gone from the module that runs
    assert not [n for n in packed.running_graph.nodes if n.op == "get_attr" and not n.users]
    for want, got in zip(plain(*inputs), packed(*inputs)):
        assert got.dtype == want.dtype and torch.allclose(got.float(), want.float(), atol=1e-5)
    with pytest.raises(fxopt.BackendError, match="torch_compile"):
        fxopt.compile(graph, "eager", prepack=True, torch_compile=True)
    with pytest.raises(fxopt.BackendError, match="prepack must be"):
        fxopt.compile(graph, "eager", prepack="none")
