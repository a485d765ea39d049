//! One logical unit: configuration, block device and SCSI state (unit
//! attentions, mode parameters, range lock), plus the command pipeline
//! identify → unit attention → shape check → parse → dispatch.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::cdb::{self, Command, Reader};
use super::lun_map::LunMap;
use super::range_lock::RangeLock;
use super::sense::{Asc, ScsiError};
use super::ua::UaTable;
use super::{sbc, spc, Nexus, ScsiRequest, ScsiResponse};
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

/// Changeable mode parameters. Shared by all I_T nexuses (changes raise
/// MODE PARAMETERS CHANGED for the others).
#[derive(Debug)]
pub(crate) struct ModeState {
    /// Caching page WCE: off means every write is FUA.
    pub wce: AtomicBool,
    /// Control page D_SENSE: descriptor-format sense.
    pub d_sense: AtomicBool,
    /// Control page SWP: software write protect.
    pub swp: AtomicBool,
}

impl Default for ModeState {
    fn default() -> Self {
        ModeState {
            wce: AtomicBool::new(true),
            d_sense: AtomicBool::new(false),
            swp: AtomicBool::new(false),
        }
    }
}

/// One logical unit: its config, its block device and its SCSI state
/// (unit attentions, reservations, mode pages).
pub struct LogicalUnit {
    pub config: LuConfig,
    pub dev: SharedDev,
    /// log2(block size).
    pub(crate) shift: u32,
    pub(crate) ua: UaTable,
    pub(crate) locks: RangeLock,
    pub(crate) mode: ModeState,
    /// Capacity (in blocks) last reported, to notice a resize.
    last_blocks: AtomicU64,
}

impl std::fmt::Debug for LogicalUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogicalUnit")
            .field("config", &self.config)
            .finish()
    }
}

/// Opcodes that a pending unit attention does not block (SAM-5 5.14).
fn ua_exempt(opcode: u8) -> bool {
    matches!(opcode, 0x12 | 0x03 | 0xA0)
}

impl LogicalUnit {
    /// A block size that is not a power of two in 512..=65536 is treated as
    /// 512 (config validation should have refused it).
    pub fn new(config: LuConfig, dev: SharedDev) -> Self {
        let bs = config.block_size;
        let shift = if bs.is_power_of_two() && (512..=65536).contains(&bs) {
            bs.trailing_zeros()
        } else {
            tracing::warn!(volume = %config.volume, block_size = bs, "invalid block size, using 512");
            9
        };
        let blocks = dev.size() >> shift;
        LogicalUnit {
            config,
            dev,
            shift,
            ua: UaTable::new(),
            locks: RangeLock::new(),
            mode: ModeState::default(),
            last_blocks: AtomicU64::new(blocks),
        }
    }

    /// Logical block size in bytes.
    pub fn block_size(&self) -> u32 {
        1 << self.shift
    }

    /// Number of logical blocks. A resize since the last look raises
    /// CAPACITY DATA HAS CHANGED for every nexus.
    pub fn blocks(&self) -> u64 {
        let now = self.dev.size() >> self.shift;
        if self.last_blocks.swap(now, Ordering::Relaxed) != now {
            self.ua.establish_all(Asc::CAPACITY_DATA_HAS_CHANGED, None);
        }
        now
    }

    /// Writes are refused with DATA PROTECT when the LU is configured or
    /// backed read-only, or software write protected (control page SWP).
    pub(crate) fn check_writable(&self) -> Result<(), ScsiError> {
        if self.config.read_only || self.dev.caps().read_only {
            return Err(ScsiError::WriteProtected);
        }
        if self.mode.swp.load(Ordering::Relaxed) {
            return Err(ScsiError::SoftwareWriteProtected);
        }
        Ok(())
    }

    pub(crate) fn write_protected(&self) -> bool {
        self.check_writable().is_err()
    }

    /// LOGICAL UNIT RESET / target reset: every nexus gets `asc`.
    pub(crate) fn reset(&self, asc: Asc) {
        self.ua.establish_all(asc, None);
    }

    /// The frontend lost this I_T nexus.
    pub(crate) fn nexus_loss(&self, nexus: &Nexus) {
        self.ua.establish_known(nexus, Asc::I_T_NEXUS_LOSS);
    }

    /// Execute one command addressed to this LU.
    pub(crate) fn execute(&self, req: &ScsiRequest<'_>, map: &LunMap) -> ScsiResponse {
        match self.run(req, map) {
            Ok(r) => r,
            Err(e) => e.into_response(self.mode.d_sense.load(Ordering::Relaxed)),
        }
    }

    fn run(&self, req: &ScsiRequest<'_>, map: &LunMap) -> Result<ScsiResponse, ScsiError> {
        // Notice a resize before any UA check, so it is reported.
        self.blocks();
        let desc = match cdb::identify(req.cdb) {
            Ok(d) => d,
            Err(e) => {
                if let Some(asc) = self.ua.take(req.nexus) {
                    return Err(ScsiError::UnitAttention(asc));
                }
                return Err(e);
            }
        };
        if !ua_exempt(desc.opcode) {
            if let Some(asc) = self.ua.take(req.nexus) {
                return Err(ScsiError::UnitAttention(asc));
            }
        }
        cdb::check_shape(req.cdb, desc)?;
        let cmd = (desc.parse)(&Reader::new(req.cdb))?;
        self.dispatch(req, map, cmd)
    }

    fn dispatch(
        &self,
        req: &ScsiRequest<'_>,
        map: &LunMap,
        cmd: Command,
    ) -> Result<ScsiResponse, ScsiError> {
        let good = |d: Vec<u8>| Ok(ScsiResponse::good(d));
        match cmd {
            Command::TestUnitReady => good(Vec::new()),
            Command::Inquiry {
                evpd,
                page,
                alloc_len,
            } => good(spc::inquiry(self, req.nexus, evpd, page, alloc_len)?),
            Command::RequestSense { desc, alloc_len } => {
                good(spc::request_sense(self, req.nexus, desc, alloc_len))
            }
            Command::ReportLuns { select, alloc_len } => {
                good(map.report_luns(req.nexus, select, alloc_len)?)
            }
            Command::ModeSense {
                ten,
                dbd,
                llbaa,
                pc,
                page,
                subpage,
                alloc_len,
            } => good(spc::mode_sense(
                self,
                spc::ModeSenseArgs {
                    ten,
                    dbd,
                    llbaa,
                    pc,
                    page,
                    subpage,
                    alloc_len,
                },
            )?),
            Command::ModeSelect {
                ten,
                pf,
                sp,
                param_len,
            } => {
                spc::mode_select(self, req.nexus, ten, pf, sp, param_len, req.data_out)?;
                good(Vec::new())
            }
            Command::ReportSupportedOpcodes {
                rctd,
                options,
                opcode,
                sa,
                alloc_len,
            } => good(spc::report_supported_opcodes(
                rctd, options, opcode, sa, alloc_len,
            )?),
            Command::ReportTargetPortGroups {
                extended,
                alloc_len,
            } => good(spc::report_target_port_groups(
                req.nexus, extended, alloc_len,
            )),
            Command::ReadCapacity10 { lba, pmi } => good(sbc::read_capacity10(self, lba, pmi)?),
            Command::ReadCapacity16 { alloc_len } => good(sbc::read_capacity16(self, alloc_len)),
            Command::Read {
                form,
                lba,
                blocks,
                fua: _,
            } => good(sbc::read(self, form, lba, blocks)?),
            Command::Write {
                form,
                lba,
                blocks,
                fua,
            } => {
                sbc::write(self, form, lba, blocks, fua, req.data_out)?;
                good(Vec::new())
            }
            Command::Verify {
                form,
                lba,
                blocks,
                bytchk,
            } => {
                sbc::verify(self, form, lba, blocks, bytchk, req.data_out)?;
                good(Vec::new())
            }
            Command::WriteAndVerify {
                form,
                lba,
                blocks,
                bytchk: _,
            } => {
                sbc::write_and_verify(self, form, lba, blocks, req.data_out)?;
                good(Vec::new())
            }
            Command::SyncCache { lba, blocks } => {
                sbc::sync_cache(self, lba, blocks)?;
                good(Vec::new())
            }
        }
    }
}
