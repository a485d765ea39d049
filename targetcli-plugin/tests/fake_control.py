"""A fake lunmirror control socket for the tests: JSON-RPC 2.0, one object
per line, a tiny in-memory model of volumes, associations and jobs."""

import json
import os
import socketserver
import tempfile
import threading


class Model:
    def __init__(self):
        self.volumes = ["disk0", "disk1"]
        self.assocs = []
        self.jobs = {}
        self.calls = []
        self.next_job = 1
        self.lock = threading.Lock()
        self.job_polls_to_finish = 2

    def job(self, desc):
        jid = "lunmirror:%d" % self.next_job
        self.next_job += 1
        self.jobs[jid] = {"InstanceID": jid, "JobState": 4, "PercentComplete": 0,
                          "Description": desc, "polls": 0}
        return jid

    def handle(self, method, params):
        self.calls.append((method, params))
        if method == "AttachReplica":
            src, tgt, ct = params.get("SourceElement"), params.get("TargetElement"), params.get("CopyType")
            if not isinstance(ct, int):
                raise RpcFault(-32602, "CopyType must be an integer")
            if src not in self.volumes or not str(tgt).startswith("/"):
                return {"ReturnValue": 5, "Job": None, "Synchronization": None,
                        "ErrorDescription": "unknown SourceElement %r" % src}
            if any(a["SyncedElement"] == tgt for a in self.assocs):
                return {"ReturnValue": 6}
            sid = "sync:%d" % (len(self.assocs) + 1)
            self.assocs.append({"Synchronization": sid, "SystemElement": src, "SyncedElement": tgt,
                                "CopyType": ct, "SyncState": 15, "PercentSynced": 0})
            return {"ReturnValue": 4096, "Job": self.job("copy %s" % tgt)}
        if method == "ModifySynchronization":
            op, sid = params.get("Operation"), params.get("Synchronization")
            match = [a for a in self.assocs if a["Synchronization"] == sid]
            if not match:
                return {"ReturnValue": 5}
            if op == 2:
                self.assocs.remove(match[0])
                return {"ReturnValue": 0}
            if op == 3:
                match[0]["SyncState"] = 13
                return {"ReturnValue": 0}
            if op == 4:
                match[0]["SyncState"] = 5
                return {"ReturnValue": 4096, "Job": self.job("resync")}
            return {"ReturnValue": 1}
        if method == "EnumerateSynchronized":
            return {"Synchronized": self.assocs}
        if method == "EnumerateVolumes":
            return {"Volumes": [{"Name": v} for v in self.volumes]}
        if method == "EnumerateJobs":
            return {"Jobs": [{k: v for k, v in j.items() if k != "polls"} for j in self.jobs.values()]}
        if method == "GetJob":
            # As the daemon answers (docs/control-protocol.md): the job is
            # the "Instance"; an unknown job is ReturnValue 5, Instance null.
            j = self.jobs.get(params.get("Job"))
            if j is None:
                return {"ReturnValue": 5, "Instance": None,
                        "ErrorDescription": "unknown Job %r" % params.get("Job")}
            j["polls"] += 1
            j["PercentComplete"] = min(100, j["polls"] * 50)
            if j["polls"] >= self.job_polls_to_finish and j["JobState"] == 4:
                j["JobState"] = 7
                for a in self.assocs:
                    a["SyncState"] = 6
                    a["PercentSynced"] = 100
            return {"ReturnValue": 0, "Instance": {k: v for k, v in j.items() if k != "polls"}}
        if method == "RequestJobStateChange":
            j = self.jobs.get(params.get("Job"))
            if j is None:
                return {"ReturnValue": 5}
            j["JobState"] = 8
            return {"ReturnValue": 0}
        raise RpcFault(-32601, "Method not found")


class RpcFault(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


class FakeControl:
    """Context manager: a server thread on a temp Unix socket."""

    def __init__(self):
        self.model = Model()
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "control.sock")
        model = self.model

        class H(socketserver.StreamRequestHandler):
            def handle(self):
                for line in self.rfile:
                    try:
                        req = json.loads(line)
                        rid = req.get("id")
                    except ValueError:
                        self.send({"jsonrpc": "2.0", "id": None,
                                   "error": {"code": -32700, "message": "Parse error"}})
                        continue
                    with model.lock:
                        try:
                            res = model.handle(req.get("method"), req.get("params") or {})
                            self.send({"jsonrpc": "2.0", "id": rid, "result": res})
                        except RpcFault as f:
                            self.send({"jsonrpc": "2.0", "id": rid,
                                       "error": {"code": f.code, "message": f.message}})

            def send(self, obj):
                self.wfile.write(json.dumps(obj).encode() + b"\n")

        self.server = socketserver.ThreadingUnixStreamServer(self.path, H)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.dir.cleanup()
