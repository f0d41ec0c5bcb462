"""STADE: equals Wanda on centred inputs; mean compensation restores the mean output; stable statistics."""
import pytest
import torch

from prunekit import PruneConfig
from prunekit.scoring import build_scorer
from prunekit.scoring.stade import stade_bias_delta, stade_scores
from prunekit.scoring.wanda import wanda_scores
from prunekit.stats import ChannelStats


def _stats(x: torch.Tensor, batches: int = 4) -> ChannelStats:
    stats = ChannelStats(x.shape[-1])
    for chunk in x.chunk(batches):
        stats.update(chunk)
    return stats


def _layer(seed=0, rows=32, cols=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g), torch.randn(rows, generator=g)


def test_centred_inputs_give_wandas_masks():
    w, _ = _layer()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 50, 64, generator=g) * torch.linspace(0.1, 3, 64)
    x = x - x.reshape(-1, 64).mean(0)  # exactly centred channels
    stats = _stats(x)
    for sparsity in (0.3, 0.5, 0.7):
        for nm in (None, (2, 4)):
            stade = build_scorer(PruneConfig(method="stade"))
            wanda = build_scorer(PruneConfig(method="wanda"))
            m1 = stade.mask(stade.scores(w, stats, True), sparsity, nm)
            m2 = wanda.mask(wanda.scores(w, stats, True), sparsity, nm)
            assert torch.equal(m1, m2)


def test_bias_compensation_restores_mean_output_and_beats_wanda():
    w, b = _layer()
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(6, 40, 64, generator=g) * 0.5 + torch.linspace(-2, 3, 64)).reshape(-1, 64)  # mean >> 0
    stats = _stats(x)
    dense = x @ w.T + b
    scorer = build_scorer(PruneConfig(method="stade"))
    mask = scorer.mask(scorer.scores(w, stats, False), 0.5, None)
    delta = scorer.bias_delta(w, mask, stats, False)
    stade_out = x @ w.masked_fill(mask, 0).T + (b + delta)
    # mean over the calibration tokens is the dense layer's, to float tolerance
    assert torch.allclose(stade_out.mean(0), dense.mean(0), atol=1e-4)
    wanda = build_scorer(PruneConfig(method="wanda"))
    wmask = wanda.mask(wanda.scores(w, stats, False), 0.5, None)
    wanda_out = x @ w.masked_fill(wmask, 0).T + b
    mse_stade = (stade_out - dense).pow(2).mean()
    mse_wanda = (wanda_out - dense).pow(2).mean()
    assert mse_stade < mse_wanda


def test_bias_delta_formula_by_hand():
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, True, False]])
    mean = torch.tensor([10.0, 20.0, 30.0])
    assert stade_bias_delta(w, mask, mean).tolist() == [1 * 10 + 3 * 30, 5 * 20]
    assert torch.equal(stade_scores(w, torch.tensor([1.0, 0.5, 2.0])), torch.tensor([[1.0, 2, 18], [16, 12.5, 72]]))


def test_no_bias_update_and_stade_w_roles():
    w, _ = _layer()
    x = torch.randn(100, 64) + 3
    stats = _stats(x)
    off = build_scorer(PruneConfig(method="stade", bias_update=False))
    assert off.bias_delta(w, torch.ones_like(w, dtype=torch.bool), stats, False) is None
    sw = build_scorer(PruneConfig(method="stade-w"))
    assert not sw.updates_bias(True) and sw.updates_bias(False)
    # norm-fed layers score like Wanda, the others like STADE
    assert torch.equal(sw.scores(w, stats, True), wanda_scores(w, stats.wanda_norm_sq))
    assert torch.equal(sw.scores(w, stats, False), stade_scores(w, stats.variance))


def test_welford_matches_torch_var_with_mean_much_larger_than_std():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(16, 128, 24, generator=g, dtype=torch.float64) * 0.01 + 1e4)
    ref_var = x.reshape(-1, 24).var(dim=0, unbiased=True)
    ref_mean = x.reshape(-1, 24).mean(dim=0)
    stats = _stats(x.float(), batches=16)
    assert torch.allclose(stats.mean.double(), ref_mean, rtol=1e-6)
    assert torch.allclose(stats.variance.double(), ref_var, rtol=2e-2)
    # the textbook E[x^2] - E[x]^2 in float32 is useless here, which is why the merge matters
    xf = x.float().reshape(-1, 24)
    naive = ((xf * xf).mean(0) - xf.mean(0) ** 2) * (xf.shape[0] / (xf.shape[0] - 1))
    assert not torch.allclose(naive.double(), ref_var, rtol=2e-2)
    assert stats.ntokens == 16 * 128 and stats.nseq == 16


def test_uncentred_stats_keep_only_the_sum_of_squares():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 50, 24, generator=g) * 3 + 5
    full, fast = ChannelStats(24), ChannelStats(24, centred=False)
    for chunk in x.split(1):
        full.update(chunk)
        fast.update(chunk.bfloat16())
    assert torch.allclose(fast.wanda_norm_sq, (x.bfloat16().float() ** 2).sum((0, 1)) / 4, rtol=1e-6)
    assert torch.allclose(fast.wanda_norm_sq, full.wanda_norm_sq, rtol=1e-2)
    assert fast.nseq == 4 and fast.ntokens == 200
    with pytest.raises(ValueError, match="centred=True"):
        fast.variance


def test_stats_of_float32_input_leave_it_untouched():
    x = torch.randn(2, 8, 6)
    before = x.clone()
    for centred in (True, False):
        ChannelStats(6, centred=centred).update(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gram", [False, True])
def test_fused_reductions_agree_with_the_cpu_ones(dtype, gram, monkeypatch):
    """The GPU's one-read reductions (vector_norm for the sum of squares, var_mean for mean and M2),
    run here on the CPU, against the CPU's own: the same statistics to float32 rounding, with means
    much larger than the spread, and X^T X unchanged."""
    import prunekit.stats as stats_module
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 64, 48, generator=g) * 0.5 + 4).to(dtype)
    results = {}
    for fused in (False, True):
        monkeypatch.setattr(stats_module, "FUSED_REDUCTIONS", {"cpu", "cuda"} if fused else {"cuda"})
        pair = (ChannelStats(48, gram=gram), ChannelStats(48, centred=False, gram=gram))
        for chunk in x.split(2):
            for st in pair:
                st.update(chunk)
        results[fused] = pair
    for exact, fused in zip(results[False], results[True]):
        torch.testing.assert_close(fused.sum_sq, exact.sum_sq, rtol=2e-5, atol=0)
        if exact.centred:
            torch.testing.assert_close(fused.mean, exact.mean, rtol=2e-6, atol=0)
            torch.testing.assert_close(fused.variance, exact.variance, rtol=2e-4, atol=0)
        if gram:
            assert torch.equal(fused.gram_matrix(), exact.gram_matrix())


@pytest.mark.parametrize("method", ["wanda", "stade", "sparsegpt"])
def test_fused_reductions_give_the_same_prune(method, samples, monkeypatch):
    """A whole prune with the GPU's reductions (forced on the CPU) against the CPU's: the masks agree
    but for rounding-level near-ties."""
    import prunekit.stats as stats_module
    from conftest import tiny_model

    from prunekit import prune
    states = []
    for fused in (False, True):
        monkeypatch.setattr(stats_module, "FUSED_REDUCTIONS", {"cpu", "cuda"} if fused else {"cuda"})
        model = tiny_model("llama")
        prune(model, PruneConfig(method=method, nsamples=8, seqlen=32, batch_size=3, device="cpu"), samples)
        states.append(model.state_dict())
    for name, value in states[0].items():
        assert ((value == 0) == (states[1][name] == 0)).float().mean() > 0.999, name


def test_only_stade_layers_are_centred():
    from prunekit.config import PruneConfig
    from prunekit.scoring import build_scorer
    assert not build_scorer(PruneConfig(method="wanda")).centred(True)
    assert build_scorer(PruneConfig(method="stade")).centred(True)
    sw = build_scorer(PruneConfig(method="stade-w"))
    assert sw.centred(False) and not sw.centred(True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gram_is_the_float32_gram(dtype, monkeypatch):
    """X^T X of a bf16/fp16 batch by one GEMM to float32 (stats.EXACT_LOW_GRAM, a GPU kernel; its
    float32 result emulated here on the CPU): the same accumulation over batches as the float32 path,
    the reference arithmetic left on its own float32 operations."""
    import prunekit.stats as stats_module
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(6, 64, 48, generator=g) * 3).to(dtype)
    calls = []

    def emulated(batch):
        calls.append(batch.dtype)
        return batch.double().T.matmul(batch.double()).float()  # bf16/fp16 products are exact in float32
    results = {}
    for low in (False, True):
        monkeypatch.setattr(stats_module, "EXACT_LOW_GRAM", {"cpu", "cuda"} if low else {"cuda"})
        monkeypatch.setattr(stats_module, "_MM_OUT_DTYPE", True)
        monkeypatch.setattr(stats_module, "exact_low_gram", emulated)
        st, ref = ChannelStats(48, centred=False, gram=True), ChannelStats(48, centred=False, gram="running")
        for chunk in x.split(2):
            st.update(chunk)
            ref.update(chunk)
        results[low] = (st, ref)
    assert calls == [dtype] * 3  # one GEMM per batch, on the batch as it is; none for "running"
    torch.testing.assert_close(results[True][0].gram_matrix(), results[False][0].gram_matrix(), rtol=1e-5, atol=1e-3)
    assert torch.equal(results[True][1].gram_matrix(), results[False][1].gram_matrix())
    assert torch.equal(results[True][0].sum_sq, results[False][0].sum_sq)


class _NoFloatCopy(torch.Tensor):
    """A batch that fails if anything makes a float32 copy of it."""
    def float(self, *args, **kwargs):
        raise AssertionError("a float32 copy of the batch")


def test_low_precision_gram_makes_no_float32_copy(monkeypatch):
    """With the GPU's reductions and its X^T X (both forced here, the GEMM emulated), a bf16 batch is
    read as it is: nothing calls .float() on it."""
    import prunekit.stats as stats_module
    monkeypatch.setattr(stats_module, "FUSED_REDUCTIONS", {"cpu", "cuda"})
    monkeypatch.setattr(stats_module, "EXACT_LOW_GRAM", {"cpu", "cuda"})
    monkeypatch.setattr(stats_module, "_MM_OUT_DTYPE", True)
    monkeypatch.setattr(stats_module, "exact_low_gram", lambda b: b.double().T.matmul(b.double()).to(torch.float32))
    x = torch.randn(2, 32, 16).bfloat16().as_subclass(_NoFloatCopy)
    st = ChannelStats(16, centred=False, gram=True)
    st.update(x)
    assert st.gram_matrix().dtype == torch.float32
    monkeypatch.setattr(stats_module, "EXACT_LOW_GRAM", {"cuda"})  # the CPU's float32 X^T X does copy
    with pytest.raises(AssertionError, match="float32 copy"):
        ChannelStats(16, centred=False, gram=True).update(x)


@pytest.mark.skipif(not torch.cuda.is_available() or not __import__("prunekit.stats").stats._MM_OUT_DTYPE,
                    reason="no CUDA GPU visible, or torch < 2.8 (no torch.mm(..., out_dtype))")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gram_on_cuda(dtype):
    """The real kernel: X^T X of a bf16/fp16 batch on the GPU against float64 of the same numbers."""
    import prunekit.stats as stats_module
    x = (torch.randn(4, 512, 96, device="cuda") * 3).to(dtype)
    assert stats_module.low_precision_gram(x.reshape(-1, 96))
    st = ChannelStats(96, centred=False, gram=True)
    for chunk in x.split(2):
        st.update(chunk)
    flat = x.reshape(-1, 96).double()
    exact = flat.T @ flat
    assert st.gram_matrix().dtype == torch.float32
    torch.testing.assert_close(st.gram_matrix().double(), exact, rtol=1e-5, atol=1e-6 * exact.abs().max().item())


@pytest.mark.parametrize("columns,bands", [(48, 8), (50, 8), (7, 8), (33, 1), (64, 3)])
def test_upper_triangle_gram_is_the_full_gram(columns, bands, monkeypatch):
    """The CPU's X^T X (stats.TRIANGULAR_GRAM): the upper triangle accumulated band by band over
    batches, then mirrored, is the full GEMM's X^T X, whatever divides what; mirrored once only."""
    import prunekit.stats as stats_module
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 40, columns, generator=g) * 2
    monkeypatch.setattr(stats_module, "GRAM_BANDS", bands)
    h = torch.zeros(columns, columns)
    for chunk in x.split(2):
        stats_module.add_upper_gram(h, chunk.reshape(-1, columns), bands)
    flat = x.reshape(-1, columns).double()
    exact = (flat.T @ flat).float()
    full = stats_module.mirror_upper(h)
    assert torch.equal(full, full.T)
    torch.testing.assert_close(full, exact, rtol=1e-5, atol=1e-4)
    results = {}
    for tri in (False, True):
        monkeypatch.setattr(stats_module, "TRIANGULAR_GRAM", {"cpu"} if tri else set())
        st = ChannelStats(columns, centred=False, gram=True)
        for chunk in x.split(2):
            st.update(chunk)
        assert st.xtx_upper == tri
        results[tri] = st
    torch.testing.assert_close(results[True].gram_matrix(), results[False].gram_matrix(), rtol=1e-5, atol=1e-4)
    first = results[True].gram_matrix()
    assert not results[True].xtx_upper and results[True].gram_matrix() is first and torch.equal(first, first.T)
