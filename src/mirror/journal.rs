//! The ordered write journal of an Async association.
//!
//! Every host write (and every flush, zeroing and discard) on the source is
//! appended here as a checksummed record before the primary write is issued,
//! under the source's range lock, so the record order is the order the
//! primary saw. A shipper thread takes the records in sequence order,
//! applies them to the replica and trims the journal. Applying records in
//! order, with flush records mapped to replica flushes, keeps the replica a
//! crash-consistent earlier image of the source.
//!
//! ## Group append and shipping from memory
//! Appending only encodes the record into its own buffer and queues it
//! (*staged*) under the journal mutex; the file position is reserved at the
//! same time, so the order in the file is the sequence order. Once
//! `WRITE_BATCH_BYTES` are staged, the appender that finds no write in
//! progress becomes the *leader*: outside the mutex it writes every staged
//! record with one `pwritev` per run, and repeats while a full batch was
//! staged meanwhile (a few rounds at most, then the next appender takes
//! over). Other appenders return at once. [`Journal::sync_to`] (FUA, flush,
//! the activity-log housekeeping round) first gets every record up to its
//! sequence number into the file, then `fdatasync`s (group commit); reading
//! a record from the file writes the staged ones first.
//!
//! The same buffer stays attached to the pending record (up to
//! [`JournalConfig::memory_cap`] bytes of them), so the shipper applies it
//! without reading the file back; records beyond the cap, and everything
//! replayed at open, are read from the segment file.
//!
//! A record that is staged but not yet in the file when the process dies is
//! lost. That is safe: the association's activity log marked the region
//! durably before the record was appended, and the marks are cleared only
//! after a [`Journal::sync_all`] that writes the staged records, so after a
//! restart such a region is resynchronised from the primary (after the
//! replay of what the file holds). Records acknowledged by a FUA write or a
//! flush are always in the file and durable.
//!
//! ## Inline apply
//! While the shipper has nothing older to apply, a small plain write
//! ([`INLINE_APPLY_MAX`], not FUA) is *claimed* at append: its writer
//! applies it to the replica right after the primary write, from the host's
//! buffer, before the host sees the completion
//! ([`Journal::append_write_inline`], [`InlineClaim`]). The record is
//! journaled as any other (same file, same replay), the shipper is not
//! woken for it, and it leaves the pending queue as soon as it and every
//! older record are applied. That spares the shipper's wake-up, its second
//! pass over the record and the thread handoff, which on a busy machine
//! cost more than the replica write itself.
//!
//! Order is kept by one rule: a record is claimed only when every older
//! pending record is itself claimed (being applied by its writer, or done).
//! Those writers have not completed to the host yet, so the new write
//! cannot depend on them, and SCSI leaves concurrent writes unordered;
//! overlapping writes are serialised by the source's range lock anyway.
//! Once one record waits for the shipper, later records wait behind it, and
//! the shipper stops at a record that is still being applied inline
//! ([`Journal::next_batch`]), so `applied_seq` never passes an unapplied
//! record. A claim that ends without the replica write (primary error,
//! replica error, unwinding) hands the record to the shipper, which retries
//! it and fails the association as for any record. Async keeps its
//! purpose: a failed, stalled (20 ms) or slow (1 ms moving mean) inline
//! write pauses inline apply for a second, so a replica that slows down
//! stops adding its latency to host writes, and large or FUA writes are
//! never applied inline. The price is the guarantee that a host write
//! never waits for the replica: a replica write that *hangs* (rather than
//! slows) holds the host writes being applied inline at that moment (later
//! ones go to the shipper), so it is off unless configured
//! ([`JournalConfig::inline_apply`], `daemon.async_inline_apply`).
//!
//! ## On-disk format
//! A journal is a directory of segment files `<first-seq>.jnl` (20 decimal
//! digits) plus `head` (the last sequence number known to be applied *and*
//! flushed on the replica, written atomically). A segment is a sequence of
//! records, each a 48-byte little-endian header followed by the data:
//!
//! | off | size | field |
//! |----:|----:|---|
//! | 0 | 4 | magic `LMJR` |
//! | 4 | 2 | version (1) |
//! | 6 | 2 | kind: 1 write, 2 flush, 3 write zeroes, 4 discard |
//! | 8 | 4 | flags: bit 0 FUA |
//! | 12 | 4 | reserved, 0 |
//! | 16 | 8 | sequence number (contiguous, +1 per record) |
//! | 24 | 8 | byte offset on the source |
//! | 32 | 8 | extent length in bytes |
//! | 40 | 4 | data length (= extent length for writes, else 0) |
//! | 44 | 4 | CRC32C of bytes 0..44 and the data |
//!
//! Replay (at open) reads the segments in order and stops at the first
//! record that is truncated, fails its checksum or breaks the sequence; the
//! segment is truncated there and later segments are deleted. Whatever was
//! lost that way was never made durable by a flush/FUA, and the regions it
//! touched are still marked in the association's activity log, so they get
//! resynchronised from the primary.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Size of a record header.
pub const HEADER_LEN: usize = 48;
const MAGIC: [u8; 4] = *b"LMJR";
const VERSION: u16 = 1;
/// Largest data payload of one record (a single host write).
pub const MAX_DATA: u32 = 64 << 20;
const FLAG_FUA: u32 = 1;

/// What a record asks the shipper to do on the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Write,
    Flush,
    WriteZeroes,
    Discard,
}

impl RecordKind {
    fn code(self) -> u16 {
        match self {
            RecordKind::Write => 1,
            RecordKind::Flush => 2,
            RecordKind::WriteZeroes => 3,
            RecordKind::Discard => 4,
        }
    }

    fn from_code(c: u16) -> Option<Self> {
        Some(match c {
            1 => RecordKind::Write,
            2 => RecordKind::Flush,
            3 => RecordKind::WriteZeroes,
            4 => RecordKind::Discard,
            _ => return None,
        })
    }
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub fua: bool,
    pub seq: u64,
    pub offset: u64,
    pub length: u64,
    pub data_len: u32,
    pub crc: u32,
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record truncated")]
    Truncated,
    #[error("bad record magic")]
    BadMagic,
    #[error("unsupported record version {0}")]
    BadVersion(u16),
    #[error("unknown record kind {0}")]
    BadKind(u16),
    #[error("inconsistent record lengths")]
    BadLength,
    #[error("record checksum mismatch")]
    BadChecksum,
    #[error("sequence {found} where {expected} was expected")]
    OutOfSequence { expected: u64, found: u64 },
}

fn le_u16(b: &[u8], at: usize) -> Result<u16, RecordError> {
    let s = b.get(at..at + 2).ok_or(RecordError::Truncated)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}
fn le_u32(b: &[u8], at: usize) -> Result<u32, RecordError> {
    let s = b.get(at..at + 4).ok_or(RecordError::Truncated)?;
    let mut a = [0u8; 4];
    a.copy_from_slice(s);
    Ok(u32::from_le_bytes(a))
}
fn le_u64(b: &[u8], at: usize) -> Result<u64, RecordError> {
    let s = b.get(at..at + 8).ok_or(RecordError::Truncated)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

/// Encode one record (header + data).
pub fn encode_record(
    kind: RecordKind,
    fua: bool,
    seq: u64,
    offset: u64,
    length: u64,
    data: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + data.len());
    out.resize(HEADER_LEN, 0);
    out.extend_from_slice(data);
    encode_header(&mut out, kind, fua, seq, offset, length);
    out
}

/// Fill in the header of `rec` (`HEADER_LEN` bytes, then the data), with
/// the checksum over header and data.
fn encode_header(rec: &mut [u8], kind: RecordKind, fua: bool, seq: u64, offset: u64, length: u64) {
    let data_len = rec.len().saturating_sub(HEADER_LEN) as u32;
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[6..8].copy_from_slice(&kind.code().to_le_bytes());
    h[8..12].copy_from_slice(&(if fua { FLAG_FUA } else { 0 }).to_le_bytes());
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    h[24..32].copy_from_slice(&offset.to_le_bytes());
    h[32..40].copy_from_slice(&length.to_le_bytes());
    h[40..44].copy_from_slice(&data_len.to_le_bytes());
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&h[..44]),
        rec.get(HEADER_LEN..).unwrap_or_default(),
    );
    h[44..48].copy_from_slice(&crc.to_le_bytes());
    if let Some(dst) = rec.get_mut(..HEADER_LEN) {
        dst.copy_from_slice(&h);
    }
}

/// Decode and sanity-check a header (the checksum needs the data too: see
/// [`verify_record`]).
pub fn decode_header(b: &[u8]) -> Result<RecordHeader, RecordError> {
    if b.len() < HEADER_LEN {
        return Err(RecordError::Truncated);
    }
    if b.get(0..4) != Some(&MAGIC[..]) {
        return Err(RecordError::BadMagic);
    }
    let version = le_u16(b, 4)?;
    if version != VERSION {
        return Err(RecordError::BadVersion(version));
    }
    let code = le_u16(b, 6)?;
    let kind = RecordKind::from_code(code).ok_or(RecordError::BadKind(code))?;
    let flags = le_u32(b, 8)?;
    let h = RecordHeader {
        kind,
        fua: flags & FLAG_FUA != 0,
        seq: le_u64(b, 16)?,
        offset: le_u64(b, 24)?,
        length: le_u64(b, 32)?,
        data_len: le_u32(b, 40)?,
        crc: le_u32(b, 44)?,
    };
    let lengths_ok = match kind {
        RecordKind::Write => h.data_len as u64 == h.length && h.data_len <= MAX_DATA,
        RecordKind::Flush => h.data_len == 0 && h.length == 0,
        RecordKind::WriteZeroes | RecordKind::Discard => h.data_len == 0,
    };
    if !lengths_ok || h.offset.checked_add(h.length).is_none() {
        return Err(RecordError::BadLength);
    }
    Ok(h)
}

/// Check a record's checksum over its raw header bytes and data.
pub fn verify_record(
    header_bytes: &[u8],
    h: &RecordHeader,
    data: &[u8],
) -> Result<(), RecordError> {
    let covered = header_bytes.get(..44).ok_or(RecordError::Truncated)?;
    if data.len() != h.data_len as usize {
        return Err(RecordError::Truncated);
    }
    if crc32c::crc32c_append(crc32c::crc32c(covered), data) != h.crc {
        return Err(RecordError::BadChecksum);
    }
    Ok(())
}

/// Decode one whole record from the front of `b`; returns the header, the
/// data and the number of bytes consumed.
pub fn decode_record(b: &[u8]) -> Result<(RecordHeader, &[u8], usize), RecordError> {
    let h = decode_header(b)?;
    let end = HEADER_LEN + h.data_len as usize;
    let data = b.get(HEADER_LEN..end).ok_or(RecordError::Truncated)?;
    verify_record(b, &h, data)?;
    Ok((h, data, end))
}

/// Journal errors.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal I/O error: {0}")]
    Io(#[from] io::Error),
    /// The journal stayed over its size cap for the whole throttle timeout,
    /// or the shipper is stopped so it will never drain.
    #[error("journal full")]
    Full,
    #[error("journal record damaged: {0}")]
    Corrupt(#[from] RecordError),
    /// The record was dropped (the journal was drained) before it was read.
    #[error("journal record no longer available")]
    Gone,
}

/// Size and throttle settings.
#[derive(Debug, Clone, Copy)]
pub struct JournalConfig {
    /// Cap on the bytes of records not yet applied to the replica.
    pub cap: u64,
    /// Segment files are rotated when they would grow past this.
    pub segment_size: u64,
    /// How long a writer waits for space when the journal is full.
    pub throttle_timeout: Duration,
    /// Bytes of pending records whose data is kept in memory for the
    /// shipper (beyond that, records are read back from the file).
    pub memory_cap: u64,
    /// Writers apply their own small records while the shipper has
    /// nothing older to apply (see "Inline apply" in the module docs).
    /// Off by default (`daemon.async_inline_apply`).
    pub inline_apply: bool,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            cap: 1 << 30,
            segment_size: 64 << 20,
            throttle_timeout: Duration::from_secs(30),
            memory_cap: 64 << 20,
            inline_apply: false,
        }
    }
}

/// A record waiting to be shipped.
#[derive(Debug, Clone)]
pub struct PendingRecord {
    pub seq: u64,
    pub kind: RecordKind,
    pub fua: bool,
    pub offset: u64,
    pub length: u64,
    data_len: u32,
    segment: u64,
    pos: u64,
    enqueued: Instant,
    /// The encoded record (header + data), while it is kept in memory.
    mem: Option<Arc<Vec<u8>>>,
    /// Who applies it (see "Inline apply" in the module docs).
    applier: Applier,
}

/// Who applies a pending record to the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applier {
    /// Nobody yet: the shipper will.
    Nobody,
    /// Handed to the shipper by [`Journal::next_batch`].
    Shipper,
    /// Its writer is applying it ([`Journal::append_write_inline`]).
    Inline,
    /// Applied by its writer; popped as soon as it is the oldest.
    InlineDone,
}

impl PendingRecord {
    fn bytes(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.data_len)
    }

    /// The record's data, when it is held in memory (see the module docs).
    pub fn mem_data(&self) -> Option<&[u8]> {
        self.mem.as_ref().and_then(|m| m.get(HEADER_LEN..))
    }
}

/// An appended record whose bytes are not in its segment file yet.
#[derive(Debug)]
struct Staged {
    seq: u64,
    file: Arc<File>,
    pos: u64,
    bytes: Arc<Vec<u8>>,
}

/// Staged bytes at which an appender writes them out. Until then records
/// only wait in memory: each `pwritev` of a journal append costs a system
/// call and the file system's per-call work, so fewer, larger ones are
/// cheaper, and a record's place in the file matters only for `sync_to`,
/// file reads and crash replay (see the module docs).
const WRITE_BATCH_BYTES: u64 = 256 << 10;

/// How many rounds a leader writes before it leaves the staged records to
/// the next appender (bounds the latency added to the leader's own write).
const LEAD_ROUNDS: usize = 4;

/// Largest record its writer applies inline (larger ones take long enough
/// on the replica that the host should not wait for it).
pub const INLINE_APPLY_MAX: u64 = 128 << 10;
/// Inline apply pauses for `INLINE_PAUSE` when the moving mean of its
/// replica writes passes `INLINE_SLOW_MEAN` (single writes are often
/// longer: the writer was preempted) or one write takes `INLINE_STALL`.
const INLINE_SLOW_MEAN: Duration = Duration::from_millis(1);
const INLINE_STALL: Duration = Duration::from_millis(20);
const INLINE_PAUSE: Duration = Duration::from_secs(1);

/// Slices per `pwritev` (below every kernel's IOV_MAX of 1024).
const IOV_BATCH: usize = 512;

/// Write `bufs` back to back at `pos`, with as few `pwritev` calls as the
/// kernel allows; short writes and EINTR are retried.
fn pwritev_all(file: &File, bufs: &[&[u8]], mut pos: u64) -> io::Result<()> {
    let mut idx = 0usize;
    let mut skip = 0usize;
    while idx < bufs.len() {
        let slices: Vec<IoSlice<'_>> = bufs
            .iter()
            .skip(idx)
            .take(IOV_BATCH)
            .enumerate()
            .map(|(k, b)| {
                IoSlice::new(if k == 0 {
                    b.get(skip..).unwrap_or_default()
                } else {
                    b
                })
            })
            .collect();
        let at = i64::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let mut n = match nix::sys::uio::pwritev(file, &slices, at) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        pos += n as u64;
        while n > 0 && idx < bufs.len() {
            let left = bufs.get(idx).map_or(0, |b| b.len()) - skip;
            if n >= left {
                n -= left;
                idx += 1;
                skip = 0;
            } else {
                skip += n;
                n = 0;
            }
        }
        while bufs.get(idx).is_some_and(|b| b.len() == skip) {
            idx += 1;
            skip = 0;
        }
    }
    Ok(())
}

/// Write a batch of staged records (in sequence order): one `pwritev` per
/// run of records that are adjacent in the same file.
fn write_staged(batch: &[Staged]) -> io::Result<()> {
    let mut start = 0usize;
    while let Some(first) = batch.get(start) {
        let mut end = start + 1;
        let mut next_pos = first.pos + first.bytes.len() as u64;
        while let Some(s) = batch.get(end) {
            if !Arc::ptr_eq(&s.file, &first.file) || s.pos != next_pos {
                break;
            }
            next_pos += s.bytes.len() as u64;
            end += 1;
        }
        let bufs: Vec<&[u8]> = batch
            .get(start..end)
            .unwrap_or_default()
            .iter()
            .map(|s| s.bytes.as_slice())
            .collect();
        pwritev_all(&first.file, &bufs, first.pos)?;
        start = end;
    }
    Ok(())
}

/// Replication lag of an Async association.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Lag {
    pub records: u64,
    pub bytes: u64,
    pub oldest_age: Duration,
}

/// What replay found at open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Records waiting to be (re)applied.
    pub pending: u64,
    /// The first invalid record, if replay stopped early.
    pub stopped_at: Option<String>,
    /// Records between the head and the first segment are missing: the
    /// replica cannot be brought forward from the journal alone.
    pub gap: bool,
}

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    last_seq: Option<u64>,
    path: PathBuf,
    len: u64,
    file: Arc<File>,
    /// Closed and known to be completely durable. A segment is not synced
    /// when it is closed (that would stall every appender behind one
    /// `fdatasync` of a whole segment); the next `sync_to` syncs it, and
    /// a segment deleted after it was applied may never need it.
    durable: bool,
}

#[derive(Debug)]
struct Inner {
    segments: Vec<Segment>,
    /// Whether the last segment accepts appends.
    open_tail: bool,
    next_seq: u64,
    pending: VecDeque<PendingRecord>,
    pending_bytes: u64,
    /// Every record up to here is durable in the journal.
    synced_seq: u64,
    /// Applied (not necessarily durable) on the replica.
    applied_seq: u64,
    /// Recorded in `head`.
    head_seq: u64,
    dir_dirty: bool,
    shipping: bool,
    /// Appended records not handed to a writer yet, in sequence order.
    staged: Vec<Staged>,
    /// Their bytes.
    staged_bytes: u64,
    /// A leader is writing staged records (only one at a time, so batches
    /// reach the file in sequence order).
    writing: bool,
    /// Every record up to here is in its segment file.
    written_seq: u64,
    /// A staged write failed: the file has a hole, so nothing more can be
    /// appended until [`Journal::drain`] starts afresh.
    write_error: Option<String>,
    /// Bumped by `drain`: a leader's result for records of an older epoch
    /// is ignored.
    epoch: u64,
    /// Bytes of pending records holding their data in memory.
    mem_bytes: u64,
    /// The shipper waits on `data` (appenders wake it only then).
    shipper_waiting: bool,
    /// Threads waiting on `space` / `written`.
    space_waiters: u32,
    write_waiters: u32,
    /// What writers applied inline since the shipper last took the count
    /// (for its checkpoint accounting).
    inline_applied: InlineApplied,
    /// No inline apply before this (a slow or failed inline write).
    inline_paused_until: Option<Instant>,
    /// Moving mean (1/8 weight) of inline replica writes, microseconds.
    inline_mean_us: u64,
    /// Tests: appenders never lead, so records stay staged.
    #[cfg(test)]
    hold_writes: bool,
}

/// Records applied inline by their writers (see "Inline apply" in the
/// module docs), counted for the shipper's checkpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InlineApplied {
    pub records: u64,
    pub bytes: u64,
    /// The largest record's length.
    pub largest: u64,
}

/// A record its writer applies to the replica itself (see "Inline apply"
/// in the module docs). Dropped without [`InlineClaim::applied`] (the
/// primary write failed, a panic unwound), the record is left to the
/// shipper.
#[derive(Debug)]
pub struct InlineClaim {
    journal: Arc<Journal>,
    seq: u64,
    ended: bool,
}

impl InlineClaim {
    /// The replica write of the record ended after `took`: `ok` if it
    /// succeeded (else the shipper retries it).
    pub fn applied(mut self, ok: bool, took: Duration) {
        self.ended = true;
        self.journal.finish_inline(self.seq, ok, took);
    }
}

impl Drop for InlineClaim {
    fn drop(&mut self) {
        if !self.ended {
            self.journal.finish_inline(self.seq, false, Duration::ZERO);
        }
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    cfg: JournalConfig,
    inner: Mutex<Inner>,
    /// Signalled when records are applied (space freed) or shipping stops.
    space: Condvar,
    /// Signalled when records are appended (while the shipper waits) or
    /// shipping stops.
    data: Condvar,
    /// Signalled when a leader finished writing (for `write_waiters`).
    written: Condvar,
    sync_lock: Mutex<()>,
    /// Held while `head` is read from the state and written to its file.
    head_lock: Mutex<()>,
}

fn seg_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.jnl"))
}

fn read_head(dir: &Path) -> u64 {
    fs::read_to_string(dir.join("head"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

impl Journal {
    /// Open (creating if needed) the journal in `dir` and replay it.
    pub fn open(dir: &Path, cfg: JournalConfig) -> Result<(Journal, ReplayReport), JournalError> {
        fs::create_dir_all(dir)?;
        let head = read_head(dir);
        let mut names: Vec<(u64, PathBuf)> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let p = e.path();
                let name = p.file_name()?.to_str()?;
                let seq = name.strip_suffix(".jnl")?.parse::<u64>().ok()?;
                Some((seq, p))
            })
            .collect();
        names.sort();
        let mut report = ReplayReport::default();
        let mut segments = Vec::new();
        let mut pending = VecDeque::new();
        let mut pending_bytes = 0;
        let mut expected: Option<u64> = None;
        let mut stop = false;
        let now = Instant::now();
        for (first_seq, path) in names {
            if stop {
                fs::remove_file(&path)?;
                continue;
            }
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let bytes = fs::read(&path)?;
            let mut pos = 0usize;
            let mut last_seq = None;
            if expected.is_none() && first_seq > head + 1 {
                report.gap = true;
            }
            let mut want = expected.unwrap_or(first_seq);
            if want < first_seq && want <= head + 1 && first_seq == head + 1 {
                // The records in between were applied from memory (and
                // `head` recorded) but never reached the file before a
                // crash; the new segment continues right after `head`.
                want = first_seq;
            }
            if want != first_seq {
                report.stopped_at = Some(format!("segment {first_seq} does not follow {want}"));
                stop = true;
                drop(file);
                fs::remove_file(&path)?;
                continue;
            }
            while pos < bytes.len() {
                let rest = bytes.get(pos..).unwrap_or_default();
                let res = decode_record(rest).and_then(|(h, _, used)| {
                    if h.seq != want {
                        Err(RecordError::OutOfSequence {
                            expected: want,
                            found: h.seq,
                        })
                    } else {
                        Ok((h, used))
                    }
                });
                match res {
                    Ok((h, used)) => {
                        if h.seq > head {
                            let p = PendingRecord {
                                seq: h.seq,
                                kind: h.kind,
                                fua: h.fua,
                                offset: h.offset,
                                length: h.length,
                                data_len: h.data_len,
                                segment: first_seq,
                                pos: pos as u64,
                                enqueued: now,
                                mem: None,
                                applier: Applier::Nobody,
                            };
                            pending_bytes += p.bytes();
                            pending.push_back(p);
                        }
                        last_seq = Some(h.seq);
                        want += 1;
                        pos += used;
                    }
                    Err(e) => {
                        report.stopped_at = Some(format!("{}@{}: {e}", path.display(), pos));
                        file.set_len(pos as u64)?;
                        file.sync_all()?;
                        stop = true;
                        break;
                    }
                }
            }
            expected = Some(want);
            segments.push(Segment {
                first_seq,
                last_seq,
                path,
                len: pos as u64,
                file: Arc::new(file),
                durable: false,
            });
        }
        crate::registry::fsync_dir(dir)?;
        let next_seq = expected.unwrap_or(head + 1).max(head + 1);
        report.pending = pending.len() as u64;
        let applied = next_seq - 1 - pending.len() as u64;
        let j = Journal {
            dir: dir.to_path_buf(),
            cfg,
            inner: Mutex::new(Inner {
                segments,
                open_tail: false,
                next_seq,
                pending,
                pending_bytes,
                synced_seq: next_seq - 1,
                applied_seq: applied,
                head_seq: head,
                dir_dirty: false,
                shipping: true,
                staged: Vec::new(),
                staged_bytes: 0,
                writing: false,
                written_seq: next_seq - 1,
                write_error: None,
                epoch: 0,
                mem_bytes: 0,
                shipper_waiting: false,
                space_waiters: 0,
                write_waiters: 0,
                inline_applied: InlineApplied::default(),
                inline_paused_until: None,
                inline_mean_us: 0,
                #[cfg(test)]
                hold_writes: false,
            }),
            space: Condvar::new(),
            data: Condvar::new(),
            written: Condvar::new(),
            sync_lock: Mutex::new(()),
            head_lock: Mutex::new(()),
        };
        Ok((j, report))
    }

    fn locked(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn config(&self) -> JournalConfig {
        self.cfg
    }

    /// Append a record; returns its sequence number. Blocks while the
    /// journal is over its cap (see the throttle policy in
    /// docs/replication.md) and fails with `Full` after the throttle
    /// timeout or at once when nothing is shipping. The record is queued
    /// for the file (see "Group append" in the module docs); this call
    /// writes it only if no other thread is writing already.
    pub fn append(
        &self,
        kind: RecordKind,
        fua: bool,
        offset: u64,
        length: u64,
        data: &[u8],
    ) -> Result<u64, JournalError> {
        self.append_claim(kind, fua, offset, length, data, false)
            .map(|(seq, _)| seq)
    }

    /// [`Self::append`]; with `inline`, the record is claimed for its
    /// writer to apply when [`Self::inline_candidate`] allows (then the
    /// second value is `true` and the writer must end the claim with
    /// [`Self::finish_inline`]).
    fn append_claim(
        &self,
        kind: RecordKind,
        fua: bool,
        offset: u64,
        length: u64,
        data: &[u8],
        inline: bool,
    ) -> Result<(u64, bool), JournalError> {
        let rec_bytes = (HEADER_LEN + data.len()) as u64;
        let deadline = Instant::now() + self.cfg.throttle_timeout;
        // The data is copied before the mutex is taken; only the header,
        // which holds the sequence number, and the checksum need it.
        let mut rec = Vec::with_capacity(HEADER_LEN + data.len());
        rec.resize(HEADER_LEN, 0);
        rec.extend_from_slice(data);
        let mut g = self.locked();
        let need_new = loop {
            if let Some(e) = &g.write_error {
                return Err(JournalError::Io(io::Error::other(e.clone())));
            }
            if !g.pending.is_empty() && g.pending_bytes + rec_bytes > self.cfg.cap {
                if !g.shipping {
                    return Err(JournalError::Full);
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(JournalError::Full);
                }
                g.space_waiters += 1;
                g = self
                    .space
                    .wait_timeout(g, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                g.space_waiters -= 1;
                continue;
            }
            let need_new = match g.segments.last() {
                Some(s) if g.open_tail => s.len > 0 && s.len + rec_bytes > self.cfg.segment_size,
                _ => true,
            };
            if need_new && g.open_tail && g.writing {
                // The old tail must be completely in the file before it is
                // closed: wait for the leader.
                g.write_waiters += 1;
                g = self.written.wait(g).unwrap_or_else(|e| e.into_inner());
                g.write_waiters -= 1;
                continue;
            }
            if need_new && g.open_tail && !g.staged.is_empty() {
                // Once per segment: write what is staged under the mutex.
                let batch = std::mem::take(&mut g.staged);
                g.staged_bytes = 0;
                if let Err(e) = write_staged(&batch) {
                    g.write_error = Some(e.to_string());
                    return Err(e.into());
                }
                if let Some(last) = batch.last() {
                    g.written_seq = g.written_seq.max(last.seq);
                }
            }
            break need_new;
        };
        let seq = g.next_seq;
        encode_header(&mut rec, kind, fua, seq, offset, length);
        if need_new {
            let path = seg_path(&self.dir, seq);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)?;
            g.segments.push(Segment {
                first_seq: seq,
                last_seq: None,
                path,
                len: 0,
                file: Arc::new(file),
                durable: false,
            });
            g.open_tail = true;
            g.dir_dirty = true;
        }
        let Some(tail) = g.segments.last_mut() else {
            return Err(JournalError::Io(io::Error::other("no journal segment")));
        };
        let pos = tail.len;
        tail.len += rec_bytes;
        tail.last_seq = Some(seq);
        let segment = tail.first_seq;
        let file = tail.file.clone();
        g.next_seq += 1;
        g.pending_bytes += rec_bytes;
        let claimed = inline && Self::inline_candidate(&g, kind, fua, data.len());
        let rec = Arc::new(rec);
        let mem = if g.mem_bytes + rec_bytes <= self.cfg.memory_cap {
            g.mem_bytes += rec_bytes;
            Some(rec.clone())
        } else {
            None
        };
        g.pending.push_back(PendingRecord {
            seq,
            kind,
            fua,
            offset,
            length,
            data_len: data.len() as u32,
            segment,
            pos,
            enqueued: Instant::now(),
            mem,
            applier: if claimed {
                Applier::Inline
            } else {
                Applier::Nobody
            },
        });
        g.staged.push(Staged {
            seq,
            file,
            pos,
            bytes: rec,
        });
        g.staged_bytes += rec_bytes;
        // A record its writer applies does not wake the shipper (if the
        // writer cannot, `finish_inline` does).
        let wake = !claimed && std::mem::take(&mut g.shipper_waiting);
        // Small records wait until there is a batch worth a system call
        // (FUA appends are written by the `sync_to` that follows).
        let lead = !g.writing && !Self::holding(&g) && g.staged_bytes >= WRITE_BATCH_BYTES;
        let batch = if lead {
            g.writing = true;
            g.staged_bytes = 0;
            Some((std::mem::take(&mut g.staged), g.epoch))
        } else {
            None
        };
        drop(g);
        if wake {
            self.data.notify_one();
        }
        if let Some((batch, epoch)) = batch {
            if let Err(e) = self.lead(batch, epoch) {
                if claimed {
                    self.finish_inline(seq, false, Duration::ZERO);
                }
                return Err(e);
            }
        }
        Ok((seq, claimed))
    }

    #[cfg(test)]
    fn holding(g: &Inner) -> bool {
        g.hold_writes
    }
    #[cfg(not(test))]
    fn holding(_: &Inner) -> bool {
        false
    }

    /// Tests: keep appended records staged (never written) while `on`.
    #[cfg(test)]
    pub(crate) fn hold_writes(&self, on: bool) {
        self.locked().hold_writes = on;
    }

    /// Staged records not in the file yet (tests).
    #[cfg(test)]
    pub(crate) fn staged_count(&self) -> usize {
        self.locked().staged.len()
    }

    /// As the leader (the caller set `writing`), write `batch` and then
    /// whatever was staged meanwhile, for at most [`LEAD_ROUNDS`] rounds.
    fn lead(&self, mut batch: Vec<Staged>, mut epoch: u64) -> Result<(), JournalError> {
        let mut rounds = 0;
        loop {
            let r = write_staged(&batch);
            rounds += 1;
            let mut g = self.locked();
            let current = g.epoch == epoch;
            match r {
                Ok(()) if current => {
                    if let Some(last) = batch.last() {
                        g.written_seq = g.written_seq.max(last.seq);
                    }
                }
                Ok(()) => {}
                Err(e) => {
                    // Nothing after the hole may reach the file: stop here.
                    // (Records of an older epoch were dropped by `drain`:
                    // their loss is already accounted for.)
                    if current {
                        g.write_error = Some(e.to_string());
                    }
                    g.writing = false;
                    let waiters = g.write_waiters > 0;
                    drop(g);
                    if waiters {
                        self.written.notify_all();
                    }
                    return if current { Err(e.into()) } else { Ok(()) };
                }
            }
            // Reuse the batch's allocation for the next round.
            batch.clear();
            if g.staged_bytes < WRITE_BATCH_BYTES || rounds >= LEAD_ROUNDS || Self::holding(&g) {
                // Anything left is written by the next appender, `sync_to`,
                // or a reader of the file (`ensure_written`).
                g.writing = false;
                let waiters = g.write_waiters > 0;
                drop(g);
                if waiters {
                    self.written.notify_all();
                }
                return Ok(());
            }
            std::mem::swap(&mut batch, &mut g.staged);
            g.staged_bytes = 0;
            epoch = g.epoch;
            let waiters = g.write_waiters > 0;
            drop(g);
            if waiters {
                self.written.notify_all();
            }
        }
    }

    /// Get every record up to `seq` into its segment file: write the staged
    /// records if no one is, else wait for the writer.
    fn ensure_written(&self, seq: u64) -> Result<(), JournalError> {
        let mut g = self.locked();
        loop {
            if g.written_seq >= seq {
                return Ok(());
            }
            if let Some(e) = &g.write_error {
                return Err(JournalError::Io(io::Error::other(e.clone())));
            }
            if !g.writing {
                if g.staged.is_empty() {
                    // Dropped by `drain` (or never appended).
                    return Ok(());
                }
                g.writing = true;
                g.staged_bytes = 0;
                let batch = std::mem::take(&mut g.staged);
                let epoch = g.epoch;
                drop(g);
                self.lead(batch, epoch)?;
                g = self.locked();
                continue;
            }
            g.write_waiters += 1;
            g = self.written.wait(g).unwrap_or_else(|e| e.into_inner());
            g.write_waiters -= 1;
        }
    }

    /// Append a host write of any size as consecutive records of at most
    /// [`MAX_DATA`] bytes each; returns the last sequence number.
    pub fn append_write(&self, fua: bool, offset: u64, data: &[u8]) -> Result<u64, JournalError> {
        let mut last = 0;
        let mut done = 0usize;
        for chunk in data.chunks(MAX_DATA as usize) {
            last = self.append(
                RecordKind::Write,
                fua,
                offset + done as u64,
                chunk.len() as u64,
                chunk,
            )?;
            done += chunk.len();
        }
        Ok(last)
    }

    /// Append a host write of at most [`INLINE_APPLY_MAX`] bytes (longer
    /// ones as [`Self::append_write`]) and claim it for the writer to apply
    /// to the replica after its primary write, when no older record waits
    /// for the shipper (see "Inline apply" in the module docs). Returns the
    /// sequence number and, when claimed, the claim to end with
    /// [`InlineClaim::applied`] after the replica write.
    pub fn append_write_inline(
        self: &Arc<Self>,
        fua: bool,
        offset: u64,
        data: &[u8],
    ) -> Result<(u64, Option<InlineClaim>), JournalError> {
        if data.len() as u64 > INLINE_APPLY_MAX || !self.cfg.inline_apply {
            return self.append_write(fua, offset, data).map(|seq| (seq, None));
        }
        let (seq, claimed) = self.append_claim(
            RecordKind::Write,
            fua,
            offset,
            data.len() as u64,
            data,
            true,
        )?;
        let claim = claimed.then(|| InlineClaim {
            journal: self.clone(),
            seq,
            ended: false,
        });
        Ok((seq, claim))
    }

    /// Make every record up to `seq` durable (group commit: one
    /// `fdatasync` covers all records appended before it started).
    pub fn sync_to(&self, seq: u64) -> Result<(), JournalError> {
        let _s = self.sync_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.locked().synced_seq >= seq {
            return Ok(());
        }
        self.ensure_written(seq)?;
        let (files, closed, target, dir_dirty) = {
            let mut g = self.locked();
            if g.synced_seq >= seq {
                return Ok(());
            }
            // Every segment not known durable: closed ones that were never
            // synced, and the tail (open or not).
            let n = g.segments.len();
            let mut files = Vec::new();
            let mut closed = Vec::new();
            for (i, s) in g.segments.iter().enumerate() {
                let is_tail = i + 1 == n;
                if is_tail || !s.durable {
                    files.push(s.file.clone());
                }
                if !is_tail && !s.durable {
                    closed.push(s.first_seq);
                }
            }
            let d = std::mem::take(&mut g.dir_dirty);
            (files, closed, g.written_seq, d)
        };
        if dir_dirty {
            if let Err(e) = crate::registry::fsync_dir(&self.dir) {
                self.locked().dir_dirty = true;
                return Err(e.into());
            }
        }
        for f in &files {
            f.sync_data()?;
        }
        let mut g = self.locked();
        // Only segments that were already closed are complete: the tail
        // may have taken more records after its sync.
        for s in g.segments.iter_mut() {
            if closed.contains(&s.first_seq) {
                s.durable = true;
            }
        }
        g.synced_seq = g.synced_seq.max(target);
        Ok(())
    }

    /// Make every appended record durable.
    pub fn sync_all(&self) -> Result<(), JournalError> {
        let last = self.locked().next_seq - 1;
        self.sync_to(last)
    }

    /// The sequence number of the last appended record.
    pub fn last_seq(&self) -> u64 {
        self.locked().next_seq - 1
    }

    /// The sequence number of the last applied record.
    pub fn applied_seq(&self) -> u64 {
        self.locked().applied_seq
    }

    /// The last sequence number `head` records as applied and flushed.
    #[cfg(test)]
    pub(crate) fn head_seq(&self) -> u64 {
        self.locked().head_seq
    }

    /// Start or stop shipping. Stopping wakes the shipper (which then
    /// returns) and throttled writers (which then fail with `Full`).
    pub fn set_shipping(&self, on: bool) {
        self.locked().shipping = on;
        self.data.notify_all();
        self.space.notify_all();
    }

    pub fn is_shipping(&self) -> bool {
        self.locked().shipping
    }

    /// The oldest record not yet applied, waiting up to `timeout` for one.
    /// `None` on timeout or when shipping is stopped.
    pub fn next_pending(&self, timeout: Duration) -> Option<PendingRecord> {
        self.next_batch(timeout, 1, 0).into_iter().next()
    }

    /// The oldest records not yet applied (at least one, then more while
    /// under `max_records` and `max_bytes`), waiting up to `timeout` for
    /// one. Empty on timeout or when shipping is stopped. The records stay
    /// pending until [`Self::mark_applied`].
    pub fn next_batch(
        &self,
        timeout: Duration,
        max_records: usize,
        max_bytes: u64,
    ) -> Vec<PendingRecord> {
        let deadline = Instant::now() + timeout;
        let mut g = self.locked();
        loop {
            if !g.shipping {
                return Vec::new();
            }
            // Records behind one that its writer is applying wait for it:
            // `mark_applied` must not pass a record that is not applied.
            let mut bytes = 0u64;
            let mut out = Vec::new();
            for p in g.pending.iter_mut() {
                if matches!(p.applier, Applier::Inline | Applier::InlineDone)
                    || (!out.is_empty() && (out.len() >= max_records || bytes >= max_bytes))
                {
                    break;
                }
                bytes += p.bytes();
                p.applier = Applier::Shipper;
                out.push(p.clone());
            }
            if !out.is_empty() {
                return out;
            }
            let now = Instant::now();
            if now >= deadline {
                return Vec::new();
            }
            g.shipper_waiting = true;
            g = self
                .data
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            g.shipper_waiting = false;
        }
    }

    /// A pending record's data: from memory when it is held there, else
    /// read from the segment file (written first if it is still staged)
    /// and verified.
    pub fn read_data(&self, p: &PendingRecord) -> Result<Vec<u8>, JournalError> {
        if let Some(d) = p.mem_data() {
            return Ok(d.to_vec());
        }
        self.read_file_data(p)
    }

    /// Read and verify a pending record's data from its segment file.
    pub fn read_file_data(&self, p: &PendingRecord) -> Result<Vec<u8>, JournalError> {
        self.ensure_written(p.seq)?;
        let file = {
            let g = self.locked();
            g.segments
                .iter()
                .find(|s| s.first_seq == p.segment)
                .map(|s| s.file.clone())
                .ok_or(JournalError::Gone)?
        };
        let mut buf = vec![0u8; HEADER_LEN + p.data_len as usize];
        file.read_exact_at(&mut buf, p.pos)?;
        let (h, data, _) = decode_record(&buf)?;
        if h.seq != p.seq {
            return Err(RecordError::OutOfSequence {
                expected: p.seq,
                found: h.seq,
            }
            .into());
        }
        Ok(data.to_vec())
    }

    /// Record that every pending record up to `seq` was applied.
    pub fn mark_applied(&self, seq: u64) {
        let mut g = self.locked();
        while let Some(p) = g.pending.front() {
            if p.seq > seq {
                break;
            }
            let Some(p) = g.pending.pop_front() else {
                break;
            };
            g.pending_bytes -= p.bytes();
            if p.mem.is_some() {
                g.mem_bytes -= p.bytes();
            }
            g.applied_seq = p.seq;
        }
        Self::pop_inline_done(&mut g);
        let waiters = g.space_waiters > 0;
        drop(g);
        if waiters {
            self.space.notify_all();
        }
    }

    /// Pop the oldest records while their writers applied them.
    fn pop_inline_done(g: &mut Inner) {
        while g
            .pending
            .front()
            .is_some_and(|p| p.applier == Applier::InlineDone)
        {
            let Some(p) = g.pending.pop_front() else {
                break;
            };
            g.pending_bytes -= p.bytes();
            if p.mem.is_some() {
                g.mem_bytes -= p.bytes();
            }
            g.applied_seq = p.seq;
        }
    }

    /// Whether a record about to be appended may be applied by its writer:
    /// a small plain write while shipping, inline apply not paused, every
    /// older pending record applied or being applied by its writer (those
    /// are in flight, so the new write does not depend on them), and none
    /// of those for [`INLINE_STALL`] already.
    fn inline_candidate(g: &Inner, kind: RecordKind, fua: bool, len: usize) -> bool {
        kind == RecordKind::Write
            && !fua
            && len as u64 <= INLINE_APPLY_MAX
            && g.shipping
            && g.write_error.is_none()
            && g.inline_paused_until.map_or(true, |t| Instant::now() >= t)
            && g
                .pending
                .iter()
                .all(|p| matches!(p.applier, Applier::Inline | Applier::InlineDone))
            // A replica write that hangs holds only the writes already
            // being applied inline.
            && g
                .pending
                .front()
                .map_or(true, |p| p.enqueued.elapsed() < INLINE_STALL)
    }

    /// The writer's inline apply of `seq` ended after `took`: applied, or
    /// (`applied == false`) left to the shipper, which retries it and
    /// handles a failure as for any record. A failed, stalled or slow one
    /// pauses inline apply for [`INLINE_PAUSE`], so a replica that slows
    /// down stops adding to host latency.
    fn finish_inline(&self, seq: u64, applied: bool, took: Duration) {
        let mut g = self.locked();
        let took_us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        g.inline_mean_us = (g.inline_mean_us.saturating_mul(7)).saturating_add(took_us) / 8;
        if !applied
            || took >= INLINE_STALL
            || g.inline_mean_us >= INLINE_SLOW_MEAN.as_micros() as u64
        {
            g.inline_paused_until = Some(Instant::now() + INLINE_PAUSE);
            g.inline_mean_us = 0;
        }
        // Absent when `drain` dropped it meanwhile.
        let idx = g
            .pending
            .front()
            .and_then(|f| seq.checked_sub(f.seq))
            .map(|i| i as usize);
        let Some(p) = idx.and_then(|i| g.pending.get_mut(i)) else {
            return;
        };
        if p.seq != seq || p.applier != Applier::Inline {
            return;
        }
        if applied {
            p.applier = Applier::InlineDone;
            let len = p.length;
            let n = &mut g.inline_applied;
            n.records += 1;
            n.bytes += len;
            n.largest = n.largest.max(len);
            Self::pop_inline_done(&mut g);
        } else {
            p.applier = Applier::Nobody;
        }
        // `next_batch` stops at records being applied inline: wake the
        // shipper only when one it has to apply is now at the front.
        let wake = g
            .pending
            .front()
            .is_some_and(|p| p.applier == Applier::Nobody)
            && std::mem::take(&mut g.shipper_waiting);
        let waiters = g.space_waiters > 0;
        drop(g);
        if wake {
            self.data.notify_one();
        }
        if waiters {
            self.space.notify_all();
        }
    }

    /// What writers applied inline since the last call.
    pub fn take_inline_applied(&self) -> InlineApplied {
        std::mem::take(&mut self.locked().inline_applied)
    }

    /// After the caller flushed the replica: record the applied position
    /// durably in `head`, then delete segments that hold only applied
    /// records.
    pub fn checkpoint(&self) -> Result<(), JournalError> {
        self.checkpoint_to(u64::MAX)
    }

    /// [`Journal::checkpoint`] for a replica flush that began when `seq`
    /// was the last applied record: the shipper goes on applying while a
    /// background checkpoint flushes, and what it applied meanwhile is not
    /// covered by that flush. `head` never moves backwards.
    pub fn checkpoint_to(&self, seq: u64) -> Result<(), JournalError> {
        // One `head` writer at a time: a checkpoint that read an older
        // position must not overwrite a newer one (`drain` writes it too).
        let _head = self.head_lock.lock().unwrap_or_else(|e| e.into_inner());
        let applied = {
            let g = self.locked();
            let applied = g.applied_seq.min(seq);
            if applied <= g.head_seq {
                return Ok(());
            }
            applied
        };
        crate::registry::atomic_write(&self.dir.join("head"), format!("{applied}\n").as_bytes())?;
        let mut g = self.locked();
        g.head_seq = applied;
        // A fully applied tail is closed so that it can be deleted too.
        if g.open_tail && g.pending.is_empty() && g.next_seq - 1 == applied {
            g.open_tail = false;
        }
        let open_tail = g.open_tail;
        let n = g.segments.len();
        let mut doomed = Vec::new();
        let mut keep = Vec::new();
        for (i, s) in std::mem::take(&mut g.segments).into_iter().enumerate() {
            let is_tail = i + 1 == n && open_tail;
            let done = s.last_seq.map_or(true, |l| l <= applied);
            if done && !is_tail {
                doomed.push(s.path);
            } else {
                keep.push(s);
            }
        }
        g.segments = keep;
        drop(g);
        for p in &doomed {
            fs::remove_file(p)?;
        }
        Ok(())
    }

    /// Drop every pending record (journal overflow, broken replica, switch
    /// to Sync): returns their extents so the caller can mark them out of
    /// sync, and leaves an empty journal.
    pub fn drain(&self) -> Result<Vec<(u64, u64)>, JournalError> {
        let mut g = self.locked();
        let extents = g
            .pending
            .iter()
            .filter(|p| p.kind != RecordKind::Flush)
            .map(|p| (p.offset, p.length))
            .collect();
        g.pending.clear();
        g.pending_bytes = 0;
        g.mem_bytes = 0;
        g.staged.clear();
        g.staged_bytes = 0;
        g.write_error = None;
        g.epoch += 1;
        g.applied_seq = g.next_seq - 1;
        g.written_seq = g.next_seq - 1;
        g.open_tail = false;
        let applied = g.applied_seq;
        drop(g);
        self.space.notify_all();
        self.written.notify_all();
        // `head` first: after a crash in between, replay skips what is left.
        let _head = self.head_lock.lock().unwrap_or_else(|e| e.into_inner());
        crate::registry::atomic_write(&self.dir.join("head"), format!("{applied}\n").as_bytes())?;
        let mut g = self.locked();
        g.head_seq = applied;
        let doomed: Vec<PathBuf> = std::mem::take(&mut g.segments)
            .into_iter()
            .map(|s| s.path)
            .collect();
        drop(g);
        for p in doomed {
            fs::remove_file(p)?;
        }
        Ok(extents)
    }

    /// Current lag.
    pub fn lag(&self) -> Lag {
        let g = self.locked();
        Lag {
            records: g.pending.len() as u64,
            bytes: g.pending_bytes,
            oldest_age: g
                .pending
                .front()
                .map(|p| p.enqueued.elapsed())
                .unwrap_or_default(),
        }
    }

    /// Bytes of all segment files (disk usage).
    pub fn disk_bytes(&self) -> u64 {
        self.locked().segments.iter().map(|s| s.len).sum()
    }

    /// Remove the journal directory (detach).
    pub fn destroy(self) -> io::Result<()> {
        fs::remove_dir_all(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(cap: u64, seg: u64) -> JournalConfig {
        JournalConfig {
            cap,
            segment_size: seg,
            throttle_timeout: Duration::from_millis(50),
            ..JournalConfig::default()
        }
    }

    #[test]
    fn header_rejects_garbage_precisely() {
        let rec = encode_record(RecordKind::Write, true, 7, 4096, 3, b"abc");
        let (h, data, used) = decode_record(&rec).unwrap();
        assert_eq!((h.seq, h.offset, h.length, h.fua), (7, 4096, 3, true));
        assert_eq!((data, used), (&b"abc"[..], rec.len()));
        assert_eq!(
            decode_record(&rec[..10]).unwrap_err(),
            RecordError::Truncated
        );
        assert_eq!(
            decode_record(&rec[..rec.len() - 1]).unwrap_err(),
            RecordError::Truncated
        );
        let mut bad = rec.clone();
        bad[0] = b'X';
        assert_eq!(decode_record(&bad).unwrap_err(), RecordError::BadMagic);
        let mut bad = rec.clone();
        bad[6] = 9;
        assert_eq!(decode_record(&bad).unwrap_err(), RecordError::BadKind(9));
        let mut bad = rec.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(decode_record(&bad).unwrap_err(), RecordError::BadChecksum);
        let mut bad = rec.clone();
        bad[32] = 4; // length no longer matches the data
        assert_eq!(decode_record(&bad).unwrap_err(), RecordError::BadLength);
        let flush = encode_record(RecordKind::Flush, false, 8, 0, 0, &[]);
        assert_eq!(decode_record(&flush).unwrap().0.kind, RecordKind::Flush);
    }

    #[test]
    fn append_ship_checkpoint_trims_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (j, rep) = Journal::open(dir.path(), cfg(1 << 20, 256)).unwrap();
        assert_eq!(rep, ReplayReport::default());
        for i in 0..10u64 {
            let seq = j
                .append(RecordKind::Write, false, i * 100, 100, &[i as u8; 100])
                .unwrap();
            assert_eq!(seq, i + 1);
        }
        assert!(
            j.locked().segments.len() > 1,
            "small segment size forces rotation"
        );
        assert_eq!(j.lag().records, 10);
        for i in 0..10u64 {
            let p = j.next_pending(Duration::ZERO).unwrap();
            assert_eq!((p.seq, p.offset), (i + 1, i * 100));
            assert_eq!(j.read_data(&p).unwrap(), vec![i as u8; 100]);
            j.mark_applied(p.seq);
        }
        assert!(j.next_pending(Duration::from_millis(1)).is_none());
        j.checkpoint().unwrap();
        assert_eq!(j.disk_bytes(), 0);
        let files = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 1, "only `head` is left");
        // Sequence numbers continue after reopen.
        drop(j);
        let (j, rep) = Journal::open(dir.path(), cfg(1 << 20, 256)).unwrap();
        assert_eq!(rep.pending, 0);
        assert_eq!(j.append(RecordKind::Flush, false, 0, 0, &[]).unwrap(), 11);
    }

    #[test]
    fn full_journal_throttles_then_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), cfg(300, 1 << 20)).unwrap();
        j.append(RecordKind::Write, false, 0, 200, &[1; 200])
            .unwrap();
        let t = Instant::now();
        assert!(matches!(
            j.append(RecordKind::Write, false, 0, 200, &[1; 200]),
            Err(JournalError::Full)
        ));
        assert!(t.elapsed() >= Duration::from_millis(50));
        // Applying frees space for a waiting writer.
        drop(j);
        let dir = tempfile::tempdir().unwrap();
        let patient = JournalConfig {
            throttle_timeout: Duration::from_secs(30),
            ..cfg(300, 1 << 20)
        };
        let (j, _) = Journal::open(dir.path(), patient).unwrap();
        j.append(RecordKind::Write, false, 0, 200, &[1; 200])
            .unwrap();
        let j = Arc::new(j);
        let j2 = j.clone();
        let w = std::thread::spawn(move || {
            j2.append(RecordKind::Write, false, 0, 200, &[2; 200])
                .is_ok()
        });
        std::thread::sleep(Duration::from_millis(10));
        j.mark_applied(1);
        assert!(w.join().unwrap());
        // Not shipping: fail at once.
        j.set_shipping(false);
        assert!(matches!(
            j.append(RecordKind::Write, false, 0, 200, &[3; 200]),
            Err(JournalError::Full)
        ));
    }

    #[test]
    fn oversized_writes_are_split_into_valid_records() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), cfg(1 << 30, 1 << 30)).unwrap();
        let data: Vec<u8> = (0..MAX_DATA as usize + 1000).map(|i| i as u8).collect();
        assert_eq!(j.append_write(false, 4096, &data).unwrap(), 2);
        j.sync_all().unwrap();
        drop(j);
        let (j, rep) = Journal::open(dir.path(), cfg(1 << 30, 1 << 30)).unwrap();
        assert_eq!((rep.pending, rep.stopped_at), (2, None));
        let a = j.next_pending(Duration::ZERO).unwrap();
        assert_eq!((a.offset, a.length), (4096, u64::from(MAX_DATA)));
        assert_eq!(j.read_data(&a).unwrap(), &data[..MAX_DATA as usize]);
        j.mark_applied(a.seq);
        let b = j.next_pending(Duration::ZERO).unwrap();
        assert_eq!((b.offset, b.length), (4096 + u64::from(MAX_DATA), 1000));
    }

    #[test]
    fn checkpoint_to_covers_only_what_the_flush_covered_and_never_goes_back() {
        let d = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(d.path(), cfg(1 << 20, 1 << 20)).unwrap();
        for i in 0..5u64 {
            j.append_write(false, i * 4096, &[i as u8; 4096]).unwrap();
        }
        j.mark_applied(5);
        // A flush that began after record 3 was applied covers up to 3.
        j.checkpoint_to(3).unwrap();
        assert_eq!(read_head(d.path()), 3);
        // A late checkpoint of an older flush does not move `head` back.
        j.checkpoint_to(2).unwrap();
        assert_eq!(read_head(d.path()), 3);
        j.checkpoint().unwrap();
        assert_eq!(read_head(d.path()), 5);
        j.checkpoint_to(4).unwrap();
        assert_eq!(read_head(d.path()), 5);
    }

    #[test]
    fn drain_returns_extents_and_empties() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), cfg(1 << 20, 1 << 20)).unwrap();
        j.append(RecordKind::Write, false, 10, 5, b"hello").unwrap();
        j.append(RecordKind::Flush, false, 0, 0, &[]).unwrap();
        j.append(RecordKind::Discard, false, 4096, 8192, &[])
            .unwrap();
        assert_eq!(j.drain().unwrap(), vec![(10, 5), (4096, 8192)]);
        assert_eq!(j.lag(), Lag::default());
        drop(j);
        let (_, rep) = Journal::open(dir.path(), cfg(1 << 20, 1 << 20)).unwrap();
        assert_eq!(rep.pending, 0);
    }

    /// Appends from many threads: every record reaches the file exactly
    /// once, at the position of its sequence number, with its data.
    #[test]
    fn concurrent_appends_are_written_in_sequence_order() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), cfg(1 << 30, 64 << 10)).unwrap();
        let j = Arc::new(j);
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let j = j.clone();
                std::thread::spawn(move || {
                    (0..200u64)
                        .map(|i| {
                            let data =
                                vec![t.wrapping_mul(31).wrapping_add(i as u8); 100 + t as usize];
                            let seq = j
                                .append(
                                    RecordKind::Write,
                                    false,
                                    i * 4096,
                                    data.len() as u64,
                                    &data,
                                )
                                .unwrap();
                            (seq, data)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<(u64, Vec<u8>)> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort();
        assert_eq!(
            all.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            (1..=1600).collect::<Vec<_>>()
        );
        j.sync_all().unwrap();
        assert_eq!(j.staged_count(), 0);
        drop(j);
        let (j, rep) = Journal::open(dir.path(), cfg(1 << 30, 64 << 10)).unwrap();
        assert_eq!((rep.pending, rep.stopped_at), (1600, None));
        for (seq, data) in &all {
            let p = j.next_pending(Duration::ZERO).unwrap();
            assert_eq!(p.seq, *seq);
            assert!(
                p.mem_data().is_none(),
                "replayed records come from the file"
            );
            assert_eq!(&j.read_data(&p).unwrap(), data);
            j.mark_applied(p.seq);
        }
    }

    /// A staged record is not in the file until someone writes it; `sync_to`
    /// (FUA, flush) writes it and makes it durable, across a segment
    /// rotation too.
    #[test]
    fn sync_to_writes_staged_records_before_fdatasync() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), cfg(1 << 30, 1000)).unwrap();
        j.hold_writes(true);
        for i in 0..5u64 {
            j.append(RecordKind::Write, false, i, 100, &[i as u8; 100])
                .unwrap();
        }
        assert_eq!(j.staged_count(), 5);
        assert_eq!(fs::metadata(seg_path(dir.path(), 1)).unwrap().len(), 0);
        let fua = j
            .append(RecordKind::Write, true, 7, 100, &[7; 100])
            .unwrap();
        j.sync_to(fua).unwrap();
        assert_eq!(j.staged_count(), 0);
        assert_eq!(
            fs::metadata(seg_path(dir.path(), 1)).unwrap().len(),
            6 * (HEADER_LEN as u64 + 100)
        );
        // Rotation (1000-byte segments) with records staged: the old tail
        // is written before the new segment starts, but synced only by the
        // next `sync_to`, which syncs every closed segment not yet durable.
        for i in 0..20u64 {
            j.append(RecordKind::Write, false, i, 100, &[i as u8 + 50; 100])
                .unwrap();
        }
        let closed_not_durable = |j: &Journal| {
            let g = j.locked();
            let n = g.segments.len();
            g.segments[..n - 1].iter().filter(|s| !s.durable).count()
        };
        assert!(j.locked().segments.len() > 2);
        assert!(closed_not_durable(&j) >= 2, "closing does not sync");
        let last = j.last_seq();
        j.sync_to(last).unwrap();
        assert_eq!(closed_not_durable(&j), 0);
        assert_eq!(j.locked().synced_seq, last);
        drop(j);
        let (j, rep) = Journal::open(dir.path(), cfg(1 << 30, 1000)).unwrap();
        assert_eq!((rep.pending, rep.stopped_at), (26, None));
        let seqs: Vec<u64> = j
            .next_batch(Duration::ZERO, 100, u64::MAX)
            .iter()
            .map(|p| p.seq)
            .collect();
        assert_eq!(seqs, (1..=26).collect::<Vec<_>>());
    }

    /// A "crash" (the journal dropped) with records still staged: they are
    /// not in the file, replay returns the written prefix and appending
    /// continues after it (the activity log covers the lost records, see the
    /// mirror test `async_crash_with_staged_records_converges`).
    #[test]
    fn staged_records_are_lost_in_a_crash_and_the_sequence_continues() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), cfg(1 << 30, 1 << 20)).unwrap();
        for i in 0..3u64 {
            j.append(RecordKind::Write, false, i, 10, &[1; 10]).unwrap();
        }
        assert_eq!(j.staged_count(), 3, "small records wait for a batch");
        // A record that fills the batch makes its appender write them all.
        let big = vec![1u8; WRITE_BATCH_BYTES as usize];
        j.append(RecordKind::Write, false, 0, big.len() as u64, &big)
            .unwrap();
        assert_eq!(j.staged_count(), 0);
        j.hold_writes(true);
        for i in 0..4u64 {
            j.append(RecordKind::Write, false, i, 10, &[2; 10]).unwrap();
        }
        assert_eq!(j.staged_count(), 4);
        drop(j);
        let (j, rep) = Journal::open(dir.path(), cfg(1 << 30, 1 << 20)).unwrap();
        assert_eq!((rep.pending, rep.stopped_at), (4, None));
        assert_eq!(j.append(RecordKind::Flush, false, 0, 0, &[]).unwrap(), 5);
    }

    /// Records shipped from memory before they reached the file, then a
    /// crash: `head` is beyond the file's last record. Replay accepts the
    /// next segment starting right after `head`, so records appended (and
    /// synced) after the restart survive a second crash.
    #[test]
    fn head_beyond_the_written_records_survives_two_crashes() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), cfg(1 << 30, 1 << 20)).unwrap();
        j.append(RecordKind::Write, false, 0, 10, &[1; 10]).unwrap();
        j.sync_all().unwrap();
        j.hold_writes(true);
        for _ in 0..5 {
            j.append(RecordKind::Write, false, 0, 10, &[2; 10]).unwrap();
        }
        // The shipper applied 1..=4 from memory and checkpointed.
        let batch = j.next_batch(Duration::ZERO, 4, u64::MAX);
        assert!(batch.iter().all(|p| p.mem_data().is_some()));
        j.mark_applied(4);
        j.checkpoint().unwrap();
        assert_eq!(read_head(dir.path()), 4);
        assert_eq!(j.staged_count(), 5, "2..=6 never reached the file");
        drop(j); // crash
        let (j, rep) = Journal::open(dir.path(), cfg(1 << 30, 1 << 20)).unwrap();
        assert_eq!((rep.pending, rep.gap), (0, false));
        let a = j.append(RecordKind::Write, true, 0, 10, &[3; 10]).unwrap();
        let b = j.append(RecordKind::Write, true, 0, 10, &[4; 10]).unwrap();
        assert_eq!((a, b), (5, 6));
        j.sync_to(b).unwrap();
        drop(j); // crash again
        let (j, rep) = Journal::open(dir.path(), cfg(1 << 30, 1 << 20)).unwrap();
        assert_eq!((rep.pending, rep.stopped_at, rep.gap), (2, None, false));
        let p = j.next_pending(Duration::ZERO).unwrap();
        assert_eq!((p.seq, j.read_data(&p).unwrap()), (5, vec![3; 10]));
    }

    /// Records within the memory cap are shipped from memory; the rest are
    /// read back from the file (written first if still staged).
    #[test]
    fn memory_cap_falls_back_to_file_reads() {
        let dir = tempfile::tempdir().unwrap();
        let rec = HEADER_LEN as u64 + 100;
        let c = JournalConfig {
            memory_cap: 3 * rec,
            ..cfg(1 << 30, 1 << 20)
        };
        let (j, _) = Journal::open(dir.path(), c).unwrap();
        j.hold_writes(true);
        for i in 0..6u64 {
            j.append(RecordKind::Write, false, i * 100, 100, &[i as u8; 100])
                .unwrap();
        }
        let batch = j.next_batch(Duration::ZERO, 4, u64::MAX);
        assert_eq!(batch.len(), 4);
        let in_mem: Vec<bool> = batch.iter().map(|p| p.mem_data().is_some()).collect();
        assert_eq!(in_mem, [true, true, true, false]);
        assert_eq!(batch[0].mem_data().unwrap(), &[0u8; 100][..]);
        assert_eq!(j.staged_count(), 6);
        // Reading record 4 from the file writes the staged records first.
        assert_eq!(j.read_file_data(&batch[3]).unwrap(), vec![3u8; 100]);
        assert_eq!(j.staged_count(), 0);
        // Applying frees memory for later records.
        j.mark_applied(batch[3].seq);
        assert_eq!(j.lag().records, 2);
        j.append(RecordKind::Write, false, 0, 100, &[9; 100])
            .unwrap();
        let rest = j.next_batch(Duration::ZERO, 10, u64::MAX);
        let in_mem: Vec<bool> = rest.iter().map(|p| p.mem_data().is_some()).collect();
        assert_eq!(in_mem, [false, false, true]);
        for p in &rest {
            let want = if p.seq == 7 { 9 } else { (p.seq - 1) as u8 };
            assert_eq!(j.read_data(p).unwrap(), vec![want; 100]);
        }
        // Byte limit of a batch: at least one record, then up to the limit.
        assert_eq!(j.next_batch(Duration::ZERO, 10, 1).len(), 1);
        assert_eq!(j.next_batch(Duration::ZERO, 10, rec + 1).len(), 2);
    }

    /// The shipper is woken by an append when it waits, and sees a group of
    /// records at once.
    #[test]
    fn waiting_shipper_is_woken_by_an_append() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), cfg(1 << 30, 1 << 20)).unwrap();
        let j = Arc::new(j);
        let j2 = j.clone();
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            let b = j2.next_batch(Duration::from_secs(10), 16, u64::MAX);
            (b.len(), start.elapsed())
        });
        while !j.locked().shipper_waiting {
            std::thread::sleep(Duration::from_millis(1));
        }
        j.append(RecordKind::Write, false, 0, 3, b"abc").unwrap();
        let (n, waited) = t.join().unwrap();
        assert_eq!(n, 1);
        assert!(waited < Duration::from_secs(5));
        assert!(!j.locked().shipper_waiting);
    }

    fn inline_cfg() -> JournalConfig {
        JournalConfig {
            inline_apply: true,
            ..cfg(1 << 30, 1 << 20)
        }
    }

    fn seqs(b: &[PendingRecord]) -> Vec<u64> {
        b.iter().map(|p| p.seq).collect()
    }

    #[test]
    fn claimed_records_bypass_the_shipper_and_keep_order() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), inline_cfg()).unwrap();
        let j = Arc::new(j);
        let none = Duration::ZERO;
        // Nothing pending: claimed; a second one while the first is in
        // flight too (concurrent writes).
        let (s1, c1) = j.append_write_inline(false, 0, b"a").unwrap();
        let (s2, c2) = j.append_write_inline(false, 512, b"b").unwrap();
        let (c1, c2) = (c1.expect("claimed"), c2.expect("claimed"));
        // The shipper gets nothing while the oldest is being applied.
        assert!(j.next_batch(none, 64, u64::MAX).is_empty());
        // Done out of order: nothing applied until the oldest is.
        c2.applied(true, none);
        assert_eq!(j.applied_seq(), 0);
        c1.applied(true, none);
        assert_eq!(j.applied_seq(), s2);
        assert_eq!(j.lag().records, 0);
        let n = j.take_inline_applied();
        assert_eq!((n.records, n.bytes, n.largest), (2, 2, 1));
        assert_eq!(j.take_inline_applied(), InlineApplied::default());
        // FUA and large writes go to the shipper; behind one, so does
        // every later record until the shipper applied it.
        let (s3, c3) = j.append_write_inline(true, 0, b"c").unwrap();
        assert!(c3.is_none());
        let big = vec![7u8; INLINE_APPLY_MAX as usize + 512];
        let (s4, c4) = j.append_write_inline(false, 4096, &big).unwrap();
        assert!(c4.is_none());
        let (s5, c5) = j.append_write_inline(false, 1024, b"d").unwrap();
        assert!(c5.is_none());
        assert_eq!(seqs(&j.next_batch(none, 64, u64::MAX)), vec![s3, s4, s5]);
        j.mark_applied(s5);
        assert_eq!(s1 + 4, s5);
        // Caught up again: claimed again.
        let (_, c6) = j.append_write_inline(false, 0, b"e").unwrap();
        c6.expect("claimed after the shipper caught up")
            .applied(true, none);
        assert_eq!(j.lag().records, 0);
        // Off by default.
        let dir2 = tempfile::tempdir().unwrap();
        let j2 = Arc::new(Journal::open(dir2.path(), cfg(1 << 30, 1 << 20)).unwrap().0);
        assert!(j2.append_write_inline(false, 0, b"x").unwrap().1.is_none());
    }

    #[test]
    fn shipper_stops_at_a_record_being_applied_inline() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), inline_cfg()).unwrap();
        let j = Arc::new(j);
        let none = Duration::ZERO;
        let (s1, c1) = j.append_write_inline(false, 0, b"a").unwrap();
        // Not claimable (FUA): queued behind the claimed one.
        let (s2, _) = j.append_write_inline(true, 512, b"b").unwrap();
        let j2 = j.clone();
        let shipper =
            std::thread::spawn(move || j2.next_batch(Duration::from_secs(10), 64, u64::MAX));
        while !j.locked().shipper_waiting {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Finishing the claimed record puts the FUA one at the front and
        // wakes the shipper for it.
        c1.expect("claimed").applied(true, none);
        assert_eq!(j.applied_seq(), s1);
        assert_eq!(seqs(&shipper.join().unwrap()), vec![s2]);
    }

    #[test]
    fn a_failed_or_dropped_claim_goes_to_the_shipper_and_pauses_inline_apply() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), inline_cfg()).unwrap();
        let j = Arc::new(j);
        let none = Duration::ZERO;
        let (s1, c1) = j.append_write_inline(false, 0, b"a").unwrap();
        c1.expect("claimed").applied(false, none);
        // Paused: the next write is not claimed either.
        let (s2, c2) = j.append_write_inline(false, 512, b"b").unwrap();
        assert!(c2.is_none());
        assert_eq!(seqs(&j.next_batch(none, 64, u64::MAX)), vec![s1, s2]);
        j.mark_applied(s2);
        j.locked().inline_paused_until = None;
        // Dropped (the primary write failed, or a panic unwound).
        let (s3, c3) = j.append_write_inline(false, 0, b"c").unwrap();
        drop(c3.expect("claimed"));
        assert_eq!(seqs(&j.next_batch(none, 64, u64::MAX)), vec![s3]);
        j.mark_applied(s3);
        // A stalled write pauses it too; a drain meanwhile is harmless.
        j.locked().inline_paused_until = None;
        let (_, c4) = j.append_write_inline(false, 0, b"d").unwrap();
        let c4 = c4.expect("claimed");
        assert_eq!(j.drain().unwrap().len(), 1);
        c4.applied(true, INLINE_STALL);
        assert!(j.append_write_inline(false, 0, b"e").unwrap().1.is_none());
        assert_eq!(j.take_inline_applied(), InlineApplied::default());
    }

    fn replay_after_damage(
        records: &[Vec<u8>],
        damage_at: usize,
        how: u8,
    ) -> (ReplayReport, Vec<u64>) {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, _) = Journal::open(dir.path(), cfg(1 << 30, 1 << 30)).unwrap();
            for (i, r) in records.iter().enumerate() {
                j.append(RecordKind::Write, false, i as u64 * 512, r.len() as u64, r)
                    .unwrap();
            }
            j.sync_all().unwrap();
        }
        let seg = seg_path(dir.path(), 1);
        let mut bytes = fs::read(&seg).unwrap();
        let at = damage_at.min(bytes.len());
        match how % 2 {
            0 => bytes.truncate(at),
            _ => {
                if let Some(b) = bytes.get_mut(at) {
                    *b ^= 0x5a;
                }
            }
        }
        fs::write(&seg, &bytes).unwrap();
        let (j, rep) = Journal::open(dir.path(), cfg(1 << 30, 1 << 30)).unwrap();
        let mut seqs = Vec::new();
        while let Some(p) = j.next_pending(Duration::ZERO) {
            assert_eq!(j.read_data(&p).unwrap(), records[(p.seq - 1) as usize]);
            seqs.push(p.seq);
            j.mark_applied(p.seq);
        }
        // Appending after a truncating replay continues the sequence.
        let next = j.append(RecordKind::Flush, false, 0, 0, &[]).unwrap();
        assert_eq!(next, seqs.len() as u64 + 1);
        (rep, seqs)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn record_round_trip(kind in 1u16..=4, fua: bool, seq: u64, offset in 0u64..(1 << 50),
                             data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let kind = RecordKind::from_code(kind).unwrap();
            let (data, length) = match kind {
                RecordKind::Write => (data.clone(), data.len() as u64),
                RecordKind::Flush => (vec![], 0),
                _ => (vec![], data.len() as u64),
            };
            let rec = encode_record(kind, fua, seq, offset, length, &data);
            let (h, d, used) = decode_record(&rec).unwrap();
            prop_assert_eq!((h.kind, h.fua, h.seq, h.offset, h.length), (kind, fua, seq, offset, length));
            prop_assert_eq!(d, &data[..]);
            prop_assert_eq!(used, rec.len());
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_record(&bytes);
        }

        /// Replay keeps exactly the records before the first damaged one.
        #[test]
        fn replay_stops_at_first_torn_or_corrupt_record(
            sizes in proptest::collection::vec(1usize..300, 1..12),
            damage in any::<proptest::sample::Index>(),
            how: u8,
        ) {
            let records: Vec<Vec<u8>> = sizes.iter().enumerate()
                .map(|(i, &n)| vec![i as u8 + 1; n]).collect();
            let total: usize = records.iter().map(|r| r.len() + HEADER_LEN).sum();
            let at = damage.index(total);
            // The record containing byte `at`.
            let mut start = 0;
            let mut hit = records.len();
            for (i, r) in records.iter().enumerate() {
                let end = start + r.len() + HEADER_LEN;
                if at < end { hit = i; break; }
                start = end;
            }
            let (rep, seqs) = replay_after_damage(&records, at, how);
            prop_assert_eq!(seqs, (1..=hit as u64).collect::<Vec<_>>());
            // Cutting exactly at a record boundary is a clean end, not damage.
            let clean_cut = how % 2 == 0 && at == start;
            prop_assert_eq!(rep.stopped_at.is_some(), !clean_cut);
        }
    }
}
