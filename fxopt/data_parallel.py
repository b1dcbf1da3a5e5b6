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


ALIGN = 16  # bytes: the largest element size (complex128)


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
        dim = self.batch_dim
        if x.dim() <= dim:
            raise DataParallelError(f"output #{index} has {x.dim()} dims, no batch dimension {dim} to gather along")
        if x.shape[dim] != max(sizes[self.rank], 1):
            raise DataParallelError(f"output #{index} has {x.shape[dim]} rows along dimension {dim} for an input part of "
                                    f"{sizes[self.rank]}: not split by batch; give DataParallel the batch_dim of the outputs")
        x = x.narrow(dim, 0, sizes[self.rank]) if sizes[self.rank] else x.narrow(dim, 0, 0)
        try:
            parts = self._gather_padded(x, dim, max(max(sizes), 1))
        except RuntimeError as e:
            raise CollectiveError(f"data-parallel gather of output #{index}", self.group, e) from e
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim)

    def _gather_padded(self, x: torch.Tensor, dim: int, longest: int) -> list:
        """Every rank's ``x`` in rank order, each padded with zeros to
        ``longest`` along ``dim`` so that one all-gather carries them."""
        import torch.distributed as dist

        pad = list(x.shape)
        pad[dim] = longest - x.shape[dim]
        padded = (torch.cat([x, x.new_zeros(pad)], dim) if pad[dim] else x).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        return parts

    # -- a stream of requests --------------------------------------------------------
    def map(self, requests: list, *, to: str | int = "all") -> list:
        """Every request's output, in order: request ``j`` runs on the rank
        whose contiguous part of ``range(len(requests))`` holds it. A request
        is a tuple of positional inputs, a dict of keyword inputs, or a single
        input; requests may differ in shape (each rank runs its own one by one).

        ``to`` says which ranks receive the outputs: ``"all"`` (every rank
        returns every output), a rank of the group (it returns every output;
        the others return their own, ``None`` in the other places), or
        ``"none"`` (each rank returns its own outputs, ``None`` elsewhere: a
        server whose ranks answer their own requests moves no output at all).
        Tensors travel as one byte buffer per rank through ``all_gather`` /
        ``gather``, not pickled; the outputs' structure, shapes and any
        non-tensor values travel pickled, which is small."""
        if not (to in ("all", "none") or (isinstance(to, int) and not isinstance(to, bool) and 0 <= to < self.size)):
            raise DataParallelError(f"map(to={to!r}): 'all', 'none' or a rank of the group (0 to {self.size - 1})")
        from .ir.trace import split_inputs

        parts = torch.arange(len(requests)).tensor_split(self.size)
        mine = parts[self.rank].tolist()
        outputs = []
        with torch.inference_mode():
            for j in mine:
                args, kwargs = split_inputs(requests[j])
                outputs.append(self.model(*args, **kwargs))
        result: list = [None] * len(requests)
        for j, out in zip(mine, outputs):
            result[j] = out
        if to == "none":
            return result
        received = self._exchange(outputs, to)
        if received is not None:
            for rank, rank_outputs in enumerate(received):
                for j, out in zip(parts[rank].tolist(), rank_outputs or ()):
                    result[j] = out
        return result

    def _exchange(self, outputs: list, to: str | int) -> list | None:
        """Every other rank's ``outputs`` (in rank order, ``None`` in this
        rank's place) on the ranks that ``to`` names, ``None`` on the others.

        Each rank packs its tensors into one byte buffer that it keeps from
        call to call, and a receiving rank gathers its own part into a second
        kept buffer: a fresh buffer of a batch's logits would cost more in
        first-touch page faults than the copy itself. Only the other ranks'
        parts are new memory, and the outputs returned are views of them."""
        import torch.distributed as dist

        leaves, spec = pytree.tree_flatten(outputs)
        tensors = [x.detach() for x in leaves if isinstance(x, torch.Tensor)]
        layout = (spec, [(x.dtype, tuple(x.shape)) if isinstance(x, torch.Tensor) else ("value", x) for x in leaves])
        # each tensor starts at a multiple of ALIGN bytes, where any dtype can view it
        sizes = [t.numel() * t.element_size() for t in tensors]
        nbytes = sum(n + (-n % ALIGN) for n in sizes)
        layouts: list = [None] * self.size
        try:
            dist.all_gather_object(layouts, (layout, nbytes), group=self.group)
            longest = max(n for _, n in layouts)
            device = tensors[0].device if tensors else torch.device("cpu")  # NCCL gathers CUDA buffers
            send = self._kept("_send", longest, device)
            at = 0
            for t, n in zip(tensors, sizes):
                send[at:at + n].view(t.dtype).view(t.shape).copy_(t)
                at += n + (-n % ALIGN)
            send[at:].zero_()
            receives = to == "all" or to == self.rank
            parts = ([self._kept("_own", longest, device) if r == self.rank
                      else torch.empty(longest, dtype=torch.uint8, device=device) for r in range(self.size)]
                     if receives else None)
            if to == "all":
                dist.all_gather(parts, send, group=self.group)
            else:
                dist.gather(send, parts, dst=dist.get_global_rank(self.group, to), group=self.group)
        except RuntimeError as e:
            raise CollectiveError("data-parallel gather of the requests' outputs", self.group, e) from e
        if not receives:
            return None
        return [None if r == self.rank else _unpack(rank_layout, data)
                for r, ((rank_layout, _), data) in enumerate(zip(layouts, parts))]

    def _kept(self, name: str, nbytes: int, device: torch.device) -> torch.Tensor:
        """A byte buffer of this object's on ``device``, ``nbytes`` long,
        grown (never shrunk) to the largest exchange so far."""
        buffer = getattr(self, name, None)
        if buffer is None or buffer.numel() < nbytes or buffer.device != device:
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
            setattr(self, name, buffer)
        return buffer[:nbytes]


def _unpack(layout, data: torch.Tensor):
    """The outputs one rank packed: tensors as views of ``data``."""
    spec, entries = layout
    leaves, at = [], 0
    for kind, what in entries:
        if kind == "value":
            leaves.append(what)
            continue
        count = 1
        for d in what:
            count *= d
        size = count * kind.itemsize
        leaves.append(data[at:at + size].view(kind).reshape(what))
        at += size + (-size % ALIGN)
    return pytree.tree_unflatten(leaves, spec)
