#!/bin/bash
# Installs ftvm's libvirt QEMU hook: /etc/libvirt/hooks/qemu.d/ftvm -> the built ftvm-hook binary,
# and a default /etc/ftvm/hook.conf when there is none.
#
#   install-hook.sh [--binary PATH] [--copy] [--restart-libvirtd]
#
# --binary PATH        the ftvm-hook executable (default: ftvm-hook next to this script's build,
#                      i.e. REPO/build/ftvm-hook, else `ftvm-hook` on PATH)
# --copy               install a copy (mode 0755) instead of a symlink to PATH; use it when PATH is
#                      in a build tree that may be cleaned
# --restart-libvirtd   restart libvirtd afterwards, if it was started without systemd (kill by the
#                      pid in /run/libvirtd.pid, `libvirtd -d`, wait until `virsh version` answers).
#                      Without it (or under systemd) the command to run is printed instead.
#
# libvirtd discovers hook scripts only when it starts: a hook installed while it runs is not
# called until libvirtd restarts. Running domains are not affected by that restart (libvirtd
# reconnects to them and runs the hook's `reconnect` phase for each, which lets ftd protect the
# ones that carry the ftvm metadata).
set -euo pipefail

# DESTDIR (environment) installs under another root, for packaging; no restart then.
DESTDIR=${DESTDIR:-}
HOOK_DIR=$DESTDIR/etc/libvirt/hooks/qemu.d
HOOK=$HOOK_DIR/ftvm
CONF_DIR=$DESTDIR/etc/ftvm
CONF=$CONF_DIR/hook.conf
PIDFILE=/run/libvirtd.pid

die() { echo "install-hook.sh: $*" >&2; exit 1; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }

binary="" copy=0 restart=0
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) [ $# -ge 2 ] || die "--binary needs a path"; binary=$2; shift 2 ;;
    --binary=*) binary=${1#--binary=}; shift ;;
    --copy) copy=1; shift ;;
    --restart-libvirtd) restart=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "install-hook.sh: unknown argument '$1'" >&2; usage 2 ;;
  esac
done

if [ -z "$binary" ]; then
  here=$(cd "$(dirname "$0")" && pwd)
  if [ -x "$here/../../build/ftvm-hook" ]; then
    binary=$here/../../build/ftvm-hook
  elif command -v ftvm-hook >/dev/null 2>&1; then
    binary=$(command -v ftvm-hook)
  else
    die "no ftvm-hook binary found; build it (ninja -C build ftvm-hook) or pass --binary PATH"
  fi
fi
if [ ! -f "$binary" ] || [ ! -x "$binary" ]; then die "$binary is not an executable file"; fi
binary=$(readlink -f "$binary")
[ -n "$DESTDIR" ] || [ "$(id -u)" -eq 0 ] || die "must run as root (writes $HOOK and $CONF)"

# Smoke test: the binary runs here and ignores an unknown phase (logging to stderr only).
tmpconf=$(mktemp)
trap 'rm -f "$tmpconf"' EXIT
echo "log=-" >"$tmpconf"
if ! FTVM_HOOK_CONF=$tmpconf "$binary" ftvm-install-check ftvm-install-check - - </dev/null 2>/dev/null; then
  die "$binary does not run correctly (it must exit 0 for an unknown phase)"
fi

mkdir -p "$HOOK_DIR"
if [ "$copy" -eq 1 ]; then
  install -m 0755 "$binary" "$HOOK.new"
  mv -f "$HOOK.new" "$HOOK"
  echo "installed a copy of $binary as $HOOK"
else
  ln -sfn "$binary" "$HOOK"
  echo "installed $HOOK -> $binary"
fi

if [ ! -e "$CONF" ]; then
  mkdir -p "$CONF_DIR"
  cat >"$CONF" <<'EOF'
# ftvm libvirt hook configuration (see ftctl(1)). key=value; '#' starts a comment.
# ftd's control socket:
control=/run/ftvm/ftd.sock
# ftd's state directory (the hook refuses to start a domain with STATE_DIR/failed-over/UUID):
state_dir=/var/lib/ftvm
# one line per hook decision ('-' = stderr):
log=/var/log/ftvm-hook.log
# how long the hook waits for ftd's answer (1..10000):
timeout_ms=300
# 1 = also log phases and domains the hook ignores:
debug=0
EOF
  chmod 0644 "$CONF"
  echo "created $CONF"
else
  echo "kept existing $CONF"
fi

echo
echo "libvirtd discovers hook scripts only when it starts: the hook is called after libvirtd restarts."
echo "(Running domains keep running across that restart; the hook's 'reconnect' phase reports the"
echo "protected ones to ftd.)"

under_systemd() {
  [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1 &&
    systemctl is-active --quiet libvirtd.service 2>/dev/null
}

libvirtd_pid() {
  local pid
  [ -r "$PIDFILE" ] || return 1
  pid=$(tr -dc '0-9' <"$PIDFILE")
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = libvirtd ] || return 1
  echo "$pid"
}

if [ -n "$DESTDIR" ]; then
  [ "$restart" -eq 0 ] || echo "DESTDIR is set: not restarting libvirtd"
  exit 0
fi

if [ "$restart" -eq 0 ]; then
  if under_systemd; then
    echo "Run: systemctl restart libvirtd"
  else
    echo "Run: kill \$(cat $PIDFILE) && libvirtd -d   (or rerun this script with --restart-libvirtd)"
  fi
  exit 0
fi

if under_systemd; then
  echo "libvirtd is managed by systemd; not restarting it behind systemd's back."
  echo "Run: systemctl restart libvirtd"
  exit 0
fi

if pid=$(libvirtd_pid); then
  echo "stopping libvirtd (pid $pid)"
  kill -TERM "$pid"
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && die "libvirtd (pid $pid) did not exit within 10 s; not starting another"
else
  echo "no running libvirtd found via $PIDFILE; starting one"
fi
command -v libvirtd >/dev/null 2>&1 || die "libvirtd not found on PATH"
libvirtd -d
for _ in $(seq 150); do
  if virsh -c qemu:///system version >/dev/null 2>&1; then
    echo "libvirtd restarted (pid $(libvirtd_pid || echo '?')); the hook is active"
    exit 0
  fi
  sleep 0.1
done
die "libvirtd started but 'virsh -c qemu:///system version' did not answer within 15 s; check its log"
