#!/bin/bash
# Host side of lunmirror's TCMU VM tests. Builds the handler (an ignored
# test binary, tests/tcmu_vm_handler.rs), boots the VM harness
# (/work/shared/vm/run-vm) with tests/vm/guest-tcmu.sh, probes the LIO
# iSCSI target from the host through the forwarded port with libiscsi
# (iscsi-inq, iscsi-readcapacity16, iscsi-test-cu --dataloss), then lets the
# guest run the kernel initiator (mkfs.ext4, mount, write, fsck) and, in
# targetcli mode, saveconfig / clearconfig / restore.
#   tests/vm/tcmu-vm.sh configfs     raw configfs backstore + iSCSI export
#   tests/vm/tcmu-vm.sh targetcli    targetcli user:mirror via the D-Bus service
# Env: PORT (13267), TESTS (iscsi-test-cu --test list), VMDIR, SIZE, RUST_LOG,
#      MAX_FAILS (allowed iscsi-test-cu failures, default: no limit; the
#      comparison with LIO fileio / tcmu-runner qcow is in docs/tcmu.md).
# Prints "tcmu-vm[MODE]: PASS|FAIL (...)"; exit 0 / 1. Slow (TCG): minutes.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VMDIR=${VMDIR:-/work/shared/vm}
. "$VMDIR/common.sh"
MODE=${1:-configfs}
PORT=${PORT:-13267}
IQN=iqn.2003-01.org.linux-iscsi.vmguest:lun0
TESTS=${TESTS:-SCSI.TestUnitReady,SCSI.Inquiry,SCSI.ReadCapacity10,SCSI.ReadCapacity16,SCSI.Read10,SCSI.Write10,SCSI.Write16,SCSI.ModeSense6,SCSI.ReportSupportedOpcodes,SCSI.CompareAndWrite,SCSI.WriteSame16}
vm_port_busy "$PORT" && { echo "tcmu-vm[$MODE]: FAIL (host port $PORT is taken; set PORT)"; exit 1; }
cd "$ROOT" || exit 1
BIN=$(cargo test --no-run --test tcmu_vm_handler 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
[ -n "$BIN" ] && [ -x "$ROOT/$BIN" ] || { echo "tcmu-vm[$MODE]: FAIL (cannot build the handler)"; exit 1; }
BIN=$ROOT/$BIN
mkdir -p "$VM_WORK/runs"
SHARE=$(mktemp -d "$VM_WORK/runs/tcmu.XXXXXX")
URL=iscsi://127.0.0.1:$PORT/$IQN/0
t0=$(vm_now)
"$VMDIR/run-vm" --share "$SHARE" --no-default-fwd --fwd "$PORT:3260" --log "$SHARE/console.log" \
  -- env VMDIR="$VMDIR" SIZE="${SIZE:-64M}" RUST_LOG="${RUST_LOG:-info}" \
  "$ROOT/tests/vm/guest-tcmu.sh" "$MODE" "$BIN" > "$SHARE/run-vm.out" 2>&1 &
vm=$!
while [ ! -e "$SHARE/target-ready" ] && [ ! -e "$SHARE/target-failed" ] && kill -0 $vm 2>/dev/null; do sleep 0.5; done
if [ ! -e "$SHARE/target-ready" ]; then
  touch "$SHARE/host-done"; wait $vm
  cat "$SHARE/run-vm.out"; echo "== handler log"; tail -30 "$SHARE/handler.log" 2>/dev/null
  echo "tcmu-vm[$MODE]: FAIL (target did not come up: $(cat "$SHARE/target-failed" 2>/dev/null || echo VM ended); logs in $SHARE)"
  exit 1
fi
echo "tcmu-vm[$MODE]: target ready after $(vm_since "$t0")s"
why=()
probe() { echo "== $*"; "$@" || why+=("$1"); }
probe iscsi-ls "iscsi://127.0.0.1:$PORT"
probe iscsi-inq "$URL"
probe iscsi-inq -e 1 -c 0x80 "$URL"
probe iscsi-inq -e 1 -c 0x83 "$URL"
probe iscsi-readcapacity16 "$URL"
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
gr=$(cat "$SHARE/guest-result" 2>/dev/null || echo "no guest result")
[ "$gr" = PASS ] || why+=("guest: $gr")
[ $vrc = 0 ] || why+=("run-vm exit $vrc")
summary="iscsi-test-cu ${ran:-?} ran, ${failed:-?} failed; $(vm_since "$t0")s; logs in $SHARE"
if [ ${#why[@]} = 0 ]; then echo "tcmu-vm[$MODE]: PASS ($summary)"; exit 0; fi
echo "tcmu-vm[$MODE]: FAIL ($(IFS=';'; echo "${why[*]}"); $summary)"
exit 1
