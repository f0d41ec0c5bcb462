"""prunekit command line: `prunekit prune ...`, `prunekit eval ...`."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .config import PruneConfig
from .errors import PrunekitError


def _add_eval_args(p, seqlen_flag: str):
    p.add_argument("--eval", metavar="CORPUS", help="text/JSONL file or dataset name (wikitext2, c4, ptb)")
    p.add_argument(seqlen_flag, type=int, dest="eval_seqlen", metavar="L", help="evaluation window length")
    p.add_argument("--eval-windows", type=int, metavar="N", help="keep only the first N windows")
    p.add_argument("--json", metavar="FILE", help="write the run record as JSON")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32, bfloat16, float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description="Post-training pruning of causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model, evaluate it, save it")
    p.add_argument("--model", required=True, help="HF folder, hub id, .gguf file, or alias smollm2-135m")
    p.add_argument("--method", default="wanda", help="magnitude, wanda, stade, stade-w")
    p.add_argument("--sparsity", type=float, help="target sparsity in (0, 1); default 0.5, or N/M for N:M")
    p.add_argument("--pattern", default="unstructured", help="unstructured or N:M (N of every M pruned), e.g. 2:4")
    p.add_argument("--allocation", default="uniform", help="per-layer sparsity: uniform, alpha, owl")
    p.add_argument("--calib", default="wikitext2", metavar="CORPUS", help="calibration corpus")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048, help="calibration segment length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="calibration sequences per block forward")
    p.add_argument("--stats-dtype", help="compute dtype of the dense statistics passes (default: --dtype); "
                                         "--dtype bfloat16 --stats-dtype float32: float32-quality masks, faster")
    p.add_argument("--no-bias-update", action="store_true", help="STADE without mean compensation")
    p.add_argument("--wanda-variant", action="store_true", help="Wanda appendix variant (cumulative threshold)")
    p.add_argument("--eval-dense", action="store_true", help="also evaluate the dense model first")
    p.add_argument("--out", metavar="DIR", help="save the pruned model here")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    _add_eval_args(p, "--eval-seqlen")
    _add_allocation_args(p)

    e = sub.add_parser("eval", help="perplexity of a model or a saved pruned model")
    e.add_argument("--model", required=True)
    _add_eval_args(e, "--seqlen")

    z = sub.add_parser("analyze", help="per-layer spectra (alpha) and the AlphaPruning allocation")
    z.add_argument("--model", required=True)
    z.add_argument("--sparsity", type=float, default=0.7, help="target sparsity the allocation is shown for")
    z.add_argument("--json", metavar="FILE")
    z.add_argument("--plot", metavar="FILE.png")
    z.add_argument("--device", default="auto")
    _add_allocation_args(z)
    return parser


def _add_allocation_args(p):
    a = p.add_argument_group("allocation options")
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
                owl_m=args.owl_m, owl_lambda=args.owl_lambda, max_layer_sparsity=args.max_layer_sparsity)


def _config(args) -> PruneConfig:
    return PruneConfig(method=args.method, pattern=args.pattern, allocation=args.allocation,
                       nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, batch_size=args.batch_size,
                       dtype=args.dtype, stats_dtype=args.stats_dtype, bias_update=not args.no_bias_update, wanda_variant=args.wanda_variant,
                       **_allocation_options(args))


def _write_json(path: str, record: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)


def _summary(record: dict) -> str:
    parts = [f"sparsity {record['sparsity']:.4f}", f"pruned in {record['prune_seconds']:.1f} s"]
    if "ppl_dense" in record:
        parts.append(f"dense ppl {record['ppl_dense']:.3f}")
    if "ppl" in record:
        parts.append(f"pruned ppl {record['ppl']:.3f}")
    if "out" in record:
        parts.append(f"saved to {record['out']}")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from . import api  # heavy imports (torch, transformers) after argument parsing
        if args.command == "prune":
            config = _config(args)
            record, _ = api.prune_model(args.model, config, calib=args.calib, eval=args.eval,
                                        eval_seqlen=args.eval_seqlen, eval_windows_max=args.eval_windows,
                                        eval_dense=args.eval_dense, out=args.out, overwrite=args.overwrite)
            print(_summary(record))
        elif args.command == "analyze":
            from . import analyze
            record = analyze.analyze(args.model, PruneConfig(**_allocation_options(args)))
            print(analyze.table(record))
            if args.plot:
                analyze.plot(record, args.plot)
        else:
            if not args.eval:
                raise PrunekitError("eval needs --eval CORPUS (a text file or a dataset name such as wikitext2)")
            record = api.evaluate_model(args.model, args.eval, args.eval_seqlen or 2048, args.eval_windows,
                                        args.device, args.dtype)
            print(f"ppl {record['ppl']:.3f} over {record['eval_windows']} windows of {record['eval_seqlen']}")
        if args.json:
            _write_json(args.json, record)
    except PrunekitError as exc:
        print(f"prunekit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunekit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
