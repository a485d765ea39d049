//! One replication association (CIM_StorageSynchronized): a source volume,
//! a replica device, a copy type, a `SyncState`, the out-of-sync bitmap,
//! an optional background copy task and, for Async, the journal and its
//! shipper thread.
//!
//! The association decides, for every host write on its source, what has
//! to happen on the replica side (`Plan`): mirror it (Sync, on the host's thread),
//! journal it (Async), only remember the region as out of sync (Broken,
//! Fractured, Idle, point-in-time copies), or nothing. Before that it
//! performs *copy-before-write* for regions a copy task has not reached:
//! a point-in-time copy saves the old contents to the replica first, a Sync
//! initial copy brings the region over so the write can be mirrored, a
//! restore brings the replica's region back first.
//!
//! Crash safety ("activity log"): before a write is issued, the regions it
//! touches are durably marked in the association's bitmap file; the marks
//! are cleared lazily by [`Association::housekeep_begin`]/`_finish` once
//! both sides were flushed. After a crash every marked region is treated as
//! out of sync and resynchronised.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam::channel::{bounded, Receiver, Sender};

use super::bitmap::{Bitmap, BitmapFile, BitmapGeometry};
use super::journal::{Journal, JournalConfig, JournalError, Lag, RecordKind};
use super::rangelock::RangeLock;
use crate::block::{BlockError, BlockResult, SharedDev, WriteFlags};

/// CIM CopyType of an association.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum CopyType {
    /// 2: asynchronous copy through the journal.
    Async,
    /// 3: synchronous mirror.
    Sync,
    /// 4: point-in-time copy, association kept.
    UnSyncAssoc,
    /// 5: point-in-time copy, association removed once copied.
    UnSyncUnAssoc,
}

impl CopyType {
    pub fn cim(self) -> u16 {
        match self {
            CopyType::Async => 2,
            CopyType::Sync => 3,
            CopyType::UnSyncAssoc => 4,
            CopyType::UnSyncUnAssoc => 5,
        }
    }

    pub fn from_cim(v: u16) -> Option<Self> {
        Some(match v {
            2 => CopyType::Async,
            3 => CopyType::Sync,
            4 => CopyType::UnSyncAssoc,
            5 => CopyType::UnSyncUnAssoc,
            _ => return None,
        })
    }

    /// CIM `SyncMaintained`: the replica keeps following the source.
    pub fn sync_maintained(self) -> bool {
        matches!(self, CopyType::Async | CopyType::Sync)
    }
}

/// CIM SyncState (the subset lunmirror uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum SyncState {
    Initialized,
    ResyncInProgress,
    Synchronized,
    RestoreInProgress,
    Idle,
    Broken,
    Fractured,
    CopyInProgress,
}

impl SyncState {
    pub fn cim(self) -> u16 {
        match self {
            SyncState::Initialized => 2,
            SyncState::ResyncInProgress => 5,
            SyncState::Synchronized => 6,
            SyncState::RestoreInProgress => 10,
            SyncState::Idle => 11,
            SyncState::Broken => 12,
            SyncState::Fractured => 13,
            SyncState::CopyInProgress => 15,
        }
    }

    /// The replica follows host writes (mirror or journal) in this state.
    fn follows(self) -> bool {
        matches!(
            self,
            SyncState::Initialized
                | SyncState::ResyncInProgress
                | SyncState::Synchronized
                | SyncState::RestoreInProgress
                | SyncState::CopyInProgress
        )
    }
}

/// What a background copy task does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CopyKind {
    /// First full copy of a Sync/Async association.
    InitialCopy,
    /// Copy of the out-of-sync regions of a Sync/Async association.
    Resync,
    /// Point-in-time copy (UnSync*): copy-on-write of uncopied regions.
    PointInTime,
    /// Replica → primary for the out-of-sync regions.
    Restore,
}

impl CopyKind {
    fn to_primary(self) -> bool {
        self == CopyKind::Restore
    }
}

/// Settings shared by all associations of a registry.
#[derive(Debug, Clone, Copy)]
pub struct MirrorPolicy {
    /// Bitmap granularity, a power of two.
    pub region_size: u64,
    /// Fail host writes while a Sync/Async association is Broken (and the
    /// write that hit the replica error), instead of tracking them.
    pub fail_host_io_on_replica_error: bool,
    pub journal: JournalConfig,
    /// Threads per Sync association issuing replica flushes (mirrored
    /// writes run on the host's thread).
    pub replica_threads: usize,
    /// The shipper flushes the replica and checkpoints the journal after
    /// this many applied bytes …
    pub checkpoint_bytes: u64,
    /// … or this much time.
    pub checkpoint_interval: Duration,
}

impl Default for MirrorPolicy {
    fn default() -> Self {
        MirrorPolicy {
            region_size: 1 << 20,
            fail_host_io_on_replica_error: false,
            journal: JournalConfig::default(),
            replica_threads: 4,
            // Each checkpoint flushes the replica: its writeback of
            // everything applied since the last one. Rare checkpoints let
            // a page written many times go to disk once and keep the
            // shipper applying instead of waiting for the disk; after 30 s
            // the kernel's flusher (dirty_expire_centisecs) has written
            // most of it back already, as it does for an unmirrored LUN.
            // The price is a longer (idempotent) replay after a crash and
            // up to this many applied bytes kept on disk in the journal
            // besides the unapplied ones (`JournalConfig::cap`, also 1 GiB).
            // Measured: with 512 MiB a 5 s 4 KiB random-write run spent 29 %
            // of the shipper's CPU in the checkpoint's `fdatasync`.
            checkpoint_bytes: 1 << 30,
            checkpoint_interval: Duration::from_secs(30),
        }
    }
}

#[derive(Debug)]
struct CopyTask {
    kind: CopyKind,
    pending: Bitmap,
    total: u64,
    cursor: u64,
    /// Async: the copy waits until the shipper applied this record, so no
    /// journal record older than the copy overwrites copied data last.
    barrier_seq: u64,
}

#[derive(Debug)]
struct Inner {
    copy_type: CopyType,
    state: SyncState,
    oos: Bitmap,
    al: Bitmap,
    touched: Bitmap,
    /// Bits known to be set in the bitmap file (fast path of the activity
    /// log); always a subset of what the file holds.
    persisted: Bitmap,
    copy: Option<CopyTask>,
    journal: Option<Arc<Journal>>,
    error: Option<String>,
    when_synced: Option<SystemTime>,
}

/// Replica I/O issued by the per-association worker threads: only flushes
/// (a host flush runs the replica's `fdatasync` in parallel with the
/// primary's). Mirrored writes run on the host's thread (`MirroredVolume`).
#[derive(Debug)]
enum ReplicaOp {
    Flush,
}

type ReplicaReply = Receiver<BlockResult<()>>;

struct ReplicaIo {
    tx: Option<Sender<(ReplicaOp, Sender<BlockResult<()>>)>>,
    threads: Vec<JoinHandle<()>>,
}

impl ReplicaIo {
    fn start(replica: SharedDev, n: usize) -> Self {
        let (tx, rx) = bounded::<(ReplicaOp, Sender<BlockResult<()>>)>(256);
        let threads = (0..n.max(1))
            .filter_map(|i| {
                let rx = rx.clone();
                let dev = replica.clone();
                std::thread::Builder::new()
                    .name(format!("replica-io-{i}"))
                    .spawn(move || {
                        for (op, reply) in rx {
                            let r = match op {
                                ReplicaOp::Flush => dev.flush(),
                            };
                            let _ = reply.send(r);
                        }
                    })
                    .ok()
            })
            .collect();
        ReplicaIo {
            tx: Some(tx),
            threads,
        }
    }

    fn submit(&self, op: ReplicaOp) -> ReplicaReply {
        let (rtx, rrx) = bounded(1);
        match &self.tx {
            Some(tx) if !self.threads.is_empty() => {
                if let Err(e) = tx.send((op, rtx)) {
                    let (_, rtx) = e.into_inner();
                    let _ = rtx.send(Err(BlockError::Io(std::io::Error::other(
                        "replica I/O threads stopped",
                    ))));
                }
            }
            _ => {
                let _ = rtx.send(Err(BlockError::Io(std::io::Error::other(
                    "no replica I/O threads",
                ))));
            }
        }
        rrx
    }
}

impl Drop for ReplicaIo {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What a host write must do for one association (after copy-before-write).
#[derive(Debug)]
pub(crate) enum Plan {
    /// Issue the same operation on the replica (the caller does, after the
    /// primary operation).
    Mirror,
    /// Append a journal record before the primary write.
    Journal(Arc<Journal>),
    /// Nothing on the replica (the region was marked out of sync if the
    /// association tracks changes).
    Skip,
    /// Refuse the host write (fail-host-I/O policy while Broken).
    Fail(String),
}

/// Result of one background copy step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyStep {
    /// One more region copied (or found already copied).
    Progress { done: u64, total: u64 },
    /// An Async copy waits for the shipper to pass its barrier.
    Waiting,
    /// Nothing pending: call [`Association::finish_copy`].
    Done,
}

/// A copy stopped because the association failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CopyError(pub String);

/// How a copy task ended, for the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyEnd {
    /// The association stays (Synchronized, Idle…).
    Kept,
    /// UnSyncUnAssoc: the registry removes the association now.
    Remove,
}

/// Read-only status for EnumerateSynchronized.
#[derive(Debug, Clone)]
pub struct AssocStatus {
    pub id: u64,
    pub copy_type: CopyType,
    pub state: SyncState,
    pub copy_kind: Option<CopyKind>,
    pub percent_synced: u16,
    pub out_of_sync_bytes: u64,
    pub lag: Option<Lag>,
    pub when_synced: Option<SystemTime>,
    pub error: Option<String>,
}

/// What [`Association::reopen`] decided after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeAction {
    /// Nothing to do.
    None,
    /// Start (or continue) a background copy of this kind.
    Copy(CopyKind),
    /// The interrupted operation cannot continue; the association stays
    /// in its new state and the job fails with this description.
    Interrupted(String),
    /// UnSyncUnAssoc interrupted: remove the association.
    Remove(String),
}

/// How long `stop` waits for a shipper stuck in replica I/O.
const SHIPPER_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The shipper thread's handle, and whether it is (still) committed to
/// running. The thread clears `alive` under this lock when it decides to
/// exit, so a concurrent restart either keeps it or spawns a new one.
#[derive(Default)]
struct ShipperSlot {
    handle: Option<JoinHandle<()>>,
    alive: bool,
}

/// Called (with the association id) after asynchronous state changes, so
/// the registry can persist them.
pub type Notify = Arc<dyn Fn(u64) + Send + Sync>;

/// See the module documentation.
pub struct Association {
    id: u64,
    dir: PathBuf,
    size: u64,
    region_size: u64,
    nregions: u64,
    primary: SharedDev,
    replica: SharedDev,
    locks: Arc<RangeLock>,
    policy: MirrorPolicy,
    inner: Mutex<Inner>,
    bitmap: Mutex<BitmapFile>,
    io: ReplicaIo,
    shipper: Mutex<ShipperSlot>,
    stopping: AtomicBool,
    notify: Notify,
}

impl std::fmt::Debug for Association {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Association")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .finish()
    }
}

/// Everything needed to build an association.
pub struct AssocSetup {
    pub id: u64,
    pub dir: PathBuf,
    pub copy_type: CopyType,
    pub primary: SharedDev,
    pub replica: SharedDev,
    pub locks: Arc<RangeLock>,
    pub policy: MirrorPolicy,
    pub notify: Notify,
}

fn journal_dir(dir: &Path) -> PathBuf {
    dir.join("journal")
}

impl Association {
    fn build(
        s: AssocSetup,
        state: SyncState,
        bitmap: BitmapFile,
        oos: Bitmap,
        persisted: Bitmap,
        copy: Option<CopyTask>,
        journal: Option<Arc<Journal>>,
    ) -> Arc<Self> {
        let size = s.primary.size();
        let region_size = s.policy.region_size;
        let nregions = size.div_ceil(region_size);
        let io = ReplicaIo::start(
            s.replica.clone(),
            if s.copy_type == CopyType::Sync || s.copy_type == CopyType::Async {
                s.policy.replica_threads
            } else {
                1
            },
        );
        Arc::new(Association {
            id: s.id,
            dir: s.dir,
            size,
            region_size,
            nregions,
            primary: s.primary,
            replica: s.replica,
            locks: s.locks,
            policy: s.policy,
            inner: Mutex::new(Inner {
                copy_type: s.copy_type,
                state,
                oos,
                al: Bitmap::new(nregions),
                touched: Bitmap::new(nregions),
                persisted,
                copy,
                journal,
                error: None,
                when_synced: None,
            }),
            bitmap: Mutex::new(bitmap),
            io,
            shipper: Mutex::new(ShipperSlot::default()),
            stopping: AtomicBool::new(false),
            notify: s.notify,
        })
    }

    /// A new association whose initial copy (or point-in-time copy) starts
    /// right away. Creates its state directory. The caller installs it on
    /// the volume while the volume is quiesced (that instant is the point
    /// in time of an UnSync copy) and then drives [`Self::copy_step`].
    pub fn create(s: AssocSetup) -> std::io::Result<Arc<Self>> {
        std::fs::create_dir_all(&s.dir)?;
        if let Some(parent) = s.dir.parent() {
            crate::registry::fsync_dir(parent)?;
        }
        let size = s.primary.size();
        let geometry = BitmapGeometry::for_size(size, s.policy.region_size);
        let all = Bitmap::full(geometry.regions);
        let tracked = s.copy_type != CopyType::UnSyncUnAssoc;
        // The file starts all-set: until the first copy completes, a crash
        // means "copy everything".
        let bitmap = BitmapFile::create(&s.dir.join("bitmap"), geometry, &all)?;
        let journal = if s.copy_type == CopyType::Async {
            let (j, _) = Journal::open(&journal_dir(&s.dir), s.policy.journal)
                .map_err(std::io::Error::other)?;
            Some(Arc::new(j))
        } else {
            None
        };
        let kind = if s.copy_type.sync_maintained() {
            CopyKind::InitialCopy
        } else {
            CopyKind::PointInTime
        };
        let copy = (geometry.regions > 0).then(|| CopyTask {
            kind,
            pending: all.clone(),
            total: geometry.regions,
            cursor: 0,
            barrier_seq: 0,
        });
        let state = if copy.is_some() {
            SyncState::CopyInProgress
        } else if s.copy_type.sync_maintained() {
            SyncState::Synchronized
        } else {
            SyncState::Idle
        };
        let persisted = if tracked {
            all
        } else {
            Bitmap::new(geometry.regions)
        };
        let a = Self::build(
            s,
            state,
            bitmap,
            Bitmap::new(geometry.regions),
            persisted,
            copy,
            journal,
        );
        if state == SyncState::Synchronized {
            a.locked().when_synced = Some(SystemTime::now());
        }
        a.start_shipper();
        Ok(a)
    }

    /// Rebuild an association after a restart from its persisted state and
    /// bitmap file; replays the journal of an Async association. See
    /// docs/replication.md ("Crash behaviour") for the rules.
    pub fn reopen(
        s: AssocSetup,
        saved_state: SyncState,
        saved_copy: Option<CopyKind>,
        saved_error: Option<String>,
        when_synced: Option<SystemTime>,
    ) -> std::io::Result<(Arc<Self>, ResumeAction)> {
        let size = s.primary.size();
        let geometry = BitmapGeometry::for_size(size, s.policy.region_size);
        let path = s.dir.join("bitmap");
        let (file, mut bits) = match BitmapFile::open(&path, geometry) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let all = Bitmap::full(geometry.regions);
                (BitmapFile::create(&path, geometry, &all)?, all)
            }
            Err(e) => return Err(e),
        };
        let persisted = bits.clone();
        let mut journal = None;
        if s.copy_type == CopyType::Async {
            let (j, report) = Journal::open(&journal_dir(&s.dir), s.policy.journal)
                .map_err(std::io::Error::other)?;
            if let Some(why) = &report.stopped_at {
                tracing::warn!(assoc = s.id, %why, "journal replay stopped at a damaged record");
            }
            if report.gap {
                tracing::warn!(assoc = s.id, "journal has a gap; full resync");
                bits.set_all();
            }
            journal = Some(Arc::new(j));
        }
        let ct = s.copy_type;
        let n = geometry.regions;
        let (state, oos, copy, action, error) = match (ct, saved_state, saved_copy) {
            (CopyType::UnSyncUnAssoc, _, _) => {
                let why = "point-in-time copy interrupted by a restart".to_string();
                (
                    SyncState::Broken,
                    bits,
                    None,
                    ResumeAction::Remove(why.clone()),
                    Some(why),
                )
            }
            (CopyType::UnSyncAssoc, _, Some(CopyKind::PointInTime)) => {
                let why = "point-in-time copy interrupted by a restart; Resync makes a new copy"
                    .to_string();
                (
                    SyncState::Broken,
                    Bitmap::full(n),
                    None,
                    ResumeAction::Interrupted(why.clone()),
                    Some(why),
                )
            }
            (_, _, Some(CopyKind::Restore)) => {
                let why = "restore interrupted by a restart; issue Restore again".to_string();
                (
                    SyncState::Fractured,
                    bits,
                    None,
                    ResumeAction::Interrupted(why.clone()),
                    Some(why),
                )
            }
            (CopyType::Sync | CopyType::Async, st, kind) if st.follows() => {
                if bits.is_empty() {
                    (
                        SyncState::Synchronized,
                        bits,
                        None,
                        ResumeAction::None,
                        None,
                    )
                } else {
                    let kind = if kind == Some(CopyKind::InitialCopy) {
                        CopyKind::InitialCopy
                    } else {
                        CopyKind::Resync
                    };
                    let state = if kind == CopyKind::InitialCopy {
                        SyncState::CopyInProgress
                    } else {
                        SyncState::ResyncInProgress
                    };
                    let total = bits.count();
                    let barrier = journal.as_ref().map(|j| j.last_seq()).unwrap_or(0);
                    let task = CopyTask {
                        kind,
                        pending: bits,
                        total,
                        cursor: 0,
                        barrier_seq: barrier,
                    };
                    (
                        state,
                        Bitmap::new(n),
                        Some(task),
                        ResumeAction::Copy(kind),
                        None,
                    )
                }
            }
            (_, st, _) => (st, bits, None, ResumeAction::None, saved_error),
        };
        let a = Self::build(s, state, file, oos, persisted, copy, journal);
        {
            let mut g = a.locked();
            g.error = error;
            g.when_synced = when_synced;
            if state == SyncState::Broken && g.copy_type == CopyType::Async {
                // A Broken Async association keeps no journal.
                if let Some(j) = &g.journal {
                    j.set_shipping(false);
                }
            }
        }
        if state != SyncState::Broken {
            a.start_shipper();
        } else if let Some(j) = a.journal() {
            let extents = j.drain().map_err(std::io::Error::other)?;
            a.mark_extents(&extents);
        }
        Ok((a, action))
    }

    fn locked(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    pub fn replica(&self) -> &SharedDev {
        &self.replica
    }

    pub fn copy_type(&self) -> CopyType {
        self.locked().copy_type
    }

    pub fn state(&self) -> SyncState {
        self.locked().state
    }

    pub fn copy_kind(&self) -> Option<CopyKind> {
        self.locked().copy.as_ref().map(|c| c.kind)
    }

    pub fn error(&self) -> Option<String> {
        self.locked().error.clone()
    }

    pub fn when_synced(&self) -> Option<SystemTime> {
        self.locked().when_synced
    }

    pub(crate) fn journal(&self) -> Option<Arc<Journal>> {
        self.locked().journal.clone()
    }

    /// Current replication lag (Async only).
    pub fn lag(&self) -> Option<Lag> {
        self.journal().map(|j| j.lag())
    }

    pub fn status(&self) -> AssocStatus {
        let g = self.locked();
        let percent = match &g.copy {
            Some(c) if c.total > 0 => ((c.total - c.pending.count()) * 100 / c.total) as u16,
            _ if self.nregions > 0 && !g.oos.is_empty() => {
                ((self.nregions - g.oos.count()) * 100 / self.nregions) as u16
            }
            _ => 100,
        };
        let mut unsynced = g.oos.clone();
        if let Some(c) = &g.copy {
            unsynced.union_with(&c.pending);
        }
        AssocStatus {
            id: self.id,
            copy_type: g.copy_type,
            state: g.state,
            copy_kind: g.copy.as_ref().map(|c| c.kind),
            percent_synced: percent,
            out_of_sync_bytes: (unsynced.count() * self.region_size).min(self.size),
            lag: g.journal.as_ref().map(|j| j.lag()),
            when_synced: g.when_synced,
            error: g.error.clone(),
        }
    }

    fn regions(&self, offset: u64, len: u64) -> (u64, u64) {
        let first = offset / self.region_size;
        let last = (offset + len.max(1) - 1) / self.region_size;
        (first, last)
    }

    fn region_range(&self, r: u64) -> (u64, u64) {
        let start = r * self.region_size;
        (start, (start + self.region_size).min(self.size))
    }

    /// Whether the association keeps a crash-safe record of writes.
    fn tracks(g: &Inner) -> bool {
        g.copy_type != CopyType::UnSyncUnAssoc
            && !g
                .copy
                .as_ref()
                .is_some_and(|c| c.kind == CopyKind::PointInTime)
    }

    fn cbw_applies(g: &Inner, is_write: bool) -> bool {
        match &g.copy {
            None => false,
            Some(c) => match c.kind {
                CopyKind::Restore => true,
                CopyKind::PointInTime => is_write,
                CopyKind::InitialCopy | CopyKind::Resync => {
                    is_write && g.copy_type == CopyType::Sync
                }
            },
        }
    }

    /// Whether a host I/O on `offset..+len` must hold whole regions
    /// (because it will copy a region before it proceeds).
    pub(crate) fn needs_region_lock(&self, offset: u64, len: u64, is_write: bool) -> bool {
        let (first, last) = self.regions(offset, len);
        let g = self.locked();
        Self::cbw_applies(&g, is_write)
            && g.copy
                .as_ref()
                .is_some_and(|c| c.pending.any_in(first, last))
    }

    /// During a restore: the part of `offset..+len` that starts with the
    /// first region still to be brought back from the replica, as
    /// `(start relative to offset, length of the run of such regions)`,
    /// clipped to the range. Those bytes read as the replica's, whatever the
    /// primary's allocation says.
    pub(crate) fn restore_pending_run(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 {
            return None;
        }
        let (first, last) = self.regions(offset, len);
        let g = self.locked();
        let c = g.copy.as_ref().filter(|c| c.kind == CopyKind::Restore)?;
        let r = c.pending.next_set(first).filter(|&r| r <= last)?;
        let mut e = r;
        while e < last && c.pending.get(e + 1) {
            e += 1;
        }
        let start = self.region_range(r).0.max(offset);
        let end = self.region_range(e).1.min(offset + len);
        Some((start - offset, end - start))
    }

    /// Durably mark `first..=last` in the bitmap file before a write.
    fn ensure_logged(&self, first: u64, last: u64) {
        {
            let mut g = self.locked();
            g.touched.set_range(first, last);
            if !Self::tracks(&g) {
                return;
            }
            if (first..=last.min(self.nregions.saturating_sub(1))).all(|r| g.persisted.get(r)) {
                g.al.set_range(first, last);
                return;
            }
        }
        let mut file = self.bitmap.lock().unwrap_or_else(|e| e.into_inner());
        let desired = {
            let mut g = self.locked();
            g.al.set_range(first, last);
            let mut d = g.oos.clone();
            d.union_with(&g.al);
            d.union_with(&g.persisted);
            if let Some(c) = &g.copy {
                d.union_with(&c.pending);
            }
            d
        };
        match file.persist(&desired) {
            Ok(_) => self.locked().persisted = desired,
            Err(e) => {
                tracing::error!(assoc = self.id, error = %e, "cannot persist the activity log; crash recovery of this association is degraded");
                self.locked().error = Some(format!("activity log: {e}"));
            }
        }
    }

    /// Copy region `r` in the direction of the current copy task (caller
    /// holds the region in the range lock). Errors on the source side are
    /// returned as `Err(Ok(e))`, replica-side errors as `Err(Err(e))`.
    fn copy_region(&self, r: u64, to_primary: bool) -> Result<(), Result<BlockError, BlockError>> {
        let (start, end) = self.region_range(r);
        let mut buf = vec![0u8; (end - start) as usize];
        if to_primary {
            self.replica.read_at(&mut buf, start).map_err(Err)?;
            self.primary
                .write_at(&buf, start, WriteFlags::default())
                .map_err(Ok)?;
        } else {
            self.primary.read_at(&mut buf, start).map_err(Ok)?;
            self.replica
                .write_at(&buf, start, WriteFlags::default())
                .map_err(Err)?;
        }
        if let Some(c) = self.locked().copy.as_mut() {
            c.pending.clear(r);
        }
        Ok(())
    }

    /// Decide (and prepare) what a host I/O on `offset..+len` needs on the
    /// replica side. The caller holds the range (whole regions when
    /// [`Self::needs_region_lock`] said so).
    pub(crate) fn prepare(&self, offset: u64, len: u64, is_write: bool) -> BlockResult<Plan> {
        let (first, last) = self.regions(offset, len);
        if is_write {
            self.ensure_logged(first, last);
        }
        // Copy-before-write (or before-read, for a restore).
        loop {
            let next = {
                let g = self.locked();
                if !Self::cbw_applies(&g, is_write) {
                    None
                } else {
                    g.copy.as_ref().and_then(|c| {
                        c.pending
                            .next_set(first)
                            .filter(|&r| r <= last)
                            .map(|r| (r, c.kind.to_primary()))
                    })
                }
            };
            let Some((r, to_primary)) = next else { break };
            match self.copy_region(r, to_primary) {
                Ok(()) => {}
                Err(Ok(source_err)) => return Err(source_err),
                Err(Err(replica_err)) => {
                    self.fail(format!("replica I/O error during copy: {replica_err}"));
                }
            }
        }
        if !is_write {
            return Ok(Plan::Skip);
        }
        let mut g = self.locked();
        let fail_policy =
            self.policy.fail_host_io_on_replica_error && g.copy_type.sync_maintained();
        let plan = match (g.copy_type, g.state) {
            (CopyType::UnSyncUnAssoc, _) => Plan::Skip,
            (_, SyncState::Broken) if fail_policy => Plan::Fail(
                g.error
                    .clone()
                    .unwrap_or_else(|| "replica broken".to_string()),
            ),
            (CopyType::Sync, st) if st.follows() => Plan::Mirror,
            (CopyType::Async, st) if st.follows() && g.journal.is_some() => {
                match g.journal.clone() {
                    Some(j) => Plan::Journal(j),
                    None => Plan::Skip,
                }
            }
            _ => {
                g.oos.set_range(first, last);
                Plan::Skip
            }
        };
        Ok(plan)
    }

    /// A mirrored write failed on the replica: Broken, region tracked.
    /// Returns whether the host write must fail too (policy).
    pub(crate) fn mirror_failed(&self, offset: u64, len: u64, e: &BlockError) -> bool {
        self.mark_extents(&[(offset, len)]);
        self.fail(format!("replica I/O error: {e}"));
        self.policy.fail_host_io_on_replica_error
    }

    /// The primary failed a write that may have reached the replica: the
    /// two may differ there.
    pub(crate) fn primary_failed(&self, offset: u64, len: u64) {
        self.mark_extents(&[(offset, len)]);
    }

    /// A journal append or sync failed (full, or I/O on the state dir).
    /// Returns whether the host write must fail too (policy).
    pub(crate) fn journal_failed(&self, offset: u64, len: u64, e: &JournalError) -> bool {
        self.mark_extents(&[(offset, len)]);
        let why = match e {
            JournalError::Full => "journal full (throttle timeout exceeded)".to_string(),
            other => format!("journal error: {other}"),
        };
        self.fail(why);
        self.policy.fail_host_io_on_replica_error
    }

    fn mark_extents(&self, extents: &[(u64, u64)]) {
        let mut g = self.locked();
        for &(off, len) in extents {
            if len == 0 || off >= self.size {
                continue;
            }
            let (first, last) = self.regions(off, len.min(self.size - off));
            g.oos.set_range(first, last);
        }
    }

    /// Go Broken: stop the copy (its pending regions stay out of sync), drop
    /// the journal into the bitmap, remember why.
    pub fn fail(&self, why: String) {
        let journal = {
            let mut g = self.locked();
            if g.state == SyncState::Broken && g.copy.is_none() {
                if g.error.is_none() {
                    g.error = Some(why);
                }
                None
            } else {
                tracing::warn!(assoc = self.id, reason = %why, "association broken");
                if let Some(c) = g.copy.take() {
                    if c.kind == CopyKind::PointInTime {
                        // An incomplete point-in-time copy is no copy at all.
                        g.oos.set_all();
                    } else {
                        g.oos.union_with(&c.pending);
                    }
                }
                g.state = SyncState::Broken;
                g.error = Some(why);
                g.journal.clone()
            }
        };
        if let Some(j) = journal {
            j.set_shipping(false);
            match j.drain() {
                Ok(extents) => self.mark_extents(&extents),
                Err(e) => {
                    tracing::error!(assoc = self.id, error = %e, "cannot drain journal; marking everything out of sync");
                    self.locked().oos.set_all();
                }
            }
        }
        (self.notify)(self.id);
    }

    /// Flush plan for a host flush: which replicas flush in parallel and
    /// which journals get a flush record.
    pub(crate) fn flush_submit(&self) -> Option<Result<ReplicaReply, Arc<Journal>>> {
        let g = self.locked();
        if !g.state.follows() {
            return None;
        }
        match g.copy_type {
            CopyType::Sync => Some(Ok(self.io.submit(ReplicaOp::Flush))),
            CopyType::Async => g.journal.clone().map(Err),
            _ => None,
        }
    }

    /// A replica flush failed: anything written since the last successful
    /// flush may be lost on the replica — that is the activity log.
    pub(crate) fn flush_failed(&self, e: &str) -> bool {
        {
            let mut g = self.locked();
            let al = g.al.clone();
            g.oos.union_with(&al);
        }
        self.fail(format!("replica flush failed: {e}"));
        self.policy.fail_host_io_on_replica_error
    }

    // ---- background copy ------------------------------------------------

    /// Copy the next pending region (the registry's job thread calls this
    /// in a loop, checking job control between calls).
    pub fn copy_step(&self) -> Result<CopyStep, CopyError> {
        let (r, to_primary) = {
            let mut g = self.locked();
            let applied = g.journal.as_ref().map(|j| j.applied_seq());
            let state = g.state;
            let err = g.error.clone();
            let Some(c) = g.copy.as_mut() else {
                return Err(CopyError(
                    err.unwrap_or_else(|| format!("copy stopped ({state:?})")),
                ));
            };
            if !c.kind.to_primary() && applied.is_some_and(|a| a < c.barrier_seq) {
                return Ok(CopyStep::Waiting);
            }
            let next = c
                .pending
                .next_set(c.cursor)
                .or_else(|| c.pending.next_set(0));
            match next {
                None => return Ok(CopyStep::Done),
                Some(r) => {
                    c.cursor = r;
                    (r, c.kind.to_primary())
                }
            }
        };
        let (start, end) = self.region_range(r);
        let guard = self.locks.lock(start, end);
        let still = self
            .locked()
            .copy
            .as_ref()
            .is_some_and(|c| c.pending.get(r));
        if still {
            match self.copy_region(r, to_primary) {
                Ok(()) => {}
                Err(Ok(e)) => {
                    drop(guard);
                    let why = format!("source I/O error during copy: {e}");
                    self.fail(why.clone());
                    return Err(CopyError(why));
                }
                Err(Err(e)) => {
                    drop(guard);
                    let why = format!("replica I/O error during copy: {e}");
                    self.fail(why.clone());
                    return Err(CopyError(why));
                }
            }
        }
        drop(guard);
        let g = self.locked();
        match &g.copy {
            Some(c) => Ok(CopyStep::Progress {
                done: c.total - c.pending.count(),
                total: c.total,
            }),
            None => Err(CopyError(
                g.error.clone().unwrap_or_else(|| "copy stopped".into()),
            )),
        }
    }

    /// Complete a copy whose `copy_step` returned `Done`: flush the
    /// destination, then switch to the final state.
    pub fn finish_copy(&self) -> Result<CopyEnd, CopyError> {
        let to_primary = self
            .locked()
            .copy
            .as_ref()
            .is_some_and(|c| c.kind.to_primary());
        let flushed = if to_primary {
            self.primary.flush()
        } else {
            self.replica
                .flush()
                .inspect(|()| self.replica.release_cache())
        };
        if let Err(e) = flushed {
            let why = format!("flush after copy failed: {e}");
            if to_primary {
                // The primary is the host's disk: keep the association.
                let mut g = self.locked();
                if let Some(c) = g.copy.take() {
                    g.oos.union_with(&c.pending);
                }
                g.state = SyncState::Fractured;
                g.error = Some(why.clone());
            } else {
                self.fail(why.clone());
            }
            return Err(CopyError(why));
        }
        let mut g = self.locked();
        let Some(c) = g.copy.take() else {
            return Err(CopyError(
                g.error.clone().unwrap_or_else(|| "copy stopped".into()),
            ));
        };
        if !c.pending.is_empty() {
            // A region reappeared (cannot happen: pending only grows under
            // quiesce); keep copying.
            g.copy = Some(c);
            return Ok(CopyEnd::Kept);
        }
        let end = match g.copy_type {
            CopyType::Sync | CopyType::Async => {
                g.state = SyncState::Synchronized;
                g.when_synced = Some(SystemTime::now());
                CopyEnd::Kept
            }
            CopyType::UnSyncAssoc => {
                g.state = SyncState::Idle;
                g.when_synced = Some(SystemTime::now());
                CopyEnd::Kept
            }
            CopyType::UnSyncUnAssoc => {
                g.state = SyncState::Idle;
                g.when_synced = Some(SystemTime::now());
                CopyEnd::Remove
            }
        };
        g.error = None;
        drop(g);
        (self.notify)(self.id);
        Ok(end)
    }

    /// Stop a copy on request (job terminated). Sync/Async become Broken
    /// (the replica is incomplete), a restore becomes Fractured, an
    /// UnSyncAssoc point-in-time copy becomes Broken with everything out of
    /// sync. Returns `Remove` for UnSyncUnAssoc.
    pub fn abort_copy(&self, why: &str) -> CopyEnd {
        let mut g = self.locked();
        let Some(c) = g.copy.take() else {
            return CopyEnd::Kept;
        };
        let end = match (g.copy_type, c.kind) {
            (CopyType::UnSyncUnAssoc, _) => CopyEnd::Remove,
            (_, CopyKind::Restore) => {
                g.oos.union_with(&c.pending);
                g.state = SyncState::Fractured;
                CopyEnd::Kept
            }
            (_, CopyKind::PointInTime) => {
                g.oos.set_all();
                g.state = SyncState::Broken;
                CopyEnd::Kept
            }
            _ => {
                g.oos.union_with(&c.pending);
                g.state = SyncState::Broken;
                CopyEnd::Kept
            }
        };
        g.error = Some(why.to_string());
        let journal = (g.state == SyncState::Broken)
            .then(|| g.journal.clone())
            .flatten();
        drop(g);
        if let Some(j) = journal {
            j.set_shipping(false);
            if let Ok(extents) = j.drain() {
                self.mark_extents(&extents);
            }
        }
        (self.notify)(self.id);
        end
    }

    // ---- operations (the caller holds the volume quiesced) -----------------

    /// Fracture a Sync/Async association: later writes are only tracked.
    /// An Async journal keeps draining, so the replica settles at the
    /// image of the fracture moment.
    pub fn fracture(&self) -> Result<(), String> {
        let mut g = self.locked();
        if !g.copy_type.sync_maintained() || g.state != SyncState::Synchronized {
            return Err(format!(
                "Fracture needs a Sync/Async association in Synchronized, not {:?}/{:?}",
                g.copy_type, g.state
            ));
        }
        g.state = SyncState::Fractured;
        drop(g);
        (self.notify)(self.id);
        Ok(())
    }

    /// Start a resync (Sync/Async: copy out-of-sync regions; UnSyncAssoc: a
    /// new point-in-time copy of the changed regions). Returns `Ok(false)`
    /// when there is nothing to copy (the state is updated at once).
    pub fn begin_resync(self: &Arc<Self>) -> Result<bool, String> {
        let mut g = self.locked();
        let ok_state = match g.copy_type {
            CopyType::Sync | CopyType::Async => {
                matches!(g.state, SyncState::Fractured | SyncState::Broken)
            }
            CopyType::UnSyncAssoc => matches!(
                g.state,
                SyncState::Idle | SyncState::Fractured | SyncState::Broken
            ),
            CopyType::UnSyncUnAssoc => false,
        };
        if !ok_state || g.copy.is_some() {
            return Err(format!(
                "Resync is not possible for {:?} in {:?}",
                g.copy_type, g.state
            ));
        }
        let pending = std::mem::replace(&mut g.oos, Bitmap::new(self.nregions));
        let (kind, state) = if g.copy_type == CopyType::UnSyncAssoc {
            (CopyKind::PointInTime, SyncState::ResyncInProgress)
        } else {
            (CopyKind::Resync, SyncState::ResyncInProgress)
        };
        g.error = None;
        let start_shipper = g.copy_type == CopyType::Async;
        let barrier = g.journal.as_ref().map(|j| j.last_seq()).unwrap_or(0);
        let empty = pending.is_empty();
        if empty {
            g.state = if g.copy_type == CopyType::UnSyncAssoc {
                SyncState::Idle
            } else {
                SyncState::Synchronized
            };
            g.when_synced = Some(SystemTime::now());
        } else {
            g.state = state;
            g.copy = Some(CopyTask {
                kind,
                total: pending.count(),
                pending,
                cursor: 0,
                barrier_seq: barrier,
            });
        }
        drop(g);
        if start_shipper {
            if let Some(j) = self.journal() {
                j.set_shipping(true);
            }
            self.start_shipper();
        }
        (self.notify)(self.id);
        Ok(!empty)
    }

    /// Start a restore (replica → primary for the out-of-sync regions).
    /// Returns `Ok(false)` when nothing differs.
    pub fn begin_restore(&self) -> Result<bool, String> {
        let mut g = self.locked();
        let ok = match g.copy_type {
            CopyType::Sync | CopyType::Async => g.state == SyncState::Fractured,
            CopyType::UnSyncAssoc => matches!(g.state, SyncState::Idle | SyncState::Fractured),
            CopyType::UnSyncUnAssoc => false,
        };
        if !ok || g.copy.is_some() {
            return Err(format!(
                "Restore is not possible for {:?} in {:?}",
                g.copy_type, g.state
            ));
        }
        if let Some(j) = &g.journal {
            if j.lag().records > 0 {
                return Err("Restore must wait until the journal has drained".to_string());
            }
        }
        let pending = std::mem::replace(&mut g.oos, Bitmap::new(self.nregions));
        let empty = pending.is_empty();
        let done_state = if g.copy_type == CopyType::UnSyncAssoc {
            SyncState::Idle
        } else {
            SyncState::Synchronized
        };
        if empty {
            g.state = done_state;
        } else {
            g.state = SyncState::RestoreInProgress;
            g.copy = Some(CopyTask {
                kind: CopyKind::Restore,
                total: pending.count(),
                pending,
                cursor: 0,
                barrier_seq: 0,
            });
        }
        g.error = None;
        drop(g);
        (self.notify)(self.id);
        Ok(!empty)
    }

    /// Reset To Sync (from Async): pending journal records become
    /// out-of-sync regions, the journal goes away, and a Synchronized
    /// association starts a resync for them (returns whether it did).
    pub fn reset_to_sync(&self) -> Result<bool, String> {
        let (journal, state) = {
            let g = self.locked();
            if g.copy_type != CopyType::Async || g.copy.is_some() {
                return Err(format!(
                    "Reset To Sync needs an Async association without a running copy, not {:?}/{:?}",
                    g.copy_type, g.state
                ));
            }
            (g.journal.clone(), g.state)
        };
        self.stop_shipper();
        if let Some(j) = &journal {
            let extents = j.drain().map_err(|e| e.to_string())?;
            self.mark_extents(&extents);
        }
        let mut g = self.locked();
        g.copy_type = CopyType::Sync;
        g.journal = None;
        drop(g);
        if let Some(j) = journal {
            if let Ok(j) = Arc::try_unwrap(j) {
                let _ = j.destroy();
            }
        }
        let started = if state.follows() {
            let mut g = self.locked();
            let pending = std::mem::replace(&mut g.oos, Bitmap::new(self.nregions));
            if pending.is_empty() {
                false
            } else {
                g.state = SyncState::ResyncInProgress;
                g.copy = Some(CopyTask {
                    kind: CopyKind::Resync,
                    total: pending.count(),
                    pending,
                    cursor: 0,
                    barrier_seq: 0,
                });
                true
            }
        } else {
            false
        };
        (self.notify)(self.id);
        Ok(started)
    }

    /// Reset To Async (from Sync): later writes go through a new journal.
    pub fn reset_to_async(self: &Arc<Self>) -> Result<(), String> {
        {
            let g = self.locked();
            if g.copy_type != CopyType::Sync {
                return Err(format!(
                    "Reset To Async needs a Sync association, not {:?}",
                    g.copy_type
                ));
            }
        }
        let (j, _) = Journal::open(&journal_dir(&self.dir), self.policy.journal)
            .map_err(|e| e.to_string())?;
        let j = Arc::new(j);
        let broken = {
            let mut g = self.locked();
            g.copy_type = CopyType::Async;
            g.journal = Some(j.clone());
            g.state == SyncState::Broken
        };
        if broken {
            j.set_shipping(false);
        } else {
            self.start_shipper();
        }
        (self.notify)(self.id);
        Ok(())
    }

    // ---- shipper -----------------------------------------------------------

    fn start_shipper(self: &Arc<Self>) {
        let Some(journal) = self.journal() else {
            return;
        };
        let mut slot = self.shipper.lock().unwrap_or_else(|e| e.into_inner());
        if slot.alive {
            return;
        }
        if let Some(old) = slot.handle.take() {
            // It has decided to exit; joining is quick.
            let _ = old.join();
        }
        let me = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name(format!("shipper-{}", self.id))
            .spawn(move || ship_loop(me, journal));
        match spawned {
            Ok(h) => {
                slot.handle = Some(h);
                slot.alive = true;
            }
            Err(e) => {
                drop(slot);
                self.fail(format!("cannot start shipper: {e}"));
            }
        }
    }

    /// Called by the shipper when it wants to stop: true (and no longer
    /// alive) unless shipping was re-enabled meanwhile.
    fn shipper_may_exit(&self, journal: &Journal) -> bool {
        let mut slot = self.shipper.lock().unwrap_or_else(|e| e.into_inner());
        if journal.is_shipping() && !self.stopping.load(Ordering::SeqCst) {
            return false;
        }
        slot.alive = false;
        true
    }

    fn stop_shipper(&self) {
        if let Some(j) = self.journal() {
            j.set_shipping(false);
        }
        let h = self
            .shipper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .handle
            .take();
        if let Some(h) = h {
            // A shipper stuck in a hung replica write cannot be interrupted;
            // give it a bounded time and leave it behind (it only holds a
            // reference and exits when the write returns).
            let deadline = Instant::now() + SHIPPER_STOP_TIMEOUT;
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                tracing::warn!(
                    assoc = self.id,
                    "shipper did not stop (replica I/O hung); leaving it"
                );
            }
        }
    }

    /// Stop background threads (shipper); the journal stays on disk for
    /// the next start.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop_shipper();
    }

    /// Wait until an Async journal is empty (tests, Fracture callers).
    pub fn wait_lag_zero(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lag() {
                None => return true,
                Some(l) if l.records == 0 => return true,
                _ => {}
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    // ---- activity-log housekeeping ----------------------------------------

    /// Whether a housekeeping round could clear anything (idle volumes are
    /// not flushed for nothing).
    pub(crate) fn needs_housekeeping(&self) -> bool {
        let g = self.locked();
        if !Self::tracks(&g) {
            return false;
        }
        let mut needed = g.oos.clone();
        if let Some(c) = &g.copy {
            needed.union_with(&c.pending);
        }
        !g.al.is_empty() || g.persisted.count() != needed.count()
    }

    /// Whether a round now — flushing the primary and the replica or
    /// journal, often the writeback of everything written lately — would
    /// clear enough marks to pay for itself: at least a quarter of the
    /// marked regions had no write since the previous round, or any had
    /// none and `overdue` (the last flushing round was long ago). Under a
    /// write load spread over the whole volume nothing is idle, a round
    /// would clear nothing, and skipping it leaves writeback to the kernel
    /// as it does for an unmirrored LUN.
    pub(crate) fn housekeeping_pays(&self, overdue: bool) -> bool {
        let g = self.locked();
        if !Self::tracks(&g) {
            return false;
        }
        let mut clearable = g.persisted.clone();
        clearable.union_with(&g.al);
        let marked = clearable.count();
        clearable.subtract(&g.oos);
        if let Some(c) = &g.copy {
            clearable.subtract(&c.pending);
        }
        clearable.subtract(&g.touched);
        let idle = clearable.count();
        idle > 0 && (overdue || idle.saturating_mul(4) >= marked)
    }

    /// A skipped round still starts a new observation period for
    /// [`Self::housekeeping_pays`].
    pub(crate) fn housekeep_skip(&self) {
        self.locked().touched.clear_all();
    }

    /// Round part 1: remember what must stay marked this round.
    pub(crate) fn housekeep_begin(&self) -> Bitmap {
        let held = self.locks.held_ranges();
        let mut g = self.locked();
        g.touched.clear_all();
        let mut keep = g.oos.clone();
        if let Some(c) = &g.copy {
            keep.union_with(&c.pending);
        }
        for (s, e) in held {
            if s < self.size {
                let (first, last) = self.regions(s, e.min(self.size) - s);
                keep.set_range(first, last);
            }
        }
        keep
    }

    /// Round part 2 (after the primary was flushed): flush the replica /
    /// sync the journal, then clear the marks that are no longer needed.
    pub(crate) fn housekeep_finish(&self, keep_before: Bitmap, primary_flushed: bool) {
        let (follows, journal, copy_type, copying) = {
            let g = self.locked();
            (
                g.state.follows(),
                g.journal.clone(),
                g.copy_type,
                g.copy.is_some(),
            )
        };
        if !primary_flushed {
            return;
        }
        if let Some(j) = &journal {
            if let Err(e) = j.sync_all() {
                tracing::warn!(assoc = self.id, error = %e, "journal sync failed");
                return;
            }
        }
        // An Async replica only receives journal records, and the shipper
        // flushes it before it records them applied: the synced journal
        // covers every write of the round. A copy task writes the replica
        // directly, so while one runs the replica is flushed here too.
        let replica_needed = follows
            && copy_type != CopyType::UnSyncUnAssoc
            && (copy_type != CopyType::Async || copying);
        if replica_needed {
            if let Err(e) = self.replica.flush() {
                self.flush_failed(&e.to_string());
                return;
            }
            self.replica.release_cache();
        }
        let mut file = self.bitmap.lock().unwrap_or_else(|e| e.into_inner());
        let held = self.locks.held_ranges();
        let desired = {
            let mut g = self.locked();
            if !Self::tracks(&g) {
                return;
            }
            if !replica_needed && g.copy.as_ref().is_some_and(|c| !c.kind.to_primary()) {
                // A copy to the replica started after the flush decision:
                // regions it copied are not flushed there yet. Next round.
                return;
            }
            let mut keep = keep_before;
            keep.union_with(&g.touched);
            for (s, e) in held {
                if s < self.size {
                    let (first, last) = self.regions(s, e.min(self.size) - s);
                    keep.set_range(first, last);
                }
            }
            let mut al = g.al.clone();
            let mut dropped = al.clone();
            dropped.subtract(&keep);
            al.subtract(&dropped);
            g.al = al;
            let mut d = g.oos.clone();
            d.union_with(&g.al);
            d.union_with(&keep);
            if let Some(c) = &g.copy {
                d.union_with(&c.pending);
            }
            // Until the file is rewritten, only claim what both agree on.
            let mut p = g.persisted.clone();
            let mut not_wanted = p.clone();
            not_wanted.subtract(&d);
            p.subtract(&not_wanted);
            g.persisted = p;
            d
        };
        match file.persist(&desired) {
            Ok(_) => self.locked().persisted = desired,
            Err(e) => tracing::warn!(assoc = self.id, error = %e, "bitmap persist failed"),
        }
    }

    /// Bits currently set in the bitmap file's view (tests, status).
    pub fn persisted_count(&self) -> u64 {
        self.locked().persisted.count()
    }

    /// Regions in the activity log.
    pub fn activity_count(&self) -> u64 {
        self.locked().al.count()
    }

    /// Remove the association's state directory (after detach).
    pub fn destroy_state(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether a copy task is active.
    pub fn copying(&self) -> bool {
        self.locked().copy.is_some()
    }
}

/// Records the shipper takes per wake-up (it marks them applied together).
const SHIP_BATCH_RECORDS: usize = 64;
/// … and bytes: space is freed for throttled writers at least this often.
const SHIP_BATCH_BYTES: u64 = 4 << 20;

/// A batch smaller than this makes the shipper wait `SHIP_LINGER` for more.
const SHIP_LINGER_BELOW: usize = 16;
const SHIP_LINGER: Duration = Duration::from_millis(1);
/// Records this large (or larger) leave large folios in the replica's cache.
const LARGE_RECORD: u64 = 64 << 10;

/// A periodic checkpoint running beside the shipper.
///
/// The checkpoint's replica flush writes back everything applied since the
/// previous one: at 250 MB/s of 4 KiB writes, 0.4–0.8 s for 1 GiB. Done on
/// the shipper's thread, applying stopped for that long and the backlog
/// grew by 100–200 MB each time (beyond the in-memory cap, so records were
/// read back from the file). The flush only has to cover the records
/// applied before it began, so the shipper starts it on this thread and
/// goes on applying; `head` then moves to the last record applied before
/// the start (`Journal::checkpoint_to`). Flush records and the idle and
/// stop checkpoints stay on the shipper's thread, after this one finished.
struct BackgroundCheckpoint {
    running: Option<JoinHandle<Result<(), String>>>,
}

impl BackgroundCheckpoint {
    fn busy(&self) -> bool {
        self.running.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// The outcome of the last one started, once it finished (`wait`: wait
    /// for it); `None` if none is outstanding or it still runs.
    fn collect(&mut self, wait: bool) -> Option<Result<(), String>> {
        if !wait && self.busy() {
            return None;
        }
        let h = self.running.take()?;
        Some(
            h.join()
                .unwrap_or_else(|_| Err("checkpoint thread panicked".to_string())),
        )
    }

    /// Flush `replica`, then checkpoint `journal` up to `applied` (the last
    /// record applied before this call).
    fn start(
        &mut self,
        assoc: u64,
        replica: SharedDev,
        journal: Arc<Journal>,
        applied: u64,
        release_cache: bool,
    ) -> std::io::Result<()> {
        let h = std::thread::Builder::new()
            .name(format!("checkpoint-{assoc}"))
            .spawn(move || {
                replica
                    .flush()
                    .map_err(|e| format!("replica flush failed: {e}"))?;
                if release_cache {
                    replica.release_cache();
                }
                if let Err(e) = journal.checkpoint_to(applied) {
                    tracing::warn!(assoc, error = %e, "journal checkpoint failed");
                }
                Ok(())
            })?;
        self.running = Some(h);
        Ok(())
    }

    /// Start a periodic checkpoint up to `applied` in the background once
    /// the previous one is collected: `Ok(true)` if it runs, `Ok(false)` if
    /// no thread could be started (the caller checkpoints inline, as
    /// before), `Err` if the previous one failed.
    fn begin_periodic(
        &mut self,
        a: &Association,
        journal: &Arc<Journal>,
        applied: u64,
        large_applied: &std::cell::Cell<bool>,
    ) -> Result<bool, String> {
        if let Some(Err(why)) = self.collect(true) {
            return Err(why);
        }
        let large = large_applied.replace(false);
        match self.start(a.id, a.replica.clone(), journal.clone(), applied, large) {
            Ok(()) => Ok(true),
            Err(e) => {
                tracing::warn!(assoc = a.id, error = %e, "checkpoint thread not started");
                large_applied.set(large);
                Ok(false)
            }
        }
    }
}

impl Drop for BackgroundCheckpoint {
    /// The shipper does not leave a flush of its replica running behind it.
    fn drop(&mut self) {
        let _ = self.collect(true);
    }
}

fn ship_loop(me: std::sync::Weak<Association>, journal: Arc<Journal>) {
    let mut unflushed_bytes = 0u64;
    let mut unflushed_records = 0u64;
    let mut last_ckpt = Instant::now();
    let large_applied = std::cell::Cell::new(false);
    let mut background = BackgroundCheckpoint { running: None };
    loop {
        let mut batch = journal.next_batch(
            Duration::from_millis(100),
            SHIP_BATCH_RECORDS,
            SHIP_BATCH_BYTES,
        );
        if !batch.is_empty()
            && batch.len() < SHIP_LINGER_BELOW
            && batch.iter().all(|p| p.kind != RecordKind::Flush)
        {
            // Caught up with the writers: let records gather instead of
            // being woken for every few of them.
            std::thread::sleep(SHIP_LINGER);
            batch = journal.next_batch(Duration::ZERO, SHIP_BATCH_RECORDS, SHIP_BATCH_BYTES);
        }
        let Some(a) = me.upgrade() else { return };
        if let Some(Err(why)) = background.collect(false) {
            a.fail(why);
            if a.shipper_may_exit(&journal) {
                return;
            }
        }
        if a.stopping.load(Ordering::SeqCst) && batch.is_empty() && a.shipper_may_exit(&journal) {
            return;
        }
        let checkpoint = |a: &Association,
                          bg: &mut BackgroundCheckpoint,
                          records: &mut u64,
                          bytes: &mut u64|
         -> bool {
            if let Some(Err(why)) = bg.collect(true) {
                a.fail(why);
                return false;
            }
            if *records == 0 {
                return true;
            }
            // Writers applying inline may add records during the flush:
            // the checkpoint covers only what was applied before it began.
            let upto = journal.applied_seq();
            if let Err(e) = a.replica.flush() {
                a.fail(format!("replica flush failed: {e}"));
                return false;
            }
            // Large records leave large folios behind, which make later
            // small writes expensive (`FileDev::release_cache`); small
            // records leave small ones, cheaper to keep than to recreate.
            if large_applied.replace(false) {
                a.replica.release_cache();
            }
            if let Err(e) = journal.checkpoint_to(upto) {
                tracing::warn!(assoc = a.id, error = %e, "journal checkpoint failed");
            }
            *records = 0;
            *bytes = 0;
            true
        };
        let inline = journal.take_inline_applied();
        let records = inline.records;
        unflushed_records += records;
        unflushed_bytes += inline.bytes;
        if inline.largest >= LARGE_RECORD {
            large_applied.set(true);
        }
        if batch.is_empty() {
            // With records applied inline by their writers, an empty batch
            // does not mean the volume is idle.
            if records > 0 && journal.is_shipping() {
                // Writers are applying their records themselves; the
                // periodic checkpoint runs beside them as beside the
                // shipper.
                let due = unflushed_bytes >= a.policy.checkpoint_bytes
                    || last_ckpt.elapsed() >= a.policy.checkpoint_interval;
                if due && !background.busy() {
                    let upto = journal.applied_seq();
                    match background.begin_periodic(&a, &journal, upto, &large_applied) {
                        Ok(true) => {}
                        Ok(false) => {
                            if !checkpoint(
                                &a,
                                &mut background,
                                &mut unflushed_records,
                                &mut unflushed_bytes,
                            ) && a.shipper_may_exit(&journal)
                            {
                                return;
                            }
                        }
                        Err(why) => {
                            a.fail(why);
                            if a.shipper_may_exit(&journal) {
                                return;
                            }
                            continue;
                        }
                    }
                    unflushed_records = 0;
                    unflushed_bytes = 0;
                    last_ckpt = Instant::now();
                }
                continue;
            }
            if !journal.is_shipping() {
                // Stopped: leave the journal as it is for the next start.
                let _ = checkpoint(
                    &a,
                    &mut background,
                    &mut unflushed_records,
                    &mut unflushed_bytes,
                );
                if a.shipper_may_exit(&journal) {
                    return;
                }
                continue;
            }
            // Idle: make the applied position durable.
            if !checkpoint(
                &a,
                &mut background,
                &mut unflushed_records,
                &mut unflushed_bytes,
            ) && a.shipper_may_exit(&journal)
            {
                return;
            }
            last_ckpt = Instant::now();
            continue;
        }
        // Applied but not yet marked (marked once per batch, or before a
        // checkpoint, which records the applied position).
        let mut unmarked: Option<u64> = None;
        let mut exit = false;
        for p in &batch {
            let flags = WriteFlags { fua: p.fua };
            let res: Result<(), String> = match p.kind {
                RecordKind::Write => {
                    let from_file;
                    let data = match p.mem_data() {
                        Some(d) => Ok(d),
                        None => match journal.read_file_data(p) {
                            Ok(d) => {
                                from_file = d;
                                Ok(from_file.as_slice())
                            }
                            Err(e) => Err(e),
                        },
                    };
                    match data {
                        Ok(d) => a
                            .replica
                            .write_at(d, p.offset, flags)
                            .map_err(|e| format!("replica I/O error: {e}")),
                        // Drained meanwhile: the rest of the batch is gone too.
                        Err(JournalError::Gone) => break,
                        Err(e) => Err(format!("journal read failed: {e}")),
                    }
                }
                RecordKind::Flush => a
                    .replica
                    .flush()
                    .map_err(|e| format!("replica flush failed: {e}")),
                RecordKind::WriteZeroes => a
                    .replica
                    .write_zeroes(p.offset, p.length, flags)
                    .map_err(|e| format!("replica I/O error: {e}")),
                RecordKind::Discard => a
                    .replica
                    .discard(p.offset, p.length)
                    .map_err(|e| format!("replica I/O error: {e}")),
            };
            if let Err(why) = res {
                if let Some(seq) = unmarked.take() {
                    journal.mark_applied(seq);
                }
                a.fail(why);
                exit = a.shipper_may_exit(&journal);
                unmarked = None;
                break;
            }
            if p.kind == RecordKind::Write && p.length >= LARGE_RECORD {
                large_applied.set(true);
            }
            unmarked = Some(p.seq);
            unflushed_records += 1;
            unflushed_bytes += p.length;
            let periodic = (unflushed_bytes >= a.policy.checkpoint_bytes
                || last_ckpt.elapsed() >= a.policy.checkpoint_interval)
                && !background.busy();
            if p.kind != RecordKind::Flush && !periodic {
                continue;
            }
            if let Some(seq) = unmarked.take() {
                journal.mark_applied(seq);
            }
            // The host's flush is checkpointed here: the replica holds
            // everything before it durably before anything after it is
            // applied. A periodic checkpoint runs beside the shipper.
            let mut in_background = false;
            if p.kind != RecordKind::Flush {
                match background.begin_periodic(&a, &journal, p.seq, &large_applied) {
                    Ok(started) => in_background = started,
                    Err(why) => {
                        a.fail(why);
                        exit = a.shipper_may_exit(&journal);
                        break;
                    }
                }
            }
            if !in_background
                && !checkpoint(
                    &a,
                    &mut background,
                    &mut unflushed_records,
                    &mut unflushed_bytes,
                )
            {
                exit = a.shipper_may_exit(&journal);
                break;
            }
            unflushed_records = 0;
            unflushed_bytes = 0;
            last_ckpt = Instant::now();
        }
        if let Some(seq) = unmarked {
            journal.mark_applied(seq);
        }
        if exit {
            return;
        }
    }
}
