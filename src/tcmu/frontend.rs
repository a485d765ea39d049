//! The TCMU frontend proper: one thread per device ring feeding the SCSI
//! core, and one manager thread that follows the kernel's netlink events
//! and owns the set of devices.
//!
//! Startup takes over devices that already exist (a restart, or devices
//! restored by `targetctl` before the daemon came up): open the uio device,
//! block it, reset its ring so the kernel answers BUSY to whatever the
//! previous handler left unfinished (initiators retry; nothing stale is
//! replayed over newer data), unblock, serve. If the configfs reset is not
//! available the same is done from userspace: every command found on the
//! ring at takeover is completed with BUSY unexecuted.
//!
//! A device whose cfgstring or backing file is unusable is still served,
//! as a logical unit that answers INQUIRY and NOT READY to everything else,
//! so initiators get an error instead of hanging (when the kernel waits for
//! netlink replies, the failure is also reported to it and it refuses the
//! device).
//!
//! Shutdown stops taking commands, completes the ones in hand and closes
//! the devices without blocking them: commands that arrive while no
//! handler runs wait on the ring until a restarted daemon resets it, or
//! until the kernel's `cmd_time_out` fails them.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::cfgstring::{CfgError, CfgString};
use super::configfs::{self, DeviceDir, KernelPaths, ResetLevel};
use super::netlink::{self, EventSocket, GenlRequester, Reconfig, TcmuEvent};
use super::ring::{fixed_sense, Command, Event, Ring, RingError, SharedMem};
use super::sys::*;
use super::uio::{UioDevice, UioFd, UioMapping, UioPaths};
use super::xfer::{direction, Direction};
use crate::block::SharedDev;
use crate::scsi::{
    LogicalUnit, LuConfig, LunMap, Nexus, ScsiRequest, ScsiResponse, ScsiStatus, TaskAttr, TaskMgmt,
};

/// What the frontend needs from the SCSI core; `LunMap` is the real one.
pub trait ScsiTarget: Send + Sync {
    fn execute(&self, req: &ScsiRequest<'_>) -> ScsiResponse;
    fn task_management(&self, tmf: TaskMgmt, nexus: &Nexus);
    /// Logical block size of LUN 0 (sizes the data-out of block commands).
    fn block_size(&self) -> u32 {
        512
    }
}

impl ScsiTarget for LunMap {
    fn block_size(&self) -> u32 {
        self.get(0).map_or(512, |lu| lu.config.block_size)
    }
    fn execute(&self, req: &ScsiRequest<'_>) -> ScsiResponse {
        LunMap::execute(self, req)
    }
    fn task_management(&self, tmf: TaskMgmt, nexus: &Nexus) {
        LunMap::task_management(self, tmf, nexus)
    }
}

/// Everything known about a `user:mirror` device when it is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// N of `/dev/uioN`.
    pub uio_index: u32,
    pub hba: u32,
    /// The LIO storage object name (`/backstores/user:mirror/<name>`).
    pub name: String,
    pub config: CfgString,
    /// The kernel's `dev_size`.
    pub size: u64,
    pub block_size: u32,
    pub write_cache: bool,
    /// LIO's unit serial (stable across saveconfig/restore), if readable.
    pub serial: Option<String>,
}

/// Opens the block device behind a TCMU device: backing file, mirror layer,
/// registry entry. Supplied by the daemon.
pub trait VolumeFactory: Send + Sync {
    /// Open (creating as the cfgstring allows) the volume for `dev`. The
    /// returned device must be at least `dev.size` bytes.
    fn open(&self, dev: &DeviceInfo) -> Result<SharedDev, String>;

    /// The device is gone (removed, or the frontend shuts down).
    fn close(&self, dev: &DeviceInfo) {
        let _ = dev;
    }

    /// RECONFIG_DEVICE. `Ok` accepts the change. By default a write-cache
    /// toggle is accepted (the SCSI core reports its own caching mode) and
    /// the rest refused.
    fn reconfigure(&self, dev: &DeviceInfo, change: &Reconfig) -> Result<(), String> {
        let _ = dev;
        match change {
            Reconfig::WriteCache(_) => Ok(()),
            Reconfig::Size(_) => Err("resizing a user:mirror device is not supported".into()),
            Reconfig::Config(_) => {
                Err("changing the cfgstring of a live device is not supported".into())
            }
            Reconfig::Other => Err("unknown reconfiguration".into()),
        }
    }
}

/// Frontend settings.
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    /// The `user:<subtype>` this handler serves.
    pub subtype: String,
    pub uio: UioPaths,
    pub kernel: KernelPaths,
    /// Follow netlink events (else only scan sysfs every `rescan_interval`).
    pub netlink: bool,
    /// Tell the kernel we send `*_DONE` replies (SET_FEATURES).
    pub nl_replies: bool,
    /// How often to look for devices whose events were missed.
    pub rescan_interval: Duration,
    /// Longest wait on a ring without a notification (a missed wakeup
    /// costs at most this much latency).
    pub ring_poll: Duration,
    /// Threads executing one device's commands. With more than one (and a
    /// kernel offering out-of-order completion) commands run concurrently
    /// and complete as they finish; 1 runs them in ring order on the ring
    /// thread.
    pub workers_per_device: usize,
    /// Commands of one device in execution at once (pool mode).
    pub max_inflight: usize,
    pub vendor: String,
    pub product: String,
    pub revision: String,
}

impl Default for HandlerConfig {
    fn default() -> Self {
        HandlerConfig {
            subtype: "mirror".into(),
            uio: UioPaths::default(),
            kernel: KernelPaths::default(),
            netlink: true,
            nl_replies: true,
            rescan_interval: Duration::from_secs(5),
            ring_poll: Duration::from_millis(250),
            workers_per_device: 4,
            max_inflight: 32,
            vendor: "LUNMIRR".into(),
            product: "TCMU mirror".into(),
            revision: env!("CARGO_PKG_VERSION")
                .chars()
                .take(4)
                .collect::<String>()
                .trim_end_matches('.')
                .to_string(),
        }
    }
}

/// Per-device counters.
#[derive(Debug, Default)]
pub struct DeviceStats {
    pub commands: AtomicU64,
    pub failed_entries: AtomicU64,
    pub tmrs: AtomicU64,
    pub ring_resets: AtomicU64,
}

/// A snapshot of one served device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    pub uio_index: u32,
    pub name: String,
    pub dev_config: String,
    /// `None` when serving normally, else why the device answers NOT READY.
    pub fault: Option<String>,
    pub running: bool,
    pub commands: u64,
}

/// Counts of one [`service_ring`] pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ServicePass {
    pub commands: u64,
    pub failed_entries: u64,
    pub tmrs: u64,
}

fn tmr_to_tmf(tmr_type: u8) -> Option<TaskMgmt> {
    match tmr_type {
        TCMU_TMR_LUN_RESET | TCMU_TMR_LUN_RESET_PRO => Some(TaskMgmt::LogicalUnitReset { lun: 0 }),
        TCMU_TMR_ABORT_TASK_SET | TCMU_TMR_CLEAR_TASK_SET => {
            Some(TaskMgmt::ClearTaskSet { lun: 0 })
        }
        TCMU_TMR_TARGET_WARM_RESET => Some(TaskMgmt::TargetWarmReset),
        TCMU_TMR_TARGET_COLD_RESET => Some(TaskMgmt::TargetColdReset),
        _ => None,
    }
}

/// A command ready for the SCSI core: data-out gathered, lengths known.
pub struct Prepared {
    pub cmd: Command,
    pub data_out: Vec<u8>,
    pub expected_in_len: u32,
}

/// Which way a non-bidirectional command's buffers go. When the SCSI
/// core's dispatch table says the CDB carries data-out, they are data-out
/// (transport and core agree); otherwise the opcode decides
/// (`xfer::direction`): a data-out opcode whose CDB asks for no data (e.g.
/// COMPARE AND WRITE of 0 blocks) still hands the core what the initiator
/// sent, so the core can refuse the mismatch.
pub fn buffer_direction(cdb: &[u8], block_size: u32) -> Direction {
    match crate::scsi::cdb::data_out_len(cdb, block_size) {
        Some(n) if n > 0 => Direction::Out,
        _ => direction(cdb),
    }
}

/// Gather a command's data-out and work out how much data-in it may get.
pub fn prepare<M: SharedMem>(
    ring: &Ring<M>,
    cmd: Command,
    block_size: u32,
) -> Result<Prepared, RingError> {
    let dir = if cmd.is_bidi() {
        Direction::Out
    } else {
        buffer_direction(&cmd.cdb, block_size)
    };
    let data_out = match dir {
        Direction::Out => ring.gather(&cmd)?,
        Direction::In => Vec::new(),
    };
    let expected_in_len = match (cmd.is_bidi(), dir) {
        (false, Direction::Out) => 0,
        _ => u32::try_from(cmd.data_in_capacity()).unwrap_or(u32::MAX),
    };
    Ok(Prepared {
        cmd,
        data_out,
        expected_in_len,
    })
}

/// Run a prepared command against the SCSI core.
pub fn execute(target: &dyn ScsiTarget, nexus: &Arc<Nexus>, p: &Prepared) -> ScsiResponse {
    target.execute(&ScsiRequest {
        cdb: &p.cmd.cdb,
        lun: 0,
        nexus,
        data_out: &p.data_out,
        expected_in_len: p.expected_in_len,
        task_attr: TaskAttr::Simple,
        // The ring needs the bytes in its data area.
        data_in_by_ref: false,
    })
}

/// Hand a command's result back to the ring.
pub fn finish<M: SharedMem>(
    ring: &mut Ring<M>,
    cmd: Command,
    resp: &ScsiResponse,
) -> Result<(), RingError> {
    ring.complete(
        cmd,
        super::ring::Response {
            status: resp.status as u8,
            sense: &resp.sense,
            data_in: &resp.data_in,
        },
    )
}

/// Log / forward a non-command event; returns whether it was a TMR.
fn side_event(ev: Event, target: &dyn ScsiTarget, nexus: &Arc<Nexus>, pass: &mut ServicePass) {
    match ev {
        Event::Cmd(_) => {}
        Event::Tmr(t) => {
            pass.tmrs += 1;
            tracing::info!(tmr = t.tmr_type, cmds = ?t.cmd_ids, "tcmu: task management notification");
            if let Some(tmf) = tmr_to_tmf(t.tmr_type) {
                target.task_management(tmf, nexus);
            }
        }
        Event::Failed { cmd_id, fault } => {
            pass.failed_entries += 1;
            tracing::warn!(cmd_id, "tcmu: malformed ring entry failed: {fault}");
        }
        Event::BadTmr { off, len } => {
            tracing::warn!(off, len, "tcmu: malformed TMR entry skipped");
        }
        Event::UnknownOp { off, op } => {
            tracing::warn!(off, op, "tcmu: ring entry with unknown opcode flagged");
        }
    }
}

/// Take every available event off `ring` and run it against `target`, in
/// order, completing each command before taking the next.
pub fn service_ring<M: SharedMem>(
    ring: &mut Ring<M>,
    target: &dyn ScsiTarget,
    nexus: &Arc<Nexus>,
) -> Result<ServicePass, RingError> {
    let block_size = target.block_size();
    let mut pass = ServicePass::default();
    while let Some(ev) = ring.next_event()? {
        match ev {
            Event::Cmd(cmd) => {
                pass.commands += 1;
                let p = prepare(ring, cmd, block_size)?;
                let resp = execute(target, nexus, &p);
                finish(ring, p.cmd, &resp)?;
            }
            other => side_event(other, target, nexus, &mut pass),
        }
    }
    Ok(pass)
}

/// Runs one device's commands on a pool of threads: the ring thread takes
/// commands off the ring and completes them, workers execute them. The
/// ring stays single-threaded (all shared-memory access is on it); workers
/// see only owned buffers.
pub struct Pool {
    jobs: Option<crossbeam::channel::Sender<Prepared>>,
    done: crossbeam::channel::Receiver<(Command, ScsiResponse)>,
    workers: Vec<JoinHandle<()>>,
    inflight: usize,
    max_inflight: usize,
    wake_rx: std::os::fd::OwnedFd,
}

impl Pool {
    /// `workers` threads running `target`; each finished command is also
    /// signalled by a byte on a pipe whose read end [`Pool::wake_fd`] gives,
    /// so the ring thread can poll it next to the uio fd.
    pub fn new(
        workers: usize,
        max_inflight: usize,
        target: Arc<dyn ScsiTarget>,
        nexus: Arc<Nexus>,
        name: &str,
    ) -> io::Result<Pool> {
        let (wake_rx, wake_tx) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
        let wake_tx = Arc::new(wake_tx);
        let (jobs_tx, jobs_rx) = crossbeam::channel::unbounded::<Prepared>();
        let (done_tx, done_rx) = crossbeam::channel::unbounded();
        let mut handles = Vec::new();
        for i in 0..workers.max(1) {
            let (rx, tx, target, nexus, wake) = (
                jobs_rx.clone(),
                done_tx.clone(),
                target.clone(),
                nexus.clone(),
                wake_tx.clone(),
            );
            handles.push(
                std::thread::Builder::new()
                    .name(format!("tcmu-{name}-w{i}"))
                    .spawn(move || {
                        for p in rx {
                            let resp = execute(&*target, &nexus, &p);
                            if tx.send((p.cmd, resp)).is_err() {
                                break;
                            }
                            // A full pipe already guarantees a wakeup.
                            let _ = nix::unistd::write(&*wake, &[1u8]);
                        }
                    })?,
            );
        }
        Ok(Pool {
            jobs: Some(jobs_tx),
            done: done_rx,
            workers: handles,
            inflight: 0,
            max_inflight: max_inflight.max(1),
            wake_rx,
        })
    }

    pub fn wake_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.wake_rx.as_fd()
    }

    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// Complete finished commands and dispatch new ones (unless `drain`),
    /// up to `max_inflight` in execution.
    pub fn pump<M: SharedMem>(
        &mut self,
        ring: &mut Ring<M>,
        target: &dyn ScsiTarget,
        nexus: &Arc<Nexus>,
        drain: bool,
    ) -> Result<ServicePass, RingError> {
        let block_size = target.block_size();
        let mut pass = ServicePass::default();
        let mut sink = [0u8; 64];
        while matches!(nix::unistd::read(&self.wake_rx, &mut sink), Ok(n) if n > 0) {}
        while let Ok((cmd, resp)) = self.done.try_recv() {
            self.inflight -= 1;
            match finish(ring, cmd, &resp) {
                // Taken before a ring reset: the kernel already answered it.
                Err(RingError::NotOutstanding(id)) => {
                    tracing::debug!(
                        cmd_id = id,
                        "tcmu: result of a command from before a ring reset dropped"
                    );
                }
                other => other?,
            }
        }
        while !drain && self.inflight < self.max_inflight {
            let Some(ev) = ring.next_event()? else { break };
            match ev {
                Event::Cmd(cmd) => {
                    pass.commands += 1;
                    let p = prepare(ring, cmd, block_size)?;
                    match &self.jobs {
                        Some(tx) => {
                            if let Err(e) = tx.send(p) {
                                // Workers gone: answer here rather than drop it.
                                let p = e.into_inner();
                                let resp = execute(target, nexus, &p);
                                finish(ring, p.cmd, &resp)?;
                                continue;
                            }
                            self.inflight += 1;
                        }
                        None => {
                            let resp = execute(target, nexus, &p);
                            finish(ring, p.cmd, &resp)?;
                        }
                    }
                }
                other => side_event(other, target, nexus, &mut pass),
            }
        }
        Ok(pass)
    }

    /// Commands handed to workers before a ring reset: their results are
    /// discarded (the ring refuses them) but they still have to be waited for.
    pub fn forget_inflight_results<M: SharedMem>(&mut self, ring: &mut Ring<M>) {
        while self.inflight > 0 {
            match self.done.recv_timeout(Duration::from_secs(60)) {
                Ok((cmd, resp)) => {
                    self.inflight -= 1;
                    let _ = finish(ring, cmd, &resp);
                }
                Err(_) => break,
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Complete every command on the ring with BUSY without running it (the
/// userspace fallback for `action/reset_ring` at takeover).
pub fn drain_busy<M: SharedMem>(ring: &mut Ring<M>) -> Result<u64, RingError> {
    let mut n = 0;
    while let Some(ev) = ring.next_event()? {
        if let Event::Cmd(cmd) = ev {
            n += 1;
            ring.complete(
                cmd,
                super::ring::Response {
                    status: ScsiStatus::Busy as u8,
                    sense: &[],
                    data_in: &[],
                },
            )?;
        }
    }
    Ok(n)
}

/// Stands in for a device that could not be opened: INQUIRY works (so the
/// initiator sees the LU and its state), everything else is NOT READY,
/// LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED.
#[derive(Debug)]
pub struct NotReady {
    pub vendor: String,
    pub product: String,
}

impl ScsiTarget for NotReady {
    fn execute(&self, req: &ScsiRequest<'_>) -> ScsiResponse {
        if req.cdb.first() == Some(&0x12) && req.cdb.get(1).is_some_and(|b| b & 1 == 0) {
            let mut d = vec![0u8; 36];
            d[2] = 0x06;
            d[3] = 0x02;
            d[4] = 31;
            for (dst, src) in d[8..16]
                .iter_mut()
                .zip(format!("{:<8}", self.vendor).bytes())
            {
                *dst = src;
            }
            for (dst, src) in d[16..32]
                .iter_mut()
                .zip(format!("{:<16}", self.product).bytes())
            {
                *dst = src;
            }
            d[32..36].copy_from_slice(b"0000");
            return ScsiResponse::good(d);
        }
        ScsiResponse::with_sense(
            ScsiStatus::CheckCondition,
            fixed_sense(0x02, 0x04, 0x03).to_vec(),
        )
    }
    fn task_management(&self, _tmf: TaskMgmt, _nexus: &Nexus) {}
}

/// NAA type 6 designator: the Linux-IO OUI (00-14-05, as LIO's own
/// devices) and 100 bits of SHA-256 of the unit serial, so it is stable as
/// long as the serial is.
pub fn naa_from_serial(serial: &str) -> [u8; 16] {
    let h = Sha256::digest(serial.as_bytes());
    let mut n = [0u8; 16];
    n[0] = 0x60;
    n[1] = 0x01;
    n[2] = 0x40;
    n[3] = 0x50 | (h[0] & 0x0f);
    n[4..16].copy_from_slice(&h[1..13]);
    n
}

/// The nexus the SCSI core sees for a TCMU device (LIO hides the real
/// initiator from handlers).
pub fn device_nexus(hba: u32, name: &str) -> Arc<Nexus> {
    Arc::new(Nexus {
        initiator_port: format!("tcmu:user_{hba}/{name}"),
        target_port: format!("tcmu:user_{hba}/{name},t,0x0001"),
        relative_port_id: 1,
        port_group_id: 0,
    })
}

/// Build the LUN map (LUN 0) for an opened volume.
pub fn lun_map_for(cfg: &HandlerConfig, info: &DeviceInfo, dev: SharedDev) -> LunMap {
    let serial = info.serial.clone().unwrap_or_else(|| info.name.clone());
    let lu = LogicalUnit::new(
        LuConfig {
            volume: info.name.clone(),
            block_size: info.block_size,
            read_only: info.config.read_only,
            naa: naa_from_serial(&serial),
            serial,
            vendor: cfg.vendor.clone(),
            product: cfg.product.clone(),
            revision: cfg.revision.clone(),
        },
        dev,
    );
    let mut map = LunMap::new();
    map.insert(0, Arc::new(lu));
    map
}

/// Why a device is not served normally.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceFault {
    #[error("bad cfgstring: {0}")]
    Config(#[from] CfgError),
    #[error("cfgstring size={want} but the device is {have} bytes")]
    SizeMismatch { want: u64, have: u64 },
    #[error("cannot read the device's configfs: {0}")]
    Configfs(String),
    #[error("volume: {0}")]
    Volume(String),
    #[error("volume is {have} bytes, device needs {want}")]
    TooSmall { have: u64, want: u64 },
}

/// Read the device's configuration from configfs and its cfgstring.
pub fn device_info(cfg: &HandlerConfig, dev: &UioDevice) -> Result<DeviceInfo, DeviceFault> {
    let config = CfgString::parse(&dev.name.cfgstring)?;
    let dir = DeviceDir::new(&cfg.kernel, dev.name.hba, &dev.name.dev);
    let size = dir
        .size()
        .map_err(|e| DeviceFault::Configfs(e.to_string()))?;
    if let Some(want) = config.size {
        if want != size {
            return Err(DeviceFault::SizeMismatch { want, have: size });
        }
    }
    Ok(DeviceInfo {
        uio_index: dev.index,
        hba: dev.name.hba,
        name: dev.name.dev.clone(),
        block_size: dir.block_size().unwrap_or(512),
        write_cache: dir.write_cache().unwrap_or(false),
        serial: dir.unit_serial(),
        size,
        config,
    })
}

struct DeviceSlot {
    dev: UioDevice,
    info: Option<DeviceInfo>,
    fault: Option<String>,
    stop: Arc<AtomicBool>,
    alive: Arc<AtomicBool>,
    stats: Arc<DeviceStats>,
    thread: Option<JoinHandle<()>>,
}

type Devices = Arc<Mutex<HashMap<u32, DeviceSlot>>>;

fn lock(d: &Devices) -> std::sync::MutexGuard<'_, HashMap<u32, DeviceSlot>> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

struct Manager {
    cfg: HandlerConfig,
    factory: Arc<dyn VolumeFactory>,
    devices: Devices,
    stop: Arc<AtomicBool>,
    nl: Option<(GenlRequester, EventSocket, u16)>,
}

impl Manager {
    /// Open, map and (on takeover) reset a device, then start its thread.
    fn attach(&mut self, dev: UioDevice, takeover: bool) -> Result<(), io::Error> {
        if lock(&self.devices).contains_key(&dev.index) {
            return Ok(());
        }
        let path = self.cfg.uio.dev_path(dev.index);
        let mut uio = UioFd::open(&path)?;
        let map = UioMapping::map(&uio, dev.map_size)?;
        let dir = DeviceDir::new(&self.cfg.kernel, dev.name.hba, &dev.name.dev);
        let mut kernel_reset = false;
        if takeover {
            kernel_reset = dir.block(true).is_ok() && dir.reset_ring(ResetLevel::Retry).is_ok();
            if let Err(e) = dir.block(false) {
                tracing::warn!(dev = %dev.name.dev, "tcmu: cannot unblock device: {e}");
            }
        }
        let mut ring = Ring::new(map).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if takeover && !kernel_reset {
            match drain_busy(&mut ring) {
                Ok(n) if n > 0 => {
                    tracing::info!(dev = %dev.name.dev, n, "tcmu: stale commands answered BUSY")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(dev = %dev.name.dev, "tcmu: draining stale ring: {e}"),
            }
            if ring.take_kick() {
                uio.kick()?;
            }
        }

        let (target, info, fault): (Arc<dyn ScsiTarget>, Option<DeviceInfo>, Option<String>) =
            match device_info(&self.cfg, &dev).and_then(|info| {
                let vol = self.factory.open(&info).map_err(DeviceFault::Volume)?;
                if vol.size() < info.size {
                    self.factory.close(&info);
                    return Err(DeviceFault::TooSmall {
                        have: vol.size(),
                        want: info.size,
                    });
                }
                Ok((info, vol))
            }) {
                Ok((info, vol)) => (
                    Arc::new(lun_map_for(&self.cfg, &info, vol)),
                    Some(info),
                    None,
                ),
                Err(e) => {
                    tracing::error!(dev = %dev.name.dev, "tcmu: device answers NOT READY: {e}");
                    (
                        Arc::new(NotReady {
                            vendor: self.cfg.vendor.clone(),
                            product: self.cfg.product.clone(),
                        }),
                        None,
                        Some(e.to_string()),
                    )
                }
            };
        let stop = Arc::new(AtomicBool::new(false));
        let alive = Arc::new(AtomicBool::new(true));
        let stats = Arc::new(DeviceStats::default());
        let nexus = device_nexus(dev.name.hba, &dev.name.dev);
        let pool = if self.cfg.workers_per_device > 1 && ring.out_of_order() {
            Some(Pool::new(
                self.cfg.workers_per_device,
                self.cfg.max_inflight,
                target.clone(),
                nexus.clone(),
                &dev.name.dev,
            )?)
        } else {
            None
        };
        let runner = RingRunner {
            pool,
            uio,
            ring,
            target,
            nexus,
            dir,
            stop: stop.clone(),
            alive: alive.clone(),
            stats: stats.clone(),
            poll: self.cfg.ring_poll,
            name: dev.name.dev.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("tcmu-{}", dev.name.dev))
            .spawn(move || runner.run())?;
        tracing::info!(dev = %dev.name.dev, uio = dev.index, takeover, "tcmu: serving device");
        lock(&self.devices).insert(
            dev.index,
            DeviceSlot {
                dev,
                info,
                fault,
                stop,
                alive,
                stats,
                thread: Some(thread),
            },
        );
        Ok(())
    }

    fn detach(&mut self, index: u32) {
        let slot = lock(&self.devices).remove(&index);
        if let Some(mut slot) = slot {
            slot.stop.store(true, Ordering::Release);
            if let Some(t) = slot.thread.take() {
                let _ = t.join();
            }
            if let Some(info) = &slot.info {
                self.factory.close(info);
            }
            tracing::info!(dev = %slot.dev.name.dev, uio = index, "tcmu: device closed");
        }
    }

    /// Attach every device of our subtype not yet served.
    fn scan(&mut self, takeover: bool) {
        let found = match self.cfg.uio.scan() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("tcmu: scanning uio devices: {e}");
                return;
            }
        };
        for dev in found {
            if dev.name.subtype != self.cfg.subtype {
                continue;
            }
            if let Err(e) = self.attach(dev.clone(), takeover) {
                if e.raw_os_error() != Some(libc::EBUSY) {
                    tracing::warn!(uio = dev.index, "tcmu: cannot attach {}: {e}", dev.name.dev);
                }
            }
        }
    }

    /// Forget device threads that died (device removed without an event).
    fn reap(&mut self) {
        let dead: Vec<u32> = lock(&self.devices)
            .iter()
            .filter(|(_, s)| !s.alive.load(Ordering::Acquire))
            .map(|(i, _)| *i)
            .collect();
        for i in dead {
            self.detach(i);
        }
    }

    fn reply(&mut self, ev: &TcmuEvent, status: i32) {
        if !self.cfg.nl_replies {
            return;
        }
        let Some(device_id) = ev.dev().device_id else {
            return;
        };
        if let Some((req, _, family)) = &mut self.nl {
            if let Err(e) = req.done(*family, ev.done_cmd(), status, device_id) {
                // The kernel only waits for replies on devices with
                // nl_reply_supported; elsewhere it rejects them.
                tracing::debug!("tcmu: netlink reply not taken: {e}");
            }
        }
    }

    /// Status for a RECONFIG_DEVICE: 0 to accept, -errno to refuse.
    fn reconfig_status(&mut self, minor: u32, change: &Reconfig) -> i32 {
        let info = lock(&self.devices).get(&minor).and_then(|s| s.info.clone());
        let unchanged = |info: &DeviceInfo| match change {
            // targetctl restore rewrites every attribute with the
            // value it already has: that is not a change.
            Reconfig::Config(c) => {
                CfgString::parse_dev_config(c, &self.cfg.subtype)
                    .ok()
                    .as_ref()
                    == Some(&info.config)
            }
            Reconfig::Size(n) => *n == info.size,
            Reconfig::WriteCache(w) => *w == info.write_cache,
            Reconfig::Other => false,
        };
        match info {
            Some(info) if unchanged(&info) => 0,
            Some(info) => match self.factory.reconfigure(&info, change) {
                Ok(()) => {
                    let subtype = self.cfg.subtype.clone();
                    if let Some(slot) = lock(&self.devices).get_mut(&minor) {
                        if let Some(i) = slot.info.as_mut() {
                            match change {
                                Reconfig::Size(n) => i.size = *n,
                                Reconfig::WriteCache(w) => i.write_cache = *w,
                                Reconfig::Config(c) => {
                                    if let Ok(parsed) = CfgString::parse_dev_config(c, &subtype) {
                                        i.config = parsed;
                                    }
                                }
                                Reconfig::Other => {}
                            }
                        }
                    }
                    0
                }
                Err(why) => {
                    tracing::warn!(dev = %info.name, "tcmu: reconfiguration {change:?} refused: {why}");
                    -libc::EOPNOTSUPP
                }
            },
            None => -libc::ENODEV,
        }
    }

    fn handle(&mut self, ev: TcmuEvent) {
        let d = ev.dev().clone();
        let Some(name) = super::uio::UioName::parse(&d.name) else {
            return;
        };
        if name.subtype != self.cfg.subtype {
            return;
        }
        match &ev {
            TcmuEvent::Added(_) => {
                let dev = match self.cfg.uio.device(d.minor) {
                    Ok(Some(dev)) => dev,
                    Ok(None) | Err(_) => UioDevice {
                        index: d.minor,
                        name,
                        map_size: 0,
                        version: String::new(),
                    },
                };
                let dir = DeviceDir::new(&self.cfg.kernel, dev.name.hba, &dev.name.dev);
                // tcmu-runner, when running beside us, also grabs every new
                // device for a moment (and lets go of subtypes it does not
                // serve): retry briefly on EBUSY.
                let mut attached = self.attach(dev.clone(), false);
                for _ in 0..20 {
                    match &attached {
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                            std::thread::sleep(Duration::from_millis(100));
                            attached = self.attach(dev.clone(), false);
                        }
                        _ => break,
                    }
                }
                let status = match attached {
                    Ok(()) => {
                        let fault = lock(&self.devices)
                            .get(&d.minor)
                            .and_then(|s| s.fault.clone());
                        match fault {
                            // The kernel waits for our verdict: refuse the
                            // device rather than serve NOT READY.
                            Some(_) if dir.nl_reply_supported() => {
                                self.detach(d.minor);
                                -libc::EINVAL
                            }
                            _ => 0,
                        }
                    }
                    Err(e) => {
                        tracing::error!(dev = %dev.name.dev, "tcmu: cannot attach added device: {e}");
                        -e.raw_os_error().unwrap_or(libc::EIO)
                    }
                };
                self.reply(&ev, status);
            }
            TcmuEvent::Removed(_) => {
                self.detach(d.minor);
                self.reply(&ev, 0);
            }
            TcmuEvent::Reconfig(_, change) => {
                let status = self.reconfig_status(d.minor, change);
                self.reply(&ev, status);
            }
        }
    }

    fn run(mut self) {
        let mut last_scan = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            let events = match &mut self.nl {
                Some((_, sock, family)) => match sock.recv(*family, Duration::from_millis(200)) {
                    Ok(evs) => evs,
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        tracing::warn!("tcmu: netlink events lost, rescanning");
                        self.scan(true);
                        Vec::new()
                    }
                    Err(e) => {
                        tracing::error!("tcmu: netlink: {e}");
                        std::thread::sleep(Duration::from_millis(200));
                        Vec::new()
                    }
                },
                None => {
                    std::thread::sleep(Duration::from_millis(200));
                    Vec::new()
                }
            };
            for ev in events {
                self.handle(ev);
            }
            self.reap();
            if last_scan.elapsed() >= self.cfg.rescan_interval {
                self.scan(true);
                last_scan = Instant::now();
            }
        }
        let all: Vec<u32> = lock(&self.devices).keys().copied().collect();
        for i in all {
            self.detach(i);
        }
    }
}

struct RingRunner {
    uio: UioFd,
    ring: Ring<UioMapping>,
    target: Arc<dyn ScsiTarget>,
    nexus: Arc<Nexus>,
    dir: DeviceDir,
    stop: Arc<AtomicBool>,
    alive: Arc<AtomicBool>,
    stats: Arc<DeviceStats>,
    poll: Duration,
    name: String,
    pool: Option<Pool>,
}

impl RingRunner {
    fn run(mut self) {
        loop {
            let stopping = self.stop.load(Ordering::Acquire);
            let inflight = self.pool.as_ref().map_or(0, Pool::inflight);
            if stopping && inflight == 0 {
                break;
            }
            let woke = match &self.pool {
                Some(p) => self.uio.wait_with(Some(p.wake_fd()), self.poll),
                None => self.uio.wait_with(None, self.poll),
            };
            if let Err(e) = woke {
                tracing::info!(dev = %self.name, "tcmu: ring closed: {e}");
                break;
            }
            let pass = match &mut self.pool {
                Some(pool) => pool.pump(&mut self.ring, &*self.target, &self.nexus, stopping),
                None if stopping => Ok(ServicePass::default()),
                None => service_ring(&mut self.ring, &*self.target, &self.nexus),
            };
            match pass {
                Ok(p) => {
                    self.stats.commands.fetch_add(p.commands, Ordering::Relaxed);
                    self.stats
                        .failed_entries
                        .fetch_add(p.failed_entries, Ordering::Relaxed);
                    self.stats.tmrs.fetch_add(p.tmrs, Ordering::Relaxed);
                }
                Err(RingError::Broken(b)) => {
                    tracing::error!(dev = %self.name, "tcmu: command ring broken ({b}); resetting it");
                    self.stats.ring_resets.fetch_add(1, Ordering::Relaxed);
                    let reset = self
                        .dir
                        .block(true)
                        .and_then(|_| self.dir.reset_ring(ResetLevel::Fail));
                    let _ = self.dir.block(false);
                    if let Err(e) = reset {
                        tracing::error!(dev = %self.name, "tcmu: cannot reset ring: {e}; device stopped");
                        break;
                    }
                    if let Err(e) = self.ring.reset() {
                        tracing::error!(dev = %self.name, "tcmu: {e}");
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!(dev = %self.name, "tcmu: ring: {e}");
                }
            }
            if self.ring.take_kick() {
                if let Err(e) = self.uio.kick() {
                    tracing::info!(dev = %self.name, "tcmu: kick failed: {e}");
                    break;
                }
            }
        }
        // Workers finish what they hold before the ring is unmapped.
        if let Some(mut pool) = self.pool.take() {
            pool.forget_inflight_results(&mut self.ring);
            if self.ring.take_kick() {
                let _ = self.uio.kick();
            }
        }
        self.alive.store(false, Ordering::Release);
    }
}

/// The TCMU frontend.
pub struct Frontend;

/// A running frontend; [`FrontendHandle::shutdown`] stops it.
pub struct FrontendHandle {
    stop: Arc<AtomicBool>,
    devices: Devices,
    manager: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FrontendHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontendHandle")
            .field("devices", &self.devices().len())
            .finish()
    }
}

impl Frontend {
    /// Subscribe to netlink (unless disabled), take over existing devices of
    /// `cfg.subtype`, and follow device events on a manager thread.
    /// Fails if netlink is wanted but the TCM-USER family is missing
    /// (target_core_user not loaded).
    pub fn start(
        cfg: HandlerConfig,
        factory: Arc<dyn VolumeFactory>,
    ) -> io::Result<FrontendHandle> {
        let mut nl = None;
        if cfg.netlink {
            let mut req = GenlRequester::open()?;
            let fam = req.resolve(netlink::FAMILY_NAME)?;
            let group = fam
                .groups
                .iter()
                .find(|(n, _)| n == netlink::MCAST_GROUP)
                .map(|(_, g)| *g)
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "TCM-USER has no config group")
                })?;
            // Subscribe before scanning so no device falls between the two.
            let events = EventSocket::join(group)?;
            if cfg.nl_replies {
                // A previous daemon may have died with the kernel waiting on
                // its reply; fail those waits before announcing ourselves.
                let blocked = configfs::block_netlink(&cfg.kernel, true).is_ok();
                if blocked {
                    let _ = configfs::reset_netlink(&cfg.kernel);
                }
                if let Err(e) = req.set_features(fam.id, true) {
                    tracing::warn!("tcmu: SET_FEATURES refused: {e}");
                }
                if blocked {
                    let _ = configfs::block_netlink(&cfg.kernel, false);
                }
            }
            nl = Some((req, events, fam.id));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let devices: Devices = Arc::new(Mutex::new(HashMap::new()));
        let mut mgr = Manager {
            cfg,
            factory,
            devices: devices.clone(),
            stop: stop.clone(),
            nl,
        };
        mgr.scan(true);
        let manager = std::thread::Builder::new()
            .name("tcmu-manager".into())
            .spawn(move || mgr.run())?;
        Ok(FrontendHandle {
            stop,
            devices,
            manager: Some(manager),
        })
    }
}

impl FrontendHandle {
    pub fn devices(&self) -> Vec<DeviceStatus> {
        let mut v: Vec<DeviceStatus> = lock(&self.devices)
            .values()
            .map(|s| DeviceStatus {
                uio_index: s.dev.index,
                name: s.dev.name.dev.clone(),
                dev_config: s.dev.name.dev_config(),
                fault: s.fault.clone(),
                running: s.alive.load(Ordering::Acquire),
                commands: s.stats.commands.load(Ordering::Relaxed),
            })
            .collect();
        v.sort_by_key(|d| d.uio_index);
        v
    }

    /// Stop following events, finish the commands in hand, close every
    /// device (see the module doc for what happens to later commands).
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(m) = self.manager.take() {
            let _ = m.join();
        }
    }
}

impl Drop for FrontendHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests;
