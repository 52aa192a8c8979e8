#!/bin/bash
# The main job end to end on the embedded default (see README.md): installs what it needs,
# builds ftvm and the test guest, then runs scripts/demo.py (arguments are passed on, e.g.
# --mem 1024 --smp 2 --planned).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j "$(nproc)" --target ftd ftctl guest-image
exec /usr/bin/python3 scripts/demo.py "$@"
