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
