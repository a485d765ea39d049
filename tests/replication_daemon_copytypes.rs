//! Each CopyType end to end: the real daemon, replicas attached through
//! the CLI client or raw JSON-RPC on the control socket, qemu-io writing
//! over iscsi:// while attached, and the replica's bytes compared with the
//! primary's backing file:
//! - Sync: the replica holds each write the moment qemu-io's write returns;
//! - Async: the replica equals the primary once the journal lag is zero;
//! - UnSyncAssoc / UnSyncUnAssoc: the replica equals the source as it was
//!   when AttachReplica returned, although writes continued during the
//!   copy (while the copy job was suspended, after it resumed, and after it
//!   completed);
//! - Fracture, Resync and Detach with the CLI.

mod common;
mod replication_daemon;

use std::path::Path;
use std::time::Duration;

use common::*;
use replication_daemon::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// Writes with their pattern byte: (offset, length, FUA). Some straddle
/// the 1 MiB region boundaries of the bitmap, one is a single block.
fn write_plan(size: u64) -> Vec<(u64, u64, bool)> {
    vec![
        (0, 64 << 10, false),
        (M - 512, 1024, true),
        (3 * M + 4096, 2 * M, false),
        (size / 2, 512, true),
        (size - 5 * M / 2, M, false),
        (size - 4096, 4096, true),
    ]
}

fn write_cmd(pattern: u8, off: u64, len: u64, fua: bool) -> String {
    let f = if fua { "-f " } else { "" };
    format!("write {f}-P {pattern:#x} {off} {len}")
}

#[test]
fn sync_replica_holds_every_write_when_it_returns() {
    if !qemu_iscsi_supported() {
        return;
    }
    const SIZE: u64 = 64 * M;
    let d = Daemon::builder().arg("--size").arg("64M").start();
    let primary = volume_file(&d, "lun0");
    let replica = d.tmp().join("sync-replica.img");
    filled_file(&replica, SIZE, 0xee);
    qemu_io(&lun0(&d), &["write -P 0x11 0 1M", "write -P 0x12 63M 1M"]);

    let out = cli_ok(
        &d,
        &[
            "attach-replica",
            "--source",
            "lun0",
            "--target",
            replica.to_str().unwrap(),
            "--copy-type",
            "sync",
            "--wait",
        ],
    );
    // "<sync> <job>" then "<job> Completed".
    let mut words = out.split_whitespace();
    let sync = words.next().unwrap().to_string();
    let job = words.next().unwrap().to_string();
    assert!(sync.starts_with("lunmirror:sync:"), "{out}");
    assert!(out.contains(&format!("{job} Completed")), "{out}");
    assert_files_same("after the initial copy", &replica, &primary);

    let mut q = QemuIo::open(&lun0(&d));
    for (i, &(off, len, fua)) in write_plan(SIZE).iter().enumerate() {
        let p = 0x20 + i as u8;
        q.cmd(&write_cmd(p, off, len, fua));
        // No flush: the write itself was acknowledged only when both held it.
        assert_range_is(&format!("write {i} (Sync)"), &replica, off, len, p);
    }
    // WRITE SAME with zeroes (write -z) reaches the replica too.
    q.cmd(&format!("write -z {} {}", 3 * M + 4096, 64 << 10));
    assert_range_is("write -z (Sync)", &replica, 3 * M + 4096, 64 << 10, 0);
    // Parallel writes: every one is on the replica once aio_flush returned.
    for i in 0..8u64 {
        q.cmd(&format!(
            "aio_write -P {:#x} {} {}",
            0x40 + i,
            8 * M + i * 1536 * 1024,
            256 << 10
        ));
    }
    q.cmd("aio_flush");
    for i in 0..8u64 {
        assert_range_is(
            &format!("aio_write {i} (Sync)"),
            &replica,
            8 * M + i * 1536 * 1024,
            256 << 10,
            0x40 + i as u8,
        );
    }
    q.cmd("flush");
    q.close();
    assert_files_same("Sync replica", &replica, &primary);

    let line = replicas_line(&d, &sync).expect("association listed");
    assert!(
        line.contains("Sync") && line.contains("Synchronized"),
        "{line}"
    );
    let tmp = d.stop();
    // After a clean stop both files are still identical.
    assert_files_same("Sync replica after SIGTERM", &replica, &primary);
    drop(tmp);
}

#[test]
fn async_replica_converges_when_the_lag_is_zero() {
    if !qemu_iscsi_supported() {
        return;
    }
    const SIZE: u64 = 64 * M;
    let d = Daemon::builder().arg("--size").arg("64M").start();
    let primary = volume_file(&d, "lun0");
    let replica = d.tmp().join("async-replica.img");
    filled_file(&replica, SIZE, 0xee);
    qemu_io(&lun0(&d), &["write -P 0x13 5M 3M"]);

    let mut rpc = Rpc::to(&d);
    let r = rpc.attach("lun0", replica.to_str().unwrap(), ASYNC);
    assert_eq!(r["ReturnValue"], JOB_STARTED, "{r}");
    let job = r["Job"].as_str().unwrap().to_string();
    let sync = r["Synchronization"].as_str().unwrap().to_string();
    let j = rpc.wait_job(&job, WAIT);
    assert_eq!(j["JobState"], JOB_COMPLETED, "{j}");
    assert_eq!(j["PercentComplete"], 100, "{j}");
    let s = rpc.wait_converged(&sync, WAIT);
    assert_eq!(s["CopyType"], 2);
    assert_eq!(s["SyncMaintained"], true);
    assert!(s["JournalPendingBytes"].is_number(), "{s}");
    assert_files_same("after the initial copy", &replica, &primary);

    let mut q = QemuIo::open(&lun0(&d));
    for round in 0..4u8 {
        for (i, &(off, len, fua)) in write_plan(SIZE).iter().enumerate() {
            q.cmd(&write_cmd(0x50 + round * 8 + i as u8, off, len, fua));
        }
        for i in 0..8u64 {
            q.cmd(&format!(
                "aio_write -P {:#x} {} {}",
                0x90 + u64::from(round) + i,
                16 * M + i * 700 * 1024,
                128 << 10
            ));
        }
        q.cmd("aio_flush");
    }
    q.cmd(&format!("write -z {} {}", 20 * M, 3 * M));
    q.cmd("flush");
    let s = rpc.wait_converged(&sync, WAIT);
    assert_eq!(s["JournalPendingRecords"], 0, "{s}");
    assert_files_same("Async replica at lag 0", &replica, &primary);
    // More writes from the same session after a converged point.
    q.cmd("write -P 0xa7 40M 4M");
    q.close();
    rpc.wait_converged(&sync, WAIT);
    assert_files_same("Async replica at lag 0 (2)", &replica, &primary);
    d.stop();
}

/// The daemon with `lun0` of `size` bytes pre-filled with pseudo-random
/// data (the backing file is written before the daemon starts), in a state
/// dir under `dir`.
fn daemon_with_random_lun(dir: &Path, size: u64, seed: u64) -> Daemon {
    let state = dir.join("state");
    std::fs::create_dir_all(state.join("volumes")).unwrap();
    std::fs::write(
        state.join("volumes/lun0.img"),
        pseudo_random(size as usize, seed),
    )
    .unwrap();
    Daemon::builder()
        .state_dir(&state)
        .arg("--size")
        .arg(size.to_string())
        .start()
}

/// UnSyncAssoc / UnSyncUnAssoc: the replica is the source at the instant
/// of the call, whatever is written during and after the copy.
fn point_in_time(copy_type: u64) {
    if !qemu_iscsi_supported() {
        return;
    }
    const SIZE: u64 = 128 * M;
    let dir = tempfile::tempdir().unwrap();
    let d = daemon_with_random_lun(dir.path(), SIZE, 0x5eed ^ copy_type);
    let primary = volume_file(&d, "lun0");
    let replica = dir.path().join("pit-replica.img");
    filled_file(&replica, SIZE, 0xee);
    // Written by an initiator before the attach: part of the image.
    qemu_io(
        &lun0(&d),
        &["write -P 0x61 10M 1M", "write -f -P 0x62 127M 512k"],
    );
    let mut q = QemuIo::open(&lun0(&d));
    let before = std::fs::read(&primary).unwrap();

    let mut rpc = Rpc::to(&d);
    // Suspend the copy at once, so the next writes certainly hit regions it
    // has not copied yet (copy-before-write must save the old bytes).
    let target = replica.to_str().unwrap().to_string();
    let r = start_suspended(
        &mut rpc,
        |rpc| rpc.attach("lun0", &target, copy_type),
        detach_after,
    );
    let job = r["Job"].as_str().unwrap().to_string();
    let sync = r["Synchronization"].as_str().unwrap().to_string();
    for (i, &(off, len, fua)) in write_plan(SIZE).iter().enumerate() {
        q.cmd(&write_cmd(0x70 + i as u8, off, len, fua));
    }
    q.cmd(&format!("write -z {} {}", 50 * M, 3 * M));
    q.cmd(&format!("discard {} {}", 60 * M, 2 * M));
    for i in 0..6u64 {
        q.cmd(&format!(
            "aio_write -P {:#x} {} {}",
            0x80 + i,
            100 * M + i * 3 * M,
            2 * M
        ));
    }
    q.cmd("aio_flush");
    q.cmd("read -P 0x80 100M 2M");
    // The copy is still where it stopped.
    let j = rpc.job(&job);
    assert_eq!(j["JobState"], 5, "{j}");
    // Resume, and keep writing while it runs.
    assert_eq!(rpc.job_state_change(&job, 2), 0, "Start (resume)");
    for i in 0..6u64 {
        q.cmd(&format!(
            "write -P {:#x} {} {}",
            0x90 + i,
            (120 - 19 * i) * M,
            M
        ));
    }
    let j = rpc.wait_job(&job, WAIT);
    assert_eq!(j["JobState"], JOB_COMPLETED, "{j}");
    // And after the copy: these must not reach the replica either.
    q.cmd("write -P 0xa1 0 8M");
    q.cmd(&format!("write -f -P 0xa2 {} 8M", SIZE - 8 * M));
    q.cmd("flush");
    q.close();

    let now = std::fs::read(&primary).unwrap();
    assert_ne!(now, before, "the writes did not change the primary");
    assert!(now[..8 << 20].iter().all(|&b| b == 0xa1));
    let got = std::fs::read(&replica).unwrap();
    assert_same(
        "point-in-time replica vs the source at attach time",
        &got,
        &before,
    );

    let mut rpc = Rpc::to(&d);
    if copy_type == UNSYNC_ASSOC {
        let s = rpc.sync(&sync).expect("UnSyncAssoc association kept");
        assert_eq!(s["SyncState"], IDLE, "{s}");
        assert_eq!(s["SyncMaintained"], false, "{s}");
        let line = replicas_line(&d, &sync).unwrap();
        assert!(line.contains("Idle"), "{line}");
        // Resync (4) makes a new point-in-time copy: now the current source.
        let out = cli_ok(
            &d,
            &["modify-replica", &sync, "--operation", "resync", "--wait"],
        );
        assert!(out.contains("Completed"), "{out}");
        assert_files_same("UnSyncAssoc after Resync", &replica, &primary);
        assert_eq!(rpc.sync(&sync).unwrap()["SyncState"], IDLE);
    } else {
        assert!(
            rpc.sync(&sync).is_none(),
            "UnSyncUnAssoc association still listed"
        );
        let v = rpc.call("EnumerateVolumes", serde_json::Value::Null);
        assert_eq!(v["Volumes"][0]["Synchronizations"], json!([]), "{v}");
        // Nothing to detach any more.
        let r = rpc.modify(2, &sync);
        assert_eq!(r["ReturnValue"], 5, "{r}");
    }
    d.stop();
}

#[test]
fn unsync_assoc_replica_is_the_source_at_attach_time() {
    point_in_time(UNSYNC_ASSOC);
}

#[test]
fn unsync_unassoc_replica_is_the_source_at_attach_time() {
    point_in_time(UNSYNC_UNASSOC);
}

/// Fracture (3), Resync (4) and Detach (2) through the CLI, with a Sync
/// and an Async replica of the same LUN.
#[test]
fn fracture_resync_and_detach_with_the_cli() {
    if !qemu_iscsi_supported() {
        return;
    }
    const SIZE: u64 = 64 * M;
    let d = Daemon::builder().arg("--size").arg("64M").start();
    let primary = volume_file(&d, "lun0");
    let rs = d.tmp().join("fr-sync.img");
    let ra = d.tmp().join("fr-async.img");
    filled_file(&rs, SIZE, 0xee);
    filled_file(&ra, SIZE, 0xdd);
    let attach = |path: &Path, ct: &str| -> String {
        let out = cli_ok(
            &d,
            &[
                "attach-replica",
                "--source",
                "lun0",
                "--target",
                path.to_str().unwrap(),
                "--copy-type",
                ct,
                "--wait",
            ],
        );
        out.split_whitespace().next().unwrap().to_string()
    };
    let ss = attach(&rs, "sync");
    let sa = attach(&ra, "async");
    let mut rpc = Rpc::to(&d);

    let mut q = QemuIo::open(&lun0(&d));
    q.cmd("write -P 0x31 0 4M");
    q.cmd("write -f -P 0x32 30M 2M");
    rpc.wait_converged(&sa, WAIT);
    assert_files_same("Sync replica before fracture", &rs, &primary);
    assert_files_same("Async replica before fracture", &ra, &primary);

    // Fracture both (the Async one drains its journal first).
    q.cmd("write -P 0x33 40M 4M");
    for s in [&ss, &sa] {
        let out = cli(&d, &["modify-replica", s, "--operation", "fracture"]);
        assert!(out.status.success(), "fracture {s}: {out:?}");
    }
    let image = std::fs::read(&primary).unwrap();
    for s in [&ss, &sa] {
        let line = replicas_line(&d, s).unwrap();
        assert!(line.contains("Fractured"), "{line}");
        assert_eq!(rpc.sync(s).unwrap()["SyncState"], FRACTURED);
    }
    assert_same(
        "Sync replica at fracture",
        &std::fs::read(&rs).unwrap(),
        &image,
    );
    assert_same(
        "Async replica at fracture",
        &std::fs::read(&ra).unwrap(),
        &image,
    );

    // Fractured replicas keep that image.
    q.cmd("write -P 0x34 0 1M");
    q.cmd("write -f -P 0x35 50M 3M");
    q.cmd("flush");
    assert_same(
        "fractured Sync replica",
        &std::fs::read(&rs).unwrap(),
        &image,
    );
    assert_same(
        "fractured Async replica",
        &std::fs::read(&ra).unwrap(),
        &image,
    );
    let s = rpc.sync(&ss).unwrap();
    assert!(s["OutOfSyncBytes"].as_u64().unwrap() >= 4 * M, "{s}");

    // Resync the Sync one: it follows the source again.
    let out = cli_ok(
        &d,
        &["modify-replica", &ss, "--operation", "resync", "--wait"],
    );
    assert!(out.contains("Completed"), "{out}");
    rpc.wait_converged(&ss, WAIT);
    assert_files_same("Sync replica after resync", &rs, &primary);
    q.cmd("write -P 0x36 60M 512k");
    assert_range_is("Sync write after resync", &rs, 60 * M, 512 << 10, 0x36);

    // Detach: by id, and by target path.
    cli_ok(&d, &["detach-replica", &ss]);
    cli_ok(&d, &["detach-replica", "--target", ra.to_str().unwrap()]);
    assert!(rpc.synchronized().is_empty(), "{:?}", rpc.synchronized());
    let listed = cli_ok(&d, &["replicas"]);
    assert!(!listed.contains("lunmirror:sync:"), "{listed}");
    let rs_img = std::fs::read(&rs).unwrap();
    let ra_img = std::fs::read(&ra).unwrap();
    q.cmd("write -P 0x37 0 2M");
    q.cmd("flush");
    q.close();
    assert_same(
        "detached Sync replica",
        &std::fs::read(&rs).unwrap(),
        &rs_img,
    );
    assert_same(
        "detached Async replica",
        &std::fs::read(&ra).unwrap(),
        &ra_img,
    );
    assert_range_is("primary after detach", &primary, 0, 2 * M, 0x37);

    // Detaching what is gone fails with exit status 1.
    let out = cli(&d, &["detach-replica", &ss]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ReturnValue 5"),
        "{out:?}"
    );
    let out = cli(&d, &["detach-replica", "--target", "/nonexistent.img"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // The jobs stay listed with their outcome.
    let jobs = cli_ok(&d, &["jobs"]);
    assert!(jobs.matches("Completed").count() >= 3, "{jobs}");
    // The detached replicas can be attached again.
    let again = attach(&rs, "sync");
    assert_files_same("re-attached Sync replica", &rs, &primary);
    cli_ok(&d, &["detach-replica", &again]);
    d.stop();
}

/// Restore from Replica (5) of an UnSyncAssoc copy: while
/// the restore job is held, the initiator already reads the replica's image
/// (regions not restored yet are brought back before they are read), a
/// write lands on top of it, and once the job is done the primary is the
/// image plus that write.
#[test]
fn restore_from_a_point_in_time_copy_with_the_cli() {
    if !qemu_iscsi_supported() {
        return;
    }
    const SIZE: u64 = 64 * M;
    let dir = tempfile::tempdir().unwrap();
    let d = daemon_with_random_lun(dir.path(), SIZE, 0xabc);
    let primary = volume_file(&d, "lun0");
    let replica = dir.path().join("pit.img");
    filled_file(&replica, SIZE, 0xee);
    let out = cli_ok(
        &d,
        &[
            "attach-replica",
            "--source",
            "lun0",
            "--target",
            replica.to_str().unwrap(),
            "--copy-type",
            "unsync-assoc",
            "--wait",
        ],
    );
    let sync = out.split_whitespace().next().unwrap().to_string();
    let mut image = std::fs::read(&primary).unwrap();
    assert_files_same("point-in-time copy", &replica, &primary);
    // The source moves on, everywhere (so the restore has every region to
    // copy back), and is restored; the restore job is held at once.
    let url = lun0(&d);
    let mut rpc = Rpc::to(&d);
    let r = start_suspended(
        &mut rpc,
        |rpc| {
            qemu_io(
                &url,
                &[
                    "write -P 0x71 0 32M",
                    "write -z 32M 16M",
                    "write -f -P 0x73 48M 16M",
                ],
            );
            rpc.modify(5, &sync)
        },
        |_, _| {},
    );
    let job = r["Job"].as_str().unwrap().to_string();
    assert_eq!(
        rpc.sync(&sync).unwrap()["SyncState"],
        10,
        "Restore In Progress"
    );
    // What the initiator reads is already the image.
    let back = dir.path().join("back.img");
    run_ok(
        std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &lun0(&d)])
            .arg(&back),
        T,
    );
    assert_same(
        "LUN read during the restore",
        &std::fs::read(&back).unwrap(),
        &image,
    );
    // A write during the restore is not undone by it.
    qemu_io(&lun0(&d), &["write -P 0x74 41M 8k"]);
    image[(41 * M) as usize..(41 * M + 8192) as usize].fill(0x74);
    assert_eq!(rpc.job_state_change(&job, 2), 0, "resume");
    let j = rpc.wait_job(&job, WAIT);
    assert_eq!(j["JobState"], JOB_COMPLETED, "{j}");
    assert_same(
        "primary after the restore",
        &std::fs::read(&primary).unwrap(),
        &image,
    );
    let line = replicas_line(&d, &sync).unwrap();
    assert!(line.contains("Idle"), "{line}");
    d.stop();
}
