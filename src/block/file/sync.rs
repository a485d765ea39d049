//! The plain engine: positional `pread`/`pwrite` through std's `FileExt`, one
//! syscall per transfer, no `unsafe`. It is the fallback when io_uring is not
//! available and the reference the io_uring engine is tested against.
//!
//! FUA writes go through a second descriptor of the same open file opened
//! with `O_DSYNC`: the kernel then treats each `pwrite` on it like
//! `pwritev2(RWF_DSYNC)` — durable for exactly that range when it returns —
//! without an `unsafe` libc call. Without that descriptor a FUA write is a
//! plain write followed by `fdatasync`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::Slot;
use crate::block::BatchOp;

/// Files the sync engine writes through.
#[derive(Debug, Clone, Copy)]
pub(super) struct SyncFiles<'a> {
    /// The device's main descriptor.
    pub file: &'a File,
    /// The same file opened with `O_DSYNC`, for FUA writes.
    pub dsync: Option<&'a File>,
}

/// Read exactly `buf.len()` bytes at `offset`. Short reads are continued;
/// end of file fills the rest with zeroes (a backing file shorter than the
/// device reads as if it were sparse up to the device size).
pub(super) fn read(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let Some(rest) = buf.get_mut(done..) else {
            break;
        };
        match file.read_at(rest, offset + done as u64) {
            Ok(0) => {
                rest.fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if retryable(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Write all of `buf` at `offset`; with `fua` the data is durable on return.
pub(super) fn write(files: SyncFiles<'_>, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
    let target = match (fua, files.dsync) {
        (true, Some(dsync)) => dsync,
        _ => files.file,
    };
    let mut done = 0usize;
    while done < buf.len() {
        let Some(rest) = buf.get(done..) else {
            break;
        };
        match target.write_at(rest, offset + done as u64) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if retryable(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    if fua && files.dsync.is_none() {
        datasync(files.file)?;
    }
    Ok(())
}

/// Which ops of a batch [`run`] takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Which {
    All,
    Writes,
}

/// Run a batch one op after another. Ops whose slot already has a result
/// (rejected before reaching the engine, or done elsewhere) are skipped.
pub(super) fn run(files: SyncFiles<'_>, ops: &mut [BatchOp<'_>], slots: &mut [Slot], which: Which) {
    for (op, slot) in ops.iter_mut().zip(slots.iter_mut()) {
        let wanted = which == Which::All || matches!(op, BatchOp::Write { .. });
        if slot.result.is_some() || !wanted {
            continue;
        }
        slot.result = Some(match op {
            BatchOp::Read { buf, offset } => read(files.file, buf, *offset),
            BatchOp::Write { buf, offset, flags } => write(files, buf, *offset, flags.fua),
        });
    }
}

/// `fdatasync`, retried on EINTR.
pub(super) fn datasync(file: &File) -> io::Result<()> {
    loop {
        match file.sync_data() {
            Err(e) if retryable(&e) => continue,
            other => return other,
        }
    }
}

/// EINTR and EAGAIN mean "try again"; regular files and block devices do not
/// return EAGAIN without O_NONBLOCK, but a retry is the right answer if they
/// do (after giving the CPU away, so that a stuck EAGAIN does not spin hot).
pub(super) fn retryable(e: &io::Error) -> bool {
    match e.kind() {
        io::ErrorKind::Interrupted => true,
        io::ErrorKind::WouldBlock => {
            std::thread::yield_now();
            true
        }
        _ => false,
    }
}
