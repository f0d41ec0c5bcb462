"""Where and in which precision the passes run: the one place that picks devices and dtypes.

Checkpoint dtype and compute dtype are independent. Float32 compute runs every weight in float32 (a
bf16/fp16 checkpoint is upcast for the duration of a pass, one block at a time, and keeps its own
dtype at rest). bfloat16/float16 compute is mixed precision, as torch.autocast means it: matmuls and
attention run in the low dtype while the residual stream inside a block, norms and every statistic
stay float32. A bf16 checkpoint computed in bf16 is used as it is: nothing is cast.

--residual-dtype compute keeps the residual stream in the compute dtype too (the norms still reduce in
float32 inside, as the model's own code does; statistics stay float32): a block runs as a model cast
with `.to(bfloat16)` runs, which is how the reference scripts run it. Fewer and narrower elementwise
passes, at the price of rounding the residual stream after every addition.

Between passes the block inputs/outputs (the residual stream) rest in float32 unless they would
travel (to pinned host memory or a scratch file; see placement.plan_storage) or --activation-dtype
says otherwise. Rounding the residual stream to bf16 at every block boundary compounds over the
blocks: on SmolLM2, Wanda 2:4 in bf16 lands +5.1 % from float32 with bf16 storage and +2.4 % with
float32 storage, at the same speed (README, "Scorers x patterns").
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..attention import cpu_bf16_attention
from ..errors import PrunekitError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# transformers' RMSNorm classes whose forward is LlamaRMSNorm's, line for line (a test compares the
# sources): x in float32, x * rsqrt(mean(x^2) + eps), back to x's dtype, times the weight. Inside the
# passes their normalisation runs as one torch rms_norm (`fused_norms`): on a GPU one fused kernel in
# place of three elementwise passes over the float32 residual stream and a reduction; on the CPU torch
# computes it with the same operations, so the results are bit for bit the model's own (a test).
LLAMA_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
FUSED_NORM_DEVICES = {"cpu", "cuda"}  # where fused_norms swaps them in (a benchmark may turn it off)


def _llama_rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm.forward with its normalisation as one torch.nn.functional.rms_norm (and, for a
    float32 input, the weight's product too)."""
    dtype, shape = hidden_states.dtype, hidden_states.shape[-1:]
    with torch.autocast(hidden_states.device.type, enabled=False):  # float32, whatever autocast's op lists say
        if dtype == torch.float32 and self.weight.dtype in (torch.float32, torch.bfloat16, torch.float16):
            # the weight's product is taken in float32 either way: inside the same kernel
            return torch.nn.functional.rms_norm(hidden_states, shape, self.weight.float(), self.variance_epsilon)
        normed = torch.nn.functional.rms_norm(hidden_states.to(torch.float32), shape, eps=self.variance_epsilon)
    return self.weight * normed.to(dtype)


@contextlib.contextmanager
def fused_norms(module: nn.Module, device: torch.device):
    """Inside, every LLAMA_RMS_NORMS module of `module` runs _llama_rms_norm (where FUSED_NORM_DEVICES
    says so); after, its own forward again, also after an error."""
    swapped = []
    if device.type in FUSED_NORM_DEVICES:
        # not a forward someone else set on the instance (accelerate's hooks, hub kernels): that one stays
        swapped = [m for m in module.modules() if type(m).__name__ in LLAMA_RMS_NORMS
                   and type(m).__module__.startswith("transformers.") and "forward" not in m.__dict__]
    try:
        for m in swapped:
            m.forward = _llama_rms_norm.__get__(m)
        yield
    finally:
        for m in swapped:
            m.__dict__.pop("forward", None)


# transformers modules whose apply_rotary_pos_emb is Llama's (a test compares the sources; a release
# that changes one is also caught at run time, by _is_llamas_rope): inside the passes it runs as
# _llama_rope, the same roundings in fewer passes over q and k (`lean_rope`).
LLAMA_ROPE_MODULES = tuple(f"transformers.models.{f}.modeling_{f}" for f in ("llama", "mistral", "qwen2", "qwen3"))
LEAN_ROPE_DEVICES = {"cpu", "cuda"}  # where lean_rope swaps it in (a benchmark may turn it off)
_LLAMA_ROPE_LINES = ("cos = cos.unsqueeze(unsqueeze_dim)", "sin = sin.unsqueeze(unsqueeze_dim)",
                     "q_embed = (q * cos) + (rotate_half(q) * sin)", "k_embed = (k * cos) + (rotate_half(k) * sin)",
                     "return q_embed, k_embed")
_ROTATE_HALF_LINES = ("x1 = x[..., : x.shape[-1] // 2]", "x2 = x[..., x.shape[-1] // 2 :]",
                      "return torch.cat((-x2, x1), dim=-1)")


def _llama_rope(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb (Llama's), value for value: with h half the head size,
    q * cos + rotate_half(q) * sin is q * cos, minus q[h:] * sin[:h] on the first half and plus
    q[:h] * sin[h:] on the second, each product and each sum rounded once, as there (-a * b = -(a * b)
    and x + -y = x - y exactly). Without rotate_half's negation and concatenation, and without a third
    full-size tensor: 7 q-sized reads and writes instead of 10, in q * cos's memory layout throughout
    (transformers' sum mixes it with the concatenation's)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    h = q.shape[-1] // 2
    out = []
    for x in (q, k):
        y = x * cos
        y[..., :h] -= x[..., h:] * sin[..., :h]
        y[..., h:] += x[..., :h] * sin[..., h:]
        out.append(y)
    return out[0], out[1]


_checked_ropes: dict = {}  # id(function) -> (function, whether it is Llama's)


def _is_llamas_rope(module) -> bool:
    fn, rotate = getattr(module, "apply_rotary_pos_emb", None), getattr(module, "rotate_half", None)
    if fn is None or rotate is None:
        return False
    if id(fn) not in _checked_ropes:
        import inspect
        try:
            text, rotate_text = inspect.getsource(fn), inspect.getsource(rotate)
            same = (list(inspect.signature(fn).parameters) == ["q", "k", "cos", "sin", "unsqueeze_dim"]
                    and all(line in text for line in _LLAMA_ROPE_LINES)
                    and all(line in rotate_text for line in _ROTATE_HALF_LINES))
        except (OSError, TypeError, ValueError):
            same = False
        _checked_ropes[id(fn)] = (fn, same)
    return _checked_ropes[id(fn)][1]


@contextlib.contextmanager
def lean_rope(device: torch.device):
    """Inside, the LLAMA_ROPE_MODULES already imported apply rotary embeddings with _llama_rope (where
    LEAN_ROPE_DEVICES says so); after, their own function again, also after an error.
    A module-level swap: the passes run one block at a time on one thread."""
    import sys
    swapped = []
    if device.type in LEAN_ROPE_DEVICES:
        for name in LLAMA_ROPE_MODULES:
            module = sys.modules.get(name)
            if module is not None and module.apply_rotary_pos_emb is not _llama_rope and _is_llamas_rope(module):
                swapped.append((module, module.apply_rotary_pos_emb))
    try:
        for module, _ in swapped:
            module.apply_rotary_pos_emb = _llama_rope
        yield
    finally:
        for module, own in swapped:
            module.apply_rotary_pos_emb = own


def resolve_device(name: str) -> torch.device:
    """auto: the GPU when there is one. Asking for cuda without one is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PrunekitError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA (float16 where the GPU has no bf16), float32 on the CPU, where float32
    keeps the reference protocol's numbers and bf16 matmuls gain only ~2x."""
    if name in (None, "auto"):
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Compute:
    """A device and a compute dtype. `run(module)` is the precision context of every pass; block
    inputs and outputs rest between passes in `storage` (see from_config)."""
    device: torch.device
    dtype: torch.dtype
    store: torch.dtype | None = None  # storage dtype of block inputs/outputs; None: the compute dtype
    residual: torch.dtype = torch.float32  # the residual stream inside a pass (float32, or dtype: --residual-dtype)

    @classmethod
    def from_config(cls, config) -> "Compute":
        """The passes' precision. Block inputs/outputs are stored in float32 unless --activation-dtype
        says otherwise; where `storage_is_planned`, the placement plan may lower them to the compute
        dtype (see plan_storage)."""
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        residual = cls.residual_of(config, dtype)
        store = residual if config.activation_dtype == "auto" else DTYPES[config.activation_dtype]
        return cls(device, dtype, store, residual=residual)

    @staticmethod
    def residual_of(config, dtype: torch.dtype) -> torch.dtype:
        """The residual stream's dtype inside a pass computed in `dtype`."""
        return dtype if config.residual_dtype == "compute" else torch.float32

    @staticmethod
    def storage_is_planned(config, device: torch.device) -> bool:
        """--activation-dtype auto with every pass in a low dtype (statistics passes included): the
        placement plan chooses float32 or the compute dtype for the block inputs."""
        passes = {resolve_dtype(config.dtype, device), resolve_dtype(config.stats_dtype or config.dtype, device)}
        return config.activation_dtype == "auto" and torch.float32 not in passes and config.residual_dtype == "float32"

    @classmethod
    def for_stats(cls, config) -> "Compute":
        """The dense statistics passes: --stats-dtype, else --dtype. Their precision decides the masks;
        the pruned passes that only carry inputs forward tolerate bf16 (see README, Benchmarks)."""
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.stats_dtype or config.dtype, device)
        return cls(device, dtype, residual=cls.residual_of(config, dtype))

    @property
    def mixed(self) -> bool:
        return self.dtype != torch.float32

    @property
    def storage(self) -> torch.dtype:
        """The dtype of block inputs/outputs at rest between passes."""
        return self.store or self.dtype

    @contextlib.contextmanager
    def run(self, module: nn.Module, exclude: nn.Module | None = None):
        """Run `module` (a block or a whole model) in this precision, gradients off.

        float32: floating parameters of another dtype point to float32 copies while inside.
        mixed: the weight matrices of matmul layers point to low-precision copies where they are not
        already in that dtype (embeddings, RMS norms and biases are left alone; autocast handles
        them; LayerNorm parameters get float32 copies).
        On exit every parameter points back to its own data, which pruning edits. `exclude`: a
        submodule whose parameters are left alone (the blocks, while the embeddings run). In mixed
        precision each matmul is handed its input lowered once (_LowerOnce)."""
        saved, handles = [], []
        skip = {id(p) for p in exclude.parameters()} if exclude is not None else set()
        params = [p for p in module.parameters() if p.is_floating_point() and id(p) not in skip]
        if self.mixed:
            embeddings = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
            wanted = [(p, self.dtype) for p in params
                      if p.dim() >= 2 and p.dtype != self.dtype and id(p) not in embeddings]
            # nn.LayerNorm on the CPU refuses a float32 input with low-precision parameters: give
            # those (tiny, 1-D) parameters float32 copies (it takes a bf16/fp16 input with them too,
            # as under --residual-dtype compute, and a whole-model evaluation's stream is float32)
            wanted += [(p, torch.float32) for m in module.modules() if isinstance(m, nn.LayerNorm)
                       for p in m.parameters() if p.dtype != torch.float32 and id(p) not in skip]
        else:
            wanted = [(p, torch.float32) for p in params if p.dtype != torch.float32]
        for p, dtype in wanted:
            saved.append((p, p.data))
            p.data = p.data.to(dtype)
        if self.mixed:
            matmul_weights = {id(p) for p in params if p.dim() >= 2 and p.dtype == self.dtype}
            lowering = _LowerOnce(self.dtype)
            handles = [m.register_forward_pre_hook(lowering) for m in module.modules()
                       if not isinstance(m, nn.Embedding) and id(getattr(m, "weight", None)) in matmul_weights]
        try:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self.mixed), \
                    cpu_bf16_attention(self.device.type == "cpu" and self.dtype == torch.bfloat16), \
                    fused_norms(module, self.device), lean_rope(self.device):
                yield module
        finally:
            for h in handles:
                h.remove()
            for p, data in saved:
                p.data = data

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The residual stream enters a block as float32 (autocast lowers it where a matmul reads it),
        or in the compute dtype under --residual-dtype compute."""
        return h.to(self.device, self.residual if self.mixed else torch.float32, non_blocking=True)

    def tree(self, obj, memo: dict | None = None):
        """Move tensors in (nested) args to the device; floating ones (rotary tables, additive masks)
        to the compute dtype, as a model running in that dtype would make them. `memo` (id -> (tensor,
        converted)): a tensor seen before in the same pass is converted once."""
        if isinstance(obj, torch.Tensor):
            if memo is not None and id(obj) in memo:
                return memo[id(obj)][1]
            out = obj.to(self.device, self.dtype) if obj.is_floating_point() else obj.to(self.device)
            if memo is not None:
                memo[id(obj)] = (obj, out)  # holding obj keeps its id from being reused
            return out
        if isinstance(obj, (tuple, list)):
            return type(obj)(self.tree(o, memo) for o in obj)
        if isinstance(obj, dict):
            return {k: self.tree(v, memo) for k, v in obj.items()}
        return obj


class _LowerOnce:
    """Pre-hook for the matmul layers in mixed precision: hand them their float32 input in the
    compute dtype, converting each input tensor once. autocast alone would convert the same normed
    hidden state again for q, k and v (and gate, up). Hooks registered earlier (the statistics)
    still see the float32 input."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.last, self.lowered = dtype, None, None

    def __call__(self, module, args):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == self.dtype:
            return None
        if x is not self.last:
            self.last, self.lowered = x, x.to(self.dtype)
        return (self.lowered,) + tuple(args[1:])
