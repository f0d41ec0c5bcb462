"""Prune time against what ran before it in the process: SmolLM2 with the core benchmark's
protocol, the runs given one after another, each with its phases; with `--floors D [D ...]`, first
the floor passes of bench_core.py in those dtypes, as bench_core.py runs them before its rows.
Shows whether a row of bench_core.py is slow because of what ran before it.

    python bench/bench_order.py --runs "wanda unstructured" "wanda 2:4" "wanda unstructured"
    python bench/bench_order.py --runs "wanda unstructured" --floors float32 bfloat16 --out bench/results/order_floors.json
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import markdown, meta, protocol, write_results  # noqa: E402

from bench_core import floor_seconds  # noqa: E402
from prunekit import PruneConfig, prune  # noqa: E402
from prunekit.execution import Compute  # noqa: E402
from prunekit.loading import load  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", default=["wanda unstructured", "wanda 2:4", "wanda unstructured"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--floors", nargs="*", default=[], help="dtypes whose floor passes run first")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "order.json"))
    args = ap.parse_args(argv)
    model, tokenizer, adapter, _ = load("smollm2-135m")
    samples, _ = protocol(tokenizer, windows=1)
    rows = []
    for dtype in args.floors:
        compute = Compute.from_config(PruneConfig(dtype=dtype, device="cpu"))
        rows.append({"order": len(rows), "run": "floor", "dtype": dtype,
                     "prune_seconds": floor_seconds(copy.deepcopy(model), adapter, samples, compute, 4)})
        print(rows[-1], flush=True)
    for run in args.runs:
        method, pattern = run.split()
        report = prune(copy.deepcopy(model), PruneConfig(method=method, pattern=pattern, nsamples=32, seqlen=512,
                                                         dtype=args.dtype, device="cpu"), samples, adapter)
        rows.append({"order": len(rows), "run": run, "dtype": args.dtype, "prune_seconds": report.prune_seconds,
                     **{f"{name} s": v for name, v in report.phases.items() if name in ("statistics pass", "masks",
                                                                                         "pruned pass")}})
        print(rows[-1], flush=True)
    print(markdown(rows, [("order", "#", ""), ("run", "run", ""), ("dtype", "dtype", ""),
                          ("prune_seconds", "prune s", ".1f"), ("statistics pass s", "statistics pass s", ".1f"),
                          ("masks s", "masks s", ".2f"), ("pruned pass s", "pruned pass s", ".1f")]))
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    write_results(args.out, rows, {**meta(), "threads": torch.get_num_threads(), "malloc_env": malloc})


if __name__ == "__main__":
    main()
