"""AlphaPruning (Lu et al., NeurIPS 2024): per-layer sparsity from the heavy-tailed shape of each
weight matrix's eigenvalue spectrum. Well-trained layers (heavy tail, small alpha) are pruned less.

Eigenvalues are cached on disk per model (key: a fingerprint of the weights and the ESD precision), so a
sweep computes them once.
"""
from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import PrunekitError
from . import Allocation, register_allocator
from .esd import ALPHA_METRICS, esd_eigenvalues_batched, resolve_precision, working_bytes
from .mapping import alpha_ratios, scale_to_target

_FINGERPRINT_CHUNK = {"cpu": 1 << 18, "cuda": 1 << 22}  # float64 elements per block (2 MiB on a CPU)


def cache_dir() -> str:
    return os.environ.get("PRUNEKIT_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "prunekit"))


def _signs(n: int, device) -> torch.Tensor:
    # a fixed pseudo-random +-1 pattern, built on the device (no host copy): top bit of Knuth's
    # multiplicative hash k * 2654435761 mod 2^32
    k = torch.arange(n, device=device, dtype=torch.int64)
    return 1.0 - 2.0 * (((k * 2654435761) & 0xFFFFFFFF) >> 31).to(torch.float64)


def weight_fingerprint(w: torch.Tensor) -> torch.Tensor:
    """Four float64 numbers summarising W, computed on W's device. With f = i * cols + j the row-major
    index of W_ij and sigma_f a fixed pseudo-random +-1 pattern:

        [ sum_f W_f,  sum_f W_f^2,  sum_f sigma_f W_f,  sum_f f W_f ]

    W is read once, in blocks of whole rows copied into one float64 buffer (no allocation per block).
    Per block three calls: the copy, one (3 x n) @ n product against [1, sigma, local index] and one dot,
    written into a (blocks x 4) table that is combined once at the end. sigma_f is s(f mod n) s(f div n)
    for the block length n, so one probe serves every block. Few calls per block matter: weights_key
    runs one matrix per thread, and each call releases and retakes the GIL. With 15 calls per block of
    64 Ki elements, the key of 2 blocks of a 7B model took 2.05 s on a 16-core GPU host
    (bench/results/gpu/esd_cuda.json), 6 times this project's 2-core CPU (0.35 s).
    """
    w = w.detach().reshape(len(w), -1)
    rows, cols = w.shape
    step = max(1, _FINGERPRINT_CHUNK.get(w.device.type, 1 << 22) // cols)
    n = min(step, rows) * cols
    probe = torch.stack([torch.ones(n, dtype=torch.float64, device=w.device), _signs(n, w.device),
                         torch.arange(n, dtype=torch.float64, device=w.device)])
    buf = torch.empty(min(step, rows), cols, dtype=torch.float64, device=w.device)
    flat = buf.view(-1)
    blocks = w.split(step)
    table = torch.empty(len(blocks), 4, dtype=torch.float64, device=w.device)
    products, squares = table[:, :3].unbind(0), table[:, 3].unbind(0)
    for x, p, q in zip(blocks, products, squares):
        if len(x) < len(buf):  # the last block, shorter
            part = buf[:len(x)].copy_(x).view(-1)
            torch.mv(probe[:, :part.numel()], part, out=p)
            torch.dot(part, part, out=q)
        else:
            buf.copy_(x)
            torch.mv(probe, flat, out=p)
            torch.dot(flat, flat, out=q)
    # block b starts at f = b * n: sum_f f W_f = sum_b (b n p0_b + p2_b); sigma = s(local) s(b)
    first = torch.arange(len(blocks), dtype=torch.float64, device=w.device) * n
    return torch.stack([table[:, 0].sum(), table[:, 3].sum(), (_signs(len(blocks), w.device) * table[:, 1]).sum(),
                        (first * table[:, 0] + table[:, 2]).sum()])


def weights_key(named_weights: list[tuple[str, torch.Tensor]], extra: str = "", device=None) -> str:
    """Cache key of a list of named weights: blake2b of `extra` and every name, shape, dtype and fingerprint.

    The fingerprints are computed where the weights live, or on `device` when that is an accelerator
    (host weights are then copied up one at a time, as the ESD copies them: a 7B model's 13 GB take
    about 0.7 s at the 18 GB/s the issue measured for pageable copies on an H100), and reach the host
    in one copy of 4 float64 per matrix: the key costs one read of the weights and no byte hashing.
    Why collisions are not a practical concern: a changed model keeps the key only if, in every matrix,
    the sum, the sum of squares, a +-1-weighted sum and an index-weighted sum all come out bit-identical
    in float64. Changing one element from w to w + d moves the sum by d and the sum of squares by
    2 w d + d^2, which float64 resolves unless d is ~1e-16 of the matrix's scale (and then the spectrum
    moves by less than float64 round-off too); swapping two different values moves the index-weighted
    sum; any other set of changes must cancel in all four at once, one of them weighted by a sign
    pattern the changes know nothing of. Pruning, fine-tuning or loading another checkpoint does not do that
    by accident (the key is not meant to resist a forged collision). Float64 sums are bit-exact only
    for the same kind of device and BLAS, so the same weights elsewhere may miss the cache: a
    recomputation, never a wrong hit.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(extra.encode())
    if not named_weights:
        return h.hexdigest()
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cpu":  # on the accelerator, from this thread: its kernels are async
        prints = [weight_fingerprint(w.to(device)) for _, w in named_weights]
    else:
        # matrices in parallel, each on one thread: a block's ops are too small to split, and on a busy
        # machine each split op can wait for a descheduled worker (2-core box: 2 s instead of 10 ms for
        # 1 M weights). It also makes every sum's order, so the key, independent of the thread count.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(threads) as pool:
                prints = list(pool.map(weight_fingerprint, [w for _, w in named_weights]))
        finally:
            torch.set_num_threads(threads)
    values = torch.stack([p.to(prints[0].device) for p in prints]).cpu()  # the one host sync
    for (name, w), v in zip(named_weights, values):
        h.update(f"{name}:{tuple(w.shape)}:{w.dtype}:".encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()


CUDA_ESD_STREAMS = 4  # eigensolves in flight at once on a GPU (bench/bench_esd.py --streams compares)


def esd_streams(weights: list[tuple[str, torch.Tensor]], device, precision: str, free: int | None = None) -> int:
    """How many eigensolves to keep in flight: CUDA_ESD_STREAMS on a GPU, fewer where half the free
    GPU memory (`free`, default torch.cuda.mem_get_info) does not hold that many of the largest
    matrix's working set (esd.working_bytes); 1 on the CPU, whose LAPACK already uses every core
    for one."""
    if torch.device(device).type != "cuda" or not weights:
        return 1
    if free is None:
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    need = max(working_bytes(tuple(w.shape), precision) for _, w in weights)
    return max(1, min(CUDA_ESD_STREAMS, free // 2 // need))


def block_weights(model, adapter) -> list[tuple[str, torch.Tensor]]:
    return [(f"{adapter.blocks_path}.{i}.{name}", adapter.weight(module))
            for i, block in enumerate(adapter.blocks(model))
            for name, module in adapter.block_linears(block).items()]


def model_spectra(model, adapter, device: torch.device | str = "cpu", use_cache: bool = True,
                  precision: str = "float64", lazy_weights=None, lazy_key: str | None = None,
                  streams: int | None = None, method: str = "auto", band: int | None = None,
                  batch: int | None = None, graph: bool = False) -> dict:
    """Eigenvalues (ascending, float64, CPU) of every prunable weight, {full name: tensor}, the seconds
    spent computing them (0 on a cache hit) and the seconds spent on the cache key.
    precision: "float64" or "float32" (esd_precision picks one from PruneConfig.esd_dtype).
    lazy_weights: a callable yielding (name, weight) one at a time (blocks on disk), with `lazy_key`
    identifying the checkpoint; the weights are then read, and eigen-solved, one by one.
    streams: eigensolves at once (esd_eigenvalues_batched); default esd_streams().
    method: the eigensolver (esd.esd_method): "auto", "eigvalsh" or "two_stage"; band, batch: the two-stage
    path's half-width and Grams at once (esd_eigenvalues_batched; None: its defaults); graph: its band
    reduction replayed from a CUDA graph (on CUDA)."""
    precision = esd_precision(precision, "alpha_peak")  # validated before any work; "auto" -> float64
    weights = None if lazy_weights is not None else block_weights(model, adapter)
    start = time.perf_counter()
    key = f"{lazy_key}-{precision}" if lazy_weights is not None else weights_key(weights, f"esd:{precision}", device)
    path = os.path.join(cache_dir(), "esd", f"{key}.pt") if use_cache else None
    key_seconds = time.perf_counter() - start
    if path and os.path.exists(path):
        return {"eigs": torch.load(path), "seconds": 0.0, "cached": True, "key_seconds": key_seconds, "timings": {}}
    start = time.perf_counter()
    if streams is None and weights is not None:
        streams = esd_streams(weights, device, precision)
    timings = {}  # the two-stage ESD's own account (esd._two_stage)
    if weights is not None:
        eigs = dict(zip([name for name, _ in weights],
                        esd_eigenvalues_batched([w for _, w in weights], precision, device, streams=streams,
                                                method=method, band=band, batch=batch, timings=timings,
                                                graph=graph)))
    else:
        eigs = {name: esd_eigenvalues_batched([w], precision, device, method=method, band=band)[0]
                for name, w in lazy_weights()}
    seconds = time.perf_counter() - start
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(eigs, tmp)
        os.replace(tmp, path)
    return {"eigs": eigs, "seconds": seconds, "cached": False, "key_seconds": key_seconds, "timings": timings}


def esd_options(config) -> dict:
    """model_spectra's eigensolver keywords from a PruneConfig: --esd-method, --esd-band, --esd-batch,
    --esd-graph."""
    return {"method": getattr(config, "esd_method", "auto"), "band": getattr(config, "esd_band", None),
            "batch": getattr(config, "esd_batch", 0) or None, "graph": getattr(config, "esd_graph", False)}


def esd_precision(esd_dtype: str, metric: str) -> str:
    """PruneConfig.esd_dtype ("auto", "float64" or "float32") -> the precision model_spectra uses."""
    try:
        return resolve_precision(esd_dtype, metric)
    except ValueError as exc:
        raise PrunekitError(str(exc)) from None


def layer_alphas(eigs: dict, metric: str = "alpha_peak", reference_quirk: bool = False,
                 device: torch.device | str | None = None) -> dict[str, float]:
    """{name: alpha} of every spectrum, fitted in float64 on `device` (default: where the spectra are).
    On a GPU the fits take milliseconds where the host's take tens (alpha_peak's KS search is a
    candidates x eigenvalues table per matrix); the same float64 operations either way."""
    if metric not in ALPHA_METRICS:
        raise PrunekitError(f"unknown alpha metric {metric!r}: choose one of {', '.join(ALPHA_METRICS)}")
    fn = ALPHA_METRICS[metric]
    kwargs = {"reference_quirk": reference_quirk} if metric == "alpha_peak" else {}
    return {name: fn(e if device is None else e.to(device), **kwargs) for name, e in eigs.items()}


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
    lazy = getattr(ctx, "lazy_weights", lambda: None)()  # blocks on disk: (weights, checkpoint key)
    spectra = model_spectra(ctx.model, ctx.adapter, ctx.compute.device,
                            precision=esd_precision(getattr(config, "esd_dtype", "auto"), config.alpha_metric),
                            lazy_weights=lazy[0] if lazy else None, lazy_key=lazy[1] if lazy else None,
                            **esd_options(config))
    start = time.perf_counter()
    alphas = layer_alphas(spectra["eigs"], config.alpha_metric, config.alpha_reference_quirk, ctx.compute.device)
    fit_seconds = time.perf_counter() - start
    result = alpha_allocation(alphas, ctx.adapter, ctx.parameter_counts(), config.sparsity, config.epsilon,
                              config.alpha_mapping, config.max_layer_sparsity)
    result.info = {"esd_seconds": spectra["seconds"], "esd_key_seconds": spectra["key_seconds"],
                   "alpha_fit_seconds": fit_seconds, "esd_timings": spectra["timings"],
                   "esd_cached": spectra["cached"], "alphas": alphas}
    return result
