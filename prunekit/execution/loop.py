"""The block loop: prune a model block by block over captured calibration inputs.

Capture the inputs of the first decoder block (hidden states and every keyword argument the block
receives); then per block: hooks accumulate float32 input statistics while the dense block runs over
all calibration batches, every mask of the block is computed from those statistics, weights are
zeroed (biases compensated, kept weights updated where the method says so), and the pruned block
runs again to make the next block's inputs. Where weights and activations live is the placement
plan's decision; the loop reads the host once per block (a NaN check, a block late on a GPU, so it
never waits there) and gathers its numbers at the end.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import Adapter, _ensure_bias, adapter_for
from ..allocation import Allocation, allocate, needs_data
from ..config import PruneConfig
from ..errors import PrunekitError
from ..scoring import Scorer, build_scorer
from . import distributed
from .disk import DiskBlocks
from .passes import Activations, ErrorMeter, Scratch, capture_block_inputs, collect_stats, run_block
from .placement import Plan, Sizes, plan_batch, plan_placement, plan_storage
from .precision import DTYPES, Compute, dtype_name
from .streaming import BlockStreamer


class Phases:
    """Seconds per phase of the loop. On a GPU, CUDA events (no host sync until `totals`)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list[tuple[str, object, object]] = []
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((name, start, end))
        else:
            with self.host(name):
                yield

    @contextlib.contextmanager
    def host(self, name: str):
        """Host wall-clock seconds, on any device: work that blocks the host (moving or pinning
        weights, reading them from disk) and starves the GPU's queue while it runs."""
        t = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def totals(self) -> dict[str, float]:
        if self.events:
            torch.cuda.synchronize()
            for name, start, end in self.events:
                self.seconds[name] = self.seconds.get(name, 0.0) + start.elapsed_time(end) / 1000
            self.events.clear()
        return dict(self.seconds)


@dataclass
class AllocationContext:
    """What an allocator may look at: the model, its adapter, the config, and dense passes."""
    model: nn.Module
    adapter: Adapter
    config: PruneConfig
    compute: Compute
    inputs: Activations | None
    streamer: BlockStreamer | DiskBlocks

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
        current = self.inputs.clone()
        compute = Compute.for_stats(self.config)
        for i, block in enumerate(tqdm(self.adapter.blocks(self.model), desc=desc, leave=False)):
            self.streamer.onload(i)
            with collect_stats(self.adapter.block_linears(block), centred=lambda name: False) as stats:
                run_block(block, current, compute, outputs=current)
            distributed.combine_stats(stats)
            yield i, block, stats
            self.streamer.release(i)
        del current

    def lazy_weights(self):
        """Under disk offload: (a callable yielding (name, weight) one at a time from the checkpoint,
        a key naming the checkpoint's files); None when the weights are in memory."""
        if not hasattr(self.streamer, "named_weights"):
            return None
        return self.streamer.named_weights, self.streamer.reader.key()


def _nm_targets(allocation: Allocation, ctx: AllocationContext) -> None:
    """Turn per-layer sparsities into per-layer N:M (M fixed by the pattern)."""
    n, m = ctx.config.nm
    if ctx.config.allocation == "uniform":
        allocation.nm = [{name: (n, m) for name in blk} for blk in allocation.sparsity]
        return
    from ..allocation.mapping import nm_allocation
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


def prune_linear(module: nn.Module, adapter: Adapter, scorer: Scorer, stats, norm_fed: bool,
                 sparsity: float, nm: tuple[int, int] | None, name: str = "") -> tuple:
    """Score, mask, compensate and zero one linear layer in place, in its own dtype. Returns the
    number of pruned weights and the NaN/inf flags (statistics, scores) as device tensors, and the
    method's per-layer facts (or None)."""
    weight = adapter.weight(module)
    try:
        result = scorer.prune(weight.detach().float(), stats, sparsity, nm, norm_fed)
    except PrunekitError as exc:
        raise PrunekitError(f"{name}: {exc}") from None
    with torch.no_grad():
        if result.bias_delta is not None:
            _ensure_bias(module)
            module.bias.add_(result.bias_delta.to(module.bias.dtype))
        if result.weight is not None:
            weight.copy_(result.weight)
        weight.masked_fill_(result.mask, 0)
    flags = [stats.nonfinite() if stats is not None else None, result.nonfinite]
    return result.mask.sum(), flags, result.info


class NaNCheck:
    """The NaN/inf flags of each block's statistics and scores, the loop's one read of the host per
    block. With `lag` (one process on a GPU) a block's flags are copied to the host behind its masks
    and read a block later, when that copy is long done: the loop never waits for the GPU, and a
    NaN still stops the prune, one block on, naming its block. Without, they are read at once."""

    def __init__(self, lag: bool):
        self.lag, self.pending = lag, None

    def add(self, i: int, names: list[str], flags: list[list]) -> PrunekitError | None:
        """Block i's flags in; the error for the block that is read now (i, or i - 1 with lag), if any."""
        present = [(name, kind, f) for name, pair in zip(names, flags)
                   for kind, f in zip(("calibration activations", "pruning scores"), pair) if f is not None]
        entry = None
        if present:
            bad = torch.stack([f.reshape(()) for _, _, f in present])
            event = None
            if self.lag and bad.is_cuda:
                bad = bad.to("cpu", non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            entry = (i, [(name, kind) for name, kind, _ in present], bad, event)
        if not self.lag:
            return _verdict(entry)
        entry, self.pending = self.pending, entry
        return _verdict(entry)

    def done(self) -> PrunekitError | None:
        """The last block's verdict (with lag)."""
        entry, self.pending = self.pending, None
        return _verdict(entry)


def _verdict(entry) -> PrunekitError | None:
    if entry is None:
        return None
    i, present, bad, event = entry
    if event is not None:
        event.synchronize()
    for (name, kind), b in zip(present, bad.tolist()):
        if b:
            return PrunekitError(f"NaN/inf in the {kind} of block {i} {name}: "
                                 "try --dtype float32 or check the model weights")
    return None


def _lagged_checks(device: torch.device, checkpointed: bool) -> bool:
    """Read the NaN flags a block late: on a GPU, in one process (torchrun ranks agree every block),
    and not when each block is saved for a resume (a saved block must have passed its check)."""
    return device.type == "cuda" and distributed.world()[1] == 1 and not checkpointed


@dataclass
class PruneReport:
    layers: list[dict] = field(default_factory=list)      # {"name", "sparsity"} per pruned linear
    allocation: list[dict] = field(default_factory=list)  # per block: {"block", "metric", "sparsity"}
    allocation_info: dict = field(default_factory=dict)   # allocator extras (e.g. ESD seconds, per-matrix alpha)
    sparsity: float = 0.0                                 # achieved, parameter-weighted over pruned linears
    prune_seconds: float = 0.0
    placement: dict = field(default_factory=dict)         # the plan (Plan.to_dict)
    phases: dict = field(default_factory=dict)            # seconds per phase of the loop
    block_error: list[dict] = field(default_factory=list)  # {"block", "rel_mse"} with record_error


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def host_free_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def placement_sizes(model: nn.Module, adapter: Adapter, config: PruneConfig, compute: Compute,
                    scorer: Scorer, shape: tuple[int, int] | None, storage: torch.dtype | None = None,
                    batch: int | None = None) -> Sizes:
    """The sizes the planner needs, from the model and the config alone (nothing runs); the
    activations in `storage` (default: compute's), `batch` sequences a forward (default: the config's)."""
    storage = storage or compute.storage
    blocks = adapter.blocks(model)
    in_blocks = {id(p) for p in blocks.parameters()}
    block_bytes = [_bytes(list(b.parameters()) + list(b.buffers())) for b in blocks]
    shell = _bytes(p for p in model.parameters() if id(p) not in in_blocks)
    hidden = model.get_input_embeddings().weight.shape[-1]
    linears = adapter.block_linears(blocks[0])
    widest = max(max(adapter.weight(m).shape) for m in linears.values())
    nsamples, seqlen = shape if shape is not None else (0, 0)
    batch = min(batch or config.effective_batch_size, max(nsamples, 1))
    itemsize = torch.finfo(storage).bits // 8
    acts, batch_acts = nsamples * seqlen * hidden * itemsize, batch * seqlen * hidden * itemsize
    tokens = batch * seqlen
    # a pass over one batch: float32 residual stream and normed copies, the MLP's widest activations,
    # plus the statistics (X^T X for SparseGPT: one columns^2 float32 matrix per distinct input, and
    # one more of the widest for a moment: a batch's X^T X on a GPU, the mirror on the CPU)
    inputs = [adapter.weight(linears[group[0]]).shape[1] for group in adapter.input_groups()]
    work = tokens * (6 * hidden + 3 * widest) * 4
    work += sum(c * c * 4 for c in inputs) + max(inputs) ** 2 * 4 if scorer.gram(True) or scorer.gram(False) else 0
    copies = 2 if (config.record_error or needs_data(config.allocation)) else 1
    device_free = None
    if compute.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(compute.device)
        on_device = _bytes(p for p in model.parameters() if p.device.type == "cuda")
        device_free = free + on_device
    return Sizes(weights=sum(block_bytes), shell=shell, block=max(block_bytes), activations=acts,
                 batch_activations=batch_acts, work=work, device_free=device_free, host_free=host_free_bytes(),
                 activation_copies=copies, storage_dtype=dtype_name(storage))


def default_batches(config: PruneConfig, nsamples: int) -> list[int]:
    """The batch sizes the planner may use: the one asked for, or the default halved down to 1."""
    first = min(config.effective_batch_size, max(nsamples, 1))
    batches = [first]
    while config.batch_size is None and not config.sparsegpt_reference and batches[-1] > 1:
        batches.append(batches[-1] // 2)
    return batches


def plan_for(model, adapter, config, compute, scorer, shape, disk: bool = False,
             storage: torch.dtype | None = None, batch: int | None = None) -> Plan:
    """The placement plan, with the batch size it was made for; `compute`'s storage dtype becomes the
    plan's. `storage`, `batch`: fixed by block inputs captured earlier (a sweep's cache); else
    compute's storage or plan_storage's choice, and the largest default batch that loses no speed."""
    offload = "disk" if disk else ("auto" if config.offload == "disk" else config.offload)
    planned = storage is None and Compute.storage_is_planned(config, compute.device)

    def plan_at(b: int) -> Plan:
        def sizes(dtype):
            return placement_sizes(model, adapter, config, compute, scorer, shape, dtype, batch=b)
        if planned:
            return plan_storage(sizes(torch.float32), sizes(compute.dtype), offload)
        return plan_placement(sizes(storage or compute.storage), offload)
    plan = plan_batch(plan_at, [batch] if batch else default_batches(config, shape[0] if shape else 0))
    compute.store = DTYPES[plan.storage_dtype]
    return plan


def bias_linears(adapter: Adapter, scorer: Scorer) -> list[str]:
    """The linears to which the method adds a bias (STADE's compensation)."""
    return [n for n in adapter.linears if scorer.updates_bias(n in adapter.norm_fed)]


def prepare_biases(model: nn.Module, adapter: Adapter, scorer: Scorer) -> None:
    """Give every linear that the method will compensate a zero bias first, and turn on the config
    flag that lets the saved checkpoint declare it."""
    blocks = adapter.blocks(model)
    for name in bias_linears(adapter, scorer):
        for block in blocks:
            _ensure_bias(block.get_submodule(name))
        if adapter.can_hold_bias(name, blocks[0].get_submodule(name)):
            adapter.enable_bias(model, name)


def prune(model: nn.Module, config: PruneConfig, samples: torch.Tensor | None = None,
          adapter: Adapter | None = None, inputs: Activations | None = None, log=None,
          disk=None, checkpoint=None) -> PruneReport:
    """Prune `model` in place. `samples`: (nsamples, seqlen) calibration token ids (unused by
    magnitude with a uniform allocation). `inputs`: block-0 inputs captured earlier with the same
    samples and compute (a sweep reuses them; they are copied, not consumed). `log(line)` receives
    the placement line before any work. `disk` (execution.disk.DiskRun): the model is a skeleton whose
    blocks are read from the checkpoint and written to the output as they finish. `checkpoint`
    (execution.resume.Checkpointer): state saved after each block, and resumed from where it has one."""
    start = time.perf_counter()
    run = BlockLoop(model, config, adapter or adapter_for(model.config.model_type), log, disk, checkpoint)
    if run.needs_inputs and samples is None and inputs is None:
        raise PrunekitError(f"method {config.method} needs calibration data: pass --calib")
    if distributed.world()[1] > 1 and config.sparsegpt_reference:
        raise PrunekitError("--sparsegpt-arithmetic reference reproduces the reference's float32 order in one "
                            "process: run it without torchrun, or use the fast arithmetic")
    if samples is not None:
        samples = distributed.shard(samples)  # this rank's sequences (all of them in one process)
    shape = tuple(inputs.hidden.shape[:2]) if inputs is not None else \
        (tuple(samples.shape) if samples is not None and run.needs_inputs else None)
    run.plan = plan_for(model, run.adapter, config, run.compute, run.scorer, shape, disk=disk is not None,
                        storage=inputs.hidden.dtype if inputs is not None else None,
                        batch=inputs.batch_size if inputs is not None else None)
    if log is not None:
        log(run.plan.line())
    run.report.placement = run.plan.to_dict()
    if disk is not None and run.plan.activations == "scratch":
        run.scratch = Scratch(disk.scratch_dir)
    try:
        run.prepare(samples, inputs)
        for i, block in enumerate(tqdm(run.blocks, desc=f"pruning ({config.method})")):
            if i >= run.start:
                run.prune_block(i, block)
        failure = run.nan.done()
        if failure is not None:
            raise failure
        with run.phases.host("weights out (host)"):
            run.streamer.finish()
    finally:
        if run.streamer is not None:
            run.streamer.close()
        if run.scratch is not None:
            run.scratch.cleanup()
    run.summarise()
    run.report.phases = run.phases.totals()
    run.report.prune_seconds = time.perf_counter() - start
    return run.report


class BlockLoop:
    """The state of one prune: what runs where, the allocation, and the per-layer results so far."""

    def __init__(self, model, config, adapter, log, disk, checkpoint):
        self.model, self.config, self.adapter, self.log = model, config, adapter, log
        self.disk, self.checkpoint = disk, checkpoint
        self.scorer = build_scorer(config)
        self.compute, self.stats_compute = Compute.from_config(config), Compute.for_stats(config)
        check_prunable(model, adapter, config)
        self.blocks = adapter.blocks(model)
        self.needs_inputs = self.scorer.needs_stats or needs_data(config.allocation)
        self.phases = Phases(self.compute.device)
        self.nan = NaNCheck(lag=_lagged_checks(self.compute.device, checkpoint is not None))
        self.report = PruneReport()
        self.scratch, self.plan, self.acts, self.dense, self.streamer = None, None, None, None, None
        self.counts, self.errors, self.start = [], [], 0

    def prepare(self, samples, inputs) -> None:
        """Block-0 inputs, the allocation (or the interrupted run's state), the biases to compensate."""
        model, adapter, config = self.model, self.adapter, self.config
        if self.disk is not None:
            self.streamer = DiskBlocks(model, adapter, self.disk.reader, self.compute.device)
        else:
            self.streamer = BlockStreamer(self.blocks, self.compute.device, self.plan)
        self.start = self.checkpoint.done if self.checkpoint is not None else 0
        if config.allocation == "uniform" and not bias_linears(adapter, self.scorer):
            # nothing below changes a block's parameters before it is pruned (no allocation reads them
            # on the device, no bias is added): its upload (and, first time, the staging memory's
            # page-locking) overlaps the input capture instead of following it
            self.streamer.start(self.start)
        # an allocation from the weights alone (AlphaPruning) runs before the capture, so that its working
        # memory (the ESD's Gram matrices) and the captured inputs are never on the device together
        weights_only = not needs_data(config.allocation)
        if not self.start and weights_only:
            self.allocate(None)
        if self.needs_inputs:
            with self.phases("capture"):
                self.acts = inputs.clone() if inputs is not None else capture_block_inputs(
                    model, adapter, samples, self.plan.batch_size, self.compute, home=self.plan.activations,
                    scratch=self.scratch)
        if not self.start and not weights_only:
            self.allocate(self.acts)
        prepare_biases(model, adapter, self.scorer)
        if self.start:  # resume: the finished blocks, the next block's inputs, the allocation
            self.alloc, self.counts, self.errors = self.checkpoint.restore(
                self.blocks if self.disk is None else None, self.acts, Allocation)
            if self.log is not None:
                self.log(f"resuming at block {self.start} of {len(self.blocks)} from {self.checkpoint.folder}")
        self.report.allocation, self.report.allocation_info = self.alloc.blocks, self.alloc.info
        if self.disk is not None:  # the output's layout is final now (biases included): plan its shards
            self.streamer.writer = self.disk.open_writer(model, adapter)
            if self.start:
                self.checkpoint.write_finished(self.streamer)
        if config.record_error and self.acts is not None:
            self.dense = self.acts.clone()
        self.streamer.start(self.start)

    def allocate(self, acts: Activations | None) -> None:
        """The per-block sparsities (self.alloc), from the weights and, for an allocation that needs
        data (OWL), dense passes over the captured inputs `acts`."""
        config = self.config
        if config.allocation != "uniform":
            with self.phases.host("weights in (host)"):
                self.streamer.install_all()  # plan `device`: the allocation sees every weight there
        ctx = AllocationContext(self.model, self.adapter, config, self.compute, acts, self.streamer)
        with self.phases("allocation"):
            self.alloc = allocate(config.allocation, ctx)
            if config.nm is not None:
                _nm_targets(self.alloc, ctx)

    def prune_block(self, i: int, block: nn.Module) -> None:
        """Statistics pass, masks (once, on rank 0), pruned pass making the next block's inputs."""
        adapter, scorer, last = self.adapter, self.scorer, i + 1 == len(self.blocks)
        with self.phases.host("weights in (host)"):
            self.streamer.onload(i)
        linears = adapter.block_linears(block)
        stats = {}
        if scorer.needs_stats:
            with self.phases("statistics pass"), collect_stats(
                    linears, None if self.dense is not None else adapter.linears[-1],
                    centred=lambda n: scorer.centred(n in adapter.norm_fed),
                    gram=lambda n: scorer.gram(n in adapter.norm_fed)) as stats:
                run_block(block, self.acts, self.stats_compute, outputs=self.dense)
            distributed.combine_stats(stats)
        rank0 = distributed.world()[0] == 0
        flags = []
        with self.phases("masks"):
            for name, module in (linears if rank0 else {}).items():
                nm = self.alloc.nm[i][name] if self.alloc.nm is not None else None
                full = f"{adapter.blocks_path}.{i}.{name}"
                count, flag, info = prune_linear(module, adapter, scorer, stats.get(name), name in adapter.norm_fed,
                                                 self.alloc.sparsity[i][name], nm, full)
                self.counts.append((full, count, module.weight.numel(), info))
                flags.append(flag)
                if info and self.log is not None:
                    self.log(f"{full}: {info}")
        failure = self.nan.add(i, list(linears), flags) if rank0 else None
        if distributed.broadcast_flag(failure is not None):
            raise failure or PrunekitError(f"rank 0 stopped at block {i} (NaN/inf): see its output")
        distributed.broadcast_block(block)  # every rank holds rank 0's pruned block
        if self.acts is not None and (not last or self.dense is not None):
            meter = ErrorMeter(self.compute.device) if self.dense is not None else None
            with self.phases("pruned pass"):
                run_block(block, self.acts, self.compute, outputs=None if last else self.acts,
                          error=meter, dense=self.dense)
            if meter is not None:
                distributed.combine_error(meter)
                self.errors.append(meter.value())
        if self.checkpoint is not None:
            self.checkpoint.save(i, block, None if last else self.acts, self.alloc, self.counts, self.errors)
        with self.phases.host("weights out (host)"):
            self.streamer.offload(i)  # written out, under disk offload

    def summarise(self) -> None:
        """The report's numbers, read from the device once."""
        if not self.counts:  # a rank other than 0: it pruned nothing itself
            return
        pruned = torch.stack([c.reshape(()).to("cpu", torch.float64) for _, c, _, _ in self.counts]).tolist()
        self.report.layers = [{"name": name, "sparsity": p / numel, **(info or {})}
                              for (name, _, numel, info), p in zip(self.counts, pruned)]
        self.report.sparsity = sum(pruned) / sum(numel for _, _, numel, _ in self.counts)
        if self.errors:
            self.report.block_error = [{"block": i, "rel_mse": e}
                                       for i, e in enumerate(torch.stack(self.errors).tolist())]


def unsavable_biases(model: nn.Module, adapter: Adapter, config: PruneConfig) -> list[str]:
    """Linears that prune() would give a bias which this architecture's checkpoints cannot store."""
    scorer = build_scorer(config)
    block = adapter.blocks(model)[0]
    return [n for n in bias_linears(adapter, scorer) if not adapter.can_hold_bias(n, block.get_submodule(n))]
