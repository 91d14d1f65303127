"""The project's user-facing error base and the one place errors become CLI output.

Every package keeps its own exception type (``CheckpointError`` here,
``renderer.RendererError``, ``jobs.JobSpecError``, ``viewer.ViewerError``,
``training.TrainError``), all subclasses of ``UserError``.  Library code raises
them and lets them travel unchanged; only the command-line boundary
(``run_cli``) turns one into a single ``error: ...`` line and an exit code.
``--debug`` or ``CREPS_DEBUG=1`` re-raises instead, with the full traceback.

The rule for every command of ``render.py`` and ``train.py``: bad input
exits 2 with one ``error:`` line and nothing written; a failure of the work
itself exits 1 (one line, re-run to continue), an exception nobody
anticipated included; Ctrl-C (and SIGTERM where a command turns it into
one) exits 130.  ``tests/test_cli_errors.py`` runs every subcommand against
its bad inputs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can act on; the message says what is wrong and what to do.

    ``exit_code`` 2 means bad input (nothing was done), 1 a failure part-way
    (``hint`` says how to continue).
    """

    exit_code = 2
    hint = ""


class CheckpointError(UserError):
    """A checkpoint cannot be read: missing, unknown format, corrupt, wrong shapes, forbidden content."""


UNEXPECTED = " (unexpected; --debug or CREPS_DEBUG=1 shows the traceback)"


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__


def debug_enabled(flag: bool = False) -> bool:
    return flag or os.environ.get("CREPS_DEBUG", "") not in ("", "0")


def run_cli(fn: Callable[[], int], debug: bool = False, interrupted: str = "interrupted", failed_hint: str = "") -> int:
    """Run a subcommand body; a UserError becomes one stderr line and its exit code.

    ``failed_hint`` is appended to errors of work that stopped part-way
    (exit code 1), e.g. how to resume it.  Any other exception is such a
    failure too (exit 1): one line naming its type, and how to see the
    traceback, instead of the traceback itself.
    """
    try:
        return int(fn() or 0)
    except UserError as e:
        if debug_enabled(debug):
            raise
        hint = e.hint or (failed_hint if e.exit_code == 1 else "")
        print(f"error: {first_line(e)}{hint}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if debug_enabled(debug):
            raise
        print(interrupted, file=sys.stderr)
        return 130
    except Exception as e:  # a bug, or a failure no message was written for: still one line
        if debug_enabled(debug):
            raise
        print(f"error: {type(e).__name__}: {first_line(e)}{failed_hint}{UNEXPECTED}", file=sys.stderr)
        return 1
