//! SBC-3 block commands over `BlockDev`: READ CAPACITY, READ/WRITE,
//! VERIFY, WRITE AND VERIFY, SYNCHRONIZE CACHE.
//!
//! READ and WRITE are the hot path: one data buffer for a read, none for a
//! write, shared stripes of the LU's range lock, no other allocation.

use std::sync::atomic::Ordering;

use super::cdb::{Form, Reader};
use super::lu::LogicalUnit;
use super::sense::ScsiError;
use super::spc::{truncate, MAX_XFER_BYTES};
use super::{ScsiRequest, TaskAttr};
use crate::block::{FileExtent, WriteFlags};

/// Chunk size for commands that scan ranges without a data buffer of the
/// whole range (VERIFY, compare loops).
const SCAN_CHUNK: usize = 1 << 20;

/// READ and WRITE (6, 10, 12, 16): the command moves its data and does no
/// other work, so it takes about as long as one transfer of its data. A
/// frontend may run such a command on its receiving thread instead of
/// handing it to a worker (other writes, e.g. WRITE SAME, UNMAP or EXTENDED
/// COPY, can touch far more than they carry and must not block it).
pub fn is_plain_transfer(cdb: &[u8]) -> bool {
    matches!(
        cdb.first(),
        Some(0x08 | 0x0a | 0x28 | 0x2a | 0xa8 | 0xaa | 0x88 | 0x8a)
    )
}

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
        .ok_or(ScsiError::DataOutLength)
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
    d[13] = lu.lbppbe & 0x0F; // LOWEST ALIGNED LBA (bytes 14-15) stays 0
    if lu.dev.caps().discard {
        d[14] = 0xC0; // LBPME, LBPRZ
    }
    truncate(d, alloc_len as usize)
}

/// Smallest READ whose data goes by reference when the frontend allows it
/// ([`ReadData::File`]): below it a page-cache copy into a buffer costs
/// less than the extra system calls of sending a file range, and the
/// buffer path's small buffers come from malloc's per-thread caches.
pub const DATA_IN_BY_REF_MIN: u64 = 64 * 1024;

/// The data of a READ.
#[derive(Debug)]
pub enum ReadData {
    /// Read into a buffer (from the buffer pool).
    Buffer(Vec<u8>),
    /// A range of the backing file holding exactly the data; the frontend
    /// sends it from the page cache itself.
    File(FileExtent),
}

/// Whether a READ of `len` bytes for `req` may go by reference: the
/// frontend can take it, the task is SIMPLE (ORDERED and HEAD OF QUEUE
/// tasks take the buffer path: their data must be fixed when the task ends,
/// see `read`), and it is large enough to be worth it.
pub(crate) fn by_ref_allowed(req: &ScsiRequest<'_>, len: u64) -> bool {
    req.data_in_by_ref && req.task_attr == TaskAttr::Simple && len >= DATA_IN_BY_REF_MIN
}

/// READ(6/10/12/16). Every check (transfer length, LBA range; the
/// reservation, sanitize and started-state checks ran before dispatch)
/// happens here, before any data moves, in both modes.
///
/// With `by_ref` (see [`by_ref_allowed`]) and a device that can name the
/// file range ([`crate::block::BlockDev::file_extent`]), nothing is read:
/// the frontend sends the file's bytes with `sendfile(2)` when it writes
/// the Data-In, so the bytes leave the page cache at transmit time (in
/// fact until the receiver copies them out of the socket: the socket
/// buffers reference page-cache pages), not while the command executes.
/// That is still a correct READ because the status follows the data on
/// the same TCP stream: the initiator cannot see the status — and so cannot
/// issue a command that depends on this READ — before it has received every
/// data byte. A write issued without waiting for the status is concurrent
/// with the READ, and SAM gives concurrent SIMPLE tasks no order. Task
/// attributes that do order tasks take the buffer path (the iSCSI
/// frontend, in addition, stops asking for by-reference data on a session
/// once it has seen an ORDERED or HEAD OF QUEUE task there). A device
/// error the page cache meets at transmit time can no longer become a
/// CHECK CONDITION: the frontend drops the connection instead.
pub fn read(
    lu: &LogicalUnit,
    form: Form,
    lba: u64,
    blocks: u32,
    by_ref: bool,
) -> Result<ReadData, ScsiError> {
    check_xfer(lu, form, blocks)?;
    let (off, len) = byte_range(lu, lba, blocks.into())?;
    if len == 0 {
        return Ok(ReadData::Buffer(Vec::new()));
    }
    if by_ref {
        // Waits for exclusive holders of the range (COMPARE AND WRITE,
        // ORWRITE, SANITIZE) that started before this READ, as the buffer
        // path would; the bytes themselves are sampled later, see above.
        let g = lu.locks.shared(off, len);
        let extent = lu.dev.file_extent(off, len).map_err(ScsiError::read)?;
        drop(g);
        if let Some(extent) = extent {
            return Ok(ReadData::File(extent));
        }
    }
    // len <= MAX_XFER_BYTES, so it fits in usize.
    // `read_at` fills all of it or fails: a recycled buffer's old bytes
    // never leave.
    let pool = crate::block::bufpool::global();
    let mut buf = pool.take_for_overwrite(len as usize);
    let _g = lu.locks.shared(off, len);
    match lu.dev.read_at(&mut buf, off) {
        Ok(()) => Ok(ReadData::Buffer(buf)),
        Err(e) => {
            pool.give(buf);
            Err(ScsiError::read(e))
        }
    }
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

/// VPD B0 MAXIMUM WRITE SAME LENGTH, in blocks. Below 65536 so that a
/// WRITE SAME(16) of 65536 blocks is refused up front rather than asking
/// for 32 MiB+ transfers elsewhere (libiscsi's WriteSame16.Unmap checks
/// exactly that boundary).
pub const MAX_WS_BLOCKS: u64 = 0xFFFF;
/// VPD B0 MAXIMUM UNMAP LBA COUNT (per UNMAP command and per descriptor).
pub const MAX_UNMAP_BLOCKS: u64 = 1 << 20;
/// VPD B0 MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// VPD B0 MAXIMUM COMPARE AND WRITE LENGTH, in blocks.
pub const MAX_CAW_BLOCKS: u8 = 255;

/// Fields of WRITE SAME(10)/(16).
#[derive(Debug, Clone, Copy)]
pub struct WriteSameArgs {
    pub form: Form,
    pub lba: u64,
    pub blocks: u32,
    pub unmap: bool,
    pub anchor: bool,
    pub ndob: bool,
}

/// Write `len` bytes at `off` as repetitions of `block`, chunk by chunk.
fn write_pattern(
    lu: &LogicalUnit,
    off: u64,
    len: u64,
    block: &[u8],
    flags: WriteFlags,
) -> Result<(), ScsiError> {
    let bs = block.len().max(1);
    let per_chunk = (SCAN_CHUNK / bs).max(1);
    let n = (len as usize / bs).min(per_chunk);
    let buf: Vec<u8> = block.iter().copied().cycle().take(n * bs).collect();
    let mut done = 0u64;
    while done < len {
        let m = (len - done).min(buf.len() as u64) as usize;
        let chunk = buf.get(..m).ok_or(ScsiError::LbaOutOfRange)?;
        lu.dev
            .write_at(chunk, off + done, flags)
            .map_err(ScsiError::write)?;
        done += m as u64;
    }
    Ok(())
}

/// WRITE SAME(10)/(16). NUMBER OF LOGICAL BLOCKS 0 means "to the end of
/// the medium" (WSNZ = 0). With UNMAP on a thin LU the range is deallocated
/// (unmapped blocks read as zeroes, LBPRZ = 1).
pub fn write_same(lu: &LogicalUnit, a: WriteSameArgs, data_out: &[u8]) -> Result<(), ScsiError> {
    let WriteSameArgs {
        form,
        lba,
        blocks,
        unmap,
        anchor,
        ndob,
    } = a;
    lu.check_writable()?;
    if anchor {
        // ANC_SUP = 0; ANCHOR without UNMAP is invalid anyway.
        return Err(ScsiError::cdb(1, 4));
    }
    let thin = lu.dev.caps().discard;
    if unmap && !thin {
        return Err(ScsiError::cdb(1, 3));
    }
    let cap = lu.blocks();
    if lba > cap {
        return Err(ScsiError::LbaOutOfRange);
    }
    let n = if blocks == 0 {
        cap - lba
    } else {
        u64::from(blocks)
    };
    if n > MAX_WS_BLOCKS {
        return Err(ScsiError::cdb_byte(form.xfer_len_byte()));
    }
    let (off, len) = byte_range(lu, lba, n)?;
    let bs = u64::from(lu.block_size());
    let block: &[u8] = if ndob {
        &[]
    } else {
        if data_out.len() as u64 != bs {
            return Err(ScsiError::DataOutLength);
        }
        data_out
    };
    if len == 0 {
        return Ok(());
    }
    let flags = write_flags(lu, false);
    let _g = lu.locks.shared(off, len);
    if unmap {
        // Unmapped blocks read back as zeroes (LBPRZ); like Linux LIO and
        // as libiscsi's conformance tests expect, UNMAP deallocates
        // whatever pattern came with it.
        lu.dev.discard(off, len).map_err(ScsiError::write)
    } else if block.iter().all(|&b| b == 0) {
        lu.dev
            .write_zeroes(off, len, flags)
            .map_err(ScsiError::write)
    } else {
        write_pattern(lu, off, len, block, flags)
    }
}

/// UNMAP: validate every block descriptor first, then deallocate.
pub fn unmap(
    lu: &LogicalUnit,
    anchor: bool,
    param_len: u16,
    data_out: &[u8],
) -> Result<(), ScsiError> {
    lu.check_writable()?;
    if anchor {
        return Err(ScsiError::cdb(1, 0));
    }
    if param_len == 0 {
        return Ok(());
    }
    let params = data_out
        .get(..usize::from(param_len))
        .ok_or(ScsiError::ParamListLength)?;
    let r = Reader::new(params);
    let short = |_| ScsiError::ParamListLength;
    let data_len = usize::from(r.u16(0).map_err(short)?);
    let desc_len = usize::from(r.u16(2).map_err(short)?);
    if params.len() < 8 || data_len > params.len() - 2 || desc_len > params.len() - 8 {
        return Err(ScsiError::ParamListLength);
    }
    let count = desc_len / 16;
    if count > MAX_UNMAP_DESCRIPTORS as usize {
        return Err(ScsiError::param(2, None));
    }
    let mut ranges = Vec::with_capacity(count);
    let mut total = 0u64;
    for i in 0..count {
        let at = 8 + 16 * i;
        let lba = r.u64(at).map_err(short)?;
        let n = u64::from(r.u32(at + 8).map_err(short)?);
        total += n;
        if total > MAX_UNMAP_BLOCKS {
            return Err(ScsiError::param((at + 8) as u16, None));
        }
        ranges.push(byte_range(lu, lba, n)?);
    }
    for (off, len) in ranges {
        if len == 0 {
            continue;
        }
        let _g = lu.locks.shared(off, len);
        lu.dev.discard(off, len).map_err(ScsiError::write)?;
    }
    Ok(())
}

/// GET LBA STATUS: runs of mapped / deallocated blocks from `lba` on, as
/// many descriptors as the allocation length holds (at least one).
pub fn get_lba_status(lu: &LogicalUnit, lba: u64, alloc_len: u32) -> Result<Vec<u8>, ScsiError> {
    let cap = lu.blocks();
    if lba >= cap {
        return Err(ScsiError::LbaOutOfRange);
    }
    let max_desc = ((alloc_len.saturating_sub(8) / 16) as usize).clamp(1, 64);
    let mut d = vec![0u8; 8];
    let end = cap << lu.shift;
    let mut off = lba << lu.shift;
    let bs = u64::from(lu.block_size());
    while off < end && (d.len() - 8) / 16 < max_desc {
        let (mapped, run) = lu.dev.allocation(off, end - off).map_err(ScsiError::read)?;
        // Round partial blocks up: a block with any mapped byte counts whole.
        let blocks = run.div_ceil(bs).clamp(1, u64::from(u32::MAX));
        d.extend_from_slice(&(off >> lu.shift).to_be_bytes());
        d.extend_from_slice(&(blocks as u32).to_be_bytes());
        d.push(if mapped { 0 } else { 1 });
        d.extend_from_slice(&[0; 3]);
        off = off.saturating_add(blocks << lu.shift);
    }
    let n = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&n.to_be_bytes());
    Ok(truncate(d, alloc_len as usize))
}

/// COMPARE AND WRITE: compare the first half of the data-out buffer with
/// the medium and, if equal, write the second half — atomically against
/// every other command on the range (exclusive range lock).
pub fn compare_and_write(
    lu: &LogicalUnit,
    lba: u64,
    blocks: u8,
    fua: bool,
    data_out: &[u8],
) -> Result<(), ScsiError> {
    lu.check_writable()?;
    // NUMBER OF LOGICAL BLOCKS is one byte, so MAX_CAW_BLOCKS (255) bounds
    // it already.
    let (off, len) = byte_range(lu, lba, blocks.into())?;
    let n = len as usize;
    // The data-out buffer must be exactly what NUMBER OF LOGICAL BLOCKS
    // implies (verify + write data); a mismatch makes that field invalid.
    if data_out.len() != 2 * n {
        return Err(ScsiError::cdb_byte(13));
    }
    if len == 0 {
        return Ok(());
    }
    let (verify, write) = data_out.split_at(n);
    let _g = lu.locks.exclusive(off, len);
    let mut cur = vec![0u8; n];
    lu.dev.read_at(&mut cur, off).map_err(ScsiError::read)?;
    if let Some(i) = cur.iter().zip(verify).position(|(a, b)| a != b) {
        return Err(ScsiError::Miscompare { offset: i as u64 });
    }
    lu.dev
        .write_at(write, off, write_flags(lu, fua))
        .map_err(ScsiError::write)
}

/// ORWRITE(16): medium := medium OR data-out, atomically on the range.
pub fn or_write(
    lu: &LogicalUnit,
    lba: u64,
    blocks: u32,
    fua: bool,
    data_out: &[u8],
) -> Result<(), ScsiError> {
    lu.check_writable()?;
    check_xfer(lu, Form::Sixteen, blocks)?;
    let (off, len) = byte_range(lu, lba, blocks.into())?;
    if len == 0 {
        return Ok(());
    }
    let data = data_for(data_out, len)?;
    let _g = lu.locks.exclusive(off, len);
    let mut cur = vec![0u8; data.len()];
    lu.dev.read_at(&mut cur, off).map_err(ScsiError::read)?;
    for (c, d) in cur.iter_mut().zip(data) {
        *c |= d;
    }
    lu.dev
        .write_at(&cur, off, write_flags(lu, fua))
        .map_err(ScsiError::write)
}

/// PRE-FETCH(10)/(16): there is no cache of our own to fill, so only the
/// range is checked (GOOD rather than CONDITION MET).
pub fn pre_fetch(lu: &LogicalUnit, lba: u64, blocks: u32) -> Result<(), ScsiError> {
    byte_range(lu, lba, blocks.into()).map(|_| ())
}

/// READ DEFECT DATA(10)/(12): a virtual medium has no defects; the header
/// echoes the requested lists and format with an empty list.
pub fn read_defect_data(
    twelve: bool,
    plist: bool,
    glist: bool,
    format: u8,
    alloc_len: u32,
) -> Vec<u8> {
    let b1 = (u8::from(plist) << 4) | (u8::from(glist) << 3) | format;
    let d = if twelve {
        vec![0, b1, 0, 0, 0, 0, 0, 0]
    } else {
        vec![0, b1, 0, 0]
    };
    truncate(d, alloc_len as usize)
}

#[cfg(test)]
mod tests {
    use super::is_plain_transfer;

    #[test]
    fn plain_transfers_are_reads_and_writes_only() {
        for op in [0x08u8, 0x0a, 0x28, 0x2a, 0xa8, 0xaa, 0x88, 0x8a] {
            assert!(is_plain_transfer(&[op, 0, 0, 0, 0, 0]), "{op:#x}");
        }
        // TEST UNIT READY, INQUIRY, SYNCHRONIZE CACHE, WRITE SAME, UNMAP,
        // EXTENDED COPY, COMPARE AND WRITE, WRITE AND VERIFY, VERIFY,
        // WRITE SAME(16), SERVICE ACTION IN(16).
        for op in [
            0x00u8, 0x12, 0x35, 0x41, 0x42, 0x83, 0x89, 0x2e, 0x2f, 0x8e, 0x93, 0x9e,
        ] {
            assert!(!is_plain_transfer(&[op, 0, 0, 0, 0, 0]), "{op:#x}");
        }
        assert!(!is_plain_transfer(&[]));
    }
}
