//! iSCSI session state (RFC 7143 §4.2, §7): the CmdSN window, the task
//! table with Data-Out reassembly and R2T generation, Data-In planning and
//! residual computation.
//!
//! Everything here is I/O-free. The types a connection drives are plain
//! state machines ([`CmdWindow`], [`DataOutState`]) and the [`Session`]
//! that all connections of one session share behind one mutex; the
//! connection code (`conn.rs`) reads the socket, calls into these, and
//! writes what they decide.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::conn::Conn;
use super::negotiate::SessionParams;
use super::pdu::{DataOut, Lun, TaskAttribute, RESERVED_TAG};
use super::TargetDef;
use crate::scsi::Nexus;

/// Serial-number "a < b" (RFC 1982 with 32-bit numbers), as RFC 7143 uses
/// for CmdSN and StatSN.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

/// Where a non-immediate command falls in the CmdSN window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdSnCheck {
    /// CmdSN == ExpCmdSN: deliver now.
    Deliver,
    /// ExpCmdSN < CmdSN <= MaxCmdSN: a gap precedes it (another connection
    /// of the session carries the missing command); hold it.
    Hold,
    /// Outside the window (a duplicate or beyond MaxCmdSN): silently
    /// ignore it (RFC 7143 §4.2.2.1).
    Drop,
}

/// ExpCmdSN/MaxCmdSN bookkeeping. MaxCmdSN advances only when a command
/// completes, so at most `depth` non-immediate commands are in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmdWindow {
    exp: u32,
    max: u32,
}

impl CmdWindow {
    /// A window opening at `first_cmd_sn` (the CmdSN of the leading
    /// login) with room for `depth` (≥ 1) commands.
    pub fn new(first_cmd_sn: u32, depth: u32) -> Self {
        CmdWindow {
            exp: first_cmd_sn,
            max: first_cmd_sn.wrapping_add(depth.max(1) - 1),
        }
    }

    pub fn exp_cmd_sn(&self) -> u32 {
        self.exp
    }

    pub fn max_cmd_sn(&self) -> u32 {
        self.max
    }

    /// Number of CmdSNs currently acceptable (MaxCmdSN − ExpCmdSN + 1).
    pub fn room(&self) -> u32 {
        self.max.wrapping_sub(self.exp).wrapping_add(1)
    }

    pub fn check(&self, cmd_sn: u32) -> CmdSnCheck {
        let d = cmd_sn.wrapping_sub(self.exp);
        let room = self.room();
        if room > 0x8000_0000 || d >= room {
            CmdSnCheck::Drop
        } else if d == 0 {
            CmdSnCheck::Deliver
        } else {
            CmdSnCheck::Hold
        }
    }

    /// The command at ExpCmdSN was delivered.
    pub fn advance(&mut self) {
        self.exp = self.exp.wrapping_add(1);
    }

    /// A command left the target (completed, aborted, rejected): open one slot.
    pub fn complete(&mut self) {
        self.max = self.max.wrapping_add(1);
    }
}

/// Negotiated limits the Data-Out machinery needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataOutLimits {
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub first_burst_length: u32,
    pub max_burst_length: u32,
    pub max_outstanding_r2t: u16,
    /// Our MaxRecvDataSegmentLength: the largest Data-Out payload.
    pub max_recv_data_segment_length: u32,
}

impl DataOutLimits {
    pub fn from_params(p: &SessionParams) -> Self {
        DataOutLimits {
            initial_r2t: p.initial_r2t,
            immediate_data: p.immediate_data,
            first_burst_length: p.first_burst_length,
            max_burst_length: p.max_burst_length.max(512),
            max_outstanding_r2t: p.max_outstanding_r2t.max(1),
            max_recv_data_segment_length: p.max_recv_data_segment_length_target,
        }
    }
}

/// Violations of the Data-Out rules; each is a protocol error that ends
/// the connection at ErrorRecoveryLevel 0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataOutError {
    #[error("immediate data sent although ImmediateData=No")]
    ImmediateDataNotAllowed,
    #[error("unsolicited data announced although InitialR2T=Yes")]
    UnsolicitedNotAllowed,
    #[error("{len} bytes of immediate data exceed FirstBurstLength {first_burst} or the expected length {expected}")]
    ImmediateTooLong {
        len: u32,
        first_burst: u32,
        expected: u32,
    },
    #[error("data for a command that carries no data-out")]
    NotAWrite,
    #[error("unsolicited Data-Out with no unsolicited sequence open")]
    NoUnsolicitedSequence,
    #[error("Data-Out for unknown target transfer tag {0:#x}")]
    UnknownTtt(u32),
    #[error("DataSN {got}, expected {expected}")]
    DataSn { got: u32, expected: u32 },
    #[error("buffer offset {got}, expected {expected}")]
    BufferOffset { got: u32, expected: u32 },
    #[error("{len} bytes at offset {offset} overrun the sequence ending at {end}")]
    Overrun { offset: u32, len: u32, end: u32 },
    #[error("Data-Out sequence ended (F bit) at {at}, before its end at {end}")]
    EarlyFinal { at: u32, end: u32 },
    #[error("Data-Out payload of {len} bytes exceeds MaxRecvDataSegmentLength {max}")]
    SegmentTooLong { len: u32, max: u32 },
}

/// One Data-Out sequence: the unsolicited one, or one per R2T.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sequence {
    ttt: u32,
    next_offset: u32,
    end: u32,
    next_data_sn: u32,
}

/// An R2T to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2tPlan {
    pub ttt: u32,
    pub r2t_sn: u32,
    pub offset: u32,
    pub len: u32,
}

/// Where an accepted Data-Out payload goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub offset: u32,
    pub len: u32,
}

/// Data-Out reassembly of one write: the immediate data, the unsolicited
/// sequence (up to FirstBurstLength) and the solicited sequences, each
/// checked for DataSN, buffer offset and length (DataPDUInOrder and
/// DataSequenceInOrder are Yes at ErrorRecoveryLevel 0 here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOutState {
    total: u32,
    received: u32,
    unsolicited: Option<Sequence>,
    solicited: Vec<Sequence>,
    next_solicit: u32,
    next_r2t_sn: u32,
    limits: DataOutLimits,
}

impl DataOutState {
    /// State after a write command with `immediate_len` bytes of immediate
    /// data arrived; `fin` is the command's F bit (no unsolicited Data-Out
    /// follows). `total` is the number of bytes to collect (the Expected
    /// Data Transfer Length).
    pub fn new(
        total: u32,
        immediate_len: u32,
        fin: bool,
        limits: DataOutLimits,
    ) -> Result<Self, DataOutError> {
        if immediate_len > 0 && !limits.immediate_data {
            return Err(DataOutError::ImmediateDataNotAllowed);
        }
        let first_burst = limits.first_burst_length.min(total);
        if immediate_len > total || immediate_len > limits.first_burst_length {
            return Err(DataOutError::ImmediateTooLong {
                len: immediate_len,
                first_burst: limits.first_burst_length,
                expected: total,
            });
        }
        let unsolicited = if fin || immediate_len >= total {
            None
        } else if limits.initial_r2t {
            return Err(DataOutError::UnsolicitedNotAllowed);
        } else if immediate_len >= first_burst {
            // F=0 but nothing may follow: the initiator's sequence is empty.
            None
        } else {
            Some(Sequence {
                ttt: RESERVED_TAG,
                next_offset: immediate_len,
                end: first_burst,
                next_data_sn: 0,
            })
        };
        let next_solicit = if unsolicited.is_some() {
            first_burst
        } else {
            immediate_len
        };
        Ok(DataOutState {
            total,
            received: immediate_len,
            unsolicited,
            solicited: Vec::new(),
            next_solicit,
            next_r2t_sn: 0,
            limits,
        })
    }

    pub fn is_complete(&self) -> bool {
        self.received >= self.total
    }

    /// R2Ts sent so far (ExpDataSN of the final response).
    pub fn r2t_count(&self) -> u32 {
        self.next_r2t_sn
    }

    /// The R2Ts that may go out now: one per MaxBurstLength chunk of the
    /// not yet solicited data, at most MaxOutstandingR2T outstanding.
    pub fn next_r2ts(&mut self, mut alloc_ttt: impl FnMut() -> u32) -> Vec<R2tPlan> {
        let mut out = Vec::new();
        while self.next_solicit < self.total
            && self.solicited.len() < usize::from(self.limits.max_outstanding_r2t)
        {
            let offset = self.next_solicit;
            let len = self.limits.max_burst_length.min(self.total - offset);
            let ttt = alloc_ttt();
            let plan = R2tPlan {
                ttt,
                r2t_sn: self.next_r2t_sn,
                offset,
                len,
            };
            self.next_r2t_sn = self.next_r2t_sn.wrapping_add(1);
            self.next_solicit = offset + len;
            self.solicited.push(Sequence {
                ttt,
                next_offset: offset,
                end: offset + len,
                next_data_sn: 0,
            });
            out.push(plan);
        }
        out
    }

    /// Check one Data-Out header carrying `len` payload bytes and account
    /// for it; the caller then reads the payload to the returned place.
    pub fn accept(&mut self, d: &DataOut, len: u32) -> Result<Placement, DataOutError> {
        if len > self.limits.max_recv_data_segment_length {
            return Err(DataOutError::SegmentTooLong {
                len,
                max: self.limits.max_recv_data_segment_length,
            });
        }
        let (seq, idx) = if d.ttt == RESERVED_TAG {
            match self.unsolicited.as_mut() {
                Some(s) => (s, None),
                None => return Err(DataOutError::NoUnsolicitedSequence),
            }
        } else {
            match self.solicited.iter().position(|s| s.ttt == d.ttt) {
                Some(i) => match self.solicited.get_mut(i) {
                    Some(s) => (s, Some(i)),
                    None => return Err(DataOutError::UnknownTtt(d.ttt)),
                },
                None => return Err(DataOutError::UnknownTtt(d.ttt)),
            }
        };
        if d.data_sn != seq.next_data_sn {
            return Err(DataOutError::DataSn {
                got: d.data_sn,
                expected: seq.next_data_sn,
            });
        }
        if d.buffer_offset != seq.next_offset {
            return Err(DataOutError::BufferOffset {
                got: d.buffer_offset,
                expected: seq.next_offset,
            });
        }
        let end = seq.next_offset.checked_add(len).filter(|&e| e <= seq.end);
        let Some(end) = end else {
            return Err(DataOutError::Overrun {
                offset: d.buffer_offset,
                len,
                end: seq.end,
            });
        };
        if d.fin && end != seq.end {
            return Err(DataOutError::EarlyFinal {
                at: end,
                end: seq.end,
            });
        }
        let placement = Placement {
            offset: seq.next_offset,
            len,
        };
        seq.next_offset = end;
        seq.next_data_sn = seq.next_data_sn.wrapping_add(1);
        let done = end == seq.end;
        self.received += len;
        if done {
            match idx {
                None => self.unsolicited = None,
                Some(i) => {
                    self.solicited.remove(i);
                }
            }
        }
        Ok(placement)
    }
}

/// One Data-In PDU of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataInPdu {
    pub data_sn: u32,
    pub offset: u32,
    pub len: u32,
    /// Last PDU of a MaxBurstLength sequence (F bit).
    pub fin: bool,
    /// Last PDU of the command.
    pub last: bool,
}

/// Split `total` bytes of read data into Data-In PDUs of at most
/// `max_seg` bytes (the initiator's MaxRecvDataSegmentLength), ending a
/// sequence (F bit) every `max_burst` bytes and at the end.
pub fn plan_data_in(total: u32, max_seg: u32, max_burst: u32) -> impl Iterator<Item = DataInPdu> {
    let max_seg = max_seg.max(512);
    let max_burst = max_burst.max(max_seg);
    let mut offset = 0u32;
    let mut burst_left = max_burst;
    let mut sn = 0u32;
    std::iter::from_fn(move || {
        if offset >= total {
            return None;
        }
        let len = max_seg.min(total - offset).min(burst_left);
        let last = offset + len == total;
        burst_left -= len;
        let fin = last || burst_left == 0;
        if burst_left == 0 {
            burst_left = max_burst;
        }
        let p = DataInPdu {
            data_sn: sn,
            offset,
            len,
            fin,
            last,
        };
        offset += len;
        sn += 1;
        Some(p)
    })
}

/// Residual of a transfer (RFC 7143 §11.4.5): `expected` is the
/// initiator's Expected Data Transfer Length, `actual` what the command
/// would move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Residual {
    pub overflow: bool,
    pub underflow: bool,
    pub count: u32,
}

impl Residual {
    pub fn of(expected: u32, actual: u64) -> Self {
        let e = u64::from(expected);
        if actual > e {
            Residual {
                overflow: true,
                underflow: false,
                count: (actual - e).min(u64::from(u32::MAX)) as u32,
            }
        } else if actual < e {
            Residual {
                overflow: false,
                underflow: true,
                count: (e - actual) as u32,
            }
        } else {
            Residual::default()
        }
    }
}

/// Shrink the transfer length of a block WRITE / WRITE AND VERIFY CDB to
/// `blocks`, for a write whose Expected Data Transfer Length is shorter
/// than its CDB (FCP-4 style: process the command, move no data beyond the
/// expected length). Returns false for other opcodes, and for WRITE(6)
/// with 0 blocks (which would mean 256); the caller then fails the command.
pub fn truncate_write_cdb(cdb: &mut [u8], blocks: u32) -> bool {
    let put = |cdb: &mut [u8], from: usize, bytes: &[u8]| -> bool {
        match cdb.get_mut(from..from + bytes.len()) {
            Some(d) => {
                d.copy_from_slice(bytes);
                true
            }
            None => false,
        }
    };
    match cdb.first() {
        Some(0x0a) if (1..=255).contains(&blocks) => put(cdb, 4, &[blocks as u8]),
        Some(0x2a | 0x2e) => match u16::try_from(blocks) {
            Ok(b) => put(cdb, 7, &b.to_be_bytes()),
            Err(_) => false,
        },
        Some(0xaa | 0xae) => put(cdb, 6, &blocks.to_be_bytes()),
        Some(0x8a | 0x8e) => put(cdb, 10, &blocks.to_be_bytes()),
        _ => false,
    }
}

/// Fixed-format sense data (SPC-4 §4.5.3) for the few conditions the
/// transport itself reports.
pub fn fixed_sense(key: u8, asc: u8, ascq: u8) -> Vec<u8> {
    let mut s = vec![0u8; 18];
    s[0] = 0x70;
    s[2] = key & 0x0f;
    s[7] = 10;
    s[12] = asc;
    s[13] = ascq;
    s
}

/// ILLEGAL REQUEST.
pub const SENSE_ILLEGAL_REQUEST: u8 = 0x05;
/// ABORTED COMMAND.
pub const SENSE_ABORTED_COMMAND: u8 = 0x0b;

/// Charge against a session's budget of buffered write data, released on
/// drop so every path out of a task gives it back.
#[derive(Debug)]
pub struct BudgetCharge {
    budget: Arc<AtomicUsize>,
    bytes: usize,
}

impl BudgetCharge {
    /// Reserve `bytes` if the budget (`limit` in total) allows.
    pub fn try_new(budget: &Arc<AtomicUsize>, bytes: usize, limit: usize) -> Option<Self> {
        let mut cur = budget.load(Ordering::Relaxed);
        loop {
            let next = cur.checked_add(bytes).filter(|&n| n <= limit)?;
            match budget.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    return Some(BudgetCharge {
                        budget: budget.clone(),
                        bytes,
                    })
                }
                Err(c) => cur = c,
            }
        }
    }
}

impl Drop for BudgetCharge {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A SCSI command as it waits for its data and then runs.
#[derive(Debug)]
pub struct ScsiJob {
    pub itt: u32,
    pub lun: Lun,
    pub cdb: Vec<u8>,
    pub expected_len: u32,
    pub read: bool,
    pub write: bool,
    pub attr: TaskAttribute,
    /// Collected data-out (length = Expected Data Transfer Length for writes).
    pub data: Vec<u8>,
    pub charge: Option<BudgetCharge>,
    pub immediate: bool,
    /// ExpDataSN of a write's final response: R2Ts sent.
    pub r2t_count: u32,
    /// Answer without calling the core (bidirectional command, budget
    /// exhausted...).
    pub local: Option<LocalAnswer>,
}

/// A response the transport gives by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalAnswer {
    /// TASK SET FULL: too much write data buffered in this session.
    TaskSetFull,
    /// CHECK CONDITION, ILLEGAL REQUEST, INVALID FIELD IN CDB.
    InvalidFieldInCdb,
    /// CHECK CONDITION, ABORTED COMMAND with this ASC/ASCQ: the Data-Out
    /// broke the rules (DataSN, offset, TTT, length).
    DataPhase { asc: u8, ascq: u8 },
}

impl DataOutError {
    /// ASC/ASCQ (sense key ABORTED COMMAND) the failed command reports.
    pub fn asc_ascq(&self) -> (u8, u8) {
        match self {
            // INVALID TARGET PORT TRANSFER TAG RECEIVED
            DataOutError::UnknownTtt(_) => (0x4b, 0x01),
            // TOO MUCH WRITE DATA
            DataOutError::Overrun { .. } | DataOutError::SegmentTooLong { .. } => (0x4b, 0x02),
            // DATA OFFSET ERROR
            DataOutError::BufferOffset { .. } => (0x4b, 0x05),
            // DATA PHASE ERROR
            _ => (0x4b, 0x00),
        }
    }
}

/// Where a task is.
#[derive(Debug)]
pub enum TaskPhase {
    /// Waiting for Data-Out.
    Receiving(Box<DataOutState>),
    /// All data here, waiting for its CmdSN turn.
    Ready,
    /// Handed to a worker.
    Running,
}

/// One entry of the task table.
#[derive(Debug)]
pub struct Task {
    /// Connection allegiance: the unique id of the connection (not the
    /// CID, which a reinstated connection reuses).
    pub conn: u64,
    pub lun: Lun,
    pub cmd_sn: u32,
    pub immediate: bool,
    /// Its CmdSN turn has come (always true for immediate commands).
    pub delivered: bool,
    pub phase: TaskPhase,
    /// Aborted by a TMF or a closing connection: it gets no response.
    pub aborted: bool,
    /// Task attribute (ORDERED tasks run alone, HEAD OF QUEUE first).
    pub attr: TaskAttribute,
    /// The command and its buffer, until it runs. `None` in `Receiving`
    /// while the connection reads a payload into the buffer.
    pub job: Option<Box<ScsiJob>>,
}

impl Task {
    fn ready_to_run(&self) -> bool {
        self.delivered && matches!(self.phase, TaskPhase::Ready) && !self.aborted
    }
}

/// A non-SCSI request that takes a CmdSN.
#[derive(Debug)]
pub enum Request {
    Nop(super::pdu::NopOut, Vec<u8>),
    Text(super::pdu::TextRequest, Vec<u8>),
    Logout(super::pdu::LogoutRequest),
    Tmf(super::pdu::TaskMgmtRequest),
}

/// What sits in a CmdSN slot.
#[derive(Debug)]
pub enum Ordered {
    /// A SCSI command, by ITT.
    Task(u32),
    /// A request that arrived on connection (unique id) `.0`.
    Request(u64, Box<Request>),
    /// Consumed by ABORT TASK of a command that never arrived.
    Skip,
}

/// Result of a non-immediate PDU arriving.
#[derive(Debug)]
pub enum Arrival {
    Dropped,
    Held,
    /// Delivered items, the arriving one first, then any held successors.
    Delivered(Vec<Ordered>),
}

/// Kind of session.
#[derive(Debug, Clone)]
pub enum SessionKind {
    Discovery,
    Normal {
        target: Arc<TargetDef>,
        nexus: Arc<Nexus>,
    },
}

/// The state all connections of a session share.
#[derive(Debug)]
pub struct SessionState {
    pub window: CmdWindow,
    held: HashMap<u32, Ordered>,
    pub tasks: HashMap<u32, Task>,
    next_ttt: u32,
    /// The session is being torn down: accept no new work.
    pub closing: bool,
    /// Its connections by CID.
    pub conns: HashMap<u16, Arc<Conn>>,
    /// Tasks handed to workers.
    running: usize,
    /// An ORDERED task is among them.
    ordered_running: bool,
    /// Runnable tasks held back by task-attribute ordering, in order.
    blocked: std::collections::VecDeque<u32>,
}

impl SessionState {
    pub fn new(window: CmdWindow) -> Self {
        SessionState {
            window,
            held: HashMap::new(),
            tasks: HashMap::new(),
            next_ttt: 1,
            closing: false,
            conns: HashMap::new(),
            running: 0,
            ordered_running: false,
            blocked: std::collections::VecDeque::new(),
        }
    }

    /// A fresh Target Transfer Tag (never 0xffffffff).
    pub fn alloc_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        t
    }

    /// Sequence a non-immediate PDU by CmdSN.
    pub fn arrive(&mut self, cmd_sn: u32, item: Ordered) -> Arrival {
        match self.window.check(cmd_sn) {
            CmdSnCheck::Drop => Arrival::Dropped,
            CmdSnCheck::Hold => match self.held.entry(cmd_sn) {
                std::collections::hash_map::Entry::Occupied(_) => Arrival::Dropped,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(item);
                    Arrival::Held
                }
            },
            CmdSnCheck::Deliver => {
                // Nothing is ever held at ExpCmdSN: every advance drains.
                self.window.advance();
                let mut out = vec![item];
                out.extend(self.drain_from_exp());
                Arrival::Delivered(out)
            }
        }
    }

    /// Pop held items that are now in order.
    fn drain_from_exp(&mut self) -> Vec<Ordered> {
        let mut out = Vec::new();
        while let Some(item) = self.held.remove(&self.window.exp_cmd_sn()) {
            self.window.advance();
            if let Ordered::Skip = item {
                self.window.complete();
            } else {
                out.push(item);
            }
        }
        out
    }

    /// ABORT TASK for a command that is not here: if its CmdSN is still
    /// ahead in the window (before the TMF's own), consume that slot so the
    /// command is ignored when it comes (RFC 7143 §11.6.1). Returns whether
    /// the slot was consumed.
    pub fn skip_cmd_sn(&mut self, ref_cmd_sn: u32, tmf_cmd_sn: u32) -> bool {
        let ahead = matches!(
            self.window.check(ref_cmd_sn),
            CmdSnCheck::Deliver | CmdSnCheck::Hold
        );
        if !ahead || !sn_lt(ref_cmd_sn, tmf_cmd_sn) {
            return false;
        }
        if self.held.contains_key(&ref_cmd_sn) {
            return false;
        }
        if ref_cmd_sn == self.window.exp_cmd_sn() {
            // The slot is consumed at once; held successors become
            // deliverable (`take_deliverable`).
            self.window.advance();
            self.window.complete();
        } else {
            self.held.insert(ref_cmd_sn, Ordered::Skip);
        }
        true
    }

    /// Held items that are deliverable now (after a skip at ExpCmdSN).
    pub fn take_deliverable(&mut self) -> Vec<Ordered> {
        self.drain_from_exp()
    }

    /// Drop held requests of a closed connection.
    pub fn forget_held_of(&mut self, conn: u64) {
        for v in self.held.values_mut() {
            if matches!(v, Ordered::Request(c, _) if *c == conn) {
                *v = Ordered::Skip;
            }
        }
    }

    /// Remove a task, opening a CmdSN slot if it held one (and its place
    /// among the running ones; call [`SessionState::release_blocked`] then).
    pub fn remove_task(&mut self, itt: u32) -> Option<Task> {
        let t = self.tasks.remove(&itt)?;
        if !t.immediate {
            self.window.complete();
        }
        if matches!(t.phase, TaskPhase::Running) {
            self.running = self.running.saturating_sub(1);
            if t.attr == TaskAttribute::Ordered {
                self.ordered_running = false;
            }
        }
        Some(t)
    }

    /// Mark a task delivered; returns its job if it can run now.
    pub fn deliver_task(&mut self, itt: u32) -> Option<Box<ScsiJob>> {
        let t = self.tasks.get_mut(&itt)?;
        t.delivered = true;
        self.take_if_ready(itt)
    }

    /// Whether task attributes let a task with `attr` start now (SAM-5
    /// task set management, session-wide): an ORDERED task waits for all
    /// running tasks; everything but HEAD OF QUEUE waits behind a running
    /// ORDERED task and behind tasks already held back.
    fn admissible(&self, attr: TaskAttribute, queued_first: bool) -> bool {
        match attr {
            TaskAttribute::HeadOfQueue => true,
            _ if self.ordered_running => false,
            _ if !queued_first && !self.blocked.is_empty() => false,
            TaskAttribute::Ordered => self.running == 0,
            _ => true,
        }
    }

    fn start(&mut self, itt: u32) -> Option<Box<ScsiJob>> {
        let t = self.tasks.get_mut(&itt)?;
        let job = t.job.take()?;
        t.phase = TaskPhase::Running;
        let ordered = t.attr == TaskAttribute::Ordered;
        self.running += 1;
        if ordered {
            self.ordered_running = true;
        }
        Some(job)
    }

    /// Move a task to `Running` and hand out its job if it is delivered,
    /// has all its data, and task ordering allows; otherwise it waits for
    /// [`SessionState::release_blocked`].
    pub fn take_if_ready(&mut self, itt: u32) -> Option<Box<ScsiJob>> {
        let t = self.tasks.get(&itt)?;
        if !t.ready_to_run() {
            return None;
        }
        if !self.admissible(t.attr, false) {
            if !self.blocked.contains(&itt) {
                self.blocked.push_back(itt);
            }
            return None;
        }
        self.start(itt)
    }

    /// Held-back tasks that may start now, with their connection ids.
    pub fn release_blocked(&mut self) -> Vec<(u64, Box<ScsiJob>)> {
        let mut out = Vec::new();
        while let Some(&itt) = self.blocked.front() {
            let runnable = self
                .tasks
                .get(&itt)
                .map(|t| (t.ready_to_run(), t.attr, t.conn));
            let Some((true, attr, conn)) = runnable else {
                // Aborted or gone while waiting.
                self.blocked.pop_front();
                continue;
            };
            if !self.admissible(attr, true) {
                break;
            }
            self.blocked.pop_front();
            if let Some(job) = self.start(itt) {
                out.push((conn, job));
            }
        }
        out
    }

    /// The R2Ts task `itt` may send now (allocating their TTTs).
    pub fn r2ts_for(&mut self, itt: u32) -> Vec<R2tPlan> {
        let SessionState {
            tasks, next_ttt, ..
        } = self;
        let Some(t) = tasks.get_mut(&itt) else {
            return Vec::new();
        };
        let TaskPhase::Receiving(d) = &mut t.phase else {
            return Vec::new();
        };
        d.next_r2ts(|| {
            let v = *next_ttt;
            *next_ttt = next_ttt.wrapping_add(1);
            if *next_ttt == RESERVED_TAG {
                *next_ttt = 1;
            }
            v
        })
    }

    /// ITTs of the tasks with allegiance to connection `conn`.
    pub fn tasks_of(&self, conn: u64) -> Vec<u32> {
        self.tasks
            .iter()
            .filter(|(_, t)| t.conn == conn)
            .map(|(&i, _)| i)
            .collect()
    }
}

/// A logged-in session, shared by its connections.
#[derive(Debug)]
pub struct Session {
    pub tsih: u16,
    pub isid: [u8; 6],
    pub initiator_name: String,
    pub kind: SessionKind,
    pub params: SessionParams,
    pub limits: DataOutLimits,
    state: Mutex<SessionState>,
    /// Signalled (`notify_changed`) whenever a task leaves the table.
    changed: Condvar,
    /// Threads inside `wait_until`. Almost never any (a TMF, a logout or a
    /// closing connection waiting for tasks to end), so the completion of
    /// every command would otherwise pay a `futex` wake-up system call for
    /// nobody. Counted under the state lock before waiting: a notifier
    /// changes the state under that lock and reads the count after it, so
    /// it cannot miss a waiter that saw the old state.
    changed_waiters: AtomicUsize,
    /// ExpCmdSN (low half) and MaxCmdSN (high half), readable without the
    /// lock for stamping outgoing PDUs.
    sn: AtomicU64,
    /// Bytes of write data buffered by this session's tasks.
    pub buffered: Arc<AtomicUsize>,
    /// A task with an attribute that orders tasks (ORDERED, HEAD OF QUEUE,
    /// ACA) arrived on this session. Its READs no longer go by reference
    /// from then on: such data leaves the page cache only when it is sent,
    /// after the task has ended for the task set, and an ORDERED write let
    /// in by that end could change it. (SIMPLE reads already sent by
    /// reference when the first such task arrives are not covered; the
    /// initiators in use send SIMPLE only.)
    pub ordered_seen: AtomicBool,
}

impl Session {
    pub fn new(
        tsih: u16,
        isid: [u8; 6],
        initiator_name: String,
        kind: SessionKind,
        params: SessionParams,
        window: CmdWindow,
    ) -> Self {
        let limits = DataOutLimits::from_params(&params);
        let s = Session {
            tsih,
            isid,
            initiator_name,
            kind,
            params,
            limits,
            state: Mutex::new(SessionState::new(window)),
            changed: Condvar::new(),
            changed_waiters: AtomicUsize::new(0),
            sn: AtomicU64::new(0),
            buffered: Arc::new(AtomicUsize::new(0)),
            ordered_seen: AtomicBool::new(false),
        };
        s.publish(&window);
        s
    }

    /// Lock the shared state. A poisoned lock (a panic elsewhere) still
    /// yields the state: it is kept consistent at every unlock.
    pub fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make the window visible to PDU stamping; call before unlocking
    /// after any window change.
    pub fn publish(&self, w: &CmdWindow) {
        let v = u64::from(w.exp_cmd_sn()) | (u64::from(w.max_cmd_sn()) << 32);
        self.sn.store(v, Ordering::Release);
    }

    /// (ExpCmdSN, MaxCmdSN) as last published.
    pub fn exp_max(&self) -> (u32, u32) {
        let v = self.sn.load(Ordering::Acquire);
        (v as u32, (v >> 32) as u32)
    }

    pub fn target(&self) -> Option<&Arc<TargetDef>> {
        match &self.kind {
            SessionKind::Normal { target, .. } => Some(target),
            SessionKind::Discovery => None,
        }
    }

    pub fn nexus(&self) -> Option<&Arc<Nexus>> {
        match &self.kind {
            SessionKind::Normal { nexus, .. } => Some(nexus),
            SessionKind::Discovery => None,
        }
    }

    /// Wait (with the lock) until `done` holds or `timeout` passes.
    pub fn wait_until<'a>(
        &self,
        mut guard: MutexGuard<'a, SessionState>,
        timeout: std::time::Duration,
        mut done: impl FnMut(&SessionState) -> bool,
    ) -> (MutexGuard<'a, SessionState>, bool) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if done(&guard) {
                return (guard, true);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return (guard, false);
            }
            self.changed_waiters.fetch_add(1, Ordering::SeqCst);
            guard = match self.changed.wait_timeout(guard, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
            self.changed_waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Wake the threads in [`Self::wait_until`], if any. Call after the
    /// change was made under the state lock (and, usually, released).
    pub fn notify_changed(&self) {
        if self.changed_waiters.load(Ordering::SeqCst) > 0 {
            self.changed.notify_all();
        }
    }
}

/// SCSI initiator port name: `<iqn>,i,0x<ISID hex>`.
pub fn initiator_port_name(initiator: &str, isid: &[u8; 6]) -> String {
    let mut s = format!("{initiator},i,0x");
    for b in isid {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// SCSI target port name: `<iqn>,t,0x<TPGT as 4 hex digits>`.
pub fn target_port_name(target: &str, tpgt: u16) -> String {
    format!("{target},t,0x{tpgt:04x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> DataOutLimits {
        DataOutLimits {
            initial_r2t: false,
            immediate_data: true,
            first_burst_length: 65536,
            max_burst_length: 262144,
            max_outstanding_r2t: 1,
            max_recv_data_segment_length: 8192,
        }
    }

    fn dout(ttt: u32, data_sn: u32, buffer_offset: u32, fin: bool) -> DataOut {
        DataOut {
            fin,
            lun: Lun::default(),
            itt: 1,
            ttt,
            exp_stat_sn: 0,
            data_sn,
            buffer_offset,
        }
    }

    #[test]
    fn notify_changed_wakes_a_waiter_and_counts_it() {
        let s = Arc::new(Session::new(
            1,
            [0; 6],
            "iqn.2026-11.test:waiter".into(),
            SessionKind::Discovery,
            SessionParams::default(),
            CmdWindow::new(1, 32),
        ));
        // Nobody waits yet (the wait below relies on the count starting at 0).
        s.notify_changed();
        assert_eq!(s.changed_waiters.load(Ordering::SeqCst), 0);
        let waiter = {
            let s = s.clone();
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                let (_g, done) =
                    s.wait_until(s.lock(), std::time::Duration::from_secs(120), |st| {
                        st.closing
                    });
                (done, started.elapsed())
            })
        };
        while s.changed_waiters.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        s.lock().closing = true;
        s.notify_changed();
        let (done, waited) = waiter.join().unwrap();
        assert!(done);
        // Woken by the notification, not by the end of its 120 s timeout.
        assert!(
            waited < std::time::Duration::from_secs(60),
            "waited {waited:?}"
        );
        assert_eq!(s.changed_waiters.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn window_delivers_in_order_holds_gaps_drops_outside() {
        let mut st = SessionState::new(CmdWindow::new(10, 4));
        assert_eq!(st.window.room(), 4);
        // too low and too high are dropped
        assert!(matches!(st.arrive(9, Ordered::Task(9)), Arrival::Dropped));
        assert!(matches!(st.arrive(14, Ordered::Task(14)), Arrival::Dropped));
        // 12 arrives before 10 and 11: held
        assert!(matches!(st.arrive(12, Ordered::Task(12)), Arrival::Held));
        assert!(matches!(st.arrive(12, Ordered::Task(99)), Arrival::Dropped));
        match st.arrive(10, Ordered::Task(10)) {
            Arrival::Delivered(v) => assert_eq!(v.len(), 1),
            other => panic!("{other:?}"),
        }
        match st.arrive(11, Ordered::Task(11)) {
            Arrival::Delivered(v) => {
                let itts: Vec<u32> = v
                    .iter()
                    .map(|o| match o {
                        Ordered::Task(i) => *i,
                        _ => 0,
                    })
                    .collect();
                assert_eq!(itts, vec![11, 12]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(st.window.exp_cmd_sn(), 13);
        // nothing completed: MaxCmdSN still 13, one slot left
        assert_eq!(st.window.max_cmd_sn(), 13);
        assert!(matches!(st.arrive(14, Ordered::Task(14)), Arrival::Dropped));
        st.window.complete();
        assert!(matches!(st.arrive(14, Ordered::Task(14)), Arrival::Held));
    }

    #[test]
    fn window_wraps_around_serial_space() {
        let mut st = SessionState::new(CmdWindow::new(u32::MAX - 1, 8));
        for sn in [u32::MAX - 1, u32::MAX, 0, 1] {
            assert!(matches!(
                st.arrive(sn, Ordered::Task(sn)),
                Arrival::Delivered(_)
            ));
        }
        assert_eq!(st.window.exp_cmd_sn(), 2);
        assert!(matches!(
            st.arrive(u32::MAX, Ordered::Task(0)),
            Arrival::Dropped
        ));
        assert!(sn_lt(u32::MAX, 1));
        assert!(!sn_lt(1, u32::MAX));
    }

    #[test]
    fn skip_consumes_a_missing_slot() {
        let mut st = SessionState::new(CmdWindow::new(5, 8));
        // ABORT TASK (immediate, CmdSN 7) for CmdSN 6 that never arrived
        assert!(st.skip_cmd_sn(6, 7));
        assert!(
            matches!(st.arrive(5, Ordered::Task(5)), Arrival::Delivered(ref v) if v.len() == 1)
        );
        assert_eq!(st.window.exp_cmd_sn(), 7);
        // the late command 6 is ignored
        assert!(matches!(st.arrive(6, Ordered::Task(6)), Arrival::Dropped));
        // a slot behind ExpCmdSN cannot be skipped
        assert!(!st.skip_cmd_sn(3, 7));
        // skip at ExpCmdSN itself
        assert!(st.skip_cmd_sn(7, 8));
        assert_eq!(st.window.exp_cmd_sn(), 8);
    }

    #[test]
    fn immediate_data_then_r2ts_by_max_burst() {
        let mut l = limits();
        l.initial_r2t = true;
        l.max_burst_length = 16384;
        l.max_outstanding_r2t = 2;
        let mut s = DataOutState::new(50000, 8192, true, l).unwrap();
        let mut ttt = 100;
        let r = s.next_r2ts(|| {
            ttt += 1;
            ttt
        });
        assert_eq!(
            r,
            vec![
                R2tPlan {
                    ttt: 101,
                    r2t_sn: 0,
                    offset: 8192,
                    len: 16384
                },
                R2tPlan {
                    ttt: 102,
                    r2t_sn: 1,
                    offset: 24576,
                    len: 16384
                }
            ]
        );
        // no more until one completes
        assert!(s.next_r2ts(|| 0).is_empty());
        // first burst in two PDUs
        assert_eq!(
            s.accept(&dout(101, 0, 8192, false), 8192).unwrap(),
            Placement {
                offset: 8192,
                len: 8192
            }
        );
        assert_eq!(
            s.accept(&dout(101, 1, 16384, true), 8192).unwrap().offset,
            16384
        );
        let r = s.next_r2ts(|| 103);
        assert_eq!(
            r,
            vec![R2tPlan {
                ttt: 103,
                r2t_sn: 2,
                offset: 40960,
                len: 9040
            }]
        );
        s.accept(&dout(102, 0, 24576, false), 8192).unwrap();
        s.accept(&dout(102, 1, 32768, true), 8192).unwrap();
        assert!(!s.is_complete());
        s.accept(&dout(103, 0, 40960, false), 8192).unwrap();
        s.accept(&dout(103, 1, 49152, true), 848).unwrap();
        assert!(s.is_complete());
        assert_eq!(s.r2t_count(), 3);
    }

    #[test]
    fn unsolicited_sequence_up_to_first_burst() {
        let mut l = limits();
        l.first_burst_length = 16384;
        let mut s = DataOutState::new(40000, 4096, false, l).unwrap();
        // solicited part starts after the first burst
        let r = s.next_r2ts(|| 7);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].offset, r[0].len), (16384, 23616));
        s.accept(&dout(RESERVED_TAG, 0, 4096, false), 8192).unwrap();
        assert_eq!(
            s.accept(&dout(RESERVED_TAG, 1, 12288, false), 8192),
            Err(DataOutError::Overrun {
                offset: 12288,
                len: 8192,
                end: 16384
            })
        );
        s.accept(&dout(RESERVED_TAG, 1, 12288, true), 4096).unwrap();
        assert_eq!(
            s.accept(&dout(RESERVED_TAG, 2, 16384, false), 10),
            Err(DataOutError::NoUnsolicitedSequence)
        );
    }

    #[test]
    fn data_out_violations_are_precise() {
        let l = limits();
        let mut s = DataOutState::new(16384, 0, true, l).unwrap();
        let r = s.next_r2ts(|| 9);
        assert_eq!((r[0].offset, r[0].len), (0, 16384));
        assert_eq!(
            s.accept(&dout(9, 1, 0, false), 512),
            Err(DataOutError::DataSn {
                got: 1,
                expected: 0
            })
        );
        assert_eq!(
            s.accept(&dout(9, 0, 512, false), 512),
            Err(DataOutError::BufferOffset {
                got: 512,
                expected: 0
            })
        );
        assert_eq!(
            s.accept(&dout(8, 0, 0, false), 512),
            Err(DataOutError::UnknownTtt(8))
        );
        assert_eq!(
            s.accept(&dout(9, 0, 0, true), 512),
            Err(DataOutError::EarlyFinal {
                at: 512,
                end: 16384
            })
        );
        assert_eq!(
            s.accept(&dout(9, 0, 0, false), 8193),
            Err(DataOutError::SegmentTooLong {
                len: 8193,
                max: 8192
            })
        );
        let mut strict = limits();
        strict.initial_r2t = true;
        assert_eq!(
            DataOutState::new(16384, 0, false, strict),
            Err(DataOutError::UnsolicitedNotAllowed)
        );
        strict.immediate_data = false;
        assert_eq!(
            DataOutState::new(16384, 512, true, strict),
            Err(DataOutError::ImmediateDataNotAllowed)
        );
        assert!(matches!(
            DataOutState::new(100, 512, true, limits()),
            Err(DataOutError::ImmediateTooLong { .. })
        ));
    }

    #[test]
    fn write_fully_in_immediate_data_needs_nothing_more() {
        let mut s = DataOutState::new(4096, 4096, true, limits()).unwrap();
        assert!(s.is_complete());
        assert!(s.next_r2ts(|| 1).is_empty());
    }

    #[test]
    fn data_in_split_by_segment_and_burst() {
        let v: Vec<DataInPdu> = plan_data_in(20000, 8192, 12288).collect();
        let shape: Vec<(u32, u32, bool, bool)> =
            v.iter().map(|p| (p.offset, p.len, p.fin, p.last)).collect();
        assert_eq!(
            shape,
            vec![
                (0, 8192, false, false),
                (8192, 4096, true, false),
                (12288, 7712, true, true)
            ]
        );
        assert_eq!(
            v.iter().map(|p| p.data_sn).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(plan_data_in(0, 8192, 8192).count(), 0);
    }

    #[test]
    fn residuals() {
        assert_eq!(Residual::of(512, 512), Residual::default());
        assert_eq!(
            Residual::of(0, 512),
            Residual {
                overflow: true,
                underflow: false,
                count: 512
            }
        );
        assert_eq!(
            Residual::of(10000, 512),
            Residual {
                overflow: false,
                underflow: true,
                count: 9488
            }
        );
    }

    #[test]
    fn write_cdbs_truncate_to_whole_blocks() {
        use crate::scsi::cdb::data_out_len;
        let mut w10 = [0x2a, 0, 0, 0, 0, 9, 0, 0, 2, 0];
        assert!(truncate_write_cdb(&mut w10, 1));
        assert_eq!(data_out_len(&w10, 512), Some(512));
        assert_eq!(w10[5], 9);
        let mut w16 = [0u8; 16];
        w16[0] = 0x8a;
        w16[13] = 8;
        assert!(truncate_write_cdb(&mut w16, 0));
        assert_eq!(data_out_len(&w16, 512), Some(0));
        let mut w6 = [0x0a, 0, 0, 0, 4, 0];
        assert!(!truncate_write_cdb(&mut w6, 0));
        assert!(truncate_write_cdb(&mut w6, 3));
        assert_eq!(w6[4], 3);
        let mut caw = [0u8; 16];
        caw[0] = 0x89;
        assert!(!truncate_write_cdb(&mut caw, 1));
        assert!(!truncate_write_cdb(&mut [0x2a, 0, 0], 1));
    }

    #[test]
    fn port_names() {
        assert_eq!(
            initiator_port_name("iqn.a", &[0x23, 0xd0, 0, 0, 0, 1]),
            "iqn.a,i,0x23d000000001"
        );
        assert_eq!(target_port_name("iqn.t", 1), "iqn.t,t,0x0001");
    }

    fn ready_task(st: &mut SessionState, itt: u32, attr: TaskAttribute) {
        st.tasks.insert(
            itt,
            Task {
                conn: 1,
                lun: Lun::default(),
                cmd_sn: itt,
                immediate: true,
                delivered: true,
                phase: TaskPhase::Ready,
                aborted: false,
                attr,
                job: Some(Box::new(ScsiJob {
                    itt,
                    lun: Lun::default(),
                    cdb: vec![0; 6],
                    expected_len: 0,
                    read: false,
                    write: false,
                    attr,
                    data: Vec::new(),
                    charge: None,
                    immediate: true,
                    r2t_count: 0,
                    local: None,
                })),
            },
        );
    }

    #[test]
    fn ordered_tasks_run_alone_and_in_order() {
        use TaskAttribute::*;
        let mut st = SessionState::new(CmdWindow::new(0, 16));
        ready_task(&mut st, 1, Simple);
        assert!(st.take_if_ready(1).is_some());
        // ORDERED waits for the running SIMPLE; later SIMPLEs wait behind it
        ready_task(&mut st, 2, Ordered);
        assert!(st.take_if_ready(2).is_none());
        ready_task(&mut st, 3, Simple);
        assert!(st.take_if_ready(3).is_none());
        // HEAD OF QUEUE jumps the line
        ready_task(&mut st, 4, HeadOfQueue);
        assert!(st.take_if_ready(4).is_some());
        st.remove_task(4);
        assert!(st.release_blocked().is_empty(), "task 1 still runs");
        st.remove_task(1);
        let r: Vec<u32> = st.release_blocked().iter().map(|(_, j)| j.itt).collect();
        assert_eq!(r, vec![2]);
        st.remove_task(2);
        let r: Vec<u32> = st.release_blocked().iter().map(|(_, j)| j.itt).collect();
        assert_eq!(r, vec![3]);
        // an aborted waiter is skipped
        ready_task(&mut st, 5, Ordered);
        assert!(st.take_if_ready(5).is_none());
        ready_task(&mut st, 6, Simple);
        assert!(st.take_if_ready(6).is_none());
        st.remove_task(5);
        st.remove_task(3);
        let r: Vec<u32> = st.release_blocked().iter().map(|(_, j)| j.itt).collect();
        assert_eq!(r, vec![6]);
    }

    #[test]
    fn budget_is_bounded_and_released() {
        let b = Arc::new(AtomicUsize::new(0));
        let c1 = BudgetCharge::try_new(&b, 600, 1000).unwrap();
        assert!(BudgetCharge::try_new(&b, 600, 1000).is_none());
        drop(c1);
        assert!(BudgetCharge::try_new(&b, 1000, 1000).is_some());
        assert_eq!(b.load(Ordering::Relaxed), 0);
    }

    proptest! {
        /// Any split of a write into Data-Out PDUs that follows the R2Ts is
        /// accepted and completes exactly at the expected length.
        #[test]
        fn r2t_sequences_cover_the_buffer(total in 1u32..300_000, imm_frac in 0u32..100,
                                          burst in 512u32..70_000, seg in 512u32..9000,
                                          outstanding in 1u16..4) {
            let l = DataOutLimits { initial_r2t: true, immediate_data: true,
                first_burst_length: 65536, max_burst_length: burst,
                max_outstanding_r2t: outstanding, max_recv_data_segment_length: seg };
            let imm = (total.min(65536).min(seg) as u64 * u64::from(imm_frac) / 100) as u32;
            let mut s = DataOutState::new(total, imm, true, l).unwrap();
            let mut covered = vec![false; total as usize];
            for b in covered.iter_mut().take(imm as usize) { *b = true; }
            let mut ttt = 0u32;
            let mut rounds = 0;
            while !s.is_complete() {
                rounds += 1;
                prop_assert!(rounds < 100_000);
                let r2ts = s.next_r2ts(|| { ttt += 1; ttt });
                prop_assert!(!r2ts.is_empty());
                for r in r2ts {
                    prop_assert!(r.len <= burst);
                    let mut off = r.offset;
                    let mut sn = 0;
                    while off < r.offset + r.len {
                        let len = seg.min(r.offset + r.len - off);
                        let fin = off + len == r.offset + r.len;
                        let p = s.accept(&dout(r.ttt, sn, off, fin), len).unwrap();
                        for b in &mut covered[p.offset as usize..(p.offset + p.len) as usize] {
                            prop_assert!(!*b);
                            *b = true;
                        }
                        off += len;
                        sn += 1;
                    }
                }
            }
            prop_assert!(covered.iter().all(|&b| b));
        }

        #[test]
        fn data_in_plan_tiles_the_data(total in 0u32..3_000_000, seg in 512u32..300_000,
                                       burst in 512u32..1_100_000) {
            let mut next = 0u32;
            let mut burst_used = 0u32;
            let max_burst = burst.max(seg);
            for (n, p) in plan_data_in(total, seg, burst).enumerate() {
                prop_assert_eq!(p.offset, next);
                prop_assert_eq!(p.data_sn as usize, n);
                prop_assert!(p.len > 0 && p.len <= seg);
                burst_used += p.len;
                prop_assert!(burst_used <= max_burst);
                if p.fin { burst_used = 0; }
                next += p.len;
                prop_assert_eq!(p.last, next == total);
                if p.last { prop_assert!(p.fin); }
            }
            prop_assert_eq!(next, total);
        }
    }
}
