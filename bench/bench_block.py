"""One SmolLM2 decoder block (block 5, over calibration text), float32 vs bfloat16, at several
sequence lengths: how much faster the passes that pruning is made of get in bf16 on this machine;
and the two kernels a block is made of (the MLP's 576x1536 matmul over 2048 tokens, and causal
attention over 4 x 512 tokens with 9 query / 3 key-value heads: PyTorch's sdpa, and prunekit's bf16
kernel). Prints tables, writes bench/results/block.json.

    python bench/bench_block.py
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import CALIB, markdown, meta, write_results  # noqa: E402

from prunekit.data import calibration_samples, load_text, tokenize  # noqa: E402
from prunekit.execution import DTYPES, Compute, capture_block_inputs, run_block  # noqa: E402
from prunekit.loading import load  # noqa: E402

SHAPES = [(128, 16, 128), (512, 4, 32), (2048, 1, 8)]  # (seqlen, batch, samples): 16k tokens each


def best_ms(fn, repeats=20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def kernels() -> list[dict]:
    import torch.nn.functional as F
    from prunekit.attention import causal_attention
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2048, 576, generator=g), torch.randn(1536, 576, generator=g)
    q, k, v = (torch.randn(4, h, 512, 64, generator=g) for h in (9, 3, 3))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        xd, wd, qd, kd, vd = (t.to(dtype) for t in (x, w, q, k, v))
        ms = best_ms(lambda: F.linear(xd, wd))
        rows.append({"kernel": "matmul 2048x576x1536", "dtype": str(dtype)[6:], "ms": ms,
                     "gflops": 2 * x.shape[0] * x.shape[1] * w.shape[0] / ms / 1e6})
        rows.append({"kernel": "attention: torch sdpa", "dtype": str(dtype)[6:], "ms": best_ms(
            lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True))})
    rows.append({"kernel": "attention: prunekit bf16 kernel", "dtype": "bfloat16",
                 "ms": best_ms(lambda: causal_attention(*(t.bfloat16() for t in (q, k, v)), 64 ** -0.5))})
    fp32 = {r["kernel"]: r["ms"] for r in rows if r["dtype"] == "float32"}
    for r in rows:
        base = fp32.get(r["kernel"], fp32["attention: torch sdpa"])
        r["vs_fp32"] = r["ms"] / base
    return rows


def main():
    model, tokenizer, adapter, _ = load("smollm2-135m")
    block = adapter.blocks(model)[5]
    ids = tokenize(tokenizer, load_text(CALIB))  # real text: random token ids make unlike activations
    rows = []
    for seqlen, batch, nsamples in SHAPES:
        samples = calibration_samples(ids, nsamples, seqlen, seed=0)
        row = {"seqlen": seqlen, "batch": batch, "tokens": nsamples * seqlen}
        inputs = capture_block_inputs(model, adapter, samples, batch, Compute(torch.device("cpu"), torch.float32))
        for dtype in ("float32", "bfloat16"):
            compute = Compute(torch.device("cpu"), DTYPES[dtype])
            row[dtype] = best_ms(lambda: run_block(block, inputs, compute), repeats=3) / 1000
        row["ratio"] = row["bfloat16"] / row["float32"]
        rows.append(row)
    kernel_rows = kernels()
    # the share of a pass that its linears take, at the matmul rate measured just below
    gflop = 2 * sum(adapter.weight(m).numel() for m in adapter.block_linears(block).values()) / 1e9
    rate = {r["dtype"]: r["gflops"] for r in kernel_rows if "gflops" in r}
    for row in rows:
        for dtype in ("float32", "bfloat16"):
            row[f"mm_{dtype}"] = gflop * row["tokens"] / rate[dtype] / row[dtype]
    cols = [("seqlen", "seqlen", ""), ("batch", "batch", ""), ("tokens", "tokens", ""),
            ("float32", "fp32 s", ".3f"), ("bfloat16", "bf16 s", ".3f"), ("ratio", "bf16/fp32", ".2f"),
            ("mm_float32", "matmul share fp32", ".0%"), ("mm_bfloat16", "matmul share bf16", ".0%")]
    print(markdown(rows, cols))
    print(markdown(kernel_rows, [("kernel", "kernel", ""), ("dtype", "dtype", ""), ("ms", "ms", ".2f"),
                                 ("vs_fp32", "vs fp32 sdpa/matmul", ".2f"), ("gflops", "GFLOP/s", ".0f")]))
    write_results(os.path.join(os.path.dirname(__file__), "results", "block.json"), rows, {**meta(), "kernels": kernel_rows})


if __name__ == "__main__":
    main()
