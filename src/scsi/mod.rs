//! The SCSI core: CDB parsing, SPC-4/SBC-3 emulation and sense building on
//! top of `block::BlockDev`. No I/O of its own besides calls into the block
//! device; frontends (iSCSI, TCMU) hand it a `ScsiRequest` and get a
//! `ScsiResponse` back.
//!
//! Interface contract (frontends depend on exactly this):
//! - `LunMap::execute(&ScsiRequest) -> ScsiResponse` routes by LUN, answers
//!   REPORT LUNS and commands to absent LUNs itself.
//! - `LunMap::task_management(...)` establishes the unit attentions that LUN
//!   and target resets cause.
//! - `LunMap::nexus_loss(&Nexus)` tells the core an I_T nexus is gone
//!   (session closed, connection dropped, reinstated): its SPC-2
//!   reservations are released and its pending unit attentions dropped.
//! - `encode_lun`/`decode_lun` convert between LUN numbers and the 8-byte
//!   LUN field, the same way REPORT LUNS encodes them.
//! - `cdb::data_out_len(cdb, block_size)` is the data-out length a CDB
//!   describes (for residuals), from the same table dispatch uses.
//! - `ScsiRequest::data_out` should carry everything the initiator sent:
//!   the core cuts surplus for WRITE-type commands itself and refuses
//!   mismatches where the CDB fixes the length (COMPARE AND WRITE, WRITE
//!   SAME).
//! - `LogicalUnit::with_pr_store` plugs in APTPL persistence (`PrStore`).
//! - `LunMap::cancel_waits(lun, nexus)`: call it when aborting running
//!   commands (ABORT TASK, ABORT TASK SET, CLEAR TASK SET, resets, a lost
//!   connection) *before* waiting for them: commands that only wait for a
//!   background operation (SANITIZE with IMMED = 0) return at once, the
//!   operation itself goes on. Their response is meant to be discarded.

use std::sync::Arc;

use crate::block::FileExtent;

/// An I_T nexus as the SCSI core sees it: who is asking, through which port.
/// Frontends create one per session (iSCSI) or per device (TCMU) and keep it
/// for the life of the nexus; the core keys unit attentions and
/// reservations by `initiator_port` + `target_port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// SCSI initiator port name, e.g. `iqn.1993-08.org.debian:01:abc,i,0x23d000000001`.
    pub initiator_port: String,
    /// SCSI target port name, e.g. `iqn.2026-11.io.lunmirror:default,t,0x0001`.
    pub target_port: String,
    /// Relative target port identifier (1-based) for VPD 0x83 and ALUA.
    pub relative_port_id: u16,
    /// Target port group this port belongs to (ALUA).
    pub port_group_id: u16,
}

/// SIMPLE/ORDERED/HEAD OF QUEUE/ACA task attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskAttr {
    Untagged,
    #[default]
    Simple,
    Ordered,
    HeadOfQueue,
    Aca,
}

/// One SCSI command as received from a frontend, data-out fully gathered.
#[derive(Debug)]
pub struct ScsiRequest<'a> {
    /// Command descriptor block (6..=16 bytes, or longer with AHS).
    pub cdb: &'a [u8],
    /// LUN number (flat, already decoded from the 8-byte LUN field).
    pub lun: u64,
    pub nexus: &'a Arc<Nexus>,
    /// Everything the initiator sent (may be shorter or longer than the CDB
    /// asks; the core reports the mismatch).
    pub data_out: &'a [u8],
    /// Bytes the initiator is prepared to receive (Expected Data Transfer
    /// Length for a read). Data-in longer than this is truncated by the
    /// frontend, which reports the residual.
    pub expected_in_len: u32,
    pub task_attr: TaskAttr,
    /// The frontend can send data-in by reference: a large plain READ may
    /// then answer with [`ScsiResponse::data_in_file`] (a range of the
    /// backing file) instead of filling `data_in`, and the frontend moves
    /// the bytes from the page cache to its transport itself, *after*
    /// `execute` returned (see `sbc::read` for when and what that means).
    /// Frontends that need the bytes in memory (TCMU) leave it `false`.
    pub data_in_by_ref: bool,
}

/// SCSI status byte values (SAM-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ScsiStatus {
    Good = 0x00,
    CheckCondition = 0x02,
    ConditionMet = 0x04,
    Busy = 0x08,
    ReservationConflict = 0x18,
    TaskSetFull = 0x28,
    AcaActive = 0x30,
    TaskAborted = 0x40,
}

/// The result of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResponse {
    pub status: ScsiStatus,
    /// Sense data (fixed format, 18+ bytes) when `status` is CHECK CONDITION;
    /// empty otherwise.
    pub sense: Vec<u8>,
    /// Data-in. May exceed `expected_in_len`; the frontend truncates and
    /// reports overflow.
    pub data_in: Vec<u8>,
    /// Data-in by reference, only if the request set
    /// [`ScsiRequest::data_in_by_ref`]: the bytes of this file range are
    /// the data-in (`data_in` is then empty). Truncated like `data_in`.
    pub data_in_file: Option<FileExtent>,
}

impl ScsiResponse {
    pub fn good(data_in: Vec<u8>) -> Self {
        ScsiResponse {
            status: ScsiStatus::Good,
            sense: Vec::new(),
            data_in,
            data_in_file: None,
        }
    }

    /// GOOD, the data-in being the bytes of `extent`.
    pub fn good_file(extent: FileExtent) -> Self {
        ScsiResponse {
            data_in_file: Some(extent),
            ..Self::good(Vec::new())
        }
    }

    /// `status` with sense data (empty for none) and no data-in.
    pub fn with_sense(status: ScsiStatus, sense: Vec<u8>) -> Self {
        ScsiResponse {
            status,
            sense,
            data_in: Vec::new(),
            data_in_file: None,
        }
    }

    /// Length of the data-in, in memory or by reference.
    pub fn data_in_len(&self) -> u64 {
        match &self.data_in_file {
            Some(f) => f.len,
            None => self.data_in.len() as u64,
        }
    }
}

/// Task management functions a frontend forwards to the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskMgmt {
    LogicalUnitReset {
        lun: u64,
    },
    TargetWarmReset,
    TargetColdReset,
    /// ABORT TASK SET / CLEAR TASK SET on a LUN: the frontend aborts its
    /// tasks; the core only learns of it (CLEAR TASK SET raises UAs for other nexuses).
    ClearTaskSet {
        lun: u64,
    },
}

/// Encode a LUN number as the 8-byte LUN field (SAM-5 4.7): peripheral
/// device addressing below 256, flat space below 16384, extended flat space
/// below 2^24, long extended flat space beyond (low 40 bits). The inverse
/// of `decode_lun`; REPORT LUNS uses it.
pub fn encode_lun(lun: u64) -> [u8; 8] {
    let mut f = [0u8; 8];
    let b = lun.to_be_bytes();
    if lun < 256 {
        f[1] = b[7];
    } else if lun < 0x4000 {
        f[0] = 0x40 | b[6];
        f[1] = b[7];
    } else if lun < 1 << 24 {
        f[0] = 0xD2;
        f[1..4].copy_from_slice(&b[5..8]);
    } else {
        f[0] = 0xE2;
        f[1..6].copy_from_slice(&b[3..8]);
    }
    f
}

/// Decode an 8-byte LUN field into the LUN number the core uses. Formats
/// we never hand out decode to `u64::MAX`, a LUN that is never present.
pub fn decode_lun(field: [u8; 8]) -> u64 {
    let be = |bytes: &[u8]| bytes.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
    match field[0] {
        0x00 => u64::from(field[1]),
        0x40..=0x7F => (u64::from(field[0] & 0x3F) << 8) | u64::from(field[1]),
        0xD2 => be(&field[1..4]),
        0xE2 => be(&field[1..6]),
        _ => u64::MAX,
    }
}

pub mod cdb;
mod lu;
mod lun_map;
pub mod pr;
mod range_lock;
mod sanitize;
pub mod sbc;
pub mod sense;
pub mod spc;
mod ua;
mod xcopy;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests2;
#[cfg(test)]
mod tests_by_ref;
#[cfg(test)]
mod tests_sanitize;

pub use lun_map::{LogicalUnit, LuConfig, LunMap};
pub use pr::PrStore;
pub use sense::{Asc, ScsiError, Sense, SenseKey};
