//! EXTENDED COPY (LID1) with block→block segment descriptors between LUs of
//! the same `LunMap`, RECEIVE COPY RESULTS (copy status, operating
//! parameters) and the Third-party Copy VPD page (0x8F).
//!
//! Copy targets are named by identification descriptors (0xE4) carrying a
//! designator from VPD 0x83; we resolve NAA designators against the LUs of
//! the map. Copies run synchronously, chunk by chunk.

use std::collections::VecDeque;
use std::sync::Arc;

use super::cdb::{Attrs, Reader};
use super::lu::LogicalUnit;
use super::lun_map::LunMap;
use super::sense::{Asc, ScsiError, Sense, SenseKey};
use super::spc::truncate;
use super::ua::NexusKey;
use super::Nexus;

/// Operating parameters we report and enforce.
pub const MAX_TARGET_DESCRIPTORS: u16 = 4;
pub const MAX_SEGMENT_DESCRIPTORS: u16 = 16;
pub const MAX_DESCRIPTOR_LIST_LENGTH: u32 = 1024;
/// Copy in pieces of this size (bytes).
const CHUNK: u64 = 1 << 20;
/// Copy results kept per LU for RECEIVE COPY RESULTS.
const HELD_RESULTS: usize = 32;

const TARGET_DESC_IDENT: u8 = 0xE4;
const SEG_BLOCK_TO_BLOCK: u8 = 0x02;
const PARAM_HEADER_LEN: usize = 16;
const TARGET_DESC_LEN: usize = 32;
const SEG_B2B_LEN: usize = 28;

/// Outcome of one EXTENDED COPY, for COPY STATUS.
#[derive(Debug, Clone)]
pub(crate) struct CopyRecord {
    nexus: NexusKey,
    list_id: u8,
    ok: bool,
    segments: u16,
    bytes: u64,
}

/// Held copy results of one LU.
#[derive(Debug, Default)]
pub(crate) struct CopyResults {
    held: VecDeque<CopyRecord>,
}

impl CopyResults {
    fn record(&mut self, r: CopyRecord) {
        self.held
            .retain(|h| !(h.nexus == r.nexus && h.list_id == r.list_id));
        if self.held.len() == HELD_RESULTS {
            self.held.pop_front();
        }
        self.held.push_back(r);
    }

    fn find(&self, n: &Nexus, list_id: u8) -> Option<&CopyRecord> {
        self.held.iter().find(|h| {
            h.list_id == list_id
                && *h.nexus.initiator == *n.initiator_port
                && *h.nexus.target == *n.target_port
        })
    }
}

fn copy_aborted(asc: Asc) -> ScsiError {
    ScsiError::Other(Sense::new(SenseKey::CopyAborted, asc))
}

fn param(asc: Asc, byte: usize) -> ScsiError {
    ScsiError::Other(Sense {
        field: Some(super::sense::FieldPointer {
            in_cdb: false,
            byte: byte as u16,
            bit: None,
        }),
        ..Sense::new(SenseKey::IllegalRequest, asc)
    })
}

/// A copy target: the LU an identification descriptor names.
struct Target {
    lu: Arc<LogicalUnit>,
}

struct Segment {
    src: usize,
    dst: usize,
    blocks: u64,
    src_lba: u64,
    dst_lba: u64,
}

/// Parse and validate the parameter list, in the order libiscsi and SPC-4
/// expect: lengths, counts, descriptor types, then target resolution.
fn parse(map: &LunMap, params: &[u8]) -> Result<(u8, u8, Vec<Target>, Vec<Segment>), ScsiError> {
    let r = Reader::new(params);
    let short = |_| ScsiError::ParamListLength;
    if params.len() < PARAM_HEADER_LEN {
        return Err(ScsiError::ParamListLength);
    }
    let list_id = r.u8(0).map_err(short)?;
    let usage = (r.u8(1).map_err(short)? >> 3) & 0x03;
    let tgt_len = usize::from(r.u16(2).map_err(short)?);
    let seg_len = r.u32(8).map_err(short)? as usize;
    let inline_len = r.u32(12).map_err(short)? as usize;
    if PARAM_HEADER_LEN + tgt_len + seg_len + inline_len > params.len() {
        return Err(ScsiError::ParamListLength);
    }
    if tgt_len + seg_len > MAX_DESCRIPTOR_LIST_LENGTH as usize {
        return Err(ScsiError::ParamListLength);
    }
    if inline_len != 0 {
        return Err(ScsiError::param(12, None));
    }
    if tgt_len % TARGET_DESC_LEN != 0 {
        return Err(ScsiError::param(2, None));
    }
    let n_tgt = tgt_len / TARGET_DESC_LEN;
    if n_tgt > usize::from(MAX_TARGET_DESCRIPTORS) {
        return Err(param(Asc::TOO_MANY_TARGET_DESCRIPTORS, 2));
    }
    // Segment descriptors: count and type first.
    let seg_base = PARAM_HEADER_LEN + tgt_len;
    let mut segs = Vec::new();
    let mut at = seg_base;
    while at < seg_base + seg_len {
        if segs.len() == usize::from(MAX_SEGMENT_DESCRIPTORS) {
            return Err(param(Asc::TOO_MANY_SEGMENT_DESCRIPTORS, 8));
        }
        let ty = r.u8(at).map_err(short)?;
        if ty != SEG_BLOCK_TO_BLOCK {
            return Err(param(Asc::UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE, at));
        }
        let len = usize::from(r.u16(at + 2).map_err(short)?);
        if len + 4 != SEG_B2B_LEN {
            return Err(ScsiError::param((at + 2) as u16, None));
        }
        if at + SEG_B2B_LEN > seg_base + seg_len {
            return Err(ScsiError::ParamListLength);
        }
        segs.push(Segment {
            src: usize::from(r.u16(at + 4).map_err(short)?),
            dst: usize::from(r.u16(at + 6).map_err(short)?),
            blocks: u64::from(r.u16(at + 10).map_err(short)?),
            src_lba: r.u64(at + 12).map_err(short)?,
            dst_lba: r.u64(at + 20).map_err(short)?,
        });
        at += SEG_B2B_LEN;
    }
    // Target descriptors.
    let mut targets = Vec::with_capacity(n_tgt);
    for i in 0..n_tgt {
        let at = PARAM_HEADER_LEN + i * TARGET_DESC_LEN;
        let ty = r.u8(at).map_err(short)?;
        if ty != TARGET_DESC_IDENT {
            return Err(param(Asc::UNSUPPORTED_TARGET_DESCRIPTOR_TYPE, at));
        }
        // Byte 1: LU ID TYPE (ignored in SPC-4), NUL (obsolete), device type.
        if r.u8(at + 1).map_err(short)? & 0x1F != 0 {
            return Err(ScsiError::param((at + 1) as u16, Some(4)));
        }
        let desig_type = r.u8(at + 5).map_err(short)? & 0x0F;
        let desig_len = usize::from(r.u8(at + 7).map_err(short)?);
        if desig_len > 20 {
            return Err(ScsiError::param((at + 7) as u16, None));
        }
        let desig = r.bytes(at + 8, desig_len).map_err(short)?;
        let lu = match desig_type {
            0x3 => map.find_by_naa(desig),
            _ => None,
        }
        .ok_or(copy_aborted(Asc::UNREACHABLE_COPY_TARGET))?;
        let bs = r.u24(at + 29).map_err(short)?;
        if bs != lu.block_size() {
            return Err(ScsiError::param((at + 29) as u16, None));
        }
        targets.push(Target { lu: lu.clone() });
    }
    Ok((list_id, usage, targets, segs))
}

/// EXTENDED COPY (LID1) received by `lu` from nexus `n`.
pub(crate) fn extended_copy(
    lu: &LogicalUnit,
    map: &LunMap,
    n: &Nexus,
    param_len: u32,
    data_out: &[u8],
    check: impl Fn(&LogicalUnit, &Attrs) -> Result<(), ScsiError>,
) -> Result<(), ScsiError> {
    if param_len == 0 {
        return Ok(());
    }
    let params = usize::try_from(param_len)
        .ok()
        .and_then(|l| data_out.get(..l))
        .ok_or(ScsiError::ParamListLength)?;
    let (list_id, usage, targets, segs) = parse(map, params)?;
    let mut bytes = 0u64;
    let mut done = 0u16;
    let result = (|| {
        for s in &segs {
            let (Some(src), Some(dst)) = (targets.get(s.src), targets.get(s.dst)) else {
                return Err(copy_aborted(Asc::UNREACHABLE_COPY_TARGET));
            };
            bytes += copy_segment(&src.lu, &dst.lu, s, &check)?;
            done += 1;
        }
        Ok(())
    })();
    // LIST ID USAGE 00b: hold the results for RECEIVE COPY RESULTS.
    if usage == 0 {
        lu.copies().record(CopyRecord {
            nexus: NexusKey::of(n),
            list_id,
            ok: result.is_ok(),
            segments: done,
            bytes,
        });
    }
    result
}

fn copy_segment(
    src: &LogicalUnit,
    dst: &LogicalUnit,
    s: &Segment,
    check: &impl Fn(&LogicalUnit, &Attrs) -> Result<(), ScsiError>,
) -> Result<u64, ScsiError> {
    const READ: Attrs = Attrs {
        pr: super::cdb::PrClass::Read,
        spc2_ok: false,
        media: true,
        thin: false,
        timeout: 0,
    };
    const WRITE: Attrs = Attrs {
        pr: super::cdb::PrClass::Write,
        ..READ
    };
    check(src, &READ)?;
    check(dst, &WRITE)?;
    dst.check_writable()?;
    let in_range = |lu: &LogicalUnit, lba: u64| {
        lba.checked_add(s.blocks)
            .is_some_and(|end| end <= lu.blocks())
    };
    if !in_range(src, s.src_lba) || !in_range(dst, s.dst_lba) {
        return Err(copy_aborted(Asc::NO_ADDITIONAL));
    }
    let len = s.blocks << src.shift;
    let (soff, doff) = (s.src_lba << src.shift, s.dst_lba << dst.shift);
    let mut buf = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        let b = buf.get_mut(..n).ok_or(ScsiError::LbaOutOfRange)?;
        {
            let _g = src.locks.shared(soff + done, n as u64);
            src.dev.read_at(b, soff + done).map_err(ScsiError::read)?;
        }
        {
            let _g = dst.locks.shared(doff + done, n as u64);
            dst.dev
                .write_at(b, doff + done, super::sbc::write_flags(dst, false))
                .map_err(ScsiError::write)?;
        }
        done += n as u64;
    }
    Ok(len)
}

/// RECEIVE COPY RESULTS: COPY STATUS (0) and OPERATING PARAMETERS (3).
pub(crate) fn receive_copy_results(
    lu: &LogicalUnit,
    n: &Nexus,
    sa: u8,
    list_id: u8,
    alloc_len: u32,
) -> Result<Vec<u8>, ScsiError> {
    let d = match sa {
        0x00 => {
            let held = lu.copies();
            let rec = held.find(n, list_id).ok_or(ScsiError::cdb_byte(2))?;
            let mut d = Vec::with_capacity(12);
            d.extend_from_slice(&8u32.to_be_bytes());
            d.push(if rec.ok { 0x01 } else { 0x02 });
            d.extend_from_slice(&rec.segments.to_be_bytes());
            // Transfer count in kibibytes keeps large copies in 32 bits.
            d.push(0x01);
            d.extend_from_slice(
                &u32::try_from(rec.bytes >> 10)
                    .unwrap_or(u32::MAX)
                    .to_be_bytes(),
            );
            d
        }
        _ => {
            let bs = u32::from(MAX_SEGMENT_BYTES_BLOCKS) * lu.block_size();
            let mut d = vec![0u8; 44];
            d[4] = 0x01; // SNLID: LIST ID USAGE 11b supported
            d[8..10].copy_from_slice(&MAX_TARGET_DESCRIPTORS.to_be_bytes());
            d[10..12].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
            d[12..16].copy_from_slice(&MAX_DESCRIPTOR_LIST_LENGTH.to_be_bytes());
            d[16..20].copy_from_slice(&bs.to_be_bytes());
            d[24..28].copy_from_slice(&0u32.to_be_bytes()); // held data limit
            d[34..36].copy_from_slice(&1u16.to_be_bytes()); // total concurrent copies
            d[36] = 1;
            d[37] = lu.shift as u8; // data segment granularity (log2)
            let codes = [SEG_BLOCK_TO_BLOCK, TARGET_DESC_IDENT];
            d[43] = codes.len() as u8;
            d.extend_from_slice(&codes);
            let n = (d.len() - 4) as u32;
            d[0..4].copy_from_slice(&n.to_be_bytes());
            d
        }
    };
    Ok(truncate(d, alloc_len as usize))
}

/// The block count field of a block→block segment is 16 bits.
const MAX_SEGMENT_BYTES_BLOCKS: u16 = u16::MAX;

/// VPD 0x8F payload (after the 4-byte page header).
pub(crate) fn third_party_copy_vpd() -> Vec<u8> {
    let mut p = Vec::with_capacity(96);
    // Supported Commands descriptor (type 0x0001).
    let cmds: [(u8, &[u8]); 2] = [(0x83, &[0x00]), (0x84, &[0x00, 0x03])];
    let mut list = Vec::new();
    for (op, sas) in cmds {
        list.push(op);
        list.push(sas.len() as u8);
        list.extend_from_slice(sas);
    }
    let mut body = vec![list.len() as u8];
    body.extend(list);
    while (body.len() + 4) % 4 != 0 {
        body.push(0);
    }
    descriptor(&mut p, 0x0001, &body);
    // Parameter Data descriptor (type 0x0008).
    let mut pd = vec![0u8; 0x1C];
    pd[2..4].copy_from_slice(&MAX_TARGET_DESCRIPTORS.to_be_bytes());
    pd[4..6].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
    pd[6..10].copy_from_slice(&MAX_DESCRIPTOR_LIST_LENGTH.to_be_bytes());
    descriptor(&mut p, 0x0008, &pd);
    // Supported Descriptors descriptor (type 0x0009).
    let mut sd = vec![2u8, SEG_BLOCK_TO_BLOCK, TARGET_DESC_IDENT];
    while (sd.len() + 4) % 4 != 0 {
        sd.push(0);
    }
    descriptor(&mut p, 0x0009, &sd);
    p
}

fn descriptor(out: &mut Vec<u8>, ty: u16, body: &[u8]) {
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
}
