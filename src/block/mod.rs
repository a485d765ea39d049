//! The block layer: the `BlockDev` trait that the SCSI core (and the mirror
//! layer) sees — byte ranges, flush and FUA, nothing SCSI — and the file
//! backstore with its two I/O engines (io_uring and plain pread/pwrite).

use std::fs::File;
use std::sync::Arc;

pub mod bufpool;
pub mod file;
pub mod mem;

/// Errors a backstore reports. The SCSI core maps each to sense data in one
/// place (`scsi::sense`).
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The range lies (partly) beyond the end of the device.
    #[error("range {offset}+{len} beyond device end {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The backing storage is full (ENOSPC/EDQUOT).
    #[error("no space left on backing storage")]
    NoSpace,
    /// The device refuses writes.
    #[error("device is read-only")]
    ReadOnly,
    /// The operation is not supported by this backstore.
    #[error("operation not supported by backstore")]
    Unsupported,
    /// Any other I/O error from the backing storage.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl BlockError {
    /// Classify an `io::Error`, pulling ENOSPC/EDQUOT out as `NoSpace`.
    pub fn from_io(e: std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => BlockError::NoSpace,
            Some(libc::EROFS) => BlockError::ReadOnly,
            _ => BlockError::Io(e),
        }
    }
}

pub type BlockResult<T> = Result<T, BlockError>;

/// Per-write options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force Unit Access: the data must be on stable storage when the call
    /// returns.
    pub fua: bool,
}

/// What a backstore can do natively; the SCSI core emulates the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockCaps {
    /// `discard` deallocates (thin provisioning); reads of discarded ranges
    /// return zeroes.
    pub discard: bool,
    /// `allocation` can tell mapped from unmapped ranges.
    pub allocation_status: bool,
    /// The device refuses writes.
    pub read_only: bool,
}

/// Where the bytes of a device range live in an open file: what
/// [`BlockDev::read_at`] of that range would return is the file's bytes at
/// `offset..offset + len`, with bytes past the file's end reading as zeroes
/// (a backing file shorter than the device). A frontend can move them into
/// a socket with `sendfile(2)` without copying them through a buffer.
///
/// The handle is shared with the device: the file stays open as long as an
/// extent of it is alive, even if the device is closed meanwhile.
#[derive(Debug, Clone)]
pub struct FileExtent {
    /// The device's open file (buffered, not `O_DIRECT`).
    pub file: Arc<File>,
    /// Byte offset of the range in the file.
    pub offset: u64,
    /// Length of the range in bytes.
    pub len: u64,
}

impl PartialEq for FileExtent {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.file, &other.file) && self.offset == other.offset && self.len == other.len
    }
}

impl Eq for FileExtent {}

/// A byte-addressed block device. Implementations must be safe to call from
/// many threads at once; ordering between overlapping concurrent writes is
/// the caller's business (as on a disk).
pub trait BlockDev: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Read exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()>;

    /// Write all of `buf` at `offset`. With `flags.fua` the data is durable
    /// when this returns.
    fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> BlockResult<()>;

    /// Make every completed write durable.
    fn flush(&self) -> BlockResult<()>;

    /// Capabilities of this device.
    fn caps(&self) -> BlockCaps;

    /// Drop the device's clean cached pages, if it has a page cache; a
    /// hint, called right after a [`flush`](Self::flush) of a device whose
    /// contents nobody reads back soon (a replica).
    fn release_cache(&self) {}

    /// Deallocate a range; later reads return zeroes. Default: write zeroes.
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.write_zeroes(offset, len, WriteFlags::default())
    }

    /// Write zeroes over a range. Default: write a zero buffer in chunks.
    fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> BlockResult<()> {
        check_range(self.size(), offset, len)?;
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0u64;
        while done < len {
            let n = CHUNK.min(len - done) as usize;
            self.write_at(&zeros[..n], offset + done, flags)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Allocation status of the range starting at `offset`: `(mapped,
    /// length of the run with that status)`, the run clipped to `len`.
    /// Default: everything is mapped.
    fn allocation(&self, offset: u64, len: u64) -> BlockResult<(bool, u64)> {
        check_range(self.size(), offset, len)?;
        Ok((true, len))
    }

    /// The open file and offset that hold the bytes of `offset..offset +
    /// len` unchanged (see [`FileExtent`]), for a caller that wants to send
    /// them without reading them into a buffer. The range is checked as
    /// [`BlockDev::read_at`] checks it. `Ok(None)` means the device cannot
    /// name such a file range (memory devices, `O_DIRECT` files, layers that
    /// transform or redirect reads): use `read_at`. Default: `Ok(None)`.
    fn file_extent(&self, offset: u64, len: u64) -> BlockResult<Option<FileExtent>> {
        check_range(self.size(), offset, len)?;
        Ok(None)
    }

    /// Run several reads/writes as one batch; one result per op, in order.
    /// Ops in a batch may run concurrently and in any order, so overlapping
    /// ops in one batch have no defined order (as with queued commands on a
    /// disk). Backstores that can keep many requests in flight (the io_uring
    /// engine) override this; the default runs the ops one after another.
    fn submit_batch(&self, ops: &mut [BatchOp<'_>]) -> Vec<BlockResult<()>> {
        ops.iter_mut()
            .map(|op| match op {
                BatchOp::Read { buf, offset } => self.read_at(buf, *offset),
                BatchOp::Write { buf, offset, flags } => self.write_at(buf, *offset, *flags),
            })
            .collect()
    }
}

/// One request of a [`BlockDev::submit_batch`] call.
#[derive(Debug)]
pub enum BatchOp<'a> {
    /// Read exactly `buf.len()` bytes at `offset`.
    Read { buf: &'a mut [u8], offset: u64 },
    /// Write all of `buf` at `offset`.
    Write {
        buf: &'a [u8],
        offset: u64,
        flags: WriteFlags,
    },
}

impl BatchOp<'_> {
    /// Byte offset of the op.
    pub fn offset(&self) -> u64 {
        match self {
            BatchOp::Read { offset, .. } | BatchOp::Write { offset, .. } => *offset,
        }
    }

    /// Length of the op in bytes.
    pub fn len(&self) -> usize {
        match self {
            BatchOp::Read { buf, .. } => buf.len(),
            BatchOp::Write { buf, .. } => buf.len(),
        }
    }

    /// Whether the op transfers no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Shared handle to a block device.
pub type SharedDev = Arc<dyn BlockDev>;

/// Check that `offset..offset+len` lies within a device of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: u64) -> BlockResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}
