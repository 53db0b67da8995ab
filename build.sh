#!/usr/bin/env bash
# build.sh — the one entry point to build and test LMCacheNative on Debian 12 (bookworm).
#
#   ./build.sh [build]  install missing Debian packages, compile the CUDA kernels (kernels/ ->
#                       fatbin; with nvcc when present, else the committed fatbin is embedded),
#                       publish liblmcache_native.so (NativeAOT) into build/publish/ and stage it
#                       into python-demo/lmcache_native/lib/
#   ./build.sh test     install the CUDA toolkit too, build, then run every suite (NUnit, kernels,
#                       C interop with examples/, fuzz, pytest, bench); the last line of output is
#                       "N passed, M failed" over all of them; exit status 1 on failure.
#                       `./build.sh test c fuzz` runs only the suites named (nunit kernels c fuzz
#                       pytest bench; bench is a seconds-long `bench.py --quick --check`)
#   ./build.sh demo     build, then run python-demo/demo.py
#   ./build.sh bench    build, then run python-demo/bench.py, which writes its numbers to
#                       build/bench/bench.json; `./build.sh bench --check` also compares them with
#                       python-demo/bench_thresholds.json (one ok/FAIL line per metric; exit
#                       status 1 when one is missed)
#   ./build.sh deps     only install the missing Debian packages (the CUDA toolkit included)
#
# Needs the .NET 10 SDK, gcc and clang-14 (all on this machine kind). Installs with apt what is
# missing (sudo when not root). Safe to run again: every step is idempotent.
# The work is in scripts/: deps.sh (Debian packages, the CUDA toolkit), build.sh (kernels, NativeAOT
# publish, stage), test.sh (the suites), summary.py (counting test reports, the summary) and
# bench_check.py (bench.json against thresholds).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
source scripts/common.sh
source scripts/deps.sh
source scripts/build.sh
source scripts/test.sh

# If `test` stops early (a build error under set -e), still end with the summary line.
on_exit() {
  local rc=$?
  if [[ ${MODE:-} == test ]]; then
    tests_on_exit
  fi
  return "$rc"
}

usage() {
  sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'
}

MODE=${1:-build}
[[ $# -gt 0 ]] && shift
trap on_exit EXIT

case $MODE in
build) build build ;;
deps) deps ;;
test)
  mkdir -p "$RESULTS"
  : >"$SUITES_TSV" # no stale suites in the summary when the build stops early
  build test
  run_tests "$@"
  ;;
demo)
  build demo
  step "demo: python-demo/demo.py"
  "$PY" python-demo/demo.py "$@"
  step_end
  ;;
bench)
  build bench
  step "bench: python-demo/bench.py"
  "$PY" python-demo/bench.py "$@"
  step_end
  ;;
-h | --help | help) usage ;;
*)
  usage >&2
  exit 2
  ;;
esac
