//! Sense data and the one place where every error the SCSI core can meet
//! (CDB/parameter errors, unit attentions, reservation conflicts and
//! `BlockError`s from the backstore) becomes a status + sense key/ASC/ASCQ.
//!
//! Handlers return `Result<_, ScsiError>`; only `ScsiError::into_response`
//! decides what the initiator sees.

use super::{ScsiResponse, ScsiStatus};
use crate::block::BlockError;

/// SPC-4 sense keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SenseKey {
    NoSense = 0x0,
    RecoveredError = 0x1,
    NotReady = 0x2,
    MediumError = 0x3,
    HardwareError = 0x4,
    IllegalRequest = 0x5,
    UnitAttention = 0x6,
    DataProtect = 0x7,
    CopyAborted = 0xA,
    AbortedCommand = 0xB,
    Miscompare = 0xE,
}

/// Additional sense code + qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Asc(pub u8, pub u8);

impl Asc {
    pub const NO_ADDITIONAL: Asc = Asc(0x00, 0x00);
    pub const NOT_READY_INIT_REQUIRED: Asc = Asc(0x04, 0x02);
    pub const SANITIZE_IN_PROGRESS: Asc = Asc(0x04, 0x1B);
    pub const WRITE_ERROR: Asc = Asc(0x0C, 0x00);
    pub const INVALID_FIELD_IN_IU: Asc = Asc(0x0E, 0x03);
    pub const UNRECOVERED_READ_ERROR: Asc = Asc(0x11, 0x00);
    pub const PARAM_LIST_LENGTH_ERROR: Asc = Asc(0x1A, 0x00);
    pub const MISCOMPARE_DURING_VERIFY: Asc = Asc(0x1D, 0x00);
    pub const INVALID_OPCODE: Asc = Asc(0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Asc = Asc(0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Asc = Asc(0x24, 0x00);
    pub const LUN_NOT_SUPPORTED: Asc = Asc(0x25, 0x00);
    pub const INVALID_FIELD_IN_PARAM: Asc = Asc(0x26, 0x00);
    pub const PARAM_NOT_SUPPORTED: Asc = Asc(0x26, 0x01);
    pub const INVALID_PARAM_VALUE: Asc = Asc(0x26, 0x02);
    pub const INVALID_RELEASE_OF_PR: Asc = Asc(0x26, 0x04);
    pub const TOO_MANY_TARGET_DESCRIPTORS: Asc = Asc(0x26, 0x06);
    pub const UNSUPPORTED_TARGET_DESCRIPTOR_TYPE: Asc = Asc(0x26, 0x07);
    pub const TOO_MANY_SEGMENT_DESCRIPTORS: Asc = Asc(0x26, 0x08);
    pub const UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE: Asc = Asc(0x26, 0x09);
    pub const WRITE_PROTECTED: Asc = Asc(0x27, 0x00);
    pub const SOFTWARE_WRITE_PROTECTED: Asc = Asc(0x27, 0x02);
    pub const SPACE_ALLOCATION_FAILED_WRITE_PROTECT: Asc = Asc(0x27, 0x07);
    pub const POWER_ON_RESET: Asc = Asc(0x29, 0x00);
    pub const POWER_ON_OCCURRED: Asc = Asc(0x29, 0x01);
    pub const BUS_DEVICE_RESET: Asc = Asc(0x29, 0x03);
    pub const I_T_NEXUS_LOSS: Asc = Asc(0x29, 0x07);
    pub const MODE_PARAMETERS_CHANGED: Asc = Asc(0x2A, 0x01);
    pub const RESERVATIONS_PREEMPTED: Asc = Asc(0x2A, 0x03);
    pub const RESERVATIONS_RELEASED: Asc = Asc(0x2A, 0x04);
    pub const REGISTRATIONS_PREEMPTED: Asc = Asc(0x2A, 0x05);
    pub const CAPACITY_DATA_HAS_CHANGED: Asc = Asc(0x2A, 0x09);
    pub const COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: Asc = Asc(0x2F, 0x00);
    pub const SAVING_PARAMS_NOT_SUPPORTED: Asc = Asc(0x39, 0x00);
    pub const SANITIZE_COMMAND_FAILED: Asc = Asc(0x31, 0x03);
    pub const REPORTED_LUNS_DATA_CHANGED: Asc = Asc(0x3F, 0x0E);
    pub const INTERNAL_TARGET_FAILURE: Asc = Asc(0x44, 0x00);
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: Asc = Asc(0x55, 0x04);
    pub const COPY_TARGET_DEVICE_NOT_REACHABLE: Asc = Asc(0x0D, 0x02);
    pub const UNREACHABLE_COPY_TARGET: Asc = Asc(0x08, 0x04);
}

/// Sense-key-specific field pointer (SPC-4 4.5.2.4.2): which byte (and
/// bit) of the CDB or parameter list was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldPointer {
    /// true: the error is in the CDB (C/D = 1); false: in the parameter data.
    pub in_cdb: bool,
    pub byte: u16,
    /// The most significant bit of the offending field, if known.
    pub bit: Option<u8>,
}

impl FieldPointer {
    fn encode(&self) -> [u8; 3] {
        let mut b0 = 0x80; // SKSV
        if self.in_cdb {
            b0 |= 0x40;
        }
        if let Some(bit) = self.bit {
            b0 |= 0x08 | (bit & 0x07);
        }
        let [hi, lo] = self.byte.to_be_bytes();
        [b0, hi, lo]
    }
}

/// One sense condition, independent of its wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: Asc,
    /// INFORMATION field (e.g. miscompare offset).
    pub info: Option<u64>,
    /// Sense-key-specific field pointer.
    pub field: Option<FieldPointer>,
    /// Sense-key-specific progress indication (SPC-4 4.5.2.4.4), the
    /// fraction done in 1/65536ths, for NOT READY "... in progress"
    /// conditions. Ignored when `field` is set.
    pub progress: Option<u16>,
}

/// Length of the fixed-format sense data we produce.
pub const FIXED_SENSE_LEN: usize = 18;

impl Sense {
    pub const fn new(key: SenseKey, asc: Asc) -> Self {
        Sense {
            key,
            asc,
            info: None,
            field: None,
            progress: None,
        }
    }

    /// The 3 sense-key-specific bytes, SKSV set, if there are any.
    fn key_specific(&self) -> Option<[u8; 3]> {
        match (self.field, self.progress) {
            (Some(fp), _) => Some(fp.encode()),
            (None, Some(p)) => {
                let [hi, lo] = p.to_be_bytes();
                Some([0x80, hi, lo])
            }
            (None, None) => None,
        }
    }

    /// Fixed format (response code 0x70, current error).
    pub fn to_fixed(&self) -> Vec<u8> {
        let mut s = vec![0u8; FIXED_SENSE_LEN];
        s[0] = 0x70;
        s[2] = self.key as u8;
        if let Some(info) = self.info {
            // The fixed INFORMATION field is 4 bytes; larger values only fit
            // the descriptor format, so VALID stays 0 for them.
            if let Ok(v) = u32::try_from(info) {
                s[0] |= 0x80;
                s[3..7].copy_from_slice(&v.to_be_bytes());
            }
        }
        s[7] = (FIXED_SENSE_LEN - 8) as u8;
        s[12] = self.asc.0;
        s[13] = self.asc.1;
        if let Some(sks) = self.key_specific() {
            s[15..18].copy_from_slice(&sks);
        }
        s
    }

    /// Descriptor format (response code 0x72, current error) with an
    /// information descriptor and a sense-key-specific descriptor when set.
    pub fn to_descriptor(&self) -> Vec<u8> {
        let mut s = Vec::with_capacity(8 + 12 + 8);
        s.extend_from_slice(&[0x72, self.key as u8, self.asc.0, self.asc.1, 0, 0, 0, 0]);
        if let Some(info) = self.info {
            s.extend_from_slice(&[0x00, 0x0A, 0x80, 0x00]);
            s.extend_from_slice(&info.to_be_bytes());
        }
        if let Some(sks) = self.key_specific() {
            s.extend_from_slice(&[0x02, 0x06, 0x00]);
            s.extend_from_slice(&sks);
            s.extend_from_slice(&[0x00, 0x00]);
        }
        s[7] = (s.len() - 8) as u8;
        s
    }

    pub fn encode(&self, descriptor: bool) -> Vec<u8> {
        if descriptor {
            self.to_descriptor()
        } else {
            self.to_fixed()
        }
    }
}

/// What the backstore call that failed was doing, so a generic I/O error
/// becomes the matching medium error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDir {
    Read,
    Write,
    Other,
}

/// Every way a command can fail.
#[derive(Debug, thiserror::Error)]
pub enum ScsiError {
    #[error("invalid command operation code")]
    InvalidOpcode,
    #[error("invalid field in CDB (byte {byte}, bit {bit:?})")]
    InvalidFieldInCdb { byte: u16, bit: Option<u8> },
    #[error("invalid field in parameter list (byte {byte}, bit {bit:?})")]
    InvalidFieldInParam { byte: u16, bit: Option<u8> },
    #[error("parameter list length error")]
    ParamListLength,
    #[error("invalid parameter value")]
    InvalidParamValue,
    #[error("data-out length does not match the command")]
    DataOutLength,
    #[error("logical unit is stopped")]
    NotReady,
    #[error("LBA out of range")]
    LbaOutOfRange,
    #[error("logical unit is write protected")]
    WriteProtected,
    #[error("logical unit is software write protected")]
    SoftwareWriteProtected,
    #[error("miscompare at offset {offset}")]
    Miscompare { offset: u64 },
    #[error("saving parameters not supported")]
    SavingParamsNotSupported,
    #[error("logical unit not supported")]
    LunNotSupported,
    #[error("unit attention {0:?}")]
    UnitAttention(Asc),
    #[error("reservation conflict")]
    ReservationConflict,
    #[error("insufficient registration resources")]
    InsufficientRegistrationResources,
    #[error("backstore: {source}")]
    Block {
        dir: IoDir,
        #[source]
        source: BlockError,
    },
    /// Any other fully specified condition (e.g. COPY ABORTED variants).
    #[error("check condition {0:?}")]
    Other(Sense),
}

impl ScsiError {
    /// INVALID FIELD IN CDB pointing at the MSB `bit` of `byte`.
    pub const fn cdb(byte: u16, bit: u8) -> Self {
        ScsiError::InvalidFieldInCdb {
            byte,
            bit: Some(bit),
        }
    }

    /// INVALID FIELD IN CDB pointing at a whole byte (multi-byte field).
    pub const fn cdb_byte(byte: u16) -> Self {
        ScsiError::InvalidFieldInCdb { byte, bit: None }
    }

    /// INVALID FIELD IN PARAMETER LIST pointing at `byte`/`bit`.
    pub const fn param(byte: u16, bit: Option<u8>) -> Self {
        ScsiError::InvalidFieldInParam { byte, bit }
    }

    pub fn read(source: BlockError) -> Self {
        ScsiError::Block {
            dir: IoDir::Read,
            source,
        }
    }

    pub fn write(source: BlockError) -> Self {
        ScsiError::Block {
            dir: IoDir::Write,
            source,
        }
    }

    pub fn status(&self) -> ScsiStatus {
        match self {
            ScsiError::ReservationConflict => ScsiStatus::ReservationConflict,
            _ => ScsiStatus::CheckCondition,
        }
    }

    /// The sense condition, `None` for statuses without sense.
    pub fn sense(&self) -> Option<Sense> {
        use SenseKey::*;
        let s = match self {
            ScsiError::InvalidOpcode => Sense::new(IllegalRequest, Asc::INVALID_OPCODE),
            ScsiError::InvalidFieldInCdb { byte, bit } => Sense {
                field: Some(FieldPointer {
                    in_cdb: true,
                    byte: *byte,
                    bit: *bit,
                }),
                ..Sense::new(IllegalRequest, Asc::INVALID_FIELD_IN_CDB)
            },
            ScsiError::InvalidFieldInParam { byte, bit } => Sense {
                field: Some(FieldPointer {
                    in_cdb: false,
                    byte: *byte,
                    bit: *bit,
                }),
                ..Sense::new(IllegalRequest, Asc::INVALID_FIELD_IN_PARAM)
            },
            ScsiError::ParamListLength => Sense::new(IllegalRequest, Asc::PARAM_LIST_LENGTH_ERROR),
            ScsiError::InvalidParamValue => Sense::new(IllegalRequest, Asc::INVALID_PARAM_VALUE),
            ScsiError::DataOutLength => Sense::new(IllegalRequest, Asc::INVALID_FIELD_IN_IU),
            ScsiError::NotReady => Sense::new(NotReady, Asc::NOT_READY_INIT_REQUIRED),
            ScsiError::LbaOutOfRange => Sense::new(IllegalRequest, Asc::LBA_OUT_OF_RANGE),
            ScsiError::WriteProtected => Sense::new(DataProtect, Asc::WRITE_PROTECTED),
            ScsiError::SoftwareWriteProtected => {
                Sense::new(DataProtect, Asc::SOFTWARE_WRITE_PROTECTED)
            }
            ScsiError::Miscompare { offset } => Sense {
                info: Some(*offset),
                ..Sense::new(Miscompare, Asc::MISCOMPARE_DURING_VERIFY)
            },
            ScsiError::SavingParamsNotSupported => {
                Sense::new(IllegalRequest, Asc::SAVING_PARAMS_NOT_SUPPORTED)
            }
            ScsiError::LunNotSupported => Sense::new(IllegalRequest, Asc::LUN_NOT_SUPPORTED),
            ScsiError::UnitAttention(asc) => Sense::new(UnitAttention, *asc),
            ScsiError::ReservationConflict => return None,
            ScsiError::InsufficientRegistrationResources => {
                Sense::new(IllegalRequest, Asc::INSUFFICIENT_REGISTRATION_RESOURCES)
            }
            ScsiError::Block { dir, source } => match (source, dir) {
                (BlockError::OutOfRange { .. }, _) => {
                    Sense::new(IllegalRequest, Asc::LBA_OUT_OF_RANGE)
                }
                (BlockError::NoSpace, _) => {
                    Sense::new(DataProtect, Asc::SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
                }
                (BlockError::ReadOnly, _) => Sense::new(DataProtect, Asc::WRITE_PROTECTED),
                (BlockError::Io(_), IoDir::Read) => {
                    Sense::new(MediumError, Asc::UNRECOVERED_READ_ERROR)
                }
                (BlockError::Io(_), IoDir::Write) => Sense::new(MediumError, Asc::WRITE_ERROR),
                (BlockError::Io(_), IoDir::Other) | (BlockError::Unsupported, _) => {
                    Sense::new(HardwareError, Asc::INTERNAL_TARGET_FAILURE)
                }
            },
            ScsiError::Other(s) => *s,
        };
        Some(s)
    }

    /// The response the initiator sees; `descriptor` selects descriptor
    /// format sense (control mode page D_SENSE).
    pub fn into_response(self, descriptor: bool) -> ScsiResponse {
        ScsiResponse::with_sense(
            self.status(),
            self.sense()
                .map(|s| s.encode(descriptor))
                .unwrap_or_default(),
        )
    }
}

impl From<BlockError> for ScsiError {
    fn from(source: BlockError) -> Self {
        ScsiError::Block {
            dir: IoDir::Other,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_sense_layout_with_field_pointer() {
        let s = ScsiError::cdb(1, 5).sense().unwrap().to_fixed();
        assert_eq!(s.len(), 18);
        assert_eq!(s[0], 0x70);
        assert_eq!(s[2], 0x05);
        assert_eq!(s[7], 10);
        assert_eq!((s[12], s[13]), (0x24, 0x00));
        // SKSV | C/D | BPV | bit 5, field pointer 1
        assert_eq!(&s[15..18], &[0xC0 | 0x08 | 5, 0x00, 0x01]);
    }

    #[test]
    fn byte_pointer_without_bit() {
        let s = ScsiError::cdb_byte(0x102).sense().unwrap().to_fixed();
        assert_eq!(&s[15..18], &[0xC0, 0x01, 0x02]);
        let p = ScsiError::param(3, None).sense().unwrap().to_fixed();
        assert_eq!((p[12], p[13]), (0x26, 0x00));
        assert_eq!(&p[15..18], &[0x80, 0x00, 0x03]);
    }

    #[test]
    fn progress_indication_in_both_formats() {
        let s = Sense {
            progress: Some(0x4000),
            ..Sense::new(SenseKey::NotReady, Asc::SANITIZE_IN_PROGRESS)
        };
        let f = s.to_fixed();
        assert_eq!((f[2], f[12], f[13]), (0x02, 0x04, 0x1B));
        assert_eq!(&f[15..18], &[0x80, 0x40, 0x00]);
        let d = s.to_descriptor();
        assert_eq!(&d[..4], &[0x72, 0x02, 0x04, 0x1B]);
        assert_eq!(&d[8..16], &[0x02, 0x06, 0x00, 0x80, 0x40, 0x00, 0x00, 0x00]);
        assert_eq!(d[7], 8);
    }

    #[test]
    fn miscompare_sets_information() {
        let s = ScsiError::Miscompare { offset: 0x1234 }
            .sense()
            .unwrap()
            .to_fixed();
        assert_eq!(s[0], 0xF0);
        assert_eq!(s[2], 0x0E);
        assert_eq!(&s[3..7], &[0, 0, 0x12, 0x34]);
        assert_eq!((s[12], s[13]), (0x1D, 0x00));
        // Too large for the fixed INFORMATION field: VALID clear.
        let big = ScsiError::Miscompare { offset: 1 << 40 }
            .sense()
            .unwrap()
            .to_fixed();
        assert_eq!(big[0], 0x70);
        let d = ScsiError::Miscompare { offset: 1 << 40 }
            .sense()
            .unwrap()
            .to_descriptor();
        assert_eq!(&d[..4], &[0x72, 0x0E, 0x1D, 0x00]);
        assert_eq!(d[7] as usize, d.len() - 8);
        assert_eq!(&d[8..12], &[0x00, 0x0A, 0x80, 0x00]);
        assert_eq!(&d[12..20], &(1u64 << 40).to_be_bytes());
    }

    #[test]
    fn block_errors_map_by_direction() {
        let io = || BlockError::Io(std::io::Error::other("x"));
        let r = ScsiError::read(io()).sense().unwrap();
        assert_eq!((r.key, r.asc), (SenseKey::MediumError, Asc(0x11, 0)));
        let w = ScsiError::write(io()).sense().unwrap();
        assert_eq!((w.key, w.asc), (SenseKey::MediumError, Asc(0x0C, 0)));
        let n = ScsiError::write(BlockError::NoSpace).sense().unwrap();
        assert_eq!((n.key, n.asc), (SenseKey::DataProtect, Asc(0x27, 0x07)));
        let o = ScsiError::from(BlockError::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        })
        .sense()
        .unwrap();
        assert_eq!((o.key, o.asc), (SenseKey::IllegalRequest, Asc(0x21, 0)));
        let rc = ScsiError::ReservationConflict.into_response(false);
        assert_eq!(rc.status, ScsiStatus::ReservationConflict);
        assert!(rc.sense.is_empty());
    }
}
