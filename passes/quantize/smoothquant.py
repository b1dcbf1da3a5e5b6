"""``smooth-quant``: move activation outliers into the weights before int8
quantization (Xiao et al., SmoothQuant, 2023)."""

from __future__ import annotations

import torch
import torch.fx as fx

from ...ir.nodes import val
from ..base import Option, Pass, PassResult
from .calibration import collect_linear_stats, is_linear
from ..registry import register_pass

aten = torch.ops.aten


@register_pass("smooth-quant")
class SmoothQuant(Pass):
    """Divides each linear's input by a per-channel factor ``s`` and multiplies
    the weight's columns by it, so that ``linear(x / s, W * s) == linear(x, W)``
    while ``x / s`` has a far smaller range to quantize::

        norm(h; gamma, beta) --> linear(W)       norm(h; gamma/s, beta/s) --> linear(W * s)
                             \\-> linear(W2)  ==>                          \\-> linear(W2 * s)

    ``s[k] = max|X[:, k]|^alpha / max|W[:, k]|^(1 - alpha)``, with ``max|X|``
    from the calibration set and ``max|W|`` over every linear sharing the input
    (they must share ``s``).

    Matches: ``aten.linear`` whose input comes straight from a LayerNorm
    (``aten.layer_norm`` with a constant weight, and bias if any) or from an
    RMSNorm's scale (``aten.mul`` by a constant ``[K]`` vector); the division
    is folded into that weight (and bias), so nothing is added at run time.
    When the norm's output also feeds something other than linears (BERT's
    residual), the norm is duplicated for the linears (one more norm per layer)
    unless ``duplicate_shared_norm=False``.

    Refuses (listed in ``stats["refused"]`` with the reason): linears whose
    input is not such a norm (attention output, MLP down projection), and
    norms shared with other users when duplication is off. With
    ``unfoldable=scale`` those inputs are smoothed too, by an explicit
    ``mul(x, 1/s)`` before the linear (one elementwise op per input at run
    time; it measurably helps W8A8 on MiniLM, whose FFN output projection
    reads GELU outputs with wide ranges). Exact in float; must run before
    ``quantize``.
    """

    alpha = Option(0.5, float, check=lambda v: None if 0 <= v <= 1 else "must be in [0, 1]", help="migration strength")
    duplicate_shared_norm = Option(True, help="copy a norm whose output has non-linear users instead of refusing")
    unfoldable = Option("refuse", str, choices=("refuse", "scale"),
                        help="linears whose input is not a norm: refuse, or divide the input by s with an explicit multiply")

    needs = ("calibration_data",)
    requires = ("canonical-linear",)
    runs_after = ("canonicalize",)
    runs_before = ("quantize",)

    def run(self, graph) -> PassResult:
        with torch.no_grad():
            return self._run(graph)

    def _run(self, graph) -> PassResult:
        groups: dict[fx.Node, list[fx.Node]] = {}
        refused: dict[str, str] = {}
        for node in self.walk(graph, op="call_function", target=aten.linear.default):
            x = node.args[0]
            if self._norm_parts(graph, x) is not None or (self.unfoldable == "scale" and self._scalable(x)):
                groups.setdefault(x, []).append(node)
            else:
                refused[self._label(node)] = "input is not a LayerNorm/RMSNorm output with constant weights"
        if not groups:
            return PassResult(False, {"smoothed": 0, "refused": refused})
        stats = collect_linear_stats(graph, self.context["calibration_data"], [n for ls in groups.values() for n in ls],
                                     progress=self.progress)
        smoothed, duplicated, scaled, reduction = 0, 0, 0, {}
        for norm, linears in groups.items():
            foldable = self._norm_parts(graph, norm) is not None
            others = [u for u in norm.users if not (is_linear(u) and u.args[0] is norm)]
            if foldable and others and not self.duplicate_shared_norm:
                for lin in linears:
                    refused[self._label(lin)] = f"norm {norm.name!r} also feeds {others[0].name!r} (duplicate_shared_norm=False)"
                continue
            act = stats[linears[0].name].channel_absmax
            weights = [graph.constant(lin.args[1]) for lin in linears]
            w_max = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
            s = self.factors(act, w_max, self.alpha)
            self.current_node = norm
            if foldable:
                new_norm = self._scaled_norm(graph, norm, s, copy=bool(others))
                duplicated += bool(others)
            else:
                # One multiply at run time, shared by the linears reading this input.
                inv = graph.add_constant((1.0 / s).to(graph.constant(linears[0].args[1]).dtype), f"{self._label(linears[0])}_smooth_inv")
                with graph.fx.inserting_before(linears[0]):
                    new_norm = graph.fx.call_function(aten.mul.Tensor, (norm, inv))
                scaled += 1
            for lin, w in zip(linears, weights):
                self.current_node = lin
                new_w = graph.add_constant(w * s[None, :], f"{lin.args[1].target}_smoothed")
                lin.replace_input_with(lin.args[1], new_w)
                if new_norm is not norm:
                    lin.replace_input_with(norm, new_norm)
                smoothed += 1
            reduction[self._label(linears[0])] = round(float(act.max() / (act / s).max()), 3)
        self.current_node = None
        return PassResult(smoothed > 0, {
            "smoothed": smoothed,
            "norms_duplicated": duplicated,
            "inputs_scaled": scaled,  # unfoldable=scale: explicit multiplies added
            "refused": refused,
            # max|X| before / after, per norm (named by its first linear): the range int8 must cover shrinks by this.
            "activation_range_reduction": reduction,
        })

    @staticmethod
    def factors(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
        """``s = act^alpha / w^(1-alpha)``; 1 where a channel is all zero
        (nothing to migrate, and dividing by 0 would poison the norm)."""
        act, w = act_absmax.double(), w_absmax.double()
        s = act.pow(alpha) / w.pow(1 - alpha)
        ok = (act > 0) & (w > 0) & torch.isfinite(s)
        return torch.where(ok, s, torch.ones_like(s)).clamp(min=1e-5).to(w_absmax.dtype)

    def _norm_parts(self, graph, x) -> tuple[int, int | None] | None:
        """Argument indices ``(weight, bias)`` of the constants to divide by
        ``s`` when ``x`` is a norm output this pass can fold into, else None."""
        if not isinstance(x, fx.Node) or x.op != "call_function":
            return None
        out = val(x)
        if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
            return None
        k = out.shape[-1]

        def vector(i):
            t = graph.constant(x.args[i]) if len(x.args) > i else None
            return t is not None and t.dim() == 1 and t.shape[0] == k and t.dtype.is_floating_point

        if x.target == aten.layer_norm.default and vector(2):
            if len(x.args) > 3 and x.args[3] is not None and not vector(3):
                return None
            return 2, 3 if len(x.args) > 3 and x.args[3] is not None else None
        if x.target == aten.mul.Tensor and len(x.args) == 2:
            for i in (0, 1):
                other = x.args[1 - i]
                if vector(i) and isinstance(other, fx.Node) and isinstance(val(other), torch.Tensor) and val(other).shape[-1] == k:
                    return i, None
        return None

    @staticmethod
    def _scalable(x) -> bool:
        out = val(x)
        return isinstance(x, fx.Node) and isinstance(out, torch.Tensor) and out.dtype.is_floating_point

    def _scaled_norm(self, graph, norm: fx.Node, s: torch.Tensor, copy: bool) -> fx.Node:
        w_i, b_i = self._norm_parts(graph, norm)
        args = list(norm.args)
        for i in (w_i, b_i):
            if i is not None:
                old = graph.constant(args[i])
                args[i] = graph.add_constant(old / s.to(old.dtype), f"{args[i].target}_smoothed")
        if not copy:
            norm.args = tuple(args)
            return norm
        with graph.fx.inserting_after(norm):
            new = graph.fx.call_function(norm.target, tuple(args), dict(norm.kwargs))
        new.meta.update({k: v for k, v in norm.meta.items() if k != "val"})
        return new

    @staticmethod
    def _label(linear: fx.Node) -> str:
        w = linear.args[1]
        return w.target if isinstance(w, fx.Node) and w.op == "get_attr" else linear.name
