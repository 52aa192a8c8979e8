#!/bin/bash
# Installs every Debian package ftvm needs to build and test (Debian 12 "bookworm").
# Idempotent and fast: when all packages are already installed it does not touch apt at all.
# Usage: sudo scripts/install-deps.sh [--dry-run]
#   --dry-run   only report which packages are missing (exit 1 if any), install nothing
# Environment: FTVM_APT_MAX_AGE_S (default 86400) - refresh apt lists older than this.
set -euo pipefail

PACKAGES=(
  # toolchain
  build-essential cmake ninja-build pkg-config g++
  # libraries
  libfmt-dev nlohmann-json3-dev libcli11-dev catch2 libxxhash-dev
  # replication authentication and encryption (transport/auth.h)
  libsodium-dev
  # QEMU and the Linux test guest (tests/guest/build-guest.sh)
  qemu-system-x86 qemu-utils busybox-static cpio xz-utils zstd gzip
  # RDMA transport (transport/rdma/) and its Soft-RoCE test lab (tests/rdma-lab/)
  rdma-core libibverbs-dev librdmacm-dev ibverbs-providers rdmacm-utils ibverbs-utils
  # libvirt glue (vmm-glue/libvirt*): libvirt API, QEMU driver, domain XML via libxml2
  libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev python3-libvirt libxml2-dev
  # test tooling
  iproute2 iptables python3 procps util-linux e2fsprogs
  # fuzzing (tests/fuzz/, scripts/test.sh): clang with libFuzzer and the sanitizer runtimes
  clang libclang-rt-dev
  # output-commit tests and bench/net_bench.py (capture on the test bridge, ping RTT)
  tcpdump iputils-ping
  # corosync quorum arbiter (tools/ftd/arbiter/corosync.*) and its lab (tests/cluster/corosync-lab.sh)
  libquorum-dev libvotequorum-dev libcmap-dev corosync corosync-qdevice corosync-qnetd
  # sanlock lease arbiter (tools/ftd/arbiter/sanlock.*) and its tests (tests/cluster/test_sanlock_arbiter.py)
  sanlock libsanlock-dev
)

dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
  "") ;;
  *) echo "install-deps: unknown argument '$1'" >&2; exit 2 ;;
esac

missing=()
for p in "${PACKAGES[@]}"; do
  st=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
  [[ "$st" == ii* ]] || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#PACKAGES[@]} packages already installed"
  exit 0
fi
echo "install-deps: missing: ${missing[*]}"
if ((dry_run)); then exit 1; fi

if [[ $(id -u) -ne 0 ]]; then
  echo "install-deps: must run as root to install packages" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive

# apt-get update only when the lists are stale/absent or apt does not know a missing package.
need_update=0
max_age=${FTVM_APT_MAX_AGE_S:-86400}
newest=$(find /var/lib/apt/lists -maxdepth 1 -type f -name '*_Packages*' -printf '%T@\n' 2>/dev/null \
         | sort -n | tail -1 | cut -d. -f1)
if [[ -z "$newest" ]]; then
  echo "install-deps: no apt package lists"; need_update=1
elif (( $(date +%s) - newest > max_age )); then
  echo "install-deps: apt package lists older than ${max_age}s"; need_update=1
else
  for p in "${missing[@]}"; do
    if [[ -z "$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ && $2 != "(none)" {print $2}')" ]]; then
      echo "install-deps: apt does not know $p"; need_update=1; break
    fi
  done
fi
if ((need_update)); then
  echo "install-deps: + apt-get update"
  apt-get update
fi

echo "install-deps: + apt-get install -y --no-install-recommends ${missing[*]}"
apt-get install -y --no-install-recommends "${missing[@]}"
echo "install-deps: done"
