//! The write-interception layer between the SCSI core and the primary
//! backstore.
//!
//! A [`MirroredVolume`] is a `BlockDev` wrapping the primary device; the
//! SCSI core's logical unit uses it as its device. Reads go to the primary.
//! Every write, zeroing, discard and flush is first shown to each attached
//! [`Association`], which decides what the replica needs:
//!
//! - **Sync**: the replica operation runs on the caller's thread right
//!   after the primary operation, from the caller's buffer (no copy, no
//!   thread handoff); the call returns when both completed. FUA reaches
//!   both; a flush flushes primary and replica in parallel (the replica on
//!   the association's flush thread).
//! - **Async**: a journal record is appended (ordered, checksummed) before
//!   the primary write; FUA/flush make the record durable before returning.
//!   The shipper applies records to the replica in order.
//! - **Point-in-time copies** (UnSync*): copy-on-write of regions not yet
//!   copied, then the primary write.
//! - Broken / Fractured / Idle associations only mark the region out of
//!   sync.
//!
//! Host writes hold their byte range in a [`RangeLock`] so overlapping
//! writes reach primary, replica and journal in the same order; copy jobs
//! hold one region; attach/detach/mode changes quiesce the whole device.
//! The layer never sees SCSI: byte ranges, FUA and flush only.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::block::{
    check_range, BatchOp, BlockCaps, BlockDev, BlockError, BlockResult, FileExtent, SharedDev,
    WriteFlags,
};

pub mod assoc;
pub mod bitmap;
pub mod fault;
pub mod journal;
pub mod rangelock;

pub use assoc::{
    AssocSetup, AssocStatus, Association, CopyEnd, CopyError, CopyKind, CopyStep, CopyType,
    MirrorPolicy, ResumeAction, SyncState,
};
pub use rangelock::{RangeGuard, RangeLock};

use assoc::Plan;
use journal::RecordKind;

type AssocList = Arc<Vec<Arc<Association>>>;

/// A source volume with its attached associations. See the module docs.
pub struct MirroredVolume {
    name: String,
    primary: SharedDev,
    size: u64,
    locks: Arc<RangeLock>,
    assocs: RwLock<AssocList>,
    /// When the last housekeeping round flushed (see [`Self::housekeep`]).
    last_round: Mutex<Instant>,
}

/// A housekeeping round that can clear marks of idle regions runs at
/// least this often, even when most marked regions are still being written.
const HOUSEKEEPING_MAX_DEFER: Duration = Duration::from_secs(30);

impl std::fmt::Debug for MirroredVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirroredVolume")
            .field("name", &self.name)
            .field("size", &self.size)
            .finish()
    }
}

/// Which host operation is being intercepted.
#[derive(Clone, Copy)]
enum HostOp<'a> {
    Write(&'a [u8], WriteFlags),
    Zeroes(WriteFlags),
    Discard,
}

impl HostOp<'_> {
    fn fua(&self) -> bool {
        match self {
            HostOp::Write(_, f) | HostOp::Zeroes(f) => f.fua,
            HostOp::Discard => false,
        }
    }
}

impl MirroredVolume {
    /// Wrap `primary` as volume `name` (no associations yet).
    pub fn new(name: &str, primary: SharedDev) -> Arc<MirroredVolume> {
        let size = primary.size();
        Arc::new(MirroredVolume {
            name: name.to_string(),
            primary,
            size,
            locks: Arc::new(RangeLock::new()),
            assocs: RwLock::new(Arc::new(Vec::new())),
            last_round: Mutex::new(Instant::now()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size
    }

    /// The wrapped primary device.
    pub fn primary(&self) -> &SharedDev {
        &self.primary
    }

    /// The volume's range lock (associations copy regions under it).
    pub fn locks(&self) -> &Arc<RangeLock> {
        &self.locks
    }

    /// Attached associations.
    pub fn associations(&self) -> Vec<Arc<Association>> {
        self.list().iter().cloned().collect()
    }

    fn list(&self) -> AssocList {
        self.assocs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Hold off every host I/O that changes data (and wait for those in
    /// flight) for at most `timeout`. `None` on timeout.
    pub fn quiesce(&self, timeout: Duration) -> Option<RangeGuard<'_>> {
        self.locks.lock_timeout(0, u64::MAX, timeout)
    }

    /// Install an association. Call while quiesced: the moment of the
    /// install is the point in time of an UnSync copy.
    pub fn add_association(&self, _quiesced: &RangeGuard<'_>, a: Arc<Association>) {
        let mut g = self.assocs.write().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = g.iter().cloned().collect();
        v.push(a);
        *g = Arc::new(v);
    }

    /// Remove association `id` (call while quiesced); returns it.
    pub fn remove_association(
        &self,
        _quiesced: &RangeGuard<'_>,
        id: u64,
    ) -> Option<Arc<Association>> {
        let mut g = self.assocs.write().unwrap_or_else(|e| e.into_inner());
        let found = g.iter().find(|a| a.id() == id).cloned();
        let v: Vec<_> = g.iter().filter(|a| a.id() != id).cloned().collect();
        *g = Arc::new(v);
        found
    }

    fn round_out(&self, offset: u64, len: u64, region: u64) -> (u64, u64) {
        let start = offset / region * region;
        let end = (offset + len)
            .div_ceil(region)
            .saturating_mul(region)
            .min(self.size);
        (start, end.max(offset + len))
    }

    /// Lock the range of a host I/O, whole regions when an association is
    /// going to copy before it; returns the guard and the association list
    /// seen under it.
    fn lock_for(&self, offset: u64, len: u64, is_write: bool) -> (RangeGuard<'_>, AssocList) {
        loop {
            let list = self.list();
            let region = list
                .iter()
                .filter(|a| a.needs_region_lock(offset, len, is_write))
                .map(|a| a.region_size())
                .max();
            let (s, e) = match region {
                Some(r) => self.round_out(offset, len, r),
                None => (offset, offset + len),
            };
            let guard = self.locks.lock(s, e);
            let now = self.list();
            // Attach/detach happen under quiesce, so once the range is held
            // the list cannot change any more; retry if it did before.
            if Arc::ptr_eq(&list, &now) {
                return (guard, now);
            }
        }
    }

    fn host_modify(&self, op: HostOp<'_>, offset: u64, len: u64) -> BlockResult<()> {
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (guard, list) = self.lock_for(offset, len, true);
        let mut plans = Vec::with_capacity(list.len());
        for a in list.iter() {
            plans.push((a, a.prepare(offset, len, true)?));
        }
        if let Some((_, Plan::Fail(why))) = plans.iter().find(|(_, p)| matches!(p, Plan::Fail(_))) {
            return Err(BlockError::Io(std::io::Error::other(format!(
                "replica broken and policy fails host I/O: {why}"
            ))));
        }
        let mut host_err: Option<String> = None;
        // Journals first: the record exists before the primary holds data.
        let mut journaled = Vec::new();
        for (a, p) in &plans {
            if let Plan::Journal(j) = p {
                let appended = match op {
                    HostOp::Write(buf, _) => j.append_write_inline(op.fua(), offset, buf),
                    HostOp::Zeroes(_) => j
                        .append(RecordKind::WriteZeroes, op.fua(), offset, len, &[])
                        .map(|seq| (seq, None)),
                    HostOp::Discard => j
                        .append(RecordKind::Discard, false, offset, len, &[])
                        .map(|seq| (seq, None)),
                };
                match appended {
                    Ok((seq, claim)) => journaled.push((*a, j.clone(), seq, claim)),
                    Err(e) => {
                        if a.journal_failed(offset, len, &e) {
                            host_err = Some(e.to_string());
                        }
                    }
                }
            }
        }
        let primary = match op {
            HostOp::Write(buf, f) => self.primary.write_at(buf, offset, f),
            HostOp::Zeroes(f) => self.primary.write_zeroes(offset, len, f),
            HostOp::Discard => self.primary.discard(offset, len),
        };
        // Sync mirrors run on this thread after the primary operation, from
        // the caller's buffer: a handoff to another thread costs two thread
        // switches and a copy, which on a CPU-bound machine is more than the
        // parallelism gains. Both sides are written even when the primary
        // failed, so the failure handling below sees what each side holds.
        for (a, p) in &plans {
            if matches!(p, Plan::Mirror) {
                let r = match op {
                    HostOp::Write(buf, f) => a.replica().write_at(buf, offset, f),
                    HostOp::Zeroes(f) => a.replica().write_zeroes(offset, len, f),
                    HostOp::Discard => a.replica().discard(offset, len),
                };
                if let Err(e) = &r {
                    if a.mirror_failed(offset, len, e) {
                        host_err = Some(e.to_string());
                    }
                } else if primary.is_err() {
                    a.primary_failed(offset, len);
                }
            }
        }
        // Async records of small plain writes: applied here while the
        // shipper has nothing older to apply (see "Inline apply" in
        // `journal`), which spares the shipper's wake-up and handoff.
        for (a, _, _, claim) in &mut journaled {
            // Unless the primary write succeeded, the dropped claim leaves
            // the record to the shipper, as any record.
            if let (Some(claim), Ok(()), HostOp::Write(buf, _)) = (claim.take(), &primary, op) {
                let started = Instant::now();
                let r = a.replica().write_at(buf, offset, WriteFlags::default());
                claim.applied(r.is_ok(), started.elapsed());
            }
        }
        if primary.is_ok() && op.fua() {
            for (a, j, seq, _) in &journaled {
                if let Err(e) = j.sync_to(*seq) {
                    if a.journal_failed(offset, len, &e) {
                        host_err = Some(e.to_string());
                    }
                }
            }
        }
        drop(guard);
        primary?;
        match host_err {
            Some(e) => Err(BlockError::Io(std::io::Error::other(format!(
                "replica failure (host I/O fails by policy): {e}"
            )))),
            None => Ok(()),
        }
    }

    /// Every op of a batch through the intercepting path, in order.
    fn batch_per_op(&self, ops: &mut [BatchOp<'_>]) -> Vec<BlockResult<()>> {
        ops.iter_mut()
            .map(|op| match op {
                BatchOp::Read { buf, offset } => self.read_at(buf, *offset),
                BatchOp::Write { buf, offset, flags } => self.write_at(buf, *offset, *flags),
            })
            .collect()
    }

    /// One activity-log housekeeping round: flush, then clear the marks of
    /// regions with no write since the previous round. The registry calls
    /// this periodically and (twice) at shutdown. A round that would clear
    /// too little to pay for its flushes is skipped
    /// (`Association::housekeeping_pays`): two calls in a row on an idle
    /// volume always clear every mark that is not needed.
    pub fn housekeep(&self) {
        let list = self.list();
        if !list.iter().any(|a| a.needs_housekeeping()) {
            return;
        }
        let overdue = {
            let last = self.last_round.lock().unwrap_or_else(|e| e.into_inner());
            last.elapsed() >= HOUSEKEEPING_MAX_DEFER
        };
        if !list.iter().any(|a| a.housekeeping_pays(overdue)) {
            for a in list.iter() {
                a.housekeep_skip();
            }
            return;
        }
        *self.last_round.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        let keeps: Vec<_> = list.iter().map(|a| a.housekeep_begin()).collect();
        let flushed = match self.primary.flush() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(volume = %self.name, error = %e, "primary flush failed; activity log kept");
                false
            }
        };
        for (a, keep) in list.iter().zip(keeps) {
            a.housekeep_finish(keep, flushed);
        }
    }
}

impl BlockDev for MirroredVolume {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let len = buf.len() as u64;
        let list = self.list();
        if len == 0 || !list.iter().any(|a| a.needs_region_lock(offset, len, false)) {
            return self.primary.read_at(buf, offset);
        }
        // A restore is running: bring the regions back before reading.
        let (guard, list) = self.lock_for(offset, len, false);
        for a in list.iter() {
            a.prepare(offset, len, false)?;
        }
        let r = self.primary.read_at(buf, offset);
        drop(guard);
        r
    }

    /// The primary's extent, but only while reads of the range are served
    /// by the primary as it is: while a restore still has to bring a region
    /// of the range back from the replica (`read_at` does that first, under
    /// the region lock), there is no file range to name.
    fn file_extent(&self, offset: u64, len: u64) -> BlockResult<Option<FileExtent>> {
        check_range(self.size, offset, len)?;
        if len == 0
            || self
                .list()
                .iter()
                .any(|a| a.needs_region_lock(offset, len, false))
        {
            return Ok(None);
        }
        self.primary.file_extent(offset, len)
    }

    fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> BlockResult<()> {
        self.host_modify(HostOp::Write(buf, flags), offset, buf.len() as u64)
    }

    fn flush(&self) -> BlockResult<()> {
        let list = self.list();
        let mut replicas = Vec::new();
        let mut journals = Vec::new();
        for a in list.iter() {
            match a.flush_submit() {
                Some(Ok(rx)) => replicas.push((a, rx)),
                Some(Err(j)) => journals.push((a, j)),
                None => {}
            }
        }
        let mut host_err = None;
        for (a, j) in &journals {
            let r = j
                .append(RecordKind::Flush, false, 0, 0, &[])
                .and_then(|_| j.sync_all());
            if let Err(e) = r {
                if a.journal_failed(0, 0, &e) {
                    host_err = Some(e.to_string());
                }
            }
        }
        let primary = self.primary.flush();
        for (a, rx) in replicas {
            let r = rx.recv().unwrap_or_else(|_| {
                Err(BlockError::Io(std::io::Error::other(
                    "replica I/O thread gone",
                )))
            });
            if let Err(e) = r {
                if a.flush_failed(&e.to_string()) {
                    host_err = Some(e.to_string());
                }
            }
        }
        primary?;
        match host_err {
            Some(e) => Err(BlockError::Io(std::io::Error::other(format!(
                "replica failure (host I/O fails by policy): {e}"
            )))),
            None => Ok(()),
        }
    }

    fn caps(&self) -> BlockCaps {
        self.primary.caps()
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.host_modify(HostOp::Discard, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> BlockResult<()> {
        self.host_modify(HostOp::Zeroes(flags), offset, len)
    }

    /// During a restore, regions not brought back yet are reported mapped:
    /// they read as the replica's data, and an initiator that trusts an
    /// unmapped (zero) status would skip reading them.
    fn allocation(&self, offset: u64, len: u64) -> BlockResult<(bool, u64)> {
        check_range(self.size, offset, len)?;
        let mut limit = len;
        for a in self.list().iter() {
            match a.restore_pending_run(offset, len) {
                Some((0, run)) => return Ok((true, run)),
                Some((start, _)) => limit = limit.min(start),
                None => {}
            }
        }
        let (mapped, run) = self.primary.allocation(offset, limit)?;
        Ok((mapped, run.min(limit)))
    }

    /// Without associations a batch goes to the primary as a batch (so an
    /// io_uring backstore keeps its queue depth), under one range lock
    /// spanning its writes so an attach cannot slip in between. With
    /// associations every op takes the intercepting path in order.
    fn submit_batch(&self, ops: &mut [BatchOp<'_>]) -> Vec<BlockResult<()>> {
        let in_range = ops
            .iter()
            .all(|o| check_range(self.size, o.offset(), o.len() as u64).is_ok());
        if !in_range {
            return self.batch_per_op(ops);
        }
        let writes = ops
            .iter()
            .filter(|o| matches!(o, BatchOp::Write { .. }) && !o.is_empty());
        let span = writes.fold(None, |acc: Option<(u64, u64)>, o| {
            let (s, e) = (o.offset(), o.offset() + o.len() as u64);
            Some(acc.map_or((s, e), |(a, b)| (a.min(s), b.max(e))))
        });
        let list = self.list();
        match span {
            None => {
                let restoring = ops.iter().any(|o| {
                    list.iter()
                        .any(|a| a.needs_region_lock(o.offset(), o.len() as u64, false))
                });
                if restoring {
                    self.batch_per_op(ops)
                } else {
                    self.primary.submit_batch(ops)
                }
            }
            Some(_) if !list.is_empty() => self.batch_per_op(ops),
            Some((start, end)) => {
                let guard = self.locks.lock(start, end);
                if !self.list().is_empty() {
                    drop(guard);
                    return self.batch_per_op(ops);
                }
                let r = self.primary.submit_batch(ops);
                drop(guard);
                r
            }
        }
    }
}

#[cfg(test)]
mod tests;
