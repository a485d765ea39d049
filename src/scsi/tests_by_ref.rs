//! Which READs the core answers by reference (`ScsiResponse::data_in_file`)
//! on a file-backed LU: only plain READs of at least
//! `sbc::DATA_IN_BY_REF_MIN` bytes, SIMPLE, when the frontend asks for it
//! and the device names a file range; every check still comes first.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::tests::{cdb10, cdb16, config, nexus, sense_of};
use super::*;
use crate::block::file::{EngineKind, FileDev, FileDevOptions};
use crate::block::mem::MemDev;
use crate::block::{BlockDev, WriteFlags};

const BS: u64 = 512;
const BLOCKS: u64 = 4096;

struct F {
    _dir: tempfile::TempDir,
    map: LunMap,
    n: Arc<Nexus>,
    data: Vec<u8>,
}

fn lu_on(dev: Arc<dyn BlockDev>) -> (LunMap, Arc<Nexus>) {
    let mut map = LunMap::new();
    map.insert(0, Arc::new(LogicalUnit::new(config(BS as u32), dev)));
    let n = nexus("iqn.init-a");
    let r = run(&map, &n, &[0; 6], TaskAttr::Simple, false);
    assert_eq!(r.status, ScsiStatus::CheckCondition, "power-on UA");
    (map, n)
}

fn file_lu() -> F {
    let dir = tempfile::tempdir().unwrap();
    let dev = FileDev::open(
        &dir.path().join("lun.img"),
        FileDevOptions {
            engine: EngineKind::Sync,
            create_size: Some(BLOCKS * BS),
            ..FileDevOptions::default()
        },
    )
    .unwrap();
    let data: Vec<u8> = (0..BLOCKS * BS)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    dev.write_at(&data, 0, WriteFlags::default()).unwrap();
    let (map, n) = lu_on(Arc::new(dev));
    F {
        _dir: dir,
        map,
        n,
        data,
    }
}

fn run(map: &LunMap, n: &Arc<Nexus>, cdb: &[u8], attr: TaskAttr, by_ref: bool) -> ScsiResponse {
    map.execute(&ScsiRequest {
        cdb,
        lun: 0,
        nexus: n,
        data_out: &[],
        expected_in_len: 1 << 20,
        task_attr: attr,
        data_in_by_ref: by_ref,
    })
}

/// The bytes a response carries, whichever way.
fn bytes(r: &ScsiResponse) -> Vec<u8> {
    match &r.data_in_file {
        Some(e) => {
            assert!(r.data_in.is_empty());
            let mut b = vec![0u8; e.len as usize];
            e.file.read_exact_at(&mut b, e.offset).unwrap();
            b
        }
        None => r.data_in.clone(),
    }
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    cdb10(0x28, 0, lba, blocks)
}

#[test]
fn large_simple_reads_go_by_reference_in_every_form() {
    let f = file_lu();
    let min_blocks = (sbc::DATA_IN_BY_REF_MIN / BS) as u32;
    let mut read6 = [0x08, 0, 0x01, 0x00, 0, 0]; // LBA 256, 256 blocks
    read6[4] = 0;
    let mut read12 = [0u8; 12];
    read12[0] = 0xA8;
    read12[2..6].copy_from_slice(&7u32.to_be_bytes());
    read12[6..10].copy_from_slice(&min_blocks.to_be_bytes());
    let cases: Vec<(Vec<u8>, u64, u64)> = vec![
        (read6.to_vec(), 256, 256),
        (
            read10(100, min_blocks as u16).to_vec(),
            100,
            min_blocks.into(),
        ),
        (read12.to_vec(), 7, min_blocks.into()),
        (cdb16(0x88, 0, 2048, 2048).to_vec(), 2048, 2048),
        // The last blocks of the LU.
        (read10(4096 - 256, 256).to_vec(), 4096 - 256, 256),
    ];
    for (cdb, lba, blocks) in cases {
        let r = run(&f.map, &f.n, &cdb, TaskAttr::Simple, true);
        assert_eq!(r.status, ScsiStatus::Good, "{cdb:02x?}");
        let e = r.data_in_file.as_ref().expect("by reference");
        assert_eq!((e.offset, e.len), (lba * BS, blocks * BS), "{cdb:02x?}");
        assert_eq!(r.data_in_len(), blocks * BS);
        let (s, l) = ((lba * BS) as usize, (blocks * BS) as usize);
        assert_eq!(bytes(&r), f.data[s..s + l], "{cdb:02x?}");
    }
}

#[test]
fn everything_else_takes_the_buffer_path() {
    let f = file_lu();
    let min_blocks = (sbc::DATA_IN_BY_REF_MIN / BS) as u16;
    let buffer = |cdb: &[u8], attr: TaskAttr, by_ref: bool| {
        let r = run(&f.map, &f.n, cdb, attr, by_ref);
        assert_eq!(r.status, ScsiStatus::Good, "{cdb:02x?} {attr:?}");
        assert!(r.data_in_file.is_none(), "{cdb:02x?} {attr:?} {by_ref}");
        r
    };
    // The frontend did not ask (TCMU).
    let r = buffer(&read10(0, 2048), TaskAttr::Simple, false);
    assert_eq!(r.data_in, f.data[..2048 * 512]);
    // Task attributes that order tasks.
    for attr in [
        TaskAttr::Ordered,
        TaskAttr::HeadOfQueue,
        TaskAttr::Aca,
        TaskAttr::Untagged,
    ] {
        let r = buffer(&read10(0, 2048), attr, true);
        assert_eq!(r.data_in, f.data[..2048 * 512]);
    }
    // One block short of the threshold.
    let r = buffer(&read10(3, min_blocks - 1), TaskAttr::Simple, true);
    assert_eq!(
        r.data_in,
        f.data[3 * 512..(3 + min_blocks as usize - 1) * 512]
    );
    // Zero blocks.
    assert!(buffer(&read10(5, 0), TaskAttr::Simple, true)
        .data_in
        .is_empty());
    // Not a plain READ: VERIFY, READ CAPACITY, INQUIRY, WRITE.
    buffer(&cdb10(0x2F, 0, 0, 2048), TaskAttr::Simple, true);
    buffer(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], TaskAttr::Simple, true);
    buffer(&[0x12, 0, 0, 0, 96, 0], TaskAttr::Simple, true);
}

#[test]
fn checks_come_before_by_reference_data() {
    let f = file_lu();
    // Beyond the end: LBA OUT OF RANGE, no extent.
    let r = run(
        &f.map,
        &f.n,
        &read10(4096 - 128, 256),
        TaskAttr::Simple,
        true,
    );
    assert!(r.data_in_file.is_none());
    let (key, asc, ascq, _) = sense_of(&r);
    assert_eq!((key, asc, ascq), (0x05, 0x21, 0x00));
    // Transfer length above the Block Limits maximum: INVALID FIELD IN CDB.
    let r = run(
        &f.map,
        &f.n,
        &cdb16(0x88, 0, 0, u32::MAX),
        TaskAttr::Simple,
        true,
    );
    assert!(r.data_in_file.is_none());
    assert_eq!(sense_of(&r).0, 0x05);
    // Another initiator's SPC-2 reservation: RESERVATION CONFLICT.
    let other = nexus("iqn.init-b");
    let r = run(&f.map, &other, &[0; 6], TaskAttr::Simple, false);
    assert_eq!(r.status, ScsiStatus::CheckCondition, "power-on UA");
    let r = run(
        &f.map,
        &other,
        &[0x16, 0, 0, 0, 0, 0],
        TaskAttr::Simple,
        false,
    );
    assert_eq!(r.status, ScsiStatus::Good);
    let r = run(&f.map, &f.n, &read10(0, 2048), TaskAttr::Simple, true);
    assert_eq!(r.status, ScsiStatus::ReservationConflict);
    assert!(r.data_in_file.is_none() && r.data_in.is_empty());
}

#[test]
fn memory_lus_answer_large_reads_from_a_buffer() {
    let dev = Arc::new(MemDev::new(BLOCKS * BS));
    let data = vec![0x5A; 2048 * 512];
    dev.write_at(&data, 0, WriteFlags::default()).unwrap();
    let (map, n) = lu_on(dev);
    let r = run(&map, &n, &read10(0, 2048), TaskAttr::Simple, true);
    assert_eq!(r.status, ScsiStatus::Good);
    assert!(r.data_in_file.is_none());
    assert_eq!(r.data_in, data);
}
