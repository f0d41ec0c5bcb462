"""Execution on tiny random models: every adapter end to end, the block-by-block protocol, save/reload."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ARCHS, tiny_model
from prunekit import PruneConfig, PrunekitError, prune
from prunekit.adapters import adapter_for
from prunekit.data import calibration_samples, eval_windows
from prunekit.execution import Compute
from prunekit.evaluate import perplexity, window_nll
from prunekit.export import save


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "stade-w"])
def test_every_adapter_prunes_to_target(arch, method, samples):
    model = tiny_model(arch)
    adapter = adapter_for(arch)
    embed = model.get_input_embeddings().weight.clone()
    report = prune(model, PruneConfig(method=method, sparsity=0.5, nsamples=8, seqlen=32), samples)
    assert len(report.layers) == 2 * len(adapter.linears)
    for layer in report.layers:
        assert layer["sparsity"] == pytest.approx(0.5, abs=1e-6), layer
        module = model.get_submodule(layer["name"])
        assert (module.weight == 0).float().mean().item() >= 0.5 - 1e-6
    assert torch.equal(model.get_input_embeddings().weight, embed)  # embeddings and head never pruned
    assert torch.isfinite(_logits(model, samples[:2])).all()


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_nm_pattern_end_to_end(arch, samples):
    model = tiny_model(arch)
    adapter = adapter_for(arch)
    prune(model, PruneConfig(method="wanda", pattern="2:4", nsamples=8, seqlen=32), samples)
    for block in adapter.blocks(model):
        for module in adapter.block_linears(block).values():
            w = adapter.weight(module)
            assert ((w == 0).view(w.shape[0], -1, 4).sum(-1) >= 2).all()


def _naive_reference_masks(model, adapter, samples, sparsity):
    """The protocol written the slow, obvious way: for each block, run the *whole* model (earlier blocks
    already pruned) over every sample with hooks on this block's linears, then prune this block."""
    from prunekit.scoring.wanda import wanda_scores
    from prunekit.masks import row_lowest_mask
    masks = {}
    for i, block in enumerate(adapter.blocks(model)):
        sq = {}

        def hook(mod, args, out, name=None):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sq[name] = sq.get(name, 0) + (x * x).sum(0)
        handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n))
                   for n, m in adapter.block_linears(block).items()]
        with torch.no_grad():
            for s in samples:
                model(input_ids=s[None])
        for h in handles:
            h.remove()
        for name, module in adapter.block_linears(block).items():
            w = adapter.weight(module)
            mask = row_lowest_mask(wanda_scores(w.double(), sq[name] / len(samples)), sparsity)
            masks[f"{adapter.blocks_path}.{i}.{name}"] = mask
            with torch.no_grad():
                w[mask] = 0
    return masks


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_engine_matches_naive_protocol(arch, samples):
    adapter = adapter_for(arch)
    reference = tiny_model(arch)
    expected = _naive_reference_masks(reference, adapter, samples, 0.5)
    model = tiny_model(arch)
    prune(model, PruneConfig(method="wanda", sparsity=0.5, nsamples=8, seqlen=32, batch_size=3), samples)
    for name, mask in expected.items():
        got = adapter.weight(model.get_submodule(name)) == 0
        agree = (got == mask).float().mean().item()
        assert agree > 0.995, (name, agree)  # float summation order may flip a borderline weight
    assert torch.allclose(_logits(model, samples[:2]), _logits(reference, samples[:2]), atol=1e-3)


def test_bfloat16_compute_close_to_float32(samples):
    a, b = tiny_model("llama"), tiny_model("llama")
    prune(a, PruneConfig(method="wanda", nsamples=8, seqlen=32), samples)
    prune(b, PruneConfig(method="wanda", nsamples=8, seqlen=32, dtype="bfloat16"), samples)
    assert next(b.parameters()).dtype == torch.float32  # master weights stay in their dtype
    agree = [((adapter_for("llama").weight(ma) == 0) == (adapter_for("llama").weight(mb) == 0)).float().mean()
             for (na, ma), (nb, mb) in zip(a.named_modules(), b.named_modules()) if isinstance(ma, torch.nn.Linear)
             and "lm_head" not in na]
    assert min(agree) > 0.9


@pytest.mark.parametrize("arch,method", [("llama", "wanda"), ("llama", "stade"), ("opt", "stade"),
                                         ("gpt2", "stade-w"), ("gpt_neox", "stade")])
def test_save_reload_identical_logits(arch, method, samples, tmp_path):
    model = tiny_model(arch)
    adapter = adapter_for(arch)
    prune(model, PruneConfig(method=method, nsamples=8, seqlen=32), samples)
    path = save(model, None, str(tmp_path / "out"), {"method": method})
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder left behind
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~umask  # an ordinary folder, not mkdtemp's private one
    assert os.stat(os.path.join(path, "model.safetensors")).st_mode & 0o777 == 0o666 & ~umask
    assert json.load(open(os.path.join(path, "prunekit.json")))["method"] == method
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert torch.equal(_logits(model, samples[:2]), _logits(reloaded, samples[:2]))
    if method.startswith("stade"):
        stade_linear = [n for n in adapter.linears if n not in adapter.norm_fed][0]
        bias = reloaded.get_submodule(f"{adapter.blocks_path}.0.{stade_linear}").bias
        original = model.get_submodule(f"{adapter.blocks_path}.0.{stade_linear}").bias
        assert bias is not None and bias.abs().sum() > 0
        assert torch.equal(bias, original)  # the compensated bias survives the round trip


def test_stade_bias_on_llama_turns_on_config_flags(samples):
    model = tiny_model("llama")
    prune(model, PruneConfig(method="stade-w", nsamples=8, seqlen=32), samples)
    assert model.config.attention_bias and model.config.mlp_bias
    block = model.model.layers[0]
    assert block.self_attn.q_proj.bias.abs().sum() == 0 and block.mlp.up_proj.bias.abs().sum() == 0
    assert block.self_attn.o_proj.bias.abs().sum() > 0 and block.mlp.down_proj.bias.abs().sum() > 0


def test_stade_mean_output_matches_dense_layer(samples):
    """Inside the real pipeline: after pruning block 0's down_proj with STADE, its mean output over the
    calibration tokens equals the dense layer's mean output on the same inputs."""
    dense = tiny_model("llama")
    model = tiny_model("llama")
    captured = {}
    h = dense.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, a, o: captured.setdefault("x", []).append(a[0].detach()))
    with torch.no_grad():
        dense(input_ids=samples)
    h.remove()
    prune(model, PruneConfig(method="stade", nsamples=8, seqlen=32), samples)
    x = torch.cat(captured["x"]).reshape(-1, 128)
    ref = dense.model.layers[0].mlp.down_proj(x).mean(0)
    got = model.model.layers[0].mlp.down_proj(x).mean(0)
    assert torch.allclose(got, ref, atol=1e-4)


def test_nan_activations_are_reported(samples):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(PrunekitError, match="NaN"):
        prune(model, PruneConfig(method="wanda", nsamples=8, seqlen=32), samples)


def test_calibration_sampler_is_wandas():
    import random
    ids = torch.arange(1000)
    got = calibration_samples(ids, 5, 64, seed=3)
    random.seed(3)
    for row in got:
        i = random.randint(0, 1000 - 64 - 1)
        assert torch.equal(row, ids[i:i + 64])
    with pytest.raises(PrunekitError, match="too short"):
        calibration_samples(ids, 100, 64, seed=0)


def test_perplexity_protocol():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(0))
    windows = eval_windows(ids, 100, max_windows=4)
    assert windows.shape == (4, 100) and torch.equal(windows[1], ids[100:200])
    assert eval_windows(ids, 300).shape == (3, 300)  # remainder dropped
    result = perplexity(model, windows, Compute(torch.device("cpu"), torch.float32), batch_size=3)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows]  # HF: mean CE of shifted tokens
    assert result["ppl"] == pytest.approx(torch.stack(losses).mean().exp().item(), rel=1e-5)
    logits = torch.zeros(1, 3, 5)
    assert window_nll(logits, torch.tensor([[0, 1, 2]])).item() == pytest.approx(torch.log(torch.tensor(5.0)).item())
    with pytest.raises(PrunekitError, match="fewer than one window"):
        eval_windows(ids, 2000)


def test_float32_statistics_with_bf16_passes(samples):
    """--dtype bfloat16 --stats-dtype float32: the first block's statistics come from the same float32
    inputs as a float32 run, so its masks are identical; later blocks see bf16-carried inputs."""
    adapter = adapter_for("llama")
    a, b = tiny_model("llama"), tiny_model("llama")
    prune(a, PruneConfig(method="wanda", nsamples=8, seqlen=32), samples)
    prune(b, PruneConfig(method="wanda", nsamples=8, seqlen=32, dtype="bfloat16", stats_dtype="float32"), samples)
    blocks_a, blocks_b = adapter.blocks(a), adapter.blocks(b)
    for name in adapter.linears:
        wa = adapter.weight(blocks_a[0].get_submodule(name))
        wb = adapter.weight(blocks_b[0].get_submodule(name))
        assert torch.equal(wa == 0, wb == 0), name
        agree = ((adapter.weight(blocks_a[1].get_submodule(name)) == 0)
                 == (adapter.weight(blocks_b[1].get_submodule(name)) == 0)).float().mean()
        assert agree > 0.9, name


def test_bad_stats_dtype_is_one_line_error():
    with pytest.raises(PrunekitError, match="--stats-dtype 'fp8' is not one of"):
        PruneConfig(stats_dtype="fp8")


def test_batches_share_their_identical_extra_tensors(samples):
    """Every batch recomputes the rotary tables: the capture holds one copy, and a pass converts it
    once (Compute.tree's memo), so a bf16 pass lowers the tables once, not once per batch."""
    from prunekit.execution import Compute, capture_block_inputs
    model, adapter = tiny_model("llama"), adapter_for("llama")
    low = Compute(torch.device("cpu"), torch.bfloat16)
    acts = capture_block_inputs(model, adapter, samples, 1, low)
    cos = [e[1]["position_embeddings"][0] for e in acts.extra]
    assert len(cos) == samples.shape[0] and all(c is cos[0] for c in cos)
    memo = {}
    lowered = [low.tree(e[1], memo)["position_embeddings"][0] for e in acts.extra]
    assert all(t is lowered[0] for t in lowered) and lowered[0].dtype == torch.bfloat16
    assert torch.equal(lowered[0], cos[0].bfloat16())
