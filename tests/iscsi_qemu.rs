//! qemu-img / qemu-io over iscsi:// (libiscsi inside qemu) against an
//! in-process target.

mod common;

use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(300);

/// Deterministic pseudo-random bytes (xorshift), so a failure reproduces.
fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(len);
    v
}

#[test]
fn qemu_img_convert_round_trips_64_mib() {
    let qemu_img = require_tool!("qemu-img");
    let t = common::start(&[64 << 20]);
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let back = dir.path().join("back.raw");
    let image = pseudo_random(64 << 20, 0x9e37_79b9_7f4a_7c15);
    std::fs::write(&src, &image).expect("write image");
    common::run_ok(
        Command::new(&qemu_img)
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(t.url(0)),
        T,
    );
    // What landed on the LU is exactly the image...
    assert!(t.devs[0].snapshot() == image, "device differs from image");
    // ...and reading it back over iSCSI gives it again.
    common::run_ok(
        Command::new(&qemu_img)
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(t.url(0))
            .arg(&back),
        T,
    );
    let got = std::fs::read(&back).expect("read back");
    assert_eq!(got.len(), image.len());
    assert!(got == image, "read-back differs from image");
    t.stop();
}

#[test]
fn qemu_io_write_pattern_then_verify() {
    let qemu_io = require_tool!("qemu-io");
    let t = common::start(&[16 << 20]);
    let out = common::run_ok(
        Command::new(&qemu_io)
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0xab 0 1M",
                "-c",
                "read -P 0xab 0 1M",
            ])
            .arg(t.url(0)),
        T,
    );
    assert!(out.contains("wrote 1048576/1048576 bytes"), "{out}");
    assert!(out.contains("read 1048576/1048576 bytes"), "{out}");
    let snap = t.devs[0].snapshot();
    assert!(snap[..1 << 20].iter().all(|&b| b == 0xab));
    assert!(snap[1 << 20..].iter().all(|&b| b == 0));
    // A pattern mismatch is detected (so the check above means something).
    let out = common::run(
        Command::new(&qemu_io)
            .args(["-f", "raw", "-c", "read -P 0xcd 0 4k"])
            .arg(t.url(0)),
        T,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Pattern verification failed"), "{stdout}");
    t.stop();
}

#[test]
fn qemu_io_unaligned_and_large_requests() {
    let qemu_io = require_tool!("qemu-io");
    let t = common::start(&[32 << 20]);
    let out = common::run_ok(
        Command::new(&qemu_io)
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x11 512 7M",
                "-c",
                "write -P 0x22 3584 1536",
                "-c",
                "read -P 0x11 5120 1M",
                "-c",
                "read -P 0x22 3584 1536",
            ])
            .arg(t.url(0)),
        T,
    );
    assert!(!out.contains("failed"), "{out}");
    let snap = t.devs[0].snapshot();
    assert!(snap[3584..5120].iter().all(|&b| b == 0x22));
    assert!(snap[5120..(512 + (7 << 20))].iter().all(|&b| b == 0x11));
    t.stop();
}
