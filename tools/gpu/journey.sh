#!/usr/bin/env bash
# The GPU journey in device calls, on a machine without a package registry (tools/gpu/stage.sh first):
#   bash tools/gpu/journey.sh stage gK   # each of the calls carrying .whl/gK: keeps the group in /tmp/stage
#   bash tools/gpu/journey.sh run        # joins and installs, then runs notebooks 01-06 with the `gpu`
#                                        # preset scaled by $JOURNEY_OVERRIDES (fp32 graphs: the reference
#                                        # graph on CUDA), and brings back the executed notebooks, figures,
#                                        # timings and benchmark results
#   bash tools/gpu/journey.sh fp16       # then, on the same machine: the same heads exported in fp16, whose
#                                        # fast graph CUDA's GroupQueryAttention runs (fp16/bf16 kernels only),
#                                        # benchmarked with the run's plans -> results_fp16.json
# The machine must stay warm between calls (it keeps /tmp while held). $OUT is where files come back.
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
  stage)
    mkdir -p /tmp/stage && cp .whl/"$2"/* /tmp/stage/ && ls /tmp/stage | wc -l && exit 0 ;;
  run|fp16) ;;
  *) echo "usage: journey.sh stage gK | run | fp16" >&2; exit 2 ;;
esac
if [ ! -d /tmp/site ]; then  # installed once per machine
  cd /tmp/stage
  for first in *.part00; do  # a wheel carried in parts is joined whole
    if [ -e "$first" ]; then cat "${first%.part00}".part* > "${first%.part00}"; rm "${first%.part00}".part*; fi
  done
  cd - > /dev/null
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/stage/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# ORT's CUDA provider loads CUDA 13's libraries from the nvidia wheels beside PyTorch
NV=$(python3 -c "import nvidia, os; print(':'.join(sorted(os.path.join(p, d, 'lib') for p in nvidia.__path__ for d in os.listdir(p))))")
export LD_LIBRARY_PATH="$NV:${LD_LIBRARY_PATH:-}"
export WORKBOOK_PRESET=gpu WORKBOOK_DATA=/tmp/journey MEDUSA_WORKBOOK_CACHE=/tmp/journey-cache
SCALED='{"distill_train_records": 1500, "train_records": 1500, "train_steps": 1500, "hydra_train_steps": 1500, "sizing_prompts": 13}'
export WORKBOOK_OVERRIDES="${JOURNEY_OVERRIDES:-$SCALED}"  # the `gpu` preset scaled to end in about 8 minutes
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "$1" = fp16 ]; then
  export WORKBOOK_OVERRIDES
  WORKBOOK_OVERRIDES=$(python3 -c 'import json, os; o = json.loads(os.environ["WORKBOOK_OVERRIDES"]); o["export_dtype"] = "float16"; print(json.dumps(o))')
  # the heads the `run` call trained (its plans, trees/*_device.json, are the bench's defaults); exported again in fp16
  read -r HEADS HYDRA < <(python3 -c 'from medusa_lib.config import get_config, hydra_config; from medusa_lib.train import run_dir; c = get_config("gpu"); print(run_dir(c), run_dir(hydra_config(c)))')
  status=0
  timeout "${FP16_SECONDS:-300}" python3 -m medusa_lib.bench --preset gpu --heads "$HEADS" --hydra-heads "$HYDRA" \
    --methods ort,ort_ref,hydra_tree,hydra_pld --no-memory --cost-curve --out "$OUT/results_fp16.json" \
    > "$OUT/bench_fp16.log" 2>&1 || status=$?
  tail -30 "$OUT/bench_fp16.log"
  exit $status
fi
python3 -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers(), 'torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
status=0
timeout "${JOURNEY_SECONDS:-540}" python3 -m medusa_lib.run_all gpu > "$OUT/run_all.log" 2>&1 || status=$?
cp /tmp/journey/gpu/executed/timings.json /tmp/journey/gpu/bench/results.json "$OUT/" 2>/dev/null || true
tar czf "$OUT/journey.tar.gz" -C /tmp/journey/gpu executed trees bench 2>/dev/null || true
tar czf "$OUT/figures.tar.gz" static/gpu/*.png 2>/dev/null || true
tail -40 "$OUT/run_all.log"
exit $status
