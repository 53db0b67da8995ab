#!/usr/bin/env bash
# scripts/deps.sh — the Debian packages the build and the suites need, and the CUDA toolkit (nvcc).
#
#   scripts/deps.sh     install what is missing (what `./build.sh deps` does)
#
# Sourced by build.sh for ensure_packages / ensure_cuda_toolkit. Installs with apt (sudo when not
# root); idempotent.
# CUDA: nvcc comes from Debian's nvidia-cuda-toolkit (contrib/non-free, added when missing; about
# 1.6 GB and 3 minutes once). If it cannot be installed (or LMC_NO_CUDA_TOOLKIT=1), the build goes on
# with the committed kernels/prebuilt/lmc_kernels.fatbin and says so; no GPU is needed for anything.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

APT_PACKAGES=(
  gcc g++ clang-14 binutils                  # C interop tests (nm comes with binutils)
  python3-torch python3-numpy python3-pytest # Python package, demo and pytest
  redis-server redis-tools redis-sentinel    # Redis tier tests start their own servers, clusters, sentinels
  openssl                                    # the remote tier's TLS test makes its own CA and server certificate
  python3-yaml                               # the connector reads LMCACHE_CONFIG_FILE (YAML)
  libfuzzer-14-dev libclang-rt-14-dev        # fuzz suite: clang-14 -fsanitize=fuzzer (runtime in clang-rt)
  prometheus python3-prometheus-client       # metrics: promtool check, a real scrape, the connector's exporter
  python3-matplotlib                         # ./build.sh bench draws build/bench/bench.png
)

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

# Debian ships nvcc in its contrib/non-free components. Never fatal: without nvcc the committed
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

deps() {
  ensure_packages
  ensure_cuda_toolkit
  step_end
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  set -euo pipefail
  deps
fi
