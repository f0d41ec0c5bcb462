"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output row; no weight update."""
import torch

from ..masks import wanda_variant_mask
from . import Scorer, register_scorer


def wanda_scores(weight: torch.Tensor, norm_sq: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * sqrt(s_j), s_j = (1/N_seq) * sum over calibration tokens of x_j^2."""
    return weight.abs() * torch.sqrt(norm_sq).reshape(1, -1)


@register_scorer("wanda")
class Wanda(Scorer):
    def scores(self, weight, stats, norm_fed):
        return wanda_scores(weight, stats.wanda_norm_sq)

    def mask(self, scores, sparsity, nm):
        if nm is None and self.config.wanda_variant:
            return wanda_variant_mask(scores, sparsity)
        return super().mask(scores, sparsity, nm)
