"""One exception type for bad input (the CLI prints its message on one line and exits with status 2), and the
exception a run raises when a signal stopped it after a checkpoint."""


class ChoicelmError(Exception):
    """Bad input or state a user can fix. The message names the problem and the fix."""


class StoppedBySignal(Exception):
    """A run stopped early on SIGINT or SIGTERM after saving a checkpoint it can resume from. The CLI prints the
    message with the command that continues the run and exits with 128 + the signal number (130, 143)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
