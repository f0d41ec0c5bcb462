"""STADE (Coello de Portugal Mecke et al.): score W_ij^2 * sigma_j^2 and fold the removed weights'
mean contribution into the bias. With centred inputs (mu = 0) it ranks exactly like Wanda.

The reference v2 code computes the compensation after zeroing the weights, so it is always 0; here it
is computed from the weights before they are zeroed. `bias_update=False` gives that behaviour.
"""
import torch

from . import Scorer, register_scorer
from .wanda import Wanda


def stade_scores(weight: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """S_ij = W_ij^2 * sigma_j^2 (unbiased per-channel variance of the input)."""
    return weight.square() * variance.reshape(1, -1)


def stade_bias_delta(weight: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """delta b_i = sum over pruned j of W_ij * mu_j: the removed weights' mean contribution."""
    return (weight * mask).matmul(mean)


@register_scorer("stade")
class Stade(Scorer):
    def uses_stade(self, norm_fed: bool) -> bool:
        return True

    def scores(self, weight, stats, norm_fed):
        if self.uses_stade(norm_fed):
            return stade_scores(weight, stats.variance)
        return Wanda.scores(self, weight, stats, norm_fed)

    def centred(self, norm_fed):
        return self.uses_stade(norm_fed)

    def updates_bias(self, norm_fed):
        return self.config.bias_update and self.uses_stade(norm_fed)

    def bias_delta(self, weight, mask, stats, norm_fed):
        if not self.updates_bias(norm_fed):
            return None
        return stade_bias_delta(weight, mask, stats.mean)


@register_scorer("stade-w")
class StadeW(Stade):
    """STADE where the input does not come straight from a norm (LLaMA o_proj/down_proj, OPT
    out_proj/fc2), Wanda where it does, as the paper does."""

    def uses_stade(self, norm_fed: bool) -> bool:
        return not norm_fed
