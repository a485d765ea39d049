#!/bin/bash
# Host side of lunmirror's TCMU VM tests. Boots the VM harness
# (/work/shared/vm/run-vm) with tests/vm/guest-tcmu.sh, which serves an LIO
# `user:mirror` LUN with the REAL daemon (`target/release/lunmirror serve`,
# [tcmu] enable = "on", its own iSCSI portal on the guest's 127.0.0.1:3261,
# state dir on the guest's /scratch) and gives the LUN two replicas; probes
# the LIO iSCSI target from the host through the forwarded port with
# libiscsi (iscsi-inq, iscsi-readcapacity16, iscsi-test-cu --dataloss) and
# qemu-io (pattern write + read back), then lets the guest run the kernel
# initiator (mkfs.ext4, mount, write, fsck), in targetcli mode saveconfig /
# clearconfig / restore (with and without a daemon restart), and finally
# compare each replica with the LUN (cmp) and e2fsck them.
#   tests/vm/tcmu-vm.sh configfs     raw configfs backstore + iSCSI export
#   tests/vm/tcmu-vm.sh targetcli    targetcli user:mirror via the D-Bus service
# Env: HANDLER (daemon: target/release/lunmirror, built with
#      `cargo build --release`; test: the tcmu_vm_handler test binary, no
#      mirror layer), PORT (13267), TESTS (iscsi-test-cu --test list), VMDIR,
#      SIZE, RUST_LOG, MAX_FAILS (allowed iscsi-test-cu failures, default: no
#      limit; the comparison with LIO fileio / tcmu-runner qcow is in
#      docs/tcmu.md).
# Prints "tcmu-vm[MODE]: PASS|FAIL (...)"; exit 0 / 1. Slow (TCG): minutes.
# tests/vm/run-all.sh runs both modes.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VMDIR=${VMDIR:-/work/shared/vm}
. "$VMDIR/common.sh"
MODE=${1:-configfs}
PORT=${PORT:-13267}
IQN=iqn.2003-01.org.linux-iscsi.vmguest:lun0
TESTS=${TESTS:-SCSI.TestUnitReady,SCSI.Inquiry,SCSI.ReadCapacity10,SCSI.ReadCapacity16,SCSI.Read10,SCSI.Write10,SCSI.Write16,SCSI.ModeSense6,SCSI.ReportSupportedOpcodes,SCSI.CompareAndWrite,SCSI.WriteSame16}
cd "$ROOT" || exit 1
HANDLER=${HANDLER:-daemon}
DTEST=
MODE_TAG="$MODE/$HANDLER"
case "$HANDLER" in
  daemon)
    cargo build --release --bin lunmirror >/dev/null 2>&1 || { echo "tcmu-vm[$MODE_TAG]: FAIL (cargo build --release failed)"; exit 1; }
    BIN=target/release/lunmirror
    # The TCMU-only daemon test (READY/STATUS/STOPPING), run in the guest.
    DTEST=$(cargo test --no-run --test tcmu_daemon 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
    [ -n "$DTEST" ] && DTEST=$ROOT/$DTEST ;;
  test)
    BIN=$(cargo test --no-run --test tcmu_vm_handler 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1) ;;
  *) echo "tcmu-vm[$MODE_TAG]: FAIL (HANDLER must be daemon or test)"; exit 1 ;;
esac
[ -n "$BIN" ] && [ -x "$ROOT/$BIN" ] || { echo "tcmu-vm[$MODE_TAG]: FAIL (cannot build the handler)"; exit 1; }
BIN=$ROOT/$BIN
vm_port_busy "$PORT" && { echo "tcmu-vm[$MODE_TAG]: FAIL (host port $PORT is taken; set PORT)"; exit 1; }
mkdir -p "$VM_WORK/runs"
SHARE=$(mktemp -d "$VM_WORK/runs/tcmu.XXXXXX")
URL=iscsi://127.0.0.1:$PORT/$IQN/0
t0=$(vm_now)
"$VMDIR/run-vm" --share "$SHARE" --no-default-fwd --fwd "$PORT:3260" --log "$SHARE/console.log" \
  -- env VMDIR="$VMDIR" HANDLER="$HANDLER" TCMU_DAEMON_TEST="$DTEST" SIZE="${SIZE:-64M}" RUST_LOG="${RUST_LOG:-info}" \
  "$ROOT/tests/vm/guest-tcmu.sh" "$MODE" "$BIN" > "$SHARE/run-vm.out" 2>&1 &
vm=$!
while [ ! -e "$SHARE/target-ready" ] && [ ! -e "$SHARE/target-failed" ] && kill -0 $vm 2>/dev/null; do sleep 0.5; done
if [ ! -e "$SHARE/target-ready" ]; then
  touch "$SHARE/host-done"; wait $vm
  cat "$SHARE/run-vm.out"; echo "== handler log"; tail -30 "$SHARE/handler.log" 2>/dev/null
  echo "tcmu-vm[$MODE_TAG]: FAIL (target did not come up: $(cat "$SHARE/target-failed" 2>/dev/null || echo VM ended); logs in $SHARE)"
  exit 1
fi
echo "tcmu-vm[$MODE_TAG]: target ready after $(vm_since "$t0")s"
why=()
probe() { echo "== $*"; "$@" || why+=("$1"); }
probe iscsi-ls "iscsi://127.0.0.1:$PORT"
probe iscsi-inq "$URL"
probe iscsi-inq -e 1 -c 0x80 "$URL"
probe iscsi-inq -e 1 -c 0x83 "$URL"
probe iscsi-readcapacity16 "$URL"
# qemu-io: a pattern written through LIO reads back (and reaches the replicas:
# the guest compares them with the LUN at the end).
probe qemu-io -f raw -c "write -P 0x5a 40M 4M" -c "read -P 0x5a 40M 4M" -c "write -P 0xa5 1M 512k" -c "read -P 0xa5 1M 512k" "$URL"
echo "== iscsi-test-cu --dataloss --test=$TESTS"
tt=$(vm_now)
iscsi-test-cu --dataloss --test="$TESTS" "$URL" > "$SHARE/iscsi-test-cu.log" 2>&1
grep -E 'Test:|FAIL' "$SHARE/iscsi-test-cu.log" | grep -vE 'passed$' | head -60
grep -E -A4 'Run Summary' "$SHARE/iscsi-test-cu.log"
read -r ran failed < <(awk '$1=="tests"{print $3, $5}' "$SHARE/iscsi-test-cu.log")
echo "   tests ran=${ran:-?} failed=${failed:-?} (iscsi-test-cu took $(vm_since "$tt")s)"
[ -n "${ran:-}" ] && [ "$ran" -gt 0 ] || why+=("iscsi-test-cu ran no test")
[ -n "${MAX_FAILS:-}" ] && [ "${failed:-999}" -gt "$MAX_FAILS" ] && why+=("iscsi-test-cu: $failed failed > $MAX_FAILS")
touch "$SHARE/host-done"
wait $vm; vrc=$?
echo "== guest console (tail):"; tail -40 "$SHARE/run-vm.out"
echo "== guest checks:"; cat "$SHARE/checks.txt" 2>/dev/null
gr=$(cat "$SHARE/guest-result" 2>/dev/null || echo "no guest result")
[ "$gr" = PASS ] || why+=("guest: $gr")
[ $vrc = 0 ] || why+=("run-vm exit $vrc")
summary="iscsi-test-cu ${ran:-?} ran, ${failed:-?} failed; $(vm_since "$t0")s; logs in $SHARE"
if [ ${#why[@]} = 0 ]; then echo "tcmu-vm[$MODE_TAG]: PASS ($summary)"; exit 0; fi
echo "tcmu-vm[$MODE_TAG]: FAIL ($(IFS=';'; echo "${why[*]}"); $summary)"
exit 1
