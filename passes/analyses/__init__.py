"""Analyses that several passes read (see :mod:`..analysis` for the machinery):
mask proofs (:mod:`.masks`) and liveness (:mod:`.liveness`)."""

from .liveness import LiveRanges, Liveness
from .masks import (
    CausalMaskFacts, CausalMasks, KeyPadding, KeyPaddingFacts, KeyPaddingMasks, NotKeyPadding, is_causal_mask,
    is_constant_causal_mask,
)

__all__ = [
    "Liveness", "LiveRanges", "CausalMasks", "CausalMaskFacts", "KeyPaddingMasks", "KeyPaddingFacts", "KeyPadding",
    "NotKeyPadding", "is_causal_mask", "is_constant_causal_mask",
]
