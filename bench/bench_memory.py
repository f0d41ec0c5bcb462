"""Memory benchmark: random LLaMA models of one width and growing depth, saved as sharded bf16
safetensors, pruned with --offload disk (and in memory where the model fits), each run in its own
process so that its peak RSS is its own. Prints a markdown table, writes bench/results/memory.json.

    python bench/bench_memory.py                         # depths 8 16 32 64 (hidden 1024), then a 7B
    python bench/bench_memory.py --depths 2 4 --hidden 256 --intermediate 688 --big none   # quick

The checkpoints are written tensor by tensor (prunekit's own shard writer), so making the 13 GB
LLaMA-7B-shaped one needs no more memory than pruning it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import markdown, meta, write_results  # noqa: E402

COLUMNS = [("model", "model", ""), ("blocks", "blocks", ""), ("size_gib", "checkpoint GiB", ".2f"),
           ("mode", "mode", ""), ("prune_s", "prune s", ".1f"), ("peak_rss_gib", "peak RSS GiB", ".2f"),
           ("rss_vs_size", "RSS / size", ".2f"), ("placement", "placement", "")]


def llama_config(hidden: int, intermediate: int, blocks: int):
    from transformers import LlamaConfig
    heads = max(1, hidden // 128)
    return LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=blocks,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                       tie_word_embeddings=False, dtype="bfloat16")


def write_checkpoint(folder: str, config) -> float:
    """A random bf16 checkpoint, one tensor at a time; returns its size in GiB."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from prunekit.adapters import adapter_for
    from prunekit.execution.disk import ShardWriter, output_layout, parse_size
    if not os.path.exists(os.path.join(folder, "config.json")):
        os.makedirs(folder, exist_ok=True)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        layout = output_layout(skeleton, adapter_for("llama"))
        writer = ShardWriter(folder, layout, parse_size("2GB"))
        gen = torch.Generator().manual_seed(0)
        for name, shape, dtype in layout:
            t = torch.ones(shape, dtype=dtype) if "norm" in name else \
                torch.randn(shape, generator=gen).mul_(0.02).to(dtype)
            writer.write(name, t)
        writer.finish()
        config.save_pretrained(folder)
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**30


def child(args) -> dict:
    """One prune in this process: print its record as JSON."""
    from prunekit import PruneConfig, prune
    from prunekit.execution.disk import DiskRun, load_skeleton
    from prunekit.export import atomic_folder
    config = PruneConfig(method=args.method, nsamples=args.nsamples, seqlen=args.seqlen, device="cpu",
                         offload="disk" if args.mode == "disk" else "auto")
    ids = torch.randint(0, 32000, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    with atomic_folder(args.out, overwrite=True) as tmp:
        if args.mode == "disk":
            model, _, adapter, reader = load_skeleton(args.model, tokenizer=False)
            report = prune(model, config, ids, adapter, disk=DiskRun(reader, tmp, scratch_dir=tmp))
            model.config.save_pretrained(tmp)
        else:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").eval()
            report = prune(model, config, ids)
            model.save_pretrained(tmp)
    return {"prune_s": report.prune_seconds, "placement": report.placement["line"].removeprefix("placement: "),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "sparsity": report.sparsity}


def run_child(model: str, mode: str, out: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--mode", mode, "--out", out,
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--method", args.method]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", nargs="+", type=int, default=[8, 16, 32, 64])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--big", default="7b", help="'7b': also a LLaMA-7B-shaped model (13 GB) with --offload disk; 'none'")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--dir", default="/tmp/prunekit-bench-memory", help="where checkpoints and outputs go")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "memory.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return None

    rows = []
    models = [(f"h{args.hidden}", args.hidden, args.intermediate, d) for d in args.depths]
    if args.big == "7b":
        models.append(("llama-7b shape", 4096, 11008, 32))
    for label, hidden, inter, depth in models:
        folder = os.path.join(args.dir, f"{label.replace(' ', '_')}-{depth}")
        t = time.perf_counter()
        size = write_checkpoint(folder, llama_config(hidden, inter, depth))
        print(f"{label} x {depth}: {size:.2f} GiB checkpoint ({time.perf_counter() - t:.0f} s)", flush=True)
        modes = ["disk", "memory"] if label != "llama-7b shape" else ["disk"]
        for mode in modes:
            result = run_child(folder, mode, os.path.join(args.dir, "out"), args)
            row = {"model": label, "blocks": depth, "size_gib": size, "mode": mode, **result,
                   "rss_vs_size": result["peak_rss_gib"] / size}
            rows.append(row)
            print(markdown([row], COLUMNS).splitlines()[-1], flush=True)
            write_results(args.out, rows, {**meta(), "nsamples": args.nsamples, "seqlen": args.seqlen,
                                           "method": args.method})
    print(markdown(rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
