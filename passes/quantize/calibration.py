"""Calibration: run a graph on sample inputs and record what flows into its
linear layers.

Static activation quantization needs a fixed range for each linear's input;
SmoothQuant and AWQ need the per-input-channel magnitude of that input; GPTQ
needs its second moment ``X^T X``. All of them come from one walk over a
calibration set::

    stats = collect_linear_stats(graph, calibration_data, observer="percentile", percentile=99.99)
    lo, hi = stats["linear_3"].observer.range()

``calibration_data`` is a list of model inputs in the form the model was traced
with (a tensor, a tuple of positional inputs or a dict of keyword inputs) —
the same list a user gives as ``PassManager(..., calibration_data=[...])``.

The graph is run by a :class:`torch.fx.Interpreter` that looks at the inputs of
the chosen nodes as they are computed; the graph itself is never changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

from ...ir.trace import split_inputs

aten = torch.ops.aten


class CalibrationError(ValueError):
    pass


# --------------------------------------------------------------------------
# observers: each sees a stream of tensors and answers with a (min, max) range


class Observer:
    """Tracks the range of the values it is shown."""

    name = ""

    def __init__(self):
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if x.numel() == 0:
            return
        self._update(x)
        self.batches += 1

    def _update(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def range(self) -> tuple[float, float]:
        """``(lo, hi)`` with ``lo <= 0 <= hi``: zero must stay exactly
        representable (padding, ReLU outputs), as in every int8 scheme."""
        if self.batches == 0:
            raise CalibrationError(f"{self.name} observer saw no data")
        lo, hi = self._range()
        return min(lo, 0.0), max(hi, 0.0)

    def _range(self) -> tuple[float, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def qparams(self, bits: int = 8, symmetric: bool = False) -> tuple[float, int]:
        """``(scale, zero_point)`` for a signed ``bits``-bit integer grid over
        the observed range (asymmetric min-max, or symmetric abs-max)."""
        lo, hi = self.range()
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if symmetric:
            scale = max(abs(lo), abs(hi)) / qmax
            return (scale if scale > 0 else 1.0), 0
        scale = (hi - lo) / (qmax - qmin)
        if scale <= 0:
            return 1.0, 0
        zero_point = int(round(qmin - lo / scale))
        return scale, max(qmin, min(qmax, zero_point))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(range={self.range() if self.batches else None})"


class MinMaxObserver(Observer):
    """The smallest and largest value seen."""

    name = "minmax"

    def __init__(self):
        super().__init__()
        self.lo, self.hi = float("inf"), float("-inf")

    def _update(self, x):
        self.lo = min(self.lo, x.min().item())
        self.hi = max(self.hi, x.max().item())

    def _range(self):
        return self.lo, self.hi


class MovingAverageObserver(Observer):
    """Exponential moving average of each batch's min and max
    (``m <- m + momentum * (batch_m - m)``), as torch.ao's
    MovingAverageMinMaxObserver: one outlier batch moves the range a little."""

    name = "moving-average"

    def __init__(self, momentum: float = 0.01):
        super().__init__()
        if not 0 < momentum <= 1:
            raise CalibrationError(f"moving-average observer: momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.lo = self.hi = 0.0

    def _update(self, x):
        lo, hi = x.min().item(), x.max().item()
        if self.batches == 0:
            self.lo, self.hi = lo, hi
        else:
            self.lo += self.momentum * (lo - self.lo)
            self.hi += self.momentum * (hi - self.hi)

    def _range(self):
        return self.lo, self.hi


class PercentileObserver(Observer):
    """The ``percentile``-th and ``(100 - percentile)``-th percentiles of each
    batch, averaged over batches (weighted by size): clips rare outliers that
    would waste the int8 grid."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99):
        super().__init__()
        if not 50 < percentile <= 100:
            raise CalibrationError(f"percentile observer: percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        self.lo_sum = self.hi_sum = 0.0
        self.count = 0

    def _update(self, x):
        flat = x.flatten()
        n = flat.numel()
        # kthvalue has no size limit (torch.quantile stops at 2^24 elements);
        # the k-th smallest with k = ceil(p/100 * n) is the nearest-rank percentile.
        k_hi = max(1, min(n, int(torch.tensor(self.percentile / 100 * n).ceil().item())))
        k_lo = max(1, min(n, n + 1 - k_hi))
        self.hi_sum += flat.kthvalue(k_hi).values.item() * n
        self.lo_sum += flat.kthvalue(k_lo).values.item() * n
        self.count += n

    def _range(self):
        return self.lo_sum / self.count, self.hi_sum / self.count


OBSERVERS: dict[str, type[Observer]] = {
    cls.name: cls for cls in (MinMaxObserver, PercentileObserver, MovingAverageObserver)
}


def make_observer(kind: str, **options) -> Observer:
    if kind not in OBSERVERS:
        raise CalibrationError(f"unknown observer {kind!r}; valid: {sorted(OBSERVERS)}")
    return OBSERVERS[kind](**options)


# --------------------------------------------------------------------------
# collection


@dataclass
class LinearStats:
    """What the calibration set showed about one linear layer's input ``X``
    (``[..., K]``): its range (``observer``), ``channel_absmax[k] = max|X[..., k]|``,
    ``mean`` and ``sq_mean`` (of ``X`` and ``X^2``, float64, per channel), and when asked, ``hessian = X^T X / rows``
    (float64) and a sample of rows. From :func:`calibrate_sequentially` with
    ``reference``: ``cross = X^T X_ref / rows`` and ``ref_mean``, where
    ``X_ref`` is the same input in the unchanged graph."""

    node: str
    observer: Observer
    channel_absmax: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    rows: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)
    mean: torch.Tensor | None = None
    sq_mean: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    ref_mean: torch.Tensor | None = None

    def observe(self, x: torch.Tensor, hessian: bool = False, keep_rows: int = 0, ref: torch.Tensor | None = None) -> None:
        """Add the rows of one input ``x`` (``[..., K]``), and of the reference
        input ``ref`` of the same shape when given; call :meth:`finish` after the last."""
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        self.observer.update(rows)
        amax = rows.abs().amax(dim=0)
        self.channel_absmax = amax if self.channel_absmax is None else torch.maximum(self.channel_absmax, amax)
        total, squares = rows.double().sum(0), rows.double().pow(2).sum(0)
        self.mean = total if self.mean is None else self.mean + total
        self.sq_mean = squares if self.sq_mean is None else self.sq_mean + squares
        if hessian:
            r64 = rows.double()
            h = r64.T @ r64
            self.hessian = h if self.hessian is None else self.hessian + h
        if ref is not None:
            r64, ref64 = rows.double(), ref.detach().reshape(-1, ref.shape[-1]).double()
            c, m = r64.T @ ref64, ref64.sum(0)
            self.cross = c if self.cross is None else self.cross + c
            self.ref_mean = m if self.ref_mean is None else self.ref_mean + m
        kept = sum(s.shape[0] for s in self.samples)
        if kept < keep_rows:
            self.samples.append(rows[: keep_rows - kept].clone())
        self.rows += rows.shape[0]

    def finish(self) -> "LinearStats":
        """Sums over the rows become means (``X^T X / rows``, ...)."""
        for name in ("hessian", "mean", "sq_mean", "cross", "ref_mean"):
            value = getattr(self, name)
            if value is not None:
                value /= max(self.rows, 1)
        return self

    def sample(self) -> torch.Tensor:
        """The kept rows of ``X`` as one ``[rows, K]`` float tensor."""
        if not self.samples:
            raise CalibrationError(f"no input rows were kept for {self.node!r}; pass keep_rows > 0")
        return torch.cat(self.samples)


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target == aten.linear.default


def linear_nodes(graph) -> list[fx.Node]:
    return [n for n in graph.fx.nodes if is_linear(n)]


class _Recorder(fx.Interpreter):
    def __init__(self, module, watch: dict[fx.Node, LinearStats], hessian: bool, keep_rows: int):
        super().__init__(module, garbage_collect_values=True)
        self.watch = watch
        self.hessian = hessian
        self.keep_rows = keep_rows

    def run_node(self, n):
        stats = self.watch.get(n)
        if stats is not None:
            stats.observe(self.env[n.args[0]], self.hessian, self.keep_rows)
        return super().run_node(n)


def pooled(calls: Sequence["LinearStats"], name: str) -> torch.Tensor | None:
    """Statistic ``name`` (``sq_mean``, ``hessian``, ...) of several calls'
    inputs taken together: their means weighted by rows (None where a call
    lacks it), for a weight several layers or calls read."""
    parts = [getattr(s, name) for s in calls]
    if not parts or any(p is None for p in parts):
        return None
    return sum(p * s.rows for p, s in zip(parts, calls)) / max(sum(s.rows for s in calls), 1)


def collect_linear_stats(
    graph,
    calibration_data: Sequence[Any],
    nodes: Iterable[fx.Node | str] | None = None,
    *,
    observer: str = "minmax",
    hessian: bool = False,
    keep_rows: int = 0,
    progress=None,
    **observer_options,
) -> dict[str, LinearStats]:
    """Run ``graph`` on every item of ``calibration_data`` and return, for each
    chosen ``aten.linear`` node (all of them when ``nodes`` is None), the
    :class:`LinearStats` of its input, keyed by node name.

    ``observer``: ``minmax``, ``percentile`` (option ``percentile``) or
    ``moving-average`` (option ``momentum``). ``hessian``: also accumulate
    ``X^T X / rows`` (GPTQ). ``keep_rows``: keep up to that many input rows per
    layer (AWQ's search). ``progress``: a pass's :meth:`Pass.progress`, to
    report each calibration input. Raises :class:`CalibrationError` on an empty set, a
    node that is not a linear of this graph, or an input the graph rejects.
    """
    data = list(calibration_data) if calibration_data is not None else []
    if not data:
        raise CalibrationError("calibration_data is empty: give a list of model inputs")
    by_name = {n.name: n for n in graph.fx.nodes}
    chosen: list[fx.Node] = []
    for item in linear_nodes(graph) if nodes is None else nodes:
        node = by_name.get(item) if isinstance(item, str) else item
        if node is None or node.graph is not graph.fx:
            raise CalibrationError(f"node {item if isinstance(item, str) else item.name!r} is not in graph {graph.name}")
        if not is_linear(node):
            raise CalibrationError(f"node {node.name!r} is {node.target}, not aten.linear; calibration records linear inputs")
        chosen.append(node)
    watch = {n: LinearStats(n.name, make_observer(observer, **observer_options)) for n in chosen}
    recorder = _Recorder(graph.module, watch, hessian, keep_rows)
    for i, item in enumerate(progress(data, "calibrating") if progress else data):
        args, kwargs = split_inputs(item)
        try:
            flat = graph.flatten_inputs(*args, **kwargs)
        except (TypeError, ValueError) as e:
            raise CalibrationError(f"calibration_data[{i}] does not fit the inputs of {graph.name}: {e}") from e
        with torch.no_grad():
            recorder.run(*flat)
    for stats in watch.values():
        stats.finish()
    return {n.name: s for n, s in watch.items()}


def calibrate_sequentially(
    graph,
    calibration_data: Sequence[Any],
    nodes: Iterable[fx.Node],
    visit: Callable[[fx.Node, LinearStats], None],
    *,
    progress=None,
    reference: bool = False,
) -> None:
    """Run ``graph`` on every item of ``calibration_data`` together, node by
    node in graph order, and call ``visit(node, stats)`` just before each
    chosen ``aten.linear`` computes, with the :class:`LinearStats` (range and
    ``X^T X / rows``) of its input on the whole set.

    ``visit`` may replace the node's weight (``node.replace_input_with``);
    the node and everything after it then compute with the new weight, so each
    later layer is calibrated on the inputs the already-changed layers produce
    rather than the original model's: SparseGPT's and Wanda's sequential
    calibration (and GPTQ's), which keeps the errors of one layer from
    compounding unseen into the next. ``visit`` must not erase nodes (erase
    the replaced weights afterwards). Memory: the live values of every item
    at once (the graph's widest point times the set's size).

    ``reference``: also run the graph as it was before any visit (each node
    with the inputs it had when the run began) and give ``visit`` the cross
    moment ``X^T X_ref / rows`` of each chosen node's input with the unchanged
    graph's (``stats.cross``, ``stats.ref_mean``): what a layer needs to match
    the original model's output rather than its own (twice the memory).
    """
    data = list(calibration_data) if calibration_data is not None else []
    if not data:
        raise CalibrationError("calibration_data is empty: give a list of model inputs")
    chosen = set(nodes)
    for node in chosen:
        if not is_linear(node) or node.graph is not graph.fx:
            raise CalibrationError(f"node {node.name!r} is not an aten.linear of graph {graph.name}")
    order = list(graph.fx.nodes)
    last_use: dict[fx.Node, fx.Node] = {}
    for node in order:
        for arg in node.all_input_nodes:
            last_use[arg] = node
    original = {node: (node.args, node.kwargs) for node in order} if reference else {}
    original_inputs = {node: list(node.all_input_nodes) for node in order}
    runners, refs = [], []
    for i, item in enumerate(data):
        args, kwargs = split_inputs(item)
        try:
            flat = graph.flatten_inputs(*args, **kwargs)
        except (TypeError, ValueError) as e:
            raise CalibrationError(f"calibration_data[{i}] does not fit the inputs of {graph.name}: {e}") from e
        runner = fx.Interpreter(graph.module, garbage_collect_values=False)
        runner.env, runner.args_iter = {}, iter(flat)
        runners.append(runner)
        if reference:
            ref = fx.Interpreter(graph.module, garbage_collect_values=False)
            ref.env, ref.args_iter = {}, iter(flat)
            refs.append(ref)
    with torch.no_grad():
        for node in progress(order, "calibrating layer by layer") if progress else order:
            if node in chosen:
                stats = LinearStats(node.name, make_observer("minmax"))
                rows = lambda envs, x: torch.cat([e[x].reshape(-1, e[x].shape[-1]) for e in envs])  # noqa: E731
                # one product over every item's rows: many small ones cost far more
                stats.observe(rows([r.env for r in runners], node.args[0]), hessian=True,
                              ref=rows([r.env for r in refs], original[node][0][0]) if reference else None)
                visit(node, stats.finish())
            for ref in refs:  # the graph as it was: the node with its original inputs
                args, kwargs = original[node]
                load = lambda n: ref.env[n]  # noqa: E731
                ref.env[node] = getattr(ref, node.op)(node.target, fx.node.map_arg(args, load), fx.node.map_arg(kwargs, load))
                for arg in original_inputs[node]:
                    if last_use.get(arg) is node:
                        del ref.env[arg]
            for runner in runners:
                for arg in node.all_input_nodes:  # a weight the visit put in place
                    if arg not in runner.env:
                        runner.env[arg] = runner.run_node(arg)
                runner.env[node] = runner.run_node(node)
                for arg in node.all_input_nodes:
                    if last_use.get(arg) is node:
                        del runner.env[arg]
