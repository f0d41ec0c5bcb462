"""The eager rewrites inside the passes, the fused RMSNorm (precision.fused_norms) and the lean rotary
embedding (precision.lean_rope): the same formulas as transformers' own, bit for bit their outputs
on the CPU, and the model's own code back afterwards."""
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


# --- the lean rotary embedding (precision.lean_rope) -------------------------------------------------

def _rope_inputs(dtype, heads=4, kv_heads=2, layout="bshd", seed=0):
    g = torch.Generator().manual_seed(seed)
    b, s, d = 2, 16, 8
    q = torch.randn(b, s, heads, d, generator=g).to(dtype).transpose(1, 2)  # as the attention makes them
    k = torch.randn(b, s, kv_heads, d, generator=g).to(dtype).transpose(1, 2)
    if layout == "contiguous":
        q, k = q.contiguous(), k.contiguous()
    angles = torch.rand(b, s, d // 2, generator=g) * 100
    emb = torch.cat([angles, angles], dim=-1)
    return q, k, emb.cos().to(dtype), emb.sin().to(dtype)


def test_listed_ropes_are_llamas():
    """A transformers release that changes one of these functions fails here (and is left alone at run time)."""
    from transformers.models.llama import modeling_llama
    reference = inspect.getsource(modeling_llama.apply_rotary_pos_emb)
    for name in precision.LLAMA_ROPE_MODULES:
        module = importlib.import_module(name)
        assert precision._is_llamas_rope(module), name
        assert inspect.getsource(module.apply_rotary_pos_emb) == reference, name


@pytest.mark.parametrize("layout", ["bshd", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lean_rope_is_bit_exact(dtype, layout):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    q, k, cos, sin = _rope_inputs(dtype, layout=layout)
    for got, want in zip(precision._llama_rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(got, want) and got.dtype == want.dtype and got.stride() == want.stride()
    # unsqueeze_dim=2: q and k as (batch, seq, heads, dim)
    q2, k2 = q.transpose(1, 2), k.transpose(1, 2)
    for got, want in zip(precision._llama_rope(q2, k2, cos, sin, 2), apply_rotary_pos_emb(q2, k2, cos, sin, 2)):
        assert torch.equal(got, want)
    # the rotary table in float32 against a low-precision q (type promotion as there)
    for got, want in zip(precision._llama_rope(q, k, cos.float(), sin.float()),
                         apply_rotary_pos_emb(q, k, cos.float(), sin.float())):
        assert torch.equal(got, want) and got.dtype == want.dtype


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_pass_uses_lean_rope_bit_for_bit(arch, dtype, monkeypatch):
    model = tiny_model(arch)
    module = importlib.import_module(type(model).__module__)
    own = module.apply_rotary_pos_emb
    x = torch.randn(3, 32, model.config.hidden_size)
    rope = model.model.rotary_emb(x, torch.arange(32)[None])
    outputs = {}
    for lean in (False, True):
        monkeypatch.setattr(precision, "LEAN_ROPE_DEVICES", {"cpu"} if lean else set())
        calls = []
        with Compute(torch.device("cpu"), dtype).run(model.model.layers[0]) as block:
            used = module.apply_rotary_pos_emb
            monkeypatch.setattr(module, "apply_rotary_pos_emb", lambda *a, **k: calls.append(1) or used(*a, **k))
            out = block(x, position_embeddings=rope)
            monkeypatch.setattr(module, "apply_rotary_pos_emb", used)
        assert (used is precision._llama_rope) == lean and calls == [1]
        assert module.apply_rotary_pos_emb is own  # transformers' own function again
        outputs[lean] = out[0] if isinstance(out, tuple) else out
    assert torch.equal(outputs[True], outputs[False])


def test_lean_rope_leaves_another_function_alone_and_restores_after_an_error(monkeypatch):
    from transformers.models.llama import modeling_llama
    own = modeling_llama.apply_rotary_pos_emb
    with pytest.raises(RuntimeError, match="inside"):
        with precision.lean_rope(torch.device("cpu")):
            assert modeling_llama.apply_rotary_pos_emb is precision._llama_rope
            with precision.lean_rope(torch.device("cpu")):  # nested: nothing more to swap, nothing undone
                pass
            assert modeling_llama.apply_rotary_pos_emb is precision._llama_rope
            raise RuntimeError("inside")
    assert modeling_llama.apply_rotary_pos_emb is own

    def other(q, k, cos, sin, unsqueeze_dim=1):  # someone's own rotary embedding (e.g. a hub kernel)
        return q, k
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", other)
    with precision.lean_rope(torch.device("cpu")):
        assert modeling_llama.apply_rotary_pos_emb is other
    monkeypatch.setattr(precision, "LEAN_ROPE_DEVICES", set())  # off for this device
    with precision.lean_rope(torch.device("cpu")):
        assert modeling_llama.apply_rotary_pos_emb is other


def test_prune_identical_with_and_without_lean_rope(samples, monkeypatch):
    models = {}
    for lean in (False, True):
        monkeypatch.setattr(precision, "LEAN_ROPE_DEVICES", {"cpu"} if lean else set())
        models[lean] = tiny_model("llama")
        prune(models[lean], PruneConfig(method="wanda", nsamples=8, seqlen=32, device="cpu", dtype="bfloat16"), samples)
    assert all(torch.equal(a, b) for a, b in zip(models[True].state_dict().values(), models[False].state_dict().values()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_rope_on_cuda_is_bit_exact(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    q, k, cos, sin = (t.cuda() for t in _rope_inputs(dtype))
    for got, want in zip(precision._llama_rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(got, want) and got.stride() == want.stride()
