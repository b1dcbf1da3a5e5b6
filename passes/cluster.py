"""``cluster``: weight clustering. Each block of a weight (the whole tensor,
an output row, or ``group_size`` columns of a row) takes its values from a
k-means codebook of ``2^bits`` entries; the graph stores ``uint8`` indices
and the codebooks and decodes the float weight from them."""

from __future__ import annotations

import torch
import torch.fx as fx

from .base import Option, PassResult
from .layers import Layer, LayerFilterOptions
from .registry import register_pass

aten = torch.ops.aten


def kmeans_codebook(weight: torch.Tensor, bits: int, granularity: str = "channel", group_size: int = 128,
                    iterations: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices uint8 [N, K], codebook float32 [blocks, 2^bits])`` with
    ``codebook[block_of(i, j), indices[i, j]] ~= weight[i, j]``: Lloyd's
    k-means in one dimension per block, started from the block's min-max
    uniform grid (deterministic), minimising the squared weight error. Blocks are numbered
    row-major: ``block_of(i, j) = i * groups + j // group_size`` (one block for
    ``tensor``, ``groups = 1`` for ``channel``)."""
    n, k = weight.shape
    w = weight.detach().float()
    if granularity == "tensor":
        blocks = w.reshape(1, -1)
    elif granularity == "channel":
        blocks = w
    else:
        if k % group_size:
            raise ValueError(f"group size {group_size} does not divide the input dimension K={k}")
        blocks = w.reshape(n * (k // group_size), group_size)
    levels = 2**bits
    # Started from the min-max grid round-to-nearest uses: each Lloyd step can
    # only lower the squared error, so the result is never worse than that grid.
    lo, hi = blocks.amin(1, keepdim=True), blocks.amax(1, keepdim=True)
    centroids = lo + (hi - lo) * torch.linspace(0, 1, levels)[None, :]  # [B, levels]
    for _ in range(iterations):
        centroids = centroids.sort(dim=1).values
        mids = (centroids[:, 1:] + centroids[:, :-1]) / 2
        assign = torch.searchsorted(mids.contiguous(), blocks.contiguous())
        sums = torch.zeros_like(centroids).scatter_add_(1, assign, blocks)
        counts = torch.zeros_like(centroids).scatter_add_(1, assign, torch.ones_like(blocks))
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    centroids = centroids.sort(dim=1).values
    mids = (centroids[:, 1:] + centroids[:, :-1]) / 2
    assign = torch.searchsorted(mids.contiguous(), blocks.contiguous())
    return assign.reshape(n, k).to(torch.uint8), centroids


def decode(indices: torch.Tensor, codebook: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """The float weight the indices and codebook stand for."""
    n, k = indices.shape
    per = 1 if granularity == "tensor" else (k // group_size if granularity == "group" else 1)
    block = torch.zeros(n, k, dtype=torch.long) if granularity == "tensor" else (
        torch.arange(n)[:, None] * per + (torch.arange(k)[None, :] // group_size if granularity == "group" else 0))
    return codebook[block, indices.long()]


@register_pass("cluster")
class Cluster(LayerFilterOptions):
    """Replaces the weights of ``aten.linear`` layers by k-means codebooks.

    Matches: the layers ``quantize`` would select with the same filters
    (``include``, ``exclude``, ``min_size``, ``skip_lm_head``).

    Produces, per layer, ``uint8`` indices ``[N, K]`` and a float32 codebook
    ``[blocks * 2^bits, 1]`` (a codebook per tensor, output row, or group of
    ``group_size`` columns), and the decode ``embedding(codebook, indices +
    block offset)`` feeding the linear: decoded at every call on eager; on
    ONNX Runtime the decode reads only constants, so it is folded to a float
    weight before the run (by the exporter's optimizer for small layers,
    which then stores the float weight in the file; by ONNX Runtime when it
    loads the model otherwise). ``constant-fold`` after this pass would undo it.

    Stats: per layer ``rel_err`` (relative weight error) and ``bytes`` stored
    (indices at one byte each plus codebooks).

    Refuses: a group size that does not divide a selected layer's K (names
    the layer); filters that match no layer.
    """

    bits = Option(4, int, check=lambda v: None if 2 <= v <= 8 else "bits must be from 2 to 8", help="codebook of 2^bits entries")
    granularity = Option("channel", str, choices=("tensor", "channel", "group"), help="a codebook per tensor, output row or group")
    group_size = Option(128, int, check=lambda v: None if v >= 1 else "must be >= 1", help="columns per codebook (granularity=group)")
    iterations = Option(20, int, check=lambda v: None if v >= 1 else "must be >= 1", help="k-means (Lloyd) iterations")

    runs_after = ("canonicalize", "prune", "shrink", "constant-fold")
    runs_before = ("quantize",)
    requires = ("canonical-linear",)

    def validate_options(self) -> None:
        self.numerics_tolerance = min(1.0, 16.0 * 2.0**-self.bits)

    def run(self, graph) -> PassResult:
        selection = self.select_layers(graph)
        layers, skipped = selection.selected, selection.skipped
        if self.granularity == "group":
            for layer in layers:
                if layer.weight.shape[1] % self.group_size:
                    raise self.fail(f"layer {layer.name!r} (weight {tuple(layer.weight.shape)}): group size {self.group_size} does not "
                                    f"divide K={layer.weight.shape[1]}; leave it out (exclude=..., min_size=...)", layer.node)
        done: dict[int, tuple[fx.Node, dict]] = {}  # a weight read by several layers is clustered once
        per_layer = {}
        for layer in layers:
            self.current_node = layer.node
            if id(layer.weight) not in done:
                done[id(layer.weight)] = self._cluster(graph, layer)
            decoded, record = done[id(layer.weight)]
            layer.node.replace_input_with(layer.weight_node, decoded)
            if not layer.weight_node.users:
                graph.fx.erase_node(layer.weight_node)
            per_layer[layer.name] = record
        self.current_node = None
        return PassResult(bool(per_layer), {"clustered": len(per_layer), "skipped": skipped, "layers": per_layer})

    def _cluster(self, graph, layer: Layer) -> tuple[fx.Node, dict]:
        w = layer.weight
        n, k = w.shape
        indices, codebook = kmeans_codebook(w, self.bits, self.granularity, self.group_size, self.iterations)
        groups = k // self.group_size if self.granularity == "group" else 1
        levels = 2**self.bits
        # Offset of each index into the flat codebook: block * levels, per row and group.
        if self.granularity == "tensor":
            offsets = torch.zeros(1, 1, 1, dtype=torch.int64)
        else:
            offsets = (torch.arange(n * groups, dtype=torch.int64) * levels).reshape(n, groups, 1)
        name = layer.name
        idx = graph.add_constant(indices, f"{name}.indices")
        book = graph.add_constant(codebook.reshape(-1, 1).to(w.dtype), f"{name}.codebook")
        off = graph.add_constant(offsets, f"{name}.codebook_offsets")
        call = graph.fx.call_function
        with graph.fx.inserting_before(layer.node):
            i = call(aten._to_copy.default, (idx,), {"dtype": torch.int64})
            i = call(aten.view.default, (i, [n, groups, k // groups]))
            i = call(aten.add.Tensor, (i, off))
            rows = call(aten.embedding.default, (book, i))  # [n, groups, k/groups, 1]
            decoded = call(aten.view.default, (rows, [n, k]))
        approx = decode(indices, codebook, self.granularity, self.group_size)
        rel = ((approx - w.float()).norm() / w.float().norm().clamp(min=1e-30)).item()
        stored = indices.numel() + codebook.numel() * w.element_size() + (offsets.numel() * 8)
        return decoded, {"bits": self.bits, "granularity": self.granularity, "rel_err": round(rel, 6), "bytes": stored}
