//! Shared helpers of the replication integration tests: a daemon-like
//! setup in-process (Registry + ControlServer over file-backed volumes).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lunmirror::block::file::{FileDev, FileDevOptions};
use lunmirror::block::{BlockDev, SharedDev};
use lunmirror::control::client::Client;
use lunmirror::control::ControlServer;
use lunmirror::mirror::{MirrorPolicy, MirroredVolume};
use lunmirror::registry::{Registry, RegistryConfig};

pub const MB: u64 = 1 << 20;

/// A file of `size` bytes filled with a pattern derived from `seed`.
pub fn make_file(path: &Path, size: u64, seed: u8) {
    let data: Vec<u8> = (0..size)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i / 512) as u8))
        .collect();
    std::fs::write(path, data).unwrap();
}

pub fn test_config() -> RegistryConfig {
    RegistryConfig {
        policy: MirrorPolicy {
            region_size: 64 << 10,
            ..MirrorPolicy::default()
        },
        quiesce_timeout: Duration::from_secs(2),
        housekeeping_interval: Duration::from_millis(100),
        ..RegistryConfig::default()
    }
}

pub struct Daemon {
    pub dir: PathBuf,
    pub reg: Arc<Registry>,
    pub server: Option<ControlServer>,
    pub socket: PathBuf,
    pub volumes: Vec<(String, PathBuf, Arc<MirroredVolume>)>,
}

impl Daemon {
    /// Open the state dir under `dir`, register file-backed volumes
    /// (`name`, size, exported), resume, serve the control socket.
    pub fn start(dir: &Path, cfg: RegistryConfig, vols: &[(&str, u64, bool)]) -> Daemon {
        let reg = Registry::open_with(&dir.join("state"), cfg).unwrap();
        let mut volumes = Vec::new();
        for &(name, size, exported) in vols {
            let path = dir.join(format!("{name}.img"));
            if !path.exists() {
                make_file(&path, size, 1);
            }
            let dev: SharedDev = Arc::new(FileDev::open(&path, FileDevOptions::default()).unwrap());
            let vol = MirroredVolume::new(name, dev);
            reg.add_volume(name, &path, vol.clone(), exported).unwrap();
            volumes.push((name.to_string(), path, vol));
        }
        reg.resume();
        let socket = dir.join("state").join("control.sock");
        let server = ControlServer::start(&socket, reg.clone()).unwrap();
        Daemon {
            dir: dir.to_path_buf(),
            reg,
            server: Some(server),
            socket,
            volumes,
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket).unwrap()
    }

    pub fn vol(&self, name: &str) -> Arc<MirroredVolume> {
        self.volumes
            .iter()
            .find(|v| v.0 == name)
            .map(|v| v.2.clone())
            .unwrap()
    }

    pub fn vol_path(&self, name: &str) -> PathBuf {
        self.volumes
            .iter()
            .find(|v| v.0 == name)
            .map(|v| v.1.clone())
            .unwrap()
    }

    pub fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
        self.reg.shutdown();
    }
}

/// Read a whole volume through its BlockDev.
pub fn read_all(dev: &dyn BlockDev) -> Vec<u8> {
    let mut buf = vec![0u8; dev.size() as usize];
    dev.read_at(&mut buf, 0).unwrap();
    buf
}

/// The first `len` bytes of a file.
pub fn file_prefix(path: &Path, len: usize) -> Vec<u8> {
    let mut v = std::fs::read(path).unwrap();
    v.truncate(len);
    v
}

/// Poll the job over the socket until it finished; returns its JobState.
pub fn wait_job(c: &mut Client, job: &str, timeout: Duration) -> u16 {
    let deadline = Instant::now() + timeout;
    loop {
        let info = c.get_job(job).unwrap().expect("job exists");
        if info.job_state >= 7 {
            return info.job_state;
        }
        assert!(
            Instant::now() < deadline,
            "job {job} did not finish: {info:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Poll EnumerateSynchronized until `sync` has no journal lag.
pub fn wait_lag_zero(c: &mut Client, sync: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let list = c.enumerate_synchronized().unwrap();
        let s = list
            .iter()
            .find(|s| s.synchronization == sync)
            .expect("association");
        if s.journal_pending_records == Some(0) {
            return;
        }
        assert!(Instant::now() < deadline, "lag never reached zero: {s:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
