"""Pipeline text: ``canonicalize,dce,cse``, ``quantize(bits=4,group_size=128)``,
``fixed-point(cse,dce,max_iterations=5)``. Parsed into passes and printed back
to the same text, so any run is reproducible from one string.

Grammar::

    pipeline := [item (',' item)*]
    item     := NAME ['(' [arg (',' arg)*] ')']
    arg      := NAME '=' value            -- an option of the pass
              | item                      -- only inside fixed-point(...)
    value    := INT | FLOAT | 'quoted string' | "quoted string" | true | false
              | none | bare-word | '[' [value (',' value)*] ']'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Union

from .base import OptionError, Pass
from .registry import REGISTRY, PassRegistry, UnknownPassError

FIXED_POINT = "fixed-point"
# How deep fixed-point groups and list values may nest. Parsing, printing and
# running recurse once per level; no pipeline needs more than a few.
MAX_NESTING = 32


class PipelineError(ValueError):
    """A pipeline that cannot be parsed or built; shows where in the text."""

    def __init__(self, message: str, text: str | None = None, pos: int | None = None):
        if text is not None and pos is not None:
            start, end = max(0, pos - 60), min(len(text), pos + 40)  # a window of long text around the fault
            line = ("..." if start else "") + text[start:end] + ("..." if end < len(text) else "")
            message = f"{message}\n  {line}\n  {' ' * (pos - start + (3 if start else 0))}^"
        super().__init__(message)


@dataclass
class FixedPoint:
    """Runs its passes in order, again and again, until none reports a change."""

    passes: list["Item"]
    max_iterations: int = 10

    @property
    def name(self) -> str:
        return FIXED_POINT

    def __str__(self) -> str:
        inner = ",".join(str(p) for p in self.passes)
        extra = f",max_iterations={self.max_iterations}" if self.max_iterations != 10 else ""
        return f"{FIXED_POINT}({inner}{extra})"


Item = Union[Pass, FixedPoint]

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<num>(?:[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|[-+]inf)(?![A-Za-z0-9_\-]))
      | (?P<name>[A-Za-z_][A-Za-z0-9_.\-]*)
      | (?P<punct>[(),=\[\]])
    )""",
    re.VERBOSE,
)


class _Parser:
    def __init__(self, text: str, registry: PassRegistry):
        self.text = text
        self.registry = registry
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if not m:
                bad = text[pos:].lstrip()
                start = len(text) - len(bad)
                raise PipelineError(f"unexpected character {bad[0]!r} in pipeline", text, start)
            kind = m.lastgroup
            start = m.start(kind)
            self.tokens.append((kind, m.group(kind), start))
            pos = m.end()
        self.i = 0
        self.depth = 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else ("end", "", len(self.text))

    def take(self, kind: str | None = None, value: str | None = None):
        tok = self.peek()
        if (kind and tok[0] != kind) or (value and tok[1] != value):
            want = value or kind
            got = "end of text" if tok[0] == "end" else repr(tok[1])
            raise PipelineError(f"expected {want!r} but found {got}", self.text, tok[2])
        self.i += 1
        return tok

    def pipeline(self, closing: str | None = None) -> tuple[list[Item], dict]:
        items: list[Item] = []
        group_opts: dict[str, Any] = {}
        if self.peek()[0] == "end" or self.peek()[1] == closing:
            return items, group_opts
        while True:
            kind, value, pos = self.peek()
            if closing and kind == "name" and self.i + 1 < len(self.tokens) and self.tokens[self.i + 1][1] == "=":
                self.take()
                self.take("punct", "=")
                if value in group_opts:
                    raise PipelineError(f"option {value!r} given twice", self.text, pos)
                group_opts[value] = (self.value(), pos)
            else:
                items.append(self.item())
            if self.peek()[1] == ",":
                self.take()
                continue
            break
        return items, group_opts

    def item(self) -> Item:
        _, name, pos = self.take("name")
        if name == FIXED_POINT:
            if self.depth >= MAX_NESTING:
                raise PipelineError(f"lists and {FIXED_POINT} groups nested more than {MAX_NESTING} deep", self.text, pos)
            self.take("punct", "(")
            self.depth += 1
            items, opts = self.pipeline(closing=")")
            self.depth -= 1
            self.take("punct", ")")
            if not items:
                raise PipelineError(f"{FIXED_POINT}(...) needs at least one pass", self.text, pos)
            group = FixedPoint(items)
            for key, (value, vpos) in opts.items():
                if key != "max_iterations" or not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise PipelineError(f"{FIXED_POINT} takes only max_iterations=<positive int>, got {key}={value!r}", self.text, vpos)
                group.max_iterations = value
            return group
        try:
            cls = self.registry.get(name)
        except UnknownPassError as e:
            raise PipelineError(str(e), self.text, pos) from None
        options: dict[str, Any] = {}
        positions: dict[str, int] = {}
        if self.peek()[1] == "(":
            self.take()
            while self.peek()[1] != ")":
                _, key, kpos = self.take("name")
                if key in options:
                    raise PipelineError(f"option {key!r} given twice for pass {name!r}", self.text, kpos)
                self.take("punct", "=")
                positions[key] = kpos
                options[key] = self.value()
                if self.peek()[1] != ",":
                    break
                self.take()
            self.take("punct", ")")
        try:
            return cls(**options)
        except OptionError as e:  # the caret at the option at fault, at the pass when several are
            raise PipelineError(str(e), self.text, positions.get(e.option, pos)) from None

    def value(self) -> Any:
        kind, tok, pos = self.peek()
        if kind == "str":
            self.take()
            return re.sub(r"\\([\\'\"])", r"\1", tok[1:-1])
        if kind == "num":
            self.take()
            return float(tok) if any(c in tok for c in ".eEn") else int(tok)
        if kind == "name":
            self.take()
            words = {"true": True, "false": False, "none": None, "inf": float("inf"), "nan": float("nan")}
            return words.get(tok.lower(), tok)
        if tok == "[":
            if self.depth >= MAX_NESTING:
                raise PipelineError(f"lists and {FIXED_POINT} groups nested more than {MAX_NESTING} deep", self.text, pos)
            self.take()
            self.depth += 1
            values = []
            while self.peek()[1] != "]":
                values.append(self.value())
                if self.peek()[1] != ",":
                    break
                self.take()
            self.depth -= 1
            self.take("punct", "]")
            return values
        got = "end of text" if kind == "end" else repr(tok)
        raise PipelineError(f"expected a value but found {got}", self.text, pos)


def parse_pipeline(text: str, registry: PassRegistry | None = None) -> list[Item]:
    """Parse pipeline text into passes (and fixed-point groups)."""
    p = _Parser(text, registry or REGISTRY)
    items, opts = p.pipeline()
    if opts:
        raise PipelineError("options outside a pass's parentheses", text, 0)
    if p.peek()[0] != "end":
        _, tok, pos = p.peek()
        raise PipelineError(f"unexpected {tok!r} after the end of a pass", text, pos)
    return items


_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")


def format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return {"inf": "inf", "-inf": "-inf"}.get(repr(value), "nan")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    s = str(value)
    if _BARE.match(s) and s.lower() not in ("true", "false", "none", "inf", "nan"):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def format_pass(p: Pass) -> str:
    opts = p.option_values()
    if not opts:
        return p.name
    return p.name + "(" + ",".join(f"{k}={format_value(v)}" for k, v in opts.items()) + ")"


def format_pipeline(items: list[Item]) -> str:
    return ",".join(str(i) for i in items)
