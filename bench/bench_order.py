"""Prune time on its own, in a fresh process: SmolLM2 with the core benchmark's protocol, the runs
given one after another (no floor and no dense evaluation before them, unlike bench_core.py), each
with its phases. Shows whether a row of bench_core.py is slow because of what ran before it.

    python bench/bench_order.py --runs "wanda unstructured" "wanda 2:4" "wanda unstructured"
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import markdown, meta, protocol, write_results  # noqa: E402

from prunekit import PruneConfig, prune  # noqa: E402
from prunekit.loading import load  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", default=["wanda unstructured", "wanda 2:4", "wanda unstructured"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "order.json"))
    args = ap.parse_args(argv)
    model, tokenizer, adapter, _ = load("smollm2-135m")
    samples, _ = protocol(tokenizer, windows=1)
    rows = []
    for k, run in enumerate(args.runs):
        method, pattern = run.split()
        report = prune(copy.deepcopy(model), PruneConfig(method=method, pattern=pattern, nsamples=32, seqlen=512,
                                                         dtype=args.dtype, device="cpu"), samples, adapter)
        rows.append({"order": k, "run": run, "dtype": args.dtype, "prune_seconds": report.prune_seconds,
                     **{f"{name} s": v for name, v in report.phases.items() if name in ("statistics pass", "masks",
                                                                                         "pruned pass")}})
        print(rows[-1], flush=True)
    print(markdown(rows, [("order", "#", ""), ("run", "run", ""), ("dtype", "dtype", ""),
                          ("prune_seconds", "prune s", ".1f"), ("statistics pass s", "statistics pass s", ".1f"),
                          ("masks s", "masks s", ".2f"), ("pruned pass s", "pruned pass s", ".1f")]))
    write_results(args.out, rows, {**meta(), "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
