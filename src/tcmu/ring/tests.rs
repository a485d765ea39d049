use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::tcmu::sim::{FakeKernel, Reaped};

const ALL_CAPS: u16 =
    TCMU_MAILBOX_FLAG_CAP_OOOC | TCMU_MAILBOX_FLAG_CAP_READ_LEN | TCMU_MAILBOX_FLAG_CAP_TMR;
const READ10: [u8; 10] = [0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0];
const WRITE10: [u8; 10] = [0x2a, 0, 0, 0, 0, 0, 0, 0, 8, 0];

fn setup(flags: u16) -> (FakeKernel, Ring<Arc<HeapMem>>) {
    let k = FakeKernel::new(4096, 64 * 4096, flags);
    let ring = Ring::new(k.mem()).expect("valid mailbox");
    (k, ring)
}

fn next_cmd(ring: &mut Ring<Arc<HeapMem>>) -> Command {
    match ring.next_event() {
        Ok(Some(Event::Cmd(c))) => c,
        other => panic!("expected a command, got {other:?}"),
    }
}

fn good<'a>(data_in: &'a [u8]) -> Response<'a> {
    Response {
        status: 0,
        sense: &[],
        data_in,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn read_command_round_trip() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    let id = k.queue_cmd(&READ10, &[], 4096);
    let c = next_cmd(&mut ring);
    assert_eq!(c.cmd_id, id);
    assert_eq!(c.cdb, READ10);
    assert_eq!(c.data_in_capacity(), 4096);
    let data = pattern(4096, 7);
    ring.complete(c, good(&data)).unwrap();
    assert!(ring.take_kick());
    assert!(!ring.take_kick());
    let reaped = k.reap().unwrap();
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].cmd_id, id);
    assert_eq!(reaped[0].status, 0);
    assert_eq!(reaped[0].uflags, 0);
    assert_eq!(reaped[0].data_in, data);
    assert_eq!(ring.outstanding(), 0);
    assert_eq!(ring.next_event().unwrap(), None);
}

#[test]
fn write_gathers_all_pages() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    let data = pattern(3 * 4096 + 100, 3);
    k.queue_cmd(&WRITE10, &data, 0);
    let c = next_cmd(&mut ring);
    assert_eq!(c.iovs.len(), 4);
    assert_eq!(ring.gather(&c).unwrap(), data);
    ring.complete(c, good(&[])).unwrap();
    assert_eq!(k.reap().unwrap()[0].status, 0);
}

#[test]
fn bidi_command_splits_iovecs() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    let out = pattern(512, 1);
    let id = k.queue_cmd(&[0x53, 0, 0, 0, 0, 0, 0, 0, 1, 0], &out, 512);
    let c = next_cmd(&mut ring);
    assert!(c.is_bidi());
    assert_eq!(ring.gather(&c).unwrap(), out);
    let back = pattern(512, 9);
    ring.complete(c, good(&back)).unwrap();
    let r = k.reap().unwrap();
    assert_eq!((r[0].cmd_id, &r[0].data_in), (id, &back));
}

#[test]
fn short_data_in_sets_read_len() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    k.queue_cmd(&[0x12, 0, 0, 0, 255, 0], &[], 255);
    let c = next_cmd(&mut ring);
    ring.complete(c, good(&[1, 2, 3, 4, 5])).unwrap();
    let r = k.reap().unwrap();
    assert_eq!(r[0].uflags, TCMU_UFLAG_READ_LEN);
    assert_eq!(r[0].read_len, 5);
    assert_eq!(r[0].data_in, vec![1, 2, 3, 4, 5]);
}

#[test]
fn short_data_in_without_read_len_cap_leaves_flag_clear() {
    let (mut k, mut ring) = setup(TCMU_MAILBOX_FLAG_CAP_OOOC);
    k.queue_cmd(&[0x12, 0, 0, 0, 255, 0], &[], 255);
    let c = next_cmd(&mut ring);
    ring.complete(c, good(&[1, 2, 3])).unwrap();
    assert_eq!(k.reap().unwrap()[0].uflags, 0);
}

#[test]
fn data_in_longer_than_buffers_is_truncated() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    k.queue_cmd(&READ10, &[], 100);
    let c = next_cmd(&mut ring);
    let big = pattern(5000, 2);
    ring.complete(c, good(&big)).unwrap();
    let r = k.reap().unwrap();
    assert_eq!(r[0].data_in, big[..100].to_vec());
    assert_eq!(r[0].uflags, 0);
}

#[test]
fn check_condition_carries_sense() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    k.queue_cmd(&[0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0);
    let c = next_cmd(&mut ring);
    let sense = fixed_sense(0x05, 0x20, 0x00);
    ring.complete(
        c,
        Response {
            status: 0x02,
            sense: &sense,
            data_in: &[],
        },
    )
    .unwrap();
    let r = k.reap().unwrap();
    assert_eq!(r[0].status, 0x02);
    assert_eq!(r[0].sense, sense.to_vec());
}

#[test]
fn oversized_sense_is_truncated_to_96_bytes() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    k.queue_cmd(&[0x00, 0, 0, 0, 0, 0], &[], 0);
    let c = next_cmd(&mut ring);
    let mut sense = vec![0xaa; 200];
    sense[0] = 0x70;
    sense[7] = 200 - 8;
    ring.complete(
        c,
        Response {
            status: 0x02,
            sense: &sense,
            data_in: &[],
        },
    )
    .unwrap();
    assert_eq!(k.reap().unwrap()[0].sense.len(), 96);
}

#[test]
fn out_of_order_completion_with_oooc() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    let ids: Vec<u16> = (0..3).map(|_| k.queue_cmd(&READ10, &[], 512)).collect();
    let mut cmds: Vec<Command> = (0..3).map(|_| next_cmd(&mut ring)).collect();
    // Complete the last first: with OOOC it lands in the first entry.
    let c2 = cmds.pop().unwrap();
    ring.complete(c2, good(&[2u8; 512])).unwrap();
    let first = k.reap().unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].cmd_id, ids[2]);
    assert_eq!(first[0].data_in, vec![2u8; 512]);
    let c0 = cmds.remove(0);
    let c1 = cmds.remove(0);
    ring.complete(c1, good(&[1u8; 512])).unwrap();
    ring.complete(c0, good(&[0u8; 512])).unwrap();
    let rest = k.reap().unwrap();
    assert_eq!(
        rest.iter().map(|r| r.cmd_id).collect::<Vec<_>>(),
        vec![ids[1], ids[0]]
    );
    assert_eq!(rest[0].data_in, vec![1u8; 512]);
    assert_eq!(rest[1].data_in, vec![0u8; 512]);
    assert_eq!(k.in_flight(), 0);
}

#[test]
fn in_order_without_oooc_holds_tail_for_head_of_line() {
    let (mut k, mut ring) = setup(TCMU_MAILBOX_FLAG_CAP_READ_LEN);
    let a = k.queue_cmd(&READ10, &[], 512);
    let b = k.queue_cmd(&READ10, &[], 512);
    let ca = next_cmd(&mut ring);
    let cb = next_cmd(&mut ring);
    let tail0 = k.tail();
    ring.complete(cb, good(&[0xb; 512])).unwrap();
    assert_eq!(k.tail(), tail0, "tail must wait for the first command");
    assert!(k.reap().unwrap().is_empty());
    ring.complete(ca, good(&[0xa; 512])).unwrap();
    let r = k.reap().unwrap();
    assert_eq!(r.iter().map(|r| r.cmd_id).collect::<Vec<_>>(), vec![a, b]);
    assert_eq!(r[0].data_in, vec![0xa; 512]);
    assert_eq!(r[1].data_in, vec![0xb; 512]);
}

#[test]
fn pad_at_ring_end_is_skipped_and_ring_wraps() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    // Each READ10 entry is 128 bytes; after 30 of them the 4096-byte ring has
    // 256 bytes left, so keep going until a PAD is needed.
    let mut seen = 0u32;
    for i in 0..100u32 {
        let id = k.queue_cmd(&READ10, &[], 8);
        let c = next_cmd(&mut ring);
        assert_eq!(c.cmd_id, id);
        ring.complete(c, good(&i.to_le_bytes())).unwrap();
        let r = k.reap().unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].data_in[..4], i.to_le_bytes());
        seen += 1;
    }
    assert_eq!(seen, 100);
    // 100 * 128 bytes went through a 4096-byte ring: it wrapped.
    assert!(k.head() < 4096);
    assert_eq!(ring.outstanding(), 0);
}

#[test]
fn entries_with_big_cdbs_and_pads_wrap_correctly() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    let mut cdb32 = vec![0u8; 32];
    cdb32[0] = 0x7f;
    cdb32[7] = 24;
    for round in 0..60u8 {
        let cdb: &[u8] = if round % 3 == 0 { &cdb32 } else { &READ10 };
        k.queue_cmd(cdb, &[], 16);
        let c = next_cmd(&mut ring);
        assert_eq!(c.cdb, cdb);
        ring.complete(c, good(&[round; 16])).unwrap();
        assert_eq!(k.reap().unwrap()[0].data_in, vec![round; 16]);
    }
}

#[test]
fn tmr_entry_is_reported_and_released() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    let a = k.queue_cmd(&READ10, &[], 512);
    k.queue_tmr(TCMU_TMR_ABORT_TASK, &[a]);
    let b = k.queue_cmd(&READ10, &[], 512);
    let ca = next_cmd(&mut ring);
    assert_eq!(
        ring.next_event().unwrap(),
        Some(Event::Tmr(TmrNotice {
            tmr_type: TCMU_TMR_ABORT_TASK,
            cmd_ids: vec![a]
        }))
    );
    let cb = next_cmd(&mut ring);
    assert_eq!(cb.cmd_id, b);
    ring.complete(ca, good(&[])).unwrap();
    ring.complete(cb, good(&[])).unwrap();
    let r = k.reap().unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(k.tail(), k.head());
}

#[test]
fn tmr_with_oversized_count_is_skipped() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    let mut e = vec![0u8; 40];
    e[0..4].copy_from_slice(&hdr_len_op(40, TCMU_OP_TMR).to_ne_bytes());
    e[TMR_CMD_CNT..TMR_CMD_CNT + 4].copy_from_slice(&1000u32.to_ne_bytes());
    k.queue_raw(&e, 40, None);
    let id = k.queue_cmd(&READ10, &[], 8);
    assert_eq!(
        ring.next_event().unwrap(),
        Some(Event::BadTmr { off: 0, len: 40 })
    );
    assert_eq!(next_cmd(&mut ring).cmd_id, id);
}

#[test]
fn unknown_opcode_is_flagged_and_skipped() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    let mut e = vec![0u8; 64];
    e[0..4].copy_from_slice(&hdr_len_op(64, 5).to_ne_bytes());
    k.queue_raw(&e, 64, None);
    let id = k.queue_cmd(&READ10, &[], 8);
    assert_eq!(
        ring.next_event().unwrap(),
        Some(Event::UnknownOp { off: 0, op: 5 })
    );
    let uflags = k
        .region()
        .u8_at(u64::from(k.cmdr_off()) + HDR_UFLAGS as u64)
        .unwrap();
    assert_eq!(uflags & TCMU_UFLAG_UNKNOWN_OP, TCMU_UFLAG_UNKNOWN_OP);
    let c = next_cmd(&mut ring);
    assert_eq!(c.cmd_id, id);
}

/// A hand-built CMD entry: `iovs` as (base, len), CDB at `cdb_rel` from the
/// entry start (None: right after the minimum entry).
fn raw_cmd(
    id: u16,
    len: u32,
    iovs: &[(u64, u64)],
    cdb_rel: Option<u64>,
    cdb: &[u8],
    k: &FakeKernel,
) -> Vec<u8> {
    let mut e = vec![0u8; len as usize];
    e[0..4].copy_from_slice(&hdr_len_op(len, TCMU_OP_CMD).to_ne_bytes());
    e[HDR_CMD_ID..HDR_CMD_ID + 2].copy_from_slice(&id.to_ne_bytes());
    e[REQ_IOV_CNT..REQ_IOV_CNT + 4].copy_from_slice(&(iovs.len() as u32).to_ne_bytes());
    let base = (REQ_IOV + IOVEC_SIZE * iovs.len()).max(CMD_ENTRY_SIZE) as u64;
    let rel = cdb_rel.unwrap_or(base);
    let abs = u64::from(k.cmdr_off() + k.head()) + rel;
    e[REQ_CDB_OFF..REQ_CDB_OFF + 8].copy_from_slice(&abs.to_ne_bytes());
    for (i, &(b, l)) in iovs.iter().enumerate() {
        let o = REQ_IOV + IOVEC_SIZE * i;
        e[o..o + 8].copy_from_slice(&b.to_ne_bytes());
        e[o + 8..o + 16].copy_from_slice(&l.to_ne_bytes());
    }
    // A CDB aimed into the header would overwrite len_op; leave it out.
    if rel >= REQ_IOV as u64 {
        if let Some(dst) = e.get_mut(rel as usize..rel as usize + cdb.len()) {
            dst.copy_from_slice(cdb);
        }
    }
    e
}

fn expect_failed(k: &mut FakeKernel, ring: &mut Ring<Arc<HeapMem>>, id: u16) -> EntryFault {
    let fault = match ring.next_event() {
        Ok(Some(Event::Failed { cmd_id, fault })) => {
            assert_eq!(cmd_id, id);
            fault
        }
        other => panic!("expected Failed, got {other:?}"),
    };
    let r = k.reap().unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].cmd_id, id);
    assert_eq!(r[0].status, 0x02);
    assert_eq!(r[0].sense, SENSE_INTERNAL_TARGET_FAILURE.to_vec());
    // The ring carries on.
    let next = k.queue_cmd(&READ10, &[], 8);
    assert_eq!(next_cmd(ring).cmd_id, next);
    fault
}

#[test]
fn iovec_outside_data_area_fails_the_command() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    // Points into the command ring, not the data area.
    let e = raw_cmd(77, 128, &[(200, 16)], None, &READ10, &k);
    k.queue_raw(&e, 128, Some((77, vec![])));
    let f = expect_failed(&mut k, &mut ring, 77);
    assert!(matches!(f, EntryFault::IovOutside { index: 0, .. }));
}

#[test]
fn iovec_past_mapping_end_fails_the_command() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    let end = k.data_off() + 64 * 4096;
    let e = raw_cmd(78, 128, &[(end - 8, 16)], None, &READ10, &k);
    k.queue_raw(&e, 128, Some((78, vec![])));
    expect_failed(&mut k, &mut ring, 78);
    let (mut k, mut ring) = setup(ALL_CAPS);
    let e = raw_cmd(79, 128, &[(k.data_off(), u64::MAX)], None, &READ10, &k);
    k.queue_raw(&e, 128, Some((79, vec![])));
    expect_failed(&mut k, &mut ring, 79);
}

#[test]
fn overlapping_iovecs_beyond_area_size_fail() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    let whole = (k.data_off(), 64 * 4096u64);
    let e = raw_cmd(80, 256, &[whole, whole], None, &READ10, &k);
    k.queue_raw(&e, 256, Some((80, vec![])));
    let f = expect_failed(&mut k, &mut ring, 80);
    assert!(matches!(f, EntryFault::DataTooLarge { .. }));
}

#[test]
fn iov_count_beyond_entry_fails() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    let mut e = raw_cmd(81, 128, &[], None, &READ10, &k);
    e[REQ_IOV_CNT..REQ_IOV_CNT + 4].copy_from_slice(&u32::MAX.to_ne_bytes());
    e[REQ_IOV_BIDI_CNT..REQ_IOV_BIDI_CNT + 4].copy_from_slice(&u32::MAX.to_ne_bytes());
    k.queue_raw(&e, 128, Some((81, vec![])));
    let f = expect_failed(&mut k, &mut ring, 81);
    assert!(matches!(f, EntryFault::IovCounts { .. }));
}

#[test]
fn cdb_outside_entry_fails() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    let e = raw_cmd(82, 128, &[], Some(4000), &READ10, &k);
    k.queue_raw(&e, 128, Some((82, vec![])));
    let f = expect_failed(&mut k, &mut ring, 82);
    assert!(matches!(f, EntryFault::CdbOutside { .. }));
    // cdb_off pointing back at the header is outside too.
    let e = raw_cmd(83, 128, &[], Some(0), &READ10, &k);
    k.queue_raw(&e, 128, Some((83, vec![])));
    let f = expect_failed(&mut k, &mut ring, 83);
    assert!(matches!(f, EntryFault::CdbOutside { .. }));
}

#[test]
fn cdb_running_past_entry_fails() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    // A 16-byte CDB opcode (group 4) at 8 bytes before the entry end.
    let e = raw_cmd(84, 128, &[], Some(120), &[0x88, 0, 0, 0, 0, 0, 0, 0], &k);
    k.queue_raw(&e, 128, Some((84, vec![])));
    let f = expect_failed(&mut k, &mut ring, 84);
    assert_eq!(f, EntryFault::CdbTruncated { cdb_len: 16 });
    // Variable-length CDB claiming 263 bytes.
    let e = raw_cmd(85, 128, &[], None, &[0x7f, 0, 0, 0, 0, 0, 0, 255], &k);
    k.queue_raw(&e, 128, Some((85, vec![])));
    let f = expect_failed(&mut k, &mut ring, 85);
    assert_eq!(f, EntryFault::CdbTruncated { cdb_len: 263 });
}

#[test]
fn zero_length_entry_breaks_ring() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    k.queue_raw(&[0u8; 8], 8, None);
    assert_eq!(
        ring.next_event(),
        Err(RingError::Broken(Broken::ZeroLength { off: 0 }))
    );
    // It stays broken until reset.
    assert!(matches!(ring.next_event(), Err(RingError::Broken(_))));
}

#[test]
fn entry_crossing_ring_end_breaks_ring() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    let e = raw_cmd(1, 4096 + 128, &[], None, &READ10, &k);
    k.queue_raw(&e[..8], 8, None);
    assert!(matches!(
        ring.next_event(),
        Err(RingError::Broken(Broken::CrossesEnd { .. }))
    ));
}

#[test]
fn entry_longer_than_published_breaks_ring() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    let e = raw_cmd(1, 256, &[], None, &READ10, &k);
    k.queue_raw(&e, 128, None);
    assert_eq!(
        ring.next_event(),
        Err(RingError::Broken(Broken::PastHead { off: 0, len: 256 }))
    );
}

#[test]
fn short_cmd_entry_breaks_ring() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    let e = raw_cmd(1, 64, &[], Some(48), &READ10, &k);
    k.queue_raw(&e, 64, None);
    assert_eq!(
        ring.next_event(),
        Err(RingError::Broken(Broken::ShortCmd { off: 0, len: 64 }))
    );
}

#[test]
fn bad_head_breaks_ring() {
    for head in [4, 4096, 9000, u32::MAX] {
        let (mut k, mut ring) = setup(ALL_CAPS);
        k.set_head_raw(head);
        assert_eq!(
            ring.next_event(),
            Err(RingError::Broken(Broken::Head(head)))
        );
    }
}

#[test]
fn duplicate_outstanding_id_breaks_ring() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    let e = raw_cmd(9, 128, &[], None, &READ10, &k);
    k.queue_raw(&e, 128, Some((9, vec![])));
    let e = raw_cmd(9, 128, &[], None, &READ10, &k);
    k.queue_raw(&e, 128, None);
    let c = next_cmd(&mut ring);
    assert_eq!(
        ring.next_event(),
        Err(RingError::Broken(Broken::DuplicateId(9)))
    );
    // The first command can still be completed.
    ring.complete(c, good(&[])).unwrap();
    assert_eq!(k.reap().unwrap()[0].cmd_id, 9);
}

#[test]
fn reset_discards_stale_commands() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    k.queue_cmd(&WRITE10, &[1u8; 512], 0);
    let stale = next_cmd(&mut ring);
    k.reset_ring();
    ring.reset().unwrap();
    assert_eq!(
        ring.complete(stale, good(&[])),
        Err(RingError::NotOutstanding(1))
    );
    let id = k.queue_cmd(&READ10, &[], 8);
    let c = next_cmd(&mut ring);
    assert_eq!(c.cmd_id, id);
    ring.complete(c, good(&[5; 8])).unwrap();
    assert_eq!(k.reap().unwrap()[0].data_in, vec![5; 8]);
}

#[test]
fn reset_clears_broken_state() {
    let (mut k, mut ring) = setup(ALL_CAPS);
    k.queue_raw(&[0u8; 8], 8, None);
    assert!(ring.next_event().is_err());
    k.reset_ring();
    ring.reset().unwrap();
    assert_eq!(ring.broken(), None);
    k.queue_cmd(&READ10, &[], 8);
    next_cmd(&mut ring);
}

#[test]
fn mailbox_validation() {
    let k = FakeKernel::new(4096, 4096, 0);
    k.region()
        .write(MB_VERSION as u64, &1u16.to_ne_bytes())
        .unwrap();
    assert_eq!(Ring::new(k.mem()).unwrap_err(), RingError::Version(1));

    let k = FakeKernel::new(4096, 4096, 0);
    k.region()
        .write(MB_CMDR_SIZE as u64, &(1u32 << 30).to_ne_bytes())
        .unwrap();
    assert!(matches!(Ring::new(k.mem()), Err(RingError::Layout { .. })));

    let k = FakeKernel::new(4096, 4096, 0);
    k.region()
        .write(MB_CMDR_OFF as u64, &64u32.to_ne_bytes())
        .unwrap();
    assert!(matches!(Ring::new(k.mem()), Err(RingError::Layout { .. })));

    let tiny = Arc::new(HeapMem::new(16));
    assert!(Ring::new(tiny).is_err());
}

#[test]
fn region_rejects_out_of_bounds() {
    let m = HeapMem::new(64);
    let r = Region::new(&m);
    assert!(r.write(60, &[0u8; 8]).is_err());
    assert!(r.read(u64::MAX, &mut [0u8; 2]).is_err());
    assert!(r.load_acquire(62).is_err());
    assert!(r.load_acquire(2).is_err(), "misaligned atomic");
    r.write(56, &[1u8; 8]).unwrap();
    assert_eq!(r.u64_at(56).unwrap(), u64::from_ne_bytes([1; 8]));
}

#[test]
fn cdb_length_table() {
    assert_eq!(cdb_len(0x12, 0), 6);
    assert_eq!(cdb_len(0x28, 0), 10);
    assert_eq!(cdb_len(0x4d, 0), 10);
    assert_eq!(cdb_len(0x60, 0), 12);
    assert_eq!(cdb_len(0x88, 0), 16);
    assert_eq!(cdb_len(0xa0, 0), 12);
    assert_eq!(cdb_len(0xc0, 0), 10);
    assert_eq!(cdb_len(0x7f, 24), 32);
}

proptest! {
    /// Garbage in the ring never panics; once broken the ring stays broken;
    /// every command the ring hands out can be completed.
    #[test]
    fn hostile_ring_never_panics(
        entries in proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 8..300), 0u32..400), 1..12),
        head_override in proptest::option::of(any::<u32>()),
    ) {
        let (mut k, mut ring) = setup(ALL_CAPS);
        for (mut bytes, adv) in entries {
            let adv = adv / 8 * 8;
            // Sometimes make len_op plausible so parsing gets deeper.
            if bytes.len() >= 8 && adv >= 8 && bytes[0] & 1 == 0 {
                let op = u32::from(bytes[1] % 3);
                bytes[0..4].copy_from_slice(&hdr_len_op(adv, op).to_ne_bytes());
            }
            if k.head() + bytes.len() as u32 >= k.cmdr_size() {
                break;
            }
            k.queue_raw(&bytes, adv, None);
        }
        if let Some(h) = head_override {
            k.set_head_raw(h);
        }
        let mut was_broken = false;
        for _ in 0..64 {
            match ring.next_event() {
                Ok(None) => break,
                Ok(Some(Event::Cmd(c))) => {
                    prop_assert!(!was_broken);
                    let _ = ring.gather(&c);
                    ring.complete(c, good(&[0xee; 64])).unwrap();
                }
                Ok(Some(_)) => prop_assert!(!was_broken),
                Err(RingError::Broken(_)) => was_broken = true,
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
    }

    /// Any completion order with OOOC: the kernel sees every command exactly
    /// once, with its own data.
    #[test]
    fn any_completion_order_is_seen_once(
        lens in proptest::collection::vec(1usize..9000, 1..10),
        order in proptest::collection::vec(any::<prop::sample::Index>(), 10),
        oooc in any::<bool>(),
    ) {
        let flags = if oooc { ALL_CAPS } else { TCMU_MAILBOX_FLAG_CAP_READ_LEN };
        let (mut k, mut ring) = setup(flags);
        let mut expect = std::collections::HashMap::new();
        for (i, &l) in lens.iter().enumerate() {
            let id = k.queue_cmd(&READ10, &[], l);
            expect.insert(id, pattern(l, i as u8));
        }
        let mut cmds: Vec<Command> = Vec::new();
        while let Some(ev) = ring.next_event().unwrap() {
            match ev {
                Event::Cmd(c) => cmds.push(c),
                other => prop_assert!(false, "unexpected {other:?}"),
            }
        }
        prop_assert_eq!(cmds.len(), lens.len());
        let mut reaped: Vec<Reaped> = Vec::new();
        let mut o = order.iter();
        while !cmds.is_empty() {
            let idx = o.next().map(|ix| ix.index(cmds.len())).unwrap_or(0);
            let c = cmds.swap_remove(idx);
            let data = expect[&c.cmd_id].clone();
            ring.complete(c, good(&data)).unwrap();
            reaped.extend(k.reap().unwrap());
        }
        prop_assert_eq!(reaped.len(), lens.len());
        for r in reaped {
            prop_assert_eq!(&r.data_in, &expect[&r.cmd_id]);
        }
        prop_assert_eq!(k.tail(), k.head());
    }
}
