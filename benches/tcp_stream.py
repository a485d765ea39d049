#!/usr/bin/env python3
"""One loopback TCP stream's throughput: the ceiling issue 5 compares the
1 MiB sequential read against (a target can move at most what one TCP
connection moves, and its data also has to come from somewhere).

usage: tcp_stream.py [SECONDS=3] [CHUNK=1048576]

A child process sends CHUNK-byte writes as fast as it can to a listening
socket on 127.0.0.1 (ephemeral port); the parent receives with recv_into
into one reused buffer and counts. Both sides make one system call per
CHUNK bytes, so Python's own cost is a few microseconds per megabyte:
the kernel's copy in and out dominates, as it does for a target.

Prints one line: `stream_mb_s=<MB/s> secs=<s> bytes=<n>` (MB = 10^6 B).
"""
import os
import socket
import sys
import time


def main() -> int:
    secs = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    chunk = int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 20
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        srv.close()
        c = socket.create_connection(("127.0.0.1", port))
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = memoryview(bytearray(os.urandom(chunk)))
        try:
            while True:
                c.sendall(data)
        except OSError:
            pass
        os._exit(0)
    conn, _ = srv.accept()
    buf = memoryview(bytearray(chunk))
    # Let the connection reach its steady window before counting.
    warm_end = time.monotonic() + 0.3
    while time.monotonic() < warm_end:
        conn.recv_into(buf)
    total = 0
    start = time.monotonic()
    end = start + secs
    while True:
        n = conn.recv_into(buf)
        if n == 0:
            break
        total += n
        if time.monotonic() >= end:
            break
    took = time.monotonic() - start
    conn.close()
    srv.close()
    os.waitpid(pid, 0)
    print(f"stream_mb_s={total / took / 1e6:.1f} secs={took:.2f} bytes={total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
