//! Tests of the mirror layer against in-memory devices, with a
//! fault-injecting replica.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fault::FaultDev;
use super::journal::JournalConfig;
use super::*;
use crate::block::mem::MemDev;
use crate::block::SharedDev;

const RS: u64 = 4096;

struct Rig {
    dir: tempfile::TempDir,
    primary: Arc<MemDev>,
    replica_mem: Arc<MemDev>,
    replica: Arc<FaultDev>,
    vol: Arc<MirroredVolume>,
}

fn policy() -> MirrorPolicy {
    MirrorPolicy {
        region_size: RS,
        journal: JournalConfig {
            cap: 1 << 20,
            segment_size: 64 << 10,
            throttle_timeout: Duration::from_millis(100),
            ..JournalConfig::default()
        },
        checkpoint_interval: Duration::from_millis(20),
        ..MirrorPolicy::default()
    }
}

fn rig(size: u64) -> Rig {
    let primary = Arc::new(MemDev::new(size));
    // Start from a replica with different contents: the copy must fix it.
    let replica_mem = Arc::new(MemDev::new(size));
    replica_mem
        .write_at(&vec![0xEE; size as usize], 0, WriteFlags::default())
        .unwrap();
    let replica = Arc::new(FaultDev::new(replica_mem.clone()));
    let vol = MirroredVolume::new("lun0", primary.clone());
    Rig {
        dir: tempfile::tempdir().unwrap(),
        primary,
        replica_mem,
        replica,
        vol,
    }
}

fn setup(r: &Rig, id: u64, ct: CopyType, policy: MirrorPolicy) -> AssocSetup {
    setup_with(r, id, ct, policy, r.replica.clone())
}

fn setup_with(
    r: &Rig,
    id: u64,
    ct: CopyType,
    policy: MirrorPolicy,
    replica: SharedDev,
) -> AssocSetup {
    AssocSetup {
        id,
        dir: r.dir.path().join(format!("sync-{id}")),
        copy_type: ct,
        primary: r.vol.primary().clone(),
        replica,
        locks: r.vol.locks().clone(),
        policy,
        notify: Arc::new(|_| {}),
    }
}

fn attach(r: &Rig, ct: CopyType, policy: MirrorPolicy) -> Arc<Association> {
    let a = Association::create(setup(r, 1, ct, policy)).unwrap();
    let q = r.vol.quiesce(Duration::from_secs(1)).unwrap();
    r.vol.add_association(&q, a.clone());
    a
}

fn run_copy(a: &Association) -> CopyEnd {
    loop {
        match a.copy_step().unwrap() {
            CopyStep::Progress { done, total } => assert!(done <= total),
            CopyStep::Waiting => std::thread::sleep(Duration::from_millis(1)),
            CopyStep::Done => return a.finish_copy().unwrap(),
        }
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
}

fn w(vol: &MirroredVolume, data: &[u8], off: u64) {
    vol.write_at(data, off, WriteFlags::default()).unwrap();
}

#[test]
fn sync_initial_copy_with_concurrent_writes_converges() {
    let r = rig(64 * RS);
    w(&r.vol, &pattern(1, 20 * RS as usize), 0);
    let a = attach(&r, CopyType::Sync, policy());
    assert_eq!(a.state(), SyncState::CopyInProgress);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (vol, st, n) = (r.vol.clone(), stop.clone(), count.clone());
    let writer = std::thread::spawn(move || {
        let mut i = 0u64;
        while !st.load(Ordering::SeqCst) {
            let off = (i * 7919) % (63 * RS) + (i % 3) * 100;
            vol.write_at(&pattern(i as u8, 3000), off, WriteFlags::default())
                .unwrap();
            i += 1;
            n.store(i, Ordering::SeqCst);
        }
        i
    });
    while count.load(Ordering::SeqCst) < 3 {
        std::thread::sleep(Duration::from_millis(1));
    }
    // Copy slowly so host writes interleave with the copy.
    loop {
        match a.copy_step().unwrap() {
            CopyStep::Done => break,
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    assert_eq!(a.finish_copy().unwrap(), CopyEnd::Kept);
    stop.store(true, Ordering::SeqCst);
    assert!(writer.join().unwrap() > 0);
    assert_eq!(a.state(), SyncState::Synchronized);
    assert_eq!(r.primary.snapshot(), r.replica_mem.snapshot());
    // Synchronized: the replica holds a write as soon as it returns.
    w(&r.vol, b"after", 12345);
    assert_eq!(r.primary.snapshot(), r.replica_mem.snapshot());
}

/// The primary write is not held up by a slow replica write, and the host
/// write is acknowledged only once the replica holds it. (The name is from
/// when the replica write ran on another thread; it now runs on the host's
/// thread right after the primary write.)
#[test]
fn sync_replica_write_runs_in_parallel_with_primary() {
    let r = rig(16 * RS);
    let a = attach(&r, CopyType::Sync, policy());
    run_copy(&a);
    r.replica.set_gate(true);
    let vol = r.vol.clone();
    let t = std::thread::spawn(move || vol.write_at(b"parallel", 100, WriteFlags::default()));
    // The primary write happens while the replica write is held at the gate.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 8];
    loop {
        r.primary.read_at(&mut buf, 100).unwrap();
        if &buf == b"parallel" {
            break;
        }
        assert!(Instant::now() < deadline, "primary write did not start");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(!t.is_finished(), "acknowledged before the replica held it");
    r.replica.set_gate(false);
    t.join().unwrap().unwrap();
    r.replica_mem.read_at(&mut buf, 100).unwrap();
    assert_eq!(&buf, b"parallel");
}

#[test]
fn sync_fua_and_flush_reach_the_replica() {
    let r = rig(16 * RS);
    let a = attach(&r, CopyType::Sync, policy());
    run_copy(&a);
    let (fua0, fl0) = (r.replica.fua_writes(), r.replica.flushes());
    r.vol.write_at(b"x", 0, WriteFlags { fua: true }).unwrap();
    assert_eq!(r.replica.fua_writes(), fua0 + 1);
    r.vol.flush().unwrap();
    assert_eq!(r.replica.flushes(), fl0 + 1);
}

#[test]
fn replica_error_breaks_without_failing_host_then_resync_repairs() {
    let r = rig(32 * RS);
    let a = attach(&r, CopyType::Sync, policy());
    run_copy(&a);
    r.replica.fail_writes(true);
    w(&r.vol, b"missed-1", 5 * RS + 10);
    assert_eq!(a.state(), SyncState::Broken);
    assert!(a.error().unwrap().contains("replica I/O error"));
    w(&r.vol, b"missed-2", 9 * RS);
    let st = a.status();
    assert_eq!(st.out_of_sync_bytes, 2 * RS);
    assert!(st.percent_synced < 100);
    r.replica.fail_writes(false);
    let q = r.vol.quiesce(Duration::from_secs(1)).unwrap();
    assert!(a.begin_resync().unwrap());
    drop(q);
    assert_eq!(a.state(), SyncState::ResyncInProgress);
    run_copy(&a);
    assert_eq!(a.state(), SyncState::Synchronized);
    assert_eq!(r.primary.snapshot(), r.replica_mem.snapshot());
}

#[test]
fn full_replica_filesystem_is_a_replica_error() {
    let r = rig(8 * RS);
    let a = attach(&r, CopyType::Sync, policy());
    run_copy(&a);
    r.replica.no_space(true);
    w(&r.vol, b"enospc", 0);
    assert_eq!(a.state(), SyncState::Broken);
    assert!(a.error().unwrap().contains("no space"));
}

#[test]
fn fail_policy_fails_host_writes_while_broken() {
    let r = rig(8 * RS);
    let p = MirrorPolicy {
        fail_host_io_on_replica_error: true,
        ..policy()
    };
    let a = attach(&r, CopyType::Sync, p);
    run_copy(&a);
    r.replica.fail_writes(true);
    assert!(r.vol.write_at(b"x", 0, WriteFlags::default()).is_err());
    assert_eq!(a.state(), SyncState::Broken);
    let before = r.primary.snapshot();
    assert!(r.vol.write_at(b"y", 4096, WriteFlags::default()).is_err());
    assert_eq!(
        r.primary.snapshot(),
        before,
        "refused before touching the primary"
    );
}

#[test]
fn async_ships_in_order_and_converges() {
    let r = rig(64 * RS);
    let a = attach(&r, CopyType::Async, policy());
    run_copy(&a);
    for i in 0..200u64 {
        // Overlapping writes: order matters.
        let off = (i * 1000) % (60 * RS);
        r.vol
            .write_at(
                &pattern(i as u8, 5000),
                off,
                WriteFlags { fua: i % 50 == 0 },
            )
            .unwrap();
    }
    r.vol
        .write_zeroes(RS, 2 * RS, WriteFlags::default())
        .unwrap();
    r.vol.discard(10 * RS, RS).unwrap();
    r.vol.flush().unwrap();
    assert!(a.wait_lag_zero(Duration::from_secs(10)));
    assert_eq!(a.state(), SyncState::Synchronized);
    assert_eq!(r.primary.snapshot(), r.replica_mem.snapshot());
}

#[test]
fn async_host_write_does_not_wait_for_the_replica() {
    let r = rig(16 * RS);
    let a = attach(&r, CopyType::Async, policy());
    run_copy(&a);
    r.replica.set_gate(true);
    w(&r.vol, b"quick", 0);
    assert_eq!(a.lag().unwrap().records, 1);
    r.replica.set_gate(false);
    assert!(a.wait_lag_zero(Duration::from_secs(5)));
    assert_eq!(r.primary.snapshot(), r.replica_mem.snapshot());
}

fn inline_policy() -> MirrorPolicy {
    let mut p = policy();
    p.journal.inline_apply = true;
    p
}

/// With inline apply, a small write reaches the replica before it
/// completes, without the shipper; FUA writes, flushes, zeroing and
/// discards still go through the shipper, and everything converges.
#[test]
fn async_inline_apply_writes_the_replica_before_completing() {
    let r = rig(16 * RS);
    let a = attach(&r, CopyType::Async, inline_policy());
    run_copy(&a);
    for i in 0..20u64 {
        w(&r.vol, &pattern(i as u8, 3000), i * 3000);
        assert_eq!(
            r.replica_mem.snapshot()[(i * 3000) as usize..(i * 3000 + 3000) as usize],
            pattern(i as u8, 3000)[..],
            "write {i} applied inline"
        );
    }
    r.vol
        .write_at(&pattern(99, 4096), 8 * RS, WriteFlags { fua: true })
        .unwrap();
    r.vol.write_zeroes(RS, RS, WriteFlags::default()).unwrap();
    r.vol.discard(3 * RS, RS).unwrap();
    w(&r.vol, &pattern(7, 700), 9 * RS);
    r.vol.flush().unwrap();
    assert!(a.wait_lag_zero(Duration::from_secs(5)));
    assert_eq!(r.primary.snapshot(), r.replica_mem.snapshot());
}

/// The price of inline apply: a replica write that hangs holds the host
/// write being applied inline; later writes go through the journal (the
/// stuck one is older than `INLINE_STALL`) and do not wait.
#[test]
fn async_inline_apply_holds_only_the_writes_in_flight_on_a_hung_replica() {
    let r = rig(16 * RS);
    let a = attach(&r, CopyType::Async, inline_policy());
    run_copy(&a);
    r.replica.set_gate(true);
    let vol = r.vol.clone();
    let stuck = std::thread::spawn(move || w(&vol, &pattern(1, 512), 0));
    while a.lag().unwrap().records == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(30));
    let t = Instant::now();
    w(&r.vol, &pattern(2, 512), RS);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(
        !stuck.is_finished(),
        "the inline write waits for the replica"
    );
    assert_eq!(a.lag().unwrap().records, 2);
    r.replica.set_gate(false);
    stuck.join().unwrap();
    assert!(a.wait_lag_zero(Duration::from_secs(5)));
    assert_eq!(r.primary.snapshot(), r.replica_mem.snapshot());
}

/// A checkpoint records as applied only what was applied before its
/// replica flush began: a write applied inline by its writer while the
/// flush runs is not covered by it (after a power loss it would be missing
/// on the replica while `head` said otherwise).
#[test]
fn async_inline_checkpoint_covers_only_records_applied_before_its_flush() {
    let r = rig(16 * RS);
    // Only the idle checkpoint (on the shipper's thread), no periodic one.
    let p = MirrorPolicy {
        checkpoint_interval: Duration::from_secs(3600),
        ..inline_policy()
    };
    let a = attach(&r, CopyType::Async, p);
    run_copy(&a);
    assert!(a.wait_lag_zero(Duration::from_secs(5)));
    let j = a.journal().unwrap();
    r.replica.set_flush_gate(true);
    let started = r.replica.flushes_started();
    w(&r.vol, &pattern(1, 512), 0);
    let first = j.applied_seq();
    assert!(first > j.head_seq(), "applied inline, not checkpointed yet");
    // Writes stopped: the shipper checkpoints, and its flush is held.
    let t = Instant::now();
    while r.replica.flushes_started() == started {
        assert!(t.elapsed() < Duration::from_secs(5), "no idle checkpoint");
        std::thread::sleep(Duration::from_millis(1));
    }
    w(&r.vol, &pattern(2, 512), RS);
    assert!(j.applied_seq() > first, "applied inline during the flush");
    r.replica.set_flush_gate(false);
    let t = Instant::now();
    while j.head_seq() < first {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "checkpoint never ended"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(j.head_seq(), first, "only what the flush covered");
    // The next idle checkpoint covers the second write.
    let t = Instant::now();
    while j.head_seq() < j.applied_seq() {
        assert!(t.elapsed() < Duration::from_secs(5), "second checkpoint");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(r.primary.snapshot(), r.replica_mem.snapshot());
}

#[test]
fn async_periodic_checkpoint_does_not_stop_shipping() {
    let r = rig(64 * RS);
    let p = MirrorPolicy {
        checkpoint_bytes: 4 * RS,
        checkpoint_interval: Duration::from_secs(3600),
        ..policy()
    };
    let a = attach(&r, CopyType::Async, p);
    run_copy(&a);
    assert!(a.wait_lag_zero(Duration::from_secs(5)));
    // The replica's flushes hang: the first checkpoint (after 4 records)
    // stays in its flush while the shipper applies the rest.
    r.replica.set_flush_gate(true);
    let flushes = r.replica.flushes();
    for i in 0..32u64 {
        w(&r.vol, &pattern(i as u8, RS as usize), (i * 7 % 60) * RS);
    }
    assert!(
        a.wait_lag_zero(Duration::from_secs(5)),
        "records applied while a checkpoint flushes"
    );
    assert_eq!(r.primary.snapshot(), r.replica_mem.snapshot());
    assert_eq!(r.replica.flushes(), flushes, "the flush is still held");
    r.replica.set_flush_gate(false);
    // The held checkpoint completes; a host flush still reaches the replica.
    r.vol.flush().unwrap();
    assert!(a.wait_lag_zero(Duration::from_secs(5)));
    assert!(r.replica.flushes() > flushes);
    assert_eq!(a.state(), SyncState::Synchronized);
}

#[test]
fn async_full_journal_throttles_then_breaks_and_resync_repairs() {
    let r = rig(64 * RS);
    let p = MirrorPolicy {
        journal: JournalConfig {
            cap: 3 * RS,
            segment_size: 64 << 10,
            throttle_timeout: Duration::from_millis(50),
            ..JournalConfig::default()
        },
        ..policy()
    };
    let a = attach(&r, CopyType::Async, p);
    run_copy(&a);
    r.replica.set_gate(true);
    let t = Instant::now();
    for i in 0..6u64 {
        w(&r.vol, &pattern(i as u8, RS as usize), i * RS);
    }
    assert!(
        t.elapsed() >= Duration::from_millis(50),
        "writers were throttled"
    );
    assert_eq!(a.state(), SyncState::Broken);
    assert!(a.error().unwrap().contains("journal full"));
    r.replica.set_gate(false);
    let q = r.vol.quiesce(Duration::from_secs(1)).unwrap();
    assert!(a.begin_resync().unwrap());
    drop(q);
    run_copy(&a);
    assert!(a.wait_lag_zero(Duration::from_secs(5)));
    assert_eq!(r.primary.snapshot(), r.replica_mem.snapshot());
}

/// An Async association, initial copy done and the activity log clean,
/// whose shipper is stuck behind a closed gate: only its journal carries
/// later writes.
fn async_behind_closed_gate(r: &Rig) -> Arc<Association> {
    let stuck = Arc::new(FaultDev::new(r.replica_mem.clone()));
    let a =
        Association::create(setup_with(r, 1, CopyType::Async, policy(), stuck.clone())).unwrap();
    let q = r.vol.quiesce(Duration::from_secs(1)).unwrap();
    r.vol.add_association(&q, a.clone());
    drop(q);
    run_copy(&a);
    r.vol.housekeep();
    r.vol.housekeep();
    stuck.set_gate(true);
    a
}

/// "Crash" association 1 (detach it without any cleanup, abandoning its
/// threads) and reopen it from its state directory as a restart would.
fn crash_and_reopen(r: &Rig, a: Arc<Association>) -> (Arc<Association>, ResumeAction) {
    let q = r.vol.quiesce(Duration::from_secs(1)).unwrap();
    r.vol.remove_association(&q, 1);
    drop(q);
    drop(a);
    Association::reopen(
        setup(r, 1, CopyType::Async, policy()),
        SyncState::Synchronized,
        None,
        None,
        None,
    )
    .unwrap()
}

#[test]
fn async_crash_replays_journal_and_resyncs_in_flight_regions() {
    let r = rig(32 * RS);
    // The first incarnation ships through a gate that never opens: its
    // journal is all that carries the writes over the "crash".
    let a = async_behind_closed_gate(&r);
    for i in 0..10u64 {
        w(&r.vol, &pattern(i as u8, 700), i * 3000);
    }
    assert!(a.lag().unwrap().records >= 9);
    // "Crash": nothing is cleaned up, the old threads are abandoned.
    let (b, action) = crash_and_reopen(&r, a);
    assert_eq!(
        action,
        ResumeAction::Copy(CopyKind::Resync),
        "in-flight regions are resynced"
    );
    let q = r.vol.quiesce(Duration::from_secs(1)).unwrap();
    r.vol.add_association(&q, b.clone());
    drop(q);
    run_copy(&b);
    assert!(b.wait_lag_zero(Duration::from_secs(5)));
    assert_eq!(r.primary.snapshot(), r.replica_mem.snapshot());
}

/// Records staged but never written to the journal file when the process
/// dies are lost with it; the activity log still covers their regions, so
/// the restart resyncs them from the primary and the replica converges.
#[test]
fn async_crash_with_staged_records_converges() {
    let r = rig(32 * RS);
    let a = async_behind_closed_gate(&r);
    let j = a.journal().unwrap();
    // Some records reach the file, later ones stay staged.
    for i in 0..4u64 {
        w(&r.vol, &pattern(i as u8, 700), i * 3000);
    }
    j.sync_all().unwrap();
    j.hold_writes(true);
    for i in 4..10u64 {
        w(&r.vol, &pattern(i as u8 + 100, 700), i * 3000);
    }
    // The staged records include ones the shipper has not taken.
    assert!(j.staged_count() >= 6);
    drop(j);
    let (b, action) = crash_and_reopen(&r, a);
    assert_eq!(action, ResumeAction::Copy(CopyKind::Resync));
    let replayed = b.lag().unwrap().records;
    assert!(
        (3..=4).contains(&replayed),
        "only the written records are replayed: {replayed}"
    );
    let q = r.vol.quiesce(Duration::from_secs(1)).unwrap();
    r.vol.add_association(&q, b.clone());
    drop(q);
    run_copy(&b);
    assert!(b.wait_lag_zero(Duration::from_secs(5)));
    assert_eq!(r.primary.snapshot(), r.replica_mem.snapshot());
}

#[test]
fn housekeeping_skips_rounds_that_would_clear_nothing() {
    let r = rig(32 * RS);
    let a = attach(&r, CopyType::Sync, policy());
    run_copy(&a);
    r.vol.housekeep();
    r.vol.housekeep();
    assert_eq!(a.persisted_count(), 0);
    let flushes = r.replica.flushes();
    // Every marked region keeps being written between rounds: a round
    // could clear nothing, so no flush is spent on it.
    for round in 0..4u64 {
        for region in 0..8 {
            w(&r.vol, &round.to_le_bytes(), region * RS);
        }
        r.vol.housekeep();
        assert_eq!(a.activity_count(), 8);
    }
    assert_eq!(r.replica.flushes(), flushes, "busy rounds flush nothing");
    // Half the regions go quiet: the next round flushes and clears them.
    for round in 0..2u64 {
        for region in 0..4 {
            w(&r.vol, &round.to_le_bytes(), region * RS);
        }
        r.vol.housekeep();
    }
    assert!(r.replica.flushes() > flushes);
    assert_eq!(a.activity_count(), 4, "the idle half is cleared");
    assert_eq!(a.persisted_count(), 4);
    // Idle: two rounds clear the rest.
    r.vol.housekeep();
    r.vol.housekeep();
    assert_eq!(a.persisted_count(), 0);
    assert_eq!(r.primary.snapshot(), r.replica_mem.snapshot());
}

#[test]
fn sync_activity_log_is_cleared_lazily_and_survives_crash() {
    let r = rig(32 * RS);
    let a = attach(&r, CopyType::Sync, policy());
    run_copy(&a);
    r.vol.housekeep();
    r.vol.housekeep();
    assert_eq!(a.persisted_count(), 0, "clean after two idle rounds");
    w(&r.vol, b"inflight", 7 * RS);
    assert_eq!(a.persisted_count(), 1, "marked before the write");
    // Crash before housekeeping: the region comes back out of sync.
    a.stop();
    let (b, action) = Association::reopen(
        setup(&r, 1, CopyType::Sync, policy()),
        SyncState::Synchronized,
        None,
        None,
        None,
    )
    .unwrap();
    assert_eq!(action, ResumeAction::Copy(CopyKind::Resync));
    assert_eq!(b.status().out_of_sync_bytes, RS);
    drop(b);
    r.vol.housekeep();
    r.vol.housekeep();
    assert_eq!(a.persisted_count(), 0);
    let (_, action) = Association::reopen(
        setup(&r, 1, CopyType::Sync, policy()),
        SyncState::Synchronized,
        None,
        None,
        None,
    )
    .unwrap();
    assert_eq!(action, ResumeAction::None);
}

#[test]
fn point_in_time_copy_is_exact_while_writes_continue() {
    let r = rig(64 * RS);
    w(&r.vol, &pattern(3, 64 * RS as usize), 0);
    let at_attach = r.primary.snapshot();
    let a = attach(&r, CopyType::UnSyncAssoc, policy());
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (vol, st, n) = (r.vol.clone(), stop.clone(), count.clone());
    let writer = std::thread::spawn(move || {
        let mut i = 0u64;
        while !st.load(Ordering::SeqCst) {
            vol.write_at(
                &pattern(i as u8 ^ 0x55, 1500),
                (i * 4001) % (63 * RS),
                WriteFlags::default(),
            )
            .unwrap();
            i += 1;
            n.store(i, Ordering::SeqCst);
        }
    });
    while count.load(Ordering::SeqCst) < 5 {
        std::thread::sleep(Duration::from_millis(1));
    }
    loop {
        match a.copy_step().unwrap() {
            CopyStep::Done => break,
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    assert_eq!(a.finish_copy().unwrap(), CopyEnd::Kept);
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert_eq!(r.replica_mem.snapshot(), at_attach);
    assert_eq!(a.state(), SyncState::Idle);
    assert!(
        a.status().out_of_sync_bytes > 0,
        "changes since the copy are tracked"
    );

    // Restore brings the source back to the point in time; reads during the
    // restore already see restored data.
    let q = r.vol.quiesce(Duration::from_secs(1)).unwrap();
    assert!(a.begin_restore().unwrap());
    drop(q);
    let mut buf = vec![0u8; 64 * RS as usize];
    r.vol.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, at_attach);
    run_copy(&a);
    assert_eq!(r.primary.snapshot(), at_attach);
    assert_eq!(a.state(), SyncState::Idle);

    // Resync takes a new point-in-time copy of the changed regions.
    w(&r.vol, b"new data", 40 * RS);
    let q = r.vol.quiesce(Duration::from_secs(1)).unwrap();
    assert!(a.begin_resync().unwrap());
    drop(q);
    run_copy(&a);
    assert_eq!(r.replica_mem.snapshot(), r.primary.snapshot());
}

#[test]
fn unsync_unassoc_ends_with_removal() {
    let r = rig(8 * RS);
    w(&r.vol, b"data", 0);
    let a = attach(&r, CopyType::UnSyncUnAssoc, policy());
    assert_eq!(run_copy(&a), CopyEnd::Remove);
    assert_eq!(r.replica_mem.snapshot(), r.primary.snapshot());
}

#[test]
fn fracture_tracks_then_restore_and_modes_switch() {
    let r = rig(16 * RS);
    let a = attach(&r, CopyType::Sync, policy());
    run_copy(&a);
    w(&r.vol, b"both", 0);
    let q = r.vol.quiesce(Duration::from_secs(1)).unwrap();
    a.fracture().unwrap();
    drop(q);
    w(&r.vol, b"only-primary", 3 * RS);
    let mut buf = [0u8; 12];
    r.replica_mem.read_at(&mut buf, 3 * RS).unwrap();
    assert_ne!(&buf, b"only-primary");
    assert!(a.fracture().is_err(), "already fractured");
    let q = r.vol.quiesce(Duration::from_secs(1)).unwrap();
    assert!(a.begin_restore().unwrap());
    drop(q);
    run_copy(&a);
    assert_eq!(a.state(), SyncState::Synchronized);
    assert_eq!(r.primary.snapshot(), r.replica_mem.snapshot());
    // Sync → Async → Sync, staying identical.
    let q = r.vol.quiesce(Duration::from_secs(1)).unwrap();
    a.reset_to_async().unwrap();
    drop(q);
    assert_eq!(a.copy_type(), CopyType::Async);
    r.replica.set_gate(true);
    w(&r.vol, b"journaled", 5 * RS);
    r.replica.set_gate(false);
    let q = r.vol.quiesce(Duration::from_secs(1)).unwrap();
    let started = a.reset_to_sync().unwrap();
    drop(q);
    assert_eq!(a.copy_type(), CopyType::Sync);
    if started {
        run_copy(&a);
    }
    assert_eq!(a.state(), SyncState::Synchronized);
    assert_eq!(r.primary.snapshot(), r.replica_mem.snapshot());
}

#[test]
fn abort_copy_leaves_broken_with_pending_tracked() {
    let r = rig(16 * RS);
    let a = attach(&r, CopyType::Sync, policy());
    a.copy_step().unwrap();
    assert_eq!(a.abort_copy("terminated"), CopyEnd::Kept);
    assert_eq!(a.state(), SyncState::Broken);
    assert_eq!(a.status().out_of_sync_bytes, 15 * RS);
    assert!(a.copy_step().is_err());
}

#[test]
fn replica_read_error_during_restore_breaks() {
    let r = rig(8 * RS);
    let a = attach(&r, CopyType::UnSyncAssoc, policy());
    run_copy(&a);
    w(&r.vol, b"changed", 0);
    let q = r.vol.quiesce(Duration::from_secs(1)).unwrap();
    assert!(a.begin_restore().unwrap());
    drop(q);
    r.replica.fail_reads(true);
    assert!(a.copy_step().is_err());
    assert_eq!(a.state(), SyncState::Broken);
}

#[test]
fn quiesce_times_out_while_a_write_is_stuck() {
    let primary = Arc::new(FaultDev::new(Arc::new(MemDev::new(RS * 4))));
    let vol = MirroredVolume::new("lun0", primary.clone());
    primary.set_gate(true);
    let v2 = vol.clone();
    let t = std::thread::spawn(move || v2.write_at(b"stuck", 0, WriteFlags::default()));
    while vol.locks().held_ranges().is_empty() {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(vol.quiesce(Duration::from_millis(30)).is_none());
    primary.set_gate(false);
    t.join().unwrap().unwrap();
    assert!(vol.quiesce(Duration::from_millis(30)).is_some());
}

#[test]
fn batches_pass_through_without_associations_and_are_mirrored_with_one() {
    use crate::block::BatchOp;
    let r = rig(16 * RS);
    let (a, b) = (pattern(1, 4096), pattern(2, 4096));
    let mut out = vec![0u8; 4096];
    let mut ops = [
        BatchOp::Write {
            buf: &a,
            offset: 0,
            flags: WriteFlags::default(),
        },
        BatchOp::Write {
            buf: &b,
            offset: 8192,
            flags: WriteFlags::default(),
        },
    ];
    assert!(r.vol.submit_batch(&mut ops).iter().all(|x| x.is_ok()));
    let mut rd = [BatchOp::Read {
        buf: &mut out,
        offset: 8192,
    }];
    assert!(r.vol.submit_batch(&mut rd).iter().all(|x| x.is_ok()));
    assert_eq!(out, b);
    let assoc = attach(&r, CopyType::Sync, policy());
    run_copy(&assoc);
    let c = pattern(3, 4096);
    let mut ops = [
        BatchOp::Write {
            buf: &c,
            offset: 4096,
            flags: WriteFlags::default(),
        },
        BatchOp::Write {
            buf: &c,
            offset: 1 << 40,
            flags: WriteFlags::default(),
        },
    ];
    let res = r.vol.submit_batch(&mut ops);
    assert!(res[0].is_ok() && res[1].is_err(), "one result per op");
    assert_eq!(r.primary.snapshot(), r.replica_mem.snapshot());
}

/// A primary over a `MemDev` that answers like a file would: every range
/// unmapped (a sparse file), and/or a file range for every read (a
/// buffered file; the file is a stand-in, only the decision is under test).
struct FileLike {
    mem: Arc<MemDev>,
    all_holes: bool,
    extent_file: Option<Arc<std::fs::File>>,
}

impl BlockDev for FileLike {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::block::BlockResult<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(
        &self,
        buf: &[u8],
        offset: u64,
        flags: WriteFlags,
    ) -> crate::block::BlockResult<()> {
        self.mem.write_at(buf, offset, flags)
    }
    fn flush(&self) -> crate::block::BlockResult<()> {
        self.mem.flush()
    }
    fn caps(&self) -> crate::block::BlockCaps {
        self.mem.caps()
    }
    fn allocation(&self, offset: u64, len: u64) -> crate::block::BlockResult<(bool, u64)> {
        if self.all_holes {
            Ok((false, len))
        } else {
            self.mem.allocation(offset, len)
        }
    }
    fn file_extent(
        &self,
        offset: u64,
        len: u64,
    ) -> crate::block::BlockResult<Option<crate::block::FileExtent>> {
        crate::block::check_range(self.size(), offset, len)?;
        Ok(self
            .extent_file
            .as_ref()
            .map(|file| crate::block::FileExtent {
                file: file.clone(),
                offset,
                len,
            }))
    }
}

#[test]
fn allocation_reports_regions_not_restored_yet_as_mapped() {
    let mut r = rig(16 * RS);
    r.vol = MirroredVolume::new(
        "lun0",
        Arc::new(FileLike {
            mem: r.primary.clone(),
            all_holes: true,
            extent_file: None,
        }),
    );
    let a = attach(&r, CopyType::Sync, policy());
    run_copy(&a);
    let q = r.vol.quiesce(Duration::from_secs(1)).unwrap();
    a.fracture().unwrap();
    drop(q);
    for off in [2 * RS, 3 * RS, 9 * RS] {
        w(&r.vol, b"changed", off);
    }
    assert_eq!(r.vol.allocation(0, 16 * RS).unwrap(), (false, 16 * RS));
    let q = r.vol.quiesce(Duration::from_secs(1)).unwrap();
    assert!(a.begin_restore().unwrap());
    drop(q);
    // Regions 2, 3 and 9 read as the replica's data until restored.
    assert_eq!(r.vol.allocation(0, 16 * RS).unwrap(), (false, 2 * RS));
    assert_eq!(r.vol.allocation(2 * RS, 14 * RS).unwrap(), (true, 2 * RS));
    assert_eq!(r.vol.allocation(3 * RS + 100, 10).unwrap(), (true, 10));
    assert_eq!(r.vol.allocation(4 * RS, 12 * RS).unwrap(), (false, 5 * RS));
    assert_eq!(r.vol.allocation(9 * RS, 7 * RS).unwrap(), (true, RS));
    assert!(r.vol.allocation(15 * RS, 2 * RS).is_err());
    run_copy(&a);
    assert_eq!(r.vol.allocation(0, 16 * RS).unwrap(), (false, 16 * RS));
}

#[test]
fn file_extent_comes_from_the_primary_unless_a_restore_is_pending() {
    let mut r = rig(16 * RS);
    let file = Arc::new(tempfile::tempfile().unwrap());
    r.vol = MirroredVolume::new(
        "lun0",
        Arc::new(FileLike {
            mem: r.primary.clone(),
            all_holes: false,
            extent_file: Some(file),
        }),
    );
    let some = |off: u64, len: u64| r.vol.file_extent(off, len).unwrap().is_some();
    // Without associations, and with a synchronized one: the primary's.
    assert!(some(0, 16 * RS));
    let e = r.vol.file_extent(RS, 2 * RS).unwrap().unwrap();
    assert_eq!((e.offset, e.len), (RS, 2 * RS));
    assert!(r.vol.file_extent(15 * RS, 2 * RS).is_err(), "range checked");
    assert!(r.vol.file_extent(RS, 0).unwrap().is_none());
    let a = attach(&r, CopyType::Sync, policy());
    run_copy(&a);
    assert!(some(0, 16 * RS));
    // A restore that still has to bring regions 2, 3 and 9 back from the
    // replica: reads there are not the primary's bytes as they are.
    let q = r.vol.quiesce(Duration::from_secs(1)).unwrap();
    a.fracture().unwrap();
    drop(q);
    for off in [2 * RS, 3 * RS, 9 * RS] {
        w(&r.vol, b"changed", off);
    }
    assert!(some(0, 16 * RS), "fractured: reads are the primary's");
    let q = r.vol.quiesce(Duration::from_secs(1)).unwrap();
    assert!(a.begin_restore().unwrap());
    drop(q);
    assert!(!some(0, 16 * RS));
    assert!(!some(2 * RS + 100, 10));
    assert!(!some(8 * RS, 2 * RS));
    assert!(some(0, 2 * RS));
    assert!(some(4 * RS, 5 * RS));
    assert!(some(10 * RS, 6 * RS));
    run_copy(&a);
    assert!(some(0, 16 * RS), "restored: the primary's again");
}
