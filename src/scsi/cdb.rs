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
}

/// Where a command's service action sits: byte 1, bits 4..0.
pub const SA_MASK: u8 = 0x1F;

/// Bits of the CONTROL byte we evaluate: NACA (2) and LINK (0) must be
/// zero; vendor-specific bits are ignored.
const CONTROL_CHECKED: u8 = 0x05;

/// One supported operation code (+ service action).
pub struct OpDesc {
    pub opcode: u8,
    /// Service action (byte 1 bits 4..0) for opcodes that have them.
    pub sa: Option<u16>,
    pub name: &'static str,
    /// CDB usage data: its length is the CDB length; byte 0 is the opcode,
    /// byte 1 of a service-action command holds the service action.
    pub usage: &'static [u8],
    /// Recommended timeout in seconds (RSOC timeouts descriptor).
    pub timeout: u32,
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

const T: u32 = 30;

macro_rules! op {
    ($opc:expr, $sa:expr, $name:expr, $timeout:expr, [$($u:expr),* $(,)?], $parse:expr) => {
        OpDesc {
            opcode: $opc,
            sa: $sa,
            name: $name,
            usage: &[$opc, $($u),*],
            timeout: $timeout,
            parse: $parse,
        }
    };
}

/// Every supported command. Kept sorted by opcode, then service action
/// (RSOC "all commands" lists them in this order).
pub static OPCODES: &[OpDesc] = &[
    op!(0x00, None, "TEST UNIT READY", T, [0, 0, 0, 0, 0], |_| Ok(
        Command::TestUnitReady
    )),
    op!(0x03, None, "REQUEST SENSE", T, [0x01, 0, 0, 0xFF, 0], |r| {
        Ok(Command::RequestSense {
            desc: r.bit(1, 0)?,
            alloc_len: r.u8(4)?,
        })
    }),
    op!(0x08, None, "READ(6)", T, [0x1F, 0xFF, 0xFF, 0xFF, 0], |r| {
        Ok(Command::Read {
            form: Form::Six,
            lba: u64::from(r.u24(1)? & 0x1F_FFFF),
            blocks: six_len(r.u8(4)?),
            fua: false,
        })
    }),
    op!(
        0x0A,
        None,
        "WRITE(6)",
        T,
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
    op!(0x12, None, "INQUIRY", T, [0x01, 0xFF, 0xFF, 0xFF, 0], |r| {
        Ok(Command::Inquiry {
            evpd: r.bit(1, 0)?,
            page: r.u8(2)?,
            alloc_len: r.u16(3)?,
        })
    }),
    op!(
        0x15,
        None,
        "MODE SELECT(6)",
        T,
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
    op!(
        0x1A,
        None,
        "MODE SENSE(6)",
        T,
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
        0x25,
        None,
        "READ CAPACITY(10)",
        T,
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
        T,
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
        T,
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
        T,
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
        T,
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
        0x35,
        None,
        "SYNCHRONIZE CACHE(10)",
        T,
        [0x06, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0],
        |r| {
            Ok(Command::SyncCache {
                lba: u64::from(r.u32(2)?),
                blocks: u32::from(r.u16(7)?),
            })
        }
    ),
    op!(
        0x55,
        None,
        "MODE SELECT(10)",
        T,
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
        0x5A,
        None,
        "MODE SENSE(10)",
        T,
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
        0x88,
        None,
        "READ(16)",
        T,
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
        0x8A,
        None,
        "WRITE(16)",
        T,
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
        0x8E,
        None,
        "WRITE AND VERIFY(16)",
        T,
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
        T,
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
        0x91,
        None,
        "SYNCHRONIZE CACHE(16)",
        T,
        [0x06, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0],
        |r| {
            Ok(Command::SyncCache {
                lba: r.u64(2)?,
                blocks: r.u32(10)?,
            })
        }
    ),
    op!(
        0x9E,
        Some(0x10),
        "READ CAPACITY(16)",
        T,
        [0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01, 0],
        |r| {
            Ok(Command::ReadCapacity16 {
                alloc_len: r.u32(10)?,
            })
        }
    ),
    op!(
        0xA0,
        None,
        "REPORT LUNS",
        T,
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
        T,
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
        T,
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
        T,
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
        T,
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
        T,
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
        T,
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
];

/// READ(6)/WRITE(6): a TRANSFER LENGTH of 0 means 256 blocks.
fn six_len(v: u8) -> u32 {
    if v == 0 {
        256
    } else {
        u32::from(v)
    }
}

/// Does any supported command use this opcode with service actions?
pub fn opcode_has_sa(opcode: u8) -> bool {
    OPCODES.iter().any(|d| d.opcode == opcode && d.sa.is_some())
}

/// Find the table entry for `opcode` (+ service action if it has them).
pub fn lookup(opcode: u8, sa: u16) -> Option<&'static OpDesc> {
    OPCODES
        .iter()
        .find(|d| d.opcode == opcode && d.sa.map_or(true, |s| s == sa))
}

/// Identify the command a CDB carries, without validating it.
pub fn identify(cdb: &[u8]) -> Result<&'static OpDesc, ScsiError> {
    let r = Reader::new(cdb);
    let opcode = r.u8(0).map_err(|_| ScsiError::InvalidOpcode)?;
    let sa = if opcode_has_sa(opcode) {
        // A CDB too short to hold its service action: shape error.
        u16::from(r.u8(1)? & SA_MASK)
    } else {
        0
    };
    match lookup(opcode, sa) {
        Some(d) => Ok(d),
        // Unknown service action of a known opcode: the SERVICE ACTION field
        // is the invalid field.
        None if opcode_has_sa(opcode) => Err(ScsiError::cdb(1, 4)),
        None => Err(ScsiError::InvalidOpcode),
    }
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
