#!/usr/bin/env bash
# scripts/test.sh — the test suites, against the library build.sh published (build/publish/).
#
#   scripts/test.sh [SUITE...]   run the suites (all when none is named) and print the summary;
#                                SUITE: nunit kernels c fuzz pytest bench (in that order whatever the
#                                order given). The last line is "N passed, M failed" over the suites
#                                run; exit status 1 on failure.
#
# `./build.sh test [SUITE...]` builds first, then does the same. Each suite adds to the totals; a
# suite that does not run at all counts as 1 failed. Counting and the summary are scripts/summary.py.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ALL_SUITES=(nunit kernels c fuzz pytest bench)
SUITES_TSV=$RESULTS/suites.tsv # one row per suite run: name, passed, failed, note
SUMMARY_PRINTED=0

summary() { "$PY" "$ROOT/scripts/summary.py" "$@"; }

# Runs a command with its output shown and also saved to a log; returns the command's status.
run_logged() {
  local log=$1
  shift
  set +e
  "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}

# Adds one suite's counts. A non-zero exit status with no failed test still counts one failure
# (build error, crash, collection error): summary.py add applies that rule.
add_suite() {
  local name=$1 passed=$2 failed=$3 rc=$4 note=${5:-}
  summary add "$SUITES_TSV" "$name" "$passed" "$failed" "$rc" "$note"
}

suite_nunit() {
  step "NUnit: dotnet test"
  rm -rf "$RESULTS/nunit"
  mkdir -p "$RESULTS/nunit"
  local rc=0
  # LogFilePrefix, not LogFileName: with a fixed LogFileName every test project of the solution
  # writes the same file and only the last project's results survive (microsoft/vstest#3026).
  # The CUDA tests' fake driver runs the kernels through the emulation library built above: here its
  # absence is a failure, not a skipped test.
  LMC_REQUIRE_KERNEL_EMU=1 LMC_KERNEL_EMU_LIB="$ROOT/$KERNEL_EMU" \
    run_logged "$RESULTS/nunit.log" dotnet test LMCacheNative.sln -c Release \
    --logger "trx;LogFilePrefix=nunit" --results-directory "$RESULTS/nunit" || rc=$?
  local files=() passed=0 failed=0 nfiles=0 note=""
  mapfile -t files < <(find "$RESULTS/nunit" -name '*.trx' | sort)
  if ((${#files[@]} > 0)); then
    if read -r passed failed nfiles < <(summary trx "${files[@]}"); then
      note="$nfiles trx file(s)"
    else
      passed=0 failed=1 note="trx files could not be read"
    fi
  else
    note="no trx file"
    ((rc != 0)) || rc=1
  fi
  # Cross-check with dotnet's own "Passed!/Failed! - Failed: n, Passed: n, …" line per project, in
  # case a trx file went missing: never report fewer failures than dotnet printed.
  local console_failed console_passed
  read -r console_failed console_passed < <(summary dotnet "$RESULTS/nunit.log") || true
  if [[ ${console_failed:-0} != "$failed" || ${console_passed:-0} != "$passed" ]]; then
    note="$note; dotnet printed $console_passed passed, $console_failed failed"
    ((console_failed <= failed)) || failed=$console_failed
  fi
  step_end
  add_suite "NUnit" "$passed" "$failed" "$rc" "$note"
}

# A suite whose runner prints "<name>: N passed, M failed" as its last summary line.
suite_counted() {
  local name=$1 log=$2
  shift 2
  local rc=0 passed=0 failed=0
  run_logged "$RESULTS/$log" "$@" || rc=$?
  read -r passed failed < <(summary line "$name" "$RESULTS/$log") || true
  step_end
  add_suite "$name" "${passed:-0}" "${failed:-0}" "$rc"
}

suite_kernels() {
  step "kernels: kernels/test/run.sh"
  suite_counted "kernels" kernels.log kernels/test/run.sh "$LIB"
}

# interop-tests/c/run.sh also builds and runs examples/quickstart.c (gcc and clang-14, C99,
# -Wall -Wextra -Werror -pedantic): the examples are checks of this suite.
suite_c() {
  step "C interop: interop-tests/c/run.sh"
  suite_counted "C interop" c-interop.log interop-tests/c/run.sh "$LIB"
}

# LMC_FUZZ_SECONDS sets how long the fuzzer runs (default 45; keep CI at 60 or less).
suite_fuzz() {
  step "fuzz: interop-tests/fuzz/run.sh"
  suite_counted "fuzz" fuzz.log interop-tests/fuzz/run.sh "$LIB" "${LMC_FUZZ_SECONDS:-45}"
}

suite_pytest() {
  step "pytest: interop-tests/python"
  local rc=0 passed=0 failed=0 xml="$RESULTS/pytest.xml" note=""
  rm -f "$xml"
  PYTHONPATH="$ROOT/python-demo${PYTHONPATH:+:$PYTHONPATH}" \
    run_logged "$RESULTS/pytest.log" "$PY" -m pytest interop-tests/python -q --junitxml="$xml" || rc=$?
  if [[ -f $xml ]]; then
    if ! read -r passed failed < <(summary junit "$xml"); then
      passed=0 failed=1 note="junit xml could not be read"
    fi
  else
    note="no junit xml"
    ((rc != 0)) || rc=1
  fi
  step_end
  add_suite "pytest" "$passed" "$failed" "$rc" "$note"
}

# The short form of the benchmark (python-demo/bench.py --quick --check, a few seconds): copy ratios
# and the lookup latency against the loose python-demo/bench_thresholds_quick.json, one check per
# metric; catches a regression of about 5x, never the load of a busy machine. The full benchmark and
# its tighter thresholds are `./build.sh bench --check`.
suite_bench() {
  step "bench: python-demo/bench.py --quick --check"
  suite_counted "bench" bench.log "$PY" python-demo/bench.py --quick --check \
    --json "$RESULTS/bench-quick.json"
}

# run_tests [SUITE...]: the named suites (all when none), in the order of ALL_SUITES.
run_tests() {
  local wanted=("$@") s w run
  mkdir -p "$RESULTS"
  : >"$SUITES_TSV"
  for w in "${wanted[@]}"; do
    [[ " ${ALL_SUITES[*]} " == *" $w "* ]] || die "unknown suite '$w' (suites: ${ALL_SUITES[*]})"
  done
  for s in "${ALL_SUITES[@]}"; do
    run=$((${#wanted[@]} == 0))
    for w in "${wanted[@]}"; do
      if [[ $w == "$s" ]]; then run=1; fi
    done
    if ((run)); then "suite_$s"; fi
  done
  SUMMARY_PRINTED=1
  summary report "$SUITES_TSV" "${TIMINGS[@]}"
}

# If the tests stop early (a build error under set -e), still end with the summary line.
tests_on_exit() {
  local rc=$?
  if [[ $SUMMARY_PRINTED == 0 ]]; then
    local passed=0 failed=0
    [[ -f $SUITES_TSV ]] && read -r passed failed < <(summary totals "$SUITES_TSV" 2>/dev/null) || true
    echo "build.sh: stopped before the tests finished (exit status $rc)"
    echo "${passed:-0} passed, $((${failed:-0} + 1)) failed"
  fi
  return "$rc"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  set -euo pipefail
  trap tests_on_exit EXIT
  run_tests "$@"
fi
