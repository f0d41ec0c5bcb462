"""OWL (Yin et al. 2024): outlier-weighed layerwise sparsity. Blocks with more activation outliers
(Wanda scores above M times their mean) are pruned less."""
from __future__ import annotations

from ..errors import PrunekitError
from ..scoring.wanda import wanda_scores
from . import Allocation, register_allocator
from .mapping import clip_and_renormalise, owl_outlier_ratio, owl_ratios


def owl_allocation(outlier_ratios: list[float], params: list[dict[str, int]], target: float, lam: float,
                   max_sparsity: float = 0.99) -> list[float]:
    """s_l = 1 - (r_l - mean r + 1 - S), r_l = (D_l - min D)/(max D - min D) * 2 lambda; then clipped to
    [0, max_sparsity] and shifted uniformly until the parameter-weighted mean is S again."""
    block_params = [sum(p.values()) for p in params]
    try:
        return clip_and_renormalise(owl_ratios(outlier_ratios, target, lam), [1.0] * len(params),
                                    block_params, target, max_sparsity)
    except ValueError as exc:
        raise PrunekitError(f"OWL allocation failed: {exc}") from None


@register_allocator("owl", needs_data=True)
def owl(ctx) -> Allocation:
    adapter, config = ctx.adapter, ctx.config
    ratios = []
    for _, block, stats in ctx.dense_stats("OWL outlier pass"):
        scores = [wanda_scores(adapter.weight(m).float(), stats[n].wanda_norm_sq)
                  for n, m in adapter.block_linears(block).items()]
        ratios.append(owl_outlier_ratio(scores, config.owl_m))
    s = owl_allocation(ratios, ctx.parameter_counts(), config.sparsity, config.owl_lambda, config.max_layer_sparsity)
    return Allocation([{n: s[i] for n in adapter.linears} for i in range(len(s))],
                      blocks=[{"block": i, "metric": ratios[i], "sparsity": s[i]} for i in range(len(s))])
