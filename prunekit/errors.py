"""One exception type for every problem the user can fix; the CLI prints it on one line, exit 2."""


class PrunekitError(Exception):
    """Bad input or an impossible request. The message names the problem and the fix."""
