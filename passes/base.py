"""The pass base class, its typed options and its result.

A pass is a small class registered by name::

    @register_pass("strip-dropout")
    class StripDropout(Pass):
        '''Replaces inference-time dropout by its input.'''
        keep_training_dropout = Option(False, help="leave dropout(train=True) alone")

        def run(self, graph):
            removed = 0
            for node in self.walk(graph, target=torch.ops.aten.dropout.default):
                ...
            return PassResult(changed=removed > 0, stats={"removed": removed})

Options are validated when the pass is constructed, so a pipeline with a bad
option fails before any pass runs. Ordering and preconditions are declared as
class attributes and checked by the pass manager up front:

* ``runs_after`` / ``runs_before``: pass names that, when present in the same
  pipeline, must come earlier / later;
* ``requires`` / ``ensures``: graph properties (strings) a pass needs / establishes;
* ``needs``: inputs the pass takes from the run's context (e.g. ``calibration_data``);
* ``preserves``: analyses (:mod:`.analysis`) still valid after the pass changed
  the graph; every other cached analysis is dropped. ``self.analysis(Kind, graph)``
  reads one, computed once and shared by the passes of a run.

Passes edit ``graph.fx`` in place and never write into an existing constant
tensor (graphs share constants with their copies); new constants go through
``graph.add_constant``. Shape metadata of new nodes is filled in by the manager.
"""

from __future__ import annotations

import builtins
import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch.fx as fx

from .analysis import Analysis, AnalysisManager

_MISSING = object()


class OptionError(ValueError):
    """A bad pass option; ``option`` names it (None when the fault lies
    between options), so pipeline text can point at it."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


def _hashable(value: Any) -> Any:
    """Lists (nested ones too) as tuples: option values are compared and hashed."""
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


class Option:
    """A typed pass option with a default, optional choices and a check."""

    def __init__(self, default: Any = _MISSING, type: type | tuple | None = None, *, choices=None, check=None, help: str = ""):
        if type is None:
            if default is _MISSING or default is None:
                raise TypeError("an Option whose default is None or missing needs an explicit type")
            type = builtins.type(default)
        self.default = default
        self.type = type
        self.choices = tuple(choices) if choices is not None else None
        self.check = check
        self.help = help
        self.name = "?"

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def type_name(self) -> str:
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        return " | ".join(t.__name__ for t in types) + (" | None" if self.default is None else "")

    def validate(self, owner: str, value: Any) -> Any:
        where = f"pass {owner!r}: option {self.name!r}"
        if value is None and self.default is None:
            return None
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if tuple in types and isinstance(value, (list, tuple)):
            value = _hashable(value)
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            raise OptionError(f"{where} expects {self.type_name()}, got {value!r}", self.name)
        if self.choices is not None and value not in self.choices:
            raise OptionError(f"{where} must be one of {list(self.choices)}, got {value!r}", self.name)
        if self.check is not None:
            try:
                problem = self.check(value)
            except (TypeError, ValueError, LookupError) as e:  # a check written for the values it expects
                problem = f"not a valid value ({type(e).__name__}: {e})"
            if problem:
                raise OptionError(f"{where}: {problem} (got {value!r})", self.name)
        return value


def did_you_mean(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ''. A name
    that differs only in case or in ``_`` for ``-`` counts as closest: difflib
    scores ``DCE`` too far from ``dce`` to suggest it."""
    choices = list(choices)
    key = name.lower().replace("_", "-")
    hint = [c for c in choices if c.lower().replace("_", "-") == key] or difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


@dataclass
class PassResult:
    """What a pass did. ``preserved``, when given, overrides the pass's
    ``preserves`` for this run (analyses still valid although it changed the graph).
    ``sharded_outputs``: the flat output positions whose shapes the pass
    changed on purpose (a tensor-parallel rank returns its heads of the
    key/value cache, a shrunk generation graph its kept heads); every other
    output must keep its dtype and shape."""

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    preserved: tuple[type[Analysis], ...] | None = None
    sharded_outputs: tuple[int, ...] = ()


class PassError(RuntimeError):
    """A pass failed; names the pass and, where known, the node."""

    def __init__(self, message: str, *, pass_name: str | None = None, node: fx.Node | None = None):
        self.pass_name = pass_name
        self.node = node
        self.reason = message
        super().__init__(self._format())

    def _format(self) -> str:
        parts = []
        if self.pass_name:
            parts.append(f"pass {self.pass_name!r} failed")
        if self.node is not None:
            parts.append(f"at node {self.node.name!r} ({self.node.format_node()})")
        prefix = " ".join(parts)
        return f"{prefix}: {self.reason}" if prefix else self.reason


@dataclass
class PassContext:
    """Inputs a run provides to passes that declare them in ``needs``."""

    inputs: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.inputs[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.inputs.get(key, default)

    def __contains__(self, key: str) -> bool:
        return self.inputs.get(key) is not None


class Pass:
    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    runs_after: ClassVar[tuple[str, ...]] = ()
    runs_before: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    ensures: ClassVar[tuple[str, ...]] = ()
    needs: ClassVar[tuple[str, ...]] = ()
    preserves: ClassVar[tuple[type[Analysis], ...]] = ()
    # Relative error (x output scale) a pass may add; lossy passes raise it.
    numerics_tolerance: ClassVar[float] = 1e-4

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        opts = dict(getattr(cls, "options", {}))
        for key, value in list(vars(cls).items()):
            if isinstance(value, Option):
                value.name = key
                opts[key] = value
        cls.options = opts

    def __init__(self, **options: Any):
        label = self.name or type(self).__name__
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            bad = unknown[0]
            valid = ", ".join(self.options) or "none"
            raise OptionError(f"pass {label!r} has no option {bad!r}{did_you_mean(bad, self.options)}; valid options: {valid}", bad)
        for key, opt in self.options.items():
            if key in options:
                value = opt.validate(label, options[key])
            elif opt.required:
                raise OptionError(f"pass {label!r}: option {key!r} is required")
            else:
                value = opt.default
            setattr(self, key, value)
        self.given_options = frozenset(options)  # what the user set, for checks between options
        self.validate_options()
        self.context = PassContext()
        self.analyses = AnalysisManager()  # the pass manager hands in the run's shared one
        self.current_node: fx.Node | None = None

    def validate_options(self) -> None:
        """Checks that involve several options; raise OptionError."""

    # -- running ---------------------------------------------------------------
    def run(self, graph) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"pass {self.name!r} does not implement run()")

    def __call__(self, graph) -> PassResult:
        result = self.run(graph)
        if isinstance(result, PassResult) and result.changed:  # as the pass manager does after each pass
            self.analyses.invalidate(graph, self.preserves if result.preserved is None else result.preserved)
        return result

    def analysis(self, kind: type[Analysis], graph):
        """The result of analysis ``kind`` on ``graph``, cached across the passes of a run."""
        return self.analyses.get(kind, graph)

    def walk(self, graph, *, op: str | None = None, target=None) -> Iterator[fx.Node]:
        """Iterate over a snapshot of the graph's nodes (safe while rewriting),
        remembering the current node so that a failure can name it."""
        targets = None if target is None else (set(target) if isinstance(target, (set, tuple, list, frozenset)) else {target})
        for node in list(graph.fx.nodes):
            if node.graph is not graph.fx:  # erased by an earlier step of this walk
                continue
            if op is not None and node.op != op:
                continue
            if targets is not None and node.target not in targets:
                continue
            self.current_node = node
            yield node
        self.current_node = None

    def progress(self, items, description: str):
        """``items``, reported step by step to the run's ``progress`` input
        when one is given (the CLI draws a bar with it): a long step (calibration,
        GPTQ, the measured guard) says how far it is without printing itself."""
        report = self.context.get("progress")
        return report(items, f"{self.name}: {description}") if report is not None else items

    def fail(self, message: str, node: fx.Node | None = None) -> PassError:
        return PassError(message, pass_name=self.name, node=node if node is not None else self.current_node)

    # -- description -------------------------------------------------------------
    def option_values(self, *, only_changed: bool = True) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k, opt in self.options.items()
            if not only_changed or opt.required or getattr(self, k) != opt.default
        }

    def __str__(self) -> str:
        from .pipeline import format_pass

        return format_pass(self)

    __repr__ = __str__

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.option_values(only_changed=False) == other.option_values(only_changed=False)

    def __hash__(self) -> int:
        return hash((type(self), self.name))
