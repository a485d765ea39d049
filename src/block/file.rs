//! The file backstore: a `BlockDev` over a regular file or a block device,
//! with two I/O engines behind one enum (the firecracker `FileEngine`
//! pattern):
//!
//! * [`EngineKind::IoUring`] — `IORING_OP_READ`/`WRITE` on a pool of small
//!   per-device rings, one ring per concurrent caller, the device's file
//!   registered in each. Rings carry the batches ([`BlockDev::submit_batch`])
//!   where many requests in flight pay; lone requests and buffered writes,
//!   which measured faster as plain syscalls, take `pread`/`pwrite` unless
//!   [`RingUse::Always`] is set (see `file/uring.rs` for the layout and the
//!   measurements);
//! * [`EngineKind::Sync`] — positional `pread`/`pwrite`, for tests and as the
//!   fallback when io_uring cannot be set up (seccomp, `io_uring_disabled`,
//!   old kernels, memory limits). [`EngineKind::Auto`] tries io_uring and
//!   falls back with a warning.
//!
//! Both engines give the same semantics, and one test suite runs against
//! both:
//! * short transfers are continued, EINTR/EAGAIN retried, ENOSPC/EDQUOT
//!   become [`BlockError::NoSpace`];
//! * reads past the end of a backing file shorter than the device return
//!   zeroes;
//! * a FUA write is durable when it returns (`RWF_DSYNC` on io_uring, an
//!   `O_DSYNC` descriptor on the sync engine); `flush` is `fdatasync`.
//!
//! Metadata operations do not need an engine: `discard` punches a hole
//! (`FALLOC_FL_PUNCH_HOLE`, probed at open), `write_zeroes` uses
//! `FALLOC_FL_ZERO_RANGE` where the filesystem has it, and `allocation`
//! answers from `SEEK_DATA`/`SEEK_HOLE`. The device size is fixed at open.

mod sync;
mod uring;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};

use super::{
    check_range, BatchOp, BlockCaps, BlockDev, BlockError, BlockResult, FileExtent, WriteFlags,
};
use sync::SyncFiles;
use uring::{UringEngine, RING_ENTRIES};

/// Which I/O engine a [`FileDev`] runs on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// io_uring; opening fails if io_uring cannot be set up.
    IoUring,
    /// Plain positional `pread`/`pwrite`.
    Sync,
    /// io_uring if it can be set up, else `Sync` (with a warning).
    #[default]
    Auto,
}

impl EngineKind {
    /// The name used in configuration and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::IoUring => "io_uring",
            EngineKind::Sync => "sync",
            EngineKind::Auto => "auto",
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An engine name that is none of `io_uring`, `sync`, `auto`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown I/O engine {0:?} (expected io_uring, sync or auto)")]
pub struct UnknownEngine(pub String);

impl FromStr for EngineKind {
    type Err = UnknownEngine;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "io_uring" | "io-uring" | "iouring" | "uring" => Ok(EngineKind::IoUring),
            "sync" => Ok(EngineKind::Sync),
            "auto" => Ok(EngineKind::Auto),
            other => Err(UnknownEngine(other.to_owned())),
        }
    }
}

/// How to open a [`FileDev`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileDevOptions {
    pub engine: EngineKind,
    /// Open read-only; writes, discards and zeroing fail with
    /// [`BlockError::ReadOnly`].
    pub read_only: bool,
    /// `O_DIRECT`: bypass the page cache. Buffers, offsets and lengths must
    /// then be aligned to the device's logical block size (the caller's job;
    /// misaligned I/O fails with EINVAL).
    pub direct: bool,
    /// If the path does not exist, create a sparse file of this size.
    /// An existing file keeps its size.
    pub create_size: Option<u64>,
}

/// What the path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backing {
    File,
    BlockDevice,
}

/// The running engine.
#[derive(Debug)]
enum Engine {
    Sync,
    IoUring(UringEngine),
}

/// Per-op progress shared by both engines.
#[derive(Debug, Default)]
struct Slot {
    /// Bytes transferred so far.
    done: usize,
    /// Set once the op has finished (or was rejected before the engine).
    result: Option<io::Result<()>>,
}

/// A block device backed by a regular file or a block device node.
#[derive(Debug)]
pub struct FileDev {
    engine: Engine,
    /// Shared with the [`FileExtent`]s handed out, which may outlive the
    /// device.
    file: Arc<File>,
    /// The same open file with `O_DSYNC`, for FUA writes on the sync path.
    dsync: Option<File>,
    path: PathBuf,
    size: u64,
    backing: Backing,
    caps: BlockCaps,
    /// `FALLOC_FL_ZERO_RANGE` not yet refused by the filesystem.
    zero_range: AtomicBool,
    /// A warning about a missing ring was already logged.
    ring_fallback_warned: AtomicBool,
    /// Opened with `O_DIRECT`.
    direct: bool,
    /// [`RingUse::Always`] is in force.
    ring_always: AtomicBool,
}

/// Which requests the io_uring engine puts on a ring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RingUse {
    /// Only where a ring was measured to beat plain syscalls: batches of
    /// more than one request, except buffered writes (see the module doc).
    /// Single requests and buffered writes take `pread`/`pwrite`.
    #[default]
    WhereFaster,
    /// Every request goes through a ring (for measurements and tests).
    Always,
}

mod ioctl {
    // BLKGETSIZE64 is _IOR(0x12, 114, size_t) but always stores a u64, so
    // the request code uses size_t while the destination is a u64.
    nix::ioctl_read_bad!(
        blk_getsize64,
        nix::request_code_read!(0x12, 114, std::mem::size_of::<usize>()),
        u64
    );
}

impl FileDev {
    /// Open `path` (a regular file or a block device) as a block device.
    pub fn open(path: &Path, opts: FileDevOptions) -> BlockResult<FileDev> {
        Self::open_with(path, opts, |file| UringEngine::new(file, RING_ENTRIES))
    }

    /// `open`, with the io_uring setup injectable so that tests can make it
    /// fail.
    fn open_with(
        path: &Path,
        opts: FileDevOptions,
        make_uring: impl FnOnce(&File) -> io::Result<UringEngine>,
    ) -> BlockResult<FileDev> {
        let direct = if opts.direct { libc::O_DIRECT } else { 0 };
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only).custom_flags(direct);
        let file = match opts.create_size {
            Some(create_size) if !opts.read_only => match oo.clone().create_new(true).open(path) {
                Ok(file) => {
                    file.set_len(create_size).map_err(BlockError::from_io)?;
                    file
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    oo.open(path).map_err(BlockError::from_io)?
                }
                Err(e) => return Err(BlockError::from_io(e)),
            },
            _ => oo.open(path).map_err(BlockError::from_io)?,
        };

        let meta = file.metadata().map_err(BlockError::from_io)?;
        let (backing, size) = if meta.file_type().is_block_device() {
            (Backing::BlockDevice, block_device_size(&file)?)
        } else if meta.file_type().is_file() {
            (Backing::File, meta.len())
        } else {
            return Err(BlockError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            )));
        };

        let dsync = if opts.read_only {
            None
        } else {
            reopen_dsync(&file, direct)
        };

        let caps = BlockCaps {
            discard: !opts.read_only
                && match backing {
                    Backing::File => punch_hole_works(&file, size),
                    Backing::BlockDevice => device_can_unmap(meta.rdev()),
                },
            allocation_status: backing == Backing::File && seek_data_works(&file),
            read_only: opts.read_only,
        };

        let engine = match opts.engine {
            EngineKind::Sync => Engine::Sync,
            EngineKind::IoUring => Engine::IoUring(make_uring(&file).map_err(BlockError::from_io)?),
            EngineKind::Auto => match make_uring(&file) {
                Ok(engine) => Engine::IoUring(engine),
                Err(error) => {
                    tracing::warn!(
                        path = %path.display(),
                        %error,
                        "io_uring unavailable, using the pread/pwrite engine"
                    );
                    Engine::Sync
                }
            },
        };

        Ok(FileDev {
            engine,
            file: Arc::new(file),
            dsync,
            path: path.to_owned(),
            size,
            backing,
            caps,
            zero_range: AtomicBool::new(true),
            ring_fallback_warned: AtomicBool::new(false),
            direct: opts.direct,
            ring_always: AtomicBool::new(false),
        })
    }

    /// The engine that actually runs (never `Auto`).
    pub fn engine(&self) -> EngineKind {
        match self.engine {
            Engine::Sync => EngineKind::Sync,
            Engine::IoUring(_) => EngineKind::IoUring,
        }
    }

    /// Choose which requests the io_uring engine puts on a ring (no effect
    /// on the sync engine).
    pub fn set_ring_use(&self, ring_use: RingUse) {
        self.ring_always
            .store(ring_use == RingUse::Always, Ordering::Relaxed);
    }

    /// Which requests the io_uring engine puts on a ring.
    pub fn ring_use(&self) -> RingUse {
        if self.ring_always.load(Ordering::Relaxed) {
            RingUse::Always
        } else {
            RingUse::WhereFaster
        }
    }

    /// The path this device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path is a block device node (rather than a regular file).
    pub fn is_block_device(&self) -> bool {
        self.backing == Backing::BlockDevice
    }

    fn sync_files(&self) -> SyncFiles<'_> {
        SyncFiles {
            file: &self.file,
            dsync: self.dsync.as_ref(),
        }
    }

    /// Run ops whose slot is still empty on the device's engine.
    fn run(&self, ops: &mut [BatchOp<'_>], slots: &mut [Slot]) {
        let Engine::IoUring(uring) = &self.engine else {
            return sync::run(self.sync_files(), ops, slots, sync::Which::All);
        };
        if !self.ring_always.load(Ordering::Relaxed) {
            // A lone request gains nothing from a ring: the caller blocks
            // either way, and the syscall is cheaper (module doc).
            let pending = slots.iter().filter(|s| s.result.is_none()).count();
            if pending <= 1 {
                return sync::run(self.sync_files(), ops, slots, sync::Which::All);
            }
            // Buffered writes on filesystems without async buffered writes
            // (ext4) are punted to io-wq workers: slower than pwrite.
            if !self.direct {
                sync::run(self.sync_files(), ops, slots, sync::Which::Writes);
            }
        }
        if let Err(error) = uring.run(ops, slots) {
            if !self.ring_fallback_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    path = %self.path.display(),
                    %error,
                    "cannot set up another io_uring; running such requests on pread/pwrite"
                );
            }
            sync::run(self.sync_files(), ops, slots, sync::Which::All);
        }
    }

    fn run_one(&self, op: BatchOp<'_>) -> BlockResult<()> {
        let mut ops = [op];
        let mut slots = [Slot::default()];
        self.run(&mut ops, &mut slots);
        let [slot] = slots;
        slot.result
            .unwrap_or_else(|| Err(io::Error::other("I/O engine left a request without result")))
            .map_err(BlockError::from_io)
    }

    fn check_writable(&self, offset: u64, len: u64) -> BlockResult<()> {
        if self.caps.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(self.size, offset, len)
    }

    /// `fallocate` on the device's file, retried on EINTR.
    fn fallocate(&self, mode: FallocateFlags, offset: u64, len: u64) -> Result<(), Errno> {
        let offset = i64::try_from(offset).map_err(|_| Errno::EFBIG)?;
        let len = i64::try_from(len).map_err(|_| Errno::EFBIG)?;
        loop {
            match fallocate(&self.file, mode, offset, len) {
                Err(Errno::EINTR) => continue,
                other => return other,
            }
        }
    }

    /// Zero a range by writing zero buffers (when `fallocate` can't).
    fn write_zero_buffers(&self, offset: u64, len: u64, flags: WriteFlags) -> BlockResult<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0u64;
        while done < len {
            let n = CHUNK.min(len - done) as usize;
            let buf = zeros.get(..n).unwrap_or_default();
            self.run_one(BatchOp::Write {
                buf,
                offset: offset + done,
                flags,
            })?;
            done += n as u64;
        }
        Ok(())
    }
}

impl BlockDev for FileDev {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.run_one(BatchOp::Read { buf, offset })
    }

    /// Buffered regular files only: the range is the same range of the
    /// file (bytes past a short file's end read as zeroes, as `read_at`
    /// gives them). `O_DIRECT` files bypass the page cache that
    /// `sendfile` reads from (and a caller may rely on the direct path);
    /// block devices would work with `sendfile` too but are left on the
    /// buffer path until they are measured and tested.
    fn file_extent(&self, offset: u64, len: u64) -> BlockResult<Option<FileExtent>> {
        check_range(self.size, offset, len)?;
        if self.direct || self.backing != Backing::File || len == 0 {
            return Ok(None);
        }
        Ok(Some(FileExtent {
            file: self.file.clone(),
            offset,
            len,
        }))
    }

    fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> BlockResult<()> {
        self.check_writable(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return if flags.fua { self.flush() } else { Ok(()) };
        }
        self.run_one(BatchOp::Write { buf, offset, flags })
    }

    fn flush(&self) -> BlockResult<()> {
        sync::datasync(&self.file).map_err(BlockError::from_io)
    }

    fn caps(&self) -> BlockCaps {
        self.caps
    }

    /// `POSIX_FADV_DONTNEED` over the whole file. Besides not holding a
    /// second copy of the data in memory, it keeps a replica's later small
    /// writes cheap: a copy writes 1 MiB at a time, the page cache keeps
    /// those pages as large folios, and on ext4 (kernel 6.18) every 4 KiB
    /// buffered write into a large folio walks all its buffer heads —
    /// measured 4.7 µs per random 4 KiB `pwrite` into a file written in
    /// 1 MiB pieces, 15–21 µs after a long sequential read, 1.5–2.2 µs once
    /// the pages were dropped (new 4 KiB folios, no read needed for whole
    /// blocks).
    fn release_cache(&self) {
        if self.direct {
            return;
        }
        if let Err(e) = nix::fcntl::posix_fadvise(
            &self.file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        ) {
            tracing::debug!(path = %self.path.display(), error = %e, "fadvise(DONTNEED) failed");
        }
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.check_writable(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // PUNCH_HOLE deallocates and guarantees that the range reads back
        // as zeroes, on files and (as a zeroing unmap) on block devices.
        // BLKDISCARD is not used: it does not promise zeroes afterwards.
        if self.caps.discard || self.backing == Backing::BlockDevice {
            let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            match self.fallocate(mode, offset, len) {
                Ok(()) => return Ok(()),
                // Not supported here, or (block devices) not aligned to the
                // logical block size: zero the range instead.
                Err(Errno::EOPNOTSUPP) | Err(Errno::EINVAL) => {}
                Err(e) => return Err(BlockError::from_io(e.into())),
            }
        }
        self.write_zeroes(offset, len, WriteFlags::default())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> BlockResult<()> {
        self.check_writable(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.zero_range.load(Ordering::Relaxed) {
            let mode = FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            match self.fallocate(mode, offset, len) {
                Ok(()) => {
                    // The zeroing is a metadata change (unwritten extents);
                    // fdatasync makes it durable.
                    return if flags.fua { self.flush() } else { Ok(()) };
                }
                // This filesystem never will (tmpfs, for one).
                Err(Errno::EOPNOTSUPP) => self.zero_range.store(false, Ordering::Relaxed),
                // Misaligned for a block device: write the zeroes.
                Err(Errno::EINVAL) => {}
                Err(e) => return Err(BlockError::from_io(e.into())),
            }
        }
        self.write_zero_buffers(offset, len, flags)
    }

    fn allocation(&self, offset: u64, len: u64) -> BlockResult<(bool, u64)> {
        check_range(self.size, offset, len)?;
        if !self.caps.allocation_status || len == 0 {
            return Ok((true, len));
        }
        let end = offset + len;
        let start = i64::try_from(offset).map_err(|_| BlockError::OutOfRange {
            offset,
            len,
            size: self.size,
        })?;
        // lseek moves the shared file position, which nothing else uses:
        // all data transfers are positional.
        match lseek(&self.file, start, Whence::SeekData) {
            Ok(data) if data as u64 <= offset => {
                let hole = lseek(&self.file, start, Whence::SeekHole)
                    .map_err(|e| BlockError::from_io(e.into()))? as u64;
                Ok((true, hole.clamp(offset + 1, end) - offset))
            }
            Ok(data) => Ok((false, (data as u64).min(end) - offset)),
            // No data at or after `offset` (including past the end of a
            // short backing file).
            Err(Errno::ENXIO) => Ok((false, len)),
            Err(e) => Err(BlockError::from_io(e.into())),
        }
    }

    fn submit_batch(&self, ops: &mut [BatchOp<'_>]) -> Vec<BlockResult<()>> {
        let mut rejected: Vec<Option<BlockError>> = Vec::with_capacity(ops.len());
        let mut slots: Vec<Slot> = Vec::with_capacity(ops.len());
        for op in ops.iter() {
            let check = match op {
                BatchOp::Read { buf, offset } => check_range(self.size, *offset, buf.len() as u64),
                BatchOp::Write { buf, offset, .. } => {
                    self.check_writable(*offset, buf.len() as u64)
                }
            };
            let mut slot = Slot::default();
            match check {
                Ok(()) if !op.is_empty() => rejected.push(None),
                Ok(()) => {
                    rejected.push(None);
                    slot.result = Some(Ok(()));
                }
                Err(e) => {
                    rejected.push(Some(e));
                    // Marked finished so that the engine skips it.
                    slot.result = Some(Ok(()));
                }
            }
            slots.push(slot);
        }
        self.run(ops, &mut slots);
        slots
            .into_iter()
            .zip(rejected)
            .map(|(slot, rejected)| match rejected {
                Some(e) => Err(e),
                None => slot
                    .result
                    .unwrap_or_else(|| {
                        Err(io::Error::other("I/O engine left a request without result"))
                    })
                    .map_err(BlockError::from_io),
            })
            .collect()
    }
}

/// Size of a block device in bytes.
fn block_device_size(file: &File) -> BlockResult<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 stores one u64 through the pointer, which points
    // to a live, writable, properly aligned u64 for the duration of the call;
    // the descriptor is open (borrowed from `file`).
    unsafe { ioctl::blk_getsize64(file.as_raw_fd(), &mut size) }
        .map_err(|e| BlockError::from_io(e.into()))?;
    Ok(size)
}

/// A second descriptor for the same open file (not the path, which may have
/// been renamed or replaced since) with `O_DSYNC`, so that each write on it
/// is durable when it returns.
/// Read exactly `buf.len()` bytes of `file` at `offset` as a [`FileDev`]
/// does: short reads continued, EINTR retried, bytes past the file's end
/// read as zeroes. For holders of a [`FileExtent`] that need its bytes in
/// memory after all.
pub fn read_file_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    sync::read(file, buf, offset)
}

fn reopen_dsync(file: &File, direct: i32) -> Option<File> {
    let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC | direct)
        .open(&proc_path)
    {
        Ok(dsync) => Some(dsync),
        Err(error) => {
            tracing::debug!(%error, "no O_DSYNC descriptor; FUA writes will fdatasync");
            None
        }
    }
}

/// Whether this filesystem can punch holes: punch one just past the end of
/// the file, which changes nothing where it works.
fn punch_hole_works(file: &File, size: u64) -> bool {
    let Ok(offset) = i64::try_from(size) else {
        return false;
    };
    let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    fallocate(file, mode, offset, 4096).is_ok()
}

/// Whether `SEEK_DATA` works (every Linux filesystem answers it, at worst
/// with "all data"; EINVAL would mean a kernel without it).
fn seek_data_works(file: &File) -> bool {
    !matches!(lseek(file, 0, Whence::SeekData), Err(Errno::EINVAL))
}

/// Whether a block device can both unmap and zero, which is what a
/// zeroing `PUNCH_HOLE` needs to deallocate rather than write zeroes.
fn device_can_unmap(rdev: u64) -> bool {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let base = format!("/sys/dev/block/{major}:{minor}");
    let queue_value = |name: &str| -> u64 {
        // Partitions have no queue/ of their own; it is their disk's.
        [
            format!("{base}/queue/{name}"),
            format!("{base}/../queue/{name}"),
        ]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
    };
    queue_value("discard_max_bytes") > 0 && queue_value("write_zeroes_max_bytes") > 0
}

#[cfg(test)]
mod tests;
