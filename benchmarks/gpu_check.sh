#!/usr/bin/env bash
# The prepared GPU check (issue 11, item 6), run on a lent GPU machine in one call:
#   run(command="bash benchmarks/gpu_check.sh", carry=["benchmarks/_gpu_wheels"], timeout_s=540)
# after `bash benchmarks/gpu_wheels.sh` here (see it for what travels and why).
# Steps, each under its own time limit, so that one failure or overrun does not lose the others:
#   1. the carried wheels into /tmp/site (nothing can be downloaded there), the package by PYTHONPATH (an
#      editable install would need setuptools from the network); faiss' GPU build unpacked beside them. It
#      links CUDA 12's runtime (carried) and cuBLAS 12, which that image lacks (it has CUDA 13's):
#      gpu_shim's stand-in forwards faiss' eight cuBLAS calls to cuBLAS 13. A first search says whether
#      faiss' GPU index runs; if not, the package itself keeps matching on faiss' CPU index
#      (matching.gpu_search_runs) while torch stays on CUDA;
#   2. the GPU tests (pytest -m gpu) and the device-decision tests;
#   3. matching 10^6 cells in 4 groups on faiss' device (gpu_figures.py --parts matching);
#   4. the scale route at 10^5 cells from an on-disk store with --device cuda: one epoch of training from
#      disk, inference, NDreamer.from_model end to end, matching (benchmarks/_scale_worker.py);
#   5. training cells/s of ours against scvi-tools SCVI (gpu_figures.py --parts training);
#   6. matching 10^6 cells on the CPU (IVF) with recall@1 against the GPU's exact matches.
# Everything lands in $OUT: gpu_check.log, gpu_figures.json, scale_*.json.
# Arguments choose steps 2-6 (default: all): tests matching scale training cpu-matching, e.g.
#   bash benchmarks/gpu_check.sh tests training
# With the word "trace" the training step also runs ours with Pyro's Trace_ELBO (the A/B of the direct ELBO); with
# "compiled", ours with train(compile=True) (triton compiles the loss in the warm-up epoch).
set -uo pipefail
steps=${*:-tests matching scale training cpu-matching}
wanted() { [[ " $steps " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # jax (scvi-tools may import it) must not take the GPU
step() { echo; echo "=== $(date -u +%H:%M:%S) $* (load $(cut -d' ' -f1-3 /proc/loadavg))"; }
carried=benchmarks/_gpu_wheels
figures() { timeout "$1" python3 benchmarks/gpu_figures.py --output "$OUT/gpu_figures.json" --parts "${@:2}"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
step "install"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$carried"/*.whl || exit 1
tar -C /tmp/site -xJf "$carried/faiss_gpu_sm90.tar.xz" || exit 1
export PYTHONPATH=/tmp/site:$PWD
purelib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cublas13=$(find "$purelib" /usr/local/cuda* -name 'libcublas.so.13' 2>/dev/null | head -1)
[ -n "$cublas13" ] || cublas13=$(find / -xdev -name 'libcublas.so.13' 2>/dev/null | head -1)
echo "cuBLAS 13: ${cublas13:-not found}"
export LD_LIBRARY_PATH=$PWD/$carried/cuda12:$(dirname "${cublas13:-/nonexistent/x}"):${LD_LIBRARY_PATH:-}
timeout 90 python3 - <<'EOF'
import numpy as np, pandas, torch, faiss, pyro_scmodels
from pyro_scmodels import matching
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "pandas", pandas.__version__, "faiss",
      faiss.__version__, "faiss GPUs", faiss.get_num_gpus(), "faiss device (auto)", matching.resolve_faiss_device("auto"))
x = np.random.default_rng(0).normal(size=(4000, 16)).astype(np.float32)
d, i = faiss.knn_gpu(faiss.StandardGpuResources(), x[:500], x, 3)
print("knn_gpu finds each point itself:", bool((i[:, 0] == np.arange(500)).all()), "max self-distance", float(d[:, 0].max()))
EOF
# (if faiss' GPU search fails here, the package finds out by itself, in a child process, and matches on the CPU)
if wanted tests; then
    step "tests"
    timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" --durations=8 tests/test_gpu.py tests/test_matching.py \
        tests/test_direct_elbo.py tests/test_compiled_training.py
fi
if wanted matching; then
    step "matching 10^6 cells on faiss' device"
    figures 90 matching
fi
if wanted scale; then
    step "scale route at 10^5 cells from disk, device cuda"
    for stage in write train infer ndreamer match; do
        device=cuda; [ "$stage" = write ] && device=cpu
        timeout 100 python3 benchmarks/_scale_worker.py "$stage" --store /tmp/store --n-cells 100000 --device "$device" \
            --result "$OUT/scale_$stage.json" && cat "$OUT/scale_$stage.json" && echo || break
    done
fi
if wanted training; then
    step "training against scvi-tools"
    extra=(); wanted trace && extra+=(--trace-too); wanted compiled && extra+=(--compiled-too)
    figures $(( 200 + 130 * ${#extra[@]} )) training ${extra[@]+"${extra[@]}"}
fi
if wanted cpu-matching; then
    step "matching 10^6 cells on the CPU, recall against the GPU"
    figures 90 matching cpu-matching
fi
step "done"
