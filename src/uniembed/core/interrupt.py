"""Ctrl-C in a long command: one line saying how to continue, exit status 130, no traceback.

Long stages save their progress as they go (extract's part files, train's checkpoint, prepare's and index's
build folders), so an interrupted command is not an error to debug but a pause: the user needs to know that
rerunning continues, not where in the code the signal landed. 130 is the shell's status for SIGINT (128 + 2).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

#: Exit status of an interrupted command (what a shell reports for a process killed by SIGINT).
EXIT_INTERRUPTED = 130
#: The message of a command whose rerun continues where it stopped.
RESUME_HINT = "interrupted; rerun the same command to resume"
#: The message of ``uniembed train`` once a checkpoint exists.
RESUME_FLAG_HINT = "interrupted; rerun the same command with --resume to resume"
#: The message of a command that keeps nothing of an interrupted run (its output appears whole or not at all).
RESTART_HINT = "interrupted; rerun the same command to start again"


@contextlib.contextmanager
def exit_on_interrupt(message: str | Callable[[], str] = RESUME_HINT) -> Iterator[None]:
    """Turn a KeyboardInterrupt inside the block into ``message`` on stderr and ``SystemExit(130)``.

    ``message`` may be a callable, evaluated when the interrupt arrives (e.g. to say ``--resume`` only once
    a checkpoint exists). Also usable as a decorator."""
    try:
        yield
    except KeyboardInterrupt:
        text = message() if callable(message) else message
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stderr must not bring a traceback
            print(text, file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
