"""SparseGPT cross-check: prunekit's SparseGPT against an independent reference-style implementation.

The reference-style loop follows the math of IST-DASLab/sparsegpt's `fasterprune` as locuslab/wanda's
`prune_sparsegpt` runs it (float32; the dense block over one calibration sequence at a time with a
running-average Hessian per linear; Hinv = chol_upper(cholesky_inverse(chol(H + damp I))); per block of
128 columns the mask `tmp <= sorted[k]`; the pruned block makes the next block's inputs). prunekit's
SparseGPT (`prunekit.prune`) runs on a fresh copy of the model with the same samples; both are
evaluated with prunekit's perplexity under the P0 protocol (SmolLM2-135M, 50 % unstructured, 32 x 512
calibration tokens, the first 64 x 512 WikiText-2 test windows). Recorded per thread count in
bench/results/sparsegpt_ref.json: perplexity and prune seconds of each, and the fraction of identical
mask entries across the two (per layer: min, mean, block 0; overall).

    export PRUNEKIT_DATA_DIR=/work/shared/data TQDM_DISABLE=1
    OMP_NUM_THREADS=1 python bench/bench_sparsegpt_ref.py --masks /tmp/sgmasks
    OMP_NUM_THREADS=2 python bench/bench_sparsegpt_ref.py --masks /tmp/sgmasks
    OMP_NUM_THREADS=2 python bench/bench_sparsegpt_ref.py --pattern 2:4     # and 4:8: N:M, chosen per group
    python bench/bench_sparsegpt_ref.py --check    # only the small random-layer check

`--masks` (a folder outside the repo) keeps each run's masks; a later run with another thread count
compares each implementation with itself there: how far float32 rounding alone moves the masks.

    OMP_NUM_THREADS=2 python bench/bench_sparsegpt_ref.py --orders 5
    OMP_NUM_THREADS=2 python bench/bench_sparsegpt_ref.py --reference-arithmetic

`--orders K` runs both implementations on K orderings of the same 32 calibration sequences (the
first is the protocol's own order). The Hessian is a sum over sequences, so the order changes no
number of the math, only its float32 rounding: each ordering is one draw of the rounding noise, and
the K draws give each implementation's mean and spread (written under "orders PATTERN tN" in the JSON).

`--reference-arithmetic` adds prunekit with `--sparsegpt-arithmetic reference` (the reference's
float32 operations in its order, one sequence per pass) and checks it against the loop here bit for
bit: the share of equal mask entries and how many parameters are identical (results key "N with
reference arithmetic").
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import markdown, meta, orderings, protocol, spread  # noqa: E402

from prunekit import PruneConfig, prune  # noqa: E402
from prunekit.config import parse_pattern  # noqa: E402
from prunekit.evaluate import perplexity  # noqa: E402
from prunekit.execution import Compute  # noqa: E402
from prunekit.loading import load  # noqa: E402
from prunekit.scoring import sparsegpt_math  # noqa: E402
from prunekit.scoring.sparsegpt import SparseGPT  # noqa: E402


def ref_fasterprune(W, H, sparsity=0.5, blocksize=128, percdamp=0.01, nm=None):
    """Reference-style OBS prune of W (rows, cols) with Hessian H; returns (pruned W, mask True = pruned).
    nm=(n, m): each group of m columns gets its n lowest W^2/diag(Hinv)^2 per row, chosen when the
    column loop reaches the group's first column (from the weights updated so far)."""
    W, H = W.detach().clone().to(H.dtype), H.clone()  # float32 H: float32 throughout
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    idx = torch.arange(cols)
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        if nm is None:
            tmp = W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]  # 0-based k: prunes k + 1
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for j in range(i2 - i1):
            if nm is not None and j % nm[1] == 0:
                tmp = W1[:, j:j + nm[1]] ** 2 / torch.diag(Hinv1)[j:j + nm[1]].reshape(1, -1) ** 2
                mask1.scatter_(1, j + torch.topk(tmp, nm[0], dim=1, largest=False)[1], True)
            w, d = W1[:, j], Hinv1[j, j]
            q = w.clone()
            q[mask1[:, j]] = 0
            Q1[:, j] = q
            err = (w - q) / d
            W1[:, j:] -= err.unsqueeze(1) @ Hinv1[j, j:].unsqueeze(0)
            Err1[:, j] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        mask[:, i1:i2] = mask1
    return W, mask


class Stop(Exception):
    pass


@torch.no_grad()
def ref_prune(model, adapter, samples, sparsity=0.5, nm=None):
    """Wanda-repo-style block loop, one sequence at a time, float32. Returns {layer name: mask}."""
    blocks = adapter.blocks(model)
    inps, extra = [], []

    def grab(module, args, kwargs):
        inps.append(args[0].detach().float())
        extra.append((args[1:], dict(kwargs)))
        raise Stop

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    for j in range(samples.shape[0]):
        try:
            model(input_ids=samples[j:j + 1], use_cache=False)
        except Stop:
            pass
    handle.remove()

    def run(block, j):
        out = block(inps[j], *extra[j][0], **extra[j][1])
        return out[0] if isinstance(out, (tuple, list)) else out

    masks = {}
    for i, block in enumerate(blocks):
        linears = adapter.block_linears(block)
        hess = {name: [torch.zeros(m.weight.shape[1], m.weight.shape[1]), 0] for name, m in linears.items()}

        def add_batch(h):  # h: [H, sequences counted] of one linear
            def hook(module, inp, out):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1])
                h[0] *= h[1] / (h[1] + 1)
                h[1] += 1
                x = math.sqrt(2 / h[1]) * x.float()
                h[0] += x.t() @ x
            return hook

        handles = [m.register_forward_hook(add_batch(hess[name])) for name, m in linears.items()]
        for j in range(len(inps)):
            run(block, j)
        for h in handles:
            h.remove()
        for name, m in linears.items():
            w, mask = ref_fasterprune(m.weight.data, hess[name][0], sparsity, nm=nm)
            m.weight.data.copy_(w)
            masks[f"{adapter.blocks_path}.{i}.{name}"] = mask
        del hess
        inps = [run(block, j) for j in range(len(inps))]
    return masks


def prunekit_prune(model, adapter, samples, sparsity=0.5, pattern="unstructured", arithmetic="fast"):
    """prunekit.prune as bench_core calls it; SparseGPT.prune is wrapped (not edited) to record its masks."""
    masks, original = [], SparseGPT.prune

    def recording(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        masks.append(result.mask.clone())
        return result

    SparseGPT.prune = recording
    try:
        config = PruneConfig(method="sparsegpt", sparsity=sparsity, pattern=pattern, nsamples=32, seqlen=512,
                             seed=0, dtype="float32", device="cpu", sparsegpt_arithmetic=arithmetic)
        report = prune(model, config, samples, adapter)
    finally:
        SparseGPT.prune = original
    return dict(zip([layer["name"] for layer in report.layers], masks)), report


def check():
    """Small random layer, the same H and W: reference-style vs sparsegpt_math masks and weights."""
    torch.manual_seed(0)
    rows, cols, tokens = 192, 320, 2048
    x = torch.randn(tokens, cols) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols) / math.sqrt(cols))
    x[:, 7] = 0  # a dead input
    H = 2 / 4 * (x.t() @ x)
    W = torch.randn(rows, cols)
    w_ref, m_ref = ref_fasterprune(W, H)
    res = sparsegpt_math.sparsegpt_prune(W, H, 0.5)
    differ = (m_ref != res.mask).sum().item()
    same = (m_ref == res.mask).all(1, keepdim=True)  # a row whose mask differs has a different update
    kept = ~m_ref & same
    rel = ((w_ref - res.weight)[kept].norm() / w_ref[kept].norm()).item()
    print(f"check: {rows}x{cols}, ref pruned {m_ref.sum().item()}, prunekit pruned {res.mask.sum().item()}, "
          f"masks differ in {differ} of {m_ref.numel()} entries, {(~same).sum().item()} rows (reference prunes "
          f"k+1 per block of 128: {math.ceil(cols / 128)} blocks); kept weights of the other rows: rel. diff {rel:.2e}")
    return {"shape": [rows, cols], "mask_differ": differ, "rows_differ": (~same).sum().item(), "kept_rel_diff": rel}


def agreement(a, b):
    """Fraction of identical mask entries: per layer, and its min (where), mean and overall."""
    assert a.keys() == b.keys(), "layer names differ"
    per_layer = {n: (a[n] == b[n]).double().mean().item() for n in a}
    overall = sum((a[n] == b[n]).sum().item() for n in a) / sum(m.numel() for m in a.values())
    return per_layer, {"min": min(per_layer.values()), "argmin": min(per_layer, key=per_layer.get),
                       "mean": sum(per_layer.values()) / len(per_layer), "overall": overall}


def run_impl(model, adapter, samples, windows, compute, impl, pattern):
    """One implementation on a fresh copy of `model`: the pruned copy, its masks, prune seconds, ppl.
    impl: "reference-style", "prunekit", or "prunekit, reference arithmetic"."""
    net = copy.deepcopy(model)
    t = time.perf_counter()
    if impl.startswith("prunekit"):
        masks, _ = prunekit_prune(net, adapter, samples, pattern=pattern,
                                  arithmetic="reference" if "reference" in impl else "fast")
    else:
        masks = ref_prune(net, adapter, samples, nm=parse_pattern(pattern))
    seconds = time.perf_counter() - t
    ppl = perplexity(net, windows, compute, desc=impl)["ppl"]
    print(f"{impl}: ppl {ppl:.3f}, {seconds:.1f} s", flush=True)
    return net, masks, seconds, ppl


def orders(model, adapter, samples, windows, compute, k, threads, pattern):
    """Both implementations on k orderings of the calibration sequences (the first: as given)."""
    rows = []
    for order, perm in orderings(samples.shape[0], k):
        for impl in ("reference-style", "prunekit"):
            _, _, seconds, ppl = run_impl(model, adapter, samples[perm], windows, compute, impl, pattern)
            rows.append({"threads": threads, "pattern": pattern, "order": order, "impl": impl, "ppl": ppl,
                         "prune_seconds": seconds})
    summary = {impl: spread(r["ppl"] for r in rows if r["impl"] == impl) for impl in ("reference-style", "prunekit")}
    ref, ours = summary["reference-style"], summary["prunekit"]
    summary["prunekit_vs_reference_mean"] = ours["mean"] / ref["mean"] - 1
    print(markdown([{"impl": i, **summary[i]} for i in ("reference-style", "prunekit")],
                   [("impl", "implementation", ""), ("mean", "mean ppl", ".3f"), ("sd", "sd", ".3f"),
                    ("min", "min", ".3f"), ("max", "max", ".3f")]))
    print(f"prunekit vs reference, mean over {k} orderings: {100 * summary['prunekit_vs_reference_mean']:+.2f} %")
    return rows, summary


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="only the small random-layer check")
    ap.add_argument("--pattern", default="unstructured", help="unstructured (50 %%), 2:4 or 4:8")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sparsegpt_ref.json"))
    ap.add_argument("--reference-arithmetic", action="store_true",
                    help="also run prunekit --sparsegpt-arithmetic reference; check it bit for bit against the loop here")
    ap.add_argument("--orders", type=int, help="run both on K orderings of the calibration sequences (rounding draws)")
    ap.add_argument("--masks", help="folder (outside the repo) to save this run's masks in; masks saved there by a "
                    "run with another thread count are compared with this run's (the rounding noise floor)")
    args = ap.parse_args()
    sanity = check()
    if args.check:
        return
    threads = torch.get_num_threads()
    nm = parse_pattern(args.pattern)
    key = str(threads) if nm is None else f"{args.pattern} t{threads}"  # results key, mask file tag
    model, tokenizer, adapter, _ = load("smollm2-135m")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # GGUF, dequantized to float32
    samples, windows = protocol(tokenizer)
    compute = Compute.from_config(PruneConfig(dtype="float32", device="cpu"))
    if args.orders:
        rows, summary = orders(model, adapter, samples, windows, compute, args.orders, threads, args.pattern)
        results = json.load(open(args.out)) if os.path.exists(args.out) else {"runs": {}}
        results["runs"][f"orders {args.pattern} t{threads}"] = {
            "meta": {**meta(), "torch_num_threads": threads}, "rows": rows, "summary": summary}
        _write(args.out, results)
        return
    rows, masks, weights = [], {}, {}
    impls = ["reference-style", "prunekit"] + (["prunekit, reference arithmetic"] if args.reference_arithmetic else [])
    for impl in impls:
        net, masks[impl], seconds, ppl = run_impl(model, adapter, samples, windows, compute, impl, args.pattern)
        pruned = sum(m.sum().item() for m in masks[impl].values()) / sum(m.numel() for m in masks[impl].values())
        rows.append({"threads": threads, "pattern": args.pattern, "impl": impl, "ppl": ppl, "prune_seconds": seconds,
                     "sparsity": pruned})
        if impl != "prunekit":
            weights[impl] = {n: p.detach().clone() for n, p in net.named_parameters()}
        del net
    exact = None
    if args.reference_arithmetic:  # bit for bit: every mask entry and every parameter
        a, b = weights["reference-style"], weights["prunekit, reference arithmetic"]
        exact = {"masks_equal": agreement(masks["reference-style"], masks["prunekit, reference arithmetic"])[1]["overall"],
                 "parameters_identical": sum(torch.equal(a[n], b[n]) for n in a), "parameters": len(a)}
        print(f"prunekit, reference arithmetic vs reference-style: {exact}")
    masks = {k: v for k, v in masks.items() if k in ("reference-style", "prunekit")}
    per_layer, agree = agreement(masks["reference-style"], masks["prunekit"])
    agree["block0_min"] = min(v for n, v in per_layer.items() if n.startswith(f"{adapter.blocks_path}.0."))
    for r in rows:  # the reference arithmetic's own agreement is `exact` (1.0 when it is bit for bit)
        same = {"min": exact["masks_equal"], "mean": exact["masks_equal"], "block0_min": exact["masks_equal"],
                "overall": exact["masks_equal"]} if "reference arithmetic" in r["impl"] else agree
        r.update({f"agree_{k}": v for k, v in same.items() if k != "argmin"})
    print(markdown(rows, [("threads", "threads", ""), ("pattern", "pattern", ""), ("impl", "implementation", ""),
                          ("ppl", "ppl", ".3f"),
                          ("prune_seconds", "prune s", ".1f"), ("sparsity", "sparsity", ".6f"),
                          ("agree_min", "mask agree min", ".5f"), ("agree_mean", "mean", ".5f"),
                          ("agree_block0_min", "block-0 min", ".6f"), ("agree_overall", "overall", ".5f")]))
    print(f"least agreeing layer: {agree['argmin']}")
    across = {}
    if args.masks:  # each implementation against itself at another thread count
        os.makedirs(args.masks, exist_ok=True)
        tag = "" if nm is None else args.pattern.replace(":", "of") + "_"
        torch.save(masks, os.path.join(args.masks, f"masks_{tag}t{threads}.pt"))
        for f in sorted(os.listdir(args.masks)):
            if f.startswith(f"masks_{tag}t") and f != f"masks_{tag}t{threads}.pt":
                other = torch.load(os.path.join(args.masks, f))
                for impl in masks:
                    across[f"{impl} vs {f[6:-3]}"] = agreement(masks[impl], other[impl])[1]
                    print(f"{impl}, t{threads} vs {f[6:-3]}: mask agreement {across[f'{impl} vs {f[6:-3]}']}")
    results = json.load(open(args.out)) if os.path.exists(args.out) else {"runs": {}}
    key += " with reference arithmetic" if args.reference_arithmetic else ""
    results["runs"][key] = {"meta": {**meta(), "torch_num_threads": threads}, "rows": rows,
                                     "mask_agreement": agree, "per_layer_agreement": per_layer,
                                     "across_threads": across, "check": sanity,
                                     **({"reference_arithmetic": exact} if exact else {})}
    _write(args.out, results)


def _write(path, results):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
