"""Architecture sweep: Hugging Face models beyond the built-ins (tiny configs,
random weights) through fxopt's fusion and quantization pipelines on both
backends. Prints, per model and pipeline, the fxopt / SDPA ops the graph ends
with and the worst relative error against the original model over the traced
inputs and one other shape.

    python benchmarks/architectures.py                   # every model, eager attention
    python benchmarks/architectures.py --sdpa opt qwen2  # transformers' default attention
    python benchmarks/architectures.py --split           # tensor-parallel on 2 ranks and shrink

``--split`` instead splits each model (SDPA attention) over two local ranks
(gloo, one thread each): the rank graphs' logits on both backends against
the model, the all-reduces per layer, and the attentions found, those the
split keeps whole with the analysis's reason; and ``shrink(ratio=0.25,heads=0.5)``: the
heads and channel groups it removes.

This checks correctness and coverage, not speed; tests/test_architectures.py
runs five of these models in the test suite. Writes its section of
``benchmarks/results/architectures.md`` (eager or SDPA attention).
"""

from __future__ import annotations

import argparse
import collections
import sys
import warnings

import torch
from torch.export import Dim

import fxopt
from fxopt.models import ModelSpec, hf_spec

from common import captured, write_result

BASE = "canonicalize,dce,constant-fold,cse"
PIPELINES = {
    "fused": BASE + ",fuse-experts,fuse-attention,merge-linears,pack-attention,fuse-linear-act,fuse-norm,dce",
    "W8A8 token": BASE + ",quantize(mode=dynamic)",
    "fused + W8A8 tensor": BASE + ",fuse-attention,merge-linears,quantize(mode=dynamic,act_granularity=tensor),pack-attention,fuse-linear-act,fuse-norm,dce",
    "int4 g32": BASE + ",quantize(bits=4,group_size=32)",
}
# Relative error a pipeline may show on random weights before the table flags it.
TOLERANCE = {"fused": 1e-4, "W8A8 token": 0.05, "fused + W8A8 tensor": 0.05, "int4 g32": 0.25}
LAYERS = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
DECODER = dict(hidden_size=64, intermediate_size=128, max_position_embeddings=128, use_cache=False, **LAYERS)


def _config_model(config: str, model: str, name: str, mask: bool, limit: bool = True, **kw):
    """``limit``: trace the sequence up to the model's position limit (a named
    dimension); False leaves its range to torch.export."""
    def build(attn: str | None):
        import transformers

        torch.manual_seed(0)
        cfg = getattr(transformers, config)(**kw)
        if attn:
            cfg._attn_implementation = attn
        return hf_spec(getattr(transformers, model)(cfg), cfg.vocab_size, name, mask=mask,
                       max_len=getattr(cfg, "max_position_embeddings", None) if limit else None)
    return build


def _vit(attn):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=32, patch_size=8)
    if attn:
        cfg._attn_implementation = attn
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32)}
    return ModelSpec(transformers.ViTModel(cfg, add_pooling_layer=False).eval(), inputs,
                     {"pixel_values": {0: Dim.DYNAMIC}}, "vit", [{"pixel_values": torch.randn(3, 3, 32, 32)}])


MODELS = {
    "opt": _config_model("OPTConfig", "OPTForCausalLM", "opt", False, hidden_size=64, ffn_dim=128, word_embed_proj_dim=64,
                         max_position_embeddings=128, use_cache=False, **LAYERS),
    "mistral": _config_model("MistralConfig", "MistralForCausalLM", "mistral", False, num_key_value_heads=2, **DECODER),
    "qwen2": _config_model("Qwen2Config", "Qwen2ForCausalLM", "qwen2", False, num_key_value_heads=2, **DECODER),
    "qwen3": _config_model("Qwen3Config", "Qwen3ForCausalLM", "qwen3", False, num_key_value_heads=2, head_dim=16, **DECODER),
    "phi3": _config_model("Phi3Config", "Phi3ForCausalLM", "phi3", False, num_key_value_heads=4, pad_token_id=0, **DECODER),
    "gemma": _config_model("GemmaConfig", "GemmaForCausalLM", "gemma", False, num_key_value_heads=1, head_dim=16, **DECODER),
    "gpt-neox": _config_model("GPTNeoXConfig", "GPTNeoXForCausalLM", "gpt-neox", False, **DECODER),
    "gpt-j": _config_model("GPTJConfig", "GPTJForCausalLM", "gpt-j", False, n_embd=64, n_layer=2, n_head=4, vocab_size=256,
                           n_positions=128, rotary_dim=8, use_cache=False, bos_token_id=0, eos_token_id=0),
    "falcon": _config_model("FalconConfig", "FalconForCausalLM", "falcon", False, hidden_size=64, use_cache=False, **LAYERS),
    "bloom": _config_model("BloomConfig", "BloomForCausalLM", "bloom", False, hidden_size=64, n_layer=2, n_head=4,
                           vocab_size=256, use_cache=False),
    "gpt-bigcode": _config_model("GPTBigCodeConfig", "GPTBigCodeForCausalLM", "gpt-bigcode", False, n_embd=64, n_layer=2,
                                 n_head=4, vocab_size=256, n_positions=128, use_cache=False),
    "distilbert": _config_model("DistilBertConfig", "DistilBertModel", "distilbert", True, dim=64, hidden_dim=128,
                                n_layers=2, n_heads=4, vocab_size=256, max_position_embeddings=128),
    "roberta": _config_model("RobertaConfig", "RobertaModel", "roberta", True, hidden_size=64, intermediate_size=128,
                             max_position_embeddings=130, pad_token_id=1, **LAYERS),
    "albert": _config_model("AlbertConfig", "AlbertModel", "albert", True, hidden_size=64, intermediate_size=128,
                            embedding_size=32, max_position_embeddings=128, **LAYERS),
    "mpnet": _config_model("MPNetConfig", "MPNetModel", "mpnet", True, hidden_size=64, intermediate_size=128,
                           max_position_embeddings=130, **LAYERS),
    "deberta-v2": _config_model("DebertaV2Config", "DebertaV2Model", "deberta-v2", True, hidden_size=64,
                                intermediate_size=128, max_position_embeddings=128, **LAYERS),
    "t5-encoder": _config_model("T5Config", "T5EncoderModel", "t5-encoder", True, d_model=64, d_ff=128, num_layers=2,
                                num_heads=4, d_kv=16, vocab_size=256),
    "clip-text": _config_model("CLIPTextConfig", "CLIPTextModel", "clip-text", True, hidden_size=64, intermediate_size=128,
                               max_position_embeddings=32, **LAYERS),
    "vit": _vit,
    "gemma2": _config_model("Gemma2Config", "Gemma2ForCausalLM", "gemma2", False, num_key_value_heads=2, head_dim=16,
                            attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=8, **DECODER),
    "gemma3": _config_model("Gemma3TextConfig", "Gemma3ForCausalLM", "gemma3", False, num_key_value_heads=2, head_dim=16,
                            sliding_window=8, **DECODER),
    "phi": _config_model("PhiConfig", "PhiForCausalLM", "phi", False, partial_rotary_factor=0.5, **DECODER),
    "stablelm": _config_model("StableLmConfig", "StableLmForCausalLM", "stablelm", False, num_key_value_heads=2, **DECODER),
    "cohere": _config_model("CohereConfig", "CohereForCausalLM", "cohere", False, num_key_value_heads=2, **DECODER),
    "olmo": _config_model("OlmoConfig", "OlmoForCausalLM", "olmo", False, **DECODER),
    "starcoder2": _config_model("Starcoder2Config", "Starcoder2ForCausalLM", "starcoder2", False, num_key_value_heads=2, **DECODER),
    "granite": _config_model("GraniteConfig", "GraniteForCausalLM", "granite", False, num_key_value_heads=2,
                             attention_multiplier=0.3, residual_multiplier=0.5, embedding_multiplier=2.0, logits_scaling=4.0,
                             **DECODER),
    "xglm": _config_model("XGLMConfig", "XGLMForCausalLM", "xglm", False, d_model=64, ffn_dim=128, num_layers=2,
                          attention_heads=4, vocab_size=256, max_position_embeddings=128, use_cache=False),
    "mpt": _config_model("MptConfig", "MptForCausalLM", "mpt", False, d_model=64, n_heads=4, n_layers=2, vocab_size=256,
                         max_seq_len=128, use_cache=False),
    # mixtures of experts (top-2 of 4; Qwen2-MoE adds a gated shared expert)
    "mixtral": _config_model("MixtralConfig", "MixtralForCausalLM", "mixtral", False, num_key_value_heads=2,
                             num_local_experts=4, num_experts_per_tok=2, **DECODER),
    "qwen2-moe": _config_model("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "qwen2-moe", False, num_key_value_heads=2,
                               num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                               shared_expert_intermediate_size=64, **DECODER),
    "olmoe": _config_model("OlmoeConfig", "OlmoeForCausalLM", "olmoe", False, num_experts=4, num_experts_per_tok=2,
                           **DECODER),
    # sigmoid routing with a group-limited topk, latent attention, its first layer dense
    "deepseek-v3": _config_model("DeepseekV3Config", "DeepseekV3ForCausalLM", "deepseek-v3", False, moe_intermediate_size=32,
                                 n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                                 n_shared_experts=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                 v_head_dim=16, num_key_value_heads=4, **DECODER),
    "electra": _config_model("ElectraConfig", "ElectraModel", "electra", True, hidden_size=64, intermediate_size=128,
                             embedding_size=32, max_position_embeddings=128, **LAYERS),
    # with SDPA its sequence cannot be 2, which a named dimension from 0 to the limit would claim
    "mobilebert": _config_model("MobileBertConfig", "MobileBertModel", "mobilebert", True, limit=False, hidden_size=64,
                                intermediate_size=64, embedding_size=32, intra_bottleneck_size=32, true_hidden_size=32,
                                num_feedforward_networks=2, max_position_embeddings=128, **LAYERS),
}


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    return [t for x in out for t in _tensors(x)] if isinstance(out, (list, tuple)) else []


def _ops(graph) -> str:
    counts = collections.Counter(
        n.target._opname for n in graph.fx.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
        and (n.target.namespace == "fxopt" or n.target._opname in ("scaled_dot_product_attention", "softmax", "_softmax")))
    return ", ".join(f"{op} {k}" for op, k in sorted(counts.items())) or "-"


def _worst_error(spec, compiled) -> float:
    worst = 0.0
    for inputs in (spec.example_inputs, *spec.other_inputs):
        with torch.no_grad():
            ref = _tensors(spec.model(**inputs))
        out = _tensors(compiled(**inputs))
        if len(out) != len(ref):
            raise AssertionError(f"{len(out)} outputs, the model {len(ref)}")
        worst = max([worst] + [((o.float() - r.float()).norm() / r.float().norm().clamp(min=1e-12)).item() for o, r in zip(out, ref)])
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=list(MODELS), help=f"default: all ({', '.join(MODELS)})")
    ap.add_argument("--sdpa", action="store_true", help="transformers' default attention instead of eager")
    ap.add_argument("--split", action="store_true", help="tensor-parallel over 2 ranks and shrink, instead of the pipelines")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    with captured() as out:
        failures = _split_sweep(args) if args.split else _sweep(args)
    everything = args.models == list(MODELS)
    kind = "tensor-parallel and shrink" if args.split else f"{'SDPA (default)' if args.sdpa else 'eager'} attention"
    section = kind + ("" if everything else f": {', '.join(args.models)}")
    write_result("architectures", "Architecture sweep: fxopt's pipelines on Hugging Face architectures", out.text, section=section,
                 intro="Tiny configs, random weights; each pipeline on both backends. Error: the worst relative error "
                       "against the original model over the traced inputs and one other shape.")
    return 1 if failures else 0


def _sweep(args) -> int:
    failures = 0
    print(f"attention: {'SDPA (default)' if args.sdpa else 'eager'}; error: worst relative error vs the original\n")
    print("| model | pipeline | fxopt / attention ops after | eager | onnxruntime |\n|---|---|---|---|---|")
    for name in args.models:
        spec = MODELS[name](None if args.sdpa else "eager")
        try:
            graph = fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, name=name)
        except Exception as e:
            print(f"| {name} | trace | {type(e).__name__}: {str(e).splitlines()[0][:120]} | | |")
            failures += 1
            continue
        for label, pipeline in PIPELINES.items():
            try:
                result = fxopt.PassManager(pipeline).run(graph).graph
            except Exception as e:
                print(f"| {name} | {label} | {type(e).__name__}: {str(e).splitlines()[0][:120]} | | |")
                failures += 1
                continue
            cells = []
            for backend in ("eager", "onnxruntime"):
                try:
                    err = _worst_error(spec, fxopt.compile(result, backend=backend))
                    ok = err < TOLERANCE[label]
                    cells.append(f"{err:.1e}" + ("" if ok else " **over**"))
                    failures += not ok
                except Exception as e:
                    cells.append(f"{type(e).__name__}: {str(e).splitlines()[0][:80]}")
                    failures += 1
            print(f"| {name} | {label} | {_ops(result)} | {cells[0]} | {cells[1]} |", flush=True)
    print(f"\n{failures} failure(s)")
    return failures


# -- tensor-parallel and shrink ---------------------------------------------------------------
_RANK_GRAPHS: dict = {}  # name -> (spec, rank graphs): built before the ranks fork, read by them


def _run_rank(mesh, name: str) -> dict:
    from fxopt.parallel import bind_process_group

    spec, graphs = _RANK_GRAPHS[name]
    errors = {}
    for backend in ("eager", "onnxruntime"):
        options = {"intra_op_threads": 1} if backend == "onnxruntime" else {}
        errors[backend] = _worst_error(spec, fxopt.compile(bind_process_group(graphs[mesh.rank], mesh.tp_group), backend, **options))
    return errors


def _split_sweep(args) -> int:
    from fxopt.launch import run_local
    from fxopt.parallel import all_reduce_count, tensor_parallel_graphs
    from fxopt.passes import AnalysisManager
    from fxopt.passes.analyses import ChannelAnalysis

    failures = 0
    print("SDPA attention; tensor-parallel N=2 on two local processes (gloo); error: worst relative error of the logits vs "
          "the original; `shrink(ratio=0.25,heads=0.5)`: heads and MLP channel groups removed\n")
    print("| model | all-reduces per layer | attentions split | eager | onnxruntime | kept whole (the analysis's reason) | "
          "shrink: heads removed, groups shrunk |\n|---|---|---|---|---|---|---|")
    for name in args.models:
        spec = MODELS[name](None)
        try:
            graph = fxopt.PassManager("canonicalize,dce").run(
                fxopt.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, name=name)).graph
            graphs = tensor_parallel_graphs(graph, 2)
            record = fxopt.PassManager("tensor-parallel(world_size=2,rank=0)").run(graph).records[0].stats
            shrunk = fxopt.PassManager("shrink(ratio=0.25,heads=0.5)").run(graph).records[0].stats
        except Exception as e:
            print(f"| {name} | {type(e).__name__}: {str(e).splitlines()[0][:160]} | | | | | |")
            failures += 1
            continue
        _RANK_GRAPHS[name] = (spec, graphs)
        try:
            ranks = run_local(_run_rank, 2, name, start="fork", wall=600)
            errs = {b: max(r[b] for r in ranks) for b in ("eager", "onnxruntime")}
        except Exception as e:
            errs = {"eager": f"{type(e).__name__}", "onnxruntime": str(e).splitlines()[-1][:100]}
        cells = []
        for b in ("eager", "onnxruntime"):
            ok = isinstance(errs[b], float) and errs[b] < 1e-4
            failures += not ok
            cells.append(f"{errs[b]:.1e}" if isinstance(errs[b], float) else errs[b])
        unpaired = record.get("unpaired") or {}
        found = AnalysisManager().get(ChannelAnalysis, graph).attentions
        whole = [a.refused for a in found if a.refused]
        split = sum(kind == "attention" for kind in record["split"].values())
        layers = spec.model.config.num_hidden_layers if hasattr(spec.model, "config") else None
        per_layer = f"{all_reduce_count(graphs[0]) / layers:g}" if layers else str(all_reduce_count(graphs[0]))
        if not whole and split < len(found):  # found, then left whole by the split itself (its stats say why)
            whole = [v for v in unpaired.values() if "the analysis cannot follow" not in v and "graph output" not in v]
        kept = f"{len(found) - split}: {whole[0][:110]}" if split < len(found) and whole else "-"
        print(f"| {name} | {per_layer} | {split} of {len(found)} | {cells[0]} | {cells[1]} | {kept} | "
              f"{shrunk.get('heads_removed', 0)}, {shrunk.get('groups_shrunk', 0)} |", flush=True)
        del _RANK_GRAPHS[name]
    print(f"\n{failures} failure(s)")
    return failures


if __name__ == "__main__":
    sys.exit(main())
