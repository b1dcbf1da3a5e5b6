"""Patterns: one rewrite rule each (a traced pattern and a traced replacement
or a builder), predicates for ``where=``, and ``Reject``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from ...ir.nodes import val
from .trace import DEFAULT_CLEANUP, PatternError, Traced, signature, trace_function, trace_functions


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
# patterns and matches

@dataclass(eq=False)
class Pattern:
    """One rewrite rule: ``pattern`` (traced) -> ``replacement`` (traced) or ``build`` (callback).

    ``where``: parameter -> predicate; ``check``: predicate on the whole
    :class:`Match`; ``inputs``: parameter -> example shape, tensor, or (for an
    int or dtype capture) example value used for tracing; ``alternatives``:
    parameter -> {form name: function | parameter name}, the ways that spot
    may be written (see the package docstring).
    """

    name: str
    pattern: Callable
    replacement: Callable | None = None
    build: Callable | None = None
    where: dict[str, Callable] = field(default_factory=dict)
    check: Callable | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    alternatives: dict[str, dict[str, Callable | str]] = field(default_factory=dict)
    # what makes a traced function look like a model's graph: pipeline text
    # (passes from the registry) or a callable taking the traced graph
    cleanup: Any = DEFAULT_CLEANUP
    # sets of ops that stand for each other: a pattern node calling one matches
    # a graph node calling any (``{view, reshape, _unsafe_view}``: tracing
    # writes every reshape of a contiguous tensor as ``view``)
    op_classes: Any = ()

    def __post_init__(self):
        if (self.replacement is None) == (self.build is None):
            raise PatternError(f"pattern {self.name!r}: give exactly one of replacement= (traced) or build= (callback)")
        tensors, scalars = signature(self.pattern, f"pattern {self.name!r}")
        tensors, scalars = list(tensors), dict(scalars)
        for param, forms in self.alternatives.items():
            if not isinstance(forms, dict) or not forms:
                raise PatternError(f"pattern {self.name!r}: alternatives[{param!r}] must be a non-empty dict of form name -> function or parameter name")
            for form_name, form in forms.items():
                what = f"pattern {self.name!r}, alternative {param}={form_name}"
                if isinstance(form, str):
                    t, s = [form], {}
                elif callable(form):
                    t, s = signature(form, what)
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
        classes = [frozenset(c) for c in self.op_classes]
        self._op_class = {op: c for c in classes for op in c}
        self._tensor_names = tensors
        self.scalar_kinds = scalars
        self._traced: Traced | None = None
        self._alts: dict[str, list[tuple[str, Traced | str]]] | None = None
        self._traced_forms: dict[tuple[str, str], Traced] = {}
        self._replacement: Traced | None = None

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
        for i, (name, kind) in enumerate(self.scalar_kinds.items()):
            if kind is float:
                out[name] = 0.000123456789 + i * 1.0e-9
            elif kind is torch.dtype:
                out[name] = self.inputs.get(name, torch.float64)
            else:  # int and Size
                out[name] = int(self.inputs.get(name, 7919 + 104729 * i))
        return out

    def _sentinels_for(self, fn: Callable, what: str) -> dict[str, Any]:
        _, scalars = signature(fn, what)
        all_ = self.sentinels()
        return {k: all_[k] for k in scalars}

    @property
    def traced(self) -> Traced:
        if self._traced is None:
            what = f"pattern {self.name!r}"
            forms = [(param, form_name, form) for param, fs in self.alternatives.items()
                     for form_name, form in fs.items() if not isinstance(form, str)]
            calls = [(self.pattern, what, self._sentinels_for(self.pattern, what))]
            for param, form_name, form in forms:
                w = f"pattern {self.name!r}, alternative {param}={form_name}"
                calls.append((form, w, self._sentinels_for(form, w)))
            t, *traced_forms = trace_functions(calls, self.inputs, self.cleanup)
            self._traced_forms = {(param, form_name): tf for (param, form_name, _), tf in zip(forms, traced_forms)}
            bad = [o for o in t.outputs if not (isinstance(o, fx.Node) and o.op == "call_function")]
            if bad:
                raise PatternError(f"pattern {self.name!r}: every output must be computed by an op, not an input or literal ({bad})")
            self._traced = t
        return self._traced

    @property
    def traced_alternatives(self) -> dict[str, list[tuple[str, "Traced | str"]]]:
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

    def all_traced(self) -> list[Traced]:
        return [self.traced] + [t for forms in self.traced_alternatives.values() for _, t in forms if not isinstance(t, str)]

    def placeholders(self) -> dict[str, fx.Node]:
        """One placeholder per tensor parameter name (the pattern's own first)."""
        out: dict[str, fx.Node] = {}
        for t in self.all_traced():
            for name, ph in t.params.items():
                out.setdefault(name, ph)
        return out

    @property
    def replacement_traced(self) -> Traced:
        if self._replacement is None:
            what = f"replacement of pattern {self.name!r}"
            tensors, scalars = signature(self.replacement, what)
            names = [*tensors, *scalars]
            phs = self.placeholders()
            extra = [n for n in names if n not in phs and n not in self.scalar_kinds]
            if extra:
                raise PatternError(f"{what}: parameters {extra} are not parameters of the pattern")
            # Parameters keep the pattern's kinds; tensors are traced shaped like the pattern's.
            inputs = {}
            for n in (n for n in names if n in phs):
                v = val(phs[n])
                inputs[n] = torch.zeros(v.shape, dtype=v.dtype).normal_() if v.dtype.is_floating_point else torch.zeros(v.shape, dtype=v.dtype)
            t = trace_function(self.replacement, what, inputs, {k: v for k, v in self.sentinels().items() if k in names}, self.cleanup)
            if len(t.outputs) != len(self.traced.outputs):
                raise PatternError(f"{what} returns {len(t.outputs)} values but the pattern returns {len(self.traced.outputs)}")
            self._replacement = t
        return self._replacement

    @property
    def anchor_target(self):
        return self.traced.outputs[0].target

    def same_ops(self, target) -> frozenset:
        """``target`` and the ops that stand for it (``op_classes``)."""
        return self._op_class.get(target) or frozenset((target,))

    @property
    def anchor_ops(self) -> frozenset:
        """The ops a graph node may call to anchor this pattern."""
        return self.same_ops(self.anchor_target)

    def __repr__(self) -> str:
        return f"Pattern({self.name!r})"


