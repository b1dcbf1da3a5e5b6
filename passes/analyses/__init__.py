"""Analyses that several passes read (see :mod:`..analysis` for the machinery):
mask proofs (:mod:`.masks`), rotary embeddings read as a kernel's tables
(:mod:`.rotary`), liveness (:mod:`.liveness`) and the channel
dependencies that structured pruning follows (:mod:`.channels`) and the
column/row pairs tensor parallelism splits (:mod:`.parallel`)."""

from .channels import AttentionHeads, ChannelAnalysis, ChannelDependencies, ChannelGroup, HeadBlock, ShapeEdit, Span
from .parallel import ParallelPair, ParallelPairs, ParallelPlan
from .liveness import LiveRanges, Liveness
from .masks import (
    CausalMaskFacts, CausalMasks, KeyPadding, KeyPaddingFacts, KeyPaddingMasks, NotKeyPadding, is_causal_mask,
    is_constant_causal_mask,
)
from .rotary import NotRotary, RotaryEmbeddings, RotaryFacts, RotaryTables, Rotation

__all__ = [
    "ChannelAnalysis", "ChannelDependencies", "ChannelGroup", "Span", "AttentionHeads", "HeadBlock", "ShapeEdit", "ParallelPairs", "ParallelPlan", "ParallelPair",
    "Liveness", "LiveRanges", "CausalMasks", "CausalMaskFacts", "KeyPaddingMasks", "KeyPaddingFacts", "KeyPadding",
    "NotKeyPadding", "is_causal_mask", "is_constant_causal_mask", "RotaryEmbeddings", "RotaryFacts", "RotaryTables",
    "Rotation", "NotRotary",
]
