"""SparseGPT's statistic, X^T X accumulated over calibration batches, the ways prunekit takes it
(prunekit/stats.py): the full float32 GEMM per batch; on the CPU the upper triangle only, one GEMM
per band of rows, mirrored once at the end (`--bands`); on a GPU with a bf16 batch, one bf16 GEMM
with a float32 output.

Per way: ms for the whole accumulation (median of `--repeat`), the time against the full float32
GEMM, and the result against the full GEMM's (bit for bit, or the largest relative difference).
Random inputs of `--tokens` tokens in `--batches` batches. Prints a markdown table and writes JSON.

    python bench/bench_gram.py                                   # SmolLM2's widths on the CPU
    python bench/bench_gram.py --device cuda --columns 4096 11008 --tokens 262144 --batches 16
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_masks import timed_ms  # noqa: E402
from common import markdown, meta, write_results  # noqa: E402

from prunekit.stats import _MM_OUT_DTYPE, add_upper_gram, exact_low_gram, mirror_upper  # noqa: E402

COLUMNS = [("columns", "columns", ""), ("tokens", "tokens", ""), ("way", "X^T X", ""), ("ms", "ms", ".1f"),
           ("vs full", "vs full GEMM", ".2f"), ("same", "same as full GEMM", "")]


def full(batches):
    h = None
    for x in batches:
        x = x.float()
        h = x.T @ x if h is None else h.addmm_(x.T, x)
    return h


def upper(batches, bands):
    h = torch.zeros(batches[0].shape[1], batches[0].shape[1], device=batches[0].device)
    for x in batches:
        add_upper_gram(h, x.float(), bands)
    return mirror_upper(h)


def low(batches):
    h = None
    for x in batches:
        g = exact_low_gram(x)
        h = g if h is None else h.add_(g)
    return h


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--columns", nargs="+", type=int, default=[576, 1536])
    ap.add_argument("--tokens", type=int, default=16384, help="tokens in all (the protocol's 32 x 512)")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--bands", nargs="+", type=int, default=[4, 8, 16])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gram.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for cols in args.columns:
        batches = torch.randn(args.tokens, cols, generator=gen, device=device).split(args.tokens // args.batches)
        # (way, function): the first of each group is the full float32 GEMM the others are compared with
        groups = [[("full float32 GEMM", lambda: full(batches))]
                  + [(f"upper triangle, {b} bands", lambda b=b: upper(batches, b)) for b in args.bands]]
        if device.type == "cuda" and _MM_OUT_DTYPE:
            low_batches = [x.bfloat16() for x in batches]
            groups.append([("full float32 GEMM of bf16 inputs", lambda: full(low_batches)),
                           ("bf16 GEMM to float32", lambda: low(low_batches))])
        for way, fn in (w for group in groups for w in group):
            ms = timed_ms(fn, device, args.repeat)
            result = fn()
            if way.startswith("full"):
                ref, base = result, ms
            diff = ((result - ref).abs().max() / ref.abs().max()).item()
            rows.append({"columns": cols, "tokens": args.tokens, "way": way, "ms": ms, "vs full": ms / base,
                         "same": "bit for bit" if torch.equal(result, ref) else f"max rel diff {diff:.1e}"})
            print(rows[-1], flush=True)
    print(markdown(rows, COLUMNS))
    write_results(args.out, rows, {**meta(), "device": str(device), "batches": args.batches})


if __name__ == "__main__":
    main()
