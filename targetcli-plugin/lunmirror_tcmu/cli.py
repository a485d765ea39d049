"""lunmirror-targetcli: replication commands for `user:mirror` objects, in
targetcli's `PATH COMMAND key=value...` style, over the daemon's control
socket. targetcli has no plugin mechanism, so this is a companion command
(and a small interactive shell when run without arguments).

  lunmirror-targetcli /backstores/user:mirror/disk0 attach_replica target=/srv/r.img copytype=sync wait=yes
  lunmirror-targetcli /backstores/user:mirror/disk0 replicas
  lunmirror-targetcli /backstores/user:mirror/disk0 fracture|resync|restore|detach_replica [target=PATH]
  lunmirror-targetcli /backstores/user:mirror ls
  lunmirror-targetcli /jobs ls | show id=lunmirror:1 | wait id=lunmirror:1 | terminate id=lunmirror:1

The words are the control protocol's: AttachReplica (SourceElement =
the storage object name, TargetElement, CopyType), ModifySynchronization
(Operation, Synchronization), EnumerateSynchronized, EnumerateJobs, GetJob,
RequestJobStateChange, EnumerateVolumes.
"""

import argparse
import cmd
import os
import re
import shlex
import sys
import time

from . import control
from .control import COPY_TYPES, JOB_STATES, OPERATIONS, RETURN_VALUES, SYNC_STATES

USER_PREFIX = "/backstores/user:mirror"
FINISHED_JOB_STATES = {7, 8, 9, 10}
TERMINATE = 4  # CIM_ConcreteJob RequestedState Terminate


class UsageError(Exception):
    pass


class CommandError(Exception):
    pass


def parse_kv(args):
    kv = {}
    for a in args:
        if "=" not in a:
            raise UsageError("expected key=value, got %r" % a)
        k, v = a.split("=", 1)
        kv[k.strip()] = v.strip()
    return kv


def yes(v):
    return str(v).lower() in ("1", "yes", "true", "on")


def norm_path(p):
    p = "/" + p.strip("/") if p else "/"
    return p


def volume_of(path):
    """`/backstores/user:mirror/<name>` -> name (or None for other paths)."""
    p = norm_path(path)
    if p.startswith(USER_PREFIX + "/"):
        name = p[len(USER_PREFIX) + 1:]
        if name and "/" not in name:
            return name
    return None


LIO_CORE = "/sys/kernel/config/target/core"


def lio_user_objects(subtype="mirror", core=LIO_CORE):
    """Names of the LIO `user` storage objects of `subtype` (their `info`
    says `Config: <subtype>/...`), or None when LIO's configfs is not
    visible here (then every volume of the daemon is listed)."""
    try:
        hbas = [h for h in os.listdir(core) if h.startswith("user_")]
    except OSError:
        return None
    names = set()
    for h in hbas:
        try:
            objs = os.listdir(os.path.join(core, h))
        except OSError:
            continue
        for o in objs:
            try:
                with open(os.path.join(core, h, o, "info")) as f:
                    info = f.read()
            except OSError:
                continue
            m = re.search(r"Config: ([^/\s]*)/", info)
            if m and m.group(1) == subtype:
                names.add(o)
    return names


def state_name(table, v):
    try:
        return "%s (%d)" % (table[int(v)], int(v))
    except (KeyError, TypeError, ValueError):
        return str(v)


class Shell:
    def __init__(self, client, out=sys.stdout, lio_core=LIO_CORE):
        self.client = client
        self.out = out
        self.lio_core = lio_core

    def say(self, *a):
        print(*a, file=self.out)

    # -- helpers ------------------------------------------------------------
    def associations(self, volume=None):
        res = control.items(self.client.enumerate_synchronized(), "Synchronized", "Associations")
        if volume is not None:
            res = [a for a in res if a.get("SystemElement") == volume]
        return res

    def pick_association(self, volume, kv):
        assocs = self.associations(volume)
        target = kv.get("target")
        if "sync" in kv:
            return kv["sync"]
        if target:
            assocs = [a for a in assocs if a.get("SyncedElement") == target]
        if len(assocs) == 1:
            sid = control.sync_id(assocs[0])
            if sid is None:
                raise CommandError("the daemon's association has no id field")
            return sid
        if not assocs:
            raise CommandError("%s has no replica%s" % (volume, " %s" % target if target else ""))
        raise CommandError("%s has %d replicas; say which with target=PATH: %s" % (
            volume, len(assocs), ", ".join(str(a.get("SyncedElement")) for a in assocs)))

    def check_return(self, what, res):
        rv = res.get("ReturnValue") if isinstance(res, dict) else None
        if rv in (0, 4096):
            return res
        raise CommandError("%s: ReturnValue %s (%s)%s" % (what, rv, RETURN_VALUES.get(rv, "?"), self.why(res)))

    def get_job(self, job_id):
        res = self.client.get_job(job_id)
        job = control.job_instance(res)
        if job is None:
            rv = res.get("ReturnValue") if isinstance(res, dict) else None
            raise CommandError("GetJob %s: ReturnValue %s (%s)%s" % (
                job_id, rv, RETURN_VALUES.get(rv, "?"), self.why(res)))
        return job

    @staticmethod
    def why(res):
        d = res.get("ErrorDescription") if isinstance(res, dict) else None
        return ": %s" % d if d else ""

    def show_job(self, job):
        self.say("%s: %s, %s%% complete%s" % (
            job.get("InstanceID", "?"), state_name(JOB_STATES, job.get("JobState")),
            job.get("PercentComplete", "?"),
            ("; error %s: %s" % (job.get("ErrorCode"), job.get("ErrorDescription")))
            if job.get("ErrorCode") else ""))

    def wait_job(self, job_id, interval=0.5, timeout=None):
        start = time.monotonic()
        last = None
        while True:
            job = self.get_job(job_id)
            now = (job.get("JobState"), job.get("PercentComplete"))
            if now != last:
                self.show_job(job)
                last = now
            if job.get("JobState") in FINISHED_JOB_STATES:
                if job.get("JobState") != 7:
                    raise CommandError("job %s ended %s" % (job_id, state_name(JOB_STATES, job.get("JobState"))))
                return job
            if timeout is not None and time.monotonic() - start > timeout:
                raise CommandError("job %s still running after %ss" % (job_id, timeout))
            time.sleep(interval)

    # -- commands -----------------------------------------------------------
    def run(self, path, command, args):
        path = norm_path(path)
        kv = parse_kv(args)
        vol = volume_of(path)
        if vol is not None:
            return self.volume_command(vol, command, kv)
        if path == USER_PREFIX and command == "ls":
            return self.ls_volumes()
        if path == "/jobs":
            return self.job_command(command, kv)
        if path == "/" and command == "ls":
            self.ls_volumes()
            return self.job_command("ls", {})
        raise UsageError("no command %r at %s" % (command, path))

    def volume_command(self, vol, command, kv):
        if command == "attach_replica":
            target = kv.get("target")
            if not target:
                raise UsageError("attach_replica needs target=PATH")
            ct = kv.get("copytype", "sync")
            if ct not in COPY_TYPES:
                raise UsageError("copytype must be one of %s" % ", ".join(COPY_TYPES))
            res = self.check_return("AttachReplica", self.client.attach_replica(vol, target, COPY_TYPES[ct]))
            job = res.get("Job")
            if job:
                self.say("Attaching %s to %s (%s): job %s started." % (target, vol, ct, job))
                if yes(kv.get("wait", "no")):
                    self.wait_job(job, timeout=float(kv["timeout"]) if "timeout" in kv else None)
                    self.say("Replica %s of %s is attached." % (target, vol))
            else:
                self.say("Replica %s of %s is attached (%s)." % (target, vol, ct))
            return 0
        ops = {"detach_replica": "detach", "fracture": "fracture", "resync": "resync",
               "restore": "restore", "reset_to_sync": "reset-to-sync", "reset_to_async": "reset-to-async"}
        if command in ops:
            sid = self.pick_association(vol, kv)
            res = self.check_return("ModifySynchronization",
                                    self.client.modify_synchronization(OPERATIONS[ops[command]], sid))
            job = res.get("Job")
            self.say("%s %s on %s%s." % (command, sid, vol, ": job %s started" % job if job else " done"))
            if job and yes(kv.get("wait", "no")):
                self.wait_job(job)
            return 0
        if command in ("replicas", "ls"):
            assocs = self.associations(vol)
            if not assocs:
                self.say("%s: no replicas" % vol)
            for a in assocs:
                self.say(self.fmt_assoc(a))
            return 0
        raise UsageError("unknown command %r for %s/%s" % (command, USER_PREFIX, vol))

    def fmt_assoc(self, a):
        ct = {v: k for k, v in COPY_TYPES.items()}.get(a.get("CopyType"), a.get("CopyType"))
        line = "%s -> %s [%s] %s" % (a.get("SystemElement"), a.get("SyncedElement"), ct,
                                     state_name(SYNC_STATES, a.get("SyncState")))
        if a.get("PercentSynced") is not None:
            line += " %s%% synced" % a.get("PercentSynced")
        sid = control.sync_id(a)
        if sid is not None:
            line += " (sync=%s)" % sid
        return line

    def ls_volumes(self):
        vols = control.items(self.client.enumerate_volumes(), "Volumes")
        assocs = self.associations()
        # The daemon also serves LUNs of its built-in iSCSI target; under
        # user:mirror show only what LIO has as user:mirror objects.
        lio = lio_user_objects(core=self.lio_core)
        self.say("o- user:mirror")
        for v in vols:
            name = (v.get("Name") or v.get("ElementName") or v.get("name")) if isinstance(v, dict) else v
            if lio is not None and name not in lio:
                continue
            self.say("  o- %s" % name)
            for a in assocs:
                if a.get("SystemElement") == name:
                    self.say("    o- %s" % self.fmt_assoc(a))
        return 0

    def job_command(self, command, kv):
        if command == "ls":
            jobs = control.items(self.client.enumerate_jobs(), "Jobs")
            if not jobs:
                self.say("no jobs")
            for j in jobs:
                self.show_job(j)
            return 0
        job_id = kv.get("id")
        if not job_id:
            raise UsageError("%s needs id=JOB" % command)
        if command == "show":
            self.show_job(self.get_job(job_id))
            return 0
        if command == "wait":
            self.wait_job(job_id, timeout=float(kv["timeout"]) if "timeout" in kv else None)
            return 0
        if command == "terminate":
            self.check_return("RequestJobStateChange", self.client.request_job_state_change(job_id, TERMINATE))
            self.say("job %s: termination requested" % job_id)
            return 0
        raise UsageError("unknown command %r for /jobs" % command)


class Interactive(cmd.Cmd):
    """A minimal targetcli-like prompt: cd, ls, and the commands above."""

    def __init__(self, shell):
        super().__init__()
        self.shell = shell
        self.cwd = "/"
        self.prompt = "lunmirror /> "

    def default(self, line):
        words = shlex.split(line)
        if not words:
            return False
        path = self.cwd
        if words[0].startswith("/"):
            path, words = words[0], words[1:]
        if not words:
            return False
        try:
            self.shell.run(path, words[0], words[1:])
        except (UsageError, CommandError, control.RpcError, OSError) as e:
            print("Error: %s" % e)
        return False

    def do_cd(self, arg):
        self.cwd = norm_path(arg if arg.startswith("/") else self.cwd.rstrip("/") + "/" + arg) if arg else "/"
        self.prompt = "lunmirror %s> " % self.cwd

    def do_exit(self, arg):
        return True

    do_EOF = do_exit


def main(argv=None, out=sys.stdout, lio_core=LIO_CORE):
    p = argparse.ArgumentParser(prog="lunmirror-targetcli", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--socket", default=control.DEFAULT_SOCKET, help="control socket (%(default)s)")
    p.add_argument("words", nargs="*", help="PATH COMMAND [key=value...]")
    a = p.parse_args(argv)
    client = control.ControlClient(a.socket)
    shell = Shell(client, out, lio_core)
    try:
        if not a.words:
            Interactive(shell).cmdloop()
            return 0
        words = a.words
        path = "/"
        if words[0].startswith("/"):
            path, words = words[0], words[1:]
        if not words:
            raise UsageError("no command given")
        return shell.run(path, words[0], words[1:])
    except UsageError as e:
        print("Usage error: %s" % e, file=sys.stderr)
        return 2
    except (CommandError, control.RpcError) as e:
        print("Error: %s" % e, file=sys.stderr)
        return 1
    except OSError as e:
        print("Error: cannot talk to the daemon at %s: %s" % (a.socket, e), file=sys.stderr)
        return 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
