#!/bin/bash
# Check the units with systemd-analyze: `verify` (syntax, references) and
# `security --offline` (exposure score). The units name /usr/bin/lunmirror,
# which need not be installed here: verify a copy whose ExecStart points at
# an existing binary (LUNMIRROR_BIN, default target/debug/lunmirror or /bin/true).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${LUNMIRROR_BIN:-$HERE/../target/debug/lunmirror}
[ -x "$BIN" ] || BIN=/bin/true
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
for u in lunmirror.service lunmirror-tcmu-dbus.service; do
  sed "s|/usr/bin/lunmirror|$BIN|" "$HERE/$u" > "$T/$u"
done
rc=0
echo "== systemd-analyze verify"
out=$(cd "$T" && systemd-analyze verify --man=no lunmirror.service lunmirror-tcmu-dbus.service 2>&1) || rc=1
# verify exits 0 on warnings (unknown keys...): any message is a failure.
[ -z "$out" ] || { echo "$out"; rc=1; }
for u in lunmirror.service lunmirror-tcmu-dbus.service; do
  echo "== systemd-analyze security --offline=true $u"
  systemd-analyze security --offline=true --no-pager "$T/$u" | tail -1 || rc=1
done
exit $rc
