"""Hand-computed masks for every scorer and pattern."""
import pytest
import torch

from prunekit import PruneConfig
from prunekit.masks import lowest_k_mask, matrix_lowest_mask, nm_mask, row_lowest_mask, wanda_variant_mask
from prunekit.scoring import build_scorer
from prunekit.scoring.magnitude import magnitude_scores
from prunekit.scoring.wanda import wanda_scores
from prunekit.stats import ChannelStats


def test_wanda_1x8_two_of_four():
    # torchao's example: weights 1..8, one output row. With all-ones inputs the scores equal |W|,
    # so 2:4 prunes the two smallest of each group of four: 1, 2 and 5, 6.
    w = torch.arange(1.0, 9.0).reshape(1, 8)
    scores = wanda_scores(w, torch.ones(8))
    assert nm_mask(scores, 2, 4).tolist() == [[True, True, False, False, True, True, False, False]]


def test_wanda_activation_norm_changes_the_answer():
    # Same weights, but input channels 0 and 1 carry large activations: |W| * ||X|| now keeps them.
    w = torch.arange(1.0, 9.0).reshape(1, 8)
    norm_sq = torch.tensor([100.0, 100.0, 1, 1, 1, 1, 1, 1])  # sqrt -> 10, 10, 1, ...
    scores = wanda_scores(w, norm_sq)  # [10, 20, 3, 4, 5, 6, 7, 8]
    assert nm_mask(scores, 2, 4).tolist() == [[False, False, True, True, True, True, False, False]]
    assert row_lowest_mask(scores, 0.5).tolist() == [[False, False, True, True, True, True, False, False]]


def test_wanda_statistic_is_sum_of_squares_over_sequences():
    x = torch.tensor([[[1.0, 2.0], [3.0, 0.0]], [[1.0, 1.0], [0.0, 2.0]]])  # 2 sequences x 2 tokens
    stats = ChannelStats(2)
    stats.update(x[:1])
    stats.update(x[1:])
    # s_j = (1/N_seq) sum_tokens x_j^2 = ([1+9+1+0], [4+0+1+4]) / 2
    assert torch.allclose(stats.wanda_norm_sq, torch.tensor([5.5, 4.5]))


def test_row_mask_exact_sparsity_per_row():
    torch.manual_seed(0)
    scores = torch.rand(16, 40)
    for s in (0.1, 0.25, 0.5, 0.77):
        mask = row_lowest_mask(scores, s)
        assert (mask.sum(dim=1) == int(40 * s)).all()
        # the pruned are the lowest of their row
        assert (scores[mask].view(16, -1).amax(1) <= scores.masked_fill(mask, 2).amin(1)).all()


def test_stable_tie_breaking_matches_sort():
    scores = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 2.0]])
    assert lowest_k_mask(scores, 3).tolist() == [[True, True, False, True, False, False]]
    torch.manual_seed(1)
    for _ in range(20):
        s = torch.randint(0, 4, (5, 12)).float()
        for k in range(13):
            ref = torch.zeros_like(s, dtype=torch.bool)
            if k:
                ref.scatter_(1, torch.sort(s, dim=1, stable=True)[1][:, :k], True)
            assert torch.equal(lowest_k_mask(s, k), ref)


def test_nm_ranks_send_ties_to_the_lower_column():
    """N:M by ranks (the GPU's way) gives the first n of a stable ascending sort, on scores full of
    ties; by topk (the reference's selection, the CPU's) agrees wherever no tie decides."""
    assert nm_mask(torch.tensor([[1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0]]), 2, 4, "ranks").tolist() == \
        [[False, True, False, True, True, True, False, False]]
    torch.manual_seed(1)
    for _ in range(20):
        s = torch.randint(0, 3, (5, 48)).float()
        for n, m in ((1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (5, 8), (2, 16)):
            groups = s.view(5, -1, m)
            ref = torch.zeros_like(groups, dtype=torch.bool)
            ref.scatter_(2, torch.sort(groups, dim=2, stable=True)[1][..., :n], True)
            assert torch.equal(nm_mask(s, n, m, "ranks").view_as(groups), ref), (n, m)
    s = torch.rand(64, 96)
    for n, m in ((1, 4), (2, 4), (4, 8), (3, 8)):
        assert torch.equal(nm_mask(s, n, m, "ranks"), nm_mask(s, n, m, "topk"))
    assert torch.equal(nm_mask(s, 2, 4), nm_mask(s, 2, 4, "topk"))  # the CPU's default


def test_nm_compliance_every_group():
    torch.manual_seed(0)
    scores = torch.rand(12, 64)
    for n, m in ((2, 4), (4, 8), (1, 4), (3, 8)):
        groups = nm_mask(scores, n, m).view(12, -1, m)
        assert (groups.sum(dim=2) == n).all()


def test_nm_needs_divisible_columns():
    with pytest.raises(ValueError):
        nm_mask(torch.rand(2, 10), 2, 4)


def test_magnitude_one_threshold_per_matrix():
    # Rows are not balanced: the whole matrix shares one threshold.
    w = torch.tensor([[0.1, -0.2, 0.3, 0.4], [5.0, 6.0, -7.0, 8.0]])
    mask = matrix_lowest_mask(magnitude_scores(w), 0.5)
    assert mask.tolist() == [[True, True, True, True], [False, False, False, False]]
    scorer = build_scorer(PruneConfig(method="magnitude"))
    assert torch.equal(scorer.mask(scorer.scores(w, None, True), 0.5, None), mask)
    # magnitude N:M works per row group
    assert scorer.mask(scorer.scores(w, None, True), 0.5, (2, 4)).sum(dim=1).tolist() == [2, 2]


def test_wanda_variant_hits_target_and_prunes_lowest():
    torch.manual_seed(0)
    scores = torch.rand(64, 256)
    mask = wanda_variant_mask(scores, 0.5)
    assert abs(mask.float().mean().item() - 0.5) <= 0.001
    # within each row everything pruned scores at most everything kept
    for r in range(64):
        if mask[r].any() and (~mask[r]).any():
            assert scores[r][mask[r]].max() <= scores[r][~mask[r]].min()


def test_wanda_variant_small_alpha_prunes_nothing_rather_than_everything():
    from prunekit.masks import cumulative_threshold_mask
    scores = torch.tensor([[5.0, 6.0, 7.0]])
    assert not cumulative_threshold_mask(scores, 0.0).any()
