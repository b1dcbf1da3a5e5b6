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

# The pieces a declaration is written with (ir/ops_*.py declare their contrib ops too).
FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
Param = OpSchema.FormalParameter
Attr = OpSchema.Attribute
AttrType = OpSchema.AttrType


def optional_param(name: str, type_str: str) -> OpSchema.FormalParameter:
    """An input the operator may be called without."""
    return Param(name, type_str, param_option=OpSchema.FormalParameterOption.Optional)


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
    [Param("A", "T"), Param("B", "T")],
    [Param("C", "T")],
    [("T", FLOAT_TYPES, "")],
)
declare(
    "FastGelu",
    [Param("X", "T"), optional_param("bias", "T")],
    [Param("Y", "T")],
    [("T", FLOAT_TYPES, "")],
)
declare(
    "MatMulNBits",
    [
        Param("A", "T1"), Param("B", "T2"), Param("scales", "T1"), optional_param("zero_points", "T3"),
        optional_param("g_idx", "T4"), optional_param("bias", "T1"),
    ],
    [Param("Y", "T1")],
    [
        ("T1", FLOAT_TYPES, ""), ("T2", ["tensor(uint8)", "tensor(int32)"], ""),
        ("T3", ["tensor(uint8)", "tensor(int32)", *FLOAT_TYPES], ""), ("T4", ["tensor(int32)"], ""),
    ],
    [
        Attr("K", AttrType.INT, "input feature dimension"), Attr("N", AttrType.INT, "output feature dimension"),
        Attr("bits", AttrType.INT, "bits per weight"), Attr("block_size", AttrType.INT, "quantization block size"),
        Attr("accuracy_level", AttrType.INT, "minimum accuracy of A: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8", required=False),
    ],
)
declare(
    "MatMulIntegerToFloat",
    [
        Param("A", "T1"), Param("B", "T2"), Param("a_scale", "T3"), Param("b_scale", "T3"),
        optional_param("a_zero_point", "T1"), optional_param("b_zero_point", "T2"), optional_param("bias", "T3"),
    ],
    [Param("Y", "T3")],
    [("T1", ["tensor(int8)", "tensor(uint8)"], ""), ("T2", ["tensor(int8)", "tensor(uint8)"], ""), ("T3", FLOAT_TYPES, "")],
)
