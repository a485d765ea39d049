//! The ordered write journal of an Async association.
//!
//! Every host write (and every flush, zeroing and discard) on the source is
//! appended here as a checksummed record before the primary write is issued,
//! under the source's range lock, so the record order is the order the
//! primary saw. A shipper thread reads the records back in sequence order,
//! applies them to the replica and trims the journal. Applying records in
//! order, with flush records mapped to replica flushes, keeps the replica a
//! crash-consistent earlier image of the source.
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
use std::io;
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
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&kind.code().to_le_bytes());
    out.extend_from_slice(&(if fua { FLAG_FUA } else { 0 }).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out), data);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(data);
    out
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
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            cap: 1 << 30,
            segment_size: 64 << 20,
            throttle_timeout: Duration::from_secs(30),
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
}

impl PendingRecord {
    fn bytes(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.data_len)
    }
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
}

/// See the module documentation.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    cfg: JournalConfig,
    inner: Mutex<Inner>,
    /// Signalled when records are applied (space freed) or shipping stops.
    space: Condvar,
    /// Signalled when records are appended or shipping stops.
    data: Condvar,
    sync_lock: Mutex<()>,
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
            }),
            space: Condvar::new(),
            data: Condvar::new(),
            sync_lock: Mutex::new(()),
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
    /// timeout or at once when nothing is shipping.
    pub fn append(
        &self,
        kind: RecordKind,
        fua: bool,
        offset: u64,
        length: u64,
        data: &[u8],
    ) -> Result<u64, JournalError> {
        let rec_bytes = (HEADER_LEN + data.len()) as u64;
        let deadline = Instant::now() + self.cfg.throttle_timeout;
        let mut g = self.locked();
        while !g.pending.is_empty() && g.pending_bytes + rec_bytes > self.cfg.cap {
            if !g.shipping {
                return Err(JournalError::Full);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(JournalError::Full);
            }
            g = self
                .space
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let seq = g.next_seq;
        let rec = encode_record(kind, fua, seq, offset, length, data);
        let need_new = match g.segments.last() {
            Some(s) if g.open_tail => s.len > 0 && s.len + rec_bytes > self.cfg.segment_size,
            _ => true,
        };
        if need_new {
            if g.open_tail {
                // Everything in the old tail becomes durable before it stops
                // being the file `sync_to` looks at.
                if let Some(s) = g.segments.last() {
                    s.file.sync_data()?;
                }
                g.synced_seq = seq - 1;
            }
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
            });
            g.open_tail = true;
            g.dir_dirty = true;
        }
        let Some(tail) = g.segments.last_mut() else {
            return Err(JournalError::Io(io::Error::other("no journal segment")));
        };
        let pos = tail.len;
        tail.file.write_all_at(&rec, pos)?;
        tail.len += rec_bytes;
        tail.last_seq = Some(seq);
        let segment = tail.first_seq;
        g.next_seq += 1;
        g.pending_bytes += rec_bytes;
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
        });
        drop(g);
        self.data.notify_all();
        Ok(seq)
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

    /// Make every record up to `seq` durable (group commit: one
    /// `fdatasync` covers all records appended before it started).
    pub fn sync_to(&self, seq: u64) -> Result<(), JournalError> {
        let _s = self.sync_lock.lock().unwrap_or_else(|e| e.into_inner());
        let (file, target, dir_dirty) = {
            let mut g = self.locked();
            if g.synced_seq >= seq {
                return Ok(());
            }
            let file = g.segments.last().map(|s| s.file.clone());
            let d = std::mem::take(&mut g.dir_dirty);
            (file, g.next_seq - 1, d)
        };
        if dir_dirty {
            if let Err(e) = crate::registry::fsync_dir(&self.dir) {
                self.locked().dir_dirty = true;
                return Err(e.into());
            }
        }
        if let Some(f) = file {
            f.sync_data()?;
        }
        let mut g = self.locked();
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
        let deadline = Instant::now() + timeout;
        let mut g = self.locked();
        loop {
            if !g.shipping {
                return None;
            }
            if let Some(p) = g.pending.front() {
                return Some(p.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = self
                .data
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Read and verify a pending record's data.
    pub fn read_data(&self, p: &PendingRecord) -> Result<Vec<u8>, JournalError> {
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

    /// Record that `seq` (the front pending record) was applied.
    pub fn mark_applied(&self, seq: u64) {
        let mut g = self.locked();
        if g.pending.front().is_some_and(|p| p.seq == seq) {
            if let Some(p) = g.pending.pop_front() {
                g.pending_bytes -= p.bytes();
                g.applied_seq = seq;
            }
        }
        drop(g);
        self.space.notify_all();
    }

    /// After the caller flushed the replica: record the applied position
    /// durably in `head`, then delete segments that hold only applied
    /// records.
    pub fn checkpoint(&self) -> Result<(), JournalError> {
        let applied = {
            let g = self.locked();
            if g.applied_seq == g.head_seq {
                return Ok(());
            }
            g.applied_seq
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
        g.applied_seq = g.next_seq - 1;
        g.open_tail = false;
        let applied = g.applied_seq;
        drop(g);
        self.space.notify_all();
        // `head` first: after a crash in between, replay skips what is left.
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
