"""Allocation: how sparse each layer is. One file per allocator, registered by name.

An allocator returns a target sparsity for every prunable linear of every block; the scorer and the
pattern then decide which weights go. Any allocator combines with any scorer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import PrunekitError

ALLOCATORS: dict[str, callable] = {}


def register_allocator(name: str, needs_data: bool = False):
    """needs_data: the allocator runs dense passes over the calibration data (OWL); AlphaPruning and
    uniform look at the weights only."""
    def wrap(fn):
        fn.needs_data = needs_data
        ALLOCATORS[name] = fn
        return fn
    return wrap


def needs_data(name: str) -> bool:
    return ALLOCATORS[name].needs_data


@dataclass
class Allocation:
    sparsity: list[dict[str, float]]                         # per block: linear name -> target sparsity
    nm: list[dict[str, tuple[int, int]]] | None = None       # per block: linear -> (N, M) for N:M patterns
    blocks: list[dict] = field(default_factory=list)         # per block: {"block", "metric", "sparsity"} for reports
    info: dict = field(default_factory=dict)                 # allocator extras for the run record (timings, ...)


def allocate(name: str, ctx) -> Allocation:
    """ctx: prunekit.engine.AllocationContext (model, adapter, config, parameter counts, dense passes)."""
    if name not in ALLOCATORS:
        raise PrunekitError(f"unknown allocation {name!r}: choose one of {', '.join(sorted(ALLOCATORS))}")
    return ALLOCATORS[name](ctx)


@register_allocator("uniform")
def uniform(ctx) -> Allocation:
    s = ctx.config.sparsity
    per_block = [{name: s for name in ctx.adapter.linears} for _ in range(ctx.num_blocks)]
    return Allocation(per_block, blocks=[{"block": i, "metric": None, "sparsity": s} for i in range(ctx.num_blocks)])


from . import alpha, owl  # noqa: E402,F401  (registration)
