import os
import socket
import tempfile
import unittest
from unittest import mock

from lunmirror_tcmu import dbus_service


class SdNotify(unittest.TestCase):
    def test_datagram_reaches_notify_socket(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "notify")
            rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            rx.bind(path)
            self.addCleanup(rx.close)
            with mock.patch.dict(os.environ, {"NOTIFY_SOCKET": path}):
                self.assertTrue(dbus_service.sd_notify("READY=1\n"))
            self.assertEqual(rx.recv(100), b"READY=1\n")

    def test_no_socket_is_a_no_op(self):
        with mock.patch.dict(os.environ, {}, clear=True):
            self.assertFalse(dbus_service.sd_notify("READY=1\n"))


if __name__ == "__main__":
    unittest.main()
