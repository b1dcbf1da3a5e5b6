"""The registry of passes by name. Built-in and user passes register the same
way; a name can be taken once (a second registration is an error, not a silent
overwrite)."""

from __future__ import annotations

import re
from typing import Iterator

from .base import Pass, did_you_mean


class UnknownPassError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


class PassRegistry:
    def __init__(self) -> None:
        self._passes: dict[str, type[Pass]] = {}

    def register(self, cls: type[Pass], name: str) -> type[Pass]:
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise TypeError(f"register_pass({name!r}) decorates a Pass subclass, got {cls!r}")
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"pass name {name!r} must be non-empty and use letters, digits, '-' or '_'")
        if name in self._passes:
            prev = self._passes[name]
            raise ValueError(f"pass name {name!r} is already registered by {prev.__module__}.{prev.__qualname__}")
        cls.name = name
        self._passes[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        self._passes.pop(name, None)

    def get(self, name: str) -> type[Pass]:
        try:
            return self._passes[name]
        except KeyError:
            raise UnknownPassError(
                f"unknown pass {name!r}{did_you_mean(name, self._passes)}; registered passes: {', '.join(sorted(self._passes))}"
            ) from None

    def create(self, name: str, **options) -> Pass:
        return self.get(name)(**options)

    def names(self) -> list[str]:
        return sorted(self._passes)

    def __contains__(self, name: str) -> bool:
        return name in self._passes

    def __iter__(self) -> Iterator[type[Pass]]:
        return iter(self._passes[n] for n in self.names())

    def describe(self) -> list[dict]:
        """Name, one-line summary (the docstring's first sentence) and options of every pass (for ``fxopt passes``)."""
        out = []
        for cls in self:
            doc = (cls.__doc__ or "").strip()
            out.append({
                "name": cls.name,
                "summary": summary(doc),
                "doc": doc,
                "options": {
                    k: {"type": o.type_name(), "default": None if o.required else o.default, "help": o.help,
                        **({"choices": list(o.choices)} if o.choices else {})}
                    for k, o in cls.options.items()
                },
            })
        return out


def summary(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    paragraph = " ".join(line.strip() for line in doc.strip().split("\n\n")[0].splitlines())
    match = re.search(r"[.!?](?=\s+[A-Z(`])", paragraph)
    sentence = paragraph[:match.end()] if match else paragraph
    # A paragraph that introduces a code block ("... to quantize::") ends the sentence there.
    return sentence[:-2].rstrip() + "." if sentence.endswith("::") else sentence


REGISTRY = PassRegistry()


def register_pass(name: str, registry: PassRegistry | None = None):
    """Class decorator: ``@register_pass("my-pass")``."""

    def wrap(cls):
        return (registry or REGISTRY).register(cls, name)

    return wrap
