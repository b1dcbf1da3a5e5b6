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
  cleaned by the pattern's ``cleanup`` (default the pipeline
  ``canonicalize(linear=false),dce``: identity views/casts and asserts dropped;
  any pipeline text or a callable taking the graph), so they hold the op set a
  canonicalized model graph holds. Tracing
  happens once, lazily, and is cached on the :class:`Pattern`. Example tensors
  are float32 of shape ``(8, 8)`` unless ``inputs={"name": shape | tensor}``
  says otherwise; shapes only need to make the function run.
* **Wildcards.** Every tensor parameter of the pattern function matches any
  graph value; the same parameter used twice must bind the same value.
* **Sizes.** A parameter annotated :class:`Size` matches a literal int or a
  symbolic size of the graph (a ``sym_size`` node: ``view(x, [B, S, 12, 64])``
  with a dynamic batch and sequence), traced with the example value given in
  ``inputs`` (or a large prime). Used twice, it must bind one size (two
  ``sym_size`` nodes of one symbol count as one). A replacement may use it.
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
* **Op classes.** ``op_classes=[{aten.view.default, aten.reshape.default}]``:
  ops that stand for each other (tracing writes every reshape of a contiguous
  tensor as ``view``; a graph may hold any of them).
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

* **Driver.** :class:`PatternSet` keeps the patterns keyed by their anchor op
  (the op of their first output): one walk over the graph visits each node
  once and tries only the patterns anchored there. Patterns still apply in
  order, each seeing what the ones before it rewrote (a pattern that changed
  the graph starts a new walk for the patterns after it). :func:`rewrite` and
  :class:`RewritePass` use it.
* **Asking about one node.** :func:`match_at` matches a pattern with its first
  output at a given node (:func:`explain_at` says why not) (a pass deciding about a larger structure asks
  whether a value is a head split, say); :func:`function` builds a pattern
  function whose parameters depend on a setting (n linears need n weights).

No module names are involved anywhere: matching is on the graph's ops alone.

Layout: :mod:`.trace` (signatures, captures, sizes, tracing), :mod:`.pattern`
(:class:`Pattern`, predicates), :mod:`.match` (the matcher, explanations),
:mod:`.driver` (:class:`PatternSet`, :func:`rewrite`, :class:`RewritePass`).
"""

from .driver import PatternSet, PatternStats, RewritePass, RewriteResult, rewrite
from .match import (
    COMMUTATIVE, GraphIndex, Match, Matcher, NearMiss, describe, explain, explain_at, find_matches, match_at, nearest_misses,
)
from .pattern import Pattern, Reject, all_of, has_dtype, has_rank, is_constant, is_not_constant
from .trace import DEFAULT_CLEANUP, DEFAULT_SHAPE, PatternError, Size, function

__all__ = [
    "Pattern", "PatternError", "Reject", "Size", "function", "DEFAULT_CLEANUP", "DEFAULT_SHAPE",
    "is_constant", "is_not_constant", "has_rank", "has_dtype", "all_of",
    "Match", "NearMiss", "Matcher", "GraphIndex", "COMMUTATIVE", "describe", "find_matches", "match_at", "explain_at",
    "nearest_misses", "explain", "PatternSet", "PatternStats", "RewriteResult", "rewrite", "RewritePass",
]
