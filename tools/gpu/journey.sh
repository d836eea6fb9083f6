#!/usr/bin/env bash
# The GPU journey in device calls, on a machine without a package registry (tools/gpu/stage.sh first):
#   bash tools/gpu/journey.sh stage gK   # each of the calls carrying .whl/gK: keeps the group in /tmp/stage
#   bash tools/gpu/journey.sh run        # the last call: joins and installs, then runs notebooks 01-06 with
#                                        # the `gpu` preset scaled by $JOURNEY_OVERRIDES, and brings back
#                                        # the executed notebooks, figures, timings and benchmark results
# The machine must stay warm between calls (it keeps /tmp while held). $OUT is where files come back.
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
  stage)
    mkdir -p /tmp/stage && cp .whl/"$2"/* /tmp/stage/ && ls /tmp/stage | wc -l && exit 0 ;;
  run) ;;
  *) echo "usage: journey.sh stage gK | run" >&2; exit 2 ;;
esac
cd /tmp/stage
for first in *.part00; do  # a wheel carried in parts is joined whole
  if [ -e "$first" ]; then cat "${first%.part00}".part* > "${first%.part00}"; rm "${first%.part00}".part*; fi
done
cd - > /dev/null
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/stage/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# ORT's CUDA provider loads CUDA 13's libraries from the nvidia wheels beside PyTorch
NV=$(python3 -c "import nvidia, os; print(':'.join(sorted(os.path.join(p, d, 'lib') for p in nvidia.__path__ for d in os.listdir(p))))")
export LD_LIBRARY_PATH="$NV:${LD_LIBRARY_PATH:-}"
export WORKBOOK_PRESET=gpu WORKBOOK_DATA=/tmp/journey MEDUSA_WORKBOOK_CACHE=/tmp/journey-cache
SCALED='{"distill_train_records": 1500, "train_records": 1500, "train_steps": 1500, "hydra_train_steps": 1500, "sizing_prompts": 13}'
export WORKBOOK_OVERRIDES="${JOURNEY_OVERRIDES:-$SCALED}"  # the `gpu` preset scaled to end in about 8 minutes
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers(), 'torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
status=0
timeout "${JOURNEY_SECONDS:-540}" python3 -m medusa_lib.run_all gpu > "$OUT/run_all.log" 2>&1 || status=$?
cp /tmp/journey/gpu/executed/timings.json /tmp/journey/gpu/bench/results.json "$OUT/" 2>/dev/null || true
tar czf "$OUT/journey.tar.gz" -C /tmp/journey/gpu executed trees bench 2>/dev/null || true
tar czf "$OUT/figures.tar.gz" static/gpu/*.png 2>/dev/null || true
tail -40 "$OUT/run_all.log"
exit $status
