#!/bin/bash
# Runs the whole ftvm test suite on a fresh Debian 12 machine (as root): installs the packages
# it needs, builds with warnings as errors, builds the Linux test guest, starts libvirtd with
# ftvm's hook (scripts/libvirtd.sh; no systemd needed), runs every CTest test
# (unit + end-to-end with real QEMU guests), then builds the unit tests with AddressSanitizer
# and UndefinedBehaviorSanitizer and runs them again.
#
# Usage: scripts/test.sh [ctest arguments...]   e.g. scripts/test.sh -L failover
# Environment: FTVM_BUILD_DIR (default build), FTVM_ASAN_BUILD_DIR (default build-asan),
#              FTVM_SKIP_ASAN=1 to skip the sanitizer pass, FTVM_ACCEL=tcg|kvm for the guests.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${FTVM_BUILD_DIR:-build}
A=${FTVM_ASAN_BUILD_DIR:-build-asan}
JOBS=$(nproc)

bash scripts/install-deps.sh

echo "== build ($B, -Werror)"
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFTVM_WERROR=ON
cmake --build "$B" -j "$JOBS"
cmake --build "$B" --target guest-image

echo "== libvirtd (libvirt tests: real daemon, ftvm hook installed)"
bash scripts/libvirtd.sh --build "$B"

echo "== tests"
rc=0
(cd "$B" && ctest --output-on-failure --timeout 600 "$@") || rc=$?

if [[ ${FTVM_SKIP_ASAN:-0} != 1 && $# -eq 0 ]]; then
  echo "== unit tests under ASan+UBSan ($A)"
  cmake -S . -B "$A" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DFTVM_SANITIZE=ON -DFTVM_E2E=OFF
  cmake --build "$A" -j "$JOBS" --target ftvm_unit_tests frame_fuzz_replay
  (cd "$A" && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
     ctest --output-on-failure -L unit) || rc=$?
fi
exit $rc
