"""Causal self-attention for bfloat16 on the CPU, used inside prunekit's own passes.

PyTorch's CPU flash-attention kernel computes bf16 inputs in float32 unless the CPU has AMX, so in
bf16 it runs no faster than in float32 (bench/bench_block.py) and is a large share of a bf16 block. This kernel keeps the
two matmuls in bf16 (float32 accumulation inside oneDNN), takes the softmax with float32 arithmetic
(PyTorch's CPU softmax upcasts reduced-precision inputs), and skips the masked upper triangle by
walking the queries in chunks, each attending only to the keys up to its own end. Its precision is
that of transformers' "eager" bf16 attention (scores and probabilities rounded to bf16; the scaling
is applied to the queries, which is exact for power-of-two scalings such as head size 64), without
the wasted half. It replaces transformers' "sdpa" entry only inside `cpu_bf16_attention()`, only for the plain
causal case (no mask tensor, no dropout, queries = keys); everything else goes to the original.
"""
from __future__ import annotations

import contextlib

import torch

CHUNK = 128  # query rows per step; smaller chunks skip more of the masked triangle in more, smaller matmuls


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                     chunk: int = CHUNK) -> torch.Tensor:
    """query (B, H, T, D), key/value (B, KV, T, D) with H a multiple of KV (grouped queries share a
    key/value head, as transformers' repeat_kv orders them). Returns (B, T, H, D), contiguous: the
    layout the attention module reshapes to (B, T, H*D) next, so that reshape copies nothing.

    The queries are laid out once as (B, KV, T, G, D), scaled on the way (instead of scaling every
    score): a chunk of query rows is then one contiguous (rows*G, D) slab per key/value head."""
    b, h, t, d = query.shape
    kv = key.shape[1]
    groups = h // kv
    dtype = value.dtype
    q = torch.empty(b, kv, t, groups, d, dtype=dtype, device=query.device)
    torch.mul(query.view(b, kv, groups, t, d), scaling, out=q.transpose(2, 3))
    out = torch.empty(b, t, kv, groups, d, dtype=dtype, device=query.device)
    key_t = key.transpose(-1, -2)
    future = torch.ones(chunk, chunk, dtype=torch.bool, device=query.device).triu_(1)
    upper = torch.zeros(chunk, 1, chunk, dtype=dtype, device=query.device).masked_fill_(future.unsqueeze(1), float("-inf"))
    for start in range(0, t, chunk):
        end = min(start + chunk, t)
        rows = end - start
        qc = q[:, :, start:end].view(b, kv, rows * groups, d)
        scores = torch.matmul(qc, key_t[..., :end])                      # (B, KV, rows*G, end)
        scores.view(b, kv, rows, groups, end)[..., start:end].add_(upper[:rows, :, :rows])
        probs = torch.softmax(scores, dim=-1)
        res = torch.matmul(probs, value[:, :, :end]).view(b, kv, rows, groups, d)
        out[:, start:end].copy_(res.transpose(1, 2))
    return out.view(b, t, h, d)


def _lowp(query: torch.Tensor) -> bool:
    """bf16 inputs, or float32 ones that autocast would turn into bf16 (rotary tables kept in float32)."""
    return query.dtype == torch.bfloat16 or (
        query.dtype == torch.float32 and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def _handles(query, key, attention_mask, dropout, kwargs) -> bool:
    return (query.device.type == "cpu" and _lowp(query) and attention_mask is None
            and not dropout and query.shape[2] == key.shape[2] > 1 and query.shape[1] % key.shape[1] == 0
            and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
            and kwargs.get("cache") is None and kwargs.get("is_causal", True) is not False)


@contextlib.contextmanager
def cpu_bf16_attention(enabled: bool = True):
    """While inside, transformers models using "sdpa" run plain causal bf16 CPU attention through
    causal_attention(); on exit the original entry is back."""
    if not enabled:
        yield
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if not _handles(query, key, attention_mask, dropout, kwargs) or not getattr(module, "is_causal", True):
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        bf16 = torch.bfloat16
        return causal_attention(query, key.to(bf16), value.to(bf16), scale), None  # query: lowered as it is scaled

    local = ALL_ATTENTION_FUNCTIONS._local_mapping  # the instance the models look up; the class-wide table stays
    had, before = "sdpa" in local, local.get("sdpa")
    ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa
    try:
        yield
    finally:
        if had:
            local["sdpa"] = before
        else:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]
