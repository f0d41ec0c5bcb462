"""Scoring and masking: which weights go. One file per scorer, registered by name.

A scorer turns a weight (out_features x in_features, float32) and the activation statistics of its
input into scores (low = pruned first), then a mask for a target sparsity or N:M pattern, and may
fold the removed weights' mean contribution into the bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PrunekitError
from ..masks import matrix_lowest_mask, nm_mask, row_lowest_mask
from ..stats import ChannelStats

SCORERS: dict[str, type["Scorer"]] = {}


@dataclass
class LinearPrune:
    """What pruning one linear decided, all on the weight's device: the mask (True = pruned), a new
    weight where the method updates the kept weights (SparseGPT), a bias change (STADE), and a
    device-side flag for NaN/inf scores (read once per block, not per layer)."""
    mask: torch.Tensor
    weight: torch.Tensor | None = None
    bias_delta: torch.Tensor | None = None
    nonfinite: torch.Tensor | None = None
    info: dict | None = None      # per-layer facts for the report (SparseGPT: damping raised)


def register_scorer(name: str):
    def wrap(cls):
        cls.name = name
        SCORERS[name] = cls
        return cls
    return wrap


class Scorer:
    name = "base"
    needs_stats = True          # needs calibration activations (magnitude does not)
    comparison = "row"          # unstructured comparison group: 'row' (per output) or 'matrix'

    def __init__(self, config):
        self.config = config

    def prune(self, weight: torch.Tensor, stats: ChannelStats | None, sparsity: float,
              nm: tuple[int, int] | None, norm_fed: bool) -> LinearPrune:
        """Score, mask and compensate one float32 weight (out x in). Methods that update the kept
        weights override this; the others only say how to score."""
        scores = self.scores(weight, stats, norm_fed)
        low, high = scores.aminmax()  # NaN propagates to both; one pass instead of isfinite's three
        mask = self.mask(scores, sparsity, nm)
        return LinearPrune(mask, None, self.bias_delta(weight, mask, stats, norm_fed),
                           ~(torch.isfinite(low) & torch.isfinite(high)))

    def scores(self, weight: torch.Tensor, stats: ChannelStats | None, norm_fed: bool) -> torch.Tensor:
        raise NotImplementedError

    def mask(self, scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
        if nm is not None:
            return nm_mask(scores, *nm)
        if self.comparison == "matrix":
            return matrix_lowest_mask(scores, sparsity)
        return row_lowest_mask(scores, sparsity)

    def centred(self, norm_fed: bool) -> bool:
        """Whether the statistics must hold the mean and variance (else the sum of squares suffices)."""
        return False

    def gram(self, norm_fed: bool) -> bool:
        """Whether the statistics must hold X^T X (SparseGPT's Hessian)."""
        return False

    def updates_bias(self, norm_fed: bool) -> bool:
        """Whether prune() will add a bias to this linear (so the bias must be storable)."""
        return False

    def bias_delta(self, weight: torch.Tensor, mask: torch.Tensor, stats: ChannelStats | None,
                   norm_fed: bool) -> torch.Tensor | None:
        """Change to the bias from removing `mask` of `weight` (computed before zeroing), or None."""
        return None


def build_scorer(config) -> Scorer:
    if config.method not in SCORERS:
        raise PrunekitError(f"unknown method {config.method!r}: choose one of {', '.join(sorted(SCORERS))}")
    return SCORERS[config.method](config)


from . import magnitude, sparsegpt, stade, wanda  # noqa: E402,F401  (registration)
