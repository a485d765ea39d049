#!/usr/bin/env bash
# libiscsi's conformance suite, the same run against a private tgtd (tgt's
# rdwr backing store) and against lunmirror, side by side.
#
#   tests/conformance/compare-with-tgt.sh            # build first: cargo build --release
#
# Both targets serve one 1 GiB LUN (a sparse file) through two portals,
# 127.0.0.1:PORT and 127.0.0.2:PORT, and both get the same
#
#   iscsi-test-cu -d -S -v -i INI1 -I INI2 -t LIST URL1 URL2
#
# where LIST is every suite of `iscsi-test-cu -l` (all families) with the
# Sanitize suites split test by test (see docs/conformance.md, "libiscsi
# bugs"). MODE=all runs a plain `-t ALL` instead.
#
# Environment: LUNMIRROR_BIN (default target/release/lunmirror), WORK (a
# directory for images and logs, default a new one under /var/tmp),
# TGT_PORT / LM_PORT (defaults 23360 / 23370), TGT_CONTROL (tgtd's -C
# control port, default TGT_PORT), SIZE (default 1G), MODE (split | all).
#
# Prints each Run Summary, the failed tests and, per target, the tests
# passed / failed / skipped (a test counts as skipped when it logged a
# [SKIPPED] message; CUnit counts those as passed). The full logs stay in
# WORK. Only processes started
# here are stopped, by PID.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${LUNMIRROR_BIN:-$ROOT/target/release/lunmirror}
WORK=${WORK:-$(mktemp -d /var/tmp/lunmirror-compare.XXXXXX)}
TGT_PORT=${TGT_PORT:-23360}
LM_PORT=${LM_PORT:-23370}
TGT_CONTROL=${TGT_CONTROL:-$TGT_PORT}
SIZE=${SIZE:-1G}
MODE=${MODE:-split}
INI1=iqn.2026-11.io.lunmirror.compare:initiator-1
INI2=iqn.2026-11.io.lunmirror.compare:initiator-2
TGT_IQN=iqn.2026-11.io.lunmirror:tgt-peer
LM_IQN=iqn.2026-11.io.lunmirror:compare

for tool in iscsi-test-cu tgtd tgtadm ss; do
    command -v "$tool" >/dev/null || { echo "$tool not installed" >&2; exit 2; }
done
[ -x "$BIN" ] || { echo "$BIN missing: cargo build --release" >&2; exit 2; }
mkdir -p "$WORK"

TGT_PID=
LM_PID=
cleanup() {
    if [ -n "$TGT_PID" ]; then
        tgtadm -C "$TGT_CONTROL" --op delete --mode system >/dev/null 2>&1 || true
        sleep 0.5
        kill "$TGT_PID" 2>/dev/null || true
        wait "$TGT_PID" 2>/dev/null || true
        rm -f "/var/run/tgtd/socket.$TGT_CONTROL" "/var/run/tgtd/socket.$TGT_CONTROL.lock"
    fi
    if [ -n "$LM_PID" ]; then
        kill "$LM_PID" 2>/dev/null || true
        wait "$LM_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# wait_listen IP PORT: until something listens there (10 s).
wait_listen() {
    for _ in $(seq 100); do
        ss -ltnH "src $1 and sport = :$2" | grep -q . && return 0
        sleep 0.1
    done
    echo "nothing listens on $1:$2" >&2
    return 1
}

if [ "$MODE" = all ]; then
    TESTS=ALL
else
    TESTS=$WORK/tests.txt
    iscsi-test-cu -l | awk -F. '(NF == 2 && $2 != "Sanitize") || (NF == 3 && $2 == "Sanitize")' > "$TESTS"
fi

# run_cu NAME URL1 URL2: the suite, output to WORK/NAME.log.
run_cu() {
    local start=$SECONDS
    iscsi-test-cu -d -S -v -i "$INI1" -I "$INI2" -t "$TESTS" "$2" "$3" > "$WORK/$1.log" 2>&1 || true
    echo "$1: $((SECONDS - start)) s" >> "$WORK/times.txt"
}

# --- tgt
rm -f "$WORK/tgt.img"; truncate -s "$SIZE" "$WORK/tgt.img"
tgtd -f -C "$TGT_CONTROL" --iscsi "portal=127.0.0.1:$TGT_PORT" > "$WORK/tgtd.out" 2>&1 &
TGT_PID=$!
wait_listen 127.0.0.1 "$TGT_PORT"
T="tgtadm -C $TGT_CONTROL --lld iscsi"
$T --op new --mode portal --param "portal=127.0.0.2:$TGT_PORT"
$T --op new --mode target --tid 1 -T "$TGT_IQN"
$T --op new --mode logicalunit --tid 1 --lun 1 -b "$WORK/tgt.img" --bstype rdwr
$T --op bind --mode target --tid 1 -I ALL
wait_listen 127.0.0.2 "$TGT_PORT"
run_cu tgt "iscsi://127.0.0.1:$TGT_PORT/$TGT_IQN/1" "iscsi://127.0.0.2:$TGT_PORT/$TGT_IQN/1"
cleanup
TGT_PID=

# --- lunmirror
rm -rf "$WORK/lm-state"
cat > "$WORK/lunmirror.toml" <<EOF
[daemon]
state_dir = "$WORK/lm-state"

[[target]]
name = "$LM_IQN"
portals = ["127.0.0.1:$LM_PORT", "127.0.0.2:$LM_PORT"]

[[target.lun]]
id = 0
volume = "lun0"
size = "$SIZE"
EOF
RUST_LOG=info "$BIN" serve --config "$WORK/lunmirror.toml" > "$WORK/lunmirror.out" 2> "$WORK/lunmirror.log" &
LM_PID=$!
wait_listen 127.0.0.1 "$LM_PORT"
wait_listen 127.0.0.2 "$LM_PORT"
run_cu lunmirror "iscsi://127.0.0.1:$LM_PORT/$LM_IQN/0" "iscsi://127.0.0.2:$LM_PORT/$LM_IQN/0"
cleanup
LM_PID=

# scan LOG: "total passed failed skipped" from the CUnit summary ("tests"
# row) and the tests that logged [SKIPPED]; with -f, the failed tests.
scan() {
    awk -v list="${2:-}" '
        /^Suite: / { suite = $2 }
        /^  Test: / { n++; name = suite "." $2 }
        /\[SKIPPED\]/ && n { skipped[n] = 1 }
        /(^|\.\.\.)FAILED *$/ && n { if (list) print "  FAILED: " name }
        /^ *tests / { t = $2; p = $4; f = $5 }
        END { if (!list) { for (i in skipped) s++; printf "%s %s %s %d\n", t, p, f, s } }' "$1"
}

echo "iscsi-test-cu $(dpkg-query -W -f='${Version}' libiscsi-bin 2>/dev/null || echo '?'), tests: $TESTS"
for t in tgt lunmirror; do
    echo
    echo "=== $t ($(grep "^$t:" "$WORK/times.txt" | cut -d' ' -f2-))"
    sed -n '/Run Summary/,/^ *asserts/p' "$WORK/$t.log"
    scan "$WORK/$t.log" -f
done
echo
echo "passed: passed without a [SKIPPED] message (CUnit counts skipped tests as passed)"
printf '%-10s %6s %7s %7s %8s\n' target tests passed failed skipped
for t in tgt lunmirror; do
    read -r total passed failed skipped < <(scan "$WORK/$t.log")
    printf '%-10s %6s %7s %7s %8s\n' "$t" "$total" "$((passed - skipped))" "$failed" "$skipped"
done
echo
echo "logs: $WORK"
