"""--compile: the block passes under torch.compile give the eager prune's masks, and the compiled code
is shared by the blocks (a deep model compiles once per pass kind, not once per block)."""
from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, needs_cxx, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from prunekit import PruneConfig, prune
from prunekit.errors import PrunekitError
from prunekit.execution import compiled


def _deep_llama(layers: int):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


DEVICES = [pytest.param("cpu", marks=needs_cxx),
           pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_passes_give_the_eager_masks_and_compile_once(device, samples, monkeypatch):
    """Float32 STADE (statistics with means and variances, bias update) over 4 blocks: the compiled
    prune zeroes the same weights as the eager one, its kept weights and biases agree to float32
    rounding, and no graph is compiled after the second block."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    graphs_at_block = []
    real_call = compiled.compiled_call

    def counting(block, h, args, kwargs):
        graphs_at_block.append((block, counters["stats"]["unique_graphs"]))
        return real_call(block, h, args, kwargs)
    monkeypatch.setattr(compiled, "compiled_call", counting)

    models, reports = {}, {}
    for compile_ in (False, True):
        model = models[compile_] = _deep_llama(4)
        config = PruneConfig(method="stade", nsamples=8, seqlen=32, batch_size=4, dtype="float32", device=device,
                             compile=compile_, offload="none")
        reports[compile_] = prune(model, config, samples)
    eager, fused = models[False].state_dict(), models[True].state_dict()
    for name, value in eager.items():
        if device == "cpu":
            assert torch.equal(value == 0, fused[name] == 0), name
        else:  # fused CUDA reductions may order a float32 sum differently: rounding-level near-ties
            assert ((value == 0) == (fused[name] == 0)).float().mean() > 0.999, name
            value, fused[name] = value * (fused[name] != 0), fused[name] * (value != 0)
        torch.testing.assert_close(fused[name], value, rtol=1e-4, atol=1e-6)

    blocks = list(models[True].model.layers)
    first_call = {}
    for block, graphs in graphs_at_block:
        first_call.setdefault(blocks.index(block), graphs)
    assert sorted(first_call) == [0, 1, 2, 3]
    final = counters["stats"]["unique_graphs"]
    assert first_call[0] == 0 < first_call[1]  # compiled on block 0 (statistics pass, pruned pass)
    assert first_call[2] == first_call[3] == final, (first_call, final)  # blocks 2 and 3 compiled nothing
    assert reports[True].phases[compiled.COMPILE_PHASE] > 0 and compiled.COMPILE_PHASE not in reports[False].phases


def test_compile_flag_round_trips_and_reaches_the_passes():
    from prunekit.cli import build_parser
    args = build_parser().parse_args(["prune", "--model", "m", "--compile"])
    from prunekit.cli import _config
    config = _config(args)
    assert config.compile is True
    assert PruneConfig.from_dict(config.to_dict()).compile is True
    from prunekit.execution import Compute
    assert Compute.from_config(config).compiled and Compute.for_stats(config).compiled
    assert not Compute.from_config(PruneConfig()).compiled


@needs_cxx
def test_statistics_hooks_run_after_a_compiled_pass_without_them(samples):
    """A compiled pass without hooks first (an evaluation of the dense model), then a compiled prune:
    its statistics passes must not reuse the hook-less code (Dynamo's default skips the guard on a
    module's hooks; --compile turns it on)."""
    from prunekit.adapters import adapter_for
    from prunekit.execution import Compute, capture_block_inputs, run_block
    torch._dynamo.reset()
    adapter = adapter_for("llama")
    model = tiny_model("llama")
    compute = Compute(torch.device("cpu"), torch.float32, compiled=True)
    inputs = capture_block_inputs(model, adapter, samples, 3, compute)
    for block in adapter.blocks(model):
        run_block(block, inputs, compute, outputs=inputs)
    eager = tiny_model("llama")
    config = dict(method="wanda", nsamples=8, seqlen=32, batch_size=3, dtype="float32", device="cpu")
    prune(eager, PruneConfig(**config), samples)
    prune(model, PruneConfig(**config, compile=True), samples)
    for (name, value), fused in zip(eager.state_dict().items(), model.state_dict().values()):
        assert torch.equal(value == 0, fused == 0), name


@needs_cxx
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_compiles(arch, samples):
    """Float32: the compiled prune zeroes the eager prune's weights; bfloat16 (prunekit's CPU attention
    kernel runs eagerly inside the compiled pass): it prunes to the target with finite weights."""
    for dtype in ("float32", "bfloat16"):
        states = []
        for compile_ in (False, True):
            model = tiny_model(arch)
            report = prune(model, PruneConfig(method="stade", nsamples=8, seqlen=32, batch_size=3, dtype=dtype,
                                              device="cpu", compile=compile_), samples)
            assert abs(report.sparsity - 0.5) < 0.01
            states.append(model.state_dict())
        for name, value in states[0].items():
            assert torch.isfinite(states[1][name]).all(), (dtype, name)
            if dtype == "float32":
                assert torch.equal(value == 0, states[1][name] == 0), name


@pytest.mark.parametrize("options", [dict(method="sparsegpt"), dict(method="wanda", allocation="alpha", pattern="2:4"),
                                     dict(method="wanda", allocation="owl"), dict(method="stade", record_error=True)],
                         ids=["sparsegpt", "alpha-2:4", "owl", "record-error"])
@needs_cxx
def test_compile_with_every_kind_of_pass(options, samples, monkeypatch, tmp_path):
    """SparseGPT's Gram statistics and weight updates, an allocation's dense pass, --record-error's
    full statistics pass with dense outputs: float32, the compiled prune's model is the eager one's."""
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path))
    results = []
    for compile_ in (False, True):
        model = tiny_model("llama")
        report = prune(model, PruneConfig(nsamples=8, seqlen=32, batch_size=3, dtype="float32", device="cpu",
                                          compile=compile_, **options), samples)
        results.append((model.state_dict(), report))
    (eager, eager_report), (fused, fused_report) = results
    assert eager_report.layers == fused_report.layers
    for name, value in eager.items():
        assert torch.equal(value == 0, fused[name] == 0), name
        torch.testing.assert_close(fused[name], value, rtol=1e-4, atol=1e-5)
    if options.get("record_error"):
        for a, b in zip(eager_report.block_error, fused_report.block_error):
            assert a["rel_mse"] == pytest.approx(b["rel_mse"], rel=1e-3)


def test_a_compiler_failure_is_one_line(samples, monkeypatch):
    def broken(*args):
        try:
            raise RuntimeError("no C++ compiler found\nlong traceback")
        except RuntimeError as e:
            raise torch._dynamo.exc.InternalTorchDynamoError("backend raised:\nmore") from e
    monkeypatch.setattr(compiled, "_compiled", broken)
    model = tiny_model("llama")
    with pytest.raises(PrunekitError, match=r"^--compile failed in torch.compile \(RuntimeError: no C\+\+ compiler found\): "
                                            r"run without --compile$"):
        prune(model, PruneConfig(method="wanda", nsamples=8, seqlen=32, device="cpu", compile=True), samples)
