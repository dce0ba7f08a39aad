#!/usr/bin/env bash
# Prepare, on a machine WITH network access, what benchmarks/gpu/run.sh needs on an offline
# CUDA node (Python 3.12 with a CUDA torch; no scanpy, anndata or scvi-tools there):
#
#   bash benchmarks/gpu/prepare.sh          # from the repository root
#
# - .whl/      wheels for Python 3.12 / x86-64 of the packages a typical CUDA image lacks
#              (scanpy, anndata, scvi-tools and their missing dependencies), about 14 MB;
# - .gpudata/  the datasets the comparisons read (from ../shared/data), about 35 MB.
# Both are kept out of git (add "/.whl/" and "/.gpudata/" to .git/info/exclude). Copy the
# repository with them to the node, then run benchmarks/gpu/run.sh there.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
WHEELS=.whl
DATA=.gpudata
SHARED=${SHARED_DATA:-../shared/data}
mkdir -p "$WHEELS" "$DATA"

# The node's image already has torch, numpy, scipy, pandas, h5py, numba, scikit-learn,
# matplotlib, seaborn, statsmodels, lightning, torchmetrics, jax/flax/numpyro, xarray, rich,
# tqdm, safetensors, pytest (check with `python3 -m pip list` there; add what yours lacks).
PACKAGES=(
  scanpy==1.11.5 anndata==0.12.19 scvi-tools==1.4.2
  array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0 scverse-misc==0.0.3
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  pynndescent==0.7.0 umap-learn==0.5.12 session-info2==0.4.1 scikit-misc==0.5.3
  ml_collections==1.1.0 mudata==0.3.10 pyro-ppl==1.9.2 pyro-api==0.1.2 sparse==0.19.3
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$WHEELS" "${PACKAGES[@]}"
"$PY" -m pip wheel -q --no-deps -w "$WHEELS" docrep==0.3.2  # published as a source archive only

for f in kang2018_lupus_pbmc_8k_2511genes.h5ad pbmc10k_5k_cite_2batch_10849cells_4000genes_9prot.h5ad \
  pbmc_multistudy_5batch_14989cells_2003genes.h5ad kang2018_ifnb_pbmc_2k.h5ad msigdb_h.all.v7.0.symbols.gmt; do
  cp "$SHARED/$f" "$DATA/"
done
du -sh "$WHEELS" "$DATA"
