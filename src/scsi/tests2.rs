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
    // UNMAP deallocates whatever the pattern; without UNMAP it is written.
    h.ok(&ws16(0, 0, 2), &[1; 512]);
    assert_eq!(h.dev.allocation(0, 1024).unwrap(), (true, 1024));
    h.ok(&ws16(0x08, 0, 2), &[1; 512]);
    assert_eq!(h.dev.allocation(0, 1024).unwrap(), (false, 1024));
    assert_eq!(h.ok(&cdb10(0x28, 0, 0, 2), &[]), vec![0; 1024]);
    // NDOB + UNMAP, to the end of the medium.
    h.ok(&ws16(0, BLOCKS - 3, 3), &[1; 512]);
    h.ok(&ws16(0x09, BLOCKS - 3, 0), &[]);
    assert_eq!(
        h.dev.allocation((BLOCKS - 3) * 512, 1536).unwrap(),
        (false, 1536)
    );
}

#[test]
fn write_same_longer_than_maximum() {
    let dev: Arc<dyn BlockDev> = Arc::new(crate::block::mem::MemDev::new(70_000 * 512));
    let mut map = LunMap::new();
    map.insert(0, Arc::new(LogicalUnit::new(config(512), dev.clone())));
    let h = H {
        map,
        dev,
        n: nexus("iqn.init-a"),
    };
    h.run(0, &[0; 6], &[]);
    let b = [0u8; 512];
    // 0 blocks from LBA 0 means 70000 blocks: more than 65535.
    assert_eq!(h.fail(&ws16(0, 0, 0), &b), (5, 0x24, 0, cdb_ptr(10, None)));
    assert_eq!(
        h.fail(&ws16(0, 0, 65536), &b),
        (5, 0x24, 0, cdb_ptr(10, None))
    );
    h.ok(&ws16(0, 70_000 - 65535, 0), &b);
    h.ok(&ws10(0, 0, 0xFFFF), &b);
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
        &(1u32 << 20).to_be_bytes(),
        "max unmap LBA count"
    );
    assert_eq!(&b0[24..28], &256u32.to_be_bytes(), "max unmap descriptors");
    assert_eq!(&b0[36..44], &0xFFFFu64.to_be_bytes(), "max write same");
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
    // Data-out must be exactly twice the blocks (else the NUMBER OF LOGICAL
    // BLOCKS field is inconsistent); range checked; 0 blocks OK.
    assert_eq!(
        h.fail(&caw(3, 1, 0), &[0; 2048]),
        (5, 0x24, 0, cdb_ptr(13, None))
    );
    assert_eq!(
        h.fail(&caw(3, 0, 0), &[0; 2048]),
        (5, 0x24, 0, cdb_ptr(13, None))
    );
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
            data_in_by_ref: false,
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
        data_in_by_ref: false,
    });
    assert_eq!(r.status, ScsiStatus::CheckCondition, "power-on UA first");
    let r = m2.execute(&ScsiRequest {
        cdb: &cdb10(0x28, 0, 0, 1),
        lun: 0,
        nexus: &other,
        data_out: &[],
        expected_in_len: 512,
        task_attr: TaskAttr::Simple,
        data_in_by_ref: false,
    });
    assert_eq!(r.status, ScsiStatus::ReservationConflict);
    // Turning APTPL off saves a state that restores to nothing.
    let (c, p) = prout(0, 0, 0x2, 0x2, 0);
    run(&m2, &c, &p);
    let m3 = make();
    run(&m3, &[0; 6], &[]);
    assert_eq!(&run(&m3, &prin(0), &[]).data_in[4..8], &0u32.to_be_bytes());
}

// -------------------------------------------------------------------- SANITIZE

fn sanitize(sa: u8, b1: u8, len: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x48;
    c[1] = sa | b1;
    c[7..9].copy_from_slice(&len.to_be_bytes());
    c
}

fn overwrite_params(b0: u8, pattern: &[u8]) -> Vec<u8> {
    let mut p = vec![b0, 0];
    p.extend_from_slice(&(pattern.len() as u16).to_be_bytes());
    p.extend_from_slice(pattern);
    p
}

#[test]
fn sanitize_overwrite() {
    let h = H::new();
    h.ok(&cdb10(0x2A, 0, 0, 2), &[b'a'; 1024]);
    let p = overwrite_params(0x01, &[0xAA; 512]);
    h.ok(&sanitize(1, 0, p.len() as u16), &p);
    assert_eq!(h.ok(&cdb10(0x28, 0, 0, 2), &[]), vec![0xAA; 1024]);
    assert_eq!(
        h.ok(&cdb10(0x28, 0, BLOCKS as u32 - 1, 1), &[]),
        vec![0xAA; 512]
    );
    // Short pattern replicated; INVERT with an even count inverts.
    let p = overwrite_params(0x82, &[0x0F, 0xF1]);
    h.ok(&sanitize(1, 0, p.len() as u16), &p);
    let d = h.ok(&cdb10(0x28, 0, 7, 1), &[]);
    assert!(d.chunks(2).all(|c| c == [0xF0, 0x0E]));
    // Parameter list length outside 5..=bs+4, count 0, pattern length 0 or
    // larger than the list.
    for len in 0..5u16 {
        assert_eq!(
            h.fail(&sanitize(1, 0, len), &p),
            (5, 0x24, 0, cdb_ptr(7, None))
        );
    }
    assert_eq!(
        h.fail(&sanitize(1, 0, 517), &[0; 520]),
        (5, 0x24, 0, cdb_ptr(7, None))
    );
    let p = overwrite_params(0x00, &[1; 512]);
    assert_eq!(h.fail(&sanitize(1, 0, 516), &p), (5, 0x26, 0, [0x8C, 0, 0]));
    let mut p = overwrite_params(0x01, &[1; 512]);
    p[2] = 0;
    p[3] = 0;
    assert_eq!(h.fail(&sanitize(1, 0, 516), &p), (5, 0x26, 0, [0x80, 0, 2]));
    p[2..4].copy_from_slice(&516u16.to_be_bytes());
    assert_eq!(h.fail(&sanitize(1, 0, 516), &p), (5, 0x26, 0, [0x80, 0, 2]));
    // Reserved bit 6 of byte 1, reserved bytes 2..6, unsupported actions.
    let p = overwrite_params(0x01, &[1; 512]);
    assert_eq!(
        h.fail(&sanitize(1, 0x40, 516), &p),
        (5, 0x24, 0, cdb_ptr(1, Some(6)))
    );
    for i in 2..7 {
        let mut c = sanitize(1, 0, 516);
        c[i] = 1;
        assert_eq!(h.fail(&c, &p), (5, 0x24, 0, cdb_ptr(i as u16, Some(7))));
    }
    for sa in [0u8, 3, 4, 0x1E] {
        assert_eq!(
            h.fail(&sanitize(sa, 0, 0), &[]),
            (5, 0x24, 0, cdb_ptr(1, Some(4)))
        );
    }
    // BLOCK ERASE needs a thin LU.
    assert_eq!(h.fail(&sanitize(2, 0, 0), &[]), (5, 0x20, 0, [0, 0, 0]));
}

#[test]
fn sanitize_block_erase_deallocates_everything() {
    let h = thin();
    h.ok(&cdb10(0x2A, 0, 0, 4), &[b'a'; 2048]);
    assert_eq!(
        h.fail(&sanitize(2, 0, 8), &[0; 8]),
        (5, 0x24, 0, cdb_ptr(7, None))
    );
    h.ok(&sanitize(2, 0, 0), &[]);
    assert_eq!(h.ok(&cdb10(0x28, 0, 0, 4), &[]), vec![0; 2048]);
    let d = h.ok(&gls(0, 256), &[]);
    assert_eq!(&d[..4], &20u32.to_be_bytes());
    assert_eq!((&d[16..20], d[20]), (&(BLOCKS as u32).to_be_bytes()[..], 1));
    let b1 = h.ok(&[0x12, 1, 0xB1, 0, 64, 0], &[]);
    assert_eq!(b1[7] & 0xC0, 0x40, "WABEREQ");
}

#[test]
fn sanitize_respects_protection_and_reservations() {
    let mut cfg = config(512);
    cfg.read_only = true;
    let ro = H::with(cfg, BlockCaps::default());
    let p = overwrite_params(0x01, &[1; 512]);
    assert_eq!(k3(ro.fail(&sanitize(1, 0, 516), &p)), [7, 0x27, 0]);
    let h = H::new();
    let b = nexus("iqn.init-b");
    h.run_as(&b, 0, &[0; 6], &[]);
    h.run_as(&b, 0, &[0x16, 0, 0, 0, 0, 0], &[]);
    assert_eq!(
        h.run(0, &sanitize(1, 0, 516), &p).status,
        ScsiStatus::ReservationConflict
    );
}

// --------------------------------------------------------------- EXTENDED COPY

fn target_desc(naa: &[u8; 16], bs: u32) -> Vec<u8> {
    let mut d = vec![0u8; 32];
    d[0] = 0xE4;
    d[4] = 0x01; // binary
    d[5] = 0x03; // NAA, LU association
    d[7] = 16;
    d[8..24].copy_from_slice(naa);
    d[29..32].copy_from_slice(&bs.to_be_bytes()[1..]);
    d
}

fn seg_b2b(src: u16, dst: u16, blocks: u16, src_lba: u64, dst_lba: u64) -> Vec<u8> {
    let mut d = vec![0u8; 28];
    d[0] = 0x02;
    d[2..4].copy_from_slice(&24u16.to_be_bytes());
    d[4..6].copy_from_slice(&src.to_be_bytes());
    d[6..8].copy_from_slice(&dst.to_be_bytes());
    d[10..12].copy_from_slice(&blocks.to_be_bytes());
    d[12..20].copy_from_slice(&src_lba.to_be_bytes());
    d[20..28].copy_from_slice(&dst_lba.to_be_bytes());
    d
}

fn xcopy_list(list_id: u8, usage: u8, targets: Vec<Vec<u8>>, segs: Vec<Vec<u8>>) -> Vec<u8> {
    let t: Vec<u8> = targets.concat();
    let s: Vec<u8> = segs.concat();
    let mut p = vec![0u8; 16];
    p[0] = list_id;
    p[1] = usage << 3;
    p[2..4].copy_from_slice(&(t.len() as u16).to_be_bytes());
    p[8..12].copy_from_slice(&(s.len() as u32).to_be_bytes());
    p.extend(t);
    p.extend(s);
    p
}

fn xcopy_cdb(len: usize) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x83;
    c[10..14].copy_from_slice(&(len as u32).to_be_bytes());
    c
}

fn rcr(sa: u8, list_id: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x84;
    c[1] = sa;
    c[2] = list_id;
    c[10..14].copy_from_slice(&1024u32.to_be_bytes());
    c
}

#[test]
fn extended_copy_within_and_between_lus() {
    let mut h = H::new();
    let mut cfg1 = config(512);
    cfg1.naa[15] = 0x99;
    let dev1: Arc<dyn BlockDev> = Arc::new(crate::block::mem::MemDev::new(BLOCKS * 512));
    h.map
        .insert(1, Arc::new(LogicalUnit::new(cfg1.clone(), dev1.clone())));
    h.run(0, &[0; 6], &[]);
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    h.ok(&cdb10(0x2A, 0, 0, 8), &data);
    let me = config(512).naa;
    // Within LUN 0: blocks 0..8 to 100..108.
    let p = xcopy_list(
        1,
        0,
        vec![target_desc(&me, 512)],
        vec![seg_b2b(0, 0, 8, 0, 100)],
    );
    h.ok(&xcopy_cdb(p.len()), &p);
    assert_eq!(h.ok(&cdb10(0x28, 0, 100, 8), &[]), data);
    // LUN 0 → LUN 1, two segments.
    let p = xcopy_list(
        2,
        0,
        vec![target_desc(&me, 512), target_desc(&cfg1.naa, 512)],
        vec![seg_b2b(0, 1, 4, 0, 10), seg_b2b(0, 1, 4, 4, 20)],
    );
    h.ok(&xcopy_cdb(p.len()), &p);
    let mut out = vec![0u8; 2048];
    dev1.read_at(&mut out, 10 * 512).unwrap();
    assert_eq!(out, data[..2048]);
    dev1.read_at(&mut out, 20 * 512).unwrap();
    assert_eq!(out, data[2048..]);
    // COPY STATUS of list 2: completed, 2 segments, 4 KiB.
    let d = h.ok(&rcr(0, 2), &[]);
    assert_eq!(d, vec![0, 0, 0, 8, 0x01, 0, 2, 0x01, 0, 0, 0, 4]);
    // Unknown list id.
    assert_eq!(h.fail(&rcr(0, 9), &[]), (5, 0x24, 0, cdb_ptr(2, None)));
    // Zero-length parameter list is a no-op.
    h.ok(&xcopy_cdb(0), &[]);
}

#[test]
fn extended_copy_errors() {
    let h = H::new();
    let me = config(512).naa;
    let t = target_desc(&me, 512);
    let ok_seg = seg_b2b(0, 0, 4, 0, 100);
    let run = |p: &[u8], len: usize| sense_of(&h.run(0, &xcopy_cdb(len), p));
    // Truncated descriptors: parameter list length error.
    let p = xcopy_list(1, 0, vec![t.clone()], vec![ok_seg.clone()]);
    assert_eq!(k3(run(&p, 16 + 31)), [5, 0x1A, 0]);
    assert_eq!(k3(run(&p, p.len() - 1)), [5, 0x1A, 0]);
    // Too many targets / segments; list longer than the maximum.
    let p = xcopy_list(1, 0, vec![t.clone(); 5], vec![ok_seg.clone()]);
    assert_eq!(k3(run(&p, p.len())), [5, 0x26, 0x06]);
    let p = xcopy_list(1, 0, vec![t.clone()], vec![ok_seg.clone(); 17]);
    assert_eq!(k3(run(&p, p.len())), [5, 0x26, 0x08]);
    let p = xcopy_list(1, 0, vec![t.clone(); 5], vec![ok_seg.clone(); 32]);
    assert_eq!(k3(run(&p, p.len())), [5, 0x1A, 0]);
    // Unsupported descriptor types.
    let mut fc = t.clone();
    fc[0] = 0xE0;
    let p = xcopy_list(1, 0, vec![fc], vec![ok_seg.clone()]);
    assert_eq!(k3(run(&p, p.len())), [5, 0x26, 0x07]);
    let mut s2s = ok_seg.clone();
    s2s[0] = 0x03;
    let p = xcopy_list(1, 0, vec![t.clone()], vec![s2s]);
    assert_eq!(k3(run(&p, p.len())), [5, 0x26, 0x09]);
    // Bad destination index, beyond the end, unknown designator: COPY ABORTED.
    let p = xcopy_list(1, 0, vec![t.clone()], vec![seg_b2b(0, 1, 4, 0, 100)]);
    assert_eq!(k3(run(&p, p.len())), [0x0A, 0x08, 0x04]);
    let p = xcopy_list(1, 0, vec![t.clone()], vec![seg_b2b(0, 0, 4, 0, BLOCKS - 1)]);
    assert_eq!(run(&p, p.len()).0, 0x0A);
    let mut other = config(512).naa;
    other[0] = 0x61;
    let p = xcopy_list(1, 0, vec![target_desc(&other, 512)], vec![ok_seg.clone()]);
    assert_eq!(k3(run(&p, p.len())), [0x0A, 0x08, 0x04]);
    // The failed copy is reported as completed with error.
    let p = xcopy_list(
        7,
        0,
        vec![t.clone()],
        vec![ok_seg.clone(), seg_b2b(0, 0, 4, 0, BLOCKS)],
    );
    assert_eq!(run(&p, p.len()).0, 0x0A);
    let d = h.ok(&rcr(0, 7), &[]);
    assert_eq!((d[4], &d[5..7]), (0x02, &[0u8, 1][..]));
    // LU ID TYPE is ignored (SPC-4).
    let mut t2 = t.clone();
    t2[1] = 0xC0;
    let p = xcopy_list(1, 0, vec![t2], vec![ok_seg]);
    h.ok(&xcopy_cdb(p.len()), &p);
}

#[test]
fn receive_copy_results_operating_parameters_and_vpd() {
    let h = H::new();
    let d = h.ok(&rcr(3, 0), &[]);
    assert_eq!(
        u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize,
        d.len() - 4
    );
    assert_eq!(&d[8..10], &4u16.to_be_bytes());
    assert_eq!(&d[10..12], &16u16.to_be_bytes());
    assert_eq!(&d[12..16], &1024u32.to_be_bytes());
    assert_eq!(d[43], 2);
    assert_eq!(&d[44..46], &[0x02, 0xE4]);
    let v = h.ok(&[0x12, 1, 0x8F, 1, 0, 0], &[]);
    assert_eq!(&v[..2], &[0, 0x8F]);
    assert_eq!(u16::from_be_bytes([v[2], v[3]]) as usize, v.len() - 4);
    // First descriptor: supported commands, listing 0x83/[0] and 0x84/[0,3].
    assert_eq!(&v[4..6], &[0, 1]);
    let len = u16::from_be_bytes([v[6], v[7]]) as usize;
    assert_eq!((len + 4) % 4, 0);
    assert_eq!(&v[8..16], &[7, 0x83, 1, 0x00, 0x84, 2, 0x00, 0x03]);
    // Every descriptor length walks exactly to the end.
    let mut at = 4;
    while at < v.len() {
        at += 4 + u16::from_be_bytes([v[at + 2], v[at + 3]]) as usize;
    }
    assert_eq!(at, v.len());
}

// ------------------------------------------------------------------- proptest

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1500))]

        /// Known opcodes with random fields and parameter data on a thin LU,
        /// from two nexuses, so PR, XCOPY, UNMAP and SANITIZE parsers see
        /// hostile input with state left over from earlier commands.
        #[test]
        fn thin_lu_never_panics(
            cmds in proptest::collection::vec(
                (0usize..128, proptest::collection::vec(any::<u8>(), 15),
                 proptest::collection::vec(any::<u8>(), 0..700), any::<bool>()),
                1..6,
            ),
        ) {
            let h = thin();
            let b = nexus("iqn.fuzz-b");
            for (idx, tail, data, second) in cmds {
                let desc = &cdb::OPCODES[idx % cdb::OPCODES.len()];
                let mut c = vec![desc.opcode];
                c.extend_from_slice(&tail);
                if let Some(sa) = desc.sa {
                    c[1] = (c[1] & 0xE0) | sa as u8;
                }
                c.truncate(desc.usage.len());
                let n = if second { &b } else { &h.n };
                let r = h.run_as(n, 0, &c, &data);
                if r.status == ScsiStatus::CheckCondition {
                    prop_assert!(r.sense.len() >= 8);
                }
            }
        }
    }
}
