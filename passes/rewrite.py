"""The pattern-rewrite engine: every fusion, and users' custom passes, are
``(pattern, replacement)`` pairs written as plain Python over tensors.

Writing a rewrite::

    import torch
    from fxopt.passes import register_pass
    from fxopt.passes.rewrite import Pattern, RewritePass, is_constant

    def linear_relu(x, w, b):
        return torch.relu(torch.nn.functional.linear(x, w, b))

    def fused(x, w, b):
        return torch.ops.fxopt.linear_act(x, w, b, "relu")

    @register_pass("fuse-linear-relu")
    class FuseLinearRelu(RewritePass):
        '''linear(x, W, b) -> relu  ==>  fxopt.linear_act(x, W, b, "relu").'''
        patterns = [Pattern("linear-relu", linear_relu, fused, where={"w": is_constant},
                            inputs={"x": (2, 8), "w": (16, 8), "b": (16,)})]

How it works and what it promises:

* **Tracing.** The pattern and the replacement are traced with
  :func:`fxopt.trace` (torch.export, non-strict) exactly like a model, then
  cleaned by ``canonicalize`` (identity views/casts and asserts dropped) and
  ``dce``, so they hold the op set a canonicalized model graph holds. Tracing
  happens once, lazily, and is cached on the :class:`Pattern`. Example tensors
  are float32 of shape ``(8, 8)`` unless ``inputs={"name": shape | tensor}``
  says otherwise; shapes only need to make the function run.
* **Wildcards.** Every tensor parameter of the pattern function matches any
  graph value; the same parameter used twice must bind the same value.
* **Scalar captures.** A parameter annotated ``float``, ``int`` or
  ``torch.dtype`` is a captured scalar: it is traced with a sentinel value
  (floats get unique sentinels, ints the example value given in ``inputs`` or a
  large prime, dtypes the one in ``inputs`` or ``torch.float64``) and every
  literal argument equal to the sentinel matches any literal of its kind, whose
  value is captured (and substituted into a traced replacement). A ``float``
  capture also takes a one-element constant of the graph (a folded
  ``torch.full([], c)``), capturing its value. Other literals
  (``0.5``, ``[-1]``, ``keepdim=True``) must be equal. A capture must reach
  an op unchanged: Python arithmetic on it is refused with a PatternError (do
  such arithmetic in a ``build=`` callback, which reads ``match["eps"]``).
* **Predicates.** ``where={"w": is_constant, "eps": lambda v: v < 1e-3}``: a
  predicate per parameter, called with the bound ``fx.Node`` (tensors) or the
  captured value (scalars) while matching, so a failure is reported at the
  node it concerns. ``check=lambda m: ...`` sees the whole :class:`Match`
  (shapes, constants, several bindings at once). A predicate, a check or a
  builder may ``raise Reject("why")``: the reason is reported as it is.
* **Alternatives.** ``alternatives={"h": {"scaled": scaled, "shifted": shifted,
  "plain": "x"}}`` (``def scaled(x, c: float): return x * c``): the spot of tensor parameter ``h`` may be
  written in any of these forms, tried in order. A form is a function (traced
  like the pattern; its parameters are parameters of the whole pattern, and a
  name used in several forms binds one value) or the name of another
  parameter, which stands at that spot (making a step optional; a form's
  parameter named like the spot itself, or a form naming it, is a plain
  wildcard). Forms nest; ``match.chosen["h"]`` says which form matched, and a
  spot matched through a form binds nothing itself, so patterns whose forms
  bind different parameters use ``build=``. All functions of a pattern are
  traced with one export.
* **Commutative ops.** ``add`` and ``mul`` (alpha 1) match either operand order.
* **Several outputs.** A pattern may return a tuple; every output is matched
  (the first anchors the search) and the replacement returns as many values.
* **Replacement forms.** ``replacement=fn`` (traced, same parameter names, any
  subset) or ``build=callback(match, graph) -> node | tuple[node] | None`` for
  what tracing cannot express (new constants such as concatenated weights,
  ``graph.add_constant``); returning ``None`` declines the match.
* **Occurrences.** One per set of matched nodes (the same nodes matched in
  another role, e.g. the outputs of a symmetric pattern permuted, count once),
  and one per anchor when rewriting: the ways one anchor matches (forms,
  operand orders) are tried in the order found and the first safe one wins.
* **Safety.** All matches are found first, then accepted in graph order. A match
  is skipped (and counted, with the reason) when it overlaps an accepted one
  (``overlap``), when an intermediate value it would remove is used outside it
  (``escaping``), when ``check`` rejects it (``check``), when the builder
  declines (``declined``), or when no position in the graph can hold the
  replacement (``placement``).
* **Stats.** :func:`rewrite` returns per-pattern ``found`` / ``rewritten`` /
  ``skipped`` (reason -> count) and, when a pattern found nothing although its
  anchor op occurs in the graph, ``nearest_miss``: which pattern node failed to
  match which graph node, and why (:func:`explain` gives the same text on
  demand; :func:`nearest_misses` the furthest failure at every anchor, with the
  graph nodes matched by then). ``PatternStats.skips`` keeps each skip with its
  match. ``Pattern.variant(check=..., build=...)`` shares the traces of a
  pattern with a copy, e.g. for checks that read a pass's options.

No module names are involved anywhere: matching is on the graph's ops alone.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
import torch.fx as fx

from ..ir.nodes import call_args, val
from .base import Pass, PassResult

aten = torch.ops.aten

COMMUTATIVE = {aten.add.Tensor, aten.mul.Tensor, aten.add.Scalar, aten.mul.Scalar}
_ALPHA_OPS = {aten.add.Tensor, aten.add.Scalar}
DEFAULT_SHAPE = (8, 8)


class PatternError(ValueError):
    """A pattern or replacement that cannot be traced or does not fit its pattern."""


class Reject(Exception):
    """Raised by a predicate (``where=``), a ``check`` or a ``build`` callback to
    refuse a match with a reason; the reason is reported as it is (in the
    nearest miss, or as the skip reason)."""


# --------------------------------------------------------------------------
# predicates (for ``where=``): each takes the bound fx.Node

def is_constant(node) -> bool:
    """The value is a constant of the graph (a ``get_attr`` read: a weight)."""
    return isinstance(node, fx.Node) and node.op == "get_attr"


def is_not_constant(node) -> bool:
    return isinstance(node, fx.Node) and node.op != "get_attr"


def has_rank(*ranks: int) -> Callable:
    def pred(node) -> bool:
        v = val(node)
        return isinstance(v, torch.Tensor) and v.dim() in ranks

    pred.__name__ = f"has_rank{ranks}"
    return pred


def has_dtype(*dtypes: torch.dtype) -> Callable:
    def pred(node) -> bool:
        v = val(node)
        return isinstance(v, torch.Tensor) and v.dtype in dtypes

    pred.__name__ = f"has_dtype{tuple(str(d).replace('torch.', '') for d in dtypes)}"
    return pred


def all_of(*preds: Callable) -> Callable:
    def pred(x) -> bool:
        return all(p(x) for p in preds)

    pred.__name__ = " and ".join(getattr(p, "__name__", "predicate") for p in preds)
    return pred


# --------------------------------------------------------------------------
# traced functions

@dataclass(frozen=True)
class _Capture:
    name: str


class _FnModule(torch.nn.Module):
    def __init__(self, fn: Callable, tensor_names: list[str], scalars: dict[str, Any]):
        super().__init__()
        self.fn, self.tensor_names, self.scalars = fn, tensor_names, scalars

    def forward(self, *tensors):
        return self.fn(**dict(zip(self.tensor_names, tensors)), **self.scalars)


@dataclass
class _Traced:
    graph: Any  # fxopt Graph
    params: dict[str, fx.Node]  # tensor parameter -> placeholder
    outputs: list  # output nodes (or placeholders / literals)
    nodes: list[fx.Node]  # computing nodes, in order


def _scalar_kind(param: inspect.Parameter) -> type | None:
    ann = param.annotation
    if ann in (float, "float"):
        return float
    if ann in (int, "int"):
        return int
    if ann in (torch.dtype, "torch.dtype"):
        return torch.dtype
    return None


def _signature(fn: Callable, what: str) -> tuple[list[str], dict[str, type]]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise PatternError(f"{what}: cannot read the signature of {fn!r}: {e}") from e
    tensors, scalars = [], {}
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise PatternError(f"{what}: *args/**kwargs are not supported in patterns ({name})")
        kind = _scalar_kind(p)
        if kind is None:
            tensors.append(name)
        else:
            scalars[name] = kind
    return tensors, scalars


def _replace_literals(value, table: dict):
    """Sentinel literals -> captures (or captures -> values), through lists and keyword dicts."""
    if isinstance(value, (list, tuple)):
        return type(value)(_replace_literals(v, table) for v in value)
    if isinstance(value, dict):
        return {k: _replace_literals(v, table) for k, v in value.items()}
    if isinstance(value, (bool, fx.Node)) or not isinstance(value, (int, float, torch.dtype, _Capture)):
        return value
    key = (type(value), value)
    return table.get(key, value)


def _trace_fn(fn: Callable, what: str, inputs: dict[str, Any], sentinels: dict[str, Any]) -> _Traced:
    """Trace ``fn``; its parameters named in ``sentinels`` are scalar captures."""
    return _trace_fns([(fn, what, sentinels)], inputs)[0]


class _ManyModule(torch.nn.Module):
    def __init__(self, calls: list[tuple[Callable, list[str], dict[str, Any]]]):
        super().__init__()
        self.calls = calls

    def forward(self, *tensors):
        outs, i = [], 0
        for fn, names, scalars in self.calls:
            out = fn(**dict(zip(names, tensors[i:i + len(names)])), **scalars)
            i += len(names)
            outs += list(out) if isinstance(out, (tuple, list)) else [out]
        return tuple(outs)

    def counts(self, tensors) -> list[int]:
        """How many values each function returns (export runs the module on a copy)."""
        counts, i = [], 0
        with torch.no_grad():
            for fn, names, scalars in self.calls:
                out = fn(**dict(zip(names, tensors[i:i + len(names)])), **scalars)
                i += len(names)
                counts.append(len(out) if isinstance(out, (tuple, list)) else 1)
        return counts


# Passes run inside a user's torch.inference_mode() too, where torch.randn makes
# inference tensors that torch.export refuses as inputs.
@torch.inference_mode(False)
def _trace_fns(calls: list[tuple[Callable, str, dict[str, Any]]], inputs: dict[str, Any]) -> list[_Traced]:
    """Trace several functions with one export (tracing is what costs: the
    forms of a pattern are traced together); each keeps its own placeholders,
    nodes and outputs in the shared graph. ``calls``: (fn, what, sentinels)."""
    from ..ir.trace import trace
    from .canonicalize import Canonicalize
    from .dce import DeadCodeElimination

    prepared, examples = [], []
    for fn, what, sentinels in calls:
        tensors, scalar_kinds = _signature(fn, what)
        tensor_names = [n for n in [*tensors, *scalar_kinds] if n not in sentinels]
        scalar_names = [n for n in [*tensors, *scalar_kinds] if n in sentinels]
        for name in tensor_names:
            spec = inputs.get(name, DEFAULT_SHAPE)
            # a copy per use: export would make one input of a tensor passed twice
            examples.append(spec.clone() if isinstance(spec, torch.Tensor) else torch.randn(*spec))
        prepared.append((fn, tensor_names, {name: sentinels[name] for name in scalar_names}))
    whats = " / ".join(what for _, what, _ in calls)
    module = _ManyModule(prepared)
    try:
        counts = module.counts(examples)
        graph = trace(module, tuple(examples), name=calls[0][1])
        Canonicalize(linear=False)(graph)
        DeadCodeElimination()(graph)
        graph.recompile()
    except Exception as e:
        names = ", ".join(repr(getattr(fn, "__name__", fn)) for fn, _, _ in calls)
        raise PatternError(f"{whats}: tracing {names} failed: {type(e).__name__}: {e}") from e
    phs = graph.placeholders()
    (out,) = [n for n in graph.fx.nodes if n.op == "output"]
    outs = out.args[0]
    all_outputs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    order = {n: i for i, n in enumerate(graph.fx.nodes)}
    result, owner, p_at, o_at = [], {}, 0, 0
    for (fn, what, _), (_, tensor_names, scalars), count in zip(calls, prepared, counts):
        my_phs = phs[p_at:p_at + len(tensor_names)]
        outputs = all_outputs[o_at:o_at + count]
        p_at, o_at = p_at + len(tensor_names), o_at + count
        nodes, stack = set(), [o for o in outputs if isinstance(o, fx.Node)]
        while stack:
            n = stack.pop()
            if n in nodes or n.op == "placeholder":
                continue
            nodes.add(n)
            stack.extend(n.all_input_nodes)
        for n in nodes:
            if owner.setdefault(n, what) != what:
                raise PatternError(f"{whats}: {owner[n]} and {what} share the traced node %{n.name}; trace them apart")
        table = {(type(v), v): _Capture(k) for k, v in scalars.items()}
        found: set[str] = set()
        for node in nodes:
            if node.op == "call_function":
                node.args = _replace_literals(node.args, table)
                node.kwargs = _replace_literals(node.kwargs, table)
            fx.node.map_aggregate((node.args, node.kwargs), lambda a: found.add(a.name) if isinstance(a, _Capture) else None)
        lost = sorted(set(scalars) - found)
        if lost:
            # Python arithmetic on a capture bakes a number derived from its
            # sentinel into the graph, which would then never match (or, in a
            # replacement, be written into the model).
            raise PatternError(
                f"{what}: scalar parameter(s) {lost} do not reach an op as they are (unused, or changed by Python "
                f"arithmetic); pass them to ops unchanged, or compute with them in a build= callback"
            )
        for name, ph in zip(tensor_names, my_phs):
            ph._rename(name)  # so that explanations name the parameter
        ordered = sorted((n for n in nodes if n.op in ("call_function", "get_attr")), key=order.__getitem__)
        result.append(_Traced(graph, dict(zip(tensor_names, my_phs)), outputs, ordered))
    return result


# --------------------------------------------------------------------------
# patterns and matches

@dataclass(eq=False)
class Pattern:
    """One rewrite rule: ``pattern`` (traced) -> ``replacement`` (traced) or ``build`` (callback).

    ``where``: parameter -> predicate; ``check``: predicate on the whole
    :class:`Match`; ``inputs``: parameter -> example shape, tensor, or (for an
    int or dtype capture) example value used for tracing; ``alternatives``:
    parameter -> {form name: function | parameter name}, the ways that spot
    may be written (see the module docstring).
    """

    name: str
    pattern: Callable
    replacement: Callable | None = None
    build: Callable | None = None
    where: dict[str, Callable] = field(default_factory=dict)
    check: Callable | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    alternatives: dict[str, dict[str, Callable | str]] = field(default_factory=dict)

    def __post_init__(self):
        if (self.replacement is None) == (self.build is None):
            raise PatternError(f"pattern {self.name!r}: give exactly one of replacement= (traced) or build= (callback)")
        tensors, scalars = _signature(self.pattern, f"pattern {self.name!r}")
        tensors, scalars = list(tensors), dict(scalars)
        for param, forms in self.alternatives.items():
            if not isinstance(forms, dict) or not forms:
                raise PatternError(f"pattern {self.name!r}: alternatives[{param!r}] must be a non-empty dict of form name -> function or parameter name")
            for form_name, form in forms.items():
                what = f"pattern {self.name!r}, alternative {param}={form_name}"
                if isinstance(form, str):
                    t, s = [form], {}
                elif callable(form):
                    t, s = _signature(form, what)
                else:
                    raise PatternError(f"{what}: expected a function or a parameter name, got {form!r}")
                tensors += [n for n in t if n not in tensors]
                for n, kind in s.items():
                    if scalars.setdefault(n, kind) is not kind:
                        raise PatternError(f"{what}: scalar {n!r} is annotated {kind.__name__} here and {scalars[n].__name__} elsewhere")
        clash = sorted(set(tensors) & set(scalars))
        if clash:
            raise PatternError(f"pattern {self.name!r}: {clash} are tensors in one function and scalars in another")
        unknown = sorted(set(self.alternatives) - set(tensors))
        if unknown:
            raise PatternError(f"pattern {self.name!r}: alternatives= names {unknown}, which are not tensor parameters of the pattern or its alternatives ({tensors})")
        unknown = sorted(set(self.where) - set(tensors) - set(scalars))
        if unknown:
            raise PatternError(f"pattern {self.name!r}: where= names {unknown}, which are not parameters of the pattern ({tensors + list(scalars)})")
        self._tensor_names = tensors
        self._scalar_kinds = scalars
        self._traced: _Traced | None = None
        self._alts: dict[str, list[tuple[str, _Traced | str]]] | None = None
        self._traced_forms: dict[tuple[str, str], _Traced] = {}
        self._replacement: _Traced | None = None

    def variant(self, **changes) -> "Pattern":
        """A copy with another ``name``, ``where``, ``check``, ``build`` or
        ``replacement`` that shares this pattern's traces (tracing is the costly
        part), e.g. a pass whose options parametrize the check or the builder."""
        bad = sorted(set(changes) - {"name", "where", "check", "build", "replacement"})
        if bad:
            raise PatternError(f"pattern {self.name!r}: variant() cannot change {bad} (they change what is traced)")
        if "build" in changes and "replacement" not in changes:
            changes["replacement"] = None
        if "replacement" in changes and "build" not in changes:
            changes["build"] = None
        new = dataclasses.replace(self, **changes)
        new._traced, new._alts, new._traced_forms = self.traced, self.traced_alternatives, self._traced_forms
        if new.replacement is self.replacement:
            new._replacement = self._replacement
        return new

    def sentinels(self) -> dict[str, Any]:
        out = {}
        for i, (name, kind) in enumerate(self._scalar_kinds.items()):
            if kind is float:
                out[name] = 0.000123456789 + i * 1.0e-9
            elif kind is torch.dtype:
                out[name] = self.inputs.get(name, torch.float64)
            else:
                out[name] = int(self.inputs.get(name, 7919 + 104729 * i))
        return out

    def _sentinels_for(self, fn: Callable, what: str) -> dict[str, Any]:
        _, scalars = _signature(fn, what)
        all_ = self.sentinels()
        return {k: all_[k] for k in scalars}

    @property
    def traced(self) -> _Traced:
        if self._traced is None:
            what = f"pattern {self.name!r}"
            forms = [(param, form_name, form) for param, fs in self.alternatives.items()
                     for form_name, form in fs.items() if not isinstance(form, str)]
            calls = [(self.pattern, what, self._sentinels_for(self.pattern, what))]
            for param, form_name, form in forms:
                w = f"pattern {self.name!r}, alternative {param}={form_name}"
                calls.append((form, w, self._sentinels_for(form, w)))
            t, *traced_forms = _trace_fns(calls, self.inputs)
            self._traced_forms = {(param, form_name): tf for (param, form_name, _), tf in zip(forms, traced_forms)}
            bad = [o for o in t.outputs if not (isinstance(o, fx.Node) and o.op == "call_function")]
            if bad:
                raise PatternError(f"pattern {self.name!r}: every output must be computed by an op, not an input or literal ({bad})")
            self._traced = t
        return self._traced

    @property
    def traced_alternatives(self) -> dict[str, list[tuple[str, "_Traced | str"]]]:
        """parameter -> [(form name, traced form, or the parameter name it stands for)]."""
        if self._alts is None:
            self.traced  # traces the forms too
            alts: dict[str, list] = {}
            for param, forms in self.alternatives.items():
                alts[param] = []
                for form_name, form in forms.items():
                    if not isinstance(form, str):
                        what = f"pattern {self.name!r}, alternative {param}={form_name}"
                        t = self._traced_forms[(param, form_name)]
                        if len(t.outputs) != 1:
                            raise PatternError(f"{what}: an alternative returns one value, this one {len(t.outputs)}")
                        out = t.outputs[0]
                        if isinstance(out, fx.Node) and out.op == "placeholder":
                            form = next(n for n, ph in t.params.items() if ph is out)
                        elif not (isinstance(out, fx.Node) and out.op == "call_function"):
                            raise PatternError(f"{what}: returns {out!r}, not a computed value or a parameter")
                        else:
                            form = t
                    alts[param].append((form_name, form))
            # A spot that stands for another parameter, which stands for the first...
            # would never consume a graph node: refuse such cycles up front.
            def visit(name: str, path: tuple) -> None:
                for _, form in alts.get(name, []):
                    if isinstance(form, str) and form != name:
                        if form in path:
                            raise PatternError(f"pattern {self.name!r}: alternatives stand for each other in a cycle through {sorted(path)}")
                        visit(form, (*path, form))

            for start in alts:
                visit(start, (start,))
            self._alts = alts
        return self._alts

    def _all_traced(self) -> list[_Traced]:
        return [self.traced] + [t for forms in self.traced_alternatives.values() for _, t in forms if not isinstance(t, str)]

    def _placeholders(self) -> dict[str, fx.Node]:
        """One placeholder per tensor parameter name (the pattern's own first)."""
        out: dict[str, fx.Node] = {}
        for t in self._all_traced():
            for name, ph in t.params.items():
                out.setdefault(name, ph)
        return out

    @property
    def replacement_traced(self) -> _Traced:
        if self._replacement is None:
            what = f"replacement of pattern {self.name!r}"
            tensors, scalars = _signature(self.replacement, what)
            names = [*tensors, *scalars]
            phs = self._placeholders()
            extra = [n for n in names if n not in phs and n not in self._scalar_kinds]
            if extra:
                raise PatternError(f"{what}: parameters {extra} are not parameters of the pattern")
            # Parameters keep the pattern's kinds; tensors are traced shaped like the pattern's.
            inputs = {}
            for n in (n for n in names if n in phs):
                v = val(phs[n])
                inputs[n] = torch.zeros(v.shape, dtype=v.dtype).normal_() if v.dtype.is_floating_point else torch.zeros(v.shape, dtype=v.dtype)
            t = _trace_fn(self.replacement, what, inputs, {k: v for k, v in self.sentinels().items() if k in names})
            if len(t.outputs) != len(self.traced.outputs):
                raise PatternError(f"{what} returns {len(t.outputs)} values but the pattern returns {len(self.traced.outputs)}")
            self._replacement = t
        return self._replacement

    @property
    def anchor_target(self):
        return self.traced.outputs[0].target

    def __repr__(self) -> str:
        return f"Pattern({self.name!r})"


@dataclass
class Match:
    """One occurrence of a pattern: ``match["x"]`` is what parameter ``x`` bound
    (an ``fx.Node`` for tensors, the literal for scalar captures); ``chosen``
    names the form taken for each parameter that has ``alternatives``.
    A parameter matched through one of its forms binds nothing itself."""

    pattern: Pattern
    graph: Any
    nodes: dict[fx.Node, fx.Node]  # pattern node -> graph node (computing nodes)
    bindings: dict[str, Any]
    outputs: list[fx.Node]
    chosen: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str):
        return self.bindings[name]

    def __contains__(self, name: str) -> bool:
        return name in self.bindings

    def constant(self, name: str) -> torch.Tensor | None:
        """The tensor behind a parameter bound to a graph constant, else None."""
        return self.graph.constant(self.bindings[name])

    def val(self, name: str):
        """Shape/dtype metadata (a fake tensor) of a bound tensor parameter."""
        return val(self.bindings[name])

    @property
    def anchor(self) -> fx.Node:
        return self.outputs[0]

    def matched_nodes(self) -> set[fx.Node]:
        return set(self.nodes.values())


@dataclass
class NearMiss:
    """The furthest a pattern got at one anchor: which pattern node failed
    against which graph node, why, and the graph nodes matched by then."""

    progress: int = -1
    anchor: fx.Node | None = None
    pattern_node: Any = None
    graph_node: Any = None
    reason: str = ""
    matched: frozenset = frozenset()


def _describe(x) -> str:
    if isinstance(x, fx.Node):
        t = x.target
        what = getattr(t, "__name__", str(t)) if x.op == "call_function" else x.op
        if isinstance(t, torch._ops.OpOverload):
            what = f"{t.namespace}.{t._opname}.{t._overloadname}"
        return f"%{x.name} ({what})"
    return repr(x)


_all_args = call_args  # the matcher compares calls by their full positional view


def _literal_equal(p, g) -> bool:
    if isinstance(g, fx.Node):
        return False
    numbers = (int, float)
    if isinstance(p, numbers) and isinstance(g, numbers) and not isinstance(p, bool) and not isinstance(g, bool):
        return p == g
    return type(p) is type(g) and p == g


class _Matcher:
    """Backtracking match of one pattern against one graph, recording the
    furthest failure (overall, and per anchor) for :func:`explain`.

    State: ``(mapping, caps)``: pattern node -> graph node (a tensor parameter
    is keyed by one placeholder per name, so a name used in several forms binds
    one value), and capture name -> literal. The form chosen for a parameter
    with alternatives is kept in ``caps`` under ``("form", name)``: a key no
    capture can have, so that backtracking undoes it with the rest."""

    def __init__(self, pattern: Pattern, graph):
        self.pattern = pattern
        self.graph = graph
        self.t = pattern.traced
        self.alts = pattern.traced_alternatives
        self.param_of: dict[fx.Node, str] = {}
        self.bare: set[fx.Node] = set()  # a form's own parameter of the name it is a form of
        self.owner: dict[fx.Node, Any] = {}  # pattern constant -> the traced graph holding it
        for t in pattern._all_traced():
            for name, ph in t.params.items():
                self.param_of[ph] = name
            for n in t.nodes:
                self.owner[n] = t.graph
        for param, forms in self.alts.items():
            for _, t in forms:
                if not isinstance(t, str) and param in t.params:
                    self.bare.add(t.params[param])
        self.key = pattern._placeholders()
        self.miss = NearMiss()
        self.by_anchor: dict[fx.Node, NearMiss] = {}
        self.by_target: dict[Any, list[fx.Node]] = {}
        for n in graph.fx.nodes:
            if n.op == "call_function":
                self.by_target.setdefault(n.target, []).append(n)
        self._anchor: fx.Node | None = None

    def _fail(self, state, p, g, reason: str) -> None:
        progress = len(state[0])
        if progress > self.miss.progress:
            self.miss = NearMiss(progress, self._anchor, p, g, reason)
        best = self.by_anchor.get(self._anchor)
        if best is None or progress > best.progress:
            self.by_anchor[self._anchor] = NearMiss(progress, self._anchor, p, g, reason, frozenset(state[0].values()))

    def _predicate(self, state, name: str, value, p, g) -> bool:
        pred = self.pattern.where.get(name)
        if pred is None:
            return True
        try:
            ok = bool(pred(value))
        except Reject as e:
            self._fail(state, p, g, str(e))
            return False
        except Exception as e:  # a predicate that cannot judge this value declines it
            ok, why = False, f"{type(e).__name__}: {e}"
        else:
            why = ""
        if not ok:
            self._fail(state, p, g, f"where[{name!r}] ({getattr(pred, '__name__', 'predicate')}) rejected {_describe(value)}{' ' + why if why else ''}")
        return ok

    def _literal(self, name: str, g):
        """The value a capture of ``name`` takes from argument ``g``, else _NO."""
        kind = self.pattern._scalar_kinds.get(name, float)
        if kind is torch.dtype:
            return g if isinstance(g, torch.dtype) else _NO
        if isinstance(g, fx.Node):
            # a float written as a one-element constant (a folded torch.full([], c))
            t = self.graph.constant(g) if kind is float else None
            if t is not None and t.numel() == 1 and t.dtype != torch.bool:
                return float(t.reshape(()).item())
            return _NO
        if isinstance(g, bool) or not isinstance(g, (int, float)):
            return _NO
        return g

    def match_value(self, p, g, state, at=None) -> Iterator[tuple]:
        """``at``: (pattern node, graph node, argument index) whose argument this is."""
        mapping, caps = state
        if isinstance(p, fx.Node):
            if p.op == "placeholder":
                yield from self.match_param(self.param_of[p], g, state, at, bare=p in self.bare)
                return
            yield from self.match_node(p, g, state)
            return
        if isinstance(p, _Capture):
            value = self._literal(p.name, g)
            if value is _NO:
                kind = self.pattern._scalar_kinds.get(p.name, float)
                expects = "a dtype" if kind is torch.dtype else "a literal number" + (" or a one-element constant" if kind is float else "")
                self._arg_fail(state, at, f"scalar {p.name!r} expects {expects}, found {_describe(g)}")
                return
            if p.name in caps:
                if caps[p.name] == value:
                    yield state
                else:
                    self._arg_fail(state, at, f"scalar {p.name!r} is already captured as {caps[p.name]!r}, found {value!r}")
                return
            if self._predicate(state, p.name, value, *(at[:2] if at else (None, g))):
                yield (mapping, {**caps, p.name: value})
            return
        if isinstance(p, (list, tuple)):
            if not isinstance(g, (list, tuple)) or len(g) != len(p):
                self._arg_fail(state, at, f"expected a list like {p!r}, found {_describe(g)}")
                return
            yield from self.match_seq(list(p), list(g), state, at)
            return
        if not _literal_equal(p, g):
            self._arg_fail(state, at, f"literal {p!r} expected, found {_describe(g)}")
            return
        yield state

    def match_param(self, name: str, g, state, at, bare: bool = False) -> Iterator[tuple]:
        """Tensor parameter ``name`` against graph value ``g``: through its
        forms, in order, when it has alternatives, else as a wildcard."""
        mapping, caps = state
        if name in self.alts and not bare:
            forms = self.alts[name]
            if ("form", name) in caps:  # used twice: the same form both times
                forms = [f for f in forms if f[0] == caps[("form", name)]]
            for form_name, form in forms:
                s = (mapping, {**caps, ("form", name): form_name})
                if isinstance(form, str):
                    yield from self.match_param(form, g, s, at, bare=form == name)
                else:
                    yield from self.match_node(form.outputs[0], g, s)
            return
        key = self.key[name]
        if not isinstance(g, fx.Node):
            self._fail(state, key, g, f"parameter {name!r} expects a graph value, found the literal {g!r}")
            return
        if key in mapping:
            if mapping[key] is g:
                yield state
            else:
                self._fail(state, key, g, f"parameter {name!r} is already bound to {_describe(mapping[key])}")
            return
        if g in self._computing_targets(mapping):
            self._fail(state, key, g, f"parameter {name!r} would bind a node inside the match")
            return
        if self._predicate(state, name, g, key, g):
            yield ({**mapping, key: g}, caps)

    def match_seq(self, ps: list, gs: list, state, at=None, first: int = 0) -> Iterator[tuple]:
        if not ps:
            yield state
            return
        here = (at[0], at[1], first) if at and at[2] is None else at
        for s in self.match_value(ps[0], gs[0], state, here):
            yield from self.match_seq(ps[1:], gs[1:], s, at, first + 1)

    def _arg_fail(self, state, at, reason: str) -> None:
        if at is None:
            self._fail(state, None, None, reason)
        else:
            p, g, i = at
            self._fail(state, p, g, f"argument {i}: {reason}" if i is not None else reason)

    @staticmethod
    def _computing_targets(mapping) -> set:
        return {g for p, g in mapping.items() if p.op != "placeholder"}

    def match_node(self, p: fx.Node, g, state) -> Iterator[tuple]:
        mapping, caps = state
        if p in mapping:
            if mapping[p] is g:
                yield state
            else:
                self._fail(state, p, g, f"pattern node %{p.name} is already matched to {_describe(mapping[p])}")
            return
        if not isinstance(g, fx.Node) or g.op != p.op or g.target != p.target:
            self._fail(state, p, g, f"expected {_describe(p).split(' ', 1)[1].strip('()')}, found {_describe(g)}")
            return
        if g in mapping.values():
            self._fail(state, p, g, f"{_describe(g)} is already matched to another pattern node")
            return
        if p.op == "get_attr":  # a constant the pattern itself creates: values must agree
            if not torch.equal(self.owner[p].constant(p), self.graph.constant(g)):
                self._fail(state, p, g, "constant differs from the pattern's")
                return
            yield ({**mapping, p: g}, caps)
            return
        pa, ga = _all_args(p), _all_args(g)
        if len(pa) != len(ga):
            self._fail(state, p, g, f"{len(ga)} arguments, the pattern has {len(pa)}")
            return
        state = ({**mapping, p: g}, caps)
        orders = [pa]
        if p.target in COMMUTATIVE and len(pa) >= 2 and (p.target not in _ALPHA_OPS or pa[2] == 1):
            orders.append([pa[1], pa[0], *pa[2:]])
        for args in orders:
            yield from self.match_seq(args, ga, state, (p, g, None))

    def matches(self) -> Iterator[Match]:
        outs = self.t.outputs
        for anchor in self.by_target.get(outs[0].target, []):
            self._anchor = anchor
            for state in self.match_node(outs[0], anchor, ({}, {})):
                yield from self._rest(outs[1:], state, anchor)

    def _rest(self, outs, state, anchor) -> Iterator[Match]:
        if not outs:
            mapping, caps = state
            bindings = {name: mapping[ph] for name, ph in self.key.items() if ph in mapping}
            bindings.update({k: v for k, v in caps.items() if isinstance(k, str)})
            chosen = {k[1]: v for k, v in caps.items() if isinstance(k, tuple)}
            nodes = {p: g for p, g in mapping.items() if p.op != "placeholder"}
            yield Match(self.pattern, self.graph, nodes, bindings, [mapping[o] for o in self.t.outputs], chosen)
            return
        p = outs[0]
        if p in state[0]:
            yield from self._rest(outs[1:], state, anchor)
            return
        for g in self._candidates(p, state[0]):
            for s in self.match_node(p, g, state):
                yield from self._rest(outs[1:], s, anchor)

    def _candidates(self, p: fx.Node, mapping) -> list[fx.Node]:
        """Graph nodes that could match a further output ``p``: users of a value
        one of its inputs already bound (cheap), else every node of its op."""
        for arg in p.all_input_nodes:
            if arg in mapping:
                return [u for u in mapping[arg].users if u.target == p.target]
        return self.by_target.get(p.target, [])


_NO = object()


def find_matches(pattern: Pattern, graph) -> list[Match]:
    """Every occurrence of ``pattern`` in ``graph`` (overlapping ones included;
    one per set of matched nodes), in graph order of the anchors."""
    return _find(pattern, graph)[0]


def _find(pattern: Pattern, graph) -> tuple[list[Match], _Matcher]:
    matcher = _Matcher(pattern, graph)
    found, seen = [], set()
    for m in matcher.matches():
        # The same nodes matched in another role (commutative operands, the
        # outputs of a symmetric pattern permuted) are one occurrence: keep the
        # first, whose anchors come in graph order.
        key = frozenset(m.matched_nodes())
        if key in seen:
            continue
        seen.add(key)
        found.append(m)
    return found, matcher


def nearest_misses(pattern: Pattern, graph) -> list[NearMiss]:
    """For every node of the anchor's op where ``pattern`` does not match: the
    furthest it got there (:class:`NearMiss`), in graph order."""
    found, matcher = _find(pattern, graph)
    hit = {m.anchor for m in found}
    return [matcher.by_anchor[a] for a in matcher.by_target.get(pattern.anchor_target, [])
            if a not in hit and a in matcher.by_anchor]


def explain(pattern: Pattern, graph) -> str:
    """Why ``pattern`` does not match ``graph``: its nearest miss, or that
    the anchor op never occurs, or how many matches there are."""
    found, matcher = _find(pattern, graph)
    if found:
        return f"pattern {pattern.name!r} matches {len(found)} time(s), first at {_describe(found[0].anchor)}"
    return _miss_text(pattern, matcher)


def _miss_text(pattern: Pattern, matcher: _Matcher) -> str:
    target = pattern.anchor_target
    anchors = matcher.by_target.get(target, [])
    name = _describe(pattern.traced.outputs[0]).split(" ", 1)[1].strip("()")
    if not anchors:
        return f"pattern {pattern.name!r}: the anchor op {name} does not occur in the graph"
    m = matcher.miss
    # with alternatives the size of a complete match depends on the forms taken
    total = "" if pattern.alternatives else f" of {len(pattern.traced.nodes) + len(pattern.traced.params)}"
    where = f"pattern node %{m.pattern_node.name}" if isinstance(m.pattern_node, fx.Node) else "an argument"
    return (
        f"pattern {pattern.name!r}: no match among {len(anchors)} {name} node(s); nearest miss at anchor "
        f"{_describe(m.anchor)}: {where} vs graph {_describe(m.graph_node)}: {m.reason} "
        f"({m.progress}{total} pattern values matched)"
    )


# --------------------------------------------------------------------------
# rewriting

@dataclass
class PatternStats:
    found: int = 0
    rewritten: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)  # first few skip reasons, with node names
    nearest_miss: str | None = None
    # every skip as (kind, detail, match), for passes that report per node; not in as_dict()
    skips: list[tuple[str, str, Match]] = field(default_factory=list)

    def skip(self, kind: str, detail: str, match: Match | None = None) -> None:
        self.skipped[kind] = self.skipped.get(kind, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(f"{kind}: {detail}")
        if match is not None:
            self.skips.append((kind, detail, match))

    def as_dict(self) -> dict:
        out = {"found": self.found, "rewritten": self.rewritten, "skipped": dict(self.skipped)}
        if self.examples:
            out["skip_reasons"] = list(self.examples)
        if self.nearest_miss:
            out["nearest_miss"] = self.nearest_miss
        return out


@dataclass
class RewriteResult:
    stats: dict[str, PatternStats]

    @property
    def rewritten(self) -> int:
        return sum(s.rewritten for s in self.stats.values())

    @property
    def changed(self) -> bool:
        return self.rewritten > 0

    def as_dict(self) -> dict:
        return {name: s.as_dict() for name, s in self.stats.items()}


def _escaping(m: Match) -> str | None:
    inside = m.matched_nodes()
    outputs = set(m.outputs)
    for g in inside - outputs:
        for user in g.users:
            if user not in inside:
                return f"{_describe(g)} is also used by {_describe(user)} (used {len(g.users)} times)"
    return None


def _insert_point(graph, m: Match, order: dict[fx.Node, int]) -> fx.Node | None:
    """A node before which the replacement can go: after every bound input,
    before every outside user of the outputs; None when there is none."""
    inside = m.matched_nodes()
    inputs = [b for b in m.bindings.values() if isinstance(b, fx.Node)]
    last_input = max((order[n] for n in inputs), default=-1)
    users = [u for o in m.outputs for u in o.users if u not in inside]
    first_matched = min(inside, key=order.__getitem__)
    if order[first_matched] > last_input:
        return first_matched
    first_user = min(users, key=order.__getitem__, default=None)
    if first_user is None or order[first_user] <= last_input:
        return None
    return first_user


def _emit_traced(graph, m: Match, t: _Traced) -> list:
    unbound = [name for name in [*t.params, *m.pattern._scalar_kinds] if name not in m.bindings and (name in t.params or _uses_capture(t, name))]
    if unbound:
        raise PatternError(
            f"pattern {m.pattern.name!r}: the replacement reads {unbound}, which this match did not bind "
            f"(forms taken: {m.chosen}); write a build= callback for patterns whose forms bind different parameters"
        )
    env: dict[fx.Node, Any] = {ph: m.bindings[name] for name, ph in t.params.items()}
    table = {_Capture(k): m.bindings[k] for k in m.pattern._scalar_kinds if k in m.bindings}

    def sub(value):
        if isinstance(value, (list, tuple)):
            return type(value)(sub(v) for v in value)
        if isinstance(value, dict):
            return {k: sub(v) for k, v in value.items()}
        if isinstance(value, _Capture):
            return table[value]
        return value

    for node in t.graph.fx.nodes:
        if node.op == "get_attr":
            env[node] = graph.add_constant(t.graph.constant(node), node.target)
        elif node.op == "call_function":
            args = sub(fx.node.map_arg(node.args, env.__getitem__))
            kwargs = sub(fx.node.map_arg(node.kwargs, env.__getitem__))
            env[node] = graph.fx.call_function(node.target, args, kwargs)
    return [env[o] if isinstance(o, fx.Node) else o for o in t.outputs]


def _uses_capture(t: _Traced, name: str) -> bool:
    found = []
    for node in t.graph.fx.nodes:
        fx.node.map_aggregate((node.args, node.kwargs), lambda a: found.append(a) if a == _Capture(name) else None)
    return bool(found)


def _apply(graph, m: Match, at: fx.Node, p: Pass | None) -> list | str:
    """The replacement's outputs, or why the builder declined (a string)."""
    with graph.fx.inserting_before(at):
        if m.pattern.build is not None:
            try:
                out = m.pattern.build(m, graph)
            except Reject as e:
                return str(e)
            if out is None:
                return f"the builder declined the match at {_describe(m.anchor)}"
            out = list(out) if isinstance(out, (tuple, list)) else [out]
        else:
            out = _emit_traced(graph, m, m.pattern.replacement_traced)
    if len(out) != len(m.outputs):
        msg = f"pattern {m.pattern.name!r}: the replacement gave {len(out)} values for {len(m.outputs)} outputs"
        raise p.fail(msg, m.anchor) if p is not None else PatternError(msg)
    for old, new in zip(m.outputs, out):
        if isinstance(new, fx.Node):
            for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
                if key in old.meta:
                    new.meta.setdefault(key, old.meta[key])
        old.replace_all_uses_with(new)
    # Erase the matched nodes users-first; a node still used (a shared
    # constant read, say) stays for dce.
    for g in sorted(m.matched_nodes(), key=_order_key(graph), reverse=True):
        if not g.users:
            graph.fx.erase_node(g)
    return out


def _order_key(graph):
    order = {n: i for i, n in enumerate(graph.fx.nodes)}
    return order.__getitem__


def _refusal(pattern: Pattern, m: Match, claimed: set) -> tuple[str, str] | None:
    """(kind, detail) when ``m`` may not be rewritten, else None."""
    if m.matched_nodes() & claimed:
        return "overlap", f"at {_describe(m.anchor)}"
    why = _escaping(m)
    if why:
        return "escaping", why
    if pattern.check is not None:
        try:
            ok = pattern.check(m)
        except Reject as e:
            return "check", str(e)
        if not ok:
            return "check", f"check rejected the match at {_describe(m.anchor)}"
    return None


def rewrite(graph, patterns: Sequence[Pattern], *, pass_: Pass | None = None) -> RewriteResult:
    """Apply each pattern in turn to ``graph`` (an fxopt Graph), in place.

    For each pattern: find all matches, accept them in graph order unless
    they are unsafe (see the module docstring), rewrite the accepted ones.
    Returns per-pattern :class:`PatternStats`.
    """
    stats: dict[str, PatternStats] = {}
    for pattern in patterns:
        if pattern.name in stats:
            raise PatternError(f"two patterns are named {pattern.name!r}; names key the stats")
        st = stats[pattern.name] = PatternStats()
        found, matcher = _find(pattern, graph)
        # One occurrence per anchor: the ways one anchor matches (forms,
        # operand orders) are tried in the order found, the first safe one wins.
        by_anchor: dict[fx.Node, list[Match]] = {}
        for m in found:
            by_anchor.setdefault(m.anchor, []).append(m)
        st.found = len(by_anchor)
        if not found:
            if matcher.by_target.get(pattern.anchor_target):
                st.nearest_miss = _miss_text(pattern, matcher)
            continue
        claimed: set[fx.Node] = set()
        accepted: list[Match] = []
        for candidates in by_anchor.values():
            refusals = []
            for m in candidates:
                why = _refusal(pattern, m, claimed)
                if why is None:
                    claimed |= m.matched_nodes()
                    accepted.append(m)
                    break
                refusals.append((*why, m))
            else:
                st.skip(*refusals[0])
        replaced: dict[fx.Node, Any] = {}
        for m in accepted:
            # An earlier rewrite may have replaced a value this match reads.
            m.bindings = {k: replaced.get(v, v) if isinstance(v, fx.Node) else v for k, v in m.bindings.items()}
            order = {n: i for i, n in enumerate(graph.fx.nodes)}
            at = _insert_point(graph, m, order)
            if at is None:
                st.skip("placement", f"no position between the inputs and the users of {_describe(m.anchor)}", m)
                continue
            if pass_ is not None:
                pass_.current_node = m.anchor
            out = _apply(graph, m, at, pass_)
            if isinstance(out, str):
                st.skip("declined", out, m)
                continue
            replaced.update(zip(m.outputs, out))
            st.rewritten += 1
        if st.rewritten:
            graph.refresh_meta()  # later patterns' predicates may read shapes of new nodes
    return RewriteResult(stats)


class RewritePass(Pass):
    """Base of passes made of :class:`Pattern` s: set ``patterns`` (or override
    :meth:`active_patterns` to pick them from options) and write a docstring.
    Stats: ``rewritten`` (total) and one entry per pattern."""

    patterns: ClassVar[Sequence[Pattern]] = ()

    def active_patterns(self) -> Sequence[Pattern]:
        return self.patterns

    def run(self, graph) -> PassResult:
        try:
            result = rewrite(graph, self.active_patterns(), pass_=self)
        except PatternError as e:
            raise self.fail(str(e)) from e
        return PassResult(result.changed, {"rewritten": result.rewritten, **result.as_dict()})
