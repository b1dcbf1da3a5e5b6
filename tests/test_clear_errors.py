"""Misuse gets an error that names what is wrong: never a crash deep inside
(RecursionError, AttributeError, a numpy TypeError at call time) and never a
silently different result."""

import numpy as np
import pytest
import torch

import fxopt
from fxopt.backends import InputRangeError
from fxopt.passes import FixedPoint, PassManager, PipelineError, parse_pipeline
from fxopt.passes import REGISTRY
from fxopt.passes.pipeline import MAX_NESTING
from conftest import model_spec, trace_once


def _traced(name):
    spec = model_spec(name)
    return spec, trace_once(spec, graph_name=name)


def _caret_column(error: PipelineError) -> int:
    """Where the caret of a pipeline error points, as a column of the quoted text."""
    text_line, caret_line = str(error).splitlines()[-2:]
    return caret_line.index("^") - 2


# -- pipeline text -------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "fixed-point(" * 500 + "dce" + ")" * 500,  # groups
    "fuse-linear-act(activations=" + "[" * 5000 + "]" * 5000 + ")",  # list values
])
def test_deep_nesting_is_a_pipeline_error_not_a_recursion_error(text):
    with pytest.raises(PipelineError, match=f"nested more than {MAX_NESTING} deep") as info:
        PassManager(text)
    # The message quotes a window of the text around the fault, not all of it.
    assert len(str(info.value)) < 400 and str(info.value).splitlines()[-1].endswith("^")


def test_nesting_within_the_limit_parses_and_round_trips():
    text = "fixed-point(" * 3 + "dce" + ")" * 3
    assert str(PassManager(text)) == text


def test_deep_nesting_built_in_python_is_refused_too():
    item = REGISTRY.create("dce")
    for _ in range(500):
        item = FixedPoint([item])
    with pytest.raises(PipelineError, match="nested more than"):
        PassManager([item])


def test_a_nested_list_option_is_an_option_error_naming_it():
    with pytest.raises(PipelineError, match="pass 'fuse-linear-act': option 'activations': unknown activation") as info:
        PassManager("fuse-linear-act(activations=[[gelu]])")
    assert _caret_column(info.value) == len("fuse-linear-act(")


@pytest.mark.parametrize("text,option", [
    ("dce,cse(merge_tied=maybe)", "merge_tied"),  # wrong type
    ("cse,fuse-linear-act(activations=[gelu,swish])", "activations"),  # a check
    ("canonicalize(linear=true,bogus=1)", "bogus"),  # unknown option
    ("fixed-point(dce,constant-fold(max_bytes=-1))", "max_bytes"),  # inside a group
    ("quantize(bits=4,mode=nope)", "mode"),  # choices
])
def test_option_errors_point_the_caret_at_the_option(text, option):
    with pytest.raises(PipelineError, match=f"'{option}'") as info:
        parse_pipeline(text)
    assert _caret_column(info.value) == text.index(option + "=")


def test_an_error_between_options_points_at_the_pass():
    text = "dce,quantize(mode=dynamic,bits=4)"  # each valid alone
    with pytest.raises(PipelineError, match="mode 'dynamic'") as info:
        parse_pipeline(text)
    assert _caret_column(info.value) == text.index("quantize")


# -- the pass manager's inputs ----------------------------------------------------------------------

def test_run_on_a_module_says_to_trace_first():
    spec = model_spec("mlp")
    with pytest.raises(TypeError, match=r"got MLP \(a torch.nn.Module\): trace it first, graph = fxopt.trace\(model"):
        PassManager("dce").run(spec.model)
    with pytest.raises(TypeError, match="expects an fxopt Graph, got Tensor"):
        PassManager("dce").run(spec.example_inputs[0])


def test_an_unknown_keyword_input_is_refused_with_the_right_name():
    with pytest.raises(TypeError, match="unknown keyword argument 'calibration_dta' \\(did you mean 'calibration_data'\\?\\)"):
        PassManager("canonicalize,smooth-quant", calibration_dta=[])
    spec, graph = _traced("mlp")
    with pytest.raises(TypeError, match="'calibraton_data' \\(did you mean 'calibration_data'"):
        PassManager("dce").run(graph, calibraton_data=[])
    # The right name is taken (quantize reads it only in some modes, and it is known all the same).
    PassManager("dce", calibration_data=[spec.example_inputs]).run(graph)


# -- the compiled model's inputs -------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
@pytest.mark.parametrize("value,message", [
    (np.zeros((4, 32), np.float32), "got numpy.ndarray: convert it with torch.from_numpy"),
    (None, "got None"),
])
def test_a_non_tensor_input_names_the_input(backend, value, message):
    _, graph = _traced("mlp")
    compiled = fxopt.compile(graph, backend)
    with pytest.raises(fxopt.BackendError, match=f"input 'x' must be a torch.Tensor \\(torch.float32 with 2 dims.*{message}"):
        compiled(value)


def test_a_bfloat16_quantized_graph_is_refused_at_compile_time_for_onnx_runtime():
    spec = model_spec("mlp")
    model = type(spec.model)().eval().to(torch.bfloat16)
    x = spec.example_inputs[0].bfloat16()
    graph = fxopt.trace(model, (x,), dynamic_shapes=spec.dynamic_shapes)
    quantized = PassManager("canonicalize,quantize(mode=dynamic),fuse-linear-act").run(graph).graph
    with pytest.raises(fxopt.BackendError, match="input 'x' is torch.bfloat16, output #0 .* is torch.bfloat16.*float32 or float16"):
        fxopt.compile(quantized, "onnxruntime")
    assert fxopt.compile(quantized, "eager")(x).dtype == torch.bfloat16  # eager runs it


@pytest.mark.parametrize("pipeline", ["canonicalize", "canonicalize,quantize(bits=4,group_size=32,quantize_embeddings=true,skip_lm_head=false)"])
def test_out_of_range_token_ids_are_refused_alike_on_both_backends(pipeline):
    spec, graph = _traced("gpt2-tiny")
    graph = PassManager(pipeline).run(graph).graph
    compiled = {b: fxopt.compile(graph, b) for b in ("eager", "onnxruntime")}
    ids = spec.example_inputs["input_ids"]
    for bad in (-3, 256):
        wrong = ids.clone()
        wrong[1, 5] = bad
        with pytest.raises(IndexError):  # what the original raises
            spec.model(input_ids=wrong)
        for backend, model in compiled.items():
            with pytest.raises(InputRangeError, match=f"input 'input_ids' has value {bad}, outside \\[0, 256\\)"):
                model(input_ids=wrong)
    for model in compiled.values():  # in range, the check lets the call through
        assert model(input_ids=ids).logits.shape == (*ids.shape, 256)


def test_index_bounds_follow_ids_through_views_to_every_lookup():
    _, graph = _traced("bert-tiny")
    # input_ids indexes the word embeddings; attention_mask indexes nothing
    assert graph.index_bounds() == {0: ("input_ids", 256)}
    _, graph = _traced("mlp")
    assert graph.index_bounds() == {}
