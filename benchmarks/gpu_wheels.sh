#!/usr/bin/env bash
# What the lent GPU machine lacks, for its Python 3.12, into benchmarks/_gpu_wheels (gitignored; about 64 MB,
# the most a call may carry with the working tree). Its image holds torch (CUDA 13), numpy, scipy, pandas,
# h5py, scikit-learn, numba, matplotlib, lightning, jax and pytest; nothing can be downloaded there, so these
# travel with the working tree (`carry`):
# - the package's dependencies (pandas 2.3 as pip resolves it here: anndata 0.12 needs pandas < 3, the image
#   has 3), with faiss' GPU build (faiss-gpu 1.15.1, which also holds the CPU index) in place of faiss-cpu.
#   faiss-gpu-cu12 1.14.1 has machine code for sm_70 and sm_80 only and aborts on an H200 ("no kernel image
#   is available"); faiss-gpu 1.15.1 has sm_90 but is 135 MB, so it travels as faiss_gpu_sm90.tar.xz with the
#   other architectures' code zeroed (gpu_shim/strip_fatbin.py; 20 MB);
# - scvi-tools 1.4.2 and what it needs beyond the image, for the side-by-side training figures;
# - cuda12/: CUDA 12's runtime library (from nvidia-cuda-runtime-cu12) and gpu_shim's stand-in cuBLAS 12.
# Usage (here, on the CPU machine): bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")"
all=$(mktemp -d)
platforms="--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64"
# pinned, without their dependencies (which would pull torch's CUDA build): the versions the image lacks
python -m pip download -q --no-deps --python-version 3.12 --implementation cp --only-binary=:all: $platforms -d "$all" \
    pyro-ppl==1.9.2 pyro-api==0.1.2 anndata==0.12.19 mudata==0.3.10 scanpy==1.11.5 scverse-misc==0.1.1 \
    igraph==1.0.0 texttable==1.7.2 leidenalg==0.12.0 array-api-compat==1.16.0 legacy-api-wrap==1.5 \
    pynndescent==0.7.0 umap-learn==0.5.12 zarr==3.4.2 donfig==0.8.1.post1 google-crc32c==1.9.0 msgspec==0.23.0 \
    numcodecs==0.17.1 natsort==8.4.0 session-info2==0.4.2 \
    pandas==2.3.3 pytz==2025.2 tzdata==2025.2 faiss-gpu==1.15.1 nvidia-cuda-runtime-cu12==12.9.79 scvi-tools==1.4.2 ml-collections==1.1.0 \
    sparse==0.19.3
python -m pip wheel -q --no-deps -w "$all" docrep==0.3.2 >/dev/null  # published as a source archive only
rm -rf _gpu_wheels && mkdir -p _gpu_wheels/cuda12
for name in anndata mudata scanpy scverse_misc pyro_ppl pyro_api pandas pytz tzdata igraph texttable leidenalg \
            array_api_compat legacy_api_wrap pynndescent umap_learn zarr donfig google_crc32c msgspec numcodecs natsort \
            session_info2 scvi_tools ml_collections sparse docrep; do
    cp "$all"/"$name"-*.whl _gpu_wheels/
done
unzip -q -j "$all"/nvidia_cuda_runtime_cu12-*.whl 'nvidia/cuda_runtime/lib/libcudart.so.12' -d _gpu_wheels/cuda12
bash gpu_shim/build.sh _gpu_wheels/cuda12
# faiss' GPU build, unpacked, sm_90 only; without its _gpu_build marker, whose import would look for the
# nvidia-*-cu12 wheels: the libraries come from cuda12/ through LD_LIBRARY_PATH instead
mkdir "$all/faiss" && unzip -q "$all"/faiss_gpu-1.15.1-*.whl -d "$all/faiss"
python gpu_shim/strip_fatbin.py "$all/faiss/faiss/libfaiss.so" 90
rm "$all/faiss/faiss/_gpu_build.py"
tar -C "$all/faiss" -cJf _gpu_wheels/faiss_gpu_sm90.tar.xz .
rm -rf "$all"
du -sh _gpu_wheels
