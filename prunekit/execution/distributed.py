"""Distributed calibration on torch.distributed (gloo on the CPU, NCCL on GPUs), as torchrun starts it.

The calibration samples are sharded over the ranks; each rank runs its shard through every block.
After a block's statistics pass the statistics are combined over the ranks (sums of squares, token
and sequence counts and X^T X all-reduced; STADE's means and M2 gathered and merged with Chan's
formula in rank order), rank 0 computes the masks and prunes, and the pruned block is broadcast, so
every rank holds the same model. Rank 0 writes the output and the report.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..stats import chan_merge


def init_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a no-op otherwise. True when this
    call made the group (its caller then leaves it with `finish`); a group the caller's own code made
    is used as it is and left to that code."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cuda = torch.cuda.is_available() and device != "cpu"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        return True
    return False


def finish() -> None:
    """Leave the process group once this rank's collectives are done. A gloo group left for the
    interpreter's exit to tear down can abort the process (SIGABRT, "terminate called without an
    active exception": its worker threads still hold tensors while Python shuts down; see
    pytorch/pytorch#190489). Called on success only: after an error another rank may still be
    inside a collective, and destroying the group under it can hang."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_rank() -> int:
    """This process's rank as torchrun numbered it (0 outside torchrun); still known after `finish`."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def shard(samples: torch.Tensor) -> torch.Tensor:
    """This rank's calibration sequences: every world-th one, starting at the rank."""
    rank, size = world()
    return samples[rank::size] if size > 1 else samples


def combine_stats(stats: dict) -> None:
    """Combine every distinct ChannelStats of a block over the ranks, in place."""
    if world()[1] == 1:
        return
    for st in {id(s): s for s in stats.values()}.values():
        device = st.sum_sq.device
        counts = torch.tensor([st.nseq, st.ntokens], dtype=torch.int64, device=device)
        if st.centred:  # gather every rank's (count, mean, M2), merge them in rank order
            size = world()[1]
            all_counts = [torch.empty_like(counts) for _ in range(size)]
            means = [torch.empty_like(st.mean) for _ in range(size)]
            m2s = [torch.empty_like(st.m2) for _ in range(size)]
            dist.all_gather(all_counts, counts)
            dist.all_gather(means, st.mean.contiguous())
            dist.all_gather(m2s, st.m2.contiguous())
            n, mean, m2 = int(all_counts[0][1]), means[0], m2s[0]
            for c, mu, m in zip(all_counts[1:], means[1:], m2s[1:]):
                mean, m2 = chan_merge(n, mean, m2, int(c[1]), mu, m)
                n += int(c[1])
            st.mean, st.m2 = mean, m2
        dist.all_reduce(counts)
        st.nseq, st.ntokens = int(counts[0]), int(counts[1])
        dist.all_reduce(st.sum_sq)
        if st.xtx is not None:
            dist.all_reduce(st.xtx)


def combine_error(meter) -> None:
    """The reconstruction error's sums over all ranks' tokens."""
    if world()[1] > 1:
        dist.all_reduce(meter.num)
        dist.all_reduce(meter.den)


def broadcast_block(block: torch.nn.Module) -> None:
    """Rank 0's pruned block (weights, biases) to every rank."""
    if world()[1] == 1:
        return
    for t in list(block.parameters()) + list(block.buffers()):
        dist.broadcast(t.data, 0)


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's verdict (e.g. NaN found) to every rank, so all stop together instead of hanging."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.broadcast(t, 0)
    return bool(t.item())
