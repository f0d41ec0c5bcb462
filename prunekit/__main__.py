"""`python -m prunekit ...` (and `torchrun ... -m prunekit prune ...`)."""
import sys

from .cli import main

sys.exit(main())
