#!/usr/bin/env bash
# Builds the stand-in cuBLAS 12 (cublas12_on_13.c) and an empty libcublasLt.so.12 (faiss names it as
# needed but calls nothing in it) into the folder given, for gpu_check.sh on the lent GPU machine.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); out=${1:?folder}; mkdir -p "$out"
gcc -O2 -shared -fPIC -Wl,-soname,libcublas.so.12 -Wl,--version-script="$here/cublas12.map" \
    -o "$out/libcublas.so.12" "$here/cublas12_on_13.c" -ldl

echo '' | gcc -x c -shared -fPIC -Wl,-soname,libcublasLt.so.12 -o "$out/libcublasLt.so.12" -
