"""Mask selection speed: N:M by stable ranks (prunekit's on a GPU) and by topk + scatter (the
reference's, and prunekit's on the CPU), and the unstructured per-row mask, on random scores of
LLaMA-7B's linear shapes.

Every mask is checked against the first one of its pattern; ms per call is the median of `--repeat`
calls (CUDA: between events, after a warm-up call). Prints a markdown table and writes JSON.

    python bench/bench_masks.py --device cuda                 # 7B shapes on a GPU
    python bench/bench_masks.py --shapes 1536x576 576x1536    # SmolLM2's MLP shapes on the CPU
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import markdown, meta, write_results  # noqa: E402

from prunekit.masks import nm_mask, row_lowest_mask  # noqa: E402

COLUMNS = [("shape", "scores", ""), ("pattern", "pattern", ""), ("way", "selection", ""),
           ("ms", "ms per call", ".3f"), ("same", "same mask", "")]


def timed_ms(fn, device: torch.device, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "4096x11008"])
    ap.add_argument("--patterns", nargs="+", default=["2:4", "4:8"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "masks.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for shape in args.shapes:
        out_f, in_f = map(int, shape.split("x"))
        scores = torch.rand(out_f, in_f, generator=gen, device=device)
        for pattern in args.patterns:
            n, m = map(int, pattern.split(":"))
            ways = {"ranks": lambda: nm_mask(scores, n, m, "ranks"), "topk + scatter": lambda: nm_mask(scores, n, m, "topk")}
            first = None
            for way, fn in ways.items():
                mask = fn()
                first = mask if first is None else first
                rows.append({"shape": shape, "pattern": pattern, "way": way, "ms": timed_ms(fn, device, args.repeat),
                             "same": bool(torch.equal(mask, first))})
                print(rows[-1], flush=True)
        rows.append({"shape": shape, "pattern": "50 % per row", "way": "row_lowest_mask", "same": True,
                     "ms": timed_ms(lambda: row_lowest_mask(scores, 0.5), device, args.repeat)})
        print(rows[-1], flush=True)
    print(markdown(rows, COLUMNS))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    write_results(args.out, rows, {**meta(), "device": name})
    return rows


if __name__ == "__main__":
    main()
