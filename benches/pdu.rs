//! Micro-benchmarks of the iSCSI data path's pure parts: PDU header
//! encode/decode, digests, R2T planning and Data-In splitting.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use lunmirror::iscsi::digest;
use lunmirror::iscsi::pdu::{
    Bhs, DataIn, FrameConfig, Lun, Pdu, ScsiCommand, TaskAttribute, BHS_LEN, RESERVED_TAG,
};
use lunmirror::iscsi::session::{plan_data_in, DataOutLimits, DataOutState};

fn command() -> Bhs {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x28;
    cdb[8] = 8;
    Bhs::ScsiCommand(ScsiCommand {
        immediate: false,
        fin: true,
        read: true,
        write: false,
        attr: TaskAttribute::Simple,
        lun: Lun::from_flat(0),
        itt: 42,
        expected_data_len: 4096,
        cmd_sn: 7,
        exp_stat_sn: 9,
        cdb,
        ext_cdb: Vec::new(),
        bidi_read_len: None,
    })
}

fn bench(c: &mut Criterion) {
    let cmd = command();
    let bytes = cmd.encode(0);
    c.bench_function("bhs_decode_scsi_command", |b| {
        b.iter(|| Bhs::decode(black_box(&bytes), &[]).unwrap())
    });
    let din = Bhs::DataIn(DataIn {
        fin: true,
        ack: false,
        overflow: false,
        underflow: false,
        status_present: true,
        status: 0,
        lun: Lun::default(),
        itt: 42,
        ttt: RESERVED_TAG,
        stat_sn: 1,
        exp_cmd_sn: 2,
        max_cmd_sn: 3,
        data_sn: 0,
        buffer_offset: 0,
        residual: 0,
    });
    c.bench_function("bhs_encode_data_in", |b| {
        b.iter(|| black_box(&din).encode(4096))
    });

    let mut g = c.benchmark_group("crc32c");
    for size in [BHS_LEN, 4096, 262_144] {
        let data = vec![0x5au8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("{size}"), |b| {
            b.iter(|| digest::crc32c(black_box(&data)))
        });
    }
    g.finish();

    let cfg = FrameConfig {
        header_digest: true,
        data_digest: true,
        max_data_segment_len: 1 << 18,
    };
    let pdu = Pdu {
        header: command(),
        data: vec![1; 4096],
    };
    let wire = pdu.encode(&cfg);
    c.bench_function("pdu_decode_4k_with_digests", |b| {
        b.iter(|| Pdu::decode(black_box(&wire), &cfg).unwrap())
    });

    let limits = DataOutLimits {
        initial_r2t: true,
        immediate_data: true,
        first_burst_length: 65536,
        max_burst_length: 262_144,
        max_outstanding_r2t: 1,
        max_recv_data_segment_length: 262_144,
    };
    c.bench_function("r2t_plan_1mib_write", |b| {
        b.iter(|| {
            let mut s = DataOutState::new(1 << 20, 0, true, limits).unwrap();
            let mut ttt = 0;
            let mut n = 0;
            loop {
                let r = s.next_r2ts(|| {
                    ttt += 1;
                    ttt
                });
                if r.is_empty() {
                    break;
                }
                n += r.len();
                // each burst arrives as one Data-Out
                for p in r {
                    let d = lunmirror::iscsi::pdu::DataOut {
                        fin: true,
                        lun: Lun::default(),
                        itt: 1,
                        ttt: p.ttt,
                        exp_stat_sn: 0,
                        data_sn: 0,
                        buffer_offset: p.offset,
                    };
                    s.accept(&d, p.len).unwrap();
                }
            }
            black_box(n)
        })
    });
    c.bench_function("data_in_plan_1mib", |b| {
        b.iter(|| plan_data_in(black_box(1 << 20), 262_144, 262_144).count())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
