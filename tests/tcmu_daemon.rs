//! The daemon's `[tcmu]` section as systemd sees it (Type=notify): a
//! TCMU-only config (no built-in target, like the shipped
//! /etc/lunmirror/lunmirror.toml) either serves and reports READY=1 with a
//! STATUS, or — on a kernel without target_core_user — exits 1 with a
//! clear message and never reports READY. Runs on any host; the VM tests
//! (tests/vm/) run this binary in the guest with LUNMIRROR_EXPECT_TCMU=1,
//! where the serving case must happen.

mod common;

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::BIN;

fn tcmu_only_config(dir: &Path, enable: &str) -> std::path::PathBuf {
    let p = dir.join("lunmirror.toml");
    std::fs::write(
        &p,
        format!(
            "[daemon]\nstate_dir = \"{}\"\n[tcmu]\nenable = \"{enable}\"\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    p
}

#[test]
fn tcmu_only_daemon_is_ready_or_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let conf = tcmu_only_config(dir.path(), "on");
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&conf)
        .env("NOTIFY_SOCKET", &notify)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + Duration::from_secs(30);
    let outcome = loop {
        if let Ok(n) = sock.recv(&mut buf) {
            break Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        if let Some(st) = child.try_wait().unwrap() {
            break Err(st);
        }
        assert!(Instant::now() < deadline, "neither READY nor exit in 30 s");
    };
    match outcome {
        // No TCM-USER netlink family here (the usual development host).
        Err(status) => {
            assert!(
                std::env::var_os("LUNMIRROR_EXPECT_TCMU").is_none(),
                "LUNMIRROR_EXPECT_TCMU is set but the daemon exited: {status}"
            );
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            assert_eq!(status.code(), Some(1), "{err}");
            assert!(err.contains("cannot start the TCMU frontend"), "{err}");
            assert!(
                sock.recv(&mut buf).is_err(),
                "READY sent by a daemon that failed"
            );
        }
        // A kernel with target_core_user: TCMU-only serving.
        Ok(msg) => {
            let mut lines = msg.lines();
            assert_eq!(lines.next(), Some("READY=1"), "{msg}");
            assert_eq!(
                lines.next(),
                Some("STATUS=serving: no built-in iSCSI portal; TCMU handler running"),
                "{msg}"
            );
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let n = sock.recv(&mut buf).expect("STOPPING=1");
            assert!(buf[..n].starts_with(b"STOPPING=1"));
            assert!(child.wait().unwrap().success());
        }
    }
}

#[test]
fn no_target_without_tcmu_on_is_a_config_error() {
    for enable in ["auto", "off"] {
        let dir = tempfile::tempdir().unwrap();
        let conf = tcmu_only_config(dir.path(), enable);
        let out = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&conf)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{enable}: {err}");
        assert!(err.contains("at least one [[target]]"), "{err}");
        assert!(err.contains("enable = \"on\""), "{err}");
        assert!(!dir.path().join("state").exists(), "nothing touched");
    }
}

#[test]
fn shipped_default_config_is_valid() {
    // systemd/etc-lunmirror/lunmirror.toml with the state dir redirected:
    // it must parse (TCMU-only, no built-in target).
    let shipped =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/etc-lunmirror/lunmirror.toml");
    let text = std::fs::read_to_string(&shipped).unwrap();
    let ov = lunmirror::config::Overrides {
        state_dir: Some(tempfile::tempdir().unwrap().path().join("s")),
        ..Default::default()
    };
    let cfg = lunmirror::config::Config::parse(&text, "lunmirror.toml", &ov)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(cfg.targets.is_empty());
    assert_eq!(cfg.tcmu.mode, lunmirror::config::TcmuMode::On);
}
