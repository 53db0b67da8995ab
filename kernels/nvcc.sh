#!/usr/bin/env bash
# kernels/nvcc.sh — the one place that says how the kernels are compiled (build.sh and
# kernels/test/run.sh both call it).
#
#   kernels/nvcc.sh fatbin <out.fatbin> [extra nvcc flags...]
#       kv_transfer.cu -> one compressed fatbin: SASS for sm_70, sm_75, sm_80, sm_86, sm_89, sm_90
#       (everything CUDA 11.8 targets from Volta to Hopper) + PTX for compute_90, which the driver
#       JIT-compiles on newer GPUs. Deterministic: the same sources and nvcc give the same bytes
#       (extra flags such as -Xptxas -v change them: use those for checks only).
#   kernels/nvcc.sh emu <out.so>
#       the host emulation of the kernels (kernels/test/kernel_emu.cu) as a shared library, for the
#       NUnit tests' fake driver. nvcc when present, else clang++-14 (the header compiles as C++).
#   kernels/nvcc.sh host-test <out> <dir holding liblmcache_native.so>
#       kernels/test/host_test.cu linked against the library; same compiler choice as emu.
#
# Debian's nvcc 11.8 refuses gcc 12 (newer than it supports) as its host compiler; clang-14 is accepted.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
HOST_CC=clang-14

ARCH_FLAGS=(
  -gencode arch=compute_70,code=sm_70
  -gencode arch=compute_75,code=sm_75
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_86,code=sm_86
  -gencode arch=compute_89,code=sm_89
  -gencode arch=compute_90,code=sm_90
  -gencode arch=compute_90,code=compute_90
)

have_nvcc() { command -v nvcc >/dev/null 2>&1; }

case ${1:-} in
fatbin)
  out=$2
  shift 2
  have_nvcc || { echo "nvcc.sh: nvcc not found" >&2; exit 3; }
  # Compiled from inside kernels/ so that nothing path-dependent differs between checkouts.
  out_abs="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
  cd "$HERE"
  # The output name is part of the image (cubin names): always write lmc_kernels.fatbin, then move.
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  nvcc -ccbin "$HOST_CC" --fatbin -O3 "${ARCH_FLAGS[@]}" -Xfatbin -compress-all "$@" \
    kv_transfer.cu -o "$tmp/lmc_kernels.fatbin"
  mv "$tmp/lmc_kernels.fatbin" "$out_abs"
  ;;
emu)
  out=$2
  if have_nvcc; then
    nvcc -ccbin "$HOST_CC" -O2 -shared -Xcompiler -fPIC,-fvisibility=hidden -x cu \
      "$HERE/test/kernel_emu.cu" -o "$out"
  else
    clang++-14 -std=c++17 -O2 -shared -fPIC -fvisibility=hidden -x c++ "$HERE/test/kernel_emu.cu" -o "$out"
  fi
  ;;
host-test)
  out=$2
  libdir=$3
  if have_nvcc; then
    nvcc -ccbin "$HOST_CC" -O2 -std=c++17 -x cu -I"$ROOT/include" "$HERE/test/host_test.cu" \
      -L"$libdir" -llmcache_native -lstdc++ -Xlinker -rpath,"$libdir" -o "$out"
  else
    clang++-14 -std=c++17 -O2 -Wall -x c++ -I"$ROOT/include" "$HERE/test/host_test.cu" \
      -L"$libdir" -llmcache_native -Wl,-rpath,"$libdir" -o "$out"
  fi
  ;;
*)
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
  ;;
esac
