"""--compile: the block passes under torch.compile.

One compiled caller, `block(h, *args, **kwargs)`, serves every block of a prune. Dynamo traces into
the block and guards on its structure, the hooks present, dtypes, shapes and the autocast state,
not on which block it is. So a model compiles once per kind of pass (statistics, pruned, each
precision; a smaller last batch adds a dynamic-shape variant) on its first blocks, and the other
blocks reuse the compiled code (tests/test_compile.py counts the graphs). Inductor fuses the
elementwise work between the matmuls: norms, rotary, SiLU·up, residual adds, and autocast's casts
(the eager passes' _LowerOnce hooks are left off under --compile, so a pruned pass is one graph).

What stays eager, each a graph break: the statistics hooks (Dynamo would trace their Python state,
the dict they fill, the identity check and the early stop, into code that every block reuses; in a
trial later blocks lost their statistics), and prunekit's CPU bf16 attention kernel (its out= views
into strided buffers do not trace). So a statistics pass is several graphs, one between each pair
of hooked inputs, and casts a shared input once per linear that reads it.

It pays where the compile costs less than what fusing saves over all blocks: a deep model, or a
warm inductor cache (TORCHINDUCTOR_CACHE_DIR) from an earlier run of the same shapes. It is off by
default; README ("GPU") gives the measured trade.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import PrunekitError

RECOMPILE_LIMIT = 64  # per code object: pass kinds x precisions x last-batch shapes, far below this
_compiled = None


def _call(block: nn.Module, h: torch.Tensor, args: tuple, kwargs: dict):
    return block(h, *args, **kwargs)


def compiled_call(block: nn.Module, h: torch.Tensor, args: tuple, kwargs: dict):
    """block(h, *args, **kwargs) through the shared compiled caller. A failure of the compiler itself
    (no C++ compiler or Triton, an unsupported op) is a one-line error, not a traceback from inside it."""
    global _compiled
    if _compiled is None:
        import torch._dynamo
        config = torch._dynamo.config  # the limit's name before torch 2.6: cache_size_limit
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
        # guard on the hooks present: Dynamo's default skips that guard, so a pass without hooks (an
        # evaluation) compiled first would be reused by a statistics pass, whose hooks would not run
        config.skip_nnmodule_hook_guards = False
        _compiled = torch.compile(_call)
    try:
        return _compiled(block, h, args, kwargs)
    except _compiler_errors() as e:
        raise PrunekitError(f"--compile failed in torch.compile ({_reason(e)}): run without --compile") from e


COMPILE_PHASE = "torch.compile (host, within the passes)"


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (Dynamo's own account: tracing, inductor,
    codegen; 0 where this torch keeps no such account). A prune reports its share as a phase; the
    passes' phases include it, as the compile runs inside them."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return 0.0
    return float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))


def _reason(error: Exception) -> str:
    """The first line of what went wrong inside the compiler (the backend's own error where it wraps one)."""
    inner = getattr(error, "inner_exception", None) or error.__cause__ or error
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    if not lines:
        return type(inner).__name__
    return (lines[0] if inner is error else f"{type(inner).__name__}: {lines[0]}")[:200]


def _compiler_errors() -> tuple[type, ...]:
    import torch._dynamo.exc as dynamo_exc
    errors = [dynamo_exc.BackendCompilerFailed, dynamo_exc.InternalTorchDynamoError]
    try:
        from torch._inductor.exc import InductorError
        errors.append(InductorError)
    except ImportError:
        pass
    return tuple(errors)
