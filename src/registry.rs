//! The registry: volumes served by the daemon, replication associations
//! and jobs, with their persisted state in the state directory.
//!
//! It implements the CIM methods behind the control socket
//! (`attach_replica`, `modify_synchronization`, job control,
//! enumerations), drives copy jobs on their own threads, runs the
//! housekeeping thread (activity-log clearing, job expiry, persisting state
//! changes) and resumes everything after a restart.
//!
//! State directory layout:
//! - `registry.json` — associations, jobs, id counters (atomic replace:
//!   write temp, fsync, rename, fsync dir);
//! - `sync-<n>/bitmap` — the association's out-of-sync/activity bitmap;
//! - `sync-<n>/journal/` — the Async journal;
//! - `registry.lock` — held (flock) while a registry uses the directory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::block::SharedDev;
use crate::jobs::{
    cim_datetime, from_unix_ms, job_instance_id, unix_ms, JobInfo, JobRequest, JobState, JobTable,
    ReturnValue, SavedJob,
};
use crate::mirror::{
    AssocSetup, Association, CopyEnd, CopyKind, CopyStep, CopyType, MirrorPolicy, MirroredVolume,
    ResumeAction, SyncState,
};

/// `fsync` a directory so that entries created, renamed or removed in it
/// are durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replace `path` atomically with `bytes`: write a temporary file, fsync
/// it, rename it over `path`, fsync the directory.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

/// Format an association id.
pub fn sync_instance_id(n: u64) -> String {
    format!("lunmirror:sync:{n}")
}

/// Parse `lunmirror:sync:<n>`.
pub fn parse_sync_id(s: &str) -> Option<u64> {
    s.strip_prefix("lunmirror:sync:")?.parse().ok()
}

/// Registry errors (startup and volume registration; the CIM methods
/// report through `ReturnValue` instead).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("state directory I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("state file {path} is damaged: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("state directory {0} is in use by another process")]
    Locked(PathBuf),
    #[error("volume {0} is already registered")]
    VolumeExists(String),
    #[error("volume {name}: {path} is already used as a replica by association {sync}")]
    PathIsReplica {
        name: String,
        path: PathBuf,
        sync: String,
    },
}

/// Opens a `TargetElement` path as a block device (never creating or
/// growing it).
pub type TargetOpener = Arc<dyn Fn(&Path) -> io::Result<SharedDev> + Send + Sync>;

/// The default [`TargetOpener`]: the block layer's file backstore, opened
/// read-write without `create_size`, so it never creates or grows anything.
pub fn open_target_file(path: &Path) -> io::Result<SharedDev> {
    let opts = crate::block::file::FileDevOptions::default();
    match crate::block::file::FileDev::open(path, opts) {
        Ok(d) => Ok(Arc::new(d)),
        Err(crate::block::BlockError::Io(e)) => Err(e),
        Err(crate::block::BlockError::ReadOnly) => Err(io::Error::from_raw_os_error(libc::EROFS)),
        Err(crate::block::BlockError::NoSpace) => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
        Err(e) => Err(io::Error::other(e.to_string())),
    }
}

/// The replica of a resumed association whose file could not be used at
/// startup (missing, unreadable, too small). Every operation first tries to
/// open it again, so once the file is back a Resync works without
/// restarting the daemon; until then every operation fails (the
/// association is Broken and sends nothing but the Resync copy here).
struct ReopeningReplica {
    path: PathBuf,
    /// The source's size: the least the file must have.
    size: u64,
    opener: TargetOpener,
    dev: Mutex<Option<SharedDev>>,
}

impl ReopeningReplica {
    fn dev(&self) -> crate::block::BlockResult<SharedDev> {
        let mut g = self.dev.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = &*g {
            return Ok(d.clone());
        }
        let d = (self.opener)(&self.path).map_err(crate::block::BlockError::from_io)?;
        if d.size() < self.size {
            return Err(crate::block::BlockError::Io(io::Error::other(format!(
                "replica {} is smaller ({} bytes) than the source ({} bytes)",
                self.path.display(),
                d.size(),
                self.size
            ))));
        }
        tracing::info!(replica = %self.path.display(), "replica opened again");
        *g = Some(d.clone());
        Ok(d)
    }
}

impl crate::block::BlockDev for ReopeningReplica {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::block::BlockResult<()> {
        self.dev()?.read_at(buf, offset)
    }
    fn write_at(
        &self,
        buf: &[u8],
        offset: u64,
        flags: crate::block::WriteFlags,
    ) -> crate::block::BlockResult<()> {
        self.dev()?.write_at(buf, offset, flags)
    }
    fn flush(&self) -> crate::block::BlockResult<()> {
        self.dev()?.flush()
    }
    fn caps(&self) -> crate::block::BlockCaps {
        self.dev().map(|d| d.caps()).unwrap_or_default()
    }
    fn discard(&self, offset: u64, len: u64) -> crate::block::BlockResult<()> {
        self.dev()?.discard(offset, len)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: crate::block::WriteFlags,
    ) -> crate::block::BlockResult<()> {
        self.dev()?.write_zeroes(offset, len, flags)
    }
}

/// Registry settings.
#[derive(Clone)]
pub struct RegistryConfig {
    pub policy: MirrorPolicy,
    /// How long attach/modify wait for in-flight host writes to drain
    /// (ReturnValue 3 when exceeded).
    pub quiesce_timeout: Duration,
    /// Activity-log clearing / state persistence period.
    pub housekeeping_interval: Duration,
    /// CIM TimeBeforeRemoval of finished jobs.
    pub job_retention: Duration,
    pub opener: TargetOpener,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            policy: MirrorPolicy::default(),
            quiesce_timeout: Duration::from_secs(30),
            housekeeping_interval: Duration::from_secs(2),
            job_retention: Duration::from_secs(24 * 3600),
            opener: Arc::new(open_target_file),
        }
    }
}

impl std::fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("policy", &self.policy)
            .field("quiesce_timeout", &self.quiesce_timeout)
            .finish()
    }
}

/// Where a replica lives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TargetRef {
    Volume(String),
    Path(PathBuf),
}

impl TargetRef {
    fn display(&self) -> String {
        match self {
            TargetRef::Volume(v) => v.clone(),
            TargetRef::Path(p) => p.display().to_string(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct SavedAssoc {
    id: u64,
    source: String,
    target: TargetRef,
    copy_type: CopyType,
    state: SyncState,
    copy_kind: Option<CopyKind>,
    region_size: u64,
    error: Option<String>,
    when_synced_ms: Option<u64>,
    established_ms: u64,
    job: Option<u64>,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct SavedState {
    version: u32,
    next_job: u64,
    next_sync: u64,
    associations: Vec<SavedAssoc>,
    jobs: Vec<SavedJob>,
}

/// Identity of a file or block device (so two paths to the same storage
/// are recognised).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileId {
    Inode(u64, u64),
    Device(u64),
}

fn file_id(path: &Path) -> Option<FileId> {
    let m = std::fs::metadata(path).ok()?;
    Some(if m.file_type().is_block_device() {
        FileId::Device(m.rdev())
    } else {
        FileId::Inode(m.dev(), m.ino())
    })
}

struct VolumeEntry {
    vol: Arc<MirroredVolume>,
    path: PathBuf,
    id: Option<FileId>,
    exported: bool,
}

struct AssocEntry {
    assoc: Arc<Association>,
    source: String,
    target: TargetRef,
    target_id: Option<FileId>,
    established_ms: u64,
    job: Option<u64>,
}

#[derive(Default)]
struct Inner {
    volumes: BTreeMap<String, VolumeEntry>,
    assocs: BTreeMap<u64, AssocEntry>,
    /// Associations whose source volume is not configured (kept on disk).
    dormant: Vec<SavedAssoc>,
    next_sync: u64,
    job_threads: Vec<JoinHandle<()>>,
}

/// Outcome of a CIM method call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodResult {
    pub return_value: ReturnValue,
    /// `lunmirror:<n>` when a job was started.
    pub job: Option<String>,
    /// The association concerned (`lunmirror:sync:<n>`).
    pub synchronization: Option<String>,
    /// Why, for non-zero return values.
    pub error: Option<String>,
}

impl MethodResult {
    fn ok(rv: ReturnValue) -> Self {
        MethodResult {
            return_value: rv,
            job: None,
            synchronization: None,
            error: None,
        }
    }

    fn err(rv: ReturnValue, why: impl Into<String>) -> Self {
        MethodResult {
            return_value: rv,
            job: None,
            synchronization: None,
            error: Some(why.into()),
        }
    }
}

/// An association as reported on the control socket
/// (CIM_StorageSynchronized names).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SyncInfo {
    pub synchronization: String,
    pub system_element: String,
    pub synced_element: String,
    pub copy_type: u16,
    pub sync_state: u16,
    pub sync_state_description: String,
    pub sync_maintained: bool,
    pub when_established: String,
    pub when_synced: Option<String>,
    pub percent_synced: u16,
    pub out_of_sync_bytes: u64,
    pub job: Option<String>,
    pub journal_pending_records: Option<u64>,
    pub journal_pending_bytes: Option<u64>,
    /// Age of the oldest unapplied journal record, seconds.
    pub journal_oldest_pending_age: Option<f64>,
    pub error_description: Option<String>,
}

/// A volume as reported on the control socket.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct VolumeInfo {
    pub name: String,
    pub path: String,
    pub size: u64,
    pub exported: bool,
    pub synchronizations: Vec<String>,
}

/// See the module documentation.
pub struct Registry {
    state_dir: PathBuf,
    cfg: RegistryConfig,
    inner: Mutex<Inner>,
    jobs: JobTable,
    pending_resume: Mutex<Vec<SavedAssoc>>,
    dirty: Mutex<bool>,
    wake: Condvar,
    /// Serialises writers of `registry.json` (one temp file name).
    save_lock: Mutex<()>,
    stopping: AtomicBool,
    housekeeper: Mutex<Option<JoinHandle<()>>>,
    me: Weak<Registry>,
    _lock: nix::fcntl::Flock<File>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("state_dir", &self.state_dir)
            .finish()
    }
}

fn state_name(s: SyncState) -> &'static str {
    match s {
        SyncState::Initialized => "Initialized",
        SyncState::ResyncInProgress => "ResyncInProgress",
        SyncState::Synchronized => "Synchronized",
        SyncState::RestoreInProgress => "Restore In Progress",
        SyncState::Idle => "Idle",
        SyncState::Broken => "Broken",
        SyncState::Fractured => "Fractured",
        SyncState::CopyInProgress => "Copy In Progress",
    }
}

impl Registry {
    /// Open the state directory with default settings.
    pub fn open(state_dir: &Path) -> Result<Arc<Registry>, RegistryError> {
        Self::open_with(state_dir, RegistryConfig::default())
    }

    /// Open (creating) the state directory, lock it, load the persisted
    /// state and start the housekeeping thread. Associations are resumed by
    /// [`Registry::resume`] once the volumes are added.
    pub fn open_with(
        state_dir: &Path,
        cfg: RegistryConfig,
    ) -> Result<Arc<Registry>, RegistryError> {
        std::fs::create_dir_all(state_dir)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(state_dir.join("registry.lock"))?;
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| RegistryError::Locked(state_dir.to_path_buf()))?;
        let path = state_dir.join("registry.json");
        let saved: SavedState = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| RegistryError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => SavedState {
                version: 1,
                next_job: 1,
                next_sync: 1,
                ..Default::default()
            },
            Err(e) => return Err(e.into()),
        };
        let jobs = JobTable::new(cfg.job_retention);
        jobs.restore(saved.jobs, saved.next_job);
        let next_sync = saved
            .associations
            .iter()
            .map(|a| a.id + 1)
            .max()
            .unwrap_or(1)
            .max(saved.next_sync);
        let reg = Arc::new_cyclic(|me| Registry {
            state_dir: state_dir.to_path_buf(),
            cfg,
            inner: Mutex::new(Inner {
                next_sync,
                ..Default::default()
            }),
            jobs,
            pending_resume: Mutex::new(saved.associations),
            dirty: Mutex::new(false),
            wake: Condvar::new(),
            save_lock: Mutex::new(()),
            stopping: AtomicBool::new(false),
            housekeeper: Mutex::new(None),
            me: me.clone(),
            _lock: lock,
        });
        let weak = Arc::downgrade(&reg);
        let h = std::thread::Builder::new()
            .name("registry-housekeeper".into())
            .spawn(move || housekeeper(weak))?;
        *reg.housekeeper.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        Ok(reg)
    }

    fn locked(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.cfg
    }

    /// Default control socket path: `<state-dir>/control.sock`.
    pub fn default_socket_path(&self) -> PathBuf {
        self.state_dir.join("control.sock")
    }

    /// Register a volume served by the daemon (`exported`: it is a LUN, so
    /// it can never be a replica target).
    pub fn add_volume(
        &self,
        name: &str,
        path: &Path,
        vol: Arc<MirroredVolume>,
        exported: bool,
    ) -> Result<(), RegistryError> {
        let id = file_id(path);
        let mut g = self.locked();
        if g.volumes.contains_key(name) {
            return Err(RegistryError::VolumeExists(name.to_string()));
        }
        let replica_of = g
            .assocs
            .values()
            .find(|e| id.is_some() && e.target_id == id)
            .map(|e| e.assoc.id());
        let pending = self
            .pending_resume
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|s| match &s.target {
                TargetRef::Path(p) => id.is_some() && file_id(p) == id,
                TargetRef::Volume(v) => v == name && exported,
            })
            .map(|s| s.id);
        if let Some(sync) = replica_of.or(pending) {
            return Err(RegistryError::PathIsReplica {
                name: name.to_string(),
                path: path.to_path_buf(),
                sync: sync_instance_id(sync),
            });
        }
        g.volumes.insert(
            name.to_string(),
            VolumeEntry {
                vol,
                path: path.to_path_buf(),
                id,
                exported,
            },
        );
        Ok(())
    }

    /// Unregister a volume whose frontend went away (a TCMU device removed
    /// from LIO). A volume that is still the source or target of an
    /// association stays registered, so its replication state is not lost;
    /// returns whether it was removed.
    pub fn remove_volume(&self, name: &str) -> bool {
        let mut g = self.locked();
        let in_use = g
            .assocs
            .values()
            .any(|e| e.source == name || matches!(&e.target, TargetRef::Volume(v) if v == name));
        if in_use {
            tracing::warn!(volume = %name, "volume left registered: it is part of an association");
            return false;
        }
        g.volumes.remove(name).is_some()
    }

    /// The volume registered as `name`.
    pub fn volume(&self, name: &str) -> Option<Arc<MirroredVolume>> {
        self.locked().volumes.get(name).map(|v| v.vol.clone())
    }

    fn mark_dirty(&self) {
        *self.dirty.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.notify_all();
    }

    fn notify_fn(&self) -> crate::mirror::assoc::Notify {
        let me = self.me.clone();
        Arc::new(move |_| {
            if let Some(r) = me.upgrade() {
                r.mark_dirty();
            }
        })
    }

    /// Write `registry.json` now.
    pub fn save(&self) -> io::Result<()> {
        let _serial = self.save_lock.lock().unwrap_or_else(|e| e.into_inner());
        let state = {
            let g = self.locked();
            let mut associations: Vec<SavedAssoc> = g
                .assocs
                .values()
                .map(|e| {
                    let st = e.assoc.status();
                    SavedAssoc {
                        id: e.assoc.id(),
                        source: e.source.clone(),
                        target: e.target.clone(),
                        copy_type: st.copy_type,
                        state: st.state,
                        copy_kind: st.copy_kind,
                        region_size: e.assoc.region_size(),
                        error: st.error,
                        when_synced_ms: st.when_synced.map(unix_ms),
                        established_ms: e.established_ms,
                        job: e.job,
                    }
                })
                .collect();
            associations.extend(g.dormant.iter().cloned());
            associations.extend(
                self.pending_resume
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .cloned(),
            );
            SavedState {
                version: 1,
                next_job: self.jobs.next_id(),
                next_sync: g.next_sync,
                associations,
                jobs: self.jobs.saved(),
            }
        };
        let bytes = serde_json::to_vec_pretty(&state).map_err(io::Error::other)?;
        atomic_write(&self.state_dir.join("registry.json"), &bytes)
    }

    fn open_replica(&self, target: &TargetRef) -> io::Result<SharedDev> {
        match target {
            TargetRef::Volume(v) => {
                self.volume(v)
                    .map(|vol| vol.primary().clone())
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("volume {v} not registered"),
                        )
                    })
            }
            TargetRef::Path(p) => (self.cfg.opener)(p),
        }
    }

    /// Stand-in for a replica that could not be used at startup: a path
    /// is tried again on every operation (see [`ReopeningReplica`]); a
    /// volume that is not configured stays unavailable.
    fn reopening_replica(&self, target: &TargetRef, size: u64) -> SharedDev {
        match target {
            TargetRef::Path(p) => Arc::new(ReopeningReplica {
                path: p.clone(),
                size,
                opener: self.cfg.opener.clone(),
                dev: Mutex::new(None),
            }),
            TargetRef::Volume(_) => Arc::new(crate::mirror::fault::FaultDev::unavailable(size)),
        }
    }

    fn setup(
        &self,
        id: u64,
        ct: CopyType,
        vol: &MirroredVolume,
        replica: SharedDev,
        region_size: u64,
    ) -> AssocSetup {
        AssocSetup {
            id,
            dir: self.state_dir.join(format!("sync-{id}")),
            copy_type: ct,
            primary: vol.primary().clone(),
            replica,
            locks: vol.locks().clone(),
            policy: MirrorPolicy {
                region_size,
                ..self.cfg.policy
            },
            notify: self.notify_fn(),
        }
    }

    /// Resume the persisted associations whose source volumes are now
    /// registered: replay journals, resync regions that were in flight,
    /// restart or fail interrupted jobs. Call after `add_volume`s, before
    /// serving I/O.
    pub fn resume(&self) {
        let saved = std::mem::take(
            &mut *self
                .pending_resume
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        self.resume_saved(saved);
        // Jobs whose association did not come back cannot continue.
        let live: Vec<u64> = self
            .locked()
            .assocs
            .values()
            .filter_map(|e| e.job)
            .collect();
        for j in self.jobs.unfinished() {
            if !live.contains(&j) {
                self.jobs.finish(
                    j,
                    JobState::Exception,
                    Some("interrupted by a restart".into()),
                );
            }
        }
        if let Err(e) = self.save() {
            tracing::error!(error = %e, "cannot persist registry state");
        }
    }

    /// Resume the dormant associations of `source`: those whose source
    /// volume was not registered when [`resume`](Self::resume) ran, e.g. a
    /// TCMU device that LIO (re)creates after the daemon started. Call right
    /// after `add_volume(source, ..)`, before the volume serves I/O.
    /// Returns how many came back.
    pub fn resume_source(&self, source: &str) -> usize {
        let revived: Vec<SavedAssoc> = {
            let mut g = self.locked();
            let (mine, rest) = std::mem::take(&mut g.dormant)
                .into_iter()
                .partition(|s| s.source == source);
            g.dormant = rest;
            mine
        };
        if revived.is_empty() {
            return 0;
        }
        let ids: Vec<u64> = revived.iter().map(|s| s.id).collect();
        self.resume_saved(revived);
        let n = {
            let g = self.locked();
            ids.iter().filter(|id| g.assocs.contains_key(id)).count()
        };
        if let Err(e) = self.save() {
            tracing::error!(error = %e, "cannot persist registry state");
        }
        n
    }

    fn resume_saved(&self, saved: Vec<SavedAssoc>) {
        for s in saved {
            let Some(vol) = self.volume(&s.source) else {
                tracing::warn!(sync = s.id, source = %s.source, "source volume not configured; association kept dormant");
                self.locked().dormant.push(s);
                continue;
            };
            let size = vol.size_bytes();
            // A replica that cannot be used makes the association Broken at
            // once (not at the first write that fails on it).
            let (replica, unusable) = match self.open_replica(&s.target) {
                Ok(d) if d.size() >= size => (d, None),
                Ok(d) => {
                    tracing::error!(sync = s.id, "replica is smaller than the source now");
                    let why = format!(
                        "replica {} is smaller ({} bytes) than the source ({size} bytes)",
                        s.target.display(),
                        d.size()
                    );
                    (self.reopening_replica(&s.target, size), Some(why))
                }
                Err(e) => {
                    tracing::error!(sync = s.id, target = %s.target.display(), error = %e, "cannot open replica; association is Broken");
                    let why = format!("cannot open replica {}: {e}", s.target.display());
                    (self.reopening_replica(&s.target, size), Some(why))
                }
            };
            let setup = self.setup(s.id, s.copy_type, &vol, replica, s.region_size);
            let reopened = Association::reopen(
                setup,
                s.state,
                s.copy_kind,
                s.error.clone(),
                s.when_synced_ms.map(from_unix_ms),
            );
            let (assoc, mut action) = match reopened {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(sync = s.id, error = %e, "cannot reopen association state; kept dormant");
                    self.locked().dormant.push(s);
                    continue;
                }
            };
            if let Some(why) = unusable {
                // The copy it would resume cannot run: its regions stay out
                // of sync for a Resync.
                assoc.fail(why.clone());
                if matches!(action, ResumeAction::Copy(_)) {
                    action = ResumeAction::Interrupted(why);
                }
            }
            let target_id = match &s.target {
                TargetRef::Path(p) => file_id(p),
                TargetRef::Volume(v) => self.locked().volumes.get(v).and_then(|e| e.id),
            };
            // Before serving I/O nothing is in flight; wait regardless, an
            // association must never be left out of the write path.
            let q = vol.locks().lock(0, u64::MAX);
            vol.add_association(&q, assoc.clone());
            drop(q);
            let job_alive = s
                .job
                .filter(|j| self.jobs.state(*j).is_some_and(|st| !st.is_finished()));
            let mut entry = AssocEntry {
                assoc: assoc.clone(),
                source: s.source.clone(),
                target: s.target.clone(),
                target_id,
                established_ms: s.established_ms,
                job: s.job,
            };
            match action {
                ResumeAction::None => {
                    if let Some(j) = job_alive {
                        self.jobs.finish(
                            j,
                            JobState::Exception,
                            Some("interrupted by a restart".into()),
                        );
                    }
                    self.locked().assocs.insert(s.id, entry);
                }
                ResumeAction::Copy(kind) => {
                    let job = match job_alive {
                        Some(j) => j,
                        None => {
                            self.jobs
                                .create(
                                    "Resync",
                                    &format!(
                                        "resynchronise {} after a restart ({kind:?})",
                                        s.target.display()
                                    ),
                                    Some(s.id),
                                )
                                .0
                        }
                    };
                    entry.job = Some(job);
                    self.locked().assocs.insert(s.id, entry);
                    self.spawn_job(s.id, job);
                }
                ResumeAction::Interrupted(why) => {
                    if let Some(j) = job_alive {
                        self.jobs.finish(j, JobState::Exception, Some(why));
                    }
                    self.locked().assocs.insert(s.id, entry);
                }
                ResumeAction::Remove(why) => {
                    if let Some(j) = job_alive {
                        self.jobs.finish(j, JobState::Exception, Some(why));
                    }
                    self.locked().assocs.insert(s.id, entry);
                    self.remove_association(s.id);
                }
            }
        }
    }

    fn spawn_job(&self, sync: u64, job: u64) {
        let Some(me) = self.me.upgrade() else { return };
        let spawned = std::thread::Builder::new()
            .name(format!("job-{job}"))
            .spawn(move || me.run_copy_job(sync, job));
        match spawned {
            Ok(h) => {
                let mut g = self.locked();
                g.job_threads.retain(|t| !t.is_finished());
                g.job_threads.push(h);
            }
            Err(e) => self.jobs.finish(
                job,
                JobState::Exception,
                Some(format!("cannot start job thread: {e}")),
            ),
        }
    }

    fn run_copy_job(&self, sync: u64, job: u64) {
        let Some(assoc) = self.locked().assocs.get(&sync).map(|e| e.assoc.clone()) else {
            self.jobs
                .finish(job, JobState::Exception, Some("association gone".into()));
            return;
        };
        let control = self.jobs.control(job).unwrap_or_default();
        self.jobs.set_state(job, JobState::Running);
        self.mark_dirty();
        // The association is removed (UnSyncUnAssoc) before the job is
        // reported finished, so a client that saw the job end sees the
        // final set of associations.
        let (state, error, remove) = loop {
            if self.stopping.load(Ordering::SeqCst) {
                // Left Running in the persisted state: resumed (or failed)
                // at the next start.
                return;
            }
            match control.current() {
                JobRequest::Terminate | JobRequest::Kill => {
                    let killed = control.current() == JobRequest::Kill;
                    let end = assoc.abort_copy("copy job terminated by request");
                    let st = if killed {
                        JobState::Killed
                    } else {
                        JobState::Terminated
                    };
                    break (st, None, end == CopyEnd::Remove);
                }
                JobRequest::Suspend => {
                    self.jobs.set_state(job, JobState::Suspended);
                    control.wait_while_suspended(Duration::from_millis(200));
                    if control.current() == JobRequest::None {
                        self.jobs.set_state(job, JobState::Running);
                    }
                    continue;
                }
                JobRequest::None => {}
            }
            match assoc.copy_step() {
                Ok(CopyStep::Progress { done, total }) => {
                    let pct = (done * 100).checked_div(total).unwrap_or(100);
                    self.jobs.set_progress(job, pct as u16);
                }
                Ok(CopyStep::Waiting) => std::thread::sleep(Duration::from_millis(5)),
                Ok(CopyStep::Done) => {
                    break match assoc.finish_copy() {
                        Ok(end) => (JobState::Completed, None, end == CopyEnd::Remove),
                        Err(e) => (
                            JobState::Exception,
                            Some(e.0),
                            assoc.copy_type() == CopyType::UnSyncUnAssoc,
                        ),
                    };
                }
                Err(e) => {
                    break (
                        JobState::Exception,
                        Some(e.0),
                        assoc.copy_type() == CopyType::UnSyncUnAssoc,
                    );
                }
            }
        };
        if remove {
            self.remove_association(sync);
        }
        self.jobs.finish(job, state, error);
        self.mark_dirty();
    }

    /// Detach and delete association `id` (waits for the volume to
    /// quiesce without a timeout).
    fn remove_association(&self, id: u64) {
        let Some(entry) = self.locked().assocs.remove(&id) else {
            return;
        };
        if let Some(vol) = self.volume(&entry.source) {
            let q = vol.locks().lock(0, u64::MAX);
            vol.remove_association(&q, id);
        }
        entry.assoc.stop();
        if let Err(e) = entry.assoc.destroy_state() {
            tracing::warn!(sync = id, error = %e, "cannot remove association state");
        }
        self.mark_dirty();
    }

    // ---- CIM methods -----------------------------------------------------

    /// AttachReplica(SourceElement, TargetElement, CopyType).
    pub fn attach_replica(&self, source: &str, target: &str, copy_type: u64) -> MethodResult {
        let ct = match copy_type {
            2..=5 => CopyType::from_cim(copy_type as u16),
            0x8000..=0xFFFF => {
                return MethodResult::err(
                    ReturnValue::NotSupported,
                    "vendor-specific CopyType not supported",
                )
            }
            _ => None,
        };
        let Some(ct) = ct else {
            return MethodResult::err(
                ReturnValue::InvalidParameter,
                format!("invalid CopyType {copy_type}"),
            );
        };
        let (vol, source_id) = {
            let g = self.locked();
            let Some(v) = g.volumes.get(source) else {
                return MethodResult::err(
                    ReturnValue::InvalidParameter,
                    format!("unknown SourceElement {source:?}"),
                );
            };
            if g.assocs
                .values()
                .any(|e| e.target == TargetRef::Volume(source.to_string()))
                || g.assocs
                    .values()
                    .any(|e| v.id.is_some() && e.target_id == v.id)
            {
                return MethodResult::err(
                    ReturnValue::InUse,
                    format!("{source} is itself a replica"),
                );
            }
            (v.vol.clone(), v.id)
        };
        let size = vol.size_bytes();
        // Resolve the target.
        let (tref, tid) = {
            let g = self.locked();
            if let Some(v) = g.volumes.get(target) {
                if target == source {
                    return MethodResult::err(
                        ReturnValue::InvalidParameter,
                        "SourceElement and TargetElement are the same",
                    );
                }
                (TargetRef::Volume(target.to_string()), v.id)
            } else if target.starts_with('/') {
                let p = Path::new(target);
                let meta = match std::fs::metadata(p) {
                    Ok(m) => m,
                    Err(e) => {
                        return MethodResult::err(
                            ReturnValue::InvalidParameter,
                            format!("TargetElement {target}: {e}"),
                        )
                    }
                };
                let ft = meta.file_type();
                if !ft.is_file() && !ft.is_block_device() {
                    return MethodResult::err(
                        ReturnValue::InvalidParameter,
                        format!("TargetElement {target} is not a regular file or block device"),
                    );
                }
                let id = file_id(p);
                if id.is_some() && id == source_id {
                    return MethodResult::err(
                        ReturnValue::InvalidParameter,
                        "SourceElement and TargetElement are the same",
                    );
                }
                match g.volumes.iter().find(|(_, v)| id.is_some() && v.id == id) {
                    Some((name, _)) => (TargetRef::Volume(name.clone()), id),
                    None => (TargetRef::Path(p.to_path_buf()), id),
                }
            } else {
                return MethodResult::err(
                    ReturnValue::InvalidParameter,
                    format!("unknown TargetElement {target:?}"),
                );
            }
        };
        {
            let g = self.locked();
            if let TargetRef::Volume(name) = &tref {
                if g.volumes.get(name).is_some_and(|v| v.exported) {
                    return MethodResult::err(
                        ReturnValue::InUse,
                        format!("TargetElement {target} is exported as a LUN"),
                    );
                }
                if g.assocs.values().any(|e| &e.source == name) {
                    return MethodResult::err(
                        ReturnValue::InUse,
                        format!("TargetElement {target} is a replication source"),
                    );
                }
            }
            if let Some(e) = g
                .assocs
                .values()
                .find(|e| e.target == tref || (tid.is_some() && e.target_id == tid))
            {
                return MethodResult::err(
                    ReturnValue::InUse,
                    format!(
                        "TargetElement {target} is already in {}",
                        sync_instance_id(e.assoc.id())
                    ),
                );
            }
            let dormant = g.dormant.iter().find(|d| {
                d.target == tref
                    || match &d.target {
                        TargetRef::Path(p) => tid.is_some() && file_id(p) == tid,
                        TargetRef::Volume(_) => false,
                    }
            });
            if let Some(d) = dormant {
                return MethodResult::err(
                    ReturnValue::InUse,
                    format!(
                        "TargetElement {target} belongs to the dormant {}",
                        sync_instance_id(d.id)
                    ),
                );
            }
        }
        let replica = match self.open_replica(&tref) {
            Ok(d) => d,
            Err(e) => {
                return MethodResult::err(
                    ReturnValue::Failed,
                    format!("cannot open TargetElement {target}: {e}"),
                )
            }
        };
        if replica.size() < size {
            return MethodResult::err(
                ReturnValue::InvalidParameter,
                format!(
                    "TargetElement is smaller ({} bytes) than the source ({size} bytes)",
                    replica.size()
                ),
            );
        }
        if size == 0 && ct == CopyType::UnSyncUnAssoc {
            return MethodResult::ok(ReturnValue::Completed);
        }
        let id = {
            let mut g = self.locked();
            let id = g.next_sync;
            g.next_sync += 1;
            id
        };
        let setup = self.setup(id, ct, &vol, replica, self.cfg.policy.region_size);
        let assoc = match Association::create(setup) {
            Ok(a) => a,
            Err(e) => {
                return MethodResult::err(
                    ReturnValue::Unspecified,
                    format!("cannot create association state: {e}"),
                )
            }
        };
        let Some(q) = vol.quiesce(self.cfg.quiesce_timeout) else {
            assoc.stop();
            let _ = assoc.destroy_state();
            return MethodResult::err(
                ReturnValue::Timeout,
                "in-flight writes on the source did not drain in time",
            );
        };
        // Registered before it becomes visible to writes, so that a
        // concurrent attach to the same target sees it.
        {
            let mut g = self.locked();
            if g.assocs
                .values()
                .any(|e| e.target == tref || (tid.is_some() && e.target_id == tid))
            {
                drop(g);
                drop(q);
                assoc.stop();
                let _ = assoc.destroy_state();
                return MethodResult::err(
                    ReturnValue::InUse,
                    format!("TargetElement {target} was just attached elsewhere"),
                );
            }
            g.assocs.insert(
                id,
                AssocEntry {
                    assoc: assoc.clone(),
                    source: source.to_string(),
                    target: tref.clone(),
                    target_id: tid,
                    established_ms: unix_ms(SystemTime::now()),
                    job: None,
                },
            );
        }
        vol.add_association(&q, assoc.clone());
        drop(q);
        let copying = assoc.copying();
        let job = copying.then(|| {
            let (job, _) = self.jobs.create(
                "AttachReplica",
                &format!("{:?} copy of {source} to {}", ct, tref.display()),
                Some(id),
            );
            if let Some(e) = self.locked().assocs.get_mut(&id) {
                e.job = Some(job);
            }
            job
        });
        if let Err(e) = self.save() {
            // Without durable state the association would be forgotten at
            // restart: undo it.
            self.remove_association(id);
            if let Some(j) = job {
                self.jobs.finish(
                    j,
                    JobState::Exception,
                    Some(format!("state not saved: {e}")),
                );
            }
            return MethodResult::err(
                ReturnValue::Unspecified,
                format!("cannot save registry state: {e}"),
            );
        }
        let rv = match job {
            Some(j) => {
                self.spawn_job(id, j);
                ReturnValue::JobStarted
            }
            None => ReturnValue::Completed,
        };
        MethodResult {
            return_value: rv,
            job: job.map(job_instance_id),
            synchronization: Some(sync_instance_id(id)),
            error: None,
        }
    }

    /// ModifySynchronization(Operation, Synchronization).
    pub fn modify_synchronization(&self, operation: u64, sync: &str) -> MethodResult {
        enum Op {
            Detach,
            Fracture,
            Resync,
            Restore,
            ResetToSync,
            ResetToAsync,
        }
        let op = match operation {
            2 => Op::Detach,
            3 => Op::Fracture,
            4 => Op::Resync,
            5 => Op::Restore,
            10 => Op::ResetToSync,
            11 => Op::ResetToAsync,
            // Prepare, Unprepare, Quiesce, Unquiesce, Start/Stop Copy,
            // Failover, Failback, Swap, Split…: defined by CIM, not here.
            6..=9 | 12..=22 | 0x8000..=0xFFFF => {
                return MethodResult::err(
                    ReturnValue::NotSupported,
                    format!("Operation {operation} is not supported"),
                )
            }
            _ => {
                return MethodResult::err(
                    ReturnValue::InvalidParameter,
                    format!("invalid Operation {operation}"),
                )
            }
        };
        let Some(id) = parse_sync_id(sync) else {
            return MethodResult::err(
                ReturnValue::InvalidParameter,
                format!("invalid Synchronization {sync:?}"),
            );
        };
        let found = self
            .locked()
            .assocs
            .get(&id)
            .map(|e| (e.assoc.clone(), e.source.clone(), e.job));
        let Some((assoc, source, job)) = found else {
            return self.modify_dormant(id, matches!(op, Op::Detach));
        };
        let Some(vol) = self.volume(&source) else {
            return MethodResult::err(ReturnValue::Unspecified, "source volume vanished");
        };
        let running_job = job.filter(|j| self.jobs.state(*j).is_some_and(|s| !s.is_finished()));
        let mut result = MethodResult::ok(ReturnValue::Completed);
        result.synchronization = Some(sync_instance_id(id));
        if let Op::Detach = op {
            if let Some(j) = running_job {
                if let Some(c) = self.jobs.control(j) {
                    c.request(JobRequest::Terminate);
                }
                let deadline = Instant::now() + self.cfg.quiesce_timeout;
                while self.jobs.state(j).is_some_and(|s| !s.is_finished()) {
                    if Instant::now() >= deadline {
                        return MethodResult::err(
                            ReturnValue::Timeout,
                            "the running copy job did not stop in time",
                        );
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            let Some(q) = vol.quiesce(self.cfg.quiesce_timeout) else {
                return MethodResult::err(
                    ReturnValue::Timeout,
                    "in-flight writes on the source did not drain in time",
                );
            };
            vol.remove_association(&q, id);
            drop(q);
            self.locked().assocs.remove(&id);
            assoc.stop();
            if let Err(e) = assoc.destroy_state() {
                tracing::warn!(sync = id, error = %e, "cannot remove association state");
            }
            return self.saved_or_2(result);
        }
        if running_job.is_some() {
            return MethodResult::err(
                ReturnValue::InUse,
                "a copy job is running on this association",
            );
        }
        let Some(q) = vol.quiesce(self.cfg.quiesce_timeout) else {
            return MethodResult::err(
                ReturnValue::Timeout,
                "in-flight writes on the source did not drain in time",
            );
        };
        let started = match op {
            Op::Fracture => assoc.fracture().map(|_| false),
            Op::Resync => assoc.begin_resync(),
            Op::Restore => assoc.begin_restore(),
            Op::ResetToSync => assoc.reset_to_sync(),
            Op::ResetToAsync => assoc.reset_to_async().map(|_| false),
            Op::Detach => Ok(false),
        };
        drop(q);
        let started = match started {
            Ok(s) => s,
            Err(why) => return MethodResult::err(ReturnValue::InvalidParameter, why),
        };
        if started {
            let name = match op {
                Op::Restore => "Restore",
                _ => "Resync",
            };
            let (job, _) = self.jobs.create(
                name,
                &format!("{name} of {}", sync_instance_id(id)),
                Some(id),
            );
            if let Some(e) = self.locked().assocs.get_mut(&id) {
                e.job = Some(job);
            }
            self.spawn_job(id, job);
            result.return_value = ReturnValue::JobStarted;
            result.job = Some(job_instance_id(job));
        }
        self.saved_or_2(result)
    }

    /// ModifySynchronization on an association whose source volume is not
    /// configured: only Detach (forget it and its state) is possible.
    fn modify_dormant(&self, id: u64, detach: bool) -> MethodResult {
        let mut g = self.locked();
        let Some(pos) = g.dormant.iter().position(|s| s.id == id) else {
            return MethodResult::err(
                ReturnValue::InvalidParameter,
                format!("unknown Synchronization {}", sync_instance_id(id)),
            );
        };
        if !detach {
            return MethodResult::err(
                ReturnValue::InvalidParameter,
                "the source volume of this association is not configured; only Detach is possible",
            );
        }
        g.dormant.remove(pos);
        drop(g);
        let dir = self.state_dir.join(format!("sync-{id}"));
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(sync = id, error = %e, "cannot remove association state");
            }
        }
        let mut r = MethodResult::ok(ReturnValue::Completed);
        r.synchronization = Some(sync_instance_id(id));
        self.saved_or_2(r)
    }

    fn saved_or_2(&self, r: MethodResult) -> MethodResult {
        match self.save() {
            Ok(()) => r,
            Err(e) => MethodResult {
                return_value: ReturnValue::Unspecified,
                error: Some(format!("operation done but state not saved: {e}")),
                ..r
            },
        }
    }

    /// CIM_ConcreteJob.RequestStateChange. Start/Suspend/Terminate/Kill
    /// wait (briefly) until the job has reached the requested state.
    pub fn request_job_state_change(
        &self,
        job: &str,
        requested: u64,
        timeout_given: bool,
    ) -> ReturnValue {
        let Some(id) = crate::jobs::parse_job_id(job) else {
            return ReturnValue::InvalidParameter;
        };
        let rv = self.jobs.request_state_change(id, requested, timeout_given);
        // The job's thread acts on a request between copy steps. Report 0
        // only once the job has reached the requested state (a Suspend that
        // returned 0 must mean no further region is copied), 4096 if that
        // takes longer than 5 s.
        let reached = |s: JobState| match requested {
            2 => s != JobState::Suspended,
            3 => s == JobState::Suspended || s.is_finished(),
            _ => s.is_finished(),
        };
        if rv == ReturnValue::Completed && matches!(requested, 2..=5) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.jobs.state(id).is_some_and(|s| !reached(s)) {
                if Instant::now() >= deadline {
                    return ReturnValue::JobStarted;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            self.mark_dirty();
        }
        rv
    }

    pub fn get_job(&self, job: &str) -> Option<JobInfo> {
        crate::jobs::parse_job_id(job).and_then(|id| self.jobs.get(id))
    }

    pub fn enumerate_jobs(&self) -> Vec<JobInfo> {
        self.jobs.list()
    }

    pub fn enumerate_synchronized(&self) -> Vec<SyncInfo> {
        let g = self.locked();
        let mut out: Vec<SyncInfo> = g
            .assocs
            .values()
            .map(|e| {
                let st = e.assoc.status();
                SyncInfo {
                    synchronization: sync_instance_id(st.id),
                    system_element: e.source.clone(),
                    synced_element: e.target.display(),
                    copy_type: st.copy_type.cim(),
                    sync_state: st.state.cim(),
                    sync_state_description: state_name(st.state).to_string(),
                    sync_maintained: st.copy_type.sync_maintained(),
                    when_established: cim_datetime(from_unix_ms(e.established_ms)),
                    when_synced: st.when_synced.map(cim_datetime),
                    percent_synced: st.percent_synced,
                    out_of_sync_bytes: st.out_of_sync_bytes,
                    job: e.job.map(job_instance_id),
                    journal_pending_records: st.lag.map(|l| l.records),
                    journal_pending_bytes: st.lag.map(|l| l.bytes),
                    journal_oldest_pending_age: st.lag.map(|l| l.oldest_age.as_secs_f64()),
                    error_description: st.error,
                }
            })
            .collect();
        out.extend(g.dormant.iter().map(|s| SyncInfo {
            synchronization: sync_instance_id(s.id),
            system_element: s.source.clone(),
            synced_element: s.target.display(),
            copy_type: s.copy_type.cim(),
            sync_state: SyncState::Broken.cim(),
            sync_state_description: state_name(SyncState::Broken).to_string(),
            sync_maintained: s.copy_type.sync_maintained(),
            when_established: cim_datetime(from_unix_ms(s.established_ms)),
            when_synced: s.when_synced_ms.map(|t| cim_datetime(from_unix_ms(t))),
            percent_synced: 0,
            out_of_sync_bytes: 0,
            job: None,
            journal_pending_records: None,
            journal_pending_bytes: None,
            journal_oldest_pending_age: None,
            error_description: Some("source volume is not configured".into()),
        }));
        out
    }

    pub fn enumerate_volumes(&self) -> Vec<VolumeInfo> {
        let g = self.locked();
        g.volumes
            .iter()
            .map(|(name, v)| VolumeInfo {
                name: name.clone(),
                path: v.path.display().to_string(),
                size: v.vol.size_bytes(),
                exported: v.exported,
                synchronizations: g
                    .assocs
                    .values()
                    .filter(|e| &e.source == name || e.target == TargetRef::Volume(name.clone()))
                    .map(|e| sync_instance_id(e.assoc.id()))
                    .collect(),
            })
            .collect()
    }

    /// The association with this id (tests, wiring).
    pub fn association(&self, sync: &str) -> Option<Arc<Association>> {
        let id = parse_sync_id(sync)?;
        self.locked().assocs.get(&id).map(|e| e.assoc.clone())
    }

    /// Wait until job `job` has finished (tests, `--wait`).
    pub fn wait_job(&self, job: &str, timeout: Duration) -> Option<JobInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.get_job(job)?;
            if info.job_state >= JobState::Completed.cim() {
                return Some(info);
            }
            if Instant::now() >= deadline {
                return Some(info);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stop shippers and jobs cleanly, clear the activity logs of idle
    /// volumes and save the state. Call after the frontends stopped.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wake.notify_all();
        let threads = std::mem::take(&mut self.locked().job_threads);
        for t in threads {
            let _ = t.join();
        }
        if let Some(h) = self
            .housekeeper
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = h.join();
        }
        let (vols, assocs): (Vec<_>, Vec<_>) = {
            let g = self.locked();
            (
                g.volumes.values().map(|v| v.vol.clone()).collect(),
                g.assocs.values().map(|e| e.assoc.clone()).collect(),
            )
        };
        for a in &assocs {
            a.stop();
        }
        for v in &vols {
            v.housekeep();
            v.housekeep();
        }
        if let Err(e) = self.save() {
            tracing::error!(error = %e, "cannot persist registry state at shutdown");
        }
    }
}

fn housekeeper(me: Weak<Registry>) {
    loop {
        let Some(r) = me.upgrade() else { return };
        if r.stopping.load(Ordering::SeqCst) {
            return;
        }
        let interval = r.cfg.housekeeping_interval;
        {
            let g = r.dirty.lock().unwrap_or_else(|e| e.into_inner());
            let (mut g, _) = r
                .wake
                .wait_timeout_while(g, interval, |d| !*d && !r.stopping.load(Ordering::SeqCst))
                .unwrap_or_else(|e| e.into_inner());
            *g = false;
        }
        if r.stopping.load(Ordering::SeqCst) {
            return;
        }
        let vols: Vec<_> = r.locked().volumes.values().map(|v| v.vol.clone()).collect();
        for v in vols {
            v.housekeep();
        }
        r.jobs.expire();
        if let Err(e) = r.save() {
            tracing::error!(error = %e, "cannot persist registry state");
        }
    }
}

#[cfg(test)]
mod tests;
