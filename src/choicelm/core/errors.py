"""One exception type for bad input (the CLI prints its message on one line and exits with status 2), and the
exception a run raises when a signal stopped it after a checkpoint."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from typing import Iterator


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


_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors, tokenizers) report one


def as_os_error(e: BaseException, path=None) -> OSError | None:
    """`e` as an OSError naming `path` where it names no file: an OSError without a file name (a full disk found
    when a buffer is flushed, numpy's tofile, torch.save through a file object) or a Rust library's error carrying
    one ("I/O error: No space left on device (os error 28)" from safetensors); None if `e` is no OS error."""
    if isinstance(e, OSError):
        if e.filename is not None or path is None:
            return e
        code = e.errno or errno.EIO
        return OSError(code, e.strerror or os.strerror(code), str(path))
    found = _OS_ERROR_IN_TEXT.search(str(e)) if isinstance(e, Exception) else None
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), *([str(path)] if path is not None else []))


@contextlib.contextmanager
def naming(path) -> Iterator[None]:
    """Re-raise an OS error that names no file as an OSError naming `path` (see as_os_error), so the CLI can say
    which file it could not write."""
    try:
        yield
    except Exception as e:
        converted = as_os_error(e, path)
        if converted is None or converted is e:
            raise
        raise converted from None
