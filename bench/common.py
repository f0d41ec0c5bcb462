"""Shared benchmark plumbing: the SmolLM2 protocol, peak-RSS sampling, table printing."""
from __future__ import annotations

import json
import os
import threading
import time

import torch

from prunekit.data import calibration_samples, eval_windows, load_text, tokenize

DATA = os.environ.get("PRUNEKIT_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
CALIB = os.path.join(DATA, "wikitext-2", "valid.txt")
EVAL = os.path.join(DATA, "wikitext-2-raw", "wiki.test.raw")


def protocol(tokenizer, nsamples=32, seqlen=512, windows=64, seed=0):
    """The benchmark protocol: 32 x 512 calibration segments (seed 0) from WikiText-2 validation,
    the first 64 windows of 512 tokens of the WikiText-2 raw test split."""
    samples = calibration_samples(tokenize(tokenizer, load_text(CALIB)), nsamples, seqlen, seed)
    wins = eval_windows(tokenize(tokenizer, load_text(EVAL)), seqlen, windows)
    return samples, wins


def orderings(n: int, k: int):
    """k orderings of n calibration sequences, (index, permutation): the protocol's own order first,
    then permutations seeded 1..k-1. The statistics are sums over the sequences, so another order
    changes none of the math, only its float rounding: each ordering is one draw of that noise."""
    for order in range(k):
        yield order, torch.arange(n) if order == 0 else torch.randperm(n, generator=torch.Generator().manual_seed(order))


def spread(values) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max of a list of figures."""
    p = torch.tensor(list(values), dtype=torch.float64)
    return {"mean": p.mean().item(), "sd": p.std().item() if len(p) > 1 else 0.0,
            "min": p.min().item(), "max": p.max().item()}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    """Highest resident set size of this process while inside, sampled every 20 ms."""

    def __enter__(self):
        self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def write_results(path: str, rows: list[dict], meta: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    os.replace(tmp, path)


def markdown(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format)."""
    out = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("—" if v is None else format(v, fmt) if fmt else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def meta() -> dict:
    import platform
    import transformers
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor()}
