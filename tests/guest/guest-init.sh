#!/bin/busybox sh
# /init of the ftvm Linux test guest (busybox only). Built into the initramfs by build-guest.sh.
#
# Kernel command line parameters (all optional):
#   ftvm_tick_ms=100        print "tick N" (N = 0,1,2,... kept in this shell's RAM) every interval
#   ftvm_dirty_kib_s=1024   rewrite tmpfs-backed guest memory at about this rate (0 = idle)
#   ftvm_wss_mib=16         size of that buffer (working set)
#   ftvm_ip=10.x.y.z/24     configure eth0 (if present) and run a TCP echo service on port 7000
#                           and a TCP counter service on port 7001 (each line -> total + 1)
#   ftvm_wl_report_s=0      if > 0, print "WL stat ..." every that many seconds
#   ftvm_wl_selftest=0      1: corrupt one chunk once, so "WL BAD" must appear (checks the check)
#   ftvm_disk=vdX           disk record writer: mount /dev/vdX (ext4, made by the host) on
#                           /mnt/disk and write numbered 4096-byte records to /mnt/disk/records:
#                           record i (1, 2, ...) at offset (i-1)*4096 = a 64-byte header line
#                           "REC <i> <md5 of body>" (space padded to 63 bytes + "\n") and a
#                           4032-byte body = "ftvm-record-<i>\n" repeated, cut at 4032 bytes
#                           (tests/e2e/disk_records.py checks them). The counter lives only in
#                           the writer's shell variables (guest RAM): a guest resumed from a
#                           checkpoint continues from what its memory says, and re-writing a
#                           record (dd conv=notrunc) is harmless. The writer never looks at what
#                           the file already holds.
#   ftvm_disk_sync_every=4  fsync after every that many records (dd conv=fsync of the last one),
#                           then print "DISK synced <i>" (i = last durable record)
#   ftvm_disk_rec_s=20      records per second, best effort (0 = as fast as possible)
#   ftvm_disk_bench=vdX     raw-disk benchmark (DESTROYS the disk's first 1+seq_mib MiB): rounds of
#                           (a) sync4k: ops x 4 KiB writes at 4 KiB offsets 0.., each one
#                               "dd bs=4096 count=1 oflag=direct conv=notrunc,fsync" (busybox dd
#                               has no oflag=dsync: fsync of the block device = write + flush;
#                               one dd process per op, see "DISKBENCH info exec_ms")
#                           (b) seq: one "dd bs=1M count=seq_mib seek=1 oflag=direct conv=fsync"
#                           timed from /proc/uptime (10 ms resolution), one line per round
#   ftvm_disk_bench_rounds=5  ftvm_disk_bench_sync_ops=256  ftvm_disk_bench_seq_mib=32
# Console commands (a line typed on the serial console; not echoed; always read):
#   disk-stop   the writer finishes its current record, syncs, unmounts /mnt/disk and prints
#               "DISK stopped last=<i>" (or "DISK umount failed ..."); "DISK not running" if no
#               writer runs
#   ping        prints "CMD pong" (checks the console input path); other lines: "CMD unknown: ..."
#   disk-bench vdX  runs the ftvm_disk_bench benchmark on /dev/vdX now (same output lines)
#   poweroff    the guest powers itself off (ACPI: QEMU reports SHUTDOWN with guest=true)
# Console lines: "INIT: ...", "FTVM-GUEST READY", "tick N", "WL BAD ..." (memory content wrong),
# "WL stat ...", "DISK mounted ...", "DISK synced <i>", "DISK stopped last=<i>", "DISK ... failed
# ...", "DISKBENCH round=<r> sync4k_ops=<n> sync4k_ms=<t> seq_mib=<m> seq_ms=<t>", "DISKBENCH done".
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec 0</dev/console 1>/dev/console 2>&1

ENVP=$(env | grep -c '^ftvm_')
# Unknown name=value kernel parameters reach init as environment variables; parse /proc/cmdline
# as well so the parameters also work when that path changes (only ftvm_[a-z0-9_]* names).
for w in $(cat /proc/cmdline); do
  case $w in
    ftvm_*=*)
      n=${w%%=*}
      case $n in *[!a-z0-9_]*) continue ;; esac
      export "$w" ;;
  esac
done
num() {  # num VALUE DEFAULT -> VALUE if it is a non-negative integer, else DEFAULT
  case $1 in ''|*[!0-9]*) echo "$2" ;; *) echo "$1" ;; esac
}
TICK_MS=$(num "$ftvm_tick_ms" 100); [ "$TICK_MS" -gt 0 ] || TICK_MS=100
DIRTY=$(num "$ftvm_dirty_kib_s" 1024)
WSS=$(num "$ftvm_wss_mib" 16); [ "$WSS" -gt 0 ] || WSS=1
REPORT=$(num "$ftvm_wl_report_s" 0)
echo "INIT: tick_ms=$TICK_MS dirty_kib_s=$DIRTY wss_mib=$WSS ip=${ftvm_ip:-none} ($ENVP ftvm_ params via env)"

# milliseconds since boot (10 ms resolution) from /proc/uptime, no fork
now_ms() {
  read _up _idle < /proc/uptime
  _ms=${_up%.*}${_up#*.}0
  _ms=${_ms#"${_ms%%[!0]*}"}
  NOW=${_ms:-0}
}

for m in $(cat /lib/modules/load-order 2>/dev/null); do
  insmod /lib/modules/$m.ko 2>/dev/null || echo "INIT: insmod $m failed"
done

# ---- network (only with a virtio-net device and ftvm_ip=) ----
has_virtio_net() {
  for d in /sys/bus/pci/devices/*; do
    [ -r $d/vendor ] || continue
    read v < $d/vendor; read p < $d/device
    [ "$v" = 0x1af4 ] && { [ "$p" = 0x1000 ] || [ "$p" = 0x1041 ]; } && return 0
  done
  return 1
}
ip link set lo up
if has_virtio_net; then
  i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do usleep 100000; i=$((i+1)); done
fi
if [ -e /sys/class/net/eth0 ] && [ -n "$ftvm_ip" ]; then
  ip addr add "$ftvm_ip" dev eth0 && ip link set eth0 up
  echo "INIT: eth0 $ftvm_ip mac $(cat /sys/class/net/eth0/address)"
  # TCP echo service: -ll keeps listening, -e runs one cat per connection
  nc -ll -p 7000 -e /bin/cat &
  # TCP counter service (output-commit tests): each line read adds 1 to the total kept in
  # /dev/shm (guest RAM) and answers the new total, so replies tell which guest state made them
  mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm
  cat > /bin/ftvm-counter <<'EOC'
#!/bin/sh
while read -r _l; do
  n=0; [ -r /dev/shm/count ] && read n < /dev/shm/count
  n=$((n + 1)); echo $n > /dev/shm/count; echo $n
done
EOC
  chmod +x /bin/ftvm-counter
  nc -ll -p 7001 -e /bin/ftvm-counter &
elif [ -e /sys/class/net/eth0 ]; then
  echo "INIT: eth0 present, no ftvm_ip= given: not configured"
fi
for b in /sys/block/vd*; do [ -e "$b" ] && echo "INIT: disk ${b##*/}"; done

# ---- memory workload ----
# The buffer is NCH files of CP pages each in a tmpfs (guest RAM). Every ~100 ms the loop
# rewrites whole chunks from /dev/urandom (dd conv=notrunc keeps the same page-cache pages),
# visiting chunks with a stride so consecutive writes land far apart. Rate control is
# credit-based on /proc/uptime, so the long-run rate is right even when a step runs late.
# Each chunk's md5 is recorded (in shell RAM) one step after it was written, and checked
# right before the chunk is overwritten: any page that does not hold what this guest wrote
# gives "WL BAD".
workload() {
  WL=/run/wl
  mkdir -p $WL
  mount -t tmpfs -o size=$((WSS + 1))m tmpfs $WL
  WSSP=$((WSS * 256))                       # buffer size in pages
  CP=$(( (DIRTY + 20) / 40 ))               # pages per 100 ms at the requested rate
  [ $CP -ge 1 ] || CP=1
  MAXCP=$((WSSP / 4)); [ $MAXCP -ge 1 ] || MAXCP=1
  [ $CP -le $MAXCP ] || CP=$MAXCP           # at least 4 chunks so writes spread out
  NCH=$((WSSP / CP)); [ $NCH -ge 1 ] || NCH=1
  # stride ~ 0.38 * NCH, coprime with NCH, so every chunk gets visited
  ST=$((NCH * 38 / 100)); [ $ST -ge 1 ] || ST=1
  while :; do
    a=$NCH; b=$ST; while [ $b -ne 0 ]; do t=$((a % b)); a=$b; b=$t; done
    [ $a -eq 1 ] && break
    ST=$((ST + 1))
  done
  echo "INIT: workload ${DIRTY} KiB/s, ${WSS} MiB in $NCH chunks of $CP pages"
  idx=0; prev=; written=0; chunks=0; bad=0
  now_ms; t0=$NOW; rep=$NOW
  while :; do
    now_ms
    due=$(( (NOW - t0) * DIRTY / 4000 - written ))     # pages owed
    if [ $due -gt $((DIRTY / 4 + CP * 2)) ]; then        # > ~1 s behind: forget the backlog
      t0=$NOW; written=0; due=$CP
    fi
    k=0; list=
    while [ $due -ge $CP ] || { [ $k -eq 0 ] && [ $due -gt 0 ] && [ $((due * 2)) -ge $CP ]; }; do
      list="$list $idx"; idx=$(( (idx + ST) % NCH )); k=$((k + 1)); due=$((due - CP))
    done
    if [ -n "$list$prev" ]; then
      files=
      for c in $prev $list; do [ -e $WL/c$c ] && files="$files $WL/c$c"; done
      if [ -n "$files" ]; then
        set -- $(md5sum $files)
        while [ $# -ge 2 ]; do
          c=${2##*/c}
          case " $prev " in
            *" $c "*) eval "s_$c=$1" ;;                       # record (written last step)
            *) eval "exp=\$s_$c"
               if [ -n "$exp" ] && [ "$exp" != "$1" ]; then
                 bad=$((bad + 1)); echo "WL BAD chunk=$c expected=$exp got=$1 chunks_written=$chunks"
               fi ;;
          esac
          shift 2
        done
      fi
      for c in $list; do
        dd if=/dev/urandom of=$WL/c$c bs=4096 count=$CP conv=notrunc 2>/dev/null
        written=$((written + CP)); chunks=$((chunks + 1))
      done
      prev=$list
      # ftvm_wl_selftest=1: corrupt the next chunk once (after it has a recorded sum) to prove
      # that "WL BAD" fires
      if [ "$ftvm_wl_selftest" = 1 ] && [ $chunks -ge $((NCH + 2)) ]; then
        eval "exp=\$s_$idx"
        if [ -n "$exp" ]; then
          echo "WL selftest: corrupting chunk $idx"
          echo corrupt | dd of=$WL/c$idx conv=notrunc 2>/dev/null; ftvm_wl_selftest=0
        fi
      fi
    fi
    if [ $REPORT -gt 0 ] && [ $((NOW - rep)) -ge $((REPORT * 1000)) ]; then
      echo "WL stat chunks_written=$chunks kib_written=$((chunks * CP * 4)) bad=$bad"
      rep=$NOW
    fi
    now_ms; t=$((100 - (NOW % 100)))
    usleep $((t * 1000))
  done
}
if [ "$DIRTY" -gt 0 ]; then
  workload &
  renice -n 10 -p $! >/dev/null 2>&1
fi

# ---- disk: record writer (ftvm_disk=), benchmark (ftvm_disk_bench=), console commands ----
DISK_SYNC=$(num "$ftvm_disk_sync_every" 4); [ "$DISK_SYNC" -gt 0 ] || DISK_SYNC=4
DISK_RATE=$(num "$ftvm_disk_rec_s" 20)
DISK_RUN=/run/ftvm-disk            # flags and scratch files: initramfs, i.e. guest RAM
mkdir -p $DISK_RUN
wait_blk() {  # wait_blk vdX: up to 5 s for /dev/vdX
  _i=0; while [ ! -b /dev/$1 ] && [ $_i -lt 50 ]; do usleep 100000; _i=$((_i + 1)); done
  [ -b /dev/$1 ]
}
disk_writer() {
  dev=$1; D=/mnt/disk; R=$DISK_RUN
  mkdir -p $D
  echo starting > $R/state
  if ! wait_blk "$dev"; then echo "DISK failed: no /dev/$dev"; echo failed > $R/state; return 1; fi
  if ! out=$(mount -t ext4 /dev/$dev $D 2>&1); then
    echo "DISK mount failed /dev/$dev: $out"; echo failed > $R/state; return 1
  fi
  echo running > $R/state
  echo "DISK mounted /dev/$dev on $D sync_every=$DISK_SYNC rec_s=$DISK_RATE"
  i=0; synced=0; cnt=0
  now_ms; t0=$NOW
  while [ ! -e $R/stop ]; do
    if [ "$DISK_RATE" -gt 0 ]; then          # record cnt is due at t0 + cnt/RATE s
      now_ms; w=$((t0 + cnt * 1000 / DISK_RATE - NOW))
      if [ $w -gt 0 ]; then usleep $((w * 1000)); continue
      elif [ $w -lt -1000 ]; then t0=$NOW; cnt=0   # > 1 s behind (e.g. paused): no burst
      fi
    fi
    i=$((i + 1)); cnt=$((cnt + 1))
    b="ftvm-record-$i
"
    while [ ${#b} -lt 4032 ]; do b=$b$b; done
    b=${b:0:4032}
    printf '%s' "$b" > $R/body
    md5sum $R/body > $R/sum; read m _ < $R/sum
    printf '%-63s\n%s' "REC $i $m" "$b" > $R/rec
    if [ $((i % DISK_SYNC)) -eq 0 ]; then conv=notrunc,fsync; else conv=notrunc; fi
    if ! dd if=$R/rec of=$D/records bs=4096 count=1 seek=$((i - 1)) conv=$conv 2>$R/err; then
      echo "DISK write failed rec=$i: $(cat $R/err)"
      i=$((i - 1))
      while [ ! -e $R/stop ]; do usleep 100000; done    # keep mounted until disk-stop
      break
    fi
    if [ $((i % DISK_SYNC)) -eq 0 ]; then synced=$i; echo "DISK synced $i"; fi
  done
  # disk-stop: the current record is complete; make everything durable, unmount
  if sync && [ $synced -lt $i ]; then synced=$i; echo "DISK synced $i"; fi
  if out=$(umount $D 2>&1); then echo "DISK stopped last=$synced"
  else echo "DISK umount failed last=$synced: $out"
  fi
  echo stopped > $R/state
}
disk_bench() {
  dev=$1
  rounds=$(num "$ftvm_disk_bench_rounds" 5)
  ops=$(num "$ftvm_disk_bench_sync_ops" 256)
  seqm=$(num "$ftvm_disk_bench_seq_mib" 32)
  if ! wait_blk "$dev"; then echo "DISKBENCH failed: no /dev/$dev"; return 1; fi
  size=$(blockdev --getsize64 /dev/$dev)
  if [ "$size" -lt $(( (seqm + 1) * 1048576 )) ]; then
    echo "DISKBENCH failed: /dev/$dev has $size bytes, needs $((seqm + 1)) MiB"; return 1
  fi
  # cost of starting one dd (what a sync4k op pays besides the I/O): ops x dd to /dev/null
  now_ms; a=$NOW; k=0
  while [ $k -lt $ops ]; do dd if=/dev/zero of=/dev/null bs=4096 count=1 2>/dev/null; k=$((k + 1)); done
  now_ms
  echo "DISKBENCH info dev=/dev/$dev size=$size rounds=$rounds exec_ms=$((NOW - a)) (for $ops x dd to /dev/null)"
  r=1
  while [ $r -le $rounds ]; do
    now_ms; a=$NOW; k=0; err=0
    while [ $k -lt $ops ]; do
      dd if=/dev/zero of=/dev/$dev bs=4096 count=1 seek=$k oflag=direct conv=notrunc,fsync 2>/dev/null || err=$((err + 1))
      k=$((k + 1))
    done
    now_ms; b=$NOW
    dd if=/dev/zero of=/dev/$dev bs=1M count=$seqm seek=1 oflag=direct conv=notrunc,fsync 2>/dev/null || err=$((err + 1))
    now_ms; c=$NOW
    [ $err -eq 0 ] || echo "DISKBENCH error round=$r failed_dd=$err"
    echo "DISKBENCH round=$r sync4k_ops=$ops sync4k_ms=$((b - a)) seq_mib=$seqm seq_ms=$((c - b))"
    r=$((r + 1))
  done
  echo "DISKBENCH done"
}
# Console command reader: a background job reading /dev/console lines, so the tick loop below
# never waits for input. It only raises flags (files in guest RAM); the writer acts on them.
cmd_reader() {
  stty -echo 2>/dev/null         # typed commands must not show up inside the console output
  while read -r line; do
    case $line in
      disk-stop)
        st=; [ -r $DISK_RUN/state ] && read st < $DISK_RUN/state
        case $st in running|starting) : > $DISK_RUN/stop ;; *) echo "DISK not running" ;; esac ;;
      ping) echo "CMD pong" ;;
      "disk-bench "*) disk_bench "${line#disk-bench }" & ;;
      poweroff) echo "CMD powering off"; sync; poweroff -f ;;
      '') ;;
      *) echo "CMD unknown: $line" ;;
    esac
  done
}
[ -n "$ftvm_disk" ] && disk_writer "${ftvm_disk#/dev/}" &
[ -n "$ftvm_disk_bench" ] && disk_bench "${ftvm_disk_bench#/dev/}" &
cmd_reader < /dev/console &

echo "FTVM-GUEST READY"
n=0
now_ms; next=$NOW
while :; do
  echo "tick $n"
  n=$((n + 1))
  next=$((next + TICK_MS))
  now_ms
  d=$((next - NOW))
  if [ $d -gt 0 ]; then usleep $((d * 1000))
  elif [ $d -lt $((0 - TICK_MS)) ]; then next=$NOW      # far behind (e.g. paused): no burst
  fi
done
