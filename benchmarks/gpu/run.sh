#!/usr/bin/env bash
# The GPU checks, on an offline CUDA node, from the repository root after prepare.sh:
#
#   bash benchmarks/gpu/run.sh [RESULTS_DIR]      # default: $OUT, else gpu-results/
#
# 1. installs the wheels of .whl/ into a private folder (no network, no change to the image);
# 2. `pytest -m gpu` (the CUDA tests; they skip on machines without a GPU);
# 3. scVI, ours vs scvi-tools 1.4.2 on the same card, same settings (compare_scvi_tools.py),
#    and ours again with minibatches built on the host (--counts-on-device off);
# 4. totalVI, ours vs scvi-tools on the same card (compare_totalvi.py);
# 5. trVAE, scPoli and expiMap, ours alone on the card (compare_scarches.py; scArches is not
#    among the wheels: compare with its CPU figures in RESULTS.md).
# Every step has its own time limit and log; a failing step does not stop the others.
# Figures: RESULTS_DIR/*.json, the output in RESULTS_DIR/run.log; the summary is printed at the end.
set -u
cd "$(dirname "$0")/../.."
RESULTS=${1:-${OUT:-gpu-results}}
EPOCHS=${EPOCHS:-50}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu rehearses the script on a machine without a GPU
mkdir -p "$RESULTS"
SITE=${SITE:-/tmp/scanpy-scvi-site}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$SITE" XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run with a limit, append to run.log, record the exit status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "===== $name" >>"$RESULTS/run.log"
  timeout "$limit" "$@" >"$RESULTS/step.log" 2>&1
  local rc=$?
  cat "$RESULTS/step.log" >>"$RESULTS/run.log"
  echo "$name: exit $rc after $((SECONDS - t0)) s" | tee -a "$RESULTS/steps.txt"
  tail -n 40 "$RESULTS/step.log"
  rm -f "$RESULTS/step.log"
}

[ -d .whl ] && step install 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" .whl/*.whl
step environment 120 bash -c "nvidia-smi || true; $PY -c '
import torch, scanpy, anndata, scvi, numpy, scipy, pandas, lightning
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))
for m in (scanpy, anndata, scvi, numpy, scipy, pandas, lightning): print(m.__name__, m.__version__)
'"
step pytest_gpu 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
step scvi_cuda 300 "$PY" benchmarks/compare_scvi_tools.py --device "$DEVICE" --epochs "$EPOCHS" \
  --dataset .gpudata/kang2018_lupus_pbmc_8k_2511genes.h5ad --json "$RESULTS/scvi_cuda.json"
step scvi_cuda_host_minibatches 150 "$PY" benchmarks/compare_scvi_tools.py --device "$DEVICE" --epochs "$EPOCHS" \
  --only ours --counts-on-device off --dataset .gpudata/kang2018_lupus_pbmc_8k_2511genes.h5ad \
  --json "$RESULTS/scvi_cuda_host.json"
step totalvi_cuda 300 "$PY" benchmarks/compare_totalvi.py --device "$DEVICE" --epochs "$EPOCHS" \
  --dataset .gpudata/pbmc10k_5k_cite_2batch_10849cells_4000genes_9prot.h5ad --json "$RESULTS/totalvi_cuda.json"
step scarches_family_cuda 480 "$PY" benchmarks/compare_scarches.py --systems scanpy-scvi --device "$DEVICE" \
  --epochs "$EPOCHS" --query-epochs 40 --data-dir .gpudata --json "$RESULTS/scarches_family_cuda.json"
echo "== summary"; cat "$RESULTS/steps.txt"
