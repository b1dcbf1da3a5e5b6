"""Models that do not compute in float32: a float16 model keeps float16 through
every quantization scheme on both backends (the int8 / MatMulNBits kernels of
ONNX Runtime take float32, so their lowerings cast around them), and a
bfloat16 model, which ONNX Runtime's CPU provider cannot run, gets an error
that says so."""

import functools

import onnx
import pytest
import torch

import fxopt
from fxopt.models import gpt2, llama
from conftest import run

PIPELINES = {
    "dynamic-token": "canonicalize,quantize(mode=dynamic)",
    "dynamic-tensor": "canonicalize,quantize(mode=dynamic,act_granularity=tensor)",
    "dynamic-tensor-qattention": "canonicalize,fuse-attention,merge-linears,quantize(mode=dynamic,act_granularity=tensor),pack-attention",
    "int4-group": "canonicalize,quantize(bits=4,group_size=32,quantize_embeddings=true,skip_lm_head=false)",
    "int3-aten": "canonicalize,quantize(bits=3,group_size=32,quantize_embeddings=true)",
    "awq": "canonicalize,quantize(bits=4,group_size=32,method=awq)",
    "static-fused": "canonicalize,fuse-attention,merge-linears,quantize(mode=static),fuse-linear-act,fuse-norm",
}
# Relative error against the float16 original, by scheme (random weights).
TOLERANCE = {"int4-group": 0.2, "int3-aten": 0.35, "awq": 0.2}


@functools.lru_cache(maxsize=None)
def half(name):
    spec = {"gpt2-tiny": lambda: gpt2("tiny"), "llama-tiny": lambda: llama("tiny")}[name]()
    spec.model.half()
    return spec, fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, name=name)


def logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# Every scheme on GPT-2 (Conv1D linears, tied head); Llama (aten.linear, RMSNorm) on two.
CASES = [("gpt2-tiny", s) for s in PIPELINES] + [("llama-tiny", "dynamic-tensor"), ("llama-tiny", "int4-group")]


@pytest.mark.parametrize("model, scheme", CASES)
def test_float16_model_quantizes_on_both_backends(model, scheme):
    spec, graph = half(model)
    calibration = [spec.example_inputs, *spec.other_inputs]
    result = fxopt.PassManager(PIPELINES[scheme], calibration_data=calibration).run(graph).graph
    with torch.no_grad():
        ref = logits(run(spec.model, spec.example_inputs))
    outs = {}
    for backend in ("eager", "onnxruntime"):
        out = logits(run(fxopt.compile(result, backend=backend), spec.example_inputs))
        assert out.dtype == torch.float16, (backend, out.dtype)
        assert rel(out, ref) < TOLERANCE.get(scheme, 0.05), (backend, rel(out, ref))
        outs[backend] = out
    # Both backends run the same integer codes: they agree much more closely than either with the original.
    assert rel(outs["onnxruntime"], outs["eager"]) < 0.02


def _casts_into(model: onnx.ModelProto, op_type: str) -> int:
    producers = {o: n for n in model.graph.node for o in n.output}
    return sum(1 for n in model.graph.node if n.op_type == op_type
               for i in n.input if i in producers and producers[i].op_type == "Cast")


def test_float32_lowering_casts_only_other_float_types():
    spec = fxopt.models.mlp()
    graph = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
    pipeline = "canonicalize,quantize(mode=dynamic,act_granularity=tensor,min_size=0)"
    fp32 = fxopt.PassManager(pipeline).run(graph).graph
    assert _casts_into(fxopt.compile(fp32, backend="onnxruntime").program.model_proto, "DynamicQuantizeLinear") == 0
    spec.model.half()
    graph16 = fxopt.trace(spec.model, tuple(x.half() for x in spec.example_inputs), dynamic_shapes=spec.dynamic_shapes)
    fp16 = fxopt.PassManager(pipeline).run(graph16).graph
    compiled = fxopt.compile(fp16, backend="onnxruntime")
    assert _casts_into(compiled.program.model_proto, "DynamicQuantizeLinear") == 3  # one per linear
    x = spec.example_inputs[0].half()
    assert compiled(x).dtype == torch.float16
    assert rel(compiled(x), fxopt.compile(fp16, backend="eager")(x)) < 0.01


def test_bfloat16_model_runs_eager_and_onnx_runtime_says_why_not():
    spec = gpt2("tiny")
    spec.model.to(torch.bfloat16)
    graph = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, name="gpt2-bf16")
    quantized = fxopt.PassManager("canonicalize,quantize(mode=dynamic)").run(graph).graph
    with torch.no_grad():
        ref = logits(run(spec.model, spec.example_inputs))
    out = logits(run(fxopt.compile(quantized, backend="eager"), spec.example_inputs))
    assert out.dtype == torch.bfloat16 and rel(out, ref) < 0.05
    with pytest.raises(fxopt.BackendError, match="gpt2-bf16.*bfloat16.*float32 or float16"):
        fxopt.compile(quantized, backend="onnxruntime", providers=["CPUExecutionProvider"])


def test_float16_dynamic_int8_linear_packs_its_weight_once():
    # fbgemm's packed weight is cached under the bias tensor's identity: a
    # float16 call must not pack (and keep) a new copy every time
    from fxopt.ir.ops_quant import packed_weight_count

    w_q, w_scale = torch.randint(-63, 64, (8, 4), dtype=torch.int8), torch.rand(8) * 0.05
    bias, x = torch.randn(8).half(), torch.randn(3, 4).half()
    first = torch.ops.fxopt.linear_dynamic_int8(x, w_q, w_scale, bias)
    size = packed_weight_count()
    for _ in range(5):
        torch.testing.assert_close(torch.ops.fxopt.linear_dynamic_int8(x, w_q, w_scale, bias), first)
    assert packed_weight_count() == size and first.dtype == torch.float16
