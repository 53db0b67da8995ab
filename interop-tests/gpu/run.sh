#!/usr/bin/env bash
# interop-tests/gpu/run.sh — the CUDA path on a real GPU, in one prepared run (< 6 minutes on an
# H100/H200 with PyTorch). It builds nothing: it uses the library built by ./build.sh on the build
# machine (build/publish/liblmcache_native.so, or $LMC_LIB_PATH) and python-demo/ from this tree.
#
#   interop-tests/gpu/run.sh
#
#   1. correctness: torch CUDA tensors in every layout (FlashAttention NHD/HND, blocks-first NHD/HND,
#      packed [B,H,N,2D], MLA, a padded non-contiguous view) and element size (fp8, fp16, bf16,
#      fp32); random slot mappings with -1; store -> retrieve across layouts, bit for bit, guard bytes
#      untouched; asynchronous calls on torch's current stream and on a side stream, and synchronous
#      calls (gpu_check.py correctness);
#   2. the same, reduced, under compute-sanitizer --tool memcheck, once writing pinned memory
#      directly and once through the staging buffer (skipped, and said so, when compute-sanitizer is
#      not installed);
#   3. bandwidth: gather and scatter GB/s for 32 KiB, 2 MiB, 32 MiB and 1 GiB per request, with
#      stores writing pinned memory directly (zero-copy) and through a device staging buffer, next
#      to pinned cudaMemcpy GB/s of the same size; printed as a table and written to
#      $OUT/gpu-results.md (or build/gpu/) with the card's name, for docs/.
#
# Exit status 0 when every check passed. Nothing here has run on a GPU yet (see docs/cuda.md).
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
RESULTS=${OUT:-$ROOT/build/gpu}
mkdir -p "$RESULTS"
START=$SECONDS

# The library built here; the package's loader honours LMC_LIB_PATH.
if [[ -z ${LMC_LIB_PATH:-} ]]; then
  for candidate in "$ROOT/build/publish/liblmcache_native.so" "$ROOT/python-demo/lmcache_native/lib/liblmcache_native.so"; do
    if [[ -f $candidate ]]; then
      export LMC_LIB_PATH=$candidate
      break
    fi
  done
fi
if [[ -z ${LMC_LIB_PATH:-} || ! -f $LMC_LIB_PATH ]]; then
  echo "run.sh: no liblmcache_native.so: run ./build.sh on the build machine first (this script builds nothing)" >&2
  exit 2
fi
export PYTHONPATH="$ROOT/python-demo${PYTHONPATH:+:$PYTHONPATH}"

# An interpreter that has torch with CUDA.
PY=""
for candidate in ${PYTHON:-} python3 /usr/bin/python3 python; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    PY=$candidate
    break
  fi
done
if [[ -z $PY ]]; then
  echo "run.sh: no Python with a CUDA-enabled torch found (set PYTHON=...)" >&2
  exit 2
fi

passed=0
failed=0
STAGES=()
stage() { # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc=0
  echo
  echo "==> $name"
  timeout "$limit" "$@" 2>&1 | tee "$RESULTS/$(echo "$name" | tr ' /' '__').log" || rc=${PIPESTATUS[0]}
  local ok nok
  ok=$(grep -c '^ok - ' "$RESULTS/$(echo "$name" | tr ' /' '__').log")
  nok=$(grep -c '^not ok - ' "$RESULTS/$(echo "$name" | tr ' /' '__').log")
  passed=$((passed + ok))
  failed=$((failed + nok))
  if ((rc != 0 && nok == 0)); then
    failed=$((failed + 1))
    echo "not ok - $name: exit status $rc$([[ $rc == 124 ]] && echo " (timed out after ${limit}s)")"
  fi
  STAGES+=("$(printf '%-28s %4ds  rc %d' "$name" $((SECONDS - t0)) "$rc")")
}

echo "# library: $LMC_LIB_PATH"
echo "# python:  $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "-", torch.cuda.get_device_name())'))"
nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv,noheader 2>/dev/null | sed 's/^/# nvidia-smi: /'

stage "correctness" 100 "$PY" "$HERE/gpu_check.py" correctness --device cuda

SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -n 1 || true)
if [[ -n $SANITIZER ]]; then
  stage "memcheck zero-copy" 70 env LMC_CUDA_STAGING_MIN_BYTES=off \
    "$SANITIZER" --tool memcheck --leak-check no --error-exitcode 99 "$PY" "$HERE/gpu_check.py" correctness --device cuda --quick
  stage "memcheck staged" 70 env LMC_CUDA_STAGING_MIN_BYTES=0 \
    "$SANITIZER" --tool memcheck --leak-check no --error-exitcode 99 "$PY" "$HERE/gpu_check.py" correctness --device cuda --quick
else
  echo
  echo "# compute-sanitizer not found (no CUDA toolkit on this machine): memcheck pass SKIPPED"
  STAGES+=("memcheck                     skipped (no compute-sanitizer)")
fi

stage "bench zero-copy" 50 env LMC_CUDA_STAGING_MIN_BYTES=off "$PY" "$HERE/gpu_check.py" bench --json "$RESULTS/bench-zero-copy.json"
stage "bench staged" 50 env LMC_CUDA_STAGING_MIN_BYTES=0 LMC_CUDA_STAGING_MAX_BYTES=$((2 << 30)) \
  "$PY" "$HERE/gpu_check.py" bench --json "$RESULTS/bench-staged.json"

echo
if [[ -f $RESULTS/bench-zero-copy.json ]]; then
  {
    echo "# LMCacheNative CUDA path: GPU results ($(date -u +%Y-%m-%d))"
    echo
    "$PY" "$HERE/gpu_check.py" table "$RESULTS/bench-zero-copy.json" "$RESULTS/bench-staged.json"
    echo
    echo "Checks: $passed passed, $failed failed (correctness, memcheck, bench)."
  } | tee "$RESULTS/gpu-results.md"
fi
echo
printf '  %s\n' "${STAGES[@]}"
echo "total $((SECONDS - START)) s"
echo "gpu: $passed passed, $failed failed"
((failed == 0))
