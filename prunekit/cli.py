"""prunekit command line: `prunekit prune|eval|analyze|sweep|report ...`."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .config import PruneConfig
from .errors import PrunekitError


def _add_eval_args(p, seqlen_flag: str):
    p.add_argument("--eval", metavar="CORPUS[,CORPUS]",
                   help="text/JSONL file(s) or dataset name(s) (wikitext2, c4, ptb), comma-separated")
    p.add_argument(seqlen_flag, type=int, dest="eval_seqlen", metavar="L", help="evaluation window length")
    p.add_argument("--eval-windows", type=int, metavar="N", help="keep only the first N windows")
    p.add_argument("--tasks", metavar="T[,T]", help="zero-shot tasks (lm-eval): boolq,rte,hellaswag,winogrande,"
                                                    "arc_easy,arc_challenge,openbookqa,piqa, or all")
    p.add_argument("--limit", type=int, metavar="N", help="zero-shot: first N documents per task")
    p.add_argument("--json", metavar="FILE", help="write the run record as JSON")
    p.add_argument("--encoding", default="utf-8", help="text encoding of corpus files")
    p.add_argument("--allow-long-context", action="store_true",
                   help="allow a calibration/evaluation length beyond the model's max_position_embeddings")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto",
                   help="compute dtype: auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16, float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description="Post-training pruning of causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model, evaluate it, save it")
    p.add_argument("--model", help="HF folder, hub id, .gguf file, or alias smollm2-135m")
    p.add_argument("--config", metavar="FILE", help="a recipe (YAML/JSON PruneConfig, or a saved prunekit.json); "
                                                    "flags typed on the command line override it")
    p.add_argument("--method", default="wanda", help="magnitude, wanda, stade, stade-w, sparsegpt")
    p.add_argument("--sparsity", type=float, help="target sparsity in (0, 1); default 0.5, or N/M for N:M")
    p.add_argument("--pattern", default="unstructured", help="unstructured or N:M (N of every M pruned), e.g. 2:4")
    p.add_argument("--allocation", default="uniform", help="per-layer sparsity: uniform, alpha, owl")
    p.add_argument("--calib", default="wikitext2", metavar="CORPUS", help="calibration corpus")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048, help="calibration segment length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="calibration sequences per block forward (default: 2048 tokens "
                                                   "a forward on the CPU, 16384 on a GPU)")
    p.add_argument("--stats-dtype", help="compute dtype of the dense statistics passes (default: --dtype); "
                                         "--dtype bfloat16 --stats-dtype float32: float32-quality masks, faster")
    p.add_argument("--activation-dtype", default="auto",
                   help="dtype of the block inputs/outputs kept between passes: auto (float32 where they stay with "
                        "the compute, the compute dtype where they go to host memory or disk), float32, bfloat16, "
                        "float16")
    p.add_argument("--residual-dtype", default="float32",
                   help="the residual stream inside a block under a low --dtype: float32 (mixed precision) or compute "
                        "(bfloat16/float16 throughout, as the reference scripts run: faster passes, less exact)")
    p.add_argument("--offload", default="auto", help="placement: auto (fastest that fits), none (all on the GPU), "
                                                     "weights (blocks streamed from host), cpu (activations too), "
                                                     "disk (blocks read from the checkpoint, written as they finish)")
    p.add_argument("--scratch-dir", metavar="DIR", help="--offload disk: memory-mapped activations go here when "
                                                        "they do not fit in RAM (default: beside --out)")
    p.add_argument("--max-shard-size", default="50GB", help="--offload disk: output shard size (e.g. 5GB)")
    p.add_argument("--gguf-cache", metavar="DIR", help="--offload disk of a .gguf: where its dequantized "
                                                       "safetensors copy is kept and reused")
    p.add_argument("--record-error", action="store_true",
                   help="record each block's relative output error (pruned vs dense) in the JSON")
    p.add_argument("--esd-dtype", default="auto", help="AlphaPruning eigensolver precision: auto, float32, float64")
    p.add_argument("--no-bias-update", action="store_true", help="STADE without mean compensation")
    p.add_argument("--sparsegpt-arithmetic", default="fast",
                   help="fast, or reference: the reference's float32 operations in its order, one sequence "
                        "per pass (its masks and weights bit for bit, at its speed)")
    p.add_argument("--wanda-variant", action="store_true", help="Wanda appendix variant (cumulative threshold)")
    p.add_argument("--eval-dense", action="store_true", help="also evaluate the dense model first")
    p.add_argument("--out", metavar="DIR", help="save the pruned model here")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="state saved after each block (default: OUT.checkpoint)")
    p.add_argument("--no-checkpoint", action="store_true", help="do not save state after each block")
    p.add_argument("--save-format", default="dense", help="dense (safetensors with zeros, loads anywhere) or "
                                                           "bitmask (kept values + packed mask; prunekit.load_pruned)")
    _add_eval_args(p, "--eval-seqlen")
    _add_allocation_args(p)

    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model or a saved pruned model")
    e.add_argument("--model", required=True)
    e.add_argument("--offload", default="auto", help="disk: stream the blocks from the checkpoint (models larger "
                                                     "than RAM; perplexity only)")
    _add_eval_args(e, "--seqlen")

    z = sub.add_parser("analyze", help="per-layer spectra (alpha) and the AlphaPruning allocation")
    z.add_argument("--model", required=True)
    z.add_argument("--sparsity", type=float, default=0.7, help="target sparsity the allocation is shown for")
    z.add_argument("--json", metavar="FILE")
    z.add_argument("--plot", metavar="FILE.png")
    z.add_argument("--device", default="auto")
    z.add_argument("--esd-dtype", default="auto", help="eigensolver precision: auto, float32, float64")
    _add_allocation_args(z)

    s = sub.add_parser("sweep", help="run a grid of prunes of one model, resumable, one JSON line per cell")
    s.add_argument("--config", required=True, metavar="SWEEP.yaml")
    s.add_argument("--results", metavar="FILE.jsonl", help="results file (default: the sweep's `results`)")

    b = sub.add_parser("bench-speed", help="dense vs 2:4 sparse time per layer shape and whole prefill")
    b.add_argument("--model", required=True, help="a 2:4-pruned model folder")
    b.add_argument("--device", default="auto")
    b.add_argument("--dtype", default="auto")
    b.add_argument("--tokens", default="16,128,512,2048,8192,32768", help="token counts, comma-separated")
    b.add_argument("--json", metavar="FILE")

    r = sub.add_parser("report", help="markdown report with tables and plots from sweep results")
    r.add_argument("results", metavar="RESULTS.jsonl")
    r.add_argument("--out", required=True, metavar="DIR")
    return parser


def _add_allocation_args(p):
    a = p.add_argument_group("allocation options")
    a.add_argument("--esd-method", default="auto",
                   help="AlphaPruning eigensolver: auto (two_stage for float64 on a GPU), eigvalsh, two_stage")
    a.add_argument("--esd-band", type=int, default=16,
                   help="two_stage ESD: the band's half-width (narrower: less host LAPACK work, more GPU work)")
    a.add_argument("--esd-batch", type=int, default=0,
                   help="two_stage ESD: Gram matrices reduced at once on the GPU (0: automatic, up to 32)")
    a.add_argument("--esd-graph", action="store_true",
                   help="two_stage ESD on a GPU: replay the band reduction from a CUDA graph (experimental)")
    a.add_argument("--epsilon", type=float, default=0.3, help="AlphaPruning: sparsity spread around the target")
    a.add_argument("--alpha-metric", default="alpha_peak", help="alpha_peak or alpha_mid")
    a.add_argument("--alpha-mapping", default="block_wise", help="block_wise or layer_wise")
    a.add_argument("--alpha-reference-quirk", action="store_true", help="reproduce the reference's xmin bound")
    a.add_argument("--owl-m", type=float, default=5.0, help="OWL outlier threshold M")
    a.add_argument("--owl-lambda", type=float, default=0.08, help="OWL sparsity spread lambda")
    a.add_argument("--max-layer-sparsity", type=float, default=0.99)


def _allocation_options(args) -> dict:
    return dict(sparsity=args.sparsity, device=args.device, epsilon=args.epsilon, alpha_metric=args.alpha_metric,
                alpha_mapping=args.alpha_mapping, alpha_reference_quirk=args.alpha_reference_quirk,
                owl_m=args.owl_m, owl_lambda=args.owl_lambda, max_layer_sparsity=args.max_layer_sparsity,
                esd_dtype=args.esd_dtype, esd_method=args.esd_method, esd_band=args.esd_band,
                esd_batch=args.esd_batch, esd_graph=args.esd_graph)


def _config(args) -> PruneConfig:
    return PruneConfig(method=args.method, pattern=args.pattern, allocation=args.allocation,
                       nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, batch_size=args.batch_size,
                       dtype=args.dtype, stats_dtype=args.stats_dtype, activation_dtype=args.activation_dtype,
                       residual_dtype=args.residual_dtype, offload=args.offload,
                       scratch_dir=args.scratch_dir, save_format=args.save_format, resume=args.resume,
                       checkpoint=not args.no_checkpoint, checkpoint_dir=args.checkpoint_dir,
                       max_shard_size=args.max_shard_size, gguf_cache=args.gguf_cache,
                       record_error=args.record_error, allow_long_context=args.allow_long_context,
                       bias_update=not args.no_bias_update,
                       wanda_variant=args.wanda_variant, sparsegpt_arithmetic=args.sparsegpt_arithmetic,
                       **_allocation_options(args))


def _tasks(value: str | None) -> list[str] | None:
    if not value:
        return None
    from .zeroshot import TASKS
    return list(TASKS) if value == "all" else [t.strip() for t in value.split(",") if t.strip()]


def _prune_run(parser, args, argv) -> tuple[PruneConfig, dict]:
    """The config and the run options (model, corpora), from the flags or from a recipe plus typed flags."""
    run = {k: getattr(args, k) for k in ("model", "calib", "eval", "eval_seqlen", "eval_windows")}
    if not args.config:
        if not args.model:
            raise PrunekitError("prune needs --model (a folder, .gguf, hub id or smollm2-135m) or --config FILE")
        return _config(args), run
    from .recipe import explicit_args, load_recipe, merge, overrides_from_args, recorded_run
    typed = explicit_args(parser, argv if argv is not None else sys.argv[1:])
    config = merge(load_recipe(args.config), overrides_from_args(args, typed))
    saved = recorded_run(args.config)
    for key in run:
        if key not in typed and key in saved:
            run[key] = saved[key]
    if not run["model"]:
        raise PrunekitError(f"{args.config} names no model: pass --model")
    return config, run


def _write_json(path: str, record: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)


def _fmt_ppl(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:.3f}" for k, v in value.items())
    return f"{value:.3f}"


def _summary(record: dict) -> str:
    parts = []
    if "sparsity" in record:
        parts += [f"sparsity {record['sparsity']:.4f}", f"pruned in {record['prune_seconds']:.1f} s"]
    if "ppl_dense" in record:
        parts.append(f"dense ppl {_fmt_ppl(record['ppl_dense'])}")
    if "ppl" in record:
        parts.append(f"{'pruned ' if 'sparsity' in record else ''}ppl {_fmt_ppl(record['ppl'])}")
    if "zeroshot_dense" in record:
        parts.append(f"dense zero-shot mean {record['zeroshot_dense']['mean']:.4f}")
    if "zeroshot" in record:
        parts.append(f"zero-shot mean {record['zeroshot']['mean']:.4f}")
    if "out" in record:
        parts.append(f"saved to {record['out']}")
    return " | ".join(parts)


def _sweep(args) -> dict:
    from . import api
    from .sweep import load_sweep, run_sweep
    spec = load_sweep(args.config)
    workspace = api.Workspace(spec["model"])

    def run_cell(config: PruneConfig) -> dict:
        record, _ = workspace.run(config, spec.get("calib", "wikitext2"), spec.get("eval"), spec.get("eval_seqlen"),
                                  spec.get("eval_windows"), spec.get("eval_dense", False),
                                  tasks=_tasks(spec.get("tasks")) if isinstance(spec.get("tasks"), str)
                                  else spec.get("tasks"), limit=spec.get("limit"))
        return record
    summary = run_sweep(spec, run_cell, args.results, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"sweep: {summary['ran']} ran ({summary['failed']} failed), {summary['skipped_finished']} already done, "
          f"{summary['skipped_impossible']} impossible; results in {summary['results']}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from . import api  # heavy imports (torch, transformers) after argument parsing
        record = None
        if args.command == "prune":
            config, run = _prune_run(parser, args, argv)
            record, _ = api.prune_model(run["model"], config, calib=run["calib"], eval=run["eval"],
                                        eval_seqlen=run["eval_seqlen"], eval_windows_max=run["eval_windows"],
                                        eval_dense=args.eval_dense, out=args.out, overwrite=args.overwrite,
                                        tasks=_tasks(args.tasks), limit=args.limit, encoding=args.encoding)
            from .execution.distributed import launched_rank
            if launched_rank() != 0:  # torchrun: rank 0 reports and writes
                return 0
            print(_summary(record))
        elif args.command == "analyze":
            from . import analyze
            record = analyze.analyze(args.model, PruneConfig(**_allocation_options(args)))
            print(analyze.table(record))
            if args.plot:
                analyze.plot(record, args.plot)
        elif args.command == "sweep":
            _sweep(args)
        elif args.command == "bench-speed":
            from .speed import bench_speed, table
            record = bench_speed(args.model, args.device, args.dtype, [int(t) for t in args.tokens.split(",")])
            print(table(record))
        elif args.command == "report":
            from .report import write_report
            print(write_report(args.results, args.out))
        else:
            if not args.eval and not args.tasks:
                raise PrunekitError("eval needs --eval CORPUS (a text file or a dataset name such as wikitext2) "
                                    "or --tasks TASKS")
            record = api.evaluate_model(args.model, args.eval, args.eval_seqlen or 2048, args.eval_windows,
                                        args.device, args.dtype, tasks=_tasks(args.tasks), limit=args.limit,
                                        offload=args.offload, encoding=args.encoding,
                                        allow_long_context=args.allow_long_context)
            print(_summary(record))
        if record is not None and getattr(args, "json", None):
            _write_json(args.json, record)
    except PrunekitError as exc:
        print(f"prunekit: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, read-only or unwritable output: nothing half-written is left
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"prunekit: error: cannot write or read{where}: {exc.strerror or exc}: free some space or "
              f"choose another --out", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunekit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
