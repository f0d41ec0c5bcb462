"""Core benchmark: SmolLM2-135M, dense vs magnitude/wanda/stade/stade-w/sparsegpt at 50% unstructured, 2:4, 4:8,
in float32 and bfloat16. Prints a markdown table and writes bench/results/core.json.

    python bench/bench_core.py [--dtypes float32 bfloat16] [--windows 64]

`floor_seconds` is the time of the reference protocol's irreducible work in the same run: two plain
passes of every block over the calibration batches (no hooks, no masks); `vs_floor` = prune / floor.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import PeakRSS, markdown, meta, protocol, write_results  # noqa: E402
from render import COLUMNS  # noqa: E402

from prunekit import PruneConfig, prune  # noqa: E402
from prunekit.execution import Compute, capture_block_inputs, run_block  # noqa: E402
from prunekit.evaluate import perplexity  # noqa: E402
from prunekit.loading import load  # noqa: E402

# "--no-bias-update": what the v2 reference runs (unstructured only); "--stats-dtype float32": bf16 pruned
# passes with float32 statistics passes (low-precision dtypes only); "--residual-dtype compute" (not run by
# default): the residual stream inside each block in the compute dtype too
METHODS = ["magnitude", "wanda", "stade", "stade --no-bias-update", "stade-w", "wanda --stats-dtype float32",
           "sparsegpt"]
PATTERNS = ["unstructured", "2:4", "4:8"]


def floor_seconds(model, adapter, samples, compute, batch_size) -> float:
    """Two plain passes of each block over all batches: what the reference protocol cannot avoid."""
    start = time.perf_counter()
    inputs = capture_block_inputs(model, adapter, samples, batch_size, compute)
    for block in adapter.blocks(model):
        run_block(block, inputs, compute)
        run_block(block, inputs, compute, outputs=inputs)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--patterns", nargs="+", default=PATTERNS)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "core.json"))
    args = ap.parse_args()

    model, tokenizer, adapter, _ = load("smollm2-135m")
    samples, windows = protocol(tokenizer, windows=args.windows)
    rows, floors, computes = [], {}, {}
    for dtype in args.dtypes:
        compute = computes[dtype] = Compute.from_config(PruneConfig(dtype=dtype, device="cpu"))
        floor = floors[dtype] = floor_seconds(copy.deepcopy(model), adapter, samples, compute, 4)
        t = time.perf_counter()
        with PeakRSS() as rss:
            dense = perplexity(model, windows, compute, desc=f"dense {dtype}")
        rows.append({"dtype": dtype, "method": "dense", "pattern": "—", "ppl": dense["ppl"], "sparsity": 0.0,
                     "eval_seconds": time.perf_counter() - t, "peak_rss_mib": rss.peak, "floor_seconds": floor})
        print(f"{dtype}: floor {floor:.1f} s, dense ppl {dense['ppl']:.3f}", flush=True)
    # the dtypes alternate run by run, so that a slow spell of a shared machine hits both alike
    runs = [(p, m, d) for p in args.patterns for m in args.methods for d in args.dtypes
            if (p == "unstructured" or "--no-bias-update" not in m)
            and (d != "float32" or not {"--stats-dtype", "--residual-dtype"} & set(m.split()))]
    for pattern, label, dtype in runs:
        net = copy.deepcopy(model)
        words = label.split()
        stats_dtype = words[words.index("--stats-dtype") + 1] if "--stats-dtype" in words else None
        residual = words[words.index("--residual-dtype") + 1] if "--residual-dtype" in words else "float32"
        config = PruneConfig(method=words[0], pattern=pattern, nsamples=32, seqlen=512, seed=0, dtype=dtype,
                             stats_dtype=stats_dtype, residual_dtype=residual, device="cpu",
                             bias_update="--no-bias-update" not in words)
        with PeakRSS() as rss:
            report = prune(net, config, samples, adapter)
        t = time.perf_counter()
        result = perplexity(net, windows, computes[dtype], desc=f"{label} {pattern}")
        row = {"dtype": dtype, "method": label, "pattern": pattern, "ppl": result["ppl"],
               "sparsity": report.sparsity, "prune_seconds": report.prune_seconds,
               "floor_seconds": floors[dtype], "vs_floor": report.prune_seconds / floors[dtype],
               "masks_seconds": report.phases.get("masks"), "eval_seconds": time.perf_counter() - t,
               "peak_rss_mib": rss.peak}
        rows.append(row)
        print(markdown([row], COLUMNS).splitlines()[-1], flush=True)
        write_results(args.out, rows, meta())
        del net
    print(markdown(rows, COLUMNS))
    write_results(args.out, rows, meta())


if __name__ == "__main__":
    main()
