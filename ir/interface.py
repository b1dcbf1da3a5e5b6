"""How a traced model is called and what it returns, apart from its graph.

An :class:`Interface` holds the model's parameter names, the pytree structure
of its inputs and outputs, and the dtype and rank of each tensor input. The
Graph answers with it, and a compiled model keeps it, so that a model loaded
back from an ONNX file takes the same inputs and returns the same structure
(``CausalLMOutputWithPast``, a tuple, a dict) as the one that was saved.
It travels as JSON: nothing in it is code.
"""

from __future__ import annotations

import importlib
import inspect
import json
from typing import Any

import torch
import torch.utils._pytree as pytree

# Packages whose modules fxopt imports by itself when a saved structure names
# one of their classes (a Hugging Face ``ModelOutput`` is known to torch's
# pytree only once its module is imported). Any other module the user imports.
IMPORTABLE_PACKAGES = ("transformers",)
_BUILTIN_MODULES = ("builtins", "collections", "torch")


class StructureError(RuntimeError):
    """A saved structure names a class that is not registered with torch's pytree."""


def spec_types(spec_json: str) -> set[str]:
    """Serialized type names in a ``treespec_dumps`` string."""
    names: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            if node.get("type"):
                names.add(node["type"])
            for child in node.get("children_spec") or ():
                walk(child)

    walk(json.loads(spec_json)[1])
    return names


def structure_modules(*specs: pytree.TreeSpec) -> dict[str, str]:
    """Serialized type name -> the module that registers it, for the
    non-builtin nodes of ``specs``."""
    out = {}
    for spec in specs:
        for name in spec_types(pytree.treespec_dumps(spec)):
            cls = pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE.get(name)
            if cls is not None and cls.__module__.split(".")[0] not in _BUILTIN_MODULES:
                out[name] = cls.__module__
    return out


def ensure_registered(type_names, modules: dict[str, str], where: str) -> None:
    """Make every serialized type name known to torch's pytree, importing its
    module when it belongs to :data:`IMPORTABLE_PACKAGES`; otherwise raise
    :class:`StructureError` saying which import is missing."""
    for name in sorted(type_names):
        if name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            continue
        module = modules.get(name) or name.rpartition(".")[0]
        # Only the module the type's own name says: the file does not choose what is imported.
        if module.split(".")[0] in IMPORTABLE_PACKAGES and name.startswith(module + "."):
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise StructureError(f"{where}: the model's inputs or outputs are {name} objects, whose module {module!r} "
                                     f"does not import here ({e}); install it to load this file") from None
        if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            raise StructureError(f"{where}: the model's inputs or outputs are {name} objects, which torch's pytree knows only "
                                 f"once module {module!r} is imported; import it before loading (fxopt imports modules of "
                                 f"{', '.join(IMPORTABLE_PACKAGES)} by itself, no others)")


def _path_names(spec: pytree.TreeSpec, prefix: str) -> list[str]:
    """One name per leaf: keys of dicts and model outputs, indices of
    sequences, joined with dots (``past_key_values.0.key``)."""
    if spec.is_leaf():
        return [prefix or "output"]
    children = spec.children()
    keys = spec.context
    if hasattr(keys, "_fields"):  # a namedtuple type
        keys = keys._fields
    if not (isinstance(keys, (list, tuple)) and len(keys) == len(children) and all(isinstance(k, (str, int)) for k in keys)):
        keys = range(len(children))
    names = []
    for key, child in zip(keys, children):
        names += _path_names(child, f"{prefix}.{key}" if prefix else str(key))
    return names


class Interface:
    """The calling convention of a traced model: ``arg_names`` (its forward's
    parameters), ``in_spec`` / ``out_spec`` (pytree structures of the inputs
    ``(args, kwargs)`` and of the output) and, per flat input, either a tensor
    record ``{"name", "dtype", "ndim"}`` or ``{"value": v}`` for a non-tensor
    input the model was specialized to."""

    def __init__(self, name: str, arg_names: list[str], in_spec: pytree.TreeSpec, out_spec: pytree.TreeSpec, inputs: list[dict]):
        self.name = name
        self.arg_names = list(arg_names)
        self.in_spec = in_spec
        self.out_spec = out_spec
        self.inputs = inputs
        # Flat position -> (input name, rows) of the index inputs; set by a
        # compiled model that checks them, saved with it.
        self.index_bounds: dict[int, tuple[str, int]] = {}
        self.signature = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in self.arg_names])

    @classmethod
    def from_graph(cls, graph) -> "Interface":
        info = graph.fx._codegen.pytree_info
        example = pytree.tree_leaves((graph.example_args, graph.example_kwargs))
        inputs = []
        for i, node in enumerate(graph.placeholders()):
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                # A dynamic dimension's symbol: inputs that share one must agree at run time.
                symbols = {d: str(s.node.expr) for d, s in enumerate(val.shape)
                           if isinstance(s, torch.SymInt) and getattr(s.node.expr, "is_Symbol", False)}
                inputs.append({"name": node.name, "dtype": val.dtype, "ndim": val.dim(), "symbols": symbols})
            else:
                inputs.append({"name": node.name, "value": example[i] if i < len(example) else val})
        return cls(graph.name, info.orig_args, info.in_spec, info.out_spec, inputs)

    # -- calling -------------------------------------------------------------
    def flatten_inputs(self, *args, **kwargs) -> list:
        """The call's inputs as the flat list the graph and the ONNX model
        take; raises ValueError/TypeError when the structure differs."""
        bound = self.signature.bind(*args, **kwargs)
        args_spec, kwargs_spec = self.in_spec.children()
        positional = tuple(bound.arguments[n] for n in self.arg_names[: args_spec.num_children])
        keywords = {k: bound.arguments[k] for k in (kwargs_spec.context or [])}
        leaves, spec = pytree.tree_flatten((positional, keywords))
        if spec != self.in_spec:
            raise ValueError(f"inputs do not have the structure the model was traced with:\n  got {spec}\n  expected {self.in_spec}")
        return leaves

    def check_inputs(self, leaves: list, index_bounds: dict[int, tuple[str, int]] | None = None) -> None:
        """Each tensor input is a tensor with the dtype and rank it was traced
        with (ValueError naming it otherwise); with ``index_bounds`` (flat
        position -> (name, rows), ``Graph.index_bounds``), an index input
        with a value outside ``[0, rows)`` raises IndexError naming it."""
        for i, (name, rows) in (index_bounds or {}).items():
            leaf = leaves[i] if i < len(leaves) else None
            if isinstance(leaf, torch.Tensor) and leaf.numel() and not leaf.is_floating_point():
                low, high = (int(v) for v in torch.aminmax(leaf))
                if low < 0 or high >= rows:
                    raise IndexError(f"input '{name}' has value {low if low < 0 else high}, outside [0, {rows}) (the rows of the "
                                     f"table it indexes, e.g. the vocabulary)")
        for record, leaf in zip(self.inputs, leaves):
            if "dtype" not in record:
                continue
            name, dtype, ndim = record["name"], record["dtype"], record["ndim"]
            if not isinstance(leaf, torch.Tensor):
                hint = ": convert it with torch.from_numpy(...)" if type(leaf).__module__ == "numpy" else ""
                raise ValueError(f"input '{name}' must be a torch.Tensor ({dtype} with {ndim} dims, as traced), got "
                                 f"{'None' if leaf is None else type(leaf).__module__ + '.' + type(leaf).__name__}{hint}")
            if leaf.dtype != dtype or leaf.dim() != ndim:
                raise ValueError(f"input '{name}' is {leaf.dtype} with {leaf.dim()} dims; {self.name} was traced with "
                                 f"{dtype} with {ndim} dims: convert it (e.g. .to({dtype})) or trace with such an input")
        bound: dict[str, tuple[str, int, int]] = {}  # symbol -> (input, dim, size) that set it
        for record, leaf in zip(self.inputs, leaves):
            for dim, symbol in record.get("symbols", {}).items():
                size = leaf.shape[dim]
                first = bound.setdefault(symbol, (record["name"], dim, size))
                if first[2] != size:
                    raise ValueError(f"input '{record['name']}' has size {size} in dim {dim}, but '{first[0]}' has "
                                     f"{first[2]} in dim {first[1]}: {self.name} was traced with these dims equal")

    def unflatten_outputs(self, flat: list):
        return pytree.tree_unflatten(list(flat), self.out_spec)

    def num_outputs(self) -> int:
        return self.out_spec.num_leaves

    def output_names(self) -> list[str]:
        """Names of the flat outputs after the model's own structure:
        ``logits``, ``last_hidden_state``, ``output.0`` for a tuple."""
        spec = self.out_spec
        top_is_mapping = not spec.is_leaf() and isinstance(spec.context, (list, tuple)) and len(spec.context) == spec.num_children
        return _path_names(spec, "" if top_is_mapping else "output")

    # -- as JSON ---------------------------------------------------------------
    def to_json(self) -> str:
        inputs = []
        for record in self.inputs:
            if "dtype" in record:
                inputs.append({"name": record["name"], "dtype": dtype_name(record["dtype"]), "ndim": record["ndim"]})
            else:
                value = record["value"]
                if not jsonable(value):
                    raise TypeError(f"input '{record['name']}' is {type(value).__name__} {value!r}: only tensors, numbers, "
                                    "strings and None can be saved as inputs")
                inputs.append({"name": record["name"], "value": value})
        return json.dumps({
            "name": self.name, "arg_names": self.arg_names,
            "in_spec": pytree.treespec_dumps(self.in_spec), "out_spec": pytree.treespec_dumps(self.out_spec),
            "structure_modules": structure_modules(self.in_spec, self.out_spec), "inputs": inputs,
            "index_bounds": {str(i): [name, rows] for i, (name, rows) in self.index_bounds.items()},
        })

    @classmethod
    def from_json(cls, text: str, where: str) -> "Interface":
        """Raises ValueError naming ``where`` for malformed text and
        :class:`StructureError` for a structure whose classes are unknown."""
        try:
            data = json.loads(text)
            specs = (data["in_spec"], data["out_spec"])
            ensure_registered(set().union(*map(spec_types, specs)), data.get("structure_modules", {}), where)
            in_spec, out_spec = map(pytree.treespec_loads, specs)
            inputs = []
            for record in data["inputs"]:
                if "dtype" in record:
                    record = dict(record, dtype=dtype_from_name(record["dtype"]))
                inputs.append(record)
            interface = cls(str(data["name"]), [str(n) for n in data["arg_names"]], in_spec, out_spec, inputs)
            interface.index_bounds = {int(i): (str(name), int(rows)) for i, (name, rows) in data.get("index_bounds", {}).items()}
            return interface
        except StructureError:
            raise
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise ValueError(f"{where}: malformed model interface ({type(e).__name__}: {e})") from None


def dtype_from_name(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``; ValueError for anything else."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))
