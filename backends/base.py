"""What every backend returns: a callable with the model's input/output structure."""

from __future__ import annotations

from pathlib import Path


class BackendError(RuntimeError):
    pass


class CompiledModel:
    backend: str = ""

    @staticmethod
    def graph_inputs(graph, args: tuple, kwargs: dict) -> list:
        """The call's inputs as the graph's flat inputs, checked against the
        traced structure, dtypes and ranks (a mismatch names the input)."""
        try:
            leaves = graph.flatten_inputs(*args, **kwargs)
            graph.check_inputs(leaves)
        except (TypeError, ValueError) as e:
            raise BackendError(f"{graph.name}: {e}") from None
        return leaves

    def __call__(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:  # pragma: no cover - abstract
        raise NotImplementedError

    def artifact_bytes(self) -> int:
        """Size of what :meth:`save` writes (weights included)."""
        raise NotImplementedError
