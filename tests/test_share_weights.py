"""``share-weights``: equal tensors and tensors tied through a transpose are
stored once, in the graph and in the ONNX file, and the model computes the
same on both backends."""

import onnx
import pytest
import torch

import fxopt
from conftest import BASE_PIPELINE, base_graph, model_spec, reference, run, trace_once
from fxopt.backends import export_onnx

aten = torch.ops.aten


def _graph(spec):
    g = trace_once(spec)
    return fxopt.PassManager(BASE_PIPELINE).run(g).graph


def _onnx_weight_bytes(path) -> int:
    """Bytes of the float initializers with at least 1024 elements (weights, not shape constants)."""
    model = onnx.load(str(path))
    arrays = [onnx.numpy_helper.to_array(i) for i in model.graph.initializer]
    return sum(a.nbytes for a in arrays if a.dtype.kind == "f" and a.size >= 1024)


def _graph_weight_bytes(graph) -> int:
    """Unique bytes of the graph's float constants with at least 1024 elements."""
    seen = {}
    for n in graph.fx.nodes:
        t = graph.constant(n)
        if t is not None and t.is_floating_point() and t.numel() >= 1024:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _parity_both_backends(spec, graph):
    ref = reference(spec)
    for backend in ("eager", "onnxruntime"):
        out = run(fxopt.compile(graph, backend), spec.example_inputs)
        assert fxopt.compare(ref, out).within(1e-4), backend


def test_tied_head_is_stored_once_in_the_onnx_file(tmp_path):
    # TinyGPT ties its head to the embedding; exported as is, the file holds the
    # table for Gather and a folded transposed copy for MatMul.
    spec = model_spec("tiny-gpt")
    g = _graph(spec)
    table = 96 * 64 * 4
    unique = _graph_weight_bytes(g)
    assert _onnx_weight_bytes(export_onnx(g, tmp_path / "before.onnx")) == unique + table
    result = fxopt.PassManager("share-weights").run(g)
    shared = result.graph
    stats = result.records[0].stats
    assert stats["tied_transposes"] == 1 and stats["readers_rewritten"] == 2
    # equal LayerNorm weights and biases (fresh ones and zeros) are merged too
    assert stats["merged"] > 0 and stats["bytes_saved"] == g.param_bytes() - shared.param_bytes() > 0
    assert _graph_weight_bytes(shared) == unique
    after = export_onnx(shared, tmp_path / "after.onnx")
    assert _onnx_weight_bytes(after) == unique
    # the file shrinks by the copy, less the few nodes of the gather (their protobuf text)
    assert (tmp_path / "before.onnx").stat().st_size - after.stat().st_size > 0.9 * table
    _parity_both_backends(spec, shared)


def test_gpt2_head_reads_the_stored_table_without_a_runtime_transpose(tmp_path):
    spec = model_spec("gpt2-tiny")
    shared = fxopt.PassManager("share-weights").run(_graph(spec)).graph
    assert sum(1 for n in shared.fx.nodes if n.target == aten.index_select.default) == 1
    path = export_onnx(shared, tmp_path / "gpt2.onnx")
    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits]
    assert _onnx_weight_bytes(path) == _graph_weight_bytes(shared)
    _parity_both_backends(spec, shared)


class CopiedWeights(torch.nn.Module):
    """An encoder/decoder pair whose decoder holds a transposed copy of the
    encoder's weight, and two projections holding equal copies."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = torch.nn.Linear(48, 32, bias=False)
        self.a = torch.nn.Linear(32, 32)
        self.b = torch.nn.Linear(32, 32)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)
        self.register_buffer("dec", self.enc.weight.detach().T.clone())  # [48, 32]: x @ dec.T decodes

    def forward(self, x):
        h = self.enc(x)
        h = torch.relu(self.a(h)) + self.b(h)
        return torch.nn.functional.linear(h, self.dec)


def test_equal_and_transposed_copies_are_merged():
    spec = fxopt.models.ModelSpec(CopiedWeights().eval(), (torch.randn(3, 48),), name="copies")
    g = _graph(spec)
    result = fxopt.PassManager("share-weights").run(g)
    stats = result.records[0].stats
    assert stats["merged"] == 1 and stats["tied_transposes"] == 1
    assert stats["bytes_saved"] == (32 * 32 + 48 * 32) * 4
    assert result.graph.param_bytes() == g.param_bytes() - stats["bytes_saved"]
    _parity_both_backends(spec, result.graph)


def test_a_model_without_copies_is_left_alone():
    g = base_graph("mlp")  # distinct random weights and biases, no table
    result = fxopt.PassManager("share-weights").run(g)
    assert not result.records[0].changed and result.records[0].stats["bytes_saved"] == 0
    assert str(result.graph) == str(g)


# -- every architecture that ties its LM head to its embedding ------------------------------

_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=4096,
                max_position_embeddings=64, use_cache=False, tie_word_embeddings=True)


def _tied(config: str, model: str, **kw):
    def build():
        import transformers

        from fxopt.models import hf_spec, seeded

        seeded()
        cfg = getattr(transformers, config)(**kw)
        cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = None
        return hf_spec(getattr(transformers, model)(cfg), cfg.vocab_size, config, mask=False,
                       max_len=getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions"))
    return build


TIED = {
    "gpt2": _tied("GPT2Config", "GPT2LMHeadModel", n_layer=1, n_embd=64, n_head=4, vocab_size=4096, n_positions=64, use_cache=False),
    "gemma": _tied("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=1, head_dim=16, **_DECODER),
    "llama": _tied("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2, **_DECODER),
    "qwen2": _tied("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2, **_DECODER),
    "opt": _tied("OPTConfig", "OPTForCausalLM", hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, num_hidden_layers=1,
                 num_attention_heads=4, vocab_size=4096, max_position_embeddings=64, use_cache=False),
    # SmolLM: a Llama with tied embeddings, 3 query heads sharing one KV head
    "smollm": _tied("LlamaConfig", "LlamaForCausalLM", **{**_DECODER, "hidden_size": 48, "num_attention_heads": 3,
                                                          "num_key_value_heads": 1}),
}


def _unique_parameter_bytes(model) -> int:
    return sum(t.untyped_storage().nbytes() for t in {p.untyped_storage().data_ptr(): p for p in model.parameters()}.values())


@pytest.mark.parametrize("arch", sorted(TIED))
def test_tied_embedding_is_stored_once_on_every_architecture_that_ties(arch):
    spec = TIED[arch]()
    table = spec.model.get_input_embeddings().weight
    assert spec.model.get_output_embeddings().weight is table  # the config really ties
    shared = fxopt.PassManager("share-weights").run(_graph(spec)).graph
    compiled = fxopt.compile(shared, "onnxruntime")
    proto = compiled.program.model_proto
    arrays = [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer]
    assert sum(1 for a in arrays if a.size == table.numel()) == 1, "the table is stored more than once"
    unique = _unique_parameter_bytes(spec.model)
    # the file's tensors are the unique parameters (fewer: equal norm weights are merged too) and
    # a few small constants (rotary tables, masks), not a second table
    assert sum(a.nbytes for a in arrays) <= 1.01 * unique
    assert fxopt.compare(reference(spec), run(compiled, spec.example_inputs)).within(1e-4)
