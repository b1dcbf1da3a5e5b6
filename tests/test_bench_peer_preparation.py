"""The quantization benchmark prepares ONNX Runtime's quantizers the way their
documentation does: a tied LM head exported as ``MatMul(x, Transpose(W))`` has
its transpose folded into an initializer first, without which the quantizers
leave that MatMul in float."""

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import quantize_dynamic

import fxopt
from fxopt.models import gpt2

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "quant_speed.py"
_spec = importlib.util.spec_from_file_location("quant_speed", _PATH)
quant_speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quant_speed)


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _transposed_initializers(path):
    model = onnx.load(str(path))
    initializers = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in initializers]


def _run(path, input_ids):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": input_ids})[0]


def test_fold_transposed_initializers_lets_quantize_dynamic_reach_the_lm_head(tmp_path):
    spec = gpt2("tiny")
    graph = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
    exported = fxopt.export_onnx(fxopt.PassManager("canonicalize").run(graph).graph, tmp_path / "fp32.onnx")
    assert len(_transposed_initializers(exported)) == 1  # the tied LM head
    transposes = _ops(exported).count("Transpose")

    folded = tmp_path / "folded.onnx"
    assert quant_speed.fold_transposed_initializers(str(exported), str(folded)) == 1
    assert _transposed_initializers(folded) == []
    # Transposes of activations (attention's head split) are no initializers: they stay.
    assert _ops(folded).count("Transpose") == transposes - 1
    input_ids = spec.example_inputs["input_ids"].numpy()
    np.testing.assert_allclose(_run(folded, input_ids), _run(exported, input_ids), rtol=0, atol=1e-5)

    quantize_dynamic(str(exported), str(tmp_path / "q_unfolded.onnx"))
    quantize_dynamic(str(folded), str(tmp_path / "q_folded.onnx"))
    unfolded_ops, folded_ops = _ops(tmp_path / "q_unfolded.onnx"), _ops(tmp_path / "q_folded.onnx")
    assert "MatMul" in unfolded_ops  # the LM head left in float without the fold
    assert "MatMul" not in folded_ops
    assert folded_ops.count("MatMulInteger") + folded_ops.count("DynamicQuantizeMatMul") == _ops(exported).count("MatMul")
    reference = spec.model(**spec.example_inputs).logits.detach()
    quantized = torch.from_numpy(_run(tmp_path / "q_folded.onnx", input_ids))
    assert fxopt.compare(reference, quantized).cosine > 0.99
