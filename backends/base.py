"""What every backend returns: a callable with the model's input/output structure."""

from __future__ import annotations

from pathlib import Path


class BackendError(RuntimeError):
    pass


class CompiledModel:
    backend: str = ""

    def __call__(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:  # pragma: no cover - abstract
        raise NotImplementedError

    def artifact_bytes(self) -> int:
        """Size of what :meth:`save` writes (weights included)."""
        raise NotImplementedError
