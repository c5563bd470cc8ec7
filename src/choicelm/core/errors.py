"""One exception type for bad input: the CLI prints its message on one line and exits with status 2."""


class ChoicelmError(Exception):
    """Bad input or state a user can fix. The message names the problem and the fix."""
