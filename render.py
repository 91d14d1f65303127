#!/usr/bin/env python3
"""creps-gigapixel: render gigapixel CREPS images, build pyramids, view them.

  render.py                      the default demo job (render + exports + view link)
  render.py render [job.toml]    a render job (flags override the TOML)
  render.py assemble URL         pyramid, pyramidal TIFF and DeepZoom from a store
  render.py import IMAGE URL     any picture (PNG, JPEG, TIFF, ...) into a store, as a render makes one
  render.py view URL_OR_DZI      serve an OpenSeadragon viewer on 127.0.0.1
  render.py bench                machine peak and renderer throughput
  render.py bench-assemble       assemble (pyramid, TIFF, DeepZoom) against libvips, 16384^2 and 32768^2
  render.py convert PKL OUT      official CREPS pickle -> our safetensors format
  render.py compare --scale 4    Lanczos upsampling next to CREPS at the higher scale (a labelled PNG)
  render.py video SRC --zoom ... an H.264 zoom (store pyramid or checkpoint) or latent-interpolation video

Each subcommand lives in its own module (jobs/, viewer/, creps/); this file
only dispatches, so `--help` on every subcommand is the reference.
"""

from __future__ import annotations

import argparse
import sys

from creps import cli

# subcommand -> (module, one-line help). Modules expose add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "render": ("jobs.cli", "render an image into a Zarr store (resume = re-run the same command)"),
    "verify": ("jobs.verify", "check every tile of a store against its marker's crc32; re-render bad ones"),
    "import": ("jobs.importer", "bring a picture (PNG, JPEG, TIFF, ...) into an image store, as a render makes one"),
    "assemble": ("jobs.assemble", "build pyramid levels, a pyramidal TIFF and a DeepZoom pyramid from a store"),
    "view": ("viewer.cli", "serve an OpenSeadragon viewer for a store or a .dzi on 127.0.0.1"),
    "bench": ("jobs.bench", "measure matmul peak and renderer throughput; last line is JSON"),
    "bench-assemble": ("jobs.bench_exports", "pyramid + TIFF + DeepZoom (ours) against vips; last line is JSON"),
    "convert": ("creps.convert", "convert an official CREPS .pkl to our safetensors + JSON format"),
    "compare": ("jobs.compare", "Lanczos upsampling of the R render next to CREPS rendered at a higher scale"),
    "video": ("jobs.video", "H.264 zoom from the whole image to a deep point, or a latent interpolation"),
}


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser("render.py", __doc__, SUBCOMMANDS, tolerate_missing=True)[0]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not [a for a in argv if a != "--debug"]:
        argv = [*argv, "render"]  # `render.py` alone: the default job
    parser = build_parser()
    return cli.dispatch(parser, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
