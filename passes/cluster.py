"""``cluster``: weight clustering. Each block of a weight (the whole tensor,
an output row, or ``group_size`` columns of a row) takes its values from a
k-means codebook of ``2^bits`` entries; the graph stores ``uint8`` indices
and the codebooks and decodes the float weight from them
(``fxopt.codebook_weight``), or runs the codebooks snapped onto
MatMulNBits' uniform grid (``lowering=nbits``)."""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..ir.ops_codebook import decode_codebook
from ..ir.quant import QuantizedTensor, relative_error
from .base import Option, OptionError, PassResult
from .layers import Layer, LayerFilterOptions
from .quantize.calibration import collect_linear_stats, pooled
from .quantize.config import LayerConfig
from .quantize.lowering import lower_weight_only
from .quantize.methods import GPTQ_DAMP, gptq_sweep, inverse_hessian_factor
from .registry import register_pass

aten = torch.ops.aten


def kmeans_codebook(weight: torch.Tensor, bits: int, granularity: str = "channel", group_size: int = 128,
                    iterations: int = 20, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices uint8 [N, K], codebook float32 [blocks, 2^bits])`` with
    ``codebook[block_of(i, j), indices[i, j]] ~= weight[i, j]``: Lloyd's
    k-means in one dimension per block, started from the block's min-max
    uniform grid (deterministic), minimising the squared weight error, each
    weight's term scaled by ``importance[j]`` of its input column when given
    (``E[x_j^2]``: the output error of a linear whose weights are independent
    errors). Blocks are numbered
    row-major: ``block_of(i, j) = i * groups + j // group_size`` (one block for
    ``tensor``, ``groups = 1`` for ``channel``)."""
    n, k = weight.shape
    w = weight.detach().float()
    h = torch.ones(k) if importance is None else importance.detach().float().reshape(k)
    if not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
        raise ValueError("importance must be finite and >= 0 in every input column")
    h = h.expand(n, k)
    if granularity == "tensor":
        blocks, h = w.reshape(1, -1), h.reshape(1, -1)
    elif granularity == "channel":
        blocks = w
    else:
        if k % group_size:
            raise ValueError(f"group size {group_size} does not divide the input dimension K={k}")
        blocks, h = w.reshape(n * (k // group_size), group_size), h.reshape(n * (k // group_size), group_size)
    levels = 2**bits
    # Started from the min-max grid round-to-nearest uses: each Lloyd step can
    # only lower the (weighted) squared error, so the result is never worse
    # than that grid. The weights leave the nearest centroid unchanged; they
    # move each centroid to its members' weighted mean.
    lo, hi = blocks.amin(1, keepdim=True), blocks.amax(1, keepdim=True)
    centroids = lo + (hi - lo) * torch.linspace(0, 1, levels)[None, :]  # [B, levels]
    for _ in range(iterations):
        centroids = centroids.sort(dim=1).values
        mids = (centroids[:, 1:] + centroids[:, :-1]) / 2
        assign = torch.searchsorted(mids.contiguous(), blocks.contiguous())
        sums = torch.zeros_like(centroids).scatter_add_(1, assign, blocks * h)
        mass = torch.zeros_like(centroids).scatter_add_(1, assign, h.contiguous())
        centroids = torch.where(mass > 0, sums / mass.clamp(min=torch.finfo(mass.dtype).tiny), centroids)
    centroids = centroids.sort(dim=1).values
    mids = (centroids[:, 1:] + centroids[:, :-1]) / 2
    assign = torch.searchsorted(mids.contiguous(), blocks.contiguous())
    return assign.reshape(n, k).to(torch.uint8), centroids


def gptq_assign(weight: torch.Tensor, codebook: torch.Tensor, granularity: str, group_size: int,
                hessian: torch.Tensor, damp: float = GPTQ_DAMP) -> torch.Tensor:
    """Indices ``uint8 [N, K]`` into ``codebook`` (sorted rows, as
    :func:`kmeans_codebook` returns it) chosen column by column with GPTQ's
    error feedback: each column takes its nearest entries, and its error is
    spread over the columns not yet assigned through the inverse of the
    calibration inputs' ``hessian = X^T X / rows`` (the one-dimensional case of
    GPTVQ, van Baalen et al. 2024). The columns left compensate what the
    codebook could not represent, which lowers the error of ``x W^T`` rather
    than of ``W``. Weights that are exactly zero (pruned) stay zero through
    the feedback and take the entry nearest zero, as the nearest assignment
    gives them; an input column the calibration never saw non-zero takes its
    nearest entries (no error flows into or out of it)."""
    W = weight.detach().double().clone()
    n, k = W.shape
    pruned = W == 0
    Hinv, _ = inverse_hessian_factor(hessian, damp)
    books = codebook.double()
    if granularity == "tensor":
        books = books.expand(n, -1)[:, None, :]
    elif granularity == "channel":
        books = books[:, None, :]
    else:
        books = books.reshape(n, k // group_size, -1)
    width = k // books.shape[1]  # columns per codebook
    mids = (books[..., 1:] + books[..., :-1]) / 2
    indices = torch.zeros(n, k, dtype=torch.long)

    def nearest_entry(col: int, w: torch.Tensor, ahead) -> torch.Tensor:
        book, mid = books[:, col // width], mids[:, col // width]
        q = torch.searchsorted(mid.contiguous(), w[:, None].contiguous())
        indices[:, col] = q[:, 0]
        return book.gather(1, q)[:, 0]

    gptq_sweep(W, Hinv, nearest_entry, pruned)
    return indices.to(torch.uint8)


def codebook_group(shape, granularity: str, group_size: int) -> int:
    """Consecutive weights (row-major) that share one codebook row."""
    n, k = shape
    return {"tensor": n * k, "channel": k, "group": group_size}[granularity]


def decode(indices: torch.Tensor, codebook: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """The float weight the indices and codebook stand for."""
    return decode_codebook(indices, codebook, codebook_group(indices.shape, granularity, group_size))


def snap_to_grid(weight: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor, group: int, bits: int,
                 block: int) -> QuantizedTensor:
    """The codebooks snapped onto the uniform grid of MatMulNBits: per block of
    ``block`` columns of a row, ``scale * (q - zero_point)`` with integer codes
    ``q`` in ``0 .. 2^bits - 1``. The grid is fitted to the block's decoded
    weights by least squares, each codebook entry keeping its rank (entry
    ``j`` of ``L`` sits at code ``round(j * (2^bits - 1) / (L - 1))``), with
    an integer zero point; each weight then takes the grid point nearest to it
    (never farther than its entry's code). ``group`` (weights per codebook row)
    must be a multiple of ``block`` or ``block`` of it within a row."""
    n, k = weight.shape
    top = 2**bits - 1
    levels = codebook.shape[1]
    rank_code = torch.round(torch.arange(levels, dtype=torch.float32) * top / max(levels - 1, 1))
    decoded = decode_codebook(indices, codebook.float(), group).reshape(-1, block)
    x = rank_code[indices.long()].reshape(-1, block)
    xm, ym = x.mean(1, keepdim=True), decoded.mean(1, keepdim=True)
    var = ((x - xm) ** 2).sum(1, keepdim=True)
    slope = torch.where(var > 0, ((x - xm) * (decoded - ym)).sum(1, keepdim=True) / var.clamp(min=1e-30), torch.zeros_like(var))
    zero = torch.where(slope > 0, torch.clamp(torch.round(xm - ym / slope.clamp(min=1e-30)), 0, top), torch.zeros_like(slope))
    # the slope again with the zero point an integer: least squares through (zero, 0)
    d = x - zero
    den = (d * d).sum(1, keepdim=True)
    scale = torch.where(den > 0, (d * decoded).sum(1, keepdim=True) / den.clamp(min=1e-30), torch.zeros_like(den))
    # A block with one value (or a degenerate fit): a grid through 0 that holds it.
    flat = decoded.abs().amax(1, keepdim=True)
    bad = scale <= 0
    zero = torch.where(bad & (ym < 0), torch.full_like(zero, top), torch.where(bad, torch.zeros_like(zero), zero))
    scale = torch.where(bad, torch.where(flat > 0, flat, torch.ones_like(flat)), scale)
    w = weight.detach().float().reshape(-1, block)
    q = torch.clamp(torch.round(w / scale) + zero, 0, top)
    return QuantizedTensor(q.to(torch.uint8).reshape(n, k), scale.reshape(n, k // block), zero.to(torch.int32).reshape(n, k // block),
                           bits, "asym", "group", block)


def nbits_block(k: int, group: int) -> int:
    """The MatMulNBits block for a codebook group of ``group`` weights in rows
    of ``k``: the largest power of two >= 16 that divides both (0: none)."""
    g = math.gcd(k, group)
    block = g & -g
    return block if block >= 16 else 0


@register_pass("cluster")
class Cluster(LayerFilterOptions):
    """Replaces the weights of ``aten.linear`` layers by k-means codebooks.

    Matches: the layers ``quantize`` would select with the same filters
    (``include``, ``exclude``, ``min_size``, ``skip_lm_head``, ``skip_router``).

    Produces, per layer, ``uint8`` indices ``[N, K]`` and a codebook of
    ``2^bits`` entries per tensor, output row, or group of ``group_size``
    columns, in the form ``lowering`` names (docs/pruning.md compares them):

    * ``decode`` (default): ``fxopt.codebook_weight(indices, codebook,
      decode="load")`` feeding the linear. The ONNX file stores indices and
      codebooks; ONNX Runtime decodes them into a float weight when it loads
      the model and runs its float GEMM (eager decodes once, too).
    * ``gather``: the same with ``decode="call"``: the weight is gathered
      from the codebook at every call, so the running model holds one byte
      per weight (slower; for memory-bound deployments).
    * ``nbits``: the codebooks snapped onto MatMulNBits' uniform grid
      (:func:`snap_to_grid`; 4-bit codes for ``bits`` <= 4, else 8-bit) and
      run by ``fxopt.linear_nbits``: half a byte per weight in the file and in
      memory, the int4 kernel's speed, the grid's accuracy.

    ``weighting=activation`` (needs ``calibration_data``) fits each codebook to
    the layer's output rather than its weights: each weight's squared error
    counts ``E[x_j^2]`` of its input column on the calibration inputs (the
    diagonal of ``X^T X``, the layer's own Hessian, where SqueezeLLM's
    sensitivity-weighted k-means weighs by the loss's Fisher information), so
    the entries sit where the large inputs' weights are.

    ``assign=gptq`` (needs ``calibration_data``) keeps the codebooks and
    chooses each weight's entry column by column, the error of each column
    fed into the columns after it through the inverse of ``X^T X``
    (:func:`gptq_assign`): the layer's output error falls where the nearest
    entry alone leaves it.

    Stats: per layer ``rel_err`` (relative weight error of what the graph
    holds), ``kmeans_rel_err`` (of the codebook before snapping, ``nbits``)
    and ``bytes`` stored.

    Refuses: a group size that does not divide a selected layer's K, and for
    ``nbits`` a layer without a MatMulNBits block (a power of two >= 16
    dividing K and the group size); names the layer. Filters that match no
    layer. ``assign=gptq`` with ``lowering=nbits`` (the snap to the grid
    would choose every entry again), and either calibrated option without
    ``calibration_data``.
    """

    bits = Option(4, int, check=lambda v: None if 2 <= v <= 8 else "bits must be from 2 to 8", help="codebook of 2^bits entries")
    granularity = Option("channel", str, choices=("tensor", "channel", "group"), help="a codebook per tensor, output row or group")
    group_size = Option(128, int, check=lambda v: None if v >= 1 else "must be >= 1", help="columns per codebook (granularity=group)")
    iterations = Option(20, int, check=lambda v: None if v >= 1 else "must be >= 1", help="k-means (Lloyd) iterations")
    lowering = Option("decode", str, choices=("decode", "gather", "nbits"),
                      help="decode: indices decoded to float at load; gather: at every call; nbits: snapped to MatMulNBits' grid")
    accuracy_level = Option(4, int, choices=(0, 1, 2, 3, 4), help="lowering=nbits: MatMulNBits accuracy level (4: int8 compute)")
    weighting = Option("none", str, choices=("none", "activation"),
                       help="activation: each weight's error weighted by its input's mean square on calibration_data")
    assign = Option("nearest", str, choices=("nearest", "gptq"),
                    help="gptq: entries chosen column by column with GPTQ's error feedback on calibration_data")

    runs_after = ("canonicalize", "prune", "shrink", "constant-fold")
    runs_before = ("quantize",)
    requires = ("canonical-linear",)

    def validate_options(self) -> None:
        self.numerics_tolerance = min(1.0, 16.0 * 2.0**-self.bits)
        if self.assign == "gptq" and self.lowering == "nbits":
            # snapping puts each weight on the grid point nearest to it, which undoes GPTQ's choices
            raise OptionError("pass 'cluster': assign=gptq chooses codebook entries, which lowering=nbits replaces by the "
                              "uniform grid; for GPTQ on MatMulNBits' grid use quantize(bits=4,method=gptq)")

    def required_inputs(self) -> tuple[str, ...]:
        return ("calibration_data",) if self.weighting == "activation" or self.assign == "gptq" else ()

    def run(self, graph) -> PassResult:
        selection = self.select_layers(graph)
        layers, skipped = selection.selected, selection.skipped
        for layer in layers:
            n, k = layer.weight.shape
            if self.granularity == "group" and k % self.group_size:
                raise self.fail(f"layer {layer.name!r} (weight {(n, k)}): group size {self.group_size} does not "
                                f"divide K={k}; leave it out (exclude=..., min_size=...)", layer.node)
            if self.lowering == "nbits" and not nbits_block(k, codebook_group((n, k), self.granularity, self.group_size)):
                raise self.fail(f"layer {layer.name!r} (weight {(n, k)}): lowering=nbits needs a MatMulNBits block, a power of two "
                                f">= 16 dividing K={k} and the codebook's columns; use lowering=decode or leave it out", layer.node)
        inputs = self._input_statistics(graph, layers)
        done: dict[int, tuple[fx.Node, dict]] = {}  # a weight read by several layers is clustered once
        per_layer = {}
        for layer in layers:
            self.current_node = layer.node
            if self.lowering == "nbits":
                with graph.fx.inserting_before(layer.node):
                    new, per_layer[layer.name] = self._snapped(graph, layer, inputs.get(id(layer.weight)))
                new.meta.update({key: v for key, v in layer.node.meta.items() if key != "val"})
                layer.node.replace_all_uses_with(new)
                graph.fx.erase_node(layer.node)
            else:
                if id(layer.weight) not in done:
                    done[id(layer.weight)] = self._codebook(graph, layer, inputs.get(id(layer.weight)))
                decoded, per_layer[layer.name] = done[id(layer.weight)]
                layer.node.replace_input_with(layer.weight_node, decoded)
            if not layer.weight_node.users:
                graph.fx.erase_node(layer.weight_node)
        self.current_node = None
        return PassResult(bool(per_layer), {"clustered": len(per_layer), "skipped": skipped, "layers": per_layer})

    def _input_statistics(self, graph, layers: list[Layer]) -> dict[int, torch.Tensor]:
        """Per weight (by identity), ``X^T X / rows`` of its input over every
        call of every layer that reads it on the calibration data (only its
        diagonal, ``E[x_j^2]``, unless ``assign=gptq``)."""
        if (self.weighting, self.assign) == ("none", "nearest") or not layers:
            return {}
        full = self.assign == "gptq"
        stats = collect_linear_stats(graph, self.context.get("calibration_data"), [l.node for l in layers], hessian=full,
                                     progress=self.progress)
        calls: dict[int, list] = {}
        for layer in layers:
            calls.setdefault(id(layer.weight), []).append(stats[layer.node.name])
        return {key: pooled(group, "hessian" if full else "sq_mean") for key, group in calls.items()}

    def _kmeans(self, layer: Layer, second: torch.Tensor | None):
        w = layer.weight
        importance = None
        if second is not None and self.weighting == "activation":
            importance = (second.diagonal() if second.dim() == 2 else second).float()
        indices, codebook = kmeans_codebook(w, self.bits, self.granularity, self.group_size, self.iterations, importance)
        if self.assign == "gptq":
            indices = gptq_assign(w, codebook, self.granularity, self.group_size, second)
        group = codebook_group(w.shape, self.granularity, self.group_size)
        return indices, codebook, group, relative_error(w, decode_codebook(indices, codebook, group))

    def _codebook(self, graph, layer: Layer, second: torch.Tensor | None) -> tuple[fx.Node, dict]:
        indices, codebook, group, rel = self._kmeans(layer, second)
        w = layer.weight
        idx = graph.add_constant(indices, f"{layer.name}.indices")
        book = graph.add_constant(codebook.to(w.dtype), f"{layer.name}.codebook")
        decode = "load" if self.lowering == "decode" else "call"
        with graph.fx.inserting_before(layer.node):
            decoded = graph.fx.call_function(torch.ops.fxopt.codebook_weight.default, (idx, book, group, decode))
        stored = indices.numel() + codebook.numel() * w.element_size()
        return decoded, {"bits": self.bits, "granularity": self.granularity, "rel_err": round(rel, 6), "bytes": stored}

    def _snapped(self, graph, layer: Layer, second: torch.Tensor | None) -> tuple[fx.Node, dict]:
        indices, codebook, group, rel = self._kmeans(layer, second)
        grid_bits = 4 if self.bits <= 4 else 8
        block = nbits_block(layer.weight.shape[1], group)
        qt = snap_to_grid(layer.weight, indices, codebook, group, grid_bits, block)
        layer.cfg = LayerConfig(grid_bits, "asym", "group", block, "weight-only", "rtn", self.accuracy_level)
        node = lower_weight_only(self, graph, layer, qt, None)
        return node, {"bits": self.bits, "granularity": self.granularity, "rel_err": round(relative_error(layer.weight, qt.dequantize()), 6),
                      "kmeans_rel_err": round(rel, 6), "bytes": qt.nbytes()}
