//! LUN table of one target: routes commands to logical units and answers
//! what no single LU can (REPORT LUNS, commands to absent LUNs).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::cdb::{self, Command, Reader};
use super::sense::{Asc, ScsiError, Sense, SenseKey};
use super::spc::{self, truncate};
use super::{encode_lun, Nexus, ScsiRequest, ScsiResponse, TaskMgmt};

pub use super::lu::{LogicalUnit, LuConfig};

/// The LUNs of one target.
#[derive(Debug, Default)]
pub struct LunMap {
    luns: BTreeMap<u64, Arc<LogicalUnit>>,
}

impl LunMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add (or replace) a LUN. Nexuses that already know the other LUs see
    /// REPORTED LUNS DATA HAS CHANGED on them.
    pub fn insert(&mut self, lun: u64, lu: Arc<LogicalUnit>) {
        for (n, other) in &self.luns {
            if *n != lun {
                other
                    .ua
                    .establish_all(Asc::REPORTED_LUNS_DATA_CHANGED, None);
            }
        }
        self.luns.insert(lun, lu);
    }

    pub fn get(&self, lun: u64) -> Option<&Arc<LogicalUnit>> {
        self.luns.get(&lun)
    }

    /// The LU whose NAA designator (VPD 0x83) is `naa`: how EXTENDED COPY
    /// finds its copy targets.
    pub fn find_by_naa(&self, naa: &[u8]) -> Option<&Arc<LogicalUnit>> {
        self.luns.values().find(|lu| lu.config.naa[..] == *naa)
    }

    /// All LUs with their LUN numbers, ascending.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Arc<LogicalUnit>)> {
        self.luns.iter().map(|(n, lu)| (*n, lu))
    }

    /// Execute one command. Never panics on any CDB or data.
    pub fn execute(&self, req: &ScsiRequest<'_>) -> ScsiResponse {
        match self.luns.get(&req.lun) {
            Some(lu) => lu.execute(req, self),
            None => match self.execute_absent(req) {
                Ok(r) => r,
                Err(e) => e.into_response(false),
            },
        }
    }

    /// Apply a task management function's SCSI-level effects.
    pub fn task_management(&self, tmf: TaskMgmt, nexus: &Nexus) {
        match tmf {
            TaskMgmt::LogicalUnitReset { lun } => {
                if let Some(lu) = self.luns.get(&lun) {
                    lu.reset(Asc::BUS_DEVICE_RESET);
                }
            }
            TaskMgmt::TargetWarmReset => {
                for lu in self.luns.values() {
                    lu.reset(Asc::BUS_DEVICE_RESET);
                }
            }
            TaskMgmt::TargetColdReset => {
                for lu in self.luns.values() {
                    lu.reset(Asc::POWER_ON_OCCURRED);
                }
            }
            TaskMgmt::ClearTaskSet { lun } => {
                if let Some(lu) = self.luns.get(&lun) {
                    lu.ua
                        .establish_all(Asc::COMMANDS_CLEARED_BY_ANOTHER_INITIATOR, Some(nexus));
                }
            }
        }
    }

    /// The frontend is about to wait for running commands it aborts: of
    /// `nexus` (every nexus if `None`) on LUN `lun` (every LUN if `None`).
    /// Commands that only wait for a background operation return at once
    /// (see `sanitize`); nothing else changes.
    pub fn cancel_waits(&self, lun: Option<u64>, nexus: Option<&Nexus>) {
        for (n, lu) in &self.luns {
            if lun.map_or(true, |l| l == *n) {
                lu.sanitizer.cancel_waits(nexus);
            }
        }
    }

    /// The frontend lost an I_T nexus (session closed, connection dropped,
    /// session reinstated): SPC-2 reservations it held are released and its
    /// pending unit attentions dropped (see `ua::UaTable::nexus_lost`).
    /// Persistent reservations and registrations survive.
    pub fn nexus_loss(&self, nexus: &Nexus) {
        for lu in self.luns.values() {
            lu.nexus_loss(nexus);
        }
    }

    /// REPORT LUNS, the same for every LUN it is addressed to.
    pub(crate) fn report_luns(
        &self,
        nexus: &Nexus,
        select: u8,
        alloc_len: u32,
    ) -> Result<Vec<u8>, ScsiError> {
        if alloc_len < 16 {
            return Err(ScsiError::cdb_byte(6));
        }
        let listed: Vec<u64> = match select {
            0x00 | 0x02 => self.luns.keys().copied().collect(),
            // No well-known logical units.
            0x01 => Vec::new(),
            _ => return Err(ScsiError::cdb_byte(2)),
        };
        let mut d = Vec::with_capacity(8 + 8 * listed.len());
        d.extend_from_slice(&((8 * listed.len()) as u32).to_be_bytes());
        d.extend_from_slice(&[0; 4]);
        for lun in listed {
            d.extend_from_slice(&encode_lun(lun));
        }
        // The initiator now knows the current inventory.
        for lu in self.luns.values() {
            lu.ua.clear(nexus, Asc::REPORTED_LUNS_DATA_CHANGED);
        }
        Ok(truncate(d, alloc_len as usize))
    }

    /// Commands to a LUN with no logical unit behind it (SPC-4 / SAM-5):
    /// INQUIRY answers with peripheral qualifier 011b, REQUEST SENSE
    /// reports LOGICAL UNIT NOT SUPPORTED as data, REPORT LUNS works, all
    /// else is LOGICAL UNIT NOT SUPPORTED.
    fn execute_absent(&self, req: &ScsiRequest<'_>) -> Result<ScsiResponse, ScsiError> {
        let desc = cdb::identify(req.cdb).map_err(|_| ScsiError::LunNotSupported)?;
        if !matches!(desc.opcode, 0x12 | 0x03 | 0xA0) {
            return Err(ScsiError::LunNotSupported);
        }
        cdb::check_shape(req.cdb, desc)?;
        let data = match (desc.parse)(&Reader::new(req.cdb))? {
            Command::Inquiry {
                evpd,
                page,
                alloc_len,
            } => {
                let d = match (evpd, page) {
                    (false, 0) => {
                        let (v, p, r) = self.luns.values().next().map_or(
                            ("LUNMIRR", "lunmirror", "0001"),
                            |lu| {
                                (
                                    lu.config.vendor.as_str(),
                                    lu.config.product.as_str(),
                                    lu.config.revision.as_str(),
                                )
                            },
                        );
                        spc::standard_inquiry(0x7F, v, p, r)
                    }
                    (true, 0) => vec![0x7F, 0x00, 0x00, 0x01, 0x00],
                    _ => return Err(ScsiError::cdb_byte(2)),
                };
                truncate(d, alloc_len.into())
            }
            Command::RequestSense { desc, alloc_len } => truncate(
                Sense::new(SenseKey::IllegalRequest, Asc::LUN_NOT_SUPPORTED).encode(desc),
                alloc_len.into(),
            ),
            Command::ReportLuns { select, alloc_len } => {
                self.report_luns(req.nexus, select, alloc_len)?
            }
            _ => return Err(ScsiError::LunNotSupported),
        };
        Ok(ScsiResponse::good(data))
    }
}
