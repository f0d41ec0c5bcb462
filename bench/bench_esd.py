"""AlphaPruning's ESD: accuracy and time of each eigenvalue precision, and the cost of the cache key.

For every precision: the largest |delta alpha| against float64 over all matrices (alpha_peak and
alpha_mid), how many matrices move by more than 1e-3, which metric esd_dtype="auto" gives that
precision to, the ESD seconds (esd_eigenvalues_batched) and the cache-key seconds (weights_key),
next to the old key (blake2b of every weight byte, after a host copy). Prints a markdown table and
writes bench/results/esd.json. On a shared CPU, OMP_NUM_THREADS=1 gives steadier timings.

    python bench/bench_esd.py                                  # SmolLM2-135M on the CPU
    python bench/bench_esd.py --random 7b --layers 2 --device cuda   # LLaMA-7B-shaped random weights
    python bench/bench_esd.py --random small --layers 2        # the same on a CPU, small shapes
    python bench/bench_esd.py --random 7b --layers 2 --device cuda --streams 1 2 4   # eigensolves at once
    python bench/bench_esd.py --random 7b --layers 4 --device cuda --bands 8 16 32   # the two-stage ESD
    python bench/bench_esd.py --random 7b --layers 1 --host-floor --bands 16 8 --key-only  # its host half alone
    python bench/bench_esd.py --random 7b --layers 4 --device cuda --bands 8 --batch 7 --graph  # and CUDA graphs

Every row but the two-stage ones is torch.linalg.eigvalsh (method "eigvalsh"); the reference is float64
eigvalsh on --device.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import markdown, meta, write_results  # noqa: E402

from prunekit.allocation.alpha import block_weights, weights_key  # noqa: E402
from prunekit.allocation.esd import alpha_mid, alpha_peak, esd_eigenvalues_batched, resolve_precision  # noqa: E402

# hidden, intermediate, k/v output size of LLaMA-shaped blocks
SHAPES = {"7b": (4096, 11008, 4096), "13b": (5120, 13824, 5120), "small": (256, 688, 64),
          "tiny": (256, 688, 256)}  # tiny: bench_gpu.py's tiny shape, for dry runs of bench/gpu_session.sh
COLUMNS = [("precision", "precision", ""), ("max_dpeak", "max abs d alpha_peak", ".2e"),
           ("max_dmid", "max abs d alpha_mid", ".2e"), ("over_1e3", "matrices > 1e-3", "d"),
           ("auto_for", "auto for", ""), ("esd_seconds", "ESD s", ".2f"),
           ("key_seconds", "key s", ".3f")]


def random_weights(preset: str, layers: int, dtype: torch.dtype, device: str, where: str, seed: int = 0):
    """LLaMA-shaped Gaussian weights (std 1/sqrt(fan_in)), generated on `device`, kept on `where`."""
    hidden, inter, kv = SHAPES[preset]
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
              "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    g = torch.Generator(device=device).manual_seed(seed)
    return [(f"model.layers.{i}.{name}",
             (torch.randn(shape, generator=g, device=device) / shape[1] ** 0.5).to(where, dtype))
            for i in range(layers) for name, shape in shapes.items()]


def byte_key(named_weights) -> str:
    """The old cache key: every weight byte through blake2b after a host copy."""
    h = hashlib.blake2b(digest_size=16)
    for name, w in named_weights:
        h.update(f"{name}:{tuple(w.shape)}:{w.dtype}".encode())
        h.update(w.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)  # every timed function ends in a host copy, so the device is synchronised
    return out, time.perf_counter() - start


def svd_eigenvalues(weights, device) -> list[torch.Tensor]:
    """float32 svdvals(W)^2, one matrix at a time: how the reference computes its spectra."""
    return [(torch.linalg.svdvals(w.to(device, torch.float32)).double().flip(0) ** 2).cpu() for w in weights]


def launch_probe(device, ops: int = 2000, panels: int = 4, batch: int = 32, rows: int = 4096, band: int = 16) -> dict:
    """Microseconds a small op costs (an in-place add on a (batch, rows) tensor, `ops` times, then one
    synchronisation), and a band-reduction panel's column (`panels` Householder panels of `band`
    columns on a (batch, rows, band) panel): where the two-stage ESD's device time goes."""
    from prunekit.allocation.band import _householder_panel
    from prunekit.execution.precision import synchronize

    device = torch.device(device)
    x = torch.zeros(batch, rows, dtype=torch.float64, device=device)
    panel = torch.randn(batch, rows, band, dtype=torch.float64, device=device)
    out = {}
    for name, fn, calls, per_call in (("small op us", lambda: x.add_(1.0), ops, 1),
                                      ("panel column us", lambda: _householder_panel(panel.clone(), band), panels, band)):
        fn()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        out[name] = (time.perf_counter() - start) / (calls * per_call) * 1e6
    return out


def host_floor(weight: torch.Tensor, device, bands: list[int]) -> dict:
    """The two-stage ESD's host half, alone: one Gram of `weight` band-reduced on `device` at each b, then
    as many concurrent LAPACK dsbev calls on its band as the ESD runs host threads (all busy, as they are
    in a prune); seconds per round = per matrix per thread. b = 1 is a tridiagonal matrix: dsbev is then
    dsterf, the eigenvalues alone, the floor any band width pays. The host half of a model's ESD is about
    matrices x (seconds per round) / threads."""
    from concurrent.futures import ThreadPoolExecutor

    from prunekit.allocation import band as _band
    from prunekit.allocation.esd import _gram, _host_threads

    device = torch.device(device)
    threads = max(1, _host_threads() - (device.type == "cuda"))
    gram = _gram(weight.detach().to(device).to(torch.float64))
    rounds = {}
    with ThreadPoolExecutor(threads) as pool:
        for b in sorted({1, *bands}):
            band = _band.band_reduce(gram.clone()[None], b)[0].cpu()
            list(pool.map(_band.band_eigvalsh, [band] * threads))  # warm: every thread's first call
            start = time.perf_counter()
            list(pool.map(_band.band_eigvalsh, [band] * threads))
            rounds[b] = time.perf_counter() - start
    return {"threads": threads, "n": gram.shape[0], "seconds_per_round": rounds}


def alphas(eigs: list[torch.Tensor], device="cpu") -> torch.Tensor:
    return torch.tensor([[alpha_peak(e.to(device)), alpha_mid(e.to(device))] for e in eigs], dtype=torch.float64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random", "--shape", dest="random", choices=sorted(SHAPES),
                    help="random LLaMA-shaped weights instead of --model")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--weight-dtype", default="bfloat16", help="dtype of the random weights")
    ap.add_argument("--weights-on", default="cpu", help="where the random weights live (cpu or the device)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precisions", nargs="+", default=["float64", "float32"])
    ap.add_argument("--streams", type=int, nargs="+", default=[1],
                    help="eigensolves in flight at once to time (1 = one after the other; CUDA streams on a GPU)")
    ap.add_argument("--linalg", nargs="+", default=["default"],
                    help="CUDA linear algebra libraries to time the ESD with (default, cusolver, magma), one stream")
    ap.add_argument("--bands", type=int, nargs="+", default=[],
                    help="also time the two-stage float64 ESD (band.py) with each of these half-bandwidths")
    ap.add_argument("--batch", type=int, default=None, help="Grams per two-stage batch (default: esd.py's)")
    ap.add_argument("--graph", action="store_true",
                    help="each --bands run also with its band reduction replayed from a CUDA graph (--esd-graph)")
    ap.add_argument("--launch-probe", action="store_true",
                    help="also time one small op and one band-reduction column step on the device (the two-stage "
                         "path's per-kernel cost)")
    ap.add_argument("--host-floor", action="store_true",
                    help="time the two-stage host half alone (dsbev at b = 1 and each --bands, all host threads busy)")
    ap.add_argument("--svd32", action="store_true", help="also float32 svdvals (the reference's own path)")
    ap.add_argument("--skip-byte-key", action="store_true", help="do not time the old blake2b key")
    ap.add_argument("--key-threads", type=int, nargs="+", default=[],
                    help="also time the cache key with each of these thread counts (a many-core host's threads)")
    ap.add_argument("--key-only", action="store_true", help="time the cache key(s), skip the ESD")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "esd.json"))
    args = ap.parse_args()

    if args.random:
        source = f"random {args.random} x {args.layers} layers ({args.weight_dtype}, on {args.weights_on})"
        named = random_weights(args.random, args.layers, getattr(torch, args.weight_dtype), args.device,
                               args.device if args.weights_on == "device" else args.weights_on)
    else:
        from prunekit.loading import load
        model, _, adapter, _ = load(args.model)
        named = block_weights(model, adapter)
        source = f"{args.model} ({named[0][1].dtype}, on {named[0][1].device})"
    weights = [w for _, w in named]
    numel = sum(w.numel() for w in weights)
    print(f"{source}: {len(weights)} matrices, {numel / 1e6:.0f} M weights, ESD on {args.device}", flush=True)

    # warm up the device's BLAS and solver handles, so the first precision does not pay for them
    for precision in ("float64", "float32"):
        esd_eigenvalues_batched([torch.randn(64, 96)], precision, args.device, method="eigvalsh")
    if args.bands:
        esd_eigenvalues_batched([torch.randn(64, 96)], "float64", args.device, method="two_stage")

    _, key_seconds = timed(weights_key, named)
    cuda = str(args.device).startswith("cuda")
    # where prunekit takes it on a GPU: the host weights copied up one at a time, fingerprinted there
    key_device_seconds = timed(weights_key, named, "", args.device)[1] if cuda else None
    byte_seconds = None if args.skip_byte_key else timed(byte_key, named)[1]
    print(f"cache key: fingerprint {key_seconds:.3f} s where the weights are"
          + ("" if key_device_seconds is None else f", {key_device_seconds:.3f} s on {args.device}")
          + ("" if byte_seconds is None else f", old blake2b of every byte {byte_seconds:.3f} s"), flush=True)

    key_by_threads = {}
    threads = torch.get_num_threads()
    for t in args.key_threads:
        torch.set_num_threads(t)
        try:
            key_by_threads[t] = min(timed(weights_key, named)[1] for _ in range(3))
        finally:
            torch.set_num_threads(threads)
        print(f"cache key with {t} threads: {key_by_threads[t]:.3f} s (best of 3)", flush=True)
    probe = launch_probe(args.device) if args.launch_probe else None
    if probe:
        print(f"launch probe on {args.device}: {probe}", flush=True)
    floor = None
    if args.host_floor:
        floor = host_floor(max(weights, key=lambda w: min(w.shape)), args.device, args.bands)
        for b, seconds in floor["seconds_per_round"].items():
            print(f"host dsbev, {floor['n']} wide, b = {b}: {seconds:.3f} s a matrix a thread with {floor['threads']} "
                  f"threads busy; {len(weights)} matrices: ~{len(weights) * seconds / floor['threads']:.2f} s",
                  flush=True)
    if args.key_only:
        write_results(args.out, [], {**meta(), "source": source, "matrices": len(weights), "weights": numel,
                                     "key_seconds": key_seconds, "key_seconds_by_threads": key_by_threads,
                                     "launch_probe": probe, "host_floor": floor})
        return

    ref_eigs, ref_seconds = timed(lambda *a: esd_eigenvalues_batched(*a, method="eigvalsh"), weights, "float64",
                                  args.device)
    ref, fit_seconds = timed(alphas, ref_eigs)
    fit_device_seconds = None
    if cuda:
        on_device, fit_device_seconds = timed(alphas, ref_eigs, args.device)
        print(f"max |alpha on {args.device} - alpha on the host|: {(on_device - ref).abs().max().item():.2e}")
    print(f"alpha_peak + alpha_mid fits: {fit_seconds:.3f} s on the host"
          + ("" if fit_device_seconds is None else f", {fit_device_seconds:.3f} s on {args.device}"), flush=True)
    runs = {"float64": (ref_eigs, ref_seconds)}
    for precision in args.precisions:
        for streams in args.streams:
            label = precision if streams == 1 else f"{precision}, {streams} streams"
            if label not in runs:
                runs[label] = timed(lambda *a: esd_eigenvalues_batched(*a, streams=streams, method="eigvalsh"),
                                    weights, precision, args.device)
    for lib in args.linalg:
        if lib != "default" and cuda:
            previous = torch.backends.cuda.preferred_linalg_library()
            try:
                torch.backends.cuda.preferred_linalg_library(lib)
                runs[f"float64, {lib}"] = timed(lambda *a: esd_eigenvalues_batched(*a, method="eigvalsh"), weights,
                                                "float64", args.device)
            except (RuntimeError, ValueError) as exc:  # a build without that library
                print(f"{lib}: {str(exc).splitlines()[0]}", flush=True)
            finally:
                torch.backends.cuda.preferred_linalg_library(previous)
    if args.svd32:
        runs["svdvals float32"] = timed(svd_eigenvalues, weights, args.device)
    two_stage = {}
    for band, graph in [(b, g) for b in args.bands for g in ([False, True] if args.graph else [False])]:
        label, timings = f"float64, two-stage b={band}" + (", graph" if graph else ""), {}
        runs[label] = timed(lambda *a: esd_eigenvalues_batched(*a, method="two_stage", band=band, batch=args.batch,
                                                               timings=timings, graph=graph),
                            weights, "float64", args.device)
        two_stage[label] = timings
        print(f"{label}: {timings['seconds']:.2f} s: device band reduction (and the Grams) "
              f"{timings['device_seconds']:.2f} s (graph {timings['graph']}, capture "
              f"{timings['graph_capture_seconds']:.2f} s), then {timings['host_tail_seconds']:.2f} s waiting for "
              f"{timings['host_threads']} host threads' LAPACK dsbev", flush=True)

    rows = []
    for precision, (eigs, seconds) in runs.items():
        delta = (alphas(eigs) - ref).abs()
        auto_for = " ".join(m for m in ("alpha_peak", "alpha_mid")
                            if resolve_precision("auto", m) == precision.split(",")[0])
        rows.append({"precision": precision, "max_dpeak": delta[:, 0].max().item(),
                     "max_dmid": delta[:, 1].max().item(), "over_1e3": int((delta.amax(1) > 1e-3).sum()),
                     "auto_for": auto_for or None, "esd_seconds": seconds, "key_seconds": key_seconds,
                     "worst": named[int(delta[:, 0].argmax())][0]})
        print(f"{precision}: {seconds:.2f} s, max |d alpha_peak| {rows[-1]['max_dpeak']:.2e} "
              f"({rows[-1]['worst']}), max |d alpha_mid| {rows[-1]['max_dmid']:.2e}", flush=True)

    table = markdown(rows, COLUMNS)
    print(table)
    write_results(args.out, rows, {**meta(), "source": source, "device": args.device,
                                   "device_name": torch.cuda.get_device_name() if cuda else "cpu",
                                   "peak_device_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                                   "matrices": len(weights), "weights": numel, "key_seconds": key_seconds,
                                   "key_seconds_by_threads": key_by_threads,
                                   "key_device_seconds": key_device_seconds, "fit_seconds": fit_seconds,
                                   "fit_device_seconds": fit_device_seconds,
                                   "byte_key_seconds": byte_seconds, "two_stage": two_stage,
                                   "launch_probe": probe, "host_floor": floor, "table": table})


if __name__ == "__main__":
    main()
