//! Micro-benchmarks of the mirror layer's data path: journal append (with
//! and without the FUA group-commit fsync), and 4 KiB host writes through a
//! `MirroredVolume` with no association, a Sync mirror and an Async
//! journal, all over in-memory devices so the layer's own cost shows.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use lunmirror::block::mem::MemDev;
use lunmirror::block::{BlockDev, WriteFlags};
use lunmirror::mirror::journal::{Journal, JournalConfig, RecordKind};
use lunmirror::mirror::{
    AssocSetup, Association, CopyStep, CopyType, MirrorPolicy, MirroredVolume,
};

const SIZE: u64 = 64 << 20;

fn journal_append(c: &mut Criterion) {
    let mut g = c.benchmark_group("journal_append_4k");
    g.throughput(Throughput::Bytes(4096));
    let data = vec![0xA5u8; 4096];
    for fua in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = JournalConfig {
            cap: u64::MAX,
            segment_size: 64 << 20,
            throttle_timeout: Duration::from_secs(1),
            ..JournalConfig::default()
        };
        let (j, _) = Journal::open(dir.path(), cfg).unwrap();
        let mut off = 0u64;
        g.bench_function(if fua { "fua" } else { "buffered" }, |b| {
            b.iter(|| {
                let seq = j.append(RecordKind::Write, fua, off, 4096, &data).unwrap();
                if fua {
                    j.sync_to(seq).unwrap();
                }
                // Keep the journal from growing without bound.
                j.mark_applied(seq);
                off = (off + 4096) % SIZE;
            })
        });
        j.checkpoint().unwrap();
    }
    g.finish();
}

fn volume(ct: Option<CopyType>, dir: &std::path::Path) -> Arc<MirroredVolume> {
    let vol = MirroredVolume::new("bench", Arc::new(MemDev::new(SIZE)));
    if let Some(ct) = ct {
        let a = Association::create(AssocSetup {
            id: 1,
            dir: dir.join("sync-1"),
            copy_type: ct,
            primary: vol.primary().clone(),
            replica: Arc::new(MemDev::new(SIZE)),
            locks: vol.locks().clone(),
            policy: MirrorPolicy::default(),
            notify: Arc::new(|_| {}),
        })
        .unwrap();
        let q = vol.quiesce(Duration::from_secs(1)).unwrap();
        vol.add_association(&q, a.clone());
        drop(q);
        while a.copy_step().unwrap() != CopyStep::Done {}
        a.finish_copy().unwrap();
        // Warm the activity log so the steady state is measured.
        let mut off = 0;
        while off < SIZE {
            vol.write_at(&[0u8; 512], off, WriteFlags::default())
                .unwrap();
            off += 1 << 20;
        }
    }
    vol
}

fn volume_writes(c: &mut Criterion) {
    let mut g = c.benchmark_group("volume_write_4k");
    g.throughput(Throughput::Bytes(4096));
    let data = vec![0x5Au8; 4096];
    for (name, ct) in [
        ("plain", None),
        ("sync", Some(CopyType::Sync)),
        ("async", Some(CopyType::Async)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let vol = volume(ct, dir.path());
        let mut off = 0u64;
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    off = (off + 4096 * 7) % SIZE;
                    off
                },
                |o| vol.write_at(&data, o, WriteFlags::default()).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(3));
    targets = journal_append, volume_writes
}
criterion_main!(benches);
