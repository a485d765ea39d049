"""The D-Bus service on a private dbus-daemon, called the way targetcli
calls it (Gio proxies), in both modes."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

from gi.repository import Gio, GLib

from fake_control import FakeControl

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN = os.path.dirname(HERE)

BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir=%s</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""

HAVE_DBUS = shutil.which("dbus-daemon") is not None


@unittest.skipUnless(HAVE_DBUS, "dbus-daemon not installed")
class DBusCase(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        conf = os.path.join(self.tmp.name, "bus.conf")
        with open(conf, "w") as f:
            f.write(BUS_CONF % self.tmp.name)
        self.bus = subprocess.Popen(["dbus-daemon", "--config-file=" + conf, "--print-address=1", "--nofork"],
                                    stdout=subprocess.PIPE, text=True)
        self.addCleanup(self.bus.stdout.close)
        self.addCleanup(self.stop, self.bus)
        self.address = self.bus.stdout.readline().strip()
        self.assertTrue(self.address.startswith("unix:"), self.address)
        self.conn = Gio.DBusConnection.new_for_address_sync(
            self.address,
            Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
            None, None)
        self.addCleanup(self.conn.close_sync, None)

    @staticmethod
    def stop(p):
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()

    def start_service(self, *args):
        ready = os.path.join(self.tmp.name, "ready")
        env = dict(os.environ, PYTHONPATH=PLUGIN)
        p = subprocess.Popen([sys.executable, "-m", "lunmirror_tcmu.dbus_service", "--bus-address", self.address,
                              "--ready-file", ready, "-v"] + list(args), env=env)
        self.addCleanup(self.stop, p)
        return p, ready

    def pump_until(self, cond, timeout=10):
        ctx = GLib.MainContext.default()
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end:
                self.fail("timed out")
            ctx.iteration(False)
            time.sleep(0.02)

    def proxy(self, name, path, iface):
        return Gio.DBusProxy.new_sync(self.conn, Gio.DBusProxyFlags.NONE, None, name, path, iface, None)


class Standalone(DBusCase):
    def test_targetcli_view(self):
        p, ready = self.start_service("--mode", "own", "--control-socket", "", "--no-fs-check")
        self.pump_until(lambda: os.path.exists(ready))
        # What targetcli does: GetManagedObjects, then a proxy per object.
        mgr = self.proxy("org.kernel.TCMUService1", "/org/kernel/TCMUService1", "org.freedesktop.DBus.ObjectManager")
        objs = mgr.GetManagedObjects()
        self.assertEqual(list(objs), ["/org/kernel/TCMUService1/mirror"])
        desc = objs["/org/kernel/TCMUService1/mirror"]["org.kernel.TCMUService1"]["ConfigDesc"]
        self.assertIn("replica=PATH", desc)
        h = self.proxy("org.kernel.TCMUService1", "/org/kernel/TCMUService1/mirror", "org.kernel.TCMUService1")
        self.assertIn("copytype", h.get_cached_property("ConfigDesc").unpack())
        self.assertEqual(h.CheckConfig("(s)", "mirror//srv/a.img;replica=/srv/b.img"), (True, "ok"))
        ok, msg = h.CheckConfig("(s)", "mirror/relative.img")
        self.assertFalse(ok)
        self.assertIn("absolute", msg)
        ok, msg = h.CheckConfig("(s)", "qcow//a.img")
        self.assertFalse(ok)

    def test_refuses_without_daemon_and_accepts_with_it(self):
        with FakeControl() as fc:
            p, ready = self.start_service("--mode", "own", "--control-socket", fc.path, "--no-fs-check")
            self.pump_until(lambda: os.path.exists(ready))
            h = self.proxy("org.kernel.TCMUService1", "/org/kernel/TCMUService1/mirror", "org.kernel.TCMUService1")
            self.assertEqual(h.CheckConfig("(s)", "mirror//a.img"), (True, "ok"))
        ok, msg = h.CheckConfig("(s)", "mirror//a.img")
        self.assertFalse(ok)
        self.assertIn("not running", msg)

    def test_own_mode_fails_when_name_taken(self):
        owned = []
        Gio.bus_own_name_on_connection(self.conn, "org.kernel.TCMUService1", Gio.BusNameOwnerFlags.NONE,
                                       lambda c, n: owned.append(n), None)
        self.pump_until(lambda: owned)
        p, ready = self.start_service("--mode", "own", "--control-socket", "")
        self.assertEqual(p.wait(10), 1)


class WithTcmuRunner(DBusCase):
    """The test plays tcmu-runner: it owns org.kernel.TCMUService1 and
    serves HandlerManager1.RegisterHandler; then forwards CheckConfig."""

    MGR_XML = """<node><interface name="org.kernel.TCMUService1.HandlerManager1">
      <method name="RegisterHandler"><arg type="s" direction="in"/><arg type="s" direction="in"/>
        <arg type="b" direction="out"/><arg type="s" direction="out"/></method>
    </interface></node>"""

    def test_registers_and_answers_forwarded_checks(self):
        registered = []

        def call(conn, sender, path, iface, method, params, inv):
            registered.append((sender,) + tuple(params.unpack()))
            inv.return_value(GLib.Variant("(bs)", (True, "registered")))

        info = Gio.DBusNodeInfo.new_for_xml(self.MGR_XML).interfaces[0]
        self.conn.register_object("/org/kernel/TCMUService1/HandlerManager1", info, call, None, None)
        owned = []
        Gio.bus_own_name_on_connection(self.conn, "org.kernel.TCMUService1", Gio.BusNameOwnerFlags.NONE,
                                       lambda c, n: owned.append(n), None)
        self.pump_until(lambda: owned)
        p, ready = self.start_service("--mode", "auto", "--control-socket", "", "--no-fs-check")
        self.pump_until(lambda: registered and os.path.exists(ready))
        sender, subtype, desc = registered[0]
        self.assertEqual(subtype, "mirror")
        self.assertIn("replica=PATH", desc)
        # tcmu-runner forwards CheckConfig to the handler's own name/object.
        h = self.proxy("org.kernel.TCMUService1.HandlerManager1.mirror",
                       "/org/kernel/TCMUService1/HandlerManager1/mirror", "org.kernel.TCMUService1")
        self.assertEqual(h.CheckConfig("(s)", "mirror//x.img"), (True, "ok"))
        self.assertFalse(h.CheckConfig("(s)", "mirror/x.img")[0])
        names = self.proxy("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")
        self.assertEqual(names.GetNameOwner("(s)", "org.kernel.TCMUService1.HandlerManager1.mirror"), sender)


if __name__ == "__main__":
    unittest.main()
