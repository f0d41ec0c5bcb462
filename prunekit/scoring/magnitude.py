"""Magnitude pruning: score |W|, one threshold per weight matrix (unstructured), per row group for N:M."""
import torch

from . import Scorer, register_scorer


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij|"""
    return weight.abs()


@register_scorer("magnitude")
class Magnitude(Scorer):
    needs_stats = False
    comparison = "matrix"

    def scores(self, weight, stats, norm_fed):
        return magnitude_scores(weight)
