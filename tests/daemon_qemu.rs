//! Data integrity with qemu's iscsi:// driver: a 64 MiB random image
//! through `qemu-img convert` onto the LUN and back, qemu-io pattern writes
//! and reads, and durability across SIGTERM (the backing file holds the
//! data once the daemon has exited 0).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(300);

fn qemu_io<S: AsRef<str>>(url: &str, cmds: &[S]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.arg("-c").arg(x.as_ref());
    }
    c.arg(url);
    let shown = format!("{c:?}");
    let out = run(&mut c, T);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{shown} failed:\n{text}");
    assert!(
        !text.contains("failed") && !text.contains("Pattern verification"),
        "{shown}:\n{text}"
    );
    text
}

#[test]
fn qemu_img_convert_64mib_round_trip() {
    if !qemu_iscsi_supported() {
        return;
    }
    let d = Daemon::builder().arg("--size").arg("64M").start();
    let url = d.lun_url(DEFAULT_TARGET, 0);
    let src = d.tmp().join("random.img");
    let data = pseudo_random(64 << 20, 0x5eed);
    std::fs::write(&src, &data).unwrap();

    let info = run_ok(Command::new("qemu-img").args(["info", &url]), T);
    assert!(info.contains("virtual size: 64 MiB"), "{info}");

    // -n: the target exists (a LUN cannot be created by qemu-img).
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&url),
        T,
    );
    let back = d.tmp().join("back.img");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &url])
            .arg(&back),
        T,
    );
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), data.len());
    assert!(
        got == data,
        "image read back over iSCSI differs from what was written"
    );
    let out = run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&url),
        T,
    );
    assert!(
        out.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // After a clean stop the backing file holds exactly the image.
    let img = d.state_dir.join("volumes/lun0.img");
    let tmp = d.stop();
    assert!(
        std::fs::read(&img).unwrap() == data,
        "backing file differs after SIGTERM"
    );
    drop(tmp);
}

/// Read commands that check `pattern` over `offset..offset+len` in pieces
/// of at most `chunk` bytes.
fn reads(pattern: u8, offset: u64, len: u64, chunk: u64) -> Vec<String> {
    (offset..offset + len)
        .step_by(chunk as usize)
        .map(|o| format!("read -P {pattern:#x} {o} {}", chunk.min(offset + len - o)))
        .collect()
}

#[test]
fn qemu_io_patterns_512_and_4096() {
    if !qemu_iscsi_supported() {
        return;
    }
    let t = "iqn.2026-11.io.lunmirror:patterns";
    let cfg = format!(
        "[[target]]\nname = \"{t}\"\n[[target.lun]]\nid = 0\nvolume = \"small\"\nsize = \"16M\"\n[[target.lun]]\nid = 1\nvolume = \"big\"\nsize = \"16M\"\nblock_size = 4096\n"
    );
    let d = Daemon::builder().config(&cfg).start();
    const M: u64 = 1 << 20;
    // (pattern, offset, length); 0 = never written. On the 512-byte LUN the
    // 0x3c write covers whole 512-byte blocks but is not 4096-aligned.
    let layout = |lun: u64| -> Vec<(u8, u64, u64)> {
        let odd = if lun == 0 { 1536 } else { 8192 };
        vec![
            (0xa5, 0, M),
            (0x5a, M, M / 2),
            (0, 3 * M / 2, M / 2),
            (0, 2 * M, M),
            (0x3c, 3 * M, odd),
            (0, 3 * M + odd, M - odd),
            (0x11, 8 * M, M / 4),
            (0x22, 9 * M, M / 4),
            (0xc3, 15 * M, M),
        ]
    };
    for lun in [0, 1] {
        let url = d.lun_url(t, lun);
        let l = layout(lun);
        let writes: Vec<String> = vec![
            format!("write -P 0xa5 0 {M}"),
            format!("write -P 0x5a {M} {}", M / 2),
            format!("write -P 0x3c {} {}", l[4].1, l[4].2),
            format!("write -P 0xc3 {} {M}", 15 * M),
            format!("aio_write -P 0x11 {} {}", 8 * M, M / 4),
            format!("aio_write -P 0x22 {} {}", 9 * M, M / 4),
            "aio_flush".into(),
            "flush".into(),
        ];
        // qemu 7.2's iscsi driver asserts (iscsi_co_block_status: offset |
        // bytes not aligned) on reads of 32 KiB or more from a 4096-byte
        // LUN that reports LBPRZ, because it asks for the block status of
        // BDRV_REQUEST_MAX_BYTES, which is only 512-aligned. Read the
        // 4096-byte LUN in 16 KiB pieces.
        let chunk = if lun == 0 { M } else { 16 << 10 };
        let checks: Vec<String> = l
            .iter()
            .flat_map(|&(p, o, n)| reads(p, o, n, chunk))
            .collect();
        qemu_io(&url, &writes);
        // A separate process, so nothing comes from qemu's own caches.
        qemu_io(&url, &checks);

        // Beyond the end fails rather than wrapping around.
        let out = run(
            Command::new("qemu-io").args(["-f", "raw", "-c", "read 16M 4k", &url]),
            T,
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !text.contains("read 4096/4096"),
            "read past the end succeeded:\n{text}"
        );
    }
    let state = d.state_dir.clone();
    let _tmp = d.stop();
    // The backing files hold the patterns at the same byte offsets.
    for (lun, v) in [(0, "small"), (1, "big")] {
        let f = std::fs::read(state.join(format!("volumes/{v}.img"))).unwrap();
        assert_eq!(f.len() as u64, 16 * M);
        for (p, o, n) in layout(lun) {
            let range = o as usize..(o + n) as usize;
            assert!(
                f[range.clone()].iter().all(|&b| b == p),
                "{v}: bytes {range:?} are not {p:#x}"
            );
        }
    }
}

#[test]
fn data_survives_restart() {
    if !qemu_iscsi_supported() {
        return;
    }
    let d = Daemon::builder().arg("--size").arg("8M").start();
    qemu_io(&d.lun_url(DEFAULT_TARGET, 0), &["write -P 0x77 4M 1M"]);
    let state = d.state_dir.clone();
    let tmp = d.stop();
    let d = Daemon::builder().state_dir(&state).start_in(tmp);
    qemu_io(
        &d.lun_url(DEFAULT_TARGET, 0),
        &["read -P 0x77 4M 1M", "read -P 0 0 4M"],
    );
    d.stop();
}
