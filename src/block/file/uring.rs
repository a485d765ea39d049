//! The io_uring engine.
//!
//! # Design: a pool of small rings per device, one ring per caller at a time
//!
//! `BlockDev` calls are blocking and come from several threads at once (the
//! iSCSI target runs commands on a few worker threads). Each call that uses
//! a ring checks one out of the device's pool (or creates one when all are
//! busy), queues its SQEs, waits with `io_uring_enter(GETEVENTS)` on that
//! ring until all of them have completed, and puts the ring back. So:
//!
//! * no cross-thread hand-off: the thread that submits also reaps, so a
//!   request costs one `io_uring_enter` and no futex wake-ups or context
//!   switches (a shared ring with a completion thread adds two of those per
//!   request, the dominant cost of a 4 KiB request served from the page
//!   cache or a fast NVMe device with 2–4 submitting threads);
//! * no locking around the SQ/CQ: a ring is owned by one caller while in use;
//!   the pool mutex is held only for a `Vec::pop`/`push`;
//! * the device's file is registered in every ring (`IORING_REGISTER_FILES`,
//!   slot 0), which saves the per-request file reference count that a
//!   multi-threaded process otherwise pays on a shared file;
//! * the rings belong to the device, so the registered file reference goes
//!   away with the device (thread-local rings would keep every device file
//!   open until each thread that ever touched it exits).
//!
//! # Where a ring pays, and where it does not (measured)
//!
//! A caller that blocks on one request gets no concurrency from a ring. On
//! the development VM (kernel 6.18, ext4 on virtio) a lone 4 KiB buffered
//! read cost ~1.25 µs through a ring against ~0.8 µs for `pread` (ring
//! setup flags — `COOP_TASKRUN`, `SINGLE_ISSUER|DEFER_TASKRUN`, a registered
//! ring fd — made no measurable difference); a buffered write ~8 µs against
//! ~3 µs, because ext4 has no non-blocking buffered writes and io_uring
//! punts every one to an `iou-wrk` worker thread; O_DIRECT requests at QD1
//! cost the same either way (device latency dominates). Where a ring does
//! pay is many requests in flight from one call:
//! [`BlockDev::submit_batch`](crate::block::BlockDev::submit_batch) puts up
//! to `RING_ENTRIES` requests in flight with one `io_uring_enter` — 32
//! random O_DIRECT 4 KiB reads ran ~4× faster than 32 `pread`s in a row —
//! and lets cold buffered reads proceed in parallel.
//!
//! So by default (`RingUse::WhereFaster`) the engine uses rings for batches
//! of two or more requests, except buffered writes, and sends lone requests
//! and buffered writes to `pread`/`pwrite`. `RingUse::Always` puts every
//! request on a ring (tests run the whole suite that way too). For 1 MiB
//! sequential I/O both paths issue one request per MiB and the kernel's
//! copying or DMA dominates.
//!
//! Rings are created with `COOP_TASKRUN` (no IPI to the submitter when a
//! completion is posted; we always reap from the submitting task anyway) and
//! `SUBMIT_ALL`, falling back to plain setup on kernels that reject them.
//! `SINGLE_ISSUER`/`DEFER_TASKRUN` and registered ring fds are not used:
//! pooled rings move between threads, and they measured no faster.
//!
//! # Memory safety
//!
//! The kernel reads and writes the caller's buffers asynchronously. [`run`]
//! borrows the ops (and so their buffers) for its whole duration and never
//! returns — not even by unwinding, see [`Flight`] — while an SQE it queued is
//! still in the submission queue or in flight in the kernel. The one early
//! exit on a hard `io_uring_enter` error happens only when nothing has
//! reached the kernel, and drops the ring, so entries still sitting in its SQ
//! are never consumed.
//!
//! [`run`]: UringEngine::run

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use super::Slot;
use crate::block::BatchOp;

/// SQ entries per ring; also the most requests one call keeps in flight.
/// 64 covers a SCSI queue depth of 32 with room for resubmitted remainders.
pub(super) const RING_ENTRIES: u32 = 64;
/// Idle rings kept per device; more concurrent callers get a ring that is
/// dropped after use.
const MAX_IDLE_RINGS: usize = 16;
/// Largest transfer in one SQE (the kernel caps a single read/write near
/// 2 GiB anyway); longer ops continue as short transfers.
const MAX_SQE_LEN: usize = 1 << 30;

/// io_uring engine state of one device.
pub(super) struct UringEngine {
    /// A descriptor of its own for the device's open file, so that rings can
    /// be created and registered whenever needed without borrowing it.
    file: File,
    /// SQ size of new rings.
    entries: AtomicU32,
    pool: Mutex<Vec<IoUring>>,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.pool.lock().map(|p| p.len()).unwrap_or(0);
        f.debug_struct("UringEngine")
            .field("entries", &self.entries)
            .field("idle_rings", &idle)
            .finish_non_exhaustive()
    }
}

impl UringEngine {
    /// Create the engine with one ready ring, or fail (setup refused by
    /// seccomp, `io_uring_disabled`, memlock limits, or a kernel without
    /// `IORING_OP_READ`/`WRITE`), in which case the caller falls back.
    pub(super) fn new(file: &File, entries: u32) -> io::Result<Self> {
        let file = file.try_clone()?;
        let ring = new_ring(&file, entries)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        if !probe.is_supported(opcode::Read::CODE) || !probe.is_supported(opcode::Write::CODE) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "kernel io_uring lacks IORING_OP_READ/WRITE",
            ));
        }
        Ok(UringEngine {
            file,
            entries: AtomicU32::new(entries),
            pool: Mutex::new(vec![ring]),
        })
    }

    fn checkout(&self) -> io::Result<IoUring> {
        let idle = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match idle {
            Some(ring) => Ok(ring),
            None => new_ring(&self.file, self.entries.load(Ordering::Relaxed)),
        }
    }

    fn checkin(&self, ring: IoUring) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < MAX_IDLE_RINGS {
            pool.push(ring);
        }
    }

    /// Drop the idle rings and make new ones fail (zero entries), as when a
    /// memory limit is hit after open.
    #[cfg(test)]
    pub(super) fn break_for_test(&self) {
        self.entries.store(0, Ordering::Relaxed);
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Run the ops whose slot has no result yet, filling in every such slot.
    /// `Err` means no ring could be had and nothing was done; the caller runs
    /// the ops on the sync engine instead.
    pub(super) fn run(&self, ops: &mut [BatchOp<'_>], slots: &mut [Slot]) -> io::Result<()> {
        let ring = self.checkout()?;
        let mut flight = Flight {
            ring: Some(ring),
            outstanding: 0,
        };
        let healthy = drive(&mut flight, ops, slots);
        if let Some(ring) = flight.ring.take() {
            if healthy {
                self.checkin(ring);
            }
        }
        Ok(())
    }
}

fn new_ring(file: &File, entries: u32) -> io::Result<IoUring> {
    let ring = match IoUring::builder()
        .setup_coop_taskrun()
        .setup_submit_all()
        .build(entries)
    {
        Ok(ring) => ring,
        // Kernels before 5.18/5.19 reject the flags, not io_uring itself.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(entries)?,
        Err(e) => return Err(e),
    };
    ring.submitter().register_files(&[file.as_raw_fd()])?;
    Ok(ring)
}

/// A ring in use by one call, with the number of this call's SQEs that are
/// queued or in flight.
struct Flight {
    ring: Option<IoUring>,
    outstanding: usize,
}

impl Drop for Flight {
    fn drop(&mut self) {
        if self.outstanding == 0 {
            return;
        }
        // Only reached when `drive` unwinds with requests in flight: the
        // buffers they point into are about to be released, so wait for the
        // kernel to finish with them first (or stop the process if we can't).
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        while self.outstanding > 0 {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if transient(&e) => {}
                Err(_) => std::process::abort(),
            }
            let reaped = ring.completion().count();
            self.outstanding = self.outstanding.saturating_sub(reaped);
        }
    }
}

/// Queue, submit and reap until every op has a result. Returns whether the
/// ring is fit for reuse.
fn drive(flight: &mut Flight, ops: &mut [BatchOp<'_>], slots: &mut [Slot]) -> bool {
    let n = ops.len().min(slots.len());
    let Some(ring) = flight.ring.as_mut() else {
        return false;
    };
    let capacity = ring.params().sq_entries() as usize;
    // Ops are queued in index order first; remainders of short transfers
    // and EAGAIN/EINTR retries go through `again`.
    let mut next = 0usize;
    let mut again: Vec<usize> = Vec::new();

    loop {
        {
            let mut sq = ring.submission();
            while flight.outstanding < capacity {
                let idx = match again.pop() {
                    Some(idx) => idx,
                    None => {
                        while next < n && slots.get(next).is_some_and(|s| s.result.is_some()) {
                            next += 1;
                        }
                        if next >= n {
                            break;
                        }
                        next += 1;
                        next - 1
                    }
                };
                let (Some(op), Some(slot)) = (ops.get_mut(idx), slots.get_mut(idx)) else {
                    continue;
                };
                if slot.done >= op.len() {
                    slot.result = Some(Ok(()));
                    continue;
                }
                let entry = sqe_for(op, slot.done, idx);
                // SAFETY: the entry points into `op`'s buffer past the bytes
                // already transferred, for at most the rest of it, and names
                // the file registered at slot 0 of this ring. `ops` stays
                // mutably borrowed by this function until the entry's CQE has
                // been reaped: the loop only ends with `outstanding == 0`, the
                // hard-error exit below runs only when no entry has reached
                // the kernel (and then the ring, with any unconsumed SQEs, is
                // dropped), and `Flight::drop` waits out in-flight entries if
                // we unwind.
                if unsafe { sq.push(&entry) }.is_err() {
                    again.push(idx);
                    break;
                }
                flight.outstanding += 1;
            }
        }
        if flight.outstanding == 0 {
            return true;
        }

        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if transient(&e) => {}
            Err(e) => {
                let in_kernel = flight.outstanding.saturating_sub(ring.submission().len());
                if in_kernel == 0 {
                    let errno = e.raw_os_error();
                    for slot in slots.iter_mut().take(n) {
                        if slot.result.is_none() {
                            slot.result = Some(Err(match errno {
                                Some(code) => io::Error::from_raw_os_error(code),
                                None => io::Error::new(e.kind(), e.to_string()),
                            }));
                        }
                    }
                    // Dropping the ring discards the SQEs it still holds.
                    flight.outstanding = 0;
                    flight.ring = None;
                    return false;
                }
                // Buffers are in the kernel's hands: we may not return, so
                // back off and try to reap again.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }

        for cqe in ring.completion() {
            flight.outstanding = flight.outstanding.saturating_sub(1);
            complete(&cqe, ops, slots, &mut again);
        }
    }
}

/// Account one completion to its op: finished, failed, or to be continued.
fn complete(
    cqe: &cqueue::Entry,
    ops: &mut [BatchOp<'_>],
    slots: &mut [Slot],
    again: &mut Vec<usize>,
) {
    let Ok(idx) = usize::try_from(cqe.user_data()) else {
        return;
    };
    let (Some(op), Some(slot)) = (ops.get_mut(idx), slots.get_mut(idx)) else {
        return;
    };
    let res = cqe.result();
    if res < 0 {
        let errno = -res;
        if errno == libc::EAGAIN || errno == libc::EINTR {
            again.push(idx);
        } else {
            slot.result = Some(Err(io::Error::from_raw_os_error(errno)));
        }
        return;
    }
    let len = op.len();
    if res == 0 {
        slot.result = Some(match op {
            // End of file: the backing file is shorter than the device.
            BatchOp::Read { buf, .. } => {
                if let Some(rest) = buf.get_mut(slot.done..) {
                    rest.fill(0);
                }
                Ok(())
            }
            BatchOp::Write { .. } => Err(io::ErrorKind::WriteZero.into()),
        });
        return;
    }
    slot.done = slot.done.saturating_add(res as usize).min(len);
    if slot.done >= len {
        slot.result = Some(Ok(()));
    } else {
        again.push(idx);
    }
}

/// The SQE for the not yet transferred part of `op`.
fn sqe_for(op: &mut BatchOp<'_>, done: usize, idx: usize) -> squeue::Entry {
    let file = types::Fixed(0);
    let entry = match op {
        BatchOp::Read { buf, offset } => {
            let rest = buf.get_mut(done..).unwrap_or_default();
            let len = rest.len().min(MAX_SQE_LEN) as u32;
            opcode::Read::new(file, rest.as_mut_ptr(), len)
                .offset(*offset + done as u64)
                .build()
        }
        BatchOp::Write { buf, offset, flags } => {
            let rest = buf.get(done..).unwrap_or_default();
            let len = rest.len().min(MAX_SQE_LEN) as u32;
            // RWF_DSYNC makes this write durable on completion, like a
            // pwritev2(RWF_DSYNC): that is FUA for exactly this range.
            let rw_flags = if flags.fua { libc::RWF_DSYNC } else { 0 };
            opcode::Write::new(file, rest.as_ptr(), len)
                .offset(*offset + done as u64)
                .rw_flags(rw_flags)
                .build()
        }
    };
    entry.user_data(idx as u64)
}

/// `io_uring_enter` errors after which waiting again is right: a signal
/// (EINTR), a temporary lack of kernel memory (EAGAIN), or completions that
/// must be reaped before more can be posted (EBUSY).
fn transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
    )
}
