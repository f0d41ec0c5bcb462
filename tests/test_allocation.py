"""Allocation x scorer x pattern on tiny random models: achieved per-layer sparsity equals the allocation."""
import itertools

import pytest
import torch

from conftest import tiny_model
from prunekit import PruneConfig, PrunekitError, prune
from prunekit.adapters import adapter_for
from prunekit.allocation.alpha import alpha_allocation, esd_precision, model_spectra, weights_key
from prunekit.allocation.owl import owl_allocation


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "cache"))


def _shaped_model(arch="llama"):
    """A tiny model whose blocks differ: scale block weights so spectra and outliers vary with depth."""
    model = tiny_model(arch)
    adapter = adapter_for(arch)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, block in enumerate(adapter.blocks(model)):
            for module in adapter.block_linears(block).values():
                w = adapter.weight(module)
                # block 1 gets a heavy-tailed (low-rank spike) component, block 0 stays Gaussian
                if i == 1:
                    u = torch.randn(w.shape[0], 2, generator=g)
                    v = torch.randn(2, w.shape[1], generator=g)
                    w.add_(0.5 * u @ v)
    return model


SCORERS = ["magnitude", "wanda", "stade", "stade-w"]


@pytest.mark.parametrize("allocation,method,pattern",
                         list(itertools.product(["alpha", "owl"], SCORERS, ["unstructured", "4:8"])))
def test_any_allocation_any_scorer_any_pattern(allocation, method, pattern, samples):
    model = _shaped_model()
    adapter = adapter_for("llama")
    config = PruneConfig(method=method, sparsity=0.5, pattern=pattern, allocation=allocation, nsamples=8,
                         seqlen=32, epsilon=0.3)
    report = prune(model, config, samples)
    assert len(report.allocation) == 2
    targets = [b["sparsity"] for b in report.allocation]
    assert targets[0] != pytest.approx(targets[1])  # really non-uniform
    params = {}
    achieved = {}
    for layer in report.layers:
        i = int(layer["name"].split(".")[2])
        numel = model.get_submodule(layer["name"]).weight.numel()
        params[i] = params.get(i, 0) + numel
        achieved[i] = achieved.get(i, 0) + layer["sparsity"] * numel
        w = adapter.weight(model.get_submodule(layer["name"]))
        assert (w == 0).float().mean().item() == pytest.approx(layer["sparsity"], abs=1e-6)
    for layer in report.layers:  # block_wise: every linear of a block has the block's target
        target = report.allocation[int(layer["name"].split(".")[2])]["sparsity"]
        w = adapter.weight(model.get_submodule(layer["name"]))
        if pattern != "unstructured":
            expected = target
        elif method == "magnitude":  # one comparison group per matrix
            expected = int(w.numel() * target) / w.numel()
        else:  # one per output row
            expected = int(w.shape[1] * target) / w.shape[1]
        assert layer["sparsity"] == pytest.approx(expected, abs=1e-9), layer
    # the whole model still hits the target
    # the whole model still hits the target (N:M: as close as whole N_l allow)
    assert report.sparsity == pytest.approx(0.5, abs=0.02 if pattern == "unstructured" else 1 / 16)
    if pattern != "unstructured":
        for layer in report.layers:
            w = adapter.weight(model.get_submodule(layer["name"]))
            per_group = (w == 0).view(w.shape[0], -1, 8).sum(-1)
            assert (per_group == round(layer["sparsity"] * 8)).all()  # every group holds this layer's N


def test_alpha_prunes_heavy_tailed_block_less(samples):
    model = _shaped_model()
    report = prune(model, PruneConfig(method="wanda", sparsity=0.6, allocation="alpha", nsamples=8, seqlen=32), samples)
    a0, a1 = report.allocation
    assert a1["metric"] < a0["metric"]        # the spiked block has the heavier tail (smaller alpha)
    assert a1["sparsity"] < a0["sparsity"]    # ... so it is pruned less
    assert report.allocation_info["esd_seconds"] >= 0 and len(report.allocation_info["alphas"]) == 14


def test_alpha_allocation_by_hand():
    adapter = adapter_for("llama")
    alphas = {f"model.layers.{i}.{n}": a for i, a in enumerate([2.0, 3.0, 4.0]) for n in adapter.linears}
    params = [{n: 100 for n in adapter.linears} for _ in range(3)]
    alloc = alpha_allocation(alphas, adapter, params, 0.5, 0.2)
    # r = 0.8, 1.0, 1.2; mean 1 -> s = 0.4, 0.5, 0.6
    assert [b["sparsity"] for b in alloc.blocks] == pytest.approx([0.4, 0.5, 0.6])
    # at 0.9 target the top block would get 1.08: clipped to 0.99, excess shared in proportion to r
    alloc = alpha_allocation(alphas, adapter, params, 0.9, 0.2, max_sparsity=0.99)
    s = [b["sparsity"] for b in alloc.blocks]
    assert s[2] == pytest.approx(0.99) and sum(s) / 3 == pytest.approx(0.9, abs=1e-6)
    assert s[0] / s[1] == pytest.approx(0.8 / 1.0)


def test_owl_allocation_by_hand():
    params = [{"a": 10}, {"a": 10}, {"a": 10}]
    # D = 1, 2, 3 -> r = 0, 0.08, 0.16 (lambda 0.08), mean 0.08 -> s = S + 0.08, S, S - 0.08
    assert owl_allocation([1.0, 2.0, 3.0], params, 0.5, 0.08) == pytest.approx([0.58, 0.5, 0.42])


def test_esd_cache_hits_on_same_weights(tmp_path):
    model = _shaped_model()
    adapter = adapter_for("llama")
    first = model_spectra(model, adapter)
    second = model_spectra(model, adapter)
    assert not first["cached"] and second["cached"]
    for k in first["eigs"]:
        assert torch.equal(first["eigs"][k], second["eigs"][k])
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1
    assert not model_spectra(model, adapter)["cached"]


def test_weights_key_depends_on_values():
    a = [("x", torch.ones(3, 3))]
    b = [("x", torch.ones(3, 3) * 2)]
    assert weights_key(a) != weights_key(b) and weights_key(a) == weights_key([("x", torch.ones(3, 3))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_key_sees_every_single_change(dtype, monkeypatch):
    import prunekit.allocation.alpha as alpha_mod
    monkeypatch.setitem(alpha_mod._FINGERPRINT_CHUNK, "cpu", 1000)  # several blocks per matrix
    g = torch.Generator().manual_seed(0)
    named = [("a", torch.randn(70, 40, generator=g).to(dtype)), ("b", torch.randn(40, 70, generator=g).to(dtype))]
    base = weights_key(named)
    assert weights_key([(n, w.clone()) for n, w in named]) == base  # nothing changed: same key
    threads = torch.get_num_threads()
    try:  # ... whatever the thread count, and the caller's thread count is left alone
        torch.set_num_threads(3)
        assert weights_key(named) == base and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    assert weights_key(named, "esd:float32") != base
    for name, i, j in [("a", 0, 0), ("a", 69, 39), ("b", 17, 3), ("b", 39, 69)]:
        w = dict(named)[name]
        changed = w.clone()
        changed[i, j] = torch.nextafter(changed[i, j].float(), torch.tensor(float("inf"))).to(dtype)  # one ulp up
        if dtype == torch.bfloat16 and changed[i, j] == w[i, j]:
            changed[i, j] = w[i, j] * (1 + 2 ** -7)  # the float32 step rounded away: one bfloat16 step
        assert changed[i, j] != w[i, j]
        assert weights_key([(n, changed if n == name else x) for n, x in named]) != base
    for k in range(8):  # two values swapped: same sum and sum of squares
        swapped = named[0][1].clone()
        a, b = (k, 5 * k), (k, 39 - 3 * k)  # within one row, so within one block
        swapped[a], swapped[b] = named[0][1][b], named[0][1][a]
        assert weights_key([("a", swapped), named[1]]) != base
    assert weights_key([("a", named[0][1].reshape(40, 70)), named[1]]) != base  # same values, other shape


def test_weight_fingerprint_is_its_formula(monkeypatch):
    """[sum W, sum W^2, sum sigma W, sum f W] with f the row-major index and sigma_f = s(f mod n) s(f div n)
    for blocks of n elements (whole rows), computed here directly; the last block is shorter."""
    import prunekit.allocation.alpha as alpha_mod
    monkeypatch.setitem(alpha_mod._FINGERPRINT_CHUNK, "cpu", 1000)
    w = torch.randn(70, 40, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    n = (1000 // 40) * 40
    x = w.double().flatten()
    f = torch.arange(x.numel())
    sigma = alpha_mod._signs(n, "cpu")[f % n] * alpha_mod._signs(x.numel() // n + 1, "cpu")[f // n]
    expected = torch.stack([x.sum(), (x * x).sum(), (sigma * x).sum(), (f.double() * x).sum()])
    torch.testing.assert_close(alpha_mod.weight_fingerprint(w), expected, rtol=1e-12, atol=1e-9)
    assert weights_key([("w", w)], device="cpu") == weights_key([("w", w)])


def test_weights_key_copies_only_the_fingerprints_to_the_host(monkeypatch):
    """The weights stay where they are: the only host-bound copy is the 4 float64 per matrix, once."""
    named = [(f"w{i}", torch.randn(64, 48)) for i in range(5)]
    moved = []
    for method in ("cpu", "numpy", "tolist", "item", "__array__"):
        original = getattr(torch.Tensor, method)

        def spy(self, *args, _original=original, _method=method, **kwargs):
            moved.append((_method, self.numel()))
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, method, spy)
    original_to = torch.Tensor.to

    def spy_to(self, *args, **kwargs):
        if any(str(a) == "cpu" for a in (*args, *kwargs.values())):
            moved.append(("to", self.numel()))
        return original_to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    weights_key(named)
    assert [m for m in moved if m[0] == "cpu"] == [("cpu", 4 * len(named))]
    assert max(n for _, n in moved) <= 4 * len(named)


def test_esd_precision_is_in_the_cache_key(tmp_path):
    model = _shaped_model()
    adapter = adapter_for("llama")
    f64 = model_spectra(model, adapter, precision="float64")
    f32 = model_spectra(model, adapter, precision="float32")
    assert not f64["cached"] and not f32["cached"] and model_spectra(model, adapter, precision="auto")["cached"]
    for k in f64["eigs"]:
        torch.testing.assert_close(f32["eigs"][k], f64["eigs"][k], rtol=0, atol=1e-5 * f64["eigs"][k].max().item())
    assert esd_precision("auto", "alpha_mid") == "float32" and esd_precision("auto", "alpha_peak") == "float64"
    with pytest.raises(PrunekitError, match="unknown ESD precision"):
        model_spectra(model, adapter, precision="float16")


def test_bad_allocation_options():
    with pytest.raises(PrunekitError, match="unknown allocation"):
        PruneConfig(allocation="random")
    with pytest.raises(PrunekitError, match="alpha metric"):
        PruneConfig(allocation="alpha", alpha_metric="alpha_max")
    with pytest.raises(PrunekitError, match="max layer sparsity"):
        PruneConfig(sparsity=0.9, max_layer_sparsity=0.8)
