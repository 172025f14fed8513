#!/usr/bin/env bash
# on the device machine, from the repository root: bash .gpu/run.sh [SECTION...]
set -uo pipefail
export OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
# cuBLAS: the toolkit's, else a pip wheel's (only its cublas*.h on the include path)
CUBLAS_LIB=$(find /usr/local/cuda/ /usr/local/cuda/lib64/ /usr /opt -name 'libcublas.so.1[0-9]' 2>/dev/null | head -1)
CUBLAS_DIR=$(dirname "$CUBLAS_LIB")
export LD_LIBRARY_PATH="$CUBLAS_DIR:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
if [ ! -f build/cuda/bin/libggml-cuda.so ]; then
    EXTRA=()
    if [ ! -f /usr/local/cuda/include/cublas_v2.h ]; then
        mkdir -p /tmp/cublas_inc && cp "$(dirname "$CUBLAS_DIR")"/include/cublas*.h /tmp/cublas_inc/
        EXTRA=(-DCUDA_cublas_LIBRARY="$CUBLAS_LIB" -DCUDA_cublasLt_LIBRARY="$(ls "$CUBLAS_DIR"/libcublasLt.so.1[0-9] | head -1)"
               -DCMAKE_CUDA_FLAGS=-I/tmp/cublas_inc -DCMAKE_CXX_FLAGS=-I/tmp/cublas_inc)
    fi
    mkdir -p vendor && tar xzf .gpu/llama.cpp.tar.gz -C vendor
    t0=$(date +%s)
    { nvcc --version | tail -1; echo "cublas: $CUBLAS_LIB"; } > "$OUT/build.log"
    cmake -S . -B build/cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v python3)" \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90-real -DGGML_CUDA_FA_QUANTS=q4_0-q4_0 -DGGML_CUDA_NO_VMM=ON \
        -DGGML_NATIVE=ON "${EXTRA[@]}" >> "$OUT/build.log" 2>&1 \
      && cmake --build build/cuda -j16 --target llama ggml-cuda >> "$OUT/build.log" 2>&1 \
      || { tail -40 "$OUT/build.log"; exit 1; }
    echo "== build: $(( $(date +%s) - t0 )) s"
fi
rm -rf arkv_local/lib && mkdir -p arkv_local/lib && cp build/cuda/bin/lib*.so arkv_local/lib/
export PYTHONPATH="$PWD/.gpu/site:$PWD" PYTHONUNBUFFERED=1 ARKV_LOCAL_CACHE=/tmp/arkv_cache
for s in ${@:-env sched exact plan bench decode reference}; do
    timeout 420 python3 -m arkv_local.bench.gpu "$s" --out "$OUT" || echo "section $s failed ($?)"
done
