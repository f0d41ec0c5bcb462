"""Execution: prune a model block by block over captured calibration inputs.

Capture the inputs of the first decoder block (hidden states and every keyword argument the block
receives); then per block: hooks accumulate float32 input statistics while the dense block runs over
all calibration batches, every mask of the block is computed from those statistics, weights are
zeroed (biases compensated where the scorer says so), and the pruned block runs again to make the
next block's inputs. Blocks live on the CPU and visit the compute device one at a time.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter, _ensure_bias, adapter_for
from .allocation import Allocation, allocate, needs_data
from .attention import cpu_bf16_attention
from .config import PruneConfig
from .errors import PrunekitError
from .scoring import Scorer, build_scorer
from .stats import ChannelStats

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """The one place that picks the compute device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PrunekitError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    return torch.device(name)


@dataclass
class Compute:
    """Where and in which precision the passes run.

    float32: everything in float32. bfloat16/float16: mixed precision, as torch.autocast means it:
    matmuls and attention run in the low dtype (weight matrices are cast once per pass, not per call),
    while the residual stream, norms, embeddings and every statistic stay float32. Rounding the
    residual stream to bf16 at every block would add error that builds up over the calibration passes
    and moves N:M masks; keeping it float32 costs a small share of a bf16 pass.
    """
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def from_config(cls, config: PruneConfig) -> "Compute":
        return cls(resolve_device(config.device), DTYPES[config.dtype])

    @classmethod
    def for_stats(cls, config: PruneConfig) -> "Compute":
        """The dense statistics passes: --stats-dtype, else --dtype. Their precision decides the masks;
        the pruned passes that only carry inputs forward tolerate bf16 (see README, Benchmarks)."""
        return cls(resolve_device(config.device), DTYPES[config.stats_dtype or config.dtype])

    @property
    def mixed(self) -> bool:
        return self.dtype != torch.float32

    @contextlib.contextmanager
    def run(self, module: nn.Module):
        """Run `module` (a block or a whole model) in this precision, gradients off. Inside, the
        weight matrices of its matmul layers point to low-precision copies; on exit they point back
        to the float32 masters, which pruning edits. Embeddings, norms and biases are not cast."""
        saved, handles = [], []
        if self.mixed:
            embeddings = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
            for p in module.parameters():
                if p.is_floating_point() and p.dim() >= 2 and p.dtype != self.dtype and id(p) not in embeddings:
                    saved.append((p, p.data))
                    p.data = p.data.to(self.dtype)
            cast = {id(p) for p, _ in saved}
            lower = _LowerOnce(self.dtype)
            handles = [m.register_forward_pre_hook(lower) for m in module.modules()
                       if id(getattr(m, "weight", None)) in cast]
        try:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self.mixed), \
                    cpu_bf16_attention(self.device.type == "cpu" and self.dtype == torch.bfloat16):
                yield module
        finally:
            for h in handles:
                h.remove()
            for p, data in saved:
                p.data = data

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The residual stream goes in as float32 (autocast lowers it where a matmul reads it)."""
        return h.to(self.device, torch.float32)

    def tree(self, obj):
        """Move tensors in (nested) args to the device; floating ones (rotary tables, additive masks)
        to the compute dtype, as a low-precision model would make them."""
        if isinstance(obj, torch.Tensor):
            return obj.to(self.device, self.dtype) if obj.is_floating_point() else obj.to(self.device)
        if isinstance(obj, (tuple, list)):
            return type(obj)(self.tree(o) for o in obj)
        if isinstance(obj, dict):
            return {k: self.tree(v) for k, v in obj.items()}
        return obj


class _LowerOnce:
    """Pre-hook for the cast matmul layers: hand them their float32 input in the compute dtype,
    converting each input tensor once. autocast alone would convert the same normed hidden state
    again for q, k and v (and gate, up). Hooks registered earlier (the
    statistics) still see the float32 input."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.last, self.lowered = dtype, None, None

    def __call__(self, module, args):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == self.dtype:
            return None
        if x is not self.last:
            self.last, self.lowered = x, x.to(self.dtype)
        return (self.lowered,) + tuple(args[1:])


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor]                 # per batch (B, T, H), float32, on the CPU
    extra: list[tuple[tuple, dict]]            # per batch: the block's other positional args and kwargs


def _move_shell(model: nn.Module, adapter: Adapter, device: torch.device) -> None:
    """Move everything but the decoder blocks (embeddings, rotary tables, final norm, head)."""
    parent_path, _, attr = adapter.blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    blocks = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList())
    try:
        model.to(device)
    finally:
        setattr(parent, attr, blocks)


def capture_block_inputs(model: nn.Module, adapter: Adapter, samples: torch.Tensor, batch_size: int,
                         compute: Compute) -> BlockInputs:
    """Run the model up to its first block and keep what that block receives, batch by batch."""
    blocks = adapter.blocks(model)
    hidden, extra = [], []

    def grab(module, args, kwargs):
        hidden.append(args[0].detach().float().cpu())
        extra.append((args[1:], dict(kwargs)))
        raise _StopForward

    _move_shell(model, adapter, compute.device)
    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in tqdm(samples.split(batch_size), desc="calibration", leave=False):
                try:
                    model(input_ids=batch.to(compute.device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
        _move_shell(model, adapter, torch.device("cpu"))
    return BlockInputs(hidden, extra)


def run_block(block: nn.Module, inputs: BlockInputs, compute: Compute) -> list[torch.Tensor]:
    """One pass of `block` over every calibration batch; outputs kept in float32 on the CPU. A pass
    stopped by collect_stats(stop_after=...) yields no outputs (statistics only)."""
    outs = []
    with compute.run(block):
        for h, (args, kwargs) in zip(inputs.hidden, inputs.extra):
            try:
                out = block(compute.hidden(h), *compute.tree(args), **compute.tree(kwargs))
            except _StopForward:
                continue
            out = out[0] if isinstance(out, (tuple, list)) else out
            outs.append(out.float().cpu())
    return outs


@contextlib.contextmanager
def collect_stats(linears: dict[str, nn.Module], stop_after: str | None = None, centred=lambda name: True):
    """Hooks that accumulate ChannelStats of every linear's input while the block runs. With
    `stop_after` (the block's last linear), the pass ends once that layer's input is counted: a
    statistics-only pass need not compute the rest of the block. `centred(name)`: whether that
    linear's statistics need the mean and variance (linears sharing an input share the answer)."""
    stats: dict[str, ChannelStats] = {}
    last = [None, None]  # (input tensor, linear that counted it): q/k/v and gate/up read one tensor
    handles = []
    for name, module in linears.items():
        def hook(mod, args, name=name):
            x = args[0].detach()
            if x is last[0]:
                stats[name] = stats[last[1]]  # same input: share the statistics, count once
            else:
                last[0], last[1] = x, name
                if name not in stats:
                    stats[name] = ChannelStats(x.shape[-1], centred=centred(name))
                stats[name].update(x)
            if name == stop_after:
                raise _StopForward
        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        last[0] = None
        for h in handles:
            h.remove()


@dataclass
class AllocationContext:
    """What an allocator may look at: the model, its adapter, the config, and dense passes."""
    model: nn.Module
    adapter: Adapter
    config: PruneConfig
    compute: Compute
    inputs: BlockInputs | None

    @property
    def num_blocks(self) -> int:
        return len(self.adapter.blocks(self.model))

    def parameter_counts(self) -> list[dict[str, int]]:
        return self.adapter.parameter_counts(self.model)

    def dense_stats(self, desc: str = "dense pass"):
        """Yield (block index, block, {linear: ChannelStats}) over a dense forward of all blocks;
        the captured inputs are left untouched. The statistics hold sums of squares (Wanda's s_j)."""
        if self.inputs is None:
            raise PrunekitError(f"allocation {self.config.allocation!r} needs calibration data")
        current = BlockInputs(list(self.inputs.hidden), self.inputs.extra)
        compute = Compute.for_stats(self.config)
        for i, block in enumerate(tqdm(self.adapter.blocks(self.model), desc=desc, leave=False)):
            block.to(compute.device)
            with collect_stats(self.adapter.block_linears(block), centred=lambda name: False) as stats:
                current.hidden = run_block(block, current, compute)
            block.to("cpu")
            yield i, block, stats


def _nm_targets(allocation: Allocation, ctx: AllocationContext) -> None:
    """Turn per-layer sparsities into per-layer N:M (M fixed by the pattern)."""
    n, m = ctx.config.nm
    if ctx.config.allocation == "uniform":
        allocation.nm = [{name: (n, m) for name in blk} for blk in allocation.sparsity]
        return
    from .allocation.mapping import nm_allocation
    names = [(i, name) for i, blk in enumerate(allocation.sparsity) for name in blk]
    params = ctx.parameter_counts()
    counts = nm_allocation([allocation.sparsity[i][k] for i, k in names], [params[i][k] for i, k in names], m)
    allocation.nm = [dict() for _ in allocation.sparsity]
    for (i, name), n_l in zip(names, counts):
        allocation.nm[i][name] = (int(n_l), m)
        allocation.sparsity[i][name] = n_l / m
    for entry in allocation.blocks:
        blk = allocation.sparsity[entry["block"]]
        entry["sparsity"] = sum(blk[k] * params[entry["block"]][k] for k in blk) / sum(params[entry["block"]].values())


def check_prunable(model: nn.Module, adapter: Adapter, config: PruneConfig) -> None:
    """Fail before any work on an N:M pattern that does not fit a layer."""
    nm = config.nm
    if nm is None:
        return
    for name, module in adapter.block_linears(adapter.blocks(model)[0]).items():
        cols = adapter.weight(module).shape[1]
        if cols % nm[1]:
            raise PrunekitError(f"pattern {config.pattern} needs in_features divisible by {nm[1]}, "
                                f"but {name} has {cols}: choose an M that divides it")


def prune_linear(module: nn.Module, adapter: Adapter, scorer: Scorer, stats: ChannelStats | None,
                 norm_fed: bool, sparsity: float, nm: tuple[int, int] | None, name: str) -> float:
    """Score, mask, compensate and zero one linear layer; return its achieved sparsity."""
    weight = adapter.weight(module)
    w = weight.detach().float()
    if stats is not None:
        stats.check_finite(name)
    scores = scorer.scores(w, stats, norm_fed)
    low, high = scores.aminmax()  # NaN propagates to both; one pass instead of isfinite's three
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise PrunekitError(f"NaN/inf in the pruning scores of {name}: check the model weights, or try --dtype float32")
    mask = scorer.mask(scores, sparsity, nm)
    delta = scorer.bias_delta(w, mask, stats, norm_fed)
    with torch.no_grad():
        if delta is not None:
            _ensure_bias(module)
            module.bias.add_(delta.to(module.bias.dtype))
        weight.masked_fill_(mask.to(weight.device), 0)
    return mask.float().mean().item()


@dataclass
class PruneReport:
    layers: list[dict] = field(default_factory=list)      # {"name", "sparsity"} per pruned linear
    allocation: list[dict] = field(default_factory=list)  # per block: {"block", "metric", "sparsity"}
    allocation_info: dict = field(default_factory=dict)   # allocator extras (e.g. ESD seconds, per-matrix alpha)
    sparsity: float = 0.0                                 # achieved, parameter-weighted over pruned linears
    prune_seconds: float = 0.0


def prune(model: nn.Module, config: PruneConfig, samples: torch.Tensor | None = None,
          adapter: Adapter | None = None) -> PruneReport:
    """Prune `model` in place. `samples`: (nsamples, seqlen) calibration token ids (unused by
    magnitude with a uniform allocation)."""
    start = time.perf_counter()
    adapter = adapter or adapter_for(model.config.model_type)
    scorer = build_scorer(config)
    compute, stats_compute = Compute.from_config(config), Compute.for_stats(config)
    check_prunable(model, adapter, config)
    blocks = adapter.blocks(model)
    inputs = None
    if scorer.needs_stats or needs_data(config.allocation):
        if samples is None:
            raise PrunekitError(f"method {config.method} needs calibration data: pass --calib")
        inputs = capture_block_inputs(model, adapter, samples, config.effective_batch_size, compute)
    ctx = AllocationContext(model, adapter, config, compute, inputs)
    alloc = allocate(config.allocation, ctx)
    if config.nm is not None:
        _nm_targets(alloc, ctx)
    for name in adapter.linears:
        if scorer.updates_bias(name in adapter.norm_fed):
            for block in blocks:  # zero biases first, so the saved config can declare them
                _ensure_bias(block.get_submodule(name))
            if adapter.can_hold_bias(name, blocks[0].get_submodule(name)):
                adapter.enable_bias(model, name)

    def centred(name: str) -> bool:
        return scorer.centred(name in adapter.norm_fed)

    report = PruneReport(allocation=alloc.blocks, allocation_info=alloc.info)
    pruned = total = 0
    for i, block in enumerate(tqdm(blocks, desc=f"pruning ({config.method})")):
        block.to(compute.device)
        linears = adapter.block_linears(block)
        stats = {}
        if scorer.needs_stats:
            with collect_stats(linears, adapter.linears[-1], centred) as stats:
                run_block(block, inputs, stats_compute)  # dense pass: statistics only
        for name, module in linears.items():
            nm = alloc.nm[i][name] if alloc.nm is not None else None
            achieved = prune_linear(module, adapter, scorer, stats.get(name), name in adapter.norm_fed,
                                    alloc.sparsity[i][name], nm, f"block {i} {name}")
            full = f"{adapter.blocks_path}.{i}.{name}"
            report.layers.append({"name": full, "sparsity": achieved})
            numel = module.weight.numel()
            pruned += achieved * numel
            total += numel
        if scorer.needs_stats and i + 1 < len(blocks):
            inputs.hidden = run_block(block, inputs, compute)  # pruned pass: next block's inputs
        block.to("cpu")
    report.sparsity = pruned / total
    report.prune_seconds = time.perf_counter() - start
    return report


def unsavable_biases(model: nn.Module, adapter: Adapter, config: PruneConfig) -> list[str]:
    """Linears that prune() would give a bias which this architecture's checkpoints cannot store."""
    scorer = build_scorer(config)
    block = adapter.blocks(model)[0]
    return [n for n in adapter.linears if scorer.updates_bias(n in adapter.norm_fed)
            and not adapter.can_hold_bias(n, block.get_submodule(n))]
