#!/usr/bin/env bash
# kernels/test/run.sh — the CUDA kernels' checks that need no GPU, against a published library.
#
#   kernels/test/run.sh <path-to-liblmcache_native.so>
#
#   1. the committed kernels/prebuilt/lmc_kernels.fatbin is what nvcc builds from kernels/*.cu now
#      (build.sh refreshes it; a stale one means it was not committed), and it is embedded in the
#      library (byte for byte);
#   2. resources (check_resources.py): every architecture and kernel present, no register spills, no
#      stack frame, no local memory — from cuobjdump -res-usage and from a ptxas -v compile;
#   3. host_test (nvcc-compiled): the kernels' __host__ __device__ addressing, run over random layouts,
#      slot mappings and first tokens, against the library's C# reference copy through the C ABI.
# Prints "ok - …" / "not ok - …" per check and, last, "kernels: N passed, M failed". Exit 0 when
# nothing failed. Without nvcc (the toolkit could not be installed) the checks that need it fail
# and say so: CI is meant to compile the kernels.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KERNELS="$(cd "$HERE/.." && pwd)"
ROOT="$(cd "$KERNELS/.." && pwd)"
OUT="$ROOT/build/kernels/test"
PY=/usr/bin/python3
FATBIN="$KERNELS/prebuilt/lmc_kernels.fatbin"
HOST_TEST_CASES=${LMC_HOST_TEST_CASES:-3000}

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok - $*"; }
fail() { failed=$((failed + 1)); echo "not ok - $*"; }
finish() {
  echo "kernels: $passed passed, $failed failed"
  [[ $failed -eq 0 ]]
  exit
}

# Runs a program printing ok/not ok lines and a final "# <tag>: …" line; adds its counts. A crash or
# a missing final line costs one more failure.
run_checks() {
  local what=$1 tag=$2 log=$3
  shift 3
  timeout 600 "$@" >"$log" 2>&1
  local rc=$?
  cat "$log"
  local ok nok
  ok=$(grep -c '^ok - ' "$log")
  nok=$(grep -c '^not ok - ' "$log")
  passed=$((passed + ok))
  failed=$((failed + nok))
  if [[ $rc -gt 128 ]]; then
    fail "$what: killed by signal $((rc - 128)) after $((ok + nok)) checks"
  elif ! grep -q "^# $tag: " "$log"; then
    fail "$what: exited with status $rc before its summary"
  elif [[ $rc -ne 0 && $nok -eq 0 ]]; then
    fail "$what: exited with status $rc without a failed check"
  fi
}

if [[ $# -ne 1 || ! -f $1 ]]; then
  fail "library not found: ${1:-<none>}"
  finish
fi
rm -rf "$OUT"
mkdir -p "$OUT/lib"
cp -f "$1" "$OUT/lib/liblmcache_native.so"

have_nvcc=0
if command -v nvcc >/dev/null 2>&1; then
  have_nvcc=1
  echo "# $(nvcc --version | tail -n 2 | head -n 1)"
fi

echo "# kernel image"
if [[ -f $FATBIN ]]; then
  pass "kernels/prebuilt/lmc_kernels.fatbin is committed ($(stat -c %s "$FATBIN") bytes)"
else
  fail "kernels/prebuilt/lmc_kernels.fatbin is missing"
fi
if ((have_nvcc)); then
  if "$KERNELS/nvcc.sh" fatbin "$OUT/lmc_kernels.fatbin" 2>"$OUT/nvcc.log" && cmp -s "$OUT/lmc_kernels.fatbin" "$FATBIN"; then
    pass "nvcc rebuilds exactly the committed fatbin from kernels/*.cu"
  else
    fail "the committed fatbin differs from what nvcc builds from kernels/*.cu (run ./build.sh and commit kernels/prebuilt/lmc_kernels.fatbin)"
    sed 's/^/#   /' "$OUT/nvcc.log" | head -20
  fi
else
  fail "nvcc not found: the kernels were not compiled here (the committed fatbin is used; install nvidia-cuda-toolkit)"
fi
if "$PY" - "$FATBIN" "$1" <<'EOF'; then
import sys
image = open(sys.argv[1], "rb").read()
library = open(sys.argv[2], "rb").read()
sys.exit(0 if image and library.find(image) >= 0 else 1)
EOF
  pass "the fatbin is embedded in $(basename "$1") byte for byte"
else
  fail "the fatbin is not embedded in $(basename "$1")"
fi

echo "# resources: no spills, no local memory"
ptxas_log=()
if ((have_nvcc)); then
  if "$KERNELS/nvcc.sh" fatbin "$OUT/ptxas_check.fatbin" -Xptxas -v 2>"$OUT/ptxas.log"; then
    ptxas_log=("$OUT/ptxas.log")
  else
    fail "nvcc -Xptxas -v failed"
    sed 's/^/#   /' "$OUT/ptxas.log" | head -20
  fi
fi
run_checks "check_resources.py" "resources" "$OUT/resources.log" "$PY" "$HERE/check_resources.py" "$FATBIN" "${ptxas_log[@]}"

echo "# host test: kernel addressing vs the library's C# reference copy"
if "$KERNELS/nvcc.sh" host-test "$OUT/host_test" "$OUT/lib" >"$OUT/host_test_build.log" 2>&1; then
  pass "host_test.cu compiles with $( ((have_nvcc)) && echo "nvcc -ccbin clang-14" || echo "clang++-14 (no nvcc)") and links against the library"
  run_checks "host_test" "host_test" "$OUT/host_test.log" "$OUT/host_test" "$HOST_TEST_CASES"
else
  fail "host_test.cu does not compile"
  sed 's/^/#   /' "$OUT/host_test_build.log" | head -30
fi

finish
