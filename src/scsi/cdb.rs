//! CDB → typed `Command`.
//!
//! One table (`OPCODES`) lists every supported operation code / service
//! action with its CDB length, its CDB usage-data mask (the bits the device
//! server looks at, as REPORT SUPPORTED OPERATION CODES reports them) and its
//! parse function. Dispatch, reserved-bit checking and RSOC all derive from
//! that table, so they cannot disagree.
//!
//! Parsing checks shape only (the CDB is long enough, bits outside the usage
//! mask are zero); semantic checks (page codes, ranges) belong to the
//! handlers.

use std::sync::OnceLock;

use super::sense::ScsiError;

/// Checked big-endian reader over CDB or parameter bytes. Reads past the end
/// are errors, never panics.
#[derive(Debug, Clone, Copy)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

/// A read went past the end of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Short;

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn bytes(&self, at: usize, n: usize) -> Result<&'a [u8], Short> {
        at.checked_add(n)
            .and_then(|end| self.buf.get(at..end))
            .ok_or(Short)
    }

    pub fn u8(&self, at: usize) -> Result<u8, Short> {
        self.buf.get(at).copied().ok_or(Short)
    }

    fn array<const N: usize>(&self, at: usize) -> Result<[u8; N], Short> {
        let s = self.bytes(at, N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub fn u16(&self, at: usize) -> Result<u16, Short> {
        Ok(u16::from_be_bytes(self.array(at)?))
    }

    pub fn u24(&self, at: usize) -> Result<u32, Short> {
        let [a, b, c] = self.array(at)?;
        Ok(u32::from_be_bytes([0, a, b, c]))
    }

    pub fn u32(&self, at: usize) -> Result<u32, Short> {
        Ok(u32::from_be_bytes(self.array(at)?))
    }

    pub fn u64(&self, at: usize) -> Result<u64, Short> {
        Ok(u64::from_be_bytes(self.array(at)?))
    }

    /// Bit `bit` of byte `at`.
    pub fn bit(&self, at: usize, bit: u8) -> Result<bool, Short> {
        Ok(self.u8(at)? & (1 << bit) != 0)
    }
}

/// A CDB shorter than its operation code requires.
impl From<Short> for ScsiError {
    fn from(_: Short) -> Self {
        ScsiError::cdb_byte(0)
    }
}

/// Which CDB size a READ/WRITE-like command came in; decides where its
/// fields sit (for field pointers) and READ(6)'s 0 = 256 rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Six,
    Ten,
    Twelve,
    Sixteen,
}

impl Form {
    /// Byte offset of the TRANSFER LENGTH field.
    pub fn xfer_len_byte(self) -> u16 {
        match self {
            Form::Six => 4,
            Form::Ten => 7,
            Form::Twelve => 6,
            Form::Sixteen => 10,
        }
    }
}

/// A parsed command. Field names follow SPC-4/SBC-3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    TestUnitReady,
    Inquiry {
        evpd: bool,
        page: u8,
        alloc_len: u16,
    },
    RequestSense {
        desc: bool,
        alloc_len: u8,
    },
    ReportLuns {
        select: u8,
        alloc_len: u32,
    },
    ModeSense {
        ten: bool,
        dbd: bool,
        llbaa: bool,
        pc: u8,
        page: u8,
        subpage: u8,
        alloc_len: u16,
    },
    ModeSelect {
        ten: bool,
        pf: bool,
        sp: bool,
        param_len: u16,
    },
    ReadCapacity10 {
        lba: u32,
        pmi: bool,
    },
    ReadCapacity16 {
        alloc_len: u32,
    },
    Read {
        form: Form,
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    Write {
        form: Form,
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    Verify {
        form: Form,
        lba: u64,
        blocks: u32,
        bytchk: u8,
    },
    WriteAndVerify {
        form: Form,
        lba: u64,
        blocks: u32,
        bytchk: bool,
    },
    SyncCache {
        lba: u64,
        blocks: u32,
    },
    ReportSupportedOpcodes {
        rctd: bool,
        options: u8,
        opcode: u8,
        sa: u16,
        alloc_len: u32,
    },
    ReportTargetPortGroups {
        extended: bool,
        alloc_len: u32,
    },
    WriteSame {
        form: Form,
        lba: u64,
        blocks: u32,
        unmap: bool,
        anchor: bool,
        ndob: bool,
    },
    Unmap {
        anchor: bool,
        param_len: u16,
    },
    GetLbaStatus {
        lba: u64,
        alloc_len: u32,
    },
    CompareAndWrite {
        lba: u64,
        blocks: u8,
        fua: bool,
    },
    OrWrite {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    PreFetch {
        lba: u64,
        blocks: u32,
    },
    StartStopUnit {
        power_condition: u8,
        no_flush: bool,
        start: bool,
    },
    ReadDefectData {
        twelve: bool,
        plist: bool,
        glist: bool,
        format: u8,
        alloc_len: u32,
    },
    PersistentReserveIn {
        sa: u8,
        alloc_len: u16,
    },
    PersistentReserveOut {
        sa: u8,
        scope: u8,
        pr_type: u8,
        param_len: u32,
    },
    Reserve,
    Release,
    Sanitize {
        sa: u8,
        /// Return status once the command is validated; the operation
        /// goes on in the background.
        immed: bool,
        /// Allow unrestricted sanitize exit (EXIT FAILURE MODE after a
        /// failure of this operation).
        ause: bool,
        param_len: u16,
    },
    ExtendedCopy {
        param_len: u32,
    },
    ReceiveCopyResults {
        sa: u8,
        list_id: u8,
        alloc_len: u32,
    },
}

/// Where a command's service action sits: byte 1, bits 4..0.
pub const SA_MASK: u8 = 0x1F;

/// Bits of the CONTROL byte we evaluate: NACA (2) and LINK (0) must be
/// zero; vendor-specific bits are ignored.
const CONTROL_CHECKED: u8 = 0x05;

/// How a command fares when another I_T nexus holds a reservation (SPC-4
/// 5.9.1 table "commands allowed in the presence of various reservations",
/// SBC-3 4.17).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrClass {
    /// Allowed whatever the reservation (INQUIRY, READ CAPACITY, PR IN...).
    Allowed,
    /// Reads: allowed under Write Exclusive types, conflict under Exclusive
    /// Access types unless registered (registrants-only / all-registrants).
    Read,
    /// Writes and configuration: conflict unless registered under a
    /// registrants-only / all-registrants type.
    Write,
}

/// Per-command attributes the pipeline acts on before dispatch.
#[derive(Debug, Clone, Copy)]
pub struct Attrs {
    pub pr: PrClass,
    /// Allowed while another nexus holds an SPC-2 RESERVE.
    pub spc2_ok: bool,
    /// Accesses the medium: refused while the LU is stopped.
    pub media: bool,
    /// Only on thin-provisioned LUs (the backstore can discard).
    pub thin: bool,
    /// Recommended timeout in seconds (RSOC timeouts descriptor).
    pub timeout: u32,
}

const fn attrs(pr: PrClass, media: bool) -> Attrs {
    Attrs {
        pr,
        spc2_ok: false,
        media,
        thin: false,
        timeout: 30,
    }
}

/// Reporting commands: never blocked.
const INFO: Attrs = Attrs {
    spc2_ok: true,
    ..attrs(PrClass::Allowed, false)
};
const ALLOWED: Attrs = attrs(PrClass::Allowed, false);
const TUR: Attrs = attrs(PrClass::Allowed, true);
const RD: Attrs = attrs(PrClass::Read, true);
const WR: Attrs = attrs(PrClass::Write, true);
const CFG: Attrs = attrs(PrClass::Write, false);
const THIN: Attrs = Attrs {
    thin: true,
    ..attrs(PrClass::Write, true)
};
const LONG: Attrs = Attrs {
    timeout: 3600,
    ..attrs(PrClass::Write, true)
};
const LONG_THIN: Attrs = Attrs { thin: true, ..LONG };

/// One supported operation code (+ service action).
pub struct OpDesc {
    pub opcode: u8,
    /// Service action (byte 1 bits 4..0) for opcodes that have them.
    pub sa: Option<u16>,
    pub name: &'static str,
    pub attrs: Attrs,
    /// CDB usage data: its length is the CDB length; byte 0 is the opcode,
    /// byte 1 of a service-action command holds the service action.
    pub usage: &'static [u8],
    pub parse: fn(&Reader<'_>) -> Result<Command, ScsiError>,
}

impl std::fmt::Debug for OpDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpDesc")
            .field("opcode", &self.opcode)
            .field("sa", &self.sa)
            .field("name", &self.name)
            .finish()
    }
}

macro_rules! op {
    ($opc:expr, $sa:expr, $name:expr, $attrs:expr, [$($u:expr),* $(,)?], $parse:expr) => {
        OpDesc {
            opcode: $opc,
            sa: $sa,
            name: $name,
            attrs: $attrs,
            usage: &[$opc, $($u),*],
            parse: $parse,
        }
    };
}

fn pr_in(r: &Reader<'_>) -> Result<Command, ScsiError> {
    Ok(Command::PersistentReserveIn {
        sa: r.u8(1)? & SA_MASK,
        alloc_len: r.u16(7)?,
    })
}

fn pr_out(r: &Reader<'_>) -> Result<Command, ScsiError> {
    Ok(Command::PersistentReserveOut {
        sa: r.u8(1)? & SA_MASK,
        scope: r.u8(2)? >> 4,
        pr_type: r.u8(2)? & 0x0F,
        param_len: r.u32(5)?,
    })
}

fn sanitize(r: &Reader<'_>) -> Result<Command, ScsiError> {
    Ok(Command::Sanitize {
        sa: r.u8(1)? & SA_MASK,
        immed: r.bit(1, 7)?,
        ause: r.bit(1, 5)?,
        param_len: r.u16(7)?,
    })
}

fn receive_copy_results(r: &Reader<'_>) -> Result<Command, ScsiError> {
    Ok(Command::ReceiveCopyResults {
        sa: r.u8(1)? & SA_MASK,
        list_id: r.u8(2)?,
        alloc_len: r.u32(10)?,
    })
}

/// Every supported command. Kept sorted by opcode, then service action
/// (RSOC "all commands" lists them in this order).
pub static OPCODES: &[OpDesc] = &[
    op!(0x00, None, "TEST UNIT READY", TUR, [0, 0, 0, 0, 0], |_| Ok(
        Command::TestUnitReady
    )),
    op!(
        0x03,
        None,
        "REQUEST SENSE",
        INFO,
        [0x01, 0, 0, 0xFF, 0],
        |r| {
            Ok(Command::RequestSense {
                desc: r.bit(1, 0)?,
                alloc_len: r.u8(4)?,
            })
        }
    ),
    op!(
        0x08,
        None,
        "READ(6)",
        RD,
        [0x1F, 0xFF, 0xFF, 0xFF, 0],
        |r| {
            Ok(Command::Read {
                form: Form::Six,
                lba: u64::from(r.u24(1)? & 0x1F_FFFF),
                blocks: six_len(r.u8(4)?),
                fua: false,
            })
        }
    ),
    op!(
        0x0A,
        None,
        "WRITE(6)",
        WR,
        [0x1F, 0xFF, 0xFF, 0xFF, 0],
        |r| {
            Ok(Command::Write {
                form: Form::Six,
                lba: u64::from(r.u24(1)? & 0x1F_FFFF),
                blocks: six_len(r.u8(4)?),
                fua: false,
            })
        }
    ),
    op!(
        0x12,
        None,
        "INQUIRY",
        INFO,
        [0x01, 0xFF, 0xFF, 0xFF, 0],
        |r| {
            Ok(Command::Inquiry {
                evpd: r.bit(1, 0)?,
                page: r.u8(2)?,
                alloc_len: r.u16(3)?,
            })
        }
    ),
    op!(
        0x15,
        None,
        "MODE SELECT(6)",
        CFG,
        [0x11, 0, 0, 0xFF, 0],
        |r| {
            Ok(Command::ModeSelect {
                ten: false,
                pf: r.bit(1, 4)?,
                sp: r.bit(1, 0)?,
                param_len: u16::from(r.u8(4)?),
            })
        }
    ),
    op!(0x16, None, "RESERVE(6)", ALLOWED, [0, 0, 0, 0, 0], |_| Ok(
        Command::Reserve
    )),
    op!(0x17, None, "RELEASE(6)", INFO, [0, 0, 0, 0, 0], |_| Ok(
        Command::Release
    )),
    op!(
        0x1A,
        None,
        "MODE SENSE(6)",
        CFG,
        [0x08, 0xFF, 0xFF, 0xFF, 0],
        |r| {
            Ok(Command::ModeSense {
                ten: false,
                dbd: r.bit(1, 3)?,
                llbaa: false,
                pc: r.u8(2)? >> 6,
                page: r.u8(2)? & 0x3F,
                subpage: r.u8(3)?,
                alloc_len: u16::from(r.u8(4)?),
            })
        }
    ),
    op!(
        0x1B,
        None,
        "START STOP UNIT",
        CFG,
        [0x01, 0, 0x0F, 0xF7, 0],
        |r| {
            Ok(Command::StartStopUnit {
                power_condition: r.u8(4)? >> 4,
                no_flush: r.bit(4, 2)?,
                start: r.bit(4, 0)?,
            })
        }
    ),
    op!(
        0x25,
        None,
        "READ CAPACITY(10)",
        ALLOWED,
        [0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, 0],
        |r| {
            Ok(Command::ReadCapacity10 {
                lba: r.u32(2)?,
                pmi: r.bit(8, 0)?,
            })
        }
    ),
    op!(
        0x28,
        None,
        "READ(10)",
        RD,
        [0x1E, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0],
        |r| {
            Ok(Command::Read {
                form: Form::Ten,
                lba: u64::from(r.u32(2)?),
                blocks: u32::from(r.u16(7)?),
                fua: r.bit(1, 3)?,
            })
        }
    ),
    op!(
        0x2A,
        None,
        "WRITE(10)",
        WR,
        [0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0],
        |r| {
            Ok(Command::Write {
                form: Form::Ten,
                lba: u64::from(r.u32(2)?),
                blocks: u32::from(r.u16(7)?),
                fua: r.bit(1, 3)?,
            })
        }
    ),
    op!(
        0x2E,
        None,
        "WRITE AND VERIFY(10)",
        WR,
        [0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0],
        |r| {
            Ok(Command::WriteAndVerify {
                form: Form::Ten,
                lba: u64::from(r.u32(2)?),
                blocks: u32::from(r.u16(7)?),
                bytchk: r.bit(1, 1)?,
            })
        }
    ),
    op!(
        0x2F,
        None,
        "VERIFY(10)",
        RD,
        [0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0],
        |r| {
            Ok(Command::Verify {
                form: Form::Ten,
                lba: u64::from(r.u32(2)?),
                blocks: u32::from(r.u16(7)?),
                bytchk: (r.u8(1)? >> 1) & 0x03,
            })
        }
    ),
    op!(
        0x34,
        None,
        "PRE-FETCH(10)",
        RD,
        [0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0],
        |r| {
            Ok(Command::PreFetch {
                lba: u64::from(r.u32(2)?),
                blocks: u32::from(r.u16(7)?),
            })
        }
    ),
    op!(
        0x35,
        None,
        "SYNCHRONIZE CACHE(10)",
        WR,
        [0x06, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0],
        |r| {
            Ok(Command::SyncCache {
                lba: u64::from(r.u32(2)?),
                blocks: u32::from(r.u16(7)?),
            })
        }
    ),
    op!(
        0x37,
        None,
        "READ DEFECT DATA(10)",
        RD,
        [0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0],
        |r| {
            Ok(Command::ReadDefectData {
                twelve: false,
                plist: r.bit(2, 4)?,
                glist: r.bit(2, 3)?,
                format: r.u8(2)? & 0x07,
                alloc_len: u32::from(r.u16(7)?),
            })
        }
    ),
    op!(
        0x41,
        None,
        "WRITE SAME(10)",
        LONG,
        [0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0],
        |r| {
            Ok(Command::WriteSame {
                form: Form::Ten,
                lba: u64::from(r.u32(2)?),
                blocks: u32::from(r.u16(7)?),
                unmap: r.bit(1, 3)?,
                anchor: r.bit(1, 4)?,
                ndob: false,
            })
        }
    ),
    op!(
        0x42,
        None,
        "UNMAP",
        THIN,
        [0x01, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, 0],
        |r| {
            Ok(Command::Unmap {
                anchor: r.bit(1, 0)?,
                param_len: r.u16(7)?,
            })
        }
    ),
    op!(
        0x48,
        Some(0x01),
        "SANITIZE / OVERWRITE",
        LONG,
        [0xA1, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0],
        sanitize
    ),
    op!(
        0x48,
        Some(0x02),
        "SANITIZE / BLOCK ERASE",
        LONG_THIN,
        [0xA2, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0],
        sanitize
    ),
    op!(
        0x48,
        Some(0x1F),
        "SANITIZE / EXIT FAILURE MODE",
        WR,
        [0x9F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0],
        sanitize
    ),
    op!(
        0x55,
        None,
        "MODE SELECT(10)",
        CFG,
        [0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0],
        |r| {
            Ok(Command::ModeSelect {
                ten: true,
                pf: r.bit(1, 4)?,
                sp: r.bit(1, 0)?,
                param_len: r.u16(7)?,
            })
        }
    ),
    op!(
        0x56,
        None,
        "RESERVE(10)",
        ALLOWED,
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
        |_| Ok(Command::Reserve)
    ),
    op!(
        0x57,
        None,
        "RELEASE(10)",
        INFO,
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
        |_| Ok(Command::Release)
    ),
    op!(
        0x5A,
        None,
        "MODE SENSE(10)",
        CFG,
        [0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0],
        |r| {
            Ok(Command::ModeSense {
                ten: true,
                dbd: r.bit(1, 3)?,
                llbaa: r.bit(1, 4)?,
                pc: r.u8(2)? >> 6,
                page: r.u8(2)? & 0x3F,
                subpage: r.u8(3)?,
                alloc_len: r.u16(7)?,
            })
        }
    ),
    op!(
        0x5E,
        Some(0x00),
        "PERSISTENT RESERVE IN / READ KEYS",
        ALLOWED,
        [0x00, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0],
        pr_in
    ),
    op!(
        0x5E,
        Some(0x01),
        "PERSISTENT RESERVE IN / READ RESERVATION",
        ALLOWED,
        [0x01, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0],
        pr_in
    ),
    op!(
        0x5E,
        Some(0x02),
        "PERSISTENT RESERVE IN / REPORT CAPABILITIES",
        ALLOWED,
        [0x02, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0],
        pr_in
    ),
    op!(
        0x5E,
        Some(0x03),
        "PERSISTENT RESERVE IN / READ FULL STATUS",
        ALLOWED,
        [0x03, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0],
        pr_in
    ),
    op!(
        0x5F,
        Some(0x00),
        "PERSISTENT RESERVE OUT / REGISTER",
        ALLOWED,
        [0x00, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0],
        pr_out
    ),
    op!(
        0x5F,
        Some(0x01),
        "PERSISTENT RESERVE OUT / RESERVE",
        ALLOWED,
        [0x01, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0],
        pr_out
    ),
    op!(
        0x5F,
        Some(0x02),
        "PERSISTENT RESERVE OUT / RELEASE",
        ALLOWED,
        [0x02, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0],
        pr_out
    ),
    op!(
        0x5F,
        Some(0x03),
        "PERSISTENT RESERVE OUT / CLEAR",
        ALLOWED,
        [0x03, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0],
        pr_out
    ),
    op!(
        0x5F,
        Some(0x04),
        "PERSISTENT RESERVE OUT / PREEMPT",
        ALLOWED,
        [0x04, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0],
        pr_out
    ),
    op!(
        0x5F,
        Some(0x05),
        "PERSISTENT RESERVE OUT / PREEMPT AND ABORT",
        ALLOWED,
        [0x05, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0],
        pr_out
    ),
    op!(
        0x5F,
        Some(0x06),
        "PERSISTENT RESERVE OUT / REGISTER AND IGNORE EXISTING KEY",
        ALLOWED,
        [0x06, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0],
        pr_out
    ),
    op!(
        0x83,
        Some(0x00),
        "EXTENDED COPY(LID1)",
        LONG,
        [0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0],
        |r| {
            Ok(Command::ExtendedCopy {
                param_len: r.u32(10)?,
            })
        }
    ),
    op!(
        0x84,
        Some(0x00),
        "RECEIVE COPY RESULTS / COPY STATUS",
        CFG,
        [0x00, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0],
        receive_copy_results
    ),
    op!(
        0x84,
        Some(0x03),
        "RECEIVE COPY RESULTS / OPERATING PARAMETERS",
        CFG,
        [0x03, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0],
        receive_copy_results
    ),
    op!(
        0x88,
        None,
        "READ(16)",
        RD,
        [0x1E, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
        |r| {
            Ok(Command::Read {
                form: Form::Sixteen,
                lba: r.u64(2)?,
                blocks: r.u32(10)?,
                fua: r.bit(1, 3)?,
            })
        }
    ),
    op!(
        0x89,
        None,
        "COMPARE AND WRITE",
        WR,
        [0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0x1F, 0],
        |r| {
            Ok(Command::CompareAndWrite {
                lba: r.u64(2)?,
                blocks: r.u8(13)?,
                fua: r.bit(1, 3)?,
            })
        }
    ),
    op!(
        0x8A,
        None,
        "WRITE(16)",
        WR,
        [0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
        |r| {
            Ok(Command::Write {
                form: Form::Sixteen,
                lba: r.u64(2)?,
                blocks: r.u32(10)?,
                fua: r.bit(1, 3)?,
            })
        }
    ),
    op!(
        0x8B,
        None,
        "ORWRITE(16)",
        WR,
        [0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
        |r| {
            Ok(Command::OrWrite {
                lba: r.u64(2)?,
                blocks: r.u32(10)?,
                fua: r.bit(1, 3)?,
            })
        }
    ),
    op!(
        0x8E,
        None,
        "WRITE AND VERIFY(16)",
        WR,
        [0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
        |r| {
            Ok(Command::WriteAndVerify {
                form: Form::Sixteen,
                lba: r.u64(2)?,
                blocks: r.u32(10)?,
                bytchk: r.bit(1, 1)?,
            })
        }
    ),
    op!(
        0x8F,
        None,
        "VERIFY(16)",
        RD,
        [0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
        |r| {
            Ok(Command::Verify {
                form: Form::Sixteen,
                lba: r.u64(2)?,
                blocks: r.u32(10)?,
                bytchk: (r.u8(1)? >> 1) & 0x03,
            })
        }
    ),
    op!(
        0x90,
        None,
        "PRE-FETCH(16)",
        RD,
        [0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
        |r| {
            Ok(Command::PreFetch {
                lba: r.u64(2)?,
                blocks: r.u32(10)?,
            })
        }
    ),
    op!(
        0x91,
        None,
        "SYNCHRONIZE CACHE(16)",
        WR,
        [0x06, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
        |r| {
            Ok(Command::SyncCache {
                lba: r.u64(2)?,
                blocks: r.u32(10)?,
            })
        }
    ),
    op!(
        0x93,
        None,
        "WRITE SAME(16)",
        LONG,
        [0x19, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
        |r| {
            Ok(Command::WriteSame {
                form: Form::Sixteen,
                lba: r.u64(2)?,
                blocks: r.u32(10)?,
                unmap: r.bit(1, 3)?,
                anchor: r.bit(1, 4)?,
                ndob: r.bit(1, 0)?,
            })
        }
    ),
    op!(
        0x9E,
        Some(0x10),
        "READ CAPACITY(16)",
        ALLOWED,
        [0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01, 0],
        |r| {
            Ok(Command::ReadCapacity16 {
                alloc_len: r.u32(10)?,
            })
        }
    ),
    op!(
        0x9E,
        Some(0x12),
        "GET LBA STATUS",
        RD,
        [0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0],
        |r| {
            Ok(Command::GetLbaStatus {
                lba: r.u64(2)?,
                alloc_len: r.u32(10)?,
            })
        }
    ),
    op!(
        0xA0,
        None,
        "REPORT LUNS",
        INFO,
        [0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0],
        |r| {
            Ok(Command::ReportLuns {
                select: r.u8(2)?,
                alloc_len: r.u32(6)?,
            })
        }
    ),
    op!(
        0xA3,
        Some(0x0A),
        "REPORT TARGET PORT GROUPS",
        INFO,
        [0xEA, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0],
        |r| {
            Ok(Command::ReportTargetPortGroups {
                extended: (r.u8(1)? >> 5) == 1,
                alloc_len: r.u32(6)?,
            })
        }
    ),
    op!(
        0xA3,
        Some(0x0C),
        "REPORT SUPPORTED OPERATION CODES",
        INFO,
        [0x0C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0],
        |r| {
            Ok(Command::ReportSupportedOpcodes {
                rctd: r.bit(2, 7)?,
                options: r.u8(2)? & 0x07,
                opcode: r.u8(3)?,
                sa: r.u16(4)?,
                alloc_len: r.u32(6)?,
            })
        }
    ),
    op!(
        0xA8,
        None,
        "READ(12)",
        RD,
        [0x1E, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
        |r| {
            Ok(Command::Read {
                form: Form::Twelve,
                lba: u64::from(r.u32(2)?),
                blocks: r.u32(6)?,
                fua: r.bit(1, 3)?,
            })
        }
    ),
    op!(
        0xAA,
        None,
        "WRITE(12)",
        WR,
        [0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
        |r| {
            Ok(Command::Write {
                form: Form::Twelve,
                lba: u64::from(r.u32(2)?),
                blocks: r.u32(6)?,
                fua: r.bit(1, 3)?,
            })
        }
    ),
    op!(
        0xAE,
        None,
        "WRITE AND VERIFY(12)",
        WR,
        [0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
        |r| {
            Ok(Command::WriteAndVerify {
                form: Form::Twelve,
                lba: u64::from(r.u32(2)?),
                blocks: r.u32(6)?,
                bytchk: r.bit(1, 1)?,
            })
        }
    ),
    op!(
        0xAF,
        None,
        "VERIFY(12)",
        RD,
        [0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
        |r| {
            Ok(Command::Verify {
                form: Form::Twelve,
                lba: u64::from(r.u32(2)?),
                blocks: r.u32(6)?,
                bytchk: (r.u8(1)? >> 1) & 0x03,
            })
        }
    ),
    op!(
        0xB7,
        None,
        "READ DEFECT DATA(12)",
        RD,
        [0x1F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0],
        |r| {
            Ok(Command::ReadDefectData {
                twelve: true,
                plist: r.bit(1, 4)?,
                glist: r.bit(1, 3)?,
                format: r.u8(1)? & 0x07,
                alloc_len: r.u32(6)?,
            })
        }
    ),
];

/// READ(6)/WRITE(6): a TRANSFER LENGTH of 0 means 256 blocks.
fn six_len(v: u8) -> u32 {
    if v == 0 {
        256
    } else {
        u32::from(v)
    }
}

/// Where each opcode's entries start in `OPCODES` (the table is sorted by
/// opcode), built once so dispatch is an array index, not a scan.
fn index() -> &'static [u16; 256] {
    static INDEX: OnceLock<[u16; 256]> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut idx = [u16::MAX; 256];
        for (i, d) in OPCODES.iter().enumerate().rev() {
            idx[usize::from(d.opcode)] = i as u16;
        }
        idx
    })
}

/// The table entries of one opcode.
fn entries(opcode: u8) -> impl Iterator<Item = &'static OpDesc> {
    let start = index()[usize::from(opcode)];
    OPCODES
        .get(usize::from(start)..)
        .unwrap_or(&[])
        .iter()
        .take_while(move |d| d.opcode == opcode)
}

/// Does any supported command use this opcode with service actions?
pub fn opcode_has_sa(opcode: u8) -> bool {
    entries(opcode).any(|d| d.sa.is_some())
}

/// Find the table entry for `opcode` (+ service action if it has them).
pub fn lookup(opcode: u8, sa: u16) -> Option<&'static OpDesc> {
    entries(opcode).find(|d| d.sa.map_or(true, |s| s == sa))
}

/// Identify the command a CDB carries, without validating it.
pub fn identify(cdb: &[u8]) -> Result<&'static OpDesc, ScsiError> {
    let r = Reader::new(cdb);
    let opcode = r.u8(0).map_err(|_| ScsiError::InvalidOpcode)?;
    let mut it = entries(opcode).peekable();
    let first = *it.peek().ok_or(ScsiError::InvalidOpcode)?;
    if first.sa.is_none() {
        return Ok(first);
    }
    // A CDB too short to hold its service action: shape error.
    let sa = u16::from(r.u8(1)? & SA_MASK);
    // Unknown service action of a known opcode: the SERVICE ACTION field is
    // the invalid field.
    it.find(|d| d.sa == Some(sa)).ok_or(ScsiError::cdb(1, 4))
}

/// Bytes of data-out the CDB describes (its SPDTL), for frontends that must
/// compare it with the transport's expected length and report residuals.
/// `None` for unsupported opcodes or CDBs too short to say. Commands
/// without data-out give `Some(0)`. The same table and parse functions as
/// dispatch decide it, so transport and core cannot disagree.
pub fn data_out_len(cdb: &[u8], block_size: u32) -> Option<u64> {
    let desc = identify(cdb).ok()?;
    let cmd = (desc.parse)(&Reader::new(cdb)).ok()?;
    let bs = u64::from(block_size);
    Some(match cmd {
        Command::Write { blocks, .. }
        | Command::WriteAndVerify { blocks, .. }
        | Command::OrWrite { blocks, .. } => u64::from(blocks) * bs,
        Command::Verify { blocks, bytchk, .. } => match bytchk {
            1 => u64::from(blocks) * bs,
            3 => bs,
            _ => 0,
        },
        Command::WriteSame { ndob, .. } => {
            if ndob {
                0
            } else {
                bs
            }
        }
        Command::CompareAndWrite { blocks, .. } => 2 * u64::from(blocks) * bs,
        Command::ModeSelect { param_len, .. }
        | Command::Unmap { param_len, .. }
        | Command::Sanitize { param_len, .. } => u64::from(param_len),
        Command::PersistentReserveOut { param_len, .. } | Command::ExtendedCopy { param_len } => {
            u64::from(param_len)
        }
        _ => 0,
    })
}

/// Check a CDB against its usage mask: length, reserved bits, CONTROL byte.
/// Reports the most significant bit of the first offending field.
pub fn check_shape(cdb: &[u8], desc: &OpDesc) -> Result<(), ScsiError> {
    let n = desc.usage.len();
    let bytes = cdb.get(..n).ok_or(ScsiError::cdb_byte(0))?;
    for (i, (&b, &mask)) in bytes.iter().zip(desc.usage).enumerate().skip(1) {
        let reserved = if i == n - 1 {
            CONTROL_CHECKED
        } else if i == 1 && desc.sa.is_some() {
            !SA_MASK & !mask
        } else {
            !mask
        };
        let bad = b & reserved;
        if bad != 0 {
            let mut top = 7 - bad.leading_zeros() as u8;
            // A multi-bit field is reported by its most significant bit.
            if i != n - 1 {
                while top < 7 && reserved & (1 << (top + 1)) != 0 {
                    top += 1;
                }
            }
            return Err(ScsiError::cdb(i as u16, top));
        }
    }
    Ok(())
}

/// Identify, check and parse a CDB.
pub fn parse(cdb: &[u8]) -> Result<Command, ScsiError> {
    let desc = identify(cdb)?;
    check_shape(cdb, desc)?;
    (desc.parse)(&Reader::new(cdb))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(cdb: &[u8]) -> ScsiError {
        parse(cdb).unwrap_err()
    }

    fn field(e: ScsiError) -> (u16, Option<u8>) {
        match e {
            ScsiError::InvalidFieldInCdb { byte, bit } => (byte, bit),
            other => panic!("expected invalid field in CDB, got {other:?}"),
        }
    }

    #[test]
    fn table_is_sorted_and_consistent() {
        for w in OPCODES.windows(2) {
            let a = (w[0].opcode, w[0].sa.unwrap_or(0));
            let b = (w[1].opcode, w[1].sa.unwrap_or(0));
            assert!(a < b, "{} before {}", w[0].name, w[1].name);
            // One opcode either always or never has service actions.
            if w[0].opcode == w[1].opcode {
                assert!(w[0].sa.is_some() && w[1].sa.is_some());
            }
        }
        for d in OPCODES {
            assert_eq!(d.usage[0], d.opcode, "{}", d.name);
            assert!(matches!(d.usage.len(), 6 | 10 | 12 | 16), "{}", d.name);
            if let Some(sa) = d.sa {
                assert_eq!(u16::from(d.usage[1] & SA_MASK), sa, "{}", d.name);
            }
            // The usage mask itself must be accepted.
            let mut cdb = d.usage.to_vec();
            let last = cdb.len() - 1;
            cdb[last] = 0;
            assert!(parse(&cdb).is_ok(), "{}", d.name);
        }
    }

    #[test]
    fn every_reserved_bit_of_every_command_is_pointed_at() {
        for d in OPCODES {
            let n = d.usage.len();
            let mut base = d.usage.to_vec();
            base[n - 1] = 0;
            for i in 1..n - 1 {
                let reserved = if i == 1 && d.sa.is_some() {
                    !SA_MASK & !d.usage[1]
                } else {
                    !d.usage[i]
                };
                for bit in 0..8u8 {
                    if reserved & (1 << bit) == 0 {
                        continue;
                    }
                    let mut cdb = base.clone();
                    cdb[i] |= 1 << bit;
                    match parse(&cdb) {
                        Err(ScsiError::InvalidFieldInCdb {
                            byte,
                            bit: Some(top),
                        }) => {
                            assert_eq!(byte as usize, i, "{} byte {i} bit {bit}", d.name);
                            assert!(top >= bit && reserved & (1 << top) != 0, "{}", d.name);
                        }
                        other => panic!("{} byte {i} bit {bit}: {other:?}", d.name),
                    }
                }
            }
            for bit in [0u8, 2] {
                let mut cdb = base.clone();
                cdb[n - 1] = 1 << bit;
                assert!(
                    matches!(
                        parse(&cdb),
                        Err(ScsiError::InvalidFieldInCdb { byte, bit: Some(b) })
                            if byte as usize == n - 1 && b == bit
                    ),
                    "{} control bit {bit}",
                    d.name
                );
            }
            // One byte short of the CDB length: shape error at byte 0.
            assert!(matches!(
                parse(&base[..n - 1]),
                Err(ScsiError::InvalidFieldInCdb { byte: 0, bit: None })
            ));
        }
    }

    #[test]
    fn data_out_lengths() {
        assert_eq!(data_out_len(&[0x0A, 0, 0, 0, 0, 0], 512), Some(256 * 512));
        assert_eq!(
            data_out_len(&[0x2A, 0, 0, 0, 0, 0, 0, 0, 3, 0], 4096),
            Some(3 * 4096)
        );
        let mut c16 = [0u8; 16];
        c16[0] = 0x89;
        c16[13] = 2;
        assert_eq!(data_out_len(&c16, 512), Some(2048));
        c16[0] = 0x93;
        c16[1] = 0x01; // NDOB
        assert_eq!(data_out_len(&c16, 512), Some(0));
        assert_eq!(
            data_out_len(&[0x2F, 0x06, 0, 0, 0, 0, 0, 0, 9, 0], 512),
            Some(512)
        );
        assert_eq!(
            data_out_len(&[0x2F, 0x02, 0, 0, 0, 0, 0, 0, 9, 0], 512),
            Some(9 * 512)
        );
        assert_eq!(data_out_len(&[0x15, 0x10, 0, 0, 24, 0], 512), Some(24));
        assert_eq!(
            data_out_len(&[0x5F, 0, 0, 0, 0, 0, 0, 0, 24, 0], 512),
            Some(24)
        );
        assert_eq!(
            data_out_len(&[0x28, 0, 0, 0, 0, 0, 0, 0, 9, 0], 512),
            Some(0)
        );
        assert_eq!(data_out_len(&[0xFF; 16], 512), None);
        assert_eq!(data_out_len(&[0x2A, 0], 512), None);
    }

    #[test]
    fn read_write_fields() {
        assert_eq!(
            parse(&[0x08, 0x1F, 0xFF, 0xFE, 0, 0]).unwrap(),
            Command::Read {
                form: Form::Six,
                lba: 0x1F_FFFE,
                blocks: 256,
                fua: false
            }
        );
        assert_eq!(
            parse(&[0x2A, 0x08, 0, 0, 1, 0, 0, 0, 8, 0]).unwrap(),
            Command::Write {
                form: Form::Ten,
                lba: 256,
                blocks: 8,
                fua: true
            }
        );
        let mut r16 = [0u8; 16];
        r16[0] = 0x88;
        r16[2..10].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        r16[10..14].copy_from_slice(&0x10u32.to_be_bytes());
        assert_eq!(
            parse(&r16).unwrap(),
            Command::Read {
                form: Form::Sixteen,
                lba: 0x0102_0304_0506_0708,
                blocks: 0x10,
                fua: false
            }
        );
        let mut r12 = [0u8; 12];
        r12[0] = 0xA8;
        r12[1] = 0x18; // DPO + FUA
        r12[6..10].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            parse(&r12).unwrap(),
            Command::Read {
                form: Form::Twelve,
                lba: 0,
                blocks: 7,
                fua: true
            }
        );
    }

    #[test]
    fn rdprotect_and_wrprotect_point_at_bit_7() {
        for p in 1..8u8 {
            assert_eq!(
                field(err(&[0x28, p << 5, 0, 0, 0, 0, 0, 0, 1, 0])),
                (1, Some(7))
            );
            assert_eq!(
                field(err(&[0x2A, p << 5, 0, 0, 0, 0, 0, 0, 1, 0])),
                (1, Some(7))
            );
        }
        // FUA_NV and DPO are accepted on WRITE(10); bit 2 is reserved.
        assert!(parse(&[0x2A, 0x12, 0, 0, 0, 0, 0, 0, 1, 0]).is_ok());
        assert_eq!(
            field(err(&[0x2A, 0x04, 0, 0, 0, 0, 0, 0, 1, 0])),
            (1, Some(2))
        );
    }

    #[test]
    fn control_byte_naca_and_link_rejected_vendor_bits_ignored() {
        assert_eq!(field(err(&[0, 0, 0, 0, 0, 0x04])), (5, Some(2)));
        assert_eq!(field(err(&[0, 0, 0, 0, 0, 0x01])), (5, Some(0)));
        assert!(parse(&[0, 0, 0, 0, 0, 0xC0]).is_ok());
    }

    #[test]
    fn reserved_bytes_and_group_bits() {
        // READ(10) group number bits 7..5 are reserved.
        assert_eq!(
            field(err(&[0x28, 0, 0, 0, 0, 0, 0x20, 0, 1, 0])),
            (6, Some(7))
        );
        // TEST UNIT READY byte 3 reserved.
        assert_eq!(field(err(&[0, 0, 0, 0x01, 0, 0])), (3, Some(7)));
        // INQUIRY CMDDT (obsolete) bit 1 reserved run 7..1.
        assert_eq!(field(err(&[0x12, 0x02, 0, 0, 36, 0])), (1, Some(7)));
    }

    #[test]
    fn short_cdb_and_unknown_opcodes() {
        assert_eq!(field(err(&[0x28, 0, 0, 0])), (0, None));
        assert!(matches!(err(&[0xFF; 16]), ScsiError::InvalidOpcode));
        assert!(matches!(err(&[]), ScsiError::InvalidOpcode));
        // Known opcode with unknown service action.
        let mut c = [0u8; 16];
        c[0] = 0x9E;
        c[1] = 0x1F;
        assert_eq!(field(err(&c)), (1, Some(4)));
        assert_eq!(field(err(&[0x9E])), (0, None));
    }

    #[test]
    fn inquiry_and_mode_sense_fields() {
        assert_eq!(
            parse(&[0x12, 0x01, 0x83, 0x01, 0x00, 0]).unwrap(),
            Command::Inquiry {
                evpd: true,
                page: 0x83,
                alloc_len: 256
            }
        );
        assert_eq!(
            parse(&[0x5A, 0x18, 0xC8, 0x01, 0, 0, 0, 0x10, 0x00, 0]).unwrap(),
            Command::ModeSense {
                ten: true,
                dbd: true,
                llbaa: true,
                pc: 3,
                page: 0x08,
                subpage: 1,
                alloc_len: 0x1000
            }
        );
        // LLBAA does not exist in MODE SENSE(6).
        assert_eq!(field(err(&[0x1A, 0x10, 0x3F, 0, 0xFF, 0])), (1, Some(7)));
    }

    #[test]
    fn rsoc_fields() {
        let c = [0xA3, 0x0C, 0x82, 0x9E, 0x00, 0x10, 0, 0, 1, 0, 0, 0];
        assert_eq!(
            parse(&c).unwrap(),
            Command::ReportSupportedOpcodes {
                rctd: true,
                options: 2,
                opcode: 0x9E,
                sa: 0x10,
                alloc_len: 256
            }
        );
        let bad = [0xA3, 0x0C, 0x08, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        assert_eq!(field(err(&bad)), (2, Some(6)));
        let bad_sa_bits = [0xA3, 0x2C, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        assert_eq!(field(err(&bad_sa_bits)), (1, Some(7)));
    }
}
