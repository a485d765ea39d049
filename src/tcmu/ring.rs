//! The TCMU command ring: a mailbox, a circular command area and a data
//! area in memory shared with the kernel (`/dev/uioN` map0).
//!
//! The kernel appends entries at `cmd_head` (PAD, CMD, TMR), userspace
//! consumes them and hands ring space back by advancing `cmd_tail`. Offsets
//! and lengths in entries come from shared memory and are treated as
//! hostile: every one is bounds-checked before use, and nothing here can
//! panic on ring contents. Two kinds of bad input are told apart:
//!
//! - a framing error (zero length, an entry crossing the ring end or
//!   `cmd_head`, a CMD entry too short to hold a response, a misaligned
//!   head, a reused `cmd_id`) means the next entry cannot be found: the ring
//!   is [`Broken`] and stays so until the kernel resets it;
//! - a well-framed CMD entry whose contents are bad (iovec outside the data
//!   area, CDB outside the entry, absurd counts) is completed at once with
//!   CHECK CONDITION, HARDWARE ERROR / INTERNAL TARGET FAILURE, and the ring
//!   goes on. An entry with an opcode this code does not know gets
//!   `TCMU_UFLAG_UNKNOWN_OP` and is skipped, as the header asks.
//!
//! Completion order: without `TCMU_MAILBOX_FLAG_CAP_OOOC` the response goes
//! into the command's own entry and `cmd_tail` only moves over a completed
//! prefix; with it, the response (carrying its `cmd_id`) goes into the
//! first unreleased CMD entry at the tail, so any command can complete
//! first. `cmd_head` is read with acquire ordering, `cmd_tail` written with
//! release ordering after the response and data-in are in place.
//!
//! All raw memory access is in [`Region`]; that is where the `unsafe` is.

use std::collections::{HashSet, VecDeque};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use super::sys::*;

/// Memory shared with the kernel (or with a test playing the kernel).
///
/// # Safety
/// Implementors guarantee that `as_ptr()..as_ptr() + len()` stays valid for
/// reads and writes for as long as the value lives, that `as_ptr()` is at
/// least 8-byte aligned, and that other parties access the two mailbox
/// index words (`cmd_head`, `cmd_tail`) only with atomic accesses.
pub unsafe trait SharedMem: Send {
    fn as_ptr(&self) -> NonNull<u8>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An access beyond the shared region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("access {off}+{len} outside the {size}-byte shared region")]
pub struct OutOfBounds {
    pub off: u64,
    pub len: u64,
    pub size: u64,
}

/// A bounds-checked view of a [`SharedMem`]. Every access copies through a
/// raw pointer after checking the range; the only references into the
/// region are the atomics of the index words.
#[derive(Clone, Copy)]
pub struct Region<'a> {
    base: NonNull<u8>,
    len: usize,
    _mem: PhantomData<&'a ()>,
}

impl<'a> Region<'a> {
    pub fn new(mem: &'a dyn SharedMem) -> Self {
        Region {
            base: mem.as_ptr(),
            len: mem.len(),
            _mem: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, off: u64, len: u64) -> Result<usize, OutOfBounds> {
        match off.checked_add(len) {
            Some(end) if end <= self.len as u64 => Ok(off as usize),
            _ => Err(OutOfBounds {
                off,
                len,
                size: self.len as u64,
            }),
        }
    }

    /// Copy `buf.len()` bytes at `off` out of the region.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        let at = self.check(off, buf.len() as u64)?;
        // SAFETY: `check` proved at..at+buf.len() lies inside the region,
        // which `SharedMem` guarantees is valid for reads; `buf` is a
        // distinct Rust allocation, so the ranges cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.as_ptr().add(at), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Copy `data` into the region at `off`.
    pub fn write(&self, off: u64, data: &[u8]) -> Result<(), OutOfBounds> {
        let at = self.check(off, data.len() as u64)?;
        // SAFETY: `check` proved the destination lies inside the region,
        // valid for writes per `SharedMem`; `data` is not part of it.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.as_ptr().add(at), data.len())
        };
        Ok(())
    }

    /// Fill `len` bytes at `off` with `byte`.
    pub fn fill(&self, off: u64, len: u64, byte: u8) -> Result<(), OutOfBounds> {
        let at = self.check(off, len)?;
        // SAFETY: `check` proved at..at+len lies inside the writable region.
        unsafe { std::ptr::write_bytes(self.base.as_ptr().add(at), byte, len as usize) };
        Ok(())
    }

    fn array<const N: usize>(&self, off: u64) -> Result<[u8; N], OutOfBounds> {
        let mut b = [0u8; N];
        self.read(off, &mut b)?;
        Ok(b)
    }

    pub fn u8_at(&self, off: u64) -> Result<u8, OutOfBounds> {
        Ok(self.array::<1>(off)?[0])
    }
    pub fn u16_at(&self, off: u64) -> Result<u16, OutOfBounds> {
        Ok(u16::from_ne_bytes(self.array(off)?))
    }
    pub fn u32_at(&self, off: u64) -> Result<u32, OutOfBounds> {
        Ok(u32::from_ne_bytes(self.array(off)?))
    }
    pub fn u64_at(&self, off: u64) -> Result<u64, OutOfBounds> {
        Ok(u64::from_ne_bytes(self.array(off)?))
    }

    fn atomic_u32(&self, off: u64) -> Result<&AtomicU32, OutOfBounds> {
        let at = self.check(off, 4)?;
        if at % 4 != 0 {
            return Err(OutOfBounds {
                off,
                len: 4,
                size: self.len as u64,
            });
        }
        // SAFETY: the word is inside the region (checked), 4-aligned (base is
        // 8-aligned per `SharedMem`, `at` checked above), lives as long as
        // 'a, and the index words are only ever accessed atomically by all
        // parties (the `SharedMem` contract; the kernel uses READ_ONCE /
        // WRITE_ONCE-style single-word accesses on them).
        Ok(unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(at).cast::<u32>()) })
    }

    /// Acquire-load of a 4-aligned `u32` (the producer's index).
    pub fn load_acquire(&self, off: u64) -> Result<u32, OutOfBounds> {
        Ok(self.atomic_u32(off)?.load(Ordering::Acquire))
    }

    /// Release-store of a 4-aligned `u32` (the consumer's index): everything
    /// written before becomes visible to whoever acquire-loads it.
    pub fn store_release(&self, off: u64, v: u32) -> Result<(), OutOfBounds> {
        self.atomic_u32(off)?.store(v, Ordering::Release);
        Ok(())
    }
}

/// Plain heap memory standing in for the uio mapping in tests, benches and
/// simulations. Shared (`Arc`) between the ring and the code playing the
/// kernel; that code must not run concurrently with the ring except
/// through the index words.
pub struct HeapMem {
    words: Box<[std::cell::UnsafeCell<u64>]>,
}

// SAFETY: all access to the cells goes through `Region` raw-pointer copies or
// atomics on the index words; users of `HeapMem` serialise their other
// accesses (documented above), as the kernel and a TCMU handler do.
unsafe impl Sync for HeapMem {}
// SAFETY: the cells own plain integers; moving them between threads is fine.
unsafe impl Send for HeapMem {}

impl HeapMem {
    /// Zeroed memory of `len` bytes (rounded up to 8).
    pub fn new(len: usize) -> Self {
        let words = (0..len.div_ceil(8))
            .map(|_| std::cell::UnsafeCell::new(0u64))
            .collect();
        HeapMem { words }
    }
}

// SAFETY: the boxed slice is a live allocation of `len()` bytes for the
// lifetime of `HeapMem`, 8-aligned because its elements are u64 cells, and
// `UnsafeCell` makes writes through the shared pointer legitimate.
unsafe impl SharedMem for HeapMem {
    fn as_ptr(&self) -> NonNull<u8> {
        NonNull::new(self.words.as_ptr().cast::<u8>().cast_mut()).unwrap_or(NonNull::dangling())
    }
    fn len(&self) -> usize {
        self.words.len() * 8
    }
}

// SAFETY: forwards to the inner value, which upholds the contract; the Arc
// keeps it alive as long as this handle.
unsafe impl<T: SharedMem + Sync> SharedMem for std::sync::Arc<T> {
    fn as_ptr(&self) -> NonNull<u8> {
        (**self).as_ptr()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
}

/// The ring cannot be parsed any further: the next entry's position is
/// unknown. Cleared only by [`Ring::reset`] after the kernel reset the ring.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error("cmd_head {0} is outside the ring or not 8-aligned")]
    Head(u32),
    #[error("entry at {off} has length 0")]
    ZeroLength { off: u32 },
    #[error("entry at {off} of {len} bytes crosses the end of the ring")]
    CrossesEnd { off: u32, len: u32 },
    #[error("entry at {off} of {len} bytes extends past cmd_head")]
    PastHead { off: u32, len: u32 },
    #[error("CMD entry at {off} of {len} bytes cannot hold a response")]
    ShortCmd { off: u32, len: u32 },
    #[error("cmd_id {0} is already outstanding")]
    DuplicateId(u16),
}

/// Ring-level errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("mailbox version {0}, this code speaks version 2")]
    Version(u16),
    #[error("mailbox places the command ring at {off}+{size} in a {len}-byte mapping")]
    Layout { off: u32, size: u32, len: usize },
    #[error("command ring broken: {0}")]
    Broken(#[from] Broken),
    #[error("cmd_id {0} is not outstanding (completed twice, or from before a ring reset)")]
    NotOutstanding(u16),
    #[error(transparent)]
    OutOfBounds(#[from] OutOfBounds),
}

/// Why a well-framed CMD entry was failed without being executed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryFault {
    #[error("iovec counts need {need} bytes, entry has {len}")]
    IovCounts { need: u64, len: u32 },
    #[error("cdb_off {cdb_off} does not lie after the iovecs inside the entry")]
    CdbOutside { cdb_off: u64 },
    #[error("CDB of {cdb_len} bytes overruns the entry")]
    CdbTruncated { cdb_len: usize },
    #[error("iovec {index} ({base}+{len}) lies outside the data area")]
    IovOutside { index: usize, base: u64, len: u64 },
    #[error("iovecs total {total} bytes, more than the {area}-byte data area")]
    DataTooLarge { total: u64, area: u64 },
}

/// A validated `(offset, length)` inside the data area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoSeg {
    pub off: u64,
    pub len: u64,
}

/// One SCSI command taken off the ring. Not `Clone`: it is handed back to
/// [`Ring::complete`] exactly once.
#[derive(Debug, PartialEq, Eq)]
pub struct Command {
    pub cmd_id: u16,
    pub cdb: Vec<u8>,
    /// `iov[0..iov_cnt]`: data-out or data-in depending on the command; for a
    /// bidirectional command, the data-out part.
    pub iovs: Vec<IoSeg>,
    /// `iov[iov_cnt..iov_cnt + iov_bidi_cnt]`: data-in of a bidirectional command.
    pub bidi_iovs: Vec<IoSeg>,
    generation: u64,
}

impl Command {
    pub fn is_bidi(&self) -> bool {
        !self.bidi_iovs.is_empty()
    }

    /// Bytes the data-in buffers can hold.
    pub fn data_in_capacity(&self) -> u64 {
        seg_total(if self.is_bidi() {
            &self.bidi_iovs
        } else {
            &self.iovs
        })
    }

    /// Bytes in `iovs`.
    pub fn data_len(&self) -> u64 {
        seg_total(&self.iovs)
    }
}

fn seg_total(segs: &[IoSeg]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// A TMR notification (`TCMU_MAILBOX_FLAG_CAP_TMR`): the kernel tells which
/// ring commands a task management function aborted. Those commands still
/// need their completion; the kernel discards it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TmrNotice {
    pub tmr_type: u8,
    pub cmd_ids: Vec<u16>,
}

/// What the ring produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Cmd(Command),
    Tmr(TmrNotice),
    /// A TMR entry whose `cmd_cnt` does not fit its length; skipped.
    BadTmr {
        off: u32,
        len: u32,
    },
    /// A CMD entry with bad contents, already completed with CHECK CONDITION.
    Failed {
        cmd_id: u16,
        fault: EntryFault,
    },
    /// An entry with an opcode we do not know: flagged and skipped.
    UnknownOp {
        off: u32,
        op: u32,
    },
}

/// How a command ends.
#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    pub status: u8,
    /// Sense data for CHECK CONDITION (truncated to 96 bytes).
    pub sense: &'a [u8],
    /// Data-in, scattered into the command's data-in iovecs (truncated to
    /// their capacity; a shorter one is reported as `read_len`).
    pub data_in: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotKind {
    /// PAD, TMR, unknown op: nothing to write, released as soon as reached.
    Skip,
    /// A CMD entry: released once a response has been written into it.
    Cmd { cmd_id: u16, done: bool },
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    off: u32,
    len: u32,
    kind: SlotKind,
}

/// CHECK CONDITION sense for a command we refuse to run: HARDWARE ERROR,
/// INTERNAL TARGET FAILURE (fixed format).
pub const SENSE_INTERNAL_TARGET_FAILURE: [u8; 18] = fixed_sense(0x04, 0x44, 0x00);

/// Fixed-format sense data (SPC-4 4.5.3) with just key/ASC/ASCQ.
pub const fn fixed_sense(key: u8, asc: u8, ascq: u8) -> [u8; 18] {
    let mut s = [0u8; 18];
    s[0] = 0x70;
    s[2] = key & 0x0f;
    s[7] = 10;
    s[12] = asc;
    s[13] = ascq;
    s
}

/// Length of a CDB given its first byte (and byte 7 for variable-length
/// CDBs), as the kernel sizes the copy it puts into the entry.
pub fn cdb_len(opcode: u8, byte7: u8) -> usize {
    if opcode == 0x7f {
        return usize::from(byte7) + 8;
    }
    const GROUP: [usize; 8] = [6, 10, 10, 12, 16, 12, 10, 10];
    GROUP[usize::from(opcode >> 5)]
}

/// The consumer side of one device's command ring.
pub struct Ring<M: SharedMem> {
    mem: M,
    flags: u16,
    cmdr_off: u64,
    cmdr_size: u32,
    data_off: u64,
    data_end: u64,
    /// Next entry to parse, relative to the ring start.
    cursor: u32,
    /// Our copy of `cmd_tail` (we are its only writer).
    tail: u32,
    slots: VecDeque<Slot>,
    outstanding: HashSet<u16>,
    broken: Option<Broken>,
    generation: u64,
    kick: bool,
}

impl<M: SharedMem> std::fmt::Debug for Ring<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("flags", &self.flags)
            .field("cmdr_off", &self.cmdr_off)
            .field("cmdr_size", &self.cmdr_size)
            .field("cursor", &self.cursor)
            .field("tail", &self.tail)
            .field("outstanding", &self.outstanding.len())
            .field("broken", &self.broken)
            .finish()
    }
}

impl<M: SharedMem> Ring<M> {
    /// Validate the mailbox and start consuming at the current `cmd_tail`.
    pub fn new(mem: M) -> Result<Self, RingError> {
        let r = Region::new(&mem);
        let version = r.u16_at(MB_VERSION as u64)?;
        if version != TCMU_MAILBOX_VERSION {
            return Err(RingError::Version(version));
        }
        let flags = r.u16_at(MB_FLAGS as u64)?;
        let off = r.u32_at(MB_CMDR_OFF as u64)?;
        let size = r.u32_at(MB_CMDR_SIZE as u64)?;
        let len = r.len();
        let end = u64::from(off) + u64::from(size);
        let align = u64::from(TCMU_OP_ALIGN_SIZE);
        if (off as usize) < MAILBOX_SIZE
            || u64::from(off) % align != 0
            || size == 0
            || u64::from(size) % align != 0
            || end > len as u64
        {
            return Err(RingError::Layout { off, size, len });
        }
        let tail = r.load_acquire(MB_CMD_TAIL as u64)?;
        let tail = if tail < size && tail % TCMU_OP_ALIGN_SIZE == 0 {
            tail
        } else {
            // A garbage tail (left by a crashed handler?) cannot be a
            // position the kernel expects; start at 0 and let the kernel's
            // reset put head and tail together.
            0
        };
        Ok(Ring {
            flags,
            cmdr_off: u64::from(off),
            cmdr_size: size,
            data_off: end,
            data_end: len as u64,
            cursor: tail,
            tail,
            slots: VecDeque::new(),
            outstanding: HashSet::new(),
            broken: None,
            generation: 0,
            kick: false,
            mem,
        })
    }

    /// Mailbox capability flags (`TCMU_MAILBOX_FLAG_CAP_*`).
    pub fn flags(&self) -> u16 {
        self.flags
    }

    pub fn out_of_order(&self) -> bool {
        self.flags & TCMU_MAILBOX_FLAG_CAP_OOOC != 0
    }

    /// Commands taken off the ring and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    pub fn broken(&self) -> Option<&Broken> {
        self.broken.as_ref()
    }

    /// True once since the last call if `cmd_tail` moved: the caller should
    /// then write to the uio fd so the kernel reclaims the space.
    pub fn take_kick(&mut self) -> bool {
        std::mem::take(&mut self.kick)
    }

    /// The shared memory, for the owner (e.g. to unmap it).
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// Forget everything after the kernel reset the ring (configfs
    /// `action/reset_ring`: head = tail = 0, every command it had queued is
    /// failed or requeued by the kernel). Commands taken before the reset
    /// can no longer be completed ([`RingError::NotOutstanding`]), so their
    /// stale results never reach the kernel.
    pub fn reset(&mut self) -> Result<(), RingError> {
        let r = Region::new(&self.mem);
        let tail = r.load_acquire(MB_CMD_TAIL as u64)?;
        let tail = if tail < self.cmdr_size && tail % TCMU_OP_ALIGN_SIZE == 0 {
            tail
        } else {
            0
        };
        self.cursor = tail;
        self.tail = tail;
        self.slots.clear();
        self.outstanding.clear();
        self.broken = None;
        self.generation += 1;
        Ok(())
    }

    fn entry_abs(&self, off: u32) -> u64 {
        self.cmdr_off + u64::from(off)
    }

    fn fail(&mut self, b: Broken) -> RingError {
        self.broken = Some(b.clone());
        RingError::Broken(b)
    }

    /// Take the next event off the ring, `Ok(None)` when the ring is empty.
    /// PAD entries are consumed silently.
    pub fn next_event(&mut self) -> Result<Option<Event>, RingError> {
        if let Some(b) = &self.broken {
            return Err(RingError::Broken(b.clone()));
        }
        loop {
            let head = Region::new(&self.mem).load_acquire(MB_CMD_HEAD as u64)?;
            if head >= self.cmdr_size || head % TCMU_OP_ALIGN_SIZE != 0 {
                return Err(self.fail(Broken::Head(head)));
            }
            if self.cursor == head {
                return Ok(None);
            }
            let off = self.cursor;
            let avail = if head > off {
                head - off
            } else {
                self.cmdr_size - off + head
            };
            let abs = self.entry_abs(off);
            let len_op = Region::new(&self.mem).u32_at(abs + HDR_LEN_OP as u64)?;
            let len = hdr_get_len(len_op);
            let op = hdr_get_op(len_op);
            if len == 0 {
                return Err(self.fail(Broken::ZeroLength { off }));
            }
            if u64::from(off) + u64::from(len) > u64::from(self.cmdr_size) {
                return Err(self.fail(Broken::CrossesEnd { off, len }));
            }
            if len > avail {
                return Err(self.fail(Broken::PastHead { off, len }));
            }
            match op {
                TCMU_OP_PAD => {
                    self.push(off, len, SlotKind::Skip);
                    continue;
                }
                TCMU_OP_TMR => {
                    let ev = self.parse_tmr(abs, off, len)?;
                    self.push(off, len, SlotKind::Skip);
                    return Ok(Some(ev));
                }
                TCMU_OP_CMD => return self.take_cmd(abs, off, len).map(Some),
                _ => {
                    let r = Region::new(&self.mem);
                    let uflags = r.u8_at(abs + HDR_UFLAGS as u64)?;
                    r.write(abs + HDR_UFLAGS as u64, &[uflags | TCMU_UFLAG_UNKNOWN_OP])?;
                    self.push(off, len, SlotKind::Skip);
                    return Ok(Some(Event::UnknownOp { off, op }));
                }
            }
        }
    }

    /// Record a consumed entry and move the cursor past it.
    fn push(&mut self, off: u32, len: u32, kind: SlotKind) {
        self.slots.push_back(Slot { off, len, kind });
        self.cursor = (off + len) % self.cmdr_size;
        self.retire();
    }

    fn parse_tmr(&mut self, abs: u64, off: u32, len: u32) -> Result<Event, RingError> {
        let r = Region::new(&self.mem);
        if (len as usize) < TMR_ENTRY_SIZE {
            return Ok(Event::BadTmr { off, len });
        }
        let tmr_type = r.u8_at(abs + TMR_TYPE as u64)?;
        let cnt = r.u32_at(abs + TMR_CMD_CNT as u64)?;
        let need = TMR_CMD_IDS as u64 + 2 * u64::from(cnt);
        if need > u64::from(len) {
            return Ok(Event::BadTmr { off, len });
        }
        let mut cmd_ids = Vec::with_capacity(cnt as usize);
        for i in 0..u64::from(cnt) {
            cmd_ids.push(r.u16_at(abs + TMR_CMD_IDS as u64 + 2 * i)?);
        }
        Ok(Event::Tmr(TmrNotice { tmr_type, cmd_ids }))
    }

    fn take_cmd(&mut self, abs: u64, off: u32, len: u32) -> Result<Event, RingError> {
        if (len as usize) < CMD_ENTRY_SIZE {
            return Err(self.fail(Broken::ShortCmd { off, len }));
        }
        let cmd_id = Region::new(&self.mem).u16_at(abs + HDR_CMD_ID as u64)?;
        if self.outstanding.contains(&cmd_id) {
            return Err(self.fail(Broken::DuplicateId(cmd_id)));
        }
        let parsed = self.parse_cmd(abs, len, cmd_id);
        self.outstanding.insert(cmd_id);
        self.slots.push_back(Slot {
            off,
            len,
            kind: SlotKind::Cmd {
                cmd_id,
                done: false,
            },
        });
        self.cursor = (off + len) % self.cmdr_size;
        match parsed {
            Ok(cmd) => Ok(Event::Cmd(cmd)),
            Err(fault) => {
                let generation = self.generation;
                self.complete_id(
                    cmd_id,
                    generation,
                    Response {
                        status: 0x02,
                        sense: &SENSE_INTERNAL_TARGET_FAILURE,
                        data_in: &[],
                    },
                    &[],
                )?;
                Ok(Event::Failed { cmd_id, fault })
            }
        }
    }

    /// Decode a CMD entry's request half. Errors are per-entry faults; an
    /// out-of-bounds read here cannot happen for a framed entry, but is
    /// mapped to a fault rather than trusted.
    fn parse_cmd(&self, abs: u64, len: u32, cmd_id: u16) -> Result<Command, EntryFault> {
        let r = Region::new(&self.mem);
        let entry_end = abs + u64::from(len);
        let rd32 = |o: usize| r.u32_at(abs + o as u64).unwrap_or(u32::MAX);
        let (n_out, n_bidi, n_dif) = (
            u64::from(rd32(REQ_IOV_CNT)),
            u64::from(rd32(REQ_IOV_BIDI_CNT)),
            u64::from(rd32(REQ_IOV_DIF_CNT)),
        );
        let n_all = n_out + n_bidi + n_dif;
        let iov_end = REQ_IOV as u64 + IOVEC_SIZE as u64 * n_all;
        if iov_end > u64::from(len) {
            return Err(EntryFault::IovCounts { need: iov_end, len });
        }
        let cdb_off = r
            .u64_at(abs + REQ_CDB_OFF as u64)
            .map_err(|_| EntryFault::CdbOutside { cdb_off: u64::MAX })?;
        if cdb_off < abs + iov_end || cdb_off >= entry_end {
            return Err(EntryFault::CdbOutside { cdb_off });
        }
        let first = r.u8_at(cdb_off).unwrap_or(0);
        let byte7 = if cdb_off + 8 <= entry_end {
            r.u8_at(cdb_off + 7).unwrap_or(0)
        } else {
            0
        };
        let cdb_len = cdb_len(first, byte7);
        if cdb_off + cdb_len as u64 > entry_end {
            return Err(EntryFault::CdbTruncated { cdb_len });
        }
        let mut cdb = vec![0u8; cdb_len];
        r.read(cdb_off, &mut cdb)
            .map_err(|_| EntryFault::CdbTruncated { cdb_len })?;

        let area = self.data_end - self.data_off;
        let mut total = 0u64;
        let mut segs = Vec::with_capacity((n_out + n_bidi) as usize);
        // DIF iovecs are validated but not used: protection information is
        // never enabled on these devices.
        for i in 0..n_all {
            let at = abs + REQ_IOV as u64 + IOVEC_SIZE as u64 * i;
            let base = r.u64_at(at).unwrap_or(u64::MAX);
            let l = r.u64_at(at + 8).unwrap_or(u64::MAX);
            let inside =
                base >= self.data_off && base.checked_add(l).is_some_and(|e| e <= self.data_end);
            if !inside {
                return Err(EntryFault::IovOutside {
                    index: i as usize,
                    base,
                    len: l,
                });
            }
            total += l;
            if total > area {
                return Err(EntryFault::DataTooLarge { total, area });
            }
            if i < n_out + n_bidi {
                segs.push(IoSeg { off: base, len: l });
            }
        }
        let bidi_iovs = segs.split_off(n_out as usize);
        Ok(Command {
            cmd_id,
            cdb,
            iovs: segs,
            bidi_iovs,
            generation: self.generation,
        })
    }

    /// Copy a command's data-out (its `iovs`) out of the data area.
    pub fn gather(&self, cmd: &Command) -> Result<Vec<u8>, RingError> {
        self.gather_segs(&cmd.iovs)
    }

    fn gather_segs(&self, segs: &[IoSeg]) -> Result<Vec<u8>, RingError> {
        let r = Region::new(&self.mem);
        let mut out = vec![0u8; seg_total(segs) as usize];
        let mut at = 0usize;
        for s in segs {
            let n = s.len as usize;
            r.read(s.off, out.get_mut(at..at + n).unwrap_or(&mut []))?;
            at += n;
        }
        Ok(out)
    }

    /// Scatter `data` into `segs`; returns the bytes written.
    fn scatter(&self, segs: &[IoSeg], data: &[u8]) -> Result<usize, RingError> {
        let r = Region::new(&self.mem);
        let mut rest = data;
        let mut done = 0;
        for s in segs {
            if rest.is_empty() {
                break;
            }
            let n = (s.len as usize).min(rest.len());
            let (now, later) = rest.split_at(n);
            r.write(s.off, now)?;
            rest = later;
            done += n;
        }
        Ok(done)
    }

    /// Complete a command: scatter data-in, write status/sense into the ring
    /// and release every entry that is now finished.
    pub fn complete(&mut self, cmd: Command, resp: Response<'_>) -> Result<(), RingError> {
        let segs = if cmd.is_bidi() {
            &cmd.bidi_iovs
        } else {
            &cmd.iovs
        };
        self.complete_id(cmd.cmd_id, cmd.generation, resp, segs)
    }

    fn complete_id(
        &mut self,
        cmd_id: u16,
        generation: u64,
        resp: Response<'_>,
        in_segs: &[IoSeg],
    ) -> Result<(), RingError> {
        if generation != self.generation || !self.outstanding.contains(&cmd_id) {
            return Err(RingError::NotOutstanding(cmd_id));
        }
        let capacity = seg_total(in_segs);
        let written = if resp.data_in.is_empty() {
            0
        } else {
            self.scatter(in_segs, resp.data_in)?
        };
        let short = (written as u64) < capacity;
        let slot_idx = if self.out_of_order() {
            self.retire();
            // The first unreleased slot is a CMD slot: releasable ones were
            // just retired, and one CMD slot exists per outstanding command.
            self.slots
                .iter()
                .position(|s| matches!(s.kind, SlotKind::Cmd { done: false, .. }))
        } else {
            self.slots.iter().position(
                |s| matches!(s.kind, SlotKind::Cmd { cmd_id: id, done: false } if id == cmd_id),
            )
        };
        let Some(idx) = slot_idx else {
            return Err(RingError::NotOutstanding(cmd_id));
        };
        let slot_off = self.slots.get(idx).map(|s| s.off).unwrap_or_default();
        let abs = self.entry_abs(slot_off);
        let r = Region::new(&self.mem);
        let read_len = self.flags & TCMU_MAILBOX_FLAG_CAP_READ_LEN != 0 && short;
        r.write(abs + HDR_CMD_ID as u64, &cmd_id.to_ne_bytes())?;
        r.write(
            abs + HDR_UFLAGS as u64,
            &[if read_len { TCMU_UFLAG_READ_LEN } else { 0 }],
        )?;
        r.write(abs + RSP_SCSI_STATUS as u64, &[resp.status, 0, 0, 0])?;
        r.write(abs + RSP_READ_LEN as u64, &(written as u32).to_ne_bytes())?;
        let sense = resp
            .sense
            .get(..TCMU_SENSE_BUFFERSIZE)
            .unwrap_or(resp.sense);
        r.write(abs + RSP_SENSE as u64, sense)?;
        r.fill(
            abs + (RSP_SENSE + sense.len()) as u64,
            (TCMU_SENSE_BUFFERSIZE - sense.len()) as u64,
            0,
        )?;
        if let Some(s) = self.slots.get_mut(idx) {
            if let SlotKind::Cmd { done, .. } = &mut s.kind {
                *done = true;
            }
        }
        self.outstanding.remove(&cmd_id);
        self.retire();
        Ok(())
    }

    /// Release the finished prefix of the consumed entries.
    fn retire(&mut self) {
        let mut moved = false;
        while let Some(front) = self.slots.front() {
            let releasable = match front.kind {
                SlotKind::Skip => true,
                SlotKind::Cmd { done, .. } => done,
            };
            if !releasable {
                break;
            }
            self.tail = (front.off + front.len) % self.cmdr_size;
            self.slots.pop_front();
            moved = true;
        }
        if moved {
            // The index word is 4-aligned inside the mailbox, checked at
            // construction, so this store cannot fail.
            let _ = Region::new(&self.mem).store_release(MB_CMD_TAIL as u64, self.tail);
            self.kick = true;
        }
    }
}

#[cfg(test)]
mod tests;
