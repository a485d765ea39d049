import json
import os
import tempfile
import unittest

from lunmirror_tcmu import cfgstring

HERE = os.path.dirname(os.path.abspath(__file__))


class SharedVectors(unittest.TestCase):
    def test_vectors_agree_with_rust(self):
        with open(os.path.join(HERE, "cfgstring_vectors.json")) as f:
            cases = json.load(f)["cases"]
        self.assertGreaterEqual(len(cases), 10)
        for c in cases:
            with self.subTest(dev_config=c["dev_config"]):
                try:
                    got = cfgstring.parse_dev_config(c["dev_config"])
                    ok = True
                except cfgstring.CfgError:
                    ok = False
                self.assertEqual(ok, c["ok"])
                if ok and "path" in c:
                    self.assertEqual(got["path"], c["path"])
                if ok and "replicas" in c:
                    self.assertEqual(got["replicas"], c["replicas"])


class Parsing(unittest.TestCase):
    def test_options(self):
        c = cfgstring.parse("/a.img;size=64M;replica=/r1;replica=/r2;copytype=async;ro=no")
        self.assertEqual(c["size"], 64 << 20)
        self.assertEqual(c["replicas"], ["/r1", "/r2"])
        self.assertEqual(c["copytype"], "async")

    def test_sizes(self):
        self.assertEqual(cfgstring.parse_size("1GiB"), 1 << 30)
        self.assertEqual(cfgstring.parse_size("2k"), 2048)
        self.assertIsNone(cfgstring.parse_size("1X"))
        self.assertIsNone(cfgstring.parse_size("99999999999T"))

    def test_messages_are_specific(self):
        with self.assertRaisesRegex(cfgstring.CfgError, "unknown option 'bogus'"):
            cfgstring.parse("/a;bogus=1")
        with self.assertRaisesRegex(cfgstring.CfgError, "absolute"):
            cfgstring.parse("a.img")


class CheckConfigFilesystem(unittest.TestCase):
    def setUp(self):
        self.d = tempfile.TemporaryDirectory()
        self.addCleanup(self.d.cleanup)

    def p(self, name):
        return os.path.join(self.d.name, name)

    def test_missing_file_in_existing_dir_is_ok(self):
        self.assertEqual(cfgstring.check_config("mirror/" + self.p("new.img")), (True, "ok"))

    def test_missing_dir_is_refused(self):
        ok, msg = cfgstring.check_config("mirror/" + self.p("no/such/dir.img"))
        self.assertFalse(ok)
        self.assertIn("directory", msg)

    def test_create_no_needs_the_file(self):
        ok, msg = cfgstring.check_config("mirror/%s;create=no" % self.p("x.img"))
        self.assertFalse(ok)
        open(self.p("x.img"), "w").close()
        self.assertTrue(cfgstring.check_config("mirror/%s;create=no" % self.p("x.img"))[0])

    def test_replicas_must_exist(self):
        ok, msg = cfgstring.check_config("mirror/%s;replica=%s" % (self.p("a.img"), self.p("r.img")))
        self.assertFalse(ok)
        self.assertIn("never created", msg)
        open(self.p("r.img"), "w").close()
        self.assertTrue(cfgstring.check_config("mirror/%s;replica=%s" % (self.p("a.img"), self.p("r.img")))[0])

    def test_directory_as_backing_is_refused(self):
        ok, msg = cfgstring.check_config("mirror/" + self.d.name)
        self.assertFalse(ok)

    def test_syntax_only(self):
        self.assertTrue(cfgstring.check_config("mirror//no/such/dir/x.img", fs=False)[0])
        self.assertFalse(cfgstring.check_config("qcow//x.img", fs=False)[0])


if __name__ == "__main__":
    unittest.main()
