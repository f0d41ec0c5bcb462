"""AlphaPruning (Lu et al., NeurIPS 2024): per-layer sparsity from the heavy-tailed shape of each
weight matrix's eigenvalue spectrum. Well-trained layers (heavy tail, small alpha) are pruned less.

Eigenvalues are cached on disk per model (key: hash of the weights), so a sweep computes them once.
"""
from __future__ import annotations

import hashlib
import os
import time

import torch

from ..errors import PrunekitError
from . import Allocation, register_allocator
from .esd import ALPHA_METRICS, esd_eigenvalues
from .mapping import alpha_ratios, scale_to_target


def cache_dir() -> str:
    return os.environ.get("PRUNEKIT_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "prunekit"))


def weights_key(named_weights: list[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, w in named_weights:
        h.update(f"{name}:{tuple(w.shape)}:{w.dtype}".encode())
        h.update(w.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def block_weights(model, adapter) -> list[tuple[str, torch.Tensor]]:
    return [(f"{adapter.blocks_path}.{i}.{name}", adapter.weight(module))
            for i, block in enumerate(adapter.blocks(model))
            for name, module in adapter.block_linears(block).items()]


def model_spectra(model, adapter, device: torch.device | str = "cpu", use_cache: bool = True) -> dict:
    """Eigenvalues (ascending, float64, CPU) of every prunable weight, {full name: tensor}, and the
    seconds spent computing them (0 on a cache hit)."""
    weights = block_weights(model, adapter)
    path = os.path.join(cache_dir(), "esd", f"{weights_key(weights)}.pt") if use_cache else None
    if path and os.path.exists(path):
        return {"eigs": torch.load(path), "seconds": 0.0, "cached": True}
    start = time.perf_counter()
    eigs = {name: esd_eigenvalues(w.to(device)).cpu() for name, w in weights}
    seconds = time.perf_counter() - start
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(eigs, tmp)
        os.replace(tmp, path)
    return {"eigs": eigs, "seconds": seconds, "cached": False}


def layer_alphas(eigs: dict, metric: str = "alpha_peak", reference_quirk: bool = False) -> dict[str, float]:
    if metric not in ALPHA_METRICS:
        raise PrunekitError(f"unknown alpha metric {metric!r}: choose one of {', '.join(ALPHA_METRICS)}")
    fn = ALPHA_METRICS[metric]
    kwargs = {"reference_quirk": reference_quirk} if metric == "alpha_peak" else {}
    return {name: fn(e, **kwargs) for name, e in eigs.items()}


def alpha_allocation(alphas: dict[str, float], adapter, params: list[dict[str, int]], target: float,
                     epsilon: float, mapping: str = "block_wise", max_sparsity: float = 0.99) -> Allocation:
    """Map per-matrix alphas to per-layer sparsities.

    block_wise: every matrix of a block takes the block's mean alpha. Then
        r_l = (m_l - min m)/(max m - min m) * 2 eps + (1 - eps),  s_l = r_l * S * sum P / sum(P r),
    clipped to [0, max_sparsity] with the excess redistributed (the reference leaves s_l > 1).
    """
    nblocks = len(params)
    names = [(i, n) for i in range(nblocks) for n in adapter.linears]
    full = {(i, n): f"{adapter.blocks_path}.{i}.{n}" for i, n in names}
    block_alpha = [sum(alphas[full[i, n]] for n in adapter.linears) / len(adapter.linears) for i in range(nblocks)]
    if mapping == "block_wise":
        metrics = [block_alpha[i] for i, _ in names]
    elif mapping == "layer_wise":
        metrics = [alphas[full[key]] for key in names]
    else:
        raise PrunekitError(f"unknown alpha mapping {mapping!r}: choose block_wise or layer_wise")
    counts = [params[i][n] for i, n in names]
    try:
        s = scale_to_target(alpha_ratios(metrics, epsilon), counts, target, max_sparsity)
    except ValueError as exc:
        raise PrunekitError(f"AlphaPruning allocation failed: {exc}") from None
    sparsity = [dict() for _ in range(nblocks)]
    for (i, n), value in zip(names, s):
        sparsity[i][n] = value
    blocks = [{"block": i, "metric": block_alpha[i],
               "sparsity": sum(sparsity[i][n] * params[i][n] for n in adapter.linears) / sum(params[i].values())}
              for i in range(nblocks)]
    return Allocation(sparsity, blocks=blocks)


@register_allocator("alpha")
def alpha(ctx) -> Allocation:
    config = ctx.config
    spectra = model_spectra(ctx.model, ctx.adapter, ctx.compute.device)
    alphas = layer_alphas(spectra["eigs"], config.alpha_metric, config.alpha_reference_quirk)
    result = alpha_allocation(alphas, ctx.adapter, ctx.parameter_counts(), config.sparsity, config.epsilon,
                              config.alpha_mapping, config.max_layer_sparsity)
    result.info = {"esd_seconds": spectra["seconds"], "esd_cached": spectra["cached"], "alphas": alphas}
    return result
