"""Checkpoints after each block, so that a prune killed at block 70 of 80 resumes there.

After block i: its pruned weights (and biases) go to block-i.safetensors, the next block's inputs to
activations-i.safetensors, and then state.json names i as done: state.json is written last and
renamed into place, so it only ever names files that are complete. The allocation, the per-layer
counts so far and the config are in state.json; a resume with another config is refused, naming the
difference. Everything is safetensors and JSON (no pickle).

Under torchrun every rank checkpoints its own shard of the activations (activations-i-rankR), rank 0
the block and, once every rank's file is complete, state.json: the folder must be one that all ranks
see (a shared filesystem across nodes), and a resume needs the same number of ranks.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from ..config import PruneConfig
from ..errors import PrunekitError
from . import distributed

# settings that decide where and how a run executes, not what it computes
_RUN_ONLY = ("offload", "scratch_dir", "max_shard_size", "gguf_cache", "save_format", "allow_long_context",
             "checkpoint", "checkpoint_dir", "resume")


def _atomic_save(tensors: dict, path: str) -> None:
    tmp = f"{path}.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


class Checkpointer:
    """State of an interrupted prune in `folder`; `resume`: continue from it if it is there."""

    def __init__(self, folder: str, config, resume: bool = False):
        self.folder, self.resume = folder, resume
        self.config = {k: v for k, v in config.to_dict().items() if k not in _RUN_ONLY}
        self.rank, self.world_size = distributed.world()
        self.state: dict | None = None
        if resume and os.path.exists(self._path("state.json")):
            with open(self._path("state.json")) as f:
                self.state = json.load(f)
            ranks = self.state.get("world_size", 1)
            if ranks != self.world_size:
                raise PrunekitError(f"cannot resume from {folder}: it was made by {ranks} process(es), this run has "
                                    f"{self.world_size}: resume with the same torchrun --nproc-per-node/--nnodes")
            # a key the interrupted run did not save (an option added since) had its default then
            defaults = {k: v for k, v in PruneConfig().to_dict().items() if k not in _RUN_ONLY}
            saved = {**defaults, **self.state["config"]}
            diff = sorted(k for k in set(self.config) | set(saved) if self.config.get(k) != saved.get(k))
            if diff:
                k = diff[0]
                raise PrunekitError(f"cannot resume from {folder}: it was made with {k}={saved.get(k)!r}, "
                                    f"this run has {k}={self.config.get(k)!r}: use the same settings, or drop --resume")
        elif not resume and os.path.exists(self._path("state.json")):
            raise PrunekitError(f"{folder} holds an interrupted run: pass --resume to continue it, or remove it")

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    @property
    def done(self) -> int:
        """Blocks already pruned (0 when starting afresh)."""
        return self.state["done"] + 1 if self.state else 0

    def _activations(self, i: int) -> str:
        rank = f"-rank{self.rank}" if self.world_size > 1 else ""
        return self._path(f"activations-{i:05d}{rank}.safetensors")

    def save(self, i: int, block: torch.nn.Module, acts, allocation, counts, errors) -> None:
        os.makedirs(self.folder, exist_ok=True)
        if self.rank == 0:
            _atomic_save(dict(block.state_dict()), self._path(f"block-{i:05d}.safetensors"))
        if acts is not None:
            _atomic_save({"hidden": acts.hidden}, self._activations(i))
        distributed.barrier()  # every rank's files are complete before state.json names them
        if self.rank == 0:
            self._write_state(i, allocation, counts, errors)
        distributed.barrier()  # ... and state.json names block i before anyone drops block i - 1's inputs
        old = self._activations(i - 1)
        if os.path.exists(old):
            os.remove(old)

    def _write_state(self, i: int, allocation, counts, errors) -> None:
        state = {"done": i, "config": self.config, "world_size": self.world_size,
                 "allocation": {"sparsity": allocation.sparsity, "nm": allocation.nm, "blocks": allocation.blocks,
                                "info": allocation.info},
                 "counts": [[name, float(c), numel, info] for name, c, numel, info in counts],
                 "errors": [float(e) for e in errors]}
        tmp = self._path("state.json.tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self._path("state.json"))
        self.state = state

    def block(self, i: int) -> dict[str, torch.Tensor]:
        """The pruned weights (and biases) of finished block i."""
        return load_file(self._path(f"block-{i:05d}.safetensors"))

    def restore(self, blocks, acts, allocation_cls):
        """Load the finished blocks' weights (unless `blocks` is None: under disk offload they go
        straight to the output, see write_finished) and the next block's inputs; return the
        allocation, counts and errors of the interrupted run."""
        done = self.state["done"]
        for i in range(done + 1 if blocks is not None else 0):
            blocks[i].load_state_dict(self.block(i))
        if acts is not None:
            acts.hidden.copy_(load_file(self._activations(done))["hidden"])
        a = self.state["allocation"]
        nm = [{k: tuple(v) for k, v in blk.items()} for blk in a["nm"]] if a["nm"] is not None else None
        allocation = allocation_cls(a["sparsity"], nm, a["blocks"], a["info"])
        counts = [(name, torch.tensor(c), numel, info) for name, c, numel, info in self.state["counts"]]
        errors = [torch.tensor(e) for e in self.state["errors"]]
        return allocation, counts, errors

    def write_finished(self, streamer) -> None:
        """Disk offload: write the finished blocks from the checkpoint into the new output, in the
        order the output's shards were planned (what DiskBlocks.offload would have written)."""
        for i in range(self.done):
            streamer.write(i, self.block(i))

    def clear(self) -> None:
        if self.rank == 0:  # the rank that saves the result
            shutil.rmtree(self.folder, ignore_errors=True)
