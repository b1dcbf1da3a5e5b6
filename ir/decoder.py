"""Tracing a causal language model for generation: a prefill graph and a
decode-step graph with the key/value cache as explicit tensors.

Generation runs the model twice over: once over the prompt (prefill), then
once per new token against everything seen so far (a decode step). Both graphs
take flat tensors only, so every pass and both backends see plain inputs and
outputs::

    prefill(input_ids[B, S], attention_mask[B, S], position_ids[B, S])
        -> logits[B, 1, V], present.0.key, present.0.value, ..., present.{L-1}.value
    decode(input_ids[B, 1], attention_mask[B, P + 1], position_ids[B, 1],
           past.0.key, past.0.value, ..., past.{L-1}.value)
        -> logits[B, 1, V], present.0.key, ...

with each cache tensor ``[B, kv_heads, length, head_dim]`` (Hugging Face's
layout). The prefill computes logits at the last position only (batches are
left-padded, so that is every sequence's last real token): on GPT-2 small at 128
tokens the LM head is about a third of the forward's multiply-adds.

**Cache layout: growing concatenation**, as traced. A decode step returns the
cache one position longer (``concat(past, new)``), as Hugging Face's
``DynamicCache`` computes it, so the model is traced as it is written, exact on
both backends, with no maximum length fixed at trace time. ``pack-attention``
lowers each layer's concatenation and attention to
``fxopt.attention_with_past`` (ONNX Runtime's GroupQueryAttention with a past),
and the generator can then keep the cache in a preallocated buffer that the
attention writes in place, on both backends (``compile_generator(...,
cache="buffer")``).

Sliding-window models (Mistral) keep their whole cache here and the window
lives in the mask, which gives the same attention as Hugging Face's cropped
cache.

**Weights held once.** Both graphs are traced from the same module and read
its parameters (``share_weights``), so they are the model's own tensors;
:func:`share_constants` makes the equal constants that passes create in each
graph (merged or quantized weights) one tensor again.

Models: any Hugging Face ``*ForCausalLM`` that takes a ``Cache`` object
(GPT-2, Llama, Qwen2, Mistral, Phi-3, Gemma, OPT, GPT-NeoX, ...), and any
module that follows the same call convention (see :class:`CausalLMInfo`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch.export import Dim

from .graph import Graph
from .trace import TraceError, trace

# A property of both graphs of a generation pair: the key/value cache between
# them is the generator's own (it sizes the cache from the decode graph's
# inputs), so a pass may change its head count if it changes the prefill's and
# the decode step's alike.
GENERATION_CACHE = "generation-cache"


class NotACausalLMError(TypeError):
    pass


@dataclass
class CausalLMInfo:
    """What a generation loop needs to know about the traced model."""

    num_layers: int
    vocab_size: int
    max_positions: int | None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    logits_at_last_only: bool = True
    # the longest prompt the prefill graph takes (None: up to max_positions)
    max_prompt: int | None = None

    def cache_names(self, prefix: str) -> list[str]:
        return [f"{prefix}.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]


@dataclass
class DecoderGraphs:
    """The prefill graph, the decode-step graph and what the loop needs to drive them."""

    prefill: Graph
    decode: Graph
    info: CausalLMInfo
    name: str = "model"
    # per-pass records of the pipeline that made these graphs, by graph ("prefill", "decode")
    records: dict = field(default_factory=dict)
    pipeline: str = ""


def causal_lm_info(model: torch.nn.Module) -> CausalLMInfo:
    """Read the facts generation needs from a Hugging Face causal LM; refuse
    a model without a language-model head."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if config is None or head is None or getattr(config, "is_encoder_decoder", False):
        kind = type(model).__name__
        raise NotACausalLMError(
            f"{kind} has no causal language-model head (a decoder whose output is logits over the vocabulary); "
            "generation needs a *ForCausalLM model (e.g. GPT2LMHeadModel, LlamaForCausalLM), not a bare "
            "decoder or an encoder")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    # the position limit, as configs spell it (MPT: max_seq_len)
    max_positions = next((getattr(text, k) for k in ("max_position_embeddings", "n_positions", "max_seq_len")
                          if getattr(text, k, None)), None)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(text, "eos_token_id", None)
    eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    pad = getattr(text, "pad_token_id", None)
    accepts = inspect.signature(model.forward).parameters
    return CausalLMInfo(int(layers), int(text.vocab_size), int(max_positions) if max_positions else None, eos_ids,
                        pad if isinstance(pad, int) else None, logits_at_last_only="logits_to_keep" in accepts)


def _cache_class():
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class ExplicitLayer(DynamicLayer):
        """A cache layer that starts from given tensors (or none) and
        concatenates each update, as ``DynamicLayer`` does, without the empty
        placeholder tensor ``DynamicLayer`` concatenates onto in a prefill."""

        def __init__(self, keys=None, values=None):
            super().__init__()
            self.keys, self.values = keys, values
            self.is_initialized = keys is not None

        def update(self, key_states, value_states, *args, **kwargs):
            if self.keys is None:
                self.keys, self.values = key_states, value_states
                self.device = key_states.device
                self.is_initialized = True
            else:
                self.keys = torch.cat([self.keys, key_states], dim=-2)
                self.values = torch.cat([self.values, value_states], dim=-2)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return 0 if self.keys is None else self.keys.shape[-2]

    return DynamicCache, ExplicitLayer


class _CausalLMStep(torch.nn.Module):
    """``model`` called with a cache built from flat tensors; returns the
    logits at the last position and the cache as flat tensors."""

    def __init__(self, model: torch.nn.Module, info: CausalLMInfo):
        super().__init__()
        self.model = model
        self.info = info
        # Newer transformers name the cache argument ``cache``; older ones ``past_key_values``.
        self.cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(self, input_ids, attention_mask, position_ids, past=()):
        dynamic_cache, layer_cls = _cache_class()
        n = self.info.num_layers
        cache = dynamic_cache()
        cache.layers = [layer_cls(*(past[2 * i: 2 * i + 2] if past else ())) for i in range(n)]
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  self.cache_argument: cache, "use_cache": True}
        if self.info.logits_at_last_only:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        logits = out.logits if self.info.logits_at_last_only else out.logits[:, -1:]
        present = out["cache"] if "cache" in out else out["past_key_values"]
        flat = []
        for layer in present.layers[:n]:
            flat += [layer.keys, layer.values]
        return (logits, *flat)


def _example(info: CausalLMInfo, batch: int, seq: int, past: int, device=None):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, info.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    return ids, mask, positions


def _check_dynamic(graph: Graph, dims: dict[str, int]) -> None:
    symbolic = graph.symbolic_dims()
    fixed = [f"{name} dim {d}" for name, d in dims.items() if d not in symbolic.get(name, [])]
    if fixed:
        raise TraceError(f"{graph.name}: torch.export fixed the cache length ({', '.join(fixed)}); "
                         "the model's code specializes on it, so the traced step would run one cache length only")


def _trace_prefill(model, info: CausalLMInfo, inputs: tuple, batch, share_weights: bool, name: str) -> Graph:
    """The prefill graph, its prompt length dynamic up to the model's positions
    where it has a limit: a model that guards the length against its position
    table (XGLM's sinusoidal table) traces only so. One that also guards it
    below the table's size (MPT slices its ALiBi table from the end) takes a
    prompt one shorter, which ``info.max_prompt`` records."""
    def traced(longest: int | None) -> Graph:
        seq = Dim("seq", max=longest) if longest else Dim("seq")
        return trace(_CausalLMStep(model, info), inputs, share_weights=share_weights,
                     dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq}), name=name)

    limit = info.max_positions
    try:
        return traced(limit)
    except TraceError as e:
        if not limit or "Not all values of seq" not in str(e):
            raise
    info.max_prompt = limit - 1
    return traced(limit - 1)


def trace_decoder(model: torch.nn.Module, *, name: str | None = None, share_weights: bool = True) -> DecoderGraphs:
    """Trace ``model`` (a causal LM) into its prefill and decode-step graphs;
    batch, prompt length and past length are dynamic.

    ``share_weights`` (default): both graphs read the model's own weights (no
    copy: a generator adds no float weights of its own beside the model's);
    in-place edits of the model's weights then reach the eager graphs. False:
    each graph gets its own copy (:func:`fxopt.trace`'s default)."""
    info = causal_lm_info(model)
    name = name or getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    was_training = model.training
    model.eval()
    try:
        batch = Dim("batch")
        # The example sizes are at least 2: torch.export takes a 0 or 1 as fixed.
        ids, mask, positions = _example(info, 2, 8, 0)
        prefill = _trace_prefill(model, info, (ids, mask, positions), batch, share_weights, f"{name}-prefill")
        with torch.no_grad():
            flat = prefill(ids, mask, positions)
        past_cache = [t.clone() for t in flat[1:]]
        # Dim.AUTO for the past: a model's own guards on it (Llama's attention
        # writes min(16 + 16 * past, 32 + 32 * past)) hold for every past length
        # but are not provable to torch.export's solver; checked below instead.
        ids1, mask1, pos1 = _example(info, 2, 1, past_cache[0].shape[-2])
        cache_dims = tuple({0: batch, 2: Dim.AUTO} for _ in past_cache)
        decode = trace(_CausalLMStep(model, info), (ids1, mask1, pos1, tuple(past_cache)), share_weights=share_weights,
                       dynamic_shapes=({0: batch}, {0: batch, 1: Dim.AUTO}, {0: batch}, cache_dims),
                       name=f"{name}-decode")
        _check_dynamic(decode, {"attention_mask": 1, **{ph.name: 2 for ph in decode.placeholders()[3:]}})
    finally:
        model.train(was_training)
    if info.max_positions:  # generation keeps positions below it (the loop checks prompt + new tokens)
        for graph in (prefill, decode):
            graph.value_bounds["position_ids"] = info.max_positions
    for graph in (prefill, decode):
        graph.properties.add(GENERATION_CACHE)
    return DecoderGraphs(prefill, decode, info, name)
