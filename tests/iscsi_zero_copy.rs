//! Zero-copy Data-In (`sendfile` from the backing file) against a scripted
//! initiator over TCP: every READ is run on two servers serving the same
//! file, one with `zero_copy_read` and one without, and the two answers
//! must be identical PDU for PDU (DataSN, offsets, lengths, F and S bits,
//! status, residuals) and equal to the file's bytes. The servers' counters
//! of bytes sent by reference show which path each read took.

mod common;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use common::initiator::{default_keys, with_keys, Done, Initiator};
use lunmirror::block::file::{EngineKind, FileDev, FileDevOptions};
use lunmirror::block::SharedDev;
use lunmirror::iscsi::negotiate::TargetLimits;
use lunmirror::iscsi::pdu::{Bhs, Pdu, TaskAttribute};
use lunmirror::iscsi::ServerOptions;
use lunmirror::mirror::MirroredVolume;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
const LUN_SIZE: u64 = 16 * MIB;
const ISID: [u8; 6] = [0x80, 0, 0, 0x5a, 0x5a, 1];

/// A backing file of random bytes and two in-process servers on it: `zc`
/// with zero-copy reads, `buf` without.
struct Pair {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    zc: common::TestTarget,
    buf: common::TestTarget,
}

fn open_lun(path: &Path) -> SharedDev {
    let dev = FileDev::open(
        path,
        FileDevOptions {
            engine: EngineKind::Auto,
            ..FileDevOptions::default()
        },
    )
    .expect("open backing file");
    // As the daemon serves it: the mirror layer over the file.
    MirroredVolume::new("lun0", Arc::new(dev))
}

fn pair_with(limits: TargetLimits) -> Pair {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("lun0.img");
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(&common::pseudo_random(LUN_SIZE as usize, 0x2c0f_fee5)))
        .expect("write backing file");
    let server = |zero_copy_read| {
        common::start_devs(
            vec![open_lun(&path)],
            limits.clone(),
            ServerOptions {
                zero_copy_read,
                ..ServerOptions::default()
            },
        )
    };
    Pair {
        zc: server(true),
        buf: server(false),
        path,
        _dir: dir,
    }
}

fn pair() -> Pair {
    pair_with(TargetLimits::default())
}

impl Pair {
    /// What a READ of `len` bytes at `offset` must return: the file's
    /// bytes, zeroes past its end.
    fn expected(&self, offset: u64, len: usize) -> Vec<u8> {
        let f = std::fs::File::open(&self.path).expect("open");
        let mut b = vec![0u8; len];
        let mut done = 0;
        while done < len {
            match f
                .read_at(&mut b[done..], offset + done as u64)
                .expect("pread")
            {
                0 => break,
                n => done += n,
            }
        }
        b
    }

    fn login(&self, keys: &[(String, String)]) -> (Initiator, Initiator) {
        (
            Initiator::login_ok(self.zc.addr, ISID, 0, 0, keys),
            Initiator::login_ok(self.buf.addr, ISID, 0, 0, keys),
        )
    }
}

fn keys(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    with_keys(default_keys(common::IQN), extra)
}

fn read16(lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x88;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// The same READ on both servers: identical answers, the expected bytes.
/// Returns the zero-copy server's answer.
fn same_answer(
    p: &Pair,
    zc: &mut Initiator,
    buf: &mut Initiator,
    lba: u64,
    blocks: u32,
    edtl: u32,
) -> Done {
    let cdb = read16(lba, blocks);
    let a = zc.scsi(&cdb, edtl, true, &[]);
    let b = buf.scsi(&cdb, edtl, true, &[]);
    let what = format!("READ lba {lba} blocks {blocks} edtl {edtl}");
    assert_eq!((a.status, a.response), (0, 0), "{what}: status");
    assert_eq!(
        a.data_ins, b.data_ins,
        "{what}: Data-In PDUs differ between the paths"
    );
    assert_eq!(
        (a.status, a.response, a.overflow, a.underflow, a.residual),
        (b.status, b.response, b.overflow, b.underflow, b.residual),
        "{what}: status or residual differs between the paths"
    );
    let transfer = u64::from(blocks) * 512;
    let sent = transfer.min(u64::from(edtl)) as usize;
    assert_eq!(a.data.len(), sent, "{what}");
    assert!(
        a.data == p.expected(lba * 512, sent),
        "{what}: zero-copy data differs from the file"
    );
    assert!(b.data == a.data, "{what}: buffer path data differs");
    // Residuals as RFC 7143 11.4.5 wants them.
    let (over, under) = (u64::from(edtl) < transfer, u64::from(edtl) > transfer);
    assert_eq!((a.overflow, a.underflow), (over, under), "{what}");
    assert_eq!(
        u64::from(a.residual),
        transfer.abs_diff(u64::from(edtl)),
        "{what}"
    );
    a
}

#[test]
fn large_reads_match_the_buffer_path_for_every_segment_size_and_edtl() {
    let p = pair();
    for mrdsl in ["512", "4097", "65536", "262144", "16777215"] {
        let k = keys(&[("MaxRecvDataSegmentLength", mrdsl)]);
        let (mut zc, mut buf) = p.login(&k);
        let before = p.zc.handle.data_in_sent_by_ref();
        // 1 MiB, EDTL exact / smaller (odd: padding) / larger / tiny.
        same_answer(&p, &mut zc, &mut buf, 2048, 2048, MIB as u32);
        same_answer(&p, &mut zc, &mut buf, 4095, 2048, (MIB - 3001) as u32);
        same_answer(&p, &mut zc, &mut buf, 7, 2048, (MIB + 4096) as u32);
        same_answer(&p, &mut zc, &mut buf, 9000, 2048, 513);
        // The smallest read that goes by reference, with one byte less.
        same_answer(&p, &mut zc, &mut buf, 1, 128, (64 * KIB - 1) as u32);
        // A large odd one, and the last 3 MiB of the LUN.
        same_answer(&p, &mut zc, &mut buf, 12345, 3333, 3333 * 512);
        same_answer(
            &p,
            &mut zc,
            &mut buf,
            LUN_SIZE / 512 - 6144,
            6144,
            3 * MIB as u32,
        );
        // Just below the threshold: the buffer path on both.
        let below = p.zc.handle.data_in_sent_by_ref();
        same_answer(&p, &mut zc, &mut buf, 64, 127, 127 * 512);
        assert_eq!(
            p.zc.handle.data_in_sent_by_ref(),
            below,
            "63.5 KiB went by reference"
        );
        let sent = MIB + (MIB - 3001) + MIB + 513 + (64 * KIB - 1) + 3333 * 512 + 3 * MIB;
        assert_eq!(
            p.zc.handle.data_in_sent_by_ref() - before,
            sent,
            "MaxRecvDataSegmentLength {mrdsl}: bytes sent by reference"
        );
    }
    assert_eq!(p.buf.handle.data_in_sent_by_ref(), 0, "the option is off");
}

#[test]
fn burst_boundaries_set_the_f_bit_as_on_the_buffer_path() {
    let p = pair_with(TargetLimits {
        max_burst_length: 65536,
        ..TargetLimits::default()
    });
    let k = keys(&[
        ("MaxRecvDataSegmentLength", "24576"),
        ("MaxBurstLength", "65536"),
    ]);
    let (mut zc, mut buf) = p.login(&k);
    let a = same_answer(&p, &mut zc, &mut buf, 100, 2048, MIB as u32);
    // 16 bursts of 64 KiB, each 24 + 24 + 16 KiB, F on the last of each.
    assert_eq!(a.data_ins.len(), 48);
    assert_eq!(a.data_ins.iter().filter(|d| d.3).count(), 16);
    assert!(
        a.data_ins.last().is_some_and(|d| d.3 && d.4),
        "status on the last Data-In"
    );
    same_answer(&p, &mut zc, &mut buf, 100, 2048, 100_000);
    assert!(p.zc.handle.data_in_sent_by_ref() >= MIB);
}

#[test]
fn header_digest_goes_by_reference_data_digest_does_not() {
    let p = pair();
    let k = keys(&[("HeaderDigest", "CRC32C")]);
    let (mut zc, mut buf) = p.login(&k);
    assert!(zc.cfg.header_digest && !zc.cfg.data_digest);
    // The initiator's decoder checks every header digest.
    same_answer(&p, &mut zc, &mut buf, 0, 2048, MIB as u32);
    same_answer(&p, &mut zc, &mut buf, 3, 2000, 999_999);
    let by_ref = p.zc.handle.data_in_sent_by_ref();
    assert_eq!(by_ref, MIB + 999_999);

    for k in [
        keys(&[("DataDigest", "CRC32C")]),
        keys(&[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")]),
    ] {
        let (mut zc, mut buf) = p.login(&k);
        assert!(zc.cfg.data_digest);
        // ... and every data digest: the bytes had to be in memory.
        same_answer(&p, &mut zc, &mut buf, 0, 2048, MIB as u32);
        same_answer(&p, &mut zc, &mut buf, 5, 2048, (MIB - 3) as u32);
        assert_eq!(
            p.zc.handle.data_in_sent_by_ref(),
            by_ref,
            "DataDigest took the buffer path"
        );
    }
}

#[test]
fn a_backing_file_shorter_than_the_lun_reads_as_zeroes_past_its_end() {
    let p = pair();
    // Truncated behind the servers' backs, to an odd length: the LUN keeps
    // its size, sendfile meets end of file in the middle of a segment.
    let short = 5 * MIB + 1234;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p.path)
        .and_then(|f| f.set_len(short))
        .expect("truncate");
    let (mut zc, mut buf) = p.login(&keys(&[]));
    // Across the end, entirely past it, and the last blocks of the LUN.
    let a = same_answer(&p, &mut zc, &mut buf, (4 * MIB) / 512, 4096, 2 * MIB as u32);
    let tail = (short - 4 * MIB) as usize;
    assert!(a.data[tail..].iter().all(|&b| b == 0));
    assert!(a.data[..tail].iter().any(|&b| b != 0));
    let a = same_answer(&p, &mut zc, &mut buf, (8 * MIB) / 512, 2048, MIB as u32);
    assert!(a.data.iter().all(|&b| b == 0));
    same_answer(
        &p,
        &mut zc,
        &mut buf,
        LUN_SIZE / 512 - 256,
        256,
        128 * KIB as u32 + 7,
    );
    assert_eq!(p.zc.handle.data_in_sent_by_ref(), 3 * MIB + 128 * KIB);
    // The connection is still in order afterwards.
    assert_eq!(zc.tur().status, 0);
}

/// Send all READs back to back, then collect every PDU until each has its
/// status: Data-In of different commands interleave in the stream, but
/// each command's PDUs must arrive in order and complete.
fn pipelined(ini: &mut Initiator, reads: &[(u64, u32, u32)], attr: TaskAttribute) -> Vec<Done> {
    let mut itts = Vec::new();
    for &(lba, blocks, edtl) in reads {
        let mut cmd = ini.command(&read16(lba, blocks), edtl, true, false, true);
        cmd.attr = attr;
        itts.push(cmd.itt);
        ini.send_raw(&Pdu {
            header: Bhs::ScsiCommand(cmd),
            data: vec![],
        });
    }
    let mut done: Vec<Done> = reads.iter().map(|_| Done::default()).collect();
    let mut left = reads.len();
    while left > 0 {
        let p = ini.recv().expect("PDU");
        let status = match &p.header {
            Bhs::DataIn(d) => {
                let i = itts.iter().position(|&t| t == d.itt).expect("known ITT");
                done[i].absorb_data_in(d, &p.data)
            }
            Bhs::ScsiResponse(r) => {
                let i = itts.iter().position(|&t| t == r.itt).expect("known ITT");
                done[i].status = r.status;
                done[i].residual = r.residual;
                true
            }
            other => panic!("unexpected {other:?}"),
        };
        if status {
            left -= 1;
        }
    }
    done
}

#[test]
fn pipelined_reads_interleave_correctly_with_other_responses() {
    let p = pair();
    let k = keys(&[("MaxRecvDataSegmentLength", "262144")]);
    let (mut zc, _buf) = p.login(&k);
    // Large (by reference) and small (buffer) reads mixed, 32 in flight.
    let reads: Vec<(u64, u32, u32)> = (0..32u64)
        .map(|i| {
            let blocks = if i % 3 == 0 { 8 } else { 2048 };
            let lba = (i * 977) % (LUN_SIZE / 512 - 2048);
            let edtl = if i % 5 == 0 {
                blocks * 512 - 5
            } else {
                blocks * 512
            };
            (lba, blocks, edtl)
        })
        .collect();
    let done = pipelined(&mut zc, &reads, TaskAttribute::Simple);
    for (d, &(lba, blocks, edtl)) in done.iter().zip(&reads) {
        assert_eq!(d.status, 0);
        let n = (blocks * 512).min(edtl) as usize;
        assert!(d.data == p.expected(lba * 512, n), "lba {lba}");
        assert!(d.data_ins.last().is_some_and(|x| x.3 && x.4));
    }
    assert!(p.zc.handle.data_in_sent_by_ref() > 16 * MIB);
    assert_eq!(zc.tur().status, 0);
}

#[test]
fn ordered_tasks_read_from_a_buffer_and_turn_the_session_to_buffers() {
    let p = pair();
    let (mut zc, _buf) = p.login(&keys(&[]));
    let read = [(0u64, 2048u32, MIB as u32)];
    let d = pipelined(&mut zc, &read, TaskAttribute::Simple);
    assert!(d[0].data == p.expected(0, MIB as usize));
    assert_eq!(p.zc.handle.data_in_sent_by_ref(), MIB);
    for attr in [TaskAttribute::Ordered, TaskAttribute::HeadOfQueue] {
        let d = pipelined(&mut zc, &read, attr);
        assert_eq!(d[0].status, 0);
        assert!(d[0].data == p.expected(0, MIB as usize));
    }
    // Later SIMPLE reads of this session stay on the buffer path too.
    let d = pipelined(&mut zc, &read, TaskAttribute::Simple);
    assert!(d[0].data == p.expected(0, MIB as usize));
    assert_eq!(p.zc.handle.data_in_sent_by_ref(), MIB);
    // A new session starts afresh.
    let mut other = Initiator::login_ok(p.zc.addr, [0x80, 0, 0, 0x5a, 0x5a, 2], 0, 0, &keys(&[]));
    let d = pipelined(&mut other, &read, TaskAttribute::Simple);
    assert!(d[0].data == p.expected(0, MIB as usize));
    assert_eq!(p.zc.handle.data_in_sent_by_ref(), 2 * MIB);
}

/// The real daemon with `daemon.zero_copy_read` on (the default) and off:
/// qemu's iscsi:// driver (libiscsi) reads a random 32 MiB LUN back
/// byte for byte, truncated at an odd length after the daemon opened it
/// (the tail reads as zeroes); the connection's log line tells how many
/// bytes went by reference.
#[test]
fn daemon_option_turns_zero_copy_off_and_reads_verify_with_qemu() {
    if !common::qemu_iscsi_supported() {
        return;
    }
    let size = 32 * MIB as usize;
    let short = 30 * MIB + 777;
    for setting in [None, Some(true), Some(false)] {
        let tmp = tempfile::tempdir().unwrap();
        let mut data = common::pseudo_random(size, 0xfeed_5eed);
        std::fs::write(tmp.path().join("lun0.img"), &data).unwrap();
        let daemon_section = match setting {
            Some(v) => format!("[daemon]\nzero_copy_read = {v}\n"),
            None => String::new(),
        };
        let d = common::Daemon::builder()
            .config(&format!(
                r#"{daemon_section}
[[target]]
name = "{}"
portals = ["127.0.0.1:0"]

[[target.lun]]
id = 0
volume = "lun0"
path = "{{tmp}}/lun0.img"
"#,
                common::DEFAULT_TARGET
            ))
            .start_in(tmp);
        std::fs::OpenOptions::new()
            .write(true)
            .open(d.tmp().join("lun0.img"))
            .and_then(|f| f.set_len(short))
            .expect("truncate");
        data[short as usize..].fill(0);
        let back = d.tmp().join("back.img");
        common::run_ok(
            std::process::Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "raw"])
                .arg(d.lun_url(common::DEFAULT_TARGET, 0))
                .arg(&back),
            std::time::Duration::from_secs(300),
        );
        let got = std::fs::read(&back).unwrap();
        assert_eq!(got.len(), size);
        assert!(
            got == data,
            "{setting:?}: data read back differs from the file"
        );
        // qemu-img logged out: the connection's end is logged with its
        // by-reference byte count.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let sent: Vec<u64> = loop {
            let log = d.log();
            let sent: Vec<u64> = log
                .lines()
                .filter(|l| l.contains("connection ends"))
                .filter_map(|l| l.split("sent_by_ref=").nth(1))
                .filter_map(|v| v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
                .collect();
            if !sent.is_empty() || std::time::Instant::now() > deadline {
                break sent;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        let total: u64 = sent.iter().sum();
        assert!(!sent.is_empty(), "no connection end logged:\n{}", d.log());
        if setting == Some(false) {
            assert_eq!(total, 0, "zero_copy_read = false still sent by reference");
        } else {
            assert!(
                total >= 16 * MIB,
                "{setting:?}: only {total} bytes went by reference"
            );
        }
        d.stop();
    }
}

/// A device whose extents name a descriptor `sendfile` cannot read from
/// (opened write-only): the read fails after the Data-In header went out.
struct UnreadableExtent {
    mem: lunmirror::block::mem::MemDev,
    file: Arc<std::fs::File>,
}

impl lunmirror::block::BlockDev for UnreadableExtent {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> lunmirror::block::BlockResult<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(
        &self,
        buf: &[u8],
        offset: u64,
        flags: lunmirror::block::WriteFlags,
    ) -> lunmirror::block::BlockResult<()> {
        self.mem.write_at(buf, offset, flags)
    }
    fn flush(&self) -> lunmirror::block::BlockResult<()> {
        Ok(())
    }
    fn caps(&self) -> lunmirror::block::BlockCaps {
        lunmirror::block::BlockCaps::default()
    }
    fn file_extent(
        &self,
        offset: u64,
        len: u64,
    ) -> lunmirror::block::BlockResult<Option<lunmirror::block::FileExtent>> {
        lunmirror::block::check_range(self.size(), offset, len)?;
        Ok(Some(lunmirror::block::FileExtent {
            file: self.file.clone(),
            offset,
            len,
        }))
    }
}

#[test]
fn a_file_error_after_the_header_closes_the_connection_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wo.img");
    std::fs::write(&path, vec![1u8; 4 * MIB as usize]).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let dev = UnreadableExtent {
        mem: lunmirror::block::mem::MemDev::new(4 * MIB),
        file: Arc::new(file),
    };
    let t = common::start_devs(
        vec![Arc::new(dev) as SharedDev],
        TargetLimits::default(),
        ServerOptions::default(),
    );
    let mut ini = Initiator::login_ok(t.addr, ISID, 0, 0, &keys(&[]));
    // Small reads take the buffer path and work.
    let small = ini.scsi(&read16(0, 8), 4096, true, &[]);
    assert_eq!((small.status, small.data.len()), (0, 4096));
    let cmd = ini.command(&read16(0, 2048), MIB as u32, true, false, true);
    ini.send_raw(&Pdu {
        header: Bhs::ScsiCommand(cmd),
        data: vec![],
    });
    assert!(
        ini.closed_within(std::time::Duration::from_secs(20)),
        "the connection must be closed, not left with a short Data-In"
    );
    assert_eq!(t.handle.data_in_sent_by_ref(), 0);
    // The server goes on: a new session reads again.
    let mut again = Initiator::login_ok(t.addr, [0x80, 0, 0, 0x5a, 0x5a, 9], 0, 0, &keys(&[]));
    let small = again.scsi(&read16(0, 8), 4096, true, &[]);
    assert_eq!(small.status, 0);
    t.stop();
}
