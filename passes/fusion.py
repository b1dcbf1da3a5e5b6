"""The non-attention fusions of transformer inference, each a few
``(pattern, replacement)`` pairs on the rewrite engine (:mod:`.rewrite`).

* ``fuse-linear-act``: linear + bias + activation -> ``fxopt.linear_act``, and a
  quantized linear + activation -> its fused form (``fxopt.linear_nbits_act``, ...);
* ``merge-linears``: linears sharing one input (Q/K/V, gate/up) -> one linear + split;
* ``fuse-norm``: RMSNorm / LayerNorm written out in primitive ops -> one norm
  op, and residual add + norm -> ``fxopt.add_rms_norm`` / ``fxopt.add_layer_norm``.
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..ir.nodes import call_args, module_path, same_shape, val
from ..ir.ops import QUICK_GELU_ALPHA
from .base import Option, PassResult
from .layers import is_router
from .registry import register_pass
from .rewrite import Match, Pattern, PatternError, RewritePass, RewriteResult, function, is_constant, rewrite

aten = torch.ops.aten
fxopt_ops = torch.ops.fxopt

# --------------------------------------------------------------------------
# fuse-linear-act

# Activations as models write them, keyed by linear_act's activation name.
# One name may have several spellings (GPT-2 writes tanh-GELU out in full).


def _gelu_tanh_written_out(y):  # transformers' NewGELUActivation / gelu_new
    return 0.5 * y * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * torch.pow(y, 3.0))))


ACTIVATION_FORMS: dict[str, list[Callable]] = {
    "gelu": [F.gelu],
    "gelu_tanh": [lambda y: F.gelu(y, approximate="tanh"), _gelu_tanh_written_out],
    "silu": [F.silu],
    "relu": [torch.relu],
    "quick_gelu": [lambda y: y * torch.sigmoid(QUICK_GELU_ALPHA * y)],  # CLIP's QuickGELUActivation
}

# An op each activation's forms contain, to skip the patterns of activations
# a graph lacks (tracing a pattern costs about a second).
ACTIVATION_OPS = {
    "gelu": {aten.gelu.default}, "gelu_tanh": {aten.gelu.default, aten.tanh.default},
    "silu": {aten.silu.default}, "relu": {aten.relu.default}, "quick_gelu": {aten.sigmoid.default},
}

# Linear-like ops that fuse with an activation, float and quantized. Each
# variant is one op with some optional arguments present or absent (a pattern
# parameter cannot bind ``None``): ``layout`` names the op's arguments in order,
# ``None`` where the variant passes None, and ``fused`` is the op that takes the
# same arguments plus the activation's name. A quantized linear joins by adding
# its variants here.


@dataclass(frozen=True)
class _LinearVariant:
    target: Any  # the linear-like op (an OpOverload)
    fused: Any  # the fused op: same arguments + activation
    layout: tuple[str | None, ...]
    weight: str  # the parameter that must be a constant
    ints: tuple[str, ...] = ()  # parameters that are int attributes (captured)
    shapes: dict = field(default_factory=dict)

    def parameters(self) -> dict[str, Any]:
        """Pattern parameters: the op's arguments, ``int`` for its int attributes."""
        return {n: int if n in self.ints else inspect.Parameter.empty for n in self.layout if n is not None}

    def call(self, **params):
        return self.target(*(params[n] if n is not None else None for n in self.layout))

    def occurs_at(self, node) -> bool:
        """``node`` calls this variant (same op, the same optional arguments given)."""
        if node.op != "call_function" or node.target != self.target:
            return False
        args = call_args(node)
        return all((a is None) == (n is None) for a, n in zip(args, self.layout))


def _nbits_layout(zp: bool, bias: bool) -> tuple:
    return ("x", "B", "scales", "zp" if zp else None, "b" if bias else None, "K", "N", "bits", "block_size", "accuracy_level")


# Example inputs that the ops' kernels accept (the engine may run a pattern
# eagerly), with distinct int attributes so that each captures its own literal.
_LINEAR_SHAPES = {"x": (2, 8), "w": (16, 8), "b": (16,)}
_NBITS_SHAPES = {"x": (2, 64), "B": torch.zeros(16, 2, 16, dtype=torch.uint8), "scales": torch.rand(16, 2),
                 "zp": torch.zeros(16, 1, dtype=torch.uint8), "b": (16,),
                 "K": 64, "N": 16, "bits": 4, "block_size": 32, "accuracy_level": 1}
_INT8_SHAPES = {"x": (2, 8), "w_q": torch.ones(16, 8, dtype=torch.int8), "w_scale": torch.rand(16) + 0.1, "b": (16,)}
_TOKEN_SHAPES = {"x": (2, 8), "w_u8": torch.ones(16, 8, dtype=torch.uint8), "w_scale": torch.rand(16) + 0.1,
                 "w_rowsum": (16,), "b": (16,)}
_NBITS_INTS = ("K", "N", "bits", "block_size", "accuracy_level")


def _linear_variants() -> dict[str, _LinearVariant]:
    out = {
        "linear": _LinearVariant(aten.linear.default, fxopt_ops.linear_act.default, ("x", "w", "b"), "w", shapes=_LINEAR_SHAPES),
        "linear-nobias": _LinearVariant(aten.linear.default, fxopt_ops.linear_act.default, ("x", "w", None), "w", shapes=_LINEAR_SHAPES),
        "dynamic-int8": _LinearVariant(fxopt_ops.linear_dynamic_int8.default, fxopt_ops.linear_dynamic_int8_act.default,
                                       ("x", "w_q", "w_scale", "b"), "w_q", shapes=_INT8_SHAPES),
        "dynamic-int8-nobias": _LinearVariant(fxopt_ops.linear_dynamic_int8.default, fxopt_ops.linear_dynamic_int8_act.default,
                                              ("x", "w_q", "w_scale", None), "w_q", shapes=_INT8_SHAPES),
        "dynamic-int8-per-token": _LinearVariant(
            fxopt_ops.linear_dynamic_int8_per_token.default, fxopt_ops.linear_dynamic_int8_per_token_act.default,
            ("x", "w_u8", "w_scale", "w_rowsum", "b"), "w_u8", shapes=_TOKEN_SHAPES),
        "dynamic-int8-per-token-nobias": _LinearVariant(
            fxopt_ops.linear_dynamic_int8_per_token.default, fxopt_ops.linear_dynamic_int8_per_token_act.default,
            ("x", "w_u8", "w_scale", "w_rowsum", None), "w_u8", shapes=_TOKEN_SHAPES),
    }
    for zp in (True, False):
        for bias in (True, False):
            name = "nbits" + ("" if zp else "-nozp") + ("" if bias else "-nobias")
            out[name] = _LinearVariant(fxopt_ops.linear_nbits.default, fxopt_ops.linear_nbits_act.default,
                                       _nbits_layout(zp, bias), "B", _NBITS_INTS, _NBITS_SHAPES)
    return out


LINEAR_VARIANTS = _linear_variants()
# Graph meta the fused node takes from the linear it absorbs (not from the
# activation), so a fused layer keeps the linear's module name.
_LAYER_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "quantized_layer")


def _fuse_into(v: _LinearVariant, act: str) -> Callable:
    def build(m: Match, graph):
        (linear,) = [g for g in m.nodes.values() if g.target == v.target]
        args = tuple(m[n] if n is not None else None for n in v.layout)
        node = graph.fx.call_function(v.fused, (*args, act))
        node.meta.update({k: linear.meta[k] for k in _LAYER_META if k in linear.meta})
        return node

    return build


def _linear_act_patterns() -> dict[str, list[tuple[_LinearVariant, Pattern]]]:
    out: dict[str, list[tuple[_LinearVariant, Pattern]]] = {}
    for act, forms in ACTIVATION_FORMS.items():
        for lin_name, v in LINEAR_VARIANTS.items():
            for i, form in enumerate(forms):
                name = f"{lin_name}+{act}" + (f"#{i}" if i else "")
                # the op's parameters; the int attributes are captured
                pattern = function(name, v.parameters(), lambda _v=v, _form=form, **params: _form(_v.call(**params)))
                p = Pattern(name, pattern, build=_fuse_into(v, act), where={v.weight: is_constant}, inputs=v.shapes)
                out.setdefault(act, []).append((v, p))
    return out


LINEAR_ACT_PATTERNS = _linear_act_patterns()


def linear_act_patterns(activations: Sequence[str], graph=None) -> list[Pattern]:
    """The fusion patterns for ``activations``; given a graph, only those whose
    linear variant occurs in it (each pattern is traced on first use, ~1 s)."""
    present = list(LINEAR_VARIANTS.values())
    if graph is not None:
        present = [v for v in present if any(v.occurs_at(n) for n in graph.fx.nodes)]
        targets = {n.target for n in graph.fx.nodes}
        activations = [a for a in activations if ACTIVATION_OPS[a] & targets]
    return [p for act in activations for v, p in LINEAR_ACT_PATTERNS[act] if v in present]


def fuse_linear_act(graph, activations: Sequence[str] = tuple(ACTIVATION_FORMS), pass_=None) -> RewriteResult:
    """Runs the ``fuse-linear-act`` rewrite on ``graph`` in place."""
    return rewrite(graph, linear_act_patterns(activations, graph), pass_=pass_)


@register_pass("fuse-linear-act")
class FuseLinearAct(RewritePass):
    """Fuses a linear layer, float or quantized, with the activation that follows it.

    Matches ``act(L(x, W, b))`` (bias optional, ``W`` a constant) for act in
    GELU (exact), GELU-tanh (``gelu(approximate="tanh")`` or written out as
    transformers' ``gelu_new``), SiLU, ReLU and QuickGELU (CLIP's ``y * sigmoid(1.702 y)``),
    and L one of ``aten.linear``,
    ``fxopt.linear_nbits`` (weight-only 4/8 bits, with or without zero points),
    ``fxopt.linear_dynamic_int8`` and ``fxopt.linear_dynamic_int8_per_token``
    (W8A8).
    Produces ``fxopt.linear_act(x, W, b, act)`` (ONNX Runtime: MatMul +
    BiasGelu / FastGelu), or the quantized op's ``*_act`` form with the same
    arguments and ``act`` (:mod:`fxopt.ir.ops_quant_fused`: MatMulNBits /
    MatMulIntegerToFloat with their bias, then Gelu / FastGelu / QuickGelu /
    Relu); the fused node keeps the linear's module name.
    Refuses: weights that are graph inputs, linears whose output is used by
    anything other than the activation, activations not listed in
    ``activations``, and quantized linears of other forms (static W8A8, the
    dequantize-then-linear form of widths other than 4 and 8: its weight is
    computed, not a constant).
    """

    activations = Option(tuple(ACTIVATION_FORMS), tuple, check=lambda v: None if set(v) <= set(ACTIVATION_FORMS) else f"unknown activation; valid: {sorted(ACTIVATION_FORMS)}",
                         help="which activations to fuse")
    requires = ("canonical-linear",)

    def active_patterns(self) -> Sequence[Pattern]:
        return linear_act_patterns(self.activations)

    def run(self, graph) -> PassResult:
        try:
            result = fuse_linear_act(graph, self.activations, pass_=self)
        except PatternError as e:
            raise self.fail(str(e)) from e
        return PassResult(result.changed, {"rewritten": result.rewritten, **result.as_dict()})


# The inverse, for ``quantize``: ``fxopt.linear_act`` back into ``aten.linear``
# and the activation, so that the linear can be quantized and then re-fused.
_ATEN_ACTIVATION = {  # the op each activation's first form in ACTIVATION_FORMS traces to
    "gelu": (aten.gelu.default, {}),
    "gelu_tanh": (aten.gelu.default, {"approximate": "tanh"}),
    "silu": (aten.silu.default, {}),
    "relu": (aten.relu.default, {}),
    "quick_gelu": None,  # y * sigmoid(1.702 * y): three ops, built in _split_build
}


def _split_build(act: str, bias: bool) -> Callable:
    def build(m: Match, graph):
        fused = m.anchor
        y = graph.fx.call_function(aten.linear.default, (m["x"], m["w"], m["b"] if bias else None))
        y.meta.update({k: fused.meta[k] for k in _LAYER_META if k in fused.meta})
        if act == "quick_gelu":
            scaled = graph.fx.call_function(aten.mul.Tensor, (y, QUICK_GELU_ALPHA))
            return graph.fx.call_function(aten.mul.Tensor, (y, graph.fx.call_function(aten.sigmoid.default, (scaled,))))
        target, kwargs = _ATEN_ACTIVATION[act]
        return graph.fx.call_function(target, (y,), dict(kwargs))

    return build


def _split_patterns() -> dict[str, list[Pattern]]:
    out: dict[str, list[Pattern]] = {}
    for act in ACTIVATION_FORMS:
        # act is bound here, not a pattern parameter
        fused = function("fused", ["x", "w", "b"], lambda x, w, b, _act=act: fxopt_ops.linear_act(x, w, b, _act))
        fused_nobias = function("fused_nobias", ["x", "w"], lambda x, w, _act=act: fxopt_ops.linear_act(x, w, None, _act))
        out[act] = [
            Pattern(f"split-linear+{act}", fused, build=_split_build(act, True), where={"w": is_constant}, inputs=_LINEAR_SHAPES),
            Pattern(f"split-linear-nobias+{act}", fused_nobias, build=_split_build(act, False), where={"w": is_constant},
                    inputs=_LINEAR_SHAPES),
        ]
    return out


_SPLIT = _split_patterns()


def split_linear_act(graph, pass_=None) -> list[str]:
    """``fxopt.linear_act(x, W, b, act)`` with a constant ``W`` -> ``act(aten.linear(x, W, b))``
    in place; returns the activations it split (re-fuse them with :func:`fuse_linear_act`)."""
    acts = sorted({n.args[3] for n in graph.fx.nodes if n.target == fxopt_ops.linear_act.default})
    patterns = [p for act in acts for p in _SPLIT[act]]
    result = rewrite(graph, patterns, pass_=pass_)
    return sorted({act for act in acts if any(result.stats[p.name].rewritten for p in _SPLIT[act])})


# --------------------------------------------------------------------------
# merge-linears

def _merge(names: Sequence[str], bias: bool) -> Callable:
    def build(m: Match, graph):
        weights = [m.constant(f"w{i}") for i in range(len(names))]
        sizes = [w.shape[0] for w in weights]
        w = graph.add_constant(torch.cat(weights), "merged_" + m["w0"].target)
        b = None
        if bias:
            b = graph.add_constant(torch.cat([m.constant(f"b{i}") for i in range(len(names))]), "merged_" + m["b0"].target)
        y = graph.fx.call_function(aten.linear.default, (m["x"], w, b))
        y.meta["nn_module_stack"] = _merged_module_stack([m.outputs[i] for i in range(len(names))])
        parts = graph.fx.call_function(aten.split_with_sizes.default, (y, sizes, -1))
        return tuple(graph.fx.call_function(operator.getitem, (parts, i)) for i in range(len(sizes)))

    return build


def _merged_module_stack(linears: Sequence) -> dict:
    """The first linear's module stack, its innermost module renamed after all
    parts: ``a.b.q_proj`` + ``a.b.k_proj`` -> ``a.b.q_proj+k_proj``."""
    stacks = [l.meta.get("nn_module_stack") or {} for l in linears]
    paths = [module_path(l) for l in linears]
    prefix = paths[0].rpartition(".")[0]
    if all(p.rpartition(".")[0] == prefix for p in paths):
        merged = (prefix + "." if prefix else "") + "+".join(p.rpartition(".")[2] for p in paths)
    else:
        merged = "+".join(paths)
    stack = dict(stacks[0])
    key = list(stack)[-1] if stack else "merged"
    stack[key] = (merged, stack[key][1] if key in stack else "torch.nn.modules.linear.Linear")
    return stack


def _mergeable(n: int, bias: bool) -> Callable:
    def check(m: Match) -> bool:
        if any(is_router(m.outputs[i]) for i in range(n)):
            return False  # merged, its scores would reach topk through a split: skip_router could not see it
        ws = [m[f"w{i}"] for i in range(n)]
        consts = [m.constant(f"w{i}") for i in range(n)]
        if len({id(w) for w in ws}) < n or any(c is None or c.dim() != 2 for c in consts):
            return False
        if len({c.dtype for c in consts}) != 1:
            return False
        if bias and any(m.constant(f"b{i}") is None or m.constant(f"b{i}").dtype != consts[0].dtype for i in range(n)):
            return False
        return True

    return check


def _merge_patterns() -> list[Pattern]:
    patterns = []
    for n in (3, 2):
        for bias in (True, False):
            names = [f"w{i}" for i in range(n)]
            params = ["x"] + [p for i in range(n) for p in ((f"w{i}", f"b{i}") if bias else (f"w{i}",))]

            def linears(x, _n=n, _bias=bias, **w):  # a pattern with n outputs needs n named weights
                return tuple(F.linear(x, w[f"w{i}"], w[f"b{i}"] if _bias else None) for i in range(_n))

            pattern = function("pattern", params, linears)
            shapes = {"x": (2, 8), **{f"w{i}": (4 + i, 8) for i in range(n)}, **({f"b{i}": (4 + i,) for i in range(n)} if bias else {})}
            where = {**{f"w{i}": is_constant for i in range(n)}, **({f"b{i}": is_constant for i in range(n)} if bias else {})}
            patterns.append(Pattern(f"{n}-linears" + ("" if bias else "-nobias"), pattern, build=_merge(names, bias),
                                    where=where, check=_mergeable(n, bias), inputs=shapes))
    return patterns


@register_pass("merge-linears")
class MergeLinears(RewritePass):
    """Merges linears that read the same input into one (horizontal fusion).

    Matches three, then two, ``linear(x, W_i, b_i)`` on one ``x`` with
    constant weights of one dtype, all with or all without a bias (Q, K, V
    projections; gate and up of a SwiGLU MLP).
    Produces ``linear(x, cat(W_i), cat(b_i))`` and a ``split_with_sizes``
    whose parts replace the old outputs.
    The merged linear is named after its parts (``model.layers.0.self_attn.q_proj+k_proj+v_proj``),
    so ``quantize`` quantizes and reports it as one layer under that name.
    Refuses: a weight or bias that is a graph input, mixed dtypes, linears
    with and without bias together, a mixture of experts' router
    (:func:`~fxopt.passes.layers.is_router`, which ``skip_router`` keeps
    float). Runs before ``fuse-linear-act`` (a fused
    linear no longer merges) and before ``quantize`` (a quantized one neither).
    """

    runs_before = ("fuse-linear-act", "quantize")
    requires = ("canonical-linear",)
    patterns = _merge_patterns()


# --------------------------------------------------------------------------
# fuse-norm

def _rms_pow(x, w, eps: float):  # transformers' LlamaRMSNorm, T5LayerNorm
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rms_square(x, w, eps: float):
    return w * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps))


def _rms_div_sqrt(x, w, eps: float):
    return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rms_fused(x, w, eps: float):
    return fxopt_ops.rms_norm(x, w, eps)


def _ln_sub_mean(x, w, b, eps: float):  # the classic hand-written LayerNorm
    u = x.mean(-1, keepdim=True)
    s = (x - u).pow(2).mean(-1, keepdim=True)
    return w * ((x - u) / torch.sqrt(s + eps)) + b


def _ln_var(x, w, b, eps: float):
    u = x.mean(-1, keepdim=True)
    v = x.var(-1, keepdim=True, unbiased=False)
    return (x - u) / torch.sqrt(v + eps) * w + b


def _ln_var_rsqrt(x, w, b, eps: float):
    u = x.mean(-1, keepdim=True)
    v = x.var(-1, keepdim=True, unbiased=False)
    return (x - u) * torch.rsqrt(v + eps) * w + b


def _to_layer_norm(m: Match, graph):
    n = val(m["w"]).shape[-1]
    return graph.fx.call_function(aten.layer_norm.default, (m["x"], [n], m["w"], m["b"], m["eps"], False))


def _norm_params_fit(*params: str) -> Callable:
    """Scale (and shift) are vectors as long as the normalized dim."""

    def check(m: Match) -> bool:
        x = val(m["x"])
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            return False
        for p in params:
            v = val(m[p])
            if not isinstance(v, torch.Tensor) or v.dim() != 1 or not same_shape(v.shape, x.shape[-1:]):
                return False
        return True

    return check


_NORM_SHAPES = {"x": (2, 8), "w": (8,), "b": (8,)}


def _residual_fits(m: Match) -> bool:
    """Operands of one dtype: ONNX's Add does not promote as torch's does."""
    a, b = val(m["a"]), val(m["b"])
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype


def _add_rms(a, b, w, eps: float):
    s = a + b
    return fxopt_ops.rms_norm(s, w, eps), s


def _add_rms_fused(a, b, w, eps: float):
    s, normed = fxopt_ops.add_rms_norm(a, b, w, eps)
    return normed, s


def _add_ln(a, b, w, bias, n: int, eps: float):
    s = a + b
    return F.layer_norm(s, (n,), w, bias, eps), s


def _add_ln_fused(a, b, w, bias, eps: float):
    s, normed = fxopt_ops.add_layer_norm(a, b, w, bias, eps)
    return normed, s


_NORMS = [
    *(Pattern(f"rms-norm#{i}", fn, _rms_fused, check=_norm_params_fit("w"), inputs=_NORM_SHAPES)
      for i, fn in enumerate((_rms_pow, _rms_square, _rms_div_sqrt))),
    *(Pattern(f"layer-norm#{i}", fn, build=_to_layer_norm, check=_norm_params_fit("w", "b"), inputs=_NORM_SHAPES)
      for i, fn in enumerate((_ln_sub_mean, _ln_var, _ln_var_rsqrt))),
]
_ADD_SHAPES = {"a": (2, 8), "b": (2, 8), "w": (8,), "bias": (8,), "n": 8}
_RESIDUAL = [
    Pattern("add+rms-norm", _add_rms, _add_rms_fused, check=_residual_fits, inputs=_ADD_SHAPES),
    Pattern("add+layer-norm", _add_ln, _add_ln_fused, check=lambda m: _residual_fits(m) and m["n"] == val(m["w"]).shape[-1] and val(m["bias"]) is not None, inputs=_ADD_SHAPES),
]


@register_pass("fuse-norm")
class FuseNorm(RewritePass):
    """Fuses normalizations written out in primitive ops, and residual adds into norms.

    Turns a norm written out in primitive ops into one op, then fuses the
    residual add that feeds a norm into it.

    Matches and produces:

    * RMSNorm: ``w * (x * rsqrt(mean(x^2, -1, keepdim) + eps))`` (also with
      ``x * x`` or ``/ sqrt``; either operand order) -> ``fxopt.rms_norm(x, w, eps)``;
    * LayerNorm: ``w * (x - mean) / sqrt(var + eps) + b`` (var written out or
      ``var(unbiased=False)``; ``rsqrt`` too) -> ``aten.layer_norm``;
    * with ``residual``: ``s = a + b`` feeding a norm -> ``fxopt.add_rms_norm`` /
      ``fxopt.add_layer_norm`` returning ``(s, norm(s))`` (ONNX Runtime: Add +
      the norm, which measured faster here than its Skip*LayerNormalization
      kernels: see ir/ops_fused.py).

    Every epsilon is captured and kept as it is. Refuses: a norm over another
    dim than the last, scale/shift that are not vectors of the normalized
    size, residual adds whose operands differ in dtype, and layer norms
    without a shift.
    """

    residual = Option(True, help="also fuse residual add + norm")

    def active_patterns(self) -> Sequence[Pattern]:
        return _NORMS + (_RESIDUAL if self.residual else [])
