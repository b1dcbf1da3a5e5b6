"""Methods: how a weight's integer codes are chosen. Each registers in
:data:`~fxopt.passes.quantize.registry.METHODS`; the calibrated ones take
their statistics from :func:`~fxopt.passes.quantize.calibration.collect_linear_stats`.

* ``rtn``: round-to-nearest with the reference quantizer
  (:func:`fxopt.ir.quant.quantize`).
* ``awq`` (``quantize(bits=4, method=awq)``): per input channel ``s =
  mean|X|^a``, ``a`` searched on a grid to minimise the layer's output error on
  calibration activations; quantizes ``W * s`` and divides the input by ``s``
  (Lin et al., AWQ, 2024).
* ``gptq`` (``quantize(bits=4, method=gptq)``): quantizes ``W`` column by
  column and spreads each column's rounding error over the columns not yet
  quantized, weighted by the inverse Hessian ``(X^T X)^-1`` (Frantar et al.,
  GPTQ, 2023).

Their accuracy against RTN (``python benchmarks/quant_accuracy.py``) is in
docs/kernels.md.
"""

from __future__ import annotations

from typing import Any

import torch

from ...ir.quant import QuantConfig, QuantizedTensor, quantize
from .calibration import collect_linear_stats
from .registry import register_method


@register_method("rtn")
def rtn(weight: torch.Tensor, cfg, stats) -> tuple[QuantizedTensor, None]:
    """Round-to-nearest with the reference quantizer."""
    return quantize(weight, cfg.quant_config()), None


# -- AWQ ----------------------------------------------------------------------------

AWQ_GRID = 20  # alphas 0, 0.05, ..., 1; alpha 0 is plain round-to-nearest
AWQ_ROWS = 512  # calibration rows kept per layer for the search


def _collect_rows(p, graph, layers, data) -> dict[str, Any]:
    stats = collect_linear_stats(graph, data, [l.node for l in layers], keep_rows=AWQ_ROWS, progress=p.progress)
    return {l.name: stats[l.node.name] for l in layers}


def _collect_hessian(p, graph, layers, data) -> dict[str, Any]:
    stats = collect_linear_stats(graph, data, [l.node for l in layers], hessian=True, progress=p.progress)
    return {l.name: stats[l.node.name] for l in layers}


def _output_error(x: torch.Tensor, w: torch.Tensor, w_q: torch.Tensor) -> float:
    return (x @ (w - w_q).T).pow(2).mean().item()


def awq_search(weight: torch.Tensor, x: torch.Tensor, config: QuantConfig, grid: int = AWQ_GRID):
    """``(qt, s, alpha, errors)``: the per-input-channel scale ``s = mean|x|^alpha``
    (normalised to geometric mean 1) whose quantization of ``weight * s``
    gives the smallest output error ``mean((x W^T - x (Q(W s) / s)^T)^2)`` on
    the rows ``x``; ``errors[i]`` is that error for ``alpha = i / grid``."""
    w = weight.detach().float()
    x = x.float()
    act = x.abs().mean(0).clamp(min=1e-8)
    best = None
    errors = []
    for i in range(grid + 1):
        alpha = i / grid
        s = act.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        qt = quantize(w * s[None, :], config)
        err = _output_error(x, w, qt.dequantize() / s[None, :])
        errors.append(err)
        if best is None or err < best[0]:
            best = (err, qt, s, alpha)
    _, qt, s, alpha = best
    return qt, s, alpha, errors


@register_method("awq", needs_calibration=True, collect=_collect_rows)
def awq(weight: torch.Tensor, cfg, stats) -> tuple[QuantizedTensor, torch.Tensor | None]:
    qt, s, alpha, _ = awq_search(weight, stats.sample(), cfg.quant_config())
    return qt, (None if alpha == 0 else s)


# -- GPTQ ---------------------------------------------------------------------------

GPTQ_DAMP = 0.01  # fraction of mean(diag(H)) added to H's diagonal
GPTQ_BLOCK = 128  # columns updated together (lazy batch updates)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = GPTQ_DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``
    in float64, the matrix GPTQ and SparseGPT read their error feedback
    from, and the input channels that never carried a value (``H[j, j] == 0``,
    given a unit diagonal so the factor exists)."""
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True), dead


def gptq_sweep(W: torch.Tensor, Hinv: torch.Tensor, round_column, pruned: torch.Tensor | None = None) -> None:
    """GPTQ's sweep with lazy batch updates over the columns of ``W`` (float64
    ``[N, K]``, updated in place), in order: column ``c`` takes the value
    ``round_column(c, w, ahead)`` returns (``w``: the column as the errors of the
    columns before it left it; ``ahead(width)``: the next ``width`` columns as
    they stand, ``c`` first), and its error is spread over the columns after it
    through ``Hinv``, the upper factor :func:`inverse_hessian_factor` gives.
    Entries where ``pruned`` is True stay zero."""
    k = W.shape[1]
    for b0 in range(0, k, GPTQ_BLOCK):
        b1 = min(b0 + GPTQ_BLOCK, k)
        W1 = W[:, b0:b1].clone()
        Err = torch.zeros_like(W1)
        Hb = Hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j

            def ahead(width: int, j: int = j) -> torch.Tensor:
                return torch.cat([W1[:, j:], W[:, b1:]], dim=1)[:, :width]

            w = W1[:, j]
            err = (w - round_column(col, w, ahead)) / Hb[j, j]
            W1[:, j:] -= err[:, None] * Hb[j, j:][None, :]
            if pruned is not None:
                W1[:, j:].masked_fill_(pruned[:, col:b1], 0.0)
            Err[:, j] = err
        W[:, b1:] -= Err @ Hinv[b0:b1, b1:]
        if pruned is not None:
            W[:, b1:].masked_fill_(pruned[:, b1:], 0.0)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig, damp: float = GPTQ_DAMP) -> QuantizedTensor:
    """GPTQ with error feedback (:func:`gptq_sweep`); scales and zero points come from the
    reference quantizer (:func:`fxopt.ir.quant.quantize`) applied to each
    group's columns as they stand when the group starts (per channel: to the
    whole weight up front), so the result dequantizes like any
    :class:`QuantizedTensor`. Weights that are exactly zero (pruned) stay
    zero: the error feedback never moves them."""
    W = weight.detach().double().clone()
    n, k = W.shape
    pruned = W == 0
    Hinv, dead = inverse_hessian_factor(hessian, damp)
    W[:, dead] = 0.0

    groups = config.num_groups(k)
    gs = k // groups
    lo, hi = config.qrange()
    channel = QuantConfig(config.bits, config.scheme, "tensor" if config.granularity == "tensor" else "channel")
    Q = torch.zeros(n, k, dtype=torch.float64)
    scales = torch.zeros(n if config.granularity != "tensor" else 1, groups, dtype=torch.float32)
    zps = torch.zeros_like(scales, dtype=torch.int32) if config.scheme == "asym" else None
    scale = zp = None

    def round_column(col: int, w: torch.Tensor, ahead) -> torch.Tensor:
        nonlocal scale, zp
        if col % gs == 0:
            # Parameters of the group from its columns as updated so far.
            ref = quantize(ahead(gs).float(), channel)
            scale, zp = ref.scale[:, 0].double(), (None if ref.zero_point is None else ref.zero_point[:, 0].double())
            scales[:, col // gs] = ref.scale[:, 0]
            if zps is not None:
                zps[:, col // gs] = ref.zero_point[:, 0]
        offset = 0 if zp is None else zp
        q = torch.clamp(torch.round(w / scale) + offset, lo, hi)
        Q[:, col] = q
        return (q - offset) * scale

    gptq_sweep(W, Hinv, round_column, pruned)
    qdtype = torch.int8 if config.scheme == "sym" else torch.uint8
    return QuantizedTensor(Q.to(qdtype), scales, zps, config.bits, config.scheme, config.granularity, gs)


@register_method("gptq", needs_calibration=True, collect=_collect_hessian)
def gptq(weight: torch.Tensor, cfg, stats) -> tuple[QuantizedTensor, None]:
    return gptq_quantize(weight, stats.hessian, cfg.quant_config()), None
