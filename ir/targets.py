"""The backends a pass may measure on, without importing them.

Passes never import backends (the data flow is model -> IR -> passes ->
backend), yet a pass such as ``quantize(guard=true)`` must time a layer on the
backend the model will run on. Backends register a compile function here when
they are imported (``import fxopt`` does that); passes look it up by name.
"""

from __future__ import annotations

from typing import Callable

_TARGETS: dict[str, Callable] = {}


def register_target(name: str, compile_fn: Callable) -> None:
    """``compile_fn(graph) -> callable`` that runs ``graph`` on backend ``name``
    the way a measurement should (threads as torch's, nothing left spinning).
    A name can be registered once: a second backend under the same name is an
    error, not a silent replacement of the first."""
    if name in _TARGETS:
        prev = _TARGETS[name]
        raise ValueError(f"backend target {name!r} is already registered by "
                         f"{getattr(prev, '__module__', '?')}.{getattr(prev, '__qualname__', repr(prev))}")
    _TARGETS[name] = compile_fn


def unregister_target(name: str) -> None:
    _TARGETS.pop(name, None)


def target(name: str) -> Callable:
    try:
        return _TARGETS[name]
    except KeyError:
        raise KeyError(f"no backend {name!r} registered for measuring (registered: {sorted(_TARGETS)}); "
                       "import fxopt (or fxopt.backends) first") from None
