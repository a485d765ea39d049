#!/usr/bin/env python3
"""iscsi_vs_tgt_login.py: what did an initiator and a target negotiate?

  iscsi_vs_tgt_login.py TARGET_PORT OUT_JSON -- INITIATOR_CMD... {PORT}

Listens on a free 127.0.0.1 port, runs INITIATOR_CMD with every `{PORT}`
replaced by that port, relays the bytes to 127.0.0.1:TARGET_PORT and
decodes the Login Request / Login Response PDUs going through (RFC 7143
§11.12-11.13: 48-byte BHS, AHS, text data segment, no digests during
login). Writes {"initiator": {...}, "target": {...}, "negotiated": {...}}
to OUT_JSON: the keys each side sent, and the operational values in force
for the session (the target's answer for negotiated keys, each side's own
MaxRecvDataSegmentLength declaration).

Only loopback is used; the proxy serves exactly one connection (the
initiator's session) and stops when the initiator command exits.
"""
import json
import socket
import subprocess
import sys
import threading

LOGIN_REQ, LOGIN_RSP = 0x03, 0x23
# Keys whose result the target states in its Login Response.
RESULT_KEYS = ("HeaderDigest", "DataDigest", "InitialR2T", "ImmediateData",
               "MaxBurstLength", "FirstBurstLength", "MaxOutstandingR2T",
               "MaxConnections", "DataPDUInOrder", "DataSequenceInOrder",
               "ErrorRecoveryLevel", "DefaultTime2Wait", "DefaultTime2Retain")


class Decoder:
    """Splits a byte stream into login PDUs until the login phase ends."""

    def __init__(self, opcode, keys):
        self.buf = b""
        self.opcode = opcode
        self.keys = keys
        self.done = False
        self.text = b""                   # a text split over PDUs (C bit)

    def feed(self, data):
        if self.done:
            return
        self.buf += data
        while len(self.buf) >= 48:
            bhs = self.buf[:48]
            ahs = bhs[4] * 4
            dlen = int.from_bytes(bhs[5:8], "big")
            total = 48 + ahs + ((dlen + 3) & ~3)
            if len(self.buf) < total:
                return
            seg, self.buf = self.buf[48 + ahs:48 + ahs + dlen], self.buf[total:]
            if bhs[0] & 0x3F != self.opcode & 0x3F:
                self.done = True          # full feature phase: stop decoding
                return
            self.text += seg
            if bhs[1] & 0x40:
                continue
            text, self.text = self.text, b""
            for kv in text.split(b"\0"):
                if b"=" in kv:
                    k, v = kv.split(b"=", 1)
                    self.keys[k.decode(errors="replace")] = v.decode(errors="replace")
            # T bit with NSG = FullFeaturePhase (3) ends the login phase.
            if bhs[1] & 0x80 and bhs[1] & 0x03 == 3:
                self.done = True
                return


def pump(src, dst, dec):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dec.feed(data)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (dst, src):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main():
    if len(sys.argv) < 5 or sys.argv[3] != "--":
        sys.exit(__doc__)
    tport, out, cmd = int(sys.argv[1]), sys.argv[2], sys.argv[4:]
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    port = ls.getsockname()[1]
    ini, tgt = {}, {}

    def serve():
        c, _ = ls.accept()
        t = socket.create_connection(("127.0.0.1", tport))
        for s in (c, t):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        a = threading.Thread(target=pump, args=(c, t, Decoder(LOGIN_REQ, ini)), daemon=True)
        a.start()
        pump(t, c, Decoder(LOGIN_RSP, tgt))
        a.join()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    rc = subprocess.call([a.replace("{PORT}", str(port)) for a in cmd],
                         stdout=subprocess.DEVNULL, timeout=60)
    th.join(5)
    neg = {k: tgt[k] for k in RESULT_KEYS if k in tgt}
    # Declarative: each side's receive limit is what it declared (8192 if not).
    neg["MaxRecvDataSegmentLength(target receives)"] = tgt.get("MaxRecvDataSegmentLength", "8192")
    neg["MaxRecvDataSegmentLength(initiator receives)"] = ini.get("MaxRecvDataSegmentLength", "8192")
    json.dump({"initiator": ini, "target": tgt, "negotiated": neg, "rc": rc},
              open(out, "w"), indent=1)
    sys.exit(rc)


if __name__ == "__main__":
    main()
