"""The org.kernel.TCMUService1 D-Bus service for `user:mirror`.

targetcli lists `user:<subtype>` backstores by calling GetManagedObjects on
the system-bus name org.kernel.TCMUService1 at /org/kernel/TCMUService1; each
object /org/kernel/TCMUService1/<subtype> with interface
org.kernel.TCMUService1 (property ConfigDesc, method CheckConfig(s) -> (b, s))
becomes a backstore type, and `create` is refused when CheckConfig says no.

Two modes:
- standalone: own org.kernel.TCMUService1 and serve the object manager and
  the `mirror` handler object;
- with tcmu-runner (it owns the name): own
  org.kernel.TCMUService1.HandlerManager1.mirror, export the handler object
  at /org/kernel/TCMUService1/HandlerManager1/mirror and call
  HandlerManager1.RegisterHandler("mirror", ConfigDesc) on tcmu-runner,
  which then lists `mirror` and forwards CheckConfig to us.
`auto` (the default) tries standalone and falls back to registering.

Run: python3 -m lunmirror_tcmu.dbus_service [--mode auto|own|register]
"""

import argparse
import logging
import os
import signal
import socket
import sys

from gi.repository import Gio, GLib

from . import cfgstring

BUS_NAME = "org.kernel.TCMUService1"
ROOT_PATH = "/org/kernel/TCMUService1"
IFACE = "org.kernel.TCMUService1"
MGR_PATH = ROOT_PATH + "/HandlerManager1"
MGR_IFACE = "org.kernel.TCMUService1.HandlerManager1"
DEFAULT_CONTROL_SOCKET = "/var/lib/lunmirror/control.sock"

HANDLER_XML = """
<node>
  <interface name="org.kernel.TCMUService1">
    <method name="CheckConfig">
      <arg name="configstr" type="s" direction="in"/>
      <arg name="is_valid" type="b" direction="out"/>
      <arg name="message" type="s" direction="out"/>
    </method>
    <property name="ConfigDesc" type="s" access="read"/>
  </interface>
</node>"""

OM_XML = """
<node>
  <interface name="org.freedesktop.DBus.ObjectManager">
    <method name="GetManagedObjects">
      <arg name="objects" type="a{oa{sa{sv}}}" direction="out"/>
    </method>
    <signal name="InterfacesAdded">
      <arg name="object" type="o"/>
      <arg name="interfaces" type="a{sa{sv}}"/>
    </signal>
    <signal name="InterfacesRemoved">
      <arg name="object" type="o"/>
      <arg name="interfaces" type="as"/>
    </signal>
  </interface>
</node>"""

log = logging.getLogger("lunmirror-tcmu-dbus")


def sd_notify(state):
    """systemd Type=notify: one datagram to $NOTIFY_SOCKET (no-op without)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.sendto(state.encode(), addr)
        return True
    except OSError as e:
        log.warning("sd_notify: %s", e)
        return False
    finally:
        s.close()


def daemon_alive(path):
    """True if something accepts connections on the daemon's control socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class Checker:
    """CheckConfig policy: the cfgstring rules, plus (optionally) the
    filesystem and the daemon being up, since a `user:mirror` device nobody
    serves makes initiators hang."""

    def __init__(self, subtype=cfgstring.SUBTYPE, fs=True, control_socket=None):
        self.subtype = subtype
        self.fs = fs
        self.control_socket = control_socket

    def __call__(self, dev_config):
        ok, msg = cfgstring.check_config(dev_config, fs=self.fs)
        if ok and self.control_socket and not daemon_alive(self.control_socket):
            return False, ("the lunmirror daemon is not running (no answer on %s); "
                           "a user:mirror device without it would hang its initiators"
                           % self.control_socket)
        return ok, msg


class Service:
    """Owns the bus objects; works on any Gio.DBusConnection (tests use a
    private bus)."""

    def __init__(self, conn, checker, subtype=cfgstring.SUBTYPE, desc=cfgstring.CONFIG_DESC):
        self.conn = conn
        self.checker = checker
        self.subtype = subtype
        self.desc = desc
        self.handler_info = Gio.DBusNodeInfo.new_for_xml(HANDLER_XML).interfaces[0]
        self.om_info = Gio.DBusNodeInfo.new_for_xml(OM_XML).interfaces[0]
        self.reg_ids = []
        self.registered_with_runner = None

    # -- handler object ---------------------------------------------------
    def _handler_call(self, conn, sender, path, iface, method, params, invocation):
        if method == "CheckConfig":
            (config,) = params.unpack()
            try:
                ok, msg = self.checker(config)
            except Exception as e:  # never leave targetcli without an answer
                ok, msg = False, "internal error: %s" % e
            log.info("CheckConfig(%r) -> %s %s", config, ok, msg)
            invocation.return_value(GLib.Variant("(bs)", (bool(ok), str(msg))))
        else:
            invocation.return_dbus_error("org.freedesktop.DBus.Error.UnknownMethod", method)

    def _handler_prop(self, conn, sender, path, iface, prop):
        if prop == "ConfigDesc":
            return GLib.Variant("s", self.desc)
        return None

    def export_handler(self, path):
        rid = self.conn.register_object(path, self.handler_info, self._handler_call,
                                        self._handler_prop, None)
        self.reg_ids.append(rid)

    # -- object manager (standalone mode) ---------------------------------
    def handler_path(self):
        return "%s/%s" % (ROOT_PATH, self.subtype)

    def managed_objects(self):
        return {self.handler_path(): {IFACE: {"ConfigDesc": GLib.Variant("s", self.desc)}}}

    def _om_call(self, conn, sender, path, iface, method, params, invocation):
        if method == "GetManagedObjects":
            invocation.return_value(GLib.Variant("(a{oa{sa{sv}}})", (self.managed_objects(),)))
        else:
            invocation.return_dbus_error("org.freedesktop.DBus.Error.UnknownMethod", method)

    def export_standalone(self):
        self.reg_ids.append(self.conn.register_object(ROOT_PATH, self.om_info, self._om_call, None, None))
        self.export_handler(self.handler_path())

    def export_for_runner(self):
        self.export_handler("%s/%s" % (MGR_PATH, self.subtype))

    def register_with_runner(self, done=None):
        """Call tcmu-runner's RegisterHandler (asynchronously: tcmu-runner
        answers only once it sees our HandlerManager1.<subtype> name)."""
        def finish(conn, res):
            try:
                ok, msg = conn.call_finish(res).unpack()
            except GLib.Error as e:
                ok, msg = False, e.message
            self.registered_with_runner = bool(ok)
            log.info("RegisterHandler(%s) -> %s %s", self.subtype, ok, msg)
            if done:
                done(ok, msg)
        self.conn.call(BUS_NAME, MGR_PATH, MGR_IFACE, "RegisterHandler",
                       GLib.Variant("(ss)", (self.subtype, self.desc)), GLib.VariantType("(bs)"),
                       Gio.DBusCallFlags.NONE, -1, None, finish)

    def unexport(self):
        for rid in self.reg_ids:
            self.conn.unregister_object(rid)
        self.reg_ids = []


def run(mode, checker, subtype, bus_address=None, ready_file=None):
    """Own the names and serve until SIGTERM/SIGINT. Returns an exit code."""
    loop = GLib.MainLoop()
    if bus_address:
        conn = Gio.DBusConnection.new_for_address_sync(
            bus_address,
            Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
            None, None)
    else:
        conn = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
    svc = Service(conn, checker, subtype)
    state = {"rc": 0, "owner_ids": []}

    def ready():
        sd_notify("READY=1\nSTATUS=serving user:%s\n" % subtype)
        if ready_file:
            with open(ready_file, "w") as f:
                f.write("ready\n")

    def fail(msg):
        log.error(msg)
        state["rc"] = 1
        loop.quit()

    def go_register():
        svc.unexport()
        svc.export_for_runner()

        def own_acquired(c, name):
            log.info("owned %s; registering with tcmu-runner", name)

            def done(ok, msg):
                if ok:
                    ready()
                else:
                    fail("tcmu-runner refused RegisterHandler: %s" % msg)
            svc.register_with_runner(done)

        state["owner_ids"].append(Gio.bus_own_name_on_connection(
            conn, "%s.%s" % (MGR_IFACE, subtype), Gio.BusNameOwnerFlags.DO_NOT_QUEUE,
            own_acquired, lambda c, n: fail("lost %s" % n)))

    if mode in ("auto", "own"):
        svc.export_standalone()

        def acquired(c, name):
            log.info("owned %s: serving user:%s standalone", name, subtype)
            ready()

        def lost(c, name):
            if state.get("had_name"):
                fail("lost %s" % name)
            elif mode == "auto":
                log.info("%s is owned by someone else (tcmu-runner?): registering with it", name)
                go_register()
            else:
                fail("cannot own %s" % name)

        def acquired_wrap(c, name):
            state["had_name"] = True
            acquired(c, name)

        state["owner_ids"].append(Gio.bus_own_name_on_connection(
            conn, BUS_NAME, Gio.BusNameOwnerFlags.DO_NOT_QUEUE, acquired_wrap, lost))
    elif mode == "register":
        go_register()
    else:
        fail("unknown mode %s" % mode)

    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, lambda *a: (loop.quit(), False)[1])
    loop.run()
    for oid in state["owner_ids"]:
        Gio.bus_unown_name(oid)
    svc.unexport()
    return state["rc"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("auto", "own", "register"), default="auto")
    p.add_argument("--subtype", default=cfgstring.SUBTYPE)
    p.add_argument("--control-socket", default=os.environ.get("LUNMIRROR_CONTROL_SOCKET", DEFAULT_CONTROL_SOCKET),
                   help="refuse CheckConfig while nothing answers here ('' to skip)")
    p.add_argument("--no-fs-check", action="store_true", help="check the syntax only")
    p.add_argument("--bus-address", help="a D-Bus address instead of the system bus (tests)")
    p.add_argument("--ready-file", help="write this file once the names are owned")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(name)s: %(message)s", stream=sys.stderr)
    checker = Checker(a.subtype, fs=not a.no_fs_check, control_socket=a.control_socket or None)
    return run(a.mode, checker, a.subtype, a.bus_address, a.ready_file)


if __name__ == "__main__":
    sys.exit(main())
