"""Allocation benchmark: SmolLM2-135M at 60/70/80% unstructured, uniform vs alpha vs owl, for wanda and
stade (same calibration/eval protocol as bench_core.py), plus the ESD time for the whole model.
Prints a markdown table and writes bench/results/allocation.json.

    python bench/bench_allocation.py [--dtype bfloat16] [--sparsities 0.6 0.7 0.8]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import markdown, meta, protocol, write_results  # noqa: E402

from prunekit import PruneConfig, prune  # noqa: E402
from prunekit.allocation.alpha import model_spectra  # noqa: E402
from prunekit.execution import Compute  # noqa: E402
from prunekit.evaluate import perplexity  # noqa: E402
from prunekit.loading import load  # noqa: E402

COLUMNS = [("sparsity", "sparsity", ".1f"), ("method", "method", ""), ("uniform", "uniform", ".2f"),
           ("alpha", "alpha", ".2f"), ("owl", "owl", ".2f")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.6, 0.7, 0.8])
    ap.add_argument("--methods", nargs="+", default=["wanda", "stade"])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "allocation.json"))
    args = ap.parse_args()

    model, tokenizer, adapter, _ = load("smollm2-135m")
    samples, windows = protocol(tokenizer, windows=args.windows)
    compute = Compute.from_config(PruneConfig(dtype=args.dtype, device="cpu"))

    with tempfile.TemporaryDirectory() as cache:  # a cold cache, so the ESD time is real
        os.environ["PRUNEKIT_CACHE_DIR"] = cache
        t = time.perf_counter()
        spectra = model_spectra(model, adapter, "cpu")
        esd = {"esd_seconds": spectra["seconds"], "esd_with_hash_seconds": time.perf_counter() - t,
               "matrices": len(spectra["eigs"])}
        print(f"ESD of {esd['matrices']} matrices: {esd['esd_seconds']:.1f} s", flush=True)

        runs, table = [], []
        for sparsity in args.sparsities:
            for method in args.methods:
                row = {"sparsity": sparsity, "method": method}
                for allocation in ("uniform", "alpha", "owl"):
                    net = copy.deepcopy(model)
                    config = PruneConfig(method=method, sparsity=sparsity, allocation=allocation, nsamples=32,
                                         seqlen=512, seed=0, dtype=args.dtype, device="cpu")
                    report = prune(net, config, samples, adapter)
                    ppl = perplexity(net, windows, compute, desc=f"{method} {allocation} {sparsity}")["ppl"]
                    row[allocation] = ppl
                    runs.append({"sparsity": sparsity, "method": method, "allocation": allocation, "ppl": ppl,
                                 "achieved": report.sparsity, "prune_seconds": report.prune_seconds,
                                 "blocks": report.allocation})
                    print(f"{sparsity} {method} {allocation}: ppl {ppl:.2f} (achieved {report.sparsity:.4f}, "
                          f"{report.prune_seconds:.1f} s)", flush=True)
                    write_results(args.out, runs, {**meta(), **esd, "dtype": args.dtype})
                    del net
                table.append(row)
    print(markdown(table, COLUMNS))
    write_results(args.out, runs, {**meta(), **esd, "dtype": args.dtype, "table": table})


if __name__ == "__main__":
    main()
