#!/bin/bash
# Guest side of tests/vm/tcmu-bench.sh: the same load through three LIO
# backstores in one VM, one after the other, with the guest's kernel
# initiator on 127.0.0.1:3260:
#   fileio  LIO's in-kernel file backstore (baseline)
#   mirror  user:mirror served by lunmirror (HANDLER_BIN)
#   qcow    user:qcow served by tcmu-runner's qcow handler on a raw image
# Load: dd of SIZE_MB MiB, bs=BS, O_DIRECT, write then read, ROUNDS times
# (best of). Results: $VM_SHARE/bench.txt ("<backstore> write|read MB/s").
set -u
BIN=${1:?usage: guest-bench.sh HANDLER_BIN}
S=${VM_SHARE:?run inside run-vm}
C=/sys/kernel/config/target
IQN=iqn.2003-01.org.linux-iscsi.vmguest:bench
SIZE_MB=${SIZE_MB:-64}
BS=${BS:-1M}
ROUNDS=${ROUNDS:-2}
if mountpoint -q /scratch; then D=/scratch; else D=/var/tmp; fi
ts() { awk '{print $1}' /proc/uptime; }
step() { echo "[guest $(ts)s] $*"; }
: > "$S/bench.txt"
mkdir -p /run/lock/iscsi /var/lib/iscsi /etc/iscsi/nodes /etc/iscsi/send_targets /run/dbus
grep -q '^InitiatorName=' /etc/iscsi/initiatorname.iscsi 2>/dev/null || echo "InitiatorName=$(iscsi-iname)" > /etc/iscsi/initiatorname.iscsi
iscsid
dbus-daemon --system --fork --nopidfile

export_dev() {  # $1 = configfs device dir
  mkdir -p $C/iscsi/$IQN/tpgt_1/lun/lun_0
  ln -s "$1" $C/iscsi/$IQN/tpgt_1/lun/lun_0/dev
  mkdir -p $C/iscsi/$IQN/tpgt_1/np/127.0.0.1:3260
  for a in generate_node_acls=1 cache_dynamic_acls=1 authentication=0 demo_mode_write_protect=0; do
    echo -n ${a#*=} > $C/iscsi/$IQN/tpgt_1/attrib/${a%=*}
  done
  echo -n 1 > $C/iscsi/$IQN/tpgt_1/enable
}
unexport() {
  echo -n 0 > $C/iscsi/$IQN/tpgt_1/enable
  rmdir $C/iscsi/$IQN/tpgt_1/np/127.0.0.1:3260
  rm $C/iscsi/$IQN/tpgt_1/lun/lun_0/dev
  rmdir $C/iscsi/$IQN/tpgt_1/lun/lun_0 $C/iscsi/$IQN/tpgt_1 $C/iscsi/$IQN
}
login() {
  iscsiadm -m discovery -t sendtargets -p 127.0.0.1:3260 >/dev/null || return 1
  iscsiadm -m node -T $IQN -p 127.0.0.1:3260 --login >/dev/null || return 1
  for _ in $(seq 1 100); do
    DEV=$(iscsiadm -m session -P3 2>/dev/null | awk '/Attached scsi disk/{print $4; exit}')
    [ -n "$DEV" ] && [ -b /dev/$DEV ] && return 0; sleep 0.2
  done
  return 1
}
logout() { iscsiadm -m node -T $IQN -p 127.0.0.1:3260 --logout >/dev/null 2>&1; iscsiadm -m node -o delete >/dev/null 2>&1; }
mbps() {  # dd's "bytes ... s" line -> MB/s
  awk '/bytes/ { for (i=1;i<=NF;i++) if ($i ~ /^s,?$/) t=$(i-1); print int('"$SIZE_MB"'*1048576/t/1e6*10)/10 }'
}
run_load() {  # $1 = label
  local best_w=0 best_r=0 w r
  for _ in $(seq 1 $ROUNDS); do
    w=$(dd if=/dev/zero of=/dev/$DEV bs=$BS count=$((SIZE_MB * 1048576 / $(numfmt --from=iec $BS))) oflag=direct 2>&1 | mbps)
    r=$(dd if=/dev/$DEV of=/dev/null bs=$BS count=$((SIZE_MB * 1048576 / $(numfmt --from=iec $BS))) iflag=direct 2>&1 | mbps)
    best_w=$(awk -v a=$best_w -v b=${w:-0} 'BEGIN{print (b>a)?b:a}')
    best_r=$(awk -v a=$best_r -v b=${r:-0} 'BEGIN{print (b>a)?b:a}')
  done
  step "$1: write $best_w MB/s, read $best_r MB/s"
  echo "$1 write $best_w" >> "$S/bench.txt"
  echo "$1 read $best_r" >> "$S/bench.txt"
}
user_dev() {  # $1 = name, $2 = dev_config
  local dev=$C/core/user_1/$1
  mkdir -p $dev
  echo -n "dev_config=$2" > $dev/control
  echo -n "dev_size=$((SIZE_MB << 20))" > $dev/control
  echo -n 1 > $dev/enable
  echo $dev
}

# 1. LIO fileio.
truncate -s ${SIZE_MB}M $D/f.img
mkdir -p $C/core/fileio_1/f
echo -n "fd_dev_name=$D/f.img,fd_dev_size=$((SIZE_MB << 20))" > $C/core/fileio_1/f/control
echo -n 1 > $C/core/fileio_1/f/enable
export_dev $C/core/fileio_1/f
login && run_load fileio || step "fileio: login failed"
logout; unexport; rmdir $C/core/fileio_1/f $C/core/fileio_1

# 2. lunmirror user:mirror.
env RUST_LOG=warn LUNMIRROR_TCMU_STOP=$S/stop LUNMIRROR_TCMU_READY=$S/ready \
  "$BIN" --ignored --exact tcmu_handler --nocapture > "$S/handler.log" 2>&1 &
HPID=$!
for _ in $(seq 1 100); do [ -e $S/ready ] && break; sleep 0.2; done
dev=$(user_dev m mirror/$D/m.img)
export_dev $dev
login && run_load mirror || step "mirror: login failed"
logout; unexport; rmdir $dev
touch $S/stop; wait $HPID

# 3. tcmu-runner qcow handler on a raw image.
qemu-img create -q -f raw $D/q.raw ${SIZE_MB}M
tcmu-runner --handler-path /usr/lib/x86_64-linux-gnu/tcmu-runner > "$S/tcmu-runner.out" 2>&1 &
RPID=$!
sleep 3
dev=$(user_dev q qcow/$D/q.raw)
export_dev $dev
login && run_load qcow || step "qcow: login failed"
logout; unexport; rmdir $dev; rmdir $C/core/user_1
kill $RPID; wait $RPID 2>/dev/null
cat "$S/bench.txt"
