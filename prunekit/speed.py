"""`prunekit bench-speed`: what a 2:4 model gains in speed, measured, layer by layer and end to end.

On a CUDA GPU each distinct linear shape is timed at several token counts, dense (`F.linear`) beside
every 2:4 path torch has:

  cusparselt   `F.linear` against `to_sparse_semi_structured(w)` (the cuSPARSELt subclass; what
               users get by default)
  cutlass      the same subclass forced to its CUTLASS kernels
  cslt         `torch._cslt_sparse_mm` called directly on the compressed weight with the result
               transpose fused (no subclass dispatch, no padding or output copy)
  cslt_search  the same with the algorithm that `torch._cslt_sparse_mm_search` picks for this shape

Each is timed two ways: eager (CUDA events around back-to-back calls: the host's per-call work
counts once the kernel is shorter than it) and as a replayed CUDA graph (the kernels alone), so a
fixed per-call cost shows up as the gap between the two. The whole model's prefill is timed with
every block linear swapped, per backend. On the CPU there is no 2:4 kernel: the table shows the
dense time and a CSR sparse matmul (torch.sparse), which at 50 % does more work per nonzero than the
dense kernel does per weight, so it is slower; the record says so.
"""
from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from .errors import PrunekitError

TOKENS = (16, 128, 512, 2048, 8192, 32768)
CPU_NOTE = ("no 2:4 kernel on the CPU: the sparse column is a CSR matmul (torch.sparse), which at 50 % "
            "density moves an index per kept weight and cannot use the dense kernel's blocking, so it is "
            "slower than dense; 2:4 pays only on GPUs with sparse tensor cores")


def is_2_4(weight: torch.Tensor) -> bool:
    groups = (weight == 0).reshape(weight.shape[0], -1, 4).sum(-1)
    return bool((groups >= 2).all())


def _time_cpu(fn, repeats: int = 10) -> float:
    """Median seconds of fn() after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _time_cuda(fn, repeats: int = 20) -> float:
    """Seconds per call of `repeats` back-to-back calls between two CUDA events, after a warm-up:
    a call whose host work outlasts its kernel is timed by its host work."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def _graphed(fn):
    """fn captured in a CUDA graph: its replay runs the kernels with no per-call host work."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _has_cusparselt() -> bool:
    return getattr(torch.backends, "cusparselt", None) is not None and torch.backends.cusparselt.is_available()


def _to_sparse(weight: torch.Tensor, backend: str):
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        return to_sparse_semi_structured(weight)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = False


def _cuda_paths(w: torch.Tensor) -> dict:
    """name -> fn(x) computing x @ w.T through that 2:4 path; the weight is converted once, here
    (the algorithm search, which depends on the token count, once per input shape)."""
    cutlass = _to_sparse(w, "cutlass")
    paths = {"cutlass": lambda x: F.linear(x, cutlass)}
    if _has_cusparselt():
        ws, packed = _to_sparse(w, "cusparselt"), torch._cslt_compress(w)
        paths["cusparselt"] = lambda x: F.linear(x, ws)
        paths["cslt"] = lambda x: torch._cslt_sparse_mm(packed, x.t(), transpose_result=True)
        if hasattr(torch, "_cslt_sparse_mm_search"):
            algs = {}

            def searched(x):
                if x.shape not in algs:
                    alg = torch._cslt_sparse_mm_search(packed, x.t())
                    algs[x.shape] = alg[0] if isinstance(alg, (tuple, list)) else int(alg)
                return torch._cslt_sparse_mm(packed, x.t(), alg_id=algs[x.shape], transpose_result=True)
            paths["cslt_search"] = searched
    return paths


def _cuda_row(w: torch.Tensor, paths: dict | Exception, x: torch.Tensor) -> dict:
    """Dense and every 2:4 path, eager and graphed; each path's largest relative error against dense
    (a wrong kernel is not a fast one). A path that fails records its error instead of a time;
    `paths` is the conversion's exception when the weight could not be converted at all."""
    dense = lambda: F.linear(x, w)  # noqa: E731
    ref = dense().float()
    row = {"dense_ms": _time_cuda(dense) * 1e3, "dense_graph_ms": _time_cuda(_graphed(dense)) * 1e3}
    if isinstance(paths, Exception):  # a backend this torch/GPU lacks
        row["error"] = f"{type(paths).__name__}: {paths}"[:200]
        return row
    for name, path in paths.items():
        fn = functools.partial(path, x)
        try:
            err = (fn().float() - ref).abs().max() / ref.abs().max()
            row[f"{name}_err"] = float(err)
            row[f"{name}_ms"] = _time_cuda(fn) * 1e3
            row[f"{name}_speedup"] = row["dense_ms"] / row[f"{name}_ms"]
            row[f"{name}_graph_ms"] = _time_cuda(_graphed(fn)) * 1e3
            row[f"{name}_graph_speedup"] = row["dense_graph_ms"] / row[f"{name}_graph_ms"]
        except Exception as exc:  # noqa: BLE001
            row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return row


def layer_table(shapes: dict, device: torch.device, dtype: torch.dtype, tokens=TOKENS) -> list[dict]:
    """Per distinct (out, in) shape and token count: dense ms and, per sparse path, ms and speedup."""
    rows = []
    for (out_f, in_f), weight in shapes.items():
        w = weight.to(device, dtype)
        if device.type == "cuda":
            try:
                paths = _cuda_paths(w)
            except Exception as exc:  # noqa: BLE001 - recorded in each row of this shape
                paths = exc
        else:
            ws = w.to_sparse_csr()
        for n in tokens:
            x = torch.randn(n, in_f, device=device, dtype=dtype)
            row = {"shape": f"{out_f}x{in_f}", "tokens": n}
            if device.type == "cuda":
                row.update(_cuda_row(w, paths, x))
            else:
                row["dense_ms"] = _time_cpu(lambda: F.linear(x, w)) * 1e3
                row["csr_ms"] = _time_cpu(lambda: torch.sparse.mm(ws, x.t()).t()) * 1e3
                row["csr_speedup"] = row["dense_ms"] / row["csr_ms"]
            rows.append(row)
    return rows


def prefill(model, adapter, device, tokens: int, backend: str | None, graphed: bool = False) -> float:
    """Seconds of one forward over `tokens` tokens, with the block linears semi-structured if asked;
    `graphed`: the forward captured once in a CUDA graph and replayed (no per-call host work)."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    saved = []
    try:
        if backend is not None:
            for block in adapter.blocks(model):
                for module in adapter.block_linears(block).values():
                    saved.append((module, module.weight))
                    module.weight = torch.nn.Parameter(_to_sparse(module.weight.detach(), backend),
                                                       requires_grad=False)
        with torch.no_grad():
            fn = lambda: model(input_ids=ids, use_cache=False)  # noqa: E731
            return _time_cuda(_graphed(fn) if graphed else fn, repeats=5)
    finally:
        for module, weight in saved:
            module.weight = weight


def sparse_shapes(model, adapter) -> dict:
    """One weight per distinct block-linear shape; refuses a model that is not 2:4 sparse."""
    shapes = {}
    for block in adapter.blocks(model):
        for name, module in adapter.block_linears(block).items():
            w = adapter.weight(module).detach()
            if tuple(w.shape) in shapes:
                continue
            if not is_2_4(w):
                raise PrunekitError(f"{name} is not 2:4 sparse: prune with --pattern 2:4 first")
            shapes[tuple(w.shape)] = w
    return shapes


def bench_model(model, adapter, dev: torch.device, dt: torch.dtype, tokens=TOKENS) -> dict:
    """The layer table and, on CUDA, the prefill table of an in-memory 2:4 model."""
    if dev.type == "cuda" and dt == torch.float32:
        raise PrunekitError("2:4 kernels run in float16/bfloat16: pass --dtype bfloat16 or float16")
    shapes = sparse_shapes(model, adapter)
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "dtype": str(dt).removeprefix("torch."), "torch": torch.__version__,
              "layers": layer_table(shapes, dev, dt, tokens)}
    if dev.type == "cuda":
        model.to(dev, dt)
        backends = (["cusparselt"] if _has_cusparselt() else []) + ["cutlass"]
        result["prefill"] = []
        for n in [t for t in tokens if t <= getattr(model.config, "max_position_embeddings", 4096)]:
            row = {"tokens": n}
            for graphed in (False, True):
                tag = "_graph" if graphed else ""
                for b in [None] + backends:
                    key = f"{b or 'dense'}{tag}"
                    try:
                        row[f"{key}_ms"] = prefill(model, adapter, dev, n, b, graphed) * 1e3
                        if b is not None:
                            row[f"{key}_speedup"] = row[f"dense{tag}_ms"] / row[f"{key}_ms"]
                    except Exception as exc:  # noqa: BLE001 - recorded, the other paths still run
                        row[f"{key}_error"] = f"{type(exc).__name__}: {exc}"[:200]
            result["prefill"].append(row)
    else:
        result["note"] = CPU_NOTE
    return result


def bench_speed(model_path: str, device: str = "auto", dtype: str = "auto", tokens=TOKENS) -> dict:
    from .execution.precision import resolve_device, resolve_dtype
    from .loading import load
    model, _, adapter, _ = load(model_path)
    dev = resolve_device(device)
    result = bench_model(model, adapter, dev, resolve_dtype(dtype, dev), tokens)
    return {"model": model_path, **result}


def table(result: dict) -> str:
    """Markdown: per layer shape and token count, dense ms and each path's ms and speedup (eager,
    and graphed where measured); then the prefill rows."""
    rows = result["layers"]
    paths = list(dict.fromkeys(k[:-3] for r in rows for k in r if k.endswith("_ms") and not k.startswith("dense")))
    dense = ["dense"] + (["dense_graph"] if "dense_graph_ms" in rows[0] else [])
    order = [p for p in paths if not p.endswith("_graph")] + [p for p in paths if p.endswith("_graph")]
    head = ["shape", "tokens"] + [f"{p} ms" for p in dense + paths] + [f"{p} speedup" for p in order]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["shape"], str(r["tokens"])] + [f"{r[p + '_ms']:.3f}" for p in dense]
        cells += [f"{r[p + '_ms']:.3f}" if p + "_ms" in r else "—" for p in paths]
        cells += [f"{r[p + '_speedup']:.2f}" if p + "_speedup" in r else "—" for p in order]
        lines.append("| " + " | ".join(cells) + " |")
    for r in result.get("prefill", []):
        lines.append(f"prefill {r['tokens']} tokens: dense {r.get('dense_ms', float('nan')):.1f} ms"
                     f" ({r.get('dense_graph_ms', float('nan')):.1f} ms graphed), " + ", ".join(
            f"{k[:-8]} {v:.2f}x" for k, v in r.items() if k.endswith("_speedup")))
    if "note" in result:
        lines.append(result["note"])
    return "\n".join(lines)
