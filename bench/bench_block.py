"""One SmolLM2 decoder block, float32 vs bfloat16, at several sequence lengths: how much faster the
passes that pruning is made of get in bf16 on this machine. Prints a table, writes bench/results/block.json.

    python bench/bench_block.py
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import markdown, meta, write_results  # noqa: E402

from prunekit.engine import DTYPES, Compute, capture_block_inputs, run_block  # noqa: E402
from prunekit.loading import load  # noqa: E402

SHAPES = [(128, 16, 128), (512, 4, 32), (2048, 1, 8)]  # (seqlen, batch, samples): 16k tokens each


def main():
    model, _, adapter, _ = load("smollm2-135m")
    block = adapter.blocks(model)[5]
    rows = []
    for seqlen, batch, nsamples in SHAPES:
        samples = torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
        row = {"seqlen": seqlen, "batch": batch, "tokens": nsamples * seqlen}
        inputs = capture_block_inputs(model, adapter, samples, batch, Compute(torch.device("cpu"), torch.float32))
        for dtype in ("float32", "bfloat16"):
            compute = Compute(torch.device("cpu"), DTYPES[dtype])
            run_block(block, inputs, compute)  # warm-up
            times = []
            for _ in range(3):
                start = time.perf_counter()
                run_block(block, inputs, compute)
                times.append(time.perf_counter() - start)
            row[dtype] = min(times)
        row["ratio"] = row["bfloat16"] / row["float32"]
        rows.append(row)
    cols = [("seqlen", "seqlen", ""), ("batch", "batch", ""), ("tokens", "tokens", ""),
            ("float32", "fp32 s", ".3f"), ("bfloat16", "bf16 s", ".3f"), ("ratio", "bf16/fp32", ".2f")]
    print(markdown(rows, cols))
    write_results(os.path.join(os.path.dirname(__file__), "results", "block.json"), rows, meta())


if __name__ == "__main__":
    main()
