#!/bin/bash
# Starts a real libvirtd for ftvm's libvirt tests on a machine without systemd (CI, containers),
# with ftvm's hook installed (/etc/libvirt/hooks/qemu.d/ftvm -> BUILD/ftvm-hook).
#
#   scripts/libvirtd.sh [--build DIR]     start (or keep) virtlogd + libvirtd, hook installed
#
# libvirtd discovers hook scripts only when it starts, so a libvirtd that was already running
# without the hook is restarted (running domains survive; libvirtd reconnects to them). Under
# systemd the script only checks that libvirtd answers and says what to do otherwise.
# The first start probes QEMU's capabilities (about 8 s here). Exit 0 when `virsh version`
# answers on qemu:///system with the hook in place.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD=$HERE/../build
while [[ $# -gt 0 ]]; do
  case $1 in
    --build) BUILD=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "libvirtd.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
log() { echo "libvirtd.sh: $*" >&2; }
command -v libvirtd >/dev/null || { log "libvirtd missing: run scripts/install-deps.sh"; exit 1; }
[[ -x $BUILD/ftvm-hook ]] || { log "$BUILD/ftvm-hook missing: build first (cmake --build $BUILD)"; exit 1; }

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
answers() { timeout 5 virsh -c qemu:///system version >/dev/null 2>&1; }

HOOK=/etc/libvirt/hooks/qemu.d/ftvm
# A copy, not a symlink into this build tree (which may be a temporary clone): libvirt fails
# every domain start when the hook cannot be executed. Replacing the content of a hook libvirtd
# already knows takes effect at once; a new hook file needs a libvirtd restart.
had_hook=0
[[ -e $HOOK ]] && had_hook=1
bash "$HERE/../tools/hook/install-hook.sh" --copy --binary "$BUILD/ftvm-hook" >/dev/null

if [[ -d /run/systemd/system ]]; then
  answers || { log "libvirtd does not answer; systemctl restart libvirtd"; exit 1; }
  ((had_hook)) || log "hook newly installed: run 'systemctl restart libvirtd' so libvirtd calls it"
  exit 0
fi

alive /run/virtlogd.pid || { log "+ virtlogd -d"; virtlogd -d; }
if alive /run/libvirtd.pid && ((had_hook)) && answers; then
  log "libvirtd already running with the hook"
  exit 0
fi
if alive /run/libvirtd.pid; then
  pid=$(cat /run/libvirtd.pid)
  log "restarting libvirtd (pid $pid) so that it discovers the hook"
  kill "$pid"
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
fi
log "+ libvirtd -d"
libvirtd -d
for _ in $(seq 1 120); do answers && { log "libvirtd answers (hook $HOOK)"; exit 0; }; sleep 0.5; done
log "libvirtd did not answer within 60 s"
exit 1
