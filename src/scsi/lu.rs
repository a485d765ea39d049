//! One logical unit: configuration, block device and SCSI state (unit
//! attentions, mode parameters, range lock), plus the command pipeline
//! identify → unit attention → shape check → parse → dispatch.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::cdb::{self, Attrs, Command, Reader};
use super::lun_map::LunMap;
use super::pr::{Outcome, PrOutCdb, PrState, PrStore};
use super::range_lock::RangeLock;
use super::sanitize::{self, SanitizeArgs, Sanitizer};
use super::sense::{Asc, ScsiError};
use super::ua::UaTable;
use super::xcopy::{self, CopyResults};
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
    /// Reservations; `reserved` mirrors `PrState::reserved` so commands
    /// skip the lock when nothing is reserved.
    pr: Mutex<PrState>,
    reserved: AtomicBool,
    pr_store: Option<Arc<dyn PrStore>>,
    /// START STOP UNIT with START = 0: medium access is NOT READY.
    stopped: AtomicBool,
    /// EXTENDED COPY results held for RECEIVE COPY RESULTS.
    copies: Mutex<CopyResults>,
    /// SANITIZE running in the background, or failed.
    pub(crate) sanitizer: Sanitizer,
    /// log2(logical blocks per physical block), READ CAPACITY(16).
    pub(crate) lbppbe: u8,
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
            pr: Mutex::new(PrState::default()),
            reserved: AtomicBool::new(false),
            pr_store: None,
            stopped: AtomicBool::new(false),
            copies: Mutex::new(CopyResults::default()),
            sanitizer: Sanitizer::default(),
            lbppbe: 0,
        }
    }

    /// The backing storage writes in units of `bytes` (a power of two;
    /// e.g. the file system block of a backing file): READ CAPACITY(16)
    /// reports that many logical blocks per physical block, like a 512e
    /// disk, so initiators align to it. Sizes not above the logical block
    /// size (or not a power of two) report one block per physical block.
    pub fn with_physical_block_size(mut self, bytes: u32) -> Self {
        let bs = self.block_size();
        self.lbppbe = if bytes.is_power_of_two() && bytes > bs {
            (bytes.trailing_zeros() - bs.trailing_zeros()).min(15) as u8
        } else {
            0
        };
        self
    }

    /// Limit the throughput of SANITIZE OVERWRITE to `bytes_per_sec`
    /// (0: unlimited, the default).
    pub fn with_sanitize_rate(self, bytes_per_sec: u64) -> Self {
        self.sanitizer.set_rate(bytes_per_sec);
        self
    }

    /// Persist APTPL persistent reservations through `store`, restoring
    /// what it saved for this volume before.
    pub fn with_pr_store(mut self, store: Arc<dyn PrStore>) -> Self {
        if let Some(bytes) = store.load(&self.config.volume) {
            let state = PrState::load(&bytes);
            self.reserved.store(state.reserved(), Ordering::Relaxed);
            self.pr = Mutex::new(state);
        }
        self.pr_store = Some(store);
        self
    }

    fn pr_lock(&self) -> MutexGuard<'_, PrState> {
        self.pr.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` on the reservation state, then refresh the fast-path flag
    /// and persist if APTPL is (or was) on and something changed.
    fn with_pr<R>(
        &self,
        f: impl FnOnce(&mut PrState) -> Result<(R, Outcome), ScsiError>,
    ) -> Result<R, ScsiError> {
        let mut st = self.pr_lock();
        let was_aptpl = st.aptpl();
        let result = f(&mut st);
        self.reserved.store(st.reserved(), Ordering::Relaxed);
        let (r, outcome) = result?;
        if outcome == Outcome::Changed && (was_aptpl || st.aptpl()) {
            if let Some(store) = &self.pr_store {
                store.save(&self.config.volume, &st.save_bytes());
            }
        }
        Ok(r)
    }

    pub(crate) fn copies(&self) -> MutexGuard<'_, CopyResults> {
        self.copies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The reservation check for a command of class `attrs` from `n`.
    pub(crate) fn check_reservation(&self, n: &Nexus, attrs: &Attrs) -> Result<(), ScsiError> {
        if self.reserved.load(Ordering::Relaxed) {
            self.pr_lock().check(n, attrs)?;
        }
        Ok(())
    }

    /// Thin provisioned: the backstore can deallocate.
    pub(crate) fn thin(&self) -> bool {
        self.dev.caps().discard
    }

    /// Logical block size in bytes.
    pub fn block_size(&self) -> u32 {
        1 << self.shift
    }

    /// Number of logical blocks. A resize since the last look raises
    /// CAPACITY DATA HAS CHANGED for every nexus.
    pub fn blocks(&self) -> u64 {
        let now = self.dev.size() >> self.shift;
        // A plain load on the common path: no shared cache-line write per
        // command. Only the thread that wins the swap raises the UA.
        let last = self.last_blocks.load(Ordering::Relaxed);
        if last != now && self.last_blocks.swap(now, Ordering::Relaxed) != now {
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
        let _ = self.with_pr(|st| {
            st.reset();
            Ok(((), Outcome::Unchanged))
        });
        self.stopped.store(false, Ordering::Relaxed);
        self.ua.establish_all(asc, None);
    }

    /// The frontend lost this I_T nexus.
    pub(crate) fn nexus_loss(&self, nexus: &Nexus) {
        let _ = self.with_pr(|st| {
            st.nexus_loss(nexus);
            Ok(((), Outcome::Unchanged))
        });
        self.ua.nexus_lost(nexus);
    }

    /// START STOP UNIT. Power conditions other than START/STOP are
    /// transparent for a virtual disk.
    fn start_stop(
        &self,
        power_condition: u8,
        no_flush: bool,
        start: bool,
    ) -> Result<(), ScsiError> {
        match power_condition {
            0 => {
                if !start && !no_flush {
                    self.dev.flush().map_err(ScsiError::write)?;
                }
                self.stopped.store(!start, Ordering::Relaxed);
                Ok(())
            }
            // ACTIVE implies a started unit.
            1 => {
                self.stopped.store(false, Ordering::Relaxed);
                Ok(())
            }
            2 | 3 | 7 | 0xA | 0xB => Ok(()),
            _ => Err(ScsiError::cdb(4, 7)),
        }
    }

    /// Execute one command addressed to this LU.
    pub(crate) fn execute(self: &Arc<Self>, req: &ScsiRequest<'_>, map: &LunMap) -> ScsiResponse {
        match self.run(req, map) {
            Ok(r) => r,
            Err(e) => e.into_response(self.mode.d_sense.load(Ordering::Relaxed)),
        }
    }

    fn run(
        self: &Arc<Self>,
        req: &ScsiRequest<'_>,
        map: &LunMap,
    ) -> Result<ScsiResponse, ScsiError> {
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
        if desc.attrs.thin && !self.thin() {
            return Err(ScsiError::InvalidOpcode);
        }
        if !ua_exempt(desc.opcode) {
            if let Some(asc) = self.ua.take(req.nexus) {
                return Err(ScsiError::UnitAttention(asc));
            }
        }
        cdb::check_shape(req.cdb, desc)?;
        let cmd = (desc.parse)(&Reader::new(req.cdb))?;
        self.sanitizer.check(desc.opcode, desc.attrs.media)?;
        self.check_reservation(req.nexus, &desc.attrs)?;
        if desc.attrs.media && self.stopped.load(Ordering::Relaxed) {
            return Err(ScsiError::NotReady);
        }
        self.dispatch(req, map, cmd)
    }

    fn dispatch(
        self: &Arc<Self>,
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
                self.thin(),
                rctd,
                options,
                opcode,
                sa,
                alloc_len,
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
            } => {
                let len = u64::from(blocks) << self.shift;
                let by_ref = sbc::by_ref_allowed(req, len);
                Ok(match sbc::read(self, form, lba, blocks, by_ref)? {
                    sbc::ReadData::Buffer(d) => ScsiResponse::good(d),
                    sbc::ReadData::File(f) => ScsiResponse::good_file(f),
                })
            }
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
            Command::WriteSame {
                form,
                lba,
                blocks,
                unmap,
                anchor,
                ndob,
            } => {
                sbc::write_same(
                    self,
                    sbc::WriteSameArgs {
                        form,
                        lba,
                        blocks,
                        unmap,
                        anchor,
                        ndob,
                    },
                    req.data_out,
                )?;
                good(Vec::new())
            }
            Command::Unmap { anchor, param_len } => {
                sbc::unmap(self, anchor, param_len, req.data_out)?;
                good(Vec::new())
            }
            Command::GetLbaStatus { lba, alloc_len } => {
                good(sbc::get_lba_status(self, lba, alloc_len)?)
            }
            Command::CompareAndWrite { lba, blocks, fua } => {
                sbc::compare_and_write(self, lba, blocks, fua, req.data_out)?;
                good(Vec::new())
            }
            Command::OrWrite { lba, blocks, fua } => {
                sbc::or_write(self, lba, blocks, fua, req.data_out)?;
                good(Vec::new())
            }
            Command::PreFetch { lba, blocks } => {
                sbc::pre_fetch(self, lba, blocks)?;
                good(Vec::new())
            }
            Command::StartStopUnit {
                power_condition,
                no_flush,
                start,
            } => {
                self.start_stop(power_condition, no_flush, start)?;
                good(Vec::new())
            }
            Command::ReadDefectData {
                twelve,
                plist,
                glist,
                format,
                alloc_len,
            } => good(sbc::read_defect_data(
                twelve, plist, glist, format, alloc_len,
            )),
            Command::PersistentReserveIn { sa, alloc_len } => {
                good(self.pr_lock().pr_in(sa, alloc_len)?)
            }
            Command::PersistentReserveOut {
                sa,
                scope,
                pr_type,
                param_len,
            } => {
                self.with_pr(|st| {
                    let o = st.pr_out(
                        req.nexus,
                        &self.ua,
                        PrOutCdb {
                            sa,
                            scope,
                            pr_type,
                            param_len,
                        },
                        req.data_out,
                    )?;
                    Ok(((), o))
                })?;
                good(Vec::new())
            }
            Command::Sanitize {
                sa,
                immed,
                ause,
                param_len,
            } => {
                sanitize::sanitize(
                    self,
                    req.nexus,
                    SanitizeArgs {
                        sa,
                        immed,
                        ause,
                        param_len,
                    },
                    req.data_out,
                )?;
                good(Vec::new())
            }
            Command::ExtendedCopy { param_len } => {
                xcopy::extended_copy(self, map, req.nexus, param_len, req.data_out, |lu, a| {
                    lu.check_reservation(req.nexus, a)
                })?;
                good(Vec::new())
            }
            Command::ReceiveCopyResults {
                sa,
                list_id,
                alloc_len,
            } => good(xcopy::receive_copy_results(
                self, req.nexus, sa, list_id, alloc_len,
            )?),
            Command::Reserve => {
                self.with_pr(|st| st.reserve(req.nexus).map(|()| ((), Outcome::Unchanged)))?;
                good(Vec::new())
            }
            Command::Release => {
                self.with_pr(|st| st.release(req.nexus).map(|()| ((), Outcome::Unchanged)))?;
                good(Vec::new())
            }
        }
    }
}
