#!/bin/bash
# Runs the transport microbenchmark (bench/transport_bench.cc, RDMA vs TCP); see
# docs/BENCHMARKS.md, "Transport microbenchmark (RDMA vs TCP)".
#
# Usage: bench/run-transport-bench.sh [--host-tcp] [--out DIR] [--cpus N] [--memory SIZE]
#                                     [--timeout SECS] [-- BENCH_ARGS...]
#   (default)    builds ftvm_transport_bench and the RDMA lab, then runs the benchmark inside one
#                lab guest (tests/rdma-lab/lab.sh, QEMU TCG, Soft-RoCE rxe0): RDMA over rxe0's IP
#                and TCP over the same IP, same guest, same run. The lab returns only the guest
#                console, so the JSON is taken from between the @@TRANSPORT_BENCH_JSON_*@@ markers
#                in the console log.
#   --host-tcp   runs only the TCP half directly on this host over 127.0.0.1 (no lab): plain,
#                authenticated and encrypted TCP in the same run.
#   BENCH_ARGS   passed to the benchmark (--batches, --layouts, --seconds, --dirty, --fixed-us...;
#                ftvm_transport_bench --help).
# Output in DIR (default bench/results, git-ignored): transport-bench-<where>-<date>.{json,txt,log}
# and transport-latest.{json,txt}. Env: BUILD_DIR (default <repo>/build).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$(cd "$HERE/.." && pwd)
BUILD=${BUILD_DIR:-$SRC/build}
OUT=$HERE/results HOST_TCP=0 CPUS=2 MEM=1G TMO=540
while (($#)); do
  case $1 in
    --host-tcp) HOST_TCP=1 ;;
    --out) OUT=$2; shift ;;
    --cpus) CPUS=$2; shift ;;
    --memory) MEM=$2; shift ;;
    --timeout) TMO=$2; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run-transport-bench: unknown option $1 (bench args go after --)" >&2; exit 2 ;;
  esac
  shift
done

if [[ ! -f $BUILD/build.ninja && ! -f $BUILD/Makefile ]]; then
  cmake -S "$SRC" -B "$BUILD" -G Ninja
fi
targets=(ftvm_transport_bench)
((HOST_TCP)) || targets+=(rdma-lab)
cmake --build "$BUILD" --target "${targets[@]}"

# A private copy, so a rebuild while the benchmark runs cannot swap the binary under it.
BIN=$(mktemp -d /tmp/ftvm-transport-bench.XXXXXX)
trap 'rm -rf "$BIN"' EXIT
cp "$BUILD/bench/ftvm_transport_bench" "$BIN/"
mkdir -p "$OUT"
stamp=$(date +%Y%m%d-%H%M%S)

extract() {  # console/stdout file -> JSON and summary files
  local from=$1 json=$2 txt=$3
  tr -d '\r' < "$from" | sed -n '/^@@TRANSPORT_BENCH_JSON_BEGIN@@$/,/^@@TRANSPORT_BENCH_JSON_END@@$/p' \
    | sed '1d;$d' > "$json"
  tr -d '\r' < "$from" | sed -n '/^ftvm transport microbenchmark:/,/^@@TRANSPORT_BENCH_JSON_BEGIN@@$/p' \
    | sed '$d' > "$txt"
  if [[ ! -s $json ]] || ! /usr/bin/python3 -m json.tool "$json" > /dev/null; then
    echo "run-transport-bench: no valid JSON between the markers in $from" >&2
    return 1
  fi
}

if ((HOST_TCP)); then
  where=host-tcp
  log=$OUT/transport-bench-$where-$stamp.log
  rc=0
  "$BIN/ftvm_transport_bench" --backend tcp,tcp+auth,tcp+encrypt --addr 127.0.0.1 "$@" > "$log" 2>&1 || rc=$?
else
  where=lab
  log=$OUT/transport-bench-$where-$stamp.log
  rc=0
  "$SRC/tests/rdma-lab/lab.sh" -q -B -d "$BUILD/rdma-lab" -c "$CPUS" -m "$MEM" -t "$TMO" -l "$log" \
    -a "$BIN/ftvm_transport_bench" -- ./ftvm_transport_bench "$@" || rc=$?
fi
json=$OUT/transport-bench-$where-$stamp.json txt=$OUT/transport-bench-$where-$stamp.txt
if extract "$log" "$json" "$txt"; then
  cp "$json" "$OUT/transport-latest.json"
  cp "$txt" "$OUT/transport-latest.txt"
  cat "$txt"
  echo "run-transport-bench: $json ($where, benchmark exit $rc; console/stdout in $log)"
else
  tail -n 30 "$log" | tr -d '\r' >&2
  ((rc)) || rc=1
fi
exit "$rc"
