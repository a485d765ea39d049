//! Integration-test harness: starts the real `lunmirror` binary on an
//! ephemeral loopback port with a temporary state dir (or an in-process
//! target with in-memory LUNs), and runs real initiator tools (libiscsi-bin,
//! qemu, sg3-utils) against it with timeouts.
//!
//! Tools that are not installed make a test print `SKIPPED: <tool> not
//! installed` and return, except under CI (`CI=true`), where a missing tool
//! fails the test: CI installs everything in `.ci/run`.

#![allow(dead_code)]

pub mod initiator;

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lunmirror::block::mem::MemDev;
use lunmirror::block::{BlockCaps, BlockDev, BlockResult, SharedDev, WriteFlags};
use lunmirror::iscsi::negotiate::TargetLimits;
use lunmirror::iscsi::{Server, ServerHandle, ServerOptions, TargetDef};
use lunmirror::scsi::{LogicalUnit, LuConfig, LunMap};

/// Path of the daemon binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_lunmirror");

/// Name of the target of the default config.
pub const DEFAULT_TARGET: &str = "iqn.2026-11.io.lunmirror:default";

/// How long a daemon may take to print its listening lines.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

pub fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// Is `tool` on PATH?
pub fn tool_installed(tool: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|d| {
        let p = d.join(tool);
        std::fs::metadata(&p)
            .map(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
            .unwrap_or(false)
    })
}

/// True if every tool is installed. Otherwise prints `SKIPPED: <tool> not
/// installed` (and the test should return), or panics under CI.
pub fn require_tools(tools: &[&str]) -> bool {
    for t in tools {
        if !tool_installed(t) {
            skip(&format!("{t} not installed"));
            return false;
        }
    }
    true
}

/// Report a missing prerequisite: a SKIPPED line locally, a failure in CI.
pub fn skip(why: &str) {
    if in_ci() {
        panic!("{why} (required under CI=true; .ci/run installs it)");
    }
    println!("SKIPPED: {why}");
}

/// Run a command with a timeout, capturing its output. Panics (naming the
/// command) if it cannot be started or does not finish in time.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    let out_r = reader_thread(child.stdout.take());
    let err_r = reader_thread(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let stdout = out_r.join().unwrap_or_default();
                let stderr = err_r.join().unwrap_or_default();
                panic!(
                    "{shown} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                );
            }
            Err(e) => panic!("waiting for {shown}: {e}"),
        }
    };
    Output {
        status,
        stdout: out_r.join().unwrap_or_default(),
        stderr: err_r.join().unwrap_or_default(),
    }
}

/// Run and require exit status 0; returns stdout as text.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> String {
    let shown = format!("{cmd:?}");
    let out = run(cmd, timeout);
    assert!(
        out.status.success(),
        "{shown} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn reader_thread<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        buf
    })
}

/// Does this qemu have a working iscsi:// driver? (Debian's qemu-utils
/// needs qemu-block-extra of the same version; a mismatch shows as "Unable
/// to load module" or an unknown protocol.) Checked against a port where
/// nothing listens, so the answer comes without a target.
pub fn qemu_iscsi_supported() -> bool {
    if !require_tools(&["qemu-img", "qemu-io"]) {
        return false;
    }
    let out = run(
        Command::new("qemu-img").args([
            "info",
            "iscsi://127.0.0.1:1/iqn.2026-11.io.lunmirror:probe/0",
        ]),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let broken = [
        "Unable to load module",
        "Unknown protocol",
        "Unknown driver",
        "not whitelisted",
    ];
    if let Some(b) = broken.iter().find(|b| err.contains(*b)) {
        skip(&format!(
            "qemu iscsi:// driver unusable ({b}): install qemu-block-extra matching qemu-utils"
        ));
        return false;
    }
    true
}

/// How to start a daemon.
pub struct DaemonBuilder {
    args: Vec<OsString>,
    config: Option<String>,
    listen: Vec<String>,
    expect_listeners: Option<usize>,
    state_dir: Option<PathBuf>,
    default_state_dir: bool,
    env: Vec<(String, String)>,
}

impl Default for DaemonBuilder {
    fn default() -> Self {
        DaemonBuilder {
            args: Vec::new(),
            config: None,
            listen: vec!["127.0.0.1:0".into()],
            expect_listeners: None,
            state_dir: None,
            default_state_dir: false,
            env: Vec::new(),
        }
    }
}

impl DaemonBuilder {
    /// Extra command-line arguments after `serve`.
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Write `text` to `<tmp>/lunmirror.toml` and pass `--config`.
    /// `{tmp}` in the text is replaced by the temp dir's path.
    pub fn config(mut self, text: &str) -> Self {
        self.config = Some(text.to_string());
        self
    }

    /// Replace the default `--listen 127.0.0.1:0`; an empty list passes no
    /// `--listen` (the config's portals apply).
    pub fn listen(mut self, addrs: &[&str]) -> Self {
        self.listen = addrs.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Number of `listening on` lines to wait for (default: one per
    /// `--listen`).
    pub fn expect_listeners(mut self, n: usize) -> Self {
        self.expect_listeners = Some(n);
        self
    }

    /// Use this state dir instead of `<tmp>/state`.
    pub fn state_dir(mut self, p: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(p.into());
        self
    }

    /// Pass no `--state-dir`: the daemon uses `./lunmirror-state` (the
    /// temp dir is its working directory) or the config's.
    pub fn default_state_dir(mut self) -> Self {
        self.default_state_dir = true;
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Start the daemon and wait until it prints its listening lines.
    pub fn start(self) -> Daemon {
        let tmp = tempfile::Builder::new()
            .prefix("lunmirror-test-")
            .tempdir()
            .expect("tempdir");
        self.start_in(tmp)
    }

    /// Like `start`, in a given temp dir (e.g. to restart on the same
    /// state).
    pub fn start_in(self, tmp: tempfile::TempDir) -> Daemon {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve");
        let state_dir = if self.default_state_dir {
            tmp.path().join("lunmirror-state")
        } else {
            let s = self
                .state_dir
                .clone()
                .unwrap_or_else(|| tmp.path().join("state"));
            cmd.arg("--state-dir").arg(&s);
            s
        };
        for l in &self.listen {
            cmd.arg("--listen").arg(l);
        }
        if let Some(text) = &self.config {
            let path = tmp.path().join("lunmirror.toml");
            let text = text.replace("{tmp}", &tmp.path().display().to_string());
            std::fs::write(&path, text).expect("write config");
            cmd.arg("--config").arg(&path);
        }
        cmd.args(&self.args);
        cmd.env(
            "RUST_LOG",
            std::env::var("LUNMIRROR_TEST_LOG").unwrap_or_else(|_| "debug".into()),
        );
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.current_dir(tmp.path());
        let shown = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));

        let log = Arc::new(Mutex::new(Vec::<u8>::new()));
        let log_w = log.clone();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut line = Vec::new();
            while matches!(r.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                log_w
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&line);
                line.clear();
            }
        });
        let (tx, rx) = mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("stdout");
        let stdout_lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let lines_w = stdout_lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                lines_w
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(line.clone());
                let _ = tx.send(line);
            }
        });

        let mut d = Daemon {
            child: Some(child),
            addrs: Vec::new(),
            tmp: Some(tmp),
            state_dir,
            log,
            stdout_lines,
        };
        let want = self.expect_listeners.unwrap_or(self.listen.len()).max(1);
        let deadline = Instant::now() + START_TIMEOUT;
        while d.addrs.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("lunmirror: listening on ") {
                        d.addrs.push(
                            a.trim()
                                .parse()
                                .unwrap_or_else(|e| panic!("bad listening line {line:?}: {e}")),
                        );
                    }
                }
                Err(_) => {
                    let status = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                    panic!(
                        "daemon not listening after {START_TIMEOUT:?} (exit: {status:?})\n{shown}\n--- daemon log ---\n{}",
                        d.log()
                    );
                }
            }
        }
        d
    }
}

/// A running daemon. Dropping it kills the process; on a failing test its
/// log is printed.
pub struct Daemon {
    child: Option<Child>,
    /// Bound addresses, in the order printed.
    pub addrs: Vec<SocketAddr>,
    tmp: Option<tempfile::TempDir>,
    pub state_dir: PathBuf,
    log: Arc<Mutex<Vec<u8>>>,
    stdout_lines: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder::default()
    }

    /// Start with the default config on an ephemeral loopback port.
    pub fn start_default() -> Daemon {
        DaemonBuilder::default().start()
    }

    /// `host:port` of the first listener, IPv6 in brackets.
    pub fn portal(&self) -> String {
        self.addrs[0].to_string()
    }

    /// `iscsi://host:port`
    pub fn url(&self) -> String {
        format!("iscsi://{}", self.portal())
    }

    /// `iscsi://host:port/<target>/<lun>`
    pub fn lun_url(&self, target: &str, lun: u64) -> String {
        format!("iscsi://{}/{target}/{lun}", self.portal())
    }

    /// The temp dir holding the state dir and config.
    pub fn tmp(&self) -> &Path {
        self.tmp.as_ref().expect("tmp").path()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout_lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Send a signal and wait for the exit status.
    pub fn signal_and_wait(&mut self, sig: nix::sys::signal::Signal) -> ExitStatus {
        let mut child = self.child.take().expect("daemon already stopped");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).expect("kill");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(s)) => {
                    // Give the stderr thread a moment to drain the last lines.
                    std::thread::sleep(Duration::from_millis(50));
                    return s;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "daemon did not exit within {STOP_TIMEOUT:?} after {sig}\n--- daemon log ---\n{}",
                        self.log()
                    );
                }
            }
        }
    }

    /// SIGTERM, and require a clean exit (status 0). Returns the temp dir
    /// so the caller can inspect or restart on the state.
    pub fn stop(mut self) -> tempfile::TempDir {
        let status = self.signal_and_wait(nix::sys::signal::Signal::SIGTERM);
        assert_eq!(
            status.code(),
            Some(0),
            "daemon exited with {status} after SIGTERM\n--- daemon log ---\n{}",
            self.log()
        );
        self.tmp.take().expect("tmp")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- daemon log (pid {}) ---\n{}", self.pid(), self.log());
        }
    }
}

/// Run the binary to completion (for commands expected to fail fast).
pub fn run_lunmirror(args: &[&str], cwd: &Path) -> Output {
    run(
        Command::new(BIN).args(args).current_dir(cwd),
        Duration::from_secs(60),
    )
}

/// Allocated bytes of a file (st_blocks * 512).
pub fn allocated_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).expect("metadata").blocks() * 512
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Does `hay` contain `needle` as a contiguous byte sequence?
pub fn contains_bytes(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// A name for initiator tools, unique per test.
pub fn initiator(name: &str) -> String {
    format!("iqn.2026-11.io.lunmirror.test:{name}")
}

// ---------------------------------------------------------------------------
// In-process target (no daemon binary): one target with MemDev-backed LUNs
// on 127.0.0.1:0, for protocol-level tests of the iSCSI layer.

pub const IQN: &str = "iqn.2026-11.io.lunmirror:test";

pub struct TestTarget {
    pub addr: SocketAddr,
    pub handle: ServerHandle,
    pub devs: Vec<Arc<MemDev>>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestTarget {
    pub fn url(&self, lun: u32) -> String {
        format!("iscsi://{}/{}/{}", self.addr, IQN, lun)
    }

    pub fn portal(&self) -> String {
        self.addr.to_string()
    }

    /// Shut down and wait for the server to return.
    pub fn stop(mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread").expect("server result");
        }
    }
}

impl Drop for TestTarget {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.handle.shutdown();
            let _ = t.join();
        }
    }
}

pub fn lu_config(n: u32, block_size: u32) -> LuConfig {
    let mut naa = [0u8; 16];
    naa[0] = 0x60;
    naa[15] = n as u8;
    LuConfig {
        volume: format!("lun{n}"),
        block_size,
        read_only: false,
        serial: format!("LM{n:08}"),
        naa,
        vendor: "LUNMIRR".into(),
        product: "test".into(),
        revision: "0001".into(),
    }
}

/// A server with one target whose LUNs have the given sizes (512-byte blocks).
pub fn start(sizes: &[u64]) -> TestTarget {
    start_with(sizes, TargetLimits::default(), ServerOptions::default())
}

pub fn start_with(sizes: &[u64], limits: TargetLimits, opts: ServerOptions) -> TestTarget {
    let devs: Vec<Arc<MemDev>> = sizes.iter().map(|&s| Arc::new(MemDev::new(s))).collect();
    let shared: Vec<SharedDev> = devs.iter().map(|d| d.clone() as SharedDev).collect();
    let mut t = start_devs(shared, limits, opts);
    t.devs = devs;
    t
}

/// A server whose LUNs are the given devices (512-byte blocks).
pub fn start_devs(devs: Vec<SharedDev>, limits: TargetLimits, opts: ServerOptions) -> TestTarget {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let mut map = LunMap::new();
    for (i, dev) in devs.into_iter().enumerate() {
        map.insert(
            i as u64,
            Arc::new(LogicalUnit::new(lu_config(i as u32, 512), dev)),
        );
    }
    let target = Arc::new(TargetDef {
        name: IQN.into(),
        alias: Some("lunmirror test".into()),
        luns: Arc::new(map),
        portals: vec![addr],
        allowed_initiators: Vec::new(),
        chap: None,
        mutual_chap: None,
    });
    let server = Server::with_options(vec![target], vec![listener], limits, opts);
    let handle = server.handle();
    let thread = std::thread::spawn(move || server.run());
    TestTarget {
        addr,
        handle,
        devs: Vec::new(),
        thread: Some(thread),
    }
}

/// A device that sleeps before every write (to keep commands in flight).
#[derive(Debug)]
pub struct SlowDev {
    pub inner: MemDev,
    pub write_delay: Duration,
}

impl BlockDev for SlowDev {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> BlockResult<()> {
        std::thread::sleep(self.write_delay);
        self.inner.write_at(buf, offset, flags)
    }
    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    fn caps(&self) -> BlockCaps {
        BlockCaps::default()
    }
}

/// Path of an installed tool, or None.
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The tool's path; if it is missing, print `SKIPPED` and return from the
/// calling test (or fail it under CI, see [`skip`]).
#[macro_export]
macro_rules! require_tool {
    ($name:expr) => {
        match common::tool($name) {
            Some(p) => p,
            None => {
                common::skip(&format!("{} not installed", $name));
                return;
            }
        }
    };
}
