"""2:4 speed of a random LLaMA-shaped model built in memory (no download, no checkpoint on disk):
every block linear gets a magnitude 2:4 mask, then `prunekit.speed.bench_model` times each layer
shape (dense against every 2:4 path, eager and as CUDA graphs) and the whole model's prefill. Prints
the table and writes bench/results/sparse24.json; `prunekit bench-speed --model DIR` does the same
for a pruned checkpoint.

    python bench/bench_sparse24.py --shape 7b                          # on a GPU machine
    python bench/bench_sparse24.py --shape tiny --tokens 16,128        # anywhere (CPU: CSR column)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_gpu import build_model  # noqa: E402
from common import meta, write_results  # noqa: E402

from prunekit.adapters import adapter_for  # noqa: E402
from prunekit.execution.precision import resolve_device, resolve_dtype  # noqa: E402
from prunekit.masks import nm_mask  # noqa: E402
from prunekit.speed import bench_model, table  # noqa: E402


def impose_2_4(model, adapter, device) -> None:
    """Magnitude 2:4 on every block linear, computed where the compute is."""
    with torch.no_grad():
        for block in adapter.blocks(model):
            for module in adapter.block_linears(block).values():
                w = module.weight.data.to(device)
                w.masked_fill_(nm_mask(w.abs().float(), 2, 4), 0)
                module.weight.data = w.to(module.weight.device)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--layers", type=int, help="cut the depth to N blocks")
    ap.add_argument("--dtype", nargs="+", default=["auto"], help="one table per dtype: auto bfloat16 float16")
    ap.add_argument("--tokens", default="16,128,512,2048,4096,8192,32768")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sparse24.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    device = resolve_device("auto")
    tokens = [int(t) for t in args.tokens.split(",")]
    adapter = adapter_for("llama")
    model = build_model(args.shape, args.layers, torch.bfloat16)
    impose_2_4(model, adapter, device)
    results = []
    for name in args.dtype:
        dtype = resolve_dtype(name, device)
        if device.type == "cpu" and dtype != torch.float32:
            dtype = torch.float32  # CSR matmul on the CPU: float32
        result = bench_model(model, adapter, device, dtype, tokens)
        result["shape"] = args.shape
        results.append(result)
        print(f"## {result['device']}, {result['dtype']}, {args.shape} x {len(adapter.blocks(model))} blocks")
        print(table(result), flush=True)
        write_results(args.out, results, meta())
    return results


if __name__ == "__main__":
    main()
