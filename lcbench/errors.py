"""What can go wrong, by who can fix it; the CLI turns each into its exit status (README "Exit codes").

- :class:`UserError` (exit 2): bad input; the message names the problem and the fix.
- :class:`RunFailed` (exit 1): a run failed for a reason other than its input (a full disk, a
  crash); the message says what was kept and how to go on.
- :class:`RunAborted` (exit 130 on SIGINT, 143 on SIGTERM): the user stopped a run; it carries
  what was written so the CLI can say how to resume.
"""

from __future__ import annotations

import signal


class UserError(Exception):
    """Bad input: the message names the problem and the fix."""


class CompressionShortfall(UserError):
    """A method achieved far less compression than requested (DESIGN.md: a failed run, not a good score)."""


class RunFailed(Exception):
    """A run that failed for a reason other than the user's input (e.g. a full disk)."""


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by the SIGTERM handler the CLI installs (so cleanup runs as for Ctrl-C)."""

    signum = signal.SIGTERM


class RunAborted(KeyboardInterrupt):
    """A run stopped by a signal; ``records`` of its turns are on disk in ``folder``."""

    def __init__(self, folder, records: int, signum: int = signal.SIGINT):
        super().__init__(f"aborted: {records} records written to {folder}")
        self.folder, self.records, self.signum = folder, records, signum


def signal_number(exc: BaseException) -> int:
    """The signal behind a KeyboardInterrupt (SIGINT unless it came from the SIGTERM handler)."""
    return int(getattr(exc, "signum", signal.SIGINT))


def out_of_memory(exc: BaseException) -> bool:
    """The work needed more memory than the device has: torch's ``OutOfMemoryError`` (CUDA, XPU),
    the CPU allocator's and MPS's RuntimeError, or Python's MemoryError."""
    import torch

    if isinstance(exc, MemoryError) or isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        words in text for words in ("can't allocate memory", "cannot allocate memory", "out of memory"))
