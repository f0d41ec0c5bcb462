"""The whole job in one call: load, calibrate, prune, evaluate, save. The CLI is a thin layer over this."""
from __future__ import annotations

import platform
import time

import torch

from . import __version__
from .allocation import needs_data
from .config import PruneConfig
from .data import calibration_samples, eval_windows, load_text, tokenize
from .execution import Compute, check_prunable, prune, unsavable_biases
from .errors import PrunekitError
from .evaluate import perplexity
from .export import check_output_dir, save
from .loading import load
from .scoring import build_scorer


def versions() -> dict:
    import transformers
    return {"prunekit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def load_eval_windows(tokenizer, corpus: str, seqlen: int, max_windows: int | None) -> torch.Tensor:
    return eval_windows(tokenize(tokenizer, load_text(corpus, "eval")), seqlen, max_windows)


def prune_model(model: str, config: PruneConfig, calib: str | None = "wikitext2", eval: str | None = None,
                eval_seqlen: int | None = None, eval_windows_max: int | None = None, eval_dense: bool = False,
                out: str | None = None, overwrite: bool = False):
    """Prune the model named by `model` (folder, .gguf, hub id or alias); return (run record, pruned model)."""
    build_scorer(config)  # unknown method: fail before loading anything
    if out:
        check_output_dir(out, overwrite)
    t0 = time.perf_counter()
    net, tokenizer, adapter, source = load(model)
    load_seconds = time.perf_counter() - t0
    check_prunable(net, adapter, config)
    if out and (bad := unsavable_biases(net, adapter, config)):
        raise PrunekitError(f"{config.method} adds a bias to {', '.join(bad)}, which {net.config.model_type} "
                            f"checkpoints cannot store: pass --no-bias-update, or prune without --out")
    compute = Compute.from_config(config)
    windows = None
    if eval:
        windows = load_eval_windows(tokenizer, eval, eval_seqlen or config.seqlen, eval_windows_max)
    samples = None
    if calib and (build_scorer(config).needs_stats or needs_data(config.allocation)):
        ids = tokenize(tokenizer, load_text(calib, "calib"))
        samples = calibration_samples(ids, config.nsamples, config.seqlen, config.seed)

    record = {"model": model, "config": config.to_dict(), "calib": calib, "eval": eval,
              "versions": versions(), "load_seconds": load_seconds}
    if windows is not None and eval_dense:
        dense = perplexity(net, windows, compute, desc="perplexity (dense)")
        record["ppl_dense"] = dense["ppl"]
    report = prune(net, config, samples, adapter)
    record.update(sparsity=report.sparsity, prune_seconds=report.prune_seconds,
                  allocation=report.allocation, allocation_info=report.allocation_info, layers=report.layers)
    if windows is not None:
        result = perplexity(net, windows, compute, desc="perplexity (pruned)")
        record.update(ppl=result["ppl"], eval_tokens_per_second=result["eval_tokens_per_second"],
                      eval_windows=result["eval_windows"], eval_seqlen=result["eval_seqlen"])
    if out:
        record["out"] = save(net, tokenizer, out, record, overwrite)
    return record, net


def evaluate_model(model: str, eval: str, seqlen: int = 2048, max_windows: int | None = None,
                   device: str = "auto", dtype: str = "float32") -> dict:
    net, tokenizer, _, _ = load(model)
    windows = load_eval_windows(tokenizer, eval, seqlen, max_windows)
    compute = Compute.from_config(PruneConfig(device=device, dtype=dtype))
    result = perplexity(net, windows, compute)
    return {"model": model, "eval": eval, **result, "versions": versions()}
