//! Tests of the issue-3 command families: WRITE SAME, UNMAP, GET LBA
//! STATUS, COMPARE AND WRITE, ORWRITE, PRE-FETCH, START STOP UNIT, READ
//! DEFECT DATA, RESERVE/RELEASE and persistent reservations.

use std::sync::{Arc, Mutex};

use super::tests::{cdb10, cdb16, cdb_ptr, config, k3, nexus, sense_of, BLOCKS, H};
use super::*;
use crate::block::{check_range, BlockCaps, BlockDev, BlockResult, WriteFlags};

/// A thin device: tracks which 512-byte sectors are mapped.
#[derive(Debug)]
pub(crate) struct ThinDev {
    data: Mutex<(Vec<u8>, Vec<bool>)>,
}

impl ThinDev {
    pub fn new(size: u64) -> Self {
        ThinDev {
            data: Mutex::new((vec![0; size as usize], vec![false; (size / 512) as usize])),
        }
    }
}

impl BlockDev for ThinDev {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().0.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let d = self.data.lock().unwrap();
        check_range(d.0.len() as u64, offset, buf.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&d.0[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64, _f: WriteFlags) -> BlockResult<()> {
        let mut d = self.data.lock().unwrap();
        check_range(d.0.len() as u64, offset, buf.len() as u64)?;
        let o = offset as usize;
        d.0[o..o + buf.len()].copy_from_slice(buf);
        for s in o / 512..(o + buf.len()).div_ceil(512) {
            d.1[s] = true;
        }
        Ok(())
    }
    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    fn caps(&self) -> BlockCaps {
        BlockCaps {
            discard: true,
            allocation_status: true,
            read_only: false,
        }
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        let mut d = self.data.lock().unwrap();
        check_range(d.0.len() as u64, offset, len)?;
        let (o, l) = (offset as usize, len as usize);
        d.0[o..o + l].fill(0);
        for s in o / 512..(o + l) / 512 {
            d.1[s] = false;
        }
        Ok(())
    }
    fn allocation(&self, offset: u64, len: u64) -> BlockResult<(bool, u64)> {
        let d = self.data.lock().unwrap();
        check_range(d.0.len() as u64, offset, len)?;
        let first = (offset / 512) as usize;
        let state = d.1[first];
        let mut s = first;
        while s < d.1.len() && d.1[s] == state && ((s - first) as u64) * 512 < len {
            s += 1;
        }
        Ok((state, (((s - first) as u64) * 512).min(len)))
    }
}

fn thin() -> H {
    let cfg = config(512);
    let dev: Arc<dyn BlockDev> = Arc::new(ThinDev::new(BLOCKS * 512));
    let mut map = LunMap::new();
    map.insert(0, Arc::new(LogicalUnit::new(cfg, dev.clone())));
    let h = H {
        map,
        dev,
        n: nexus("iqn.init-a"),
    };
    h.run(0, &[0; 6], &[]);
    h
}

fn ws10(b1: u8, lba: u32, n: u16) -> [u8; 10] {
    cdb10(0x41, b1, lba, n)
}

fn ws16(b1: u8, lba: u64, n: u32) -> [u8; 16] {
    cdb16(0x93, b1, lba, n)
}

// ------------------------------------------------------------------ WRITE SAME

#[test]
fn write_same_pattern_and_zero_to_end() {
    let h = H::new();
    let mut block = vec![0u8; 512];
    block[0] = 0xAB;
    block[511] = 0xCD;
    h.ok(&ws10(0, 5, 3), &block);
    let d = h.ok(&cdb10(0x28, 0, 5, 3), &[]);
    for chunk in d.chunks(512) {
        assert_eq!(chunk, &block[..]);
    }
    // 0 blocks: to the end of the medium.
    h.ok(&ws16(0, BLOCKS - 4, 0), &block);
    let d = h.ok(&cdb10(0x28, 0, BLOCKS as u32 - 4, 4), &[]);
    assert!(d.chunks(512).all(|c| c == &block[..]));
    // NDOB writes zeroes without a data-out buffer.
    h.ok(&ws16(0x01, 5, 3), &[]);
    assert_eq!(h.ok(&cdb10(0x28, 0, 5, 3), &[]), vec![0; 1536]);
}

#[test]
fn write_same_errors() {
    let h = H::new();
    let b = [0u8; 512];
    assert_eq!(k3(h.fail(&ws10(0, BLOCKS as u32, 1), &b)), [5, 0x21, 0]);
    assert_eq!(k3(h.fail(&ws10(0, BLOCKS as u32 + 1, 0), &b)), [5, 0x21, 0]);
    assert_eq!(k3(h.fail(&ws16(0, u64::MAX, 0), &b)), [5, 0x21, 0]);
    // One block of data-out exactly.
    assert_eq!(k3(h.fail(&ws10(0, 0, 1), &[0; 256])), [5, 0x0E, 0x03]);
    assert_eq!(k3(h.fail(&ws10(0, 0, 1), &[0; 1024])), [5, 0x0E, 0x03]);
    // UNMAP on a fully provisioned LU, ANCHOR (not supported), WRPROTECT.
    assert_eq!(
        h.fail(&ws10(0x08, 0, 1), &b),
        (5, 0x24, 0, cdb_ptr(1, Some(3)))
    );
    assert_eq!(
        h.fail(&ws10(0x10, 0, 1), &b),
        (5, 0x24, 0, cdb_ptr(1, Some(4)))
    );
    assert_eq!(
        h.fail(&ws10(0x20, 0, 1), &b),
        (5, 0x24, 0, cdb_ptr(1, Some(7)))
    );
    // NDOB does not exist in WRITE SAME(10): bits 2..0 are obsolete or
    // reserved there and reported as one field.
    assert_eq!(
        h.fail(&ws10(0x01, 0, 1), &b),
        (5, 0x24, 0, cdb_ptr(1, Some(2)))
    );
}

#[test]
fn write_same_unmap_deallocates_on_thin() {
    let h = thin();
    h.ok(&cdb10(0x2A, 0, 0, 4), &[0xFF; 2048]);
    h.ok(&ws10(0x08, 0, 4), &[0; 512]);
    assert_eq!(h.dev.allocation(0, 2048).unwrap(), (false, 2048));
    assert_eq!(h.ok(&cdb10(0x28, 0, 0, 4), &[]), vec![0; 2048]);
    // Non-zero data with UNMAP is written, not unmapped.
    h.ok(&ws16(0x08, 0, 2), &[1; 512]);
    assert_eq!(h.dev.allocation(0, 1024).unwrap(), (true, 1024));
    // NDOB + UNMAP.
    h.ok(&ws16(0x09, 0, 2), &[]);
    assert_eq!(h.dev.allocation(0, 1024).unwrap(), (false, 1024));
}

#[test]
fn write_same_read_only() {
    let mut cfg = config(512);
    cfg.read_only = true;
    let h = H::with(cfg, BlockCaps::default());
    assert_eq!(k3(h.fail(&ws10(0, 0, 1), &[0; 512])), [7, 0x27, 0]);
    assert_eq!(k3(h.fail(&ws16(0x01, 0, 1), &[])), [7, 0x27, 0]);
}

// ----------------------------------------------------------------------- UNMAP

fn unmap_params(descs: &[(u64, u32)]) -> Vec<u8> {
    let mut p = vec![0u8; 8];
    p[0..2].copy_from_slice(&((6 + 16 * descs.len()) as u16).to_be_bytes());
    p[2..4].copy_from_slice(&((16 * descs.len()) as u16).to_be_bytes());
    for (lba, n) in descs {
        p.extend_from_slice(&lba.to_be_bytes());
        p.extend_from_slice(&n.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
    }
    p
}

fn unmap_cdb(len: usize) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x42;
    c[7..9].copy_from_slice(&(len as u16).to_be_bytes());
    c
}

#[test]
fn unmap_deallocates_ranges() {
    let h = thin();
    h.ok(&cdb10(0x2A, 0, 0, 8), &[b'a'; 4096]);
    let p = unmap_params(&[(1, 2), (6, 1), (BLOCKS, 0)]);
    h.ok(&unmap_cdb(p.len()), &p);
    assert_eq!(h.dev.allocation(0, 512).unwrap(), (true, 512));
    assert_eq!(h.dev.allocation(512, 4096 - 512).unwrap(), (false, 1024));
    assert_eq!(h.dev.allocation(3 * 512, 2048).unwrap(), (true, 1536));
    let d = h.ok(&cdb10(0x28, 0, 0, 8), &[]);
    assert_eq!(&d[512..1536], &[0; 1024][..]);
    assert_eq!(&d[1536..3072], &[b'a'; 1536][..]);
    // Empty list and zero parameter length.
    let p = unmap_params(&[]);
    h.ok(&unmap_cdb(p.len()), &p);
    h.ok(&unmap_cdb(0), &[]);
}

#[test]
fn unmap_errors() {
    let h = thin();
    // Parameter list shorter than its header / than the data sent.
    assert_eq!(k3(h.fail(&unmap_cdb(4), &[0; 4])), [5, 0x1A, 0]);
    let p = unmap_params(&[(0, 1)]);
    assert_eq!(k3(h.fail(&unmap_cdb(p.len()), &p[..10])), [5, 0x1A, 0]);
    // Descriptor data length beyond the list.
    let mut bad = p.clone();
    bad[2..4].copy_from_slice(&32u16.to_be_bytes());
    assert_eq!(k3(h.fail(&unmap_cdb(bad.len()), &bad)), [5, 0x1A, 0]);
    // Out of range, too many descriptors, ANCHOR.
    let p = unmap_params(&[(BLOCKS - 1, 2)]);
    assert_eq!(k3(h.fail(&unmap_cdb(p.len()), &p)), [5, 0x21, 0]);
    let many: Vec<(u64, u32)> = (0..257).map(|i| (i, 1)).collect();
    let p = unmap_params(&many);
    assert_eq!(h.fail(&unmap_cdb(p.len()), &p), (5, 0x26, 0, [0x80, 0, 2]));
    let mut c = unmap_cdb(0);
    c[1] = 1;
    assert_eq!(h.fail(&c, &[]), (5, 0x24, 0, cdb_ptr(1, Some(0))));
    // Fully provisioned LU: UNMAP is not a supported command.
    let full = H::new();
    assert_eq!(k3(full.fail(&unmap_cdb(0), &[])), [5, 0x20, 0]);
}

#[test]
fn thin_lu_advertises_provisioning() {
    let h = thin();
    let b2 = h.ok(&[0x12, 1, 0xB2, 0, 64, 0], &[]);
    assert_eq!(b2[5], 0xE4, "LBPU LBPWS LBPWS10 LBPRZ");
    let b0 = h.ok(&[0x12, 1, 0xB0, 0, 64, 0], &[]);
    assert_eq!(
        &b0[20..24],
        &(1u32 << 21).to_be_bytes(),
        "max unmap LBA count"
    );
    assert_eq!(&b0[24..28], &256u32.to_be_bytes(), "max unmap descriptors");
    assert_eq!(&b0[36..44], &(1u64 << 21).to_be_bytes(), "max write same");
    assert_eq!(b0[5], 255, "max compare and write");
    let mut c = [0u8; 12];
    c[0] = 0xA3;
    c[1] = 0x0C;
    c[2] = 1;
    c[3] = 0x42;
    c[8] = 1;
    assert_eq!(&h.ok(&c, &[])[..2], &[0, 3]);
}

// -------------------------------------------------------------- GET LBA STATUS

fn gls(lba: u64, alloc: u32) -> [u8; 16] {
    let mut c = cdb16(0x9E, 0x12, lba, alloc);
    c[1] = 0x12;
    c
}

#[test]
fn get_lba_status_runs() {
    let h = thin();
    h.ok(&cdb10(0x2A, 0, 4, 4), &[1; 2048]);
    let d = h.ok(&gls(0, 24), &[]);
    assert_eq!(d.len(), 24);
    assert_eq!(&d[..4], &20u32.to_be_bytes());
    assert_eq!(&d[8..16], &0u64.to_be_bytes());
    assert_eq!(&d[16..20], &4u32.to_be_bytes());
    assert_eq!(d[20], 1, "deallocated");
    let d = h.ok(&gls(4, 1024), &[]);
    assert_eq!(&d[..4], &36u32.to_be_bytes());
    assert_eq!(
        (&d[8..16], &d[16..20], d[20]),
        (&4u64.to_be_bytes()[..], &4u32.to_be_bytes()[..], 0)
    );
    assert_eq!(
        (&d[24..32], &d[32..36], d[36]),
        (
            &8u64.to_be_bytes()[..],
            &((BLOCKS - 8) as u32).to_be_bytes()[..],
            1
        )
    );
    assert_eq!(k3(h.fail(&gls(BLOCKS, 24), &[])), [5, 0x21, 0]);
    assert_eq!(k3(h.fail(&gls(u64::MAX, 24), &[])), [5, 0x21, 0]);
    // A fully provisioned LU reports everything mapped.
    let full = H::new();
    let d = full.ok(&gls(10, 24), &[]);
    assert_eq!(
        (&d[16..20], d[20]),
        (&((BLOCKS - 10) as u32).to_be_bytes()[..], 0)
    );
}

// ----------------------------------------------------------- COMPARE AND WRITE

fn caw(lba: u64, n: u8, b1: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x89;
    c[1] = b1;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[13] = n;
    c
}

#[test]
fn compare_and_write_success_and_miscompare() {
    let h = H::new();
    h.ok(&cdb10(0x2A, 0, 3, 2), &[b'A'; 1024]);
    let mut buf = vec![b'A'; 1024];
    buf.extend(vec![b'B'; 1024]);
    h.ok(&caw(3, 2, 0x18), &buf);
    assert_eq!(h.ok(&cdb10(0x28, 0, 3, 2), &[]), vec![b'B'; 1024]);
    // Miscompare: information = offset of the first differing byte, and
    // nothing written.
    let mut buf = vec![b'B'; 1024];
    buf[700] = b'Z';
    buf.extend(vec![b'C'; 1024]);
    let r = h.run(0, &caw(3, 2, 0), &buf);
    assert_eq!(k3(sense_of(&r)), [0x0E, 0x1D, 0]);
    assert_eq!(r.sense[0], 0xF0);
    assert_eq!(&r.sense[3..7], &700u32.to_be_bytes());
    assert_eq!(h.ok(&cdb10(0x28, 0, 3, 2), &[]), vec![b'B'; 1024]);
    // Data-out must be exactly twice the blocks; range checked; 0 blocks OK.
    assert_eq!(k3(h.fail(&caw(3, 1, 0), &[0; 2048])), [5, 0x0E, 0x03]);
    assert_eq!(k3(h.fail(&caw(BLOCKS, 1, 0), &[0; 1024])), [5, 0x21, 0]);
    h.ok(&caw(0, 0, 0), &[]);
    assert_eq!(
        h.fail(&caw(0, 1, 0x20), &[0; 1024]),
        (5, 0x24, 0, cdb_ptr(1, Some(7)))
    );
}

#[test]
fn compare_and_write_is_atomic() {
    // Several threads increment a counter in block 0 with CAW-based
    // compare-and-swap; every successful CAW must be one increment.
    let h = Arc::new(H::new());
    h.ok(&cdb10(0x2A, 0, 0, 1), &[0; 512]);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let h = h.clone();
            std::thread::spawn(move || {
                let mut won = 0u64;
                for _ in 0..200 {
                    let cur = h.ok(&cdb10(0x28, 0, 0, 1), &[]);
                    let v = u64::from_be_bytes(cur[..8].try_into().unwrap());
                    let mut next = cur.clone();
                    next[..8].copy_from_slice(&(v + 1).to_be_bytes());
                    let mut buf = cur;
                    buf.extend(next);
                    if h.run(0, &caw(0, 1, 0), &buf).status == ScsiStatus::Good {
                        won += 1;
                    }
                    // Plain writes elsewhere in the same stripe interleave.
                    h.ok(&cdb10(0x2A, 0, 1, 1), &[7; 512]);
                }
                won
            })
        })
        .collect();
    let won: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let cur = h.ok(&cdb10(0x28, 0, 0, 1), &[]);
    assert_eq!(u64::from_be_bytes(cur[..8].try_into().unwrap()), won);
    assert!(won > 0);
}

// --------------------------------------------------------------------- ORWRITE

#[test]
fn orwrite_ors_data() {
    let h = H::new();
    h.ok(&cdb10(0x2A, 0, 0, 2), &[0x0F; 1024]);
    h.ok(&cdb16(0x8B, 0x08, 0, 2), &[0xA0; 1024]);
    assert_eq!(h.ok(&cdb10(0x28, 0, 0, 2), &[]), vec![0xAF; 1024]);
    h.ok(&cdb16(0x8B, 0, 0, 0), &[]);
    assert_eq!(
        k3(h.fail(&cdb16(0x8B, 0, BLOCKS + 1, 0), &[])),
        [5, 0x21, 0]
    );
    assert_eq!(
        h.fail(&cdb16(0x8B, 0x40, 0, 1), &[0; 512]),
        (5, 0x24, 0, cdb_ptr(1, Some(7)))
    );
}

// ------------------------------------------------- PRE-FETCH, START STOP, RDD

#[test]
fn prefetch_checks_range() {
    let h = H::new();
    h.ok(&cdb10(0x34, 0x02, 0, 256), &[]);
    h.ok(&cdb16(0x90, 0, BLOCKS - 1, 1), &[]);
    h.ok(&cdb16(0x90, 0, 0, 0), &[]);
    assert_eq!(
        k3(h.fail(&cdb16(0x90, 0, BLOCKS + 1, 0), &[])),
        [5, 0x21, 0]
    );
    assert_eq!(
        k3(h.fail(&cdb10(0x34, 0, BLOCKS as u32 - 1, 2), &[])),
        [5, 0x21, 0]
    );
}

#[test]
fn start_stop_unit() {
    let h = H::new();
    h.ok(&[0x1B, 0, 0, 0, 0x00, 0], &[]);
    assert_eq!(k3(h.fail(&[0; 6], &[])), [2, 0x04, 0x02]);
    assert_eq!(k3(h.fail(&cdb10(0x28, 0, 0, 1), &[])), [2, 0x04, 0x02]);
    // Non-media commands still work.
    h.ok(&[0x12, 0, 0, 0, 36, 0], &[]);
    h.ok(&[0x1B, 1, 0, 0, 0x01, 0], &[]);
    h.ok(&[0; 6], &[]);
    h.ok(&[0x1B, 0, 0, 0, 0x30, 0], &[]);
    h.ok(&[0; 6], &[]);
    assert_eq!(
        h.fail(&[0x1B, 0, 0, 0, 0x50, 0], &[]),
        (5, 0x24, 0, cdb_ptr(4, Some(7)))
    );
    // A LU reset restarts the unit.
    h.ok(&[0x1B, 0, 0, 0, 0x00, 0], &[]);
    h.map
        .task_management(TaskMgmt::LogicalUnitReset { lun: 0 }, &h.n);
    h.run(0, &[0; 6], &[]);
    h.ok(&[0; 6], &[]);
}

#[test]
fn read_defect_data_empty_lists() {
    let h = H::new();
    let d = h.ok(&[0x37, 0, 0x1D, 0, 0, 0, 0, 0, 4, 0], &[]);
    assert_eq!(d, vec![0, 0x1D, 0, 0]);
    let d = h.ok(&[0xB7, 0x0C, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], &[]);
    assert_eq!(d, vec![0, 0x0C, 0, 0, 0, 0, 0, 0]);
}

// ------------------------------------------------------------- RESERVE/RELEASE

#[test]
fn reserve_release_spc2() {
    let h = H::new();
    let b = nexus("iqn.init-b");
    h.run_as(&b, 0, &[0; 6], &[]);
    h.ok(&[0x16, 0, 0, 0, 0, 0], &[]);
    h.ok(&[0x16, 0, 0, 0, 0, 0], &[]);
    let conflict = |cdb: &[u8]| h.run_as(&b, 0, cdb, &[]).status;
    assert_eq!(
        conflict(&[0x16, 0, 0, 0, 0, 0]),
        ScsiStatus::ReservationConflict
    );
    assert_eq!(
        conflict(&[0x1A, 0, 0x3F, 0, 255, 0]),
        ScsiStatus::ReservationConflict
    );
    assert_eq!(
        conflict(&cdb10(0x28, 0, 0, 1)),
        ScsiStatus::ReservationConflict
    );
    // Reporting commands and RELEASE (a no-op) still work for others.
    assert_eq!(conflict(&[0x12, 0, 0, 0, 36, 0]), ScsiStatus::Good);
    assert_eq!(conflict(&[0x17, 0, 0, 0, 0, 0]), ScsiStatus::Good);
    assert_eq!(
        conflict(&[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]),
        ScsiStatus::Good
    );
    h.ok(&[0x1A, 0, 0x3F, 0, 255, 0], &[]);
    h.ok(&[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(
        conflict(&[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        ScsiStatus::Good
    );
    // Released by LU reset.
    h.map
        .task_management(TaskMgmt::LogicalUnitReset { lun: 0 }, &h.n);
    h.run(0, &[0; 6], &[]);
    h.ok(&[0x16, 0, 0, 0, 0, 0], &[]);
    // Released by I_T nexus loss of the holder.
    h.map.nexus_loss(&h.n);
    h.run(0, &[0; 6], &[]);
    h.run_as(&b, 0, &[0; 6], &[]);
    assert_eq!(conflict(&[0x16, 0, 0, 0, 0, 0]), ScsiStatus::Good);
}

// ---------------------------------------------------- PERSISTENT RESERVATIONS

fn prout(sa: u8, pr_type: u8, key: u64, sa_key: u64, flags: u8) -> ([u8; 10], Vec<u8>) {
    let c = [0x5F, sa, pr_type, 0, 0, 0, 0, 0, 24, 0];
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p[20] = flags;
    (c, p)
}

fn prin(sa: u8) -> [u8; 10] {
    [0x5E, sa, 0, 0, 0, 0, 0, 0x10, 0, 0]
}

struct Two {
    h: H,
    b: Arc<Nexus>,
}

impl Two {
    fn new() -> Two {
        let h = H::new();
        let b = nexus("iqn.init-b");
        h.run_as(&b, 0, &[0; 6], &[]);
        Two { h, b }
    }
    fn a(&self, (c, p): ([u8; 10], Vec<u8>)) -> ScsiResponse {
        self.h.run(0, &c, &p)
    }
    fn b(&self, (c, p): ([u8; 10], Vec<u8>)) -> ScsiResponse {
        self.h.run_as(&self.b, 0, &c, &p)
    }
    fn b_cmd(&self, cdb: &[u8], data: &[u8]) -> ScsiStatus {
        self.h.run_as(&self.b, 0, cdb, data).status
    }
}

fn keys(h: &H) -> (u32, Vec<u64>) {
    let d = h.ok(&prin(0), &[]);
    let gen = u32::from_be_bytes(d[0..4].try_into().unwrap());
    let n = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
    (
        gen,
        d[8..8 + n]
            .chunks(8)
            .map(|k| u64::from_be_bytes(k.try_into().unwrap()))
            .collect(),
    )
}

#[test]
fn pr_register_read_keys_and_generation() {
    let t = Two::new();
    assert_eq!(keys(&t.h), (0, vec![]));
    assert_eq!(t.a(prout(0, 0, 0, 0xAA, 0)).status, ScsiStatus::Good);
    assert_eq!(t.b(prout(6, 0, 0, 0xBB, 0)).status, ScsiStatus::Good);
    assert_eq!(keys(&t.h), (2, vec![0xAA, 0xBB]));
    // REGISTER with the wrong current key conflicts; with the right one it
    // changes the key.
    assert_eq!(
        t.a(prout(0, 0, 0x11, 0xCC, 0)).status,
        ScsiStatus::ReservationConflict
    );
    assert_eq!(t.a(prout(0, 0, 0xAA, 0xCC, 0)).status, ScsiStatus::Good);
    assert_eq!(keys(&t.h), (3, vec![0xCC, 0xBB]));
    // Unregistered nexus with a non-zero key conflicts; zero/zero is a no-op.
    let c = nexus("iqn.init-c");
    t.h.run_as(&c, 0, &[0; 6], &[]);
    let (cdb, p) = prout(0, 0, 5, 6, 0);
    assert_eq!(
        t.h.run_as(&c, 0, &cdb, &p).status,
        ScsiStatus::ReservationConflict
    );
    let (cdb, p) = prout(0, 0, 0, 0, 0);
    assert_eq!(t.h.run_as(&c, 0, &cdb, &p).status, ScsiStatus::Good);
    assert_eq!(keys(&t.h).0, 3);
    // Unregister.
    t.a(prout(0, 0, 0xCC, 0, 0));
    assert_eq!(keys(&t.h), (4, vec![0xBB]));
    // READ KEYS truncated to 8 bytes keeps the full ADDITIONAL LENGTH.
    let d = t.h.ok(&[0x5E, 0, 0, 0, 0, 0, 0, 0, 8, 0], &[]);
    assert_eq!(d.len(), 8);
    assert_eq!(&d[4..8], &8u32.to_be_bytes());
}

#[test]
fn pr_out_parameter_errors() {
    let t = Two::new();
    let (mut c, p) = prout(0, 0, 0, 1, 0);
    c[8] = 23;
    assert_eq!(k3(t.h.fail(&c, &p)), [5, 0x1A, 0]);
    let (c, p) = prout(0, 0, 0, 1, 0);
    assert_eq!(k3(t.h.fail(&c, &p[..20])), [5, 0x1A, 0]);
    assert_eq!(
        t.h.fail(&c, &{
            let mut q = p.clone();
            q[20] = 0x08;
            q
        }),
        (5, 0x26, 0, [0x8B, 0, 20])
    );
    t.a(prout(0, 0, 0, 1, 0));
    assert_eq!(
        t.h.fail(&prout(1, 0x02, 1, 0, 0).0, &prout(1, 0x02, 1, 0, 0).1),
        (5, 0x24, 0, cdb_ptr(2, Some(3)))
    );
    assert_eq!(
        t.h.fail(&prout(1, 0x13, 1, 0, 0).0, &prout(1, 0x13, 1, 0, 0).1),
        (5, 0x24, 0, cdb_ptr(2, Some(7)))
    );
    // Unknown service actions of PR IN / PR OUT.
    assert_eq!(t.h.fail(&prin(4), &[]), (5, 0x24, 0, cdb_ptr(1, Some(4))));
    assert_eq!(
        t.h.fail(&[0x5F, 7, 0, 0, 0, 0, 0, 0, 24, 0], &[0; 24]),
        (5, 0x24, 0, cdb_ptr(1, Some(4)))
    );
}

#[test]
fn pr_access_matrix_per_type() {
    // (type, registered B can read, registered B can write, unregistered B
    // can read, unregistered B can write) — libiscsi prout_reserve_access.
    let cases = [
        (pr::EXCLUSIVE_ACCESS, false, false, false, false),
        (pr::WRITE_EXCLUSIVE, true, false, true, false),
        (pr::EXCLUSIVE_ACCESS_RO, true, true, false, false),
        (pr::WRITE_EXCLUSIVE_RO, true, true, true, false),
        (pr::EXCLUSIVE_ACCESS_AR, true, true, false, false),
        (pr::WRITE_EXCLUSIVE_AR, true, true, true, false),
    ];
    for (ty, reg_r, reg_w, unreg_r, unreg_w) in cases {
        let t = Two::new();
        t.a(prout(6, 0, 0, 0xA, 0));
        t.b(prout(6, 0, 0, 0xB, 0));
        assert_eq!(
            t.a(prout(1, ty, 0xA, 0, 0)).status,
            ScsiStatus::Good,
            "type {ty}"
        );
        let rr = t.h.ok(&prin(1), &[]);
        assert_eq!(&rr[4..8], &16u32.to_be_bytes());
        let expect_key = if ty >= 7 { 0 } else { 0xA };
        assert_eq!(&rr[8..16], &u64::to_be_bytes(expect_key));
        assert_eq!(rr[21], ty);
        t.h.ok(&cdb10(0x28, 0, 1, 1), &[]);
        t.h.ok(&cdb10(0x2A, 0, 1, 1), &[0; 512]);
        let st = |ok: bool| {
            if ok {
                ScsiStatus::Good
            } else {
                ScsiStatus::ReservationConflict
            }
        };
        assert_eq!(
            t.b_cmd(&cdb10(0x28, 0, 1, 1), &[]),
            st(reg_r),
            "type {ty} reg read"
        );
        assert_eq!(
            t.b_cmd(&cdb10(0x2A, 0, 1, 1), &[0; 512]),
            st(reg_w),
            "type {ty} reg write"
        );
        // Always allowed: INQUIRY, READ CAPACITY, TEST UNIT READY, PR IN.
        assert_eq!(t.b_cmd(&[0x12, 0, 0, 0, 36, 0], &[]), ScsiStatus::Good);
        assert_eq!(
            t.b_cmd(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]),
            ScsiStatus::Good
        );
        assert_eq!(t.b_cmd(&[0; 6], &[]), ScsiStatus::Good);
        t.b(prout(0, 0, 0xB, 0, 0));
        // Unregistering may release registrants-only reservations' UAs.
        t.h.run_as(&t.b, 0, &[0; 6], &[]);
        assert_eq!(
            t.b_cmd(&cdb10(0x28, 0, 1, 1), &[]),
            st(unreg_r),
            "type {ty} unreg read"
        );
        assert_eq!(
            t.b_cmd(&cdb10(0x2A, 0, 1, 1), &[0; 512]),
            st(unreg_w),
            "type {ty} unreg write"
        );
        assert_eq!(t.a(prout(2, ty, 0xA, 0, 0)).status, ScsiStatus::Good);
        assert_eq!(&t.h.ok(&prin(1), &[])[4..8], &0u32.to_be_bytes());
        assert_eq!(t.b_cmd(&cdb10(0x2A, 0, 1, 1), &[0; 512]), ScsiStatus::Good);
    }
}

#[test]
fn pr_reserve_release_rules() {
    let t = Two::new();
    // Not registered: conflict.
    assert_eq!(
        t.a(prout(1, 3, 0, 0, 0)).status,
        ScsiStatus::ReservationConflict
    );
    t.a(prout(6, 0, 0, 0xA, 0));
    t.b(prout(6, 0, 0, 0xB, 0));
    assert_eq!(t.a(prout(1, 3, 0xA, 0, 0)).status, ScsiStatus::Good);
    // Same type again: fine; other type or other nexus: conflict.
    assert_eq!(t.a(prout(1, 3, 0xA, 0, 0)).status, ScsiStatus::Good);
    assert_eq!(
        t.a(prout(1, 1, 0xA, 0, 0)).status,
        ScsiStatus::ReservationConflict
    );
    assert_eq!(
        t.b(prout(1, 3, 0xB, 0, 0)).status,
        ScsiStatus::ReservationConflict
    );
    // RESERVE(6) conflicts while registrations exist.
    assert_eq!(
        t.h.run(0, &[0x16, 0, 0, 0, 0, 0], &[]).status,
        ScsiStatus::ReservationConflict
    );
    // Release by a non-holder is a no-op; wrong type by the holder is an error.
    assert_eq!(t.b(prout(2, 3, 0xB, 0, 0)).status, ScsiStatus::Good);
    assert_eq!(t.h.ok(&prin(1), &[])[21], 3);
    assert_eq!(k3(sense_of(&t.a(prout(2, 1, 0xA, 0, 0)))), [5, 0x26, 0x04]);
    // Holder unregistering releases a non-shared reservation.
    t.a(prout(0, 0, 0xA, 0, 0));
    assert_eq!(&t.h.ok(&prin(1), &[])[4..8], &0u32.to_be_bytes());
}

#[test]
fn pr_all_registrants_survives_holder_unregister() {
    let t = Two::new();
    t.a(prout(6, 0, 0, 0xA, 0));
    t.b(prout(6, 0, 0, 0xB, 0));
    t.a(prout(1, pr::WRITE_EXCLUSIVE_AR, 0xA, 0, 0));
    t.a(prout(0, 0, 0xA, 0, 0));
    assert_eq!(t.h.ok(&prin(1), &[])[21], pr::WRITE_EXCLUSIVE_AR);
    assert_eq!(
        t.b(prout(2, pr::WRITE_EXCLUSIVE_AR, 0xB, 0, 0)).status,
        ScsiStatus::Good
    );
    assert_eq!(&t.h.ok(&prin(1), &[])[4..8], &0u32.to_be_bytes());
}

#[test]
fn pr_clear_and_preempt() {
    let t = Two::new();
    t.a(prout(6, 0, 0, 0xA, 0));
    t.b(prout(6, 0, 0, 0xB, 0));
    t.a(prout(1, 3, 0xA, 0, 0));
    let (g0, _) = keys(&t.h);
    // B preempts A's reservation: A's registration goes, B holds type 1.
    assert_eq!(t.b(prout(4, 1, 0xB, 0xA, 0)).status, ScsiStatus::Good);
    // A learns it was preempted.
    assert_eq!(k3(t.h.fail(&[0; 6], &[])), [6, 0x2A, 0x05]);
    assert_eq!(keys(&t.h), (g0 + 1, vec![0xB]));
    let rr = t.h.run_as(&t.b, 0, &prin(1), &[]).data_in;
    assert_eq!((&rr[8..16], rr[21]), (&0xBu64.to_be_bytes()[..], 1));
    // Preempting a key nobody has conflicts; SARK 0 without a reservation
    // to take is invalid.
    assert_eq!(
        t.b(prout(4, 1, 0xB, 0x77, 0)).status,
        ScsiStatus::ReservationConflict
    );
    t.a(prout(6, 0, 0, 0xA, 0));
    assert_eq!(t.b(prout(5, 1, 0xB, 0xA, 0)).status, ScsiStatus::Good);
    assert_eq!(k3(t.h.fail(&[0; 6], &[])), [6, 0x2A, 0x05]);
    assert_eq!(keys(&t.h).1, vec![0xB]);
    t.b(prout(2, 1, 0xB, 0, 0));
    assert_eq!(
        sense_of(&t.b(prout(4, 1, 0xB, 0, 0))),
        (5, 0x26, 0, [0x80, 0, 8])
    );
    // CLEAR drops everything and tells the other registrants.
    t.a(prout(6, 0, 0, 0xA, 0));
    t.h.run(0, &[0; 6], &[]);
    t.b(prout(1, 3, 0xB, 0, 0));
    let (g1, _) = keys(&t.h);
    assert_eq!(t.b(prout(3, 0, 0xB, 0, 0)).status, ScsiStatus::Good);
    assert_eq!(k3(t.h.fail(&[0; 6], &[])), [6, 0x2A, 0x03]);
    assert_eq!(keys(&t.h), (g1 + 1, vec![]));
    assert_eq!(&t.h.ok(&prin(1), &[])[4..8], &0u32.to_be_bytes());
}

#[test]
fn pr_report_capabilities_and_full_status() {
    let t = Two::new();
    let d = t.h.ok(&prin(2), &[]);
    assert_eq!(d, vec![0, 8, 0x05, 0x90, 0xEA, 0x01, 0, 0]);
    t.a(prout(6, 0, 0, 0xA, 0x04)); // ALL_TG_PT
    t.b(prout(6, 0, 0, 0xB, 0));
    t.b(prout(1, 1, 0xB, 0, 0));
    let d = t.h.ok(&prin(3), &[]);
    let total = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
    assert_eq!(total, d.len() - 8);
    let first = &d[8..];
    assert_eq!(&first[..8], &0xAu64.to_be_bytes());
    assert_eq!(first[12], 0x02, "ALL_TG_PT, not holder");
    assert_eq!(&first[18..20], &[0, 0]);
    let tid_len = u32::from_be_bytes(first[20..24].try_into().unwrap()) as usize;
    assert_eq!(first[24], 0x45, "iSCSI, initiator port format");
    assert!(first[28..].starts_with(b"iqn.init-a,i,0x23d000000001\0"));
    let second = &first[24 + tid_len..];
    assert_eq!(&second[..8], &0xBu64.to_be_bytes());
    assert_eq!((second[12], second[13]), (0x01, 0x01), "holder, type WE");
    assert_eq!(&second[18..20], &[0, 1]);
}

#[derive(Default)]
struct MemStore(Mutex<std::collections::HashMap<String, Vec<u8>>>);

impl PrStore for MemStore {
    fn save(&self, lu: &str, state: &[u8]) {
        self.0.lock().unwrap().insert(lu.into(), state.to_vec());
    }
    fn load(&self, lu: &str) -> Option<Vec<u8>> {
        self.0.lock().unwrap().get(lu).cloned()
    }
}

#[test]
fn pr_aptpl_persists_through_store() {
    let store = Arc::new(MemStore::default());
    let dev: Arc<dyn BlockDev> = Arc::new(crate::block::mem::MemDev::new(1 << 20));
    let make = || {
        let mut m = LunMap::new();
        m.insert(
            0,
            Arc::new(LogicalUnit::new(config(512), dev.clone()).with_pr_store(store.clone())),
        );
        m
    };
    let n = nexus("iqn.init-a");
    let run = |m: &LunMap, cdb: &[u8], data: &[u8]| {
        m.execute(&ScsiRequest {
            cdb,
            lun: 0,
            nexus: &n,
            data_out: data,
            expected_in_len: 4096,
            task_attr: TaskAttr::Simple,
        })
    };
    let m = make();
    run(&m, &[0; 6], &[]);
    // Without APTPL nothing is saved.
    let (c, p) = prout(6, 0, 0, 0x1, 0);
    run(&m, &c, &p);
    assert!(store.load("vol0").is_none());
    let (c, p) = prout(6, 0, 0, 0x2, 0x01);
    assert_eq!(run(&m, &c, &p).status, ScsiStatus::Good);
    let (c, p) = prout(1, 3, 0x2, 0, 0);
    assert_eq!(run(&m, &c, &p).status, ScsiStatus::Good);
    assert!(store.load("vol0").is_some());
    assert_eq!(run(&m, &prin(2), &[]).data_in[3] & 0x01, 0x01, "PTPL_A");
    // A new LU (daemon restart) restores registration and reservation.
    let m2 = make();
    run(&m2, &[0; 6], &[]);
    let rr = run(&m2, &prin(1), &[]).data_in;
    assert_eq!((&rr[8..16], rr[21]), (&2u64.to_be_bytes()[..], 3));
    // And the reservation is enforced against others.
    let other = nexus("iqn.init-z");
    let r = m2.execute(&ScsiRequest {
        cdb: &cdb10(0x28, 0, 0, 1),
        lun: 0,
        nexus: &other,
        data_out: &[],
        expected_in_len: 512,
        task_attr: TaskAttr::Simple,
    });
    assert_eq!(r.status, ScsiStatus::CheckCondition, "power-on UA first");
    let r = m2.execute(&ScsiRequest {
        cdb: &cdb10(0x28, 0, 0, 1),
        lun: 0,
        nexus: &other,
        data_out: &[],
        expected_in_len: 512,
        task_attr: TaskAttr::Simple,
    });
    assert_eq!(r.status, ScsiStatus::ReservationConflict);
    // Turning APTPL off saves a state that restores to nothing.
    let (c, p) = prout(0, 0, 0x2, 0x2, 0);
    run(&m2, &c, &p);
    let m3 = make();
    run(&m3, &[0; 6], &[]);
    assert_eq!(&run(&m3, &prin(0), &[]).data_in[4..8], &0u32.to_be_bytes());
}
