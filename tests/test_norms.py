"""The fused RMSNorm of the passes (precision.fused_norms): the same formula as transformers' own
classes, bit for bit their outputs on the CPU, and the model's own forward back afterwards."""
import importlib
import inspect

import pytest
import torch

from conftest import tiny_model
from prunekit import PruneConfig, prune
from prunekit.execution import precision
from prunekit.execution.precision import LLAMA_RMS_NORMS, Compute, fused_norms


def test_listed_classes_share_llamas_forward():
    """A transformers release that changes one of these forwards fails here, not silently."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    reference = inspect.getsource(LlamaRMSNorm.forward)
    for name in LLAMA_RMS_NORMS:
        family = name.removesuffix("RMSNorm").lower()
        cls = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)
        assert inspect.getsource(cls.forward).replace(name, "LlamaRMSNorm") == reference, name


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", ["float32", "compute"])
@pytest.mark.parametrize("ckpt", [torch.float32, torch.bfloat16])
def test_fused_norms_are_bit_exact_on_the_cpu(arch, dtype, residual, ckpt, samples, monkeypatch):
    """Every pairing of norm weight (checkpoint) dtype and input dtype (float32 or bf16 residual)."""
    model = tiny_model(arch).to(ckpt)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ in LLAMA_RMS_NORMS:
                m.weight.uniform_(0.5, 2.0)  # not all ones: the weight's product matters
    norms = [m for m in model.modules() if type(m).__name__ in LLAMA_RMS_NORMS]
    assert len(norms) >= 5  # two per block and the final one (Qwen3: its q/k norms too)
    x = torch.randn(3, 32, model.config.hidden_size)
    if residual == "compute":
        x = x.to(dtype)
    outputs = {}
    for fused in (False, True):
        monkeypatch.setattr(precision, "FUSED_NORM_DEVICES", {"cpu"} if fused else set())
        with Compute(torch.device("cpu"), dtype).run(model.model.layers[0]) as block:
            pos = torch.arange(32)[None]
            rope = model.model.rotary_emb(x, pos)
            calls = []
            handle = norms[0].register_forward_hook(lambda m, a, o: calls.append(m.forward.__func__))
            out = block(x, position_embeddings=rope)
            handle.remove()
        outputs[fused] = out[0] if isinstance(out, tuple) else out
        assert (calls[0] is precision._llama_rms_norm) == fused
    assert torch.equal(outputs[True], outputs[False])
    assert all("forward" not in m.__dict__ for m in norms)  # the model's own forward again


def test_prune_identical_with_and_without(samples, monkeypatch):
    """On the CPU a prune is bit for bit the same either way (masks, weights)."""
    models = {}
    for fused in (False, True):
        monkeypatch.setattr(precision, "FUSED_NORM_DEVICES", {"cpu"} if fused else set())
        models[fused] = tiny_model("llama")
        prune(models[fused], PruneConfig(method="wanda", nsamples=8, seqlen=32, device="cpu"), samples)
    assert all(torch.equal(a, b) for a, b in zip(models[True].state_dict().values(), models[False].state_dict().values()))


def test_forward_restored_after_an_error():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="inside"):
        with fused_norms(model, torch.device("cpu")):
            assert "forward" in model.model.norm.__dict__
            raise RuntimeError("inside")
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_fused_norms_on_cuda_match_to_float32_rounding(monkeypatch):
    """On a GPU torch's fused kernel reduces in its own order: equal to float32 rounding."""
    model = tiny_model("llama").cuda()
    x = torch.randn(3, 32, model.config.hidden_size, device="cuda") * 10
    outputs = {}
    for fused in (False, True):
        monkeypatch.setattr(precision, "FUSED_NORM_DEVICES", {"cuda"} if fused else set())
        with fused_norms(model, torch.device("cuda")):
            outputs[fused] = model.model.norm(x)
    torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-5, atol=1e-6)


def test_a_forward_set_on_the_instance_is_left_alone():
    """A norm whose forward someone else replaced on the instance (accelerate's hooks, hub kernels)
    keeps that forward, inside and after."""
    model = tiny_model("llama")
    norm = model.model.norm
    own = norm.forward = lambda x: x * 2
    with fused_norms(model, torch.device("cpu")):
        assert norm.forward is own and model.model.layers[0].input_layernorm.forward.__func__ is precision._llama_rms_norm
    assert norm.forward is own and "forward" not in model.model.layers[0].input_layernorm.__dict__
