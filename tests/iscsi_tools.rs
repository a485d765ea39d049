//! The libiscsi command line tools against an in-process target.

mod common;

use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[test]
fn iscsi_ls_discovers_the_target() {
    let ls = require_tool!("iscsi-ls");
    let t = common::start(&[8 << 20, 4 << 20]);
    let out = common::run_ok(
        Command::new(ls)
            .arg("-s")
            .arg(format!("iscsi://{}", t.portal())),
        T,
    );
    assert!(out.contains(common::IQN), "{out}");
    // -s logs in and lists the LUNs
    assert!(out.contains("Lun:0"), "{out}");
    assert!(out.contains("Lun:1"), "{out}");
    t.stop();
}

#[test]
fn iscsi_inq_reads_standard_and_vpd_data() {
    let inq = require_tool!("iscsi-inq");
    let t = common::start(&[8 << 20]);
    let out = common::run_ok(Command::new(&inq).arg(t.url(0)), T);
    assert!(out.contains("LUNMIRR"), "{out}");
    let out = common::run_ok(
        Command::new(&inq)
            .args(["-e", "1", "-c", "128"])
            .arg(t.url(0)),
        T,
    );
    assert!(out.contains("LM00000000"), "{out}");
    t.stop();
}

#[test]
fn iscsi_readcapacity16_reports_the_size() {
    let rc = require_tool!("iscsi-readcapacity16");
    let t = common::start(&[8 << 20]);
    let out = common::run_ok(Command::new(rc).arg(t.url(0)), T);
    // 8 MiB of 512-byte blocks: last LBA 16383
    assert!(out.contains("16383") || out.contains("16384"), "{out}");
    t.stop();
}
