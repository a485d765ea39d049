//! Micro-benchmarks of the SCSI core's per-command cost, without a socket
//! or a file: parsing READ(16)/WRITE(16)/INQUIRY CDBs, and whole commands
//! through `LunMap::execute` on an in-memory device (unit-attention check,
//! parse, range lock, data-in allocation, the copy from memory). What is
//! left of a 4 KiB command's server time after this and the PDU codec is
//! the socket, the thread handoffs and the file.
//!
//! `cargo bench --bench cdb [-- filter]`

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use lunmirror::block::mem::MemDev;
use lunmirror::block::SharedDev;
use lunmirror::scsi::{
    cdb, LogicalUnit, LuConfig, LunMap, Nexus, ScsiRequest, ScsiStatus, TaskAttr,
};

const BLOCK: u32 = 512;
const DEV_SIZE: u64 = 64 << 20;

fn rw16(op: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("cdb_parse");
    let read = rw16(0x88, 0x1234, 8);
    let write = rw16(0x8a, 0x1234, 8);
    let inquiry = [0x12u8, 0, 0, 0, 0xff, 0];
    g.bench_function("read16", |b| {
        b.iter(|| cdb::parse(black_box(&read)).is_ok())
    });
    g.bench_function("write16", |b| {
        b.iter(|| cdb::parse(black_box(&write)).is_ok())
    });
    g.bench_function("inquiry", |b| {
        b.iter(|| cdb::parse(black_box(&inquiry)).is_ok())
    });
    g.finish();
}

fn execute(c: &mut Criterion) {
    let dev: SharedDev = Arc::new(MemDev::new(DEV_SIZE));
    let config = LuConfig {
        volume: "bench".into(),
        block_size: BLOCK,
        read_only: false,
        serial: "BENCH0001".into(),
        naa: [0x60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        vendor: "LUNMIRR".into(),
        product: "bench".into(),
        revision: "0.1".into(),
    };
    let mut map = LunMap::new();
    map.insert(0, Arc::new(LogicalUnit::new(config, dev)));
    let nexus = Arc::new(Nexus {
        initiator_port: "iqn.2024-01.local.perf:bench,i,0x23d000000001".into(),
        target_port: "iqn.2026-11.io.lunmirror:bench,t,0x0001".into(),
        relative_port_id: 1,
        port_group_id: 1,
    });
    let req = |cdb: &'static [u8], data_out: &'static [u8], expected_in_len: u32| ScsiRequest {
        cdb,
        lun: 0,
        nexus: &nexus,
        data_out,
        expected_in_len,
        task_attr: TaskAttr::Simple,
        data_in_by_ref: false,
    };
    let tur: &'static [u8] = &[0u8; 6];
    // The first commands of a new nexus report the power-on unit attention.
    let mut tries = 0;
    while map.execute(&req(tur, &[], 0)).status != ScsiStatus::Good {
        tries += 1;
        assert!(tries < 8, "TEST UNIT READY never succeeds");
    }

    let blocks = 4096 / BLOCK;
    let read: &'static [u8] = Box::leak(Box::new(rw16(0x88, 64, blocks)));
    let write: &'static [u8] = Box::leak(Box::new(rw16(0x8a, 64, blocks)));
    let payload: &'static [u8] = Box::leak(vec![0x5au8; 4096].into_boxed_slice());
    assert_eq!(map.execute(&req(read, &[], 4096)).status, ScsiStatus::Good);
    assert_eq!(
        map.execute(&req(write, payload, 0)).status,
        ScsiStatus::Good
    );

    let mut g = c.benchmark_group("execute_mem");
    g.throughput(Throughput::Elements(1));
    g.bench_function("test_unit_ready", |b| {
        b.iter(|| map.execute(black_box(&req(tur, &[], 0))).status)
    });
    g.bench_function("read16_4k", |b| {
        b.iter(|| map.execute(black_box(&req(read, &[], 4096))).data_in.len())
    });
    g.bench_function("write16_4k", |b| {
        b.iter(|| map.execute(black_box(&req(write, payload, 0))).status)
    });
    g.finish();
}

criterion_group!(benches, parse, execute);
criterion_main!(benches);
