#!/bin/bash
# Guest side of the lunmirror TCMU VM tests (run by tests/vm/tcmu-vm.sh
# through /work/shared/vm/run-vm). Builds an LIO iSCSI target whose LUN 0 is
# a `user:mirror` backstore served by lunmirror's TCMU frontend, waits for the
# host's probes, then runs the kernel initiator against it inside the guest.
#   guest-tcmu.sh configfs  HANDLER_BIN   raw configfs writes (no targetcli)
#   guest-tcmu.sh targetcli HANDLER_BIN   targetcli + the D-Bus service,
#                                         saveconfig / clearconfig / restore
# HANDLER_BIN: the tcmu_vm_handler test binary (cargo test --no-run).
# Env: SIZE (64M), IQN, WAIT_SECS (900), PLUGIN_DIR (targetcli-plugin/),
#      GUEST_INITIATOR (1: run initiator.sh against the LUN after the host).
# Results in $VM_SHARE: target-ready / target-failed, handler.log,
# guest-result ("PASS" or "FAIL: ..."), images' sha256 for the host.
set -u
MODE=${1:?usage: guest-tcmu.sh configfs|targetcli HANDLER_BIN}
BIN=${2:?usage: guest-tcmu.sh configfs|targetcli HANDLER_BIN}
S=${VM_SHARE:?run this inside run-vm}
HERE=$(cd "$(dirname "$0")" && pwd)
VMDIR=${VMDIR:-/work/shared/vm}
PLUGIN_DIR=${PLUGIN_DIR:-$(cd "$HERE/../../targetcli-plugin" && pwd)}
IQN=${IQN:-iqn.2003-01.org.linux-iscsi.vmguest:lun0}
SIZE=${SIZE:-64M}
WAIT_SECS=${WAIT_SECS:-900}
C=/sys/kernel/config/target
if mountpoint -q /scratch; then D=/scratch; else D=/var/tmp; fi
IMG=$D/disk0.img
ts() { awk '{print $1}' /proc/uptime; }
step() { echo "[guest $(ts)s] $*"; }
HPID=; SPID=
result() { echo "$*" > "$S/guest-result"; }
die() {
  step "FAILED: $*"; echo "$*" > "$S/target-failed"; result "FAIL: $*"
  dmesg | grep -iE 'tcmu|target|uio|iscsi' | tail -20
  stop_handler; exit 1
}
start_handler() {
  rm -f "$S/handler-ready" "$S/handler-stop"
  step "starting the TCMU handler"
  env RUST_LOG=${RUST_LOG:-info} LUNMIRROR_TCMU_STOP="$S/handler-stop" LUNMIRROR_TCMU_READY="$S/handler-ready" \
    "$BIN" --ignored --exact tcmu_handler --nocapture >> "$S/handler.log" 2>&1 &
  HPID=$!
  for _ in $(seq 1 100); do [ -e "$S/handler-ready" ] && break; kill -0 $HPID 2>/dev/null || die "handler exited"; sleep 0.2; done
  [ -e "$S/handler-ready" ] || die "handler not ready"
}
stop_handler() {
  [ -n "$HPID" ] || return 0
  touch "$S/handler-stop"
  for _ in $(seq 1 50); do kill -0 $HPID 2>/dev/null || break; sleep 0.2; done
  kill $HPID 2>/dev/null; wait $HPID 2>/dev/null; HPID=
}
tcli() { step "targetcli $*"; targetcli "$@" || die "targetcli $*"; }

configfs_create() {
  local dev=$C/core/user_1/disk0
  mkdir -p $dev || die "mkdir $dev"
  echo -n "dev_config=mirror/$IMG" > $dev/control || die "dev_config"
  echo -n "dev_size=$(numfmt --from=iec "$SIZE")" > $dev/control || die "dev_size"
  echo -n 1 > $dev/enable || die "enable"
  cat $dev/info
  mkdir -p $C/iscsi/$IQN/tpgt_1/lun/lun_0 || die "mkdir iscsi"
  ln -s $dev $C/iscsi/$IQN/tpgt_1/lun/lun_0/disk0 || die "lun link"
  mkdir $C/iscsi/$IQN/tpgt_1/np/0.0.0.0:3260 || die "portal"
  for a in generate_node_acls=1 cache_dynamic_acls=1 authentication=0 demo_mode_write_protect=0; do
    echo -n ${a#*=} > $C/iscsi/$IQN/tpgt_1/attrib/${a%=*} || die "attrib $a"
  done
  echo -n 1 > $C/iscsi/$IQN/tpgt_1/enable || die "tpg enable"
}
configfs_teardown() {
  echo -n 0 > $C/iscsi/$IQN/tpgt_1/enable
  rmdir $C/iscsi/$IQN/tpgt_1/np/0.0.0.0:3260
  rm $C/iscsi/$IQN/tpgt_1/lun/lun_0/disk0
  rmdir $C/iscsi/$IQN/tpgt_1/lun/lun_0 $C/iscsi/$IQN/tpgt_1 $C/iscsi/$IQN
  rmdir $C/core/user_1/disk0 $C/core/user_1
}

step "kernel $(uname -r); image $IMG"
rm -f "$IMG"
case "$MODE" in
  configfs)
    start_handler
    configfs_create ;;
  targetcli)
    mkdir -p /run/dbus /etc/dbus-1/system.d
    cp "$PLUGIN_DIR/dbus/org.kernel.TCMUService1.lunmirror.conf" /etc/dbus-1/system.d/ 2>/dev/null
    step "starting dbus-daemon --system"
    dbus-daemon --system --fork --nopidfile || die "dbus-daemon"
    start_handler
    step "starting the D-Bus service (targetcli-plugin)"
    PYTHONPATH=$PLUGIN_DIR /usr/bin/python3 -m lunmirror_tcmu.dbus_service -v --control-socket "${CONTROL_SOCKET:-}" >> "$S/dbus-service.log" 2>&1 &
    SPID=$!
    for _ in $(seq 1 100); do
      dbus-send --system --print-reply --dest=org.freedesktop.DBus / org.freedesktop.DBus.NameHasOwner \
        string:org.kernel.TCMUService1 2>/dev/null | grep -q 'boolean true' && break
      kill -0 $SPID 2>/dev/null || die "D-Bus service exited"; sleep 0.3
    done
    tcli /backstores/user:mirror create name=disk0 size=$SIZE cfgstring=$IMG
    tcli /iscsi create $IQN
    tcli /iscsi/$IQN/tpg1/luns create /backstores/user:mirror/disk0
    tcli /iscsi/$IQN/tpg1 set attribute authentication=0 demo_mode_write_protect=0 generate_node_acls=1 cache_dynamic_acls=1
    # A refused cfgstring must be refused by CheckConfig before LIO sees it.
    if targetcli /backstores/user:mirror create name=bad size=1M cfgstring=relative.img >"$S/bad-create.txt" 2>&1; then
      die "targetcli accepted a bad cfgstring"
    fi
    step "bad cfgstring refused: $(tail -1 "$S/bad-create.txt")"
    targetcli ls / ;;
  *) die "unknown mode $MODE" ;;
esac
for u in /sys/class/uio/uio*; do [ -e "$u" ] && step "$(basename $u): $(cat $u/name)"; done
ss -ltn | grep -q ':3260' || die "nothing listens on 3260"
step "target ready"
touch "$S/target-ready"
for _ in $(seq 1 $((WAIT_SECS*2))); do [ -e "$S/host-done" ] && break; sleep 0.5; done
step "host done"

fails=()
if [ "${GUEST_INITIATOR:-1}" = 1 ]; then
  step "kernel initiator in the guest against 127.0.0.1:3260"
  if ! bash "$VMDIR/guest/initiator.sh" 127.0.0.1:3260 "$IQN" > "$S/guest-initiator.log" 2>&1; then
    fails+=("guest initiator: $(tail -1 "$S/guest-initiator.log")")
  fi
  tail -3 "$S/guest-initiator.log"
fi

if [ "$MODE" = targetcli ]; then
  # saveconfig / clearconfig / restart the handler / restore: the LUN comes
  # back with the same data.
  sum1=$(sha256sum "$IMG" | cut -d' ' -f1)
  tcli saveconfig "$S/saveconfig.json"
  tcli clearconfig confirm=True
  [ -z "$(ls /sys/class/uio)" ] || fails+=("uio device left after clearconfig")
  stop_handler
  start_handler
  step "targetctl restore"
  targetctl restore "$S/saveconfig.json" > "$S/restore.txt" 2>&1 || fails+=("targetctl restore")
  cat "$S/restore.txt"
  # restore rewrites dev_config/dev_size: the handler must accept unchanged values.
  grep -q "Cannot set attribute" "$S/restore.txt" && fails+=("restore: $(grep -m1 'Cannot set attribute' "$S/restore.txt")")
  for _ in $(seq 1 50); do grep -q '"running": *true\|running: true' "$S/handler.log" 2>/dev/null && break; sleep 0.2; done
  targetcli ls /backstores/user:mirror
  sum2=$(sha256sum "$IMG" | cut -d' ' -f1)
  [ "$sum1" = "$sum2" ] || fails+=("image changed across save/restore")
  if [ "${GUEST_INITIATOR:-1}" = 1 ]; then
    iscsiadm -m node -T "$IQN" -p 127.0.0.1:3260 --login >/dev/null 2>&1 || fails+=("login after restore")
    sleep 2
    dev=$(iscsiadm -m session -P3 2>/dev/null | awk '/Attached scsi disk/{print $4; exit}')
    if [ -n "$dev" ]; then
      e2fsck -fn /dev/$dev > "$S/e2fsck-after-restore.txt" 2>&1 || fails+=("e2fsck after restore")
    else
      fails+=("no disk after restore")
    fi
    iscsiadm -m node -T "$IQN" -p 127.0.0.1:3260 --logout >/dev/null 2>&1
  fi
  targetcli clearconfig confirm=True >/dev/null 2>&1
else
  configfs_teardown
fi
sleep 1
stop_handler
[ -n "$SPID" ] && kill $SPID 2>/dev/null
grep -E 'ERROR|panicked' "$S/handler.log" | head -10
grep -q panicked "$S/handler.log" && fails+=("handler panicked")
e2fsck -fn "$IMG" > "$S/e2fsck-image.txt" 2>&1 || fails+=("e2fsck of the backing image")
sha256sum "$IMG" > "$S/image.sha256"
dmesg | grep -iE 'tcmu|target_core|uio' | tail -30 > "$S/guest-dmesg.txt"
if [ ${#fails[@]} = 0 ]; then result PASS; step "guest PASS"; exit 0; fi
result "FAIL: $(IFS=';'; echo "${fails[*]}")"; step "guest FAIL: ${fails[*]}"; exit 1
