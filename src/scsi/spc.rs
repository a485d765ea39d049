//! SPC-4 primary commands: INQUIRY and its VPD pages, REQUEST SENSE, MODE
//! SENSE/SELECT, REPORT SUPPORTED OPERATION CODES, REPORT TARGET PORT
//! GROUPS. Each returns the full data-in, truncated to the CDB's allocation
//! length.

use std::sync::atomic::Ordering;

use super::cdb::{self, Reader, OPCODES};
use super::lu::LogicalUnit;
use super::sbc;
use super::sense::{Asc, ScsiError, Sense, SenseKey};
use super::Nexus;

/// Largest READ/WRITE the LU accepts, in bytes (VPD B0 MAXIMUM TRANSFER
/// LENGTH is derived from it).
pub const MAX_XFER_BYTES: u64 = 8 << 20;
/// Preferred transfer size, in bytes (VPD B0 OPTIMAL TRANSFER LENGTH).
pub const OPT_XFER_BYTES: u64 = 1 << 20;

/// Version descriptors claimed in standard INQUIRY data.
const VERSION_DESCRIPTORS: [u16; 4] = [
    0x00A0, // SAM-5
    0x0460, // SPC-4
    0x04C0, // SBC-3
    0x0960, // iSCSI
];

/// VPD pages we serve, ascending.
pub const VPD_PAGES: [u8; 7] = [0x00, 0x80, 0x83, 0x8F, 0xB0, 0xB1, 0xB2];

pub(crate) fn truncate(mut v: Vec<u8>, alloc_len: usize) -> Vec<u8> {
    v.truncate(alloc_len);
    v
}

/// Copy `s` into a fixed-width ASCII field, space padded; characters SPC
/// does not allow there become '_'.
fn ascii_field(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    for (d, c) in dst.iter_mut().zip(s.bytes()) {
        *d = if (0x20..=0x7E).contains(&c) { c } else { b'_' };
    }
}

fn ascii_bytes(s: &str, max: usize) -> Vec<u8> {
    s.bytes()
        .take(max)
        .map(|c| if (0x20..=0x7E).contains(&c) { c } else { b'_' })
        .collect()
}

/// Standard INQUIRY data. `pdt_byte` is byte 0 (qualifier + device type).
pub(crate) fn standard_inquiry(
    pdt_byte: u8,
    vendor: &str,
    product: &str,
    revision: &str,
) -> Vec<u8> {
    let mut d = vec![0u8; 96];
    d[0] = pdt_byte;
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HISUP, response data format 2
    d[4] = (d.len() - 5) as u8;
    d[5] = 0x10 | 0x08; // TPGS = 01b (implicit ALUA), 3PC (EXTENDED COPY)
    d[7] = 0x02; // CMDQUE
    ascii_field(&mut d[8..16], vendor);
    ascii_field(&mut d[16..32], product);
    ascii_field(&mut d[32..36], revision);
    for (i, v) in VERSION_DESCRIPTORS.iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

/// A VPD page: 4-byte header + payload.
fn vpd(page: u8, payload: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + payload.len());
    d.extend_from_slice(&[0x00, page]);
    d.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    d.extend_from_slice(payload);
    d
}

/// One designation descriptor of VPD 0x83.
fn designator(out: &mut Vec<u8>, proto_codeset: u8, piv_assoc_type: u8, id: &[u8]) {
    out.extend_from_slice(&[proto_codeset, piv_assoc_type, 0, id.len() as u8]);
    out.extend_from_slice(id);
}

/// SCSI name string designator payload: UTF-8, NUL terminated, padded to a
/// multiple of 4 (SPC-4 7.8.6.11).
fn name_string(name: &str) -> Vec<u8> {
    let mut v: Vec<u8> = name.bytes().take(251).collect();
    v.push(0);
    while v.len() % 4 != 0 {
        v.push(0);
    }
    v
}

fn device_identification(lu: &LogicalUnit, nexus: &Nexus) -> Vec<u8> {
    const ISCSI: u8 = 0x50; // protocol identifier 5, in bits 7..4
    let mut p = Vec::with_capacity(128);
    // NAA, binary, associated with the LU.
    designator(&mut p, 0x01, 0x03, &lu.config.naa);
    // T10 vendor ID: vendor (8 chars) + serial.
    let mut t10 = vec![0u8; 8];
    ascii_field(&mut t10, &lu.config.vendor);
    t10.extend(ascii_bytes(&lu.config.serial, 200));
    designator(&mut p, 0x02, 0x01, &t10);
    // Relative target port (PIV, association = target port, type 4).
    let mut rtp = [0u8; 4];
    rtp[2..].copy_from_slice(&nexus.relative_port_id.to_be_bytes());
    designator(&mut p, ISCSI | 0x01, 0x94, &rtp);
    // Target port group (type 5).
    let mut tpg = [0u8; 4];
    tpg[2..].copy_from_slice(&nexus.port_group_id.to_be_bytes());
    designator(&mut p, ISCSI | 0x01, 0x95, &tpg);
    // SCSI name string of the target port (UTF-8, type 8).
    designator(&mut p, ISCSI | 0x03, 0x98, &name_string(&nexus.target_port));
    // SCSI name string of the target device: the port name without its
    // ",t,0x<tpgt>" suffix.
    let device = nexus
        .target_port
        .split_once(",t,")
        .map_or(nexus.target_port.as_str(), |(d, _)| d);
    designator(&mut p, ISCSI | 0x03, 0xA8, &name_string(device));
    vpd(0x83, &p)
}

fn block_limits(lu: &LogicalUnit) -> Vec<u8> {
    // Offsets below are page offsets minus the 4-byte header.
    let mut p = [0u8; 0x3C];
    let bs = u64::from(lu.block_size());
    let gran = (4096 / bs).max(1) as u32;
    p[0] = 0x00; // WSNZ = 0: WRITE SAME with 0 blocks runs to the end
    p[1] = sbc::MAX_CAW_BLOCKS;
    p[2..4].copy_from_slice(&(gran as u16).to_be_bytes()); // optimal transfer length granularity
    p[4..8].copy_from_slice(&((MAX_XFER_BYTES / bs) as u32).to_be_bytes());
    p[8..12].copy_from_slice(&((OPT_XFER_BYTES / bs) as u32).to_be_bytes());
    p[12..16].copy_from_slice(&((MAX_XFER_BYTES / bs) as u32).to_be_bytes()); // max pre-fetch
    if lu.thin() {
        p[16..20].copy_from_slice(&(sbc::MAX_UNMAP_BLOCKS as u32).to_be_bytes());
        p[20..24].copy_from_slice(&sbc::MAX_UNMAP_DESCRIPTORS.to_be_bytes());
        p[24..28].copy_from_slice(&gran.to_be_bytes()); // optimal unmap granularity
    }
    p[32..40].copy_from_slice(&sbc::MAX_WS_BLOCKS.to_be_bytes());
    vpd(0xB0, &p)
}

fn block_device_characteristics(lu: &LogicalUnit) -> Vec<u8> {
    let mut p = [0u8; 0x3C];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // non-rotating medium
    if lu.thin() {
        // WABEREQ 01b: reads after SANITIZE BLOCK ERASE succeed.
        p[3] = 0x40;
    }
    vpd(0xB1, &p)
}

fn logical_block_provisioning(lu: &LogicalUnit) -> Vec<u8> {
    let mut p = [0u8; 4];
    if lu.thin() {
        // LBPU, LBPWS, LBPWS10, LBPRZ (unmapped blocks read as zeroes).
        p[1] = 0x80 | 0x40 | 0x20 | 0x04;
        p[2] = 0x02; // provisioning type: thin
    }
    vpd(0xB2, &p)
}

/// INQUIRY for a present LU.
pub fn inquiry(
    lu: &LogicalUnit,
    nexus: &Nexus,
    evpd: bool,
    page: u8,
    alloc_len: u16,
) -> Result<Vec<u8>, ScsiError> {
    let data = if !evpd {
        if page != 0 {
            return Err(ScsiError::cdb_byte(2));
        }
        standard_inquiry(
            0x00,
            &lu.config.vendor,
            &lu.config.product,
            &lu.config.revision,
        )
    } else {
        match page {
            0x00 => vpd(0x00, &VPD_PAGES),
            0x80 => vpd(0x80, &ascii_bytes(&lu.config.serial, 252)),
            0x83 => device_identification(lu, nexus),
            0x8F => vpd(0x8F, &super::xcopy::third_party_copy_vpd()),
            0xB0 => block_limits(lu),
            0xB1 => block_device_characteristics(lu),
            0xB2 => logical_block_provisioning(lu),
            _ => return Err(ScsiError::cdb_byte(2)),
        }
    };
    Ok(truncate(data, alloc_len.into()))
}

/// REQUEST SENSE: reports (and clears) a pending unit attention, else NO
/// SENSE. Autosense means no deferred sense is ever kept.
pub fn request_sense(lu: &LogicalUnit, nexus: &Nexus, desc: bool, alloc_len: u8) -> Vec<u8> {
    let sense = match lu.ua.take(nexus) {
        Some(asc) => Sense::new(SenseKey::UnitAttention, asc),
        None => lu
            .sanitizer
            .request_sense()
            .unwrap_or(Sense::new(SenseKey::NoSense, Asc::NO_ADDITIONAL)),
    };
    truncate(sense.encode(desc), alloc_len.into())
}

// ---------------------------------------------------------------- mode pages

/// Page control values.
const PC_CURRENT: u8 = 0;
const PC_CHANGEABLE: u8 = 1;
const PC_DEFAULT: u8 = 2;

const PAGE_CACHING: u8 = 0x08;
const PAGE_CONTROL: u8 = 0x0A;
const PAGE_IEC: u8 = 0x1C;
const PAGE_ALL: u8 = 0x3F;

/// Supported mode pages in ascending order.
const MODE_PAGES: [u8; 3] = [PAGE_CACHING, PAGE_CONTROL, PAGE_IEC];

/// Current values of the changeable mode parameters.
#[derive(Debug, Clone, Copy)]
struct ModeValues {
    wce: bool,
    d_sense: bool,
    swp: bool,
}

impl ModeValues {
    fn current(lu: &LogicalUnit) -> Self {
        ModeValues {
            wce: lu.mode.wce.load(Ordering::Relaxed),
            d_sense: lu.mode.d_sense.load(Ordering::Relaxed),
            swp: lu.mode.swp.load(Ordering::Relaxed),
        }
    }

    const DEFAULT: ModeValues = ModeValues {
        wce: true,
        d_sense: false,
        swp: false,
    };

    /// The changeable mask: every changeable bit set.
    const CHANGEABLE: ModeValues = ModeValues {
        wce: true,
        d_sense: true,
        swp: true,
    };
}

/// One mode page (without subpage) for the given values.
fn mode_page(page: u8, v: ModeValues, changeable: bool) -> Vec<u8> {
    match page {
        PAGE_CACHING => {
            let mut p = vec![0u8; 20];
            p[0] = PAGE_CACHING;
            p[1] = 0x12;
            if v.wce {
                p[2] |= 0x04;
            }
            p
        }
        PAGE_CONTROL => {
            let mut p = vec![0u8; 12];
            p[0] = PAGE_CONTROL;
            p[1] = 0x0A;
            if v.d_sense {
                p[2] |= 0x04;
            }
            if v.swp {
                p[4] |= 0x08;
            }
            if !changeable {
                p[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
                p[8..10].copy_from_slice(&0xFFFFu16.to_be_bytes()); // busy timeout: unlimited
            }
            p
        }
        PAGE_IEC => {
            let mut p = vec![0u8; 12];
            p[0] = PAGE_IEC;
            p[1] = 0x0A;
            if !changeable {
                p[2] = 0x08; // DEXCPT: informational exceptions disabled
            }
            p
        }
        _ => Vec::new(),
    }
}

/// Arguments of MODE SENSE(6)/(10).
#[derive(Debug, Clone, Copy)]
pub struct ModeSenseArgs {
    pub ten: bool,
    pub dbd: bool,
    pub llbaa: bool,
    pub pc: u8,
    pub page: u8,
    pub subpage: u8,
    pub alloc_len: u16,
}

pub fn mode_sense(lu: &LogicalUnit, a: ModeSenseArgs) -> Result<Vec<u8>, ScsiError> {
    let values = match a.pc {
        PC_CURRENT => ModeValues::current(lu),
        PC_CHANGEABLE => ModeValues::CHANGEABLE,
        PC_DEFAULT => ModeValues::DEFAULT,
        // PC_SAVED (the only value left of the 2-bit field).
        _ => return Err(ScsiError::SavingParamsNotSupported),
    };
    let pages: &[u8] = if a.page == PAGE_ALL {
        if a.subpage != 0x00 && a.subpage != 0xFF {
            return Err(ScsiError::cdb_byte(3));
        }
        &MODE_PAGES
    } else {
        let i = MODE_PAGES
            .iter()
            .position(|&p| p == a.page)
            .ok_or(ScsiError::cdb(2, 5))?;
        if a.subpage != 0x00 {
            return Err(ScsiError::cdb_byte(3));
        }
        MODE_PAGES.get(i..=i).unwrap_or(&[])
    };
    let changeable = a.pc == PC_CHANGEABLE;
    let mut body = Vec::with_capacity(64);
    // Block descriptor.
    if !a.dbd {
        let blocks = lu.blocks();
        let bs = lu.block_size();
        if a.ten && a.llbaa {
            body.extend_from_slice(&blocks.to_be_bytes());
            body.extend_from_slice(&[0; 4]);
            body.extend_from_slice(&bs.to_be_bytes());
        } else {
            let n = u32::try_from(blocks).unwrap_or(u32::MAX);
            body.extend_from_slice(&n.to_be_bytes());
            body.push(0);
            body.extend_from_slice(&bs.to_be_bytes()[1..]);
        }
    }
    let bd_len = body.len();
    for &p in pages {
        body.extend(mode_page(p, values, changeable));
    }
    let mut dsp = 0x10; // DPOFUA
    if lu.write_protected() {
        dsp |= 0x80; // WP
    }
    let data = if a.ten {
        let mut d = Vec::with_capacity(8 + body.len());
        let total = (6 + body.len()) as u16;
        d.extend_from_slice(&total.to_be_bytes());
        d.push(0); // medium type
        d.push(dsp);
        d.push(if a.llbaa && bd_len == 16 { 0x01 } else { 0 }); // LONGLBA
        d.push(0);
        d.extend_from_slice(&(bd_len as u16).to_be_bytes());
        d.extend(body);
        d
    } else {
        let mut d = Vec::with_capacity(4 + body.len());
        d.push((3 + body.len()).min(255) as u8);
        d.push(0);
        d.push(dsp);
        d.push(bd_len as u8);
        d.extend(body);
        d
    };
    Ok(truncate(data, a.alloc_len.into()))
}

/// MODE SELECT(6)/(10): accepts the caching and control pages with changes
/// to WCE, D_SENSE and SWP only.
pub fn mode_select(
    lu: &LogicalUnit,
    nexus: &Nexus,
    ten: bool,
    pf: bool,
    sp: bool,
    param_len: u16,
    data_out: &[u8],
) -> Result<(), ScsiError> {
    if !pf {
        return Err(ScsiError::cdb(1, 4));
    }
    if sp {
        return Err(ScsiError::cdb(1, 0));
    }
    if param_len == 0 {
        return Ok(());
    }
    let params = data_out
        .get(..usize::from(param_len))
        .ok_or(ScsiError::ParamListLength)?;
    let r = Reader::new(params);
    let hdr = if ten { 8 } else { 4 };
    if params.len() < hdr {
        return Err(ScsiError::ParamListLength);
    }
    let pe = |byte: usize, bit: Option<u8>| ScsiError::param(byte as u16, bit);
    let short = |_| ScsiError::ParamListLength;
    // MODE DATA LENGTH is reserved in MODE SELECT.
    let (bd_len, bd_at) = if ten {
        if r.u16(0).map_err(short)? != 0 {
            return Err(pe(0, None));
        }
        (usize::from(r.u16(6).map_err(short)?), 8)
    } else {
        if r.u8(0).map_err(short)? != 0 {
            return Err(pe(0, None));
        }
        (usize::from(r.u8(3).map_err(short)?), 4)
    };
    let longlba = ten && r.bit(4, 0).map_err(short)?;
    match (bd_len, longlba) {
        (0, _) => {}
        (8, false) => {
            let bs = r.u24(bd_at + 5).map_err(short)?;
            if bs != lu.block_size() {
                return Err(pe(bd_at + 5, None));
            }
        }
        (16, true) => {
            let bs = r.u32(bd_at + 12).map_err(short)?;
            if bs != lu.block_size() {
                return Err(pe(bd_at + 12, None));
            }
        }
        _ => return Err(pe(if ten { 6 } else { 3 }, None)),
    }
    let mut at = bd_at + bd_len;
    let cur = ModeValues::current(lu);
    let mut new = cur;
    while at < params.len() {
        let b0 = r.u8(at).map_err(short)?;
        if b0 & 0x40 != 0 {
            // SPF: no subpages supported.
            return Err(pe(at, Some(6)));
        }
        let code = b0 & 0x3F;
        let len = usize::from(r.u8(at + 1).map_err(short)?);
        let page = r.bytes(at, len + 2).map_err(short)?;
        if !MODE_PAGES.contains(&code) {
            return Err(pe(at, Some(5)));
        }
        let current = mode_page(code, cur, false);
        if current.len() != page.len() {
            return Err(pe(at + 1, None));
        }
        let mask = mode_page(code, ModeValues::CHANGEABLE, true);
        // Every bit that is not changeable must equal its current value
        // (PS, bit 7 of byte 0, is reserved in MODE SELECT).
        for (i, ((&got, &have), &m)) in page.iter().zip(&current).zip(&mask).enumerate().skip(2) {
            let diff = (got ^ have) & !m;
            if diff != 0 {
                let bit = 7 - diff.leading_zeros() as u8;
                return Err(pe(at + i, Some(bit)));
            }
        }
        match code {
            PAGE_CACHING => new.wce = page.get(2).is_some_and(|b| b & 0x04 != 0),
            PAGE_CONTROL => {
                new.d_sense = page.get(2).is_some_and(|b| b & 0x04 != 0);
                new.swp = page.get(4).is_some_and(|b| b & 0x08 != 0);
            }
            _ => {}
        }
        at += len + 2;
    }
    let changed = new.wce != cur.wce || new.d_sense != cur.d_sense || new.swp != cur.swp;
    lu.mode.wce.store(new.wce, Ordering::Relaxed);
    lu.mode.d_sense.store(new.d_sense, Ordering::Relaxed);
    lu.mode.swp.store(new.swp, Ordering::Relaxed);
    if changed {
        lu.ua
            .establish_all(Asc::MODE_PARAMETERS_CHANGED, Some(nexus));
    }
    Ok(())
}

// ------------------------------------------------------------------ RSOC/RTPG

const NOMINAL_TIMEOUT: u32 = 1;

fn timeouts_descriptor(out: &mut Vec<u8>, recommended: u32) {
    out.extend_from_slice(&[0x00, 0x0A, 0x00, 0x00]);
    out.extend_from_slice(&NOMINAL_TIMEOUT.to_be_bytes());
    out.extend_from_slice(&recommended.to_be_bytes());
}

/// REPORT SUPPORTED OPERATION CODES, all from the dispatch table.
pub fn report_supported_opcodes(
    thin: bool,
    rctd: bool,
    options: u8,
    opcode: u8,
    sa: u16,
    alloc_len: u32,
) -> Result<Vec<u8>, ScsiError> {
    let offered = |d: &&cdb::OpDesc| thin || !d.attrs.thin;
    let one = |desc: Option<&cdb::OpDesc>| {
        let mut d = vec![0u8; 4];
        match desc {
            Some(desc) => {
                d[1] = 0x03 | if rctd { 0x80 } else { 0 };
                d[2..4].copy_from_slice(&(desc.usage.len() as u16).to_be_bytes());
                d.extend_from_slice(desc.usage);
                if rctd {
                    timeouts_descriptor(&mut d, desc.attrs.timeout);
                }
            }
            None => d[1] = 0x01, // not supported
        }
        d
    };
    let data = match options {
        0 => {
            let mut d = vec![0u8; 4];
            for desc in OPCODES.iter().filter(offered) {
                d.push(desc.opcode);
                d.push(0);
                d.extend_from_slice(&desc.sa.unwrap_or(0).to_be_bytes());
                d.push(0);
                d.push(u8::from(rctd) << 1 | u8::from(desc.sa.is_some()));
                d.extend_from_slice(&(desc.usage.len() as u16).to_be_bytes());
                if rctd {
                    timeouts_descriptor(&mut d, desc.attrs.timeout);
                }
            }
            let n = (d.len() - 4) as u32;
            d[0..4].copy_from_slice(&n.to_be_bytes());
            d
        }
        1 => {
            if cdb::opcode_has_sa(opcode) {
                return Err(ScsiError::cdb(2, 2));
            }
            one(cdb::lookup(opcode, 0).filter(offered))
        }
        2 => {
            if !cdb::opcode_has_sa(opcode) {
                return Err(ScsiError::cdb(2, 2));
            }
            one(cdb::lookup(opcode, sa).filter(offered))
        }
        _ => return Err(ScsiError::cdb(2, 2)),
    };
    Ok(truncate(data, alloc_len as usize))
}

/// REPORT TARGET PORT GROUPS: one group, active/optimized, holding the port
/// the command came through (implicit ALUA only).
pub fn report_target_port_groups(nexus: &Nexus, extended: bool, alloc_len: u32) -> Vec<u8> {
    let mut d = vec![0u8; 4];
    if extended {
        d.extend_from_slice(&[0x10, 0x00, 0x00, 0x00]); // format 1, transition time 0
    }
    d.push(0x80); // PREF, active/optimized
    d.push(0x01); // AO_SUP
    d.extend_from_slice(&nexus.port_group_id.to_be_bytes());
    d.extend_from_slice(&[0, 0, 0, 1]); // status code, vendor, 1 port
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(&nexus.relative_port_id.to_be_bytes());
    let n = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&n.to_be_bytes());
    truncate(d, alloc_len as usize)
}
