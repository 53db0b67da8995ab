#!/usr/bin/env bash
# build.sh — the one entry point to build and test LMCacheNative on Debian 12 (bookworm).
#
#   ./build.sh [build]  install missing Debian packages, compile the CUDA kernels (kernels/ ->
#                       fatbin; with nvcc when present, else the committed fatbin is embedded),
#                       publish liblmcache_native.so (NativeAOT) into build/publish/ and stage it
#                       into python-demo/lmcache_native/lib/
#   ./build.sh test     install the CUDA toolkit too, build, then run every suite (NUnit, kernels,
#                       C interop, fuzz, pytest); the last line of output is "N passed, M failed" over all
#                       of them; exit status 1 on failure
#   ./build.sh demo     build, then run python-demo/demo.py
#   ./build.sh bench    build, then run python-demo/bench.py
#   ./build.sh deps     only install the missing Debian packages (the CUDA toolkit included)
#
# Needs the .NET 10 SDK, gcc and clang-14 (all on this machine kind). Installs with apt what is
# missing (sudo when not root). Safe to run again: every step is idempotent.
# CUDA: nvcc comes from Debian's nvidia-cuda-toolkit (contrib/non-free, added when missing; about
# 1.6 GB and 3 minutes once). If it cannot be installed (or LMC_NO_CUDA_TOOLKIT=1), the build goes on
# with the committed kernels/prebuilt/lmc_kernels.fatbin and says so; no GPU is needed for anything.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$PWD

# Debian's interpreter: the only one that sees python3-torch/numpy/pytest. Never bare `python3`,
# which may be a pyenv interpreter earlier on PATH.
PY=/usr/bin/python3

PUBLISH_DIR=build/publish
LIB=$PUBLISH_DIR/liblmcache_native.so
STAGED_LIB=python-demo/lmcache_native/lib/liblmcache_native.so
RESULTS=build/test-results

APT_PACKAGES=(
  gcc g++ clang-14 binutils                  # C interop tests (nm comes with binutils)
  python3-torch python3-numpy python3-pytest # Python package, demo and pytest
  redis-server                               # Redis tier tests start their own server from it
  python3-yaml                               # the connector reads LMCACHE_CONFIG_FILE (YAML)
  libfuzzer-14-dev libclang-rt-14-dev        # fuzz suite: clang-14 -fsanitize=fuzzer (runtime in clang-rt)
)

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

# ------------------------------------------------------------------------------------------------
# Build
# ------------------------------------------------------------------------------------------------

ensure_packages() {
  step "Debian packages"
  local missing=() pkg
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$pkg")
  done
  if ((${#missing[@]} == 0)); then
    echo "all present: ${APT_PACKAGES[*]}"
    return
  fi
  local sudo=()
  ((EUID == 0)) || sudo=(sudo)
  echo "installing: ${missing[*]}"
  "${sudo[@]}" apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
}

# Debian ships nvcc in contrib/non-free (toolchain.md §1). Never fatal: without nvcc the committed
# fatbin is embedded instead of a fresh one, and the kernel checks say so.
CUDA_SOURCES=/etc/apt/sources.list.d/lmc-contrib-non-free.sources

ensure_cuda_toolkit() {
  step "CUDA toolkit (nvcc)"
  if command -v nvcc >/dev/null; then
    nvcc --version | tail -n 2 | head -n 1
    return 0
  fi
  if [[ ${LMC_NO_CUDA_TOOLKIT:-0} == 1 ]]; then
    echo "LMC_NO_CUDA_TOOLKIT=1: not installing nvcc; the committed kernels/prebuilt/lmc_kernels.fatbin is used"
    return 0
  fi
  local sudo=()
  ((EUID == 0)) || sudo=(sudo)
  if ! apt-cache policy nvidia-cuda-toolkit 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    if [[ ! -f $CUDA_SOURCES ]]; then
      local codename
      codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
      echo "adding Debian contrib/non-free ($codename) as $CUDA_SOURCES"
      printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s %s-updates\nComponents: contrib non-free\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$codename" "$codename" | "${sudo[@]}" tee "$CUDA_SOURCES" >/dev/null || true
    fi
    "${sudo[@]}" apt-get update || true
  fi
  echo "installing nvidia-cuda-toolkit (about 1.6 GB, once)"
  if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nvidia-cuda-toolkit; then
    echo "build.sh: WARNING: nvidia-cuda-toolkit could not be installed; building with the committed kernels/prebuilt/lmc_kernels.fatbin" >&2
  fi
  return 0
}

KERNEL_FATBIN=kernels/prebuilt/lmc_kernels.fatbin
KERNEL_EMU=build/kernels/liblmc_kernel_emu.so

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
  dotnet publish src/LMCacheNative.Exports/LMCacheNative.Exports.csproj \
    -r linux-x64 -c Release -o "$PUBLISH_DIR"
  [[ -f $LIB ]] || die "dotnet publish did not produce $LIB"
  echo "$LIB ($(stat -c %s "$LIB") bytes)"
}

stage() {
  step "stage: copy the library into python-demo"
  mkdir -p "$(dirname "$STAGED_LIB")"
  install -m 0755 "$LIB" "$STAGED_LIB"
  echo "$STAGED_LIB ($(stat -c %s "$STAGED_LIB") bytes)"
}

build() {
  ensure_packages
  # The 1.6 GB toolkit is installed for the test suites (CI compiles the kernels and checks their
  # registers); building, the demo and the benchmark use nvcc when present and the committed fatbin
  # otherwise, so a new machine runs the demo without that download.
  if [[ $MODE == test || ${LMC_INSTALL_CUDA_TOOLKIT:-0} == 1 ]]; then
    ensure_cuda_toolkit
  fi
  build_kernels
  publish
  stage
  step_end
}

# ------------------------------------------------------------------------------------------------
# Tests: each suite adds to the totals; a suite that does not run at all counts as 1 failed
# ------------------------------------------------------------------------------------------------

TOTAL_PASSED=0
TOTAL_FAILED=0
SUITES=()             # one summary line per suite
SUMMARY_PRINTED=0

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
# (build error, crash, collection error).
add_suite() {
  local name=$1 passed=$2 failed=$3 rc=$4 note=${5:-}
  if ((rc != 0 && failed == 0)); then
    failed=1
    note="${note:+$note; }exit status $rc without a failed test: counted as 1 failed"
  fi
  TOTAL_PASSED=$((TOTAL_PASSED + passed))
  TOTAL_FAILED=$((TOTAL_FAILED + failed))
  SUITES+=("$(printf '%-10s %5d passed, %3d failed%s' "$name" "$passed" "$failed" "${note:+  ($note)}")")
}

# Prints "passed failed files" summed over trx files (<Counters passed= failed= …>).
count_trx() {
  "$PY" - "$@" <<'EOF'
import sys, xml.etree.ElementTree as ET
passed = failed = files = 0
for path in sys.argv[1:]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        failed += 1
        continue
    files += 1
    for c in root.iter():
        if c.tag.endswith("Counters"):
            n = lambda k: int(c.get(k, "0"))
            passed += n("passed")
            failed += n("failed") + n("error") + n("timeout") + n("aborted")
print(passed, failed, files)
EOF
}

# Prints "passed failed" from a JUnit XML file (tests - failures - errors - skipped; errors fail).
count_junit() {
  "$PY" - "$1" <<'EOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
passed = failed = 0
for s in suites:
    n = lambda k: int(s.get(k, "0"))
    passed += n("tests") - n("failures") - n("errors") - n("skipped")
    failed += n("failures") + n("errors")
print(passed, failed)
EOF
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
    if read -r passed failed nfiles < <(count_trx "${files[@]}"); then
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
  read -r console_failed console_passed < <(
    grep -oE '(Passed|Failed)! +- Failed: +[0-9]+, Passed: +[0-9]+' "$RESULTS/nunit.log" |
      awk -F'[:,] +' '{ f += $2; p += $4 } END { print f + 0, p + 0 }'
  ) || true
  if [[ ${console_failed:-0} != "$failed" || ${console_passed:-0} != "$passed" ]]; then
    note="$note; dotnet printed $console_passed passed, $console_failed failed"
    ((console_failed <= failed)) || failed=$console_failed
  fi
  step_end
  add_suite "NUnit" "$passed" "$failed" "$rc" "$note"
}

suite_kernels() {
  step "kernels: kernels/test/run.sh"
  local rc=0 passed=0 failed=0 line
  run_logged "$RESULTS/kernels.log" kernels/test/run.sh "$LIB" || rc=$?
  line=$(grep -E '^kernels: [0-9]+ passed, [0-9]+ failed$' "$RESULTS/kernels.log" | tail -n 1 || true)
  if [[ $line =~ ([0-9]+)\ passed,\ ([0-9]+)\ failed ]]; then
    passed=${BASH_REMATCH[1]}
    failed=${BASH_REMATCH[2]}
  fi
  step_end
  add_suite "kernels" "$passed" "$failed" "$rc"
}

suite_c() {
  step "C interop: interop-tests/c/run.sh"
  local rc=0 passed=0 failed=0 line
  run_logged "$RESULTS/c-interop.log" interop-tests/c/run.sh "$LIB" || rc=$?
  line=$(grep -E '^C interop: [0-9]+ passed, [0-9]+ failed$' "$RESULTS/c-interop.log" | tail -n 1 || true)
  if [[ $line =~ ([0-9]+)\ passed,\ ([0-9]+)\ failed ]]; then
    passed=${BASH_REMATCH[1]}
    failed=${BASH_REMATCH[2]}
  fi
  step_end
  add_suite "C interop" "$passed" "$failed" "$rc"
}

# LMC_FUZZ_SECONDS sets how long the fuzzer runs (default 45; keep CI at 60 or less).
suite_fuzz() {
  step "fuzz: interop-tests/fuzz/run.sh"
  local rc=0 passed=0 failed=0 line
  run_logged "$RESULTS/fuzz.log" interop-tests/fuzz/run.sh "$LIB" "${LMC_FUZZ_SECONDS:-45}" || rc=$?
  line=$(grep -E '^fuzz: [0-9]+ passed, [0-9]+ failed$' "$RESULTS/fuzz.log" | tail -n 1 || true)
  if [[ $line =~ ([0-9]+)\ passed,\ ([0-9]+)\ failed ]]; then
    passed=${BASH_REMATCH[1]}
    failed=${BASH_REMATCH[2]}
  fi
  step_end
  add_suite "fuzz" "$passed" "$failed" "$rc"
}

suite_pytest() {
  step "pytest: interop-tests/python"
  local rc=0 passed=0 failed=0 xml="$RESULTS/pytest.xml" note=""
  rm -f "$xml"
  PYTHONPATH="$ROOT/python-demo${PYTHONPATH:+:$PYTHONPATH}" \
    run_logged "$RESULTS/pytest.log" "$PY" -m pytest interop-tests/python -q --junitxml="$xml" || rc=$?
  if [[ -f $xml ]]; then
    if ! read -r passed failed < <(count_junit "$xml"); then
      passed=0 failed=1 note="junit xml could not be read"
    fi
  else
    note="no junit xml"
    ((rc != 0)) || rc=1
  fi
  step_end
  add_suite "pytest" "$passed" "$failed" "$rc" "$note"
}

run_tests() {
  mkdir -p "$RESULTS"
  suite_nunit
  suite_kernels
  suite_c
  suite_fuzz
  suite_pytest
  printf '\n==> summary\n'
  printf '  %s\n' "${SUITES[@]}"
  echo "  timings:"
  printf '    %s\n' "${TIMINGS[@]}"
  SUMMARY_PRINTED=1
  echo "$TOTAL_PASSED passed, $TOTAL_FAILED failed"
  ((TOTAL_FAILED == 0))
}

# If `test` stops early (a build error under set -e), still end with the summary line.
on_exit() {
  local rc=$?
  if [[ ${MODE:-} == test && $SUMMARY_PRINTED == 0 ]]; then
    echo "build.sh: stopped before the tests finished (exit status $rc)"
    echo "$TOTAL_PASSED passed, $((TOTAL_FAILED + 1)) failed"
  fi
  return "$rc"
}

usage() {
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
}

MODE=${1:-build}
[[ $# -gt 0 ]] && shift
trap on_exit EXIT

case $MODE in
build) build ;;
deps)
  ensure_packages
  ensure_cuda_toolkit
  step_end
  ;;
test)
  build
  run_tests
  ;;
demo)
  build
  step "demo: python-demo/demo.py"
  "$PY" python-demo/demo.py "$@"
  step_end
  ;;
bench)
  build
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
