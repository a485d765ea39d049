//! Micro-benchmarks of the iSCSI wire hot path, without sockets: decoding
//! a SCSI Command BHS (what the reader does per command), encoding the
//! Data-In and SCSI Response headers (what every completion does), a whole
//! PDU with 4 KiB of immediate data, and CRC32C digests over a header and
//! over data segments of typical sizes.
//!
//! `cargo bench --bench pdu [-- filter]`

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lunmirror::iscsi::digest::{self, Crc32c};
use lunmirror::iscsi::pdu::{
    Bhs, DataIn, FrameConfig, Lun, Pdu, Prefix, ScsiCommand, ScsiResponse, TaskAttribute, BHS_LEN,
};

/// READ(16) or WRITE(16) of 8 blocks at LBA 0x1234 as a SCSI Command BHS.
fn command(write: bool, immediate_len: u32) -> [u8; BHS_LEN] {
    let mut cdb = [0u8; 16];
    cdb[0] = if write { 0x8a } else { 0x88 };
    cdb[2..10].copy_from_slice(&0x1234u64.to_be_bytes());
    cdb[10..14].copy_from_slice(&8u32.to_be_bytes());
    Bhs::ScsiCommand(ScsiCommand {
        immediate: false,
        fin: true,
        read: !write,
        write,
        attr: TaskAttribute::Simple,
        lun: Lun::from_flat(0),
        itt: 0x42,
        expected_data_len: 4096,
        cmd_sn: 7,
        exp_stat_sn: 9,
        cdb,
        ext_cdb: Vec::new(),
        bidi_read_len: None,
    })
    .encode(immediate_len)
}

fn headers(c: &mut Criterion) {
    let mut g = c.benchmark_group("bhs");
    let read = command(false, 0);
    g.bench_function("decode_scsi_command", |b| {
        b.iter(|| {
            let bhs = black_box(&read);
            let pre = Prefix::parse(bhs);
            (pre.data_len, Bhs::decode(bhs, &[]))
        })
    });
    let data_in = Bhs::DataIn(DataIn {
        fin: true,
        ack: false,
        overflow: false,
        underflow: false,
        status_present: true,
        status: 0,
        lun: Lun::from_flat(0),
        itt: 0x42,
        ttt: u32::MAX,
        stat_sn: 0,
        exp_cmd_sn: 0,
        max_cmd_sn: 0,
        data_sn: 0,
        buffer_offset: 0,
        residual: 0,
    });
    g.bench_function("encode_data_in", |b| {
        b.iter(|| black_box(&data_in).encode(black_box(4096)))
    });
    let resp = Bhs::ScsiResponse(ScsiResponse {
        bidi_overflow: false,
        bidi_underflow: false,
        overflow: false,
        underflow: false,
        response: 0,
        status: 0,
        itt: 0x42,
        snack_tag: 0,
        stat_sn: 0,
        exp_cmd_sn: 0,
        max_cmd_sn: 0,
        exp_data_sn: 0,
        bidi_read_residual: 0,
        residual: 0,
    });
    g.bench_function("encode_scsi_response", |b| {
        b.iter(|| black_box(&resp).encode(0))
    });
    g.finish();

    // A whole write command with 4 KiB of immediate data, as one buffer.
    let mut wire = command(true, 4096).to_vec();
    wire.extend(std::iter::repeat(0xa5u8).take(4096));
    let cfg = FrameConfig {
        max_data_segment_len: 262_144,
        ..FrameConfig::default()
    };
    let mut g = c.benchmark_group("pdu");
    g.throughput(Throughput::Bytes(wire.len() as u64));
    g.bench_function("decode_write16_4k_immediate", |b| {
        b.iter(|| Pdu::decode(black_box(&wire), &cfg))
    });
    g.finish();
}

fn digests(c: &mut Criterion) {
    let mut g = c.benchmark_group("crc32c");
    let bhs = command(false, 0);
    g.throughput(Throughput::Bytes(BHS_LEN as u64));
    g.bench_function("header_48", |b| b.iter(|| digest::crc32c(black_box(&bhs))));
    for len in [4096usize, 65_536, 262_144] {
        let data: Vec<u8> = (0..len).map(|i| (i * 131) as u8).collect();
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("data", len), &data, |b, d| {
            b.iter(|| {
                let mut c = Crc32c::new();
                c.update(black_box(d));
                c.value()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, headers, digests);
criterion_main!(benches);
