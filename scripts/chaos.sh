#!/bin/bash
# Runs the chaos suite (tests/e2e/chaos.py) for a while and writes a report: randomized faults
# against a real guest protected by two ftd "hosts" in network namespaces; see docs/RELIABILITY.md.
#
# Usage: scripts/chaos.sh [--minutes N] [--faults K] [--first-seed S] [--report FILE]
#        scripts/chaos.sh --seed S [--faults K]      replays one seed
# Builds ftvm and the test guest first (like scripts/test.sh); needs root (namespaces, taps).
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=10 faults=8 first=1000 report="" seed=""
while (($#)); do
  case "$1" in
    --minutes) minutes=$2; shift 2 ;;
    --faults) faults=$2; shift 2 ;;
    --first-seed) first=$2; shift 2 ;;
    --report) report=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "chaos.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
B=${FTVM_BUILD_DIR:-build}
bash scripts/install-deps.sh
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$B" -j "$(nproc)"
cmake --build "$B" --target guest-image
export FTVM_SOURCE_DIR=$PWD FTVM_BUILD_DIR=$PWD/$B FTVM_GUEST_DIR=$PWD/$B/guest
[[ -n $report ]] || report=chaos-$(date +%Y%m%d-%H%M%S).jsonl
if [[ -n $seed ]]; then
  exec python3 tests/e2e/chaos.py --seed "$seed" --faults "$faults" --report "$report"
fi
python3 tests/e2e/chaos.py --minutes "$minutes" --first-seed "$first" --faults "$faults" --report "$report"
rc=$?
echo "chaos.sh: report in $report"
python3 - "$report" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
kinds = {}
for r in rows:
    for f, _ in r['faults']:
        kinds[f] = kinds.get(f, 0) + 1
print('seeds %d (failed %d), faults %d, failovers %d' % (len(rows), sum(not r['passed'] for r in rows),
      sum(len(r['faults']) for r in rows), sum(r['outcome'] == 'failed over' for r in rows)))
for k in sorted(kinds):
    print('  %-24s %d' % (k, kinds[k]))
PY
exit $rc
