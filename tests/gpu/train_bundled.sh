#!/usr/bin/env bash
# The one prepared device run of the bundled model (docs/training.md, "A bundled model worth looking at").
#
# On a lent H100/H200 (device tool, carry the dataset):
#   run(command="bash tests/gpu/train_bundled.sh", carry=["data/landscapes128"], timeout_s=600)
# It installs nothing: the GPU image's Python 3.12 + torch + numpy + safetensors + pillow + tqdm is all
# train.py needs (no ray, zarr or pyvips). It trains the land128 preset in bf16 autocast on one GPU
# for a fixed wall-clock budget (MINUTES, default 8.5; train.py --minutes stops cleanly and writes the
# checkpoint), logs kimg/s over the first 30 s, and copies G_ema + the last sample grid + the logs to
# $OUT. FID/KID at 500 samples are computed back on the CPU (the Inception weights, 87 MB, do not
# fit the 64 MiB that travels):
#   .venv/bin/python train.py metrics <returned G_ema.safetensors> --data data/landscapes128 --num 500
#
# CPU smoke test of the same script (what the tests do, 1 minute, tiny preset):
#   OUT=/tmp/out MINUTES=1 PRESET=tiny RESOLUTION=32 BATCH=8 DEVICE=cpu bash tests/gpu/train_bundled.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
MINUTES=${MINUTES:-8.5}
PRESET=${PRESET:-land128}
DATA=${DATA:-data/landscapes128}
RESOLUTION=${RESOLUTION:-128}
BATCH=${BATCH:-64}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
OUT=${OUT:?set OUT to the folder the results go to}
RUN=${RUN:-/tmp/creps-bundled-run}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
[ -d "$DATA" ] || { echo "error: $DATA missing; build it with: python -m training.landscapes $DATA" >&2; exit 2; }
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
rm -rf "$RUN"
"$PY" train.py --data "$DATA" --out "$RUN" --preset "$PRESET" --resolution "$RESOLUTION" --batch "$BATCH" \
    --kimg 100000 --minutes "$MINUTES" --snap 100000 --tick 2 --mirror --device "$DEVICE" --no-progress \
    2>&1 | tee "$OUT/train.log"
cp "$RUN/G_ema.safetensors" "$RUN/log.jsonl" "$RUN/config.json" "$OUT/"
cp "$(ls "$RUN"/fakes*.png | tail -1)" "$OUT/fakes.png"
"$PY" - "$RUN" <<'PY' | tee "$OUT/summary.txt"
import json, sys
recs = [json.loads(x) for x in open(sys.argv[1] + "/log.jsonl")]
first = next((r["first_kimg_per_s"] for r in recs if "first_kimg_per_s" in r), None)
ticks = [r for r in recs if "kimg" in r]
print(json.dumps({"first_30s_kimg_per_s": first, "kimg": ticks[-1]["kimg"] if ticks else 0.0,
                  "loss_G": ticks[-1].get("loss_G") if ticks else None}))
PY
