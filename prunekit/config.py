"""PruneConfig: everything that decides a prune, as a small dataclass that round-trips to JSON."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

from .errors import PrunekitError

DTYPES = ("auto", "float32", "bfloat16", "float16")
OFFLOAD = ("auto", "none", "weights", "cpu", "disk")
ESD_DTYPES = ("auto", "float32", "float64")
ESD_METHODS = ("auto", "eigvalsh", "two_stage")
# keys earlier prunekit versions wrote into prunekit.json and recipes: (the value that meant "off", why it went)
RETIRED_KEYS = {"compile": (False, "--compile was removed: it lost end to end on GPU and CPU, README 'torch.compile'")}
RESIDUAL_DTYPES = ("float32", "compute")
# calibration tokens per block forward when --batch-size is not given. On an H100 (7B shape, 128 x 2048)
# the floor of a Wanda prune fell from 15.10 s at 1 sequence a forward to 14.19 s at 4 and 8 (16384
# tokens) and 13.93 s at 16, whose working memory is twice 8's; on the CPU larger batches gain nothing
TOKENS_PER_BATCH = {"cpu": 2048, "cuda": 16384}


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M), N of every M consecutive input weights pruned."""
    if pattern == "unstructured":
        return None
    found = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern or "")
    if not found:
        raise PrunekitError(f"pattern {pattern!r} is malformed: use 'unstructured' or N:M such as 2:4 or 4:8")
    n, m = int(found.group(1)), int(found.group(2))
    if not 0 < n < m:
        raise PrunekitError(f"pattern {pattern} is impossible: N:M needs 0 < N < M (N of every M pruned), e.g. 2:4")
    return n, m


@dataclass
class PruneConfig:
    method: str = "wanda"                 # scorer: magnitude, wanda, stade, stade-w, ...
    sparsity: float | None = None         # target share of pruned weights; None: 0.5, or N/M for an N:M pattern
    pattern: str = "unstructured"         # 'unstructured' or 'N:M'
    allocation: str = "uniform"           # per-layer sparsity: uniform, alpha, owl
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int | None = None         # calibration sequences per block forward; None: TOKENS_PER_BATCH
    dtype: str = "auto"                   # compute dtype of the passes (auto: bfloat16 on CUDA, float32 on
                                          # the CPU); statistics are always float32
    stats_dtype: str | None = None        # compute dtype of the dense statistics passes; None: as dtype
    activation_dtype: str = "auto"        # block inputs/outputs between passes; auto: float32 where they stay
                                          # with the compute, the compute dtype where they go to the host or disk
    residual_dtype: str = "float32"       # the residual stream inside a block pass under a low compute dtype:
                                          # float32 (mixed precision), or compute (the compute dtype throughout,
                                          # as a model cast with .to(bfloat16) runs: faster, a little less exact)
    device: str = "auto"
    offload: str = "auto"                 # placement: auto, none (all on the device), weights (streamed), cpu,
                                          # disk (weights read from the checkpoint, blocks written as they finish)
    scratch_dir: str | None = None        # disk offload: folder of the memory-mapped activations (default: beside --out)
    max_shard_size: str = "50GB"          # disk offload: output shard size (transformers' default)
    gguf_cache: str | None = None         # disk offload of a GGUF: its dequantized safetensors copy (default: cache dir)
    checkpoint: bool = True               # with --out: save the state after each block (--resume continues it)
    checkpoint_dir: str | None = None     # where (default: OUT.checkpoint beside --out)
    resume: bool = False                  # continue an interrupted run from its checkpoint
    save_format: str = "dense"            # dense (zeros, loads anywhere) or bitmask (kept values + packed mask)
    allow_long_context: bool = False      # calibrate/evaluate beyond max_position_embeddings
    record_error: bool = False            # per block: relative MSE of the pruned output vs the dense one
    bias_update: bool = True              # STADE mean compensation
    wanda_variant: bool = False           # Wanda appendix variant: per-row cumulative-score threshold
    sparsegpt_arithmetic: str = "fast"    # method sparsegpt: fast, or reference (the reference's float32 operations
                                          # in its order, one sequence per pass: its figures bit for bit, its speed)
    # allocation options (used by non-uniform allocations)
    epsilon: float = 0.3
    alpha_metric: str = "alpha_peak"
    alpha_mapping: str = "block_wise"
    alpha_reference_quirk: bool = False
    esd_dtype: str = "auto"               # AlphaPruning eigensolver precision: auto, float32, float64
    esd_method: str = "auto"              # AlphaPruning eigensolver: auto, eigvalsh (one-stage), two_stage (GPU band
                                          # reduction + host LAPACK; auto takes it for float64 on a GPU)
    esd_band: int = 16                    # two_stage: the band's half-width (narrower: less host work, more device work)
    esd_batch: int = 0                    # two_stage: Gram matrices reduced at once (0: up to 32, within 4 GiB and half
                                          # the free GPU memory; more: fewer kernel launches a matrix, more memory)
    esd_graph: bool = False               # two_stage on CUDA: replay the band reduction from a CUDA graph (fewer
                                          # launches; not the default until measured on a GPU)
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    max_layer_sparsity: float = 0.99
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        nm = parse_pattern(self.pattern)
        if self.sparsity is None:
            self.sparsity = nm[0] / nm[1] if nm else 0.5
        if not 0.0 < float(self.sparsity) < 1.0:
            raise PrunekitError(f"sparsity {self.sparsity} is outside (0, 1): pass e.g. --sparsity 0.5")
        if nm and self.allocation == "uniform" and abs(self.sparsity - nm[0] / nm[1]) > 1e-9:
            raise PrunekitError(
                f"pattern {self.pattern} prunes exactly {nm[0] / nm[1]:g} of every layer, not {self.sparsity:g}: "
                f"drop --sparsity, or use a non-uniform --allocation")
        for flag, value in (("dtype", self.dtype), ("stats-dtype", self.stats_dtype or self.dtype),
                            ("activation-dtype", self.activation_dtype)):
            if value not in DTYPES:
                raise PrunekitError(f"--{flag} {value!r} is not one of {', '.join(DTYPES)}")
        if self.residual_dtype not in RESIDUAL_DTYPES:
            raise PrunekitError(f"--residual-dtype {self.residual_dtype!r} is not one of {', '.join(RESIDUAL_DTYPES)}")
        if self.offload not in OFFLOAD:
            raise PrunekitError(f"--offload {self.offload!r} is not one of {', '.join(OFFLOAD)}")
        from .execution.disk import parse_size
        parse_size(self.max_shard_size)
        if self.save_format not in ("dense", "bitmask"):
            raise PrunekitError(f"--save-format {self.save_format!r} is not dense or bitmask")
        if self.sparsegpt_arithmetic not in ("fast", "reference"):
            raise PrunekitError(f"--sparsegpt-arithmetic {self.sparsegpt_arithmetic!r} is not fast or reference")
        if self.sparsegpt_reference and self.batch_size not in (None, 1):
            raise PrunekitError("--sparsegpt-arithmetic reference runs one sequence per pass, as the reference "
                                f"does: drop --batch-size {self.batch_size}")
        if self.esd_dtype not in ESD_DTYPES:
            raise PrunekitError(f"--esd-dtype {self.esd_dtype!r} is not one of {', '.join(ESD_DTYPES)}")
        if self.esd_method not in ESD_METHODS:
            raise PrunekitError(f"--esd-method {self.esd_method!r} is not one of {', '.join(ESD_METHODS)}")
        if self.esd_method == "two_stage" and self.esd_dtype == "float32":
            raise PrunekitError("--esd-method two_stage runs in float64: drop --esd-dtype float32")
        if not (isinstance(self.esd_band, int) and self.esd_band >= 1):
            raise PrunekitError(f"--esd-band {self.esd_band!r} must be an integer >= 1")
        if not (isinstance(self.esd_batch, int) and self.esd_batch >= 0):
            raise PrunekitError(f"--esd-batch {self.esd_batch!r} must be an integer >= 0 (0: automatic)")
        if not isinstance(self.esd_graph, bool):
            raise PrunekitError(f"--esd-graph {self.esd_graph!r} must be true or false")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise PrunekitError(f"device {self.device!r} is not auto, cpu or cuda")
        for name in ("nsamples", "seqlen"):
            if int(getattr(self, name)) < 1:
                raise PrunekitError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise PrunekitError(f"batch size must be at least 1, got {self.batch_size}")
        if not 0.0 < self.max_layer_sparsity <= 1.0 or self.sparsity > self.max_layer_sparsity:
            raise PrunekitError(
                f"max layer sparsity {self.max_layer_sparsity} must be in (0, 1] and at least the target {self.sparsity}")
        from .allocation import ALLOCATORS
        from .allocation.esd import ALPHA_METRICS
        if self.allocation not in ALLOCATORS:
            raise PrunekitError(f"unknown allocation {self.allocation!r}: choose one of {', '.join(sorted(ALLOCATORS))}")
        if self.alpha_metric not in ALPHA_METRICS:
            raise PrunekitError(f"unknown alpha metric {self.alpha_metric!r}: choose one of {', '.join(ALPHA_METRICS)}")
        if self.alpha_mapping not in ("block_wise", "layer_wise"):
            raise PrunekitError(f"unknown alpha mapping {self.alpha_mapping!r}: choose block_wise or layer_wise")
        if not 0.0 <= self.epsilon < 1.0:
            raise PrunekitError(f"epsilon {self.epsilon} must be in [0, 1)")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def sparsegpt_reference(self) -> bool:
        """SparseGPT in the reference's arithmetic (--sparsegpt-arithmetic reference)."""
        return self.method == "sparsegpt" and self.sparsegpt_arithmetic == "reference"

    @property
    def effective_batch_size(self) -> int:
        if self.sparsegpt_reference:
            return 1
        if self.batch_size:
            return self.batch_size
        from .execution.precision import resolve_device
        return max(1, TOKENS_PER_BATCH.get(resolve_device(self.device).type, 2048) // self.seqlen)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PruneConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        for key, (default, why) in RETIRED_KEYS.items():  # a file saved by an earlier prunekit
            if key in data:
                if data[key] != default:
                    raise PrunekitError(f"config key {key!r} is no longer supported ({why}): remove it")
                data = {k: v for k, v in data.items() if k != key}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PrunekitError(f"unknown config keys {unknown}: known keys are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
