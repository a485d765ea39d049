//! LUN table of one target: routes commands to logical units and answers
//! what no single LU can (REPORT LUNS, commands to absent LUNs).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{ScsiRequest, ScsiResponse, TaskMgmt};
use crate::block::SharedDev;

/// Static description of a logical unit.
#[derive(Debug, Clone)]
pub struct LuConfig {
    /// Volume name (e.g. `lun0`), used in logs and as the default serial.
    pub volume: String,
    /// Logical block size: 512 or 4096.
    pub block_size: u32,
    pub read_only: bool,
    /// Unit serial number (VPD 0x80), ASCII.
    pub serial: String,
    /// NAA IEEE Registered Extended designator (16 bytes, NAA type 6) for
    /// VPD 0x83. Must be unique per LU and stable across restarts.
    pub naa: [u8; 16],
    pub vendor: String,
    pub product: String,
    pub revision: String,
}

/// One logical unit: its config, its block device and its SCSI state
/// (unit attentions, reservations, mode pages).
pub struct LogicalUnit {
    pub config: LuConfig,
    pub dev: SharedDev,
}

impl std::fmt::Debug for LogicalUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogicalUnit")
            .field("config", &self.config)
            .finish()
    }
}

impl LogicalUnit {
    pub fn new(config: LuConfig, dev: SharedDev) -> Self {
        LogicalUnit { config, dev }
    }
}

/// The LUNs of one target.
#[derive(Debug, Default)]
pub struct LunMap {
    luns: BTreeMap<u64, Arc<LogicalUnit>>,
}

impl LunMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, lun: u64, lu: Arc<LogicalUnit>) {
        self.luns.insert(lun, lu);
    }

    pub fn get(&self, lun: u64) -> Option<&Arc<LogicalUnit>> {
        self.luns.get(&lun)
    }

    /// Execute one command. Never panics on any CDB or data.
    pub fn execute(&self, _req: &ScsiRequest<'_>) -> ScsiResponse {
        todo!("scsi core")
    }

    /// Apply a task management function's SCSI-level effects.
    pub fn task_management(&self, _tmf: TaskMgmt, _nexus: &super::Nexus) {
        todo!("scsi core")
    }
}
