"""JSON-RPC 2.0 client of the lunmirror control socket (one JSON object
per line over a Unix stream socket; see docs/control-protocol.md)."""

import itertools
import json
import os
import socket

DEFAULT_SOCKET = os.environ.get("LUNMIRROR_CONTROL_SOCKET", "/var/lib/lunmirror/control.sock")

# CIM values used on the wire (docs/control-protocol.md).
COPY_TYPES = {"async": 2, "sync": 3, "unsync-assoc": 4, "unsync-unassoc": 5}
OPERATIONS = {"detach": 2, "fracture": 3, "resync": 4, "restore": 5,
              "reset-to-sync": 10, "reset-to-async": 11}
RETURN_VALUES = {0: "Completed with No Error", 1: "Not Supported", 2: "Unknown/Unspecified Error",
                 3: "Timeout", 4: "Failed", 5: "Invalid Parameter", 6: "In Use",
                 4096: "Method Parameters Checked - Job Started"}
JOB_STATES = {2: "New", 3: "Starting", 4: "Running", 5: "Suspended", 6: "Shutting Down",
              7: "Completed", 8: "Terminated", 9: "Killed", 10: "Exception", 11: "Service",
              32767: "Query Pending"}
SYNC_STATES = {2: "Initialized", 3: "Prepare In Progress", 4: "Prepared", 5: "Resync In Progress",
               6: "Synchronized", 7: "Fracture In Progress", 8: "Quiesce In Progress", 9: "Quiesced",
               10: "Restore In Progress", 11: "Idle", 12: "Broken", 13: "Fractured", 14: "Frozen",
               15: "Copy In Progress"}


class RpcError(Exception):
    """A JSON-RPC error object from the daemon."""

    def __init__(self, code, message, data=None):
        super().__init__("%s (code %s)" % (message, code))
        self.code = code
        self.message = message
        self.data = data


class ControlClient:
    def __init__(self, path=DEFAULT_SOCKET, timeout=30.0):
        self.path = path
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._sock = None
        self._buf = b""

    def _connect(self):
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            s.connect(self.path)
            self._sock = s
        return self._sock

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _readline(self):
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("control socket closed by the daemon")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def call(self, method, params=None):
        """Call `method`; returns the result or raises RpcError."""
        s = self._connect()
        rid = next(self._ids)
        req = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            req["params"] = params
        s.sendall(json.dumps(req).encode() + b"\n")
        while True:
            resp = json.loads(self._readline())
            if resp.get("id") != rid:
                continue  # a stale answer or a notification
            if "error" in resp:
                e = resp["error"] or {}
                raise RpcError(e.get("code"), e.get("message", "error"), e.get("data"))
            return resp.get("result")

    # Convenience wrappers with the control protocol's names.
    def attach_replica(self, source, target, copy_type):
        return self.call("AttachReplica", {"SourceElement": source, "TargetElement": target,
                                           "CopyType": copy_type})

    def modify_synchronization(self, operation, synchronization):
        return self.call("ModifySynchronization", {"Operation": operation,
                                                   "Synchronization": synchronization})

    def enumerate_synchronized(self):
        return self.call("EnumerateSynchronized", {})

    def enumerate_jobs(self):
        return self.call("EnumerateJobs", {})

    def get_job(self, job):
        return self.call("GetJob", {"Job": job})

    def request_job_state_change(self, job, state):
        return self.call("RequestJobStateChange", {"Job": job, "RequestedState": state})

    def enumerate_volumes(self):
        return self.call("EnumerateVolumes", {})


def items(result, *keys):
    """The list inside an Enumerate* result, whatever it is called."""
    if isinstance(result, list):
        return result
    if isinstance(result, dict):
        for k in keys:
            if isinstance(result.get(k), list):
                return result[k]
        for v in result.values():
            if isinstance(v, list):
                return v
    return []


def job_instance(result):
    """The CIM_ConcreteJob in a GetJob result (`{"ReturnValue": 0,
    "Instance": {...}}`); None for an unknown job (ReturnValue 5)."""
    if isinstance(result, dict):
        if "Instance" in result:
            return result["Instance"] if isinstance(result["Instance"], dict) else None
        if "InstanceID" in result:
            return result
    return None


def sync_id(assoc):
    """The id ModifySynchronization takes for an association."""
    for k in ("Synchronization", "InstanceID", "Id", "id"):
        if k in assoc:
            return assoc[k]
    return None
