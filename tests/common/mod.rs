//! Shared helpers for the iSCSI integration tests: an in-process server on
//! 127.0.0.1:0 with MemDev-backed LUNs, and runners for the real initiator
//! tools (skipping only when a tool is not installed).

#![allow(dead_code)]

pub mod initiator;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lunmirror::block::mem::MemDev;
use lunmirror::block::{BlockCaps, BlockDev, BlockResult, SharedDev, WriteFlags};
use lunmirror::iscsi::negotiate::TargetLimits;
use lunmirror::iscsi::{Server, ServerHandle, ServerOptions, TargetDef};
use lunmirror::scsi::{LogicalUnit, LuConfig, LunMap};

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

/// Path of an installed tool, or None (the caller prints SKIPPED).
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Skip the calling test (return) when a tool is missing.
#[macro_export]
macro_rules! require_tool {
    ($name:expr) => {
        match common::tool($name) {
            Some(p) => p,
            None => {
                println!("SKIPPED: tool {} missing", $name);
                return;
            }
        }
    };
}

/// Run a command with a timeout, capturing output.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tool");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{cmd:?} timed out after {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// Run and require exit status 0; returns stdout.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> String {
    let desc = format!("{cmd:?}");
    let out = run(cmd, timeout);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{desc} failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
