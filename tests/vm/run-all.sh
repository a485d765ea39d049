#!/bin/bash
# The TCMU end-to-end suite in one command (docs/tcmu.md "Tests"). NOT part
# of `cargo test`: each VM run takes minutes under TCG (1 vCPU, no KVM).
#
#   tests/vm/run-all.sh
#
# Runs, one VM at a time:
#   1. systemd/verify.sh            systemd-analyze verify + security score (host)
#   2. tests/vm/tcmu-vm.sh configfs  real daemon, raw configfs user:mirror LUN
#   3. tests/vm/tcmu-vm.sh targetcli real daemon, targetcli + D-Bus service,
#                                    save/clear/restore with and without a
#                                    daemon restart
# and, when asked:
#   WITH_TEST_HANDLER=1  both modes again with HANDLER=test (the frontend as
#                        the tcmu_vm_handler test binary, no mirror layer)
#   WITH_BENCH=1         tests/vm/tcmu-bench.sh (throughput vs tcmu-runner qcow)
# Needs /work/shared/vm (VMDIR) prepared once (`prepare-host`, as root).
# Builds first (`cargo build --release`, the tcmu_daemon test binary), so the
# VM runs never compile. Logs: $LOGDIR (default $VM_WORK/runs/run-all.<time>/),
# one file per step; each VM run keeps its own dir under $VM_WORK/runs/.
# Ends with "run-all: N passed, M failed"; exit 0 only if all passed.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VMDIR=${VMDIR:-/work/shared/vm}
. "$VMDIR/common.sh"
LOGDIR=${LOGDIR:-$VM_WORK/runs/run-all.$(date +%Y%m%d-%H%M%S)}
mkdir -p "$LOGDIR"
cd "$ROOT" || exit 1
passed=0; failed=0; lines=()
note() { lines+=("$1"); echo "$1"; }
step() { # step NAME LOG COMMAND...
  local name=$1 log=$2; shift 2
  local t0; t0=$(vm_now)
  echo "== $name (log $LOGDIR/$log)"
  if "$@" > "$LOGDIR/$log" 2>&1; then
    passed=$((passed+1)); note "PASS $name ($(vm_since "$t0")s): $(grep -E '^tcmu-vm|^tcmu-bench|Overall exposure' "$LOGDIR/$log" | tail -2 | tr '\n' ' ')"
  else
    failed=$((failed+1)); note "FAIL $name ($(vm_since "$t0")s): $(tail -1 "$LOGDIR/$log")"
  fi
}
echo "== building (cargo build --release; tcmu_daemon test binary)"
if ! { cargo build --release && cargo test --no-run --test tcmu_daemon --test tcmu_vm_handler; } > "$LOGDIR/build.log" 2>&1; then
  echo "run-all: build failed, see $LOGDIR/build.log"; exit 1
fi
step "systemd units" systemd.log env LUNMIRROR_BIN="$ROOT/target/release/lunmirror" "$ROOT/systemd/verify.sh"
step "tcmu-vm configfs (daemon)" configfs.log "$ROOT/tests/vm/tcmu-vm.sh" configfs
step "tcmu-vm targetcli (daemon)" targetcli.log "$ROOT/tests/vm/tcmu-vm.sh" targetcli
if [ "${WITH_TEST_HANDLER:-0}" = 1 ]; then
  step "tcmu-vm configfs (test handler)" configfs-test.log env HANDLER=test "$ROOT/tests/vm/tcmu-vm.sh" configfs
  step "tcmu-vm targetcli (test handler)" targetcli-test.log env HANDLER=test "$ROOT/tests/vm/tcmu-vm.sh" targetcli
fi
if [ "${WITH_BENCH:-0}" = 1 ]; then
  step "tcmu-bench" bench.log "$ROOT/tests/vm/tcmu-bench.sh"
fi
echo
printf '%s\n' "${lines[@]}" | tee "$LOGDIR/summary.txt"
echo "run-all: $passed passed, $failed failed (logs in $LOGDIR)" | tee -a "$LOGDIR/summary.txt"
[ "$failed" = 0 ]
