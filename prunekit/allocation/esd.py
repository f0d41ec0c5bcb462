"""Heavy-tailed spectrum metrics of a weight matrix (AlphaPruning, Lu et al. 2024).

The empirical spectral density (ESD) of W is the set of eigenvalues of the
correlation matrix, lambda = svdvals(W)^2. A well-trained layer has a heavy
tailed ESD, p(lambda) ~ lambda^-alpha for lambda >= xmin; a smaller alpha means
a heavier tail, i.e. a better trained layer, which AlphaPruning prunes less.

Pure functions on tensors: no modules, no I/O. Eigenvalues are computed on a
chosen device and precision and returned in float64 on the CPU; the fits run
in float64 on the device of their input.
"""

import contextlib
import os
import time
from collections import defaultdict

import torch

from ..config import ESD_METHODS as METHODS
from . import band as _band

_CHUNK = 1 << 22  # elements per (candidates x eigenvalues) block in the KS search

PRECISIONS = ("auto", "float64", "float32")
TWO_STAGE_MIN = 1024  # Gram size from which a GPU's float64 ESD goes two-stage (smaller ones: eigvalsh) ...
TWO_STAGE_MIN_COUNT = 8  # ... given this many such Grams at once (a batch of one is kernel-launch bound) ...
TWO_STAGE_MIN_THREADS = 16  # ... and this many host threads for LAPACK's band stage (it is host-bound: below)
TWO_STAGE_BATCH = 32  # Grams band-reduced at once (fewer kernel launches per matrix) ...
TWO_STAGE_BYTES = 1 << 32  # ... within this many bytes, and half the free GPU memory
TWO_STAGE_CHECK = 1e-9  # relative tolerance of the two-stage result's invariants (sum and sum of squares)


def resolve_precision(precision: str, metric: str = "alpha_peak") -> str:
    """The ESD precision, "float64" or "float32", for a requested one ("auto", "float64", "float32").

    "auto" is float64 for alpha_peak and float32 for alpha_mid, as measured by bench/bench_esd.py on
    SmolLM2-135M: float32 moved alpha_mid by < 1e-5 on every matrix, but alpha_peak by up to 2.7 on
    38 to 40 of 210 (even float32 svdvals, the reference's own path, moved it by 0.44 on 2 of 210 in
    one of two runs that differed only in thread count). alpha_peak takes xmin from the fullest of 100
    log10 bins spanning [lambda_min, lambda_max]; with a few hundred eigenvalues the top bins often tie
    or differ by one, so float32's relative error (~1e-5 for a well-conditioned Gram, garbage at
    lambda_min of a near-singular one) can move one eigenvalue, or every bin edge, across the tie and
    switch the fit. float64 (relative error <= 6e-7 there, at condition numbers up to 6e11) matched a
    float64 SVD to 1e-12 on every matrix.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown ESD precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "float32" if metric == "alpha_mid" else "float64"


def _gram(w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    # the smaller of W W^T and W^T W: both hold the min(rows, cols) values sigma_k^2
    return torch.matmul(w, w.mT, out=out) if w.shape[-2] <= w.shape[-1] else torch.matmul(w.mT, w, out=out)


@contextlib.contextmanager
def _ieee_float32():
    # TF32 (10-bit mantissa), if the caller enabled it, would wreck a float32 Gram matrix
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def working_bytes(shape: tuple[int, int], precision: str) -> int:
    """Device bytes one weight of `shape` takes while its eigenvalues are computed in `precision`:
    the weight, its Gram matrix and eigvalsh's copy of it."""
    rows, cols = shape
    return (rows * cols + 2 * min(rows, cols) ** 2) * torch.empty((), dtype=getattr(torch, precision)).element_size()


def esd_eigenvalues(weight: torch.Tensor, precision: str = "float64") -> torch.Tensor:
    """Eigenvalues lambda_k = sigma_k(W)^2 of a 2-D weight, ascending, float64, on the CPU.

    Computed as eigvalsh of the smaller Gram matrix (W W^T if rows <= cols,
    else W^T W), on the weight's device, in `precision` ("float64" or
    "float32"): both Grams have the min(rows, cols) eigenvalues sigma_k^2,
    and a symmetric eigensolve of the small side is far cheaper than an SVD.
    Round-off can give tiny negatives, clamped to 0.
    No normalisation and no zero filtering, like the reference.
    """
    if weight.dim() != 2:
        raise ValueError(f"esd_eigenvalues needs a 2-D weight, got shape {tuple(weight.shape)}")
    return esd_eigenvalues_batched([weight], precision, weight.device)[0]


def esd_method(method: str, precision: str, device: torch.device | str, sizes=()) -> str:
    """The eigensolver for a request: "eigvalsh" (one-stage, torch.linalg.eigvalsh: LAPACK or cuSOLVER)
    or "two_stage" (band.py: dense -> band on the device, band -> eigenvalues by LAPACK on the host).
    "auto" is two_stage for float64 on a GPU given >= TWO_STAGE_MIN_COUNT Gram matrices (`sizes`: one
    per weight) >= TWO_STAGE_MIN wide, >= TWO_STAGE_MIN_THREADS host threads and SciPy's LAPACK;
    eigvalsh otherwise. Measured on an H100 with 16 host cores (README, "AlphaPruning's ESD on the
    GPU"): LLaMA-7B's 224 Grams took 22.0 s two-stage against 26.7 s by cuSOLVER's eigvalsh, the band
    stage's LAPACK taking ~1.5 s a matrix a thread there, so with fewer host threads eigvalsh wins."""
    if method not in METHODS:
        raise ValueError(f"unknown ESD method {method!r}: choose one of {', '.join(METHODS)}")
    if method == "two_stage" and precision != "float64":
        raise ValueError("the two-stage ESD runs in float64: use precision float64, or method eigvalsh")
    if method != "auto":
        return method
    wide = sum(size >= TWO_STAGE_MIN for size in sizes) >= TWO_STAGE_MIN_COUNT
    cuda = torch.device(device).type == "cuda"
    threads = _host_threads() >= TWO_STAGE_MIN_THREADS
    return "two_stage" if cuda and precision == "float64" and wide and threads and _band.host_band_solver() \
        else "eigvalsh"


def esd_eigenvalues_batched(weights: list[torch.Tensor], precision: str = "float64",
                            device: torch.device | str = "cpu", max_bytes: int = 1 << 31,
                            streams: int = 1, method: str = "auto", band: int | None = None,
                            batch: int | None = None, timings: dict | None = None,
                            graph: bool = False) -> list[torch.Tensor]:
    """[esd_eigenvalues(w) for w in weights], computed on `device` a stack of equal shapes at a time.

    Weights of one shape (on any device, in any dtype) are copied one by one into a (b, rows, cols)
    buffer in `precision` ("float64" or "float32"), b chosen so that the buffer and its Grams stay
    under ~max_bytes; one batched matmul forms the b Grams and one batched eigvalsh solves them.
    float32 is accurate to ~eps32 * lambda_max, so lambda_i is off by ~6e-8 * lambda_max / lambda_i
    relative: resolve_precision says which alpha that is good enough for.
    `streams` > 1: that many stacks at once, each from its own thread on its own CUDA stream (on a
    GPU a large eigvalsh is a long chain of small kernels, latency more than arithmetic), each under
    max_bytes / streams; every eigenvalue is the one a single stream gives.
    method: "eigvalsh", "two_stage" or "auto" (esd_method); two_stage takes `band` (the half-bandwidth,
    default band.BAND), `batch` (Grams at once, default from TWO_STAGE_BATCH and TWO_STAGE_BYTES) and
    `timings` (a dict it fills with where its seconds went) and `graph` (on CUDA, replay the band
    reduction from a CUDA graph, band.BandReduceGraph); max_bytes and streams are eigvalsh's.
    Returns float64 CPU eigenvalues, ascending, clamped at 0, in the order of `weights`.
    """
    if precision not in ("float64", "float32"):
        raise ValueError(f"ESD precision must be float64 or float32, got {precision!r} (see resolve_precision)")
    dtype = getattr(torch, precision)
    by_shape = defaultdict(list)
    for i, w in enumerate(weights):
        if w.dim() != 2:
            raise ValueError(f"esd_eigenvalues needs 2-D weights, got shape {tuple(w.shape)}")
        by_shape[tuple(w.shape)].append(i)
    out = [None] * len(weights)
    if esd_method(method, precision, device, [min(w.shape) for w in weights]) == "two_stage":
        _two_stage(weights, torch.device(device), out, band, batch, timings, graph)
        return out
    streams = max(1, streams)
    parts = []
    for (rows, cols), idx in by_shape.items():
        step = max(1, max_bytes // streams // working_bytes((rows, cols), precision))
        parts += [(rows, cols, idx[s:s + step]) for s in range(0, len(idx), step)]

    def solve(rows, cols, part):
        stack = torch.empty((len(part), rows, cols), dtype=dtype, device=device)
        for b, i in enumerate(part):
            # one weight at a time, so a CPU model never sits whole on the device; moved in its own
            # dtype and converted there (a blocking copy_ would convert on the CPU and ship 2-4x the bytes)
            stack[b].copy_(weights[i].detach().to(device))
        gram = _gram(stack)
        del stack
        eigs = torch.linalg.eigvalsh(gram).clamp_min_(0.0).to("cpu", torch.float64)  # ascending
        del gram
        for i, e in zip(part, eigs):
            out[i] = e.clone()  # own storage, so a cached spectrum does not drag its batch along

    with _ieee_float32():
        if streams == 1 or len(parts) == 1:
            for part in parts:
                solve(*part)
        else:
            _solve_concurrently(solve, parts, streams, torch.device(device))
    return out


def _host_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _two_stage(weights: list[torch.Tensor], device: torch.device, out: list, band: int | None,
               batch: int | None, timings: dict | None, graph: bool = False) -> None:
    """esd_eigenvalues_batched's two-stage path: Grams of one size, `batch` at a time, are formed and
    band-reduced on `device` (band.band_reduce, float64); each batch's bands (n x (b+1) numbers a matrix)
    come to the host, where a pool of threads, one per core, runs LAPACK dsbev on them while the device
    reduces the next batch (one core is left to the thread that launches the device's kernels).
    Each result is checked against two invariants of its Gram matrix G, sum(lambda) = trace(G) and
    sum(lambda^2) = ||G||_F^2, to TWO_STAGE_CHECK relative; one that fails (or is not finite) is
    recomputed by eigvalsh, and `timings["fallbacks"]` counts them.
    graph (CUDA): a batch shape that recurs is band-reduced by replaying one CUDA graph of it
    (band.BandReduceGraph), the Grams formed straight into the graph's input; a shape seen once, or a
    capture that fails (`timings["graph"]` says why), runs eagerly."""
    from concurrent.futures import ThreadPoolExecutor

    by_size = defaultdict(list)
    for i, w in enumerate(weights):
        by_size[min(w.shape)].append(i)
    budget = TWO_STAGE_BYTES
    if device.type == "cuda":
        budget = min(budget, torch.cuda.mem_get_info(device)[0] // 2)
    start, device_seconds, batches = time.perf_counter(), 0.0, []
    threads = max(1, _host_threads() - (device.type == "cuda"))
    futures, invariants, fallbacks = {}, {}, []
    plan = [(n, idx[s:s + step]) for n, idx in by_size.items()
            for step in [batch or max(1, min(TWO_STAGE_BATCH, budget // (n * n * 8)))]
            for s in range(0, len(idx), step)]
    shapes = defaultdict(int)
    for n, part in plan:
        shapes[len(part), n] += 1
    graphs, graph_note, capture_seconds = {}, "on" if graph and device.type == "cuda" else "off", 0.0
    with ThreadPoolExecutor(threads, thread_name_prefix="prunekit-band") as pool:
        for n, part in plan:
            batches.append(len(part))
            t = time.perf_counter()
            replay = None
            if graph_note == "on" and shapes[len(part), n] > 1:
                replay = graphs.get((len(part), n))
                if replay is None:
                    try:
                        replay = graphs[len(part), n] = _band.BandReduceGraph(len(part), n, band, device)
                    except RuntimeError as exc:  # a capture the driver refuses: eager from here on
                        graph_note = f"eager: the capture failed ({str(exc).splitlines()[0]})"
                    capture_seconds += time.perf_counter() - t
            grams = replay.grams if replay is not None else \
                torch.empty((len(part), n, n), dtype=torch.float64, device=device)
            for b, i in enumerate(part):
                _gram(weights[i].detach().to(device).to(torch.float64), out=grams[b])
            # the invariants, before band_reduce overwrites the Grams: trace and squared Frobenius norm
            norms = torch.stack([torch.diagonal(grams, dim1=1, dim2=2).sum(-1),
                                 torch.linalg.vector_norm(grams, dim=(1, 2)).square()], 1)
            # .cpu() waits for this batch; the pool works on the last one meanwhile
            bands = (replay() if replay is not None else _band.band_reduce(grams, band)).cpu()
            del grams
            norms = norms.cpu()
            device_seconds += time.perf_counter() - t
            for b, i in enumerate(part):
                invariants[i] = norms[b]
                futures[i] = pool.submit(_band.band_eigvalsh, bands[b])
        graphs.clear()  # the graphs' memory pools go with them
        waited = time.perf_counter()
        for i, future in futures.items():
            eigs = future.result()
            if not _invariants_hold(eigs, invariants[i]):
                fallbacks.append(i)
                eigs = esd_eigenvalues_batched([weights[i]], "float64", device, method="eigvalsh")[0]
            out[i] = eigs.clamp_min_(0.0)
    if timings is not None:
        timings.update(device_seconds=device_seconds, host_tail_seconds=time.perf_counter() - waited,
                       seconds=time.perf_counter() - start, host_threads=threads, batches=batches,
                       band=_band.BAND if band is None else band, fallbacks=len(fallbacks), graph=graph_note,
                       graph_capture_seconds=capture_seconds)


def _invariants_hold(eigs: torch.Tensor, norms: torch.Tensor) -> bool:
    """sum(eigs) = trace and sum(eigs^2) = squared Frobenius norm (norms = [trace, fro^2]) of the matrix
    they came from, to TWO_STAGE_CHECK relative to ||G||_F (trace may be ~0 for an indefinite matrix)."""
    trace, fro2 = norms.tolist()
    scale = max(fro2, torch.finfo(torch.float64).tiny) ** 0.5
    if not torch.isfinite(eigs).all():
        return False
    ok_sum = abs(eigs.sum().item() - trace) <= TWO_STAGE_CHECK * scale * eigs.numel() ** 0.5
    ok_squares = abs(eigs.square().sum().item() - fro2) <= TWO_STAGE_CHECK * fro2
    return ok_sum and ok_squares


def _solve_concurrently(solve, parts: list, streams: int, device: torch.device) -> None:
    """solve(*part) for every part from `streams` threads, thread k taking parts k, k + streams, ...
    on a CUDA stream of its own (on the CPU, plain threads)."""
    from concurrent.futures import ThreadPoolExecutor

    def run(k):
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for part in parts[k::streams]:
                solve(*part)

    if device.type == "cuda":
        # torch loads its CUDA linear algebra library on the first call, and that load is not
        # thread-safe ("lazy wrapper should be called at most once" from the second thread, seen on
        # an H100): load it here, on one thread, first
        torch.linalg.eigvalsh(torch.eye(2, device=device))
    with ThreadPoolExecutor(streams, thread_name_prefix="prunekit-esd") as pool:
        for future in [pool.submit(run, k) for k in range(streams)]:
            future.result()


def _prep(eigs: torch.Tensor) -> torch.Tensor:
    # 1-D, float64, ascending: every fit below indexes the sorted spectrum
    return torch.sort(eigs.detach().flatten().to(torch.float64)).values


def _fit_many(eigs: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hill alpha and KS distance D for every xmin index in idx, vectorised.

    Suffix sums give all the alphas at once; D needs a (candidates x N) table,
    built in chunks so memory stays bounded for big spectra.
    """
    N = eigs.numel()
    log = eigs.log()
    suffix = log.flip(0).cumsum(0).flip(0)  # suffix[i] = sum_{k>=i} ln lambda_k
    n = (N - idx).to(torch.float64)
    alpha = 1 + n / (suffix[idx] - n * log[idx])
    k = torch.arange(N, device=eigs.device)
    D = torch.empty_like(alpha)
    step = max(1, _CHUNK // N)
    first = idx.cummin(0).values.flip(0).cummin(0).values.flip(0).tolist()  # first[s] = min(idx[s:]), one host copy
    for s in range(0, idx.numel(), step):
        i, a, ni = idx[s:s + step, None], alpha[s:s + step, None], n[s:s + step, None]
        lo = first[s]  # no candidate of this chunk has a tail below lo: those columns are left out
        # model CDF 1 - (lambda_k / xmin)^(1 - alpha) vs empirical CDF (k - i) / n, tail k >= i only;
        # in place, each entry by the same operations as out of place
        cdf = torch.sub(1, (log[None, lo:] - log[i]).mul_(1 - a).exp_())
        tail = k[None, lo:]
        gap = cdf.sub_((tail - i) / ni).abs_()
        D[s:s + step] = gap.masked_fill_(tail < i, 0.0).amax(dim=1)
    return alpha, D


def hill_fit(eigs: torch.Tensor, i: int) -> tuple[float, float]:
    """Power-law fit of the tail of an ascending spectrum, with xmin = lambda_i.

    With n = N - i (the tail lambda_i..lambda_{N-1}):
        alpha = 1 + n / (sum_{k>=i} ln lambda_k - n ln lambda_i)      (Hill / MLE)
        D     = max_{k=0..n-1} | 1 - (lambda_{i+k} / xmin)^(1 - alpha) - k / n |
    D is the Kolmogorov-Smirnov distance between the fitted and empirical CDF.
    The tail must be positive. Returns (alpha, D) as Python floats.
    """
    eigs = _prep(eigs)
    N = eigs.numel()
    if not 0 <= i < N:
        raise ValueError(f"xmin index {i} out of range for {N} eigenvalues")
    alpha, D = _fit_many(eigs, torch.tensor([i], device=eigs.device))
    return alpha.item(), D.item()


def alpha_mid(eigs: torch.Tensor) -> float:
    """alpha from a single Hill fit with xmin at the median: i = N // 2 (reference 'xmin_mid')."""
    eigs = _prep(eigs)
    return hill_fit(eigs, eigs.numel() // 2)[0]


def alpha_peak(eigs: torch.Tensor, reference_quirk: bool = False) -> float:
    """alpha of the best power-law fit with xmin near the peak of the ESD (reference 'xmin_peak').

    1. Histogram log10 lambda in 100 equal bins on [min, max] (the top value
       goes in the last bin, like torch.histc); the fullest bin (first one on
       ties) has left edge e, and xmin2 = 10^e.
    2. Candidates: every index i <= N - 2 (the fit needs >= 2 points) with
       0.95 * xmin2 <= lambda_i <= 1.5 * xmin2.
    3. hill_fit at each candidate; among fits with a finite alpha > 1, return
       the alpha with the smallest KS distance D (first one on ties).

    reference_quirk=True reproduces haiquanlu/AlphaPruning lib/esd_utils.py,
    whose lower bound is `xmin_min = log10(0.95 * xmin2)`, compared directly
    with lambda (a log-space number against a linear one). Since
    log10(y) < y for every y > 0 this only ever widens the window, to
    [log10(0.95 * xmin2), 1.5 * xmin2]; when xmin2 < 1/0.95 the bound is
    negative and the search starts at the smallest eigenvalue. The upper bound
    1.5 * xmin2 is right in the reference and kept in both modes.

    Deviations from the reference, for robustness:
      * non-positive eigenvalues (exact rank deficiency, or round-off clamped
        to 0) are dropped first: log lambda is undefined for them and the
        reference's histogram would get -inf. A no-op for full-rank weights.
      * if no candidate gives a finite alpha > 1 (empty window, or a flat
        tail), the window is widened to every i <= N - 2, which is the
        reference's unrestricted search (fix_fingers=None); the reference
        would instead return alpha = 0 here (its untouched buffer).
      * fewer than 2 distinct positive eigenvalues cannot be fitted at all:
        ValueError.
    """
    eigs = _prep(eigs)
    eigs = eigs[eigs > 0]
    N = eigs.numel()
    if N < 2 or eigs[0] == eigs[-1]:
        raise ValueError("alpha_peak needs at least 2 distinct positive eigenvalues")

    bins = 100
    x = eigs.log10()
    lo, hi = x[0], x[-1]
    span = (hi - lo).clamp_min(torch.finfo(torch.float64).tiny)  # log10 may merge 1-ulp-apart values
    which = ((x - lo) / span * bins).floor().long().clamp_(0, bins - 1)
    counts = torch.bincount(which, minlength=bins)
    edge = torch.linspace(lo.item(), hi.item(), bins + 1, dtype=torch.float64, device=eigs.device)
    xmin2 = 10 ** edge[counts.argmax()]  # argmax returns the first maximum

    lower = torch.log10(0.95 * xmin2) if reference_quirk else 0.95 * xmin2
    upper = 1.5 * xmin2
    cand = eigs[:-1]  # the largest eigenvalue alone is no tail
    idx = torch.nonzero((cand >= lower) & (cand <= upper)).flatten()

    for window in (idx, torch.arange(N - 1, device=eigs.device)):
        if window.numel() == 0:
            continue
        alpha, D = _fit_many(eigs, window)
        ok = torch.isfinite(alpha) & (alpha > 1)
        if ok.any():
            return alpha[ok][D[ok].argmin()].item()
    raise AssertionError("unreachable: i = 0 always fits when eigenvalues are not all equal")


ALPHA_METRICS = {"alpha_peak": alpha_peak, "alpha_mid": alpha_mid}
