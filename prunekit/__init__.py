"""prunekit: post-training pruning of large language models (Wanda, STADE, AlphaPruning, ...)."""
__version__ = "0.1.0"

from .config import PruneConfig  # noqa: E402
from .execution import PruneReport, prune  # noqa: E402
from .errors import PrunekitError  # noqa: E402

__all__ = ["PruneConfig", "PruneReport", "PrunekitError", "prune", "__version__"]
