"""The placement plan: where the weights and the calibration activations live during a prune.

Decided once, before any work, from sizes known up front; a pure function, so it is tested with
given sizes. The plans, fastest first:

  device  weights and activations on the compute device (the blocks copied up as the first ones
          compute, each copied back once pruned);
  stream  weights on the host, each block copied up on a side stream while the one before it
          computes (streaming.BlockStreamer); activations on the device;
  offload activations on the host too (pinned, in the storage dtype), copied up a batch at a time
          with the next batch in flight.

  disk    (--offload disk, or a model larger than the host's RAM) weights read from the checkpoint a
          block at a time and written out as each block finishes; activations on the device, in
          RAM, or in a memory-mapped scratch file, whichever is the first that fits.

On the CPU the first three are the same place; the plan says "cpu" for both.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

from ..errors import PrunekitError

GiB = 1 << 30
OFFLOAD_CHOICES = ("auto", "none", "weights", "cpu", "disk")
PLANS = ("device", "stream", "offload")
_FOR_CHOICE = {"none": ("device",), "weights": ("stream",), "cpu": ("offload",), "auto": PLANS}


@dataclass(frozen=True)
class Sizes:
    """Bytes. `activations`: one (nsamples, seqlen, hidden) copy in the storage dtype;
    `activation_copies`: how many such copies a run keeps (1, or 2 when the dense outputs are kept to
    measure the reconstruction error). `work`: the transient peak of one block pass over one batch,
    its statistics included. device_free None: the compute device is the CPU."""
    weights: int          # all decoder blocks
    shell: int            # embeddings, final norm, head
    block: int            # the largest block
    activations: int
    batch_activations: int
    work: int
    device_free: int | None
    host_free: int
    activation_copies: int = 1
    storage_dtype: str = "float32"


@dataclass(frozen=True)
class Plan:
    name: str             # device | stream | offload
    weights: str          # where the block weights live between passes: cuda or cpu
    activations: str      # where block inputs/outputs live: cuda or cpu
    activation_bytes: int
    device_bytes: int     # planned peak on the device (0 on the CPU)
    storage_dtype: str
    batch_size: int = 0   # calibration sequences a forward, where plan_batch chose it (0: not planned)

    @property
    def streams_weights(self) -> bool:
        return self.name != "device" and self.weights == "cpu"

    @property
    def offloads_activations(self) -> bool:
        return self.name == "offload" and self.activations == "cpu"

    def line(self) -> str:
        streamed = " (streamed)" if self.streams_weights or self.weights == "disk" else ""
        where = f"weights {self.weights}{streamed}, activations " \
                f"{self.activations} ({self.activation_bytes / GiB:.2f} GiB {self.storage_dtype})"
        return f"placement: {where}" + (f", plan {self.name}" if self.device_bytes else "")

    def to_dict(self) -> dict:
        return {**asdict(self), "line": self.line()}


def device_need(plan: str, s: Sizes) -> int:
    """Peak bytes on the device under `plan`: resident weights (all blocks, or the current and the
    prefetched one), resident activations (all copies, or two batches in flight), one pass's work."""
    acts = s.activations * s.activation_copies
    if plan == "device":
        return s.weights + s.shell + acts + s.work
    if plan == "stream":
        return 2 * s.block + s.shell + acts + s.work
    return 2 * s.block + s.shell + 4 * s.batch_activations * s.activation_copies + s.work


def host_need(plan: str, s: Sizes) -> int:
    """Bytes the host must hold beyond what it already does (with a GPU): the page-locked staging
    slots of the weight copies (two blocks, each rounded up to a power of two by torch's pinned-memory
    cache), and the activations under `offload`."""
    staging = 2 * (1 << max(s.block - 1, 0).bit_length())
    return staging + (s.activations * s.activation_copies if plan == "offload" else 0)


def plan_placement(s: Sizes, offload: str = "auto", margin: float = 0.9) -> Plan:
    """The fastest plan (device, stream, offload) allowed by `offload` that fits in `margin` of the
    free memory; a one-line PrunekitError naming what would make it fit when none does."""
    if offload not in OFFLOAD_CHOICES:
        raise PrunekitError(f"--offload {offload!r} is not one of {', '.join(OFFLOAD_CHOICES)}")
    acts = s.activations * s.activation_copies
    if offload == "disk":
        return disk_plan(s, margin)
    if s.device_free is None:  # the CPU: one memory for everything
        if acts + s.work > margin * s.host_free:
            raise PrunekitError(_no_fit(s, "host RAM", s.host_free, acts + s.work))
        return Plan(_FOR_CHOICE[offload][0], "cpu", "cpu", acts, 0, s.storage_dtype)
    for name in _FOR_CHOICE[offload]:
        if device_need(name, s) <= margin * s.device_free and host_need(name, s) <= margin * s.host_free:
            weights = "cuda" if name == "device" else "cpu"
            activations = "cpu" if name == "offload" else "cuda"
            return Plan(name, weights, activations, acts, device_need(name, s), s.storage_dtype)
    last = _FOR_CHOICE[offload][-1]
    if device_need(last, s) > margin * s.device_free:
        raise PrunekitError(_no_fit(s, "GPU memory", s.device_free, device_need(last, s), offload))
    raise PrunekitError(_no_fit(s, "host RAM", s.host_free, host_need(last, s), offload))


def _speed_rank(plan: Plan) -> tuple[int, int]:
    """Lower is faster: the plan, then (disk plans) where the activations live."""
    return (PLANS.index(plan.name) if plan.name in PLANS else len(PLANS),
            ("cuda", "cpu", "scratch").index(plan.activations))


def plan_batch(plan_at: Callable[[int], Plan], batches: Sequence[int]) -> Plan:
    """The plan of the first (largest) of `batches` that is as fast as the last (smallest) one's,
    with that batch size recorded: a default batch never costs a slower plan, or a failure, that a
    smaller one would avoid (a pass's working memory grows with the batch). `plan_at(batch)` plans
    for one batch size; nothing fitting even at the smallest raises its error."""
    smallest = plan_at(batches[-1])
    for batch in batches[:-1]:
        try:
            plan = plan_at(batch)
        except PrunekitError:
            continue
        if _speed_rank(plan) <= _speed_rank(smallest):
            return replace(plan, batch_size=batch)
    return replace(smallest, batch_size=batches[-1])


def plan_storage(wide: Sizes, narrow: Sizes, offload: str = "auto", margin: float = 0.9) -> Plan:
    """--activation-dtype auto with a low compute dtype: the plan for float32 block inputs (`wide`)
    when it is the plan the compute dtype (`narrow`) gets and it keeps them in the compute's own
    memory; else the compute dtype's plan. Float32 there costs memory only: the residual stream
    enters every block as float32 anyway. Where they travel (pinned host memory, a scratch file)
    the compute dtype halves the traffic; where float32 would force a slower plan, it loses."""
    low = plan_placement(narrow, offload, margin)  # raises when nothing fits even so
    try:
        high = plan_placement(wide, offload, margin)
    except PrunekitError:
        return low
    resident = "cpu" if wide.device_free is None else "cuda"
    same = (high.name, high.weights, high.activations) == (low.name, low.weights, low.activations)
    return high if same and high.activations == resident else low


def disk_plan(s: Sizes, margin: float = 0.9) -> Plan:
    """Weights on disk: two blocks and the shell resident; activations on the GPU if they fit there,
    else in RAM, else in a memory-mapped scratch file."""
    acts = s.activations * s.activation_copies
    resident = 2 * s.block + s.shell + s.work
    if s.device_free is not None and acts + resident <= margin * s.device_free:
        return Plan("disk", "disk", "cuda", acts, acts + resident, s.storage_dtype)
    if resident > margin * (s.device_free if s.device_free is not None else s.host_free):
        raise PrunekitError(_no_fit(s, "GPU memory" if s.device_free is not None else "host RAM",
                                    s.device_free if s.device_free is not None else s.host_free, resident))
    home = "cpu" if acts + resident <= margin * s.host_free else "scratch"
    device = resident if s.device_free is not None else 0
    return Plan("disk", "disk", home, acts, device, s.storage_dtype)


def needs_disk(checkpoint_bytes: int, host_free: int, margin: float = 0.9) -> bool:
    """--offload auto: read the model from disk when its checkpoint would not fit in the free RAM."""
    return checkpoint_bytes > margin * host_free


def _no_fit(s: Sizes, where: str, free: int, need: int, offload: str = "auto") -> str:
    hint = "lower --batch-size, --nsamples or --seqlen"
    if offload not in ("auto", "cpu") and where == "GPU memory":
        hint = "use --offload auto (or cpu), or " + hint
    elif where == "host RAM" and offload != "disk":
        hint = "use --offload disk (weights read from the checkpoint, activations in --scratch-dir), or " + hint
    return (f"placement: nothing fits: {need / GiB:.2f} GiB needed in {where}, {free / GiB:.2f} GiB free "
            f"(activations {s.activations * s.activation_copies / GiB:.2f} GiB {s.storage_dtype}, "
            f"largest block {s.block / GiB:.2f} GiB): {hint}")
