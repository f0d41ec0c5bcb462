"""The two-stage ESD (prunekit/allocation/band.py): dense -> band by blocked Householder, band -> eigenvalues by
LAPACK dsbev on host threads; against torch.linalg.eigvalsh on tiny exact cases."""
import itertools
import sys
import threading
import time

import pytest
import torch

from prunekit.allocation import band as band_mod
from prunekit.allocation import esd
from prunekit.allocation.band import band_eigvalsh, band_reduce, host_band_solver
from prunekit.allocation.esd import esd_eigenvalues_batched, esd_method
from prunekit.config import PruneConfig
from prunekit.errors import PrunekitError

pytestmark = pytest.mark.skipif(not host_band_solver(), reason="SciPy's LAPACK is not importable")


def _spd(B, n, seed=0, extra=3):
    w = torch.randn(B, n, n + extra, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return w @ w.mT


def _dense_from_band(band):
    """The symmetric matrix band_reduce's storage stands for: band[j, d] = A'[j + d, j]."""
    n, width = band.shape
    A = torch.zeros(n, n, dtype=band.dtype)
    for d in range(width):
        A += torch.diag(band[:n - d, d], -d) + (torch.diag(band[:n - d, d], d) if d else 0)
    return A


# n below, at and above the band; n not a multiple of b; b = 1 (tridiagonal); n = 1 and 2
@pytest.mark.parametrize("B, n, b", [(2, 5, 16), (3, 17, 4), (2, 64, 16), (2, 100, 7), (1, 40, 1), (1, 2, 16),
                                     (1, 1, 16), (2, 33, 32)])
def test_band_reduce_is_an_orthogonal_similarity_to_a_band(B, n, b):
    A = _spd(B, n, seed=n)
    bands = band_reduce(A.clone(), b)
    assert bands.shape == (B, n, min(b, max(n - 1, 1)) + 1) and bands.dtype == torch.float64
    for a, x in zip(A, bands):
        dense = _dense_from_band(x)
        # similarity invariants: eigenvalues, trace, Frobenius norm
        exact = torch.linalg.eigvalsh(a)
        scale = exact.abs().max().item()
        torch.testing.assert_close(torch.linalg.eigvalsh(dense), exact, rtol=0, atol=1e-12 * scale)
        torch.testing.assert_close(dense.trace(), a.trace(), rtol=1e-12, atol=0)
        torch.testing.assert_close(dense.norm(), a.norm(), rtol=1e-12, atol=0)
        torch.testing.assert_close(band_eigvalsh(x), exact, rtol=0, atol=1e-12 * scale)


def test_band_reduce_hand_example_tridiagonal():
    # a 3 x 3 with b = 1: one reflector on rows 1..2 maps column 0's (3, 4) to (-5, 0)
    A = torch.tensor([[[2.0, 3.0, 4.0], [3.0, 1.0, 0.0], [4.0, 0.0, 1.0]]], dtype=torch.float64)
    out = band_reduce(A.clone(), 1)[0]
    torch.testing.assert_close(out[:, 0], torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64))  # diagonal
    torch.testing.assert_close(out[:2, 1], torch.tensor([-5.0, 0.0], dtype=torch.float64))  # subdiagonal


def test_band_reduce_zero_columns_and_ill_conditioning():
    w = torch.randn(1, 50, 80, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w[:, 10:30] = 0  # zero rows: whole panels with nothing to reduce (v = 0, H = I)
    A = w @ w.mT
    got = band_eigvalsh(band_reduce(A.clone(), 8)[0])
    exact = torch.linalg.eigvalsh(A[0])
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-12 * exact.max().item())
    q, _ = torch.linalg.qr(torch.randn(120, 120, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    s = torch.logspace(0, -12, 120, dtype=torch.float64)
    got = band_eigvalsh(band_reduce(((q * s) @ q.T)[None], 16)[0])
    torch.testing.assert_close(got, s.flip(0), rtol=0, atol=1e-13)


def test_band_reduce_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        band_reduce(torch.zeros(2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="half-bandwidth"):
        band_reduce(torch.zeros(1, 4, 4, dtype=torch.float64), 0)


def test_band_eigvalsh_releases_the_gil():
    # a pure-Python counter thread counts at its free rate (measured while the main thread sleeps) all
    # through the LAPACK call; with the GIL held it would count only in the odd switch slice
    band = torch.randn(3000, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ticks, done = [0], threading.Event()

    def count():
        while not done.is_set():
            ticks[0] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    counter = threading.Thread(target=count)
    try:
        counter.start()
        before, start = ticks[0], time.perf_counter()
        time.sleep(0.05)
        rate = (ticks[0] - before) / (time.perf_counter() - start)
        before, start = ticks[0], time.perf_counter()
        band_eigvalsh(band)
        during, expected = ticks[0] - before, rate * (time.perf_counter() - start)
    finally:
        done.set()
        counter.join()
        sys.setswitchinterval(interval)
    assert during > 0.1 * expected  # held GIL: ~0 (the odd switch slice); margin for a busy CI machine


# mixed shapes (tall, wide, square; two Gram sizes), several batches, and a batch of one
@pytest.mark.parametrize("batch", [None, 2, 1])
def test_two_stage_esd_matches_eigvalsh(batch):
    g = torch.Generator().manual_seed(3)
    shapes = [(60, 24), (24, 60), (40, 40), (60, 24), (70, 40), (40, 90), (24, 24)]
    ws = [torch.randn(*s, generator=g).to(torch.bfloat16 if i % 2 else torch.float32) for i, s in enumerate(shapes)]
    ws[2][:, :3] *= 30
    timings = {}
    got = esd_eigenvalues_batched(ws, "float64", "cpu", method="two_stage", band=4, batch=batch, timings=timings)
    ref = esd_eigenvalues_batched(ws, "float64", "cpu", method="eigvalsh")
    for w, a, e in zip(ws, got, ref):
        assert a.dtype == torch.float64 and a.device.type == "cpu" and a.shape == (min(w.shape),)
        assert torch.all(a[1:] >= a[:-1]) and torch.all(a >= 0)
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12 * e.max().item())
    assert timings["band"] == 4 and timings["host_threads"] >= 1 and timings["fallbacks"] == 0
    assert 0 <= timings["device_seconds"] <= timings["seconds"]


@pytest.mark.parametrize("corrupt", [lambda e: e * 1.001, lambda e: e.flip(0) * 0 + e.mean(),
                                     lambda e: torch.full_like(e, float("nan"))])
def test_two_stage_result_failing_its_invariants_falls_back_to_eigvalsh(corrupt, monkeypatch):
    """A band-stage result whose sum or sum of squares is not its Gram's trace or squared Frobenius
    norm (scaled, flattened to its mean, NaN) is recomputed by eigvalsh, and counted."""
    g = torch.Generator().manual_seed(5)
    ws = [torch.randn(30, 50, generator=g) for _ in range(3)]
    calls, order = [], itertools.count()  # next() is atomic: the pool's threads each get their own number
    solve = band_mod.band_eigvalsh

    def flaky(band):
        k = next(order)
        calls.append(k)
        e = solve(band)
        return corrupt(e) if k == 1 else e

    monkeypatch.setattr(band_mod, "band_eigvalsh", flaky)
    timings = {}
    got = esd_eigenvalues_batched(ws, "float64", "cpu", method="two_stage", band=4, batch=1, timings=timings)
    ref = esd_eigenvalues_batched(ws, "float64", "cpu", method="eigvalsh")
    assert timings["fallbacks"] == 1 and len(calls) == 3
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12 * e.max().item())


def test_esd_method_choice(monkeypatch):
    wide = [4096] * esd.TWO_STAGE_MIN_COUNT
    monkeypatch.setattr(esd, "_host_threads", lambda: esd.TWO_STAGE_MIN_THREADS)
    assert esd_method("auto", "float64", "cpu", wide) == "eigvalsh"  # the CPU's LAPACK eigvalsh is one call
    assert esd_method("auto", "float64", "cuda", wide) == "two_stage"
    assert esd_method("auto", "float64", "cuda:1", wide) == "two_stage"
    assert esd_method("auto", "float32", "cuda", wide) == "eigvalsh"
    assert esd_method("auto", "float64", "cuda", wide[1:]) == "eigvalsh"  # too few to batch
    assert esd_method("auto", "float64", "cuda", [esd.TWO_STAGE_MIN - 1] * 64) == "eigvalsh"
    assert esd_method("eigvalsh", "float64", "cuda", wide) == "eigvalsh"
    assert esd_method("two_stage", "float64", "cpu", []) == "two_stage"
    with pytest.raises(ValueError, match="float64"):
        esd_method("two_stage", "float32", "cuda", wide)
    with pytest.raises(ValueError, match="unknown ESD method"):
        esd_method("svd", "float64", "cuda", wide)
    monkeypatch.setattr(esd, "_host_threads", lambda: esd.TWO_STAGE_MIN_THREADS - 1)  # too few host threads
    assert esd_method("auto", "float64", "cuda", wide) == "eigvalsh"
    assert esd_method("two_stage", "float64", "cuda", wide) == "two_stage"
    monkeypatch.setattr(esd, "_host_threads", lambda: esd.TWO_STAGE_MIN_THREADS)
    monkeypatch.setattr(band_mod, "host_band_solver", lambda: False)  # no SciPy: eigvalsh
    assert esd_method("auto", "float64", "cuda", wide) == "eigvalsh"


def test_config_validates_the_esd_options():
    PruneConfig(esd_method="two_stage", esd_band=8, esd_batch=64)
    with pytest.raises(PrunekitError, match="--esd-method"):
        PruneConfig(esd_method="svd")
    with pytest.raises(PrunekitError, match="float64"):
        PruneConfig(esd_method="two_stage", esd_dtype="float32")
    with pytest.raises(PrunekitError, match="--esd-band"):
        PruneConfig(esd_band=0)
    with pytest.raises(PrunekitError, match="--esd-batch"):
        PruneConfig(esd_batch=-1)
    with pytest.raises(PrunekitError, match="--esd-graph"):
        PruneConfig(esd_graph="yes")


def test_esd_band_and_batch_reach_the_eigensolver(tmp_path, monkeypatch):
    """--esd-band, --esd-batch and --esd-graph (CLI -> PruneConfig -> model_spectra) set the two-stage
    path's band, batches and graph replay (which a CPU turns off); the eigenvalues stay eigvalsh's."""
    from conftest import tiny_model

    from prunekit.adapters import adapter_for
    from prunekit.allocation.alpha import esd_options, model_spectra
    from prunekit.cli import _allocation_options, build_parser

    args = build_parser().parse_args(["analyze", "--model", "m", "--esd-method", "two_stage", "--esd-band", "3",
                                      "--esd-batch", "5", "--esd-graph"])
    config = PruneConfig(**_allocation_options(args))
    assert esd_options(config) == {"method": "two_stage", "band": 3, "batch": 5, "graph": True}
    assert esd_options(PruneConfig())["graph"] is False
    assert esd_options(PruneConfig())["batch"] is None  # 0: automatic
    model, adapter = tiny_model("llama"), adapter_for("llama")
    got = model_spectra(model, adapter, "cpu", use_cache=False, **esd_options(config))
    timings = got["timings"]
    assert timings["band"] == 3 and max(timings["batches"]) == 5 and sum(timings["batches"]) == len(got["eigs"])
    assert timings["graph"] == "off" and timings["graph_capture_seconds"] == 0  # CUDA graphs: CUDA only
    ref = model_spectra(model, adapter, "cpu", use_cache=False, method="eigvalsh")
    assert ref["timings"] == {}
    for name, e in ref["eigs"].items():
        torch.testing.assert_close(got["eigs"][name], e, rtol=0, atol=1e-12 * e.max().item())


def test_alpha_pruning_same_with_either_method(tmp_path, monkeypatch, samples):
    from conftest import tiny_model

    from prunekit import prune
    from prunekit.adapters import adapter_for
    from prunekit.allocation.alpha import layer_alphas, model_spectra

    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path))
    model, adapter = tiny_model("llama"), adapter_for("llama")
    alphas = {m: layer_alphas(model_spectra(model, adapter, "cpu", use_cache=False, method=m)["eigs"])
              for m in ("eigvalsh", "two_stage")}
    assert alphas["eigvalsh"].keys() == alphas["two_stage"].keys()
    for name, a in alphas["eigvalsh"].items():
        assert abs(a - alphas["two_stage"][name]) < 1e-9, name
    reports = {}
    for m in ("eigvalsh", "two_stage"):
        monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / m))  # no shared spectra
        config = PruneConfig(method="wanda", sparsity=0.5, allocation="alpha", nsamples=8, seqlen=32, esd_method=m)
        reports[m] = [b["sparsity"] for b in prune(tiny_model("llama"), config, samples).allocation]
    assert reports["eigvalsh"] == pytest.approx(reports["two_stage"], abs=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_stage_esd_on_cuda_matches_the_host():
    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(s, generator=g).to(torch.bfloat16) for s in [(300, 200), (200, 300), (200, 200)] * 4]
    got = esd_eigenvalues_batched(ws, "float64", "cuda", method="two_stage", band=16, batch=5)
    for w, a in zip(ws, got):
        e = esd_eigenvalues_batched([w], "float64", "cpu", method="eigvalsh")[0]
        assert a.device.type == "cpu"
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12 * e.max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_band_reduce_graph_replays_the_eager_reduction():
    """A CUDA graph of band_reduce, replayed on new Grams, gives the eager kernels' bands bit for bit;
    --esd-graph's ESD uses it for a batch shape that recurs and matches the host's eigvalsh."""
    from prunekit.allocation.band import BandReduceGraph, band_reduce

    g = torch.Generator().manual_seed(5)
    replay = BandReduceGraph(3, 96, 8, torch.device("cuda"))
    for _ in range(2):
        w = torch.randn(3, 130, 96, generator=g, dtype=torch.float64).cuda()
        grams = w.mT @ w
        replay.grams.copy_(grams)
        torch.testing.assert_close(replay(), band_reduce(grams.clone(), 8), rtol=0, atol=0)
    ws = [torch.randn(300, 200, generator=g).to(torch.bfloat16) for _ in range(12)]
    timings = {}
    got = esd_eigenvalues_batched(ws, "float64", "cuda", method="two_stage", band=16, batch=3, timings=timings,
                                  graph=True)
    assert timings["graph"] == "on" and timings["graph_capture_seconds"] > 0 and timings["fallbacks"] == 0
    for w, a in zip(ws, got):
        e = esd_eigenvalues_batched([w], "float64", "cpu", method="eigvalsh")[0]
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12 * e.max().item())
