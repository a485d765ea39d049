//! SIGKILL under load: a child process (this test binary re-executed) runs
//! the registry with an attached replica and writes continuously; the
//! parent kills it with SIGKILL, restarts the registry on the same state
//! directory and checks that the replica converges to the primary (journal
//! replay for Async, activity-log resync for Sync).

mod replication_common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lunmirror::block::{BlockDev, SharedDev, WriteFlags};
use lunmirror::mirror::fault::FaultDev;
use lunmirror::registry::RegistryConfig;
use replication_common::*;

const SIZE: u64 = 4 * MB;

/// The child side: only active when started by `kill_and_restart`.
#[test]
fn crash_child() {
    let (Ok(dir), Ok(ct)) = (
        std::env::var("LM_CRASH_DIR"),
        std::env::var("LM_CRASH_TYPE"),
    ) else {
        return;
    };
    let dir = Path::new(&dir);
    let ct: u16 = ct.parse().unwrap();
    // A slow replica, so that an Async journal holds records at kill time.
    let cfg = RegistryConfig {
        opener: Arc::new(|p: &Path| {
            let f = FaultDev::new(lunmirror::registry::open_target_file(p)?);
            f.write_delay(Duration::from_millis(2));
            Ok(Arc::new(f) as SharedDev)
        }),
        ..test_config()
    };
    let d = Daemon::start(dir, cfg, &[("lun0", SIZE, true)]);
    let target = dir.join("replica.img");
    let r = d
        .reg
        .attach_replica("lun0", &target.display().to_string(), u64::from(ct));
    assert_eq!(r.return_value.code(), 4096);
    d.reg
        .wait_job(r.job.as_deref().unwrap(), Duration::from_secs(60));
    let vol = d.vol("lun0");
    let writers: Vec<_> = (0..3u64)
        .map(|t| {
            let vol = vol.clone();
            std::thread::spawn(move || {
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t + 1);
                loop {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let len = 512 * (1 + x % 32);
                    let off = (x >> 9) % (SIZE - len) / 512 * 512;
                    let data = vec![(x >> 5) as u8; len as usize];
                    let fua = x % 11 == 0;
                    vol.write_at(&data, off, WriteFlags { fua }).unwrap();
                    if x % 29 == 0 {
                        vol.flush().unwrap();
                    }
                }
            })
        })
        .collect();
    std::fs::write(dir.join("ready"), b"1").unwrap();
    for w in writers {
        let _ = w.join();
    }
}

fn kill_and_restart(ct: u16) {
    let dir = tempfile::tempdir().unwrap();
    make_file(&dir.path().join("replica.img"), SIZE, 200);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env("LM_CRASH_DIR", dir.path())
        .env("LM_CRASH_TYPE", ct.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir.path().join("ready").exists() {
        assert!(Instant::now() < deadline, "child never got ready");
        if let Some(st) = child.try_wait().unwrap() {
            panic!("child exited early: {st}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(400));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // Something must be left to recover, or the test proves nothing.
    let journal_bytes: u64 = std::fs::read_dir(dir.path().join("state/sync-1/journal"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "jnl"))
                .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                .sum()
        })
        .unwrap_or(0);
    if ct == 2 {
        assert!(
            journal_bytes > 0,
            "the killed daemon left no journal records"
        );
    }

    let d = Daemon::start(dir.path(), test_config(), &[("lun0", SIZE, true)]);
    let mut c = d.client();
    let s = c.enumerate_synchronized().unwrap().remove(0);
    assert_eq!(s.copy_type, ct);
    assert!(
        s.job.is_some(),
        "regions in flight at the kill are resynchronised"
    );
    if let Some(job) = &s.job {
        assert_eq!(wait_job(&mut c, job, Duration::from_secs(60)), 7);
    }
    if ct == 2 {
        wait_lag_zero(&mut c, &s.synchronization, Duration::from_secs(60));
    }
    let s = c.enumerate_synchronized().unwrap().remove(0);
    assert_eq!(s.sync_state, 6, "{s:?}");
    let primary = read_all(d.vol("lun0").primary().as_ref());
    let replica = file_prefix(&dir.path().join("replica.img"), SIZE as usize);
    let differing = primary
        .chunks(4096)
        .zip(replica.chunks(4096))
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        differing, 0,
        "replica differs from primary in {differing} blocks"
    );
    d.stop();
}

#[test]
fn async_replica_converges_after_sigkill_under_load() {
    kill_and_restart(2);
}

#[test]
fn sync_replica_converges_after_sigkill_under_load() {
    kill_and_restart(3);
}
