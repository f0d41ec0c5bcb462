"""Allocation-stage math: ESD alpha metrics and metric -> sparsity mappings."""

import math

import numpy as np
import pytest
import torch

from prunekit.allocation import esd
from prunekit.allocation.esd import (ALPHA_METRICS, alpha_mid, alpha_peak, esd_eigenvalues, esd_eigenvalues_batched,
                                     hill_fit, resolve_precision)
from prunekit.allocation.mapping import (alpha_ratios, clip_and_renormalise, nm_allocation,
                                         owl_outlier_ratio, owl_ratios, scale_to_target)


def pareto(alpha, n=5000, xmin=1.0, seed=0):
    # inverse CDF: P(lambda > x) = (x / xmin)^(1 - alpha)
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return xmin * (1 - u) ** (-1 / (alpha - 1))


def reference_alpha_peak(eigs, quirk):
    """Plain loop over every xmin, as the reference does it, in numpy."""
    lam = np.sort(np.asarray(eigs, dtype=np.float64))
    N = len(lam)
    counts, edges = np.histogram(np.log10(lam), bins=100, range=(np.log10(lam[0]), np.log10(lam[-1])))
    xmin2 = 10 ** edges[np.argmax(counts)]
    lower = np.log10(0.95 * xmin2) if quirk else 0.95 * xmin2
    best = (np.inf, None)
    for i in range(N - 1):
        if lam[i] < lower:
            continue
        if lam[i] > 1.5 * xmin2:
            break
        n = N - i
        a = 1 + n / (np.log(lam[i:]).sum() - n * np.log(lam[i]))
        D = np.abs(1 - (lam[i:] / lam[i]) ** (1 - a) - np.arange(n) / n).max()
        if a > 1 and D < best[0]:
            best = (D, a)
    return best[1]


# --- eigenvalues -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(300, 80), (80, 300), (64, 64)])
def test_esd_eigenvalues_match_svdvals(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    eigs = esd_eigenvalues(W)
    assert eigs.dtype == torch.float64 and eigs.shape == (min(shape),)
    assert torch.all(eigs[1:] >= eigs[:-1]) and torch.all(eigs >= 0)
    exact = torch.linalg.svdvals(W.double()).flip(0) ** 2
    torch.testing.assert_close(eigs, exact, rtol=0, atol=1e-10 * exact.max().item())
    f32 = torch.linalg.svdvals(W.float()).double().flip(0) ** 2  # the reference's float32 path
    torch.testing.assert_close(eigs, f32, rtol=0, atol=1e-5 * exact.max().item())


def test_esd_eigenvalues_rank_deficient_clamps_at_zero():
    W = torch.randn(40, 3, dtype=torch.float64) @ torch.randn(3, 50, dtype=torch.float64)
    eigs = esd_eigenvalues(W)
    assert eigs.min() >= 0 and (eigs > 1e-8).sum() == 3


def _mixed_weights():
    """Tall, wide and square matrices, shapes repeated (stacked together) and interleaved, in three dtypes."""
    g = torch.Generator().manual_seed(7)
    shapes = [(60, 24), (24, 60), (60, 24), (32, 32), (24, 60), (60, 24), (5, 90)]
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float16, torch.float64, torch.float32]
    ws = [torch.randn(*s, generator=g, dtype=torch.float64).to(d) for s, d in zip(shapes, dtypes)]
    ws[3][:, :4] *= 30  # a spread spectrum: condition number ~1e3+
    return ws


def _per_matrix_float64(w):
    w = w.double()
    return torch.linalg.eigvalsh(w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w).clamp_min(0)


# everything of one shape in one stack; one matrix per stack; three threads at once (CUDA streams on a GPU)
@pytest.mark.parametrize("max_bytes, streams", [(1 << 31, 1), (1, 1), (1, 3)])
def test_esd_eigenvalues_batched_matches_per_matrix(max_bytes, streams):
    ws = _mixed_weights()
    f64 = esd_eigenvalues_batched(ws, "float64", "cpu", max_bytes, streams)
    f32 = esd_eigenvalues_batched(ws, "float32", "cpu", max_bytes, streams)
    for w, a, b in zip(ws, f64, f32):
        exact = _per_matrix_float64(w)
        for e in (a, b):
            assert e.dtype == torch.float64 and e.device.type == "cpu" and e.shape == (min(w.shape),)
            assert torch.all(e[1:] >= e[:-1]) and torch.all(e >= 0)
        torch.testing.assert_close(a, exact, rtol=0, atol=1e-12 * exact.max().item())
        torch.testing.assert_close(b, exact, rtol=0, atol=1e-5 * exact.max().item())
    assert esd_eigenvalues_batched([], "float64") == []


def test_esd_eigenvalues_batched_precision_and_tf32():
    w = torch.randn(20, 30, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(esd_eigenvalues(w, "float32"), esd_eigenvalues(w), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="float64 or float32"):
        esd_eigenvalues_batched([w], "auto")
    with pytest.raises(ValueError, match="2-D"):
        esd_eigenvalues_batched([w, torch.ones(3)], "float64")
    previous = torch.get_float32_matmul_precision()
    try:  # the float32 Gram is formed in IEEE float32 and the caller's TF32 setting is restored
        torch.set_float32_matmul_precision("high")
        esd_eigenvalues_batched([w], "float32")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_resolve_precision():
    assert resolve_precision("auto", "alpha_peak") == "float64"  # float32 moves alpha_peak (bench_esd.py)
    assert resolve_precision("auto", "alpha_mid") == "float32"
    assert resolve_precision("float32", "alpha_peak") == "float32"
    with pytest.raises(ValueError, match="unknown ESD precision"):
        resolve_precision("float16")


# --- Hill fits -------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [2.5, 3.5])
def test_hill_fit_recovers_pareto_exponent(alpha):
    eigs = pareto(alpha)
    # xmin = the true xmin itself: put it in the sample so i = 0 uses it exactly
    eigs = torch.cat([torch.tensor([1.0], dtype=torch.float64), eigs])
    a, D = hill_fit(eigs, 0)
    assert abs(a - alpha) < 0.1  # MLE std is (alpha - 1) / sqrt(n) ~ 0.02-0.04
    assert 0 < D < 0.05  # a correct model fits the empirical CDF closely


@pytest.mark.parametrize("alpha", [2.5, 3.5])
@pytest.mark.parametrize("quirk", [False, True])
def test_alpha_peak_recovers_pareto_exponent(alpha, quirk):
    # log10 of a Pareto sample is exponential, so the fullest bin is the first one and the
    # window covers the lowest eigenvalues: every xmin there is a true power-law start,
    # so the KS-selected fit is unbiased, only noisier than the full-sample MLE
    a = alpha_peak(pareto(alpha, seed=2), reference_quirk=quirk)
    assert abs(a - alpha) < 0.1


def test_alpha_peak_skips_bulk_below_the_tail():
    # a thin bulk spread over two decades under a Pareto tail: a fit from the smallest eigenvalue
    # is far off, but the log-histogram peak sits at the start of the tail, so alpha_peak is not
    bulk = torch.linspace(0.01, 0.99, 200, dtype=torch.float64)
    eigs = torch.cat([bulk, pareto(3.0, n=3000, seed=3)])
    assert hill_fit(eigs, 0)[0] < 1.5
    assert abs(alpha_peak(eigs) - 3.0) < 0.1


def test_alpha_mid_hand_example():
    eigs = torch.tensor([6.0, 1.0, 4.0, 2.0, 5.0, 3.0])  # unsorted on purpose
    # N = 6, i = 3, xmin = 4, n = 3: alpha = 1 + 3 / (ln 4 + ln 5 + ln 6 - 3 ln 4) = 1 + 3 / ln(30/16)
    expected = 1 + 3 / math.log(1.875)
    assert alpha_mid(eigs) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(5.772444, abs=1e-6)
    a, D = hill_fit(eigs, 3)
    D_hand = max(abs(1 - (x / 4) ** (1 - a) - k / 3) for k, x in enumerate([4.0, 5.0, 6.0]))
    assert D == pytest.approx(D_hand, rel=1e-12)
    assert ALPHA_METRICS["alpha_mid"] is alpha_mid and ALPHA_METRICS["alpha_peak"] is alpha_peak


@pytest.mark.parametrize("seed", range(4))
def test_alpha_peak_matches_reference_loop(seed, monkeypatch):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(400, 120, generator=g, dtype=torch.float64)
    W[:, :10] *= 8  # a few spikes for a tail
    # scale 1: peak below 1/0.95, the quirk's lower bound is negative;
    # scale 50: bound is log10(0.95 xmin2) > 0 but still below 0.95 xmin2
    for scale in (0.01, 50.0):
        eigs = esd_eigenvalues(W * math.sqrt(scale / 400))
        for quirk in (False, True):
            assert alpha_peak(eigs, quirk) == pytest.approx(reference_alpha_peak(eigs, quirk), rel=1e-9)
    # the chunked KS table must agree with a single block
    monkeypatch.setattr(esd, "_CHUNK", 1000)
    assert alpha_peak(eigs, True) == pytest.approx(reference_alpha_peak(eigs, True), rel=1e-9)


def test_fit_many_equals_one_fit_per_candidate_in_any_order(monkeypatch):
    """The KS table leaves out the columns below a chunk's first tail: every (alpha, D) is hill_fit's,
    bit for bit, for candidates in any order and any chunking."""
    eigs = torch.sort(pareto(2.5, n=300, seed=3)).values
    idx = torch.randperm(299, generator=torch.Generator().manual_seed(0))[:120]
    one = [hill_fit(eigs, int(i)) for i in idx]
    for chunk in (esd._CHUNK, 300 * 7, 300):  # one chunk, chunks of 7 candidates, one candidate each
        monkeypatch.setattr(esd, "_CHUNK", chunk)
        alpha, D = esd._fit_many(eigs, idx)
        assert [(a, d) for a, d in zip(alpha.tolist(), D.tolist())] == one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_alpha_fits_on_cuda_match_the_cpu():
    from prunekit.allocation.alpha import layer_alphas
    g = torch.Generator().manual_seed(0)
    eigs = {}
    for k in range(6):
        W = torch.randn(300, 200, generator=g, dtype=torch.float64)
        W[:, :k + 2] *= 6
        eigs[f"m{k}"] = esd_eigenvalues(W)
    eigs["pareto"] = pareto(3.0, n=2000, seed=1)
    for metric in ALPHA_METRICS:
        cpu, gpu = layer_alphas(eigs, metric), layer_alphas(eigs, metric, device="cuda")
        assert gpu == pytest.approx(cpu, rel=1e-9)


def test_alpha_peak_quirk_changes_the_answer():
    # Student-t(6) weights, spectrum scaled so the peak is ~50: the quirk's bound log10(0.95 xmin2)
    # ~ 1.7 admits the rising bulk below the peak as xmin candidates, and here one of them has a
    # smaller KS distance, so the two modes disagree (each matching its own reference loop)
    g = torch.Generator().manual_seed(5)
    z = torch.randn(300, 100, generator=g, dtype=torch.float64)
    chi2 = (torch.randn(6, 300, 100, generator=g, dtype=torch.float64) ** 2).mean(0)
    eigs = esd_eigenvalues(z / chi2.sqrt())
    eigs = eigs / eigs.median() * 50
    good, quirk = alpha_peak(eigs), alpha_peak(eigs, reference_quirk=True)
    assert good == pytest.approx(reference_alpha_peak(eigs, False), rel=1e-9)
    assert quirk == pytest.approx(reference_alpha_peak(eigs, True), rel=1e-9)
    assert quirk < good - 0.3


def test_alpha_peak_fallbacks():
    # two eigenvalues: still a fit (i = 0); all equal: no power law, refuse
    assert math.isfinite(alpha_peak(torch.tensor([1.0, 2.0])))
    with pytest.raises(ValueError):
        alpha_peak(torch.ones(10))
    # zeros (rank deficiency) are ignored rather than poisoning the log histogram
    eigs = pareto(2.5, n=500, seed=5)
    assert alpha_peak(torch.cat([torch.zeros(7, dtype=torch.float64), eigs])) == alpha_peak(eigs)


# --- AlphaPruning mapping --------------------------------------------------------------------

def wmean(s, P):
    return sum(a * b for a, b in zip(s, P)) / sum(P)


def test_alpha_ratios_linear_map():
    r = alpha_ratios([2.0, 3.0, 4.0, 5.0], 0.2)
    torch.testing.assert_close(r, torch.tensor([0.8, 0.8 + 0.4 / 3, 0.8 + 0.8 / 3, 1.2], dtype=torch.float64))
    assert torch.equal(alpha_ratios([3.0, 3.0, 3.0], 0.3), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError):
        alpha_ratios([1.0, 2.0], 1.5)


def test_scale_to_target_no_clipping():
    r, P = [0.8, 1.0, 1.2], [1, 1, 2]
    s = scale_to_target(r, P, 0.5)
    k = 0.5 * 4 / (0.8 + 1.0 + 2 * 1.2)  # S sum(P) / sum(P r)
    assert s == pytest.approx([0.8 * k, 1.0 * k, 1.2 * k], abs=1e-12)


def test_scale_to_target_clips_and_redistributes_by_ratio():
    # s = r * 0.6 * 4 / 8 = [0.3, 0.6, 1.2]; the 0.3 over 0.9 (x1 param) goes to layers 0, 1
    # in proportion to r: c = 0.3 / (2*1 + 1*2) = 0.075 -> [0.375, 0.75, 0.9] = min(0.9, 0.375 r)
    s = scale_to_target([1.0, 2.0, 4.0], [2, 1, 1], 0.6, max_sparsity=0.9)
    assert s == pytest.approx([0.375, 0.75, 0.9], abs=1e-12)


def test_scale_to_target_cascading_clip():
    # first pass clips layer 2, redistributing pushes layer 1 over too; the rest lands on layer 0
    s = scale_to_target([1.0, 2.0, 2.2], [1, 1, 1], 0.8, max_sparsity=0.9)
    assert s == pytest.approx([0.6, 0.9, 0.9], abs=1e-12)


@pytest.mark.parametrize("S", [0.3, 0.5, 0.7, 0.9])
def test_scale_to_target_properties(S):
    g = torch.Generator().manual_seed(int(S * 10))
    metrics = (2 + 4 * torch.rand(32, generator=g)).tolist()
    P = torch.randint(1, 20, (32,), generator=g).tolist()
    s = scale_to_target(alpha_ratios(metrics, 0.3), P, S, max_sparsity=0.95)
    assert wmean(s, P) == pytest.approx(S, abs=1e-6)
    assert all(0 <= x <= 0.95 for x in s)
    order = np.argsort(metrics)  # higher alpha -> higher (or equal, if clipped) sparsity
    assert all(np.diff(np.array(s)[order]) >= -1e-12)


def test_impossible_target():
    with pytest.raises(ValueError):
        scale_to_target([1.0, 1.0], [1, 1], 0.995, max_sparsity=0.99)
    with pytest.raises(ValueError):
        clip_and_renormalise([0.5], [1.0], [1], -0.1, 0.99)
    assert scale_to_target([1.0, 3.0], [1, 1], 0.99, max_sparsity=0.99) == pytest.approx([0.99, 0.99])


# --- OWL -------------------------------------------------------------------------------------

def test_owl_outlier_ratio_by_hand():
    block = [torch.ones(2, 2), torch.tensor([1.0, 1.0, 1.0, 9.0])]  # A = seven 1s and a 9, mean 2
    assert owl_outlier_ratio(block, 3.0) == 12.5  # 9 > 6: 1 of 8
    assert owl_outlier_ratio(block, 0.5) == 12.5  # threshold 1, strict: the 1s do not count
    assert owl_outlier_ratio(block, 0.4) == 100.0
    assert owl_outlier_ratio([torch.tensor([[1.0, 2.0], [3.0, 10.0]])], 2.0) == 25.0  # mean 4, 10 > 8
    # the concatenation is what counts, not per-tensor means
    assert owl_outlier_ratio([torch.tensor([1.0, 1.0]), torch.tensor([5.0, 5.0])], 1.5) == 50.0


def test_owl_ratios_by_hand():
    # D = [12.5, 25, 0], lam = 0.08: r = [0.08, 0.16, 0], mean 0.08, s = 0.5 - (r - 0.08)
    s = owl_ratios([12.5, 25.0, 0.0], 0.5, 0.08)
    assert s == pytest.approx([0.5, 0.42, 0.58], abs=1e-12)
    assert owl_ratios([3.0, 3.0], 0.7, 0.1) == pytest.approx([0.7, 0.7])


def test_owl_clip_at_zero_shifts_uniformly():
    s = owl_ratios([0.0, 5.0, 10.0], 0.1, 0.2)
    assert s == pytest.approx([0.3, 0.1, -0.1], abs=1e-12)
    # clip -0.1 to 0, the extra 0.1 is taken evenly from the layers still above 0
    s = clip_and_renormalise(s, [1.0] * 3, [1, 1, 1], 0.1, 0.99)
    assert s == pytest.approx([0.25, 0.05, 0.0], abs=1e-12)


# --- N:M -------------------------------------------------------------------------------------

def test_nm_allocation_equal_params():
    # x = s m = [1.2, 2.0, 2.8] -> floor [1, 2, 2], mean 5/3 vs target 2; raise layer 2 (rem 0.8)
    # to hit 2 exactly; raising layer 0 next would overshoot
    assert nm_allocation([0.3, 0.5, 0.7], [1, 1, 1], 4) == [1, 2, 3]


def test_nm_allocation_weighted():
    # T m = 8 * (0.55 + 2*0.45 + 0.6) / 4 = 4.1; floor [4, 3, 4] -> 3.5; raise layer 2 (rem .8) -> 3.75,
    # layer 1 (rem .6, 2 params) -> 4.25, layer 0 (rem .4) -> 4.5 is farther: stop at [4, 4, 5]
    assert nm_allocation([0.55, 0.45, 0.6], [1, 2, 1], 8) == [4, 4, 5]


def test_nm_allocation_bounds():
    assert nm_allocation([0.5] * 4, [3, 1, 2, 5], 4) == [2, 2, 2, 2]
    # 0.99 * 4 is capped at m - 1 = 3 (a layer keeps 1 of every m); to stay near the target
    # mean 1.98 the other layer takes the shortfall: [3, 1] (mean 2) beats [3, 0] (mean 1.5)
    assert nm_allocation([0.99, 0.0], [1, 1], 4) == [3, 1]


def test_esd_streams_fit_in_half_the_free_memory():
    from prunekit.allocation.alpha import CUDA_ESD_STREAMS, esd_streams
    w = [("a", torch.empty(0).new_empty((64, 256))), ("b", torch.empty(0).new_empty((32, 32)))]
    need = (64 * 256 + 2 * 64 * 64) * 8  # the largest matrix, float64: W, its Gram, eigvalsh's copy
    assert esd_streams(w, "cpu", "float64") == 1
    assert esd_streams(w, "cuda", "float64", free=100 * need) == CUDA_ESD_STREAMS
    assert esd_streams(w, "cuda", "float64", free=5 * need) == 2
    assert esd_streams(w, "cuda", "float64", free=need) == 1
    assert esd_streams(w, "cuda", "float32", free=5 * need) == 4
