"""The generation benchmark prepares its peers the way their documentation
asks: a Hugging Face checkpoint folder with its special token ids and a
tokenizer for onnxruntime-genai's model builder and optimum-onnx, each peer's
greedy tokens equal to Hugging Face's in fp32; it counts the bytes a decode
step streams the same way for a module, an fxopt graph and an ONNX file; and
it judges the goals from its rows. No timing is asserted."""

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

import fxopt
from fxopt.ir.decoder import trace_decoder

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "generate.py"
_spec = importlib.util.spec_from_file_location("generate_benchmark", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up
_spec.loader.exec_module(bench)


def _hf_tokens(model, ids, n):
    return bench.run_hf(model, ids, n).tokens


def test_checkpoint_names_its_special_tokens_in_config_generation_config_and_tokenizer(tmp_path):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    model = bench.build_model("llama-tiny")
    folder = bench.save_checkpoint(model, tmp_path / "hf")
    ids = {"bos_token_id": 254, "eos_token_id": 255, "pad_token_id": 0}
    config = AutoConfig.from_pretrained(folder)
    generation = GenerationConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for key, value in ids.items():
        assert getattr(config, key) == value and getattr(generation, key) == value, key
        assert getattr(tokenizer, key) == value, key
    assert tokenizer("w5 w17 w255")["input_ids"] == [5, 17, 255]
    # readers older than transformers 5 find rope_theta at the top level
    assert json.loads((folder / "config.json").read_text())["rope_theta"] == config.rope_parameters["rope_theta"]
    # the model in memory keeps no special tokens: the reference run never stops early
    assert model.config.eos_token_id is None and model.generation_config.eos_token_id is None


def test_model_builder_turns_the_checkpoint_into_the_same_greedy_tokens(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    model = bench.build_model("llama-tiny")
    checkpoint = bench.save_checkpoint(model, tmp_path / "hf")
    og_model, onnx_path = bench.build_ortgenai(model, checkpoint, "fp32", tmp_path, threads=1)
    config = json.loads((tmp_path / "genai-fp32" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 1
    assert config["model"]["eos_token_id"] == 255
    assert onnx_path.exists() and bench.onnx_streamed_bytes(onnx_path) > 0
    ids = bench.prompt_ids(model.config.vocab_size, 2, 12)
    run = bench.run_ortgenai(og_model, ids, 8)
    assert run.tokens.shape == (2, 8) and run.steps == 7
    assert torch.equal(run.tokens, _hf_tokens(model, ids, 8))


def test_model_builder_refuses_gpt2_with_the_reason(tmp_path):
    model = bench.build_model("gpt2-tiny")
    with pytest.raises(bench.PeerUnavailable, match="model builder has no gpt2"):
        bench.build_ortgenai(model, tmp_path, "fp32", tmp_path, threads=1)


def test_builder_command_is_the_documented_invocation(tmp_path):
    cmd = bench.builder_command(tmp_path / "hf", tmp_path / "out", "int4", tmp_path / "cache")
    assert cmd[1:3] == ["-m", "onnxruntime_genai.models.builder"]
    assert cmd[3:] == ["-i", str(tmp_path / "hf"), "-o", str(tmp_path / "out"), "-p", "int4", "-e", "cpu", "-c", str(tmp_path / "cache")]


def test_optimum_without_its_environment_says_why():
    try:
        import optimum.onnxruntime  # noqa: F401
        pytest.skip("optimum-onnx is installed here")
    except ImportError:
        pass
    import transformers

    why = bench.optimum_unavailable(None)
    assert "transformers<4.58" in why and transformers.__version__ in why and "--optimum-python" in why
    assert "no such file" in bench.optimum_unavailable("/nonexistent/python")


@pytest.mark.skipif(not os.environ.get("FXOPT_OPTIMUM_PYTHON"),
                    reason="FXOPT_OPTIMUM_PYTHON names no python with optimum-onnx (it needs transformers < 4.58)")
def test_optimum_runs_the_checkpoint_in_its_environment_with_the_same_greedy_tokens(tmp_path):
    model = bench.build_model("llama-tiny")
    checkpoint = bench.save_checkpoint(model, tmp_path / "hf")
    ids = bench.prompt_ids(model.config.vocab_size, 2, 12)
    runs, onnx_path = bench.run_optimum(os.environ["FXOPT_OPTIMUM_PYTHON"], checkpoint, {"b2_c12": ids}, 8, 1, tmp_path)
    assert onnx_path.exists()
    assert torch.equal(runs["b2_c12"].tokens, _hf_tokens(model, ids, 8))


def test_streamed_bytes_leave_out_gathered_tables_alike_for_module_graph_and_onnx(tmp_path):
    model = bench.build_model("gpt2-tiny")
    params = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    wpe = model.transformer.wpe.weight
    # wte is tied to the LM head (read whole each step); wpe is only gathered from
    expected = sum(params.values()) - wpe.numel() * wpe.element_size()
    assert bench.module_streamed_bytes(model) == expected
    decode = trace_decoder(model).decode
    assert bench.graph_streamed_bytes(decode) == expected
    path = fxopt.export_onnx(decode, tmp_path / "decode.onnx")
    # The exporter keeps one copy of equal initializers (a random init's norms are
    # all ones, its biases all zeros): the file reads at most the vectors less.
    vectors = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 1)
    assert expected - vectors <= bench.onnx_streamed_bytes(path) <= expected


def test_configurations_shorten_prompts_to_the_positions_and_skip_large_batches():
    gpt2_small = types.SimpleNamespace(config=types.SimpleNamespace(n_positions=1024))
    assert bench.configurations(gpt2_small, [128, 1024], [1, 8], 64, 4096) == [
        (1, 128, ""), (1, 961, "prompt 961: 1024 positions"),
        (8, 128, ""), (8, 961, "skipped: 8 x 961 prompt tokens > --max-batch-tokens 4096")]
    assert [c[2] for c in bench.configurations(gpt2_small, [512], [8], 64, 0)] == [""]


def _row(variant, context, step_ms, prefill_ms=100.0, limit_ms=None):
    row = dict(model="m", variant=variant, batch=1, context=context, step_ms=step_ms, tokens_per_s=1e3 / step_ms,
               prefill_ms=prefill_ms)
    if limit_ms is not None:
        row["limit_ms"] = limit_ms
    return row


def test_goals_are_judged_at_batch_1_context_512_from_the_rows():
    rows = [_row("hf-eager-fp32", 512, 40.0, prefill_ms=500.0),
            _row("ortgenai-int4", 512, 10.0), _row("ortgenai-fp32", 512, 20.0),
            _row("fxopt-int4-ort", 128, 5.0, prefill_ms=300.0, limit_ms=4.0),
            _row("fxopt-int4-ort", 512, 6.0, prefill_ms=400.0, limit_ms=5.0),
            _row("fxopt-int4-ort", 1024, 7.0, prefill_ms=900.0, limit_ms=6.0),
            _row("fxopt-fp32-ort", 512, 25.0, prefill_ms=600.0, limit_ms=10.0),
            dict(model="m", variant="fxopt-int4-ort", batch=8, context=512, note="skipped")]
    judged = {goal.split(": ", 1)[1].split(" (")[0]: (measured, status) for goal, measured, status in bench.goals(rows)}
    assert judged["fxopt-int4-ort decode >= 1.3x ortgenai-int4"] == ("1.67x", "met")
    assert judged["fxopt-int4-ort decode >= 6x hf-eager-fp32"] == ("6.67x", "met")
    assert judged["fxopt-fp32-ort decode >= ortgenai-fp32"] == ("0.80x", "not met")
    assert judged["fxopt-int4-ort prefill <= hf-eager-fp32 prefill"][1] == "met"
    assert judged["fxopt-fp32-ort prefill <= hf-eager-fp32 prefill"][1] == "not met"
    assert judged["fxopt-int4-ort step at context 1024 <= 1.3x step at context 128"] == ("1.40x", "not met")
    assert judged["fxopt-int4-ort step <= 1.3x its copy-bandwidth limit"][1] == "met"
    assert judged["fxopt-fp32-ort step <= 1.3x its copy-bandwidth limit"][1] == "not met"


def test_a_row_of_repeated_runs_is_their_median_prefill_and_step():
    tokens = torch.tensor([[4, 5]])
    runs = [bench.Run(tokens, 300.0, 90.0, 3), bench.Run(tokens, 100.0, 30.0, 3), bench.Run(tokens, 200.0, 300.0, 3)]
    run = bench.median_run(runs)
    assert (run.prefill_ms, run.decode_ms / run.steps, run.steps) == (200.0, 30.0, 3)
    assert torch.equal(run.tokens, tokens)


def test_benchmark_runs_end_to_end_and_writes_rows_goals_and_plot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    # onnxruntime-genai's rows are built the same way; its builder has its own test above
    variants = "hf-eager-fp32,fxopt-fp32-eager,fxopt-int4-ort"
    bench.main(["--models", "llama-tiny", "--contexts", "16,32", "--batches", "1,2", "--max-batch-tokens", "40",
                "--new-tokens", "4", "--threads", "1", "--repeats", "2", "--variants", variants])
    text = (tmp_path / "generate.md").read_text()
    assert (tmp_path / "generate.png").exists()
    assert "`python benchmarks/generate.py --models llama-tiny" in text and "Check run at reduced sizes" in text
    rows = [line for line in text.splitlines() if line.startswith("| llama-tiny |")]
    assert len(rows) == 3 * 4  # 3 variants x (b1 c16, b1 c32, b2 c16, b2 c32 skipped)
    assert sum("skipped: 2 x 32 prompt tokens" in r for r in rows) == 3
    fxopt_fp32 = [r for r in rows if "| fxopt-fp32-eager | 1 |" in r]
    assert all("| 1.000 |" in r for r in fxopt_fp32)  # same greedy tokens as Hugging Face
    assert "| llama-tiny: fxopt-int4-ort decode >= 6x hf-eager-fp32 (batch 1, context 32) |" in text
