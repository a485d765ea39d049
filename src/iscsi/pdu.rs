//! iSCSI PDU codec (RFC 7143 §11): the 48-byte Basic Header Segment, the
//! Additional Header Segments of a SCSI Command, the optional header digest,
//! the data segment padded to a multiple of four, and the optional data
//! digest.
//!
//! Decoding goes through a checked [`Reader`]; nothing here can panic on
//! hostile bytes, every malformation is a [`PduError`]. Reserved bits are
//! ignored on decode and written as zero on encode, so `encode → decode` is
//! the identity (the property tests check that for every PDU kind).
//!
//! The codec is split in stages so the connection can bound every read
//! before it allocates: [`Prefix::parse`] gives the AHS and data-segment
//! lengths from the first 48 bytes, [`Bhs::decode`] types the header, and
//! the data segment is read wherever the caller wants it (straight into a
//! task's buffer for Data-Out). [`Pdu::decode`] / [`Pdu::encode`] do all
//! stages on one contiguous buffer, for tests and the fuzz target.

use super::digest::{self, Crc32c, DIGEST_LEN};

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// Initiator Task Tag / Target Transfer Tag value meaning "none".
pub const RESERVED_TAG: u32 = 0xffff_ffff;
/// Largest total AHS length the 8-bit TotalAHSLength field can express.
pub const MAX_AHS_LEN: usize = 255 * 4;
/// The data segment length field is 24 bits wide.
pub const MAX_DATA_SEGMENT_LEN: u32 = 0x00ff_ffff;

/// Malformed or unacceptable PDU bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    #[error("PDU truncated: need {needed} bytes, have {available}")]
    Truncated { needed: usize, available: usize },
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    #[error("data segment of {len} bytes exceeds the limit of {max}")]
    DataSegmentTooLong { len: u32, max: u32 },
    #[error("header digest mismatch: computed {computed:#010x}, received {received:#010x}")]
    HeaderDigest { computed: u32, received: u32 },
    #[error("data digest mismatch: computed {computed:#010x}, received {received:#010x}")]
    DataDigest { computed: u32, received: u32 },
    #[error("opcode {opcode:#04x} carries {len} bytes of AHS, which it may not have")]
    UnexpectedAhs { opcode: u8, len: usize },
    #[error("AHS entry of {len} bytes overruns the {available} bytes left in the AHS")]
    AhsOverrun { len: usize, available: usize },
    #[error("unknown AHS type {0}")]
    UnknownAhsType(u8),
    #[error("AHS type {ahs_type} has invalid length {len}")]
    BadAhsLength { ahs_type: u8, len: u16 },
    #[error("duplicate AHS of type {0}")]
    DuplicateAhs(u8),
}

/// Checked cursor over untrusted bytes: every read either succeeds or
/// returns [`PduError::Truncated`].
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], PduError> {
        let end = self.pos.checked_add(n).ok_or(PduError::Truncated {
            needed: usize::MAX,
            available: self.buf.len(),
        })?;
        match self.buf.get(self.pos..end) {
            Some(s) => {
                self.pos = end;
                Ok(s)
            }
            None => Err(PduError::Truncated {
                needed: end,
                available: self.buf.len(),
            }),
        }
    }

    pub fn skip(&mut self, n: usize) -> Result<(), PduError> {
        self.take(n).map(|_| ())
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], PduError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, PduError> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, PduError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u24(&mut self) -> Result<u32, PduError> {
        let [a, b, c] = self.array::<3>()?;
        Ok(u32::from_be_bytes([0, a, b, c]))
    }

    pub fn u32(&mut self) -> Result<u32, PduError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// Everything not yet read.
    pub fn rest(&mut self) -> &'a [u8] {
        let s = self.buf.get(self.pos..).unwrap_or(&[]);
        self.pos = self.buf.len();
        s
    }
}

/// The opcodes of RFC 7143 §11.1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    NopOut = 0x00,
    ScsiCommand = 0x01,
    TaskMgmtRequest = 0x02,
    LoginRequest = 0x03,
    TextRequest = 0x04,
    DataOut = 0x05,
    LogoutRequest = 0x06,
    SnackRequest = 0x10,
    NopIn = 0x20,
    ScsiResponse = 0x21,
    TaskMgmtResponse = 0x22,
    LoginResponse = 0x23,
    TextResponse = 0x24,
    DataIn = 0x25,
    LogoutResponse = 0x26,
    R2t = 0x31,
    AsyncMessage = 0x32,
    Reject = 0x3f,
}

impl Opcode {
    pub fn from_u8(v: u8) -> Result<Opcode, PduError> {
        Ok(match v & 0x3f {
            0x00 => Opcode::NopOut,
            0x01 => Opcode::ScsiCommand,
            0x02 => Opcode::TaskMgmtRequest,
            0x03 => Opcode::LoginRequest,
            0x04 => Opcode::TextRequest,
            0x05 => Opcode::DataOut,
            0x06 => Opcode::LogoutRequest,
            0x10 => Opcode::SnackRequest,
            0x20 => Opcode::NopIn,
            0x21 => Opcode::ScsiResponse,
            0x22 => Opcode::TaskMgmtResponse,
            0x23 => Opcode::LoginResponse,
            0x24 => Opcode::TextResponse,
            0x25 => Opcode::DataIn,
            0x26 => Opcode::LogoutResponse,
            0x31 => Opcode::R2t,
            0x32 => Opcode::AsyncMessage,
            0x3f => Opcode::Reject,
            other => return Err(PduError::UnknownOpcode(other)),
        })
    }

    /// True for PDUs an initiator sends.
    pub fn is_initiator(self) -> bool {
        (self as u8) < 0x20
    }
}

/// The 8-byte LUN field, kept raw so responses echo it verbatim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Lun(pub [u8; 8]);

impl Lun {
    /// Decode SAM single-level addressing: peripheral device addressing
    /// (method 00b, bus 0) and flat space addressing (method 01b). `None`
    /// for any other method or a non-zero second level, which no LU here
    /// can match.
    pub fn to_flat(self) -> Option<u64> {
        let [b0, b1, rest @ ..] = self.0;
        if rest.iter().any(|&b| b != 0) {
            return None;
        }
        match b0 >> 6 {
            0b00 if b0 & 0x3f == 0 => Some(u64::from(b1)),
            0b01 => Some((u64::from(b0 & 0x3f) << 8) | u64::from(b1)),
            _ => None,
        }
    }

    /// Encode a LUN number: peripheral addressing below 256, flat space
    /// addressing up to 16383 (what REPORT LUNS reports).
    pub fn from_flat(lun: u64) -> Lun {
        let mut b = [0u8; 8];
        if lun < 256 {
            b[1] = lun as u8;
        } else {
            let l = (lun & 0x3fff) as u16;
            b[0] = 0x40 | (l >> 8) as u8;
            b[1] = l as u8;
        }
        Lun(b)
    }
}

/// Task attribute field of a SCSI Command (3 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskAttribute {
    Untagged,
    Simple,
    Ordered,
    HeadOfQueue,
    Aca,
    Reserved(u8),
}

impl TaskAttribute {
    pub fn from_u8(v: u8) -> Self {
        match v & 7 {
            0 => TaskAttribute::Untagged,
            1 => TaskAttribute::Simple,
            2 => TaskAttribute::Ordered,
            3 => TaskAttribute::HeadOfQueue,
            4 => TaskAttribute::Aca,
            r => TaskAttribute::Reserved(r),
        }
    }

    pub fn to_u8(self) -> u8 {
        match self {
            TaskAttribute::Untagged => 0,
            TaskAttribute::Simple => 1,
            TaskAttribute::Ordered => 2,
            TaskAttribute::HeadOfQueue => 3,
            TaskAttribute::Aca => 4,
            TaskAttribute::Reserved(r) => r & 7,
        }
    }
}

macro_rules! code_enum {
    ($(#[$m:meta])* $name:ident, $mask:expr, { $($variant:ident = $val:expr),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($variant,)*
            /// A value this implementation does not know.
            Other(u8),
        }

        impl $name {
            pub fn from_u8(v: u8) -> Self {
                match v & $mask {
                    $($val => $name::$variant,)*
                    o => $name::Other(o),
                }
            }

            pub fn to_u8(self) -> u8 {
                match self {
                    $($name::$variant => $val,)*
                    $name::Other(o) => o & $mask,
                }
            }
        }
    };
}

code_enum!(
    /// Task management function codes (RFC 7143 §11.5.1).
    TmfFunction, 0x7f, {
        AbortTask = 1,
        AbortTaskSet = 2,
        ClearAca = 3,
        ClearTaskSet = 4,
        LogicalUnitReset = 5,
        TargetWarmReset = 6,
        TargetColdReset = 7,
        TaskReassign = 8,
    }
);

code_enum!(
    /// Task management response codes (RFC 7143 §11.6.1).
    TmfResponse, 0xff, {
        FunctionComplete = 0,
        TaskDoesNotExist = 1,
        LunDoesNotExist = 2,
        TaskStillAllegiant = 3,
        AllegianceReassignmentNotSupported = 4,
        NotSupported = 5,
        AuthorizationFailed = 6,
        FunctionRejected = 255,
    }
);

code_enum!(
    /// Logout reason codes (RFC 7143 §11.14.1).
    LogoutReason, 0x7f, {
        CloseSession = 0,
        CloseConnection = 1,
        RemoveConnectionForRecovery = 2,
    }
);

code_enum!(
    /// Logout response codes (RFC 7143 §11.15.1).
    LogoutResponseCode, 0xff, {
        Success = 0,
        CidNotFound = 1,
        RecoveryNotSupported = 2,
        CleanupFailed = 3,
    }
);

code_enum!(
    /// Reject reason codes (RFC 7143 §11.17.1).
    RejectReason, 0xff, {
        DataDigestError = 0x02,
        SnackReject = 0x03,
        ProtocolError = 0x04,
        CommandNotSupported = 0x05,
        ImmediateCommandReject = 0x06,
        TaskInProgress = 0x07,
        InvalidDataAck = 0x08,
        InvalidPduField = 0x09,
        LongOpReject = 0x0a,
        NegotiationReset = 0x0b,
        WaitingForLogout = 0x0c,
    }
);

/// NOP-Out (0x00).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// SCSI Command (0x01) with its AHS (extended CDB, bidirectional read length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    /// F: no unsolicited Data-Out follows.
    pub fin: bool,
    pub read: bool,
    pub write: bool,
    pub attr: TaskAttribute,
    pub lun: Lun,
    pub itt: u32,
    pub expected_data_len: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub cdb: [u8; 16],
    /// CDB bytes beyond the first 16 (Extended CDB AHS); empty if none.
    pub ext_cdb: Vec<u8>,
    /// Bidirectional Expected Read-Data Length AHS.
    pub bidi_read_len: Option<u32>,
}

/// Task Management Function Request (0x02).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    pub function: TmfFunction,
    pub lun: Lun,
    pub itt: u32,
    pub ref_task_tag: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
    pub exp_data_sn: u32,
}

/// Login Request (0x03). The I bit is always set on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Text Request (0x04).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub fin: bool,
    pub cont: bool,
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// SCSI Data-Out (0x05).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOut {
    pub fin: bool,
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
}

/// Logout Request (0x06).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    pub reason: LogoutReason,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// SNACK Request (0x10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnackRequest {
    pub snack_type: u8,
    pub lun: Lun,
    pub itt: u32,
    pub ttt_or_snack_tag: u32,
    pub exp_stat_sn: u32,
    pub beg_run: u32,
    pub run_length: u32,
}

/// NOP-In (0x20).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NopIn {
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// SCSI Response (0x21). The data segment holds SenseLength + sense data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResponse {
    pub bidi_overflow: bool,
    pub bidi_underflow: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// 0x00 command completed at target, 0x01 target failure.
    pub response: u8,
    pub status: u8,
    pub itt: u32,
    pub snack_tag: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_data_sn: u32,
    pub bidi_read_residual: u32,
    pub residual: u32,
}

/// Task Management Function Response (0x22).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMgmtResponse {
    pub response: TmfResponse,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Login Response (0x23).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub status_class: u8,
    pub status_detail: u8,
}

/// Text Response (0x24).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextResponse {
    pub fin: bool,
    pub cont: bool,
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// SCSI Data-In (0x25).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataIn {
    pub fin: bool,
    pub ack: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// S: this PDU carries the command's status (phase collapse).
    pub status_present: bool,
    pub status: u8,
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub residual: u32,
}

/// Logout Response (0x26).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutResponse {
    pub response: LogoutResponseCode,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub time2wait: u16,
    pub time2retain: u16,
}

/// Ready To Transfer (0x31).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct R2t {
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub r2t_sn: u32,
    pub buffer_offset: u32,
    pub desired_len: u32,
}

/// Asynchronous Message (0x32). ITT is always 0xffffffff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsyncMessage {
    pub lun: Lun,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub event: u8,
    pub vcode: u8,
    pub param1: u16,
    pub param2: u16,
    pub param3: u16,
}

/// Reject (0x3f). The data segment is the rejected PDU's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub reason: RejectReason,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn_or_r2t_sn: u32,
}

/// A typed Basic Header Segment (plus AHS for SCSI Command).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bhs {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    SnackRequest(SnackRequest),
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
}

/// What the first 48 bytes say about the rest of the PDU; parsing it
/// cannot fail, so the reader can bound the following reads first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// The 6-bit opcode, not yet validated.
    pub opcode: u8,
    pub immediate: bool,
    /// AHS length in bytes (TotalAHSLength × 4).
    pub ahs_len: usize,
    pub data_len: u32,
    /// Initiator Task Tag (bytes 16..20), valid for every opcode.
    pub itt: u32,
}

impl Prefix {
    pub fn parse(bhs: &[u8; BHS_LEN]) -> Prefix {
        let [b0, _, _, _, ahs, d0, d1, d2, _, _, _, _, _, _, _, _, i0, i1, i2, i3, ..] = *bhs;
        Prefix {
            opcode: b0 & 0x3f,
            immediate: b0 & 0x40 != 0,
            ahs_len: usize::from(ahs) * 4,
            data_len: u32::from_be_bytes([0, d0, d1, d2]),
            itt: u32::from_be_bytes([i0, i1, i2, i3]),
        }
    }
}

/// Bytes of padding after a data segment of `len` bytes.
pub fn pad_len(len: usize) -> usize {
    (4 - len % 4) % 4
}

fn flag(byte: u8, mask: u8) -> bool {
    byte & mask != 0
}

fn bit(b: bool, mask: u8) -> u8 {
    if b {
        mask
    } else {
        0
    }
}

/// Fixed-offset writer for an outgoing BHS. Offsets are constants of this
/// module, never input.
struct Out<'a>(&'a mut [u8; BHS_LEN]);

impl Out<'_> {
    fn u8(&mut self, at: usize, v: u8) {
        self.0[at] = v;
    }
    fn u16(&mut self, at: usize, v: u16) {
        self.0[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, at: usize, v: &[u8]) {
        self.0[at..at + v.len()].copy_from_slice(v);
    }
}

/// A fully read header (bytes 0..48) as a sequence of fields.
struct In<'a> {
    r: Reader<'a>,
    b1: u8,
    b2: u8,
    b3: u8,
}

impl<'a> In<'a> {
    /// Positions after the common fields (byte 8).
    fn new(bhs: &'a [u8; BHS_LEN]) -> Result<Self, PduError> {
        let mut r = Reader::new(bhs);
        r.skip(1)?;
        let b1 = r.u8()?;
        let b2 = r.u8()?;
        let b3 = r.u8()?;
        r.skip(4)?; // TotalAHSLength, DataSegmentLength: see Prefix
        Ok(In { r, b1, b2, b3 })
    }
}

const AHS_EXTENDED_CDB: u8 = 1;
const AHS_BIDI_READ_LEN: u8 = 2;

impl Bhs {
    pub fn opcode(&self) -> Opcode {
        match self {
            Bhs::NopOut(_) => Opcode::NopOut,
            Bhs::ScsiCommand(_) => Opcode::ScsiCommand,
            Bhs::TaskMgmtRequest(_) => Opcode::TaskMgmtRequest,
            Bhs::LoginRequest(_) => Opcode::LoginRequest,
            Bhs::TextRequest(_) => Opcode::TextRequest,
            Bhs::DataOut(_) => Opcode::DataOut,
            Bhs::LogoutRequest(_) => Opcode::LogoutRequest,
            Bhs::SnackRequest(_) => Opcode::SnackRequest,
            Bhs::NopIn(_) => Opcode::NopIn,
            Bhs::ScsiResponse(_) => Opcode::ScsiResponse,
            Bhs::TaskMgmtResponse(_) => Opcode::TaskMgmtResponse,
            Bhs::LoginResponse(_) => Opcode::LoginResponse,
            Bhs::TextResponse(_) => Opcode::TextResponse,
            Bhs::DataIn(_) => Opcode::DataIn,
            Bhs::LogoutResponse(_) => Opcode::LogoutResponse,
            Bhs::R2t(_) => Opcode::R2t,
            Bhs::AsyncMessage(_) => Opcode::AsyncMessage,
            Bhs::Reject(_) => Opcode::Reject,
        }
    }

    /// Decode a header from its 48 BHS bytes and its AHS bytes (already
    /// bounded by the caller to `Prefix::ahs_len`).
    pub fn decode(bhs: &[u8; BHS_LEN], ahs: &[u8]) -> Result<Bhs, PduError> {
        let pre = Prefix::parse(bhs);
        let op = Opcode::from_u8(pre.opcode)?;
        if op != Opcode::ScsiCommand && !ahs.is_empty() {
            return Err(PduError::UnexpectedAhs {
                opcode: pre.opcode,
                len: ahs.len(),
            });
        }
        let imm = pre.immediate;
        let mut f = In::new(bhs)?;
        let (b1, b2, b3) = (f.b1, f.b2, f.b3);
        let r = &mut f.r;
        Ok(match op {
            Opcode::NopOut => Bhs::NopOut(NopOut {
                immediate: imm,
                lun: Lun(r.array()?),
                itt: r.u32()?,
                ttt: r.u32()?,
                cmd_sn: r.u32()?,
                exp_stat_sn: r.u32()?,
            }),
            Opcode::ScsiCommand => {
                let lun = Lun(r.array()?);
                let itt = r.u32()?;
                let expected_data_len = r.u32()?;
                let cmd_sn = r.u32()?;
                let exp_stat_sn = r.u32()?;
                let cdb = r.array()?;
                let (ext_cdb, bidi_read_len) = decode_command_ahs(ahs)?;
                Bhs::ScsiCommand(ScsiCommand {
                    immediate: imm,
                    fin: flag(b1, 0x80),
                    read: flag(b1, 0x40),
                    write: flag(b1, 0x20),
                    attr: TaskAttribute::from_u8(b1),
                    lun,
                    itt,
                    expected_data_len,
                    cmd_sn,
                    exp_stat_sn,
                    cdb,
                    ext_cdb,
                    bidi_read_len,
                })
            }
            Opcode::TaskMgmtRequest => Bhs::TaskMgmtRequest(TaskMgmtRequest {
                immediate: imm,
                function: TmfFunction::from_u8(b1),
                lun: Lun(r.array()?),
                itt: r.u32()?,
                ref_task_tag: r.u32()?,
                cmd_sn: r.u32()?,
                exp_stat_sn: r.u32()?,
                ref_cmd_sn: r.u32()?,
                exp_data_sn: r.u32()?,
            }),
            Opcode::LoginRequest => Bhs::LoginRequest(LoginRequest {
                transit: flag(b1, 0x80),
                cont: flag(b1, 0x40),
                csg: (b1 >> 2) & 3,
                nsg: b1 & 3,
                version_max: b2,
                version_min: b3,
                isid: r.array()?,
                tsih: r.u16()?,
                itt: r.u32()?,
                cid: r.u16()?,
                cmd_sn: {
                    r.skip(2)?;
                    r.u32()?
                },
                exp_stat_sn: r.u32()?,
            }),
            Opcode::TextRequest => Bhs::TextRequest(TextRequest {
                immediate: imm,
                fin: flag(b1, 0x80),
                cont: flag(b1, 0x40),
                lun: Lun(r.array()?),
                itt: r.u32()?,
                ttt: r.u32()?,
                cmd_sn: r.u32()?,
                exp_stat_sn: r.u32()?,
            }),
            Opcode::DataOut => Bhs::DataOut(DataOut {
                fin: flag(b1, 0x80),
                lun: Lun(r.array()?),
                itt: r.u32()?,
                ttt: r.u32()?,
                exp_stat_sn: {
                    r.skip(4)?;
                    r.u32()?
                },
                data_sn: {
                    r.skip(4)?;
                    r.u32()?
                },
                buffer_offset: r.u32()?,
            }),
            Opcode::LogoutRequest => Bhs::LogoutRequest(LogoutRequest {
                immediate: imm,
                reason: LogoutReason::from_u8(b1),
                itt: {
                    r.skip(8)?;
                    r.u32()?
                },
                cid: r.u16()?,
                cmd_sn: {
                    r.skip(2)?;
                    r.u32()?
                },
                exp_stat_sn: r.u32()?,
            }),
            Opcode::SnackRequest => Bhs::SnackRequest(SnackRequest {
                snack_type: b1 & 0x0f,
                lun: Lun(r.array()?),
                itt: r.u32()?,
                ttt_or_snack_tag: r.u32()?,
                exp_stat_sn: {
                    r.skip(4)?;
                    r.u32()?
                },
                beg_run: {
                    r.skip(8)?;
                    r.u32()?
                },
                run_length: r.u32()?,
            }),
            Opcode::NopIn => Bhs::NopIn(NopIn {
                lun: Lun(r.array()?),
                itt: r.u32()?,
                ttt: r.u32()?,
                stat_sn: r.u32()?,
                exp_cmd_sn: r.u32()?,
                max_cmd_sn: r.u32()?,
            }),
            Opcode::ScsiResponse => Bhs::ScsiResponse(ScsiResponse {
                bidi_overflow: flag(b1, 0x10),
                bidi_underflow: flag(b1, 0x08),
                overflow: flag(b1, 0x04),
                underflow: flag(b1, 0x02),
                response: b2,
                status: b3,
                itt: {
                    r.skip(8)?;
                    r.u32()?
                },
                snack_tag: r.u32()?,
                stat_sn: r.u32()?,
                exp_cmd_sn: r.u32()?,
                max_cmd_sn: r.u32()?,
                exp_data_sn: r.u32()?,
                bidi_read_residual: r.u32()?,
                residual: r.u32()?,
            }),
            Opcode::TaskMgmtResponse => Bhs::TaskMgmtResponse(TaskMgmtResponse {
                response: TmfResponse::from_u8(b2),
                itt: {
                    r.skip(8)?;
                    r.u32()?
                },
                stat_sn: {
                    r.skip(4)?;
                    r.u32()?
                },
                exp_cmd_sn: r.u32()?,
                max_cmd_sn: r.u32()?,
            }),
            Opcode::LoginResponse => Bhs::LoginResponse(LoginResponse {
                transit: flag(b1, 0x80),
                cont: flag(b1, 0x40),
                csg: (b1 >> 2) & 3,
                nsg: b1 & 3,
                version_max: b2,
                version_active: b3,
                isid: r.array()?,
                tsih: r.u16()?,
                itt: r.u32()?,
                stat_sn: {
                    r.skip(4)?;
                    r.u32()?
                },
                exp_cmd_sn: r.u32()?,
                max_cmd_sn: r.u32()?,
                status_class: r.u8()?,
                status_detail: r.u8()?,
            }),
            Opcode::TextResponse => Bhs::TextResponse(TextResponse {
                fin: flag(b1, 0x80),
                cont: flag(b1, 0x40),
                lun: Lun(r.array()?),
                itt: r.u32()?,
                ttt: r.u32()?,
                stat_sn: r.u32()?,
                exp_cmd_sn: r.u32()?,
                max_cmd_sn: r.u32()?,
            }),
            Opcode::DataIn => Bhs::DataIn(DataIn {
                fin: flag(b1, 0x80),
                ack: flag(b1, 0x40),
                overflow: flag(b1, 0x04),
                underflow: flag(b1, 0x02),
                status_present: flag(b1, 0x01),
                status: b3,
                lun: Lun(r.array()?),
                itt: r.u32()?,
                ttt: r.u32()?,
                stat_sn: r.u32()?,
                exp_cmd_sn: r.u32()?,
                max_cmd_sn: r.u32()?,
                data_sn: r.u32()?,
                buffer_offset: r.u32()?,
                residual: r.u32()?,
            }),
            Opcode::LogoutResponse => Bhs::LogoutResponse(LogoutResponse {
                response: LogoutResponseCode::from_u8(b2),
                itt: {
                    r.skip(8)?;
                    r.u32()?
                },
                stat_sn: {
                    r.skip(4)?;
                    r.u32()?
                },
                exp_cmd_sn: r.u32()?,
                max_cmd_sn: r.u32()?,
                time2wait: {
                    r.skip(4)?;
                    r.u16()?
                },
                time2retain: r.u16()?,
            }),
            Opcode::R2t => Bhs::R2t(R2t {
                lun: Lun(r.array()?),
                itt: r.u32()?,
                ttt: r.u32()?,
                stat_sn: r.u32()?,
                exp_cmd_sn: r.u32()?,
                max_cmd_sn: r.u32()?,
                r2t_sn: r.u32()?,
                buffer_offset: r.u32()?,
                desired_len: r.u32()?,
            }),
            Opcode::AsyncMessage => Bhs::AsyncMessage(AsyncMessage {
                lun: Lun(r.array()?),
                stat_sn: {
                    r.skip(8)?;
                    r.u32()?
                },
                exp_cmd_sn: r.u32()?,
                max_cmd_sn: r.u32()?,
                event: r.u8()?,
                vcode: r.u8()?,
                param1: r.u16()?,
                param2: r.u16()?,
                param3: r.u16()?,
            }),
            Opcode::Reject => Bhs::Reject(Reject {
                reason: RejectReason::from_u8(b2),
                stat_sn: {
                    r.skip(16)?;
                    r.u32()?
                },
                exp_cmd_sn: r.u32()?,
                max_cmd_sn: r.u32()?,
                data_sn_or_r2t_sn: r.u32()?,
            }),
        })
    }

    /// The AHS bytes this header carries (empty except for SCSI Commands
    /// with an extended CDB or a bidirectional read length).
    pub fn encode_ahs(&self, out: &mut Vec<u8>) {
        if let Bhs::ScsiCommand(c) = self {
            if !c.ext_cdb.is_empty() {
                let len = (c.ext_cdb.len() + 1) as u16;
                out.extend_from_slice(&len.to_be_bytes());
                out.push(AHS_EXTENDED_CDB);
                out.push(0);
                out.extend_from_slice(&c.ext_cdb);
                out.resize(out.len() + pad_len(c.ext_cdb.len() + 4), 0);
            }
            if let Some(l) = c.bidi_read_len {
                out.extend_from_slice(&5u16.to_be_bytes());
                out.push(AHS_BIDI_READ_LEN);
                out.push(0);
                out.extend_from_slice(&l.to_be_bytes());
            }
        }
    }

    /// Length of [`Bhs::encode_ahs`]'s output.
    pub fn ahs_len(&self) -> usize {
        match self {
            Bhs::ScsiCommand(c) => {
                let ext = if c.ext_cdb.is_empty() {
                    0
                } else {
                    let l = 4 + c.ext_cdb.len();
                    l + pad_len(l)
                };
                ext + if c.bidi_read_len.is_some() { 8 } else { 0 }
            }
            _ => 0,
        }
    }

    /// Encode the 48-byte BHS for a data segment of `data_len` bytes.
    /// An extended CDB must fit in the 1020 bytes of AHS (longer ones are
    /// a programming error and are truncated in the length field).
    pub fn encode(&self, data_len: u32) -> [u8; BHS_LEN] {
        let mut b = [0u8; BHS_LEN];
        let mut o = Out(&mut b);
        let (imm, b1) = match self {
            Bhs::NopOut(p) => (p.immediate, 0x80),
            Bhs::ScsiCommand(p) => (
                p.immediate,
                bit(p.fin, 0x80) | bit(p.read, 0x40) | bit(p.write, 0x20) | p.attr.to_u8(),
            ),
            Bhs::TaskMgmtRequest(p) => (p.immediate, 0x80 | p.function.to_u8()),
            Bhs::LoginRequest(p) => (
                true,
                bit(p.transit, 0x80) | bit(p.cont, 0x40) | (p.csg & 3) << 2 | (p.nsg & 3),
            ),
            Bhs::TextRequest(p) => (p.immediate, bit(p.fin, 0x80) | bit(p.cont, 0x40)),
            Bhs::DataOut(p) => (false, bit(p.fin, 0x80)),
            Bhs::LogoutRequest(p) => (p.immediate, 0x80 | p.reason.to_u8()),
            Bhs::SnackRequest(p) => (false, 0x80 | (p.snack_type & 0x0f)),
            Bhs::ScsiResponse(p) => (
                false,
                0x80 | bit(p.bidi_overflow, 0x10)
                    | bit(p.bidi_underflow, 0x08)
                    | bit(p.overflow, 0x04)
                    | bit(p.underflow, 0x02),
            ),
            Bhs::LoginResponse(p) => (
                false,
                bit(p.transit, 0x80) | bit(p.cont, 0x40) | (p.csg & 3) << 2 | (p.nsg & 3),
            ),
            Bhs::TextResponse(p) => (false, bit(p.fin, 0x80) | bit(p.cont, 0x40)),
            Bhs::DataIn(p) => (
                false,
                bit(p.fin, 0x80)
                    | bit(p.ack, 0x40)
                    | bit(p.overflow, 0x04)
                    | bit(p.underflow, 0x02)
                    | bit(p.status_present, 0x01),
            ),
            Bhs::NopIn(_)
            | Bhs::TaskMgmtResponse(_)
            | Bhs::LogoutResponse(_)
            | Bhs::R2t(_)
            | Bhs::AsyncMessage(_)
            | Bhs::Reject(_) => (false, 0x80),
        };
        o.u8(0, bit(imm, 0x40) | self.opcode() as u8);
        o.u8(1, b1);
        o.u8(4, (self.ahs_len() / 4).min(255) as u8);
        let dl = data_len.min(MAX_DATA_SEGMENT_LEN).to_be_bytes();
        o.bytes(5, &dl[1..]);
        match self {
            Bhs::NopOut(p) => {
                o.bytes(8, &p.lun.0);
                o.u32(16, p.itt);
                o.u32(20, p.ttt);
                o.u32(24, p.cmd_sn);
                o.u32(28, p.exp_stat_sn);
            }
            Bhs::ScsiCommand(p) => {
                o.bytes(8, &p.lun.0);
                o.u32(16, p.itt);
                o.u32(20, p.expected_data_len);
                o.u32(24, p.cmd_sn);
                o.u32(28, p.exp_stat_sn);
                o.bytes(32, &p.cdb);
            }
            Bhs::TaskMgmtRequest(p) => {
                o.bytes(8, &p.lun.0);
                o.u32(16, p.itt);
                o.u32(20, p.ref_task_tag);
                o.u32(24, p.cmd_sn);
                o.u32(28, p.exp_stat_sn);
                o.u32(32, p.ref_cmd_sn);
                o.u32(36, p.exp_data_sn);
            }
            Bhs::LoginRequest(p) => {
                o.u8(2, p.version_max);
                o.u8(3, p.version_min);
                o.bytes(8, &p.isid);
                o.u16(14, p.tsih);
                o.u32(16, p.itt);
                o.u16(20, p.cid);
                o.u32(24, p.cmd_sn);
                o.u32(28, p.exp_stat_sn);
            }
            Bhs::TextRequest(p) => {
                o.bytes(8, &p.lun.0);
                o.u32(16, p.itt);
                o.u32(20, p.ttt);
                o.u32(24, p.cmd_sn);
                o.u32(28, p.exp_stat_sn);
            }
            Bhs::DataOut(p) => {
                o.bytes(8, &p.lun.0);
                o.u32(16, p.itt);
                o.u32(20, p.ttt);
                o.u32(28, p.exp_stat_sn);
                o.u32(36, p.data_sn);
                o.u32(40, p.buffer_offset);
            }
            Bhs::LogoutRequest(p) => {
                o.u32(16, p.itt);
                o.u16(20, p.cid);
                o.u32(24, p.cmd_sn);
                o.u32(28, p.exp_stat_sn);
            }
            Bhs::SnackRequest(p) => {
                o.bytes(8, &p.lun.0);
                o.u32(16, p.itt);
                o.u32(20, p.ttt_or_snack_tag);
                o.u32(28, p.exp_stat_sn);
                o.u32(40, p.beg_run);
                o.u32(44, p.run_length);
            }
            Bhs::NopIn(p) => {
                o.bytes(8, &p.lun.0);
                o.u32(16, p.itt);
                o.u32(20, p.ttt);
                o.u32(24, p.stat_sn);
                o.u32(28, p.exp_cmd_sn);
                o.u32(32, p.max_cmd_sn);
            }
            Bhs::ScsiResponse(p) => {
                o.u8(2, p.response);
                o.u8(3, p.status);
                o.u32(16, p.itt);
                o.u32(20, p.snack_tag);
                o.u32(24, p.stat_sn);
                o.u32(28, p.exp_cmd_sn);
                o.u32(32, p.max_cmd_sn);
                o.u32(36, p.exp_data_sn);
                o.u32(40, p.bidi_read_residual);
                o.u32(44, p.residual);
            }
            Bhs::TaskMgmtResponse(p) => {
                o.u8(2, p.response.to_u8());
                o.u32(16, p.itt);
                o.u32(24, p.stat_sn);
                o.u32(28, p.exp_cmd_sn);
                o.u32(32, p.max_cmd_sn);
            }
            Bhs::LoginResponse(p) => {
                o.u8(2, p.version_max);
                o.u8(3, p.version_active);
                o.bytes(8, &p.isid);
                o.u16(14, p.tsih);
                o.u32(16, p.itt);
                o.u32(24, p.stat_sn);
                o.u32(28, p.exp_cmd_sn);
                o.u32(32, p.max_cmd_sn);
                o.u8(36, p.status_class);
                o.u8(37, p.status_detail);
            }
            Bhs::TextResponse(p) => {
                o.bytes(8, &p.lun.0);
                o.u32(16, p.itt);
                o.u32(20, p.ttt);
                o.u32(24, p.stat_sn);
                o.u32(28, p.exp_cmd_sn);
                o.u32(32, p.max_cmd_sn);
            }
            Bhs::DataIn(p) => {
                o.u8(3, p.status);
                o.bytes(8, &p.lun.0);
                o.u32(16, p.itt);
                o.u32(20, p.ttt);
                o.u32(24, p.stat_sn);
                o.u32(28, p.exp_cmd_sn);
                o.u32(32, p.max_cmd_sn);
                o.u32(36, p.data_sn);
                o.u32(40, p.buffer_offset);
                o.u32(44, p.residual);
            }
            Bhs::LogoutResponse(p) => {
                o.u8(2, p.response.to_u8());
                o.u32(16, p.itt);
                o.u32(24, p.stat_sn);
                o.u32(28, p.exp_cmd_sn);
                o.u32(32, p.max_cmd_sn);
                o.u16(40, p.time2wait);
                o.u16(42, p.time2retain);
            }
            Bhs::R2t(p) => {
                o.bytes(8, &p.lun.0);
                o.u32(16, p.itt);
                o.u32(20, p.ttt);
                o.u32(24, p.stat_sn);
                o.u32(28, p.exp_cmd_sn);
                o.u32(32, p.max_cmd_sn);
                o.u32(36, p.r2t_sn);
                o.u32(40, p.buffer_offset);
                o.u32(44, p.desired_len);
            }
            Bhs::AsyncMessage(p) => {
                o.bytes(8, &p.lun.0);
                o.u32(16, RESERVED_TAG);
                o.u32(24, p.stat_sn);
                o.u32(28, p.exp_cmd_sn);
                o.u32(32, p.max_cmd_sn);
                o.u8(36, p.event);
                o.u8(37, p.vcode);
                o.u16(38, p.param1);
                o.u16(40, p.param2);
                o.u16(42, p.param3);
            }
            Bhs::Reject(p) => {
                o.u8(2, p.reason.to_u8());
                o.u32(16, RESERVED_TAG);
                o.u32(24, p.stat_sn);
                o.u32(28, p.exp_cmd_sn);
                o.u32(32, p.max_cmd_sn);
                o.u32(36, p.data_sn_or_r2t_sn);
            }
        }
        b
    }
}

/// Parse the AHS of a SCSI Command: at most one Extended CDB and one
/// Bidirectional Read Data Length entry.
fn decode_command_ahs(ahs: &[u8]) -> Result<(Vec<u8>, Option<u32>), PduError> {
    let mut r = Reader::new(ahs);
    let mut ext: Option<Vec<u8>> = None;
    let mut bidi = None;
    while r.remaining() > 0 {
        let len = r.u16()?;
        let ty = r.u8()?;
        let body_len = usize::from(len);
        if body_len > r.remaining() {
            return Err(PduError::AhsOverrun {
                len: body_len,
                available: r.remaining(),
            });
        }
        let body = r.take(body_len)?;
        // The entry (3 header bytes + body) is padded to four bytes; the
        // padding may be missing at the very end only if nothing follows.
        let pad = pad_len(3 + body_len).min(r.remaining());
        r.skip(pad)?;
        let mut b = Reader::new(body);
        match ty {
            AHS_EXTENDED_CDB => {
                if ext.is_some() {
                    return Err(PduError::DuplicateAhs(ty));
                }
                if len < 1 {
                    return Err(PduError::BadAhsLength { ahs_type: ty, len });
                }
                b.skip(1)?;
                ext = Some(b.rest().to_vec());
            }
            AHS_BIDI_READ_LEN => {
                if bidi.is_some() {
                    return Err(PduError::DuplicateAhs(ty));
                }
                if len != 5 {
                    return Err(PduError::BadAhsLength { ahs_type: ty, len });
                }
                b.skip(1)?;
                bidi = Some(b.u32()?);
            }
            other => return Err(PduError::UnknownAhsType(other)),
        }
    }
    Ok((ext.unwrap_or_default(), bidi))
}

/// Framing parameters of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameConfig {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Longest data segment accepted (our MaxRecvDataSegmentLength, or
    /// 8192 during login).
    pub max_data_segment_len: u32,
}

impl Default for FrameConfig {
    fn default() -> Self {
        FrameConfig {
            header_digest: false,
            data_digest: false,
            max_data_segment_len: 8192,
        }
    }
}

impl FrameConfig {
    /// Bytes that follow the BHS before the data segment: AHS and header digest.
    pub fn header_tail_len(&self, pre: &Prefix) -> usize {
        pre.ahs_len + if self.header_digest { DIGEST_LEN } else { 0 }
    }

    /// Bytes of the data segment on the wire: data, padding, data digest.
    pub fn data_wire_len(&self, data_len: u32) -> usize {
        let l = data_len as usize;
        if l == 0 {
            0
        } else {
            l + pad_len(l) + if self.data_digest { DIGEST_LEN } else { 0 }
        }
    }

    /// Check the data segment length against the limit.
    pub fn check_data_len(&self, pre: &Prefix) -> Result<(), PduError> {
        if pre.data_len > self.max_data_segment_len {
            Err(PduError::DataSegmentTooLong {
                len: pre.data_len,
                max: self.max_data_segment_len,
            })
        } else {
            Ok(())
        }
    }
}

/// Verify the header digest over BHS + AHS.
pub fn check_header_digest(bhs: &[u8], ahs: &[u8], received: [u8; 4]) -> Result<(), PduError> {
    let mut c = Crc32c::new();
    c.update(bhs);
    c.update(ahs);
    let received = digest::from_wire(received);
    if c.value() == received {
        Ok(())
    } else {
        Err(PduError::HeaderDigest {
            computed: c.value(),
            received,
        })
    }
}

/// Verify the data digest over data + padding.
pub fn check_data_digest(data: &[u8], pad: &[u8], received: [u8; 4]) -> Result<(), PduError> {
    let mut c = Crc32c::new();
    c.update(data);
    c.update(pad);
    let received = digest::from_wire(received);
    if c.value() == received {
        Ok(())
    } else {
        Err(PduError::DataDigest {
            computed: c.value(),
            received,
        })
    }
}

/// A whole PDU: typed header and data segment (without padding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    pub header: Bhs,
    pub data: Vec<u8>,
}

impl Pdu {
    /// Decode one PDU from the start of `buf`; returns it and the number of
    /// bytes it occupied.
    pub fn decode(buf: &[u8], cfg: &FrameConfig) -> Result<(Pdu, usize), PduError> {
        let mut r = Reader::new(buf);
        let bhs: [u8; BHS_LEN] = r.array()?;
        let pre = Prefix::parse(&bhs);
        cfg.check_data_len(&pre)?;
        let ahs = r.take(pre.ahs_len)?;
        if cfg.header_digest {
            check_header_digest(&bhs, ahs, r.array()?)?;
        }
        let header = Bhs::decode(&bhs, ahs)?;
        let dl = pre.data_len as usize;
        let data = r.take(dl)?;
        let pad = r.take(pad_len(dl))?;
        if cfg.data_digest && dl > 0 {
            check_data_digest(data, pad, r.array()?)?;
        }
        Ok((
            Pdu {
                header,
                data: data.to_vec(),
            },
            r.position(),
        ))
    }

    /// Encode with padding and the digests `cfg` asks for.
    pub fn encode(&self, cfg: &FrameConfig) -> Vec<u8> {
        let dl = self.data.len() as u32;
        let mut out =
            Vec::with_capacity(BHS_LEN + 8 + cfg.data_wire_len(dl) + self.header.ahs_len());
        out.extend_from_slice(&self.header.encode(dl));
        self.header.encode_ahs(&mut out);
        if cfg.header_digest {
            out.extend_from_slice(&digest::to_wire(digest::crc32c(&out)));
        }
        if !self.data.is_empty() {
            let start = out.len();
            out.extend_from_slice(&self.data);
            out.resize(out.len() + pad_len(self.data.len()), 0);
            if cfg.data_digest {
                let crc = digest::crc32c(out.get(start..).unwrap_or(&[]));
                out.extend_from_slice(&digest::to_wire(crc));
            }
        }
        out
    }
}

/// The data segment of a SCSI Response carrying sense: SenseLength + sense.
pub fn sense_segment(sense: &[u8]) -> Vec<u8> {
    let n = sense.len().min(usize::from(u16::MAX));
    let mut v = Vec::with_capacity(2 + n);
    v.extend_from_slice(&(n as u16).to_be_bytes());
    v.extend_from_slice(sense.get(..n).unwrap_or(&[]));
    v
}

/// The sense data inside a SCSI Response data segment.
pub fn parse_sense_segment(data: &[u8]) -> Result<&[u8], PduError> {
    let mut r = Reader::new(data);
    let n = r.u16()?;
    r.take(usize::from(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lun() -> impl Strategy<Value = Lun> {
        any::<[u8; 8]>().prop_map(Lun)
    }

    prop_compose! {
        fn nop_out()(immediate: bool, lun in lun(), itt: u32, ttt: u32, cmd_sn: u32, exp_stat_sn: u32) -> Bhs {
            Bhs::NopOut(NopOut { immediate, lun, itt, ttt, cmd_sn, exp_stat_sn })
        }
    }
    prop_compose! {
        fn scsi_command()(immediate: bool, fin: bool, read: bool, write: bool, attr in 0u8..8,
                          lun in lun(), itt: u32, expected_data_len: u32, cmd_sn: u32,
                          exp_stat_sn: u32, cdb: [u8; 16],
                          ext_cdb in proptest::collection::vec(any::<u8>(), 0..300),
                          bidi_read_len: Option<u32>) -> Bhs {
            Bhs::ScsiCommand(ScsiCommand { immediate, fin, read, write,
                attr: TaskAttribute::from_u8(attr), lun, itt, expected_data_len, cmd_sn,
                exp_stat_sn, cdb, ext_cdb, bidi_read_len })
        }
    }
    prop_compose! {
        fn tmf_req()(immediate: bool, f in 0u8..128, lun in lun(), itt: u32, ref_task_tag: u32,
                     cmd_sn: u32, exp_stat_sn: u32, ref_cmd_sn: u32, exp_data_sn: u32) -> Bhs {
            Bhs::TaskMgmtRequest(TaskMgmtRequest { immediate, function: TmfFunction::from_u8(f),
                lun, itt, ref_task_tag, cmd_sn, exp_stat_sn, ref_cmd_sn, exp_data_sn })
        }
    }
    prop_compose! {
        fn login_req()(transit: bool, cont: bool, csg in 0u8..4, nsg in 0u8..4, version_max: u8,
                       version_min: u8, isid: [u8; 6], tsih: u16, itt: u32, cid: u16, cmd_sn: u32,
                       exp_stat_sn: u32) -> Bhs {
            Bhs::LoginRequest(LoginRequest { transit, cont, csg, nsg, version_max, version_min,
                isid, tsih, itt, cid, cmd_sn, exp_stat_sn })
        }
    }
    prop_compose! {
        fn text_req()(immediate: bool, fin: bool, cont: bool, lun in lun(), itt: u32, ttt: u32,
                      cmd_sn: u32, exp_stat_sn: u32) -> Bhs {
            Bhs::TextRequest(TextRequest { immediate, fin, cont, lun, itt, ttt, cmd_sn, exp_stat_sn })
        }
    }
    prop_compose! {
        fn data_out()(fin: bool, lun in lun(), itt: u32, ttt: u32, exp_stat_sn: u32, data_sn: u32,
                      buffer_offset: u32) -> Bhs {
            Bhs::DataOut(DataOut { fin, lun, itt, ttt, exp_stat_sn, data_sn, buffer_offset })
        }
    }
    prop_compose! {
        fn logout_req()(immediate: bool, reason in 0u8..128, itt: u32, cid: u16, cmd_sn: u32,
                        exp_stat_sn: u32) -> Bhs {
            Bhs::LogoutRequest(LogoutRequest { immediate, reason: LogoutReason::from_u8(reason),
                itt, cid, cmd_sn, exp_stat_sn })
        }
    }
    prop_compose! {
        fn snack()(snack_type in 0u8..16, lun in lun(), itt: u32, ttt_or_snack_tag: u32,
                   exp_stat_sn: u32, beg_run: u32, run_length: u32) -> Bhs {
            Bhs::SnackRequest(SnackRequest { snack_type, lun, itt, ttt_or_snack_tag, exp_stat_sn,
                beg_run, run_length })
        }
    }
    prop_compose! {
        fn nop_in()(lun in lun(), itt: u32, ttt: u32, stat_sn: u32, exp_cmd_sn: u32,
                    max_cmd_sn: u32) -> Bhs {
            Bhs::NopIn(NopIn { lun, itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn })
        }
    }
    prop_compose! {
        fn scsi_resp()(flags in 0u8..16, response: u8, status: u8, itt: u32, snack_tag: u32,
                       stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32, exp_data_sn: u32,
                       bidi_read_residual: u32, residual: u32) -> Bhs {
            Bhs::ScsiResponse(ScsiResponse { bidi_overflow: flags & 8 != 0,
                bidi_underflow: flags & 4 != 0, overflow: flags & 2 != 0, underflow: flags & 1 != 0,
                response, status, itt, snack_tag, stat_sn, exp_cmd_sn, max_cmd_sn, exp_data_sn,
                bidi_read_residual, residual })
        }
    }
    prop_compose! {
        fn tmf_resp()(response: u8, itt: u32, stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32) -> Bhs {
            Bhs::TaskMgmtResponse(TaskMgmtResponse { response: TmfResponse::from_u8(response), itt,
                stat_sn, exp_cmd_sn, max_cmd_sn })
        }
    }
    prop_compose! {
        fn login_resp()(transit: bool, cont: bool, csg in 0u8..4, nsg in 0u8..4, version_max: u8,
                        version_active: u8, isid: [u8; 6], tsih: u16, itt: u32, stat_sn: u32,
                        exp_cmd_sn: u32, max_cmd_sn: u32, status_class: u8, status_detail: u8) -> Bhs {
            Bhs::LoginResponse(LoginResponse { transit, cont, csg, nsg, version_max, version_active,
                isid, tsih, itt, stat_sn, exp_cmd_sn, max_cmd_sn, status_class, status_detail })
        }
    }
    prop_compose! {
        fn text_resp()(fin: bool, cont: bool, lun in lun(), itt: u32, ttt: u32, stat_sn: u32,
                       exp_cmd_sn: u32, max_cmd_sn: u32) -> Bhs {
            Bhs::TextResponse(TextResponse { fin, cont, lun, itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn })
        }
    }
    prop_compose! {
        fn data_in()(flags in 0u8..32, status: u8, lun in lun(), itt: u32, ttt: u32, stat_sn: u32,
                     exp_cmd_sn: u32, max_cmd_sn: u32, data_sn: u32, buffer_offset: u32,
                     residual: u32) -> Bhs {
            Bhs::DataIn(DataIn { fin: flags & 16 != 0, ack: flags & 8 != 0, overflow: flags & 4 != 0,
                underflow: flags & 2 != 0, status_present: flags & 1 != 0, status, lun, itt, ttt,
                stat_sn, exp_cmd_sn, max_cmd_sn, data_sn, buffer_offset, residual })
        }
    }
    prop_compose! {
        fn logout_resp()(response: u8, itt: u32, stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32,
                         time2wait: u16, time2retain: u16) -> Bhs {
            Bhs::LogoutResponse(LogoutResponse { response: LogoutResponseCode::from_u8(response),
                itt, stat_sn, exp_cmd_sn, max_cmd_sn, time2wait, time2retain })
        }
    }
    prop_compose! {
        fn r2t()(lun in lun(), itt: u32, ttt: u32, stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32,
                 r2t_sn: u32, buffer_offset: u32, desired_len: u32) -> Bhs {
            Bhs::R2t(R2t { lun, itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn, r2t_sn, buffer_offset,
                desired_len })
        }
    }
    prop_compose! {
        fn async_msg()(lun in lun(), stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32, event: u8,
                       vcode: u8, param1: u16, param2: u16, param3: u16) -> Bhs {
            Bhs::AsyncMessage(AsyncMessage { lun, stat_sn, exp_cmd_sn, max_cmd_sn, event, vcode,
                param1, param2, param3 })
        }
    }
    prop_compose! {
        fn reject()(reason: u8, stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32,
                    data_sn_or_r2t_sn: u32) -> Bhs {
            Bhs::Reject(Reject { reason: RejectReason::from_u8(reason), stat_sn, exp_cmd_sn,
                max_cmd_sn, data_sn_or_r2t_sn })
        }
    }

    fn any_bhs() -> impl Strategy<Value = Bhs> {
        prop_oneof![
            nop_out(),
            scsi_command(),
            tmf_req(),
            login_req(),
            text_req(),
            data_out(),
            logout_req(),
            snack(),
            nop_in(),
            scsi_resp(),
            tmf_resp(),
            login_resp(),
            text_resp(),
            data_in(),
            logout_resp(),
            r2t(),
            async_msg(),
            reject(),
        ]
    }

    fn any_cfg() -> impl Strategy<Value = FrameConfig> {
        (any::<bool>(), any::<bool>()).prop_map(|(h, d)| FrameConfig {
            header_digest: h,
            data_digest: d,
            max_data_segment_len: 1 << 16,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn encode_then_decode_is_identity(header in any_bhs(),
                                          data in proptest::collection::vec(any::<u8>(), 0..600),
                                          cfg in any_cfg()) {
            let pdu = Pdu { header, data };
            let bytes = pdu.encode(&cfg);
            prop_assert_eq!(bytes.len() % 4, 0);
            let (back, used) = Pdu::decode(&bytes, &cfg).unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(back, pdu);
        }

        #[test]
        fn decode_of_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400),
                                                  cfg in any_cfg()) {
            let _ = Pdu::decode(&bytes, &cfg);
        }

        #[test]
        fn any_flipped_bit_fails_the_header_digest(header in any_bhs(), pos in 0usize..48, bitn in 0u8..8) {
            let cfg = FrameConfig { header_digest: true, data_digest: false, max_data_segment_len: 1 << 16 };
            let mut bytes = Pdu { header, data: vec![] }.encode(&cfg);
            bytes[pos] ^= 1 << bitn;
            let res = Pdu::decode(&bytes, &cfg);
            // A flip in the length bytes may turn into truncation instead.
            prop_assert!(res.is_err());
        }

        #[test]
        fn truncation_is_an_error(header in any_bhs(), data in proptest::collection::vec(any::<u8>(), 1..100),
                                  cfg in any_cfg(), cut in 1usize..50) {
            let bytes = Pdu { header, data }.encode(&cfg);
            let keep = bytes.len().saturating_sub(cut);
            let is_truncated = matches!(Pdu::decode(&bytes[..keep], &cfg), Err(PduError::Truncated { .. }));
            prop_assert!(is_truncated);
        }

        #[test]
        fn flat_lun_round_trips(l in 0u64..16384) {
            prop_assert_eq!(Lun::from_flat(l).to_flat(), Some(l));
        }
    }

    #[test]
    fn known_scsi_command_layout() {
        // READ(10) of 8 blocks at LBA 0 on LUN 1, ITT 0x11223344, EDTL 4096.
        let mut b = [0u8; 48];
        b[0] = 0x01;
        b[1] = 0xc1; // F, R, SIMPLE
        b[9] = 1;
        b[16..20].copy_from_slice(&0x11223344u32.to_be_bytes());
        b[20..24].copy_from_slice(&4096u32.to_be_bytes());
        b[24..28].copy_from_slice(&7u32.to_be_bytes());
        b[28..32].copy_from_slice(&9u32.to_be_bytes());
        b[32] = 0x28;
        b[40] = 8;
        let Bhs::ScsiCommand(c) = Bhs::decode(&b, &[]).unwrap() else {
            panic!("wrong kind")
        };
        assert!(c.fin && c.read && !c.write && !c.immediate);
        assert_eq!(c.attr, TaskAttribute::Simple);
        assert_eq!(c.lun.to_flat(), Some(1));
        assert_eq!(c.itt, 0x11223344);
        assert_eq!(c.expected_data_len, 4096);
        assert_eq!((c.cmd_sn, c.exp_stat_sn), (7, 9));
        assert_eq!(c.cdb[0], 0x28);
        assert_eq!(c.cdb[8], 8);
        assert_eq!(Bhs::ScsiCommand(c).encode(0), b);
    }

    #[test]
    fn data_in_flags_and_prefix() {
        let d = Bhs::DataIn(DataIn {
            fin: true,
            ack: false,
            overflow: false,
            underflow: true,
            status_present: true,
            status: 0,
            lun: Lun::default(),
            itt: 5,
            ttt: RESERVED_TAG,
            stat_sn: 1,
            exp_cmd_sn: 2,
            max_cmd_sn: 3,
            data_sn: 0,
            buffer_offset: 0,
            residual: 512,
        });
        let b = d.encode(0x012345);
        assert_eq!(b[0], 0x25);
        assert_eq!(b[1], 0x83);
        let p = Prefix::parse(&b);
        assert_eq!(
            (p.opcode, p.data_len, p.itt, p.ahs_len),
            (0x25, 0x012345, 5, 0)
        );
    }

    #[test]
    fn lun_addressing() {
        assert_eq!(Lun([0, 5, 0, 0, 0, 0, 0, 0]).to_flat(), Some(5));
        assert_eq!(Lun([0x41, 0x02, 0, 0, 0, 0, 0, 0]).to_flat(), Some(0x102));
        // peripheral addressing with a bus number, logical unit addressing,
        // and a second level are not ours
        assert_eq!(Lun([0x01, 0x02, 0, 0, 0, 0, 0, 0]).to_flat(), None);
        assert_eq!(Lun([0x80, 0x02, 0, 0, 0, 0, 0, 0]).to_flat(), None);
        assert_eq!(Lun([0, 1, 0, 1, 0, 0, 0, 0]).to_flat(), None);
    }

    #[test]
    fn errors_are_precise() {
        let mut b = [0u8; 48];
        b[0] = 0x07;
        assert_eq!(Bhs::decode(&b, &[]), Err(PduError::UnknownOpcode(7)));
        b[0] = 0x00;
        assert!(matches!(
            Bhs::decode(&b, &[0; 4]),
            Err(PduError::UnexpectedAhs { opcode: 0, len: 4 })
        ));
        b[0] = 0x01;
        assert_eq!(
            Bhs::decode(&b, &[0, 1, 9, 0]),
            Err(PduError::UnknownAhsType(9))
        );
        assert!(matches!(
            Bhs::decode(&b, &[0, 200, 1, 0]),
            Err(PduError::AhsOverrun { .. })
        ));
        assert_eq!(
            Bhs::decode(&b, &[0, 2, 2, 0, 0, 0, 0, 0]),
            Err(PduError::BadAhsLength {
                ahs_type: 2,
                len: 2
            })
        );
        let mut big = [0u8; 48];
        big[5] = 0x01; // 64 KiB data segment
        let cfg = FrameConfig::default();
        assert_eq!(
            Pdu::decode(&big, &cfg).unwrap_err(),
            PduError::DataSegmentTooLong {
                len: 0x10000,
                max: 8192
            }
        );
    }

    #[test]
    fn data_digest_mismatch_is_reported() {
        let cfg = FrameConfig {
            header_digest: true,
            data_digest: true,
            max_data_segment_len: 8192,
        };
        let pdu = Pdu {
            header: Bhs::NopOut(NopOut {
                immediate: true,
                lun: Lun::default(),
                itt: 1,
                ttt: RESERVED_TAG,
                cmd_sn: 1,
                exp_stat_sn: 1,
            }),
            data: b"ping".to_vec(),
        };
        let mut bytes = pdu.encode(&cfg);
        assert_eq!(bytes.len(), 48 + 4 + 4 + 4);
        bytes[53] ^= 0xff;
        assert!(matches!(
            Pdu::decode(&bytes, &cfg),
            Err(PduError::DataDigest { .. })
        ));
    }

    #[test]
    fn sense_segment_round_trips() {
        let s = [
            0x70u8, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0,
        ];
        let seg = sense_segment(&s);
        assert_eq!(&seg[..2], &[0, 18]);
        assert_eq!(parse_sense_segment(&seg).unwrap(), &s);
        assert!(parse_sense_segment(&[0, 20, 1]).is_err());
    }
}
