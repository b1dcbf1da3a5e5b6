"""Comparing a model's outputs with a reference: the one numeric check that the
pass manager, the CLI, the benchmarks and the tests all use."""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.utils._pytree as pytree


def output_tensors(outputs) -> list[torch.Tensor]:
    leaves = pytree.tree_leaves(outputs)
    return [torch.as_tensor(x) for x in leaves if isinstance(x, torch.Tensor) or hasattr(x, "__array__")]


@dataclass(frozen=True)
class Parity:
    max_abs_err: float
    scale: float  # max |reference|, so that tolerances are relative to the output's size
    cosine: float

    def within(self, tol: float) -> bool:
        # NaN compares False: a result with NaNs where the reference has none never passes.
        return self.max_abs_err <= tol * max(self.scale, 1e-12)

    def as_dict(self) -> dict:
        return {"max_abs_err": self.max_abs_err, "scale": self.scale, "cosine": self.cosine}


class ParityError(AssertionError):
    pass


def _paired_outputs(reference, actual) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The tensor outputs of ``reference`` and ``actual`` side by side, in
    float64; their count, shapes and (beyond float vs float) dtypes must agree."""
    ref, out = output_tensors(reference), output_tensors(actual)
    if len(ref) != len(out):
        raise ParityError(f"output count differs: reference has {len(ref)} tensors, result has {len(out)}")
    pairs = []
    for i, (r, o) in enumerate(zip(ref, out)):
        if tuple(r.shape) != tuple(o.shape):
            raise ParityError(f"output {i}: shape {tuple(o.shape)} differs from reference {tuple(r.shape)}")
        if r.dtype != o.dtype and not (r.is_floating_point() and o.is_floating_point()):
            raise ParityError(f"output {i}: dtype {o.dtype} differs from reference {r.dtype}")
        pairs.append((r.detach().to(torch.float64), o.detach().to(torch.float64)))
    return pairs


def compare(reference, actual) -> Parity:
    """Max abs error, reference scale and cosine similarity over all tensor
    outputs (floats compared in float64; structures must agree)."""
    err, scale, flat_r, flat_o = 0.0, 0.0, [], []
    for r, o in _paired_outputs(reference, actual):
        r64, o64 = r.flatten(), o.flatten()
        if r64.numel():
            both_nan = r64.isnan() & o64.isnan()
            diff = torch.where(both_nan, 0.0, (r64 - o64).abs())
            e = diff.max().item()
            err = e if math.isnan(e) or math.isnan(err) else max(err, e)
            scale = max(scale, torch.nan_to_num(r64.abs(), nan=0.0, posinf=0.0).max().item())
        flat_r.append(r64)
        flat_o.append(o64)
    a, b = torch.cat(flat_r), torch.cat(flat_o)
    if math.isnan(err):
        return Parity(err, scale, float("nan"))
    denom = a.norm() * b.norm()
    cosine = float((a @ b) / denom) if denom > 0 else float(torch.equal(a, b))
    return Parity(err, scale, cosine)


def row_cosines(reference, actual) -> torch.Tensor:
    """Cosine similarity of each row (the last axis: a token's logits, a
    sentence's embedding) of every tensor output, all outputs' rows in one
    float64 vector; checked as :func:`compare` checks. Its mean and minimum say
    how far a lossy pipeline moved a model where one global cosine would
    average a few bad rows away."""
    rows = [torch.nn.functional.cosine_similarity(r.reshape(-1, r.shape[-1]), o.reshape(-1, o.shape[-1]), dim=-1)
            for r, o in _paired_outputs(reference, actual) if r.dim() and r.numel()]
    return torch.cat(rows) if rows else torch.empty(0, dtype=torch.float64)


def assert_parity(reference, actual, tol: float = 1e-4) -> Parity:
    p = compare(reference, actual)
    if not p.within(tol):
        raise ParityError(f"max abs error {p.max_abs_err:.3g} exceeds {tol:g} x output scale {p.scale:.3g}")
    return p
