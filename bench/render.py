"""Render a results JSON of bench_core.py as the markdown tables the README shows: every row, and each
low-precision row against the float32 row of the same method and pattern (same run).

    python bench/render.py bench/results/core.json
"""
import json
import sys

from common import markdown

COLUMNS = [("dtype", "dtype", ""), ("method", "method", ""), ("pattern", "pattern", ""), ("ppl", "ppl", ".2f"),
           ("sparsity", "sparsity", ".3f"), ("prune_seconds", "prune s", ".1f"), ("floor_seconds", "floor s", ".1f"),
           ("vs_floor", "prune/floor", ".2f"), ("eval_seconds", "eval s", ".1f"), ("peak_rss_mib", "peak RSS MiB", ".0f")]

COMPARE = [("dtype", "dtype", ""), ("method", "method", ""), ("pattern", "pattern", ""), ("ppl", "ppl", ".2f"),
           ("ppl_fp32", "ppl fp32", ".2f"), ("ppl_change", "ppl vs fp32", "+.1%"),
           ("prune_seconds", "prune s", ".1f"), ("prune_fp32", "prune s fp32", ".1f"), ("time_ratio", "time vs fp32", ".2f")]


def compare(rows: list[dict]) -> list[dict]:
    """Low-precision rows beside the float32 run of the same method (its first word: the float32 run
    of 'wanda --stats-dtype float32' is plain wanda) and pattern."""
    fp32 = {(r["method"], r["pattern"]): r for r in rows if r["dtype"] == "float32"}
    out = []
    for r in rows:
        base = fp32.get((r["method"].split(" --stats-dtype")[0], r["pattern"]))
        if r["dtype"] == "float32" or base is None:
            continue
        row = {**r, "ppl_fp32": base["ppl"], "ppl_change": r["ppl"] / base["ppl"] - 1}
        if r.get("prune_seconds") and base.get("prune_seconds"):
            row.update(prune_fp32=base["prune_seconds"], time_ratio=r["prune_seconds"] / base["prune_seconds"])
        elif r["method"] == "dense":
            row.update(prune_seconds=r["floor_seconds"], prune_fp32=base["floor_seconds"],
                       time_ratio=r["floor_seconds"] / base["floor_seconds"], method="dense (floor)")
        out.append(row)
    return out


def aggregate(rows: list[dict]) -> str:
    """Total low-precision prune time over the calibrated runs (all but magnitude and the
    --stats-dtype variants) against the same runs in float32."""
    pairs = [r for r in compare(rows) if r.get("time_ratio") is not None and r["method"].split()[0] != "magnitude"
             and "--stats-dtype" not in r["method"] and r["method"] != "dense (floor)"]
    if not pairs:
        return ""
    low, high = sum(r["prune_seconds"] for r in pairs), sum(r["prune_fp32"] for r in pairs)
    return (f"{len(pairs)} calibrated runs: {low:.1f} s in {pairs[0]['dtype']} against {high:.1f} s in float32, "
            f"{low / high:.3f} in aggregate")


if __name__ == "__main__":
    rows = json.load(open(sys.argv[1]))["rows"]
    print(markdown(rows, COLUMNS))
    print()
    print(markdown(compare(rows), COMPARE))
    print()
    print(aggregate(rows))
