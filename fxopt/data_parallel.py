"""Data parallelism: a batch, or a stream of requests, split across the ranks
of a process group that each hold a replica of the model (or, on a 2-D mesh,
the same tensor-parallel shard of one), the results gathered in order.

    model = fxopt.compile(graph, "onnxruntime")           # or a rank graph's
    dp = DataParallel(model, mesh.dp_group)
    logits = dp(input_ids)                # every rank: the whole batch's logits
    outputs = dp.map(requests)            # every rank: every request's output, in order

Every rank calls with the same inputs (the program runs the same on every
rank, as under torchrun); rank ``i`` of ``n`` computes the ``i``-th of the
``n`` nearly equal parts (``torch.tensor_split``: the first ``B % n`` parts
have one row more), so an uneven last split costs at most one row.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from .backends import CollectiveError


class DataParallelError(RuntimeError):
    pass


class DataParallel:
    """``model`` (any callable: a compiled fxopt model, a rank model, a
    ``torch.nn.Module``) run on this rank's part of each batch. ``group``:
    the data-parallel process group (default: all ranks). ``batch_dim``: the
    dimension of the inputs and outputs that holds the batch; input tensors
    whose size there is not the batch's (shared tables, scalars) go whole to
    every rank."""

    def __init__(self, model, group=None, *, batch_dim: int = 0):
        import torch.distributed as dist

        if not dist.is_initialized():
            from .launch import how_to_launch

            raise DataParallelError(f"data parallelism needs a process group; {how_to_launch()}")
        self.model = model
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self.batch_dim = batch_dim

    # -- one batch ---------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        batch = next((x.shape[self.batch_dim] for x in leaves if isinstance(x, torch.Tensor) and x.dim() > self.batch_dim), None)
        if batch is None:
            raise DataParallelError(f"no input tensor has a batch dimension {self.batch_dim} to split")
        sizes = [len(part) for part in torch.arange(batch).tensor_split(self.size)]
        start = sum(sizes[: self.rank])
        # A rank with no rows (batch smaller than the group) runs one row and
        # contributes none, so that it still knows the outputs' shapes.
        take = max(sizes[self.rank], 1) if batch else 0
        first = min(start, max(batch - 1, 0))
        mine = [x.narrow(self.batch_dim, first, take) if self._batched(x, batch) else x for x in leaves]
        local_args, local_kwargs = pytree.tree_unflatten(mine, spec)
        out = self.model(*local_args, **local_kwargs)
        flat, out_spec = pytree.tree_flatten(out)
        gathered = [self._gather(x, sizes, i) if isinstance(x, torch.Tensor) else x for i, x in enumerate(flat)]
        return pytree.tree_unflatten(gathered, out_spec)

    def _batched(self, x, batch: int) -> bool:
        return isinstance(x, torch.Tensor) and x.dim() > self.batch_dim and x.shape[self.batch_dim] == batch

    def _gather(self, x: torch.Tensor, sizes: list[int], index: int) -> torch.Tensor:
        """The ranks' parts of output ``index`` joined in rank order; each part
        padded to the largest so that one all-gather carries them."""
        import torch.distributed as dist

        dim = self.batch_dim
        if x.dim() <= dim:
            raise DataParallelError(f"output #{index} has {x.dim()} dims, no batch dimension {dim} to gather along")
        if x.shape[dim] != max(sizes[self.rank], 1):
            raise DataParallelError(f"output #{index} has {x.shape[dim]} rows along dimension {dim} for an input part of "
                                    f"{sizes[self.rank]}: not split by batch; give DataParallel the batch_dim of the outputs")
        longest = max(max(sizes), 1)
        x = x.narrow(dim, 0, sizes[self.rank]) if sizes[self.rank] else x.narrow(dim, 0, 0)
        pad = list(x.shape)
        pad[dim] = longest - x.shape[dim]
        padded = torch.cat([x, x.new_zeros(pad)], dim).contiguous() if pad[dim] else x.contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        try:
            dist.all_gather(parts, padded, group=self.group)
        except RuntimeError as e:
            raise CollectiveError(f"data-parallel gather of output #{index}", self.group, e) from e
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim)

    # -- a stream of requests --------------------------------------------------------
    def map(self, requests: list) -> list:
        """Every request's output, in order: request ``j`` runs on the rank
        whose contiguous part of ``range(len(requests))`` holds it. A request
        is a tuple of positional inputs, a dict of keyword inputs, or a single
        input. Requests may differ in shape (each rank runs its own one by
        one); outputs travel pickled (``all_gather_object``)."""
        import torch.distributed as dist

        from .ir.trace import split_inputs

        parts = torch.arange(len(requests)).tensor_split(self.size)
        outputs = []
        with torch.inference_mode():
            for j in parts[self.rank].tolist():
                args, kwargs = split_inputs(requests[j])
                outputs.append(self.model(*args, **kwargs))
        everyone: list = [None] * self.size
        try:
            dist.all_gather_object(everyone, outputs, group=self.group)
        except RuntimeError as e:
            raise CollectiveError("data-parallel gather of the requests' outputs", self.group, e) from e
        return [out for rank_outputs in everyone for out in rank_outputs]
