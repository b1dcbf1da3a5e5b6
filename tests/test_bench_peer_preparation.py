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


_H2H_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "int4_head_to_head.py"
_h2h_spec = importlib.util.spec_from_file_location("int4_head_to_head", _H2H_PATH)
int4_head_to_head = importlib.util.module_from_spec(_h2h_spec)
_h2h_spec.loader.exec_module(int4_head_to_head)


def test_fused_int4_lowering_is_what_onnx_runtime_runs_for_its_own_int4(tmp_path):
    """fxopt's fused int4 GPT-2 (LM head included) and ONNX Runtime's
    MatMulNBitsQuantizer on the folded fp32 export, each after ONNX Runtime's
    optimizer: the same MatMulNBits kernels (K, N, bits, block, accuracy
    level 4, uint8 zero points, bias as an input, no g_idx), no more nodes
    than the peer around them, the same accuracy, and ONNX Runtime's output
    equal to fxopt's eager one."""
    spec = gpt2("tiny")
    paths, fused = int4_head_to_head.build(spec, tmp_path, block=32)
    graphs = {k: int4_head_to_head.optimized_graph(p) for k, p in paths.items()}
    signatures = {k: int4_head_to_head.matmulnbits_signatures(g) for k, g in graphs.items()}
    assert signatures["fxopt"] == signatures["peer"]
    assert sum(signatures["fxopt"].values()) == 9  # 2 layers x 4 linears + the tied LM head
    assert all(key[4] == 4 and key[5] and not key[7] for key in signatures["fxopt"])  # accuracy 4, zero points, no g_idx
    assert (64, 256, 4, 32, 4, True, False, False) in signatures["fxopt"]  # the LM head: int4, no bias
    counts = {k: int4_head_to_head.op_counts(g) for k, g in graphs.items()}
    assert sum(counts["fxopt"].values()) <= sum(counts["peer"].values())
    assert counts["fxopt"]["Cast"] == 0 and counts["fxopt"]["Add"] <= counts["peer"]["Add"]

    input_ids = spec.example_inputs["input_ids"].numpy()
    outputs = {k: torch.from_numpy(_run(p, input_ids)) for k, p in paths.items()}
    eager = fxopt.compile(fused, "eager")(**spec.example_inputs)
    eager = eager.logits if hasattr(eager, "logits") else eager[0]
    assert fxopt.compare(eager, outputs["fxopt"]).cosine > 0.999
    reference = spec.model(**spec.example_inputs).logits.detach()
    cos = {k: fxopt.compare(reference, v).cosine for k, v in outputs.items()}
    assert abs(cos["fxopt"] - cos["peer"]) < 2e-3, cos
