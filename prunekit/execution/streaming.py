"""Block weights visiting the compute device: all at once (plan `device`), or one block at a time
from pinned host memory with the next block copied on a side stream while the current one computes
(plans `stream` and `offload`). On the CPU there is nothing to move."""
from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from .placement import Plan


def _tensors(module: nn.Module):
    yield from module.parameters()
    yield from module.buffers()


class BlockStreamer:
    """onload(i) before block i computes (and block i + 1 starts its copy), offload(i) when block i
    is done (its pruned weights and any new biases go back to pinned host memory, asynchronously),
    release(i) for a block that was only read. `finish()` waits for the last copies: the host weights
    are final after it. Inactive (everything stays put) unless the plan streams weights to a GPU.

    The next block's copy is prepared by a worker thread: page-locking a block's weights
    (`pin_memory`, about 0.4 GB for a 7B block) is host work that would otherwise hold the main
    thread while the GPU's queue runs dry. The worker pins, queues the copy on the side stream and
    records its event; the main thread only waits on that event when the block's turn comes."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device, plan: Plan):
        self.blocks, self.device = blocks, device
        self.active = device.type == "cuda" and plan.streams_weights
        self.side = torch.cuda.Stream(device) if self.active else None
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="prunekit-prefetch") if self.active else None
        self.pending: dict[int, Future] = {}
        self.host: dict[int, torch.Tensor] = {}  # id(parameter or buffer) -> its pinned host tensor

    def prefetch(self, i: int) -> None:
        if not self.active or i >= len(self.blocks) or i in self.pending:
            return
        main = torch.cuda.current_stream(self.device)
        self.side.wait_stream(main)  # earlier offloads of the same memory are queued on main
        self.pending[i] = self.worker.submit(self._copy_up, i)

    def _copy_up(self, i: int) -> tuple[list, torch.cuda.Event]:
        """On the worker thread: pin block i's host tensors and queue their copies on the side stream."""
        copies = []
        with torch.cuda.device(self.device), torch.cuda.stream(self.side):
            for t in _tensors(self.blocks[i]):
                host = t.data if t.data.is_pinned() else t.data.pin_memory()
                dev = host.to(self.device, non_blocking=True)
                copies.append((t, host, dev))
            event = torch.cuda.Event()
            event.record(self.side)
        return copies, event

    def onload(self, i: int) -> None:
        if not self.active:
            return
        self.prefetch(i)
        copies, event = self.pending.pop(i).result()
        main = torch.cuda.current_stream(self.device)
        main.wait_event(event)
        for t, host, dev in copies:
            dev.record_stream(main)
            self.host[id(t)] = host
            t.data = dev
        self.prefetch(i + 1)  # its copy overlaps block i's compute

    def offload(self, i: int) -> None:
        if not self.active:
            return
        for t in _tensors(self.blocks[i]):
            dev = t.data
            host = self.host.pop(id(t), None)
            if host is None:  # a bias the pruning added on the device
                host = torch.empty(dev.shape, dtype=dev.dtype, pin_memory=True)
            host.copy_(dev, non_blocking=True)
            t.data = host

    def release(self, i: int) -> None:
        """A block only read (a dense allocation pass) goes back the same way: the host copies
        are its weights."""
        self.offload(i)

    def finish(self) -> None:
        if self.active:
            for future in self.pending.values():  # a prefetch past the last block run (none normally)
                future.result()
            self.pending.clear()
            self.worker.shutdown()
            torch.cuda.synchronize(self.device)


@contextlib.contextmanager
def model_on_device(model: nn.Module, device: torch.device, plan: Plan, phases):
    """Plan `device` on a GPU: the whole model goes up first and comes back to where it was at the
    end (pruned). Otherwise the model stays where it is. `phases` (loop.Phases) times both moves on
    the host's clock."""
    home = next(model.parameters()).device
    moved = plan.name == "device" and device.type == "cuda" and home != device
    if moved:
        with phases.host("weights in (host)"):
            model.to(device)
    try:
        yield
    finally:
        if moved:
            with phases.host("weights out (host)"):
                model.to(home)
