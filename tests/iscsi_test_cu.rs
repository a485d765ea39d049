//! libiscsi's conformance suite (`iscsi-test-cu`) against an in-process
//! target, family by family. `-d` allows the data-loss tests (writes).

mod common;

use std::process::Command;
use std::time::Duration;

/// Run `iscsi-test-cu -d <url> -t <family>` and require that tests ran and
/// none failed.
fn family(name: &str) {
    let cu = require_tool!("iscsi-test-cu");
    let t = common::start(&[64 << 20]);
    let out = common::run(
        Command::new(cu).arg("-d").arg(t.url(0)).arg("-t").arg(name),
        Duration::from_secs(300),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // CUnit summary line: "tests  <total> <ran> <passed> <failed> <inactive>"
    let counts: Vec<u32> = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("tests"))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|w| w.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        counts.len() >= 4 && counts[1] > 0 && counts[3] == 0,
        "{name}: {counts:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    println!("{name}: ran {} passed {}", counts[1], counts[2]);
    t.stop();
}

#[test]
fn iscsi_family() {
    family("iSCSI");
}

#[test]
fn test_unit_ready() {
    family("SCSI.TestUnitReady");
}

#[test]
fn inquiry() {
    family("SCSI.Inquiry");
}

#[test]
fn read_capacity10() {
    family("SCSI.ReadCapacity10");
}

#[test]
fn read_capacity16() {
    family("SCSI.ReadCapacity16");
}

#[test]
fn read10() {
    family("SCSI.Read10");
}

#[test]
fn read16() {
    family("SCSI.Read16");
}

#[test]
fn write10() {
    family("SCSI.Write10");
}

#[test]
fn write16() {
    family("SCSI.Write16");
}
