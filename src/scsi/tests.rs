//! Command-level tests through `LunMap::execute`, on `MemDev`: data-in
//! layouts against the spec, sense (with field pointers) for bad fields,
//! unit attentions, and a property test that no input panics.

use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::block::mem::MemDev;
use crate::block::{BlockCaps, BlockDev, BlockResult, WriteFlags};

/// MemDev with chosen capabilities (thin provisioning, read-only).
#[derive(Debug)]
pub(crate) struct CapsDev {
    pub inner: MemDev,
    pub caps: BlockCaps,
}

impl BlockDev for CapsDev {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> BlockResult<()> {
        self.inner.write_at(buf, offset, flags)
    }
    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    fn caps(&self) -> BlockCaps {
        self.caps
    }
}

pub(crate) fn config(bs: u32) -> LuConfig {
    LuConfig {
        volume: "vol0".into(),
        block_size: bs,
        read_only: false,
        serial: "SER0001".into(),
        naa: [
            0x60, 0x01, 0x40, 0x50, 0xAA, 0xBB, 0xCC, 0xDD, 1, 2, 3, 4, 5, 6, 7, 8,
        ],
        vendor: "LUNMIRR".into(),
        product: "mirror-disk".into(),
        revision: "0.1".into(),
    }
}

pub(crate) fn nexus(init: &str) -> Arc<Nexus> {
    Arc::new(Nexus {
        initiator_port: format!("{init},i,0x23d000000001"),
        target_port: "iqn.2026-11.io.lunmirror:default,t,0x0001".into(),
        relative_port_id: 1,
        port_group_id: 7,
    })
}

pub(crate) struct H {
    pub map: LunMap,
    pub dev: Arc<dyn BlockDev>,
    pub n: Arc<Nexus>,
}

pub(crate) const BLOCKS: u64 = 2048;

impl H {
    pub fn with(cfg: LuConfig, caps: BlockCaps) -> H {
        let size = BLOCKS * u64::from(cfg.block_size);
        let dev: Arc<dyn BlockDev> = Arc::new(CapsDev {
            inner: MemDev::new(size),
            caps,
        });
        let mut map = LunMap::new();
        map.insert(0, Arc::new(LogicalUnit::new(cfg, dev.clone())));
        let h = H {
            map,
            dev,
            n: nexus("iqn.init-a"),
        };
        // Consume the power-on unit attention.
        let r = h.run(0, &[0; 6], &[]);
        assert_eq!(r.status, ScsiStatus::CheckCondition);
        h
    }

    pub fn new() -> H {
        H::with(config(512), BlockCaps::default())
    }

    pub fn run_as(&self, n: &Arc<Nexus>, lun: u64, cdb: &[u8], data_out: &[u8]) -> ScsiResponse {
        self.map.execute(&ScsiRequest {
            cdb,
            lun,
            nexus: n,
            data_out,
            expected_in_len: 1 << 20,
            task_attr: TaskAttr::Simple,
            data_in_by_ref: false,
        })
    }

    pub fn run(&self, lun: u64, cdb: &[u8], data_out: &[u8]) -> ScsiResponse {
        self.run_as(&self.n, lun, cdb, data_out)
    }

    /// Run and expect GOOD; return data-in.
    pub fn ok(&self, cdb: &[u8], data_out: &[u8]) -> Vec<u8> {
        let r = self.run(0, cdb, data_out);
        assert_eq!(r.status, ScsiStatus::Good, "sense {:02x?}", r.sense);
        r.data_in
    }

    /// Run and expect CHECK CONDITION; return (key, asc, ascq, sks bytes).
    pub fn fail(&self, cdb: &[u8], data_out: &[u8]) -> (u8, u8, u8, [u8; 3]) {
        sense_of(&self.run(0, cdb, data_out))
    }
}

pub(crate) fn sense_of(r: &ScsiResponse) -> (u8, u8, u8, [u8; 3]) {
    assert_eq!(r.status, ScsiStatus::CheckCondition);
    let s = &r.sense;
    assert_eq!(s[0] & 0x7F, 0x70, "fixed format");
    (s[2] & 0x0F, s[12], s[13], [s[15], s[16], s[17]])
}

/// Sense key, ASC, ASCQ.
pub(crate) fn k3(t: (u8, u8, u8, [u8; 3])) -> [u8; 3] {
    [t.0, t.1, t.2]
}

/// SKS for INVALID FIELD IN CDB at byte/bit.
pub(crate) fn cdb_ptr(byte: u16, bit: Option<u8>) -> [u8; 3] {
    let [hi, lo] = byte.to_be_bytes();
    [0xC0 | bit.map_or(0, |b| 0x08 | b), hi, lo]
}

pub(crate) fn cdb10(op: u8, b1: u8, lba: u32, len: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[1] = b1;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&len.to_be_bytes());
    c
}

pub(crate) fn cdb16(op: u8, b1: u8, lba: u64, len: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[1] = b1;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&len.to_be_bytes());
    c
}

fn inquiry(evpd: bool, page: u8, alloc: u16) -> [u8; 6] {
    let [hi, lo] = alloc.to_be_bytes();
    [0x12, u8::from(evpd), page, hi, lo, 0]
}

// ------------------------------------------------------------ unit attention

#[test]
fn power_on_ua_per_nexus_and_exempt_commands() {
    let h = H::new();
    let b = nexus("iqn.init-b");
    // INQUIRY and REPORT LUNS are not blocked and do not clear the UA.
    let r = h.run_as(&b, 0, &inquiry(false, 0, 96), &[]);
    assert_eq!(r.status, ScsiStatus::Good);
    let r = h.run_as(&b, 0, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    assert_eq!(r.status, ScsiStatus::Good);
    let r = h.run_as(&b, 0, &[0; 6], &[]);
    assert_eq!(k3(sense_of(&r)), [0x06, 0x29, 0x00]);
    assert_eq!(h.run_as(&b, 0, &[0; 6], &[]).status, ScsiStatus::Good);
    // Nexus A already consumed its own.
    assert_eq!(h.run(0, &[0; 6], &[]).status, ScsiStatus::Good);
}

#[test]
fn request_sense_reports_and_clears_ua() {
    let h = H::new();
    let b = nexus("iqn.init-b");
    let r = h.run_as(&b, 0, &[0x03, 0, 0, 0, 252, 0], &[]);
    assert_eq!(r.status, ScsiStatus::Good);
    assert_eq!(r.data_in.len(), 18);
    assert_eq!(
        (r.data_in[2], r.data_in[12], r.data_in[13]),
        (0x06, 0x29, 0x00)
    );
    let r = h.run_as(&b, 0, &[0x03, 0, 0, 0, 252, 0], &[]);
    assert_eq!((r.data_in[2], r.data_in[12]), (0x00, 0x00));
    // Descriptor format on request.
    let r = h.run_as(&b, 0, &[0x03, 1, 0, 0, 252, 0], &[]);
    assert_eq!(&r.data_in[..4], &[0x72, 0, 0, 0]);
    // Allocation length truncates.
    let r = h.run_as(&b, 0, &[0x03, 0, 0, 0, 8, 0], &[]);
    assert_eq!(r.data_in.len(), 8);
}

#[test]
fn resets_raise_ua_for_every_nexus() {
    let h = H::new();
    let b = nexus("iqn.init-b");
    h.run_as(&b, 0, &[0; 6], &[]);
    h.map
        .task_management(TaskMgmt::LogicalUnitReset { lun: 0 }, &h.n);
    assert_eq!(k3(h.fail(&[0; 6], &[])), [0x06, 0x29, 0x03]);
    assert_eq!(
        k3(sense_of(&h.run_as(&b, 0, &[0; 6], &[]))),
        [0x06, 0x29, 0x03]
    );
    h.map.task_management(TaskMgmt::TargetColdReset, &h.n);
    assert_eq!(k3(h.fail(&[0; 6], &[])), [0x06, 0x29, 0x01]);
    h.map
        .task_management(TaskMgmt::ClearTaskSet { lun: 0 }, &h.n);
    assert_eq!(h.run(0, &[0; 6], &[]).status, ScsiStatus::Good);
    assert_eq!(
        k3(sense_of(&h.run_as(&b, 0, &[0; 6], &[]))),
        [0x06, 0x29, 0x01]
    );
    assert_eq!(
        k3(sense_of(&h.run_as(&b, 0, &[0; 6], &[]))),
        [0x06, 0x2F, 0x00]
    );
    // A lost nexus drops what was pending and misses resets while away.
    h.map
        .task_management(TaskMgmt::LogicalUnitReset { lun: 0 }, &h.n);
    h.map.nexus_loss(&b);
    h.map.task_management(TaskMgmt::TargetWarmReset, &h.n);
    assert_eq!(h.run_as(&b, 0, &[0; 6], &[]).status, ScsiStatus::Good);
    assert_eq!(k3(h.fail(&[0; 6], &[])), [0x06, 0x29, 0x03]);
}

#[test]
fn ua_precedes_invalid_opcode() {
    let h = H::new();
    let b = nexus("iqn.init-b");
    assert_eq!(
        k3(sense_of(&h.run_as(&b, 0, &[0xFF; 6], &[]))),
        [0x06, 0x29, 0x00]
    );
    assert_eq!(
        k3(sense_of(&h.run_as(&b, 0, &[0xFF; 6], &[]))),
        [0x05, 0x20, 0x00]
    );
}

// --------------------------------------------------------------------- INQUIRY

#[test]
fn standard_inquiry_layout() {
    let h = H::new();
    let d = h.ok(&inquiry(false, 0, 255), &[]);
    assert_eq!(d.len(), 96);
    assert_eq!(d[0], 0x00);
    assert_eq!(d[2], 0x06);
    assert_eq!(d[3], 0x12);
    assert_eq!(d[4] as usize, d.len() - 5);
    assert_eq!(d[5] & 0x30, 0x10, "TPGS implicit");
    assert_eq!(d[5] & 0x08, 0x08, "3PC");
    assert_eq!(d[7] & 0x02, 0x02, "CMDQUE");
    assert_eq!(&d[8..16], b"LUNMIRR ");
    assert_eq!(&d[16..32], b"mirror-disk     ");
    assert_eq!(&d[32..36], b"0.1 ");
    assert_eq!(
        &d[58..66],
        &[0x00, 0xA0, 0x04, 0x60, 0x04, 0xC0, 0x09, 0x60]
    );
    // Allocation length truncation, 16-bit allocation length.
    assert_eq!(h.ok(&inquiry(false, 0, 5), &[]).len(), 5);
    assert_eq!(
        h.ok(&inquiry(false, 0, 512), &[]),
        h.ok(&inquiry(false, 0, 511), &[])
    );
}

#[test]
fn inquiry_bad_fields() {
    let h = H::new();
    // EVPD = 0 with a page code.
    assert_eq!(
        h.fail(&inquiry(false, 0x80, 96), &[]),
        (5, 0x24, 0, cdb_ptr(2, None))
    );
    // Unsupported VPD page.
    assert_eq!(
        h.fail(&inquiry(true, 0x42, 96), &[]),
        (5, 0x24, 0, cdb_ptr(2, None))
    );
    // NACA in the control byte.
    assert_eq!(
        h.fail(&[0x12, 0, 0, 0, 96, 0x04], &[]),
        (5, 0x24, 0, cdb_ptr(5, Some(2)))
    );
}

#[test]
fn vpd_supported_pages_and_serial() {
    let h = H::new();
    let d = h.ok(&inquiry(true, 0x00, 255), &[]);
    assert_eq!(&d[..4], &[0, 0, 0, 7]);
    assert_eq!(&d[4..], &[0x00, 0x80, 0x83, 0x8F, 0xB0, 0xB1, 0xB2]);
    let d = h.ok(&inquiry(true, 0x80, 255), &[]);
    assert_eq!(&d[..4], &[0, 0x80, 0, 7]);
    assert_eq!(&d[4..], b"SER0001");
}

#[test]
fn vpd_device_identification() {
    let h = H::new();
    let d = h.ok(&inquiry(true, 0x83, 1024), &[]);
    assert_eq!(&d[..2], &[0, 0x83]);
    assert_eq!(u16::from_be_bytes([d[2], d[3]]) as usize, d.len() - 4);
    let mut descs = Vec::new();
    let mut at = 4;
    while at < d.len() {
        let len = d[at + 3] as usize;
        descs.push((d[at], d[at + 1], d[at + 4..at + 4 + len].to_vec()));
        at += 4 + len;
    }
    assert_eq!(at, d.len());
    // NAA, binary, LU.
    assert_eq!(descs[0].0, 0x01);
    assert_eq!(descs[0].1, 0x03);
    assert_eq!(descs[0].2, config(512).naa.to_vec());
    // T10 vendor ID.
    assert_eq!((descs[1].0, descs[1].1), (0x02, 0x01));
    assert_eq!(&descs[1].2[..], b"LUNMIRR SER0001");
    // Relative target port 1 and target port group 7, iSCSI, PIV.
    assert_eq!((descs[2].0, descs[2].1), (0x51, 0x94));
    assert_eq!(descs[2].2, vec![0, 0, 0, 1]);
    assert_eq!((descs[3].0, descs[3].1), (0x51, 0x95));
    assert_eq!(descs[3].2, vec![0, 0, 0, 7]);
    // SCSI name strings: target port and target device, NUL padded to 4.
    assert_eq!((descs[4].0, descs[4].1), (0x53, 0x98));
    assert_eq!(descs[4].2.len() % 4, 0);
    assert!(descs[4]
        .2
        .starts_with(b"iqn.2026-11.io.lunmirror:default,t,0x0001\0"));
    assert_eq!((descs[5].0, descs[5].1), (0x53, 0xA8));
    assert!(descs[5]
        .2
        .starts_with(b"iqn.2026-11.io.lunmirror:default\0"));
}

#[test]
fn vpd_block_limits_characteristics_provisioning() {
    let h = H::new();
    let d = h.ok(&inquiry(true, 0xB0, 255), &[]);
    assert_eq!(d.len(), 64);
    assert_eq!(&d[..4], &[0, 0xB0, 0, 0x3C]);
    assert_eq!(u16::from_be_bytes([d[6], d[7]]), 8); // 4096 / 512
    assert_eq!(u32::from_be_bytes([d[8], d[9], d[10], d[11]]), 16384); // 8 MiB / 512
    let d = h.ok(&inquiry(true, 0xB1, 255), &[]);
    assert_eq!(&d[..6], &[0, 0xB1, 0, 0x3C, 0, 1]);
    let d = h.ok(&inquiry(true, 0xB2, 255), &[]);
    assert_eq!(d, vec![0, 0xB2, 0, 4, 0, 0, 0, 0]);
    let thin = H::with(
        config(4096),
        BlockCaps {
            discard: true,
            ..Default::default()
        },
    );
    let d = thin.ok(&inquiry(true, 0xB2, 255), &[]);
    assert_eq!(d[5] & 0x04, 0x04, "LBPRZ");
    assert_eq!(d[6] & 0x07, 2, "thin");
    let d = thin.ok(&inquiry(true, 0xB0, 255), &[]);
    assert_eq!(u16::from_be_bytes([d[6], d[7]]), 1);
    assert_eq!(u32::from_be_bytes([d[8], d[9], d[10], d[11]]), 2048);
}

// ------------------------------------------------------------------ REPORT LUNS

fn report_luns(select: u8, alloc: u32) -> [u8; 12] {
    let mut c = [0u8; 12];
    c[0] = 0xA0;
    c[2] = select;
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

#[test]
fn report_luns_encoding_and_select() {
    let mut h = H::new();
    for lun in [5u64, 300] {
        h.map.insert(
            lun,
            Arc::new(LogicalUnit::new(
                config(512),
                Arc::new(MemDev::new(1 << 20)),
            )),
        );
    }
    let d = h.ok(&report_luns(0, 4096), &[]);
    assert_eq!(&d[..8], &[0, 0, 0, 24, 0, 0, 0, 0]);
    assert_eq!(&d[8..16], &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&d[16..24], &[0, 5, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&d[24..32], &[0x41, 0x2C, 0, 0, 0, 0, 0, 0]);
    assert_eq!(decode_lun([0x41, 0x2C, 0, 0, 0, 0, 0, 0]), 300);
    assert_eq!(h.ok(&report_luns(2, 4096), &[]), d);
    assert_eq!(h.ok(&report_luns(1, 4096), &[]), vec![0; 8]);
    // Truncated to the allocation length, list length still complete.
    let t = h.ok(&report_luns(0, 16), &[]);
    assert_eq!(t.len(), 16);
    assert_eq!(&t[..4], &[0, 0, 0, 24]);
    assert_eq!(
        h.fail(&report_luns(3, 4096), &[]),
        (5, 0x24, 0, cdb_ptr(2, None))
    );
    assert_eq!(
        h.fail(&report_luns(0, 15), &[]),
        (5, 0x24, 0, cdb_ptr(6, None))
    );
    // Inserting LUNs raised REPORTED LUNS DATA HAS CHANGED on LUN 0, which
    // REPORT LUNS cleared.
    assert_eq!(h.run(0, &[0; 6], &[]).status, ScsiStatus::Good);
}

#[test]
fn reported_luns_changed_ua_until_report_luns() {
    let mut h = H::new();
    h.map.insert(
        1,
        Arc::new(LogicalUnit::new(
            config(512),
            Arc::new(MemDev::new(1 << 20)),
        )),
    );
    assert_eq!(k3(h.fail(&[0; 6], &[])), [0x06, 0x3F, 0x0E]);
    assert_eq!(h.run(0, &[0; 6], &[]).status, ScsiStatus::Good);
    h.map.insert(
        2,
        Arc::new(LogicalUnit::new(
            config(512),
            Arc::new(MemDev::new(1 << 20)),
        )),
    );
    h.ok(&report_luns(0, 64), &[]);
    assert_eq!(h.run(0, &[0; 6], &[]).status, ScsiStatus::Good);
}

#[test]
fn lun_encoding_round_trips() {
    for lun in [
        0u64,
        1,
        255,
        256,
        0x3FFF,
        0x4000,
        0xFF_FFFF,
        1 << 24,
        (1 << 40) - 1,
    ] {
        assert_eq!(decode_lun(encode_lun(lun)), lun, "{lun}");
    }
    assert_eq!(encode_lun(255), [0, 255, 0, 0, 0, 0, 0, 0]);
    assert_eq!(encode_lun(256), [0x41, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(encode_lun(0x12345), [0xD2, 0x01, 0x23, 0x45, 0, 0, 0, 0]);
    assert_eq!(decode_lun([0x80, 0, 0, 0, 0, 0, 0, 0]), u64::MAX);
}

#[test]
fn absent_lun() {
    let h = H::new();
    let r = h.run(9, &inquiry(false, 0, 96), &[]);
    assert_eq!(r.status, ScsiStatus::Good);
    assert_eq!(r.data_in[0], 0x7F);
    assert_eq!(r.data_in.len(), 96);
    let r = h.run(9, &inquiry(true, 0, 96), &[]);
    assert_eq!(r.data_in, vec![0x7F, 0, 0, 1, 0]);
    let r = h.run(9, &[0x03, 0, 0, 0, 18, 0], &[]);
    assert_eq!(r.status, ScsiStatus::Good);
    assert_eq!((r.data_in[2], r.data_in[12]), (0x05, 0x25));
    assert_eq!(k3(sense_of(&h.run(9, &[0; 6], &[]))), [0x05, 0x25, 0x00]);
    assert_eq!(k3(sense_of(&h.run(9, &[0xFF; 6], &[]))), [0x05, 0x25, 0x00]);
    let r = h.run(9, &report_luns(0, 64), &[]);
    assert_eq!(r.status, ScsiStatus::Good);
    assert_eq!(&r.data_in[..4], &[0, 0, 0, 8]);
}

// ------------------------------------------------------------------ MODE SENSE

#[test]
fn mode_sense6_all_pages_layout() {
    let h = H::new();
    let d = h.ok(&[0x1A, 0, 0x3F, 0, 255, 0], &[]);
    assert_eq!(d[0] as usize, d.len() - 1);
    assert_eq!(d[2], 0x10, "DPOFUA, not WP");
    assert_eq!(d[3], 8);
    // Short block descriptor: blocks, block length.
    assert_eq!(&d[4..8], &(BLOCKS as u32).to_be_bytes());
    assert_eq!(&d[9..12], &[0, 2, 0]);
    let pages = &d[12..];
    assert_eq!(&pages[..3], &[0x08, 0x12, 0x04], "caching, WCE");
    assert_eq!(&pages[20..22], &[0x0A, 0x0A]);
    assert_eq!(&pages[32..35], &[0x1C, 0x0A, 0x08]);
    assert_eq!(pages.len(), 20 + 12 + 12);
    // DBD drops the descriptor.
    let d = h.ok(&[0x1A, 0x08, 0x08, 0, 255, 0], &[]);
    assert_eq!(d.len(), 4 + 20);
    assert_eq!(d[3], 0);
}

#[test]
fn mode_sense10_long_lba_and_page_control() {
    let h = H::new();
    let d = h.ok(&[0x5A, 0x10, 0x0A, 0, 0, 0, 0, 1, 0, 0], &[]);
    assert_eq!(u16::from_be_bytes([d[0], d[1]]) as usize, d.len() - 2);
    assert_eq!(d[4], 0x01, "LONGLBA");
    assert_eq!(&d[6..8], &[0, 16]);
    assert_eq!(&d[8..16], &BLOCKS.to_be_bytes());
    assert_eq!(&d[20..24], &512u32.to_be_bytes());
    assert_eq!(&d[24..26], &[0x0A, 0x0A]);
    // Changeable values: WCE, D_SENSE, SWP.
    let c = h.ok(&[0x5A, 0x08, 0x40 | 0x3F, 0, 0, 0, 0, 1, 0, 0], &[]);
    assert_eq!(&c[8..11], &[0x08, 0x12, 0x04]);
    assert_eq!(&c[28..33], &[0x0A, 0x0A, 0x04, 0x00, 0x08]);
    assert_eq!(&c[40..43], &[0x1C, 0x0A, 0x00]);
    // Saved values are not supported.
    assert_eq!(k3(h.fail(&[0x1A, 0, 0xC8, 0, 255, 0], &[])), [5, 0x39, 0]);
    // Unsupported page and subpage.
    assert_eq!(
        h.fail(&[0x1A, 0, 0x19, 0, 255, 0], &[]),
        (5, 0x24, 0, cdb_ptr(2, Some(5)))
    );
    assert_eq!(
        h.fail(&[0x1A, 0, 0x08, 1, 255, 0], &[]),
        (5, 0x24, 0, cdb_ptr(3, None))
    );
    assert!(h.ok(&[0x1A, 0, 0x3F, 0xFF, 255, 0], &[]).len() > 40);
}

#[test]
fn mode_sense_wp_for_read_only_lu() {
    let mut cfg = config(512);
    cfg.read_only = true;
    let h = H::with(cfg, BlockCaps::default());
    let d = h.ok(&[0x1A, 0, 0x08, 0, 255, 0], &[]);
    assert_eq!(d[2] & 0x80, 0x80);
    let w = cdb10(0x2A, 0, 0, 1);
    assert_eq!(k3(h.fail(&w, &[0; 512])), [0x07, 0x27, 0x00]);
}

// ----------------------------------------------------------------- MODE SELECT

fn caching_page(wce: bool) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x08;
    p[1] = 0x12;
    if wce {
        p[2] = 0x04;
    }
    p
}

#[test]
fn mode_select_changes_wce_and_raises_ua_for_others() {
    let h = H::new();
    let b = nexus("iqn.init-b");
    h.run_as(&b, 0, &[0; 6], &[]);
    let mut params = vec![0, 0, 0, 0];
    params.extend(caching_page(false));
    let n = params.len() as u8;
    h.ok(&[0x15, 0x10, 0, 0, n, 0], &params);
    let d = h.ok(&[0x1A, 0x08, 0x08, 0, 255, 0], &[]);
    assert_eq!(d[6] & 0x04, 0);
    assert_eq!(h.run(0, &[0; 6], &[]).status, ScsiStatus::Good);
    assert_eq!(
        k3(sense_of(&h.run_as(&b, 0, &[0; 6], &[]))),
        [0x06, 0x2A, 0x01]
    );
    // Writes still work with write-through.
    h.ok(&cdb10(0x2A, 0, 0, 1), &[7; 512]);
}

#[test]
fn mode_select_d_sense_switches_sense_format() {
    let h = H::new();
    let mut ctl = vec![
        0, 0, 0, 0, 0x0A, 0x0A, 0x04, 0x10, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0,
    ];
    h.ok(&[0x15, 0x10, 0, 0, ctl.len() as u8, 0], &ctl);
    let r = h.run(0, &cdb16(0x88, 0, u64::MAX, 1), &[]);
    assert_eq!(&r.sense[..4], &[0x72, 0x05, 0x21, 0x00]);
    ctl[6] = 0;
    h.ok(&[0x15, 0x10, 0, 0, ctl.len() as u8, 0], &ctl);
    let r = h.run(0, &cdb16(0x88, 0, u64::MAX, 1), &[]);
    assert_eq!(r.sense[0], 0x70);
}

#[test]
fn mode_select_swp_write_protects() {
    let h = H::new();
    let ctl = vec![
        0, 0, 0, 0, 0x0A, 0x0A, 0x00, 0x10, 0x08, 0, 0, 0, 0xFF, 0xFF, 0, 0,
    ];
    h.ok(&[0x15, 0x10, 0, 0, ctl.len() as u8, 0], &ctl);
    assert_eq!(
        k3(h.fail(&cdb10(0x2A, 0, 0, 1), &[0; 512])),
        [0x07, 0x27, 0x02]
    );
    h.ok(&cdb10(0x28, 0, 0, 1), &[]);
    let d = h.ok(&[0x1A, 0x08, 0x0A, 0, 255, 0], &[]);
    assert_eq!(d[2] & 0x80, 0x80, "WP in header");
}

#[test]
fn mode_select_errors() {
    let h = H::new();
    let mut params = vec![0, 0, 0, 0];
    params.extend(caching_page(true));
    let n = params.len() as u8;
    // SP = 1 and PF = 0.
    assert_eq!(
        h.fail(&[0x15, 0x11, 0, 0, n, 0], &params),
        (5, 0x24, 0, cdb_ptr(1, Some(0)))
    );
    assert_eq!(
        h.fail(&[0x15, 0x00, 0, 0, n, 0], &params),
        (5, 0x24, 0, cdb_ptr(1, Some(4)))
    );
    // Parameter list longer than the data sent / shorter than a header.
    assert_eq!(
        k3(h.fail(&[0x15, 0x10, 0, 0, n, 0], &params[..10])),
        [5, 0x1A, 0]
    );
    assert_eq!(k3(h.fail(&[0x15, 0x10, 0, 0, 3, 0], &params)), [5, 0x1A, 0]);
    // Non-changeable bit (RCD, byte 2 bit 0 of the page at offset 4).
    let mut bad = params.clone();
    bad[6] |= 0x01;
    assert_eq!(
        h.fail(&[0x15, 0x10, 0, 0, n, 0], &bad),
        (5, 0x26, 0, [0x88, 0, 6])
    );
    // Unknown page.
    let mut bad = params.clone();
    bad[4] = 0x19;
    assert_eq!(
        h.fail(&[0x15, 0x10, 0, 0, n, 0], &bad),
        (5, 0x26, 0, [0x8D, 0, 4])
    );
    // Wrong page length.
    let mut bad = params.clone();
    bad[5] = 0x10;
    assert_eq!(
        h.fail(&[0x15, 0x10, 0, 0, n, 0], &bad),
        (5, 0x26, 0, [0x80, 0, 5])
    );
    // Block descriptor with a different block size.
    let mut bd = vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x10, 0];
    bd.extend(caching_page(true));
    let n = bd.len() as u8;
    assert_eq!(
        h.fail(&[0x15, 0x10, 0, 0, n, 0], &bd),
        (5, 0x26, 0, [0x80, 0, 9])
    );
    bd[10] = 0x02;
    h.ok(&[0x15, 0x10, 0, 0, n, 0], &bd);
}

// ------------------------------------------------------------- READ CAPACITY

#[test]
fn read_capacity() {
    let h = H::new();
    let d = h.ok(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(
        d,
        [
            &((BLOCKS - 1) as u32).to_be_bytes()[..],
            &512u32.to_be_bytes()
        ]
        .concat()
    );
    assert_eq!(
        h.fail(&[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0], &[]),
        (5, 0x24, 0, cdb_ptr(2, None))
    );
    let mut c = [0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x10;
    c[13] = 32;
    let d = h.ok(&c, &[]);
    assert_eq!(d.len(), 32);
    assert_eq!(&d[..8], &(BLOCKS - 1).to_be_bytes());
    assert_eq!(&d[8..12], &512u32.to_be_bytes());
    assert_eq!(d[14], 0);
    c[13] = 12;
    assert_eq!(h.ok(&c, &[]).len(), 12);
    let thin = H::with(
        config(512),
        BlockCaps {
            discard: true,
            ..Default::default()
        },
    );
    c[13] = 32;
    assert_eq!(thin.ok(&c, &[])[14], 0xC0);
    assert_eq!(d[13], 0, "one logical block per physical block by default");
}

#[test]
fn physical_block_exponent() {
    let mut c = [0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x10;
    c[13] = 32;
    let lbppbe = |bs: u32, phys: u32| {
        let dev: Arc<dyn BlockDev> = Arc::new(MemDev::new(1 << 20));
        let mut map = LunMap::new();
        let lu = LogicalUnit::new(config(bs), dev).with_physical_block_size(phys);
        map.insert(0, Arc::new(lu));
        let n = nexus("iqn.init-a");
        let run = |cdb: &[u8]| {
            map.execute(&ScsiRequest {
                cdb,
                lun: 0,
                nexus: &n,
                data_out: &[],
                expected_in_len: 64,
                task_attr: TaskAttr::Simple,
                data_in_by_ref: false,
            })
        };
        run(&[0; 6]);
        let d = run(&c).data_in;
        assert_eq!(&d[14..16], &[0, 0], "lowest aligned LBA 0");
        d[13]
    };
    assert_eq!(lbppbe(512, 4096), 3);
    assert_eq!(lbppbe(512, 65536), 7);
    assert_eq!(lbppbe(4096, 4096), 0);
    assert_eq!(lbppbe(4096, 512), 0);
    assert_eq!(lbppbe(512, 0), 0);
    assert_eq!(lbppbe(512, 3000), 0);
}

// --------------------------------------------------------------- READ / WRITE

#[test]
fn write_then_read_all_sizes() {
    let h = H::new();
    let data: Vec<u8> = (0..2048u32).map(|i| (i * 7) as u8).collect();
    h.ok(&cdb10(0x2A, 0, 10, 4), &data);
    assert_eq!(h.ok(&cdb10(0x28, 0, 10, 4), &[]), data);
    assert_eq!(h.ok(&[0x08, 0, 0, 10, 4, 0], &[]), data);
    let mut r12 = [0u8; 12];
    r12[0] = 0xA8;
    r12[5] = 10;
    r12[9] = 4;
    assert_eq!(h.ok(&r12, &[]), data);
    assert_eq!(h.ok(&cdb16(0x88, 0, 10, 4), &[]), data);
    // WRITE(6)/(12)/(16) with FUA.
    h.ok(&[0x0A, 0, 0, 20, 1, 0], &data[..512]);
    let mut w12 = [0u8; 12];
    w12[0] = 0xAA;
    w12[1] = 0x08;
    w12[5] = 21;
    w12[9] = 1;
    h.ok(&w12, &data[512..1024]);
    h.ok(&cdb16(0x8A, 0x08, 22, 2), &data[1024..]);
    assert_eq!(h.ok(&cdb10(0x28, 0, 20, 4), &[]), data);
    let mut raw = vec![0u8; 2048];
    h.dev.read_at(&mut raw, 20 * 512).unwrap();
    assert_eq!(raw, data);
}

#[test]
fn read6_zero_means_256_blocks() {
    let h = H::new();
    assert_eq!(h.ok(&[0x08, 0, 0, 0, 0, 0], &[]).len(), 256 * 512);
}

#[test]
fn zero_length_transfers_and_lba_bounds() {
    let h = H::new();
    assert!(h.ok(&cdb10(0x28, 0, 0, 0), &[]).is_empty());
    h.ok(&cdb10(0x2A, 0, BLOCKS as u32, 0), &[]);
    let oob = (5, 0x21, 0, [0, 0, 0]);
    assert_eq!(h.fail(&cdb10(0x28, 0, BLOCKS as u32 + 1, 0), &[]), oob);
    assert_eq!(h.fail(&cdb10(0x28, 0, BLOCKS as u32 - 1, 2), &[]), oob);
    assert_eq!(h.fail(&cdb10(0x28, 0, u32::MAX, 1), &[]), oob);
    assert_eq!(h.fail(&cdb16(0x88, 0, u64::MAX, 1), &[]), oob);
    assert_eq!(h.fail(&cdb16(0x8A, 0, u64::MAX - 1, 2), &[0; 1024]), oob);
    assert_eq!(h.fail(&[0x08, 0x1F, 0xFF, 0xFF, 1, 0], &[]), oob);
    h.ok(&cdb10(0x28, 0, BLOCKS as u32 - 1, 1), &[]);
}

#[test]
fn transfer_length_limit_points_at_field() {
    let h = H::new();
    assert_eq!(
        h.fail(&cdb16(0x88, 0, 0, 16385), &[]),
        (5, 0x24, 0, cdb_ptr(10, None))
    );
    assert_eq!(
        h.fail(&cdb10(0x28, 0, 0, 16385), &[]),
        (5, 0x24, 0, cdb_ptr(7, None))
    );
}

#[test]
fn rdprotect_rejected() {
    let h = H::new();
    for p in 1..8u8 {
        assert_eq!(
            h.fail(&cdb10(0x28, p << 5, 0, 1), &[]),
            (5, 0x24, 0, cdb_ptr(1, Some(7)))
        );
        assert_eq!(
            h.fail(&cdb16(0x8A, p << 5, 0, 1), &[0; 512]),
            (5, 0x24, 0, cdb_ptr(1, Some(7)))
        );
    }
}

#[test]
fn write_data_out_mismatch() {
    let h = H::new();
    h.ok(&cdb10(0x2A, 0, 0, 2), &[b'a'; 1024]);
    // Too short: nothing is written.
    assert_eq!(
        k3(h.fail(&cdb10(0x2A, 0, 0, 2), &[b'b'; 600])),
        [5, 0x0E, 0x03]
    );
    assert_eq!(h.ok(&cdb10(0x28, 0, 0, 2), &[]), vec![b'a'; 1024]);
    // Too long: only the CDB's amount is written.
    h.ok(&cdb10(0x2A, 0, 0, 1), &[b'c'; 1024]);
    let d = h.ok(&cdb10(0x28, 0, 0, 2), &[]);
    assert_eq!(&d[..512], &[b'c'; 512][..]);
    assert_eq!(&d[512..], &[b'a'; 512][..]);
}

// --------------------------------------------------------- VERIFY / SYNC CACHE

#[test]
fn verify_bytchk_modes() {
    let h = H::new();
    let data: Vec<u8> = (0..1024u32).map(|i| i as u8).collect();
    h.ok(&cdb10(0x2A, 0, 4, 2), &data);
    h.ok(&cdb10(0x2F, 0, 4, 2), &[]);
    h.ok(&cdb10(0x2F, 0x02, 4, 2), &data);
    let mut wrong = data.clone();
    wrong[700] ^= 1;
    let r = h.run(0, &cdb10(0x2F, 0x02, 4, 2), &wrong);
    let (k, asc, ascq, _) = sense_of(&r);
    assert_eq!((k, asc, ascq), (0x0E, 0x1D, 0x00));
    assert_eq!(r.sense[0] & 0x80, 0x80, "VALID");
    assert_eq!(&r.sense[3..7], &700u32.to_be_bytes());
    // BYTCHK 3: one block compared against each.
    h.ok(&cdb10(0x2A, 0, 8, 3), &[9u8; 1536]);
    h.ok(&cdb16(0x8F, 0x06, 8, 3), &[9u8; 512]);
    let r = h.run(0, &cdb16(0x8F, 0x06, 7, 3), &[9u8; 512]);
    assert_eq!(&r.sense[3..7], &0u32.to_be_bytes());
    // BYTCHK 2 reserved.
    assert_eq!(
        h.fail(&cdb10(0x2F, 0x04, 0, 1), &[]),
        (5, 0x24, 0, cdb_ptr(1, Some(2)))
    );
    assert_eq!(
        k3(h.fail(&cdb10(0x2F, 0, BLOCKS as u32, 1), &[])),
        [5, 0x21, 0]
    );
    // VRPROTECT unsupported.
    assert_eq!(
        h.fail(&cdb10(0x2F, 0x20, 0, 1), &[]),
        (5, 0x24, 0, cdb_ptr(1, Some(7)))
    );
}

#[test]
fn write_and_verify_writes() {
    let h = H::new();
    h.ok(&cdb10(0x2E, 0x02, 3, 1), &[0x5A; 512]);
    assert_eq!(h.ok(&cdb10(0x28, 0, 3, 1), &[]), vec![0x5A; 512]);
    assert_eq!(
        k3(h.fail(&cdb16(0x8E, 0, BLOCKS, 1), &[0; 512])),
        [5, 0x21, 0]
    );
}

#[test]
fn sync_cache_range_checks() {
    let h = H::new();
    h.ok(&cdb10(0x35, 0, 0, 0), &[]);
    h.ok(&cdb16(0x91, 0x02, BLOCKS - 1, 1), &[]);
    assert_eq!(k3(h.fail(&cdb16(0x91, 0, BLOCKS, 1), &[])), [5, 0x21, 0]);
    assert_eq!(
        k3(h.fail(&cdb10(0x35, 0, BLOCKS as u32 + 1, 0), &[])),
        [5, 0x21, 0]
    );
}

// -------------------------------------------------------------------- RSOC/RTPG

fn rsoc(rctd: bool, opts: u8, op: u8, sa: u16, alloc: u32) -> [u8; 12] {
    let mut c = [0u8; 12];
    c[0] = 0xA3;
    c[1] = 0x0C;
    c[2] = (u8::from(rctd) << 7) | opts;
    c[3] = op;
    c[4..6].copy_from_slice(&sa.to_be_bytes());
    c[6..10].copy_from_slice(&alloc.to_be_bytes());
    c
}

#[test]
fn rsoc_all_commands_matches_table() {
    let h = H::new();
    let d = h.ok(&rsoc(false, 0, 0, 0, 65535), &[]);
    let n = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
    assert_eq!(n, d.len() - 4);
    // Not thin: the thin-only commands (UNMAP) are not offered.
    let offered: Vec<_> = cdb::OPCODES.iter().filter(|d| !d.attrs.thin).collect();
    assert_eq!(n, 8 * offered.len());
    assert!(!d[4..].chunks(8).any(|e| e[0] == 0x42));
    for (desc, e) in offered.iter().zip(d[4..].chunks(8)) {
        assert_eq!(e[0], desc.opcode);
        assert_eq!(u16::from_be_bytes([e[2], e[3]]), desc.sa.unwrap_or(0));
        assert_eq!(e[5], u8::from(desc.sa.is_some()));
        assert_eq!(u16::from_be_bytes([e[6], e[7]]) as usize, desc.usage.len());
    }
    let d = h.ok(&rsoc(true, 0, 0, 0, 65535), &[]);
    assert_eq!(d.len(), 4 + 20 * offered.len());
    for e in d[4..].chunks(20) {
        assert_eq!(e[5] & 0x02, 0x02, "CTDP");
        assert_eq!(&e[8..10], &[0, 0x0A]);
    }
}

#[test]
fn rsoc_one_command() {
    let h = H::new();
    let d = h.ok(&rsoc(false, 1, 0x28, 0, 512), &[]);
    assert_eq!(&d[..4], &[0, 0x03, 0, 10]);
    assert_eq!(
        &d[4..],
        &[0x28, 0x1E, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x00]
    );
    let d = h.ok(&rsoc(true, 2, 0x9E, 0x10, 512), &[]);
    assert_eq!(&d[..4], &[0, 0x83, 0, 16]);
    assert_eq!(&d[4..6], &[0x9E, 0x10]);
    assert_eq!(d.len(), 4 + 16 + 12);
    // Unsupported opcode / service action: SUPPORT = 001b.
    assert_eq!(h.ok(&rsoc(false, 1, 0xFF, 0, 512), &[]), vec![0, 1, 0, 0]);
    assert_eq!(
        h.ok(&rsoc(false, 2, 0x9E, 0x11, 512), &[]),
        vec![0, 1, 0, 0]
    );
    // Options that do not fit the opcode.
    assert_eq!(
        h.fail(&rsoc(false, 1, 0x9E, 0, 512), &[]),
        (5, 0x24, 0, cdb_ptr(2, Some(2)))
    );
    assert_eq!(
        h.fail(&rsoc(false, 2, 0x28, 0, 512), &[]),
        (5, 0x24, 0, cdb_ptr(2, Some(2)))
    );
    assert_eq!(
        h.fail(&rsoc(false, 5, 0, 0, 512), &[]),
        (5, 0x24, 0, cdb_ptr(2, Some(2)))
    );
}

#[test]
fn rtpg_one_group_active_optimized() {
    let h = H::new();
    let c = [0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
    let d = h.ok(&c, &[]);
    assert_eq!(
        d,
        vec![0, 0, 0, 12, 0x80, 0x01, 0, 7, 0, 0, 0, 1, 0, 0, 0, 1]
    );
    let c = [0xA3, 0x2A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
    let d = h.ok(&c, &[]);
    assert_eq!(&d[..8], &[0, 0, 0, 16, 0x10, 0, 0, 0]);
    assert_eq!(
        h.ok(&[0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0], &[]).len(),
        6
    );
}

#[test]
fn capacity_change_raises_ua() {
    // A device whose size we can change.
    #[derive(Debug)]
    struct Grow(std::sync::atomic::AtomicU64, MemDev);
    impl BlockDev for Grow {
        fn size(&self) -> u64 {
            self.0.load(std::sync::atomic::Ordering::Relaxed)
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
            self.1.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64, f: WriteFlags) -> BlockResult<()> {
            self.1.write_at(buf, offset, f)
        }
        fn flush(&self) -> BlockResult<()> {
            Ok(())
        }
        fn caps(&self) -> BlockCaps {
            BlockCaps::default()
        }
    }
    let dev = Arc::new(Grow(1024.into(), MemDev::new(4096)));
    let mut map = LunMap::new();
    map.insert(0, Arc::new(LogicalUnit::new(config(512), dev.clone())));
    let n = nexus("x");
    let run = |cdb: &[u8]| {
        map.execute(&ScsiRequest {
            cdb,
            lun: 0,
            nexus: &n,
            data_out: &[],
            expected_in_len: 64,
            task_attr: TaskAttr::Simple,
            data_in_by_ref: false,
        })
    };
    run(&[0; 6]);
    assert_eq!(run(&[0; 6]).status, ScsiStatus::Good);
    dev.0.store(4096, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(k3(sense_of(&run(&[0; 6]))), [0x06, 0x2A, 0x09]);
    let d = run(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]).data_in;
    assert_eq!(&d[..4], &7u32.to_be_bytes());
}

// ------------------------------------------------------------------- proptest

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn execute_never_panics(
        cdb in proptest::collection::vec(any::<u8>(), 0..20),
        data in proptest::collection::vec(any::<u8>(), 0..1100),
        lun in 0u64..3,
    ) {
        let h = H::new();
        let r = h.run(lun, &cdb, &data);
        if r.status == ScsiStatus::CheckCondition {
            prop_assert!(r.sense.len() >= 8);
        }
    }

    #[test]
    fn execute_never_panics_on_known_opcodes(
        idx in 0usize..64,
        tail in proptest::collection::vec(any::<u8>(), 15),
        data in proptest::collection::vec(any::<u8>(), 0..1100),
    ) {
        let h = H::new();
        let desc = &cdb::OPCODES[idx % cdb::OPCODES.len()];
        let mut cdb = vec![desc.opcode];
        cdb.extend_from_slice(&tail);
        if let Some(sa) = desc.sa {
            cdb[1] = (cdb[1] & 0xE0) | sa as u8;
        }
        cdb.truncate(desc.usage.len());
        let r = h.run(0, &cdb, &data);
        prop_assert!(matches!(
            r.status,
            ScsiStatus::Good | ScsiStatus::CheckCondition | ScsiStatus::ConditionMet
                | ScsiStatus::ReservationConflict
        ));
    }
}
