"""SparseGPT's math on tiny layers: better reconstruction than Wanda and magnitude, exact patterns,
dead inputs, the damping retries, and agreement with a slow float64 transcription of the reference."""
import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.masks import matrix_lowest_mask, nm_mask, row_lowest_mask
from prunekit.scoring.sparsegpt_math import sparsegpt_hessian, sparsegpt_inverse_factor, sparsegpt_prune
from prunekit.scoring.wanda import wanda_scores

NSEQ = 8


def _layer(rows=16, cols=32, tokens=256, seed=0):
    """A weight and calibration inputs with correlated, non-centred channels of unequal scale."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix * torch.linspace(0.2, 3.0, cols) + torch.randn(cols, generator=g)
    w = torch.randn(rows, cols, generator=g)
    return w, x


def _recon(x, w, w_hat):
    return float(((x @ w.T - x @ w_hat.T) ** 2).sum())


def _slow_reference(w, h, sparsity, nm=None, blocksize=8, percdamp=0.01):
    """fasterprune written out in float64 with no lazy batching: each column's error updates every later
    column at once. Unstructured: the k lowest of the block (stable row-major order), as prunekit."""
    w, h = w.double().clone(), h.double().clone()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.diag(h).mean() * torch.eye(cols, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if nm is None:
            tmp = w[:, i1:i2] ** 2 / torch.diag(hinv)[i1:i2] ** 2
            k = int(tmp.numel() * sparsity)
            block = torch.zeros(tmp.numel(), dtype=torch.bool)
            block[torch.sort(tmp.flatten(), stable=True).indices[:k]] = True
            mask[:, i1:i2] = block.view_as(tmp)
        for j in range(i1, i2):
            if nm is not None and (j - i1) % nm[1] == 0:
                tmp = w[:, j:j + nm[1]] ** 2 / torch.diag(hinv)[j:j + nm[1]] ** 2
                mask[:, j:j + nm[1]].scatter_(1, torch.topk(tmp, nm[0], dim=1, largest=False).indices, True)
            q = torch.where(mask[:, j], 0.0, w[:, j])
            err = (w[:, j] - q) / hinv[j, j]
            w[:, j:] -= torch.outer(err, hinv[j, j:])
            w[:, j] = q
    return w, mask


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_reconstruction_beats_wanda_and_magnitude(nm):
    w, x = _layer()
    h = sparsegpt_hessian(x.T @ x, NSEQ)
    res = sparsegpt_prune(w, h, 0.5, nm=nm)  # blocksize 128: one block, one mask choice
    wanda = wanda_scores(w, (x ** 2).sum(0) / NSEQ)
    w_mask = nm_mask(wanda, *nm) if nm else row_lowest_mask(wanda, 0.5)
    m_mask = nm_mask(w.abs(), *nm) if nm else matrix_lowest_mask(w.abs(), 0.5)
    err_sgpt = _recon(x, w, res.weight)
    err_wanda = _recon(x, w, w.masked_fill(w_mask, 0))
    err_mag = _recon(x, w, w.masked_fill(m_mask, 0))
    # SparseGPT is about 0.75x Wanda here. (With blocksize 8 its unstructured error is above Wanda's:
    # every block of 8 channels must lose half, while the channel scales vary 15x.)
    assert err_sgpt < 0.85 * err_wanda
    assert err_sgpt < 0.85 * err_mag


def test_exact_unstructured_sparsity_per_block():
    w, x = _layer()
    h = sparsegpt_hessian(x.T @ x, NSEQ)
    for sparsity, blocksize in ((0.5, 8), (0.3, 8), (0.5, 128)):
        res = sparsegpt_prune(w, h, sparsity, blocksize=blocksize)
        for i1 in range(0, 32, blocksize):
            block = res.mask[:, i1:i1 + blocksize]
            assert int(block.sum()) == int(block.numel() * sparsity)
        assert (res.weight[res.mask] == 0).all() and not res.weight[res.mask].signbit().any()  # +0.0
        assert res.weight.dtype == torch.float32 and res.mask.dtype == torch.bool


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_pattern(n, m):
    w, x = _layer()
    res = sparsegpt_prune(w, sparsegpt_hessian(x.T @ x, NSEQ), 0.0, nm=(n, m), blocksize=16)
    assert (res.mask.view(16, -1, m).sum(-1) == n).all()
    assert (res.weight[res.mask] == 0).all()
    assert ((res.weight == 0).view(16, -1, m).sum(-1) >= n).all()


def test_dead_inputs_get_zero_weight_and_inputs_are_untouched():
    w, x = _layer()
    x[:, [3, 17]] = 0
    h = sparsegpt_hessian(x.T @ x, NSEQ)
    w0, h0 = w.clone(), h.clone()
    res = sparsegpt_prune(w, h, 0.25, blocksize=8)
    assert (res.weight[:, [3, 17]] == 0).all()
    assert torch.isfinite(res.weight).all() and res.retries == 0
    assert torch.equal(w, w0) and torch.equal(h, h0)
    one_row = w[:1].clone()
    sparsegpt_prune(one_row, h, 0.5)
    assert torch.equal(one_row, w0[:1])  # a 1 x in weight transposes without a copy: still not edited


def test_hessian_is_two_over_nseq_gram():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [1.0, 1.0]])
    h = sparsegpt_hessian(x.T @ x, 2)
    assert torch.equal(h, torch.tensor([[11.0, 3.0], [3.0, 5.0]]))  # 2/2 * sum x x^T
    assert torch.equal(h.diagonal() / 2, (x ** 2).sum(0) / 2)       # Wanda's s_j = diag(H) / 2


def test_indefinite_hessian_retries_with_more_damping():
    # mean(diag H) ~ 0.97: the first damping (~0.0097) leaves H_00 < 0, 10x that (~0.097) fixes it.
    h = torch.eye(32)
    h[0, 0] = -0.05
    w = torch.randn(16, 32)
    res = sparsegpt_prune(w, h, 0.5)
    assert res.retries == 1
    assert res.damp == pytest.approx(0.1 * (31 - 0.05) / 32)
    assert torch.isfinite(res.weight).all()
    with pytest.raises(PrunekitError) as e:
        sparsegpt_prune(w, h, 0.5, max_damp_tries=0)
    assert "\n" not in str(e.value) and "percdamp" in str(e.value)


def test_nan_hessian_raises():
    h = torch.eye(32)
    h[4, 5] = h[5, 4] = float("nan")
    with pytest.raises(PrunekitError) as e:
        sparsegpt_prune(torch.randn(16, 32), h, 0.5)
    assert "\n" not in str(e.value) and "NaN" in str(e.value)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_matches_slow_float64_reference(nm):
    w, x = _layer(seed=1)
    x[:, 5] = 0  # a dead input too
    h = sparsegpt_hessian(x.T @ x, NSEQ)
    ref_w, ref_mask = _slow_reference(w, h, 0.5, nm=nm, blocksize=8)
    res = sparsegpt_prune(w, h, 0.5, nm=nm, blocksize=8)
    assert torch.equal(res.mask, ref_mask)
    assert torch.allclose(res.weight.double(), ref_w, rtol=1e-4, atol=1e-4)
    assert not torch.equal(res.weight, w.masked_fill(res.mask, 0))  # the kept weights were updated


def test_shared_factor_gives_the_same_result():
    w, x = _layer()
    h = sparsegpt_hessian(x.T @ x, NSEQ)
    factor = sparsegpt_inverse_factor(h)
    a = sparsegpt_prune(w, h, 0.5, nm=(2, 4))
    b = sparsegpt_prune(w, None, 0.5, nm=(2, 4), factor=factor)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)


def test_inverse_factor_is_the_reference_recipe():
    # in = 300 > 128, so the triangular inverse recurses (with unequal halves).
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1000, 300, generator=g) @ (torch.eye(300) + torch.randn(300, 300, generator=g) / 30)
    h = sparsegpt_hessian(x.T @ x, NSEQ)
    factor = sparsegpt_inverse_factor(h)
    damped = h.double() + factor.damp * torch.eye(300, dtype=torch.float64)
    recipe = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    assert factor.retries == 0 and factor.damp == pytest.approx(0.01 * float(h.diagonal().mean()))
    assert torch.equal(factor.hinv, factor.hinv.triu())
    assert torch.allclose(factor.hinv.double(), recipe, rtol=1e-4, atol=1e-6 * float(recipe.abs().max()))
