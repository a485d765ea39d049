"""The `user:mirror` cfgstring: `<backing file>[;option=value]...`.

Mirrors src/tcmu/cfgstring.rs; both are tested against
tests/cfgstring_vectors.json so targetcli's CheckConfig and the daemon agree.
"""

import os
import re

MAX_DEV_CONFIG = 255
SUBTYPE = "mirror"

CONFIG_DESC = (
    "mirror/<backing file>[;option=value...] "
    "options: size=N[K|M|G|T] (must match), create=yes|no (default yes: create a missing file), "
    "grow=yes|no (extend a smaller file; default no), ro=yes|no, replica=PATH (repeatable; "
    "existing file at least as large), copytype=sync|async (default sync), engine=uring|sync, "
    "direct=yes|no. No commas; at most 255 bytes with the mirror/ prefix."
)

_TRUE = {"yes", "true", "1", "on"}
_FALSE = {"no", "false", "0", "off"}


class CfgError(ValueError):
    """A refused cfgstring; str() is the CheckConfig message."""


def parse_size(v):
    """`123`, `64M`, `1G`, `1GiB` -> bytes, or None."""
    s = v.strip()
    if s.endswith("iB"):
        s = s[:-2]
    elif s.endswith("B"):
        s = s[:-1]
    m = re.fullmatch(r"([0-9]+)([KkMmGgTt]?)", s)
    if not m:
        return None
    shift = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
    n = int(m.group(1)) << shift
    return n if n < (1 << 64) else None


def _bool(key, v):
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise CfgError("bad value '%s' for %s: expected yes or no" % (v, key))


def _path(p):
    if not p.startswith("/"):
        raise CfgError("'%s' is not an absolute path" % p)
    if "," in p:
        raise CfgError("'%s' contains a comma, which the kernel's control parser splits on" % p)


def parse(cfg):
    """Parse the part after `mirror/`; returns a dict or raises CfgError."""
    if len(cfg) + len("mirror/") > MAX_DEV_CONFIG:
        raise CfgError("cfgstring is %d bytes; the kernel keeps at most %d of mirror/<cfgstring>"
                       % (len(cfg), MAX_DEV_CONFIG))
    parts = cfg.split(";")
    path = parts[0].strip()
    if not path:
        raise CfgError("empty cfgstring: expected <backing file>[;option=value...]")
    _path(path)
    c = {"path": path, "size": None, "create": True, "grow": False, "ro": False,
         "replicas": [], "copytype": "sync", "engine": None, "direct": None}
    seen = set()
    for opt in parts[1:]:
        opt = opt.strip()
        if not opt:
            continue
        if "=" not in opt:
            raise CfgError("option '%s' is not name=value" % opt)
        k, v = (x.strip() for x in opt.split("=", 1))
        if k != "replica":
            if k in seen:
                raise CfgError("option '%s' given twice" % k)
            seen.add(k)
        if k == "size":
            n = parse_size(v)
            if n is None:
                raise CfgError("bad value '%s' for size: expected N[K|M|G|T]" % v)
            c["size"] = n
        elif k in ("create", "grow", "ro", "direct"):
            c[k] = _bool(k, v)
        elif k == "replica":
            _path(v)
            if v == c["path"] or v in c["replicas"]:
                raise CfgError("bad value '%s' for replica: repeats the backing file or another replica" % v)
            c["replicas"].append(v)
        elif k == "copytype":
            if v in ("sync", "3"):
                c["copytype"] = "sync"
            elif v in ("async", "2"):
                c["copytype"] = "async"
            else:
                raise CfgError("bad value '%s' for copytype: expected sync or async" % v)
        elif k == "engine":
            if v in ("uring", "io_uring"):
                c["engine"] = "uring"
            elif v in ("sync", "pread"):
                c["engine"] = "sync"
            else:
                raise CfgError("bad value '%s' for engine: expected uring or sync" % v)
        else:
            raise CfgError("unknown option '%s'" % k)
    if c["ro"] and c["replicas"]:
        raise CfgError("a read-only device has no writes to mirror")
    return c


def parse_dev_config(dev_config, expected=SUBTYPE):
    """Parse `<subtype>/<cfgstring>` as CheckConfig receives it."""
    sub, _, rest = dev_config.partition("/")
    if sub != expected:
        raise CfgError("subtype '%s' is not '%s'" % (sub, expected))
    if len(dev_config) > MAX_DEV_CONFIG:
        raise CfgError("dev_config is %d bytes; the kernel keeps at most %d" % (len(dev_config), MAX_DEV_CONFIG))
    return parse(rest)


def check_config(dev_config, fs=True):
    """CheckConfig: (ok, message). With fs=True also check what can be
    checked before the device exists: the backing file's directory exists
    (or the file, with create=no), replicas exist."""
    try:
        c = parse_dev_config(dev_config)
    except CfgError as e:
        return False, str(e)
    if fs:
        p = c["path"]
        if os.path.exists(p):
            if not (os.path.isfile(p) or _is_blockdev(p)):
                return False, "%s is neither a regular file nor a block device" % p
        elif not c["create"]:
            return False, "%s does not exist (create=no)" % p
        elif not os.path.isdir(os.path.dirname(p) or "/"):
            return False, "directory of %s does not exist" % p
        for r in c["replicas"]:
            if not os.path.exists(r):
                return False, "replica %s does not exist (replicas are never created)" % r
    return True, "ok"


def _is_blockdev(p):
    import stat
    try:
        return stat.S_ISBLK(os.stat(p).st_mode)
    except OSError:
        return False
