//! SIGKILL under load with the real daemon: `qemu-img convert` streams
//! pseudo-random images onto the LUN (parallel, out-of-order writes) while
//! a Sync or Async replica is attached; the daemon gets SIGKILL in the
//! middle of a pass, is restarted on the same state directory, resumes the
//! association (Async: journal replay; both: resync of the regions the
//! activity log marked) and the replica converges to the primary byte for
//! byte. The association keeps mirroring new writes afterwards.

mod common;
mod replication_daemon;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use replication_daemon::*;

const SIZE: u64 = 64 * M;
const WAIT: Duration = Duration::from_secs(90);

fn start(state: &Path) -> Daemon {
    Daemon::builder()
        .state_dir(state)
        .arg("--size")
        .arg(SIZE.to_string())
        .start()
}

fn convert(src: &Path, url: &str) -> Child {
    Command::new("qemu-img")
        .args(["convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw"])
        .arg(src)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-img")
}

fn wait_child(c: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Run passes of `qemu-img convert` back to back for a while, then SIGKILL
/// the daemon while a pass is running: as soon as an Async journal is seen
/// holding records not yet applied, at the latest a third of the fastest
/// pass after the pass started (so its writes are in flight). Returns the
/// number of pending journal records last seen before the kill.
fn kill_during_convert(mut d: Daemon, images: &[PathBuf]) -> u64 {
    const LOAD: Duration = Duration::from_millis(1500);
    let url = lun0(&d);
    let t0 = Instant::now();
    let mut fastest = Duration::MAX;
    let mut n = 0;
    // The kill comes at fastest/divisor into a pass; every pass that ends
    // before that (a loaded machine: a slow status call, a fast pass)
    // halves the wait.
    let mut divisor = 3u32;
    loop {
        let started = Instant::now();
        let mut c = convert(&images[n % images.len()], &url);
        n += 1;
        if t0.elapsed() < LOAD {
            let st = wait_child(&mut c, WAIT).expect("qemu-img convert did not finish");
            assert!(st.success(), "qemu-img convert pass {n}: {st}");
            fastest = fastest.min(started.elapsed());
            continue;
        }
        let kill_at = (fastest / divisor).min(Duration::from_millis(150));
        let mut rpc = Rpc::to(&d);
        let mut pending = 0;
        while started.elapsed() < kill_at {
            pending = rpc
                .synchronized()
                .iter()
                .filter_map(|s| s["JournalPendingRecords"].as_u64())
                .sum();
            if pending > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Some(st) = c.try_wait().unwrap() {
            assert!(st.success(), "qemu-img convert pass {n}: {st}");
            fastest = fastest.min(started.elapsed());
            assert!(n < 50, "could not catch qemu-img in the middle of a pass");
            divisor = divisor.saturating_mul(2);
            continue;
        }
        // A pass is running: pull the plug.
        let status = d.signal_and_wait(nix::sys::signal::Signal::SIGKILL);
        println!(
            "SIGKILL {:?} into pass {n} (fastest pass {fastest:?}), {pending} journal records pending; daemon: {status}",
            started.elapsed()
        );
        // The initiator cannot finish now (it would retry the connection
        // for a long time).
        let _ = c.kill();
        let _ = c.wait();
        return pending;
    }
}

fn kill_under_load(copy_type: &str) {
    if !qemu_iscsi_supported() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let replica = dir.path().join(format!("{copy_type}-replica.img"));
    filled_file(&replica, SIZE, 0xee);
    let images: Vec<PathBuf> = (0..3u64)
        .map(|i| {
            let p = dir.path().join(format!("load{i}.img"));
            std::fs::write(&p, pseudo_random(SIZE as usize, 0xc0ffee + i)).unwrap();
            p
        })
        .collect();

    let mut d = start(&state);
    qemu_io(&lun0(&d), &["write -P 0x11 0 8M"]);
    let out = cli_ok(
        &d,
        &[
            "attach-replica",
            "--source",
            "lun0",
            "--target",
            replica.to_str().unwrap(),
            "--copy-type",
            copy_type,
            "--wait",
        ],
    );
    let sync = out.split_whitespace().next().unwrap().to_string();
    let primary = volume_file(&d, "lun0");
    assert_files_same("after the initial copy", &replica, &primary);
    let before_load = std::fs::read(&primary).unwrap();

    // Async: up to three kill/restart cycles, until one kill catches the
    // journal with records the shipper had not applied (replay).
    for cycle in 1..=3 {
        let pending = kill_during_convert(d, &images);
        let after_kill = std::fs::read(&primary).unwrap();
        assert_ne!(after_kill, before_load, "the load wrote nothing");

        // Same state dir: the association comes back and converges.
        d = start(&state);
        let mut rpc = Rpc::to(&d);
        let s = rpc.sync(&sync).expect("association resumed after SIGKILL");
        println!("after restart {cycle}: {s}");
        let s = rpc.wait_converged(&sync, WAIT);
        assert_eq!(s["OutOfSyncBytes"], 0, "{s}");
        assert_files_same(
            &format!("{copy_type} replica after SIGKILL + restart {cycle}"),
            &replica,
            &primary,
        );
        // No initiator wrote since the kill: the primary is what it was.
        assert_same(
            "primary after restart",
            &std::fs::read(&primary).unwrap(),
            &after_kill,
        );
        if copy_type != "async" || pending > 0 {
            break;
        }
        println!("NOTE: cycle {cycle} killed the daemon with an empty journal");
    }

    // It keeps mirroring.
    let mut rpc = Rpc::to(&d);
    let mut q = QemuIo::open(&lun0(&d));
    q.cmd("write -f -P 0x5c 1M 2M");
    q.cmd("write -P 0x5d 60M 4M");
    if copy_type == "sync" {
        assert_range_is("Sync write after restart", &replica, M, 2 * M, 0x5c);
    }
    q.close();
    rpc.wait_converged(&sync, WAIT);
    assert_files_same("replica after more writes", &replica, &primary);
    let tmp = d.stop();
    assert_files_same("replica after SIGTERM", &replica, &primary);
    drop(tmp);
}

#[test]
fn async_replica_converges_after_sigkill_under_load() {
    kill_under_load("async");
}

#[test]
fn sync_replica_converges_after_sigkill_under_load() {
    kill_under_load("sync");
}

/// SIGKILL while the initial Sync copy is half done (the copy job is
/// suspended so the kill certainly lands mid-copy) and writes went to
/// copied and not-yet-copied regions: after the restart the copy resumes
/// and the replica equals the primary.
#[test]
fn sigkill_during_the_initial_copy_resumes_it() {
    if !qemu_iscsi_supported() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("volumes")).unwrap();
    std::fs::write(
        state.join("volumes/lun0.img"),
        pseudo_random(SIZE as usize, 0xfeed),
    )
    .unwrap();
    let replica = dir.path().join("copy-replica.img");
    filled_file(&replica, SIZE, 0xee);
    let mut d = start(&state);
    let primary = volume_file(&d, "lun0");
    let mut q = QemuIo::open(&lun0(&d));
    let mut rpc = Rpc::to(&d);
    // Hold the copy where it is (a 64 MiB copy can be done in 20 ms).
    let target = replica.to_str().unwrap().to_string();
    let r = start_suspended(
        &mut rpc,
        |rpc| rpc.attach("lun0", &target, SYNC),
        detach_after,
    );
    let sync = r["Synchronization"].as_str().unwrap().to_string();
    for i in 0..16u64 {
        q.cmd(&format!(
            "write -P {:#x} {} 256k",
            0x20 + i,
            i * 4 * M + 512 * 1024
        ));
    }
    d.signal_and_wait(nix::sys::signal::Signal::SIGKILL);
    drop(q);
    drop(d);

    let d = start(&state);
    let mut rpc = Rpc::to(&d);
    rpc.wait_converged(&sync, WAIT);
    assert_files_same(
        "replica after an interrupted initial copy",
        &replica,
        &primary,
    );
    for i in 0..16u64 {
        assert_range_is(
            "write during the copy",
            &primary,
            i * 4 * M + 512 * 1024,
            256 << 10,
            0x20 + i as u8,
        );
    }
    d.stop();
}

/// SIGTERM with a Sync and an Async association: the restart finds both
/// Synchronized with nothing to resync (a clean stop clears the activity
/// log; the Async journal keeps what it had not applied and ships it after
/// the restart), and they keep mirroring. The
/// daemon's socket is at a `--control-socket` path this time.
#[test]
fn clean_restart_resumes_associations_without_resync() {
    if !qemu_iscsi_supported() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let sock = dir.path().join("ctl.sock");
    let start_here = || {
        Daemon::builder()
            .state_dir(&state)
            .arg("--size")
            .arg("64M")
            .arg("--control-socket")
            .arg(&sock)
            .start()
    };
    let rs = dir.path().join("rs.img");
    let ra = dir.path().join("ra.img");
    filled_file(&rs, SIZE, 0xee);
    filled_file(&ra, SIZE, 0xee);
    let d = start_here();
    assert!(!socket(&d).exists(), "socket at the default path too");
    {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let m = std::fs::metadata(&sock).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o660);
    }
    let mut rpc = Rpc::connect(&sock);
    let mut ids = Vec::new();
    for (r, ct) in [(&rs, SYNC), (&ra, ASYNC)] {
        let v = rpc.attach("lun0", r.to_str().unwrap(), ct);
        assert_eq!(v["ReturnValue"], JOB_STARTED, "{v}");
        rpc.wait_job(v["Job"].as_str().unwrap(), WAIT);
        ids.push(v["Synchronization"].as_str().unwrap().to_string());
    }
    // The CLI finds the socket through --control-socket.
    let listed = run_ok(
        Command::new(BIN)
            .args(["replicas", "--control-socket"])
            .arg(&sock),
        Duration::from_secs(60),
    );
    assert!(
        listed.contains(&ids[0]) && listed.contains(&ids[1]),
        "{listed}"
    );
    let mut q = QemuIo::open(&lun0(&d));
    for i in 0..8u64 {
        q.cmd(&format!("aio_write -P {:#x} {} 3M", 0x30 + i, i * 8 * M));
    }
    q.cmd("aio_flush");
    q.close();
    let jobs_before = rpc.call("EnumerateJobs", serde_json::Value::Null)["Jobs"]
        .as_array()
        .unwrap()
        .len();
    drop(rpc);
    let primary = volume_file(&d, "lun0");
    d.stop();
    // The Sync replica is the primary. A clean stop does not wait for the
    // Async journal to drain: what it holds is applied after the restart.
    assert_files_same("Sync replica after SIGTERM", &rs, &primary);

    let d = start_here();
    let mut rpc = Rpc::connect(&sock);
    for id in &ids {
        let s = rpc.sync(id).unwrap_or_else(|| panic!("{id} not resumed"));
        assert_eq!(s["SyncState"], SYNCHRONIZED, "{s}");
        assert_eq!(s["OutOfSyncBytes"], 0, "{s}");
    }
    rpc.wait_converged(&ids[1], WAIT);
    assert_files_same("Async replica once the journal is applied", &ra, &primary);
    let jobs = rpc.call("EnumerateJobs", serde_json::Value::Null)["Jobs"].clone();
    assert_eq!(
        jobs.as_array().unwrap().len(),
        jobs_before,
        "a clean restart started jobs: {jobs}"
    );
    let mut q = QemuIo::open(&lun0(&d));
    q.cmd("write -f -P 0x44 5M 2M");
    assert_range_is("Sync write after restart", &rs, 5 * M, 2 * M, 0x44);
    q.close();
    rpc.wait_converged(&ids[1], WAIT);
    assert_files_same("Async replica after restart", &ra, &primary);
    d.stop();
}

/// A replica that is gone when the daemon starts: its association is
/// Broken (the LUN is served anyway and writes are tracked); once the file
/// is back, Resync makes it equal to the primary.
#[test]
fn replica_missing_at_startup_is_broken_until_resync() {
    if !qemu_iscsi_supported() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let replica = dir.path().join("r.img");
    let away = dir.path().join("r.img.away");
    filled_file(&replica, SIZE, 0xee);
    let d = start(&state);
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
    let sync = out.split_whitespace().next().unwrap().to_string();
    let primary = volume_file(&d, "lun0");
    d.stop();
    std::fs::rename(&replica, &away).unwrap();

    let d = start(&state);
    let mut rpc = Rpc::to(&d);
    let s = rpc.sync(&sync).expect("association kept");
    assert_eq!(s["SyncState"], BROKEN, "{s}");
    let line = replicas_line(&d, &sync).unwrap();
    assert!(line.contains("Broken") && line.contains("error:"), "{line}");
    qemu_io(&lun0(&d), &["write -P 0x66 10M 3M", "read -P 0x66 10M 3M"]);
    let s = rpc.sync(&sync).unwrap();
    assert!(s["OutOfSyncBytes"].as_u64().unwrap() >= 3 * M, "{s}");

    std::fs::rename(&away, &replica).unwrap();
    let out = cli_ok(
        &d,
        &["modify-replica", &sync, "--operation", "resync", "--wait"],
    );
    assert!(out.contains("Completed"), "{out}");
    rpc.wait_converged(&sync, WAIT);
    assert_files_same("replica after it came back", &replica, &primary);
    d.stop();
}

/// The Async replica is a crash-consistent earlier image of the source.
/// One initiator writes generations of 4 KiB blocks strictly one after the
/// other (block 0..N with generation 1, then again with 2, …) while another
/// floods a disjoint range; the daemon gets SIGKILL. The replica file as the
/// shipper left it must hold a prefix of that write sequence: blocks
/// `0..k` of some generation G and `k..N` of G-1, never a newer block after
/// an older one. Then the restart converges as usual.
#[test]
fn async_replica_is_a_prefix_of_the_write_sequence_at_sigkill() {
    if !qemu_iscsi_supported() {
        return;
    }
    const N: u64 = 1024;
    const STRIDE: u64 = 16 << 10;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let replica = dir.path().join("prefix-replica.img");
    filled_file(&replica, SIZE, 0);
    let mut d = start(&state);
    let url = lun0(&d);
    let mut rpc = Rpc::to(&d);
    let r = rpc.attach("lun0", replica.to_str().unwrap(), ASYNC);
    let sync = r["Synchronization"].as_str().unwrap().to_string();
    rpc.wait_job(r["Job"].as_str().unwrap(), WAIT);

    // The flood: parallel 1 MiB writes in 32..64 MiB, and the sequence:
    // one write at a time (qemu-io runs its -c commands in order, each
    // after the previous completed). Both outlast the kill.
    let spawn = |cmds: Vec<String>| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for x in cmds {
            c.arg("-c").arg(x);
        }
        c.arg(&url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let flood: Vec<String> = (0..4000u64)
        .map(|i| match i % 17 {
            16 => "aio_flush".to_string(),
            _ => format!(
                "aio_write -P {:#x} {} 1M",
                i % 250 + 1,
                32 * M + (i % 32) * M
            ),
        })
        .collect();
    let sequence: Vec<String> = (0..40 * N)
        .map(|w| format!("write -P {:#x} {} 4k", (w / N) % 250 + 1, (w % N) * STRIDE))
        .collect();
    let mut flood = spawn(flood);
    let mut seq = spawn(sequence);
    std::thread::sleep(Duration::from_millis(1500));
    let pending = rpc.sync(&sync).unwrap()["JournalPendingRecords"].clone();
    d.signal_and_wait(nix::sys::signal::Signal::SIGKILL);
    for c in [&mut flood, &mut seq] {
        assert!(
            c.try_wait().unwrap().is_none(),
            "the load ended before the kill"
        );
        let _ = c.kill();
        let _ = c.wait();
    }
    println!("{pending} journal records pending at SIGKILL");

    // Each block holds one generation, except that the block the shipper
    // was writing when the kill came may be a mix of old and new.
    let img = std::fs::read(&replica).unwrap();
    let gens: Vec<Vec<u8>> = (0..N)
        .map(|b| {
            let s = (b * STRIDE) as usize;
            let mut v: Vec<u8> = img[s..s + 4096].to_vec();
            v.sort_unstable();
            v.dedup();
            v
        })
        .collect();
    let prev = |g: u8| if g == 1 { 0 } else { g - 1 };
    let first = gens[0][0];
    let cut = gens
        .iter()
        .position(|v| v != &vec![first])
        .unwrap_or(N as usize);
    let older = if cut == 0 { first } else { prev(first) };
    let mut bad = Vec::new();
    for (b, v) in gens.iter().enumerate().skip(cut) {
        let ok = if b == cut {
            // The block being applied when the kill came: old, new or a mix.
            v.iter().all(|&x| x == older || x == first)
        } else {
            v == &vec![older]
        };
        if !ok {
            bad.push((b, v.clone()));
        }
    }
    assert!(
        bad.is_empty(),
        "replica is not a prefix of the write sequence: blocks 0..{cut} hold generation {first}, then expected {older}; offending blocks (block, values): {:?}",
        &bad[..bad.len().min(10)]
    );
    assert!(first > 0, "no write of the sequence reached the replica");
    println!("replica cut at block {cut} of generation {first}");

    d = start(&state);
    let mut rpc = Rpc::to(&d);
    rpc.wait_converged(&sync, WAIT);
    assert_files_same(
        "Async replica after restart",
        &replica,
        &volume_file(&d, "lun0"),
    );
    d.stop();
}
