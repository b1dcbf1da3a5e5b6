"""``prune``: sets weights of linear layers (optionally embedding tables) to
exactly zero, ``W <- W * mask``, choosing the mask from a score.

Methods (one table, :data:`METHODS`):

* ``magnitude``: score ``|W|``, compared over the whole layer.
* ``wanda``: score ``|W_ij| * ||X_j||_2`` (the input's per-channel norm over
  the calibration rows), compared within each output row (Sun et al., "A
  Simple and Effective Pruning Approach for Large Language Models", 2024).
* ``sparsegpt``: column by column, the weights with the smallest
  ``W_ij^2 / [H^-1]_jj^2`` in each block of columns are removed and the error
  is spread over the columns not yet visited through the inverse Hessian
  ``(X^T X)^-1``, as GPTQ does for rounding (Frantar and Alistarh, "SparseGPT",
  2023). The kept weights change; the error on the calibration inputs falls.

Patterns: ``unstructured`` (``ratio`` of the weights, per layer or with one
``threshold=global`` over every selected layer) and ``N:M`` (at most N
non-zeros in every M consecutive input channels of a row: 2:4, 4:8).

Options on top of any method: ``allocation=owl`` (OWL's non-uniform per-layer
ratios, the same total) and ``refit`` (the kept weights and bias solved by
least squares, optionally toward the unpruned model's activations, and
``refit_rounds`` of mask re-selection).

The mask math is in plain functions (:func:`unstructured_mask`,
:func:`nm_mask`, :func:`wanda_scores`, :func:`sparsegpt_prune`,
:func:`owl_counts`, :func:`refit_weights`, :func:`swap_scores`) that the tests
check against the papers' algorithms or by-hand references.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from .base import Option, OptionError, PassResult
from .fusion import fuse_linear_act, split_linear_act
from .layers import Layer, LayerFilterOptions
from .quantize.calibration import LinearStats, calibrate_sequentially, collect_linear_stats, pooled
from .quantize.methods import GPTQ_DAMP, inverse_hessian_factor
from .registry import register_pass

aten = torch.ops.aten

SPARSEGPT_BLOCK = 128  # columns whose mask is chosen together (the paper's B_s)


# -- masks ----------------------------------------------------------------------------

def parse_pattern(text: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> ``(N, M)`` (N kept of M)."""
    if text == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", text)
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"pattern is 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def prune_count(total: int, ratio: float) -> int:
    """How many of ``total`` weights a ``ratio`` removes (rounded down)."""
    return int(math.floor(total * ratio + 1e-9))


def unstructured_mask(scores: torch.Tensor, ratio: float, per_row: bool = False, count: int | None = None) -> torch.Tensor:
    """Keep-mask removing exactly ``floor(ratio * count)`` lowest scores of the
    whole tensor (or of each row); ties go to the lower index. ``count``: remove
    exactly that many instead (per row: ``count // rows`` from every row and
    one more from each of the first ``count % rows``)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    rows = scores.reshape(scores.shape[0], -1) if per_row else scores.reshape(1, -1)
    if count is None:
        drops = [prune_count(rows.shape[1], ratio)] * rows.shape[0]
    else:
        base, extra = divmod(count, rows.shape[0])
        drops = [base + (r < extra) for r in range(rows.shape[0])]
    most = max(drops)
    if most:
        order = torch.argsort(rows, dim=1, stable=True)[:, :most]
        drop = torch.arange(most)[None, :] < torch.tensor(drops)[:, None]
        keep.view(rows.shape).scatter_(1, order, ~drop)
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the ``n`` highest scores of every ``m`` consecutive
    entries along the last dimension (which ``m`` must divide)."""
    rows, k = scores.shape
    if k % m:
        raise ValueError(f"N:M sparsity with M={m} needs the input dimension to be a multiple of {m}, got {k}")
    groups = scores.reshape(rows, k // m, m)
    order = torch.argsort(groups, dim=-1, stable=True)[..., : m - n]
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order, False)
    return keep.reshape(rows, k)


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||``: a weight matters as much as what it multiplies."""
    return weight.abs().float() * input_norm.float()[None, :]


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, *, ratio: float = 0.0, nm: tuple[int, int] | None = None,
                    block: int = SPARSEGPT_BLOCK, damp: float = GPTQ_DAMP, count: int | None = None) -> torch.Tensor:
    """SparseGPT's pruning with weight reconstruction; returns the new weight
    (float32) with exactly zeroed pruned entries.

    Unstructured: each block of ``block`` columns removes its share of
    ``floor(ratio * N * K)`` (shares sum exactly to it) with the smallest
    ``w^2 / [H^-1]_jj^2`` among the block's columns as they stand when the
    block starts; N:M: the same score chooses within every ``M`` columns when
    the first of them is reached. ``hessian``: ``X^T X / rows`` of the input.
    ``count``: remove exactly that many weights instead of ``ratio``'s.
    Input channels that never carried a value (``H_jj = 0``) are pruned first,
    as the paper's code does.
    """
    W = weight.detach().double().clone()
    rows, k = W.shape
    Hinv, dead = inverse_hessian_factor(hessian, damp)
    W[:, dead] = 0.0
    total = (prune_count(rows * k, ratio) if count is None else count) if nm is None else 0
    pruned = torch.zeros(rows, k, dtype=torch.bool)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        W1 = W[:, b0:b1].clone()
        Err = torch.zeros_like(W1)
        Hb = Hinv[b0:b1, b0:b1]
        mask = torch.zeros_like(W1, dtype=torch.bool)  # True: pruned
        if nm is None:
            share = round(total * b1 / k) - round(total * b0 / k)
            if share:
                score = (W1.pow(2) / torch.diag(Hb).pow(2)[None, :]).flatten()
                mask.view(-1)[torch.argsort(score, stable=True)[:share]] = True
        for j in range(b1 - b0):
            if nm is not None and j % nm[1] == 0:
                cols = slice(j, j + nm[1])
                score = W1[:, cols].pow(2) / torch.diag(Hb)[cols].pow(2)[None, :]
                mask[:, cols] = ~nm_mask(score, nm[0], nm[1])
            w = W1[:, j]
            q = w.masked_fill(mask[:, j], 0.0)
            err = (w - q) / Hb[j, j]
            W1[:, j:] -= err[:, None] * Hb[j, j:][None, :]
            W1[:, j] = q
            Err[:, j] = err
        W[:, b0:b1] = W1
        W[:, b1:] -= Err @ Hinv[b0:b1, b1:]
        pruned[:, b0:b1] = mask
    return W.masked_fill(pruned, 0.0).float()


def outlier_ratio(scores: torch.Tensor, m: float = 5.0) -> float:
    """OWL's layerwise outlier distribution: the fraction of ``scores`` (Wanda's
    ``|W| * ||X||``) above ``m`` times their mean (Yin et al., "Outlier Weighed
    Layerwise Sparsity", 2024)."""
    return float((scores > m * scores.mean()).double().mean())


def owl_counts(outliers: list[float], sizes: list[int], ratio: float, lam: float) -> list[int]:
    """How many weights each layer loses under OWL: outlier ratios rescaled to
    ``[0, 2 * lam]``, each layer's sparsity ``ratio`` minus its rescaled ratio's
    excess over their mean (weighted by layer size, so that the removed
    weights sum to exactly ``floor(ratio * sum(sizes))``: OWL's code averages
    over blocks of equal size). The more outliers, the less is removed; each
    layer keeps at least one weight."""
    d = torch.tensor(outliers, dtype=torch.float64)
    n = torch.tensor(sizes, dtype=torch.float64)
    spread = d.max() - d.min()
    d = (d - d.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(d)
    target = ratio - (d - (d * n).sum() / n.sum())
    exact = (target.clamp(0, 1) * n).minimum(n - 1)
    counts = exact.floor().long()
    total = prune_count(int(n.sum()), ratio)
    # largest remainders first: the rounding moves no layer by more than one weight
    order = torch.argsort(exact - counts, descending=True, stable=True).tolist()
    room = (n.long() - 1 - counts).tolist()
    i = 0
    while int(counts.sum()) < total and i < 4 * len(order):
        j = order[i % len(order)]
        if room[j] > 0:
            counts[j] += 1
            room[j] -= 1
        i += 1
    return counts.tolist()


def refit_weights(weight: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor | None = None, *,
                  bias: torch.Tensor | None = None, mean: torch.Tensor | None = None, ref_mean: torch.Tensor | None = None,
                  start: torch.Tensor | None = None, damp: float = GPTQ_DAMP, iterations: int = 100, tol: float = 1e-7,
                  rounds: int = 0, reselect: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kept weights (and the bias) that best reproduce the dense layer's
    output: per output row ``r``, ``w'`` (zero where ``keep`` is False) and
    ``b'`` minimize ``E ||x . w' + b' - (x_ref . w_r + b_r)||^2 + d ||w' - w_r||^2``
    over the calibration rows, ``x`` the layer's input, ``x_ref`` the input
    the unpruned model gives it (``cross = E[x x_ref^T]``, ``ref_mean``; the
    same as ``x`` when ``cross`` is None), ``d = damp * mean(diag H)``.

    The normal equations of each row, restricted to its kept entries, are
    solved by Jacobi-preconditioned conjugate gradients, every row at once
    (products in float32, the rest in float64), from ``start`` (the method's
    weights) until the residual falls below ``tol`` times the right-hand
    side's or ``iterations`` pass.

    ``rounds`` > 0: that many times at most, the mask is chosen again and the
    kept weights solved again, kept only if the objective falls. Each entry is
    scored by what it is worth to the objective with the others fixed:
    a kept weight ``w_j^2 A_jj`` (what removing it costs), a pruned one
    ``g_j^2 / A_jj`` (what bringing it back at its best value saves; ``g`` the
    gradient, ``A`` the damped Hessian); ``reselect(scores) -> keep`` keeps
    the best under the layer's pattern and count.

    Returns float32 ``(weight, bias)`` (bias None when none was given).
    """
    W = weight.detach().double()
    H = hessian.double()
    C = H if cross is None else cross.double()
    M = keep.bool()
    k = W.shape[1]
    T, V0 = W, (W if start is None else start.detach().double())
    if bias is not None:
        mu = mean.double()
        mu_ref = mu if ref_mean is None or cross is None else ref_mean.double()
        one = torch.ones(1, dtype=torch.float64)
        H = torch.cat([torch.cat([H, mu[:, None]], 1), torch.cat([mu, one])[None, :]], 0)
        C = torch.cat([torch.cat([C, mu[:, None]], 1), torch.cat([mu_ref, one])[None, :]], 0)
        T = torch.cat([W, bias.detach().double()[:, None]], 1)
        V0 = torch.cat([V0, bias.detach().double()[:, None]], 1)
        M = torch.cat([M, torch.ones(M.shape[0], 1, dtype=torch.bool)], 1)
    reg = damp * torch.diag(hessian).double().mean().clamp(min=1e-12)
    A = H + reg * torch.eye(H.shape[0], dtype=torch.float64)
    rhs = T @ C.T + reg * T
    V = _masked_cg(A, rhs, M, V0 * M, iterations, tol)
    if rounds and reselect is not None:
        loss = ((V @ A) * V).sum() - 2 * (V * rhs).sum()
        for _ in range(rounds):
            new = torch.cat([reselect(swap_scores(V, M, A, rhs)[:, :k].float()), M[:, k:]], 1)
            if torch.equal(new, M):
                break
            V2 = _masked_cg(A, rhs, new, V * new, iterations, tol)
            loss2 = ((V2 @ A) * V2).sum() - 2 * (V2 * rhs).sum()
            if loss2 >= loss:
                break
            V, M, loss = V2, new, loss2
    if bias is None:
        return V.float(), None
    return V[:, :k].float(), V[:, k].float()


def swap_scores(V: torch.Tensor, M: torch.Tensor, A: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """What each entry of ``V`` is worth to ``f(v) = v A v^T - 2 v . rhs`` (per
    row) with the others fixed: a kept one (``M``) what setting it to zero
    costs, ``v_j^2 A_jj`` (exact at a stationary point, where ``g_j = 0``); a
    pruned one what it saves at its best value, ``g_j^2 / A_jj``, ``g = V A - rhs``."""
    diag = torch.diag(A)
    return torch.where(M, V.pow(2) * diag, (V @ A - rhs).pow(2) / diag)


def _masked_cg(A: torch.Tensor, rhs: torch.Tensor, M: torch.Tensor, V: torch.Tensor, iterations: int, tol: float) -> torch.Tensor:
    """Per row ``r``: ``V_r`` (zero off ``M_r``) solving ``(V_r A - rhs_r)`` = 0 on ``M_r``,
    Jacobi-preconditioned conjugate gradients from ``V``."""
    rhs = rhs * M
    diag = torch.diag(A).clamp(min=1e-12)
    A32 = A.float()  # the products in float32 (the cost), the iteration in float64
    V = V.clone()
    R = rhs - (V @ A) * M
    goal = tol * rhs.norm(dim=1).clamp(min=1e-30)
    Z = R / diag
    P = Z.clone()
    rz = (R * Z).sum(1)
    for _ in range(iterations):
        if bool((R.norm(dim=1) <= goal).all()):
            break
        AP = (P.float() @ A32).double() * M
        alpha = rz / (P * AP).sum(1).clamp(min=1e-300)
        V += alpha[:, None] * P
        R -= alpha[:, None] * AP
        Z = R / diag
        rz_new = (R * Z).sum(1)
        P = Z + (rz_new / rz.clamp(min=1e-300))[:, None] * P
        rz = rz_new
    return V * M


# -- methods ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """``prune(weight, group) -> new weight``: ``group`` is the
    :class:`WeightGroup` (its score comparison settings and calibration)."""

    prune: Callable[["Prune", torch.Tensor, "WeightGroup"], torch.Tensor]
    needs_calibration: bool = False
    # scores(weight, group) -> tensor: what a global threshold compares (None: no global threshold)
    scores: Callable[[torch.Tensor, "WeightGroup"], torch.Tensor] | None = None
    per_row: bool = False  # compare scores within each output row (Wanda)


@dataclass
class WeightGroup:
    """One weight tensor and the selected layers (calls) that read it."""

    layers: list[Layer]
    hessian: torch.Tensor | None = None  # X^T X / rows over every call, float64
    keep: torch.Tensor | None = None  # a mask chosen beforehand (global threshold)
    count: int | None = None  # weights to remove (allocation=owl), else the ratio's
    mean: torch.Tensor | None = None  # E[x] of the input, float64
    cross: torch.Tensor | None = None  # E[x x_ref^T]: the input against the unpruned model's
    ref_mean: torch.Tensor | None = None  # E[x_ref]

    @property
    def first(self) -> Layer:
        return self.layers[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.first.weight


def _magnitude_scores(weight, group):
    return weight.abs().float()


def _wanda_input_norm(group: WeightGroup) -> torch.Tensor:
    return torch.diag(group.hessian).clamp(min=0).sqrt().float()


def _wanda_scores(weight, group):
    return wanda_scores(weight, _wanda_input_norm(group))


def _masked(scores_of):
    """A method that keeps the highest ``scores_of(weight, group)`` and leaves the kept weights as they are."""

    def prune(pass_, weight, group):
        if group.keep is None:
            scores = scores_of(weight, group)
            nm = pass_.nm
            keep = nm_mask(scores, *nm) if nm else unstructured_mask(scores, pass_.ratio, per_row=METHODS[pass_.method].per_row,
                                                                     count=group.count)
        else:
            keep = group.keep
        return weight.float() * keep
    return prune


def _sparsegpt(pass_, weight, group):
    return sparsegpt_prune(weight, group.hessian, ratio=pass_.ratio, nm=pass_.nm, block=pass_.block_size, damp=pass_.damp,
                           count=group.count)


METHODS: dict[str, Method] = {
    "magnitude": Method(_masked(_magnitude_scores), scores=_magnitude_scores),
    "wanda": Method(_masked(_wanda_scores), needs_calibration=True, scores=_wanda_scores, per_row=True),
    "sparsegpt": Method(_sparsegpt, needs_calibration=True),
}


def _pattern_problem(v) -> str | None:
    try:
        parse_pattern(v)
    except ValueError as e:
        return str(e)
    return None


def _combine(group: WeightGroup, calls: list[LinearStats]) -> None:
    """The input statistics of a group's calls, weighted by their rows."""
    for name in ("hessian", "mean", "cross", "ref_mean"):
        value = pooled(calls, name)
        if value is not None:
            setattr(group, name, value)


# -- the pass ------------------------------------------------------------------------

@register_pass("prune")
class Prune(LayerFilterOptions):
    """Sets weights of ``aten.linear`` layers (and, with ``embeddings``,
    ``aten.embedding`` tables) to exactly zero.

    Matches: the layers ``quantize`` would select with the same filters
    (``include``, ``exclude``, ``min_size``, ``skip_lm_head``, ``skip_router``), constant 2-D
    float weights. A weight read by several selected layers (a layer called
    twice) is pruned once, on the inputs of all its calls.

    Produces: the same graph with each selected weight replaced by a new
    constant holding ``W * mask`` (SparseGPT: the reconstructed kept weights
    times the mask); every other node and constant is untouched. Zeros stay
    exactly zero through ``quantize`` (0 is a code of every scheme).
    Embedding tables are pruned by magnitude whatever the method (a lookup has
    no input activation to weigh).

    Calibration (``wanda``, ``sparsegpt``): with ``sequential`` (the default)
    one run goes through the graph, every calibration input together, and
    prunes each layer when it reaches it, on the inputs the layers already
    pruned produce (the papers' layer-by-layer order); it holds the live values
    of every calibration input at once. ``threshold=global`` compares scores
    across layers before any mask is chosen, so it calibrates once on the
    unpruned model whatever ``sequential`` says.

    Allocation (``allocation=owl``): OWL's per-layer counts, from the
    unpruned model's outlier ratios (:func:`outlier_ratio`,
    :func:`owl_counts`); the selected layers together lose exactly
    ``floor(ratio * weights)``, each layer's method chooses its own mask for
    its count (Wanda: spread over the rows).

    Refit (``refit=layer|model``): each layer's kept weights and bias are then
    solved by least squares (:func:`refit_weights`) toward the dense layer's
    output on its calibration inputs (``layer``) or toward the unpruned
    model's output at that layer (``model``: the sequential run carries a
    second, unpruned stream); ``refit_rounds`` re-chooses the mask under the
    same pattern and count. The mask's count and N:M validity never change.

    Stats: per layer ``sparsity`` (zeros / elements) and ``rel_err``, the
    relative output error ``||X (W - W')^T|| / ||X W^T||`` on the calibration
    inputs (the graph's example inputs when none are given; for embeddings the
    weight's relative error); overall ``sparsity`` of the selected weights.

    Refuses: N:M on a layer whose input dimension M does not divide (names the
    layer: exclude it); ``threshold=global`` with ``sparsegpt`` (its mask is
    chosen while the weights change); ``allocation=owl`` with N:M or
    ``threshold=global``; filters that match no layer. ``ratio=0``
    leaves the graph as it was.
    """

    method = Option("magnitude", str, choices=tuple(METHODS), help="magnitude | wanda | sparsegpt")
    ratio = Option(0.5, float, check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
                   help="pattern=unstructured: fraction of each selected weight set to zero")
    pattern = Option("unstructured", str, check=_pattern_problem, help="unstructured | N:M (N kept of every M input channels: 2:4, 4:8)")
    threshold = Option("layer", str, choices=("layer", "global"),
                       help="unstructured: compare scores within each layer (Wanda: each output row) or across all selected layers")
    embeddings = Option(False, help="prune embedding tables too (by magnitude)")
    block_size = Option(SPARSEGPT_BLOCK, int, check=lambda v: None if v >= 1 else "must be >= 1",
                        help="sparsegpt: columns whose mask is chosen together")
    damp = Option(GPTQ_DAMP, float, check=lambda v: None if v >= 0 else "must be >= 0",
                  help="sparsegpt: fraction of mean(diag H) added to H's diagonal")
    allocation = Option("uniform", str, choices=("uniform", "owl"),
                        help="unstructured, threshold=layer: every layer loses ratio of its weights (uniform), or OWL's per-layer "
                             "ratios (fewer removed where more outlier scores; the same total, exactly)")
    owl_lambda = Option(0.08, float, check=lambda v: None if 0 <= v < 0.5 else "must be in [0, 0.5)",
                        help="allocation=owl: per-layer ratios span ratio +- owl_lambda")
    owl_m = Option(5.0, float, check=lambda v: None if v > 0 else "must be > 0",
                   help="allocation=owl: an outlier score is above owl_m times its layer's mean")
    refit = Option("none", str, choices=("none", "layer", "model"),
                   help="after the mask: solve the kept weights and bias by least squares to reproduce the dense layer's output "
                        "on the layer's calibration inputs (layer) or the unpruned model's output at that layer (model)")
    refit_iterations = Option(100, int, check=lambda v: None if v >= 1 else "must be >= 1",
                              help="refit: conjugate-gradient iterations at most")
    refit_rounds = Option(0, int, check=lambda v: None if v >= 0 else "must be >= 0",
                          help="refit: times the mask is chosen again from the refit weights (same pattern and count)")
    sequential = Option(True, help="wanda, sparsegpt: calibrate each layer on the inputs the already-pruned layers produce "
                                   "(false, or threshold=global: every layer on the unpruned model's inputs, one calibration run)")

    runs_after = ("canonicalize",)
    runs_before = ("quantize",)
    requires = ("canonical-linear",)
    numerics_tolerance = 1.0  # removing half the weights moves outputs by design

    def validate_options(self) -> None:
        self.nm = parse_pattern(self.pattern)
        if self.nm and "ratio" in self.given_options:
            raise OptionError(f"pass 'prune': option 'ratio' applies to pattern=unstructured; pattern {self.pattern} "
                              f"removes {self.nm[1] - self.nm[0]} of every {self.nm[1]}")
        if self.nm and self.threshold == "global":
            raise OptionError("pass 'prune': threshold=global applies to pattern=unstructured (N:M chooses within each group)")
        if self.allocation == "owl" and (self.nm or self.threshold == "global"):
            raise OptionError("pass 'prune': allocation=owl applies to pattern=unstructured with threshold=layer "
                              f"(got pattern={self.pattern}, threshold={self.threshold})")
        if self.threshold == "global" and METHODS[self.method].scores is None:
            raise OptionError(f"pass 'prune': method {self.method!r} chooses its mask while it updates the weights and "
                              "cannot share one threshold across layers (threshold=global); use threshold=layer, or method magnitude or wanda")

    def required_inputs(self) -> tuple[str, ...]:
        needs = METHODS[self.method].needs_calibration or self.allocation == "owl" or self.refit != "none"
        return ("calibration_data",) if needs else ()

    def _noop(self) -> bool:
        return self.nm is None and self.ratio == 0

    def run(self, graph) -> PassResult:
        if self._noop():
            return PassResult(False, {"pruned": 0, "sparsity": 0.0})
        split = split_linear_act(graph, pass_=self)  # fxopt.linear_act: prune its linear, fuse it again
        try:
            return self._run(graph)
        finally:
            if split:
                fuse_linear_act(graph, split, pass_=self)

    def _run(self, graph) -> PassResult:
        selection = self.select_layers(graph, ("linear", "embedding") if self.embeddings else ("linear",))
        selected, skipped = selection.selected, selection.skipped
        groups: dict[int, WeightGroup] = {}
        for layer in selected:
            groups.setdefault(id(layer.weight), WeightGroup([])).layers.append(layer)
        if self.nm:  # check every layer before the first edit
            for group in groups.values():
                k = group.weight.shape[1]
                if k % self.nm[1]:
                    raise self.fail(f"layer {group.first.name!r} (weight {tuple(group.weight.shape)}): pattern {self.pattern} needs "
                                    f"the input dimension to be a multiple of {self.nm[1]}; leave the layer out (exclude=..., min_size=...)",
                                    group.first.node)
        per_layer: dict[str, dict] = {}
        totals = [0, 0]  # zeros, elements

        def prune(group: WeightGroup, erase: bool = True) -> None:
            self.current_node = group.first.node
            if group.first.kind == "embedding":
                scores = group.weight.abs().float()
                keep = group.keep if group.keep is not None else (
                    nm_mask(scores, *self.nm) if self.nm else unstructured_mask(scores, self.ratio))
                new = group.weight.float() * keep
            else:
                new = METHODS[self.method].prune(self, group.weight, group)
            bias = None
            if self.refit != "none" and group.first.kind == "linear":
                new, bias = self._refit(graph, group, new)
            self._replace(graph, group, new.to(group.weight.dtype), per_layer, totals, erase, bias)

        if self.allocation == "owl":
            self._owl(graph, [g for g in groups.values() if g.first.kind == "linear"])
        if self._sequential():
            # Embedding tables first (by magnitude, no calibration): the linears are calibrated behind them.
            linear_groups = [g for g in groups.values() if g.first.kind == "linear"]
            for group in groups.values():
                if group.first.kind != "linear":
                    self._attach_hessians(graph, [group])
                    prune(group)
            self._prune_sequentially(graph, linear_groups, prune)
        else:
            self._attach_hessians(graph, list(groups.values()))
            if self.threshold == "global":
                self._global_masks(list(groups.values()))
            for group in groups.values():
                prune(group)
        zeros, total = totals
        self.current_node = None
        stats = {"pruned": len(per_layer), "skipped": skipped, "sparsity": round(zeros / total, 6) if total else 0.0,
                 "layers": per_layer}
        return PassResult(bool(per_layer), stats)

    def _sequential(self) -> bool:
        needs = METHODS[self.method].needs_calibration or self.refit != "none"
        return self.sequential and needs and self.threshold == "layer"

    def _prune_sequentially(self, graph, groups: list[WeightGroup], prune) -> None:
        """Each group is pruned when the calibration run reaches its last call,
        on the inputs of all its calls as the graph then stands (the layers
        before it already pruned); the rest of the run computes with the pruned
        weight. The replaced weight constants are erased after the run."""
        by_node = {l.node: g for g in groups for l in g.layers if l.kind == "linear"}
        seen: dict[int, list[LinearStats]] = {}

        def visit(node, stats: LinearStats) -> None:
            group = by_node[node]
            calls = seen.setdefault(id(group), [])
            calls.append(stats)
            if len(calls) == sum(1 for l in group.layers if l.kind == "linear"):
                _combine(group, calls)
                prune(group, erase=False)

        calibrate_sequentially(graph, self._calibration(graph), list(by_node), visit, progress=self.progress,
                               reference=self.refit == "model")
        for node in {n: None for g in groups for l in g.layers for n in (l.weight_node, l.bias) if isinstance(n, fx.Node)}:
            if not node.users:
                graph.fx.erase_node(node)

    def _replace(self, graph, group: WeightGroup, new: torch.Tensor, per_layer: dict, totals: list, erase: bool,
                 bias: torch.Tensor | None = None) -> None:
        """Every call of ``group`` reads ``new`` in place of its weight (and
        ``bias`` in place of its bias); the record goes to ``per_layer``."""
        record = self._record(group, new)
        node = graph.add_constant(new, f"{group.first.name}.weight")
        bias_node = graph.add_constant(bias, f"{group.first.name}.bias") if bias is not None else None
        for layer in group.layers:
            old_bias = layer.bias
            layer.node.replace_input_with(layer.weight_node, node)
            if bias_node is not None:
                layer.node.replace_input_with(old_bias, bias_node)
            if erase and not layer.weight_node.users:
                graph.fx.erase_node(layer.weight_node)
            if erase and bias_node is not None and not old_bias.users:
                graph.fx.erase_node(old_bias)
        for layer in group.layers:
            key, calls = layer.name, 1
            while key in per_layer:
                calls += 1
                key = f"{layer.name}#{calls}"
            per_layer[key] = record
        totals[0] += int((new == 0).sum())
        totals[1] += new.numel()

    def _calibration(self, graph) -> list:
        data = self.context.get("calibration_data")
        if data is None:
            if graph.example_args and graph.example_kwargs:
                raise self.fail("the graph's example inputs mix positional and keyword inputs; give calibration_data")
            data = [graph.example_kwargs if graph.example_kwargs else graph.example_args]
        return data

    def _attach_hessians(self, graph, groups: list[WeightGroup]) -> None:
        """``X^T X / rows`` of each linear group's input, summed over its calls,
        on the calibration data (or the graph's example inputs, for the error stat)."""
        linears = [l for g in groups for l in g.layers if l.kind == "linear"]
        if not linears:
            return
        stats: dict[str, LinearStats] = collect_linear_stats(graph, self._calibration(graph), [l.node for l in linears], hessian=True)
        for group in groups:
            calls = [stats[l.node.name] for l in group.layers if l.kind == "linear"]
            if calls:
                _combine(group, calls)

    def _owl(self, graph, groups: list[WeightGroup]) -> None:
        """OWL's per-layer counts, from Wanda's scores on the unpruned model
        (one calibration run before any layer is pruned)."""
        stats = collect_linear_stats(graph, self._calibration(graph), [l.node for g in groups for l in g.layers])
        outliers = []
        for group in groups:
            calls = [stats[l.node.name] for l in group.layers]
            norm = pooled(calls, "sq_mean").clamp(min=0).sqrt()
            outliers.append(outlier_ratio(wanda_scores(group.weight, norm), self.owl_m))
        counts = owl_counts(outliers, [g.weight.numel() for g in groups], self.ratio, self.owl_lambda)
        for group, count in zip(groups, counts):
            group.count = count

    def _refit(self, graph, group: WeightGroup, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:func:`refit_weights` on ``new``'s mask; the bias too when every call
        reads the same constant bias."""
        biases = {l.bias for l in group.layers}
        bias_node = biases.pop() if len(biases) == 1 else None
        bias = graph.constant(bias_node) if isinstance(bias_node, fx.Node) else None
        cross = group.cross if self.refit == "model" else None
        keep = new != 0
        if self.nm:
            reselect = lambda scores: nm_mask(scores, *self.nm)  # noqa: E731
        else:
            count = int((~keep).sum())
            reselect = lambda scores: unstructured_mask(scores, 0.0, count=count)  # noqa: E731
        weight, new_bias = refit_weights(group.weight, keep, group.hessian, cross, bias=bias, mean=group.mean,
                                         ref_mean=group.ref_mean, start=new, damp=self.damp, iterations=self.refit_iterations,
                                         rounds=self.refit_rounds, reselect=reselect)
        return weight, (new_bias.to(bias.dtype) if new_bias is not None else None)

    def _global_masks(self, groups: list[WeightGroup]) -> None:
        """One threshold over the scores of every selected weight: exactly
        ``floor(ratio * total)`` weights go, wherever they are."""
        method = METHODS[self.method]
        scores = [(_magnitude_scores if g.first.kind == "embedding" else method.scores)(g.weight, g) for g in groups]
        flat = torch.cat([s.flatten() for s in scores])
        keep = unstructured_mask(flat, self.ratio)
        offset = 0
        for group, s in zip(groups, scores):
            group.keep = keep[offset: offset + s.numel()].view(s.shape)
            offset += s.numel()

    def _record(self, group: WeightGroup, new: torch.Tensor) -> dict:
        w, d = group.weight.double(), (group.weight.double() - new.double())
        if group.hessian is not None:
            H = group.hessian
            num, den = ((d @ H) * d).sum().item(), ((w @ H) * w).sum().item()
        else:
            num, den = d.pow(2).sum().item(), w.pow(2).sum().item()
        rel = math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0
        return {"method": "magnitude" if group.first.kind == "embedding" else self.method, "pattern": self.pattern,
                "sparsity": round(float((new == 0).float().mean()), 6), "rel_err": round(rel, 6)}
