//! Each CopyType over the control socket with file-backed volumes: write
//! while attached, then compare replica and primary bytes. Every
//! ReturnValue of AttachReplica provoked through the socket. Failing and
//! full replicas.

mod replication_common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lunmirror::block::mem::MemDev;
use lunmirror::block::{BlockDev, SharedDev, WriteFlags};
use lunmirror::mirror::fault::FaultDev;
use lunmirror::mirror::MirroredVolume;
use lunmirror::registry::RegistryConfig;
use replication_common::*;

const SIZE: u64 = 4 * MB;

/// Writes pseudo-random data at pseudo-random offsets until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<()>,
}

impl Writer {
    fn start(vol: Arc<MirroredVolume>, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (st, n) = (stop.clone(), count.clone());
        let handle = std::thread::spawn(move || {
            let mut x = seed | 1;
            while !st.load(Ordering::SeqCst) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = 512 * (1 + x % 64);
                let off = (x >> 8) % (SIZE - len) / 512 * 512;
                let data = vec![(x >> 3) as u8; len as usize];
                vol.write_at(&data, off, WriteFlags { fua: x % 17 == 0 })
                    .unwrap();
                n.fetch_add(1, Ordering::SeqCst);
            }
        });
        let w = Writer {
            stop,
            count,
            handle,
        };
        while w.count.load(Ordering::SeqCst) < 20 {
            std::thread::sleep(Duration::from_millis(1));
        }
        w
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap();
        self.count.load(Ordering::SeqCst)
    }
}

fn target(dir: &Path, name: &str, size: u64) -> String {
    let p = dir.join(name);
    make_file(&p, size, 9);
    p.display().to_string()
}

fn daemon(dir: &Path) -> Daemon {
    Daemon::start(dir, test_config(), &[("lun0", SIZE, true)])
}

#[test]
fn sync_replica_equals_primary_right_after_each_write() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path());
    let t = target(dir.path(), "sync.img", SIZE);
    let mut c = d.client();
    let w = Writer::start(d.vol("lun0"), 7);
    let r = c.attach_replica("lun0", &t, 3).unwrap();
    assert_eq!(r.return_value, 4096);
    assert_eq!(
        wait_job(&mut c, r.job.as_deref().unwrap(), Duration::from_secs(60)),
        7
    );
    let n = w.stop();
    assert!(n > 20);
    let primary = read_all(d.vol("lun0").primary().as_ref());
    assert_eq!(file_prefix(Path::new(&t), SIZE as usize), primary);
    // Synchronized: equal as soon as a write returns.
    d.vol("lun0")
        .write_at(b"right now", 777, WriteFlags::default())
        .unwrap();
    let primary = read_all(d.vol("lun0").primary().as_ref());
    assert_eq!(file_prefix(Path::new(&t), SIZE as usize), primary);
    let s = &c.enumerate_synchronized().unwrap()[0];
    assert_eq!((s.sync_state, s.copy_type, s.sync_maintained), (6, 3, true));
    d.stop();
}

#[test]
fn async_replica_converges_when_lag_reaches_zero() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path());
    let t = target(dir.path(), "async.img", SIZE);
    let mut c = d.client();
    let w = Writer::start(d.vol("lun0"), 11);
    let r = c.attach_replica("lun0", &t, 2).unwrap();
    assert_eq!(r.return_value, 4096);
    let sync = r.synchronization.unwrap();
    assert_eq!(
        wait_job(&mut c, r.job.as_deref().unwrap(), Duration::from_secs(60)),
        7
    );
    std::thread::sleep(Duration::from_millis(50));
    w.stop();
    d.vol("lun0").flush().unwrap();
    wait_lag_zero(&mut c, &sync, Duration::from_secs(30));
    let primary = read_all(d.vol("lun0").primary().as_ref());
    assert_eq!(file_prefix(Path::new(&t), SIZE as usize), primary);
    let s = &c.enumerate_synchronized().unwrap()[0];
    assert_eq!((s.sync_state, s.copy_type), (6, 2));
    assert_eq!(s.journal_pending_bytes, Some(0));
    d.stop();
}

#[test]
fn unsync_assoc_is_the_point_in_time_image_and_can_restore() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path());
    let t = target(dir.path(), "pit.img", SIZE);
    let mut c = d.client();
    let before = read_all(d.vol("lun0").primary().as_ref());
    // Writes run during the whole copy; the quiesce inside AttachReplica
    // defines the point in time, so the writer starts right after it.
    let r = c.attach_replica("lun0", &t, 4).unwrap();
    assert_eq!(r.return_value, 4096);
    let w = Writer::start(d.vol("lun0"), 13);
    assert_eq!(
        wait_job(&mut c, r.job.as_deref().unwrap(), Duration::from_secs(60)),
        7
    );
    assert!(w.stop() > 20);
    assert_eq!(file_prefix(Path::new(&t), SIZE as usize), before);
    let sync = r.synchronization.unwrap();
    let s = &c.enumerate_synchronized().unwrap()[0];
    assert_eq!((s.sync_state, s.sync_maintained), (11, false));
    // Restore from Replica brings the source back to that image.
    let r = c.modify_synchronization(5, &sync).unwrap();
    assert_eq!(r.return_value, 4096);
    assert_eq!(
        wait_job(&mut c, r.job.as_deref().unwrap(), Duration::from_secs(60)),
        7
    );
    assert_eq!(read_all(d.vol("lun0").primary().as_ref()), before);
    d.stop();
}

#[test]
fn unsync_unassoc_copies_then_forgets_the_association() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path());
    let t = target(dir.path(), "clone.img", SIZE + MB);
    let mut c = d.client();
    // An attach while writes are in flight: the image is of the quiesce
    // instant, so capture it under a paused writer.
    let before = read_all(d.vol("lun0").primary().as_ref());
    let r = c.attach_replica("lun0", &t, 5).unwrap();
    assert_eq!(r.return_value, 4096);
    let w = Writer::start(d.vol("lun0"), 17);
    assert_eq!(
        wait_job(&mut c, r.job.as_deref().unwrap(), Duration::from_secs(60)),
        7
    );
    w.stop();
    assert_eq!(file_prefix(Path::new(&t), SIZE as usize), before);
    assert!(c.enumerate_synchronized().unwrap().is_empty());
    assert_eq!(std::fs::metadata(&t).unwrap().len(), SIZE + MB);
    // The target is free again.
    assert_eq!(c.attach_replica("lun0", &t, 3).unwrap().return_value, 4096);
    d.stop();
}

#[test]
fn every_attach_return_value_over_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    // lun0: normal; empty: zero-sized; stuck: writes can be held; lun1
    // exported; spare registered but not exported.
    let stuck = Arc::new(FaultDev::new(Arc::new(MemDev::new(SIZE))));
    let cfg = RegistryConfig {
        quiesce_timeout: Duration::from_millis(200),
        ..test_config()
    };
    let reg_dir = dir.path().join("state");
    let reg = lunmirror::registry::Registry::open_with(&reg_dir, cfg).unwrap();
    let add = |name: &str, dev: SharedDev, exported: bool| {
        let v = MirroredVolume::new(name, dev);
        reg.add_volume(
            name,
            &dir.path().join(format!("{name}.img")),
            v.clone(),
            exported,
        )
        .unwrap();
        v
    };
    add("lun0", Arc::new(MemDev::new(SIZE)), true);
    add("empty", Arc::new(MemDev::new(0)), true);
    let stuck_vol = add("stuck", stuck.clone(), true);
    add("lun1", Arc::new(MemDev::new(SIZE)), true);
    add("spare", Arc::new(MemDev::new(SIZE)), false);
    reg.resume();
    let sock = reg_dir.join("control.sock");
    let server = lunmirror::control::ControlServer::start(&sock, reg.clone()).unwrap();
    let mut c = lunmirror::control::client::Client::connect(&sock).unwrap();
    let t1 = target(dir.path(), "t1.img", SIZE);
    let t2 = target(dir.path(), "t2.img", SIZE);
    let small = target(dir.path(), "small.img", SIZE / 2);
    let rv = |c: &mut lunmirror::control::client::Client, s: &str, t: &str, ct: u16| {
        c.attach_replica(s, t, ct).unwrap().return_value
    };
    // 0: completed with no job (empty source).
    let r = c.attach_replica("empty", &t2, 3).unwrap();
    assert_eq!((r.return_value, r.job), (0, None));
    c.modify_synchronization(2, &r.synchronization.unwrap())
        .unwrap();
    // 1: vendor-specific CopyType.
    assert_eq!(rv(&mut c, "lun0", &t1, 0x8001), 1);
    // 5: invalid parameters.
    assert_eq!(rv(&mut c, "nosuch", &t1, 3), 5);
    assert_eq!(rv(&mut c, "lun0", "/no/such/file", 3), 5);
    assert_eq!(rv(&mut c, "lun0", "lun0", 3), 5);
    assert_eq!(rv(&mut c, "lun0", &small, 3), 5);
    assert_eq!(rv(&mut c, "lun0", &t1, 6), 5);
    assert_eq!(rv(&mut c, "lun0", &t1, 1), 5);
    // 6: exported target; 4096; then 6 for a target already associated.
    assert_eq!(rv(&mut c, "lun0", "lun1", 3), 6);
    let r = c.attach_replica("lun0", &t1, 3).unwrap();
    assert_eq!(r.return_value, 4096);
    assert!(r.job.as_deref().unwrap().starts_with("lunmirror:"));
    assert_eq!(rv(&mut c, "lun1", &t1, 2), 6);
    assert_eq!(rv(&mut c, "lun1", "spare", 2), 4096);
    assert_eq!(rv(&mut c, "lun0", "spare", 2), 6);
    // 3: a write that never completes blocks the quiesce.
    stuck.set_gate(true);
    let v2 = stuck_vol.clone();
    let h = std::thread::spawn(move || v2.write_at(b"held", 0, WriteFlags::default()));
    while stuck_vol.locks().held_ranges().is_empty() {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(rv(&mut c, "stuck", &t2, 3), 3);
    stuck.set_gate(false);
    h.join().unwrap().unwrap();
    // 2: the state directory cannot take the association's files.
    for n in 1..100 {
        let p = reg_dir.join(format!("sync-{n}"));
        if !p.exists() {
            std::fs::write(p, b"blocker").unwrap();
        }
    }
    let r = c.attach_replica("stuck", &t2, 3).unwrap();
    assert_eq!(r.return_value, 2, "{r:?}");
    server.shutdown();
    reg.shutdown();

    // 4: the target cannot be opened.
    let dir2 = tempfile::tempdir().unwrap();
    let cfg = RegistryConfig {
        opener: Arc::new(|_: &Path| Err(std::io::Error::from_raw_os_error(libc::EROFS))),
        ..test_config()
    };
    let d = Daemon::start(dir2.path(), cfg, &[("lun0", SIZE, true)]);
    let t = target(dir2.path(), "ro.img", SIZE);
    let r = d.client().attach_replica("lun0", &t, 3).unwrap();
    assert_eq!(r.return_value, 4);
    assert!(r.error_description.unwrap().contains("Read-only"));
    d.stop();
}

#[test]
fn failing_replica_goes_broken_host_writes_succeed_resync_repairs() {
    let dir = tempfile::tempdir().unwrap();
    let replica_mem = Arc::new(MemDev::new(SIZE));
    let faulty = Arc::new(FaultDev::new(replica_mem.clone()));
    let f2 = faulty.clone();
    let cfg = RegistryConfig {
        opener: Arc::new(move |_: &Path| Ok(f2.clone() as SharedDev)),
        ..test_config()
    };
    let d = Daemon::start(dir.path(), cfg, &[("lun0", SIZE, true)]);
    let t = target(dir.path(), "r.img", SIZE);
    let mut c = d.client();
    let r = c.attach_replica("lun0", &t, 3).unwrap();
    let sync = r.synchronization.unwrap();
    assert_eq!(
        wait_job(&mut c, r.job.as_deref().unwrap(), Duration::from_secs(30)),
        7
    );
    faulty.fail_writes(true);
    let w = Writer::start(d.vol("lun0"), 23);
    w.stop();
    let s = &c.enumerate_synchronized().unwrap()[0];
    assert_eq!(s.sync_state, 12);
    assert!(s.out_of_sync_bytes > 0);
    assert!(s
        .error_description
        .as_deref()
        .unwrap()
        .contains("replica I/O error"));
    faulty.fail_writes(false);
    let r = c.modify_synchronization(4, &sync).unwrap();
    assert_eq!(r.return_value, 4096);
    assert_eq!(
        wait_job(&mut c, r.job.as_deref().unwrap(), Duration::from_secs(30)),
        7
    );
    assert_eq!(
        read_all(d.vol("lun0").primary().as_ref()),
        replica_mem.snapshot()
    );
    d.stop();
}

/// A mounted filesystem, lazily unmounted when dropped — also when the
/// test fails, so that no mount outlives it.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A replica file on a real, small, full filesystem (tmpfs), when the
/// test may mount one; otherwise the ENOSPC is injected.
#[test]
fn replica_on_a_full_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("tiny");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    // Declared after `dir` and before the daemon: dropped after the daemon
    // stopped and before the directory is removed.
    let _mount = mounted.then(|| Mount(mnt.clone()));
    let d = if mounted {
        Daemon::start(dir.path(), test_config(), &[("lun0", SIZE, true)])
    } else {
        eprintln!("tmpfs mount not permitted: injecting ENOSPC instead");
        let nospace = Arc::new(FaultDev::new(Arc::new(MemDev::new(SIZE))));
        nospace.no_space(true);
        let cfg = RegistryConfig {
            opener: Arc::new(move |_: &Path| Ok(nospace.clone() as SharedDev)),
            ..test_config()
        };
        Daemon::start(dir.path(), cfg, &[("lun0", SIZE, true)])
    };
    // A sparse file larger than the filesystem: the copy runs out of space.
    let t = mnt.join("r.img");
    std::fs::File::create(&t).unwrap().set_len(SIZE).unwrap();
    let mut c = d.client();
    let r = c
        .attach_replica("lun0", &t.display().to_string(), 3)
        .unwrap();
    assert_eq!(r.return_value, 4096);
    let job = r.job.unwrap();
    assert_eq!(wait_job(&mut c, &job, Duration::from_secs(30)), 10);
    let info = c.get_job(&job).unwrap().unwrap();
    assert!(
        info.error_description.unwrap().contains("no space"),
        "ENOSPC reported"
    );
    let s = &c.enumerate_synchronized().unwrap()[0];
    assert_eq!(s.sync_state, 12);
    // The source keeps working.
    d.vol("lun0")
        .write_at(b"still fine", 0, WriteFlags::default())
        .unwrap();
    d.stop();
}

#[test]
fn cli_commands_run_against_the_socket() {
    use lunmirror::control::cli::*;
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path());
    let t = target(dir.path(), "cli.img", SIZE);
    let args = AttachReplicaArgs {
        source: "lun0".into(),
        target: t.clone(),
        copy_type: CopyTypeArg::Sync,
        wait: true,
        json: false,
    };
    assert_eq!(run_attach_replica(&d.socket, &args), 0);
    assert_eq!(
        d.client().enumerate_synchronized().unwrap()[0].sync_state,
        6
    );
    assert_eq!(
        run_attach_replica(&d.socket, &args),
        1,
        "6 In Use is a failure"
    );
    assert_eq!(run_replicas(&d.socket, &ReplicasArgs { json: true }), 0);
    assert_eq!(run_jobs(&d.socket, &JobsArgs::default()), 0);
    let detach = DetachReplicaArgs {
        synchronization: None,
        target: Some(t.clone()),
    };
    assert_eq!(run_detach_replica(&d.socket, &detach), 0);
    assert!(d.client().enumerate_synchronized().unwrap().is_empty());
    assert_eq!(run_detach_replica(&d.socket, &detach), 1);
    assert_eq!(
        run_replicas(&dir.path().join("nope.sock"), &ReplicasArgs::default()),
        2
    );
    d.stop();
}
