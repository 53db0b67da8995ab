# scripts/common.sh — shared by build.sh and scripts/*.sh (sourced, never run): paths, the Debian
# interpreter, and the step/timing output helpers. Sourcing it twice is harmless.
[[ -n ${LMC_COMMON_SOURCED:-} ]] && return 0
LMC_COMMON_SOURCED=1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Debian's interpreter: the only one that sees python3-torch/numpy/pytest. Never bare `python3`,
# which may be a pyenv interpreter earlier on PATH.
PY=/usr/bin/python3

PUBLISH_DIR=build/publish
LIB=$PUBLISH_DIR/liblmcache_native.so
STAGED_LIB=python-demo/lmcache_native/lib/liblmcache_native.so
RESULTS=build/test-results
KERNEL_FATBIN=kernels/prebuilt/lmc_kernels.fatbin
KERNEL_EMU=build/kernels/liblmc_kernel_emu.so

export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1

# ------------------------------------------------------------------------------------------------
# Output helpers
# ------------------------------------------------------------------------------------------------

now_us() { echo "${EPOCHREALTIME//[.,]/}"; }
STEP_NAME=""
STEP_START=0
TIMINGS=() # "name  seconds" per finished step

step() {
  step_end
  STEP_NAME=$1
  STEP_START=$(now_us)
  printf '\n==> %s\n' "$1"
}

step_end() {
  [[ -n $STEP_NAME ]] || return 0
  local tenths=$((($(now_us) - STEP_START) / 100000))
  local secs="$((tenths / 10)).$((tenths % 10)) s"
  echo "--- $STEP_NAME: $secs"
  TIMINGS+=("$(printf '%-40s %8s' "$STEP_NAME" "$secs")")
  STEP_NAME=""
}

die() {
  echo "build.sh: $*" >&2
  exit 1
}
