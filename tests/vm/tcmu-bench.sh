#!/bin/bash
# Throughput of lunmirror's TCMU handler against tcmu-runner's qcow handler
# (raw image) and LIO fileio, same VM, same load (tests/vm/guest-bench.sh).
# Prints the table and the lunmirror/qcow ratios. Env: SIZE_MB (64), BS (1M),
# ROUNDS (2), VMDIR. TCG numbers: compare ratios, not absolute values.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VMDIR=${VMDIR:-/work/shared/vm}
. "$VMDIR/common.sh"
cd "$ROOT" || exit 1
BIN=$(cargo test --release --no-run --test tcmu_vm_handler 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
[ -n "$BIN" ] || { echo "tcmu-bench: cannot build the handler"; exit 1; }
mkdir -p "$VM_WORK/runs"
SHARE=$(mktemp -d "$VM_WORK/runs/bench.XXXXXX")
"$VMDIR/run-vm" --share "$SHARE" --no-net --mem 1024 \
  -- env SIZE_MB="${SIZE_MB:-64}" BS="${BS:-1M}" ROUNDS="${ROUNDS:-2}" \
  "$ROOT/tests/vm/guest-bench.sh" "$ROOT/$BIN" > "$SHARE/run-vm.out" 2>&1
rc=$?
grep -E '^\[guest' "$SHARE/run-vm.out"
[ -s "$SHARE/bench.txt" ] || { echo "tcmu-bench: FAIL (no results; rc=$rc; logs in $SHARE)"; exit 1; }
awk '{v[$1" "$2]=$3} END {
  printf "%-8s %10s %10s\n", "", "write MB/s", "read MB/s";
  split("fileio mirror qcow", b, " ");
  for (i=1;i<=3;i++) printf "%-8s %10s %10s\n", b[i], v[b[i]" write"], v[b[i]" read"];
  if (v["qcow write"]>0 && v["qcow read"]>0)
    printf "mirror/qcow: write %.2fx, read %.2fx\n", v["mirror write"]/v["qcow write"], v["mirror read"]/v["qcow read"];
}' "$SHARE/bench.txt"
echo "logs in $SHARE"
