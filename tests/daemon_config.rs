//! A config file with two targets, several LUNs, 4096-byte blocks, a
//! read-only LUN, explicit serial/WWN, shared and per-target portals,
//! checked with real initiators.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);
const A: &str = "iqn.2026-11.io.lunmirror:alpha";
const B: &str = "iqn.2026-11.io.lunmirror:beta";

fn two_targets() -> String {
    format!(
        r#"
[[target]]
name = "{A}"
alias = "first"
portals = ["127.0.0.1:0"]

[[target.lun]]
id = 0
volume = "a0"
size = "16M"

[[target.lun]]
id = 3
volume = "a3"
size = "32M"
block_size = 4096
serial = "ALPHA3"
wwn = "naa.60014050deadbeef1122334455667788"

[[target]]
name = "{B}"
portals = ["127.0.0.1:0"]

[[target.lun]]
id = 0
volume = "golden"
path = "{{tmp}}/golden.img"
read_only = true
"#
    )
}

/// 8 MiB of pattern for the read-only LUN, written before the daemon starts.
fn make_golden(dir: &std::path::Path) -> Vec<u8> {
    let data = pseudo_random(8 << 20, 7);
    std::fs::write(dir.join("golden.img"), &data).unwrap();
    data
}

fn start_two_targets() -> (Daemon, Vec<u8>) {
    let tmp = tempfile::tempdir().unwrap();
    let golden = make_golden(tmp.path());
    let d = Daemon::builder()
        .config(&two_targets())
        .listen(&[])
        .expect_listeners(1)
        .start_in(tmp);
    (d, golden)
}

#[test]
fn two_targets_luns_and_block_sizes() {
    if !require_tools(&["iscsi-ls", "iscsi-inq", "iscsi-readcapacity16"]) {
        return;
    }
    let (d, _) = start_two_targets();
    let ls = run_ok(Command::new("iscsi-ls").arg("-s").arg(d.url()), T);
    for t in [A, B] {
        assert!(
            ls.contains(&format!("Target:{t} Portal:{}", d.portal())),
            "{t} missing:\n{ls}"
        );
    }
    assert!(ls.contains("Lun:3"), "{ls}");

    let cap = run_ok(Command::new("iscsi-readcapacity16").arg(d.lun_url(A, 3)), T);
    assert!(cap.contains("LOGICAL BLOCK LENGTH IN BYTES:4096"), "{cap}");
    assert!(
        cap.contains(&format!("Total size:{}", 32u64 << 20)),
        "{cap}"
    );
    let cap = run_ok(Command::new("iscsi-readcapacity16").arg(d.lun_url(A, 0)), T);
    assert!(cap.contains("LOGICAL BLOCK LENGTH IN BYTES:512"), "{cap}");
    assert!(
        cap.contains(&format!("Total size:{}", 16u64 << 20)),
        "{cap}"
    );
    let cap = run_ok(
        Command::new("iscsi-readcapacity16")
            .arg("-s")
            .arg(d.lun_url(B, 0)),
        T,
    );
    assert_eq!(cap.trim(), (8u64 << 20).to_string());

    let serial = run_ok(
        Command::new("iscsi-inq")
            .args(["-e", "1", "-c", "128"])
            .arg(d.lun_url(A, 3)),
        T,
    );
    assert!(serial.contains("Unit Serial Number:[ALPHA3]"), "{serial}");
    // iscsi-inq prints the NAA designator as raw bytes (none of these is
    // NUL or a newline).
    let ids = run(
        Command::new("iscsi-inq")
            .args(["-e", "1", "-c", "131"])
            .arg(d.lun_url(A, 3)),
        T,
    );
    assert!(ids.status.success());
    let wwn = lunmirror::config::parse_wwn("60014050deadbeef1122334455667788").unwrap();
    assert!(
        contains_bytes(&ids.stdout, &wwn),
        "{}",
        String::from_utf8_lossy(&ids.stdout)
    );

    // LUN 1 does not exist on alpha: the tools must fail, not hang.
    let out = run(Command::new("iscsi-readcapacity16").arg(d.lun_url(A, 1)), T);
    assert!(
        !out.status.success(),
        "readcapacity of a missing LUN succeeded"
    );

    // Volumes were created sparse at their default paths.
    for (v, size) in [("a0", 16u64 << 20), ("a3", 32 << 20)] {
        let p = d.state_dir.join("volumes").join(format!("{v}.img"));
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            size,
            "{}",
            p.display()
        );
    }
    d.stop();
}

#[test]
fn read_only_lun_refuses_writes() {
    if !qemu_iscsi_supported() {
        return;
    }
    let (d, golden) = start_two_targets();
    let url = d.lun_url(B, 0);
    let golden_path = d.tmp().join("golden.img");

    // Reads work and return the file's bytes.
    let back = d.tmp().join("back.img");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw", &url])
            .arg(&back),
        T,
    );
    assert!(
        std::fs::read(&back).unwrap() == golden,
        "read-only LUN read back differs"
    );

    // Writes fail: qemu either refuses to open a write-protected LUN
    // read-write, or the WRITE gets DATA PROTECT.
    let out = run(
        Command::new("qemu-io").args(["-c", "write -P 0x11 0 64k", &url]),
        T,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = !out.status.success()
        || text.contains("failed")
        || text.contains("ermission denied")
        || text.contains("read-only")
        || text.contains("write protected");
    assert!(refused, "write to a read-only LUN was not refused:\n{text}");
    assert!(!text.contains("wrote 65536/65536 bytes"), "{text}");
    let _tmp = d.stop();
    assert!(
        std::fs::read(&golden_path).unwrap() == golden,
        "read-only file changed"
    );
}

/// libiscsi's ReadOnly suite against the read-only LUN: WRITE 10/12/16,
/// WRITE SAME, UNMAP... must all fail with DATA PROTECT / WRITE PROTECTED
/// (the suite skips itself on a writable LU, so its asserts are checked).
#[test]
fn read_only_lun_passes_libiscsi_readonly_suite() {
    if !require_tools(&["iscsi-test-cu"]) {
        return;
    }
    let (d, golden) = start_two_targets();
    let out = run(
        Command::new("iscsi-test-cu")
            .args(["--test=ALL.ReadOnly", "--dataloss", "--fail"])
            .arg(d.lun_url(B, 0)),
        T,
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("not write protected"), "{text}");
    let asserts: Vec<&str> = text
        .lines()
        .find(|l| l.trim_start().starts_with("asserts"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    // asserts  Total  Ran  Passed  Failed  Inactive
    let passed: u32 = asserts.get(3).and_then(|v| v.parse().ok()).unwrap_or(0);
    let failed: u32 = asserts.get(4).and_then(|v| v.parse().ok()).unwrap_or(1);
    assert!(passed >= 5 && failed == 0, "{text}");
    let golden_path = d.tmp().join("golden.img");
    let _tmp = d.stop();
    assert!(
        std::fs::read(golden_path).unwrap() == golden,
        "read-only file changed"
    );
}

#[test]
fn config_portals_on_ipv4_and_ipv6() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        println!("SKIPPED: IPv6 loopback not available");
        return;
    }
    if !require_tools(&["iscsi-ls"]) {
        return;
    }
    let text = format!(
        "[[target]]\nname = \"{A}\"\nportals = [\"127.0.0.1:0\", \"[::1]:0\"]\n[[target.lun]]\nid = 0\nvolume = \"v\"\nsize = \"1M\"\n"
    );
    let d = Daemon::builder()
        .config(&text)
        .listen(&[])
        .expect_listeners(2)
        .start();
    assert_eq!(d.addrs.len(), 2);
    for a in &d.addrs {
        let ls = run_ok(Command::new("iscsi-ls").arg(format!("iscsi://{a}")), T);
        assert!(ls.contains(A), "via {a}:\n{ls}");
    }
    d.stop();
}
