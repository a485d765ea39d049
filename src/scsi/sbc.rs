//! SBC-3 block commands over `BlockDev`: READ CAPACITY, READ/WRITE,
//! VERIFY, WRITE AND VERIFY, SYNCHRONIZE CACHE.
//!
//! READ and WRITE are the hot path: one data buffer for a read, none for a
//! write, shared stripes of the LU's range lock, no other allocation.

use std::sync::atomic::Ordering;

use super::cdb::Form;
use super::lu::LogicalUnit;
use super::sense::ScsiError;
use super::spc::{truncate, MAX_XFER_BYTES};
use crate::block::WriteFlags;

/// Chunk size for commands that scan ranges without a data buffer of the
/// whole range (VERIFY, compare loops).
const SCAN_CHUNK: usize = 1 << 20;

/// Byte range of `blocks` blocks at `lba`, checked against the capacity.
/// A zero-length range is checked too: its LBA may not lie beyond the end.
pub(crate) fn byte_range(lu: &LogicalUnit, lba: u64, blocks: u64) -> Result<(u64, u64), ScsiError> {
    let cap = lu.blocks();
    match lba.checked_add(blocks) {
        Some(end) if end <= cap => Ok((lba << lu.shift, blocks << lu.shift)),
        _ => Err(ScsiError::LbaOutOfRange),
    }
}

/// TRANSFER LENGTH above the Block Limits maximum: INVALID FIELD IN CDB.
fn check_xfer(lu: &LogicalUnit, form: Form, blocks: u32) -> Result<(), ScsiError> {
    if u64::from(blocks) << lu.shift > MAX_XFER_BYTES {
        return Err(ScsiError::cdb_byte(form.xfer_len_byte()));
    }
    Ok(())
}

/// The part of the data-out buffer a command uses; a shorter buffer is an
/// error (nothing is written), a longer one is cut.
fn data_for(data_out: &[u8], len: u64) -> Result<&[u8], ScsiError> {
    usize::try_from(len)
        .ok()
        .and_then(|n| data_out.get(..n))
        .ok_or(ScsiError::DataOutTooShort)
}

pub fn read_capacity10(lu: &LogicalUnit, lba: u32, pmi: bool) -> Result<Vec<u8>, ScsiError> {
    // SBC-3: LOGICAL BLOCK ADDRESS must be 0 unless PMI is set.
    if !pmi && lba != 0 {
        return Err(ScsiError::cdb_byte(2));
    }
    let last = lu.blocks().saturating_sub(1);
    let mut d = Vec::with_capacity(8);
    d.extend_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
    d.extend_from_slice(&lu.block_size().to_be_bytes());
    Ok(d)
}

pub fn read_capacity16(lu: &LogicalUnit, alloc_len: u32) -> Vec<u8> {
    let mut d = vec![0u8; 32];
    d[0..8].copy_from_slice(&lu.blocks().saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&lu.block_size().to_be_bytes());
    if lu.dev.caps().discard {
        d[14] = 0xC0; // LBPME, LBPRZ
    }
    truncate(d, alloc_len as usize)
}

pub fn read(lu: &LogicalUnit, form: Form, lba: u64, blocks: u32) -> Result<Vec<u8>, ScsiError> {
    check_xfer(lu, form, blocks)?;
    let (off, len) = byte_range(lu, lba, blocks.into())?;
    if len == 0 {
        return Ok(Vec::new());
    }
    // len <= MAX_XFER_BYTES, so it fits in usize.
    let mut buf = vec![0u8; len as usize];
    let _g = lu.locks.shared(off, len);
    lu.dev.read_at(&mut buf, off).map_err(ScsiError::read)?;
    Ok(buf)
}

/// Write flags for a write with the given FUA bit: with the write cache
/// disabled (WCE = 0) every write is forced to stable storage.
pub(crate) fn write_flags(lu: &LogicalUnit, fua: bool) -> WriteFlags {
    WriteFlags {
        fua: fua || !lu.mode.wce.load(Ordering::Relaxed),
    }
}

pub fn write(
    lu: &LogicalUnit,
    form: Form,
    lba: u64,
    blocks: u32,
    fua: bool,
    data_out: &[u8],
) -> Result<(), ScsiError> {
    lu.check_writable()?;
    check_xfer(lu, form, blocks)?;
    let (off, len) = byte_range(lu, lba, blocks.into())?;
    if len == 0 {
        return Ok(());
    }
    let data = data_for(data_out, len)?;
    let _g = lu.locks.shared(off, len);
    lu.dev
        .write_at(data, off, write_flags(lu, fua))
        .map_err(ScsiError::write)
}

/// Compare the medium at `off` with `expected(i)` for each byte offset,
/// chunk by chunk; the first difference is a MISCOMPARE whose INFORMATION
/// field is its offset from the start of the range.
fn compare_medium(
    lu: &LogicalUnit,
    off: u64,
    len: u64,
    expected: impl Fn(u64, &mut [u8]),
) -> Result<(), ScsiError> {
    let mut buf = vec![0u8; SCAN_CHUNK.min(len as usize)];
    let mut exp = vec![0u8; buf.len()];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        let (b, e) = (&mut buf[..n], &mut exp[..n]);
        lu.dev.read_at(b, off + done).map_err(ScsiError::read)?;
        expected(done, e);
        if let Some(i) = b.iter().zip(e.iter()).position(|(x, y)| x != y) {
            return Err(ScsiError::Miscompare {
                offset: done + i as u64,
            });
        }
        done += n as u64;
    }
    Ok(())
}

/// Read a range to check it is readable, chunk by chunk.
fn scan_medium(lu: &LogicalUnit, off: u64, len: u64) -> Result<(), ScsiError> {
    let mut buf = vec![0u8; SCAN_CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        lu.dev
            .read_at(&mut buf[..n], off + done)
            .map_err(ScsiError::read)?;
        done += n as u64;
    }
    Ok(())
}

/// VERIFY: BYTCHK 0 checks the medium is readable, 1 compares against the
/// data-out buffer, 3 compares every block against one data-out block.
pub fn verify(
    lu: &LogicalUnit,
    form: Form,
    lba: u64,
    blocks: u32,
    bytchk: u8,
    data_out: &[u8],
) -> Result<(), ScsiError> {
    if bytchk == 2 {
        return Err(ScsiError::cdb(1, 2));
    }
    if bytchk != 0 {
        check_xfer(lu, form, blocks)?;
    }
    let (off, len) = byte_range(lu, lba, blocks.into())?;
    if len == 0 {
        return Ok(());
    }
    let _g = lu.locks.shared(off, len);
    match bytchk {
        0 => scan_medium(lu, off, len),
        1 => {
            let data = data_for(data_out, len)?;
            compare_medium(lu, off, len, |at, e| {
                let s = at as usize;
                if let Some(src) = data.get(s..s + e.len()) {
                    e.copy_from_slice(src);
                }
            })
        }
        _ => {
            let bs = u64::from(lu.block_size());
            let block = data_for(data_out, bs)?;
            compare_medium(lu, off, len, |at, e| {
                for (i, b) in e.iter_mut().enumerate() {
                    let k = ((at + i as u64) % bs) as usize;
                    *b = block.get(k).copied().unwrap_or(0);
                }
            })
        }
    }
}

/// WRITE AND VERIFY: write (forced to stable storage), then read back and
/// compare.
pub fn write_and_verify(
    lu: &LogicalUnit,
    form: Form,
    lba: u64,
    blocks: u32,
    data_out: &[u8],
) -> Result<(), ScsiError> {
    lu.check_writable()?;
    check_xfer(lu, form, blocks)?;
    let (off, len) = byte_range(lu, lba, blocks.into())?;
    if len == 0 {
        return Ok(());
    }
    let data = data_for(data_out, len)?;
    let _g = lu.locks.shared(off, len);
    lu.dev
        .write_at(data, off, WriteFlags { fua: true })
        .map_err(ScsiError::write)?;
    compare_medium(lu, off, len, |at, e| {
        let s = at as usize;
        if let Some(src) = data.get(s..s + e.len()) {
            e.copy_from_slice(src);
        }
    })
}

/// SYNCHRONIZE CACHE: the range (0 blocks = to the end) is checked, then
/// the whole device is flushed.
pub fn sync_cache(lu: &LogicalUnit, lba: u64, blocks: u32) -> Result<(), ScsiError> {
    let cap = lu.blocks();
    let n = if blocks == 0 {
        cap.saturating_sub(lba)
    } else {
        u64::from(blocks)
    };
    if lba > cap {
        return Err(ScsiError::LbaOutOfRange);
    }
    byte_range(lu, lba, n)?;
    lu.dev.flush().map_err(ScsiError::write)
}
