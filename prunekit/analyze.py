"""`prunekit analyze`: per-layer heavy-tailed spectra (alpha) and the AlphaPruning allocation they imply."""
from __future__ import annotations

import os

from .allocation.alpha import alpha_allocation, esd_options, esd_precision, layer_alphas, model_spectra
from .config import PruneConfig
from .execution.precision import resolve_device
from .loading import load


def analyze(model: str, config: PruneConfig) -> dict:
    net, _, adapter, _ = load(model)
    precision = esd_precision(getattr(config, "esd_dtype", "auto"), config.alpha_metric)
    device = resolve_device(config.device)
    spectra = model_spectra(net, adapter, device, precision=precision, **esd_options(config))
    alphas = layer_alphas(spectra["eigs"], config.alpha_metric, config.alpha_reference_quirk, device)
    alloc = alpha_allocation(alphas, adapter, adapter.parameter_counts(net), config.sparsity, config.epsilon,
                             config.alpha_mapping, config.max_layer_sparsity)
    prefix = adapter.blocks_path + "."
    matrices = []
    for name, value in alphas.items():
        block, _, kind = name[len(prefix):].partition(".")
        matrices.append({"name": name, "block": int(block), "type": kind, "alpha": value})
    return {"model": model, "metric": config.alpha_metric, "sparsity": config.sparsity, "epsilon": config.epsilon,
            "mapping": config.alpha_mapping, "esd_seconds": spectra["seconds"], "esd_cached": spectra["cached"],
            "blocks": [{"block": b["block"], "mean_alpha": b["metric"], "sparsity": b["sparsity"]}
                       for b in alloc.blocks],
            "matrices": matrices}


def table(result: dict) -> str:
    lines = [f"{'block':>5}  {'mean alpha':>10}  {'sparsity':>8}"]
    lines += [f"{b['block']:>5}  {b['mean_alpha']:>10.3f}  {b['sparsity']:>8.4f}" for b in result["blocks"]]
    lines.append(f"ESD: {result['esd_seconds']:.1f} s{' (cached)' if result['esd_cached'] else ''}; "
                 f"target {result['sparsity']:g}, epsilon {result['epsilon']:g}, {result['metric']}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Two panels: alpha per matrix type across depth; allocated sparsity per block."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for kind in dict.fromkeys(m["type"] for m in result["matrices"]):
        pts = [(m["block"], m["alpha"]) for m in result["matrices"] if m["type"] == kind]
        top.plot(*zip(*pts), marker="o", ms=3, label=kind.split(".")[-1])
    blocks = [b["block"] for b in result["blocks"]]
    top.plot(blocks, [b["mean_alpha"] for b in result["blocks"]], color="black", lw=2, label="block mean")
    top.set_ylabel(f"alpha ({result['metric']})")
    top.legend(ncol=4, fontsize=8)
    top.set_title(f"{result['model']}: heavy-tailed spectra")
    bottom.bar(blocks, [b["sparsity"] for b in result["blocks"]], color="tab:red")
    bottom.axhline(result["sparsity"], color="black", ls="--", label=f"target {result['sparsity']:g}")
    bottom.set_ylabel("allocated sparsity")
    bottom.set_xlabel("block")
    bottom.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
