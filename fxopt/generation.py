"""Generation through the optimized graphs: prefill, then one decode step per
new token against the key/value cache, on eager PyTorch or ONNX Runtime.

    gen = fxopt.compile_generator(model, pipeline="canonicalize,dce,constant-fold,cse", backend="onnxruntime")
    out = gen.generate([[5, 9, 2], [7]], max_new_tokens=32)      # greedy, left-padded batch
    out.new_tokens                                               # [[...], [...]]

The model is traced once into a prefill graph and a decode-step graph
(:mod:`fxopt.ir.decoder`), the pipeline runs on each, and the equal constants of
the two results are made one tensor again, so the weights are held once. On
ONNX Runtime the cache stays in ONNX Runtime's memory between steps: each step's
present key/value ``OrtValue`` is bound as the next step's past, never copied
out to numpy; only the last position's logits come back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .ir.collectives import rank_of
from .ir.decoder import CausalLMInfo, DecoderGraphs, NotACausalLMError, trace_decoder
from .ir.graph import Graph


class GenerationError(ValueError):
    """A request the generator cannot serve (bad prompt, option or length)."""


@dataclass
class SamplingOptions:
    """Greedy when ``do_sample`` is false; otherwise the logits are divided by
    ``temperature``, cut to the ``top_k`` most likely tokens (0: no cut) and to
    the smallest set whose probability reaches ``top_p``, then sampled with a
    generator seeded by ``seed``."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise GenerationError(f"temperature must be > 0, got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise GenerationError(f"top_k must be an integer >= 0 (0: no cut), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")


def next_tokens(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row of ``logits`` ``[B, V]``, processed in the
    order Hugging Face's ``generate`` applies them (temperature, top-k, top-p)."""
    if not options.do_sample:
        if logits.dtype == torch.float32:
            # numpy's argmax runs on the calling thread: torch's wakes its thread
            # pool, which then competes with ONNX Runtime's for the same cores
            return torch.from_numpy(logits.numpy().argmax(-1))
        return logits.argmax(-1)
    scores = logits.float() / options.temperature
    if options.top_k:
        kth = torch.topk(scores, min(options.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if options.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= (1 - options.top_p)
        drop[..., -1:] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)


@dataclass
class GenerationOutput:
    """``sequences``: the left-padded prompts followed by the new tokens
    (``[B, P + n]``, as Hugging Face's ``generate`` returns them);
    ``new_tokens``: each row's new tokens up to and including its stop token."""

    sequences: torch.Tensor
    new_tokens: list[list[int]]
    prefill_ms: float
    decode_ms: float
    decode_steps: int
    prompt_lengths: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens per second per sequence over the decode steps."""
        return self.decode_steps / (self.decode_ms / 1e3) if self.decode_ms > 0 else float("nan")


class _EagerSteps:
    """Runs two compiled models called with torch tensors (eager PyTorch, or a
    tensor-parallel rank's ONNX Runtime sessions joined by collectives); the
    cache is a list of tensors."""

    def __init__(self, prefill, decode):
        self.prefill_model, self.decode_model = prefill, decode

    def prefill(self, ids, mask, positions):
        out = self.prefill_model(ids, mask, positions)
        return out[0][:, -1], list(out[1:])

    def decode(self, ids, mask, positions, cache):
        # the loop's step inputs are numpy arrays (what ONNX Runtime binds); torch views them
        out = self.decode_model(*(torch.from_numpy(a) for a in (ids, mask, positions)), tuple(cache))
        return out[0][:, -1], list(out[1:])


class _EagerBufferSteps(_EagerSteps):
    """The eager cache in preallocated buffers of ``length`` positions: each
    step's past is the filled prefix of its buffer, which the decode graph's
    attention grows in place (the decode model runs with ``cache_in_buffer``);
    the prefill's cache is copied into the buffers once."""

    length: int | None = None

    def prefill(self, ids, mask, positions):
        logits, cache = super().prefill(ids, mask, positions)
        views = []
        for value in cache:
            b, heads, held, width = value.shape
            buffer = value.new_empty((b, heads, max(self.length, held), width))
            buffer[:, :, :held] = value
            views.append(buffer[:, :, :held])
        return logits, views


class _OrtSteps:
    """Runs the two ONNX Runtime sessions with I/O binding: the cache outputs of
    one run are ``OrtValue``s in ONNX Runtime's memory and are bound as the
    next run's inputs as they are.

    One binding per session, made once; each step binds its inputs and asks
    for fresh outputs (outputs left bound from the previous run would be
    written in place, and the cache grows). The step's ids, mask and positions
    are numpy arrays (no torch round trip)."""

    def __init__(self, prefill, decode):
        self.prefill_model, self.decode_model = prefill, decode
        self._bindings = {}

    def _run(self, model, feeds: list, cache=()):
        binding = self._bindings.get(id(model))
        if binding is None:
            binding = self._bindings[id(model)] = model.session.io_binding()
        else:
            binding.clear_binding_outputs()
        for name in model.output_names:
            binding.bind_output(name, "cpu")
        names = model.input_names
        for name, value in zip(names, feeds):
            binding.bind_cpu_input(name, value)
        for name, value in zip(names[len(feeds):], cache):
            binding.bind_ortvalue_input(name, value)
        model.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return torch.from_numpy(outputs[0].numpy()[:, -1]), list(outputs[1:])

    def prefill(self, ids, mask, positions):
        return self._run(self.prefill_model, [t.numpy() for t in (ids, mask, positions)])

    def decode(self, ids, mask, positions, cache):
        return self._run(self.decode_model, [ids, mask, positions], cache)


class _OrtBufferSteps(_OrtSteps):
    """The cache in preallocated buffers written in place: each ``past`` input
    and its ``present`` output are bound to one ``OrtValue`` of ``length``
    positions, which GroupQueryAttention (``fxopt.attention_with_past``)
    updates in place (it shares past and present when they are one buffer);
    the graph reads the number of positions held from the mask
    (:func:`read_cache_length_from_mask`). The prefill's cache is copied into
    the buffers once."""

    def __init__(self, prefill, decode):
        super().__init__(prefill, decode)
        self.length = None

    def prefill(self, ids, mask, positions):
        import onnxruntime as ort

        logits, cache = super().prefill(ids, mask, positions)
        held = ids.shape[1]
        buffers = []
        for value in cache:
            b, heads, _, head = value.shape()
            array = np.empty((b, heads, self.length, head), dtype=np.float32 if value.data_type() == "tensor(float)" else
                             np.float16)
            array[:, :, :held] = value.numpy()
            buffers.append(ort.OrtValue.ortvalue_from_numpy(array))
        model = self.decode_model
        binding = self._bindings[id(model)] = model.session.io_binding()
        # the logits too go to one array written in place by every step: a
        # step then allocates nothing and reads no output list back
        self._logits = np.empty((ids.shape[0], 1, logits.shape[-1]), dtype=logits.numpy().dtype)
        self._logits_value = ort.OrtValue.ortvalue_from_numpy(self._logits)
        binding.bind_ortvalue_output(model.output_names[0], self._logits_value)
        for name, value in zip(model.input_names[3:], buffers):
            binding.bind_ortvalue_input(name, value)
        for name, value in zip(model.output_names[1:], buffers):
            binding.bind_ortvalue_output(name, value)
        return logits, buffers

    def decode(self, ids, mask, positions, cache):
        model, binding = self.decode_model, self._bindings[id(self.decode_model)]
        for name, value in zip(model.input_names, (ids, mask, positions)):
            binding.bind_cpu_input(name, value)
        model.session.run_with_iobinding(binding)
        return torch.from_numpy(self._logits[:, -1]), cache


def read_cache_length_from_mask(model) -> None:
    """Rewrite a decode-step ONNX model (``onnx_ir``) so that the cache length it
    computes with is the mask's length - 1, not the past tensors' size: the past
    can then be a preallocated buffer longer than the positions it holds. The
    past tensors must be read only by GroupQueryAttention (which takes the
    length from its ``seqlens_k`` / ``total_sequence_length`` inputs) and by
    Shape; for a past exactly as long as it holds, the model computes what it
    did before."""
    import onnx_ir as ir

    graph = model.graph
    mask, past = graph.inputs[1], list(graph.inputs[3:])
    readers = {node.op_type for value in past for node, _ in value.uses()}
    if not readers <= {"GroupQueryAttention", "Shape"}:
        raise GenerationError(
            f"a preallocated cache needs every layer's attention against its cache lowered to GroupQueryAttention "
            f"(pack-attention in the pipeline); the decode graph's cache is also read by {sorted(readers - {'GroupQueryAttention', 'Shape'})}")

    def const(values):
        return ir.node("Constant", [], {"value": ir.tensor(np.array(values, dtype=np.int64))})

    one = const([1])
    mask_length = ir.node("Shape", [mask], {"start": 1, "end": 2})
    held = ir.node("Sub", [mask_length.outputs[0], one.outputs[0]])
    new_nodes = [one, mask_length, held]
    for value in past:
        for node, _ in list(value.uses()):
            if node.op_type != "Shape":
                continue
            start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", 4)
            if (start, end) in ((2, 3), (-2, -1)):  # the length alone: the mask's, shared by every layer
                node.outputs[0].replace_all_uses_with(held.outputs[0])
                if not node.outputs[0].is_graph_output():
                    graph.remove(node, safe=True)
                continue
            lead = ir.node("Shape", [value], {"start": 0, "end": 2})
            tail = ir.node("Shape", [value], {"start": 3})
            full = ir.node("Concat", [lead.outputs[0], held.outputs[0], tail.outputs[0]], {"axis": 0})
            starts, ends, axes = const([start]), const([end]), const([0])
            part = ir.node("Slice", [full.outputs[0], starts.outputs[0], ends.outputs[0], axes.outputs[0]])
            new_nodes += [lead, tail, full, starts, ends, axes, part]
            node.outputs[0].replace_all_uses_with(part.outputs[0])
            if node.outputs[0].is_graph_output():
                continue
            graph.remove(node, safe=True)
    graph.insert_before(next(iter(graph)), new_nodes)


def share_constants(keep: Graph, other: Graph) -> int:
    """Point every constant of ``other`` that equals one of ``keep``'s at
    ``keep``'s tensor (the weights both graphs read, or that a pass built the
    same way in both); return how many bytes that saved."""
    index: dict = {}
    for t in keep.tensor_attributes().values():
        index.setdefault((t.dtype, tuple(t.shape), t.device), []).append(t)
    saved = 0
    seen: set[int] = set()
    for name, t in other.tensor_attributes().items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        match = next((k for k in index.get((t.dtype, tuple(t.shape), t.device), [])
                      if k.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() and k.storage_offset() == t.storage_offset()
                      or torch.equal(k, t)), None)
        if match is None or match is t or match.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            continue
        owner_path, _, leaf = name.rpartition(".")
        owner = other.get_attr(owner_path) if owner_path else other.module
        if leaf in owner._parameters:
            owner._parameters[leaf] = match if isinstance(match, torch.nn.Parameter) else torch.nn.Parameter(match, requires_grad=False)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = match
        else:
            setattr(owner, leaf, match)
        saved += t.numel() * t.element_size()
    return saved


class Generator:
    """A causal LM compiled for generation: its prefill and decode-step graphs,
    optimized by one pipeline and lowered to one backend."""

    def __init__(self, graphs: DecoderGraphs, prefill_model, decode_model, backend: str, shared_bytes: int = 0,
                 shared_initializers=None, cache: str = "growing"):
        self.graphs = graphs
        self.info: CausalLMInfo = graphs.info
        self.backend = backend
        self.prefill_model, self.decode_model = prefill_model, decode_model
        # bytes of decode-graph constants that turned out equal to prefill ones and are now held once
        self.shared_bytes = shared_bytes
        # ONNX Runtime: the initializers both sessions take (None: each session holds its own)
        self.shared_initializers = shared_initializers
        self.cache = cache
        by_torch = backend != "onnxruntime" or not hasattr(decode_model, "session")  # a rank model: several sessions
        if by_torch:
            steps = _EagerBufferSteps if cache == "buffer" else _EagerSteps
        else:
            steps = _OrtBufferSteps if cache == "buffer" else _OrtSteps
        self._steps = steps(prefill_model, decode_model)

    def save_onnx(self, directory) -> dict:
        """ONNX Runtime: write ``prefill.onnx`` and ``decode.onnx`` in
        ``directory`` with their weights in one ``weights.bin``, each distinct
        weight once; each model loads back with :func:`fxopt.load_compiled`.
        Returns the paths of the two models."""
        if self.backend != "onnxruntime":
            raise GenerationError(f"save_onnx needs a generator compiled for onnxruntime, not {self.backend!r}")
        from .backends.onnxruntime import SharedInitializers

        for model in (self.prefill_model, self.decode_model):
            model.stamp_interface()
        return SharedInitializers().write({"prefill": self.prefill_model.program, "decode": self.decode_model.program},
                                          directory)

    # -- checks ------------------------------------------------------------------------
    def _prompts(self, prompts, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and their mask from a tensor (with an optional mask)
        or from a list of token lists of any lengths."""
        vocab = self.info.vocab_size
        if isinstance(prompts, torch.Tensor):
            ids = prompts if prompts.dim() == 2 else prompts.reshape(1, -1)
            if ids.dtype not in (torch.int64, torch.int32):
                raise GenerationError(f"prompt ids must be integers, got {ids.dtype}")
            ids = ids.long()
            mask = torch.ones_like(ids) if attention_mask is None else attention_mask.long()
            if mask.shape != ids.shape:
                raise GenerationError(f"attention_mask {list(mask.shape)} does not match the prompt ids {list(ids.shape)}")
            if ids.shape[1] == 0 or bool((mask.sum(-1) == 0).any()):
                raise GenerationError("empty prompt: every sequence needs at least one token")
            if bool((mask[:, 1:] < mask[:, :-1]).any()):
                raise GenerationError("the batch must be left-padded (padding before the tokens); "
                                      "the attention_mask has padding after a token")
        else:
            rows = [list(p) for p in prompts] if len(prompts) and not isinstance(prompts[0], int) else [list(prompts)]
            if not rows or any(len(r) == 0 for r in rows):
                raise GenerationError("empty prompt: every sequence needs at least one token")
            length = max(len(r) for r in rows)
            pad = self.info.pad_token_id if self.info.pad_token_id is not None else 0
            ids = torch.tensor([[pad] * (length - len(r)) + [int(t) for t in r] for r in rows], dtype=torch.long)
            mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        real = ids[mask.bool()]
        bad = real[(real < 0) | (real >= vocab)]
        if bad.numel():
            raise GenerationError(f"token id {int(bad[0])} is out of the vocabulary (0..{vocab - 1})")
        return ids, mask

    def _check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        limit = self.info.max_positions
        if self.info.max_prompt is not None and prompt_len > self.info.max_prompt:
            raise GenerationError(f"prompt of {prompt_len} tokens: {self.graphs.name}'s prefill takes at most "
                                  f"{self.info.max_prompt} (its position table is {limit} long)")
        # the last new token is never fed back, so positions reach prompt + new - 1
        if limit is not None and prompt_len + max_new_tokens - 1 > limit:
            raise GenerationError(
                f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens needs {prompt_len + max_new_tokens - 1} "
                f"positions; {self.graphs.name} has {limit} (max_position_embeddings): shorten the prompt or "
                f"ask for at most {limit - prompt_len + 1} new tokens")

    # -- the loop ---------------------------------------------------------------------
    def generate(self, prompts, *, max_new_tokens: int = 32, attention_mask: torch.Tensor | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
                 stop_tokens: Sequence[int] = (), pad_token_id: int | None = None,
                 streamer: Callable[[int, list[int]], None] | None = None) -> GenerationOutput:
        """Generate up to ``max_new_tokens`` tokens after each prompt.

        ``prompts``: a ``[B, S]`` tensor of ids (left-padded, with
        ``attention_mask``), or a list of token lists of any lengths (padded
        here). ``eos_token_id`` (default: the model's) and ``stop_tokens`` end a
        sequence after that token; rows that ended are filled with
        ``pad_token_id`` (default: the model's pad, else its EOS, else 0) until
        every row has ended. ``streamer(step, tokens)`` is called after each
        step with the new token of every row (``None`` for rows already done).
        """
        options = SamplingOptions(do_sample, temperature, top_k, top_p, seed)
        options.check()
        ids, mask = self._prompts(prompts, attention_mask)
        self._check_length(ids.shape[1], max_new_tokens)
        if eos_token_id is None:
            stops = set(self.info.eos_token_ids)
        else:
            stops = {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}
        stops |= {int(t) for t in stop_tokens}
        for t in stops:
            if not 0 <= t < self.info.vocab_size:
                raise GenerationError(f"stop token {t} is out of the vocabulary (0..{self.info.vocab_size - 1})")
        pad = pad_token_id if pad_token_id is not None else (
            self.info.pad_token_id if self.info.pad_token_id is not None else (min(stops) if stops else 0))
        generator = torch.Generator().manual_seed(seed) if (do_sample and seed is not None) else None
        batch, prompt_len = ids.shape

        # Positions as Hugging Face's generate counts them: real tokens from 0, padding at 0.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        if isinstance(self._steps, (_OrtBufferSteps, _EagerBufferSteps)):  # room for every position the steps feed back
            self._steps.length = prompt_len + max_new_tokens - 1
        start = time.perf_counter()
        logits, cache = self._steps.prefill(ids, mask, positions)
        token = next_tokens(logits, options, generator)
        prefill_ms = (time.perf_counter() - start) * 1e3

        # Everything a step reads or writes is allocated once: the sequences,
        # the mask (its columns past the prompt are all 1: a step binds its
        # first P + step + 1), the next positions (advanced in place).
        total = prompt_len + max_new_tokens
        sequences = torch.full((batch, total), pad, dtype=torch.long)
        sequences[:, :prompt_len] = ids
        mask_all = np.ones((batch, total - 1), dtype=np.int64)
        mask_all[:, :prompt_len] = mask.numpy()
        next_position = (positions[:, -1:] + 1).numpy().copy()
        stop_ids = torch.tensor(sorted(stops), dtype=torch.long) if stops else None
        pad_t = torch.tensor(pad, dtype=torch.long)
        done = torch.zeros(batch, dtype=torch.bool)
        ended = [max_new_tokens] * batch  # new tokens of each row, its stop token included
        steps = 0
        decode_start = time.perf_counter()
        for step in range(max_new_tokens):
            token = torch.where(done, pad_t, token)
            sequences[:, prompt_len + step] = token
            if streamer is not None:
                streamer(step, [None if d else t for d, t in zip(done.tolist(), token.tolist())])
            if stop_ids is not None:
                stopped = torch.isin(token, stop_ids) & ~done
                if bool(stopped.any()):
                    for row in stopped.nonzero().flatten().tolist():
                        ended[row] = step + 1
                    done |= stopped
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            width = prompt_len + step + 1
            step_mask = mask_all[:, :width] if batch == 1 else np.ascontiguousarray(mask_all[:, :width])
            logits, cache = self._steps.decode(token.numpy()[:, None], step_mask, next_position, cache)
            next_position += 1
            token = next_tokens(logits, options, generator)
            steps += 1
        decode_ms = (time.perf_counter() - decode_start) * 1e3
        sequences = sequences[:, :prompt_len + step + 1]
        new = [sequences[row, prompt_len:prompt_len + min(ended[row], step + 1)].tolist() for row in range(batch)]
        lengths = [int(n) for n in mask.sum(-1)]
        return GenerationOutput(sequences, new, prefill_ms, decode_ms, steps, lengths)


def optimize_decoder(graphs: DecoderGraphs, pipeline: str, **manager_options) -> DecoderGraphs:
    """Run one pipeline on the prefill and the decode-step graph (each on a
    copy); the per-pass records of both are in ``records``."""
    from .passes import PassManager

    pm = PassManager(pipeline, **manager_options)
    results = {kind: pm.run(getattr(graphs, kind)) for kind in ("prefill", "decode")}
    return DecoderGraphs(results["prefill"].graph, results["decode"].graph, graphs.info, graphs.name,
                         {kind: r.records for kind, r in results.items()}, str(pm))


def _needs_prepacking(graph: Graph) -> bool:
    """Whether ``graph`` has quantized kernels, which ONNX Runtime runs fast
    only on weights it prepacked (MatMulNBits, the int8 GEMMs): without
    prepacking MatMulNBits dequantizes its whole weight on every call."""
    names = ("nbits", "int8")
    return any(n.op == "call_function" and any(k in str(n.target) for k in names) for n in graph.fx.nodes)


def cache_read_in_place(decode: Graph) -> bool:
    """Whether every read of the decode step's past keys and values is an
    ``fxopt.attention_with_past`` (GroupQueryAttention, which can write a
    preallocated buffer in place) or a size, and each past is the cache of
    exactly one attention (two writing one buffer would overwrite each
    other's position): what ``cache="buffer"`` needs."""
    attention = torch.ops.fxopt.attention_with_past.default
    pasts = decode.placeholders()[3:]
    for past in pasts:
        attentions = [u for u in past.users if u.target == attention]
        if any(u.target not in (attention, torch.ops.aten.sym_size.int) for u in past.users) or len(attentions) != 1:
            return False
        user = attentions[0]
        if [i for i, a in enumerate(user.args) if a is past] not in ([3], [4]):  # read as its past_k or past_v only
            return False
    return bool(pasts)


def compile_generator(model: torch.nn.Module | DecoderGraphs, pipeline: str | None = None, backend: str = "eager", *,
                      check_numerics: bool = False, share_weights: bool | None = None, prepack: str = "none",
                      cache: str = "auto", **backend_options) -> Generator:
    """Trace ``model`` (a causal LM, or graphs :func:`fxopt.ir.decoder.trace_decoder`
    made) for generation, optimize both graphs with ``pipeline`` and lower them
    to ``backend``; ``backend_options`` go to :func:`fxopt.compile` for both.

    ``share_weights`` (ONNX Runtime): both sessions take their initializers
    from one set of arrays (:class:`fxopt.backends.onnxruntime.SharedInitializers`)
    and do not prepack them (docs/generation.md has the memory measured); False: each session
    holds and prepacks its own (twice the memory; fastest kernels for
    quantized graphs). Default: shared unless a graph has quantized linears,
    whose ONNX Runtime kernels need prepacked weights to be fast.

    ``prepack``: ``"none"`` (default), the weights are held once, as traced.
    ONNX Runtime (shared weights): ``"decode"``, the decode step's session
    prepacks them (MLAS's packed GEMM: one packed copy beside the shared
    arrays) and the prefill reads the shared arrays, for the step generation
    repeats per token. Eager: ``"decode"``, the decode graph's float32 linears
    run on oneDNN-blocked copies of their weights; ``"all"``, both graphs run
    on one such copy (:class:`fxopt.backends.eager.PackedLinearWeights`).
    docs/generation.md has them measured.

    ``cache``: ``"growing"``, each step returns the cache one position
    longer (a new tensor); ``"buffer"``, a buffer of prompt + new tokens
    positions per layer, allocated once per :meth:`Generator.generate` and
    written in place by the decode step's attention (needs ``pack-attention``
    in the pipeline: every decode attention lowered to
    ``fxopt.attention_with_past``, GroupQueryAttention on ONNX Runtime);
    ``"auto"`` (default), the buffer where it can be used, else growing. With
    the buffer the generator's decode model writes each step's position just
    after a past it is given as a prefix view of a longer tensor (the buffers
    the generator allocates); a caller that drives ``decode_model`` itself
    with such views (branching two steps from one prefix) must pass copies
    or compile with ``cache="growing"``. On ONNX Runtime the buffer spared
    75-78% of a GPT-2 small decode step's attention time at contexts
    128-1024 (``benchmarks/kv_cache_layout.py``)."""
    from .backends import compile as compile_graph
    from .passes import PassManager

    if backend not in ("eager", "onnxruntime"):
        raise GenerationError(f"backend must be 'eager' or 'onnxruntime', got {backend!r}")
    if prepack not in ("none", "decode", "all"):
        raise GenerationError(f"prepack must be 'none', 'decode' or 'all', got {prepack!r}")
    if prepack == "all" and backend == "onnxruntime":
        raise GenerationError("prepack='all' runs on eager (one packed copy both graphs read); on onnxruntime "
                              "prepack='decode' lets the decode session prepack the shared weights")
    if prepack == "decode" and backend == "onnxruntime" and share_weights is False:
        raise GenerationError("prepack='decode' applies to ONNX Runtime sessions sharing their weights; "
                              "share_weights=False makes each session hold and prepack its own")
    if prepack != "none" and backend == "eager" and backend_options.get("torch_compile"):
        raise GenerationError(f"prepack={prepack!r} packs the eager graphs' linears: not with torch_compile "
                              "(it packs weights itself under freezing)")
    if "cache_in_buffer" in backend_options:
        raise GenerationError("cache_in_buffer is set by cache='buffer' (or 'auto'), not as a backend option")
    if cache not in ("auto", "growing", "buffer"):
        raise GenerationError(f"cache must be 'auto', 'growing' or 'buffer', got {cache!r}")
    if pipeline:
        PassManager(pipeline)  # a bad pipeline fails before tracing
    graphs = model if isinstance(model, DecoderGraphs) else trace_decoder(model)
    if pipeline:
        graphs = optimize_decoder(graphs, pipeline, check_numerics=check_numerics)
    shared = share_constants(graphs.prefill, graphs.decode)
    initializers = None
    ranked = any(rank_of(g) is not None for g in (graphs.prefill, graphs.decode))
    if cache == "auto":
        in_place = not backend_options.get("torch_compile") if backend == "eager" else not ranked
        cache = "buffer" if in_place and cache_read_in_place(graphs.decode) else "growing"
    if cache == "buffer" and backend == "eager":
        if backend_options.get("torch_compile"):
            raise GenerationError("cache='buffer' on eager runs the decode graph with its attention swapped for one that "
                                  "writes the buffer in place; torch_compile compiles the graph as traced: use "
                                  "cache='growing'")
        if not cache_read_in_place(graphs.decode):
            raise GenerationError("cache='buffer' needs every read of the decode step's cache to be one "
                                  "fxopt.attention_with_past (pack-attention in the pipeline), which writes the buffer "
                                  "in place")
    if backend == "onnxruntime" and ranked:
        # a rank graph runs as several sessions cut at its collectives (fxopt.backends.onnxruntime_ranks)
        if cache == "buffer":
            raise GenerationError("cache='buffer' needs one ONNX Runtime session per step (GroupQueryAttention writes a "
                                  "bound buffer in place); a tensor-parallel rank's step runs as several sessions "
                                  "joined by collectives: use cache='growing'")
        if share_weights or prepack != "none":
            raise GenerationError(f"{'share_weights=True' if share_weights else f'prepack={prepack!r}'}: a tensor-parallel "
                                  "rank's sessions each hold and prepack their own weights")
        share_weights = False
    if backend == "onnxruntime":
        if share_weights is None:
            share_weights = prepack == "decode" or not (_needs_prepacking(graphs.prefill) or _needs_prepacking(graphs.decode))
        if share_weights:
            from .backends.onnxruntime import SharedInitializers

            initializers = SharedInitializers()
            backend_options = dict(backend_options, shared_initializers=initializers, prepack=False)
    if backend == "eager":
        from .backends.eager import PackedLinearWeights

        packed = PackedLinearWeights() if prepack != "none" else False  # one packed copy of a weight both graphs read
        prefill = compile_graph(graphs.prefill, backend, **backend_options, prepack=packed if prepack == "all" else False)
        decode = compile_graph(graphs.decode, backend, **backend_options, prepack=packed,
                               cache_in_buffer=cache == "buffer")
        return Generator(graphs, prefill, decode, backend, shared, initializers, cache)
    prefill = compile_graph(graphs.prefill, backend, **backend_options)
    if cache == "buffer":
        backend_options = dict(backend_options, rewrite_onnx=read_cache_length_from_mask)
    if initializers is not None and prepack == "decode":
        backend_options = dict(backend_options, prepack=True)
    decode = compile_graph(graphs.decode, backend, **backend_options)
    return Generator(graphs, prefill, decode, backend, shared, initializers, cache)


def generate(model: torch.nn.Module, prompts, *, pipeline: str | None = None, backend: str = "eager",
             backend_options: dict | None = None, **generate_options) -> GenerationOutput:
    """One-shot :func:`compile_generator` + :meth:`Generator.generate`."""
    return compile_generator(model, pipeline, backend, **(backend_options or {})).generate(prompts, **generate_options)


__all__ = ["Generator", "GenerationError", "GenerationOutput", "NotACausalLMError", "SamplingOptions",
           "compile_generator", "generate", "next_tokens", "optimize_decoder", "share_constants"]
