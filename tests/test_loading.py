"""Loading saved graphs and compiled models: what loading refuses (crafted
files that would run code, damaged files, the wrong kind of file), that a
saved model loads in a fresh Python process, and that a compiled model of
either backend loads back as the same callable."""

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import fxopt
from conftest import BASE_PIPELINE, model_spec, reference, run, trace_once
from fxopt.ir.serialize import LoadError

TOL = 1e-4


@pytest.fixture(scope="module")
def saved_mlp(tmp_path_factory):
    spec = model_spec("mlp")
    graph = trace_once(spec, graph_name="mlp")
    path = tmp_path_factory.mktemp("saved") / "mlp.pt2"
    graph.save(path)
    return path


def _members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


def _write(path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _member(members, suffix):
    return next(n for n in members if n.endswith(suffix))


class _WritesMarker:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _pickled_marker(marker) -> bytes:
    buf = io.BytesIO()
    torch.save(_WritesMarker(marker), buf)
    return buf.getvalue()


def _pickled_weight(members, marker):
    """weight_0 replaced by a pickle and marked ``use_pickle`` in the weights config."""
    config_name = _member(members, "data/weights/model_weights_config.json")
    config = json.loads(members[config_name])
    fqn = next(iter(config["config"]))
    config["config"][fqn]["use_pickle"] = True
    members[config_name] = json.dumps(config).encode()
    members[_member(members, "data/weights/" + config["config"][fqn]["path_name"])] = _pickled_marker(marker)
    return "data/weights/" + config["config"][fqn]["path_name"]


def _pickled_sample_inputs(members, marker):
    members[_member(members, "data/sample_inputs/model.pt")] = _pickled_marker(marker)
    return "data/sample_inputs/model.pt"


def _size_expression(members, marker):
    """A symbolic size torch would hand to ``sympy.sympify`` (which evaluates Python)."""
    name = _member(members, "models/model.json")
    text = members[name].decode()
    payload = f"__import__('builtins').exec(\\\"open({str(marker)!r}, 'w').write('ran')\\\") or Symbol('s0')"
    first = json.loads(text)
    expr = json.dumps(_first_expr(first))[1:-1]
    members[name] = text.replace(expr, payload, 1).encode()
    return "models/model.json"


def _first_expr(obj):
    if isinstance(obj, dict):
        if "expr_str" in obj:
            return obj["expr_str"]
        values = obj.values()
    elif isinstance(obj, list):
        values = obj
    else:
        return None
    for v in values:
        found = _first_expr(v)
        if found is not None:
            return found
    return None


def _huge_size(members, marker):
    """A size that is pure arithmetic but would take the loader forever to evaluate."""
    name = _member(members, "models/model.json")
    text = members[name].decode()
    expr = json.dumps(_first_expr(json.loads(text)))[1:-1]
    members[name] = text.replace(expr, "9**9**9 + s0", 1).encode()
    return "models/model.json"


def _foreign_op(members, marker):
    """A node that calls a Python function outside fxopt's op set."""
    name = _member(members, "models/model.json")
    text = members[name].decode()
    members[name] = text.replace('"torch.ops.aten.linear.default"', '"torch.os.system"', 1).encode()
    return "models/model.json"


def _aoti_library(members, marker):
    prefix = next(iter(members)).split("/")[0]
    members[f"{prefix}/data/aotinductor/model/model.so"] = b"\x7fELF"
    return "data/aotinductor/model/model.so"


@pytest.mark.parametrize("craft", [_pickled_weight, _pickled_sample_inputs, _size_expression, _huge_size, _foreign_op,
                                   _aoti_library],
                         ids=["pickled-weight", "pickled-sample-inputs", "size-expression", "huge-size", "foreign-op",
                              "aoti-library"])
def test_crafted_file_is_refused_naming_the_member_and_runs_nothing(saved_mlp, tmp_path, craft):
    marker = tmp_path / "marker"
    members = _members(saved_mlp)
    member = craft(members, marker)
    crafted = _write(tmp_path / "crafted.pt2", members)
    with pytest.raises(LoadError, match=f"crafted.pt2: refusing member '{member}'"):
        graph = fxopt.load(crafted)
        graph.run_example()  # a graph that loaded must not run the payload either
    assert not marker.exists(), "loading ran code hidden in the file"


def test_a_file_fxopt_saved_has_no_pickled_member(saved_mlp):
    """What the refusals rely on: every member fxopt writes is JSON or raw bytes."""
    members = _members(saved_mlp)
    assert members[_member(members, "data/sample_inputs/model.pt")] == b""
    config = json.loads(members[_member(members, "data/weights/model_weights_config.json")])
    assert config["config"] and not any(entry["use_pickle"] for entry in config["config"].values())
    assert not any(n.endswith(".b64") for n in members)


def _flip_byte_inside(path, member_suffix, out):
    data = bytearray(Path(path).read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member_suffix))
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x40
    out.write_bytes(bytes(data))
    return out


def test_damaged_files_give_one_error_naming_the_file(saved_mlp, tmp_path):
    data = saved_mlp.read_bytes()
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=r"truncated.pt2: not a complete zip archive \(truncated or damaged\)"):
        fxopt.load(truncated)
    # A flipped bit in the graph's JSON (was UnicodeDecodeError / JSONDecodeError)
    # and in a weight (was a silently different model).
    for member in ("models/model.json", "data/weights/weight_0"):
        flipped = _flip_byte_inside(saved_mlp, member, tmp_path / "flipped.pt2")
        with pytest.raises(LoadError, match=f"flipped.pt2: member '.*{member}' is damaged"):
            fxopt.load(flipped)
    empty = tmp_path / "empty.pt2"
    empty.write_bytes(b"")
    with pytest.raises(LoadError, match="empty.pt2: the file is empty"):
        fxopt.load(empty)


def test_onnx_file_and_foreign_archives_are_named_as_such(saved_mlp, tmp_path):
    spec = model_spec("mlp")
    graph = trace_once(spec, dynamic=False)
    onnx_path = fxopt.export_onnx(graph, tmp_path / "m.onnx")
    with pytest.raises(LoadError, match=r"m.onnx: this is an ONNX model, not a graph saved by fxopt .*fxopt.load_compiled"):
        fxopt.load(onnx_path)
    plain = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(spec.model, spec.example_inputs), str(plain))
    with pytest.raises(LoadError, match="plain.pt2 is a torch.export archive but not one saved by fxopt"):
        fxopt.load(plain)
    other_zip = _write(tmp_path / "other.pt2", {"readme.txt": b"hello"})
    with pytest.raises(LoadError, match="other.pt2 is a zip archive but not a torch.export archive"):
        fxopt.load(other_zip)


FRESH_MODELS = ["mlp", "tiny-gpt", "gpt2-tiny", "bert-tiny"]


def test_saved_graphs_load_in_a_fresh_process(tmp_path):
    """``python -c "import fxopt; fxopt.load(path)"``: Hugging Face output
    classes (CausalLMOutputWithCrossAttentions...) are restored without
    importing transformers first; a user's own output class, which fxopt does
    not import by itself, gets an error naming the import that is missing."""
    import user_models

    expected = {}
    for name in FRESH_MODELS:
        spec = model_spec(name)
        graph = trace_once(spec, graph_name=name)
        graph = fxopt.PassManager(BASE_PIPELINE).run(graph).graph
        graph.save(tmp_path / f"{name}.pt2")
        out = reference(spec)
        expected[name] = (type(out).__name__, torch.cat([t.reshape(-1) for t in torch.utils._pytree.tree_leaves(out)]))
        torch.save(expected[name][1], tmp_path / f"{name}.expected")
    fxopt.trace(*user_models.pair_model()).save(tmp_path / "pair.pt2")
    script = (
        "import sys, torch, fxopt\n"
        "assert 'transformers' not in sys.modules\n"
        "folder, names = sys.argv[1], sys.argv[3:]\n"
        "for name in names:\n"
        "    out = fxopt.load(f'{folder}/{name}.pt2').run_example()\n"
        "    flat = torch.cat([t.reshape(-1) for t in torch.utils._pytree.tree_leaves(out)])\n"
        "    print(name, type(out).__name__, (flat - torch.load(f'{folder}/{name}.expected')).abs().max().item())\n"
        "try:\n"
        "    fxopt.load(f'{folder}/pair.pt2')\n"
        "except fxopt.LoadError as e:\n"
        "    print('refused', e)\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "import user_models\n"
        "print('pair', type(fxopt.load(f'{folder}/pair.pt2').run_example()).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(Path(__file__).parent), *FRESH_MODELS],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line.split()[0]: line.split(maxsplit=1)[1] for line in result.stdout.splitlines()}
    for name in FRESH_MODELS:
        type_name, err = lines[name].split()
        assert type_name == expected[name][0] and float(err) < TOL * max(1.0, expected[name][1].abs().max().item()), lines[name]
    assert "pair.pt2: the model's inputs or outputs are user_models.Pair objects, which torch's pytree knows only once " \
           "module 'user_models' is imported; import it before loading" in lines["refused"]
    assert lines["pair"] == "Pair"


def test_compiled_models_of_both_backends_load_back_as_the_same_callable(tmp_path):
    spec = model_spec("gpt2-tiny")
    graph = fxopt.PassManager(BASE_PIPELINE).run(
        trace_once(spec, graph_name="gpt2-tiny")).graph
    other = spec.other_inputs[0]
    ids = other["input_ids"]
    for backend, suffix in (("eager", "pt2"), ("onnxruntime", "onnx")):
        compiled = fxopt.compile(graph, backend)
        loaded = fxopt.load_compiled(compiled.save(tmp_path / f"model.{suffix}"))
        assert type(loaded) is type(compiled)
        out, expected = loaded(**other), compiled(**other)
        assert type(out) is type(expected) and list(out.keys()) == list(expected.keys())
        assert fxopt.compare(expected, out).within(1e-6), backend
        assert fxopt.compare(expected, loaded(ids)).within(1e-6)  # positionally, as the original takes it
        with pytest.raises(fxopt.BackendError, match=r"input 'input_ids' is torch.int32 .* traced with torch.int64"):
            loaded(ids.int())
        with pytest.raises(IndexError, match=r"input 'input_ids' has value -1, outside \[0, 256\)"):
            loaded(ids * 0 - 1)  # ONNX Gather would wrap it around
    # A loaded ONNX Runtime model saves again; session options apply on load.
    again = fxopt.load_compiled(loaded.save(tmp_path / "again.onnx"), intra_op_threads=1)
    assert again.session.get_session_options().intra_op_num_threads == 1
    assert fxopt.compare(expected, again(**other)).within(1e-6)
    with pytest.raises(LoadError, match="plain.onnx is an ONNX model without fxopt's interface metadata"):
        fxopt.load_compiled(fxopt.export_onnx(graph, tmp_path / "plain.onnx"))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model")
    with pytest.raises(LoadError, match="garbage.onnx is not an ONNX model"):
        fxopt.load_compiled(garbage)


class _Cached(torch.nn.Module):
    """Returns a dict with a nested cache, as a decoder's prefill does."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(8, 8)
        self.kv = torch.nn.Linear(8, 16)

    def forward(self, x, mask):
        k, v = self.kv(x * mask.unsqueeze(-1)).chunk(2, dim=-1)
        return {"logits": self.q(x), "past_key_values": ((k, v),), "mask": mask}


def _io(model_proto):
    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return ({v.name: dims(v) for v in model_proto.graph.input}, {v.name: dims(v) for v in model_proto.graph.output})


def test_onnx_outputs_are_named_after_the_output_structure_and_share_dimension_names(tmp_path):
    import onnx
    from torch.export import Dim

    spec = model_spec("bert-tiny")
    graph = trace_once(spec)
    inputs, outputs = _io(onnx.load(fxopt.export_onnx(graph, tmp_path / "bert.onnx")))
    # was: input_ids [s72, s53], attention_mask [s43, s53], output "layer_norm_4"
    assert inputs == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert outputs == {"last_hidden_state": ["batch", "sequence", 64]}

    # Unnamed dynamic dims: each symbol of the graph gets one name, after the first input that has it.
    x, mask = torch.randn(2, 5, 8), torch.ones(2, 5)
    graph = fxopt.trace(_Cached().eval(), (x, mask), dynamic_shapes=({0: Dim.DYNAMIC, 1: Dim.DYNAMIC}, {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}))
    compiled = fxopt.compile(graph, "onnxruntime")
    inputs, outputs = _io(onnx.load(compiled.save(tmp_path / "cached.onnx")))
    assert list(outputs) == ["logits", "past_key_values.0.0", "past_key_values.0.1", "mask"]
    x_dims, mask_dims = inputs.values()  # the exporter renames an input that is also an output
    assert outputs["logits"] == x_dims == ["x_dim0", "x_dim1", 8] and mask_dims == ["x_dim0", "x_dim1"]
    out = fxopt.load_compiled(tmp_path / "cached.onnx")(torch.randn(3, 7, 8), torch.ones(3, 7))
    assert list(out) == ["logits", "past_key_values", "mask"] and out["past_key_values"][0][1].shape == (3, 7, 8)
