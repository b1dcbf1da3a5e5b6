"""Saving and loading a Graph: the optimized module is re-exported and written
with ``torch.export.save`` (a .pt2 archive); fxopt ops are stored by name, so
loading needs only ``import fxopt``. The example inputs travel alongside, so a
loaded graph can be compiled, compared and re-exported like a fresh one."""

from __future__ import annotations

import base64
import io
import json

import torch

FORMAT_VERSION = 1


def save(graph, path) -> None:
    buf = io.BytesIO()
    torch.save({"args": graph.example_args, "kwargs": graph.example_kwargs}, buf)
    extra = {
        "fxopt.json": json.dumps({"format": FORMAT_VERSION, "name": graph.name, "properties": sorted(graph.properties)}),
        "fxopt_inputs.b64": base64.b64encode(buf.getvalue()).decode("ascii"),
    }
    torch.export.save(graph.to_exported_program(), str(path), extra_files=extra)


def load(path):
    from .trace import graph_from_exported_program

    extra = {"fxopt.json": "", "fxopt_inputs.b64": ""}
    ep = torch.export.load(str(path), extra_files=extra)
    if not extra["fxopt.json"]:
        raise ValueError(f"{path} is a torch.export archive but not one saved by fxopt (no fxopt.json)")
    info = json.loads(extra["fxopt.json"])
    inputs = torch.load(io.BytesIO(base64.b64decode(extra["fxopt_inputs.b64"])), weights_only=True)
    graph = graph_from_exported_program(ep, inputs["args"], inputs["kwargs"], name=info.get("name", "model"))
    graph.properties = set(info.get("properties", ()))
    return graph
