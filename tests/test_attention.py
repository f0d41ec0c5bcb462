"""The bf16 CPU attention kernel and the mixed-precision compute context."""
import pytest
import torch
import torch.nn.functional as F

from conftest import ARCHS, tiny_model
from prunekit.adapters import adapter_for
from prunekit.attention import causal_attention, cpu_bf16_attention
from prunekit.execution import Compute


def _reference(q, k, v):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


@pytest.mark.parametrize("heads,kv,t,chunk", [(6, 2, 37, 8), (4, 4, 16, 16), (3, 1, 5, 128), (8, 2, 64, 7)])
def test_causal_attention_is_exact_in_float64(heads, kv, t, chunk):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, t, 16, generator=g, dtype=torch.float64) for h in (heads, kv, kv))
    out = causal_attention(q, k, v, 16 ** -0.5, chunk=chunk)
    assert out.shape == (2, t, heads, 16) and out.is_contiguous()  # the layout the module reshapes next
    assert torch.allclose(out, _reference(q, k, v), atol=1e-12)


def test_causal_attention_scales_queries_of_any_head_size():
    """Head size 24: a scaling that is not a power of two (folded into the queries)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, 19, 24, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    assert torch.allclose(causal_attention(q, k, v, 24 ** -0.5, chunk=6), _reference(q, k, v), atol=1e-12)


def test_causal_attention_takes_a_float32_query_with_bf16_keys():
    """Under autocast the rotary step can hand over a float32 query: it is lowered as it is scaled."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, h, 40, 32, generator=g) for h in (6, 3, 3))
    out = causal_attention(q, k.bfloat16(), v.bfloat16(), 32 ** -0.5, chunk=16)
    assert out.dtype == torch.bfloat16
    assert (out.double() - _reference(q.double(), k.double(), v.double())).abs().max() < 0.05


def test_causal_attention_bf16_error_is_bf16_sized():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 300, 64, generator=g) for h in (9, 3, 3))
    exact = _reference(q.double(), k.double(), v.double())
    ours = causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 64 ** -0.5).double()
    stock = _reference(q.bfloat16(), k.bfloat16(), v.bfloat16()).double()
    assert (ours - exact).abs().mean() < 3 * (stock - exact).abs().mean()
    assert (ours - exact).abs().max() < 0.1


def test_context_swaps_sdpa_and_restores_it():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with cpu_bf16_attention():
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not original
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original
    with cpu_bf16_attention(enabled=False):
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_bf16_model_close_to_float32(arch, samples, monkeypatch):
    import prunekit.attention as attention
    calls = []
    monkeypatch.setattr(attention, "causal_attention",
                        lambda *a, **k: calls.append(1) or causal_attention(*a, **k))
    model = tiny_model(arch)
    with torch.no_grad():
        ref = model(input_ids=samples[:2]).logits
    masters = [(p.data_ptr(), p.dtype) for p in model.parameters()]
    with Compute(torch.device("cpu"), torch.bfloat16).run(model):
        adapter = adapter_for(arch)
        first = adapter.block_linears(adapter.blocks(model)[0])[adapter.linears[0]]
        assert adapter.weight(first).dtype == torch.bfloat16
        assert model.get_input_embeddings().weight.dtype == torch.float32  # residual stream starts in float32
        out = model(input_ids=samples[:2]).logits.float()
    assert [(p.data_ptr(), p.dtype) for p in model.parameters()] == masters  # masters back, untouched
    assert calls, "the bf16 CPU kernel was not used"
    assert (out - ref).norm() / ref.norm() < 2e-2


def test_padding_mask_falls_back_to_stock_attention(samples, monkeypatch):
    import prunekit.attention as attention
    calls = []
    monkeypatch.setattr(attention, "causal_attention", lambda *a, **k: calls.append(1))
    model = tiny_model("llama")
    mask = torch.ones(2, samples.shape[1], dtype=torch.long)
    mask[0, :5] = 0
    with Compute(torch.device("cpu"), torch.bfloat16).run(model):
        out = model(input_ids=samples[:2], attention_mask=mask).logits
    assert not calls and torch.isfinite(out[1]).all()


def test_bf16_activations_at_rest_float32_residual_inside(samples):
    """bf16 compute stores block inputs/outputs in bf16 between passes; inside a block the residual
    stream is float32, so a block's error is the bf16 branches' plus one rounding of its output."""
    from prunekit.execution import capture_block_inputs, run_block
    model = tiny_model("llama")
    adapter = adapter_for("llama")
    low, exact = Compute(torch.device("cpu"), torch.bfloat16), Compute(torch.device("cpu"), torch.float32)
    inputs = capture_block_inputs(model, adapter, samples, 4, low)
    assert inputs.hidden.dtype == torch.bfloat16 and inputs.hidden.shape == (8, 32, 64)
    reference = inputs.clone()
    reference.hidden = reference.hidden.float()
    block = adapter.blocks(model)[0]
    run_block(block, inputs, low, outputs=inputs)
    run_block(block, reference, exact, outputs=reference)
    assert inputs.hidden.dtype == torch.bfloat16
    err = (inputs.hidden.float() - reference.hidden).abs().max().item()
    assert 0 < err < 0.05
