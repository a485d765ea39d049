//! Daemon wiring: turns a validated [`Config`] into running frontends.
//!
//! The order matters and is the point of this module:
//! 1. [`preflight`] looks at the filesystem without changing it (backing
//!    files, sizes, parent directories). Config problems found here are
//!    reported like parse errors (exit 2) and nothing has been touched.
//! 2. The state directory is created and locked ([`StateLock`]): a second
//!    daemon on the same state dir stops here with a clear message.
//! 3. Backing files are opened (created sparse if missing), portals bound,
//!    targets built and the iSCSI server started.
//! 4. SIGTERM/SIGINT (received by a dedicated thread with `sigwait`, no
//!    async runtime) stop accepting, let in-flight commands finish, and the
//!    volumes are flushed before `serve` returns.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{SigSet, Signal};
use tracing::{error, info, warn};

use crate::block::file::{EngineKind, FileDev, FileDevOptions};
use crate::block::{BlockDev, SharedDev};
use crate::config::TcmuMode;
use crate::config::{
    self, Config, ConfigError, ConfigErrors, Engine, LunConfig, PhysicalBlockSize, SizeSpec,
};
use crate::control::ControlServer;
use crate::iscsi::negotiate::TargetLimits;
use crate::iscsi::{ChapCredentials, Server, ServerOptions, TargetDef};
use crate::mirror::MirroredVolume;
use crate::registry::Registry;
use crate::scsi::{LogicalUnit, LuConfig, LunMap};
use crate::tcmu;

/// Name of the lock file inside the state directory.
pub const LOCK_FILE: &str = "lunmirror.lock";

/// Why the daemon stopped without serving (or stopped serving).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration (or what it names on disk) is wrong; nothing was
    /// created or changed.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// Something failed while starting or running.
    #[error("{0}")]
    Runtime(String),
}

impl DaemonError {
    /// Process exit code: 2 for configuration errors, 1 for runtime failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Config(_) => 2,
            DaemonError::Runtime(_) => 1,
        }
    }

    fn runtime(context: impl std::fmt::Display, e: impl std::fmt::Display) -> Self {
        DaemonError::Runtime(format!("{context}: {e}"))
    }
}

/// A LUN whose backing file has been looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedLun {
    /// Index into `Config::targets`.
    pub target: usize,
    pub lun: LunConfig,
    /// Size in bytes for regular files; `None` for block devices (the device
    /// decides).
    pub size: Option<u64>,
    /// The backing file does not exist and will be created sparse.
    pub create: bool,
}

/// Check everything the config names on disk, without changing anything.
pub fn preflight(cfg: &Config) -> Result<Vec<ResolvedLun>, ConfigErrors> {
    let mut errs = Vec::new();
    let sd = &cfg.daemon.state_dir;
    match fs::metadata(sd) {
        Ok(md) if !md.is_dir() => errs.push(ConfigError::new(
            "daemon.state_dir",
            format!("{} exists and is not a directory", sd.display()),
        )),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = nonempty_parent(sd) {
                if !parent.is_dir() {
                    errs.push(ConfigError::new(
                        "daemon.state_dir",
                        format!(
                            "cannot create {}: parent {} is not a directory",
                            sd.display(),
                            parent.display()
                        ),
                    ));
                }
            }
        }
        Err(e) => errs.push(ConfigError::new(
            "daemon.state_dir",
            format!("cannot access {}: {e}", sd.display()),
        )),
    }

    let mut out = Vec::new();
    let mut canonical: HashMap<PathBuf, String> = HashMap::new();
    for (ti, t) in cfg.targets.iter().enumerate() {
        for l in &t.luns {
            let key = &l.key;
            let p = &l.path;
            let bs = u64::from(l.block_size);
            let mut resolved = ResolvedLun {
                target: ti,
                lun: l.clone(),
                size: None,
                create: false,
            };
            match fs::metadata(p) {
                Ok(md) if md.file_type().is_block_device() => {}
                Ok(md) if md.is_file() => {
                    let len = md.len();
                    match l.size {
                        SizeSpec::Exact(s) if s != len => errs.push(ConfigError::new(
                            format!("{key}.size"),
                            format!(
                                "{} exists with {len} bytes but the configured size is {s}; lunmirror never resizes an existing backing file",
                                p.display()
                            ),
                        )),
                        SizeSpec::FromFileOr(_) if len == 0 || len % bs != 0 => {
                            errs.push(ConfigError::new(
                                format!("{key}.path"),
                                format!(
                                    "{} has {len} bytes, not a positive multiple of the block size {bs}",
                                    p.display()
                                ),
                            ))
                        }
                        _ => {}
                    }
                    resolved.size = Some(len);
                }
                Ok(_) => errs.push(ConfigError::new(
                    format!("{key}.path"),
                    format!(
                        "{} is neither a regular file nor a block device",
                        p.display()
                    ),
                )),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if l.read_only {
                        errs.push(ConfigError::new(
                            format!("{key}.path"),
                            format!(
                                "{} does not exist (a read_only LUN's file is never created)",
                                p.display()
                            ),
                        ));
                    }
                    if !l.path_is_default {
                        match nonempty_parent(p) {
                            Some(parent) if !parent.is_dir() => errs.push(ConfigError::new(
                                format!("{key}.path"),
                                format!("directory {} does not exist", parent.display()),
                            )),
                            _ => {}
                        }
                    }
                    resolved.size = Some(match l.size {
                        SizeSpec::Exact(s) | SizeSpec::FromFileOr(s) => s,
                    });
                    resolved.create = true;
                }
                Err(e) => errs.push(ConfigError::new(
                    format!("{key}.path"),
                    format!("cannot access {}: {e}", p.display()),
                )),
            }
            if let Ok(c) = fs::canonicalize(p) {
                if let Some(prev) = canonical.insert(c.clone(), key.clone()) {
                    errs.push(ConfigError::new(
                        format!("{key}.path"),
                        format!("{} is the same file as {prev}.path", c.display()),
                    ));
                }
            }
            out.push(resolved);
        }
    }
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(ConfigErrors {
            source_name: "preflight".to_string(),
            errors: errs,
        })
    }
}

fn nonempty_parent(p: &Path) -> Option<&Path> {
    p.parent().filter(|q| !q.as_os_str().is_empty())
}

/// Exclusive lock on the state directory, held for the daemon's lifetime.
#[derive(Debug)]
pub struct StateLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl StateLock {
    /// Create the state directory if needed and lock it. Fails if another
    /// process holds the lock.
    pub fn acquire(state_dir: &Path) -> Result<StateLock, DaemonError> {
        fs::create_dir_all(state_dir).map_err(|e| {
            DaemonError::runtime(
                format_args!("cannot create state dir {}", state_dir.display()),
                e,
            )
        })?;
        let path = state_dir.join(LOCK_FILE);
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| DaemonError::runtime(format_args!("cannot open {}", path.display()), e))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut f, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = f.read_to_string(&mut pid);
                let holder = match pid.trim() {
                    "" => String::new(),
                    p => format!(" (pid {p})"),
                };
                return Err(DaemonError::Runtime(format!(
                    "state dir {} is in use by another lunmirror{holder}; stop it or use another --state-dir",
                    state_dir.display()
                )));
            }
            Err((_, e)) => {
                return Err(DaemonError::runtime(
                    format_args!("cannot lock {}", path.display()),
                    e,
                ))
            }
        };
        // Record who holds it, for the message above.
        let write_pid = |f: &mut File| -> io::Result<()> {
            f.set_len(0)?;
            f.rewind()?;
            writeln!(f, "{}", std::process::id())?;
            f.sync_data()
        };
        write_pid(&mut lock).map_err(|e| {
            DaemonError::runtime(format_args!("cannot write {}", path.display()), e)
        })?;
        Ok(StateLock { _lock: lock, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// One served volume: a LUN's backing store.
#[derive(Clone)]
pub struct Volume {
    pub name: String,
    pub path: PathBuf,
    pub dev: SharedDev,
    pub read_only: bool,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// Open (or create, sparse) one LUN's backing file with the chosen engine.
fn open_volume(r: &ResolvedLun, engine: Engine) -> Result<SharedDev, DaemonError> {
    let opts = FileDevOptions {
        engine: engine_kind(engine),
        read_only: r.lun.read_only,
        direct: false,
        create_size: if r.create { r.size } else { None },
    };
    let dev = FileDev::open(&r.lun.path, opts).map_err(|e| {
        DaemonError::runtime(
            format_args!(
                "volume {}: cannot open {}",
                r.lun.volume,
                r.lun.path.display()
            ),
            e,
        )
    })?;
    info!(volume = %r.lun.volume, engine = %dev.engine(), "I/O engine");
    Ok(Arc::new(dev))
}

/// Open every volume, creating `<state_dir>/volumes` if a LUN uses it.
pub fn open_volumes(cfg: &Config, resolved: &[ResolvedLun]) -> Result<Vec<Volume>, DaemonError> {
    if resolved.iter().any(|r| r.create && r.lun.path_is_default) {
        let dir = cfg.daemon.state_dir.join("volumes");
        fs::create_dir_all(&dir).map_err(|e| {
            DaemonError::runtime(format_args!("cannot create {}", dir.display()), e)
        })?;
    }
    let mut out = Vec::with_capacity(resolved.len());
    for r in resolved {
        let dev = open_volume(r, cfg.daemon.engine)?;
        if let Some(expected) = r.size {
            if dev.size() != expected {
                return Err(DaemonError::Runtime(format!(
                    "{}: opened with {} bytes, expected {expected}",
                    r.lun.path.display(),
                    dev.size()
                )));
            }
        }
        if dev.size() == 0 || dev.size() % u64::from(r.lun.block_size) != 0 {
            return Err(DaemonError::Runtime(format!(
                "{}: size {} is not a positive multiple of the block size {}",
                r.lun.path.display(),
                dev.size(),
                r.lun.block_size
            )));
        }
        info!(
            volume = %r.lun.volume,
            path = %r.lun.path.display(),
            size = dev.size(),
            created = r.create,
            read_only = r.lun.read_only,
            "volume opened"
        );
        out.push(Volume {
            name: r.lun.volume.clone(),
            path: r.lun.path.clone(),
            dev,
            read_only: r.lun.read_only,
        });
    }
    Ok(out)
}

/// Listening sockets, one per distinct configured portal.
#[derive(Debug)]
pub struct Listeners {
    pub sockets: Vec<TcpListener>,
    /// Configured portal → address actually bound (differs for port 0).
    pub bound: HashMap<SocketAddr, SocketAddr>,
}

/// Bind every distinct portal of every target.
pub fn bind_portals(cfg: &Config) -> Result<Listeners, DaemonError> {
    let mut sockets = Vec::new();
    let mut bound = HashMap::new();
    for t in &cfg.targets {
        for p in &t.portals {
            if bound.contains_key(p) {
                continue;
            }
            let l = TcpListener::bind(p)
                .map_err(|e| DaemonError::runtime(format_args!("cannot listen on {p}"), e))?;
            let local = l
                .local_addr()
                .map_err(|e| DaemonError::runtime(format_args!("listener {p}"), e))?;
            bound.insert(*p, local);
            sockets.push(l);
        }
    }
    Ok(Listeners { sockets, bound })
}

/// SCSI identity strings of our LUs.
const VENDOR: &str = "LUNMIRR";
const PRODUCT: &str = "lunmirror";

fn revision() -> String {
    // INQUIRY's PRODUCT REVISION LEVEL has 4 bytes: "0.1" for 0.1.x.
    let mut parts = env!("CARGO_PKG_VERSION").split('.');
    let major = parts.next().unwrap_or("0");
    let minor = parts.next().unwrap_or("0");
    let mut r = format!("{major}.{minor}");
    r.truncate(4);
    r
}

/// The unit the storage under `path` writes in: the physical sector size
/// of a block device, the preferred I/O size (file system block) of a
/// file, at most 64 KiB; 0 if unknown.
pub fn physical_block_size(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::metadata(path) else {
        return 0;
    };
    let bytes = if meta.file_type().is_block_device() {
        let dev = meta.rdev();
        let sys = PathBuf::from(format!(
            "/sys/dev/block/{}:{}",
            nix::sys::stat::major(dev),
            nix::sys::stat::minor(dev)
        ));
        // A partition has no queue/ of its own: its disk's applies.
        ["queue/physical_block_size", "../queue/physical_block_size"]
            .iter()
            .find_map(|f| fs::read_to_string(sys.join(f)).ok())
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0)
    } else {
        meta.blksize()
    };
    if bytes.is_power_of_two() && bytes <= 65536 {
        bytes as u32
    } else {
        0
    }
}

/// Build the server's target definitions from the config, the opened
/// volumes (in `preflight` order) and the bound portals.
pub fn build_targets(
    cfg: &Config,
    resolved: &[ResolvedLun],
    volumes: &[Volume],
    listeners: &Listeners,
) -> Vec<Arc<TargetDef>> {
    let mut maps: Vec<LunMap> = cfg.targets.iter().map(|_| LunMap::new()).collect();
    for (r, v) in resolved.iter().zip(volumes) {
        let lu = LuConfig {
            volume: r.lun.volume.clone(),
            block_size: r.lun.block_size,
            read_only: r.lun.read_only,
            serial: r.lun.serial.clone(),
            naa: r.lun.wwn,
            vendor: VENDOR.to_string(),
            product: PRODUCT.to_string(),
            revision: revision(),
        };
        if let Some(m) = maps.get_mut(r.target) {
            let unit = LogicalUnit::new(lu, v.dev.clone())
                .with_sanitize_rate(r.lun.sanitize_rate)
                .with_physical_block_size(match r.lun.physical_block_size {
                    PhysicalBlockSize::Logical => 0,
                    PhysicalBlockSize::Auto => physical_block_size(&v.path),
                    PhysicalBlockSize::Bytes(b) => b,
                });
            m.insert(r.lun.id, Arc::new(unit));
        }
    }
    cfg.targets
        .iter()
        .zip(maps)
        .map(|(t, luns)| {
            Arc::new(TargetDef {
                name: t.name.clone(),
                alias: t.alias.clone(),
                luns: Arc::new(luns),
                portals: t
                    .portals
                    .iter()
                    .map(|p| listeners.bound.get(p).copied().unwrap_or(*p))
                    .collect(),
                allowed_initiators: t.allowed_initiators.clone(),
                chap: t.chap.as_ref().map(|c| ChapCredentials {
                    user: c.user.clone(),
                    secret: c.secret.clone(),
                }),
                mutual_chap: t.mutual_chap.as_ref().map(|c| ChapCredentials {
                    user: c.user.clone(),
                    secret: c.secret.clone(),
                }),
            })
        })
        .collect()
}

/// Block SIGTERM, SIGINT and SIGHUP in the calling thread (and every thread
/// it starts afterwards) so that only the signal thread receives them. Call
/// first thing in `main`, before any thread exists.
pub fn block_shutdown_signals() -> nix::Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set.thread_block()?;
    Ok(set)
}

/// Something to stop when a shutdown signal arrives.
pub type StopFn = Box<dyn Fn() + Send>;

/// Start the thread that waits for shutdown signals. The first SIGTERM or
/// SIGINT runs every `stop` function (which must make the frontends return);
/// a second one exits at once with status 1. SIGHUP is logged and ignored.
pub fn spawn_signal_thread(set: SigSet, stop: Vec<StopFn>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut stopping = false;
            loop {
                match set.wait() {
                    Ok(Signal::SIGHUP) => info!("SIGHUP ignored (restart to reload the config)"),
                    Ok(sig) if !stopping => {
                        info!(signal = %sig, "shutting down: no new connections, finishing in-flight commands");
                        sd_notify("STOPPING=1\nSTATUS=stopping: finishing in-flight commands");
                        stopping = true;
                        for f in &stop {
                            f();
                        }
                    }
                    Ok(sig) => {
                        warn!(signal = %sig, "second signal: exiting without waiting");
                        std::process::exit(1);
                    }
                    Err(e) => {
                        error!("sigwait failed: {e}");
                        return;
                    }
                }
            }
        })
        .map(|_| ())
}

/// Tell systemd (Type=notify) about our state, if it asked.
pub fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::from_abstract_name(name),
        None => UnixAddr::from_pathname(Path::new(&path)),
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &a));
    if let Err(e) = sent {
        warn!("sd_notify({state}) failed: {e}");
    }
}

/// Run the daemon until a shutdown signal: preflight, lock, open, bind,
/// serve, flush. Writes one `lunmirror: listening on ADDR` line per
/// listener to `out` once the target accepts connections.
pub fn serve(cfg: Config, signals: SigSet, out: &mut dyn Write) -> Result<(), DaemonError> {
    for w in config::warnings(&cfg) {
        warn!("{w}");
    }
    let resolved = preflight(&cfg)?;
    let lock = StateLock::acquire(&cfg.daemon.state_dir)?;
    info!(state_dir = %cfg.daemon.state_dir.display(), lock = %lock.path().display(), "state dir locked");
    let mut reg_cfg = crate::registry::RegistryConfig::default();
    reg_cfg.policy.journal.inline_apply = cfg.daemon.async_inline_apply;
    let registry = Registry::open_with(&cfg.daemon.state_dir, reg_cfg)
        .map_err(|e| DaemonError::runtime("cannot open the replication registry", e))?;
    let volumes = open_volumes(&cfg, &resolved)?;
    let volumes = mirror_volumes(&registry, volumes)?;
    // Associations saved by an earlier run: replay journals, resync what was
    // in flight when it stopped.
    registry.resume();
    let listeners = bind_portals(&cfg)?;
    let targets = build_targets(&cfg, &resolved, &volumes, &listeners);
    for t in &targets {
        info!(
            target = %t.name,
            luns = cfg.targets.iter().find(|c| c.name == t.name).map_or(0, |c| c.luns.len()),
            portals = ?t.portals,
            "target configured"
        );
    }
    let control =
        ControlServer::start(&cfg.daemon.control_socket, registry.clone()).map_err(|e| {
            DaemonError::runtime(
                format_args!(
                    "cannot serve the control socket {}",
                    cfg.daemon.control_socket.display()
                ),
                e,
            )
        })?;
    info!(socket = %cfg.daemon.control_socket.display(), "control socket ready");
    let tcmu = start_tcmu(&cfg, &registry)?;
    let tcmu_running = tcmu.is_some();

    let addrs: Vec<SocketAddr> = listeners
        .sockets
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    let opts = ServerOptions {
        zero_copy_read: cfg.daemon.zero_copy_read,
        ..ServerOptions::default()
    };
    info!(
        zero_copy_read = opts.zero_copy_read,
        "large READs of file-backed LUNs are sent with sendfile when zero_copy_read is on"
    );
    let result = run_frontends(targets, listeners, opts, signals, || {
        for a in &addrs {
            info!("listening on {a}");
            writeln!(out, "lunmirror: listening on {a}")?;
        }
        out.flush()?;
        sd_notify(&format!(
            "READY=1\nSTATUS={}",
            ready_status(&addrs, tcmu_running)
        ));
        Ok(())
    });

    // The iSCSI server has finished its in-flight commands; stop the other
    // front doors, then the replication machinery (shippers stop, an Async
    // journal keeps what is not applied yet for the next start, state is
    // saved), then make acknowledged writes durable.
    if let Some(h) = tcmu {
        h.shutdown();
        info!("TCMU frontend stopped");
    }
    control.shutdown();
    registry.shutdown();
    let mut flush_failed = false;
    for v in &volumes {
        match v.dev.flush() {
            Ok(()) => info!(volume = %v.name, "volume flushed"),
            Err(e) => {
                error!(volume = %v.name, "flush failed: {e}");
                flush_failed = true;
            }
        }
    }
    result?;
    if flush_failed {
        return Err(DaemonError::Runtime("flushing volumes failed".into()));
    }
    info!("stopped cleanly");
    drop(lock);
    Ok(())
}

/// systemd's STATUS= line once serving (`systemctl status` shows it).
fn ready_status(iscsi: &[SocketAddr], tcmu: bool) -> String {
    let iscsi = match iscsi {
        [] => "no built-in iSCSI portal".to_string(),
        a => format!(
            "iSCSI on {}",
            a.iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let tcmu = if tcmu {
        "TCMU handler running"
    } else {
        "TCMU off"
    };
    format!("serving: {iscsi}; {tcmu}")
}

/// Put every volume behind the write-interception layer and register it, so
/// that AttachReplica can name it and the LU's writes reach its replicas.
fn mirror_volumes(registry: &Registry, volumes: Vec<Volume>) -> Result<Vec<Volume>, DaemonError> {
    volumes
        .into_iter()
        .map(|v| {
            let mirrored = MirroredVolume::new(&v.name, v.dev.clone());
            registry
                .add_volume(&v.name, &v.path, mirrored.clone(), true)
                .map_err(|e| DaemonError::runtime(format_args!("volume {}", v.name), e))?;
            Ok(Volume { dev: mirrored, ..v })
        })
        .collect()
}

/// Start the TCMU frontend as `[tcmu]` says. `auto` serves iSCSI only when
/// the kernel lacks target_core_user (the common case outside LIO hosts).
fn start_tcmu(
    cfg: &Config,
    registry: &Arc<Registry>,
) -> Result<Option<tcmu::FrontendHandle>, DaemonError> {
    if cfg.tcmu.mode == TcmuMode::Off {
        return Ok(None);
    }
    let handler = tcmu::HandlerConfig {
        subtype: cfg.tcmu.subtype.clone(),
        workers_per_device: cfg.tcmu.workers_per_device,
        ..tcmu::HandlerConfig::default()
    };
    let wrap_registry = Arc::downgrade(registry);
    let close_registry = Arc::downgrade(registry);
    let factory = Arc::new(tcmu::FileVolumeFactory {
        default_engine: engine_kind(cfg.daemon.engine),
        wrap: Some(Arc::new(
            move |info: &tcmu::DeviceInfo, primary: SharedDev| {
                let Some(registry) = wrap_registry.upgrade() else {
                    return Err("daemon is stopping".to_string());
                };
                open_tcmu_volume(&registry, info, primary)
            },
        )),
        on_close: Some(Arc::new(move |info: &tcmu::DeviceInfo| {
            if let Some(registry) = close_registry.upgrade() {
                // Acknowledged writes become durable when the device goes
                // (clearconfig, daemon shutdown), as for configured LUNs.
                if let Some(v) = registry.volume(&info.name) {
                    match v.flush() {
                        Ok(()) => info!(volume = %info.name, "TCMU volume flushed"),
                        Err(e) => error!(volume = %info.name, "flush failed: {e}"),
                    }
                }
                registry.remove_volume(&info.name);
            }
        })),
    });
    match tcmu::Frontend::start(handler, factory) {
        Ok(h) => {
            info!(subtype = %cfg.tcmu.subtype, "TCMU frontend started");
            Ok(Some(h))
        }
        Err(e) if cfg.tcmu.mode == TcmuMode::Auto => {
            info!("TCMU frontend not started ({e}); serving iSCSI only");
            Ok(None)
        }
        Err(e) => Err(DaemonError::runtime("cannot start the TCMU frontend", e)),
    }
}

/// The volume a TCMU device serves: its primary behind the mirror layer,
/// registered under the LIO storage object name, with the associations it
/// had before and the cfgstring's replicas.
///
/// - A name still registered because it is part of an association (the
///   device was removed, e.g. by `targetcli clearconfig`, and is now
///   restored) gets its kept volume back, if the backing file and size
///   match, so the association carries on without a copy.
/// - Associations kept dormant because the device was missing when the
///   daemon started (LIO restores after the daemon is up) are resumed.
/// - Each cfgstring `replica=` not yet associated with this volume is
///   attached; a refused one is logged and the device is served without it.
fn open_tcmu_volume(
    registry: &Registry,
    info: &tcmu::DeviceInfo,
    primary: SharedDev,
) -> Result<SharedDev, String> {
    let name = &info.name;
    let path = Path::new(&info.config.path);
    let dev: SharedDev = match registry.volume(name) {
        Some(kept) => {
            let kept_path = registry
                .enumerate_volumes()
                .into_iter()
                .find(|v| &v.name == name)
                .map(|v| PathBuf::from(v.path))
                .unwrap_or_default();
            if !same_file(&kept_path, path) {
                return Err(format!(
                    "volume {name} is still registered with backing file {} (kept for its replication associations); detach them or use another name",
                    kept_path.display()
                ));
            }
            if kept.size_bytes() < info.size {
                return Err(format!(
                    "volume {name} is kept with {} bytes, the device is {} bytes",
                    kept.size_bytes(),
                    info.size
                ));
            }
            info!(volume = %name, "TCMU device back: re-using the volume kept for its associations");
            kept
        }
        None => {
            let mirrored = MirroredVolume::new(name, primary);
            registry
                .add_volume(name, path, mirrored.clone(), true)
                .map_err(|e| e.to_string())?;
            let resumed = registry.resume_source(name);
            if resumed > 0 {
                info!(volume = %name, associations = resumed, "dormant associations resumed");
            }
            mirrored
        }
    };
    let existing: Vec<PathBuf> = registry
        .enumerate_synchronized()
        .into_iter()
        .filter(|s| &s.system_element == name)
        .map(|s| PathBuf::from(s.synced_element))
        .collect();
    let copy_type = u64::from(info.config.copy_type.cim_value());
    for replica in &info.config.replicas {
        if existing.iter().any(|e| same_file(e, Path::new(replica))) {
            info!(volume = %name, replica = %replica, "cfgstring replica already attached");
            continue;
        }
        let r = registry.attach_replica(name, replica, copy_type);
        match &r.error {
            None => {
                info!(volume = %name, replica = %replica, sync = ?r.synchronization, job = ?r.job, "cfgstring replica attached")
            }
            Some(e) => {
                error!(volume = %name, replica = %replica, return_value = ?r.return_value, "cfgstring replica NOT attached: {e}")
            }
        }
    }
    Ok(dev as SharedDev)
}

/// Whether two paths name the same file (same device and inode), or are
/// equal when either cannot be looked at.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => a == b,
    }
}

fn engine_kind(e: Engine) -> EngineKind {
    match e {
        Engine::Auto => EngineKind::Auto,
        Engine::IoUring => EngineKind::IoUring,
        Engine::Sync => EngineKind::Sync,
    }
}

/// Start the iSCSI server on the listeners, call `ready` once it accepts
/// connections, and block until a shutdown signal has stopped it (after its
/// in-flight commands completed).
fn run_frontends(
    targets: Vec<Arc<TargetDef>>,
    listeners: Listeners,
    opts: ServerOptions,
    signals: SigSet,
    ready: impl FnOnce() -> io::Result<()>,
) -> Result<(), DaemonError> {
    let server = Server::with_options(targets, listeners.sockets, TargetLimits::default(), opts);
    let handle = server.handle();
    let stop: Vec<StopFn> = vec![Box::new(move || handle.shutdown())];
    spawn_signal_thread(signals, stop)
        .map_err(|e| DaemonError::runtime("cannot start the signal thread", e))?;
    ready().map_err(|e| DaemonError::runtime("cannot report the listening addresses", e))?;
    server
        .run()
        .map_err(|e| DaemonError::runtime("iSCSI server failed", e))?;
    info!("iSCSI server stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    #[test]
    fn physical_block_size_of_a_file_is_its_io_block() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.img");
        fs::write(&p, [0u8; 4096]).unwrap();
        let want = fs::metadata(&p).unwrap().blksize();
        let got = physical_block_size(&p);
        if want.is_power_of_two() && want <= 65536 {
            assert_eq!(u64::from(got), want);
        } else {
            assert_eq!(got, 0);
        }
        assert_eq!(physical_block_size(&d.path().join("missing")), 0);
    }

    fn cfg_in(dir: &Path, text: &str) -> Result<Config, ConfigErrors> {
        let ov = Overrides {
            state_dir: Some(dir.join("state")),
            ..Overrides::default()
        };
        Config::parse(text, "t", &ov)
    }

    fn lun(extra: &str) -> String {
        format!(
            "[[target]]\nname = \"iqn.2026-11.io.lunmirror:t\"\n[[target.lun]]\nid = 0\nvolume = \"v0\"\n{extra}\n"
        )
    }

    #[test]
    fn preflight_new_default_file() {
        let d = tempfile::tempdir().unwrap();
        let cfg = cfg_in(d.path(), &lun("")).unwrap();
        let r = preflight(&cfg).unwrap();
        assert_eq!(r.len(), 1);
        assert!(r[0].create);
        assert_eq!(r[0].size, Some(1 << 30));
        // Nothing was created.
        assert!(!d.path().join("state").exists());
    }

    #[test]
    fn preflight_existing_file_sizes() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.img");
        File::create(&f).unwrap().set_len(8192).unwrap();
        let path = format!("path = {:?}", f.display().to_string());
        let cfg = cfg_in(d.path(), &lun(&path)).unwrap();
        let r = preflight(&cfg).unwrap();
        assert_eq!((r[0].size, r[0].create), (Some(8192), false));

        let cfg = cfg_in(d.path(), &lun(&format!("{path}\nsize = 8192"))).unwrap();
        preflight(&cfg).unwrap();

        let cfg = cfg_in(d.path(), &lun(&format!("{path}\nsize = \"1M\""))).unwrap();
        let e = preflight(&cfg).unwrap_err();
        assert!(e.mentions("target[0].lun[0].size"), "{e}");
        assert!(e.to_string().contains("never resizes"), "{e}");

        let cfg = cfg_in(d.path(), &lun(&format!("{path}\nblock_size = 4096"))).unwrap();
        preflight(&cfg).unwrap();
        File::create(&f).unwrap().set_len(1000).unwrap();
        let e = preflight(&cfg).unwrap_err();
        assert!(e.mentions("target[0].lun[0].path"), "{e}");
        File::create(&f).unwrap().set_len(0).unwrap();
        assert!(preflight(&cfg)
            .unwrap_err()
            .mentions("target[0].lun[0].path"));
    }

    #[test]
    fn preflight_rejects_bad_paths() {
        let d = tempfile::tempdir().unwrap();
        // Read-only LUN whose file is missing.
        let cfg = cfg_in(d.path(), &lun("read_only = true")).unwrap();
        let e = preflight(&cfg).unwrap_err();
        assert!(e.to_string().contains("never created"), "{e}");
        // Missing parent directory of an explicit path.
        let p = d.path().join("nope/x.img");
        let cfg = cfg_in(
            d.path(),
            &lun(&format!("path = {:?}", p.display().to_string())),
        )
        .unwrap();
        let e = preflight(&cfg).unwrap_err();
        assert!(e.mentions("target[0].lun[0].path"), "{e}");
        // A directory as backing file.
        let cfg = cfg_in(
            d.path(),
            &lun(&format!("path = {:?}", d.path().display().to_string())),
        )
        .unwrap();
        assert!(preflight(&cfg)
            .unwrap_err()
            .mentions("target[0].lun[0].path"));
        // State dir that is a file.
        File::create(d.path().join("state")).unwrap();
        let cfg = cfg_in(d.path(), &lun("")).unwrap();
        assert!(preflight(&cfg).unwrap_err().mentions("daemon.state_dir"));
    }

    #[test]
    fn preflight_same_file_through_symlink() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.img");
        File::create(&f).unwrap().set_len(4096).unwrap();
        let link = d.path().join("b.img");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        let text = format!(
            "{}path = {:?}\n[[target.lun]]\nid = 1\nvolume = \"v1\"\npath = {:?}\n",
            lun(""),
            f.display().to_string(),
            link.display().to_string()
        );
        let cfg = cfg_in(d.path(), &text).unwrap();
        let e = preflight(&cfg).unwrap_err();
        assert!(e.mentions("target[0].lun[1].path"), "{e}");
    }

    #[test]
    fn state_lock_is_exclusive() {
        let d = tempfile::tempdir().unwrap();
        let sd = d.path().join("s");
        let a = StateLock::acquire(&sd).unwrap();
        let pid = fs::read_to_string(sd.join(LOCK_FILE)).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        // flock locks belong to the open file description, so a second
        // open in the same process conflicts just like another process.
        match StateLock::acquire(&sd) {
            Err(DaemonError::Runtime(m)) => {
                assert!(m.contains("in use by another lunmirror"), "{m}");
                assert!(m.contains(&format!("pid {}", std::process::id())), "{m}");
            }
            other => panic!("second lock: {other:?}"),
        }
        drop(a);
        StateLock::acquire(&sd).unwrap();
    }

    #[test]
    fn bind_distinct_portals_once() {
        let text = "[[target]]\nname = \"iqn.2026-11.io.lunmirror:a\"\nportals = [\"127.0.0.1:0\"]\n[[target.lun]]\nid = 0\nvolume = \"a\"\n[[target]]\nname = \"iqn.2026-11.io.lunmirror:b\"\nportals = [\"127.0.0.1:0\"]\n[[target.lun]]\nid = 0\nvolume = \"b\"\n";
        let d = tempfile::tempdir().unwrap();
        let cfg = cfg_in(d.path(), text).unwrap();
        let l = bind_portals(&cfg).unwrap();
        assert_eq!(l.sockets.len(), 1);
        let got = l.bound[&"127.0.0.1:0".parse().unwrap()];
        assert_ne!(got.port(), 0);
        assert_eq!(l.sockets[0].local_addr().unwrap(), got);
    }

    #[test]
    fn targets_built_from_config() {
        use crate::block::mem::MemDev;
        let d = tempfile::tempdir().unwrap();
        let text = r#"
[[target]]
name = "iqn.2026-11.io.lunmirror:t"
portals = ["127.0.0.1:0"]
allowed_initiators = ["iqn.2026-11.io.x:i"]
chap = { user = "u", secret = "0123456789abcdef" }
[[target.lun]]
id = 0
volume = "v0"
block_size = 4096
serial = "S1"
"#;
        let cfg = cfg_in(d.path(), text).unwrap();
        let resolved = preflight(&cfg).unwrap();
        let volumes: Vec<Volume> = resolved
            .iter()
            .map(|r| Volume {
                name: r.lun.volume.clone(),
                path: r.lun.path.clone(),
                dev: Arc::new(MemDev::new(1 << 20)),
                read_only: r.lun.read_only,
            })
            .collect();
        let l = bind_portals(&cfg).unwrap();
        let t = build_targets(&cfg, &resolved, &volumes, &l);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].name, "iqn.2026-11.io.lunmirror:t");
        assert_eq!(t[0].portals, vec![l.sockets[0].local_addr().unwrap()]);
        assert_eq!(
            t[0].allowed_initiators,
            vec!["iqn.2026-11.io.x:i".to_string()]
        );
        assert_eq!(t[0].chap.as_ref().unwrap().secret, b"0123456789abcdef");
        let lu = t[0].luns.get(0).unwrap();
        assert_eq!(lu.config.block_size, 4096);
        assert_eq!(lu.config.serial, "S1");
        assert_eq!(
            lu.config.naa,
            config::default_wwn("iqn.2026-11.io.lunmirror:t", "v0")
        );
        assert_eq!(lu.config.revision, "0.1");
        assert!(lu.config.vendor.len() <= 8 && lu.config.product.len() <= 16);
    }

    fn tcmu_info(name: &str, cfg: &str, size: u64) -> tcmu::DeviceInfo {
        tcmu::DeviceInfo {
            uio_index: 0,
            hba: 1,
            name: name.into(),
            config: tcmu::cfgstring::CfgString::parse(cfg).unwrap(),
            size,
            block_size: 512,
            write_cache: false,
            serial: None,
        }
    }

    fn file_dev(p: &Path, size: u64) -> SharedDev {
        let opts = FileDevOptions {
            engine: EngineKind::Sync,
            read_only: false,
            direct: false,
            create_size: Some(size),
        };
        Arc::new(FileDev::open(p, opts).unwrap())
    }

    fn wait_synced(reg: &Registry) -> Vec<crate::registry::SyncInfo> {
        for _ in 0..500 {
            let s = reg.enumerate_synchronized();
            if s.iter().all(|s| s.sync_state == 6) {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("not synchronized: {:?}", reg.enumerate_synchronized());
    }

    #[test]
    fn tcmu_volume_keeps_its_replica_across_remove_restore_and_restart() {
        use crate::block::WriteFlags;
        const SIZE: u64 = 1 << 20;
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk0.img");
        let rep = d.path().join("r.img");
        File::create(&rep).unwrap().set_len(SIZE).unwrap();
        let cfg = format!("{};replica={};copytype=sync", img.display(), rep.display());
        let info = tcmu_info("disk0", &cfg, SIZE);
        let state = d.path().join("state");
        {
            let reg = Registry::open(&state).unwrap();
            reg.resume();
            let dev = open_tcmu_volume(&reg, &info, file_dev(&img, SIZE)).unwrap();
            assert_eq!(wait_synced(&reg).len(), 1);
            dev.write_at(b"first", 0, WriteFlags::default()).unwrap();
            // clearconfig: the device goes, the volume stays for its association.
            assert!(!reg.remove_volume("disk0"));
            // restore: same name, same file: the kept volume, no second replica.
            let again = open_tcmu_volume(&reg, &info, file_dev(&img, SIZE)).unwrap();
            let kept: SharedDev = reg.volume("disk0").unwrap();
            assert!(Arc::ptr_eq(&again, &kept));
            assert_eq!(reg.enumerate_synchronized().len(), 1);
            again
                .write_at(b"second", 4096, WriteFlags::default())
                .unwrap();
            // Another backing file under the kept name is refused.
            let other = d.path().join("other.img");
            let bad = tcmu_info("disk0", &other.display().to_string(), SIZE);
            let Err(e) = open_tcmu_volume(&reg, &bad, file_dev(&other, SIZE)) else {
                panic!("another file under a kept name was accepted");
            };
            assert!(e.contains("still registered"), "{e}");
            again.flush().unwrap();
            reg.shutdown();
        }
        assert_eq!(fs::read(&img).unwrap(), fs::read(&rep).unwrap());
        // Daemon restart: the device is not there at resume, LIO restores it
        // later; the association comes back instead of a new one.
        let reg = Registry::open(&state).unwrap();
        reg.resume();
        assert_eq!(reg.enumerate_synchronized()[0].sync_state, 12);
        let dev = open_tcmu_volume(&reg, &info, file_dev(&img, SIZE)).unwrap();
        let s = wait_synced(&reg);
        assert_eq!(
            (s.len(), s[0].synchronization.as_str()),
            (1, "lunmirror:sync:1")
        );
        dev.write_at(b"third", 8192, WriteFlags::default()).unwrap();
        dev.flush().unwrap();
        reg.shutdown();
        assert_eq!(fs::read(&img).unwrap(), fs::read(&rep).unwrap());
    }
}
