#!/usr/bin/env bash
# interop-tests/fuzz/run.sh — the libFuzzer suite, run against a published library.
#
#   interop-tests/fuzz/run.sh <path-to-liblmcache_native.so> [seconds] [extra libFuzzer flags...]
#
# seconds: how long to fuzz (default: $LMC_FUZZ_SECONDS, else 45). Extra flags go to libFuzzer as
# they are (e.g. -jobs=4 -workers=4 for a longer run on a bigger machine; see README.md).
#
# Builds fuzz_exports.c with clang-14 -fsanitize=fuzzer into interop-tests/fuzz/out/ (git-ignored),
# linked against a copy of the library, and runs:
#   1. every seed of corpus/ once, each its own check;
#   2. the fuzzer for the given time (-max_total_time) on a copy of the seeds that passed (the
#      committed corpus never grows), with -timeout so that a hang is a failure.
# A crash, a timeout, an LMC_E_INTERNAL or any other broken invariant (see fuzz_exports.c) is a
# failed check; its input is kept under out/artifacts/ and the command to reproduce it is printed.
# Prints "ok - …" / "not ok - …" per check and, last, "fuzz: N passed, M failed".
# Exit status: 0 when nothing failed.
set -uo pipefail # not -e: a failing check is counted, not fatal

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="$HERE/out"
CC=clang-14
SECONDS_DEFAULT=${LMC_FUZZ_SECONDS:-45}
PER_INPUT_TIMEOUT=25 # seconds one input may take before it counts as a hang

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok - $*"; }
fail() { failed=$((failed + 1)); echo "not ok - $*"; }
finish() {
  echo "fuzz: $passed passed, $failed failed"
  [[ $failed -eq 0 ]]
  exit
}

if [[ $# -lt 1 ]]; then
  echo "usage: $0 <path-to-liblmcache_native.so> [seconds] [extra libFuzzer flags...]" >&2
  exit 2
fi
LIB_IN=$1
FUZZ_SECONDS=${2:-$SECONDS_DEFAULT}
shift
[[ $# -gt 0 ]] && shift
EXTRA_FLAGS=("$@")
if ! [[ $FUZZ_SECONDS =~ ^[0-9]+$ ]] || ((FUZZ_SECONDS < 1)); then
  echo "run.sh: seconds must be a positive integer, got '$FUZZ_SECONDS'" >&2
  exit 2
fi
if [[ ! -f $LIB_IN ]]; then
  fail "library not found: $LIB_IN"
  finish
fi

# Keep earlier crash artifacts (they are evidence); rebuild everything else.
rm -rf "$OUT/lib" "$OUT/work" "$OUT/scratch" "$OUT/logs" "$OUT/fuzz_exports"
mkdir -p "$OUT/lib" "$OUT/work" "$OUT/scratch" "$OUT/logs" "$OUT/artifacts"
cp -f "$LIB_IN" "$OUT/lib/liblmcache_native.so"
FUZZER="$OUT/fuzz_exports"
# Each fuzzer process makes its private dir (sockets, disk tier) in here; short, so socket paths stay
# under 107 bytes, and removed at the end even when a crash skipped the process's own cleanup.
LMC_FUZZ_TMPDIR=$(mktemp -d /tmp/lmcfuzz-run.XXXXXX) || exit 1
export LMC_FUZZ_TMPDIR
trap 'rm -rf "$LMC_FUZZ_TMPDIR"' EXIT

# Signals: the .NET runtime inside the library installs its SIGSEGV/SIGFPE handlers on the first call,
# on top of libFuzzer's, and turns faults in managed code (null checks) into exceptions; other faults
# it passes on to libFuzzer's handler, which records them as crashes. So libFuzzer keeps its handlers
# for SEGV/BUS/FPE/ILL/ABRT (the harness reports a broken invariant with abort()).
FLAGS=(-timeout="$PER_INPUT_TIMEOUT" -rss_limit_mb=4096 -max_len=4096 -handle_abrt=1 -handle_segv=1
  -handle_bus=1 -handle_fpe=1 -handle_ill=1 -print_final_stats=1 -artifact_prefix="$OUT/artifacts/")

echo "# build"
if ! command -v "$CC" >/dev/null; then
  fail "build: $CC not found (./build.sh deps installs clang-14, libfuzzer-14-dev, libclang-rt-14-dev)"
  finish
fi
if log=$("$CC" -std=c11 -g -O1 -Wall -Wextra -Werror -fsanitize=fuzzer -I"$ROOT/include" \
  "$HERE/fuzz_exports.c" -L"$OUT/lib" -llmcache_native -Wl,-rpath,'$ORIGIN/lib' -o "$FUZZER" 2>&1); then
  pass "fuzz_exports.c builds with $CC -fsanitize=fuzzer and links against the library"
else
  fail "fuzz_exports.c builds with $CC -fsanitize=fuzzer and links against the library"
  printf '%s\n' "$log" | sed 's/^/#   /' | head -40
  finish
fi

# Prints what a failed run left: the invariant's report (or libFuzzer's), the artifact and how to
# reproduce it.
explain_failure() {
  local log=$1 input=${2:-}
  local report
  report=$(sed -n '/==== lmc fuzz: INVARIANT VIOLATED ====/,/^==[0-9]*== ERROR: libFuzzer/p' "$log" | head -20)
  if [[ -z $report ]]; then
    report=$(grep -E 'ERROR: libFuzzer|ALARM|SUMMARY|deadly signal|out-of-memory|Timeout' "$log" | head -8)
  fi
  printf '%s\n' "$report" | sed 's/^/#   /'
  if [[ -z $input ]]; then
    input=$(sed -n "s/.*Test unit written to \\(.*\\)$/\\1/p" "$log" | tail -n 1)
  fi
  if [[ -n $input ]] && ! grep -q 'INVARIANT VIOLATED' "$log"; then
    # a crash, hang or OOM without the harness's report: replay with the trace to name the call
    local last
    last=$(cd "$OUT/scratch" && LMC_FUZZ_TRACE=1 timeout $((PER_INPUT_TIMEOUT + 10)) "$FUZZER" -timeout="$PER_INPUT_TIMEOUT" \
      -rss_limit_mb=4096 "$input" 2>&1 | grep -a '^lmc-fuzz: ' | grep -av -e '^lmc-fuzz:   -> ' -e 'teardown: ' |
      tail -n 4)
    [[ -n $last ]] && printf 'last calls of the input (an OOM may come from an earlier one):\n%s\n' "$last" |
      cut -c1-300 | sed 's/^/#   /'
  fi
  if [[ -n $input ]]; then
    echo "#   input: $input"
    echo "#   reproduce: (cd $OUT/scratch && LMC_FUZZ_TRACE=1 $FUZZER -timeout=$PER_INPUT_TIMEOUT $input)"
  fi
  echo "#   log: $log"
}

echo "# seed corpus (each input once)"
shopt -s nullglob
seeds=("$HERE"/corpus/*)
if ((${#seeds[@]} == 0)); then
  fail "seed corpus: $HERE/corpus is empty"
fi
for seed in "${seeds[@]}"; do
  name=$(basename "$seed")
  log="$OUT/logs/seed-$name.log"
  (cd "$OUT/scratch" && timeout $((PER_INPUT_TIMEOUT + 30)) "$FUZZER" "${FLAGS[@]}" "$seed") >"$log" 2>&1
  rc=$?
  if [[ $rc -eq 0 ]]; then
    pass "seed $name"
    cp "$seed" "$OUT/work/"
  else
    fail "seed $name (exit status $rc)"
    explain_failure "$log" "$seed"
  fi
done

echo "# fuzzing for ${FUZZ_SECONDS}s${EXTRA_FLAGS[*]:+ (${EXTRA_FLAGS[*]})}"
log="$OUT/logs/fuzz.log"
(cd "$OUT/scratch" && timeout $((FUZZ_SECONDS + PER_INPUT_TIMEOUT + 60)) "$FUZZER" "${FLAGS[@]}" \
  -max_total_time="$FUZZ_SECONDS" "${EXTRA_FLAGS[@]}" "$OUT/work") >"$log" 2>&1
rc=$?
stat() { sed -n "s/^stat::$1: *\\([0-9]*\\).*/\\1/p" "$log" | tail -n 1; }
runs=$(stat number_of_executed_units)
speed=$(stat average_exec_per_sec)
added=$(stat new_units_added)
rss=$(stat peak_rss_mb)
cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -n 1)
summary="${runs:-?} inputs, ${speed:-?} exec/s, ${cov:-cov: ?} edges, ${added:-?} new inputs, peak RSS ${rss:-?} MB"
if [[ $rc -eq 0 ]]; then
  pass "fuzzing ${FUZZ_SECONDS}s: no crash, hang or broken invariant ($summary)"
elif [[ $rc -eq 124 ]]; then
  fail "fuzzing ${FUZZ_SECONDS}s: the fuzzer did not stop in time (killed by timeout; $summary)"
  explain_failure "$log"
else
  fail "fuzzing ${FUZZ_SECONDS}s: failed with exit status $rc ($summary)"
  explain_failure "$log"
fi

finish
