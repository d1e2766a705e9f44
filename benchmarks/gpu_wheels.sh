#!/usr/bin/env bash
# Wheels the GPU machine lacks, for its Python 3.12, into benchmarks/_gpu_wheels (gitignored; about 32 MB).
# Its image already holds torch (CUDA), numpy, scipy, pandas, h5py, scikit-learn, numba, matplotlib and
# statsmodels; nothing can be downloaded there, so these travel with the working tree (`carry`).
# Usage (here, on the CPU machine): bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")"
all=$(mktemp -d)
python -m pip download --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$all" pyro-ppl "anndata==0.12.*" "mudata==0.3.*" "scanpy==1.11.*" faiss-cpu igraph leidenalg >/dev/null
rm -rf _gpu_wheels && mkdir _gpu_wheels
for name in anndata mudata scanpy scverse_misc pyro_ppl pyro_api faiss_cpu igraph texttable leidenalg array_api_compat \
            legacy_api_wrap pynndescent umap_learn zarr donfig google_crc32c msgspec numcodecs natsort session_info2; do
    cp "$all"/"$name"-*.whl _gpu_wheels/
done
rm -rf "$all"
du -sh _gpu_wheels
