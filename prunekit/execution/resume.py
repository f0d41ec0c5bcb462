"""Checkpoints after each block, so that a prune killed at block 70 of 80 resumes there.

After block i: its pruned weights (and biases) go to block-i.safetensors, the next block's inputs to
activations-i.safetensors, and then state.json names i as done: state.json is written last and
renamed into place, so it only ever names files that are complete. The allocation, the per-layer
counts so far and the config are in state.json; a resume with another config is refused, naming the
difference. Everything is safetensors and JSON (no pickle).
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from ..errors import PrunekitError

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
        self.state: dict | None = None
        if resume and os.path.exists(self._path("state.json")):
            with open(self._path("state.json")) as f:
                self.state = json.load(f)
            diff = sorted(k for k in set(self.config) | set(self.state["config"])
                          if self.config.get(k) != self.state["config"].get(k))
            if diff:
                k = diff[0]
                raise PrunekitError(f"cannot resume from {folder}: it was made with {k}={self.state['config'].get(k)!r}, "
                                    f"this run has {k}={self.config.get(k)!r}: use the same settings, or drop --resume")
        elif not resume and os.path.exists(self._path("state.json")):
            raise PrunekitError(f"{folder} holds an interrupted run: pass --resume to continue it, or remove it")

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    @property
    def done(self) -> int:
        """Blocks already pruned (0 when starting afresh)."""
        return self.state["done"] + 1 if self.state else 0

    def save(self, i: int, block: torch.nn.Module, acts, allocation, counts, errors) -> None:
        os.makedirs(self.folder, exist_ok=True)
        _atomic_save(dict(block.state_dict()), self._path(f"block-{i:05d}.safetensors"))
        if acts is not None:
            _atomic_save({"hidden": acts.hidden}, self._path(f"activations-{i:05d}.safetensors"))
        state = {"done": i, "config": self.config,
                 "allocation": {"sparsity": allocation.sparsity, "nm": allocation.nm, "blocks": allocation.blocks,
                                "info": allocation.info},
                 "counts": [[name, float(c), numel, info] for name, c, numel, info in counts],
                 "errors": [float(e) for e in errors]}
        tmp = self._path("state.json.tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self._path("state.json"))
        old = self._path(f"activations-{i - 1:05d}.safetensors")
        if os.path.exists(old):
            os.remove(old)
        self.state = state

    def restore(self, blocks, acts, allocation_cls):
        """Load the finished blocks' weights and the next block's inputs; return the allocation,
        counts and errors of the interrupted run."""
        done = self.state["done"]
        for i in range(done + 1):
            blocks[i].load_state_dict(load_file(self._path(f"block-{i:05d}.safetensors")))
        if acts is not None:
            acts.hidden.copy_(load_file(self._path(f"activations-{done:05d}.safetensors"))["hidden"])
        a = self.state["allocation"]
        nm = [{k: tuple(v) for k, v in blk.items()} for blk in a["nm"]] if a["nm"] is not None else None
        allocation = allocation_cls(a["sparsity"], nm, a["blocks"], a["info"])
        counts = [(name, torch.tensor(c), numel, info) for name, c, numel, info in self.state["counts"]]
        errors = [torch.tensor(e) for e in self.state["errors"]]
        return allocation, counts, errors

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
