#!/usr/bin/env bash
# scripts/build.sh — compile the CUDA kernels, publish liblmcache_native.so (NativeAOT) into
# build/publish/ and stage it into python-demo/lmcache_native/lib/.
#
#   scripts/build.sh    install missing Debian packages, then build (what `./build.sh` does)
#
# Sourced by build.sh for build / build_kernels / publish / stage. Needs the .NET 10 SDK.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source "$ROOT/scripts/deps.sh"

build_kernels() {
  step "kernels: nvcc -> lmc_kernels.fatbin"
  mkdir -p build/kernels
  if command -v nvcc >/dev/null; then
    kernels/nvcc.sh fatbin build/kernels/lmc_kernels.fatbin
    if cmp -s build/kernels/lmc_kernels.fatbin "$KERNEL_FATBIN"; then
      echo "$KERNEL_FATBIN is up to date ($(stat -c %s "$KERNEL_FATBIN") bytes)"
    else
      cp build/kernels/lmc_kernels.fatbin "$KERNEL_FATBIN"
      echo "$KERNEL_FATBIN updated from kernels/*.cu ($(stat -c %s "$KERNEL_FATBIN") bytes): commit it"
    fi
  else
    [[ -f $KERNEL_FATBIN ]] || die "nvcc not found and $KERNEL_FATBIN is missing"
    echo "nvcc not found: embedding the committed $KERNEL_FATBIN ($(stat -c %s "$KERNEL_FATBIN") bytes) as it is"
  fi
  # The kernels' block body on the host, for the NUnit fake driver (nvcc, else clang++-14).
  kernels/nvcc.sh emu "$KERNEL_EMU"
  echo "$KERNEL_EMU ($(stat -c %s "$KERNEL_EMU") bytes)"
}

publish() {
  step "publish: dotnet publish (NativeAOT)"
  command -v dotnet >/dev/null || die "dotnet not found: the .NET 10 SDK is required"
  # LMC_ILC_INSTRUCTION_SET (e.g. x86-64-v4, native): compile for a newer CPU than the x86-64
  # baseline, so the copies use AVX/AVX-512 streaming stores (src/LMCacheNative.Core/Transfer/BulkCopy.cs);
  # the library then refuses to start on CPUs without those instructions.
  dotnet publish src/LMCacheNative.Exports/LMCacheNative.Exports.csproj \
    -r linux-x64 -c Release -o "$PUBLISH_DIR" ${LMC_ILC_INSTRUCTION_SET:+-p:IlcInstructionSet=$LMC_ILC_INSTRUCTION_SET}
  [[ -f $LIB ]] || die "dotnet publish did not produce $LIB"
  echo "$LIB ($(stat -c %s "$LIB") bytes)"
}

stage() {
  step "stage: copy the library into python-demo"
  mkdir -p "$(dirname "$STAGED_LIB")"
  install -m 0755 "$LIB" "$STAGED_LIB"
  echo "$STAGED_LIB ($(stat -c %s "$STAGED_LIB") bytes)"
}

# build [MODE]: MODE is build.sh's command (build, test, demo, bench).
build() {
  local mode=${1:-build}
  ensure_packages
  # The 1.6 GB toolkit is installed for the test suites (CI compiles the kernels and checks their
  # registers); building, the demo and the benchmark use nvcc when present and the committed fatbin
  # otherwise, so a new machine runs the demo without that download.
  if [[ $mode == test || ${LMC_INSTALL_CUDA_TOOLKIT:-0} == 1 ]]; then
    ensure_cuda_toolkit
  fi
  build_kernels
  publish
  stage
  step_end
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  set -euo pipefail
  build build
fi
