"""From per-layer metrics to per-layer sparsities (AlphaPruning and OWL).

Notation: L layers, P_l prunable parameters of layer l, S the target global
sparsity. Every allocation here keeps the parameter-weighted mean sparsity
sum(P_l s_l) / sum(P_l) equal to S, so the model as a whole hits S exactly.

Pure functions on numbers and tensors: no modules, no I/O. Errors the user can
fix (an impossible target) raise ValueError.
"""

import math

import torch


def _vec(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64).detach().cpu().flatten()


def alpha_ratios(metrics, epsilon: float) -> torch.Tensor:
    """AlphaPruning's linear map of layer metrics to relative pruning ratios.

        r_l = (m_l - min m) / (max m - min m) * 2 eps + (1 - eps)

    so ratios span [1 - eps, 1 + eps]: the layer with the largest alpha (the
    least trained, lightest tail) is pruned most. All-equal metrics give all
    ones (uniform allocation) instead of 0/0. eps must be in [0, 1] so that no
    ratio is negative.
    """
    if not 0 <= epsilon <= 1:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    m = _vec(metrics)
    if not torch.isfinite(m).all():
        raise ValueError("layer metrics must be finite")
    span = m.max() - m.min()
    if span == 0:
        return torch.ones_like(m)
    return (m - m.min()) / span * 2 * epsilon + (1 - epsilon)


def _check_target(target: float, max_sparsity: float):
    if not 0 <= max_sparsity <= 1:
        raise ValueError(f"max_sparsity must be in [0, 1], got {max_sparsity}")
    if not 0 <= target <= max_sparsity:
        raise ValueError(f"target sparsity {target} is impossible: it must be in [0, max_sparsity={max_sparsity}]")


def clip_and_renormalise(sparsities, weights_for_redistribution, params, target: float,
                         max_sparsity: float = 0.99) -> list[float]:
    """Clip sparsities to [0, max_sparsity], then restore the parameter-weighted mean S.

    Repeat until sum(P s) = S sum(P) (to 1e-12 relative):
        s    <- clip(s, 0, max_sparsity)
        d    =  S sum(P) - sum(P s)              (pruned parameters missing, or in excess if < 0)
        free =  layers with s < max (d > 0) or s > 0 (d < 0)
        s_l  <- s_l + d w_l / sum_{free} P w    for l in free, w = weights_for_redistribution
    so the excess taken from clipped layers is spread over the unclipped ones
    in proportion to w (AlphaPruning passes its ratios r, which makes the
    result min(max, c r_l) for one scale c; OWL passes ones, a uniform
    additive shift like OWL's own centring). Each pass moves every layer the
    same way and pins at least one more layer at a bound, so it ends in at
    most L passes. Free layers with zero total weight fall back to a uniform
    shift. Any S in [0, max_sparsity] is reachable; otherwise ValueError.

    This fixes the references: AlphaPruning leaves ratios > 1 and OWL floors
    negatives at 0.01, both silently missing the target.
    """
    _check_target(target, max_sparsity)
    s, w, P = _vec(sparsities), _vec(weights_for_redistribution), _vec(params)
    if not (s.numel() == w.numel() == P.numel()):
        raise ValueError("sparsities, weights and params must have one entry per layer")
    if (w < 0).any() or (P <= 0).any():
        raise ValueError("redistribution weights must be >= 0 and params > 0")
    want = target * P.sum()
    for _ in range(2 * s.numel() + 2):
        s = s.clamp(0.0, max_sparsity)
        d = want - (P * s).sum()
        if d.abs() <= 1e-12 * P.sum():
            break
        free = s < max_sparsity if d > 0 else s > 0
        wf = w * free
        if (P * wf).sum() <= 0:
            wf = free.to(torch.float64)
        s = s + d * wf / (P * wf).sum()
    s = s.clamp(0.0, max_sparsity)
    if abs(((P * s).sum() / P.sum()).item() - target) > 1e-6:
        raise RuntimeError("clip_and_renormalise did not converge")  # a bug, never bad input
    return s.tolist()


def scale_to_target(ratios, params, target: float, max_sparsity: float = 0.99) -> list[float]:
    """AlphaPruning: scale ratios to layer sparsities with weighted mean S, then clip.

        s_l = r_l * S * sum(P) / sum(P r)

    gives sum(P s) / sum(P) = S exactly, but can exceed 1 (the reference
    keeps those); clip_and_renormalise(s, r, ...) then caps at max_sparsity
    and spreads the excess over the other layers in proportion to r.
    """
    _check_target(target, max_sparsity)
    r, P = _vec(ratios), _vec(params)
    if r.numel() != P.numel():
        raise ValueError("ratios and params must have one entry per layer")
    s = r * target * P.sum() / (P * r).sum()
    return clip_and_renormalise(s, r, P, target, max_sparsity)


def owl_outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """OWL layerwise outlier distribution of one block, in percent.

        D = 100 * #{a in A : a > m * mean(A)} / |A|

    A is the concatenation of the flattened Wanda scores |W| * ||X||_2 of all
    the block's linears (as the reference does); the count is strict (>).
    Computed per tensor with float64 sums, which equals the concatenation
    without materialising it.
    """
    total = sum(x.numel() for x in scores)
    if total == 0:
        raise ValueError("owl_outlier_ratio needs at least one score")
    thr = m * sum(x.sum(dtype=torch.float64).item() for x in scores) / total
    count = sum((x.to(torch.float64) > thr).sum().item() for x in scores)
    return 100.0 * count / total


def owl_ratios(outlier_ratios, target: float, lam: float) -> list[float]:
    """OWL layer sparsities from block outlier ratios D_l (before clipping).

        r_l = (D_l - min D) / (max D - min D) * 2 lam
        s_l = 1 - (r_l - mean r + 1 - S)           = S - (r_l - mean r)

    so sparsities span S +- lam around the target, their plain mean is S, and
    more outliers means lower sparsity. All-equal D gives s_l = S. The caller
    then applies clip_and_renormalise(s, [1] * L, params, S, max_sparsity).
    """
    D = _vec(outlier_ratios)
    span = D.max() - D.min()
    r = torch.zeros_like(D) if span == 0 else (D - D.min()) / span * 2 * lam
    return (1 - (r - r.mean() + 1 - target)).tolist()


def nm_allocation(sparsities, params, m: int) -> list[int]:
    """Non-uniform N:M: layer l prunes N_l of every m weights, 0 <= N_l <= m - 1.

    Target T = sum(P s) / sum(P) (the weighted mean of the input sparsities).
    Start from N_l = floor(clip(s_l m, 0, m - 1)); then visit layers by
    descending remainder s_l m - N_l (ties: lower index first) and raise N_l by
    one whenever that brings sum(P N) / (m sum(P)) strictly closer to T,
    skipping layers whose step would overshoot (a big layer can overshoot where
    a small one still helps). Flooring never overshoots, so only raising is
    needed. N_l = m (all weights pruned) is never allowed.
    """
    s, P = _vec(sparsities), _vec(params)
    if s.numel() != P.numel():
        raise ValueError("sparsities and params must have one entry per layer")
    if m < 2:
        raise ValueError(f"N:M needs m >= 2, got {m}")
    T = ((P * s).sum() / P.sum()).item()
    x = (s * m).clamp(0, m - 1)
    N = [math.floor(v + 1e-9) for v in x.tolist()]  # 1e-9: 0.29 * 100 must floor to 29
    rem = [v - n for v, n in zip(x.tolist(), N)]
    frac = [p / (m * P.sum().item()) for p in P.tolist()]  # one N step, in weighted-mean units
    cur = sum(n * f for n, f in zip(N, frac))
    for i in sorted(range(len(N)), key=lambda i: -rem[i]):
        if N[i] < m - 1 and abs(cur + frac[i] - T) < abs(cur - T):
            N[i] += 1
            cur += frac[i]
    return N
