//! Micro-benchmark of the file backstore's engines, io_uring vs sync:
//! 4 KiB random reads/writes one at a time (QD1), 32 at a time through
//! `submit_batch` (QD32), from 4 threads at once, and 1 MiB sequential.
//! Buffered runs measure engine overhead over the page cache; `direct` runs
//! (O_DIRECT) measure the device path.
//!
//! `cargo bench --bench block_engines [-- filter]`

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lunmirror::block::file::{EngineKind, FileDev, FileDevOptions, RingUse};
use lunmirror::block::{BatchOp, BlockDev, WriteFlags};

const FILE_SIZE: u64 = 64 << 20;
const BLOCK: usize = 4096;
const SEQ: usize = 1 << 20;
const QD: usize = 32;
const THREADS: u64 = 4;
const ALIGN: usize = 4096;

/// (label, engine, ring use): `io_uring` is the default routing (rings for
/// batches only), `io_uring_always` puts every request on a ring.
const ENGINES: [(&str, EngineKind, RingUse); 3] = [
    ("sync", EngineKind::Sync, RingUse::WhereFaster),
    ("io_uring", EngineKind::IoUring, RingUse::WhereFaster),
    ("io_uring_always", EngineKind::IoUring, RingUse::Always),
];

/// A page-aligned buffer (O_DIRECT needs one), without unsafe.
struct Aligned {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, fill: u8) -> Self {
        let storage = vec![fill; len + ALIGN];
        let start = storage.as_ptr().align_offset(ALIGN);
        Aligned {
            storage,
            start,
            len,
        }
    }
    fn get(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// xorshift block-aligned random offsets.
struct Offsets(u64);

impl Offsets {
    fn next(&mut self, align: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % (FILE_SIZE / align)) * align
    }
}

/// Open (and on first use fill, so that nothing reads holes) the bench file.
fn open(path: &Path, (_, engine, ring): (&str, EngineKind, RingUse), direct: bool) -> FileDev {
    let fresh = !path.exists();
    let dev = FileDev::open(
        path,
        FileDevOptions {
            engine,
            direct,
            create_size: Some(FILE_SIZE),
            ..FileDevOptions::default()
        },
    )
    .expect("open bench file");
    assert_eq!(dev.engine(), engine, "engine unavailable");
    dev.set_ring_use(ring);
    if fresh {
        let mut buf = Aligned::new(SEQ, 0x5A);
        for (i, b) in buf.get_mut().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        for off in (0..FILE_SIZE).step_by(SEQ) {
            dev.write_at(buf.get(), off, WriteFlags::default())
                .expect("fill");
        }
        dev.flush().expect("flush");
    }
    dev
}

fn bench_engines(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bench.img");

    for direct in [false, true] {
        let mode = if direct { "direct" } else { "buffered" };

        let mut g = c.benchmark_group(format!("rand4k_read_qd1_{mode}"));
        g.throughput(Throughput::Bytes(BLOCK as u64));
        for engine in ENGINES {
            let label = engine.0;
            let dev = open(&path, engine, direct);
            let mut buf = Aligned::new(BLOCK, 0);
            let mut offs = Offsets(0x1234_5678);
            g.bench_function(BenchmarkId::from_parameter(label), |b| {
                b.iter(|| {
                    dev.read_at(buf.get_mut(), offs.next(BLOCK as u64))
                        .expect("read")
                })
            });
        }
        g.finish();

        let mut g = c.benchmark_group(format!("rand4k_write_qd1_{mode}"));
        g.throughput(Throughput::Bytes(BLOCK as u64));
        for engine in ENGINES {
            let label = engine.0;
            let dev = open(&path, engine, direct);
            let buf = Aligned::new(BLOCK, 0xA5);
            let mut offs = Offsets(0x8765_4321);
            g.bench_function(BenchmarkId::from_parameter(label), |b| {
                b.iter(|| {
                    dev.write_at(buf.get(), offs.next(BLOCK as u64), WriteFlags::default())
                        .expect("write")
                })
            });
        }
        g.finish();

        let mut g = c.benchmark_group(format!("rand4k_read_qd32_batch_{mode}"));
        g.throughput(Throughput::Bytes((BLOCK * QD) as u64));
        for engine in ENGINES {
            let label = engine.0;
            let dev = open(&path, engine, direct);
            let mut bufs: Vec<Aligned> = (0..QD).map(|_| Aligned::new(BLOCK, 0)).collect();
            let mut offs = Offsets(0x0BAD_CAFE);
            g.bench_function(BenchmarkId::from_parameter(label), |b| {
                b.iter(|| {
                    let mut ops: Vec<BatchOp<'_>> = bufs
                        .iter_mut()
                        .map(|buf| BatchOp::Read {
                            buf: buf.get_mut(),
                            offset: offs.next(BLOCK as u64),
                        })
                        .collect();
                    for r in dev.submit_batch(&mut ops) {
                        r.expect("batch read");
                    }
                })
            });
        }
        g.finish();

        let mut g = c.benchmark_group(format!("rand4k_write_qd32_batch_{mode}"));
        g.throughput(Throughput::Bytes((BLOCK * QD) as u64));
        for engine in ENGINES {
            let label = engine.0;
            let dev = open(&path, engine, direct);
            let bufs: Vec<Aligned> = (0..QD).map(|i| Aligned::new(BLOCK, i as u8)).collect();
            let mut offs = Offsets(0xFEED_F00D);
            g.bench_function(BenchmarkId::from_parameter(label), |b| {
                b.iter(|| {
                    let mut ops: Vec<BatchOp<'_>> = bufs
                        .iter()
                        .map(|buf| BatchOp::Write {
                            buf: buf.get(),
                            offset: offs.next(BLOCK as u64),
                            flags: WriteFlags::default(),
                        })
                        .collect();
                    for r in dev.submit_batch(&mut ops) {
                        r.expect("batch write");
                    }
                })
            });
        }
        g.finish();

        // Four threads each doing QD1 random reads: the iSCSI target's shape.
        let mut g = c.benchmark_group(format!("rand4k_read_{THREADS}threads_{mode}"));
        g.throughput(Throughput::Bytes(BLOCK as u64));
        for engine in ENGINES {
            let label = engine.0;
            let dev = Arc::new(open(&path, engine, direct));
            g.bench_function(BenchmarkId::from_parameter(label), |b| {
                b.iter_custom(|iters| {
                    let per_thread = iters.div_ceil(THREADS);
                    let start = Instant::now();
                    let handles: Vec<_> = (0..THREADS)
                        .map(|t| {
                            let dev = Arc::clone(&dev);
                            std::thread::spawn(move || {
                                let mut buf = Aligned::new(BLOCK, 0);
                                let mut offs = Offsets(0x9E37_79B9 + t);
                                for _ in 0..per_thread {
                                    dev.read_at(buf.get_mut(), offs.next(BLOCK as u64))
                                        .expect("read");
                                }
                            })
                        })
                        .collect();
                    for h in handles {
                        h.join().expect("bench thread");
                    }
                    start.elapsed()
                })
            });
        }
        g.finish();

        for (name, write) in [("seq1m_read", false), ("seq1m_write", true)] {
            let mut g = c.benchmark_group(format!("{name}_{mode}"));
            g.throughput(Throughput::Bytes(SEQ as u64));
            for engine in ENGINES {
                let label = engine.0;
                let dev = open(&path, engine, direct);
                let mut buf = Aligned::new(SEQ, 0x3C);
                let mut off = 0u64;
                g.bench_function(BenchmarkId::from_parameter(label), |b| {
                    b.iter(|| {
                        if write {
                            dev.write_at(buf.get(), off, WriteFlags::default())
                                .expect("write");
                        } else {
                            dev.read_at(buf.get_mut(), off).expect("read");
                        }
                        off = (off + SEQ as u64) % FILE_SIZE;
                    })
                });
            }
            g.finish();
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_engines
}
criterion_main!(benches);
