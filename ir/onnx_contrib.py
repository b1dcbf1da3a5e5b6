"""ONNX Runtime's `com.microsoft` operators, made callable from onnxscript.

ONNX's Python package knows no schema for ONNX Runtime's contrib operators, and
onnxscript (like torch's exporter) builds a node only from a schema. Each
contrib op fxopt lowers to is declared here once, with the inputs, outputs and
attributes ONNX Runtime documents, and is then called as ``msft.Name(...)``.
"""

from __future__ import annotations

import onnx
import onnxscript
from onnx.defs import OpSchema

DOMAIN = "com.microsoft"
msft = onnxscript.values.Opset(DOMAIN, 1)

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_Param = OpSchema.FormalParameter
_Attr = OpSchema.Attribute
_AttrType = OpSchema.AttrType


def _optional(name: str, type_str: str) -> OpSchema.FormalParameter:
    return _Param(name, type_str, param_option=OpSchema.FormalParameterOption.Optional)


def declare(
    name: str,
    inputs: list[OpSchema.FormalParameter],
    outputs: list[OpSchema.FormalParameter],
    type_constraints: list[tuple[str, list[str], str]],
    attributes: list[OpSchema.Attribute] = (),
) -> None:
    """Register the schema of a contrib op, once per process."""
    try:
        onnx.defs.get_schema(name, 1, DOMAIN)
        return
    except onnx.defs.SchemaError:
        pass
    onnx.defs.register_schema(
        OpSchema(
            name,
            DOMAIN,
            1,
            inputs=inputs,
            outputs=outputs,
            type_constraints=type_constraints,
            attributes=list(attributes),
        )
    )


declare(
    "BiasGelu",
    [_Param("A", "T"), _Param("B", "T")],
    [_Param("C", "T")],
    [("T", _FLOATS, "")],
)
declare(
    "FastGelu",
    [_Param("X", "T"), _optional("bias", "T")],
    [_Param("Y", "T")],
    [("T", _FLOATS, "")],
)
declare(
    "MatMulNBits",
    [
        _Param("A", "T1"), _Param("B", "T2"), _Param("scales", "T1"), _optional("zero_points", "T3"),
        _optional("g_idx", "T4"), _optional("bias", "T1"),
    ],
    [_Param("Y", "T1")],
    [
        ("T1", _FLOATS, ""), ("T2", ["tensor(uint8)", "tensor(int32)"], ""),
        ("T3", ["tensor(uint8)", "tensor(int32)", *_FLOATS], ""), ("T4", ["tensor(int32)"], ""),
    ],
    [
        _Attr("K", _AttrType.INT, "input feature dimension"), _Attr("N", _AttrType.INT, "output feature dimension"),
        _Attr("bits", _AttrType.INT, "bits per weight"), _Attr("block_size", _AttrType.INT, "quantization block size"),
        _Attr("accuracy_level", _AttrType.INT, "minimum accuracy of A: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8", required=False),
    ],
)
declare(
    "MatMulIntegerToFloat",
    [
        _Param("A", "T1"), _Param("B", "T2"), _Param("a_scale", "T3"), _Param("b_scale", "T3"),
        _optional("a_zero_point", "T1"), _optional("b_zero_point", "T2"), _optional("bias", "T3"),
    ],
    [_Param("Y", "T3")],
    [("T1", ["tensor(int8)", "tensor(uint8)"], ""), ("T2", ["tensor(int8)", "tensor(uint8)"], ""), ("T3", _FLOATS, "")],
)
