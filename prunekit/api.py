"""The whole job in one call: load, calibrate, prune, evaluate, save. The CLI is a thin layer over this.

`Workspace` holds one loaded model and what can be reused across prunes of it (a sweep): the
tokenizer, calibration samples, the captured block-0 inputs, evaluation windows and dense results.
AlphaPruning's eigenvalues are cached on disk by the allocator itself.
"""
from __future__ import annotations

import copy
import platform
import sys
import time

import torch

from . import __version__
from .allocation import needs_data
from .config import PruneConfig
from .data import calibration_samples, eval_windows, load_text, tokenize
from .errors import PrunekitError
from .evaluate import perplexity
from .execution import Compute, capture_block_inputs, check_prunable, prune, unsavable_biases
from .execution.loop import plan_for
from .export import atomic_folder, check_output_dir, save, save_bitmask, write_record
from .loading import load, resolve
from .scoring import build_scorer


def versions() -> dict:
    import transformers
    return {"prunekit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def corpora(eval: str | list[str] | None) -> list[str]:
    """`wikitext2,ptb` or a list -> the corpus names/files, in order."""
    if not eval:
        return []
    items = eval.split(",") if isinstance(eval, str) else list(eval)
    return [c.strip() for c in items if c.strip()]


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _checkpoint_bytes(path: str) -> int:
    import os
    if not os.path.isdir(path):
        return 0
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith((".safetensors", ".bin")))


class Workspace:
    """A loaded model plus caches keyed by what decides them. With `offload="disk"` (or "auto" and a
    checkpoint larger than the free RAM) the model is a skeleton whose blocks stay on disk."""

    def __init__(self, model: str, offload: str = "auto", gguf_cache: str | None = None, encoding: str = "utf-8"):
        from .execution.loop import host_free_bytes
        from .execution.placement import needs_disk
        t0 = time.perf_counter()
        self.spec, self.encoding = model, encoding
        source = resolve(model)
        self.disk = offload == "disk" or (offload == "auto" and needs_disk(_checkpoint_bytes(source.path),
                                                                          host_free_bytes()))
        if self.disk:
            import os
            from .execution.disk import gguf_cache as dequantized, load_skeleton
            if source.is_gguf:
                self.folder = dequantized(source, gguf_cache)
            elif os.path.isdir(source.path):
                self.folder = source.path
            else:
                raise PrunekitError(f"--offload disk reads a local checkpoint folder; {model!r} is not one: "
                                    f"download it first (huggingface-cli download {model} --local-dir DIR)")
            self.model, self.tokenizer, self.adapter, self.reader = load_skeleton(self.folder)
        else:
            self.model, self.tokenizer, self.adapter, self.source = load(model)
            self.reader = None  # the blocks are in memory
        self.load_seconds = time.perf_counter() - t0
        self._cache: dict = {}

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def token_ids(self, calib: str) -> torch.Tensor:
        return self._cached(("ids", calib), lambda: tokenize(self.tokenizer, load_text(calib, "calib", self.encoding)))

    def samples(self, calib: str, config: PruneConfig) -> torch.Tensor:
        ids = self.token_ids(calib)
        return self._cached(("samples", calib, config.nsamples, config.seqlen, config.seed),
                            lambda: calibration_samples(ids, config.nsamples, config.seqlen, config.seed))

    def inputs(self, calib: str, config: PruneConfig):
        """Block-0 inputs for this calibration set and precision, captured once (prune copies them)."""
        compute = Compute.from_config(config)
        samples = self.samples(calib, config)
        plan = plan_for(self.model, self.adapter, config, compute, build_scorer(config), tuple(samples.shape))
        key = ("inputs", calib, config.nsamples, config.seqlen, config.seed, plan.batch_size,
               str(compute.device), compute.dtype, compute.storage)
        return self._cached(key, lambda: capture_block_inputs(self.model, self.adapter, samples,
                                                              plan.batch_size, compute, home=plan.activations))

    def windows(self, corpus: str, seqlen: int, max_windows: int | None) -> torch.Tensor:
        return self._cached(("windows", corpus, seqlen, max_windows),
                            lambda: eval_windows(tokenize(self.tokenizer, load_text(corpus, "eval", self.encoding)),
                                                 seqlen, max_windows))

    def check_context(self, config: PruneConfig, *lengths: int) -> None:
        """A calibration or evaluation length beyond the model's context is refused unless asked for:
        past it the model is out of distribution, and a typo (100000 for 1000) would run for hours."""
        limit = getattr(self.model.config, "max_position_embeddings", None) or getattr(self.model.config, "n_positions", None)
        for flag, n in zip(("--seqlen", "--eval-seqlen"), lengths):
            if limit and n and n > limit and not config.allow_long_context:
                raise PrunekitError(f"{flag} {n} is beyond the model's context ({limit} positions): lower it, "
                                    f"or pass --allow-long-context")

    def evaluate(self, net, config: PruneConfig, eval: list[str], seqlen: int, max_windows: int | None,
                 tasks: list[str] | None, limit: int | None, label: str, reader=None) -> dict:
        """Perplexity on each corpus (a float for one corpus, {corpus: ppl} for several) and zero-shot.
        `reader`: the blocks are on disk (a skeleton): perplexity streams them block by block."""
        from .evaluate import streamed_perplexity
        compute = Compute.from_config(config)
        out, ppl = {}, {}
        if tasks and reader is not None:
            raise PrunekitError("zero-shot evaluation needs the model in memory, not --offload disk: "
                                "run `prunekit eval --model OUT --tasks ...` on a machine that holds it")
        for corpus in eval:
            windows = self.windows(corpus, seqlen, max_windows)
            desc = f"perplexity ({label})"
            result = streamed_perplexity(net, self.adapter, reader, windows, compute, desc=desc) if reader is not None \
                else perplexity(net, windows, compute, desc=desc)
            ppl[corpus] = result["ppl"]
            out.update(eval_tokens_per_second=result["eval_tokens_per_second"],
                       eval_windows=result["eval_windows"], eval_seqlen=result["eval_seqlen"])
        if ppl:
            out["ppl"] = ppl[eval[0]] if len(eval) == 1 else ppl
        if tasks:
            from .zeroshot import evaluate_zeroshot
            out["zeroshot"] = evaluate_zeroshot(net, self.tokenizer, tasks, limit=limit, device=compute.device)
        return out

    def dense(self, config, eval, seqlen, max_windows, tasks, limit) -> dict:
        key = ("dense", tuple(eval), seqlen, max_windows, tuple(tasks or ()), limit, config.dtype, config.device)
        return self._cached(key, lambda: self.evaluate(self.model, config, eval, seqlen, max_windows, tasks, limit,
                                                       "dense", self.reader))

    def run(self, config: PruneConfig, calib: str | None = "wikitext2", eval=None, eval_seqlen: int | None = None,
            eval_windows_max: int | None = None, eval_dense: bool = False, out: str | None = None,
            overwrite: bool = False, tasks: list[str] | None = None, limit: int | None = None,
            in_place: bool = False, log=_log):
        """Prune (a copy of) the model; return (run record, pruned model)."""
        scorer = build_scorer(config)
        if out:
            check_output_dir(out, overwrite)
        check_prunable(self.model, self.adapter, config)
        if out and (bad := unsavable_biases(self.model, self.adapter, config)):
            raise PrunekitError(f"{config.method} adds a bias to {', '.join(bad)}, which "
                                f"{self.model.config.model_type} checkpoints cannot store: pass --no-bias-update, "
                                f"or prune without --out")
        eval = corpora(eval)
        seqlen = eval_seqlen or config.seqlen
        needs = scorer.needs_stats or needs_data(config.allocation)
        if needs and not calib:
            raise PrunekitError(f"method {config.method} needs calibration data: pass --calib")
        if needs:  # a missing or unreadable corpus fails before anything runs
            self.token_ids(calib)
        for corpus in eval:
            self.windows(corpus, seqlen, eval_windows_max)
        self.check_context(config, config.seqlen if needs else 0, seqlen if eval else 0)
        reuse = needs and not in_place and not self.disk  # a sweep: capture block-0 inputs once
        inputs = self.inputs(calib, config) if reuse else None
        samples = self.samples(calib, config) if needs and not reuse else None
        record = {"model": self.spec, "config": config.to_dict(), "calib": calib,
                  "eval": eval[0] if len(eval) == 1 else (eval or None), "versions": versions(),
                  "load_seconds": self.load_seconds}
        if (eval or tasks) and eval_dense:
            dense = self.dense(config, eval, seqlen, eval_windows_max, tasks, limit)
            record.update({f"{k}_dense": v for k, v in dense.items() if k in ("ppl", "zeroshot")})
        if self.disk:
            return self._run_disk(config, samples, record, eval, seqlen, eval_windows_max, out, overwrite,
                                  tasks, limit, in_place, log), None
        net = self.model if in_place else copy.deepcopy(self.model)
        checkpoint = _checkpointer(config, out)
        report = prune(net, config, samples, self.adapter, inputs=inputs, log=log, checkpoint=checkpoint)
        _report_into(record, report)
        record.update(self.evaluate(net, config, eval, seqlen, eval_windows_max, tasks, limit, "pruned"))
        if out:
            if config.save_format == "bitmask":
                names = {layer["name"] + ".weight" for layer in report.layers}
                record["out"] = save_bitmask(net, self.tokenizer, out, record, names, overwrite)
            else:
                record["out"] = save(net, self.tokenizer, out, record, overwrite)
        if checkpoint is not None:
            checkpoint.clear()  # the result is saved: nothing left to resume
        return record, net

    def _run_disk(self, config, samples, record, eval, seqlen, max_windows, out, overwrite, tasks, limit,
                  in_place, log) -> dict:
        """Blocks read from the checkpoint and written into the output as they finish; the output is
        evaluated by streaming its blocks back. A prune edits its skeleton (biases, config flags), so
        each run of a sweep starts from a fresh one; a single run uses the one already loaded."""
        import os
        from .execution.disk import DiskRun, load_skeleton, parse_size
        if not out:
            raise PrunekitError("--offload disk writes each pruned block as it finishes: pass --out DIR")
        if config.save_format != "dense":
            raise PrunekitError("--offload disk writes the dense format: drop --save-format bitmask, or prune in memory")
        if in_place:
            model, tokenizer, adapter, reader = self.model, self.tokenizer, self.adapter, self.reader
        else:
            model, tokenizer, adapter, reader = load_skeleton(self.folder)
        with atomic_folder(out, overwrite) as tmp:
            run = DiskRun(reader, tmp, parse_size(config.max_shard_size),
                          config.scratch_dir or os.path.dirname(os.path.abspath(out)))
            checkpoint = _checkpointer(config, out)
            report = prune(model, config, samples, adapter, log=log, disk=run, checkpoint=checkpoint)
            _report_into(record, report)
            model.config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if eval:
                pruned, _, _, pruned_reader = load_skeleton(tmp)
                record.update(self.evaluate(pruned, config, eval, seqlen, max_windows, tasks, limit, "pruned",
                                            pruned_reader))
            record["out"] = os.path.abspath(out)
            write_record(tmp, record)
        if checkpoint is not None:
            checkpoint.clear()  # the result is in place: nothing left to resume
        return record


def _checkpoint_folder(config: PruneConfig, out: str | None) -> str:
    """--checkpoint-dir, else beside --out."""
    import os
    return config.checkpoint_dir or os.path.abspath(out).rstrip("/") + ".checkpoint"


def _checkpointer(config: PruneConfig, out: str | None):
    """Checkpoints after each block for runs that save (--out; under torchrun, every rank of such a
    run), unless --no-checkpoint."""
    from .execution import distributed
    saves = bool(out) or (distributed.world()[1] > 1 and config.checkpoint_dir)
    if not saves or not (config.checkpoint or config.resume):
        if config.resume:
            raise PrunekitError("--resume continues a run that saves its result: pass the same --out")
        return None
    from .execution.resume import Checkpointer
    return Checkpointer(_checkpoint_folder(config, out), config, config.resume)


def _report_into(record: dict, report) -> None:
    record.update(sparsity=report.sparsity, prune_seconds=report.prune_seconds, placement=report.placement,
                  phases=report.phases, allocation=report.allocation, allocation_info=report.allocation_info,
                  layers=report.layers)
    if report.block_error:
        record["block_error"] = report.block_error


def prune_model(model: str, config: PruneConfig, calib: str | None = "wikitext2", eval=None,
                eval_seqlen: int | None = None, eval_windows_max: int | None = None, eval_dense: bool = False,
                out: str | None = None, overwrite: bool = False, tasks: list[str] | None = None,
                limit: int | None = None, log=_log, encoding: str = "utf-8"):
    """Prune the model named by `model` (folder, .gguf, hub id or alias); return (run record, pruned model)."""
    from .execution import distributed
    build_scorer(config)  # unknown method: fail before loading anything
    joined = distributed.init_from_env(config.device)
    rank, size = distributed.world()
    if size > 1:
        if config.offload == "disk":
            raise PrunekitError("distributed runs keep the model in memory: drop --offload disk")
        if out:  # every rank checkpoints its shard of the activations in the same folder
            config = PruneConfig.from_dict({**config.to_dict(), "checkpoint_dir": _checkpoint_folder(config, out)})
        if rank != 0:  # rank 0 evaluates and writes; the others calibrate their shard and follow
            eval, tasks, out, eval_dense = None, None, None, False
    if out:
        check_output_dir(out, overwrite)
    result = Workspace(model, config.offload, config.gguf_cache, encoding).run(
        config, calib, eval, eval_seqlen, eval_windows_max, eval_dense, out, overwrite, tasks, limit,
        in_place=True, log=log)
    if joined:
        distributed.finish()
    return result


def evaluate_model(model: str, eval=None, seqlen: int = 2048, max_windows: int | None = None,
                   device: str = "auto", dtype: str = "auto", tasks: list[str] | None = None,
                   limit: int | None = None, offload: str = "auto", encoding: str = "utf-8",
                   allow_long_context: bool = False) -> dict:
    ws = Workspace(model, offload, encoding=encoding)
    config = PruneConfig(device=device, dtype=dtype, allow_long_context=allow_long_context)
    if eval:
        ws.check_context(config, 0, seqlen)
    result = ws.evaluate(ws.model, config, corpora(eval), seqlen, max_windows, tasks, limit, "model", ws.reader)
    return {"model": model, "eval": eval, **result, "versions": versions()}
