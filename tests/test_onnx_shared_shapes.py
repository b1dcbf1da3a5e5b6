"""``share_dimension_shapes``: a one-dimension ``Shape`` of a size the exporter
named after a graph input's dimension reads that input, so that what each
layer computes from it (a decode step's cache length, its batch) is computed
once. The decode step's case is in tests/test_generation.py, beside the
generator it reads."""

from __future__ import annotations

import onnx_ir as ir

from fxopt.backends.onnxruntime import share_dimension_shapes


def _model():
    """x [batch, n], y [batch, m]; the batch read from y, n from x, and a
    size of an intermediate that no input names."""
    x = ir.Value(name="x", shape=ir.Shape(["batch", "n"]), type=ir.TensorType(ir.DataType.FLOAT))
    y = ir.Value(name="y", shape=ir.Shape(["batch", "m"]), type=ir.TensorType(ir.DataType.FLOAT))
    batch_of_y = ir.node("Shape", [y], {"start": 0, "end": 1}, name="batch_of_y")
    n_of_x = ir.node("Shape", [x], {"start": 1, "end": 2}, name="n_of_x")
    joined = ir.node("Concat", [x, y], {"axis": 1}, name="joined")
    joined.outputs[0].shape = ir.Shape(["batch", "n + m"])
    width = ir.node("Shape", [joined.outputs[0]], {"start": -1}, name="width")
    out = ir.node("Concat", [batch_of_y.outputs[0], n_of_x.outputs[0], width.outputs[0]], {"axis": 0}, name="out")
    graph = ir.Graph([x, y], out.outputs, nodes=[batch_of_y, n_of_x, joined, width, out], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def test_a_named_size_is_read_from_the_first_input_that_has_it():
    model = _model()
    assert share_dimension_shapes(model) == 1
    shapes = {n.name: n for n in model.graph if n.op_type == "Shape"}
    assert "batch_of_y" not in shapes  # now Shape(x)[0:1], the first input with "batch"
    out = next(n for n in model.graph if n.name == "out")
    batch = out.inputs[0].producer()
    assert batch.inputs[0].name == "x" and (batch.attributes.get_int("start"), batch.attributes.get_int("end")) == (0, 1)
    # must not fire: the source itself, and a size no input names ("n + m")
    assert {"n_of_x", "width"} <= set(shapes)
    assert share_dimension_shapes(model) == 0

