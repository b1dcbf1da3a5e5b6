"""Saving and loading a Graph.

A saved graph is a torch.export archive (.pt2): the optimized module is
re-exported and written with ``torch.export.save``; fxopt ops are stored by
name, so loading needs only ``import fxopt``. The example inputs travel in
``extra/fxopt.json``, so a loaded graph can be compiled, compared and
re-exported like a fresh one.

Loading is safe by construction: fxopt reads the archive itself and hands
torch only data. Weights are raw bytes described by JSON, the graph is
JSON, and nothing is unpickled: a member that torch would unpickle (a
weight marked ``use_pickle``, a pickled sample-inputs member, a custom
object, an AOTInductor library) is refused by name. The graph's JSON is
checked before torch reads it: every op must be in fxopt's op set and every
symbolic size expression must be arithmetic on sizes (torch parses those
with ``sympy.sympify``, which evaluates Python).
"""

from __future__ import annotations

import base64
import io
import json
import re
import tokenize
import zipfile
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from .interface import StructureError, spec_types, dtype_from_name, dtype_name, ensure_registered, jsonable, structure_modules
from .verify import op_allowed

FORMAT_VERSION = 2


class LoadError(ValueError):
    """A file fxopt cannot or will not load; the message names the file and
    the member at fault."""


# -- saving ----------------------------------------------------------------------

def _tensor_record(t: torch.Tensor) -> dict:
    flat = t.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "data": base64.b64encode(raw).decode("ascii")}


def _tensor_from_bytes(raw: bytes, dtype: torch.dtype, numel: int | None = None) -> torch.Tensor:
    """A flat tensor over a copy of ``raw``."""
    if not raw:
        return torch.empty(0, dtype=dtype)
    size = torch.empty((), dtype=dtype).element_size()
    if len(raw) % size or (numel is not None and len(raw) // size < numel):
        raise ValueError(f"{len(raw)} bytes do not hold {numel if numel is not None else 'whole'} {dtype} elements")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype)


def _encode_inputs(args: tuple, kwargs: dict) -> dict:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    out = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            out.append({"tensor": _tensor_record(leaf)})
        elif jsonable(leaf):
            out.append({"value": leaf})
        else:
            raise TypeError(f"example input #{i} is {type(leaf).__name__}: only tensors, numbers, strings and None can be saved")
    return {"spec": pytree.treespec_dumps(spec), "leaves": out}


def save(graph, path) -> None:
    ep = graph.to_exported_program()
    # torch.export.save pickles the example inputs; fxopt keeps them as data.
    ep.example_inputs = None
    info = {
        "format": FORMAT_VERSION,
        "name": graph.name,
        "properties": sorted(graph.properties),
        "inputs": _encode_inputs(graph.example_args, graph.example_kwargs),
        "structure_modules": structure_modules(*_specs(graph)),
        "dim_names": graph.dim_names,
        "value_bounds": graph.value_bounds,
    }
    torch.export.save(ep, str(path), extra_files={"fxopt.json": json.dumps(info)})


def _specs(graph):
    info = graph.fx._codegen.pytree_info
    _, input_spec = pytree.tree_flatten((graph.example_args, graph.example_kwargs))
    return info.in_spec, info.out_spec, input_spec


# -- what a file may hold ----------------------------------------------------------

# Members of an archive torch.export.save writes, relative to its top folder.
# Anything else (AOTInductor libraries, legacy pickled state dicts, other
# extra files) is refused.
_MEMBERS = re.compile(
    r"(\.data/version|\.data/serialization_id|archive_format|archive_version|byteorder|version"
    r"|models/model\.json|extra/fxopt\.json|data/sample_inputs/model\.pt"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+)\Z")
_WEIGHT = re.compile(r"weight_\d+\Z")
_CONSTANT = re.compile(r"tensor_\d+\Z")


class _Archive:
    """The members of a .pt2 file, read with zipfile (CRC-checked)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            data = path.read_bytes()
        except IsADirectoryError:
            raise LoadError(f"{path} is a directory, not a saved graph") from None
        if not zipfile.is_zipfile(io.BytesIO(data)):
            raise LoadError(f"{path}: {_not_a_zip(path, data)}")
        try:
            self.zip = zipfile.ZipFile(io.BytesIO(data))
            bad = self.zip.testzip()
        except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as e:
            raise LoadError(f"{path} is a damaged zip archive ({e}); save the graph again") from None
        if bad is not None:
            raise LoadError(f"{path}: member {bad!r} is damaged (its CRC-32 does not match); the file changed after it "
                            "was saved: save the graph again")
        names = self.zip.namelist()
        prefixes = {n.split("/", 1)[0] for n in names}
        if len(prefixes) != 1 or any("/" not in n for n in names):
            raise LoadError(f"{path} is a zip archive but not a torch.export archive (members {names[:5]})")
        self.prefix = prefixes.pop() + "/"
        self.members = {n[len(self.prefix):] for n in names}

    def has(self, member: str) -> bool:
        return member in self.members

    def read(self, member: str) -> bytes:
        return self.zip.read(self.prefix + member)

    def json(self, member: str):
        try:
            return json.loads(self.read(member).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LoadError(f"{self.path}: member {member!r} is not valid JSON ({type(e).__name__}: {e}); the file is "
                            "damaged or was not written by fxopt") from None

    def refuse(self, member: str, why: str) -> LoadError:
        return LoadError(f"{self.path}: refusing member {member!r}: {why}. fxopt never runs code or unpickles data from a "
                         "file it loads; a file fxopt saved has no such member, so this one was edited or made by another tool")


def _not_a_zip(path: Path, data: bytes) -> str:
    if not data:
        return "the file is empty"
    if data[:2] == b"PK" or path.suffix == ".pt2":
        return "not a complete zip archive (truncated or damaged); save the graph again"
    if path.suffix == ".onnx" or _looks_like_onnx(data):
        return ("this is an ONNX model, not a graph saved by fxopt (.pt2); fxopt.load reads graphs saved with "
                "Graph.save or a compiled eager model's .save; load a compiled ONNX Runtime model with fxopt.load_compiled")
    return "not a graph saved by fxopt (a .pt2 zip archive)"


def _looks_like_onnx(data: bytes) -> bool:
    try:
        import onnx

        return len(onnx.load_model_from_string(data).graph.node) > 0
    except Exception:  # not protobuf: any decoding error means "no"
        return False


# -- the graph's JSON ------------------------------------------------------------------

_SYMBOL = re.compile(r"[a-z]+\d+\Z")
# Keyword arguments of ``Symbol(...)``: sympy's assumption names.
_ASSUMPTIONS = frozenset(
    "algebraic antihermitian commutative complex composite even extended_negative extended_nonnegative "
    "extended_nonpositive extended_nonzero extended_positive extended_real finite hermitian imaginary infinite "
    "integer irrational negative noninteger nonnegative nonpositive nonzero odd polar positive prime rational "
    "real transcendental zero".split())
_EXPR_OPS = {"(", ")", ",", "+", "-", "*", "/", "//", "%", "**", "<", ">", "<=", ">=", "==", "!="}


# What torch writes in a size expression: symbols, integers, arithmetic, comparisons
# and its integer size functions; powers only with a small literal exponent (a crafted
# ``Pow(9, Pow(9, 9))`` would hang the loader evaluating it); no combinatorics, no
# Python builtins.
_SIZE_FUNCTIONS = frozenset("""
    Symbol Integer Rational Float Add Mul Pow PowByNatural Max Min Mod Abs Eq Ne Lt Le Gt Ge And Or Not
    StrictLessThan StrictGreaterThan LessThan GreaterThan Equality Unequality floor ceiling
    True False true false oo int_oo IntInfinity NegativeIntInfinity
    CeilDiv CeilToInt CleanDiv FloorDiv FloorToInt IntTrueDiv FloatTrueDiv Identity ModularIndexing
    PythonMod RoundToInt ToFloat TruncToFloat TruncToInt Where LShift RShift
""".split())
_MAX_DIGITS = 19  # int64's range
_MAX_EXPONENT = 64
_MAX_POWERS = 2


def _small_exponent(tokens, open_at: int) -> bool:
    """Whether the call whose '(' is ``tokens[open_at]`` has a second argument
    that is a literal (``2`` or ``Integer(2)``) of at most ``_MAX_EXPONENT``."""
    if open_at >= len(tokens) or tokens[open_at].string != "(":
        return False
    depth, comma = 0, None
    for j in range(open_at, len(tokens)):
        if tokens[j].string == "(":
            depth += 1
        elif tokens[j].string == ")":
            depth -= 1
            if depth == 0:
                exponent = [t.string for t in tokens[comma + 1:j]] if comma is not None else []
                if exponent[:2] == ["Integer", "("] and exponent[-1:] == [")"]:
                    exponent = exponent[2:-1]
                return len(exponent) == 1 and exponent[0].isdigit() and int(exponent[0]) <= _MAX_EXPONENT
        elif tokens[j].string == "," and depth == 1:
            if comma is not None:
                return False
            comma = j
    return False


def check_size_expression(expr: str) -> None:
    """Raise ValueError unless ``expr`` is arithmetic on sizes as torch writes
    it (``Mul(Integer(2), Symbol('s0', positive=True))``, ``s0 + 1``), small
    enough to evaluate at once: integers of at most 19 digits, at most two
    ``**`` with a literal exponent of at most 64."""
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(expr).readline)
                  if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)]
    except (tokenize.TokenError, SyntaxError) as e:
        raise ValueError(f"cannot tokenize: {e}") from None
    if sum(t.string in ("**", "Pow", "PowByNatural") for t in tokens) > _MAX_POWERS:
        raise ValueError(f"more than {_MAX_POWERS} powers")
    for i, tok in enumerate(tokens):
        if tok.string in ("Pow", "PowByNatural") and not _small_exponent(tokens, i + 1):
            raise ValueError(f"{tok.string}(...) takes a literal exponent of at most {_MAX_EXPONENT}")
    for i, tok in enumerate(tokens):
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        if tok.type == tokenize.NUMBER and len(tok.string.lstrip("0")) > _MAX_DIGITS:
            raise ValueError(f"{tok.string[:24]!r}... is larger than a size")
        if tok.string == "**" and not (following is not None and following.type == tokenize.NUMBER
                                       and following.string.isdigit() and int(following.string) <= _MAX_EXPONENT
                                       and not (i + 2 < len(tokens) and tokens[i + 2].string == "**")):
            raise ValueError(f"'**' takes a literal exponent of at most {_MAX_EXPONENT}")
        ok = (
            tok.type == tokenize.NUMBER
            or (tok.type == tokenize.STRING and re.fullmatch(r"'[A-Za-z_][A-Za-z0-9_]*'", tok.string))
            or (tok.type == tokenize.NAME and (tok.string in _SIZE_FUNCTIONS or _SYMBOL.match(tok.string)))
            or (tok.type == tokenize.NAME and following is not None and following.string == "=" and tok.string in _ASSUMPTIONS)
            or (tok.type == tokenize.OP and (tok.string in _EXPR_OPS or (tok.string == "=" and i and tokens[i - 1].type == tokenize.NAME)))
        )
        if not ok:
            raise ValueError(f"{tok.string!r} is not part of a size expression")


def _resolve_target(target: str):
    """The callable a serialized node target names, or None; only the forms
    torch writes for ATen/fxopt ops and for size arithmetic."""
    parts = target.split(".")
    if not all(p.isidentifier() for p in parts):
        return None
    if len(parts) == 5 and parts[:2] == ["torch", "ops"]:
        try:
            op = getattr(getattr(getattr(torch.ops, parts[2]), parts[3]), parts[4])
        except (AttributeError, RuntimeError):
            return None
        return op if isinstance(op, torch._ops.OpOverload) else None
    modules = {"_operator": __import__("operator"), "math": __import__("math"), "torch": torch}
    if len(parts) == 2 and parts[0] in modules and not parts[1].startswith("_"):
        return getattr(modules[parts[0]], parts[1], None)
    return None


def _check_graph_json(archive: _Archive, model: dict) -> None:
    """Every op in fxopt's op set and every size expression plain arithmetic."""
    def walk(obj):
        if isinstance(obj, dict):
            if isinstance(obj.get("target"), str) and "inputs" in obj and "outputs" in obj:
                target = _resolve_target(obj["target"])
                if target is None or not op_allowed(target):
                    raise archive.refuse("models/model.json", f"a node calls {obj['target']!r}, which is not in fxopt's op set")
            if "expr_str" in obj:
                try:
                    check_size_expression(str(obj["expr_str"]))
                except ValueError as e:
                    raise archive.refuse("models/model.json", f"size expression {str(obj['expr_str'])[:80]!r}: {e}") from None
            for value in obj.values():
                walk(value)
        elif isinstance(obj, list):
            for value in obj:
                walk(value)

    walk(model.get("graph_module"))


# -- loading ------------------------------------------------------------------------

def _payloads(archive: _Archive, folder: str, config_member: str, pattern: re.Pattern, what: str) -> dict:
    """Tensors described by a torch payload config, built from raw bytes;
    entries torch would unpickle are refused by member name."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import (
        _dict_to_dataclass, deserialize_device, deserialize_scalar_type, deserialize_size,
        deserialize_storage_offset, deserialize_stride,
    )

    if not archive.has(config_member):
        return {}
    try:
        config = _dict_to_dataclass(schema.PayloadConfig, archive.json(config_member)).config
    except LoadError:
        raise
    except Exception as e:
        raise LoadError(f"{archive.path}: member {config_member!r} is not a payload config ({e})") from None
    flat: dict[str, torch.Tensor] = {}
    out = {}
    for fqn, meta in config.items():
        member = f"{folder}/{meta.path_name}"
        if meta.use_pickle:
            raise archive.refuse(member, f"{what} {fqn!r} is marked as pickled")
        if not pattern.match(meta.path_name) or not archive.has(member):
            raise archive.refuse(member, f"{what} {fqn!r} names a member that is not a raw tensor of this archive")
        try:
            tm = meta.tensor_meta
            dtype = deserialize_scalar_type(tm.dtype)
            size, stride = deserialize_size(tm.sizes), deserialize_stride(tm.strides)
            offset = deserialize_storage_offset(tm.storage_offset)
            if meta.path_name not in flat:
                flat[meta.path_name] = _tensor_from_bytes(archive.read(member), dtype)
            base = flat[meta.path_name]
            tensor = torch.zeros(size, dtype=dtype) if base.numel() == 0 else torch.as_strided(base, size, stride, offset)
            device = deserialize_device(tm.device)
            if device.type != "cpu":
                tensor = tensor.to(device)
        except Exception as e:
            raise LoadError(f"{archive.path}: member {member!r} does not hold {what} {fqn!r} as described ({type(e).__name__}: {e})") from None
        out[fqn] = torch.nn.Parameter(tensor, requires_grad=tm.requires_grad) if meta.is_param else tensor
    return out


def _decode_inputs(archive: _Archive, data: dict) -> tuple[tuple, dict]:
    leaves = []
    for record in data["leaves"]:
        if "tensor" in record:
            t = record["tensor"]
            dtype, shape = dtype_from_name(t["dtype"]), [int(s) for s in t["shape"]]
            numel = 1
            for s in shape:
                numel *= s
            flat = _tensor_from_bytes(base64.b64decode(t["data"], validate=True), dtype, numel)
            leaves.append(flat[:numel].reshape(shape) if numel else torch.empty(shape, dtype=dtype))
        else:
            leaves.append(record["value"])
    args, kwargs = pytree.tree_unflatten(leaves, pytree.treespec_loads(data["spec"]))
    return tuple(args), dict(kwargs)


def load(path):
    """Read a graph saved by :func:`save`; raises :class:`LoadError` naming
    the file and the member at fault for anything else."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    from .trace import graph_from_exported_program

    path = Path(path)
    archive = _Archive(path)
    if not archive.has("extra/fxopt.json"):
        raise LoadError(f"{path} is a torch.export archive but not one saved by fxopt (no extra/fxopt.json)")
    info = archive.json("extra/fxopt.json")
    version = info.get("format") if isinstance(info, dict) else None
    if version != FORMAT_VERSION:
        raise LoadError(f"{path} was saved in fxopt graph format {version!r}; this fxopt reads format {FORMAT_VERSION} "
                        "(format 1 kept pickled example inputs, which fxopt no longer reads): save the graph again")
    for member in sorted(archive.members):
        if not _MEMBERS.match(member):
            raise archive.refuse(member, "it is not part of a graph fxopt saves")
    if archive.has("data/sample_inputs/model.pt") and archive.read("data/sample_inputs/model.pt"):
        raise archive.refuse("data/sample_inputs/model.pt", "it holds pickled sample inputs (fxopt keeps its example inputs in extra/fxopt.json)")
    state_dict = _payloads(archive, "data/weights", "data/weights/model_weights_config.json", _WEIGHT, "weight")
    constants = _payloads(archive, "data/constants", "data/constants/model_constants_config.json", _CONSTANT, "constant")

    model = archive.json("models/model.json") if archive.has("models/model.json") else None
    if not isinstance(model, dict) or not isinstance(model.get("graph_module"), dict):
        raise LoadError(f"{path}: member 'models/model.json' is missing or holds no graph")
    _check_graph_json(archive, model)
    model["guards_code"] = []  # Python source torch would compile into guards; fxopt runs without them
    try:
        where = f"{path}"
        specs = [sig[key] for entry in model["graph_module"].get("module_call_graph", [])
                 if (sig := entry.get("signature")) for key in ("in_spec", "out_spec")] + [info["inputs"]["spec"]]
        ensure_registered(set().union(*map(spec_types, specs)), info.get("structure_modules", {}), where)
        args, kwargs = _decode_inputs(archive, info["inputs"])
    except StructureError as e:
        raise LoadError(str(e)) from None
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:  # RuntimeError: a negative shape
        raise LoadError(f"{path}: member 'extra/fxopt.json' does not describe the example inputs ({type(e).__name__}: {e})") from None
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, model)
        ep = ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
    except Exception as e:
        raise LoadError(f"{path}: member 'models/model.json' does not describe a graph this torch can read "
                        f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
    graph = graph_from_exported_program(ep, args, kwargs, name=str(info.get("name", "model")))
    graph.properties = set(info.get("properties", ()))
    graph.dim_names = {str(k): str(v) for k, v in dict(info.get("dim_names", {})).items()}
    graph.value_bounds = {str(k): int(v) for k, v in dict(info.get("value_bounds", {})).items()}
    return graph
