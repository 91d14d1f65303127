"""render: render an image into a Zarr store (resume = re-run the same command).

  render.py render --checkpoint preset:tiny --size 1024x768 --tile 256 --out out/a.zarr
  render.py render jobs/examples/demo.toml --workers 2      (flags override the TOML)
  render.py                                                 (the default demo job)

CKPT is a .safetensors file of ours, a training checkpoint (ckpt-*.safetensors:
its G_ema), a training run directory (its newest G_ema), an official CREPS
.pkl, or preset:NAME (fresh weights of that preset from --init-seed).  --scale S renders an N x N
canvas with N = int(R * S), R the checkpoint's training resolution.  Without
--address a quiet embedded Ray starts on 127.0.0.1; with it, the job joins an
existing cluster (`ray start --head`).  --workers 0 renders in this process,
without Ray (--device cpu|cuda; the same store, markers and bytes).
--precision fp16|bf16x3|bf16 runs the pixel stage's matmuls in that format:
fp16 (the fast one) and bf16x3 (three bf16 products per layer) within one
uint8 level of fp32 on >= 99 % of pixels, plain bf16 less accurate
(docs/exactness.md); fp32, the default, is exact.
Bad input exits with code 2 and one line on stderr before anything is
rendered or written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import creps
from creps.cli import add_warp_arguments, command, follow_up, quick, quick_size, warp_flags
from creps.errors import first_line
from creps.precision import PRECISIONS
from renderer.fsio import is_local, local_path

from . import JobSpecError
from .plan import line_chunk
from .spec import JobSpec, parse_size, parse_storage_options, parse_view

if TYPE_CHECKING:
    from .job import Prepared


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", help="job TOML file (flags override its values)")
    g = p.add_argument_group("what to render")
    g.add_argument(
        "--checkpoint",
        metavar="CKPT",
        help="weights: .safetensors (ours, or a training ckpt-*.safetensors), official .pkl, "
        "a training run directory (its newest G_ema) or preset:NAME",
    )
    g.add_argument("--init-seed", type=int, metavar="N", help="weights seed for preset:NAME (default 0)")
    g.add_argument("--seed", type=int, metavar="N", help="latent seed (default 0)")
    g.add_argument("--psi", type=float, metavar="F", help="truncation psi (default 1)")
    g.add_argument("--size", metavar="WxH", help="canvas WIDTHxHEIGHT in pixels (or N for square)")
    g.add_argument("--scale", type=float, metavar="S", help="square canvas of int(R*S) pixels, R = training resolution")
    g.add_argument("--view", metavar="Y0,Y1,X0,X1", help="coordinate window (default 0,1,0,1)")
    add_warp_arguments(g)
    g.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        help="pixel-stage arithmetic: fp32 (default, exact), bf16, bf16x3 or fp16 (errors: docs/exactness.md; "
        "part of the job: a store keeps its own)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="URL", help="store path or fsspec URL (default out/<name>.zarr)")
    g.add_argument("--name", help="job name (default demo)")
    g.add_argument("--storage-options", metavar="JSON", help="fsspec storage options as a JSON object")
    g.add_argument("--tile", type=int, metavar="T", help="tile = chunk side, a multiple of 16 (default 512)")
    g.add_argument(
        "--shard",
        type=int,
        metavar="N",
        help="tiles per shard side: one stored object and one marker per shard (1: no sharding; default: "
        "1 on local disks, on object stores the smallest power of two that keeps level 0 at <= 1,024 objects)",
    )
    g.add_argument(
        "--block",
        type=int,
        metavar="G",
        help="plan tiles per block side, a power of two: a worker renders whole G x G blocks and writes their "
        "pyramid levels 1..log2(G) with them, so assemble only builds the coarser ones (1: no levels during "
        "the render; default: the largest G with blocks of <= 2048 px and >= 16 blocks)",
    )
    g.add_argument("--compressor", choices=["zstd", "none"], help="chunk compressor (default zstd)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing store made by another job")
    g.add_argument(
        "--no-exports",
        dest="exports",
        action="store_false",
        default=None,
        help="skip the pyramidal TIFF and DeepZoom exports",
    )
    g = p.add_argument_group("performance")
    g.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="Ray actors (default: one per GPU, else one per core); 0 = render in this process, without Ray",
    )
    g.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        help="where to render (default: cuda when a GPU is visible); in process, or picks GPU/CPU actors",
    )
    g.add_argument("--gpus-per-worker", type=float, metavar="G", help="GPUs per actor (default 1 with CUDA, else 0)")
    g.add_argument(
        "--threads-per-worker",
        type=int,
        metavar="T",
        help="torch threads per CPU actor (in process: render threads, default one per core)",
    )
    g.add_argument("--batch", type=int, metavar="N", help="tiles per task (default auto)")
    g.add_argument("--address", metavar="ADDR", help="join this Ray cluster (host:port or auto)")
    g = p.add_argument_group("control")
    g.add_argument("--dry-run", action="store_true", help="print the resolved job and plan, render nothing")
    g.add_argument("--max-tiles", type=int, metavar="N", help="render at most N missing tiles this run")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument(
        "--verify",
        action="store_true",
        help="then check every tile against its marker's crc32 and re-render bad ones (see `render.py verify`)",
    )


FLAG_FIELDS = (
    "checkpoint",
    "init_seed",
    "seed",
    "psi",
    "scale",
    "out",
    "name",
    "tile",
    "shard",
    "block",
    "compressor",
    "precision",
    "workers",
    "device",
    "gpus_per_worker",
    "threads_per_worker",
    "batch",
    "address",
    "exports",
)


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    """JobSpec from an optional TOML file and the flags given (flags win)."""
    over: dict[str, Any] = {k: getattr(args, k) for k in FLAG_FIELDS if getattr(args, k, None) is not None}
    if args.size is not None:
        over["width"], over["height"] = parse_size(args.size)
        over["scale"] = None
    if args.scale is not None:
        over["scale"] = args.scale
    if args.view is not None:
        over["view"] = parse_view(args.view)
    if args.storage_options is not None:
        over["storage_options"] = parse_storage_options(args.storage_options)
    over.update(warp_flags(args))
    if args.job:
        return JobSpec.from_toml(args.job, over)
    return JobSpec.from_dict(over)


def quick_spec(spec: JobSpec) -> JobSpec:
    """The job on a canvas of at most QUICK_SIDE a side under CREPS_QUICK (``creps.cli.quick``), else ``spec``.

    ``--scale`` is resolved here against the checkpoint's resolution, as ``jobs.run.prepare`` would.
    """
    if not quick():
        return spec
    if spec.scale is not None:
        cfg = creps.read_config(creps.resolve_checkpoint(spec.checkpoint), init_seed=spec.init_seed)
        spec = spec.resolved(cfg.image_size)
    width, height = quick_size(spec.width, spec.height)
    return dataclasses.replace(spec, width=width, height=height)


@command(failed_hint=" (re-run the same command to resume)")
def run(args: argparse.Namespace) -> int:
    from .run import prepare, run_job

    spec = quick_spec(spec_from_args(args))
    if args.max_tiles is not None and args.max_tiles < 0:
        raise JobSpecError(f"--max-tiles must be >= 0, got {args.max_tiles}")
    if args.dry_run:
        return _dry_run(prepare(spec))
    summary = run_job(spec, overwrite=args.overwrite, max_tiles=args.max_tiles, progress=not args.quiet)
    record: dict = summary.to_dict()
    verified = ""
    if getattr(args, "verify", False):
        verified, record["verify"] = _verify(spec, summary.status, summary.tiles_left, not args.quiet)
    print("summary " + json.dumps(record))
    print(
        f"rendered {summary.tiles_rendered} of {summary.tiles_total} tiles "
        f"({summary.tiles_skipped} already done): {summary.pixels / 1e6:.1f} Mpx in "
        f"{summary.seconds:.1f} s = {summary.mpx_s:.2f} Mpx/s -> {summary.out}{verified}"
    )
    if spec.exports and summary.status == "done":
        _exports(spec.out, spec.storage_options)
    return 0


def _verify(spec: JobSpec, status: str, tiles_left: int, progress: bool) -> tuple[str, dict | None]:
    """``--verify``: (words for the summary line, record for the summary JSON) of the check and repair."""
    from renderer.errors import RendererError

    from .verify import verify_after_render

    if status != "done":
        return f"; verify skipped: {tiles_left} tiles not rendered yet", None
    outcome = verify_after_render(spec, progress=progress)
    if not outcome.ok:
        left = [b.id for b in outcome.remaining] + [c.path for c in outcome.remaining_chunks]
        raise RendererError(
            f"{len(left)} tiles or level chunks still fail verification after the repair: {', '.join(left[:5])}"
        )
    return f"; {outcome.headline()}", outcome.to_dict()


def _dry_run(job: Prepared) -> int:
    spec = job.spec
    f = creps.flops(job.config, spec.height, spec.width)
    print(spec.describe())
    print(
        f"plan: {len(job.plan):,} tiles of <= {spec.tile * spec.shard}^2 px in blocks of {spec.block}x{spec.block} "
        f"(pyramid levels 1..{job.levels} written with them), "
        f"line chunk {line_chunk(spec.tile)}, {spec.height} row + {spec.width} column lines; {f.total / 1e12:.2f} TFLOP "
        f"({100 * f.line_share:.1f} % line work); checkpoint {job.checkpoint_sha256}; out {spec.out}"
    )
    return 0


class ExportError(JobSpecError):
    """The render finished but its exports did not: exit 1 (part-way), the line says how to retry.

    Exit 0 would let a script believe the TIFF and DZI exist; the render
    itself is complete and kept, so retrying is one ``assemble``.
    """

    exit_code = 1

    def __init__(self, message: str, retry: str) -> None:
        super().__init__(message)
        self.hint = f" (retry them with `{retry}`)"


def _exports(url: str, storage_options: dict) -> None:
    """Pyramid, TIFF and DZI next to a local store (remote stores: say how to build them)."""
    from .assemble import assemble

    if url.startswith("memory://"):
        print("exports: skipped; a memory:// store lives only in this process (render to a path or a bucket to export)")
        return
    if not is_local(url):
        print(
            f"exports: run `{follow_up(f'render.py assemble {url}')}` to build the pyramid and exports for a remote store"
        )
        return
    base = Path(local_path(url))
    stem = base.with_suffix("")
    tiff, dzi = f"{stem}.tif", f"{stem}.dzi"
    try:
        assemble(str(base), tiff=tiff, dzi=dzi, storage_options=storage_options or None)
    except Exception as e:  # the render is done and kept; the command still failed, so say how to finish it
        retry = follow_up(f"render.py assemble {url} --tiff {tiff} --dzi {dzi}")
        raise ExportError(f"exports failed: {first_line(e)}; the render in {url} is kept", retry) from None
    print(f"exports: {tiff}, {dzi}")
    print(f"view it: {follow_up(f'render.py view {dzi}')}")
    print(f"endless zoom: {follow_up('render.py view ' + ENDLESS_ZOOM_ARGS.format(checkpoint=_bundled()))}")


# The bundled model on a 1048576² canvas over a wide window (every level has detail), rendered as it is looked at.
ENDLESS_ZOOM_ARGS = "--checkpoint {checkpoint} --size 1048576x1048576 --view 0,1024,0,1024"


def _bundled() -> str:
    """The bundled weights as the user would type them (relative to here when inside), else the default."""
    from .spec import default_checkpoint

    ckpt = default_checkpoint()
    rel = os.path.relpath(ckpt) if not ckpt.startswith("preset:") else ckpt
    return rel if not rel.startswith("..") else ckpt
