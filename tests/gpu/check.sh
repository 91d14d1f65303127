#!/usr/bin/env bash
# The prepared device check of the CUDA path (issues 13, 24): the `cuda` tests, one
# `render.py bench --device cuda` pass per precision (fp32, bf16, bf16x3, fp16) on an 8192^2 end-to-end
# canvas, then the 1 Gpx figure (ffhq512 32768^2 end to end, fp16) as one separate timed step.
# Sized to fit twice, with the machine's start, in the 15 minutes of GPU time a session gets: every
# step has its own timeout and together they allow at most 6 minutes of work on one H100/H200
# (tests 110 s, benches 45 + 3 x 35 s, 1 Gpx 70 s; the wheel install ~15 s). Figures printed at the end.
#
# On a lent GPU machine (the device tool; see /work/.library/device/README.md), from the repo root:
#     run(command="bash tests/gpu/check.sh", carry=[".whl"], timeout_s=390)
# (it leaves 7 files in $OUT; the tool brings back at most 8)
# That machine has Python 3.12 with torch 2.11 (CUDA), numpy, safetensors, tqdm, tifffile, fsspec,
# pyyaml, pytest, but no ray/zarr/numcodecs/donfig/crc32c, and no network: the check renders in
# process (`--workers 0`, no Ray) and installs zarr and its needs from wheels carried in .whl/
# (gitignored, ~9.3 MiB), fetched once on this side with:
#     bash tests/gpu/fetch_wheels.sh
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
TSCALE=1
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
    GPX_ARGS=(--device cpu --checkpoint "$CKPT" --tile 128 --e2e-size 1024x1024 --e2e-workers 0 --repeats 1
        --overhead-size 0)
    export CREPS_CUDA_DRY_RUN=1
    TSCALE=30  # a shared, loaded CPU is far slower than the GPU the timeouts are sized for
else
    BENCH_ARGS=(--device cuda --e2e-size 8192x8192 --repeats 1)
    GPX_ARGS=(--device cuda --e2e-size 32768x32768 --repeats 1 --overhead-size 0)
    $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "no CUDA GPU: use --dry-run on a CPU machine"; exit 3; }
fi
PRECISIONS=(fp32 bf16 bf16x3 fp16)
GPX_PRECISION=fp16  # the documented fast mode: the 1 Gpx target (<= 10 s) is for it

step "cuda tests (tests/gpu)"
timeout $(( 110 * TSCALE )) $PY -m pytest -q -m cuda tests/gpu -rs -s -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt"
TESTS=${PIPESTATUS[0]}

BENCH_RC=0
for p in "${PRECISIONS[@]}"; do
    step "render.py bench ${BENCH_ARGS[*]} --precision $p"
    limit=35
    [[ $p == fp32 ]] && limit=45  # fp32 without TF32 is the slow one
    timeout $(( limit * TSCALE )) $PY render.py bench "${BENCH_ARGS[@]}" --precision "$p" 2>&1 | tee "$OUT/bench_$p.txt"
    rc=${PIPESTATUS[0]}
    [[ $rc != 0 ]] && BENCH_RC=$rc
done

step "1 Gpx: render.py bench ${GPX_ARGS[*]} --precision $GPX_PRECISION"
timeout $(( 70 * TSCALE )) $PY render.py bench "${GPX_ARGS[@]}" --precision "$GPX_PRECISION" 2>&1 | tee "$OUT/bench_gpx.txt"
GPX_RC=${PIPESTATUS[0]}

step "figures"
: >"$OUT/bench.jsonl"
for f in "${PRECISIONS[@]/#/bench_}" bench_gpx; do
    tail -n 1 "$OUT/$f.txt" | tee -a "$OUT/bench.jsonl"
done
echo "tests exit $TESTS, bench exit $BENCH_RC, 1 Gpx exit $GPX_RC, $(( $(date +%s) - T0 )) s in all"
[[ $TESTS == 0 && $BENCH_RC == 0 && $GPX_RC == 0 ]]
