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
# Console lines: "INIT: ...", "FTVM-GUEST READY", "tick N", "WL BAD ..." (memory content wrong),
# "WL stat ...".
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
