"""Convert a generator checkpoint (an official CREPS .pkl) to our format.

  render.py convert creps-ffhq-512x512.pkl ffhq512.safetensors

The pickle is read by a restricted unpickler that executes nothing from the
file (its embedded module source is never run); the G_ema weights and the
config inferred from their shapes are written as one .safetensors file with the
config as JSON metadata, which `creps.load` and every render job accept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .checkpoint import checkpoint_hash, load, save
from .cli import command
from .errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="official CREPS network pickle (*.pkl) or any checkpoint creps.load reads")
    parser.add_argument("output", help="output .safetensors path (written atomically)")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")


@command()
def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.exists() and not args.force:
        raise UserError(f"{out} exists (pass --force to overwrite)")
    if out.suffix != ".safetensors":
        raise UserError(f"output must end in .safetensors, got {out.name}")
    G = load(args.input)
    save(G, out)
    params = sum(p.numel() for p in G.parameters())
    print(json.dumps(G.cfg.to_dict(), indent=2))
    print(f"parameters: {params:,} ({params / 1e6:.2f} M), state-dict entries: {len(G.state_dict())}")
    print(f"wrote {out} (sha256 {checkpoint_hash(out)})")
    return 0
