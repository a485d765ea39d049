//! Shared helpers of the `replication_daemon_*` tests: the real daemon
//! binary, its control socket spoken as raw JSON-RPC lines, the CLI client
//! subcommands, and qemu-io over iscsi:// as the initiator (one-shot, or
//! interactive so that writes can be issued the moment an attach returns).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{self, Daemon, BIN, DEFAULT_TARGET};

pub const M: u64 = 1 << 20;
/// Timeout of one initiator command or CLI call.
pub const T: Duration = Duration::from_secs(120);

/// CIM values used by the tests.
pub const ASYNC: u64 = 2;
pub const SYNC: u64 = 3;
pub const UNSYNC_ASSOC: u64 = 4;
pub const UNSYNC_UNASSOC: u64 = 5;
pub const JOB_STARTED: i64 = 4096;
pub const SYNCHRONIZED: i64 = 6;
pub const IDLE: i64 = 11;
pub const BROKEN: i64 = 12;
pub const FRACTURED: i64 = 13;
pub const JOB_COMPLETED: i64 = 7;

/// The daemon's control socket (the default: `<state-dir>/control.sock`).
pub fn socket(d: &Daemon) -> PathBuf {
    d.state_dir.join("control.sock")
}

/// Backing file of a volume with the default path.
pub fn volume_file(d: &Daemon, volume: &str) -> PathBuf {
    d.state_dir.join("volumes").join(format!("{volume}.img"))
}

/// URL of LUN 0 of the default target.
pub fn lun0(d: &Daemon) -> String {
    d.lun_url(DEFAULT_TARGET, 0)
}

/// One connection to the control socket, speaking JSON-RPC 2.0 lines.
pub struct Rpc {
    w: UnixStream,
    r: BufReader<UnixStream>,
    next_id: u64,
}

impl Rpc {
    pub fn connect(path: &Path) -> Rpc {
        let s =
            UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        s.set_read_timeout(Some(T)).unwrap();
        Rpc {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            next_id: 1,
        }
    }

    pub fn to(d: &Daemon) -> Rpc {
        Rpc::connect(&socket(d))
    }

    /// Send bytes (a newline is appended) and read one reply line.
    pub fn raw(&mut self, line: &[u8]) -> Value {
        let mut v = line.to_vec();
        v.push(b'\n');
        self.w.write_all(&v).unwrap();
        self.recv()
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).unwrap();
    }

    pub fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self.r.read_line(&mut line).expect("read reply");
        assert!(n > 0, "control socket closed");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
    }

    /// A request whose reply must be a result; returns the result.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({"jsonrpc": "2.0", "method": method, "id": id});
        if !params.is_null() {
            req["params"] = params;
        }
        let v = self.raw(req.to_string().as_bytes());
        assert_eq!(v["jsonrpc"], "2.0", "{v}");
        assert_eq!(v["id"], json!(id), "{v}");
        assert!(v.get("error").is_none(), "{method} {req}: {v}");
        v["result"].clone()
    }

    pub fn attach(&mut self, source: &str, target: &str, copy_type: u64) -> Value {
        self.call(
            "AttachReplica",
            json!({"SourceElement": source, "TargetElement": target, "CopyType": copy_type}),
        )
    }

    pub fn modify(&mut self, operation: u64, sync: &str) -> Value {
        self.call(
            "ModifySynchronization",
            json!({"Operation": operation, "Synchronization": sync}),
        )
    }

    pub fn job_state_change(&mut self, job: &str, requested: u64) -> i64 {
        let r = self.call(
            "RequestJobStateChange",
            json!({"Job": job, "RequestedState": requested}),
        );
        r["ReturnValue"].as_i64().expect("ReturnValue")
    }

    /// The job's CIM_ConcreteJob instance.
    pub fn job(&mut self, job: &str) -> Value {
        let r = self.call("GetJob", json!({"Job": job}));
        assert_eq!(r["ReturnValue"], 0, "GetJob {job}: {r}");
        r["Instance"].clone()
    }

    /// Poll until the job is finished (JobState ≥ 7); returns the instance.
    pub fn wait_job(&mut self, job: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let j = self.job(job);
            if j["JobState"].as_i64().unwrap_or(0) >= JOB_COMPLETED {
                return j;
            }
            assert!(Instant::now() < deadline, "job {job} not finished: {j}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn synchronized(&mut self) -> Vec<Value> {
        let r = self.call("EnumerateSynchronized", Value::Null);
        r["Synchronized"].as_array().cloned().expect("Synchronized")
    }

    pub fn sync(&mut self, id: &str) -> Option<Value> {
        self.synchronized()
            .into_iter()
            .find(|s| s["Synchronization"] == id)
    }

    /// Poll EnumerateSynchronized until `pred` holds for the association.
    pub fn wait_sync(
        &mut self,
        id: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.sync(id).unwrap_or_else(|| panic!("{id} vanished"));
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{id}: not {what} after {timeout:?}: {s}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Synchronized, no job running and (Async) nothing pending in the journal.
    pub fn wait_converged(&mut self, id: &str, timeout: Duration) -> Value {
        let s = self.wait_sync(id, timeout, "Synchronized", |s| {
            s["SyncState"] == SYNCHRONIZED
        });
        if let Some(job) = s["Job"].as_str() {
            let j = self.wait_job(job, timeout);
            assert_eq!(j["JobState"], JOB_COMPLETED, "{j}");
        }
        self.wait_sync(id, timeout, "converged (lag 0)", |s| {
            s["SyncState"] == SYNCHRONIZED
                && s["OutOfSyncBytes"] == 0
                && (s["JournalPendingRecords"].is_null() || s["JournalPendingRecords"] == 0)
        })
    }
}

/// Start something that runs a copy job (`start` returns the method's
/// result, ReturnValue 4096 with `Job`) and suspend the job at once, so the
/// caller can act while the copy is certainly unfinished. A busy machine
/// can hold this process up for longer than a copy of a few dozen MiB
/// takes; when the job finished before the Suspend landed, `undo` puts
/// things back and it is tried again. Returns the result of `start`.
pub fn start_suspended(
    rpc: &mut Rpc,
    mut start: impl FnMut(&mut Rpc) -> Value,
    mut undo: impl FnMut(&mut Rpc, &Value),
) -> Value {
    for attempt in 1..=5 {
        let r = start(rpc);
        assert_eq!(r["ReturnValue"], 4096, "{r}");
        let job = r["Job"].as_str().expect("Job").to_string();
        let rv = rpc.job_state_change(&job, 3);
        let j = rpc.job(&job);
        if rv == 0 && j["JobState"] == 5 {
            assert!(j["PercentComplete"].as_i64().unwrap() < 100, "{j}");
            return r;
        }
        assert!(rv == 0 || rv == 4097, "Suspend of {job}: {rv}");
        println!("attempt {attempt}: {job} finished before the Suspend landed; again");
        rpc.wait_job(&job, T);
        undo(rpc, &r);
    }
    panic!("could not suspend a copy job while it ran (5 attempts)");
}

/// Undo for [`start_suspended`] after an attach: detach the association
/// (UnSyncUnAssoc removes itself).
pub fn detach_after(rpc: &mut Rpc, r: &Value) {
    let sync = r["Synchronization"].as_str().expect("Synchronization");
    let d = rpc.modify(2, sync);
    assert!(
        d["ReturnValue"] == 0 || d["ReturnValue"] == 5,
        "detach: {d}"
    );
}

/// Run a CLI client subcommand against the daemon (`--state-dir` added).
pub fn cli(d: &Daemon, args: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.arg(args[0]).arg("--state-dir").arg(&d.state_dir);
    c.args(&args[1..]);
    common::run(&mut c, T)
}

/// Like [`cli`], requiring exit status 0; returns stdout.
pub fn cli_ok(d: &Daemon, args: &[&str]) -> String {
    let out = cli(d, args);
    assert!(
        out.status.success(),
        "lunmirror {args:?} exited {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One qemu-io process running `cmds`; every command must succeed.
pub fn qemu_io<S: AsRef<str>>(url: &str, cmds: &[S]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.arg("-c").arg(x.as_ref());
    }
    c.arg(url);
    let shown = format!("{c:?}");
    let out = common::run(&mut c, T);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{shown} failed:\n{text}");
    assert_no_failure(&shown, &text);
    text
}

fn assert_no_failure(what: &str, text: &str) {
    for bad in ["failed", "error", "Error", "Pattern verification"] {
        assert!(!text.contains(bad), "{what}:\n{text}");
    }
}

const PROMPT: &str = "qemu-io> ";

/// An interactive qemu-io connected to a LUN: commands go to its stdin and
/// each one's output is collected up to the next prompt, so a command has
/// completed (the initiator got its SCSI status) when [`QemuIo::cmd`]
/// returns.
pub struct QemuIo {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<(Mutex<String>, Condvar)>,
    /// Prompts seen so far that belong to earlier commands.
    consumed: usize,
    url: String,
}

impl QemuIo {
    pub fn open(url: &str) -> QemuIo {
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw", url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu-io");
        let out = Arc::new((Mutex::new(String::new()), Condvar::new()));
        for r in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let out = out.clone();
            std::thread::spawn(move || {
                let mut r = r;
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let (m, cv) = &*out;
                    m.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                    cv.notify_all();
                }
                out.1.notify_all();
            });
        }
        let stdin = child.stdin.take();
        let mut q = QemuIo {
            child,
            stdin,
            out,
            consumed: 0,
            url: url.to_string(),
        };
        // The first prompt means the LUN is open (login done).
        q.wait_prompts(1, "open");
        q.consumed = 1;
        q
    }

    fn wait_prompts(&mut self, n: usize, what: &str) -> String {
        let deadline = Instant::now() + T;
        let (m, cv) = &*self.out;
        let mut g = m.lock().unwrap();
        loop {
            if g.matches(PROMPT).count() >= n {
                return g.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || matches!(self.child.try_wait(), Ok(Some(_))) {
                panic!("qemu-io {} ({what}): no prompt; output:\n{}", self.url, *g);
            }
            g = cv
                .wait_timeout(g, left.min(Duration::from_millis(100)))
                .unwrap()
                .0;
        }
    }

    /// Run one command; returns its output. It must not report a failure.
    pub fn cmd(&mut self, c: &str) -> String {
        let text = self.cmd_unchecked(c);
        assert_no_failure(&format!("qemu-io {c:?}"), &text);
        text
    }

    /// Run one command; returns its output whatever it says.
    pub fn cmd_unchecked(&mut self, c: &str) -> String {
        let stdin = self.stdin.as_mut().expect("qemu-io closed");
        stdin
            .write_all(format!("{c}\n").as_bytes())
            .unwrap_or_else(|e| panic!("qemu-io {c:?}: {e}"));
        stdin.flush().unwrap();
        let all = self.wait_prompts(self.consumed + 1, c);
        let text = all
            .split(PROMPT)
            .nth(self.consumed)
            .unwrap_or_default()
            .to_string();
        self.consumed += 1;
        text
    }

    /// `quit` and require a clean exit.
    pub fn close(mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"quit\n");
        }
        let deadline = Instant::now() + T;
        loop {
            match self.child.try_wait().unwrap() {
                Some(st) => {
                    assert!(st.success(), "qemu-io exited {st}");
                    return;
                }
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                None => panic!("qemu-io did not quit"),
            }
        }
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A file of `size` bytes filled with `byte` (a replica starts with junk,
/// so that a copy that skips a region shows).
pub fn filled_file(path: &Path, size: u64, byte: u8) {
    std::fs::write(path, vec![byte; size as usize]).unwrap();
}

/// A sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// Compare two byte images; on a difference, name the first differing
/// offset and how many bytes differ.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: sizes differ");
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
    let n = got.iter().zip(want).filter(|(a, b)| a != b).count();
    panic!(
        "{what}: {n} bytes differ, the first at offset {first:#x} ({:#04x} instead of {:#04x})",
        got[first], want[first]
    );
}

/// Compare the replica file with the primary's backing file.
pub fn assert_files_same(what: &str, replica: &Path, primary: &Path) {
    let r = std::fs::read(replica).unwrap();
    let p = std::fs::read(primary).unwrap();
    assert_same(what, &r, &p);
}

/// Bytes `off..off+len` of a file.
pub fn file_range(path: &Path, off: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, off).unwrap();
    buf
}

/// Require every byte of `off..off+len` of `path` to be `byte`.
pub fn assert_range_is(what: &str, path: &Path, off: u64, len: u64, byte: u8) {
    let b = file_range(path, off, len);
    if let Some(i) = b.iter().position(|&x| x != byte) {
        panic!(
            "{what}: {} byte {:#x} is {:#04x}, expected {byte:#04x}",
            path.display(),
            off + i as u64,
            b[i]
        );
    }
}

/// A tmpfs mounted on a fresh directory, unmounted on drop. `None` (after a
/// SKIPPED line, or a failure under CI) when mounting is not possible.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let out = common::run(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size},mode=0700"))
                .arg("tmpfs")
                .arg(dir),
            T,
        );
        if !out.status.success() {
            common::skip(&format!(
                "cannot mount a tmpfs (needs root / CAP_SYS_ADMIN): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            return None;
        }
        Some(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }

    /// Remount with other options (e.g. `ro`).
    pub fn remount(&self, opts: &str) {
        let out = common::run(
            Command::new("mount")
                .args(["-o", &format!("remount,{opts}")])
                .arg(&self.dir),
            T,
        );
        assert!(
            out.status.success(),
            "remount {opts}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Read the whole output of a line-oriented CLI table and find the line of
/// an association.
pub fn replicas_line(d: &Daemon, sync: &str) -> Option<String> {
    let text = cli_ok(d, &["replicas"]);
    let mut lines = text.lines();
    let found = lines.by_ref().find(|l| l.starts_with(sync))?;
    // An "error:" continuation line belongs to the association above it.
    let next = lines
        .next()
        .filter(|l| l.trim_start().starts_with("error:"));
    Some(match next {
        Some(e) => format!("{found}\n{e}"),
        None => found.to_string(),
    })
}

/// Convenience for `BufRead` users.
pub fn lines_of(b: &[u8]) -> Vec<String> {
    b.lines().map_while(Result::ok).collect()
}
