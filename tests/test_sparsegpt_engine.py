"""SparseGPT inside the block loop: every allocation and pattern, both dtypes, output error below
Wanda's, the Hessian shared with the statistics hook, a failing Cholesky named by layer."""
import pytest
import torch

from conftest import tiny_model
from prunekit import PruneConfig, PrunekitError, prune
from prunekit.adapters import adapter_for


@pytest.mark.parametrize("allocation,pattern", [("uniform", "unstructured"), ("uniform", "2:4"),
                                                ("alpha", "unstructured"), ("owl", "4:8")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sparsegpt_every_allocation_and_pattern(allocation, pattern, dtype, samples, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path))
    model = tiny_model("llama")
    adapter = adapter_for("llama")
    config = PruneConfig(method="sparsegpt", allocation=allocation, pattern=pattern, nsamples=8, seqlen=32,
                         dtype=dtype, device="cpu", sparsity=0.5 if pattern == "unstructured" else None)
    report = prune(model, config, samples)
    assert report.sparsity == pytest.approx(0.5, abs=0.02)
    if pattern != "unstructured":
        n, m = map(int, pattern.split(":"))
        for layer in report.layers:
            w = adapter.weight(model.get_submodule(layer["name"]))
            per_group = (w == 0).view(w.shape[0], -1, m).sum(-1)
            assert (per_group >= round(layer["sparsity"] * m)).all()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_block_error_below_wanda(pattern, samples):
    errors = {}
    for method in ("sparsegpt", "wanda", "magnitude"):
        model = tiny_model("llama")
        report = prune(model, PruneConfig(method=method, pattern=pattern, nsamples=8, seqlen=32, record_error=True,
                                          device="cpu"), samples)
        errors[method] = [e["rel_mse"] for e in report.block_error]
    assert all(s < w for s, w in zip(errors["sparsegpt"], errors["wanda"]))
    assert all(s < m for s, m in zip(errors["sparsegpt"], errors["magnitude"]))


def test_sparsegpt_updates_kept_weights(samples):
    dense, model = tiny_model("llama"), tiny_model("llama")
    prune(model, PruneConfig(method="sparsegpt", nsamples=8, seqlen=32, device="cpu"), samples)
    w0, w = dense.model.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight
    kept = w != 0
    assert not torch.equal(w[kept], w0[kept])  # OBS update moved the survivors


def test_sparsegpt_hessian_failure_names_the_layer(samples, monkeypatch):
    from prunekit.scoring import sparsegpt
    monkeypatch.setattr(sparsegpt, "sparsegpt_hessian", lambda gram, nseq: torch.full_like(gram, float("nan")))
    with pytest.raises(PrunekitError, match=r"model.layers.0.self_attn.q_proj: NaN/inf in the SparseGPT Hessian"):
        prune(tiny_model("llama"), PruneConfig(method="sparsegpt", nsamples=8, seqlen=32, device="cpu"), samples)


def test_hessian_stays_float32_in_bf16_passes(samples):
    """autocast lowers matmuls inside a bf16 pass; X^T X must still accumulate in float32 over batches."""
    from prunekit.execution import Compute, capture_block_inputs, collect_stats, run_block
    model = tiny_model("llama")
    adapter = adapter_for("llama")
    low = Compute(torch.device("cpu"), torch.bfloat16)
    inputs = capture_block_inputs(model, adapter, samples, 3, low)  # three batches
    block = adapter.blocks(model)[0]
    with collect_stats(adapter.block_linears(block), gram=lambda n: True, centred=lambda n: False) as stats:
        run_block(block, inputs, low)
    xtx = stats["self_attn.q_proj"].gram_matrix()
    assert xtx.dtype == torch.float32
    assert torch.allclose(xtx.diagonal(), stats["self_attn.q_proj"].sum_sq, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_linears_reading_one_tensor_share_one_accumulator(arch, samples):
    """q/k/v (and Llama's gate/up) read the same tensor: one ChannelStats (one X^T X) counts it once,
    under the eager passes' input lowering in bf16 as well."""
    from prunekit.execution import Compute, capture_block_inputs, collect_stats, run_block
    model = tiny_model(arch)
    adapter = adapter_for(arch)
    for dtype in (torch.float32, torch.bfloat16):
        compute = Compute(torch.device("cpu"), dtype)
        inputs = capture_block_inputs(model, adapter, samples, 3, compute)
        block = adapter.blocks(model)[0]
        with collect_stats(adapter.block_linears(block), gram=lambda n: True, centred=lambda n: True) as stats:
            run_block(block, inputs, compute)
        groups = {}
        for name, st in stats.items():
            groups.setdefault(id(st), []).append(name.split(".")[-1])
            assert st.ntokens == samples.numel(), name  # every token counted once
        names = sorted(sorted(g) for g in groups.values())
        shared = [g for g in names if len(g) > 1]
        expected = [["k_proj", "q_proj", "v_proj"]] + ([["gate_proj", "up_proj"]] if arch == "llama" else [])
        assert sorted(shared) == sorted(expected), (dtype, names)


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_reference_arithmetic_is_the_reference_bit_for_bit(arch, pattern, samples):
    """--sparsegpt-arithmetic reference against bench/bench_sparsegpt_ref.py's independent loop (the
    Wanda repo's structure: one sequence at a time, running-average Hessian per linear, fasterprune
    column by column): every parameter identical. The fast arithmetic is not (float32 rounding)."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    from bench_sparsegpt_ref import ref_prune
    adapter = adapter_for(arch)
    nm = (2, 4) if pattern == "2:4" else None
    expected = tiny_model(arch)
    ref_prune(expected, adapter, samples, nm=nm)
    for arithmetic in ("reference", "fast"):
        model = tiny_model(arch)
        prune(model, PruneConfig(method="sparsegpt", pattern=pattern, nsamples=8, seqlen=32, dtype="float32",
                                 device="cpu", sparsegpt_arithmetic=arithmetic), samples, adapter)
        same = [torch.equal(a, b) for a, b in zip(model.parameters(), expected.parameters())]
        assert all(same) == (arithmetic == "reference"), arithmetic


def test_reference_arithmetic_refuses_a_batch_size():
    with pytest.raises(PrunekitError, match="one sequence per pass.*drop --batch-size 4"):
        PruneConfig(method="sparsegpt", sparsegpt_arithmetic="reference", batch_size=4)
    with pytest.raises(PrunekitError, match="--sparsegpt-arithmetic 'exact' is not fast or reference"):
        PruneConfig(method="sparsegpt", sparsegpt_arithmetic="exact")
    assert PruneConfig(method="sparsegpt", sparsegpt_arithmetic="reference", seqlen=64).effective_batch_size == 1
    assert PruneConfig(method="wanda", sparsegpt_arithmetic="reference", seqlen=64).effective_batch_size == 32


def test_reference_arithmetic_refuses_several_processes(samples, monkeypatch):
    from prunekit.execution import distributed
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    with pytest.raises(PrunekitError, match="reference's float32 order in one process: run it without torchrun"):
        prune(tiny_model("llama"), PruneConfig(method="sparsegpt", nsamples=8, seqlen=32, device="cpu",
                                               sparsegpt_arithmetic="reference"), samples)
