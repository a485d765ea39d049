#!/bin/bash
# Guest side of the lunmirror TCMU VM tests (run by tests/vm/tcmu-vm.sh
# through /work/shared/vm/run-vm). Builds an LIO iSCSI target whose LUN 0 is
# a `user:mirror` backstore served by lunmirror's TCMU frontend, waits for the
# host's probes, then runs the kernel initiator against it inside the guest.
#   guest-tcmu.sh configfs  BIN   raw configfs writes (no targetcli)
#   guest-tcmu.sh targetcli BIN   targetcli + the D-Bus service,
#                                 saveconfig / clearconfig / restore
# HANDLER=daemon (default): BIN is the real `lunmirror` binary, run as
#   `lunmirror serve` with [tcmu] enable = "on" and a built-in iSCSI portal
#   on 127.0.0.1:3261 (LIO has 3260). The LUN has two replicas: one from the
#   cfgstring (replica=...;copytype=sync), one attached at run time through
#   the control socket (configfs: `lunmirror attach-replica`, sync;
#   targetcli: `lunmirror-targetcli ... attach_replica`, async). At the end
#   both replicas must equal the LUN byte for byte and pass e2fsck.
#   targetcli mode also checks that the associations survive clearconfig +
#   restore (same daemon) and daemon stop + clearconfig + start + restore.
# HANDLER=test: BIN is the tcmu_vm_handler test binary (no mirror layer).
# Env: SIZE (64M), IQN, TCMU_DAEMON_TEST (tests/tcmu_daemon.rs binary, run
#      first with LUNMIRROR_EXPECT_TCMU=1), WAIT_SECS (900), PLUGIN_DIR (targetcli-plugin/),
#      GUEST_INITIATOR (1: run initiator.sh against the LUN after the host).
# Results in $VM_SHARE: target-ready / target-failed, handler.log,
# guest-result ("PASS" or "FAIL: ..."), checks.txt (one line per check).
set -u
MODE=${1:?usage: guest-tcmu.sh configfs|targetcli BIN}
BIN=${2:?usage: guest-tcmu.sh configfs|targetcli BIN}
HANDLER=${HANDLER:-daemon}
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
STATE=$D/lunmirror-state
SOCK=$STATE/control.sock
CONF=$D/lunmirror.toml
R_CFG=$D/replica-cfg.img
R_CLI=$D/replica-cli.img
BUILTIN_IQN=iqn.2026-11.io.lunmirror:vm
CFG=$IMG
[ "$HANDLER" = daemon ] && CFG="$IMG;replica=$R_CFG;copytype=sync"
ts() { awk '{print $1}' /proc/uptime; }
step() { echo "[guest $(ts)s] $*"; }
HPID=; SPID=
fails=()
result() { echo "$*" > "$S/guest-result"; }
# One line per check in checks.txt; failures also go to the result.
check() { # check NAME COMMAND...
  local name=$1; shift
  if "$@" >> "$S/checks.log" 2>&1; then echo "ok   $name" >> "$S/checks.txt"; step "check ok: $name"
  else echo "FAIL $name" >> "$S/checks.txt"; step "check FAILED: $name"; fails+=("$name"); fi
}
die() {
  step "FAILED: $*"; echo "$*" > "$S/target-failed"; result "FAIL: $*"
  dmesg | grep -iE 'tcmu|target|uio|iscsi' | tail -20
  stop_handler; exit 1
}
lm() { "$BIN" "$@" --control-socket "$SOCK"; }
lmt() { PYTHONPATH=$PLUGIN_DIR /usr/bin/python3 -m lunmirror_tcmu.cli --socket "$SOCK" "$@"; }

write_config() {
  cat > "$CONF" <<EOF
[daemon]
state_dir = "$STATE"
log_level = "info"
[tcmu]
enable = "on"
subtype = "mirror"
[[target]]
name = "$BUILTIN_IQN"
portals = ["127.0.0.1:3261"]
[[target.lun]]
id = 0
volume = "builtin0"
path = "$D/builtin0.img"
size = "16M"
EOF
}
start_handler() {
  if [ "$HANDLER" = test ]; then
    rm -f "$S/handler-ready" "$S/handler-stop"
    step "starting the TCMU handler (test binary)"
    env RUST_LOG=${RUST_LOG:-info} LUNMIRROR_TCMU_STOP="$S/handler-stop" LUNMIRROR_TCMU_READY="$S/handler-ready" \
      "$BIN" --ignored --exact tcmu_handler --nocapture >> "$S/handler.log" 2>&1 &
    HPID=$!
    for _ in $(seq 1 100); do [ -e "$S/handler-ready" ] && break; kill -0 $HPID 2>/dev/null || die "handler exited"; sleep 0.2; done
    [ -e "$S/handler-ready" ] || die "handler not ready"
    return
  fi
  step "starting lunmirror serve --config $CONF"
  : > "$S/daemon.out"
  echo "=== lunmirror serve started at $(ts)s" >> "$S/handler.log"
  env RUST_LOG=${RUST_LOG:-info} "$BIN" serve --config "$CONF" >> "$S/daemon.out" 2>> "$S/handler.log" &
  HPID=$!
  for _ in $(seq 1 150); do grep -q 'listening on' "$S/daemon.out" && break; kill -0 $HPID 2>/dev/null || die "lunmirror serve exited: $(tail -2 "$S/handler.log")"; sleep 0.2; done
  grep -q 'listening on' "$S/daemon.out" || die "lunmirror serve not ready"
  grep -q 'TCMU frontend started' "$S/handler.log" || die "TCMU frontend not started"
  step "daemon ready: $(cat "$S/daemon.out")"
}
stop_handler() {
  [ -n "$HPID" ] || return 0
  local rc
  if [ "$HANDLER" = test ]; then
    touch "$S/handler-stop"
    for _ in $(seq 1 50); do kill -0 $HPID 2>/dev/null || break; sleep 0.2; done
    kill $HPID 2>/dev/null; wait $HPID 2>/dev/null; HPID=; return 0
  fi
  step "stopping lunmirror (SIGTERM)"
  kill -TERM $HPID
  for _ in $(seq 1 150); do kill -0 $HPID 2>/dev/null || break; sleep 0.2; done
  kill -0 $HPID 2>/dev/null && { step "lunmirror did not stop in 30 s"; kill -KILL $HPID; }
  wait $HPID; rc=$?; HPID=
  step "lunmirror exited with $rc"
  return $rc
}
tcli() { step "targetcli $*"; targetcli "$@" || die "targetcli $*"; }
# replicas_ok FILE N: N associations of disk0, all Synchronized (6).
replicas_ok() {
  lm replicas --json > "$1" 2>&1 || return 1
  python3 - "$1" "$2" <<'EOF'
import json, sys
s = [a for a in json.load(open(sys.argv[1])) if a["SystemElement"] == "disk0"]
print([(a["Synchronization"], a["SyncedElement"], a["SyncStateDescription"]) for a in s])
sys.exit(0 if len(s) == int(sys.argv[2]) and all(a["SyncState"] == 6 for a in s) else 1)
EOF
}
wait_replicas() { # wait_replicas FILE N
  for _ in $(seq 1 60); do replicas_ok "$@" >/dev/null 2>&1 && break; sleep 0.5; done
  replicas_ok "$@"
}
# fs_write LABEL: log in, mount, add a file, umount, e2fsck, log out.
fs_write() {
  local dev mnt=/mnt/tcmu rc=0
  iscsiadm -m node -T "$IQN" -p 127.0.0.1:3260 --login || return 1
  for _ in $(seq 1 50); do
    dev=$(iscsiadm -m session -P3 2>/dev/null | awk '/Attached scsi disk/{print $4; exit}')
    [ -n "$dev" ] && [ -b "/dev/$dev" ] && break; sleep 0.2
  done
  mkdir -p $mnt
  if [ -n "$dev" ] && mount "/dev/$dev" $mnt; then
    head -c 1M /dev/urandom > "$mnt/$1.bin" && sha256sum "$mnt/$1.bin" | tee -a "$S/fs-writes.sha256" || rc=1
    umount $mnt || rc=1
    e2fsck -fn "/dev/$dev" || rc=1
  else
    rc=1
  fi
  iscsiadm -m node -T "$IQN" -p 127.0.0.1:3260 --logout || rc=1
  return $rc
}

configfs_create() {
  local dev=$C/core/user_1/disk0
  mkdir -p $dev || die "mkdir $dev"
  echo -n "dev_config=mirror/$CFG" > $dev/control || die "dev_config"
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

step "kernel $(uname -r); image $IMG; handler $HANDLER ($BIN)"
rm -rf "$IMG" "$STATE" "$R_CFG" "$R_CLI" "$S/checks.txt"
if [ "$HANDLER" = daemon ]; then
  write_config
  # Replicas are never created by the daemon: they must exist, big enough.
  truncate -s "$SIZE" "$R_CFG" "$R_CLI"
fi
if [ "$HANDLER" = daemon ] && [ -n "${TCMU_DAEMON_TEST:-}" ]; then
  # A TCMU-only daemon (no [[target]]) tells systemd READY=1 with its
  # STATUS here, where target_core_user exists, and STOPPING=1 on SIGTERM.
  dtest() { LUNMIRROR_EXPECT_TCMU=1 "$TCMU_DAEMON_TEST" --test-threads=1 > "$S/tcmu-daemon-test.log" 2>&1; }
  check "tcmu_daemon test under LIO (TCMU-only daemon: READY=1 + STATUS, STOPPING=1)" dtest
  grep 'test result' "$S/tcmu-daemon-test.log"
fi
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
    ctl=; [ "$HANDLER" = daemon ] && ctl=$SOCK
    PYTHONPATH=$PLUGIN_DIR /usr/bin/python3 -m lunmirror_tcmu.dbus_service -v --control-socket "$ctl" >> "$S/dbus-service.log" 2>&1 &
    SPID=$!
    for _ in $(seq 1 100); do
      dbus-send --system --print-reply --dest=org.freedesktop.DBus / org.freedesktop.DBus.NameHasOwner \
        string:org.kernel.TCMUService1 2>/dev/null | grep -q 'boolean true' && break
      kill -0 $SPID 2>/dev/null || die "D-Bus service exited"; sleep 0.3
    done
    tcli /backstores/user:mirror create name=disk0 size=$SIZE "cfgstring=$CFG"
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

if [ "$HANDLER" = daemon ]; then
  # The second replica, through the control socket, before the host writes.
  if [ "$MODE" = configfs ]; then
    step "lunmirror attach-replica --source disk0 --target $R_CLI --copy-type sync --wait"
    lm attach-replica --source disk0 --target "$R_CLI" --copy-type sync --wait > "$S/attach.txt" 2>&1 || die "attach-replica: $(tail -1 "$S/attach.txt")"
  else
    step "lunmirror-targetcli /backstores/user:mirror/disk0 attach_replica target=$R_CLI copytype=async wait=yes"
    lmt /backstores/user:mirror/disk0 attach_replica target="$R_CLI" copytype=async wait=yes > "$S/attach.txt" 2>&1 || die "attach_replica: $(tail -1 "$S/attach.txt")"
  fi
  cat "$S/attach.txt"
  check "2 replicas of disk0 Synchronized after attach" wait_replicas "$S/replicas-1.json" 2
  lm replicas; lmt /backstores/user:mirror ls
  check "built-in iSCSI portal 127.0.0.1:3261 answers beside TCMU" iscsi-inq "iscsi://127.0.0.1:3261/$BUILTIN_IQN/0"
fi
step "target ready"
touch "$S/target-ready"
for _ in $(seq 1 $((WAIT_SECS*2))); do [ -e "$S/host-done" ] && break; sleep 0.5; done
step "host done"

if [ "${GUEST_INITIATOR:-1}" = 1 ]; then
  step "kernel initiator in the guest against 127.0.0.1:3260"
  run_initiator() { bash "$VMDIR/guest/initiator.sh" 127.0.0.1:3260 "$IQN" > "$S/guest-initiator.log" 2>&1; }
  check "guest kernel initiator (mkfs, mount, write, verify, e2fsck)" run_initiator
  tail -3 "$S/guest-initiator.log"
fi

if [ "$MODE" = targetcli ]; then
  # saveconfig / clearconfig / restore: the LUN comes back with the same
  # data (and, with the daemon, the same replica associations).
  sum1=$(sha256sum "$IMG" | cut -d' ' -f1)
  tcli saveconfig "$S/saveconfig.json"
  grep -o '"config": "[^"]*"' "$S/saveconfig.json"
  tcli clearconfig confirm=True
  [ -z "$(ls /sys/class/uio)" ] || fails+=("uio device left after clearconfig")
  if [ "$HANDLER" = daemon ]; then
    # Same daemon: the volume is kept for its associations while the device is gone.
    lm replicas
    step "targetctl restore (daemon kept running)"
    targetctl restore "$S/saveconfig.json" > "$S/restore-1.txt" 2>&1 || fails+=("targetctl restore (1)")
    cat "$S/restore-1.txt"
    check "restore 1: LUN back with its 2 replica associations" wait_replicas "$S/replicas-2.json" 2
    [ "${GUEST_INITIATOR:-1}" = 1 ] && check "restore 1: write a file through LIO + e2fsck" fs_write after-restore-1
    # Daemon restart: LIO's config is cleared while the daemon is down and
    # restored once it is up again.
    tcli saveconfig "$S/saveconfig.json"
    stop_handler || fails+=("lunmirror exit status at restart")
    tcli clearconfig confirm=True
    start_handler
    step "targetctl restore (after a daemon restart)"
    targetctl restore "$S/saveconfig.json" > "$S/restore-2.txt" 2>&1 || fails+=("targetctl restore (2)")
    cat "$S/restore-2.txt"
    check "restore 2 (daemon restarted): LUN back with its 2 replica associations" wait_replicas "$S/replicas-3.json" 2
    [ "${GUEST_INITIATOR:-1}" = 1 ] && check "restore 2: write a file through LIO + e2fsck" fs_write after-restore-2
    lm replicas; lmt /backstores/user:mirror/disk0 replicas; lmt /jobs ls
  else
    stop_handler
    start_handler
    step "targetctl restore"
    targetctl restore "$S/saveconfig.json" > "$S/restore.txt" 2>&1 || fails+=("targetctl restore")
    cat "$S/restore.txt"
    grep -q "Cannot set attribute" "$S/restore.txt" && fails+=("restore: $(grep -m1 'Cannot set attribute' "$S/restore.txt")")
    for _ in $(seq 1 50); do grep -q '"running": *true\|running: true' "$S/handler.log" 2>/dev/null && break; sleep 0.2; done
    sum2=$(sha256sum "$IMG" | cut -d' ' -f1)
    [ "$sum1" = "$sum2" ] || fails+=("image changed across save/restore")
    if [ "${GUEST_INITIATOR:-1}" = 1 ]; then
      check "after restore: log in + e2fsck" fs_write after-restore
    fi
  fi
  targetcli ls /backstores/user:mirror
  targetcli clearconfig confirm=True >/dev/null 2>&1
else
  configfs_teardown
fi
sleep 1
if [ "$HANDLER" = daemon ]; then
  check "lunmirror stops cleanly (exit 0)" stop_handler
  cp -r "$STATE" "$S/state-copy" 2>/dev/null
  check "replica (cfgstring, sync) == LUN bytes" cmp "$IMG" "$R_CFG"
  check "replica ($([ "$MODE" = configfs ] && echo 'attach-replica, sync' || echo 'lunmirror-targetcli, async')) == LUN bytes" cmp "$IMG" "$R_CLI"
  check "e2fsck -fn replica (cfgstring)" e2fsck -fn "$R_CFG"
  check "e2fsck -fn replica (control socket)" e2fsck -fn "$R_CLI"
else
  stop_handler
fi
[ -n "$SPID" ] && kill $SPID 2>/dev/null
grep -E 'ERROR|panicked' "$S/handler.log" | head -10
grep -q panicked "$S/handler.log" && fails+=("handler panicked")
check "e2fsck -fn backing image" e2fsck -fn "$IMG"
sha256sum "$IMG" > "$S/image.sha256"
dmesg | grep -iE 'tcmu|target_core|uio' | tail -30 > "$S/guest-dmesg.txt"
echo "== checks"; cat "$S/checks.txt"
if [ ${#fails[@]} = 0 ]; then result PASS; step "guest PASS"; exit 0; fi
result "FAIL: $(IFS=';'; echo "${fails[*]}")"; step "guest FAIL: ${fails[*]}"; exit 1
