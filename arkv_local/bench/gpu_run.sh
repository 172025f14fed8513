#!/usr/bin/env bash
# on the device machine, from the repository root: bash .gpu/run.sh [SECTION...]
#   bash .gpu/run.sh stamp      the digest of the native sources that libraries are built from
#   bash .gpu/run.sh prebuild   (the kit, on the CPU machine) build into build/cuda, stripped copies into .gpu/lib
set -uo pipefail
stamp() { (export LC_ALL=C; sha256sum CMakeLists.txt vendor/pin.json patches/*.patch arkv_local/csrc/* | sha256sum | cut -c1-16); }
if [ "${1:-}" = stamp ]; then stamp; exit; fi
export OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
# cuBLAS: the toolkit's, else a pip wheel's (the kit's in build/cublas; only its cublas*.h on the include path)
CUBLAS_LIB=$(find /usr/local/cuda/ /usr/local/cuda/lib64/ "$PWD/build/cublas" /usr /opt -name 'libcublas.so.1[0-9]' 2>/dev/null | head -1)
CUBLAS_DIR=$(dirname "$CUBLAS_LIB")
export LD_LIBRARY_PATH="$CUBLAS_DIR:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"

# the CUDA build of our libraries into build/cuda, sm_90 only; extra CMake options (the CPU flags) as arguments
build_cuda() {
    local extra=()
    if [ ! -f /usr/local/cuda/include/cublas_v2.h ]; then
        mkdir -p build/cublas_inc && cp -p "$(dirname "$CUBLAS_DIR")"/include/cublas*.h build/cublas_inc/
        extra=(-DCUDA_cublas_LIBRARY="$CUBLAS_LIB" -DCUDA_cublasLt_LIBRARY="$(ls "$CUBLAS_DIR"/libcublasLt.so.1[0-9] | head -1)"
               -DCMAKE_CUDA_FLAGS=-I"$PWD/build/cublas_inc" -DCMAKE_CXX_FLAGS=-I"$PWD/build/cublas_inc")
    fi
    local t0; t0=$(date +%s)
    { nvcc --version | tail -1; echo "cublas: $CUBLAS_LIB"; } > "$OUT/build.log"
    cmake -S . -B build/cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="${PYTHON:-$(command -v python3)}" \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90-real -DGGML_CUDA_FA_QUANTS=q4_0-q4_0 -DGGML_CUDA_NO_VMM=ON \
        "${extra[@]}" "$@" >> "$OUT/build.log" 2>&1 \
      && cmake --build build/cuda -j"$(nproc)" --target llama ggml-cuda >> "$OUT/build.log" 2>&1 \
      || { tail -40 "$OUT/build.log"; return 1; }
    echo "== build: $(( $(date +%s) - t0 )) s"
}

if [ "${1:-}" = prebuild ]; then
    # the device's CPU is not this one: ggml-cpu for any x86-64 with AVX2
    build_cuda -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON || exit 1
    rm -rf .gpu/lib && mkdir -p .gpu/lib
    for f in build/cuda/bin/lib*.so; do strip --strip-unneeded -o ".gpu/lib/$(basename "$f")" "$f" || exit 1; done
    stamp > .gpu/lib/STAMP
    exit
fi
rm -rf arkv_local/lib && mkdir -p arkv_local/lib
if [ -f .gpu/lib/STAMP ] && [ "$(cat .gpu/lib/STAMP)" = "$(stamp)" ]; then
    # built on the CPU machine from these very sources (`kit --prebuild`): no device minutes spent building
    cp .gpu/lib/lib*.so arkv_local/lib/ && echo "== prebuilt libraries ($(stamp))"
else
    [ -f .gpu/lib/STAMP ] && echo "== .gpu/lib is of other sources ($(cat .gpu/lib/STAMP), these: $(stamp)): building here"
    [ -f build/cuda/bin/libggml-cuda.so ] || { mkdir -p vendor && tar xzf .gpu/llama.cpp.tar.gz -C vendor && build_cuda -DGGML_NATIVE=ON; } || exit 1
    cp build/cuda/bin/lib*.so arkv_local/lib/
fi
export PYTHONPATH="$PWD/.gpu/site:$PWD" PYTHONUNBUFFERED=1 ARKV_LOCAL_CACHE=/tmp/arkv_cache
for s in ${@:-env sched exact plan bench decode reference}; do
    timeout 420 python3 -m arkv_local.bench.gpu "$s" --out "$OUT" || echo "section $s failed ($?)"
done
