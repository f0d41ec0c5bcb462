"""Where bf16's perplexity difference comes from, on SmolLM2 with the core benchmark's protocol.

1. Mask flips: for sampled blocks, the float32 statistics pass and a bf16 one over the *same* inputs
   (the dense float32 block outputs carried forward), then the share of each layer's Wanda 2:4 mask
   that differs. Rows: a float32 control with another batch size (summation order); prunekit's bf16;
   bf16 with PyTorch's sdpa in place of prunekit's attention kernel (sdpa computes bf16 attention in
   float32 on CPUs without AMX), to tell the matmuls' rounding from the attention's; a float32 pass
   with the block's weights rounded to bf16 (SmolLM2's checkpoint is float32: is it the weights that
   a bf16 pass multiplies by, or the rounding of its activations?); and float32 statistics times
   (1 + eps * N(0, 1)) for a few eps, to put the bf16 flips on a scale.
2. Evaluation dtype: one bf16-pruned Wanda 2:4 model, its perplexity evaluated in bf16 and in float32.
3. Sensitivity: float32 Wanda 2:4 runs whose statistics are multiplied by (1 + eps * N(0, 1)),
   eps = 2^-11 (which flips about as many weights as bf16 does), one run per seed: how far 2:4
   perplexity moves on mask changes of that size that have nothing to do with the dtype.

4. Orderings (`--parts orders`, not in the default set: about 10 minutes per ordering): float32 and
   bf16 runs of each `--orders-runs` entry on K orderings of the same calibration sequences (see
   common.orderings), so that bf16 is compared with float32 as a mean over rounding draws rather
   than as one draw against another. An ordering changes only the rounding of the sums, so the
   orderings share the rest: the model's own rounding to bf16, which is the same in every ordering.
5. Calibration draws (`--parts seeds`, not in the default set): the same pairs on independent
   calibration sets (the protocol with seeds `--calib-seeds`), each bf16 run against the float32 run
   on the same samples: the size and sign of the bf16 difference from one calibration set to another.

    python bench/bench_bf16.py [--parts flips eval sensitivity] [--blocks 2 10 20 28] [--seeds 4]
    python bench/bench_bf16.py --parts orders --orders 3 --orders-runs "sparsegpt 2:4" "wanda 2:4"
    python bench/bench_bf16.py --parts orders --orders 3 --orders-runs "wanda 2:4" --checkpoint-dtype bfloat16
    python bench/bench_bf16.py --parts seeds --calib-seeds 0 1 2 3 4 --orders-runs "wanda 2:4" "sparsegpt 2:4"
    python bench/bench_bf16.py --render bench/results/bf16.json   # the tables again, from the JSON

Prints tables and writes bench/results/bf16.json (about 15 minutes on the 2-core CI machine).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import markdown, meta, orderings, protocol, spread, write_results  # noqa: E402

from prunekit.execution import loop, precision  # noqa: E402
from prunekit import PruneConfig, prune  # noqa: E402
from prunekit.execution import Compute, capture_block_inputs, collect_stats, run_block  # noqa: E402
from prunekit.evaluate import perplexity  # noqa: E402
from prunekit.loading import load  # noqa: E402
from prunekit.masks import nm_mask  # noqa: E402
from prunekit.scoring.wanda import wanda_scores  # noqa: E402

FP32, BF16 = Compute(torch.device("cpu"), torch.float32), Compute(torch.device("cpu"), torch.bfloat16)


def wanda_norms(adapter, block, inputs, compute) -> dict[str, torch.Tensor]:
    """Wanda's s_j for every linear of `block`, from a statistics pass in `compute`."""
    with collect_stats(adapter.block_linears(block), adapter.linears[-1], lambda name: False) as stats:
        run_block(block, inputs, compute)
    return {name: st.wanda_norm_sq for name, st in stats.items()}


def wanda_24_masks(adapter, block, norms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: nm_mask(wanda_scores(adapter.weight(m).float(), norms[name]), 2, 4)
            for name, m in adapter.block_linears(block).items()}


def noisy(norms: dict[str, torch.Tensor], eps: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """s_j times (1 + eps * N(0, 1)), drawn independently per layer and channel."""
    return {name: s * (1 + eps * torch.randn(s.shape, generator=gen)) for name, s in norms.items()}


@contextlib.contextmanager
def stock_attention():
    """bf16 passes with PyTorch's sdpa instead of prunekit's attention kernel."""
    with mock.patch.object(precision, "cpu_bf16_attention", lambda enabled=True: contextlib.nullcontext()):
        yield


@contextlib.contextmanager
def bf16_rounded(block):
    """The block's parameters rounded to bf16 (and held in float32) while the context lasts: a float32
    pass that sees the weights a bf16 pass multiplies by, and nothing else of bf16."""
    saved = [(p, p.data) for p in block.parameters()]
    for p, data in saved:
        p.data = data.to(torch.bfloat16).float()
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data


def mask_flips(model, adapter, samples, blocks: list[int], eps_list: list[float]) -> list[dict]:
    inputs = capture_block_inputs(model, adapter, samples, 4, FP32)
    inputs8 = capture_block_inputs(model, adapter, samples, 8, FP32)
    gen = torch.Generator().manual_seed(0)
    rows = []

    def add(i, label, masks, ref):
        row = {"block": i, "variant": label}
        row.update({name.split(".")[-1]: 100 * (masks[name] != ref[name]).float().mean().item() for name in ref})
        row["weights"] = sum(int((masks[name] != ref[name]).sum()) for name in ref)
        rows.append(row)
        print(row, flush=True)

    for i, block in enumerate(adapter.blocks(model)[:max(blocks) + 1]):
        if i in blocks:
            exact = wanda_norms(adapter, block, inputs, FP32)
            ref = wanda_24_masks(adapter, block, exact)
            add(i, "float32, batch 8 (control)", wanda_24_masks(adapter, block, wanda_norms(adapter, block, inputs8, FP32)), ref)
            add(i, "bfloat16 (prunekit)", wanda_24_masks(adapter, block, wanda_norms(adapter, block, inputs, BF16)), ref)
            with stock_attention():
                add(i, "bfloat16, torch sdpa attention",
                    wanda_24_masks(adapter, block, wanda_norms(adapter, block, inputs, BF16)), ref)
            with bf16_rounded(block):
                norms = wanda_norms(adapter, block, inputs, FP32)
            add(i, "float32, weights rounded to bf16", wanda_24_masks(adapter, block, norms), ref)
            for eps in eps_list:
                add(i, f"float32 x (1 + {eps_label(eps)} N(0,1))", wanda_24_masks(adapter, block, noisy(exact, eps, gen)), ref)
        run_block(block, inputs, FP32, outputs=inputs)
        run_block(block, inputs8, FP32, outputs=inputs8)
    return rows


def eps_label(eps: float) -> str:
    return f"2^{math.log2(eps):.0f}"


def perturbed(eps: float, seed: int):
    """Wrap prune_linear so each layer sees its statistics times (1 + eps * N(0, 1))."""
    original = loop.prune_linear
    gen = torch.Generator().manual_seed(seed)

    def wrapper(module, adapter, scorer, stats, *args, **kwargs):
        if stats is not None:
            noise = 1 + eps * torch.randn(stats.sum_sq.shape, generator=gen)
            stats = dataclasses.replace(stats, sum_sq=stats.sum_sq * noise)
        return original(module, adapter, scorer, stats, *args, **kwargs)
    return mock.patch.object(loop, "prune_linear", wrapper)


def layer_names(flips: list[dict]) -> list[str]:
    return [k for k in flips[0] if k not in ("block", "variant", "weights")] if flips else []


def flip_summary(flips: list[dict]) -> list[dict]:
    """Per statistics variant, each layer's flipped share averaged over the sampled blocks."""
    out = {}
    for row in flips:
        acc = out.setdefault(row["variant"], {"variant": row["variant"], "blocks": 0, "weights": 0.0})
        acc["blocks"] += 1
        acc["weights"] += row["weights"]
        for name in layer_names(flips):
            acc[name] = acc.get(name, 0.0) + row[name]
    for acc in out.values():
        for name in [*layer_names(flips), "weights"]:
            acc[name] /= acc["blocks"]
    return list(out.values())


def paired_runs(model, adapter, draws, windows, runs: list[str], checkpoint: str = "float32") -> list[dict]:
    """Each run ('METHOD PATTERN') in float32 and bf16 on each draw of calibration samples
    ((index, samples) pairs): one row per run, draw and dtype. `checkpoint` other than float32: the
    model's weights rounded to that dtype first (a bf16 checkpoint, as most are), for both dtypes."""
    rows = []
    if checkpoint != "float32":
        model = copy.deepcopy(model).to(getattr(torch, checkpoint))
    draws = list(draws)
    for run in runs:
        method, pattern = run.split()
        label = run if checkpoint == "float32" else f"{run}, {checkpoint} checkpoint"
        for draw, samples in draws:
            for dtype, compute in (("float32", FP32), ("bfloat16", BF16)):
                net = copy.deepcopy(model)
                report = prune(net, PruneConfig(method=method, pattern=pattern, nsamples=32, seqlen=512,
                                                dtype=dtype, device="cpu"), samples, adapter)
                rows.append({"run": label, "order": draw, "dtype": dtype, "ppl": perplexity(net, windows, compute)["ppl"],
                             "prune_seconds": report.prune_seconds})
                print(rows[-1], flush=True)
    return rows


def ordering_summary(rows: list[dict]) -> list[dict]:
    """Per run and dtype: the mean, spread and the bf16 mean against the float32 mean; and per draw the
    bf16 run against the float32 run on the same samples (`paired`: mean, sd, min, max of
    ppl_bf16 / ppl_float32 - 1 over the draws, and how many draws are within 3 %)."""
    out = []
    for label in dict.fromkeys(r["run"] for r in rows):
        means, by_dtype = {}, {}
        for dtype in ("float32", "bfloat16"):
            by_dtype[dtype] = {r["order"]: r["ppl"] for r in rows if r["run"] == label and r["dtype"] == dtype}
            stats = spread(by_dtype[dtype].values())
            means[dtype] = stats["mean"]
            out.append({"run": label, "dtype": dtype, "draws": len(by_dtype[dtype]), **stats,
                        "vs float32": means[dtype] / means["float32"] - 1})
        fp32, bf16 = by_dtype["float32"], by_dtype["bfloat16"]
        paired = [bf16[d] / fp32[d] - 1 for d in fp32 if d in bf16]
        p = spread(paired)
        out[-1].update({"paired mean": p["mean"], "paired sd": p["sd"], "paired min": p["min"], "paired max": p["max"],
                        "within 3%": f"{sum(abs(d) <= 0.03 for d in paired)} of {len(paired)}"})
    return out


def draws_table(summary: list[dict], kind: str) -> str:
    return markdown(summary, [("run", "run", ""), ("dtype", "dtype", ""), ("draws", kind, ""),
                              ("mean", "mean ppl", ".2f"), ("sd", "sd", ".2f"), ("min", "min", ".2f"),
                              ("max", "max", ".2f"), ("vs float32", "mean vs float32", "+.1%"),
                              ("paired mean", "bf16/fp32 - 1 per draw: mean", "+.1%"), ("paired sd", "sd", ".1%"),
                              ("paired min", "min", "+.1%"), ("paired max", "max", "+.1%"),
                              ("within 3%", "draws within 3 %", "")])


def render(flips: list[dict], evals: list[dict], sens: list[dict], orders: list[dict] | None = None,
           seeds: list[dict] | None = None) -> str:
    layer_cols = [(n, f"{n} %", ".3f") for n in layer_names(flips)] + [("weights", "weights flipped", ".0f")]
    parts = []
    if flips:
        parts.append(markdown(flips, [("block", "block", ""), ("variant", "statistics", "")] + layer_cols))
        parts.append(markdown(flip_summary(flips), [("variant", "statistics (mean over blocks)", "")] + layer_cols))
    if evals:
        parts.append(markdown(evals, [("model", "model", ""), ("eval dtype", "eval dtype", ""), ("ppl", "ppl", ".2f")]))
    if sens:
        parts.append(markdown(sens, [("statistics", "float32 wanda 2:4, statistics", ""), ("ppl", "ppl", ".2f"),
                                     ("vs exact", "vs exact", "+.2%")]))
    if orders:
        parts.append(draws_table(orders, "orderings"))
    if seeds:
        parts.append(draws_table(seeds, "calibration draws"))
    return "\n\n".join(parts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", nargs="+", type=int, default=[2, 10, 20, 28])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--eps", nargs="+", type=float, default=[2.0 ** -10, 2.0 ** -11, 2.0 ** -12],
                    help="relative noise levels whose mask flips the first table shows")
    ap.add_argument("--sensitivity-eps", type=float, default=2.0 ** -11)
    ap.add_argument("--parts", nargs="+", default=["flips", "eval", "sensitivity"])
    ap.add_argument("--orders", type=int, default=3, help="orderings per run for --parts orders")
    ap.add_argument("--orders-runs", nargs="+", default=["sparsegpt 2:4", "wanda 2:4"])
    ap.add_argument("--calib-seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                    help="--parts seeds: the seeds of the independent calibration draws")
    ap.add_argument("--checkpoint-dtype", default="float32",
                    help="--parts orders/seeds: round SmolLM2's float32 weights to this dtype first (bfloat16)")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bf16.json"))
    ap.add_argument("--render", metavar="JSON", help="print the tables of an earlier run and exit")
    args = ap.parse_args()
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        print(render(saved["rows"], saved["meta"]["eval_dtype"], saved["meta"]["sensitivity"],
                     ordering_summary(saved["meta"].get("orders", [])),
                     ordering_summary(saved["meta"].get("seeds", []))))
        return

    model, tokenizer, adapter, _ = load("smollm2-135m")
    samples, windows = protocol(tokenizer, windows=args.windows)
    flips, evals, sens, orders, seeds = [], [], [], [], []
    if "flips" in args.parts:
        flips = mask_flips(model, adapter, samples, args.blocks, args.eps)

    if "eval" in args.parts:
        net = copy.deepcopy(model)
        prune(net, PruneConfig(method="wanda", pattern="2:4", nsamples=32, seqlen=512, dtype="bfloat16", device="cpu"),
              samples, adapter)
        for compute in (BF16, FP32):
            evals.append({"model": "wanda 2:4 pruned in bf16", "eval dtype": str(compute.dtype)[6:],
                          "ppl": perplexity(net, windows, compute)["ppl"]})
            print(evals[-1], flush=True)

    if "sensitivity" in args.parts:
        eps = args.sensitivity_eps
        for seed in [None, *range(args.seeds)]:
            net = copy.deepcopy(model)
            ctx = contextlib.nullcontext() if seed is None else perturbed(eps, seed)
            with ctx:
                report = prune(net, PruneConfig(method="wanda", pattern="2:4", nsamples=32, seqlen=512,
                                                dtype="float32", device="cpu"), samples, adapter)
            sens.append({"statistics": "exact" if seed is None else f"x (1 + {eps_label(eps)} N(0,1)), seed {seed}",
                         "ppl": perplexity(net, windows, FP32)["ppl"], "prune_seconds": report.prune_seconds})
            sens[-1]["vs exact"] = sens[-1]["ppl"] / sens[0]["ppl"] - 1
            print(sens[-1], flush=True)
    if "orders" in args.parts:
        draws = ((k, samples[perm]) for k, perm in orderings(samples.shape[0], args.orders))
        orders = paired_runs(model, adapter, draws, windows, args.orders_runs, args.checkpoint_dtype)
    if "seeds" in args.parts:  # independent calibration draws: protocol(seed=s)
        seeds = paired_runs(model, adapter, ((s, protocol(tokenizer, windows=1, seed=s)[0]) for s in args.calib_seeds),
                            windows, args.orders_runs, args.checkpoint_dtype)
    if os.path.exists(args.out):  # keep the parts of an earlier run that this one did not redo
        with open(args.out) as f:
            saved = json.load(f)
        flips = flips or saved["rows"]
        evals = evals or saved["meta"].get("eval_dtype", [])
        sens = sens or saved["meta"].get("sensitivity", [])
        orders = merged(saved["meta"].get("orders", []), orders)
        seeds = merged(saved["meta"].get("seeds", []), seeds)
    orders_summary, seeds_summary = ordering_summary(orders), ordering_summary(seeds)
    print(render(flips, evals, sens, orders_summary, seeds_summary))
    write_results(args.out, flips, {**meta(), "eval_dtype": evals, "sensitivity": sens,
                                    "sensitivity_eps": args.sensitivity_eps, "orders": orders,
                                    "orders_summary": orders_summary, "seeds": seeds, "seeds_summary": seeds_summary})


def merged(saved: list[dict], new: list[dict]) -> list[dict]:
    """An earlier run's rows with this run's in place of those of the same run label (runs of another
    label, e.g. another checkpoint dtype, are kept)."""
    redone = {r["run"] for r in new}
    return [r for r in saved if r["run"] not in redone] + new


if __name__ == "__main__":
    main()
