"""`prunekit bench-speed`: what a 2:4 model gains in speed, measured, layer by layer and end to end.

On a CUDA GPU each linear's 2:4 weight becomes a `torch.sparse.to_sparse_semi_structured` tensor
(cuSPARSELt, or CUTLASS where cuSPARSELt is missing), and `F.linear` against it is timed beside the
dense weight at several token counts, with both backends where both exist; the whole model's prefill
is timed with every block linear swapped. On the CPU there is no 2:4 kernel: the table shows the
dense time and a CSR sparse matmul (torch.sparse), which at 50 % does more work per nonzero than the
dense kernel does per weight, so it is slower; the report says so.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .errors import PrunekitError

TOKENS = (16, 128, 512, 2048, 8192, 32768)


def is_2_4(weight: torch.Tensor) -> bool:
    groups = (weight == 0).reshape(weight.shape[0], -1, 4).sum(-1)
    return bool((groups >= 2).all())


def _time(fn, device: torch.device, repeats: int = 10) -> float:
    """Median seconds of fn() after a warm-up, with the device synchronised around each call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _backends():
    """The semi-structured backends this torch has: cuSPARSELt and/or CUTLASS."""
    from torch.sparse import SparseSemiStructuredTensor
    out = []
    if getattr(torch.backends, "cusparselt", None) is not None and torch.backends.cusparselt.is_available():
        out.append("cusparselt")
    out.append("cutlass")
    return out, SparseSemiStructuredTensor


def _to_sparse(weight: torch.Tensor, backend: str):
    from torch.sparse import to_sparse_semi_structured
    _, cls = _backends()
    cls._FORCE_CUTLASS = backend == "cutlass"
    return to_sparse_semi_structured(weight)


def layer_table(shapes: dict, device: torch.device, dtype: torch.dtype, tokens=TOKENS) -> list[dict]:
    """Per distinct (out, in) shape and token count: dense ms, sparse ms per backend, speedup."""
    rows = []
    for (out_f, in_f), weight in shapes.items():
        w = weight.to(device, dtype)
        if device.type == "cuda":
            backends, _ = _backends()
            sparse = {b: _to_sparse(w, b) for b in backends}
        else:
            sparse = {"csr": w.to_sparse_csr()}
        for n in tokens:
            x = torch.randn(n, in_f, device=device, dtype=dtype)
            dense_s = _time(lambda: F.linear(x, w), device)
            row = {"shape": f"{out_f}x{in_f}", "tokens": n, "dense_ms": dense_s * 1e3}
            for name, ws in sparse.items():
                fn = (lambda: F.linear(x, ws)) if device.type == "cuda" else (lambda: torch.sparse.mm(ws, x.t()).t())
                s = _time(fn, device)
                row[f"{name}_ms"] = s * 1e3
                row[f"{name}_speedup"] = dense_s / s
            rows.append(row)
    return rows


def prefill(model, adapter, device, dtype, tokens: int, backend: str | None) -> float:
    """Seconds of one forward over `tokens` tokens, with the block linears semi-structured if asked."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    saved = []
    if backend is not None:
        for block in adapter.blocks(model):
            for module in adapter.block_linears(block).values():
                saved.append((module, module.weight))
                module.weight = torch.nn.Parameter(_to_sparse(module.weight.detach(), backend), requires_grad=False)
    try:
        with torch.no_grad():
            return _time(lambda: model(input_ids=ids, use_cache=False), device, repeats=5)
    finally:
        for module, weight in saved:
            module.weight = weight


def bench_speed(model_path: str, device: str = "auto", dtype: str = "auto", tokens=TOKENS) -> dict:
    from .execution.precision import resolve_device, resolve_dtype
    from .loading import load
    model, _, adapter, _ = load(model_path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dev.type == "cuda" and dt == torch.float32:
        raise PrunekitError("2:4 kernels run in float16/bfloat16: pass --dtype bfloat16 or float16")
    shapes = {}
    for block in adapter.blocks(model):
        for name, module in adapter.block_linears(block).items():
            w = adapter.weight(module).detach()
            if not is_2_4(w):
                raise PrunekitError(f"{name} is not 2:4 sparse: prune with --pattern 2:4 first")
            shapes.setdefault(tuple(w.shape), w)
    result = {"model": model_path, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
              "dtype": str(dt).removeprefix("torch."), "layers": layer_table(shapes, dev, dt, tokens)}
    if dev.type == "cuda":
        model.to(dev, dt)
        backends, _ = _backends()
        result["prefill"] = []
        for n in [t for t in tokens if t <= getattr(model.config, "max_position_embeddings", 4096)]:
            row = {"tokens": n, "dense_ms": prefill(model, adapter, dev, dt, n, None) * 1e3}
            for b in backends:
                row[f"{b}_ms"] = prefill(model, adapter, dev, dt, n, b) * 1e3
                row[f"{b}_speedup"] = row["dense_ms"] / row[f"{b}_ms"]
            result["prefill"].append(row)
    else:
        result["note"] = ("no 2:4 kernel on the CPU: the sparse column is a CSR matmul (torch.sparse), which "
                          "at 50 % density moves an index per kept weight and cannot use the dense kernel's "
                          "blocking, so it is slower than dense; 2:4 pays only on GPUs with sparse tensor cores")
    return result


def table(result: dict) -> str:
    rows = result["layers"]
    sparse = [k[:-3] for k in rows[0] if k.endswith("_ms") and k != "dense_ms"]
    head = ["shape", "tokens", "dense ms"] + [f"{s} ms" for s in sparse] + [f"{s} speedup" for s in sparse]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["shape"], str(r["tokens"]), f"{r['dense_ms']:.3f}"] + [f"{r[s + '_ms']:.3f}" for s in sparse] + \
                [f"{r[s + '_speedup']:.2f}" for s in sparse]
        lines.append("| " + " | ".join(cells) + " |")
    for r in result.get("prefill", []):
        lines.append(f"prefill {r['tokens']} tokens: dense {r['dense_ms']:.1f} ms, " + ", ".join(
            f"{k[:-8]} {v:.2f}x" for k, v in r.items() if k.endswith("_speedup")))
    if "note" in result:
        lines.append(result["note"])
    return "\n".join(lines)
