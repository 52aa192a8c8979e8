#!/bin/bash
# Runs the ftvm core-replication benchmarks (bench/ftvm_bench.py); see docs/BENCHMARKS.md.
# Usage: bench/run-bench.sh [--quick] [--only pause,slowdown,failover] [--out DIR] [...]
# Env: BUILD_DIR (default <repo>/build). Builds ftd, ftctl and the guest image if needed, then
# runs the benchmark against a private copy of ftd/ftctl so a concurrent rebuild cannot change
# the binaries under a running benchmark.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$(cd "$HERE/.." && pwd)
BUILD=${BUILD_DIR:-$SRC/build}
if [[ ! -f $BUILD/build.ninja && ! -f $BUILD/Makefile ]]; then
  cmake -S "$SRC" -B "$BUILD" -G Ninja
fi
cmake --build "$BUILD" --target ftd ftctl guest-image
BIN=$(mktemp -d /tmp/ftvm-bench-bin.XXXXXX)
trap 'rm -rf "$BIN"' EXIT
cp "$BUILD/ftd" "$BUILD/ftctl" "$BIN/"
export FTVM_SOURCE_DIR=$SRC FTVM_BUILD_DIR=$BIN FTVM_GUEST_DIR=$BUILD/guest
/usr/bin/python3 "$HERE/ftvm_bench.py" "$@"
