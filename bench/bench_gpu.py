"""GPU benchmark: a random LLaMA-shaped model built in memory (no download), 128 x 2048 random
calibration ids, each method x placement plan. Prints a markdown table, writes bench/results/gpu.json.

    python bench/bench_gpu.py --shape 7b                       # on a GPU machine
    python bench/bench_gpu.py --shape tiny --nsamples 8 --seqlen 128   # anywhere (the CPU test runs this)

Per row: prune seconds (prunekit's own clock, load excluded), the loop's phases, peak device memory,
peak host RSS, and the floor measured in the same run: one full and one statistics pass of one block
over all calibration batches, times the number of blocks (what any block-by-block Wanda must do).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import PeakRSS, markdown, meta, write_results  # noqa: E402

from prunekit import PruneConfig, prune  # noqa: E402
from prunekit.adapters import adapter_for  # noqa: E402
from prunekit.execution import Compute, capture_block_inputs, collect_stats, run_block  # noqa: E402
from prunekit.execution.precision import synchronize  # noqa: E402

SHAPES = {  # hidden, intermediate, heads, kv heads, blocks
    "tiny": (256, 688, 4, 4, 2),
    "135m": (576, 1536, 9, 3, 30),   # SmolLM2-135M's shape: CPU runs beside the core benchmark
    "7b": (4096, 11008, 32, 32, 32),
    "13b": (5120, 13824, 40, 40, 40),
    "70b": (8192, 28672, 64, 8, 80),
}
RUNS = ["wanda", "wanda 2:4", "stade", "wanda alpha", "sparsegpt"]
COLUMNS = [("run", "run", ""), ("offload", "offload", ""), ("plan", "plan", ""), ("storage", "activations", ""),
           ("residual", "residual", ""),
           ("prune_s", "prune s", ".2f"),
           ("floor_s", "floor s", ".2f"), ("vs_floor", "vs floor", ".2f"), ("masks_s", "masks s", ".2f"),
           ("weights_host_s", "weights moved s (host)", ".2f"),
           ("alloc_s", "allocation s", ".2f"), ("esd_s", "ESD s", ".2f"), ("esd_key_s", "ESD key s", ".3f"),
           ("alpha_fit_s", "alpha fits s", ".3f"),
           ("peak_device_gib", "peak GPU GiB", ".2f"), ("peak_rss_gib", "peak RSS GiB", ".2f")]


def build_model(shape: str, layers: int | None, dtype: torch.dtype, seed: int = 0):
    """Random LLaMA of the given shape, made on the GPU when there is one (fast), returned on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hidden, inter, heads, kv, blocks = SHAPES[shape]
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv, num_hidden_layers=layers or blocks, max_position_embeddings=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    where = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to_empty(device=where).to(dtype)
    gen = torch.Generator(where).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    rotary = type(model.model.rotary_emb)(config=config)  # its buffers were left empty on meta
    model.model.rotary_emb = rotary.to(where)
    return model.to("cpu").eval()


def block0(model, adapter, ids, config):
    """(compute, block 0's captured inputs, block 0 on the compute device, a timer of fn() that
    synchronises the device around it)."""
    compute = Compute.from_config(config)
    inputs = capture_block_inputs(model, adapter, ids, config.effective_batch_size, compute)
    block = adapter.blocks(model)[0].to(compute.device)

    def timed(fn) -> float:
        synchronize(compute.device)
        t = time.perf_counter()
        fn()
        synchronize(compute.device)
        return time.perf_counter() - t
    return compute, inputs, block, timed


def floor_seconds(model, adapter, ids, config) -> float:
    """One full and one statistics pass of block 0 over all batches, times the number of blocks."""
    compute, inputs, block, timed = block0(model, adapter, ids, config)
    linears = adapter.block_linears(block)

    def passes():
        with collect_stats(linears, adapter.linears[-1], centred=lambda n: False):
            run_block(block, inputs, compute)
        run_block(block, inputs, compute, outputs=inputs)
    timed(passes)  # the second round is timed (first use warms kernels and the allocator)
    seconds = timed(passes)
    block.to("cpu")
    return seconds * len(adapter.blocks(model))


def floor_parts(model, adapter, ids, config) -> dict:
    """Where the floor's time goes, block 0 over all batches, times the number of blocks: the full
    pass, the statistics pass with its sums of squares, the same pass stopped at the same place
    without them; and for one batch of down_proj's input (the widest), the sum of squares the CPU's
    way (a float32 copy, squared, summed) against the GPU's (stats.FUSED_REDUCTIONS: one vector_norm
    in float32, squared): ms per call and the largest relative difference."""
    from prunekit.execution.passes import StopForward
    compute, inputs, block, timed = block0(model, adapter, ids, config)
    linears = adapter.block_linears(block)
    last = linears[adapter.linears[-1]]
    blocks = len(adapter.blocks(model))

    def stats_pass():
        with collect_stats(linears, adapter.linears[-1], centred=lambda n: False):
            run_block(block, inputs, compute)

    def pass_stopped_by(hook):
        """A pass ended at the last linear's input by `hook` (which raises StopForward)."""
        handle = last.register_forward_pre_hook(hook)
        try:
            run_block(block, inputs, compute)
        finally:
            handle.remove()

    def stop(module, args):
        raise StopForward
    grabbed = {}

    def grab(module, args):
        grabbed.setdefault("x", args[0].detach().reshape(-1, args[0].shape[-1]))
        raise StopForward
    pass_stopped_by(grab)
    x = grabbed["x"]
    exact = x.double().square().sum(0)
    ways = {"float copy": lambda: (x.square() if x.dtype == torch.float32 else x.float().square_()).sum(0),
            "vector_norm": lambda: torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).square_()}
    sums = {}
    for name, fn in ways.items():
        fn()
        sums[name] = {"ms": timed(lambda: [fn() for _ in range(10)]) * 100,
                      "max_rel_err": ((fn().double() - exact).abs() / exact.clamp_min(1e-30)).max().item()}
    out = {}
    for name, fn in (("full pass", lambda: run_block(block, inputs, compute)), ("statistics pass", stats_pass),
                     ("statistics pass, no sums", lambda: pass_stopped_by(stop))):
        fn()
        out[name + " s"] = timed(fn) * blocks
    block.to("cpu")
    return {**out, "sum of squares (one batch of down_proj's input)": sums, "input dtype": str(x.dtype)}


def compile_trial(model, adapter, ids, config) -> dict:
    """torch.compile on a block's full pass: the first compiled call (compile included), then the
    steady compiled pass, beside the eager pass, all over the same batches of block 0. `wins` says
    whether the time saved over the whole model's passes (two per block) repays the compile."""
    compute, inputs, block, timed = block0(model, adapter, ids, config)
    compiled = torch.compile(block)
    timed(lambda: run_block(block, inputs, compute))
    eager = timed(lambda: run_block(block, inputs, compute))
    first = timed(lambda: run_block(compiled, inputs, compute))
    steady = min(timed(lambda: run_block(compiled, inputs, compute)) for _ in range(2))
    block.to("cpu")
    blocks = len(adapter.blocks(model))
    saved = (eager - steady) * 2 * blocks
    return {"eager_pass_s": eager, "compiled_pass_s": steady, "compile_s": first - steady,
            "saved_s": saved, "wins": saved > first - steady, "blocks": blocks}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, help="cut the depth to N blocks")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--runs", nargs="*", default=RUNS,
                    help="'METHOD [N:M] [ALLOCATION] [--eigvalsh|--two-stage] [--esd-band=B] [--esd-batch=N] [--esd-graph]' "
                         "(AlphaPruning's esd_method, default auto, and the two-stage ESD's band and batch)")
    ap.add_argument("--offload", nargs="+", default=["auto"], help="plans to time: auto none weights cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--activation-dtype", nargs="+", default=["auto"],
                    help="storage dtypes of the block inputs to time: auto float32 bfloat16")
    ap.add_argument("--residual-dtype", nargs="+", default=["float32"],
                    help="the residual stream inside a block to time (float32, compute); the floor is measured for each")
    ap.add_argument("--floor-batches", nargs="+", type=int, default=[],
                    help="also the floor at each of these batch sizes (sequences per forward), for each --residual-dtype")
    ap.add_argument("--floor-own-forwards", "--floor-norms", dest="floor_own", action="store_true",
                    help="also the floor with transformers' own RMSNorm forward and rotary embedding "
                         "(precision.FUSED_NORM_DEVICES and LEAN_ROPE_DEVICES off)")
    ap.add_argument("--compile-trial", action="store_true", help="time torch.compile on a block pass")
    ap.add_argument("--no-floor", action="store_true", help="skip the floor measurement")
    ap.add_argument("--floor-parts", action="store_true",
                    help="also split the floor: full pass, statistics pass with and without its sums")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gpu.json"))
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    ids = torch.randint(0, 32000, (args.nsamples, args.seqlen))
    adapter = adapter_for("llama")
    base = dict(nsamples=args.nsamples, seqlen=args.seqlen, dtype=args.dtype, batch_size=args.batch_size)
    model = build_model(args.shape, args.layers, torch.bfloat16)
    info = {**meta(), "shape": args.shape, "blocks": len(adapter.blocks(model)), "nsamples": args.nsamples,
            "seqlen": args.seqlen, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    floors = {}
    for residual in [] if args.no_floor else args.residual_dtype:
        floors[residual] = floor_seconds(model, adapter, ids, PruneConfig(**base, residual_dtype=residual))
        print(f"{args.shape} x {len(adapter.blocks(model))} blocks: floor {floors[residual]:.2f} s "
              f"(residual {residual})", flush=True)
    info["floors_s"] = floors
    if args.floor_own:
        from prunekit.execution import precision
        saved = precision.FUSED_NORM_DEVICES, precision.LEAN_ROPE_DEVICES
        precision.FUSED_NORM_DEVICES, precision.LEAN_ROPE_DEVICES = set(), set()
        try:
            info["floor_own_forwards_s"] = {r: floor_seconds(model, adapter, ids, PruneConfig(**base, residual_dtype=r))
                                            for r in args.residual_dtype}
        finally:
            precision.FUSED_NORM_DEVICES, precision.LEAN_ROPE_DEVICES = saved
        print(f"floor with transformers' own RMSNorm and rotary embedding: {info['floor_own_forwards_s']}", flush=True)
        write_results(args.out, [], info)
    if args.floor_batches:
        info["floor_grid_s"] = {}
        for residual in args.residual_dtype:
            for batch in args.floor_batches:
                cfg = PruneConfig(**{**base, "batch_size": batch}, residual_dtype=residual)
                seconds = info["floor_grid_s"][f"{residual} {batch}"] = floor_seconds(model, adapter, ids, cfg)
                print(f"floor {seconds:.2f} s (residual {residual}, batch {batch})", flush=True)
        write_results(args.out, [], info)
    if args.floor_parts:
        info["floor_parts"] = floor_parts(model, adapter, ids, PruneConfig(**base))
        print("floor parts:", info["floor_parts"], flush=True)
        write_results(args.out, [], info)
    if args.compile_trial:
        info["compile_trial"] = compile_trial(model, adapter, ids, PruneConfig(**base))
        print("torch.compile trial:", info["compile_trial"], flush=True)
        write_results(args.out, [], info)
    rows = []
    for label in args.runs:
        words = label.split()
        pattern = next((w for w in words[1:] if ":" in w), "unstructured")
        allocation = next((w for w in words[1:] if ":" not in w and not w.startswith("--")), "uniform")
        for offload, storage, residual in [(o, s, r) for o in args.offload for s in args.activation_dtype
                                           for r in args.residual_dtype]:
            del model
            model = build_model(args.shape, args.layers, torch.bfloat16)
            config = PruneConfig(method=words[0], pattern=pattern, allocation=allocation, offload=offload,
                                 activation_dtype=storage, residual_dtype=residual,
                                 esd_method="eigvalsh" if "--eigvalsh" in words else
                                 "two_stage" if "--two-stage" in words else "auto",
                                 esd_graph="--esd-graph" in words,
                                 **{key: int(w.split("=")[1]) for key in ("esd_band", "esd_batch") for w in words
                                    if w.startswith(f"--{key.replace('_', '-')}=")}, **base)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with PeakRSS() as rss, tempfile.TemporaryDirectory() as cache:
                os.environ["PRUNEKIT_CACHE_DIR"] = cache  # every AlphaPruning row computes its ESD
                report = prune(model, config, ids, adapter, log=print)
            floor = floors.get(residual)
            row = {"run": label, "offload": offload, "plan": report.placement["name"],
                   "storage": report.placement["storage_dtype"], "residual": residual,
                   "prune_s": report.prune_seconds, "floor_s": floor,
                   "vs_floor": report.prune_seconds / floor if floor else None,
                   "masks_s": report.phases.get("masks", 0.0), "phases": report.phases,
                   "weights_host_s": sum(v for k, v in report.phases.items() if k.startswith("weights")),
                   "placement": report.placement, "sparsity": report.sparsity,
                   "alloc_s": report.phases.get("allocation"),
                   "esd_s": report.allocation_info.get("esd_seconds"),
                   "esd_key_s": report.allocation_info.get("esd_key_seconds"),
                   "alpha_fit_s": report.allocation_info.get("alpha_fit_seconds"),
                   "esd_timings": report.allocation_info.get("esd_timings"),
                   "peak_device_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
                   "peak_rss_gib": rss.peak / 1024}
            rows.append(row)
            print(markdown([row], COLUMNS).splitlines()[-1], flush=True)
            if row["esd_timings"]:
                print(f"  ESD: {row['esd_timings']}", flush=True)
            write_results(args.out, rows, info)
    print(markdown(rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
