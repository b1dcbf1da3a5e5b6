"""Analyses: facts about a graph that several passes read, computed once.

An analysis is a small class whose ``run(graph)`` returns a result object (a
proof that a mask is causal, the live range of each value, which channels of
one linear feed which channels of the next). Passes ask for it through
``self.analysis(Kind, graph)``; the :class:`AnalysisManager` computes it on
the first request and hands back the cached result until a pass that changed
the graph and did not declare it preserved has run, as LLVM's new pass manager
does with ``PreservedAnalyses``::

    class Liveness(Analysis):
        '''Last user of each value, in graph order.'''

        def run(self, graph):
            ...

    class MyPass(Pass):
        preserves = (Liveness,)      # this pass keeps liveness valid

        def run(self, graph):
            live = self.analysis(Liveness, graph)

A pass that reports ``changed=False`` preserves everything; one that changed
the graph preserves only the analyses it names in ``preserves`` (or in
``PassResult(preserved=...)`` for a decision made at run time).
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable


class Analysis:
    """Base class of analyses. Subclasses implement ``run(graph)``; an
    analysis may ask for others through ``manager.get`` (passed as
    ``self.manager``) and must not change the graph."""

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if not cls.__dict__.get("name"):
            cls.name = cls.__name__

    def __init__(self, manager: "AnalysisManager"):
        self.manager = manager

    def run(self, graph) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError(f"analysis {self.name!r} does not implement run()")


class AnalysisManager:
    """Caches analysis results per graph until they are invalidated.

    ``computed`` counts how often each analysis actually ran, so tests can
    assert that a result was reused and that invalidation happened."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, type[Analysis]], tuple[Any, Any]] = {}
        self.computed: dict[str, int] = {}

    def get(self, kind: type[Analysis], graph) -> Any:
        if not (isinstance(kind, type) and issubclass(kind, Analysis)):
            raise TypeError(f"analysis(...) takes an Analysis subclass, got {kind!r}")
        key = (id(graph.fx), kind)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is graph.fx:
            return hit[1]
        result = kind(self).run(graph)
        self._cache[key] = (graph.fx, result)
        self.computed[kind.name] = self.computed.get(kind.name, 0) + 1
        return result

    def cached(self, kind: type[Analysis], graph) -> bool:
        hit = self._cache.get((id(graph.fx), kind))
        return hit is not None and hit[0] is graph.fx

    def invalidate(self, graph, preserved: Iterable[type[Analysis]] = ()) -> None:
        """Drop every cached result for ``graph`` except the ``preserved`` kinds."""
        keep = set(preserved)
        for key in [k for k in self._cache if k[0] == id(graph.fx) and k[1] not in keep]:
            del self._cache[key]

    def clear(self) -> None:
        self._cache.clear()
