"""Render a results JSON of bench_core.py as the markdown table the README shows.

    python bench/render.py bench/results/core.json
"""
import json
import sys

from common import markdown

COLUMNS = [("dtype", "dtype", ""), ("method", "method", ""), ("pattern", "pattern", ""), ("ppl", "ppl", ".2f"),
           ("sparsity", "sparsity", ".3f"), ("prune_seconds", "prune s", ".1f"), ("floor_seconds", "floor s", ".1f"),
           ("vs_floor", "prune/floor", ".2f"), ("eval_seconds", "eval s", ".1f"), ("peak_rss_mib", "peak RSS MiB", ".0f")]

if __name__ == "__main__":
    print(markdown(json.load(open(sys.argv[1]))["rows"], COLUMNS))
