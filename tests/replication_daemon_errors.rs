//! Error paths with the real daemon:
//! - every AttachReplica ReturnValue that a running daemon can produce,
//!   provoked through its control socket (and the CIM codes of
//!   ModifySynchronization / RequestJobStateChange around it);
//! - malformed socket input gets JSON-RPC errors while the daemon keeps
//!   serving iSCSI and the socket;
//! - a replica on a full filesystem (a small tmpfs): host writes keep
//!   succeeding, the association goes Broken and `lunmirror replicas`
//!   says so; after space is freed, Resync makes the replica equal to the
//!   primary again.

mod common;
mod replication_daemon;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use common::*;
use replication_daemon::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);
const TGT: &str = "iqn.2026-11.io.lunmirror:rv";

/// Two exported 64 MiB LUNs: lun0 and lun1.
fn two_lun_daemon() -> Daemon {
    let cfg = format!(
        "[[target]]\nname = \"{TGT}\"\n[[target.lun]]\nid = 0\nvolume = \"lun0\"\nsize = \"64M\"\n[[target.lun]]\nid = 1\nvolume = \"lun1\"\nsize = \"64M\"\n"
    );
    Daemon::builder().config(&cfg).start()
}

fn rv(r: &Value) -> i64 {
    r["ReturnValue"].as_i64().unwrap_or_else(|| panic!("{r}"))
}

/// A refused AttachReplica: the ReturnValue, no job, no association, and
/// an ErrorDescription containing `why`.
fn refused(rpc: &mut Rpc, source: &str, target: &str, ct: u64, code: i64, why: &str) {
    let r = rpc.attach(source, target, ct);
    assert_eq!(rv(&r), code, "attach {source} -> {target} ({ct}): {r}");
    assert!(r["Job"].is_null() && r["Synchronization"].is_null(), "{r}");
    let d = r["ErrorDescription"].as_str().unwrap_or_default();
    assert!(d.contains(why), "expected {why:?} in {r}");
}

#[test]
fn every_attach_replica_return_value_through_the_socket() {
    if !qemu_iscsi_supported() {
        return;
    }
    let d = two_lun_daemon();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    let r1 = p("r1.img");
    sparse_file(Path::new(&r1), 64 * M);
    let lun0_file = volume_file(&d, "lun0").display().to_string();
    let lun1_file = volume_file(&d, "lun1").display().to_string();
    let mut rpc = Rpc::to(&d);
    let n_before = rpc.synchronized().len();
    assert_eq!(n_before, 0);

    // 1: vendor-specific CopyType.
    for ct in [0x8000, 0xabcd, 0xffff] {
        refused(&mut rpc, "lun0", &r1, ct, 1, "vendor");
    }
    // 5: DMTF values that are not a copy type lunmirror makes.
    for ct in [0, 1, 6, 7, 0x7fff] {
        refused(&mut rpc, "lun0", &r1, ct, 5, "CopyType");
    }
    // 5: unknown source, unknown / relative / missing / non-file target,
    // source = target (by name and by path), target too small.
    refused(&mut rpc, "nosuch", &r1, 3, 5, "SourceElement");
    refused(&mut rpc, "lun0", "r1.img", 3, 5, "TargetElement");
    refused(&mut rpc, "lun0", &p("missing.img"), 3, 5, "TargetElement");
    refused(
        &mut rpc,
        "lun0",
        &dir.path().display().to_string(),
        3,
        5,
        "regular file",
    );
    refused(&mut rpc, "lun0", "lun0", 3, 5, "same");
    refused(&mut rpc, "lun0", &lun0_file, 3, 5, "same");
    let small = p("small.img");
    sparse_file(Path::new(&small), 64 * M - 512);
    refused(&mut rpc, "lun0", &small, 3, 5, "smaller");
    // 6: the target is an exported LUN's volume (by name or backing file).
    refused(&mut rpc, "lun0", "lun1", 3, 6, "exported");
    refused(&mut rpc, "lun0", &lun1_file, 3, 6, "exported");

    // 4096: a non-empty source always starts a copy job. It is held
    // suspended for what follows.
    let r = start_suspended(&mut rpc, |rpc| rpc.attach("lun0", &r1, SYNC), detach_after);
    assert_eq!(rv(&r), JOB_STARTED, "{r}");
    let job = r["Job"].as_str().unwrap().to_string();
    let sync = r["Synchronization"].as_str().unwrap().to_string();
    assert!(job.starts_with("lunmirror:"), "{r}");
    assert!(sync.starts_with("lunmirror:sync:"), "{r}");
    assert!(r.get("ErrorDescription").is_none_or(Value::is_null), "{r}");
    // ModifySynchronization 6: the copy job runs; Detach stays possible,
    // nothing else.
    for op in [3, 4, 5, 10, 11] {
        assert_eq!(
            rv(&rpc.modify(op, &sync)),
            6,
            "Operation {op} while a job runs"
        );
    }
    assert_eq!(rpc.job_state_change(&job, 2), 0, "Start (resume)");
    let j = rpc.wait_job(&job, WAIT);
    assert_eq!(j["JobState"], JOB_COMPLETED, "{j}");
    assert_eq!(j["Synchronization"], sync.as_str());
    // 6: already in an association (from either source, by path or through
    // a symlink to it).
    refused(&mut rpc, "lun0", &r1, 3, 6, "already");
    refused(&mut rpc, "lun1", &r1, 2, 6, "already");
    let link = p("link.img");
    std::os::unix::fs::symlink(&r1, &link).unwrap();
    refused(&mut rpc, "lun1", &link, 2, 6, "already");

    // 4: the target exists but cannot be opened for writing (a read-only
    // filesystem).
    let ro = dir.path().join("ro");
    match Tmpfs::mount(&ro, "80M") {
        Some(fs) => {
            sparse_file(&ro.join("r.img"), 64 * M);
            fs.remount("ro");
            refused(
                &mut rpc,
                "lun1",
                &ro.join("r.img").display().to_string(),
                3,
                4,
                "cannot open",
            );
        }
        None => println!("SKIPPED: ReturnValue 4 (needs a read-only mount)"),
    }

    // 2: the association's state cannot be created in the state dir (a file
    // sits where its directory must go). The next id is the one after `sync`.
    let next = sync.rsplit(':').next().unwrap().parse::<u64>().unwrap() + 1;
    let blocker = d.state_dir.join(format!("sync-{next}"));
    std::fs::write(&blocker, b"in the way").unwrap();
    let r2 = p("r2.img");
    sparse_file(Path::new(&r2), 64 * M);
    refused(&mut rpc, "lun1", &r2, 2, 2, "state");
    std::fs::remove_file(&blocker).unwrap();
    // Nothing was left behind by the refusals.
    assert_eq!(rpc.synchronized().len(), 1, "{:?}", rpc.synchronized());
    // The same attach works now.
    let r = rpc.attach("lun1", &r2, ASYNC);
    assert_eq!(rv(&r), JOB_STARTED, "{r}");
    let sync2 = r["Synchronization"].as_str().unwrap().to_string();
    let j = rpc.wait_job(r["Job"].as_str().unwrap(), WAIT);
    assert_eq!(j["JobState"], JOB_COMPLETED, "{j}");
    // 6: an exported source of an association as a target.
    refused(&mut rpc, "lun1", "lun0", 3, 6, "");

    // 0 is what AttachReplica returns for an empty source only, and the
    // daemon serves no empty LUN; 0 comes from the other methods.
    let r = rpc.modify(3, &sync);
    assert_eq!(rv(&r), 0, "Fracture: {r}");
    assert!(r["Job"].is_null(), "{r}");
    // ModifySynchronization: 1 unimplemented / vendor operation, 5 unknown
    // association, bad operation, operation not valid in this state.
    for op in [6, 12, 0x8000] {
        assert_eq!(rv(&rpc.modify(op, &sync)), 1, "Operation {op}");
    }
    assert_eq!(rv(&rpc.modify(3, "lunmirror:sync:999")), 5);
    assert_eq!(rv(&rpc.modify(3, "nonsense")), 5);
    assert_eq!(rv(&rpc.modify(1, &sync)), 5);
    assert_eq!(rv(&rpc.modify(3, &sync)), 5, "Fracture of a Fractured");
    // Resync with nothing changed since the fracture: 0, no job.
    let r = rpc.modify(4, &sync);
    assert_eq!((rv(&r), r["Job"].is_null()), (0, true), "Resync: {r}");
    assert_eq!(rpc.sync(&sync).unwrap()["SyncState"], SYNCHRONIZED);
    assert_eq!(rv(&rpc.modify(3, &sync)), 0, "Fracture again");
    qemu_io(&d.lun_url(TGT, 0), &["write -P 0x39 33M 3M"]);
    // 4096 + a job for a Resync with something to copy.
    let r = rpc.modify(4, &sync);
    assert_eq!(rv(&r), JOB_STARTED, "Resync: {r}");
    let rjob = r["Job"].as_str().unwrap().to_string();
    rpc.wait_converged(&sync, WAIT);
    // RequestJobStateChange: 4097 finished, 4098 TimeoutPeriod, 5 unknown
    // job or state, 1 Service / vendor state.
    assert_eq!(rpc.job_state_change(&rjob, 4), 4097);
    let r = rpc.call(
        "RequestJobStateChange",
        json!({"Job": rjob, "RequestedState": 4, "TimeoutPeriod": "00000000000010.000000:000"}),
    );
    assert_eq!(rv(&r), 4098, "{r}");
    assert_eq!(rpc.job_state_change("lunmirror:999", 4), 5);
    assert_eq!(rpc.job_state_change(&rjob, 11), 5);
    assert_eq!(rpc.job_state_change(&rjob, 6), 1);
    let r = rpc.call("GetJob", json!({"Job": "lunmirror:999"}));
    assert_eq!((rv(&r), r["Instance"].is_null()), (5, true), "{r}");

    // Through all of that the associations kept mirroring.
    let mut q = QemuIo::open(&d.lun_url(TGT, 0));
    q.cmd("write -f -P 0x3a 7M 1M");
    assert_range_is("Sync replica", Path::new(&r1), 7 * M, M, 0x3a);
    q.close();
    qemu_io(&d.lun_url(TGT, 1), &["write -P 0x3b 9M 1M"]);
    rpc.wait_converged(&sync2, WAIT);
    assert_files_same("lun0 replica", Path::new(&r1), &volume_file(&d, "lun0"));
    assert_files_same("lun1 replica", Path::new(&r2), &volume_file(&d, "lun1"));
    d.stop();
}

fn code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("no error: {v}"))
}

#[test]
fn malformed_socket_input_gets_json_rpc_errors_and_the_daemon_keeps_serving() {
    if !qemu_iscsi_supported() {
        return;
    }
    let d = Daemon::builder().arg("--size").arg("64M").start();
    let replica = d.tmp().join("r.img");
    filled_file(&replica, 64 * M, 0xee);
    let mut rpc = Rpc::to(&d);
    let r = rpc.attach("lun0", replica.to_str().unwrap(), SYNC);
    let sync = r["Synchronization"].as_str().unwrap().to_string();
    rpc.wait_job(r["Job"].as_str().unwrap(), WAIT);

    let mut c = Rpc::to(&d);
    // -32700: not JSON, truncated, not UTF-8.
    assert_eq!(code(&c.raw(b"hello")), -32700);
    assert_eq!(code(&c.raw(br#"{"jsonrpc":"2.0","method":"#)), -32700);
    assert_eq!(code(&c.raw(b"\xff\xfe\x00garbage")), -32700);
    let v = c.raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"\xc3\x28\",\"id\":1}");
    assert_eq!(code(&v), -32700);
    // -32600: not a request.
    for bad in [
        &br#"[]"#[..],
        br#"42"#,
        br#""AttachReplica""#,
        br#"{"method":"EnumerateJobs","id":1}"#,
        br#"{"jsonrpc":"1.0","method":"EnumerateJobs","id":1}"#,
        br#"{"jsonrpc":"2.0","method":7,"id":1}"#,
        br#"{"jsonrpc":"2.0","id":1}"#,
        br#"{"jsonrpc":"2.0","method":"EnumerateJobs","id":{"a":1}}"#,
    ] {
        let v = c.raw(bad);
        assert_eq!(code(&v), -32600, "{}: {v}", String::from_utf8_lossy(bad));
    }
    // -32601: unknown method, with the id echoed.
    let v = c.raw(br#"{"jsonrpc":"2.0","method":"FormatDisk","params":{},"id":"x1"}"#);
    assert_eq!((code(&v), v["id"].clone()), (-32601, json!("x1")), "{v}");
    let v = c.raw(br#"{"jsonrpc":"2.0","method":"attachreplica","id":2}"#);
    assert_eq!(code(&v), -32601, "{v}");
    // -32602: wrong types, out of range, missing, unknown, positional.
    let target = replica.display().to_string();
    for params in [
        json!({"SourceElement": "lun0", "TargetElement": target, "CopyType": "3"}),
        json!({"SourceElement": "lun0", "TargetElement": target, "CopyType": 3.5}),
        json!({"SourceElement": "lun0", "TargetElement": target, "CopyType": -1}),
        json!({"SourceElement": "lun0", "TargetElement": target, "CopyType": 65536}),
        json!({"SourceElement": 0, "TargetElement": target, "CopyType": 3}),
        json!({"SourceElement": "lun0", "TargetElement": null, "CopyType": 3}),
        json!({"SourceElement": "lun0", "CopyType": 3}),
        json!({"SourceElement": "lun0", "TargetElement": target, "CopyType": 3, "Bogus": 1}),
        json!(["lun0", target, 3]),
        json!("lun0"),
    ] {
        let line = json!({"jsonrpc": "2.0", "method": "AttachReplica", "params": params, "id": 5});
        let v = c.raw(line.to_string().as_bytes());
        assert_eq!(code(&v), -32602, "{line}: {v}");
        assert_eq!(v["id"], 5);
    }
    for line in [
        json!({"jsonrpc":"2.0","method":"ModifySynchronization","params":{"Operation":"Detach","Synchronization":sync},"id":6}),
        json!({"jsonrpc":"2.0","method":"GetJob","params":{"Job":1},"id":6}),
        json!({"jsonrpc":"2.0","method":"RequestJobStateChange","params":{"Job":"lunmirror:1"},"id":6}),
        json!({"jsonrpc":"2.0","method":"EnumerateVolumes","params":[1],"id":6}),
    ] {
        let v = c.raw(line.to_string().as_bytes());
        assert_eq!(code(&v), -32602, "{line}: {v}");
    }
    // A line over the size cap is refused and skipped; the connection
    // stays usable.
    let mut big = br#"{"jsonrpc":"2.0","method":"EnumerateVolumes","id":1,"pad":""#.to_vec();
    big.extend(std::iter::repeat_n(b'a', 100_000));
    big.extend(br#""}"#);
    assert_eq!(code(&c.raw(&big)), -32600);
    // A notification gets no reply: the next reply is the next request's.
    c.send(br#"{"jsonrpc":"2.0","method":"EnumerateJobs"}"#);
    c.send(b"\n\n");
    let v = c.raw(br#"{"jsonrpc":"2.0","method":"EnumerateVolumes","id":77}"#);
    assert_eq!(v["id"], 77, "{v}");
    assert_eq!(v["result"]["Volumes"][0]["Name"], "lun0", "{v}");
    // A batch: one reply per request, an error for the bad one.
    let v = c.raw(
        br#"[{"jsonrpc":"2.0","method":"EnumerateSynchronized","id":1},{"jsonrpc":"2.0","method":"Nope","id":2}]"#,
    );
    let arr = v.as_array().unwrap_or_else(|| panic!("batch reply {v}"));
    assert_eq!(arr.len(), 2, "{v}");
    assert!(arr.iter().any(|x| x["id"] == 2 && code(x) == -32601), "{v}");
    assert!(
        arr.iter()
            .any(|x| x["id"] == 1
                && x["result"]["Synchronized"][0]["Synchronization"] == sync.as_str()),
        "{v}"
    );

    // Peers that misbehave and go away: half a line, then hang up; binary
    // junk; a burst of connections.
    for junk in [
        &b"{\"jsonrpc\":\"2.0\",\"meth"[..],
        b"\x00\x01\x02\x03\xff",
        &[b'{'; 70_000],
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(socket(&d)).unwrap();
        let _ = s.write_all(junk);
        drop(s);
    }
    let conns: Vec<Rpc> = (0..20).map(|_| Rpc::to(&d)).collect();
    drop(conns);

    // The daemon still serves the socket (old and new connections)...
    let v = c.call("EnumerateVolumes", Value::Null);
    assert_eq!(v["Volumes"][0]["Synchronizations"], json!([sync]), "{v}");
    let mut fresh = Rpc::to(&d);
    assert_eq!(fresh.sync(&sync).unwrap()["SyncState"], SYNCHRONIZED);
    // ...and iSCSI, with the association still mirroring.
    qemu_io(&lun0(&d), &["write -f -P 0x4e 2M 1M", "read -P 0x4e 2M 1M"]);
    assert_range_is("Sync replica after bad input", &replica, 2 * M, M, 0x4e);
    let listed = cli_ok(&d, &["replicas"]);
    assert!(listed.contains("Synchronized"), "{listed}");
    d.stop();
}

/// Fill the filesystem holding `dir`: write `name` until ENOSPC.
fn fill(dir: &Path, name: &str) -> u64 {
    let mut f = std::fs::File::create(dir.join(name)).unwrap();
    let chunk = vec![0x99u8; 256 << 10];
    let mut n = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => return n,
            Ok(k) => n += k as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return n,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
}

#[test]
fn replica_on_a_full_filesystem_goes_broken_and_resyncs() {
    if !qemu_iscsi_supported() {
        return;
    }
    const SIZE: u64 = 64 * M;
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&dir.path().join("small"), "80M") else {
        return;
    };
    // Room for ~40 MiB of the 64 MiB sparse replica.
    let filler = fs.dir.join("filler");
    std::fs::write(&filler, vec![0x99u8; 40 << 20]).unwrap();
    let replica = fs.dir.join("replica.img");
    sparse_file(&replica, SIZE);

    let d = Daemon::builder().arg("--size").arg("64M").start();
    let primary = volume_file(&d, "lun0");
    let url = lun0(&d);
    qemu_io(&url, &["write -P 0x21 0 16M", "write -P 0x22 48M 16M"]);

    // The initial copy runs out of space: the job fails, the CLI says so.
    let out = cli(
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
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let sync = stdout.split_whitespace().next().unwrap().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Exception"), "{stderr}");

    // Host writes keep succeeding.
    let mut q = QemuIo::open(&url);
    q.cmd("write -f -P 0x23 20M 4M");
    q.cmd("write -P 0x24 60M 2M");
    q.cmd("read -P 0x23 20M 4M");
    let mut rpc = Rpc::to(&d);
    let s = rpc.sync(&sync).unwrap();
    assert_eq!(s["SyncState"], BROKEN, "{s}");
    assert!(s["OutOfSyncBytes"].as_u64().unwrap() > 0, "{s}");
    let why = s["ErrorDescription"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(why.contains("space"), "{s}");
    let line = replicas_line(&d, &sync).unwrap();
    assert!(line.contains("Broken") && line.contains("error:"), "{line}");

    // Free space, Resync: the replica equals the primary.
    std::fs::remove_file(&filler).unwrap();
    let out = cli_ok(
        &d,
        &["modify-replica", &sync, "--operation", "resync", "--wait"],
    );
    assert!(out.contains("Completed"), "{out}");
    rpc.wait_converged(&sync, WAIT);
    assert_files_same("replica after freeing space + Resync", &replica, &primary);
    q.cmd("write -P 0x25 30M 1M");
    assert_range_is("Sync write after Resync", &replica, 30 * M, M, 0x25);

    // Now while mirroring normally: a discard punches a hole in the
    // replica, the filesystem fills up, and the next write to that range
    // cannot be mirrored.
    let before = allocated_bytes(&replica);
    q.cmd(&format!("discard {} {}", 32 * M, 8 * M));
    let after = allocated_bytes(&replica);
    // tmpfs punches holes, and the mirror passes UNMAP on to the replica.
    assert!(
        after + 4 * M <= before,
        "discard did not deallocate the replica ({before} -> {after} bytes)"
    );
    fill(&fs.dir, "filler2");
    q.cmd("write -P 0x26 32M 8M");
    q.cmd("read -P 0x26 32M 8M");
    let s = rpc.sync(&sync).unwrap();
    assert_eq!(s["SyncState"], BROKEN, "{s}");
    let line = replicas_line(&d, &sync).unwrap();
    assert!(line.contains("Broken"), "{line}");
    std::fs::remove_file(fs.dir.join("filler2")).unwrap();
    let out = cli_ok(
        &d,
        &["modify-replica", &sync, "--operation", "resync", "--wait"],
    );
    assert!(out.contains("Completed"), "{out}");
    rpc.wait_converged(&sync, WAIT);
    assert_files_same("replica after the second Resync", &replica, &primary);
    q.close();
    d.stop();
    drop(fs);
}

/// The journal shipper meets ENOSPC: an Async replica that fit when it was
/// copied loses its space after a discard punched a hole in it; the host
/// keeps writing, the association goes Broken (the journal stops), and a
/// Resync after freeing space brings the replica back to the primary.
#[test]
fn async_replica_on_a_full_filesystem_goes_broken_and_resyncs() {
    if !qemu_iscsi_supported() {
        return;
    }
    const SIZE: u64 = 64 * M;
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&dir.path().join("small"), "72M") else {
        return;
    };
    let replica = fs.dir.join("replica.img");
    sparse_file(&replica, SIZE);
    let d = Daemon::builder().arg("--size").arg("64M").start();
    let primary = volume_file(&d, "lun0");
    let url = lun0(&d);
    qemu_io(&url, &["write -P 0x41 0 8M"]);
    let out = cli_ok(
        &d,
        &[
            "attach-replica",
            "--source",
            "lun0",
            "--target",
            replica.to_str().unwrap(),
            "--copy-type",
            "async",
            "--wait",
        ],
    );
    let sync = out.split_whitespace().next().unwrap().to_string();
    let mut rpc = Rpc::to(&d);
    rpc.wait_converged(&sync, WAIT);
    assert_files_same("Async replica after the copy", &replica, &primary);

    let mut q = QemuIo::open(&url);
    let before = allocated_bytes(&replica);
    q.cmd(&format!("discard {} {}", 16 * M, 16 * M));
    rpc.wait_converged(&sync, WAIT);
    let after = allocated_bytes(&replica);
    assert!(
        after + 8 * M <= before,
        "the shipped discard did not deallocate the replica ({before} -> {after} bytes)"
    );
    fill(&fs.dir, "filler");
    for i in 0..4u64 {
        q.cmd(&format!(
            "write -P {:#x} {} 4M",
            0x50 + i,
            16 * M + i * 4 * M
        ));
    }
    q.cmd("flush");
    let s = rpc.wait_sync(&sync, WAIT, "Broken", |s| s["SyncState"] == BROKEN);
    let why = s["ErrorDescription"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(why.contains("space"), "{s}");
    // Host writes still succeed while Broken, and are tracked.
    q.cmd("write -f -P 0x5f 40M 2M");
    q.cmd("read -P 0x52 24M 4M");
    q.cmd("read -P 0x5f 40M 2M");
    let line = replicas_line(&d, &sync).unwrap();
    assert!(line.contains("Broken") && line.contains("error:"), "{line}");

    std::fs::remove_file(fs.dir.join("filler")).unwrap();
    let out = cli_ok(
        &d,
        &["modify-replica", &sync, "--operation", "resync", "--wait"],
    );
    assert!(out.contains("Completed"), "{out}");
    q.cmd("write -P 0x60 50M 1M");
    q.close();
    rpc.wait_converged(&sync, WAIT);
    assert_files_same(
        "Async replica after freeing space + Resync",
        &replica,
        &primary,
    );
    d.stop();
    drop(fs);
}

/// `lunmirror jobs JOB --terminate` on a running initial copy: the job ends
/// Terminated, the association is Broken with the uncopied regions out of
/// sync, and Resync finishes the job's work.
#[test]
fn terminating_a_copy_job_with_the_cli_leaves_it_broken_until_resync() {
    if !qemu_iscsi_supported() {
        return;
    }
    let d = Daemon::builder().arg("--size").arg("64M").start();
    let primary = volume_file(&d, "lun0");
    let replica = d.tmp().join("t.img");
    filled_file(&replica, 64 * M, 0xee);
    qemu_io(&lun0(&d), &["write -P 0x51 0 64M"]);
    let mut rpc = Rpc::to(&d);
    let target = replica.to_str().unwrap().to_string();
    let r = start_suspended(
        &mut rpc,
        |rpc| rpc.attach("lun0", &target, SYNC),
        detach_after,
    );
    let job = r["Job"].as_str().unwrap().to_string();
    let sync = r["Synchronization"].as_str().unwrap().to_string();
    cli_ok(&d, &["jobs", &job, "--terminate"]);
    let j = rpc.job(&job);
    assert_eq!(j["JobState"], 8, "Terminated: {j}");
    let listed = cli_ok(&d, &["jobs", &job]);
    assert!(listed.contains("Terminated"), "{listed}");
    let s = rpc.sync(&sync).unwrap();
    assert_eq!(s["SyncState"], BROKEN, "{s}");
    assert!(s["OutOfSyncBytes"].as_u64().unwrap() > 0, "{s}");
    // Terminating it again: the job is finished (4097), exit status 1.
    let out = cli(&d, &["jobs", &job, "--terminate"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // Host writes are tracked meanwhile; Resync completes the replica.
    qemu_io(&lun0(&d), &["write -P 0x52 10M 1M"]);
    let out = cli_ok(
        &d,
        &["modify-replica", &sync, "--operation", "resync", "--wait"],
    );
    assert!(out.contains("Completed"), "{out}");
    rpc.wait_converged(&sync, WAIT);
    assert_files_same("replica after terminate + Resync", &replica, &primary);
    d.stop();
}
