#!/usr/bin/env bash
# Fetch the cp312 wheels that tests/gpu/check.sh carries to the GPU machine into .whl/ (gitignored).
#
# The GPU image (Python 3.12, torch 2.11 CUDA, numpy, fsspec, tifffile, pyyaml, packaging, no network)
# lacks zarr and what zarr needs beyond it: numcodecs, donfig and google-crc32c. Run this once on the
# CPU side, from anywhere in the repo, before the device run (`run(..., carry=[".whl"])`):
#     bash tests/gpu/fetch_wheels.sh
# It uses the pip download command of the device tool's README (/work/.library/device/README.md), one
# package at a time (--no-deps: each need is named here), keeps exactly one version of each, checks
# every Requires-Dist of what it fetched is either fetched or in the image, and refuses over 64 MiB
# (the limit of what travels). The versions are the ones the test suite runs with (.venv); override
# with WHEELS="zarr==X numcodecs==Y ...".
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] && PY=${PYTHON:-.venv/bin/python}
WHEELS=${WHEELS:-"zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0"}
# in the GPU image already (KINDS.md's package list): needs of the wheels that are not fetched
IMAGE="numpy packaging typing-extensions pyyaml fsspec"
DEST=.whl
mkdir -p "$DEST"
for spec in $WHEELS; do
    name=${spec%%==*}
    # one version of each: an older wheel of the same package would stop the whole install there
    find "$DEST" -maxdepth 1 -iname "$(echo "$name" | tr - _)-*.whl" ! -iname "$(echo "$spec" | tr - _ | sed 's/==/-/')-*" -delete
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "$spec"
done
$PY - "$DEST" "$WHEELS" "$IMAGE" <<'PY'
import re, sys, zipfile
from pathlib import Path

dest, wanted, image = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split()
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
wheels = sorted(dest.glob("*.whl"))
have = {norm(w.name.split("-")[0]): w for w in wheels}
missing = [s for s in wanted if norm(s.split("==")[0]) not in have]
needs = set()
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                needs.add(norm(re.split(r"[ ;<>=!~\[(]", line.split(":", 1)[1].strip())[0]))
unmet = sorted(needs - set(have) - {norm(n) for n in image})
size = sum(w.stat().st_size for w in wheels)
for w in wheels:
    print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
print(f"{len(wheels)} wheels, {size / 2**20:.2f} MiB in {dest}/")
if missing or unmet or size >= 64 * 2**20:
    sys.exit(f"error: missing {missing}, needs not carried {unmet}, or {size / 2**20:.1f} MiB >= 64 MiB")
PY
