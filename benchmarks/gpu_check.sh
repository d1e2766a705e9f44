#!/usr/bin/env bash
# The prepared GPU check (issue 11, item 6), run on a lent GPU machine in one call:
#   run(command="bash benchmarks/gpu_check.sh", carry=["benchmarks/_gpu_wheels"], timeout_s=540)
# after `bash benchmarks/gpu_wheels.sh` here. It installs the carried wheels into the image's python3,
# runs the GPU tests (pytest -m gpu), then records CUDA figures: RegularizedVI training cells/s at batch
# 128 and 1024 on 20,000 simulated cells x 2,000 genes (host and device-held counts), and matching
# 10^6 cells in 4 groups. Everything it prints and writes lands in $OUT (gpu_check.log, gpu_figures.json).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m pip install --no-index --no-deps -q benchmarks/_gpu_wheels/*.whl && python3 -m pip install --no-deps -q -e .
python3 -c "import torch, faiss, pyro_scmodels; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'faiss GPUs', getattr(faiss, 'get_num_gpus', lambda: 0)())"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_matching.py
timeout 240 python3 benchmarks/gpu_figures.py --output "$OUT/gpu_figures.json"
