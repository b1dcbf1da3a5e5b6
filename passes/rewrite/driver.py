"""The driver: a set of patterns indexed by anchor op, applied to a graph in
one walk per round, with the safety checks and per-pattern stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch.fx as fx

from ..base import Pass, PassResult
from .match import GraphIndex, Match, Matcher, describe, miss_text, occurrences
from .pattern import Pattern, Reject
from .trace import Capture, PatternError, Traced, uses_capture

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
                return f"{describe(g)} is also used by {describe(user)} (used {len(g.users)} times)"
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


def _emit_traced(graph, m: Match, t: Traced) -> list:
    unbound = [name for name in [*t.params, *m.pattern.scalar_kinds] if name not in m.bindings and (name in t.params or uses_capture(t, name))]
    if unbound:
        raise PatternError(
            f"pattern {m.pattern.name!r}: the replacement reads {unbound}, which this match did not bind "
            f"(forms taken: {m.chosen}); write a build= callback for patterns whose forms bind different parameters"
        )
    env: dict[fx.Node, Any] = {ph: m.bindings[name] for name, ph in t.params.items()}
    table = {Capture(k): m.bindings[k] for k in m.pattern.scalar_kinds if k in m.bindings}

    def sub(value):
        if isinstance(value, (list, tuple)):
            return type(value)(sub(v) for v in value)
        if isinstance(value, dict):
            return {k: sub(v) for k, v in value.items()}
        if isinstance(value, Capture):
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


def _apply(graph, m: Match, at: fx.Node, p: Pass | None) -> list | str:
    """The replacement's outputs, or why the builder declined (a string)."""
    with graph.fx.inserting_before(at):
        if m.pattern.build is not None:
            try:
                out = m.pattern.build(m, graph)
            except Reject as e:
                return str(e)
            if out is None:
                return f"the builder declined the match at {describe(m.anchor)}"
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
        return "overlap", f"at {describe(m.anchor)}"
    why = _escaping(m)
    if why:
        return "escaping", why
    if pattern.check is not None:
        try:
            ok = pattern.check(m)
        except Reject as e:
            return "check", str(e)
        if not ok:
            return "check", f"check rejected the match at {describe(m.anchor)}"
    return None



class PatternSet:
    """Patterns applied in order, indexed by their anchor op (as Inductor's
    ``PatternMatcherPass`` keys its patterns): one walk over the graph visits
    each node once and tries only the patterns anchored on its op.

    Each pattern sees the graph as the patterns before it left it: the matches
    of one walk serve until a pattern rewrites something, and the patterns
    after it are matched again by a new walk (so one walk, plus one per
    pattern that changed the graph, instead of one per pattern)."""

    def __init__(self, patterns: Sequence[Pattern]):
        self.patterns = list(patterns)
        seen: set[str] = set()
        for p in self.patterns:
            if p.name in seen:
                raise PatternError(f"two patterns are named {p.name!r}; names key the stats")
            seen.add(p.name)
        self.walks = 0  # graph walks made by the last rewrite(), for tests and stats

    def anchored(self, patterns: Sequence[Pattern]) -> dict[Any, list[Pattern]]:
        """anchor op -> the patterns anchored on it, in order (traces them)."""
        by_op: dict[Any, list[Pattern]] = {}
        for p in patterns:
            for op in p.anchor_ops:
                by_op.setdefault(op, []).append(p)
        return by_op

    def find(self, graph, patterns: Sequence[Pattern] | None = None) -> dict[Pattern, tuple[list[Match], Matcher]]:
        """One walk: every occurrence of each pattern (see :func:`occurrences`)
        with the matcher that found them (for the nearest miss)."""
        patterns = self.patterns if patterns is None else patterns
        by_op = self.anchored(patterns)
        index = GraphIndex(graph)
        matchers = {p: Matcher(p, graph, index) for p in patterns}
        found: dict[Pattern, list[Match]] = {p: [] for p in patterns}
        for node in graph.fx.nodes:
            if node.op != "call_function":
                continue
            for p in by_op.get(node.target, ()):
                found[p].extend(matchers[p].matches_at(node))
        self.walks += 1
        return {p: (occurrences(found[p]), matchers[p]) for p in patterns}

    def rewrite(self, graph, *, pass_: Pass | None = None) -> "RewriteResult":
        """Apply the patterns to ``graph`` (an fxopt Graph) in place; see :func:`rewrite`."""
        stats = {p.name: PatternStats() for p in self.patterns}
        self.walks = 0
        start = 0
        while start < len(self.patterns):
            pending = self.patterns[start:]
            found = self.find(graph, pending)
            for i, pattern in enumerate(pending):
                matches, matcher = found[pattern]
                st = stats[pattern.name] = PatternStats()
                if _rewrite_matches(graph, pattern, matches, matcher, st, pass_):
                    start += i + 1
                    break
            else:
                break
        return RewriteResult(stats)


def _rewrite_matches(graph, pattern: Pattern, found: list[Match], matcher: Matcher, st: "PatternStats", pass_) -> bool:
    """Accept ``found`` in graph order unless unsafe, rewrite the accepted ones;
    True when the graph changed."""
    # One occurrence per anchor: the ways one anchor matches (forms,
    # operand orders) are tried in the order found, the first safe one wins.
    by_anchor: dict[fx.Node, list[Match]] = {}
    for m in found:
        by_anchor.setdefault(m.anchor, []).append(m)
    st.found = len(by_anchor)
    if not found:
        if matcher.index.of(pattern.anchor_ops):
            st.nearest_miss = miss_text(pattern, matcher)
        return False
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
            st.skip("placement", f"no position between the inputs and the users of {describe(m.anchor)}", m)
            continue
        if pass_ is not None:
            pass_.current_node = m.anchor
        out = _apply(graph, m, at, pass_)
        if isinstance(out, str):
            st.skip("declined", out, m)
            continue
        replaced.update(zip(m.outputs, out))
        st.rewritten += 1
    if pass_ is not None:
        pass_.current_node = None  # the anchors are erased: a later failure must not name them
    if st.rewritten:
        graph.refresh_meta()  # later patterns' predicates may read shapes of new nodes
    return st.rewritten > 0


def rewrite(graph, patterns: Sequence[Pattern], *, pass_: Pass | None = None) -> RewriteResult:
    """Apply each pattern in turn to ``graph`` (an fxopt Graph), in place.

    For each pattern: find all matches, accept them in graph order unless
    they are unsafe (see the package docstring), rewrite the accepted ones.
    Matching goes through a :class:`PatternSet` (one walk of the graph for
    all patterns until one of them changes it). Returns per-pattern
    :class:`PatternStats`.
    """
    return PatternSet(patterns).rewrite(graph, pass_=pass_)


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
