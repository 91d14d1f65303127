#!/usr/bin/env bash
# The prepared device check of the CUDA path (issue 13): the `cuda` tests, then
# `render.py bench --device cuda` in fp32, bf16 and fp16, figures printed at the end.
# Made to finish in under 8 minutes on one H100/H200 (each step has its own timeout).
#
# On a lent GPU machine (the device tool; see /work/.library/device/README.md), from the repo root:
#     run(command="bash tests/gpu/check.sh", carry=[".whl"], timeout_s=560)
# That machine has Python 3.12 with torch (CUDA), numpy, safetensors, tqdm, tifffile, fsspec,
# pytest, but no ray/zarr/numcodecs/donfig/crc32c, and no network: the check renders in process
# (`--workers 0`, no Ray) and installs zarr and its needs from wheels carried in .whl/
# (gitignored, ~10 MB), fetched once on this side with:
#     python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
#
# --dry-run: the same steps on this machine's CPU at small sizes with preset:tiny (tests via
# CREPS_CUDA_DRY_RUN=1, bench with --device cpu): everything but the CUDA calls is exercised.
# Outputs (bench logs, JSON lines) go to $OUT (the device tool's folder) or /tmp/creps-gpu-check.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-/tmp/creps-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
T0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }

step "environment"
if ! $PY -c "import zarr, numcodecs, donfig" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no zarr here and no wheels in .whl/ (see the header of $0)"; exit 3; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/creps-site .whl/*.whl \
        || exit 3
    export PYTHONPATH=/tmp/creps-site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY - <<'EOF' || exit 3
import platform, torch, zarr, numcodecs
print(f"python {platform.python_version()}, torch {torch.__version__}, zarr {zarr.__version__}, numcodecs {numcodecs.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, CUDA {torch.version.cuda}")
else:
    print("no CUDA GPU visible")
try:
    import ray  # noqa: F401
    print("ray: importable (not needed)")
except ImportError:
    print("ray: not installed (the check runs in process)")
EOF

if [[ $DRY == 1 ]]; then
    CKPT=preset:tiny
    BENCH_ARGS=(--device cpu --checkpoint "$CKPT" --tile 128 --e2e-size 512x512 --e2e-workers 0 --repeats 1
        --overhead-size 256x256)
    export CREPS_CUDA_DRY_RUN=1
    PRECISIONS=(fp32 bf16)
else
    BENCH_ARGS=(--device cuda)
    PRECISIONS=(fp32 bf16 fp16)
    $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "no CUDA GPU: use --dry-run on a CPU machine"; exit 3; }
fi

step "cuda tests (tests/gpu)"
timeout 180 $PY -m pytest -q -m cuda tests/gpu -rs -s -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt"
TESTS=${PIPESTATUS[0]}

BENCH_RC=0
for p in "${PRECISIONS[@]}"; do
    step "render.py bench ${BENCH_ARGS[*]} --precision $p"
    limit=90
    [[ $p == fp32 ]] && limit=100  # fp32 without TF32 is the slow one
    timeout $limit $PY render.py bench "${BENCH_ARGS[@]}" --precision "$p" 2>&1 | tee "$OUT/bench_$p.txt"
    rc=${PIPESTATUS[0]}
    [[ $rc != 0 ]] && BENCH_RC=$rc
done

step "figures"
for p in "${PRECISIONS[@]}"; do
    tail -n 1 "$OUT/bench_$p.txt" | tee -a "$OUT/bench.jsonl"
done
echo "tests exit $TESTS, bench exit $BENCH_RC, $(( $(date +%s) - T0 )) s in all"
[[ $TESTS == 0 && $BENCH_RC == 0 ]]
