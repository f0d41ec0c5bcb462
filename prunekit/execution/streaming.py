"""Block weights visiting a GPU from host memory, one block at a time, with every copy made by a
worker thread so that the main thread only queues compute.

Plans `stream` and `offload`: block i + 1 is copied up on a side stream while block i computes, and a
block goes back to its host tensors when it is done. Plan `device`: every block's copy is queued
at the start and a block stays on the GPU until it is pruned, so a dense allocation pass and the
pruning pass share one upload. In every plan a pruned block's weights are copied back into the
tensors they came from, by the worker, while the next block computes; blocks only read are not
copied back at all, and the model's other weights (embeddings, head) only visit the GPU for the
input capture (`visiting`). On the CPU, or for a model already on the GPU, nothing moves.

The host tensors stay what they were (pageable, usually), and every copy goes through page-locked
staging memory, two slots of one block each (`PinnedRing`): the worker copies a block into a slot
on the CPU, then up to the GPU asynchronously; back, down into a slot, then into the host tensors.
A copy straight from or to pageable memory is staged by the driver and, measured on an H100 with a
7B model, did not overlap the kernels: the main thread waited 10 s of a 16.7 s Wanda prune for
uploads queued long before (README, GPU). Page-locking the weights themselves (`pin_memory`) costs
more than the copy. Copying the pruned weights back into the same tensors needs no new host memory:
moving a whole 7B model back with `model.to("cpu")` allocates and page-faults 13 GB.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from .placement import Plan


def _tensors(module: nn.Module):
    yield from module.parameters()
    yield from module.buffers()


def _on(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


@contextlib.contextmanager
def visiting(module: nn.Module, device: torch.device | str, exclude: nn.Module | None = None, copy=None):
    """A read-only visit to `device`: inside, every parameter and buffer of `module` (but those of
    `exclude`) points at a copy there; after, at its own tensor again, with nothing copied back, even
    after an error. What `module.to(device)` and back would do for a module the visit does not edit,
    without allocating and filling the host memory anew (13 GB for a 7B model). `copy(tensor)`: how a
    tensor gets there (default `.to(device)`; a test on the CPU passes a clone)."""
    device = torch.device(device)
    copy = copy or (lambda t: t.to(device, non_blocking=True))
    skip = {id(t) for t in _tensors(exclude)} if exclude is not None else set()
    saved = [(t, t.data) for t in _tensors(module) if id(t) not in skip and not _on(t, device)]
    try:
        for t, data in saved:
            t.data = copy(data)
        yield module
    finally:
        for t, data in saved:
            t.data = data


ALIGN = 512  # bytes: every tensor's place in a staging slot starts at a multiple of this


class PinnedRing:
    """Page-locked staging memory: `slots` buffers, used in turn, each grown to the largest block it
    has carried. A slot is handed out again only once the copy that last read it has finished (its
    event); a caller that syncs itself leaves the event None."""

    def __init__(self, pinned, slots: int = 2):
        self.pinned = pinned  # nbytes -> a uint8 host buffer (page-locked on a GPU machine)
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self.events: list = [None] * slots
        self.next = 0

    def take(self, tensors: list[torch.Tensor]) -> tuple[int, list[torch.Tensor]]:
        """(slot, one view per tensor, of its shape and dtype), once that slot is free."""
        k, self.next = self.next, (self.next + 1) % len(self.buffers)
        if self.events[k] is not None:
            self.events[k].synchronize()
            self.events[k] = None
        offsets, at = [], 0
        for t in tensors:
            offsets.append(at)
            at += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        if self.buffers[k] is None or self.buffers[k].numel() < at:
            self.buffers[k] = None
            self.buffers[k] = self.pinned(at)
        buf = self.buffers[k]
        views = [buf[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape) for o, t in zip(offsets, tensors)]
        return k, views


class BlockStreamer:
    """onload(i) before block i computes, offload(i) when block i is pruned (its weights go back to
    the host), release(i) for a block that was only read. `finish()` waits for the last copies: the
    host weights are final after it; `close()` (always, also after an error) brings back any block
    still on the device and stops the worker."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device, plan: Plan):
        self.blocks, self.device = blocks, device
        home = next(_tensors(blocks), torch.empty(0)).device
        self.active = device.type == "cuda" and home.type == "cpu"
        self.resident = plan.name == "device"  # a block stays on the device until it is pruned
        self.side = torch.cuda.Stream(device) if self.active else None
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="prunekit-copies") if self.active else None
        self.ring = PinnedRing(self._pinned)  # used by the worker alone
        self.pending: dict[int, Future] = {}              # uploads queued, not yet installed
        self.installed: dict[int, dict[int, torch.Tensor]] = {}  # block -> id(tensor) -> its host tensor
        self.copies_back: list[Future] = []

    # the copies and the staging memory, one place each (a test on the CPU replaces them)
    @staticmethod
    def _pinned(nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def _up(self, host: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
        """On the worker, on the side stream: host -> its staging view (a CPU copy) -> the GPU (async)."""
        stage.copy_(host)
        return self._to_device(stage)

    def _to_device(self, stage: torch.Tensor) -> torch.Tensor:
        return stage.to(self.device, non_blocking=True)

    def _down(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], stages: list[torch.Tensor]) -> None:
        """On the worker, on the side stream: each GPU tensor -> its staging view (async), wait for
        those copies, then staging -> the host tensor (a CPU copy)."""
        for (dev, _), stage in zip(pairs, stages):
            stage.copy_(dev, non_blocking=True)
        done = torch.cuda.Event()
        done.record(self.side)
        done.synchronize()
        for (_, host), stage in zip(pairs, stages):
            host.copy_(stage)

    def start(self, first: int = 0) -> None:
        """Queue the first block's upload; under plan `device` every block's from `first` on, to arrive
        while the first blocks compute. Call it once the blocks' parameters are final (biases added)."""
        for i in range(first, len(self.blocks) if self.resident else first + 1):
            self.prefetch(i)

    def prefetch(self, i: int) -> None:
        if self.active and i < len(self.blocks) and i not in self.pending and i not in self.installed:
            self.pending[i] = self.worker.submit(self._copy_up, i)

    def _copy_up(self, i: int) -> tuple[list, torch.cuda.Event]:
        """On the worker: queue block i's copies on the side stream and mark their end."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.side):
            tensors = list(_tensors(self.blocks[i]))
            slot, stages = self.ring.take([t.data for t in tensors])
            copies = [(t, self._up(t.data, stage)) for t, stage in zip(tensors, stages)]
            event = torch.cuda.Event()
            event.record(self.side)
            self.ring.events[slot] = event  # the slot is free again once these copies are done
        return copies, event

    def onload(self, i: int) -> None:
        if not self.active:
            return
        if i not in self.installed:
            self.prefetch(i)
            copies, event = self.pending.pop(i).result()
            main = torch.cuda.current_stream(self.device)
            main.wait_event(event)  # this block's copies only
            hosts = {}
            for t, dev in copies:
                dev.record_stream(main)
                hosts[id(t)] = t.data
                t.data = dev
            self.installed[i] = hosts
        self.prefetch(i + 1)  # its copy overlaps block i's compute

    def install_all(self) -> None:
        """Every block on the device now (an allocation that reads all the weights, plan `device`)."""
        for i in range(len(self.blocks) if self.active and self.resident else 0):
            self.onload(i)

    def offload(self, i: int) -> None:
        """Block i is pruned: the module points at its host tensors again at once, and the worker
        copies the pruned weights into them once the queued compute has made them (finish() waits)."""
        if not self.active or i not in self.installed:
            return
        hosts = self.installed.pop(i)
        main = torch.cuda.current_stream(self.device)
        made = torch.cuda.Event()
        made.record(main)
        pairs = []
        for t in _tensors(self.blocks[i]):
            dev = t.data
            host = hosts.get(id(t))
            if host is None:  # a bias the pruning added on the device
                host = torch.empty(dev.shape, dtype=dev.dtype)
            dev.record_stream(self.side)
            pairs.append((dev, host))
            t.data = host
        self.copies_back.append(self.worker.submit(self._copy_down, pairs, made))

    def _copy_down(self, pairs: list, made: torch.cuda.Event) -> None:
        """On the worker: after the compute that made them, copy block weights into their host tensors,
        through a staging slot."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.side):
            self.side.wait_event(made)
            _, stages = self.ring.take([dev for dev, _ in pairs])
            self._down(pairs, stages)  # synchronous: the slot is free after it

    def release(self, i: int) -> None:
        """A block only read (a dense allocation pass): under plan `device` it stays; otherwise the
        module points at its host tensors again, unchanged, so nothing is copied back."""
        if not self.active or self.resident or i not in self.installed:
            return
        hosts = self.installed.pop(i)
        for t in _tensors(self.blocks[i]):
            t.data = hosts[id(t)]

    def finish(self) -> None:
        """Every block back on the host, every copy done: the host weights are final."""
        if not self.active:
            return
        for i in list(self.installed):  # still on the device (plan `device`, never pruned): copied back
            self.offload(i)
        for future in [*self.pending.values(), *self.copies_back]:
            future.result()
        self.pending.clear()
        self.copies_back.clear()
        torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Stop the worker, always (also after an error). A block an error left on the device goes back
        to its host tensors first, as it is then; an error in doing so gives way to the first one."""
        if self.worker is None:
            return
        try:
            if self.installed:
                with contextlib.suppress(Exception):
                    self.finish()
        finally:
            self.worker.shutdown(wait=True)
            self.worker = None
