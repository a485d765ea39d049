//! Daemon configuration: the TOML file format, the built-in default (one
//! target, one 1 GiB LUN) and command-line overrides.
//!
//! Loading is pure: it reads the file and returns either a fully validated
//! [`Config`] or every problem found, each naming its key path
//! (`target[0].lun[1].block_size: must be 512 or 4096`). Nothing on disk is
//! created or changed here, so a bad config never leaves anything behind.
//! Checks that need to look at the filesystem (does a backing file exist, is
//! it the right size) live in the daemon's preflight step, which also only
//! reads.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Name of the target served when no config file is given.
pub const DEFAULT_TARGET: &str = "iqn.2026-11.io.lunmirror:default";
/// Volume name of LUN 0 in the default config.
pub const DEFAULT_VOLUME: &str = "lun0";
/// State directory when neither the config nor `--state-dir` names one.
pub const DEFAULT_STATE_DIR: &str = "lunmirror-state";
/// Portal of the default target (and of config targets without `portals`).
pub const DEFAULT_PORTAL: &str = "127.0.0.1:3260";
/// Size of a LUN whose backing file does not exist yet and whose size is not
/// configured.
pub const DEFAULT_LUN_SIZE: u64 = 1 << 30;
/// SANITIZE OVERWRITE throughput limit (bytes per second) of a LUN without
/// `sanitize_rate`: about what a disk sustains, so wiping one volume does
/// not starve the others on the same storage.
pub const DEFAULT_SANITIZE_RATE: u64 = 128 << 20;
/// RFC 7143 §12.1.3: CHAP secrets SHOULD be at least 96 bits.
pub const RECOMMENDED_CHAP_SECRET_LEN: usize = 12;
/// Largest LUN id we accept (flat space addressing, SAM-5).
pub const MAX_LUN_ID: u64 = 16383;
/// RFC 7143 §4.2.7.1: iSCSI names are at most 223 bytes.
pub const MAX_ISCSI_NAME_LEN: usize = 223;

/// One problem in the configuration, tied to the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Key path such as `target[0].lun[1].block_size`; empty when the
    /// problem is about the file as a whole.
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Every problem found in one configuration (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    /// Where the config came from (a file path, or `built-in default`).
    pub source_name: String,
    pub errors: Vec<ConfigError>,
}

impl ConfigErrors {
    fn single(source_name: &str, err: ConfigError) -> Self {
        ConfigErrors {
            source_name: source_name.to_string(),
            errors: vec![err],
        }
    }

    /// True if some error is about `key` exactly.
    pub fn mentions(&self, key: &str) -> bool {
        self.errors.iter().any(|e| e.key == key)
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration ({})", self.source_name)?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// Which I/O engine file backstores use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// io_uring when the kernel offers it, else plain pread/pwrite.
    #[default]
    Auto,
    IoUring,
    Sync,
}

impl FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Engine::Auto),
            "io-uring" | "io_uring" => Ok(Engine::IoUring),
            "sync" => Ok(Engine::Sync),
            _ => Err(format!(
                "unknown engine {s:?} (expected auto, io-uring or sync)"
            )),
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Auto => "auto",
            Engine::IoUring => "io-uring",
            Engine::Sync => "sync",
        })
    }
}

/// Command-line settings that take precedence over the file (or shape the
/// default config).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--state-dir`: replaces `daemon.state_dir`.
    pub state_dir: Option<PathBuf>,
    /// `--listen` (repeatable): replaces the portals of every target.
    pub listen: Vec<SocketAddr>,
    /// `--size`: size of every LUN that has no `size` key.
    pub size: Option<u64>,
    /// `--engine`: replaces `daemon.engine`.
    pub engine: Option<Engine>,
    /// `--control-socket`: replaces `daemon.control_socket`.
    pub control_socket: Option<PathBuf>,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub targets: Vec<TargetConfig>,
    pub tcmu: TcmuConfig,
}

/// Whether the TCMU frontend (LIO `user:<subtype>` backstores) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcmuMode {
    /// Start it when the kernel offers target_core_user; otherwise log and
    /// serve iSCSI only.
    #[default]
    Auto,
    /// Start it or fail the daemon.
    On,
    /// Never start it.
    Off,
}

/// The `[tcmu]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcmuConfig {
    pub mode: TcmuMode,
    /// The handler subtype targetcli shows as `user:<subtype>`.
    pub subtype: String,
    /// Threads executing one device's commands.
    pub workers_per_device: usize,
}

impl Default for TcmuConfig {
    fn default() -> Self {
        TcmuConfig {
            mode: TcmuMode::Auto,
            subtype: "mirror".into(),
            workers_per_device: 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    pub state_dir: PathBuf,
    /// Unix socket of the control protocol; default `<state_dir>/control.sock`.
    pub control_socket: PathBuf,
    /// A `tracing` filter directive used when `RUST_LOG` is unset.
    pub log_level: Option<String>,
    pub engine: Engine,
    /// Large plain READs of file-backed LUNs are sent from the page cache
    /// with `sendfile(2)` (no copy through a buffer). Default on.
    pub zero_copy_read: bool,
    /// Async associations: writers apply their own small records to the
    /// replica while the shipper is caught up (`mirror::journal`, "Inline
    /// apply"). Default off: a hung replica then holds the host writes
    /// being applied inline.
    pub async_inline_apply: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    pub name: String,
    pub alias: Option<String>,
    /// At least one; order as configured, no duplicates. Port 0 means "any
    /// free port" (tests); the daemon reports the bound one.
    pub portals: Vec<SocketAddr>,
    /// Initiator names allowed to log in; empty = everyone.
    pub allowed_initiators: Vec<String>,
    pub chap: Option<Chap>,
    pub mutual_chap: Option<Chap>,
    /// At least one, ordered by id.
    pub luns: Vec<LunConfig>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Chap {
    pub user: String,
    pub secret: Vec<u8>,
}

impl fmt::Debug for Chap {
    // Secrets stay out of logs and panic messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chap")
            .field("user", &self.user)
            .field("secret", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunConfig {
    pub id: u64,
    pub volume: String,
    pub path: PathBuf,
    /// Whether `path` was derived from the state dir (so the daemon may
    /// create `<state_dir>/volumes/`).
    pub path_is_default: bool,
    pub size: SizeSpec,
    pub block_size: u32,
    pub read_only: bool,
    pub serial: String,
    /// NAA type 6 designator (VPD 0x83).
    pub wwn: [u8; 16],
    /// SANITIZE OVERWRITE throughput limit, bytes per second (0: none).
    pub sanitize_rate: u64,
    /// Physical block size reported in READ CAPACITY(16).
    pub physical_block_size: PhysicalBlockSize,
    /// Key path of this LUN (`target[0].lun[1]`), for preflight messages.
    pub key: String,
}

/// The physical block size a LUN reports (logical blocks per physical
/// block in READ CAPACITY(16)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PhysicalBlockSize {
    /// Not set: one logical block per physical block.
    #[default]
    Logical,
    /// `"auto"`: the backing storage's (file system block or physical
    /// sector size), found when the volume is opened.
    Auto,
    /// A power of two from the block size to 64 KiB.
    Bytes(u32),
}

/// Where a LUN's size comes from; the daemon resolves it against the backing
/// file in its preflight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSpec {
    /// Set by the `size` key (or `--size`): an existing file must have
    /// exactly this size, a missing one is created with it.
    Exact(u64),
    /// Not set: an existing file is used at its size, a missing one is
    /// created with [`DEFAULT_LUN_SIZE`].
    FromFileOr(u64),
}

// ---------------------------------------------------------------------------
// Raw (serde) form. Only shapes and types are checked here; everything else
// in `validate`, which knows the key paths.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    target: Vec<RawTarget>,
    #[serde(default)]
    tcmu: RawTcmu,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTcmu {
    enable: Option<String>,
    subtype: Option<String>,
    workers_per_device: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    state_dir: Option<PathBuf>,
    control_socket: Option<PathBuf>,
    log_level: Option<String>,
    engine: Option<String>,
    zero_copy_read: Option<bool>,
    async_inline_apply: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: String,
    alias: Option<String>,
    portals: Option<Vec<String>>,
    #[serde(default)]
    allowed_initiators: Vec<String>,
    chap: Option<RawChap>,
    mutual_chap: Option<RawChap>,
    #[serde(default)]
    lun: Vec<RawLun>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChap {
    user: String,
    secret: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLun {
    id: u64,
    volume: String,
    path: Option<PathBuf>,
    size: Option<toml::Value>,
    block_size: Option<u32>,
    read_only: Option<bool>,
    serial: Option<String>,
    wwn: Option<String>,
    sanitize_rate: Option<toml::Value>,
    physical_block_size: Option<toml::Value>,
}

// ---------------------------------------------------------------------------
// Entry points.

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &Path, ov: &Overrides) -> Result<Config, ConfigErrors> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors::single(
                &name,
                ConfigError::new("", format!("cannot read file: {e}")),
            )
        })?;
        Self::parse(&text, &name, ov)
    }

    /// Validate config text. `source_name` only labels error messages.
    pub fn parse(text: &str, source_name: &str, ov: &Overrides) -> Result<Config, ConfigErrors> {
        let raw: RawFile = toml::from_str(text)
            .map_err(|e| ConfigErrors::single(source_name, serde_error(text, &e)))?;
        validate(raw, ov).map_err(|errors| ConfigErrors {
            source_name: source_name.to_string(),
            errors,
        })
    }

    /// The configuration used without `--config`: target
    /// [`DEFAULT_TARGET`] with LUN 0 = volume `lun0`, portal
    /// [`DEFAULT_PORTAL`] unless `--listen` says otherwise.
    pub fn default_with(ov: &Overrides) -> Result<Config, ConfigErrors> {
        let raw = RawFile {
            daemon: RawDaemon::default(),
            tcmu: RawTcmu::default(),
            target: vec![RawTarget {
                name: DEFAULT_TARGET.to_string(),
                alias: None,
                portals: None,
                allowed_initiators: Vec::new(),
                chap: None,
                mutual_chap: None,
                lun: vec![RawLun {
                    id: 0,
                    volume: DEFAULT_VOLUME.to_string(),
                    path: None,
                    size: None,
                    block_size: None,
                    read_only: None,
                    serial: None,
                    wwn: None,
                    sanitize_rate: None,
                    physical_block_size: None,
                }],
            }],
        };
        validate(raw, ov).map_err(|errors| ConfigErrors {
            source_name: "built-in default".to_string(),
            errors,
        })
    }

    /// Every LUN with the target it belongs to.
    pub fn luns(&self) -> impl Iterator<Item = (&TargetConfig, &LunConfig)> {
        self.targets
            .iter()
            .flat_map(|t| t.luns.iter().map(move |l| (t, l)))
    }
}

/// Turn a serde/TOML error into one [`ConfigError`] whose key is the path of
/// the innermost key the error's span points into.
fn serde_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let mut message = e.message().trim().to_string();
    let mut key = String::new();
    if let Some(span) = e.span() {
        let (line, col) = line_col(text, span.start);
        message = format!("{message} (line {line}, column {col})");
        if let Ok(doc) = toml::de::DeTable::parse(text) {
            key = path_at(doc.get_ref(), span.start, span.end);
        }
    }
    ConfigError::new(key, message)
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Key path of the deepest key or value whose span covers `start..end`.
fn path_at(table: &toml::de::DeTable<'_>, start: usize, end: usize) -> String {
    fn covers(span: &std::ops::Range<usize>, start: usize, end: usize) -> bool {
        span.start <= start && end <= span.end.max(span.start + 1)
    }
    fn walk_table(
        t: &toml::de::DeTable<'_>,
        prefix: &str,
        start: usize,
        end: usize,
    ) -> Option<String> {
        for (k, v) in t.iter() {
            let path = if prefix.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{prefix}.{}", k.get_ref())
            };
            if covers(&k.span(), start, end) {
                return Some(path);
            }
            if let Some(p) = walk_value(v.get_ref(), &path, start, end) {
                return Some(p);
            }
            if covers(&v.span(), start, end) {
                return Some(path);
            }
        }
        None
    }
    fn walk_value(
        v: &toml::de::DeValue<'_>,
        prefix: &str,
        start: usize,
        end: usize,
    ) -> Option<String> {
        match v {
            toml::de::DeValue::Table(t) => walk_table(t, prefix, start, end),
            toml::de::DeValue::Array(a) => {
                for (i, item) in a.iter().enumerate() {
                    let path = format!("{prefix}[{i}]");
                    if let Some(p) = walk_value(item.get_ref(), &path, start, end) {
                        return Some(p);
                    }
                    if covers(&item.span(), start, end) {
                        return Some(path);
                    }
                }
                None
            }
            _ => None,
        }
    }
    walk_table(table, "", start, end).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Validation.

fn validate(raw: RawFile, ov: &Overrides) -> Result<Config, Vec<ConfigError>> {
    let mut errs = Vec::new();

    let state_dir = ov
        .state_dir
        .clone()
        .or(raw.daemon.state_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    if state_dir.as_os_str().is_empty() {
        errs.push(ConfigError::new("daemon.state_dir", "must not be empty"));
    }
    let control_socket = ov
        .control_socket
        .clone()
        .or(raw.daemon.control_socket)
        .unwrap_or_else(|| state_dir.join("control.sock"));
    if control_socket.as_os_str().is_empty() {
        errs.push(ConfigError::new(
            "daemon.control_socket",
            "must not be empty",
        ));
    } else if control_socket.as_os_str().len() > 107 {
        // sun_path is 108 bytes including the terminating NUL.
        errs.push(ConfigError::new(
            "daemon.control_socket",
            "path too long for a Unix socket (at most 107 bytes)",
        ));
    }
    if let Some(level) = &raw.daemon.log_level {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(level) {
            errs.push(ConfigError::new(
                "daemon.log_level",
                format!("invalid filter {level:?}: {e}"),
            ));
        }
    }
    let mut engine = Engine::Auto;
    if let Some(e) = &raw.daemon.engine {
        match e.parse() {
            Ok(v) => engine = v,
            Err(m) => errs.push(ConfigError::new("daemon.engine", m)),
        }
    }
    if let Some(e) = ov.engine {
        engine = e;
    }

    // A TCMU-only daemon (LIO exports the LUNs, e.g. the shipped
    // /etc/lunmirror/lunmirror.toml) needs no built-in target.
    let tcmu_on = matches!(raw.tcmu.enable.as_deref(), Some("on" | "true"));
    if raw.target.is_empty() && !tcmu_on {
        errs.push(ConfigError::new(
            "target",
            "at least one [[target]] is required (or [tcmu] enable = \"on\" for a TCMU-only daemon)",
        ));
    }

    let mut target_names: HashMap<String, usize> = HashMap::new();
    let mut volumes: HashMap<String, String> = HashMap::new();
    let mut paths: HashMap<PathBuf, String> = HashMap::new();
    let mut wwns: HashMap<[u8; 16], String> = HashMap::new();
    let mut targets = Vec::new();

    for (ti, t) in raw.target.into_iter().enumerate() {
        let tk = format!("target[{ti}]");

        if let Err(m) = validate_iscsi_name(&t.name) {
            errs.push(ConfigError::new(format!("{tk}.name"), m));
        }
        // iSCSI names compare case-insensitively (RFC 3722 folds case).
        if let Some(prev) = target_names.insert(t.name.to_ascii_lowercase(), ti) {
            errs.push(ConfigError::new(
                format!("{tk}.name"),
                format!("duplicate target name {:?} (also target[{prev}])", t.name),
            ));
        }
        if let Some(a) = &t.alias {
            if a.is_empty() || a.len() > 255 || a.chars().any(|c| c.is_control()) {
                errs.push(ConfigError::new(
                    format!("{tk}.alias"),
                    "must be 1 to 255 bytes without control characters",
                ));
            }
        }

        // The file's portals are checked even when --listen replaces them.
        let portals = {
            let specs = t
                .portals
                .unwrap_or_else(|| vec![DEFAULT_PORTAL.to_string()]);
            if specs.is_empty() {
                errs.push(ConfigError::new(
                    format!("{tk}.portals"),
                    "at least one portal is required",
                ));
            }
            let mut out: Vec<SocketAddr> = Vec::new();
            for (pi, p) in specs.iter().enumerate() {
                match p.parse::<SocketAddr>() {
                    Ok(a) if out.contains(&a) => errs.push(ConfigError::new(
                        format!("{tk}.portals[{pi}]"),
                        format!("duplicate portal {a}"),
                    )),
                    Ok(a) => out.push(a),
                    Err(_) => errs.push(ConfigError::new(
                        format!("{tk}.portals[{pi}]"),
                        format!(
                            "{p:?} is not ADDR:PORT (e.g. \"127.0.0.1:3260\" or \"[::1]:3260\")"
                        ),
                    )),
                }
            }
            if ov.listen.is_empty() {
                out
            } else {
                ov.listen.clone()
            }
        };

        let mut initiators: Vec<String> = Vec::new();
        for (ii, name) in t.allowed_initiators.iter().enumerate() {
            let k = format!("{tk}.allowed_initiators[{ii}]");
            if let Err(m) = validate_iscsi_name(name) {
                errs.push(ConfigError::new(k, m));
            } else if initiators.iter().any(|n| n.eq_ignore_ascii_case(name)) {
                errs.push(ConfigError::new(k, format!("duplicate initiator {name:?}")));
            } else {
                initiators.push(name.to_ascii_lowercase());
            }
        }

        let chap = t
            .chap
            .map(|c| check_chap(&format!("{tk}.chap"), c, &mut errs));
        let mutual_chap = t
            .mutual_chap
            .map(|c| check_chap(&format!("{tk}.mutual_chap"), c, &mut errs));
        if let Some(m) = &mutual_chap {
            match &chap {
                None => errs.push(ConfigError::new(
                    format!("{tk}.mutual_chap"),
                    "requires chap (the initiator authenticates first)",
                )),
                Some(c) if !m.secret.is_empty() && c.secret == m.secret => {
                    // RFC 7143 §12.1.3: a secret used for one direction MUST
                    // NOT be configured for the other.
                    errs.push(ConfigError::new(
                        format!("{tk}.mutual_chap.secret"),
                        "must differ from chap.secret (RFC 7143 §12.1.3)",
                    ))
                }
                Some(_) => {}
            }
        }

        if t.lun.is_empty() {
            errs.push(ConfigError::new(
                format!("{tk}.lun"),
                "at least one [[target.lun]] is required",
            ));
        }
        let mut ids: HashMap<u64, usize> = HashMap::new();
        let mut luns = BTreeMap::new();
        for (li, l) in t.lun.into_iter().enumerate() {
            let lk = format!("{tk}.lun[{li}]");
            if l.id > MAX_LUN_ID {
                errs.push(ConfigError::new(
                    format!("{lk}.id"),
                    format!("must be at most {MAX_LUN_ID}"),
                ));
            }
            if let Some(prev) = ids.insert(l.id, li) {
                errs.push(ConfigError::new(
                    format!("{lk}.id"),
                    format!("duplicate LUN id {} (also {tk}.lun[{prev}])", l.id),
                ));
            }
            if let Err(m) = validate_volume_name(&l.volume) {
                errs.push(ConfigError::new(format!("{lk}.volume"), m));
            } else if let Some(prev) = volumes.insert(l.volume.clone(), lk.clone()) {
                errs.push(ConfigError::new(
                    format!("{lk}.volume"),
                    format!("duplicate volume name {:?} (also {prev})", l.volume),
                ));
            }
            let block_size = l.block_size.unwrap_or(512);
            if block_size != 512 && block_size != 4096 {
                errs.push(ConfigError::new(
                    format!("{lk}.block_size"),
                    "must be 512 or 4096",
                ));
            }
            let size = match &l.size {
                Some(v) => match size_from_value(v) {
                    Ok(s) => Some(s),
                    Err(m) => {
                        errs.push(ConfigError::new(format!("{lk}.size"), m));
                        None
                    }
                },
                None => ov.size,
            };
            if let Some(s) = size {
                if s == 0 {
                    errs.push(ConfigError::new(format!("{lk}.size"), "must not be zero"));
                } else if s % u64::from(block_size) != 0 {
                    errs.push(ConfigError::new(
                        format!("{lk}.size"),
                        format!("{s} is not a multiple of the block size {block_size}"),
                    ));
                }
            }
            let size = match size {
                Some(s) => SizeSpec::Exact(s),
                None => SizeSpec::FromFileOr(DEFAULT_LUN_SIZE),
            };

            let (path, path_is_default) = match l.path {
                Some(p) if p.as_os_str().is_empty() => {
                    errs.push(ConfigError::new(format!("{lk}.path"), "must not be empty"));
                    (p, false)
                }
                Some(p) => (p, false),
                None => (
                    state_dir.join("volumes").join(format!("{}.img", l.volume)),
                    true,
                ),
            };
            if let Some(prev) = paths.insert(path.clone(), lk.clone()) {
                errs.push(ConfigError::new(
                    format!("{lk}.path"),
                    format!("{} is already the backing file of {prev}", path.display()),
                ));
            }

            let serial = l.serial.unwrap_or_else(|| l.volume.clone());
            if let Err(m) = validate_serial(&serial) {
                errs.push(ConfigError::new(format!("{lk}.serial"), m));
            }
            let wwn = match &l.wwn {
                Some(w) => match parse_wwn(w) {
                    Ok(v) => v,
                    Err(m) => {
                        errs.push(ConfigError::new(format!("{lk}.wwn"), m));
                        [0; 16]
                    }
                },
                None => default_wwn(&t.name, &l.volume),
            };
            if l.wwn.is_some() || !errs.iter().any(|e| e.key == format!("{lk}.wwn")) {
                if let Some(prev) = wwns.insert(wwn, lk.clone()) {
                    errs.push(ConfigError::new(
                        format!("{lk}.wwn"),
                        format!("duplicate wwn {} (also {prev})", format_wwn(&wwn)),
                    ));
                }
            }

            let sanitize_rate = match &l.sanitize_rate {
                Some(v) => size_from_value(v).unwrap_or_else(|m| {
                    errs.push(ConfigError::new(format!("{lk}.sanitize_rate"), m));
                    0
                }),
                None => DEFAULT_SANITIZE_RATE,
            };

            let physical_block_size = match &l.physical_block_size {
                None => PhysicalBlockSize::Logical,
                Some(toml::Value::String(s)) if s == "auto" => PhysicalBlockSize::Auto,
                Some(v) => match size_from_value(v) {
                    Ok(b) if b.is_power_of_two() && b >= u64::from(block_size) && b <= 65536 => {
                        PhysicalBlockSize::Bytes(b as u32)
                    }
                    Ok(b) => {
                        errs.push(ConfigError::new(
                            format!("{lk}.physical_block_size"),
                            format!(
                                "{b} is not a power of two from the block size {block_size} to 65536"
                            ),
                        ));
                        PhysicalBlockSize::Logical
                    }
                    Err(m) => {
                        errs.push(ConfigError::new(
                            format!("{lk}.physical_block_size"),
                            format!("{m} (or \"auto\")"),
                        ));
                        PhysicalBlockSize::Logical
                    }
                },
            };

            luns.insert(
                l.id,
                LunConfig {
                    id: l.id,
                    volume: l.volume,
                    path,
                    path_is_default,
                    size,
                    block_size,
                    read_only: l.read_only.unwrap_or(false),
                    serial,
                    wwn,
                    sanitize_rate,
                    physical_block_size,
                    key: lk,
                },
            );
        }

        targets.push(TargetConfig {
            name: t.name.to_ascii_lowercase(),
            alias: t.alias,
            portals,
            allowed_initiators: initiators,
            chap,
            mutual_chap,
            luns: luns.into_values().collect(),
        });
    }

    let tcmu = check_tcmu(raw.tcmu, &mut errs);
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Config {
        daemon: DaemonConfig {
            state_dir,
            control_socket,
            log_level: raw.daemon.log_level,
            engine,
            zero_copy_read: raw.daemon.zero_copy_read.unwrap_or(true),
            async_inline_apply: raw.daemon.async_inline_apply.unwrap_or(false),
        },
        targets,
        tcmu,
    })
}

fn check_tcmu(raw: RawTcmu, errs: &mut Vec<ConfigError>) -> TcmuConfig {
    let mut out = TcmuConfig::default();
    match raw.enable.as_deref() {
        None | Some("auto") => {}
        Some("on") | Some("true") => out.mode = TcmuMode::On,
        Some("off") | Some("false") => out.mode = TcmuMode::Off,
        Some(other) => errs.push(ConfigError::new(
            "tcmu.enable",
            format!("{other:?}: must be \"auto\", \"on\" or \"off\""),
        )),
    }
    if let Some(sub) = raw.subtype {
        if sub.is_empty()
            || sub.len() > 64
            || !sub
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            errs.push(ConfigError::new(
                "tcmu.subtype",
                "must be 1-64 characters of [A-Za-z0-9_-]",
            ));
        } else {
            out.subtype = sub;
        }
    }
    if let Some(n) = raw.workers_per_device {
        if !(1..=64).contains(&n) {
            errs.push(ConfigError::new(
                "tcmu.workers_per_device",
                "must be between 1 and 64",
            ));
        } else {
            out.workers_per_device = n as usize;
        }
    }
    out
}

fn check_chap(key: &str, c: RawChap, errs: &mut Vec<ConfigError>) -> Chap {
    if c.user.is_empty() {
        errs.push(ConfigError::new(format!("{key}.user"), "must not be empty"));
    } else if c.user.len() > 255 || c.user.chars().any(|ch| ch.is_control()) {
        errs.push(ConfigError::new(
            format!("{key}.user"),
            "must be at most 255 bytes without control characters",
        ));
    }
    if c.secret.is_empty() {
        errs.push(ConfigError::new(
            format!("{key}.secret"),
            "must be at least 1 byte (RFC 7143 recommends at least 12)",
        ));
    } else if c.secret.len() > 255 {
        errs.push(ConfigError::new(
            format!("{key}.secret"),
            "must be at most 255 bytes",
        ));
    }
    Chap {
        user: c.user,
        secret: c.secret.into_bytes(),
    }
}

/// Warnings for a valid config (things RFCs recommend against).
pub fn warnings(cfg: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for (ti, t) in cfg.targets.iter().enumerate() {
        for (what, c) in [("chap", &t.chap), ("mutual_chap", &t.mutual_chap)] {
            if let Some(c) = c {
                if c.secret.len() < RECOMMENDED_CHAP_SECRET_LEN {
                    out.push(format!(
                        "target[{ti}].{what}.secret: only {} bytes; RFC 7143 recommends at least {RECOMMENDED_CHAP_SECRET_LEN}",
                        c.secret.len()
                    ));
                }
            }
        }
        if t.chap.is_none() && t.allowed_initiators.is_empty() {
            let public = t.portals.iter().any(|p| !p.ip().is_loopback());
            if public {
                out.push(format!(
                    "target[{ti}] ({}): no CHAP and no allowed_initiators on a non-loopback portal; anyone who can reach it can read and write its LUNs",
                    t.name
                ));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Value checks, public so other modules (control socket, TCMU cfgstring) can
// apply the same rules.

/// Check an iSCSI name: `iqn.YYYY-MM.reversed.domain[:anything]`,
/// `eui.` + 16 hex digits, or `naa.` + 16 or 32 hex digits (RFC 7143
/// §4.2.7.1–3).
pub fn validate_iscsi_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_ISCSI_NAME_LEN {
        return Err(format!("longer than {MAX_ISCSI_NAME_LEN} bytes"));
    }
    let lower = name.to_ascii_lowercase();
    if let Some(rest) = lower.strip_prefix("iqn.") {
        let bad = || {
            format!(
                "{name:?} is not an iSCSI qualified name (iqn.YYYY-MM.reversed.domain[:unique])"
            )
        };
        let date = rest.get(..7).ok_or_else(bad)?;
        let db = date.as_bytes();
        let digits = |r: std::ops::Range<usize>| db[r].iter().all(u8::is_ascii_digit);
        if db.len() != 7 || !digits(0..4) || db[4] != b'-' || !digits(5..7) {
            return Err(bad());
        }
        let month: u32 = date[5..7].parse().map_err(|_| bad())?;
        if !(1..=12).contains(&month) {
            return Err(format!("{name:?}: month {month:02} is not 01..12"));
        }
        let after = &rest[7..];
        let authority_and_rest = after.strip_prefix('.').ok_or_else(bad)?;
        let (authority, unique) = match authority_and_rest.split_once(':') {
            Some((a, u)) => (a, Some(u)),
            None => (authority_and_rest, None),
        };
        if authority.is_empty()
            || authority.split('.').any(|label| {
                label.is_empty()
                    || !label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
        {
            return Err(format!(
                "{name:?}: naming authority {authority:?} must be a reversed domain name"
            ));
        }
        if let Some(u) = unique {
            if let Some(c) = u
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':')))
            {
                return Err(format!(
                    "{name:?}: character {c:?} not allowed (use a-z, 0-9, '-', '.', ':')"
                ));
            }
        }
        Ok(())
    } else if let Some(hex) = lower.strip_prefix("eui.") {
        if hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(())
        } else {
            Err(format!("{name:?}: eui. must be followed by 16 hex digits"))
        }
    } else if let Some(hex) = lower.strip_prefix("naa.") {
        if (hex.len() == 16 || hex.len() == 32) && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(())
        } else {
            Err(format!(
                "{name:?}: naa. must be followed by 16 or 32 hex digits"
            ))
        }
    } else {
        Err(format!(
            "{name:?} is not an iSCSI name (must start with iqn., eui. or naa.)"
        ))
    }
}

/// Volume names become file names and control-protocol identifiers.
pub fn validate_volume_name(v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > 64 {
        return Err("must be 1 to 64 characters".into());
    }
    if v.starts_with('.') || v.starts_with('-') {
        return Err(format!("{v:?} must not start with '.' or '-'"));
    }
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{v:?}: character {c:?} not allowed (use A-Z, a-z, 0-9, '.', '_', '-')"
        ));
    }
    Ok(())
}

/// Unit serial numbers (VPD 0x80) are printable ASCII.
pub fn validate_serial(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 64 {
        return Err("must be 1 to 64 characters".into());
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("{s:?} must be printable ASCII without spaces"));
    }
    Ok(())
}

/// Parse a size: a number of bytes, optionally with a binary suffix
/// (`K`, `M`, `G`, `T`, `P`, optionally followed by `iB` or `B`; all powers
/// of 1024). `"1G"`, `"512MiB"`, `"4096"`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!(
            "{s:?} is not a size (e.g. 1073741824, \"1G\", \"512MiB\")"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: number too large"))?;
    let shift = match suffix.trim_start().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        _ => {
            return Err(format!(
                "{s:?}: unknown suffix {suffix:?} (use K, M, G, T or P; powers of 1024)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?}: too large"))
}

fn size_from_value(v: &toml::Value) -> Result<u64, String> {
    match v {
        toml::Value::Integer(i) if *i >= 0 => Ok(*i as u64),
        toml::Value::Integer(i) => Err(format!("{i} is negative")),
        toml::Value::String(s) => parse_size(s),
        other => Err(format!(
            "expected a number of bytes or a string like \"1G\", found {}",
            other.type_str()
        )),
    }
}

/// Parse a WWN: 32 hex digits of an NAA type 6 (IEEE Registered Extended)
/// designator, optionally prefixed by `naa.` or `0x`, with optional `:` or
/// `-` separators.
pub fn parse_wwn(s: &str) -> Result<[u8; 16], String> {
    let lower = s.trim().to_ascii_lowercase();
    let body = lower
        .strip_prefix("naa.")
        .or_else(|| lower.strip_prefix("0x"))
        .unwrap_or(&lower);
    let hex: String = body.chars().filter(|c| *c != ':' && *c != '-').collect();
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{s:?} must be 32 hex digits (an NAA type 6 designator, e.g. naa.6001405…)"
        ));
    }
    if !hex.starts_with('6') {
        return Err(format!(
            "{s:?} must be an NAA type 6 designator (first hex digit 6)"
        ));
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("{s:?} is not hex"))?;
    }
    Ok(out)
}

/// `naa.` + 32 lowercase hex digits.
pub fn format_wwn(w: &[u8; 16]) -> String {
    let mut s = String::from("naa.");
    for b in w {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Stable NAA type 6 designator for a volume of a target: SHA-256 of the
/// target name (case-folded) and the volume name, with the NAA nibble set.
/// The same names give the same WWN on every restart, and different
/// (target, volume) pairs differ.
pub fn default_wwn(target: &str, volume: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"lunmirror-wwn-v1\0");
    h.update(target.to_ascii_lowercase().as_bytes());
    h.update(b"\0");
    h.update(volume.as_bytes());
    let digest = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out[0] = 0x60 | (out[0] & 0x0f);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(text, "test.toml", &Overrides::default())
    }

    /// Assert that `text` is rejected with an error on `key` whose message
    /// contains `needle`.
    #[track_caller]
    fn rejects(text: &str, key: &str, needle: &str) {
        match parse(text) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => assert!(
                e.errors
                    .iter()
                    .any(|x| x.key == key && x.message.contains(needle)),
                "expected `{key}: ...{needle}...`, got:\n{e}"
            ),
        }
    }

    const MIN: &str = r#"
[[target]]
name = "iqn.2026-11.io.lunmirror:t1"
[[target.lun]]
id = 0
volume = "v0"
"#;

    #[test]
    fn tcmu_section_defaults_and_validation() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.tcmu, TcmuConfig::default());
        assert_eq!(c.tcmu.mode, TcmuMode::Auto);
        let c = parse(&format!(
            "[tcmu]\nenable = \"off\"\nsubtype = \"mirror2\"\nworkers_per_device = 2\n{MIN}"
        ))
        .unwrap();
        assert_eq!(c.tcmu.mode, TcmuMode::Off);
        assert_eq!(c.tcmu.subtype, "mirror2");
        assert_eq!(c.tcmu.workers_per_device, 2);
        rejects(
            &format!("[tcmu]\nenable = \"maybe\"\n{MIN}"),
            "tcmu.enable",
            "must be",
        );
        rejects(
            &format!("[tcmu]\nsubtype = \"a/b\"\n{MIN}"),
            "tcmu.subtype",
            "[A-Za-z0-9_-]",
        );
        rejects(
            &format!("[tcmu]\nworkers_per_device = 0\n{MIN}"),
            "tcmu.workers_per_device",
            "between 1 and 64",
        );
        assert!(parse(&format!("[tcmu]\nbogus = 1\n{MIN}")).is_err());
    }

    #[test]
    fn default_config() {
        let c = Config::default_with(&Overrides::default()).unwrap();
        assert_eq!(c.daemon.state_dir, PathBuf::from("lunmirror-state"));
        assert_eq!(
            c.daemon.control_socket,
            PathBuf::from("lunmirror-state/control.sock")
        );
        assert_eq!(c.targets.len(), 1);
        let t = &c.targets[0];
        assert_eq!(t.name, DEFAULT_TARGET);
        assert_eq!(t.portals, vec!["127.0.0.1:3260".parse().unwrap()]);
        assert!(t.chap.is_none() && t.allowed_initiators.is_empty());
        let l = &t.luns[0];
        assert_eq!((l.id, l.volume.as_str()), (0, "lun0"));
        assert_eq!(l.path, PathBuf::from("lunmirror-state/volumes/lun0.img"));
        assert!(l.path_is_default);
        assert_eq!(l.size, SizeSpec::FromFileOr(1 << 30));
        assert_eq!(l.block_size, 512);
        assert!(!l.read_only);
        assert_eq!(l.serial, "lun0");
        assert_eq!(l.wwn, default_wwn(DEFAULT_TARGET, "lun0"));
    }

    #[test]
    fn overrides_apply() {
        let ov = Overrides {
            state_dir: Some("/srv/x".into()),
            listen: vec![
                "127.0.0.1:0".parse().unwrap(),
                "[::1]:3261".parse().unwrap(),
            ],
            size: Some(64 << 20),
            engine: Some(Engine::Sync),
            control_socket: None,
        };
        let c = Config::default_with(&ov).unwrap();
        assert_eq!(c.daemon.state_dir, PathBuf::from("/srv/x"));
        assert_eq!(
            c.daemon.control_socket,
            PathBuf::from("/srv/x/control.sock")
        );
        assert_eq!(c.daemon.engine, Engine::Sync);
        assert_eq!(c.targets[0].portals, ov.listen);
        assert_eq!(c.targets[0].luns[0].size, SizeSpec::Exact(64 << 20));
        assert_eq!(
            c.targets[0].luns[0].path,
            PathBuf::from("/srv/x/volumes/lun0.img")
        );

        // --state-dir wins over the file; --size only fills LUNs without size.
        let text = r#"
[daemon]
state_dir = "/var/lib/a"
engine = "io-uring"
[[target]]
name = "iqn.2026-11.io.lunmirror:t1"
[[target.lun]]
id = 0
volume = "v0"
size = "2M"
[[target.lun]]
id = 1
volume = "v1"
"#;
        let c = Config::parse(text, "x", &ov).unwrap();
        assert_eq!(c.daemon.state_dir, PathBuf::from("/srv/x"));
        assert_eq!(c.daemon.engine, Engine::Sync);
        assert_eq!(c.targets[0].luns[0].size, SizeSpec::Exact(2 << 20));
        assert_eq!(c.targets[0].luns[1].size, SizeSpec::Exact(64 << 20));
        let c = Config::parse(text, "x", &Overrides::default()).unwrap();
        assert_eq!(c.daemon.engine, Engine::IoUring);
        assert_eq!(c.daemon.state_dir, PathBuf::from("/var/lib/a"));
        assert_eq!(c.targets[0].luns[1].size, SizeSpec::FromFileOr(1 << 30));
    }

    #[test]
    fn full_config_parses() {
        let text = r#"
[daemon]
state_dir = "/var/lib/lunmirror"
control_socket = "/run/lunmirror/control.sock"
log_level = "info,lunmirror::iscsi=debug"

[[target]]
name = "iqn.2026-11.io.lunmirror:db"
alias = "database disks"
portals = ["127.0.0.1:3260", "[::1]:3260"]
allowed_initiators = ["iqn.1993-08.org.debian:01:abcdef", "IQN.2026-11.io.Example:Host"]
chap = { user = "alice", secret = "twelve-bytes!" }
mutual_chap = { user = "target", secret = "another-secret" }

[[target.lun]]
id = 1
volume = "data"
path = "/srv/data.img"
size = "4G"
block_size = 4096
serial = "DATA0001"
wwn = "naa.6001405a1b2c3d4e5f60718293a4b5c6"

[[target.lun]]
id = 0
volume = "ro"
read_only = true
size = 1048576

[[target]]
name = "eui.0123456789ABCDEF"
[[target.lun]]
id = 0
volume = "other"
"#;
        let c = parse(text).unwrap();
        assert_eq!(
            c.daemon.control_socket,
            PathBuf::from("/run/lunmirror/control.sock")
        );
        assert_eq!(
            c.daemon.log_level.as_deref(),
            Some("info,lunmirror::iscsi=debug")
        );
        let t = &c.targets[0];
        assert_eq!(t.alias.as_deref(), Some("database disks"));
        assert_eq!(t.portals.len(), 2);
        assert!(t.portals[1].is_ipv6());
        assert_eq!(t.allowed_initiators[1], "iqn.2026-11.io.example:host");
        assert_eq!(t.chap.as_ref().unwrap().secret, b"twelve-bytes!");
        assert_eq!(t.mutual_chap.as_ref().unwrap().user, "target");
        // Sorted by LUN id.
        assert_eq!(t.luns[0].volume, "ro");
        assert!(t.luns[0].read_only);
        assert_eq!(t.luns[0].size, SizeSpec::Exact(1 << 20));
        assert_eq!(
            t.luns[0].path,
            PathBuf::from("/var/lib/lunmirror/volumes/ro.img")
        );
        let d = &t.luns[1];
        assert_eq!(d.key, "target[0].lun[0]");
        assert_eq!(d.block_size, 4096);
        assert_eq!(d.size, SizeSpec::Exact(4 << 30));
        assert_eq!(d.serial, "DATA0001");
        assert_eq!(format_wwn(&d.wwn), "naa.6001405a1b2c3d4e5f60718293a4b5c6");
        assert!(!d.path_is_default);
        assert_eq!(c.targets[1].name, "eui.0123456789abcdef");
        assert_eq!(c.targets[1].portals, vec![DEFAULT_PORTAL.parse().unwrap()]);
        assert_eq!(c.luns().count(), 3);
        assert!(warnings(&c).is_empty(), "{:?}", warnings(&c));
    }

    #[test]
    fn unknown_keys_rejected_with_path() {
        rejects(
            "[daemon]\nstate_dirr = \"x\"\n",
            "daemon.state_dirr",
            "unknown field `state_dirr`",
        );
        rejects("bogus = 1\n", "bogus", "unknown field `bogus`");
        let text = format!("{MIN}colour = \"blue\"\n");
        rejects(&text, "target[0].lun[0].colour", "unknown field `colour`");
        let text = MIN.replace("[[target.lun]]", "portal = [\"x\"]\n[[target.lun]]");
        rejects(&text, "target[0].portal", "unknown field `portal`");
        let text = MIN.replace(
            "[[target.lun]]",
            "chap = { user = \"u\", secret = \"s\", extra = 1 }\n[[target.lun]]",
        );
        rejects(&text, "target[0].chap.extra", "unknown field `extra`");
    }

    #[test]
    fn type_errors_and_syntax_named() {
        let text = MIN.replace("id = 0", "id = \"zero\"");
        rejects(&text, "target[0].lun[0].id", "invalid type");
        let text = MIN.replace("id = 0", "id = -1");
        rejects(&text, "target[0].lun[0].id", "");
        let text = format!("{MIN}read_only = \"yes\"\n");
        rejects(&text, "target[0].lun[0].read_only", "invalid type");
        rejects(
            "[[target]]\n[[target.lun]]\nid = 0\nvolume = \"v\"\n",
            "target[0]",
            "missing field `name`",
        );
        let e = parse("[daemon\n").unwrap_err();
        assert!(e.errors[0].message.contains("line 1"), "{e}");
    }

    #[test]
    fn needs_targets_luns_portals() {
        rejects("", "target", "at least one [[target]]");
        rejects(
            "[tcmu]\nenable = \"auto\"\n",
            "target",
            "at least one [[target]]",
        );
        let c = parse("[tcmu]\nenable = \"on\"\n").unwrap();
        assert!(c.targets.is_empty());
        assert_eq!(c.tcmu.mode, TcmuMode::On);
        rejects(
            "[[target]]\nname = \"iqn.2026-11.io.lunmirror:t\"\n",
            "target[0].lun",
            "at least one",
        );
        let text = MIN.replace("[[target.lun]]", "portals = []\n[[target.lun]]");
        rejects(&text, "target[0].portals", "at least one portal");
    }

    #[test]
    fn target_names_validated() {
        for bad in [
            "",
            "iqn.2026-11",
            "iqn.2026-11.",
            "iqn.26-11.io.x",
            "iqn.2026-13.io.x",
            "iqn.2026-00.io.x",
            "iqn.2026_11.io.x",
            "iqn.2026-11.io..x",
            "iqn.2026-11.io.x:has space",
            "iqn.2026-11.io.x:under_score",
            "eui.0123",
            "eui.0123456789abcdeg",
            "naa.0123456789abcdef0",
            "foo.bar",
        ] {
            let text = MIN.replace("iqn.2026-11.io.lunmirror:t1", bad);
            rejects(&text, "target[0].name", "");
        }
        let long = format!("iqn.2026-11.io.x:{}", "a".repeat(220));
        rejects(
            &MIN.replace("iqn.2026-11.io.lunmirror:t1", &long),
            "target[0].name",
            "223",
        );
        for good in [
            "iqn.2026-11.io.x",
            "iqn.1993-08.org.debian:01:8f5e1a2b3c",
            "eui.02004567A425678D",
            "naa.52004567BA64678D",
            "naa.62004567BA64678D0123456789ABCDEF",
        ] {
            parse(&MIN.replace("iqn.2026-11.io.lunmirror:t1", good)).unwrap();
        }
    }

    #[test]
    fn duplicate_targets_luns_volumes_paths() {
        let two = format!("{MIN}{}", MIN.replace("v0", "v1"));
        rejects(&two, "target[1].name", "duplicate target name");
        let upper = format!(
            "{MIN}{}",
            MIN.replace("v0", "v1")
                .replace("io.lunmirror", "IO.LUNMIRROR")
        );
        rejects(&upper, "target[1].name", "duplicate");
        let dup_vol = format!("{MIN}{}", MIN.replace(":t1", ":t2"));
        rejects(
            &dup_vol,
            "target[1].lun[0].volume",
            "duplicate volume name \"v0\"",
        );
        let dup_id = format!("{MIN}[[target.lun]]\nid = 0\nvolume = \"v1\"\n");
        rejects(&dup_id, "target[0].lun[1].id", "duplicate LUN id 0");
        let dup_path = format!(
            "{MIN}path = \"/a.img\"\n[[target.lun]]\nid = 1\nvolume = \"v1\"\npath = \"/a.img\"\n"
        );
        rejects(
            &dup_path,
            "target[0].lun[1].path",
            "already the backing file",
        );
        let dup_wwn = format!(
            "{MIN}wwn = \"naa.60000000000000000000000000000001\"\n[[target.lun]]\nid = 1\nvolume = \"v1\"\nwwn = \"naa.60000000000000000000000000000001\"\n"
        );
        rejects(&dup_wwn, "target[0].lun[1].wwn", "duplicate wwn");
        let dup_portal = MIN.replace(
            "[[target.lun]]",
            "portals = [\"127.0.0.1:3260\", \"127.0.0.1:3260\"]\n[[target.lun]]",
        );
        rejects(&dup_portal, "target[0].portals[1]", "duplicate portal");
        let dup_init = MIN.replace(
            "[[target.lun]]",
            "allowed_initiators = [\"iqn.2026-11.a.b:x\", \"iqn.2026-11.A.B:X\"]\n[[target.lun]]",
        );
        rejects(
            &dup_init,
            "target[0].allowed_initiators[1]",
            "duplicate initiator",
        );
    }

    #[test]
    fn lun_fields_validated() {
        let with = |extra: &str| format!("{MIN}{extra}\n");
        rejects(
            &with("block_size = 1024"),
            "target[0].lun[0].block_size",
            "must be 512 or 4096",
        );
        rejects(
            &with("size = 0"),
            "target[0].lun[0].size",
            "must not be zero",
        );
        rejects(
            &with("size = 1000"),
            "target[0].lun[0].size",
            "not a multiple of the block size 512",
        );
        rejects(
            &with("size = \"1M\"\nblock_size = 4096\n[[target.lun]]\nid = 1\nvolume = \"v1\"\nblock_size = 4096\nsize = 6144"),
            "target[0].lun[1].size",
            "not a multiple of the block size 4096",
        );
        rejects(&with("size = -5"), "target[0].lun[0].size", "negative");
        rejects(
            &with("size = \"1X\""),
            "target[0].lun[0].size",
            "unknown suffix",
        );
        rejects(&with("size = 1.5"), "target[0].lun[0].size", "found float");
        rejects(
            &with("path = \"\""),
            "target[0].lun[0].path",
            "must not be empty",
        );
        rejects(
            &with("serial = \"has space\""),
            "target[0].lun[0].serial",
            "printable",
        );
        rejects(&with("serial = \"\""), "target[0].lun[0].serial", "1 to 64");
        rejects(
            &with("wwn = \"naa.5000\""),
            "target[0].lun[0].wwn",
            "32 hex digits",
        );
        rejects(
            &with("wwn = \"naa.50000000000000000000000000000001\""),
            "target[0].lun[0].wwn",
            "type 6",
        );
        rejects(
            &MIN.replace("id = 0", "id = 16384"),
            "target[0].lun[0].id",
            "at most 16383",
        );
        for bad in ["", ".hidden", "-x", "a/b", "a b", &"x".repeat(65)] {
            rejects(
                &MIN.replace("\"v0\"", &format!("{bad:?}")),
                "target[0].lun[0].volume",
                "",
            );
        }
        parse(&MIN.replace("id = 0", "id = 16383")).unwrap();
        rejects(
            &with("sanitize_rate = \"fast\""),
            "target[0].lun[0].sanitize_rate",
            "",
        );
        rejects(
            &with("sanitize_rate = -1"),
            "target[0].lun[0].sanitize_rate",
            "negative",
        );
    }

    #[test]
    fn physical_block_size() {
        let pbs = |extra: &str| {
            parse(&format!("{MIN}{extra}\n")).unwrap().targets[0].luns[0].physical_block_size
        };
        assert_eq!(pbs(""), PhysicalBlockSize::Logical);
        assert_eq!(
            pbs("physical_block_size = \"auto\""),
            PhysicalBlockSize::Auto
        );
        assert_eq!(
            pbs("physical_block_size = \"4K\""),
            PhysicalBlockSize::Bytes(4096)
        );
        assert_eq!(
            pbs("physical_block_size = 512"),
            PhysicalBlockSize::Bytes(512)
        );
        let key = "target[0].lun[0].physical_block_size";
        rejects(
            &format!("{MIN}physical_block_size = 3000\n"),
            key,
            "power of two",
        );
        rejects(
            &format!("{MIN}physical_block_size = 1024\nblock_size = 4096\nsize = \"1M\"\n"),
            key,
            "from the block size 4096",
        );
        rejects(
            &format!("{MIN}physical_block_size = \"big\"\n"),
            key,
            "auto",
        );
    }

    #[test]
    fn sanitize_rate() {
        let rate = |text: &str| parse(text).unwrap().targets[0].luns[0].sanitize_rate;
        assert_eq!(rate(MIN), DEFAULT_SANITIZE_RATE);
        assert_eq!(rate(&format!("{MIN}sanitize_rate = \"64M\"\n")), 64 << 20);
        assert_eq!(rate(&format!("{MIN}sanitize_rate = 0\n")), 0);
    }

    #[test]
    fn portals_validated() {
        for bad in ["127.0.0.1", "localhost:3260", "::1:3260", "1.2.3.4:99999"] {
            let text = MIN.replace(
                "[[target.lun]]",
                &format!("portals = [\"127.0.0.1:3260\", {bad:?}]\n[[target.lun]]"),
            );
            rejects(&text, "target[0].portals[1]", "is not ADDR:PORT");
        }
    }

    #[test]
    fn chap_rules() {
        let chap = |c: &str| MIN.replace("[[target.lun]]", &format!("{c}\n[[target.lun]]"));
        rejects(
            &chap("chap = { user = \"u\", secret = \"\" }"),
            "target[0].chap.secret",
            "at least 1 byte",
        );
        rejects(
            &chap("chap = { user = \"\", secret = \"0123456789ab\" }"),
            "target[0].chap.user",
            "must not be empty",
        );
        rejects(
            &chap(&format!(
                "chap = {{ user = \"u\", secret = \"{}\" }}",
                "s".repeat(256)
            )),
            "target[0].chap.secret",
            "at most 255",
        );
        rejects(
            &chap("mutual_chap = { user = \"t\", secret = \"0123456789ab\" }"),
            "target[0].mutual_chap",
            "requires chap",
        );
        rejects(
            &chap("chap = { user = \"u\", secret = \"0123456789ab\" }\nmutual_chap = { user = \"t\", secret = \"0123456789ab\" }"),
            "target[0].mutual_chap.secret",
            "must differ",
        );
        rejects(
            &chap("chap = { user = \"u\" }"),
            "target[0].chap",
            "missing field `secret`",
        );
        // Short secrets are legal but warned about.
        let c = parse(&chap("chap = { user = \"u\", secret = \"short\" }")).unwrap();
        let w = warnings(&c);
        assert!(
            w.iter().any(|m| m.contains("target[0].chap.secret")),
            "{w:?}"
        );
        assert!(!format!("{:?}", c.targets[0].chap).contains("short"));
    }

    #[test]
    fn async_inline_apply_defaults_off_and_can_be_turned_on() {
        assert!(!parse(MIN).unwrap().daemon.async_inline_apply);
        let c = parse(&format!("[daemon]\nasync_inline_apply = true\n{MIN}")).unwrap();
        assert!(c.daemon.async_inline_apply);
        rejects(
            &format!("[daemon]\nasync_inline_apply = 1\n{MIN}"),
            "daemon.async_inline_apply",
            "",
        );
    }

    #[test]
    fn zero_copy_read_defaults_on_and_can_be_turned_off() {
        assert!(parse(MIN).unwrap().daemon.zero_copy_read);
        for (v, want) in [("true", true), ("false", false)] {
            let c = parse(&format!("[daemon]\nzero_copy_read = {v}\n{MIN}")).unwrap();
            assert_eq!(c.daemon.zero_copy_read, want);
        }
        rejects(
            &format!("[daemon]\nzero_copy_read = \"off\"\n{MIN}"),
            "daemon.zero_copy_read",
            "",
        );
    }

    #[test]
    fn daemon_section_validated() {
        rejects(
            &format!("[daemon]\nengine = \"fast\"\n{MIN}"),
            "daemon.engine",
            "unknown engine",
        );
        rejects(
            &format!("[daemon]\nlog_level = \"info,[[[\"\n{MIN}"),
            "daemon.log_level",
            "invalid filter",
        );
        rejects(
            &format!("[daemon]\nstate_dir = \"\"\n{MIN}"),
            "daemon.state_dir",
            "must not be empty",
        );
        rejects(
            &format!("[daemon]\ncontrol_socket = \"/{}\"\n{MIN}", "s".repeat(120)),
            "daemon.control_socket",
            "too long",
        );
    }

    #[test]
    fn all_errors_reported_at_once() {
        let text = r#"
[[target]]
name = "bad"
[[target.lun]]
id = 0
volume = "v0"
block_size = 1000
"#;
        let e = parse(text).unwrap_err();
        assert!(e.mentions("target[0].name"), "{e}");
        assert!(e.mentions("target[0].lun[0].block_size"), "{e}");
        let shown = e.to_string();
        assert!(
            shown.contains("target[0].lun[0].block_size: must be 512 or 4096"),
            "{shown}"
        );
        assert!(
            shown.starts_with("invalid configuration (test.toml)"),
            "{shown}"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("8K"), Ok(8192));
        assert_eq!(parse_size("2 TB"), Ok(2 << 40));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("16777216P").is_err());
    }

    #[test]
    fn wwn_parse_and_default() {
        let w = parse_wwn("6001405A-1B2C3D4E:5F60718293A4B5C6").unwrap();
        assert_eq!(format_wwn(&w), "naa.6001405a1b2c3d4e5f60718293a4b5c6");
        assert_eq!(parse_wwn("0x6001405a1b2c3d4e5f60718293a4b5c6"), Ok(w));
        assert!(parse_wwn("naa.6001405a1b2c3d4e5f60718293a4b5cg").is_err());

        let a = default_wwn("iqn.2026-11.io.x:a", "v");
        assert_eq!(
            a,
            default_wwn("IQN.2026-11.IO.X:A", "v"),
            "stable, case-folded"
        );
        assert_eq!(a[0] >> 4, 6, "NAA type 6");
        assert_ne!(a, default_wwn("iqn.2026-11.io.x:b", "v"));
        assert_ne!(a, default_wwn("iqn.2026-11.io.x:a", "w"));
        // Pinned so an accidental change of the derivation (which would
        // change every LU's identity for initiators) fails loudly.
        assert_eq!(
            format_wwn(&default_wwn(DEFAULT_TARGET, DEFAULT_VOLUME)),
            "naa.65c02e574f6846357cbff716f048852f"
        );
    }

    #[test]
    fn engine_names() {
        assert_eq!("auto".parse::<Engine>(), Ok(Engine::Auto));
        assert_eq!("io-uring".parse::<Engine>(), Ok(Engine::IoUring));
        assert_eq!("io_uring".parse::<Engine>(), Ok(Engine::IoUring));
        assert_eq!("sync".parse::<Engine>(), Ok(Engine::Sync));
        assert!("uring".parse::<Engine>().is_err());
        assert_eq!(Engine::IoUring.to_string(), "io-uring");
    }

    #[test]
    fn shipped_example_is_valid() {
        let c = parse(include_str!("../examples/lunmirror.toml")).unwrap();
        assert_eq!(c.targets.len(), 2);
        assert_eq!(c.luns().count(), 3);
        assert!(c.targets[0].mutual_chap.is_some());
        assert!(c.targets[1].luns[0].read_only);
        assert!(warnings(&c).is_empty(), "{:?}", warnings(&c));
    }

    #[test]
    fn open_access_warning() {
        let text = MIN.replace(
            "[[target.lun]]",
            "portals = [\"0.0.0.0:3260\"]\n[[target.lun]]",
        );
        let c = parse(&text).unwrap();
        assert!(warnings(&c).iter().any(|w| w.contains("no CHAP")));
        let c = parse(MIN).unwrap();
        assert!(warnings(&c).is_empty());
    }
}
