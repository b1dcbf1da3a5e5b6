"""The non-attention fusions of transformer inference, each a few
``(pattern, replacement)`` pairs on the rewrite engine (:mod:`.rewrite`).

* ``fuse-linear-act``: linear + bias + activation -> ``fxopt.linear_act``;
* ``merge-linears``: linears sharing one input (Q/K/V, gate/up) -> one linear + split;
* ``fuse-norm``: RMSNorm / LayerNorm written out in primitive ops -> one norm
  op, and residual add + norm -> ``fxopt.add_rms_norm`` / ``fxopt.add_layer_norm``.
"""

from __future__ import annotations

import inspect
import math
import operator
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..ir.nodes import same_shape, val
from .base import Option
from .registry import register_pass
from .rewrite import Match, Pattern, RewritePass, is_constant

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
}

# Linear-like ops that fuse with an activation: name -> (pattern for ``y =
# op(x, w, b)``, replacement given the activation name, example shapes).
# A quantized linear joins by adding an entry here.
_LINEAR_SHAPES = {"x": (2, 8), "w": (16, 8), "b": (16,)}


def _linear_variants() -> dict[str, tuple[Callable, Callable, dict, dict]]:
    def with_bias(x, w, b):
        return F.linear(x, w, b)

    def no_bias(x, w):
        return F.linear(x, w)

    def fused_with_bias(act):
        return lambda x, w, b: fxopt_ops.linear_act(x, w, b, act)

    def fused_no_bias(act):
        return lambda x, w: fxopt_ops.linear_act(x, w, None, act)

    return {
        "linear": (with_bias, fused_with_bias, _LINEAR_SHAPES, {"w": is_constant}),
        "linear-nobias": (no_bias, fused_no_bias, _LINEAR_SHAPES, {"w": is_constant}),
    }


def _linear_act_patterns() -> dict[str, list[Pattern]]:
    out: dict[str, list[Pattern]] = {}
    for act, forms in ACTIVATION_FORMS.items():
        for lin_name, (linear, fused, shapes, where) in _linear_variants().items():
            for i, form in enumerate(forms):
                def pattern(_linear=linear, _form=form, **params):
                    return _form(_linear(**params))

                # The engine reads the parameters from the signature: the linear's.
                pattern.__signature__ = inspect.signature(linear)
                name = f"{lin_name}+{act}" + (f"#{i}" if i else "")
                out.setdefault(act, []).append(Pattern(name, pattern, fused(act), where=dict(where), inputs=shapes))
    return out


_LINEAR_ACT = _linear_act_patterns()


@register_pass("fuse-linear-act")
class FuseLinearAct(RewritePass):
    """Fuses a linear layer with the activation that follows it.

    Matches ``act(linear(x, W, b))`` (bias optional, ``W`` a constant) for
    act in GELU (exact), GELU-tanh (``gelu(approximate="tanh")`` or written
    out as transformers' ``gelu_new``), SiLU and ReLU.
    Produces ``fxopt.linear_act(x, W, b, act)`` (ONNX Runtime: MatMul +
    BiasGelu / FastGelu).
    Refuses: weights that are graph inputs, linears whose output is used by
    anything other than the activation, activations in ``activations`` not
    listed.
    """

    activations = Option(tuple(ACTIVATION_FORMS), tuple, check=lambda v: None if set(v) <= set(ACTIVATION_FORMS) else f"unknown activation; valid: {sorted(ACTIVATION_FORMS)}",
                         help="which activations to fuse")
    requires = ("canonical-linear",)

    def active_patterns(self) -> Sequence[Pattern]:
        return [p for act in self.activations for p in _LINEAR_ACT[act]]


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
        parts = graph.fx.call_function(aten.split_with_sizes.default, (y, sizes, -1))
        return tuple(graph.fx.call_function(operator.getitem, (parts, i)) for i in range(len(sizes)))

    return build


def _mergeable(n: int, bias: bool) -> Callable:
    def check(m: Match) -> bool:
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
            src = f"def pattern({', '.join(params)}):\n    return " + ", ".join(
                f"F.linear(x, w{i}, b{i})" if bias else f"F.linear(x, w{i})" for i in range(n)
            ) + "\n"
            scope: dict = {"F": F}
            exec(src, scope)  # a pattern with n outputs needs n named parameters
            shapes = {"x": (2, 8), **{f"w{i}": (4 + i, 8) for i in range(n)}, **({f"b{i}": (4 + i,) for i in range(n)} if bias else {})}
            where = {**{f"w{i}": is_constant for i in range(n)}, **({f"b{i}": is_constant for i in range(n)} if bias else {})}
            patterns.append(Pattern(f"{n}-linears" + ("" if bias else "-nobias"), scope["pattern"], build=_merge(names, bias),
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
    Refuses: a weight or bias that is a graph input, mixed dtypes, linears
    with and without bias together. Runs before ``fuse-linear-act`` (a fused
    linear no longer merges).
    """

    runs_before = ("fuse-linear-act",)
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
    """ORT's Skip*Normalization kernels take 2-D or 3-D inputs of one shape."""
    a, b = val(m["a"]), val(m["b"])
    return (
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
        and a.dim() in (2, 3) and same_shape(a.shape, b.shape)
    )


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
      ``fxopt.add_layer_norm`` returning ``(s, norm(s))`` (ONNX Runtime:
      SkipSimplifiedLayerNormalization / SkipLayerNormalization).

    Every epsilon is captured and kept as it is. Refuses: a norm over another
    dim than the last, scale/shift that are not vectors of the normalized
    size, residual adds whose operands differ in shape or dtype (ORT's
    kernels do not broadcast) or are not 2-D/3-D, and layer norms without a
    shift.
    """

    residual = Option(True, help="also fuse residual add + norm")

    def active_patterns(self) -> Sequence[Pattern]:
        return _NORMS + (_RESIDUAL if self.residual else [])
