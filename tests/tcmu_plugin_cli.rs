//! `lunmirror-targetcli` (targetcli-plugin/lunmirror_tcmu/cli.py) against
//! the REAL daemon's control socket, not the plugin's fake: attach with
//! wait, list, job show/wait, fracture, resync, detach, and a refused
//! attach whose reason reaches the user. The Python unit tests use a fake
//! socket; this test keeps the two in agreement with the actual protocol.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{run, skip, Daemon};

const PYTHON: &str = "/usr/bin/python3";
const T: Duration = Duration::from_secs(60);
const SIZE: u64 = 4 << 20;

fn plugin_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("targetcli-plugin")
}

/// Run `lunmirror-targetcli --socket SOCK WORDS...`: (exit code, stdout, stderr).
fn cli(sock: &Path, words: &[&str]) -> (i32, String, String) {
    let out = run(
        Command::new(PYTHON)
            .args(["-m", "lunmirror_tcmu.cli", "--socket"])
            .arg(sock)
            .args(words)
            .env("PYTHONPATH", plugin_dir()),
        T,
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(sock: &Path, words: &[&str]) -> String {
    let (rc, out, err) = cli(sock, words);
    assert_eq!(rc, 0, "{words:?}\nstdout:\n{out}\nstderr:\n{err}");
    out
}

#[test]
fn replication_commands_against_the_real_daemon() {
    if !Path::new(PYTHON).exists() {
        skip("/usr/bin/python3 not installed");
        return;
    }
    let d = Daemon::builder()
        .config(&format!(
            "[tcmu]\nenable = \"off\"\n[[target]]\nname = \"iqn.2026-11.io.lunmirror:plugin\"\n[[target.lun]]\nid = 0\nvolume = \"lun0\"\npath = \"{{tmp}}/lun0.img\"\nsize = {SIZE}\n"
        ))
        .start();
    let sock = d.state_dir.join("control.sock");
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("r.img");
    std::fs::File::create(&replica)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let r = replica.display().to_string();
    let vol = "/backstores/user:mirror/lun0";

    let out = ok(
        &sock,
        &[
            vol,
            "attach_replica",
            &format!("target={r}"),
            "copytype=async",
            "wait=yes",
            "timeout=30",
        ],
    );
    assert!(out.contains("job lunmirror:1 started"), "{out}");
    assert!(out.contains("Completed (7)"), "{out}");
    assert!(
        out.contains(&format!("Replica {r} of lun0 is attached")),
        "{out}"
    );

    let out = ok(&sock, &[vol, "replicas"]);
    assert!(
        out.contains(&format!(
            "lun0 -> {r} [async] Synchronized (6) 100% synced (sync=lunmirror:sync:1)"
        )),
        "{out}"
    );
    // Without LIO's configfs every volume of the daemon is listed.
    if !Path::new("/sys/kernel/config/target/core").exists() {
        let out = ok(&sock, &["/backstores/user:mirror", "ls"]);
        assert!(out.contains("o- lun0"), "{out}");
        assert!(out.contains(&format!("lun0 -> {r}")), "{out}");
    }
    let out = ok(&sock, &["/jobs", "show", "id=lunmirror:1"]);
    assert!(
        out.contains("lunmirror:1: Completed (7), 100% complete"),
        "{out}"
    );
    ok(&sock, &["/jobs", "wait", "id=lunmirror:1"]);
    let out = ok(&sock, &["/jobs", "ls"]);
    assert!(out.contains("lunmirror:1: Completed (7)"), "{out}");

    let out = ok(&sock, &[vol, "fracture"]);
    assert!(
        out.contains("fracture lunmirror:sync:1 on lun0 done"),
        "{out}"
    );
    assert!(ok(&sock, &[vol, "replicas"]).contains("Fractured (13)"));
    let out = ok(&sock, &[vol, "resync", "wait=yes"]);
    // Nothing was written while fractured: done at once, or a short job.
    assert!(
        out.contains("resync lunmirror:sync:1 on lun0 done")
            || out.contains("job lunmirror:2 started"),
        "{out}"
    );
    assert!(ok(&sock, &[vol, "replicas"]).contains("Synchronized (6)"));

    // Refusals carry the daemon's reason.
    let (rc, _, err) = cli(&sock, &[vol, "attach_replica", "target=/nonexistent/r.img"]);
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("ReturnValue 5 (Invalid Parameter)"), "{err}");
    assert!(err.contains("/nonexistent/r.img"), "{err}");
    let (rc, _, err) = cli(&sock, &["/jobs", "show", "id=lunmirror:99"]);
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("unknown Job"), "{err}");

    let out = ok(&sock, &[vol, "detach_replica", &format!("target={r}")]);
    assert!(
        out.contains("detach_replica lunmirror:sync:1 on lun0 done"),
        "{out}"
    );
    assert!(ok(&sock, &[vol, "replicas"]).contains("lun0: no replicas"));
    d.stop();
}
