"""Which weights go, given scores: pure functions. A mask is a bool tensor, True = pruned.

Scores have the layout of a linear weight, (out_features, in_features): rows are outputs.
"""
from __future__ import annotations

import torch


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the k lowest scores, ties going to the lower column index: exactly the first k of a
    stable ascending sort, found with topk (4x faster than a full sort on CPU)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    kth = torch.topk(scores, k, dim=1, largest=False, sorted=False).values.amax(dim=1, keepdim=True)
    below = scores < kth
    ties = scores == kth
    room = k - below.sum(dim=1, keepdim=True)
    # int32 running counts (a row has < 2^31 entries): half the bytes of cumsum's default int64
    return below | (ties & (torch.cumsum(ties, dim=1, dtype=torch.int32) <= room))


def row_lowest_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, prune the int(in_features * sparsity) lowest scores (stable order, as Wanda)."""
    return lowest_k_mask(scores, int(scores.shape[1] * sparsity))


def matrix_lowest_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """One threshold for the whole matrix: prune the int(numel * sparsity) lowest scores.

    The magnitude reference takes `scores <= sorted[k]`, which prunes one weight more than k (and
    every tie); this prunes exactly k, ties in stable order.
    """
    return lowest_k_mask(scores.reshape(1, -1), int(scores.numel() * sparsity)).view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int, by: str | None = None) -> torch.Tensor:
    """In each group of m consecutive input columns of each row, prune the n lowest scores.

    Two ways, equal but for ties. `topk`: the reference's own selection (topk over each group,
    scattered), ties broken as torch's topk on that device breaks them; the CPU default, because
    the float32 parity figures depend on it: SmolLM2 has groups of equal (zero) scores, and the stable
    order changes float32 Wanda 2:4's perplexity (the rounding-level change cascades through the
    later blocks' near-ties). `ranks`: ties to the lower column (a stable sort, as row masks), by
    counting for every score the scores of its group that come before it (m elementwise passes); the
    CUDA default, since torch's CUDA topk runs one thread block per group, millions for a 7B matrix."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M with M={m} needs in_features divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    if n <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if (by or ("ranks" if scores.is_cuda else "topk")) == "ranks":
        return (stable_ranks(groups) < n).reshape(rows, cols)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2, largest=False)[1], True)
    return mask.reshape(rows, cols)


def stable_ranks(groups: torch.Tensor) -> torch.Tensor:
    """Each entry's position in a stable ascending sort of its group (the last dim), as uint8: the
    number of smaller entries, plus the equal ones before it."""
    m = groups.shape[-1]
    rank = torch.zeros(groups.shape, dtype=torch.uint8, device=groups.device)
    for j in range(m):
        other = groups[..., j:j + 1]
        rank += other < groups
        if j + 1 < m:
            rank[..., j + 1:] += other == groups[..., j + 1:]
    return rank


def cumulative_threshold_mask(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Wanda's appendix variant at one alpha: per row, prune the lowest scores whose cumulative sum
    stays within alpha * (row sum); every score <= that row's threshold goes (ties included)."""
    sorted_scores = torch.sort(scores, dim=1, stable=True)[0]
    keep_below = torch.cumsum(sorted_scores, dim=1) <= alpha * scores.sum(dim=1, keepdim=True)
    count = keep_below.sum(dim=1, keepdim=True)
    # count == 0 would index -1 in the reference (the largest score): prune nothing there instead.
    thresh = torch.gather(sorted_scores, 1, (count - 1).clamp(min=0))
    return (scores <= thresh) & (count > 0)


def wanda_variant_mask(scores: torch.Tensor, sparsity: float, tol: float = 0.001) -> torch.Tensor:
    """Bisect alpha from 0.4 in [0, 0.8] until the matrix sparsity is within tol of the target."""
    alpha, lo, hi = 0.4, 0.0, 0.8
    mask = cumulative_threshold_mask(scores, alpha)
    current = mask.float().mean().item()
    while abs(current - sparsity) > tol and hi - lo >= 0.001:
        if current > sparsity:
            alpha, hi = (alpha + lo) / 2.0, alpha
        else:
            alpha, lo = (alpha + hi) / 2.0, alpha
        mask = cumulative_threshold_mask(scores, alpha)
        current = mask.float().mean().item()
    return mask
