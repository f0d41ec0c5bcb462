"""prunekit: post-training pruning of large language models (Wanda, STADE, AlphaPruning, ...)."""
__version__ = "0.1.0"

from .config import PruneConfig  # noqa: E402
from .execution import PruneReport, prune  # noqa: E402
from .errors import PrunekitError  # noqa: E402
from .export import load_pruned  # noqa: E402

load = load_pruned  # prunekit.load(DIR): a saved pruned model, dense or bitmask

__all__ = ["PruneConfig", "PruneReport", "PrunekitError", "prune", "load", "load_pruned", "__version__"]
