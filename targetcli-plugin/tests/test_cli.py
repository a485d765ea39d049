import io
import os
import tempfile
import unittest

from lunmirror_tcmu import cli, control
from fake_control import FakeControl


def run(fc, *words, lio_core="/nonexistent/configfs"):
    out = io.StringIO()
    rc = cli.main(["--socket", fc.path] + list(words), out=out, lio_core=lio_core)
    return rc, out.getvalue()


class Client(unittest.TestCase):
    def test_call_and_errors(self):
        with FakeControl() as fc, control.ControlClient(fc.path) as c:
            self.assertEqual(c.enumerate_volumes(), {"Volumes": [{"Name": "disk0"}, {"Name": "disk1"}]})
            with self.assertRaises(control.RpcError) as e:
                c.call("NoSuchMethod", {})
            self.assertEqual(e.exception.code, -32601)
            # The connection survives an error.
            self.assertEqual(c.enumerate_jobs(), {"Jobs": []})

    def test_wire_names(self):
        with FakeControl() as fc, control.ControlClient(fc.path) as c:
            c.attach_replica("disk0", "/r.img", 3)
            self.assertEqual(fc.model.calls[-1], ("AttachReplica", {
                "SourceElement": "disk0", "TargetElement": "/r.img", "CopyType": 3}))

    def test_missing_daemon(self):
        c = control.ControlClient("/nonexistent/control.sock")
        with self.assertRaises(OSError):
            c.enumerate_jobs()


class Commands(unittest.TestCase):
    def test_attach_wait_and_list(self):
        with FakeControl() as fc:
            rc, out = run(fc, "/backstores/user:mirror/disk0", "attach_replica",
                          "target=/srv/r.img", "copytype=async", "wait=yes")
            self.assertEqual(rc, 0, out)
            self.assertIn("job lunmirror:1 started", out)
            self.assertIn("Completed (7)", out)
            self.assertEqual(fc.model.calls[0][1]["CopyType"], 2)
            rc, out = run(fc, "/backstores/user:mirror/disk0", "replicas")
            self.assertEqual(rc, 0)
            self.assertIn("disk0 -> /srv/r.img [async] Synchronized (6) 100% synced (sync=sync:1)", out)
            rc, out = run(fc, "/backstores/user:mirror", "ls")
            self.assertIn("o- disk0", out)
            self.assertIn("o- disk1", out)

    def test_ls_shows_only_lio_user_mirror_objects_when_configfs_is_visible(self):
        with FakeControl() as fc, tempfile.TemporaryDirectory() as core:
            # disk0 is a user:mirror object; disk1 is a built-in iSCSI LUN
            # of the daemon; "q" is another handler's object.
            for hba, obj, cfg in (("user_1", "disk0", "mirror//srv/d0.img"),
                                  ("user_2", "q", "qcow//srv/q.qcow2"),
                                  ("fileio_0", "disk1", "")):
                os.makedirs(os.path.join(core, hba, obj))
                with open(os.path.join(core, hba, obj, "info"), "w") as f:
                    f.write("Status: ACTIVATED  Max Queue Depth: 0\n        Config: %s Size: 1048576\n" % cfg)
            rc, out = run(fc, "/backstores/user:mirror", "ls", lio_core=core)
            self.assertEqual(rc, 0, out)
            self.assertIn("o- disk0", out)
            self.assertNotIn("disk1", out)
            self.assertNotIn("o- q", out)
            self.assertEqual(cli.lio_user_objects(core=core), {"disk0"})
            self.assertEqual(cli.lio_user_objects("qcow", core=core), {"q"})
            self.assertIsNone(cli.lio_user_objects(core=os.path.join(core, "missing")))

    def test_unknown_job_is_an_error_with_the_reason(self):
        with FakeControl() as fc:
            rc, out = run(fc, "/jobs", "show", "id=lunmirror:99")
            self.assertEqual(rc, 1)
            rc, out = run(fc, "/jobs", "wait", "id=lunmirror:99")
            self.assertEqual(rc, 1)

    def test_return_values_become_errors(self):
        with FakeControl() as fc:
            rc, _ = run(fc, "/backstores/user:mirror/nosuch", "attach_replica", "target=/r.img")
            self.assertEqual(rc, 1)
            run(fc, "/backstores/user:mirror/disk0", "attach_replica", "target=/r.img")
            rc, _ = run(fc, "/backstores/user:mirror/disk1", "attach_replica", "target=/r.img")
            self.assertEqual(rc, 1)  # In Use

    def test_association_operations(self):
        with FakeControl() as fc:
            run(fc, "/backstores/user:mirror/disk0", "attach_replica", "target=/a.img")
            run(fc, "/backstores/user:mirror/disk0", "attach_replica", "target=/b.img")
            rc, _ = run(fc, "/backstores/user:mirror/disk0", "fracture")
            self.assertEqual(rc, 1, "ambiguous without target=")
            rc, out = run(fc, "/backstores/user:mirror/disk0", "fracture", "target=/b.img")
            self.assertEqual(rc, 0, out)
            self.assertEqual(fc.model.calls[-1], ("ModifySynchronization", {"Operation": 3, "Synchronization": "sync:2"}))
            rc, out = run(fc, "/backstores/user:mirror/disk0", "resync", "target=/b.img", "wait=yes")
            self.assertEqual(rc, 0, out)
            rc, _ = run(fc, "/backstores/user:mirror/disk0", "detach_replica", "target=/a.img")
            self.assertEqual(rc, 0)
            self.assertEqual([a["SyncedElement"] for a in fc.model.assocs], ["/b.img"])
            rc, _ = run(fc, "/backstores/user:mirror/disk0", "detach_replica")
            self.assertEqual(rc, 0)
            rc, _ = run(fc, "/backstores/user:mirror/disk0", "detach_replica")
            self.assertEqual(rc, 1, "no replica left")

    def test_jobs(self):
        with FakeControl() as fc:
            run(fc, "/backstores/user:mirror/disk0", "attach_replica", "target=/a.img")
            rc, out = run(fc, "/jobs", "ls")
            self.assertIn("lunmirror:1: Running (4)", out)
            rc, out = run(fc, "/jobs", "show", "id=lunmirror:1")
            self.assertEqual(rc, 0)
            rc, out = run(fc, "/jobs", "terminate", "id=lunmirror:1")
            self.assertEqual(rc, 0)
            rc, out = run(fc, "/jobs", "wait", "id=lunmirror:1")
            self.assertEqual(rc, 1, "a terminated job is a failure to wait for")
            rc, _ = run(fc, "/jobs", "show", "id=lunmirror:99")
            self.assertEqual(rc, 1)

    def test_usage_errors(self):
        with FakeControl() as fc:
            self.assertEqual(run(fc, "/backstores/user:mirror/disk0", "attach_replica")[0], 2)
            self.assertEqual(run(fc, "/backstores/user:mirror/disk0", "attach_replica",
                                 "target=/x", "copytype=weird")[0], 2)
            self.assertEqual(run(fc, "/backstores/user:mirror/disk0", "frobnicate")[0], 2)
            self.assertEqual(run(fc, "/jobs", "show")[0], 2)
            self.assertEqual(run(fc, "/backstores/user:mirror/disk0", "replicas", "novalue")[0], 2)

    def test_no_daemon_is_an_error_not_a_traceback(self):
        out = io.StringIO()
        self.assertEqual(cli.main(["--socket", "/nonexistent.sock", "/jobs", "ls"], out=out), 1)


if __name__ == "__main__":
    unittest.main()
