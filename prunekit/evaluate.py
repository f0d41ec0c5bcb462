"""Perplexity: mean next-token cross-entropy over non-overlapping windows, exponentiated."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .execution.precision import Compute
from .execution.streaming import visiting
from .errors import PrunekitError


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per window: mean cross-entropy of logits[:-1] against tokens[1:], in float32. Shapes (B,T,V), (B,T)."""
    shift = logits[:, :-1].float()
    return F.cross_entropy(shift.reshape(-1, shift.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="none").view(ids.shape[0], -1).mean(dim=1)


def perplexity(model, windows: torch.Tensor, compute: Compute, batch_size: int | None = None,
               desc: str = "perplexity") -> dict:
    """ppl = exp(mean over windows of each window's mean NLL). Returns ppl, tokens/s, windows."""
    batch_size = batch_size or max(1, 2048 // windows.shape[1])
    nlls = []
    start = time.perf_counter()
    with visiting(model, compute.device), compute.run(model):
        for batch in tqdm(windows.split(batch_size), desc=desc, leave=False):
            batch = batch.to(compute.device)
            logits = model(input_ids=batch, use_cache=False).logits
            nlls.append(window_nll(logits, batch))
    return _result(nlls, windows, start)


def _result(nlls: list[torch.Tensor], windows: torch.Tensor, start: float) -> dict:
    """exp of the mean per-window NLL (reading it is the one host sync), tokens/s since `start`."""
    mean_nll = torch.cat(nlls).mean().item()
    seconds = time.perf_counter() - start
    if not math.isfinite(mean_nll):
        raise PrunekitError("perplexity is NaN/inf: the model's outputs overflow; try --dtype float32")
    return {"ppl": math.exp(mean_nll), "eval_tokens_per_second": windows.numel() / seconds,
            "eval_windows": windows.shape[0], "eval_seqlen": windows.shape[1]}


def streamed_perplexity(model, adapter, reader, windows: torch.Tensor, compute: Compute,
                        batch_size: int | None = None, desc: str = "perplexity") -> dict:
    """The same perplexity block by block, for a model whose blocks stay on disk (a skeleton from
    execution.disk.load_skeleton): the windows' hidden states go through one block at a time, then
    the final norm and the head. Equal to `perplexity` up to float rounding (the hidden states rest
    in the storage dtype between blocks)."""
    from .execution.disk import DiskBlocks
    from .execution.passes import capture_block_inputs, run_block
    batch_size = batch_size or max(1, 2048 // windows.shape[1])
    start = time.perf_counter()
    blocks = DiskBlocks(model, adapter, reader, compute.device)
    acts = capture_block_inputs(model, adapter, windows, batch_size, compute, home="device")
    for i, block in enumerate(tqdm(adapter.blocks(model), desc=desc, leave=False)):
        blocks.onload(i)
        run_block(block, acts, compute, outputs=acts)
        blocks.release(i)
    head = [model.get_submodule(adapter.final_norm)]
    head += [m for path in adapter.head_extra if (m := _maybe(model, path)) is not None]
    head.append(model.get_output_embeddings())
    nlls = []
    with visiting(nn.ModuleList(head), compute.device), compute.run(model, exclude=adapter.blocks(model)):
        for sl, h in acts.batches(compute.device):
            x = compute.hidden(h)
            for m in head:
                x = m(x)
            nlls.append(window_nll(x, windows[sl].to(compute.device)))
    return _result(nlls, windows, start)


def _maybe(model, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
