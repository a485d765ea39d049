//! Registry tests: every ReturnValue of the CIM methods, operations, job
//! control, persistence and resume.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::block::mem::MemDev;
use crate::block::{BlockDev, WriteFlags};
use crate::mirror::fault::FaultDev;

const MB: u64 = 1 << 20;

fn cfg() -> RegistryConfig {
    RegistryConfig {
        policy: MirrorPolicy {
            region_size: 64 << 10,
            ..MirrorPolicy::default()
        },
        quiesce_timeout: Duration::from_millis(200),
        housekeeping_interval: Duration::from_millis(50),
        ..RegistryConfig::default()
    }
}

fn file(dir: &Path, name: &str, size: u64) -> String {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p.display().to_string()
}

struct T {
    dir: tempfile::TempDir,
    reg: Arc<Registry>,
    primary: Arc<MemDev>,
    vol: Arc<MirroredVolume>,
}

fn t_with(cfg: RegistryConfig, size: u64) -> T {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open_with(&dir.path().join("state"), cfg).unwrap();
    let primary = Arc::new(MemDev::new(size));
    let vol = MirroredVolume::new("lun0", primary.clone());
    reg.add_volume("lun0", &dir.path().join("lun0.img"), vol.clone(), true)
        .unwrap();
    T {
        dir,
        reg,
        primary,
        vol,
    }
}

fn rig() -> T {
    t_with(cfg(), 2 * MB)
}

fn rv(r: &MethodResult) -> u32 {
    r.return_value.code()
}

fn replica_bytes(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn attach_return_values_for_bad_parameters() {
    let t = rig();
    let ok_target = file(t.dir.path(), "r.img", 2 * MB);
    let small = file(t.dir.path(), "small.img", MB);
    // 5: unknown source / target, relative target, missing path, directory,
    // target too small, invalid copy types.
    assert_eq!(rv(&t.reg.attach_replica("nope", &ok_target, 3)), 5);
    assert_eq!(rv(&t.reg.attach_replica("lun0", "nope", 3)), 5);
    assert_eq!(rv(&t.reg.attach_replica("lun0", "r.img", 3)), 5);
    assert_eq!(rv(&t.reg.attach_replica("lun0", "/does/not/exist", 3)), 5);
    let d = t.dir.path().display().to_string();
    assert_eq!(rv(&t.reg.attach_replica("lun0", &d, 3)), 5);
    let r = t.reg.attach_replica("lun0", &small, 3);
    assert_eq!(rv(&r), 5);
    assert!(r.error.unwrap().contains("smaller"));
    for ct in [0, 1, 6, 100, 0x7FFF] {
        assert_eq!(
            rv(&t.reg.attach_replica("lun0", &ok_target, ct)),
            5,
            "CopyType {ct}"
        );
    }
    // 1: vendor-specific copy types.
    for ct in [0x8000, 0xFFFF] {
        assert_eq!(rv(&t.reg.attach_replica("lun0", &ok_target, ct)), 1);
    }
    // 5: source = target (by name and by path).
    assert_eq!(rv(&t.reg.attach_replica("lun0", "lun0", 3)), 5);
    let t2 = rig();
    let vol_path = t2.dir.path().join("lun0.img");
    std::fs::write(&vol_path, vec![0u8; 4096]).unwrap();
    let reg = Registry::open_with(&t2.dir.path().join("state2"), cfg()).unwrap();
    reg.add_volume(
        "v",
        &vol_path,
        MirroredVolume::new("v", Arc::new(MemDev::new(4096))),
        true,
    )
    .unwrap();
    assert_eq!(
        rv(&reg.attach_replica("v", &vol_path.display().to_string(), 3)),
        5
    );
    assert!(t.reg.enumerate_synchronized().is_empty());
}

#[test]
fn attach_in_use_return_values() {
    let t = rig();
    // 6: target exported as a LUN (by name and by its path).
    let lun1_path = file(t.dir.path(), "lun1.img", 2 * MB);
    let lun1 = MirroredVolume::new("lun1", Arc::new(MemDev::new(2 * MB)));
    t.reg
        .add_volume("lun1", Path::new(&lun1_path), lun1, true)
        .unwrap();
    assert_eq!(rv(&t.reg.attach_replica("lun0", "lun1", 3)), 6);
    assert_eq!(rv(&t.reg.attach_replica("lun0", &lun1_path, 3)), 6);
    // A registered but unexported volume is a valid target…
    let spare = MirroredVolume::new("spare", Arc::new(MemDev::new(2 * MB)));
    t.reg
        .add_volume("spare", &t.dir.path().join("spare.img"), spare, false)
        .unwrap();
    let r = t.reg.attach_replica("lun0", "spare", 3);
    assert_eq!(rv(&r), 4096);
    // …once: 6 when already in an association; a replica cannot be a source.
    assert_eq!(rv(&t.reg.attach_replica("lun0", "spare", 2)), 6);
    assert_eq!(rv(&t.reg.attach_replica("lun1", "spare", 2)), 6);
    let other = file(t.dir.path(), "o.img", 2 * MB);
    assert_eq!(rv(&t.reg.attach_replica("spare", &other, 3)), 6);
    // Same file through two paths (a symlink) is the same target.
    let target = file(t.dir.path(), "r.img", 2 * MB);
    assert_eq!(rv(&t.reg.attach_replica("lun0", &target, 2)), 4096);
    let link = t.dir.path().join("link.img");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert_eq!(
        rv(&t.reg.attach_replica("lun1", &link.display().to_string(), 3)),
        6
    );
}

#[test]
fn attach_completed_without_job_for_an_empty_source() {
    let t = t_with(cfg(), 0);
    let target = file(t.dir.path(), "r.img", MB);
    let r = t.reg.attach_replica("lun0", &target, 3);
    assert_eq!((rv(&r), r.job.is_none()), (0, true));
    let s = t.reg.enumerate_synchronized();
    assert_eq!(s[0].sync_state, 6);
    let r = t
        .reg
        .attach_replica("lun0", &file(t.dir.path(), "r2.img", MB), 5);
    assert_eq!((rv(&r), r.synchronization), (0, None));
}

#[test]
fn attach_unspecified_error_when_state_cannot_be_written() {
    let t = rig();
    let target = file(t.dir.path(), "r.img", 2 * MB);
    // The association directory name is taken by a regular file.
    std::fs::write(t.reg.state_dir().join("sync-1"), b"x").unwrap();
    let r = t.reg.attach_replica("lun0", &target, 3);
    assert_eq!(rv(&r), 2);
    assert!(t.reg.enumerate_synchronized().is_empty());
}

#[test]
fn attach_failed_when_target_cannot_be_opened() {
    let c = RegistryConfig {
        opener: Arc::new(|_: &Path| {
            Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "read-only medium",
            ))
        }),
        ..cfg()
    };
    let t = t_with(c, 2 * MB);
    let target = file(t.dir.path(), "r.img", 2 * MB);
    let r = t.reg.attach_replica("lun0", &target, 3);
    assert_eq!(rv(&r), 4);
    assert!(r.error.unwrap().contains("cannot open"));
}

#[test]
fn attach_times_out_when_writes_do_not_drain() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open_with(&dir.path().join("state"), cfg()).unwrap();
    let gate = Arc::new(FaultDev::new(Arc::new(MemDev::new(2 * MB))));
    let vol = MirroredVolume::new("lun0", gate.clone());
    reg.add_volume("lun0", &dir.path().join("p"), vol.clone(), true)
        .unwrap();
    gate.set_gate(true);
    let v2 = vol.clone();
    let w = std::thread::spawn(move || v2.write_at(b"stuck", 0, WriteFlags::default()));
    while vol.locks().held_ranges().is_empty() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let target = file(dir.path(), "r.img", 2 * MB);
    let r = reg.attach_replica("lun0", &target, 4);
    assert_eq!(rv(&r), 3);
    gate.set_gate(false);
    w.join().unwrap().unwrap();
    assert_eq!(rv(&reg.attach_replica("lun0", &target, 4)), 4096);
}

#[test]
fn sync_attach_copies_and_mirrors_then_detach() {
    let t = rig();
    t.vol
        .write_at(&vec![7u8; 300_000], 1000, WriteFlags::default())
        .unwrap();
    let target = file(t.dir.path(), "r.img", 2 * MB);
    let r = t.reg.attach_replica("lun0", &target, 3);
    assert_eq!(rv(&r), 4096);
    let job = r.job.unwrap();
    assert_eq!(job, "lunmirror:1");
    let sync = r.synchronization.unwrap();
    let info = t.reg.wait_job(&job, Duration::from_secs(10)).unwrap();
    assert_eq!((info.job_state, info.percent_complete), (7, 100));
    assert!(info.start_time.is_some() && info.elapsed_time.is_some());
    let s = &t.reg.enumerate_synchronized()[0];
    assert_eq!((s.sync_state, s.copy_type, s.percent_synced), (6, 3, 100));
    assert!(s.when_synced.is_some());
    t.vol
        .write_at(b"mirrored", 5, WriteFlags::default())
        .unwrap();
    assert_eq!(
        replica_bytes(&target)[..2 * MB as usize],
        t.primary.snapshot()[..]
    );
    let vols = t.reg.enumerate_volumes();
    assert_eq!(vols[0].synchronizations, vec![sync.clone()]);
    // Detach removes it and its state.
    assert_eq!(rv(&t.reg.modify_synchronization(2, &sync)), 0);
    assert!(t.reg.enumerate_synchronized().is_empty());
    assert!(!t.reg.state_dir().join("sync-1").exists());
    t.vol
        .write_at(b"not mirrored", 5, WriteFlags::default())
        .unwrap();
    assert_ne!(
        replica_bytes(&target)[..2 * MB as usize],
        t.primary.snapshot()[..]
    );
    assert_eq!(rv(&t.reg.modify_synchronization(2, &sync)), 5);
}

#[test]
fn modify_return_values_and_operations() {
    let t = rig();
    let target = file(t.dir.path(), "r.img", 2 * MB);
    let r = t.reg.attach_replica("lun0", &target, 3);
    let sync = r.synchronization.unwrap();
    t.reg.wait_job(&r.job.unwrap(), Duration::from_secs(10));
    assert_eq!(rv(&t.reg.modify_synchronization(4, "garbage")), 5);
    assert_eq!(rv(&t.reg.modify_synchronization(4, "lunmirror:sync:77")), 5);
    for op in [0, 1, 23, 0x7FFF] {
        assert_eq!(rv(&t.reg.modify_synchronization(op, &sync)), 5, "op {op}");
    }
    for op in [6, 7, 8, 9, 12, 13, 0x8000] {
        assert_eq!(rv(&t.reg.modify_synchronization(op, &sync)), 1, "op {op}");
    }
    // Restore needs Fractured: 5 while Synchronized.
    assert_eq!(rv(&t.reg.modify_synchronization(5, &sync)), 5);
    assert_eq!(rv(&t.reg.modify_synchronization(3, &sync)), 0);
    assert_eq!(t.reg.enumerate_synchronized()[0].sync_state, 13);
    t.vol
        .write_at(b"changed", 100, WriteFlags::default())
        .unwrap();
    let r = t.reg.modify_synchronization(4, &sync);
    assert_eq!(rv(&r), 4096);
    t.reg.wait_job(&r.job.unwrap(), Duration::from_secs(10));
    assert_eq!(t.reg.enumerate_synchronized()[0].sync_state, 6);
    assert_eq!(replica_bytes(&target), t.primary.snapshot());
    // Nothing out of sync: Resync from Fractured completes without a job.
    assert_eq!(rv(&t.reg.modify_synchronization(3, &sync)), 0);
    let r = t.reg.modify_synchronization(4, &sync);
    assert_eq!((rv(&r), r.job), (0, None));
    // Reset To Async / Sync.
    assert_eq!(rv(&t.reg.modify_synchronization(11, &sync)), 0);
    assert_eq!(t.reg.enumerate_synchronized()[0].copy_type, 2);
    assert_eq!(rv(&t.reg.modify_synchronization(11, &sync)), 5);
    t.vol
        .write_at(b"journal", 200, WriteFlags::default())
        .unwrap();
    let r = t.reg.modify_synchronization(10, &sync);
    assert!(matches!(rv(&r), 0 | 4096));
    if let Some(j) = r.job {
        t.reg.wait_job(&j, Duration::from_secs(10));
    }
    assert_eq!(t.reg.enumerate_synchronized()[0].copy_type, 3);
    assert_eq!(replica_bytes(&target), t.primary.snapshot());
}

#[test]
fn modify_in_use_while_a_job_runs_and_job_control() {
    let t = rig();
    // A slow replica keeps the copy job running.
    let slow = Arc::new(FaultDev::new(Arc::new(MemDev::new(2 * MB))));
    slow.write_delay(Duration::from_millis(20));
    let s2 = slow.clone();
    let c = RegistryConfig {
        opener: Arc::new(move |_: &Path| Ok(s2.clone() as SharedDev)),
        ..cfg()
    };
    let t2 = t_with(c, 2 * MB);
    drop(t);
    let target = file(t2.dir.path(), "r.img", 2 * MB);
    let r = t2.reg.attach_replica("lun0", &target, 3);
    let (job, sync) = (r.job.unwrap(), r.synchronization.unwrap());
    assert_eq!(rv(&t2.reg.modify_synchronization(3, &sync)), 6);
    // Suspend / Start / Terminate.
    // ReturnValue 0 means the job is suspended already, not just asked to.
    assert_eq!(t2.reg.request_job_state_change(&job, 3, false).code(), 0);
    assert_eq!(t2.reg.get_job(&job).unwrap().job_state, 5);
    let p = t2.reg.get_job(&job).unwrap().percent_complete;
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        t2.reg.get_job(&job).unwrap().percent_complete,
        p,
        "suspended job made progress"
    );
    assert_eq!(t2.reg.request_job_state_change(&job, 2, false).code(), 0);
    assert_eq!(t2.reg.get_job(&job).unwrap().job_state, 4);
    assert_eq!(t2.reg.request_job_state_change(&job, 4, true).code(), 4098);
    assert_eq!(t2.reg.request_job_state_change(&job, 4, false).code(), 0);
    let info = t2.reg.get_job(&job).unwrap();
    assert_eq!(info.job_state, 8);
    assert_eq!(t2.reg.request_job_state_change(&job, 4, false).code(), 4097);
    assert_eq!(
        t2.reg
            .request_job_state_change("lunmirror:999", 4, false)
            .code(),
        5
    );
    let s = &t2.reg.enumerate_synchronized()[0];
    assert_eq!(
        s.sync_state, 12,
        "an unfinished initial copy leaves the replica Broken"
    );
    slow.write_delay(Duration::ZERO);
    let r = t2.reg.modify_synchronization(4, &sync);
    assert_eq!(rv(&r), 4096);
    assert_eq!(
        t2.reg
            .wait_job(&r.job.unwrap(), Duration::from_secs(20))
            .unwrap()
            .job_state,
        7
    );
}

#[test]
fn unsync_unassoc_removes_association_after_copy() {
    let t = rig();
    t.vol
        .write_at(b"snapshot me", 0, WriteFlags::default())
        .unwrap();
    let target = file(t.dir.path(), "r.img", 3 * MB);
    let r = t.reg.attach_replica("lun0", &target, 5);
    assert_eq!(rv(&r), 4096);
    let info = t
        .reg
        .wait_job(&r.job.unwrap(), Duration::from_secs(10))
        .unwrap();
    assert_eq!(info.job_state, 7);
    assert!(t.reg.enumerate_synchronized().is_empty());
    assert_eq!(
        &replica_bytes(&target)[..2 * MB as usize],
        &t.primary.snapshot()[..]
    );
    assert_eq!(
        std::fs::metadata(&target).unwrap().len(),
        3 * MB,
        "never resized"
    );
}

#[test]
fn replica_failure_marks_job_exception_and_broken() {
    let failing = Arc::new(FaultDev::new(Arc::new(MemDev::new(2 * MB))));
    failing.fail_writes(true);
    let f2 = failing.clone();
    let c = RegistryConfig {
        opener: Arc::new(move |_: &Path| Ok(f2.clone() as SharedDev)),
        ..cfg()
    };
    let t = t_with(c, 2 * MB);
    let target = file(t.dir.path(), "r.img", 2 * MB);
    let r = t.reg.attach_replica("lun0", &target, 3);
    let info = t
        .reg
        .wait_job(&r.job.unwrap(), Duration::from_secs(10))
        .unwrap();
    assert_eq!((info.job_state, info.error_code), (10, 4));
    assert!(info
        .error_description
        .unwrap()
        .contains("replica I/O error"));
    let s = &t.reg.enumerate_synchronized()[0];
    assert_eq!(s.sync_state, 12);
    // Host writes still succeed.
    t.vol.write_at(b"ok", 0, WriteFlags::default()).unwrap();
}

#[test]
fn state_survives_restart_and_async_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let target = file(dir.path(), "r.img", 2 * MB);
    let primary = Arc::new(MemDev::new(2 * MB));
    let (sync, job) = {
        let reg = Registry::open_with(&state, cfg()).unwrap();
        assert!(matches!(
            Registry::open_with(&state, cfg()),
            Err(RegistryError::Locked(_))
        ));
        let vol = MirroredVolume::new("lun0", primary.clone());
        reg.add_volume("lun0", &dir.path().join("p"), vol.clone(), true)
            .unwrap();
        reg.resume();
        let r = reg.attach_replica("lun0", &target, 2);
        let job = r.job.unwrap();
        reg.wait_job(&job, Duration::from_secs(10));
        vol.write_at(b"async data", 4096, WriteFlags::default())
            .unwrap();
        reg.shutdown();
        (r.synchronization.unwrap(), job)
    };
    let reg = Registry::open_with(&state, cfg()).unwrap();
    let vol = MirroredVolume::new("lun0", primary.clone());
    reg.add_volume("lun0", &dir.path().join("p"), vol.clone(), true)
        .unwrap();
    reg.resume();
    let s = reg.enumerate_synchronized();
    assert_eq!(
        (s[0].synchronization.as_str(), s[0].copy_type),
        (sync.as_str(), 2)
    );
    assert_eq!(reg.get_job(&job).unwrap().job_state, 7, "job history kept");
    vol.write_at(b"after restart", 8192, WriteFlags::default())
        .unwrap();
    let a = reg.association(&sync).unwrap();
    assert!(a.wait_lag_zero(Duration::from_secs(10)));
    assert_eq!(replica_bytes(&target), primary.snapshot());
    // New ids continue after the old ones.
    let r = reg.attach_replica("lun0", &file(dir.path(), "r2.img", 2 * MB), 4);
    assert_eq!(r.synchronization.as_deref(), Some("lunmirror:sync:2"));
    assert_eq!(r.job.as_deref(), Some("lunmirror:2"));
    reg.shutdown();
}

#[test]
fn association_of_an_unconfigured_volume_stays_dormant_until_detached() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let target = file(dir.path(), "r.img", 2 * MB);
    {
        let reg = Registry::open_with(&state, cfg()).unwrap();
        let vol = MirroredVolume::new("old", Arc::new(MemDev::new(2 * MB)));
        reg.add_volume("old", &dir.path().join("old"), vol, true)
            .unwrap();
        reg.resume();
        let r = reg.attach_replica("old", &target, 3);
        reg.wait_job(&r.job.unwrap(), Duration::from_secs(10));
        reg.shutdown();
    }
    let reg = Registry::open_with(&state, cfg()).unwrap();
    reg.resume();
    let s = reg.enumerate_synchronized();
    assert_eq!((s.len(), s[0].sync_state), (1, 12));
    // Still remembered: its target stays in use.
    let vol = MirroredVolume::new("new", Arc::new(MemDev::new(2 * MB)));
    reg.add_volume("new", &dir.path().join("new"), vol, true)
        .unwrap();
    assert_eq!(rv(&reg.attach_replica("new", &target, 3)), 6);
    assert_eq!(rv(&reg.modify_synchronization(4, &s[0].synchronization)), 5);
    assert_eq!(rv(&reg.modify_synchronization(2, &s[0].synchronization)), 0);
    assert!(reg.enumerate_synchronized().is_empty());
    assert!(!state.join("sync-1").exists());
    assert_eq!(rv(&reg.attach_replica("new", &target, 3)), 4096);
    reg.shutdown();
}

#[test]
fn dormant_association_resumes_when_its_source_is_added_later() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let target = file(dir.path(), "r.img", 2 * MB);
    let primary = Arc::new(MemDev::new(2 * MB));
    let sync = {
        let reg = Registry::open_with(&state, cfg()).unwrap();
        let vol = MirroredVolume::new("late", primary.clone());
        reg.add_volume("late", &dir.path().join("late"), vol.clone(), true)
            .unwrap();
        reg.resume();
        let r = reg.attach_replica("late", &target, 3);
        reg.wait_job(&r.job.unwrap(), Duration::from_secs(10));
        vol.write_at(b"before", 0, WriteFlags::default()).unwrap();
        reg.shutdown();
        r.synchronization.unwrap()
    };
    // Restart: the source (a TCMU device) is not there when resume runs.
    let reg = Registry::open_with(&state, cfg()).unwrap();
    reg.resume();
    assert_eq!(reg.enumerate_synchronized()[0].sync_state, 12);
    assert_eq!(reg.resume_source("late"), 0, "source still missing");
    // LIO brings the device back: the association is live again.
    let vol = MirroredVolume::new("late", primary.clone());
    reg.add_volume("late", &dir.path().join("late"), vol.clone(), true)
        .unwrap();
    assert_eq!(reg.resume_source("late"), 1);
    assert_eq!(reg.resume_source("late"), 0, "only once");
    let s = reg.enumerate_synchronized();
    assert_eq!(
        (s.len(), s[0].synchronization.as_str(), s[0].sync_state),
        (1, sync.as_str(), 6)
    );
    vol.write_at(b"after", 8192, WriteFlags::default()).unwrap();
    assert_eq!(replica_bytes(&target), primary.snapshot());
    // The revived association is persisted as live, not dormant.
    reg.shutdown();
    drop(reg);
    let reg = Registry::open_with(&state, cfg()).unwrap();
    let vol = MirroredVolume::new("late", primary.clone());
    reg.add_volume("late", &dir.path().join("late"), vol, true)
        .unwrap();
    reg.resume();
    assert_eq!(reg.enumerate_synchronized()[0].sync_state, 6);
    reg.shutdown();
}
