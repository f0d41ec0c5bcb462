"""Execution: where and how the block passes run.

precision.py  devices and dtypes (Compute: the precision context of every pass)
placement.py  the placement plan, a pure function of sizes
passes.py     input capture, one pass of a block, statistics hooks, the activation buffer
streaming.py  block weights visiting the GPU: copied up and back by a worker thread
loop.py       the block loop: statistics, masks, pruned pass, per block
"""
from .loop import AllocationContext, PruneReport, check_prunable, prune, unsavable_biases  # noqa: F401
from .passes import Activations, capture_block_inputs, collect_stats, run_block  # noqa: F401
from .placement import Plan, Sizes, plan_placement  # noqa: F401
from .precision import DTYPES, Compute, resolve_device, resolve_dtype  # noqa: F401
