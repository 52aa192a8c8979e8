#!/bin/bash
# Builds the base of the RDMA test lab: a busybox initramfs for Debian's generic kernel with
# Soft-RoCE (rdma_rxe + the RDMA core/CM modules, dummy and virtio-net) and rdma-core userspace
# (libibverbs with the rxe provider, librdmacm, the `rdma` tool, ibv_*/rping tools).
# tests/rdma-lab/lab.sh appends the files of one run and boots it.
#
# Usage: tests/rdma-lab/build-lab.sh [-g GUESTDIR] OUTDIR
#   -g GUESTDIR  the test guest built by tests/guest/build-guest.sh (default: OUTDIR/../guest);
#                its vmlinux and its cached kernel .deb (GUESTDIR/pkgs) are reused, and
#                build-guest.sh is run first when they are missing (nothing is downloaded twice)
# Writes:
#   OUTDIR/base.cpio.gz   the lab initramfs base (/init = tests/rdma-lab/lab-init.sh)
#   OUTDIR/vmlinux        symlink to GUESTDIR/vmlinux (boot with PVH: -machine q35 -kernel)
#   OUTDIR/kernel-version "PKG VERSION KVER" of the kernel the modules belong to
#   OUTDIR/stamp          inputs of the last successful build: skipped when unchanged
# Environment: FTVM_RDMA_LAB_FORCE=1 rebuilds even when the stamp matches.
# Needs: rdma-core userspace on the host (scripts/install-deps.sh), /bin/busybox (static),
#        dpkg-deb, tar, cpio, gzip, objcopy (binutils), ldd.
set -euo pipefail

log() { echo "build-lab: $*" >&2; }
die() { echo "build-lab: error: $*" >&2; exit 1; }
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
GUEST=""
while getopts "g:h" o; do
  case $o in
    g) GUEST=$OPTARG ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ $# -eq 1 ]] || usage
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
GUEST=${GUEST:-$(dirname "$OUT")/guest}
INIT=$HERE/lab-init.sh
[[ -f $INIT ]] || die "missing $INIT"

# Modules wanted in the guest (dependencies are added and ordered from each module's .modinfo;
# busybox insmod resolves nothing itself). crc32_generic is a crypto-API soft dependency of rxe.
WANT_MODULES="crc32_generic configfs udp_tunnel ip6_udp_tunnel ib_core ib_uverbs rdma_rxe iw_cm ib_cm
rdma_cm rdma_ucm dummy virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
failover net_failover virtio_net"
# Host userspace: required tools, then optional diagnostics (present when ibverbs-utils /
# rdmacm-utils / perftest are installed). iproute2's ip is added because busybox's cannot add
# dummy/veth links with every option; scripts in the guest must call it as /usr/bin/ip.
REQUIRED_BINS="rdma ip"
OPTIONAL_BINS="ibv_devices ibv_devinfo ibv_rc_pingpong ibv_ud_pingpong rping ucmatose udaddy
ib_write_bw ib_write_lat ib_read_bw ib_send_bw ib_send_lat"

# ---- the kernel: reuse the test guest's vmlinux and .deb ----
guest_deb() {  # prints the cached kernel .deb of GUEST, or nothing
  local pkg ver kver deb
  [[ -s $GUEST/vmlinux && -s $GUEST/kernel-version ]] || return 0
  read -r pkg ver kver < "$GUEST/kernel-version" || return 0
  deb="$GUEST/pkgs/${pkg}_${ver//:/%3a}_amd64.deb"
  [[ -s $deb ]] && echo "$deb"
  return 0
}
deb=$(guest_deb)
if [[ -z $deb ]]; then
  log "no test guest kernel in $GUEST; + tests/guest/build-guest.sh $GUEST"
  "$REPO/tests/guest/build-guest.sh" "$GUEST" || die "tests/guest/build-guest.sh $GUEST failed"
  deb=$(guest_deb)
  [[ -n $deb ]] || die "$GUEST has no vmlinux/kernel-version/pkgs/*.deb after build-guest.sh"
fi
read -r kpkg kverpkg kver < "$GUEST/kernel-version"

# ---- host userspace ----
provider=$(ls -1 /usr/lib/*-linux-gnu/libibverbs/librxe-rdmav*.so 2>/dev/null | head -1 || true)
[[ -n $provider && -f /etc/libibverbs.d/rxe.driver ]] || \
  die "no rxe verbs provider on this host: install rdma-core (scripts/install-deps.sh)"
libdir=$(dirname "$(dirname "$provider")")
for l in libibverbs.so.1 librdmacm.so.1 libgcc_s.so.1; do
  [[ -e $libdir/$l ]] || die "missing $libdir/$l: install rdma-core (scripts/install-deps.sh)"
done
bin_path() {  # iproute2's ip/rdma live in /usr/bin or /usr/sbin (or /bin, /sbin before merged-usr)
  local d
  for d in /usr/bin /usr/sbin /bin /sbin; do
    if [[ -x $d/$1 && "$(readlink -f "$d/$1")" != */busybox ]]; then echo "$d/$1"; return 0; fi
  done
  return 1
}
bins=()
for b in $REQUIRED_BINS; do
  p=$(bin_path "$b") || die "missing host tool '$b' (iproute2; scripts/install-deps.sh)"
  bins+=("$p")
done
for b in $OPTIONAL_BINS; do p=$(bin_path "$b") && bins+=("$p"); done
[[ -x /bin/busybox ]] || die "/bin/busybox missing (apt-get install busybox-static)"
if readelf -l /bin/busybox 2>/dev/null | grep -q 'program interpreter'; then
  die "/bin/busybox is dynamically linked; install busybox-static"
fi
command -v objcopy >/dev/null || die "objcopy missing (binutils)"

# ---- cache ----
h() { sha256sum "$@" | cut -c1-16; }
pkgvers=$(dpkg-query -W -f='${Package}=${Version} ' libibverbs1 librdmacm1 ibverbs-providers iproute2 \
          busybox-static 2>/dev/null || true)
stamp="kernel=$kpkg/$kverpkg/$kver deb=$(basename "$deb") vmlinux=$(stat -c %s.%Y "$GUEST/vmlinux")"
stamp+=" init=$(h "$INIT") builder=$(h "${BASH_SOURCE[0]}") busybox=$(h /bin/busybox) pkgs=[$pkgvers]"
stamp+=" bins=[$(basename -a "${bins[@]}" | tr '\n' ' ')]"
if [[ ${FTVM_RDMA_LAB_FORCE:-0} != 1 && -s $OUT/base.cpio.gz && -e $OUT/vmlinux && -f $OUT/stamp \
      && "$(cat "$OUT/stamp")" == "$stamp" ]]; then
  log "up to date ($kver) in $OUT"
  exit 0
fi
log "building lab base: kernel $kpkg $kverpkg, $provider -> $OUT"

WORK=$(mktemp -d "$OUT/work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
X=$WORK/kernel S=$WORK/stage
mkdir -p "$X" "$S"

# ---- kernel modules: extract the wanted ones, then their dependencies, from the .deb ----
extract() {  # module names...
  local pats=() m
  for m in "$@"; do pats+=("./lib/modules/*/$m.ko" "./lib/modules/*/$m.ko.*"); done
  log "+ dpkg-deb --fsys-tarfile $(basename "$deb") | tar -x ($*)"
  # tar exits non-zero when a pattern matches nothing (module built in): checked below
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$X" --wildcards './lib/modules/*/modules.builtin' \
    "${pats[@]}" 2>/dev/null || true
}
modfile() { find "$X/lib/modules" -name "$1.ko" -o -name "$1.ko.*" 2>/dev/null | head -1; }
builtin() { grep -q "/$1.ko\$" "$X/lib/modules/$kver/modules.builtin" 2>/dev/null; }
mkdir -p "$S/usr/lib/modules/$kver"
unpack_mod() {  # name -> plain .ko in the stage
  local f; f=$(modfile "$1"); local dst="$S/usr/lib/modules/$kver/$1.ko"
  case $f in
    *.ko) cp "$f" "$dst" ;;
    *.ko.xz) xz -dc "$f" > "$dst" ;;
    *.ko.zst) zstd -dcq "$f" > "$dst" ;;
    *.ko.gz) gzip -dc "$f" > "$dst" ;;
    *) die "unknown module compression: $f" ;;
  esac
}
deps_of() {  # name -> its depends= from .modinfo (module names use '_' and '-' interchangeably)
  objcopy -O binary --only-section=.modinfo "$S/usr/lib/modules/$kver/$1.ko" /dev/stdout 2>/dev/null \
    | tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' '\n' | tr '-' '_' | grep -v '^$' || true
}
declare -A have=() state=()
read -r -a todo <<< "$(echo $WANT_MODULES)"
for _pass in 1 2 3 4 5; do
  ((${#todo[@]})) || break
  extract "${todo[@]}"
  next=()
  for m in "${todo[@]}"; do
    [[ -n ${have[$m]:-} ]] && continue
    if [[ -n $(modfile "$m") ]]; then
      unpack_mod "$m"; have[$m]=module
      for d in $(deps_of "$m"); do [[ -n ${have[$d]:-} ]] || next+=("$d"); done
    elif builtin "$m"; then
      have[$m]=builtin
    else
      die "module $m is neither in $(basename "$deb") nor built into $kver"
    fi
  done
  mapfile -t todo < <(printf '%s\n' "${next[@]}" | grep -v '^$' | sort -u)
done
((${#todo[@]} == 0)) || die "module dependencies do not converge: ${todo[*]}"
order=()
visit() {  # depth-first: dependencies before dependants
  local m=$1 d
  [[ ${have[$m]} == module ]] || return 0
  [[ ${state[$m]:-} == "done" ]] && return 0
  [[ ${state[$m]:-} == busy ]] && die "module dependency cycle at $m"
  state[$m]=busy
  for d in $(deps_of "$m"); do visit "$d"; done
  state[$m]="done"; order+=("$m")
}
for m in $WANT_MODULES; do visit "$m"; done
printf '%s\n' "${order[@]}" > "$S/usr/lib/modules/$kver/load-order"
log "modules (load order): ${order[*]}"

# ---- userspace ----
mkdir -p "$S"/usr/{bin,sbin,lib,lib64} "$S"/{proc,sys,dev,tmp,run,root,lab,etc/libibverbs.d}
ln -s usr/bin "$S/bin"; ln -s usr/sbin "$S/sbin"; ln -s usr/lib "$S/lib"; ln -s usr/lib64 "$S/lib64"
cp /bin/busybox "$S/usr/bin/busybox"
for a in $(/bin/busybox --list); do
  [[ -e $S/usr/bin/$a ]] || ln -s busybox "$S/usr/bin/$a"
done
mknod -m 600 "$S/dev/console" c 5 1 2>/dev/null || true
put() {  # host file -> same canonical (merged-/usr) path in the stage, dereferenced
  local dst; dst="$(readlink -f "$(dirname "$1")")/$(basename "$1")"
  [[ -e $S$dst ]] && return 0
  mkdir -p "$S$(dirname "$dst")"
  cp -L "$1" "$S$dst"
}
put_elf() {  # ELF + every shared library ldd reports
  local libs
  put "$1"
  libs=$(ldd "$1" 2>/dev/null | awk '/=> \//{print $3} /^\t\/[^ ]+ \(/{print $1}') \
    || die "ldd $1 failed"
  for l in $libs; do put "$l"; done
}
for b in "${bins[@]}"; do
  rm -f "$S/usr/bin/$(basename "$b")"   # replace the busybox applet link (ip)
  put_elf "$b"
  [[ -e $S/usr/bin/$(basename "$b") ]] || ln -s "$(readlink -f "$(dirname "$b")")/$(basename "$b")" \
    "$S/usr/bin/$(basename "$b")"
done
put_elf "$provider"
put_elf "$libdir/libibverbs.so.1"
put_elf "$libdir/librdmacm.so.1"
put_elf "$libdir/libgcc_s.so.1"   # dlopen()ed by glibc for thread exit/cancellation: ldd misses it
cp /etc/libibverbs.d/rxe.driver "$S/etc/libibverbs.d/"
echo "root:x:0:0:root:/root:/bin/sh" > "$S/etc/passwd"
echo "root:x:0:" > "$S/etc/group"
printf '127.0.0.1 localhost\n' > "$S/etc/hosts"
echo "$kpkg $kverpkg $kver" > "$S/etc/ftvm-lab-kernel"
install -m 0755 "$INIT" "$S/init"

( cd "$S" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0 ) \
  | gzip -1 -n > "$OUT/base.cpio.gz.tmp"
mv "$OUT/base.cpio.gz.tmp" "$OUT/base.cpio.gz"
ln -sfn "$GUEST/vmlinux" "$OUT/vmlinux"
echo "$kpkg $kverpkg $kver" > "$OUT/kernel-version"
echo "$stamp" > "$OUT/stamp"
log "done: $OUT/base.cpio.gz ($(du -h "$OUT/base.cpio.gz" | cut -f1)), kernel $kver"
