"""Matching: a backtracking match of one pattern at an anchor node, with the
furthest failure recorded (the nearest miss) for explanations."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx as fx

from ...ir.nodes import call_args, same_shape, val
from .pattern import Pattern, Reject
from .trace import Capture, Size

aten = torch.ops.aten

COMMUTATIVE = {aten.add.Tensor, aten.mul.Tensor, aten.add.Scalar, aten.mul.Scalar}
_ALPHA_OPS = {aten.add.Tensor, aten.add.Scalar}


class GraphIndex:
    """The graph's call nodes by op, in graph order: built once per walk and
    shared by every pattern matched during it."""

    def __init__(self, graph):
        self.by_target: dict[Any, list[fx.Node]] = {}
        self.order: dict[fx.Node, int] = {}
        for i, n in enumerate(graph.fx.nodes):
            self.order[n] = i
            if n.op == "call_function":
                self.by_target.setdefault(n.target, []).append(n)

    def get(self, target, default=()):
        return self.by_target.get(target, default)

    def of(self, targets) -> list[fx.Node]:
        """The nodes calling any of ``targets``, in graph order."""
        targets = list(targets)
        if len(targets) == 1:
            return list(self.get(targets[0]))
        return sorted((n for t in targets for n in self.get(t)), key=self.order.__getitem__)


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


def describe(x) -> str:
    if isinstance(x, fx.Node):
        t = x.target
        what = getattr(t, "__name__", str(t)) if x.op == "call_function" else x.op
        if isinstance(t, torch._ops.OpOverload):
            what = f"{t.namespace}.{t._opname}.{t._overloadname}"
        return f"%{x.name} ({what})"
    return repr(x)




def _literal_equal(p, g) -> bool:
    if isinstance(g, fx.Node):
        return False
    numbers = (int, float)
    if isinstance(p, numbers) and isinstance(g, numbers) and not isinstance(p, bool) and not isinstance(g, bool):
        return p == g
    return type(p) is type(g) and p == g


class Matcher:
    """Backtracking match of one pattern against one graph, recording the
    furthest failure (overall, and per anchor) for :func:`explain`.

    State: ``(mapping, caps)``: pattern node -> graph node (a tensor parameter
    is keyed by one placeholder per name, so a name used in several forms binds
    one value), and capture name -> literal. The form chosen for a parameter
    with alternatives is kept in ``caps`` under ``("form", name)``: a key no
    capture can have, so that backtracking undoes it with the rest."""

    def __init__(self, pattern: Pattern, graph, index: GraphIndex | None = None):
        self.pattern = pattern
        self.graph = graph
        self.t = pattern.traced
        self.alts = pattern.traced_alternatives
        self.param_of: dict[fx.Node, str] = {}
        self.bare: set[fx.Node] = set()  # a form's own parameter of the name it is a form of
        self.owner: dict[fx.Node, Any] = {}  # pattern constant -> the traced graph holding it
        for t in pattern.all_traced():
            for name, ph in t.params.items():
                self.param_of[ph] = name
            for n in t.nodes:
                self.owner[n] = t.graph
        for param, forms in self.alts.items():
            for _, t in forms:
                if not isinstance(t, str) and param in t.params:
                    self.bare.add(t.params[param])
        self.key = pattern.placeholders()
        self.miss = NearMiss()
        self.by_anchor: dict[fx.Node, NearMiss] = {}
        self.index = index if index is not None else GraphIndex(graph)
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
            self._fail(state, p, g, f"where[{name!r}] ({getattr(pred, '__name__', 'predicate')}) rejected {describe(value)}{' ' + why if why else ''}")
        return ok

    def _literal(self, name: str, g):
        """The value a capture of ``name`` takes from argument ``g``, else _NO."""
        kind = self.pattern.scalar_kinds.get(name, float)
        if kind is torch.dtype:
            return g if isinstance(g, torch.dtype) else _NO
        if kind is Size:  # a literal size, or a symbolic one computed in the graph
            if isinstance(g, fx.Node):
                return g if isinstance(val(g), (int, torch.SymInt)) and not isinstance(val(g), bool) else _NO
            return g if isinstance(g, int) and not isinstance(g, bool) else _NO
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
        if isinstance(p, Capture):
            value = self._literal(p.name, g)
            if value is _NO:
                kind = self.pattern.scalar_kinds.get(p.name, float)
                expects = ("a dtype" if kind is torch.dtype else "a size (an int or a symbolic size)" if kind is Size
                           else "a literal number" + (" or a one-element constant" if kind is float else ""))
                self._arg_fail(state, at, f"scalar {p.name!r} expects {expects}, found {describe(g)}")
                return
            if p.name in caps:
                if _same_scalar(caps[p.name], value):
                    yield state
                else:
                    self._arg_fail(state, at, f"scalar {p.name!r} is already captured as {caps[p.name]!r}, found {value!r}")
                return
            if self._predicate(state, p.name, value, *(at[:2] if at else (None, g))):
                yield (mapping, {**caps, p.name: value})
            return
        if isinstance(p, (list, tuple)):
            if not isinstance(g, (list, tuple)) or len(g) != len(p):
                self._arg_fail(state, at, f"expected a list like {p!r}, found {describe(g)}")
                return
            yield from self.match_seq(list(p), list(g), state, at)
            return
        if not _literal_equal(p, g):
            self._arg_fail(state, at, f"literal {p!r} expected, found {describe(g)}")
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
            if self._same_binding(state, key, g, f"parameter {name!r} is already bound to"):
                yield state
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

    def _same_binding(self, state, key, g, already: str) -> bool:
        """``key`` is bound already: to ``g`` (True), or to another node (the failure recorded)."""
        if state[0][key] is g:
            return True
        self._fail(state, key, g, f"{already} {describe(state[0][key])}")
        return False

    @staticmethod
    def _computing_targets(mapping) -> set:
        return {g for p, g in mapping.items() if p.op != "placeholder"}

    def match_node(self, p: fx.Node, g, state) -> Iterator[tuple]:
        mapping, caps = state
        if p in mapping:
            if self._same_binding(state, p, g, f"pattern node %{p.name} is already matched to"):
                yield state
            return
        if not isinstance(g, fx.Node) or g.op != p.op or g.target not in self.pattern.same_ops(p.target):
            self._fail(state, p, g, f"expected {describe(p).split(' ', 1)[1].strip('()')}, found {describe(g)}")
            return
        if g in mapping.values():
            self._fail(state, p, g, f"{describe(g)} is already matched to another pattern node")
            return
        if p.op == "get_attr":  # a constant the pattern itself creates: values must agree
            if not torch.equal(self.owner[p].constant(p), self.graph.constant(g)):
                self._fail(state, p, g, "constant differs from the pattern's")
                return
            yield ({**mapping, p: g}, caps)
            return
        pa, ga = call_args(p), call_args(g)
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
        for anchor in self.index.of(self.pattern.same_ops(self.t.outputs[0].target)):
            yield from self.matches_at(anchor)

    def matches_at(self, anchor: fx.Node) -> Iterator[Match]:
        """Every way the pattern matches with its first output at ``anchor``."""
        outs = self.t.outputs
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
                ops = self.pattern.same_ops(p.target)
                return [u for u in mapping[arg].users if u.target in ops]
        return self.index.of(self.pattern.same_ops(p.target))


_NO = object()


def _same_scalar(a, b) -> bool:
    """Two captured values are one: equal literals, or the same symbolic size
    (two ``sym_size`` nodes of one symbol count as one size)."""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        if a is b:
            return True
        va = val(a) if isinstance(a, fx.Node) else a
        vb = val(b) if isinstance(b, fx.Node) else b
        return isinstance(va, (int, torch.SymInt)) and isinstance(vb, (int, torch.SymInt)) and same_shape([va], [vb])
    return a == b


def find_matches(pattern: Pattern, graph) -> list[Match]:
    """Every occurrence of ``pattern`` in ``graph`` (overlapping ones included;
    one per set of matched nodes), in graph order of the anchors."""
    matcher = Matcher(pattern, graph)
    return occurrences(matcher.matches())


def match_at(pattern: Pattern, node: fx.Node, graph, index: GraphIndex | None = None) -> Match | None:
    """The first match of ``pattern`` whose first output is ``node`` and that
    its ``check`` accepts, or None: for a pass that asks whether one value is
    written in a given form (a head split, a head merge) while deciding about
    a larger structure. :func:`explain_at` says why not."""
    return _at(pattern, node, graph, index)[0]


def explain_at(pattern: Pattern, node: fx.Node, graph) -> str:
    """Why ``pattern`` does not match with its first output at ``node``: the
    furthest it got there, or the check's reason; '' when it matches."""
    m, why = _at(pattern, node, graph, None)
    return "" if m is not None else why


def _at(pattern: Pattern, node, graph, index) -> tuple[Match | None, str]:
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return None, f"{describe(node)} is not an op"
    matcher = Matcher(pattern, graph, index)
    why = ""
    for m in matcher.matches_at(node):
        if pattern.check is None:
            return m, ""
        try:
            if pattern.check(m):
                return m, ""
            why = why or f"check rejected the match at {describe(node)}"
        except Reject as e:
            why = why or str(e)
    if not why:
        miss = matcher.by_anchor.get(node)
        if miss is None:
            why = f"{describe(node)} is not the pattern's anchor op"
        else:
            where = f"pattern node %{miss.pattern_node.name}" if isinstance(miss.pattern_node, fx.Node) else "an argument"
            why = f"{where} vs graph {describe(miss.graph_node)}: {miss.reason}"
    return None, why


def occurrences(matches) -> list[Match]:
    """One match per set of matched nodes: the same nodes matched in another
    role (commutative operands, the outputs of a symmetric pattern permuted)
    are one occurrence; the first, whose anchors come in graph order, is kept."""
    found, seen = [], set()
    for m in matches:
        key = frozenset(m.matched_nodes())
        if key in seen:
            continue
        seen.add(key)
        found.append(m)
    return found


def _find(pattern: Pattern, graph) -> tuple[list[Match], Matcher]:
    matcher = Matcher(pattern, graph)
    return occurrences(matcher.matches()), matcher


def nearest_misses(pattern: Pattern, graph) -> list[NearMiss]:
    """For every node of the anchor's op where ``pattern`` does not match: the
    furthest it got there (:class:`NearMiss`), in graph order."""
    found, matcher = _find(pattern, graph)
    hit = {m.anchor for m in found}
    return [matcher.by_anchor[a] for a in matcher.index.of(pattern.anchor_ops)
            if a not in hit and a in matcher.by_anchor]


def explain(pattern: Pattern, graph) -> str:
    """Why ``pattern`` does not match ``graph``: its nearest miss, or that
    the anchor op never occurs, or how many matches there are."""
    found, matcher = _find(pattern, graph)
    if found:
        return f"pattern {pattern.name!r} matches {len(found)} time(s), first at {describe(found[0].anchor)}"
    return miss_text(pattern, matcher)


def miss_text(pattern: Pattern, matcher: Matcher) -> str:
    anchors = matcher.index.of(pattern.anchor_ops)
    name = describe(pattern.traced.outputs[0]).split(" ", 1)[1].strip("()")
    if not anchors:
        return f"pattern {pattern.name!r}: the anchor op {name} does not occur in the graph"
    m = matcher.miss
    # with alternatives the size of a complete match depends on the forms taken
    total = "" if pattern.alternatives else f" of {len(pattern.traced.nodes) + len(pattern.traced.params)}"
    where = f"pattern node %{m.pattern_node.name}" if isinstance(m.pattern_node, fx.Node) else "an argument"
    return (
        f"pattern {pattern.name!r}: no match among {len(anchors)} {name} node(s); nearest miss at anchor "
        f"{describe(m.anchor)}: {where} vs graph {describe(m.graph_node)}: {m.reason} "
        f"({m.progress}{total} pattern values matched)"
    )

