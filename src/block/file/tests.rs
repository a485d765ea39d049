//! The engine test suite (every test in `engine_suite!` runs once per
//! engine) and tests of what does not depend on the engine: fallback,
//! options, block devices, ENOSPC.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use super::*;
use crate::block::BatchOp;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Deterministic, seed-dependent bytes.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn opts(engine: EngineKind) -> FileDevOptions {
    FileDevOptions {
        engine,
        ..FileDevOptions::default()
    }
}

/// An engine configuration the suite runs against.
#[derive(Debug, Clone, Copy)]
struct Cfg {
    engine: EngineKind,
    ring: RingUse,
}

/// `FileDev::open` with the engine and ring use of `cfg`.
fn open_cfg(cfg: Cfg, path: &Path, o: FileDevOptions) -> BlockResult<FileDev> {
    let dev = FileDev::open(
        path,
        FileDevOptions {
            engine: cfg.engine,
            ..o
        },
    )?;
    dev.set_ring_use(cfg.ring);
    assert_eq!(dev.ring_use(), cfg.ring);
    Ok(dev)
}

/// A fresh sparse backing file of `size` bytes in its own temp dir.
fn new_dev(cfg: Cfg, size: u64) -> (tempfile::TempDir, PathBuf, FileDev) {
    let engine = cfg.engine;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dev.img");
    let dev = open_cfg(
        cfg,
        &path,
        FileDevOptions {
            create_size: Some(size),
            ..opts(engine)
        },
    )
    .unwrap_or_else(|e| panic!("open {engine} device: {e}"));
    assert_eq!(dev.engine(), engine, "requested engine must run");
    assert_eq!(dev.size(), size);
    (dir, path, dev)
}

fn read_vec(dev: &FileDev, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xAAu8; len];
    dev.read_at(&mut buf, offset).expect("read");
    buf
}

fn model_write(model: &mut [u8], offset: u64, data: &[u8]) {
    let start = offset as usize;
    model[start..start + data.len()].copy_from_slice(data);
}

fn is_tmpfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .unwrap_or(false)
}

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Dirty plus under-writeback page-cache pages of `path` in a range, via
/// cachestat(2) (Linux 6.5); `None` where the kernel lacks it.
fn unclean_pages(path: &Path, off: u64, len: u64) -> Option<u64> {
    const SYS_CACHESTAT: libc::c_long = 451;
    let file = File::open(path).ok()?;
    let range = CachestatRange { off, len };
    let mut cs = Cachestat::default();
    // SAFETY: cachestat reads one cachestat_range and writes one cachestat
    // through the pointers, both live repr(C) locals matching the kernel's
    // layout; the descriptor stays open for the call.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut cs as *mut Cachestat,
            0u32,
        )
    };
    (r == 0).then_some(cs.nr_dirty + cs.nr_writeback)
}

/// Write `data` at `offset` without FUA until its pages are seen dirty, so
/// that a later "clean" observation means something. `false` if the dirty
/// state cannot be observed here (no cachestat, tmpfs, instant writeback).
fn make_dirty(dev: &FileDev, path: &Path, offset: u64, data: &[u8]) -> bool {
    if is_tmpfs(path) {
        eprintln!("SKIP durability check: tmpfs pages are never clean");
        return false;
    }
    for _ in 0..5 {
        dev.write_at(data, offset, WriteFlags::default())
            .expect("write");
        match unclean_pages(path, offset, data.len() as u64) {
            None => {
                eprintln!("SKIP durability check: kernel has no cachestat(2)");
                return false;
            }
            Some(n) if n > 0 => return true,
            Some(_) => continue,
        }
    }
    eprintln!("SKIP durability check: written pages never observed dirty");
    false
}

// ---------------------------------------------------------------- the suite

fn read_write_roundtrip(cfg: Cfg) {
    let size = 4 * MIB;
    let (_dir, path, dev) = new_dev(cfg, size);
    let mut model = vec![0u8; size as usize];
    assert_eq!(
        read_vec(&dev, 0, size as usize),
        model,
        "new device reads zeroes"
    );

    let writes: &[(u64, usize)] = &[
        (0, 4096),
        (4095, 10),
        (size - 4096, 4096),
        (123_457, 70_000),
        (MIB - 1, 3 * MIB as usize), // one transfer larger than a chunk
        (7, 1),
    ];
    for (i, &(offset, len)) in writes.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        dev.write_at(&data, offset, WriteFlags::default())
            .expect("write");
        model_write(&mut model, offset, &data);
        assert_eq!(read_vec(&dev, offset, len), data, "read back write {i}");
    }
    assert_eq!(read_vec(&dev, 0, size as usize), model);
    assert_eq!(read_vec(&dev, 4090, 20), &model[4090..4110]);
    assert_eq!(
        std::fs::read(&path).expect("read file"),
        model,
        "file holds the data"
    );
    // Zero-length transfers are no-ops, also at the very end.
    dev.read_at(&mut [], size).expect("empty read at end");
    dev.write_at(&[], size, WriteFlags::default())
        .expect("empty write at end");
}

fn fua_write_is_durable(cfg: Cfg) {
    let (_dir, path, dev) = new_dev(cfg, 4 * MIB);
    let data = pattern(3, 64 * KIB as usize);
    if !make_dirty(&dev, &path, 0, &data) {
        return;
    }
    dev.write_at(&data, 2 * MIB, WriteFlags { fua: true })
        .expect("fua write");
    assert_eq!(
        unclean_pages(&path, 2 * MIB, data.len() as u64),
        Some(0),
        "FUA write left dirty pages"
    );
    assert_eq!(read_vec(&dev, 2 * MIB, data.len()), data);
    // A FUA write does not have to clean other ranges.
    assert!(unclean_pages(&path, 0, data.len() as u64).is_some());
}

fn flush_cleans_dirty_pages(cfg: Cfg) {
    let (_dir, path, dev) = new_dev(cfg, 4 * MIB);
    let data = pattern(4, 256 * KIB as usize);
    if !make_dirty(&dev, &path, MIB, &data) {
        return;
    }
    dev.flush().expect("flush");
    assert_eq!(
        unclean_pages(&path, 0, 4 * MIB),
        Some(0),
        "flush left dirty pages"
    );
}

fn discard_reads_zeroes(cfg: Cfg) {
    let size = MIB;
    let (_dir, _path, dev) = new_dev(cfg, size);
    assert!(
        dev.caps().discard,
        "punch-hole probe failed on the temp filesystem"
    );
    let mut model = pattern(5, 512 * KIB as usize);
    dev.write_at(&model, 0, WriteFlags::default())
        .expect("write");
    model.resize(size as usize, 0);

    dev.discard(64 * KIB, 128 * KIB).expect("aligned discard");
    model[64 * KIB as usize..192 * KIB as usize].fill(0);
    dev.discard(1000, 4000).expect("unaligned discard");
    model[1000..5000].fill(0);
    dev.discard(size - 4096, 4096).expect("discard at end");
    assert_eq!(read_vec(&dev, 0, size as usize), model);

    let (mapped, run) = dev.allocation(64 * KIB, 128 * KIB).expect("allocation");
    assert_eq!(
        (mapped, run),
        (false, 128 * KIB),
        "discarded range is unmapped"
    );
    dev.discard(0, 0).expect("empty discard");
}

fn write_zeroes_zeroes(cfg: Cfg) {
    let size = 4 * MIB;
    let (_dir, _path, dev) = new_dev(cfg, size);
    let mut model = pattern(6, size as usize);
    dev.write_at(&model, 0, WriteFlags::default())
        .expect("write");

    dev.write_zeroes(4096 + 100, 10_000, WriteFlags::default())
        .expect("zeroes");
    model[4196..14_196].fill(0);
    dev.write_zeroes(MIB, MIB + 5, WriteFlags { fua: true })
        .expect("fua zeroes");
    model[MIB as usize..(2 * MIB + 5) as usize].fill(0);
    assert_eq!(read_vec(&dev, 0, size as usize), model);

    // The path used where the filesystem has no ZERO_RANGE (tmpfs):
    // more than one chunk, unaligned.
    dev.zero_range.store(false, Ordering::Relaxed);
    dev.write_zeroes(3, 1_500_000, WriteFlags::default())
        .expect("buffer zeroes");
    model[3..1_500_003].fill(0);
    dev.write_zeroes(3 * MIB + 1, 1, WriteFlags { fua: true })
        .expect("one byte");
    model[(3 * MIB + 1) as usize] = 0;
    assert_eq!(read_vec(&dev, 0, size as usize), model);
}

fn allocation_status(cfg: Cfg) {
    let size = MIB;
    let (_dir, _path, dev) = new_dev(cfg, size);
    assert!(dev.caps().allocation_status);
    assert_eq!(dev.allocation(0, size).expect("alloc"), (false, size));
    dev.write_at(&pattern(7, 4096), 256 * KIB, WriteFlags::default())
        .expect("write");
    assert_eq!(dev.allocation(0, size).expect("alloc"), (false, 256 * KIB));
    assert_eq!(
        dev.allocation(0, 100 * KIB).expect("alloc"),
        (false, 100 * KIB),
        "clipped"
    );
    assert_eq!(
        dev.allocation(256 * KIB, size - 256 * KIB).expect("alloc"),
        (true, 4096)
    );
    assert_eq!(
        dev.allocation(256 * KIB + 10, 100).expect("alloc"),
        (true, 100),
        "clipped"
    );
    let tail = 260 * KIB;
    assert_eq!(
        dev.allocation(tail, size - tail).expect("alloc"),
        (false, size - tail)
    );
    assert_eq!(dev.allocation(size, 0).expect("empty"), (true, 0));
}

fn out_of_range_is_refused(cfg: Cfg) {
    let size = 64 * KIB;
    let (_dir, _path, dev) = new_dev(cfg, size);
    let oor = |r: BlockResult<()>| matches!(r, Err(BlockError::OutOfRange { .. }));
    let mut buf = vec![0u8; 20];
    assert!(oor(dev.read_at(&mut buf, size - 10)));
    assert!(oor(dev.read_at(&mut buf, size)));
    assert!(oor(dev.read_at(&mut buf, u64::MAX - 5)), "offset overflow");
    assert!(oor(dev.write_at(&buf, size - 10, WriteFlags::default())));
    assert!(oor(dev.write_at(&buf, u64::MAX, WriteFlags { fua: true })));
    assert!(oor(dev.discard(size - 10, 20)));
    assert!(oor(dev.write_zeroes(0, size + 1, WriteFlags::default())));
    assert!(matches!(
        dev.allocation(size, 1),
        Err(BlockError::OutOfRange { .. })
    ));
    // Nothing was written by the refused calls.
    assert_eq!(read_vec(&dev, 0, size as usize), vec![0u8; size as usize]);
}

fn concurrent_writers(cfg: Cfg) {
    const THREADS: u64 = 8;
    const BLOCKS: u64 = 64 * THREADS;
    const BLOCK: usize = 4096;
    const ROUNDS: u64 = 4;
    let (_dir, _path, dev) = new_dev(cfg, BLOCKS * BLOCK as u64);
    let dev = Arc::new(dev);
    let seed = |round: u64, block: u64| round * 1_000_003 + block;

    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let dev = Arc::clone(&dev);
            std::thread::spawn(move || {
                let mine: Vec<u64> = (t..BLOCKS).step_by(THREADS as usize).collect();
                for round in 0..ROUNDS {
                    // Interleaved blocks, so neighbouring blocks belong to
                    // different threads. Even threads write one block per
                    // call, odd threads their whole share as one batch.
                    let datas: Vec<Vec<u8>> = mine
                        .iter()
                        .map(|&b| pattern(seed(round, b), BLOCK))
                        .collect();
                    let flags = |block: u64| WriteFlags {
                        fua: block % 16 == 0,
                    };
                    if t % 2 == 0 {
                        for (&block, data) in mine.iter().zip(&datas) {
                            let offset = block * BLOCK as u64;
                            dev.write_at(data, offset, flags(block)).expect("write");
                            let mut back = vec![0u8; BLOCK];
                            dev.read_at(&mut back, offset).expect("read");
                            assert_eq!(&back, data, "thread {t} block {block} round {round}");
                        }
                    } else {
                        let mut ops: Vec<BatchOp<'_>> = mine
                            .iter()
                            .zip(&datas)
                            .map(|(&block, data)| BatchOp::Write {
                                buf: data,
                                offset: block * BLOCK as u64,
                                flags: flags(block),
                            })
                            .collect();
                        for r in dev.submit_batch(&mut ops) {
                            r.expect("batch write");
                        }
                        let mut backs = vec![vec![0u8; BLOCK]; mine.len()];
                        let mut ops: Vec<BatchOp<'_>> = mine
                            .iter()
                            .zip(backs.iter_mut())
                            .map(|(&block, buf)| BatchOp::Read {
                                buf,
                                offset: block * BLOCK as u64,
                            })
                            .collect();
                        for r in dev.submit_batch(&mut ops) {
                            r.expect("batch read");
                        }
                        drop(ops);
                        assert!(backs == datas, "thread {t} round {round}: batch read back");
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer thread");
    }
    for block in 0..BLOCKS {
        let got = read_vec(&dev, block * BLOCK as u64, BLOCK);
        assert_eq!(
            got,
            pattern(seed(ROUNDS - 1, block), BLOCK),
            "block {block}"
        );
    }
}

fn short_backing_file_reads_zeroes(cfg: Cfg) {
    let size = 64 * KIB;
    let (_dir, path, dev) = new_dev(cfg, size);
    let data = pattern(8, size as usize);
    dev.write_at(&data, 0, WriteFlags::default())
        .expect("write");
    // Someone shrinks the backing file under the device.
    File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(10_000))
        .expect("truncate");

    let mut want = data.clone();
    want[10_000..].fill(0);
    assert_eq!(read_vec(&dev, 0, size as usize), want, "read across EOF");
    assert_eq!(
        read_vec(&dev, 20_000, 4096),
        vec![0u8; 4096],
        "read past EOF"
    );
    assert_eq!(dev.allocation(20_000, 4096).expect("alloc"), (false, 4096));
    // Writing past EOF grows the file again.
    dev.write_at(&data[..100], size - 100, WriteFlags::default())
        .expect("write");
    assert_eq!(read_vec(&dev, size - 100, 100), &data[..100]);
    assert_eq!(read_vec(&dev, size - 200, 100), vec![0u8; 100]);
}

fn read_only_refuses_writes(cfg: Cfg) {
    let engine = cfg.engine;
    let size = 64 * KIB;
    let (_dir, path, rw) = new_dev(cfg, size);
    let data = pattern(9, 4096);
    rw.write_at(&data, 4096, WriteFlags::default())
        .expect("write");
    drop(rw);

    let dev = open_cfg(
        cfg,
        &path,
        FileDevOptions {
            read_only: true,
            ..opts(engine)
        },
    )
    .expect("open read-only");
    let caps = dev.caps();
    assert!(caps.read_only && !caps.discard);
    let ro = |r: BlockResult<()>| matches!(r, Err(BlockError::ReadOnly));
    assert!(ro(dev.write_at(&data, 0, WriteFlags::default())));
    assert!(ro(dev.write_at(&data, 0, WriteFlags { fua: true })));
    assert!(ro(dev.discard(0, 4096)));
    assert!(ro(dev.write_zeroes(0, 4096, WriteFlags::default())));
    let mut ops = [BatchOp::Write {
        buf: &data,
        offset: 0,
        flags: WriteFlags::default(),
    }];
    assert!(ro(dev.submit_batch(&mut ops).remove(0)));
    assert_eq!(read_vec(&dev, 4096, 4096), data);
    assert_eq!(
        read_vec(&dev, 0, 4096),
        vec![0u8; 4096],
        "nothing was written"
    );
    dev.flush()
        .expect("flush of a read-only device is harmless");
}

fn batches_complete_every_op(cfg: Cfg) {
    const BLOCK: usize = 4096;
    // More ops than one ring holds, so the io_uring engine refills its queue.
    const OPS: usize = 3 * RING_ENTRIES as usize + 7;
    let size = (OPS * BLOCK) as u64;
    let (_dir, _path, dev) = new_dev(cfg, size);
    let datas: Vec<Vec<u8>> = (0..OPS).map(|i| pattern(100 + i as u64, BLOCK)).collect();
    // Reverse block order, so completion order cannot be index order by luck.
    let offset = |i: usize| ((OPS - 1 - i) * BLOCK) as u64;
    let bad = 17;

    let mut ops: Vec<BatchOp<'_>> = datas
        .iter()
        .enumerate()
        .map(|(i, d)| BatchOp::Write {
            buf: d.as_slice(),
            offset: if i == bad { size } else { offset(i) },
            flags: WriteFlags { fua: i % 50 == 0 },
        })
        .collect();
    ops.push(BatchOp::Write {
        buf: &[],
        offset: 0,
        flags: WriteFlags::default(),
    });
    let results = dev.submit_batch(&mut ops);
    assert_eq!(results.len(), OPS + 1);
    for (i, r) in results.iter().enumerate() {
        if i == bad {
            assert!(
                matches!(r, Err(BlockError::OutOfRange { .. })),
                "op {i}: {r:?}"
            );
        } else {
            assert!(r.is_ok(), "op {i}: {r:?}");
        }
    }

    let mut bufs = vec![vec![0xEEu8; BLOCK]; OPS];
    let mut reads: Vec<BatchOp<'_>> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| BatchOp::Read {
            buf: b.as_mut_slice(),
            offset: offset(i),
        })
        .collect();
    let results = dev.submit_batch(&mut reads);
    drop(reads);
    for (i, r) in results.into_iter().enumerate() {
        r.unwrap_or_else(|e| panic!("read {i}: {e}"));
        let want = if i == bad {
            vec![0u8; BLOCK]
        } else {
            datas[i].clone()
        };
        assert_eq!(bufs[i], want, "block of op {i}");
    }
    assert!(dev.submit_batch(&mut []).is_empty());
}

fn direct_io_roundtrip(cfg: Cfg) {
    let engine = cfg.engine;
    const ALIGN: usize = 4096;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("direct.img");
    let dev = match open_cfg(
        cfg,
        &path,
        FileDevOptions {
            direct: true,
            create_size: Some(MIB),
            ..opts(engine)
        },
    ) {
        Ok(dev) => dev,
        Err(BlockError::Io(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!("SKIP direct I/O: the temp filesystem refuses O_DIRECT");
            return;
        }
        Err(e) => panic!("open O_DIRECT: {e}"),
    };
    assert_eq!(dev.engine(), engine);
    let len = 64 * KIB as usize;
    // An aligned window into an over-allocated buffer (no unsafe needed).
    let mut wbuf = vec![0u8; len + ALIGN];
    let start_w = wbuf.as_ptr().align_offset(ALIGN);
    let data = pattern(10, len);
    wbuf[start_w..start_w + len].copy_from_slice(&data);
    dev.write_at(
        &wbuf[start_w..start_w + len],
        128 * KIB,
        WriteFlags { fua: true },
    )
    .expect("direct write");
    let mut rbuf = vec![0u8; len + ALIGN];
    let start = rbuf.as_ptr().align_offset(ALIGN);
    dev.read_at(&mut rbuf[start..start + len], 128 * KIB)
        .expect("direct read");
    assert_eq!(&rbuf[start..start + len], data.as_slice());

    // A batch of aligned 4 KiB blocks: in flight together on io_uring.
    let mut ops: Vec<BatchOp<'_>> = rbuf[start..start + len]
        .chunks_mut(ALIGN)
        .enumerate()
        .map(|(i, buf)| BatchOp::Read {
            buf,
            offset: 128 * KIB + ((i * ALIGN) as u64 ^ 4096),
        })
        .collect();
    for r in dev.submit_batch(&mut ops) {
        r.expect("direct batch read");
    }
    drop(ops);
    for (i, got) in rbuf[start..start + len].chunks(ALIGN).enumerate() {
        let j = (i * ALIGN) ^ 4096;
        assert_eq!(got, &data[j..j + ALIGN], "block {i}");
    }
    let wdata = pattern(16, len);
    wbuf[start_w..start_w + len].copy_from_slice(&wdata);
    let mut ops: Vec<BatchOp<'_>> = wbuf[start_w..start_w + len]
        .chunks(ALIGN)
        .enumerate()
        .map(|(i, buf)| BatchOp::Write {
            buf,
            offset: 512 * KIB + (i * ALIGN) as u64,
            flags: WriteFlags { fua: i == 0 },
        })
        .collect();
    for r in dev.submit_batch(&mut ops) {
        r.expect("direct batch write");
    }
    dev.read_at(&mut rbuf[start..start + len], 512 * KIB)
        .expect("direct read");
    assert_eq!(&rbuf[start..start + len], wdata.as_slice());
}

fn create_size_and_missing_file(cfg: Cfg) {
    let engine = cfg.engine;
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.img");
    assert!(matches!(
        open_cfg(
        cfg,&missing, opts(engine)),
        Err(BlockError::Io(e)) if e.kind() == io::ErrorKind::NotFound
    ));
    let existing = dir.path().join("existing.img");
    std::fs::write(&existing, pattern(11, 8192)).expect("write file");
    let dev = open_cfg(
        cfg,
        &existing,
        FileDevOptions {
            create_size: Some(MIB),
            ..opts(engine)
        },
    )
    .expect("open existing");
    assert_eq!(dev.size(), 8192, "an existing file keeps its size");
    assert_eq!(dev.path(), existing.as_path());
    assert_eq!(read_vec(&dev, 0, 8192), pattern(11, 8192));
    let meta = std::fs::metadata(dir.path().join("dev.img"));
    assert!(meta.is_err(), "no stray files");
}

macro_rules! engine_suite {
    ($($name:ident),* $(,)?) => {
        mod sync_engine {
            use super::*;
            const CFG: Cfg = Cfg { engine: EngineKind::Sync, ring: RingUse::WhereFaster };
            $(#[test] fn $name() { super::$name(CFG) })*
        }
        mod uring_engine {
            use super::*;
            const CFG: Cfg = Cfg { engine: EngineKind::IoUring, ring: RingUse::WhereFaster };
            $(#[test] fn $name() { super::$name(CFG) })*
        }
        /// Every request on a ring, so that single-request paths (short
        /// transfers, EOF, FUA flags) are tested on io_uring too.
        mod uring_engine_ring_always {
            use super::*;
            const CFG: Cfg = Cfg { engine: EngineKind::IoUring, ring: RingUse::Always };
            $(#[test] fn $name() { super::$name(CFG) })*
        }
    };
}

engine_suite!(
    read_write_roundtrip,
    fua_write_is_durable,
    flush_cleans_dirty_pages,
    discard_reads_zeroes,
    write_zeroes_zeroes,
    allocation_status,
    out_of_range_is_refused,
    concurrent_writers,
    short_backing_file_reads_zeroes,
    read_only_refuses_writes,
    batches_complete_every_op,
    direct_io_roundtrip,
    create_size_and_missing_file,
);

// ------------------------------------------------- engine-independent tests

#[test]
fn auto_falls_back_when_io_uring_setup_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dev.img");
    let refused =
        |_: &File| -> io::Result<UringEngine> { Err(io::Error::from_raw_os_error(libc::EPERM)) };
    let create = |engine| FileDevOptions {
        create_size: Some(MIB),
        ..opts(engine)
    };

    let dev = FileDev::open_with(&path, create(EngineKind::Auto), refused).expect("auto");
    assert_eq!(dev.engine(), EngineKind::Sync);
    dev.write_at(&pattern(12, 4096), 0, WriteFlags::default())
        .expect("write");
    assert_eq!(read_vec(&dev, 0, 4096), pattern(12, 4096));

    assert!(matches!(
        FileDev::open_with(&path, create(EngineKind::IoUring), refused),
        Err(BlockError::Io(e)) if e.raw_os_error() == Some(libc::EPERM)
    ));
}

#[test]
fn auto_uses_io_uring_where_it_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dev.img");
    let create = |engine| FileDevOptions {
        create_size: Some(MIB),
        ..opts(engine)
    };
    let uring_works = FileDev::open(&path, create(EngineKind::IoUring)).is_ok();
    let auto = FileDev::open(&path, create(EngineKind::Auto)).expect("auto");
    let want = if uring_works {
        EngineKind::IoUring
    } else {
        EngineKind::Sync
    };
    assert_eq!(auto.engine(), want);
}

#[test]
fn a_ring_setup_failure_later_falls_back_per_call() {
    // An engine whose pool is empty and whose new rings fail: requests run on
    // the sync path instead of failing.
    let cfg = Cfg {
        engine: EngineKind::IoUring,
        ring: RingUse::Always,
    };
    let (_dir, _path, dev) = new_dev(cfg, MIB);
    let Engine::IoUring(uring) = &dev.engine else {
        panic!("io_uring engine expected");
    };
    uring.break_for_test();
    let data = pattern(13, 8192);
    dev.write_at(&data, 4096, WriteFlags { fua: true })
        .expect("write");
    assert_eq!(read_vec(&dev, 4096, 8192), data);
    assert!(dev.ring_fallback_warned.load(Ordering::Relaxed));
}

#[test]
fn engine_kind_names() {
    for kind in [EngineKind::IoUring, EngineKind::Sync, EngineKind::Auto] {
        assert_eq!(kind.as_str().parse::<EngineKind>(), Ok(kind));
        assert_eq!(kind.to_string(), kind.as_str());
    }
    assert_eq!("io-uring".parse::<EngineKind>(), Ok(EngineKind::IoUring));
    assert!("aio".parse::<EngineKind>().is_err());
    assert_eq!(EngineKind::default(), EngineKind::Auto);
}

#[test]
fn refuses_what_is_not_a_file_or_block_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    for path in [dir.path(), Path::new("/dev/null")] {
        let r = FileDev::open(
            path,
            FileDevOptions {
                read_only: true,
                engine: EngineKind::Sync,
                ..FileDevOptions::default()
            },
        );
        assert!(r.is_err(), "{} must be refused", path.display());
    }
}

/// Run a command; `None` (with the reason printed) if it can't run or fails.
fn run_cmd(cmd: &str, args: &[&str]) -> Option<String> {
    match Command::new(cmd).args(args).output() {
        Ok(out) if out.status.success() => {
            Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        }
        Ok(out) => {
            eprintln!(
                "{cmd} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("{cmd}: {e}");
            None
        }
    }
}

/// Unmounts a test tmpfs.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn enospc_is_no_space() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let mnt_str = mnt.to_string_lossy().into_owned();
    if run_cmd(
        "mount",
        &["-t", "tmpfs", "-o", "size=128k", "tmpfs", &mnt_str],
    )
    .is_none()
    {
        eprintln!("SKIP enospc_is_no_space: cannot mount a small tmpfs (not root?)");
        return;
    }
    let _mount = Mount(mnt.clone());
    for engine in [EngineKind::Sync, EngineKind::IoUring] {
        let path = mnt.join(format!("{engine}.img"));
        let dev = FileDev::open(
            &path,
            FileDevOptions {
                create_size: Some(4 * MIB),
                ..opts(engine)
            },
        )
        .expect("sparse file fits");
        assert_eq!(dev.engine(), engine);
        let data = pattern(14, MIB as usize);
        let r = dev.write_at(&data, 0, WriteFlags::default());
        assert!(matches!(r, Err(BlockError::NoSpace)), "{engine}: {r:?}");
        let r = dev.write_zeroes(MIB, 2 * MIB, WriteFlags::default());
        assert!(
            matches!(r, Err(BlockError::NoSpace)),
            "{engine} zeroes: {r:?}"
        );
        drop(dev);
        std::fs::remove_file(&path).expect("rm");
    }
}

/// Detaches a loop device.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn block_device_backstore() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("loop.img");
    File::create(&img)
        .and_then(|f| f.set_len(8 * MIB))
        .expect("image");
    let Some(dev_path) = run_cmd("losetup", &["-f", "--show", &img.to_string_lossy()]) else {
        eprintln!("SKIP block_device_backstore: cannot attach a loop device (not root?)");
        return;
    };
    let _loop = Loop(dev_path.clone());
    for engine in [EngineKind::Sync, EngineKind::IoUring] {
        let dev = FileDev::open(Path::new(&dev_path), opts(engine)).expect("open loop device");
        assert!(dev.is_block_device());
        assert_eq!(dev.size(), 8 * MIB, "BLKGETSIZE64");
        assert!(!dev.caps().allocation_status);
        let data = pattern(15, 256 * KIB as usize);
        dev.write_at(&data, MIB, WriteFlags { fua: true })
            .expect("write");
        assert_eq!(read_vec(&dev, MIB, data.len()), data);
        dev.discard(MIB, 64 * KIB).expect("discard");
        dev.write_zeroes(MIB + 128 * KIB, 4096, WriteFlags::default())
            .expect("zeroes");
        // Misaligned for the device: done by writing zero buffers.
        dev.write_zeroes(MIB + 200 * KIB + 1, 1000, WriteFlags::default())
            .expect("zeroes");
        dev.flush().expect("flush");
        let mut want = data.clone();
        want[..64 * KIB as usize].fill(0);
        want[128 * KIB as usize..132 * KIB as usize].fill(0);
        want[200 * KIB as usize + 1..200 * KIB as usize + 1001].fill(0);
        assert_eq!(read_vec(&dev, MIB, data.len()), want, "{engine}");
        assert_eq!(dev.allocation(0, 8 * MIB).expect("alloc"), (true, 8 * MIB));
        let mut buf = [0u8; 1];
        assert!(matches!(
            dev.read_at(&mut buf, 8 * MIB),
            Err(BlockError::OutOfRange { .. })
        ));
        dev.write_at(&[0u8; 4096], MIB, WriteFlags::default())
            .expect("reset");
    }
}

#[test]
fn file_extent_names_the_range_of_a_buffered_file() {
    let cfg = Cfg {
        engine: EngineKind::Sync,
        ring: RingUse::WhereFaster,
    };
    let (_dir, path, dev) = new_dev(cfg, 4 * MIB);
    let data = pattern(21, 256 * KIB as usize);
    dev.write_at(&data, MIB, WriteFlags::default())
        .expect("write");
    let e = dev
        .file_extent(MIB + 4096, 128 * KIB)
        .expect("in range")
        .expect("a buffered file names its range");
    assert_eq!((e.offset, e.len), (MIB + 4096, 128 * KIB));
    // The handle is the device's open file: its bytes are what read_at gives.
    let mut got = vec![0u8; e.len as usize];
    std::os::unix::fs::FileExt::read_exact_at(&*e.file, &mut got, e.offset).expect("pread");
    assert_eq!(got, read_vec(&dev, MIB + 4096, 128 * KIB as usize));
    assert_eq!(got, data[4096..4096 + 128 * KIB as usize]);
    // Two extents share one handle; equality is by handle and range.
    let e2 = dev.file_extent(MIB + 4096, 128 * KIB).unwrap().unwrap();
    assert!(Arc::ptr_eq(&e.file, &e2.file));
    assert_eq!(e, e2);
    assert_ne!(e, dev.file_extent(MIB, 128 * KIB).unwrap().unwrap());
    // Checked as read_at checks: the last byte is fine, one more is not.
    assert!(dev.file_extent(4 * MIB - 512, 512).unwrap().is_some());
    for (off, len) in [(4 * MIB - 512, 513), (4 * MIB, 1), (u64::MAX, 2)] {
        assert!(
            matches!(
                dev.file_extent(off, len),
                Err(BlockError::OutOfRange { .. })
            ),
            "{off}+{len}"
        );
    }
    // Nothing to name.
    assert!(dev.file_extent(MIB, 0).unwrap().is_none());
    // The extent keeps the file open after the device is gone.
    drop(dev);
    std::os::unix::fs::FileExt::read_exact_at(&*e.file, &mut got, e.offset).expect("pread");
    assert_eq!(got, data[4096..4096 + 128 * KIB as usize]);
    drop(path);
}

#[test]
fn file_extent_of_a_short_file_names_the_device_range() {
    // A backing file shorter than the device (truncated externally): the
    // extent still covers the device range; bytes past the file's end are
    // zeroes for whoever sends it, as read_at returns them.
    let cfg = Cfg {
        engine: EngineKind::Sync,
        ring: RingUse::WhereFaster,
    };
    let (_dir, path, dev) = new_dev(cfg, 2 * MIB);
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let e = dev.file_extent(MIB - 4096, 64 * KIB).unwrap().unwrap();
    assert_eq!((e.offset, e.len), (MIB - 4096, 64 * KIB));
    assert!(read_vec(&dev, MIB, 4096).iter().all(|&b| b == 0));
}

#[test]
fn no_file_extent_for_o_direct() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("direct.img");
    let dev = match FileDev::open(
        &path,
        FileDevOptions {
            direct: true,
            create_size: Some(MIB),
            ..opts(EngineKind::Sync)
        },
    ) {
        Ok(dev) => dev,
        Err(BlockError::Io(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!("SKIP: the temp filesystem refuses O_DIRECT");
            return;
        }
        Err(e) => panic!("open O_DIRECT: {e}"),
    };
    assert!(dev.file_extent(0, 64 * KIB).unwrap().is_none());
    assert!(matches!(
        dev.file_extent(MIB, 1),
        Err(BlockError::OutOfRange { .. })
    ));
}
