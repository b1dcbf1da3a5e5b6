"""What every backend returns: a callable with the model's input/output structure."""

from __future__ import annotations

import functools
from pathlib import Path


class BackendError(RuntimeError):
    pass


class InputRangeError(BackendError, IndexError):
    """An input value outside what the model accepts (a token id outside the
    vocabulary). An IndexError too, as PyTorch raises for the original model."""


class CompiledModel:
    backend: str = ""

    @staticmethod
    def graph_inputs(graph, args: tuple, kwargs: dict, index_bounds: dict | None = None) -> list:
        """The call's inputs as the graph's flat inputs, checked against the
        traced structure, dtypes and ranks, and the index inputs against the
        tables they index (``index_bounds``, from ``graph.index_bounds()``);
        a mismatch names the input."""
        try:
            leaves = graph.flatten_inputs(*args, **kwargs)
            graph.check_inputs(leaves, index_bounds)
        except IndexError as e:
            raise InputRangeError(f"{graph.name}: {e}") from None
        except (TypeError, ValueError) as e:
            raise BackendError(f"{graph.name}: {e}") from None
        return leaves

    @functools.cached_property
    def index_bounds(self) -> dict:
        """The graph's index inputs and the rows they may address: checked on
        every call, so that both backends refuse an out-of-range token id alike
        (ONNX Gather would wrap a negative one around)."""
        return self.graph.index_bounds()

    def __call__(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:  # pragma: no cover - abstract
        raise NotImplementedError

    def artifact_bytes(self) -> int:
        """Size of what :meth:`save` writes (weights included)."""
        raise NotImplementedError
