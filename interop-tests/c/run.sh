#!/usr/bin/env bash
# interop-tests/c/run.sh — the C interop suite, run against a published library.
#
#   interop-tests/c/run.sh <path-to-liblmcache_native.so>
#
# Builds into interop-tests/c/out/ (git-ignored) and runs:
#   1. header compile test: C99 and C11 (gcc, clang-14), C++17 (g++, clang++-14), all with
#      -Wall -Wextra -Werror -pedantic; struct sizes/offsets are static assertions in the file;
#   2. the same file linked against the library (every header function must resolve) and run;
#   3. symbol parity between the header and `nm -D` (check_symbols.py);
#   4. the test areas, test_*.c, each with harness.c built with gcc and clang-14 as C99 and run
#      (the clang-14 build when both compiled; each area is its own program and runs alone:
#      out/test_transfer_gcc, …);
#   5. examples/quickstart.c built with gcc and clang-14 (-std=c99 -Wall -Wextra -Werror
#      -pedantic) and run.
# Prints "ok - …" / "not ok - …" per check and, last, "C interop: N passed, M failed".
# Exit status: 0 when nothing failed.
set -uo pipefail # not -e: a failing check is counted, not fatal

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="$HERE/out"
INCLUDE="$ROOT/include"
PY=/usr/bin/python3
WARN=(-Wall -Wextra -Werror -pedantic)
TEST_TIMEOUT=300
# The areas in the order they run; each is test_<area>.c with a main() and "# <area>: …" last.
AREAS=(versions_errors engine_config layers transfer jobs tiers lookup_channel cuda threads events metrics)

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok - $*"; }
fail() { failed=$((failed + 1)); echo "not ok - $*"; }
finish() {
  echo "C interop: $passed passed, $failed failed"
  [[ $failed -eq 0 ]]
  exit
}

if [[ $# -ne 1 ]]; then
  echo "usage: $0 <path-to-liblmcache_native.so>" >&2
  exit 2
fi
if [[ ! -f $1 ]]; then
  fail "library not found: $1"
  finish
fi

rm -rf "$OUT"
mkdir -p "$OUT/lib"
# -llmcache_native needs the name liblmcache_native.so; the tests run against this copy.
cp -f "$1" "$OUT/lib/liblmcache_native.so"
LIB="$OUT/lib/liblmcache_native.so"
LINK=(-L"$OUT/lib" -llmcache_native -Wl,-rpath,'$ORIGIN/lib')

# Runs a compiler command as one check; shows its diagnostics only when it fails.
compile_check() {
  local what=$1
  shift
  if ! command -v "$1" >/dev/null; then
    fail "$what: $1 not found"
    return 1
  fi
  local log
  if log=$("$@" 2>&1); then
    pass "$what"
  else
    fail "$what"
    printf '%s\n' "$log" | sed 's/^/#   /' | head -40
    return 1
  fi
}

# Runs a program that prints ok/not ok lines and a final "# <tag>: …" line, and adds its counts.
# A crash, a timeout or a missing final line costs one more failed check.
run_checks() {
  local what=$1 tag=$2 log=$3
  shift 3
  timeout "$TEST_TIMEOUT" "$@" >"$log" 2>&1
  local rc=$?
  cat "$log"
  local ok nok
  ok=$(grep -c '^ok - ' "$log")
  nok=$(grep -c '^not ok - ' "$log")
  passed=$((passed + ok))
  failed=$((failed + nok))
  if [[ $rc -eq 124 ]]; then
    fail "$what: timed out after ${TEST_TIMEOUT}s"
  elif [[ $rc -gt 128 ]]; then
    fail "$what: killed by signal $((rc - 128)) after $((ok + nok)) checks"
  elif ! grep -q "^# $tag: " "$log"; then
    fail "$what: exited with status $rc before its summary"
  elif [[ $rc -ne 0 && $nok -eq 0 ]]; then
    fail "$what: exited with status $rc without a failed check"
  fi
}

echo "# header compile test"
for cc in gcc clang-14; do
  for std in c99 c11; do
    compile_check "header compiles as ${std^^} with $cc ${WARN[*]}" \
      "$cc" -std="$std" "${WARN[@]}" -I"$INCLUDE" -c "$HERE/header_compile.c" \
      -o "$OUT/header_${cc}_${std}.o"
  done
done
for cxx in g++ clang++-14; do
  compile_check "header compiles as C++17 with $cxx ${WARN[*]}" \
    "$cxx" -x c++ -std=c++17 "${WARN[@]}" -I"$INCLUDE" -c "$HERE/header_compile.c" \
    -o "$OUT/header_${cxx}_cxx17.o"
done

echo "# layout program linked against the library"
if compile_check "header_compile.c links against the library (every declared function resolves)" \
  gcc -std=c11 "${WARN[@]}" -I"$INCLUDE" "$HERE/header_compile.c" "${LINK[@]}" -o "$OUT/layout"; then
  if layout=$("$OUT/layout" 2>&1); then
    printf '%s\n' "$layout" | sed 's/^/#   /'
    if grep -q '^sizeof(lmc_kv_layer_desc) = 88$' <<<"$layout" &&
      grep -q '^offsetof(lmc_kv_layer_desc, base_address) = 40$' <<<"$layout" &&
      grep -q '^sizeof(lmc_stats) = 128$' <<<"$layout" &&
      grep -q '^sizeof(lmc_request) = 88$' <<<"$layout" &&
      grep -q '^offsetof(lmc_request, stream) = 80$' <<<"$layout" &&
      grep -q '^sizeof(lmc_transfer_result) = 80$' <<<"$layout" &&
      grep -q '^sizeof(lmc_lookup_result) = 56$' <<<"$layout"; then
      pass "layout: lmc_kv_layer_desc 88 bytes (base_address at 40), lmc_stats 128, lmc_request 88 (stream at 80), lmc_transfer_result 80, lmc_lookup_result 56"
    else
      fail "layout: unexpected sizes"
    fi
  else
    fail "layout program failed to run: $layout"
  fi
fi

echo "# symbol parity (header vs nm -D)"
run_checks "check_symbols.py" "symbols" "$OUT/symbols.log" "$PY" "$HERE/check_symbols.py" "$LIB" "$INCLUDE/lmcache_native.h"

echo "# test areas"
for f in "$HERE"/test_*.c; do
  a=$(basename "$f" .c)
  a=${a#test_}
  [[ " ${AREAS[*]} " == *" $a "* ]] || fail "$(basename "$f") is not listed in AREAS in run.sh (it would never run)"
done
for area in "${AREAS[@]}"; do
  bin=""
  for cc in gcc clang-14; do
    if compile_check "test_$area.c compiles as C99 with $cc ${WARN[*]} and links" \
      "$cc" -std=c99 "${WARN[@]}" -pthread -I"$INCLUDE" "$HERE/harness.c" "$HERE/test_$area.c" \
      "${LINK[@]}" -o "$OUT/test_${area}_$cc"; then
      bin="$OUT/test_${area}_$cc"
    fi
  done
  if [[ -n $bin ]]; then
    echo "# running $(basename "$bin")"
    run_checks "test_$area" "$area" "$OUT/test_$area.log" "$bin"
  fi
done

echo "# examples/quickstart.c"
quickstart=""
for cc in gcc clang-14; do
  if compile_check "examples/quickstart.c compiles as C99 with $cc ${WARN[*]} and links" \
    "$cc" -std=c99 "${WARN[@]}" -I"$INCLUDE" "$ROOT/examples/quickstart.c" "${LINK[@]}" \
    -o "$OUT/quickstart_$cc"; then
    quickstart="$OUT/quickstart_$cc"
  fi
done
if [[ -n $quickstart ]]; then
  if log=$(timeout 60 "$quickstart" 2>&1); then
    printf '%s\n' "$log" | sed 's/^/#   /'
    pass "examples/quickstart runs and exits 0"
  else
    rc=$?
    printf '%s\n' "$log" | sed 's/^/#   /'
    fail "examples/quickstart exited with status $rc"
  fi
fi

finish
