#!/usr/bin/env python3
"""creps-gigapixel: render gigapixel CREPS images, build pyramids, view them.

  render.py                      the default demo job (render + exports + view link)
  render.py render [job.toml]    a render job (flags override the TOML)
  render.py assemble URL         pyramid, pyramidal TIFF and DeepZoom from a store
  render.py view URL_OR_DZI      serve an OpenSeadragon viewer on 127.0.0.1
  render.py bench                machine peak and renderer throughput
  render.py convert PKL OUT      official CREPS pickle -> our safetensors format

Each subcommand lives in its own module (jobs/, viewer/, creps/); this file
only dispatches, so `--help` on every subcommand is the reference.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Modules expose add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "render": ("jobs.cli", "render an image into a Zarr store (resume = re-run the same command)"),
    "assemble": ("jobs.assemble", "build pyramid levels, a pyramidal TIFF and a DeepZoom pyramid from a store"),
    "view": ("viewer.cli", "serve an OpenSeadragon viewer for a store or a .dzi on 127.0.0.1"),
    "bench": ("jobs.bench", "measure matmul peak and renderer throughput; last line is JSON"),
    "convert": ("creps.convert", "convert an official CREPS .pkl to our safetensors + JSON format"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="render.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as e:  # a subcommand whose module is missing stays listed, and says why
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
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["render"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args._module is None:
        print(f"error: {args.command} is unavailable: {args._error}", file=sys.stderr)
        return 2
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
