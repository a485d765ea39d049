//! The control socket itself: JSON-RPC errors for malformed input (the
//! server keeps serving), request size cap, notifications and batches,
//! socket mode 0660, stale/live socket handling, SO_PEERCRED checks.

mod replication_common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use lunmirror::control::protocol::MAX_REQUEST;
use lunmirror::control::{ControlServer, ServerOptions};
use replication_common::*;
use serde_json::Value;

fn start() -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), test_config(), &[("lun0", MB, true)]);
    (dir, d)
}

struct Conn {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Conn {
    fn new(path: &std::path::Path) -> Conn {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Conn {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }
    fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).unwrap();
    }
    fn recv(&mut self) -> Value {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
    }
    fn ask(&mut self, line: &str) -> Value {
        self.send(line.as_bytes());
        self.send(b"\n");
        self.recv()
    }
}

fn code(v: &Value) -> i64 {
    v["error"]["code"].as_i64().unwrap_or(0)
}

#[test]
fn malformed_input_gets_errors_and_the_server_keeps_serving() {
    let (_dir, d) = start();
    let mut c = Conn::new(&d.socket);
    assert_eq!(code(&c.ask("this is not json")), -32700);
    assert_eq!(code(&c.ask("{\"jsonrpc\":\"2.0\",")), -32700);
    assert_eq!(code(&c.ask("\u{1}\u{2}\u{3}")), -32700);
    assert_eq!(code(&c.ask("[]")), -32600);
    assert_eq!(code(&c.ask("\"just a string\"")), -32600);
    assert_eq!(code(&c.ask(r#"{"method":"EnumerateJobs","id":1}"#)), -32600);
    let v = c.ask(r#"{"jsonrpc":"2.0","method":"Format","id":7}"#);
    assert_eq!((code(&v), v["id"].as_i64()), (-32601, Some(7)));
    let v = c.ask(r#"{"jsonrpc":"2.0","method":"AttachReplica","params":{"SourceElement":"lun0","TargetElement":"/x","CopyType":"Sync"},"id":8}"#);
    assert_eq!(code(&v), -32602);
    let v = c.ask(r#"{"jsonrpc":"2.0","method":"AttachReplica","params":["lun0","/x",3],"id":9}"#);
    assert_eq!(code(&v), -32602);
    // Invalid UTF-8 inside a string.
    c.send(b"{\"jsonrpc\":\"2.0\",\"method\":\"\xff\xfe\",\"id\":1}\n");
    assert_eq!(code(&c.recv()), -32700);
    // Blank lines are ignored; the same connection still works.
    c.send(b"\n   \n");
    let v = c.ask(r#"{"jsonrpc":"2.0","method":"EnumerateVolumes","id":"v"}"#);
    assert_eq!(v["result"]["Volumes"][0]["Name"], "lun0");
    assert_eq!(v["id"], "v");
    // And so does a new one.
    let mut c2 = d.client();
    assert_eq!(c2.enumerate_volumes().unwrap().len(), 1);
    d.stop();
}

#[test]
fn oversized_request_is_refused_and_skipped() {
    let (_dir, d) = start();
    let mut c = Conn::new(&d.socket);
    let big = format!(
        r#"{{"jsonrpc":"2.0","method":"EnumerateJobs","params":{{"pad":"{}"}},"id":1}}"#,
        "x".repeat(MAX_REQUEST + 10)
    );
    let v = c.ask(&big);
    assert_eq!(code(&v), -32600);
    assert!(v["error"]["message"].as_str().unwrap().contains("exceeds"));
    // The rest of the long line was skipped; the next request is served.
    let v = c.ask(r#"{"jsonrpc":"2.0","method":"EnumerateJobs","id":2}"#);
    assert_eq!(
        (v["id"].as_i64(), v["result"]["Jobs"].is_array()),
        (Some(2), true)
    );
    d.stop();
}

#[test]
fn notifications_and_batches() {
    let (_dir, d) = start();
    let mut c = Conn::new(&d.socket);
    // A notification gets no reply: the next reply is for id 3.
    c.send(b"{\"jsonrpc\":\"2.0\",\"method\":\"EnumerateJobs\"}\n");
    let v = c.ask(r#"{"jsonrpc":"2.0","method":"EnumerateJobs","id":3}"#);
    assert_eq!(v["id"], 3);
    let v = c.ask(
        r#"[{"jsonrpc":"2.0","method":"EnumerateVolumes","id":1},{"jsonrpc":"2.0","method":"Bogus","id":2}]"#,
    );
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    assert_eq!(code(&arr[1]), -32601);
    d.stop();
}

#[test]
fn socket_mode_and_lifecycle() {
    let (dir, d) = start();
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    // A second server on a live socket is refused.
    let again = ControlServer::start(&d.socket, d.reg.clone());
    assert_eq!(again.unwrap_err().kind(), std::io::ErrorKind::AddrInUse);
    // A regular file at the path is never removed.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(ControlServer::start(&file, d.reg.clone()).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    // A stale socket (no listener) is replaced.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let s = ControlServer::start(&stale, d.reg.clone()).unwrap();
    assert!(UnixStream::connect(&stale).is_ok());
    s.shutdown();
    assert!(!stale.exists(), "socket removed at shutdown");
    d.stop();
}

/// Send one request as another user through `setpriv` + `socat`; returns
/// the reply line or socat's error.
fn connect_as(uid: u32, gid: u32, groups: &[u32], path: &std::path::Path) -> String {
    let groups_arg = if groups.is_empty() {
        "--clear-groups".to_string()
    } else {
        format!(
            "--groups={}",
            groups
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    let mut child = std::process::Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg(groups_arg)
        .arg("socat")
        .arg("-t5")
        .arg("-")
        .arg(format!("UNIX-CONNECT:{}", path.display()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv/socat run");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"EnumerateJobs\",\"id\":1}\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn have(tool: &str) -> bool {
    std::process::Command::new(tool).arg("-V").output().is_ok()
}

#[test]
fn peer_credentials_are_checked() {
    if !nix::unistd::geteuid().is_root() || !have("socat") || !have("setpriv") {
        eprintln!("skipped: needs root, socat and setpriv");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::start(dir.path(), test_config(), &[("lun0", MB, true)]);
    std::fs::set_permissions(
        dir.path().join("state"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    // Mode 0660: a stranger cannot even connect.
    let out = connect_as(65534, 65534, &[], &d.socket);
    assert!(out.contains("Permission denied"), "{out}");
    // With a world-writable socket, SO_PEERCRED still refuses the stranger…
    let open = dir.path().join("open.sock");
    let s = ControlServer::start_with(
        &open,
        d.reg.clone(),
        ServerOptions {
            mode: 0o666,
            ..ServerOptions::default()
        },
    )
    .unwrap();
    let out = connect_as(65534, 65534, &[], &open);
    assert!(out.contains("-32001"), "{out}");
    // …but accepts a member of the socket's group (supplementary).
    let gid = std::fs::metadata(&open)
        .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
        .unwrap();
    let out = connect_as(65534, 65534, &[gid], &open);
    assert!(out.contains("\"Jobs\""), "{out}");
    s.shutdown();
    d.stop();
}
