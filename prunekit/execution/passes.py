"""Passes over blocks: capture the first block's inputs, run a block over every calibration batch,
hook statistics into a pass, and keep the activations where the placement plan puts them.

Block inputs live in one (nsamples, seqlen, hidden) buffer in the storage dtype, on the compute
device or in pinned host memory; a pass writes each batch's output over that batch's input (the
batch is consumed by then), so a prune holds one copy. Host-resident batches are copied up on a side
stream one batch ahead of the compute.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import Adapter
from ..stats import ChannelStats
from .precision import Compute
from .streaming import visiting


class StopForward(Exception):
    """Raised by a hook to end a pass early (the rest of the model or block is not needed)."""


@dataclass
class Activations:
    """Block inputs, batch by batch: `hidden` (nsamples, seqlen, hidden) in the storage dtype on its
    home device; `extra` per batch: the block's other positional args and kwargs (on the device)."""
    hidden: torch.Tensor
    extra: list[tuple[tuple, dict]]
    batch_size: int
    scratch: "Scratch | None" = None   # where a memory-mapped buffer came from (clones go there too)

    @property
    def slices(self) -> list[slice]:
        n = self.hidden.shape[0]
        return [slice(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]

    def clone(self) -> "Activations":
        buffer = self.scratch.tensor(self.hidden.shape, self.hidden.dtype) if self.scratch else _empty_like(self.hidden)
        return Activations(buffer.copy_(self.hidden), self.extra, self.batch_size, self.scratch)

    def batches(self, device: torch.device):
        """Yield (slice, batch on `device`). From pinned host memory on CUDA, batch i+1 is copied on a
        side stream while batch i computes; the copy waits for writes already queued on the compute
        stream (the previous pass's outputs)."""
        if self.hidden.device == device or device.type != "cuda":
            for sl in self.slices:
                yield sl, self.hidden[sl].to(device)
            return
        side, main = torch.cuda.Stream(device), torch.cuda.current_stream(device)

        def fetch(sl):
            side.wait_stream(main)
            with torch.cuda.stream(side):
                batch = self.hidden[sl].to(device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(side)
            return batch, done

        slices = self.slices
        ahead = fetch(slices[0])
        for k, sl in enumerate(slices):
            current, done = ahead
            if k + 1 < len(slices):
                ahead = fetch(slices[k + 1])
            main.wait_event(done)  # this batch only: the next one's copy overlaps this compute
            current.record_stream(main)
            yield sl, current

    def store(self, sl: slice, out: torch.Tensor) -> None:
        self.hidden[sl].copy_(out, non_blocking=True)


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    pin = t.device.type == "cpu" and t.is_pinned()
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, pin_memory=pin)


class Scratch:
    """Memory-mapped activation buffers in a folder (--scratch-dir), removed by cleanup(): at the end
    of a prune and on any error."""

    def __init__(self, folder: str):
        self.folder, self.paths = folder, []

    def tensor(self, shape, dtype: torch.dtype) -> torch.Tensor:
        from .disk import scratch_tensor
        t, path = scratch_tensor(tuple(shape), dtype, self.folder)
        self.paths.append(path)
        return t

    def cleanup(self) -> None:
        import os
        for path in self.paths:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        self.paths.clear()


def allocate_activations(shape: tuple[int, ...], dtype: torch.dtype, home: str, compute: Compute,
                         scratch: Scratch | None = None) -> torch.Tensor:
    """The activation buffer: on the compute device, on the host (pinned when a GPU computes), or in
    a memory-mapped scratch file."""
    if home == "scratch":
        return scratch.tensor(shape, dtype)
    if home == "cpu" or compute.device.type == "cpu":
        return torch.empty(shape, dtype=dtype, pin_memory=compute.device.type == "cuda")
    return torch.empty(shape, dtype=dtype, device=compute.device)


def capture_block_inputs(model: nn.Module, adapter: Adapter, samples: torch.Tensor, batch_size: int,
                         compute: Compute, home: str = "device", scratch: Scratch | None = None) -> Activations:
    """Run the model up to its first block and keep what that block receives, batch by batch. The
    embeddings run in the compute precision (float32 compute upcasts a bf16 table first, so rotary
    tables and the first hidden states equal a float32 checkpoint's)."""
    blocks = adapter.blocks(model)
    state = {"buffer": None, "at": 0}
    extra = []
    hidden_size = model.get_input_embeddings().weight.shape[-1]

    def grab(module, args, kwargs):
        h = args[0].detach()
        if state["buffer"] is None:
            shape = (samples.shape[0], samples.shape[1], h.shape[-1] if h.dim() == 3 else hidden_size)
            state["buffer"] = allocate_activations(shape, compute.storage, home, compute, scratch)
        state["buffer"][state["at"]:state["at"] + h.shape[0]].copy_(h, non_blocking=True)
        state["at"] += h.shape[0]
        batch_extra = (args[1:], dict(kwargs))
        extra.append(_share_identical(batch_extra, extra[-1]) if extra else batch_extra)
        raise StopForward

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with visiting(model, compute.device, exclude=blocks), compute.run(model, exclude=blocks), _no_autocast():
            for batch in tqdm(samples.split(batch_size), desc="calibration", leave=False):
                try:
                    model(input_ids=batch.to(compute.device), use_cache=False)
                except StopForward:
                    pass
    finally:
        handle.remove()
    return Activations(state["buffer"], extra, batch_size, scratch if home == "scratch" else None)


def _share_identical(new, old):
    """`new` with every tensor equal to the one at the same place in `old` replaced by that one: the
    rotary tables (and masks) every batch recomputes are held once, and a pass converts them once
    (Compute.tree's memo)."""
    if isinstance(new, torch.Tensor):
        same = (isinstance(old, torch.Tensor) and old.shape == new.shape and old.dtype == new.dtype
                and old.device == new.device and torch.equal(old, new))
        return old if same else new
    if isinstance(new, (tuple, list)) and isinstance(old, (tuple, list)) and len(new) == len(old):
        return type(new)(_share_identical(n, o) for n, o in zip(new, old))
    if isinstance(new, dict) and isinstance(old, dict):
        return {k: _share_identical(v, old[k]) if k in old else v for k, v in new.items()}
    return new


@contextlib.contextmanager
def _no_autocast():
    """The embedding lookup needs no autocast; rotary tables are made in float32 and lowered by
    Compute.tree when a block pass needs them."""
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


def run_block(block: nn.Module, inputs: Activations, compute: Compute, outputs: Activations | None = None,
              error: "ErrorMeter | None" = None, dense: Activations | None = None) -> None:
    """One pass of `block` over every calibration batch; each batch's output goes to the same batch
    of `outputs` (pass `inputs` itself for a pruned pass that makes the next block's inputs: the
    batch is consumed by then). `error`: compare each output with `dense`'s batch. A pass ended by
    collect_stats(stop_after=...) produces no outputs."""
    memo = {}  # the batches' shared tensors (rotary tables), converted once per pass
    with compute.run(block):
        for sl, h in inputs.batches(compute.device):
            args, kwargs = inputs.extra[sl.start // inputs.batch_size]
            try:
                out = block(compute.hidden(h), *compute.tree(args, memo), **compute.tree(kwargs, memo))
            except StopForward:
                continue
            out = out[0] if isinstance(out, (tuple, list)) else out
            if error is not None:
                error.add(out, dense.hidden[sl])
            if outputs is not None:
                outputs.store(sl, out)


class ErrorMeter:
    """Relative MSE of a block's pruned output against its dense output over all calibration
    tokens: sum ||y - y_dense||^2 / sum ||y_dense||^2, accumulated on the device (float32)."""

    def __init__(self, device: torch.device):
        self.num = torch.zeros((), dtype=torch.float32, device=device)
        self.den = torch.zeros((), dtype=torch.float32, device=device)

    def add(self, out: torch.Tensor, dense: torch.Tensor) -> None:
        dense = dense.to(out.device, torch.float32, non_blocking=True)
        self.num += (out.float() - dense).square().sum()
        self.den += dense.square().sum()

    def value(self) -> torch.Tensor:
        return self.num / self.den.clamp_min(torch.finfo(torch.float32).tiny)


@contextlib.contextmanager
def collect_stats(linears: dict[str, nn.Module], stop_after: str | None = None, centred=lambda name: True,
                  gram=lambda name: False):
    """Hooks that accumulate ChannelStats of every linear's input while the block runs. With
    `stop_after` (the block's last linear), the pass ends once that layer's input is counted: a
    statistics-only pass need not compute the rest of the block. `centred(name)`: whether that
    linear's statistics need the mean and variance; `gram(name)`: whether they need X^T X (SparseGPT).
    Linears that read one tensor (q/k/v, gate/up) share one accumulator."""
    stats: dict[str, ChannelStats] = {}
    last = [None, None]  # (input tensor, linear that counted it)
    handles = []
    for name, module in linears.items():
        def hook(mod, args, name=name):
            if args[0] is last[0]:  # the very tensor the last hooked linear read (not a detached copy)
                stats[name] = stats[last[1]]  # same input: share the statistics, count once
            else:
                last[0], last[1] = args[0], name
                x = args[0].detach()
                if name not in stats:
                    stats[name] = ChannelStats(x.shape[-1], centred=centred(name), gram=gram(name))
                stats[name].update(x)
            if name == stop_after:
                raise StopForward
        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        last[0] = None
        for h in handles:
            h.remove()
