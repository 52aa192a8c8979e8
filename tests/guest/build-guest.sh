#!/bin/bash
# Builds the Linux test guest from Debian packages:
#   OUTDIR/vmlinux            uncompressed ELF kernel (boots via PVH: qemu -machine q35 -kernel vmlinux)
#   OUTDIR/initramfs.cpio.gz  static busybox + virtio (net, blk) and ext4 modules +
#                             tests/guest/guest-init.sh as /init
#   OUTDIR/kernel-version     e.g. "linux-image-6.1.0-56-amd64 6.1.192-2 6.1.0-56-amd64"
#   OUTDIR/stamp              inputs of the last successful build (skip when unchanged)
# Usage: tests/guest/build-guest.sh OUTDIR
# Environment:
#   FTVM_KERNEL_PKG   kernel package to use (default: what linux-image-amd64 depends on)
#   FTVM_GUEST_FORCE=1  rebuild even when the stamp matches
# Needs: apt-get/apt-cache (downloads need the Debian archive once; the .deb is kept in
# OUTDIR/pkgs), dpkg-deb, tar, xz/zstd/gzip, cpio, /bin/busybox (busybox-static).
set -euo pipefail

log() { echo "build-guest: $*" >&2; }
die() { echo "build-guest: error: $*" >&2; exit 1; }

[[ $# -eq 1 ]] || { sed -n '2,13p' "$0" >&2; exit 2; }
OUT=$1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
INIT=$HERE/guest-init.sh
[[ -f $INIT ]] || die "missing $INIT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# Load order matters (insmod does not resolve dependencies): every module after what it needs.
# ext4 (6.1, from modinfo): depends=jbd2,mbcache,crc16, softdep pre: crypto-crc32c (metadata_csum,
# provided by crc32c_generic); jbd2: softdep pre: crypto-crc32c; libcrc32c: softdep pre: crc32c.
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net virtio_blk"
MODULES="$MODULES crc16 crc32c_generic libcrc32c mbcache jbd2 ext4"

# ---- resolve the kernel package (generic amd64 flavour, never -cloud-) ----
resolve_pkg() {
  apt-cache depends linux-image-amd64 2>/dev/null \
    | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ && $2 !~ /cloud/ {print $2; exit}'
}
pkg=${FTVM_KERNEL_PKG:-}
if [[ -z $pkg ]]; then
  pkg=$(resolve_pkg)
  if [[ -z $pkg ]]; then
    log "apt-cache knows no linux-image-amd64; + apt-get update"
    apt-get update >&2 || die "apt-get update failed"
    pkg=$(resolve_pkg)
  fi
  [[ -n $pkg ]] || die "cannot resolve linux-image-amd64 to a kernel package"
fi
[[ $pkg != *cloud* ]] || die "refusing cloud kernel $pkg (no virtio-pci legacy/PVH test coverage)"
ver=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
if [[ -z $ver || $ver == "(none)" ]]; then
  # offline / no lists: fall back to a .deb we downloaded earlier
  deb=$(ls -1 "$OUT"/pkgs/"${pkg}"_*_amd64.deb 2>/dev/null | sort -V | tail -1 || true)
  [[ -n $deb ]] || die "apt has no candidate for $pkg and no cached .deb in $OUT/pkgs"
  ver=$(dpkg-deb -f "$deb" Version)
fi

init_hash=$(sha256sum "$INIT" | cut -c1-16)
self_hash=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)
stamp="pkg=$pkg version=$ver init=$init_hash builder=$self_hash busybox=$(sha256sum /bin/busybox | cut -c1-16)"
if [[ ${FTVM_GUEST_FORCE:-0} != 1 && -s $OUT/vmlinux && -s $OUT/initramfs.cpio.gz && -f $OUT/stamp \
      && "$(cat "$OUT/stamp")" == "$stamp" ]]; then
  log "up to date ($pkg $ver) in $OUT"
  exit 0
fi
log "building guest: $pkg $ver -> $OUT"

# ---- download ----
mkdir -p "$OUT/pkgs"
debname="${pkg}_$(echo "$ver" | sed 's/:/%3a/')_amd64.deb"
deb=$OUT/pkgs/$debname
if [[ ! -s $deb ]]; then
  log "+ apt-get download $pkg=$ver"
  # apt's _apt sandbox user cannot write into arbitrary dirs: download to a temp dir we chmod
  tmpdl=$(mktemp -d "$OUT/pkgs/dl.XXXXXX")
  chmod 0777 "$tmpdl"
  ( cd "$tmpdl" && apt-get download -q "$pkg=$ver" >&2 ) || { rm -rf "$tmpdl"; die "apt-get download $pkg=$ver failed"; }
  f=$(ls -1 "$tmpdl"/*.deb | head -1)
  mv "$f" "$deb"
  rm -rf "$tmpdl"
fi
dpkg-deb -f "$deb" Package | grep -qx "$pkg" || die "$deb is not $pkg"

# ---- extract only what we need (the full package is ~400 MB unpacked) ----
X=$OUT/kernel-pkg
rm -rf "$X"; mkdir -p "$X"
pats=('./boot/vmlinuz-*' './boot/config-*' './lib/modules/*/modules.builtin')
for m in $MODULES; do pats+=("./lib/modules/*/$m.ko" "./lib/modules/*/$m.ko.*"); done
log "+ dpkg-deb --fsys-tarfile $debname | tar -x (vmlinuz + modules)"
# tar exits non-zero when a pattern matches nothing (module built in): that is fine
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$X" --wildcards "${pats[@]}" 2>/dev/null || true
vmlinuz=$(ls -1 "$X"/boot/vmlinuz-* 2>/dev/null | head -1)
[[ -n $vmlinuz ]] || die "no /boot/vmlinuz-* in $deb"
kver=${vmlinuz##*/vmlinuz-}

# ---- vmlinuz -> ELF vmlinux (like linux/scripts/extract-vmlinux) ----
is_elf() { [[ "$(head -c 4 "$1" | od -An -tx1 | tr -d ' \n')" == 7f454c46 ]]; }
try_decompress() {  # $1 = grep -P magic, $2 = decompressor command
  local magic=$1 cmd=$2 off
  for off in $(LC_ALL=C grep -obUaP "$magic" "$vmlinuz" | cut -d: -f1); do
    # decompressors complain about the trailing data after the stream: ignore rc, check ELF
    tail -c +$((off + 1)) "$vmlinuz" | $cmd > "$OUT/vmlinux.tmp" 2>/dev/null || true
    if [[ -s $OUT/vmlinux.tmp ]] && is_elf "$OUT/vmlinux.tmp"; then
      log "vmlinuz: $cmd stream at offset $off"
      return 0
    fi
  done
  return 1
}
rm -f "$OUT/vmlinux.tmp"
if is_elf "$vmlinuz"; then cp "$vmlinuz" "$OUT/vmlinux.tmp"
elif try_decompress '\x{fd}7zXZ\x00' 'xz -dc'; then :
elif try_decompress '\x{28}\x{b5}\x{2f}\x{fd}' 'zstd -dcq'; then :
elif try_decompress '\x{1f}\x{8b}\x{08}' 'gzip -dc'; then :
elif try_decompress '\x{5d}\x00\x00\x00' 'xz -dc --format=lzma'; then :
elif try_decompress 'BZh' 'bzip2 -dc'; then :
else die "cannot find a compressed ELF kernel in $vmlinuz"
fi
grep -q '^CONFIG_PVH=y' "$X/boot/config-$kver" 2>/dev/null || \
  log "warning: could not confirm CONFIG_PVH=y; -kernel vmlinux may not boot"
mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"

# ---- initramfs ----
S=$OUT/initramfs-stage
rm -rf "$S"; mkdir -p "$S"/{bin,sbin,usr/bin,usr/sbin,lib/modules,dev,proc,sys,tmp,run}
[[ -x /bin/busybox ]] || die "/bin/busybox missing (apt-get install busybox-static)"
if command -v readelf >/dev/null && readelf -l /bin/busybox | grep -q 'program interpreter'; then
  die "/bin/busybox is dynamically linked; install busybox-static"
fi
cp /bin/busybox "$S/bin/busybox"
ln -s busybox "$S/bin/sh"
# console node so the kernel can open /dev/console before devtmpfs is mounted (needs root)
mknod -m 600 "$S/dev/console" c 5 1 2>/dev/null || true
: > "$S/lib/modules/load-order"
for m in $MODULES; do
  f=$(find "$X/lib/modules" -name "$m.ko" -o -name "$m.ko.*" 2>/dev/null | head -1)
  if [[ -z $f ]]; then
    if grep -q "/$m.ko" "$X/lib/modules/$kver/modules.builtin" 2>/dev/null; then log "module $m: built in"
    else log "module $m: not in package (assuming built in)"; fi
    continue
  fi
  case $f in
    *.ko) cp "$f" "$S/lib/modules/$m.ko" ;;
    *.ko.xz) xz -dc "$f" > "$S/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -dcq "$f" > "$S/lib/modules/$m.ko" ;;
    *.ko.gz) gzip -dc "$f" > "$S/lib/modules/$m.ko" ;;
    *) die "unknown module compression: $f" ;;
  esac
  echo "$m" >> "$S/lib/modules/load-order"
done
install -m 0755 "$INIT" "$S/init"
mkdir -p "$S/etc"; echo "$pkg $ver $kver" > "$S/etc/ftvm-guest-kernel"
( cd "$S" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0 ) | gzip -1 -n > "$OUT/initramfs.cpio.gz.tmp"
mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
rm -rf "$S" "$X"

echo "$pkg $ver $kver" > "$OUT/kernel-version"
echo "$stamp" > "$OUT/stamp"
log "done: $OUT/vmlinux ($(stat -c %s "$OUT/vmlinux") bytes), $OUT/initramfs.cpio.gz ($(stat -c %s "$OUT/initramfs.cpio.gz") bytes), kernel $pkg $ver"
