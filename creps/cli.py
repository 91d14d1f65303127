"""The shape both command-line scripts share (render.py, train.py).

Each script is a table of subcommands; each subcommand is a module exposing
``add_arguments(parser)`` and ``run(args) -> int``.  ``run`` is wrapped by
``@command``, so calling it directly (tests, other scripts) behaves exactly
like the command line: errors become one ``error:`` line and an exit code
(``creps.errors.run_cli``), and ``--debug`` / ``CREPS_DEBUG=1`` re-raises.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from .canvas import MAX_SIDE
from .errors import UserError, run_cli

DEBUG_HELP = "on an error, show the full traceback instead of one line (also: CREPS_DEBUG=1)"
RESUME = "interrupted; re-run the same command to resume"

Run = Callable[[argparse.Namespace], int]

# A quick try of any documented command: CREPS_QUICK=1 shrinks the work a command starts to seconds
# (tests/test_docs.py runs every command of README.md and docs/*.md so).  Outputs are small versions of
# the real ones; the caps below are the whole difference.
QUICK_ENV = "CREPS_QUICK"
QUICK_SIDE = 128  # canvas and video frame sides, at most (the aspect ratio kept)
QUICK_FRAMES = 3  # video frames
QUICK_BATCH = 4  # training: one step of at most this many images
QUICK_SAMPLES = 8  # generated images per FID / KID
QUICK_SEEDS = 2  # latent seeds of a scale-consistency check


class Parser(argparse.ArgumentParser):
    """argparse with the project's error form: a bad flag is one ``error:`` line and exit 2.

    argparse's own form (a usage block, then ``prog: error: ...``) is several
    lines on stderr, unlike every other refusal of these commands; the usage
    stays one ``--help`` away, which the line names.  Subparsers inherit the
    class (``add_subparsers`` makes them with the parent's type).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def command(interrupted: str = RESUME, failed_hint: str = "") -> Callable[[Run], Run]:
    """Make a subcommand body (which raises UserError on bad input) into its ``run``."""

    def wrap(body: Run) -> Run:
        @functools.wraps(body)
        def run(args: argparse.Namespace) -> int:
            debug = bool(getattr(args, "debug", False))
            return run_cli(lambda: body(args), debug=debug, interrupted=interrupted, failed_hint=failed_hint)

        return run

    return wrap


def python_command() -> str:
    """The interpreter that runs us, as the user would type it: a path relative to the current
    directory when it lies under it (``.venv/bin/python``), ``python`` when that is what PATH finds,
    else its absolute path."""
    rel = os.path.relpath(sys.executable)
    if not rel.startswith(".."):
        return rel if os.sep in rel else os.path.join(".", rel)
    found = shutil.which("python")
    if found and os.path.abspath(found) == os.path.abspath(sys.executable):
        return "python"
    return sys.executable


def follow_up(command: str) -> str:
    """A command to run next (``render.py view out/a.dzi``) as the user can paste it: the one way
    every subcommand prints one, so a printed command names the interpreter that ran this one."""
    return f"{python_command()} {command}"


def quick() -> bool:
    """Whether ``CREPS_QUICK`` asks for a quick try (see QUICK_SIDE and the caps beside it)."""
    return os.environ.get(QUICK_ENV, "") not in ("", "0")


def quick_size(width: int, height: int, multiple: int = 1) -> tuple[int, int]:
    """``(width, height)``, or under CREPS_QUICK the same aspect with the longer side at most
    QUICK_SIDE, each side a multiple of ``multiple`` (even frames for H.264)."""
    if not quick() or max(width, height) <= QUICK_SIDE:
        return width, height
    f = QUICK_SIDE / max(width, height)

    def side(n: int) -> int:
        return max(multiple, int(n * f) // multiple * multiple)

    return side(width), side(height)


def build_parser(
    prog: str, description: str | None, subcommands: dict[str, tuple[str, str]], tolerate_missing: bool = False
) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one subparser per table entry ``name -> (module, one-line help)``.

    ``--debug`` is accepted before or after the subcommand.  With
    ``tolerate_missing`` a subcommand whose module cannot be imported stays
    listed and says why when chosen.
    """
    parser: argparse.ArgumentParser = Parser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers: dict[str, argparse.ArgumentParser] = {}
    for name, (module, help_text) in subcommands.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            if not tolerate_missing:
                raise
            p = sub.add_parser(name, help=f"{help_text} [unavailable: {e}]")
            p.set_defaults(_module=None, _error=str(e))
            continue
        p = sub.add_parser(
            name,
            help=help_text,
            description=(mod.__doc__ or help_text),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        # SUPPRESS: a `--debug` given before the subcommand is not reset by the subparser's default
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        p.set_defaults(_module=mod)
        subparsers[name] = p
    return parser, subparsers


def dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the chosen subcommand (its ``run`` reports its own errors)."""
    if args.command is None:
        parser.print_help()
        return 2
    if args._module is None:
        print(f"error: {args.command} is unavailable: {args._error}", file=sys.stderr)
        return 2
    return int(args._module.run(args) or 0)


WARP_HELP = (
    "map the {} coordinates: shift:d, scale:s[,c], mirror[:c], sine:amp,freq[,phase], barrel:k[,c,r]; "
    "repeat the flag (or join with ';') to chain (see docs/experiments.md)"
)


def add_warp_arguments(g: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """``--warp-rows`` / ``--warp-cols`` (repeatable), shared by the render, video and view commands."""
    g.add_argument("--warp-rows", action="append", metavar="WARP", help=WARP_HELP.format("row"))
    g.add_argument("--warp-cols", action="append", metavar="WARP", help=WARP_HELP.format("column"))


def warp_flags(args: argparse.Namespace) -> dict[str, str]:
    """The warp fields given on the command line, in canonical text (one-line UserError when bad)."""
    from . import warp

    out = {}
    for name in ("warp_rows", "warp_cols"):
        given = getattr(args, name, None)
        if given is not None:
            try:
                out[name] = warp.canonical(given)
            except ValueError as e:
                raise UserError(f"--{name.replace('_', '-')}: {e}") from None
    return out


def parse_size(text: str, error: type[UserError] = UserError, name: str = "size") -> tuple[int, int]:
    """'WIDTHxHEIGHT' or 'N' (square) -> (width, height), sides 1..2^20.

    One parser for every command that takes a canvas size (render, video,
    bench, view) and for a job file's ``size``; ``error`` is the caller's
    exception type and ``name`` how the message calls the value.
    """
    parts = text.lower().replace("×", "x").split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise error(f"{name} must be WIDTHxHEIGHT or N, got {text!r}") from None
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2:
        raise error(f"{name} must be WIDTHxHEIGHT or N, got {text!r}")
    for n in nums:
        if not 1 <= n <= MAX_SIDE:
            raise error(f"{name} {text!r}: canvas sides must be 1..2^20 pixels, got {n}")
    return nums[0], nums[1]


def parse_view(value: Any, error: type[UserError] = UserError, name: str = "view") -> tuple[float, float, float, float]:
    """'Y0,Y1,X0,X1' (or four numbers, as a job file gives them) -> four finite floats."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        vals = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise error(f"{name} must be Y0,Y1,X0,X1, got {value!r}") from None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise error(f"{name} must be four finite numbers Y0,Y1,X0,X1, got {value!r}")
    return vals[0], vals[1], vals[2], vals[3]
