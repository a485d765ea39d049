//! Protocol behaviour of the target driven by a scripted initiator:
//! sequencing, R2T/Data-In shapes, MC/S, reinstatement, NOP, TMF, logout,
//! digests and hostile input.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::initiator::{default_keys, read10, with_keys, write10, Initiator, Login};
use lunmirror::block::mem::MemDev;
use lunmirror::block::SharedDev;
use lunmirror::iscsi::negotiate::TargetLimits;
use lunmirror::iscsi::pdu::{
    Bhs, LogoutReason, LogoutRequest, LogoutResponseCode, Lun, NopOut, Pdu, RejectReason,
    SnackRequest, TaskMgmtRequest, TextRequest, TmfFunction, TmfResponse, RESERVED_TAG,
};
use lunmirror::iscsi::text::{encode_text, parse_text};
use lunmirror::iscsi::ServerOptions;

const ISID: [u8; 6] = [0x80, 0, 0, 0x12, 0x34, 1];

fn keys() -> Vec<(String, String)> {
    default_keys(common::IQN)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn tmf(
    ini: &mut Initiator,
    function: TmfFunction,
    lun: u64,
    ref_itt: u32,
    ref_cmd_sn: u32,
) -> TmfResponse {
    let itt = ini.next_itt();
    let req = Bhs::TaskMgmtRequest(TaskMgmtRequest {
        immediate: true,
        function,
        lun: Lun::from_flat(lun),
        itt,
        ref_task_tag: ref_itt,
        cmd_sn: ini.cmd_sn,
        exp_stat_sn: ini.exp_stat_sn,
        ref_cmd_sn,
        exp_data_sn: 0,
    });
    ini.send_raw(&Pdu {
        header: req,
        data: vec![],
    });
    loop {
        let p = ini.recv().expect("TMF response");
        match p.header {
            Bhs::TaskMgmtResponse(r) => {
                assert_eq!(r.itt, itt);
                return r.response;
            }
            // R2Ts of the task being aborted may still arrive.
            Bhs::R2t(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn logout(ini: &mut Initiator, reason: LogoutReason, cid: u16) -> LogoutResponseCode {
    let itt = ini.next_itt();
    let req = Bhs::LogoutRequest(LogoutRequest {
        immediate: true,
        reason,
        itt,
        cid,
        cmd_sn: ini.cmd_sn,
        exp_stat_sn: ini.exp_stat_sn,
    });
    ini.send_raw(&Pdu {
        header: req,
        data: vec![],
    });
    let p = ini.recv().expect("logout response");
    match p.header {
        Bhs::LogoutResponse(r) => {
            assert_eq!(r.itt, itt);
            r.response
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn write_read_round_trip_and_status_phase_collapse() {
    let t = common::start(&[4 << 20]);
    let mut ini = Initiator::login_ok(t.addr, ISID, 0, 0, &keys());
    assert_ne!(ini.tsih, 0);
    let data = pattern(64 * 1024, 7);
    let w = ini.scsi(&write10(8, 128), data.len() as u32, false, &data);
    assert_eq!((w.status, w.response), (0, 0));
    assert!(!w.overflow && !w.underflow);
    let r = ini.scsi(&read10(8, 128), data.len() as u32, true, &[]);
    assert_eq!(r.status, 0);
    assert_eq!(r.data, data);
    // Status rode on the last Data-In.
    assert!(r.data_ins.last().unwrap().4);
    assert_eq!(
        &t.devs[0].snapshot()[8 * 512..8 * 512 + data.len()],
        &data[..]
    );
    t.stop();
}

#[test]
fn r2t_sequence_follows_burst_and_outstanding_limits() {
    let limits = TargetLimits {
        max_burst_length: 16384,
        first_burst_length: 8192,
        max_outstanding_r2t: 2,
        max_recv_data_segment_length: 4096,
        ..TargetLimits::default()
    };
    let t = common::start_with(&[4 << 20], limits, ServerOptions::default());
    let k = with_keys(
        keys(),
        &[
            ("MaxBurstLength", "16384"),
            ("FirstBurstLength", "8192"),
            ("MaxOutstandingR2T", "2"),
            ("ImmediateData", "No"),
        ],
    );
    let mut ini = Initiator::login_ok(t.addr, ISID, 0, 0, &k);
    assert_eq!(ini.max_xmit, 4096);
    assert!(!ini.immediate_data && ini.initial_r2t);
    let data = pattern(100 * 512, 3);
    let w = ini.scsi(&write10(0, 100), data.len() as u32, false, &data);
    assert_eq!(w.status, 0);
    let shape: Vec<(u32, u32, u32)> = w.r2ts.clone();
    assert_eq!(
        shape,
        vec![
            (0, 0, 16384),
            (1, 16384, 16384),
            (2, 32768, 16384),
            (3, 49152, 51200 - 49152)
        ]
    );
    assert_eq!(&t.devs[0].snapshot()[..data.len()], &data[..]);
    t.stop();
}

#[test]
fn unsolicited_data_then_r2t_for_the_rest() {
    let limits = TargetLimits {
        require_initial_r2t: false,
        first_burst_length: 16384,
        max_recv_data_segment_length: 4096,
        ..TargetLimits::default()
    };
    let t = common::start_with(&[4 << 20], limits, ServerOptions::default());
    let k = with_keys(
        keys(),
        &[("InitialR2T", "No"), ("FirstBurstLength", "16384")],
    );
    let mut ini = Initiator::login_ok(t.addr, ISID, 0, 0, &k);
    assert!(!ini.initial_r2t);
    let data = pattern(40 * 1024, 9);
    let w = ini.scsi(&write10(16, 80), data.len() as u32, false, &data);
    assert_eq!(w.status, 0);
    // 4 KiB immediate + 12 KiB unsolicited, then R2Ts from 16 KiB on.
    assert_eq!(w.r2ts.first().map(|r| r.1), Some(16384));
    assert_eq!(
        &t.devs[0].snapshot()[16 * 512..16 * 512 + data.len()],
        &data[..]
    );
    t.stop();
}

#[test]
fn data_in_is_split_by_the_initiators_segment_length() {
    let t = common::start(&[4 << 20]);
    let k = with_keys(keys(), &[("MaxRecvDataSegmentLength", "4096")]);
    let mut ini = Initiator::login_ok(t.addr, ISID, 0, 0, &k);
    let r = ini.scsi(&read10(0, 40), 40 * 512, true, &[]);
    assert_eq!(r.status, 0);
    assert_eq!(r.data.len(), 20480);
    let sns: Vec<u32> = r.data_ins.iter().map(|d| d.0).collect();
    assert_eq!(sns, vec![0, 1, 2, 3, 4]);
    assert!(r.data_ins.iter().all(|d| d.2 == 4096));
    assert!(r.data_ins[4].3 && r.data_ins[4].4);
    assert!(r.data_ins[..4].iter().all(|d| !d.4));
    t.stop();
}

#[test]
fn residuals_on_reads() {
    let t = common::start(&[4 << 20]);
    let mut ini = Initiator::login_ok(t.addr, ISID, 0, 0, &keys());
    // EDTL shorter than the CDB: truncated, overflow.
    let r = ini.scsi(&read10(0, 2), 512, true, &[]);
    assert_eq!(
        (r.status, r.data.len(), r.overflow, r.residual),
        (0, 512, true, 512)
    );
    // EDTL longer: underflow.
    let r = ini.scsi(&read10(0, 1), 10000, true, &[]);
    assert_eq!(
        (r.status, r.data.len(), r.underflow, r.residual),
        (0, 512, true, 9488)
    );
    t.stop();
}

#[test]
fn cmdsn_outside_the_window_is_ignored_and_max_cmd_sn_advances() {
    let t = common::start(&[1 << 20]);
    let mut ini = Initiator::login_ok(t.addr, ISID, 0, 0, &keys());
    let d = ini.tur();
    assert_eq!(d.status, 0);
    let (exp, max) = (ini.last_exp_cmd_sn, ini.last_max_cmd_sn);
    assert_eq!(exp, ini.cmd_sn);
    assert_eq!(max.wrapping_sub(exp), 127, "queue depth 128");
    // Too low and too high: silently dropped.
    for sn in [exp.wrapping_sub(1), max.wrapping_add(1)] {
        let mut c = ini.command(&[0; 6], 0, false, false, true);
        c.cmd_sn = sn;
        ini.cmd_sn = ini.cmd_sn.wrapping_sub(1);
        ini.send_raw(&Pdu {
            header: Bhs::ScsiCommand(c),
            data: vec![],
        });
        assert!(ini.silent_for(Duration::from_millis(300)));
    }
    assert_eq!(ini.tur().status, 0);
    t.stop();
}

#[test]
fn immediate_nop_is_echoed_and_idle_connections_are_pinged_then_dropped() {
    let opts = ServerOptions {
        nop_interval: Duration::from_millis(300),
        nop_timeout: Duration::from_millis(400),
        tick: Duration::from_millis(50),
        ..ServerOptions::default()
    };
    let t = common::start_with(&[1 << 20], TargetLimits::default(), opts);
    let mut ini = Initiator::login_ok(t.addr, ISID, 0, 0, &keys());
    let itt = ini.next_itt();
    ini.send_raw(&Pdu {
        header: Bhs::NopOut(NopOut {
            immediate: true,
            lun: Lun::default(),
            itt,
            ttt: RESERVED_TAG,
            cmd_sn: ini.cmd_sn,
            exp_stat_sn: ini.exp_stat_sn,
        }),
        data: b"ping me".to_vec(),
    });
    let p = ini.recv().unwrap();
    match p.header {
        Bhs::NopIn(n) => {
            assert_eq!((n.itt, n.ttt), (itt, RESERVED_TAG));
            assert_eq!(p.data, b"ping me");
        }
        other => panic!("{other:?}"),
    }
    // Idle: the target pings; answering keeps the connection.
    for _ in 0..2 {
        let p = ini.recv().unwrap();
        let Bhs::NopIn(n) = p.header else {
            panic!("expected a ping, got {:?}", p.header)
        };
        assert_eq!(n.itt, RESERVED_TAG);
        assert_ne!(n.ttt, RESERVED_TAG);
        ini.send_raw(&Pdu {
            header: Bhs::NopOut(NopOut {
                immediate: true,
                lun: Lun::default(),
                itt: RESERVED_TAG,
                ttt: n.ttt,
                cmd_sn: ini.cmd_sn,
                exp_stat_sn: ini.exp_stat_sn,
            }),
            data: vec![],
        });
    }
    assert_eq!(ini.tur().status, 0);
    // Now ignore the pings: the connection is closed.
    assert!(ini.closed_within(Duration::from_secs(3)));
    t.stop();
}

#[test]
fn multiple_connections_share_one_cmdsn_window() {
    let t = common::start(&[1 << 20]);
    let mut a = Initiator::login_ok(t.addr, ISID, 0, 0, &keys());
    let tsih = a.tsih;
    let mut b = Initiator::login_ok(t.addr, ISID, tsih, 1, &keys());
    assert_eq!(b.tsih, tsih);
    // B sends the command after A's next CmdSN: it must wait for A's.
    let sn_a = a.cmd_sn;
    b.cmd_sn = sn_a.wrapping_add(1);
    let data = pattern(4096, 1);
    let wb = b.command(&write10(100, 8), 4096, false, true, true);
    let itt_b = wb.itt;
    b.send_raw(&Pdu {
        header: Bhs::ScsiCommand(wb),
        data: data.clone(),
    });
    assert!(
        b.silent_for(Duration::from_millis(300)),
        "held until the gap is filled"
    );
    assert!(t.devs[0].snapshot()[100 * 512..100 * 512 + 4096]
        .iter()
        .all(|&x| x == 0));
    let ra = a.tur();
    assert_eq!(ra.status, 0);
    let db = b.finish(itt_b, &data);
    assert_eq!(db.status, 0);
    assert_eq!(
        &t.devs[0].snapshot()[100 * 512..100 * 512 + 4096],
        &data[..]
    );
    a.cmd_sn = b.cmd_sn;
    // Logging out B's connection from A closes it.
    assert_eq!(
        logout(&mut a, LogoutReason::CloseConnection, 1),
        LogoutResponseCode::Success
    );
    assert!(b.closed_within(Duration::from_secs(3)));
    assert_eq!(
        logout(&mut a, LogoutReason::CloseConnection, 9),
        LogoutResponseCode::CidNotFound
    );
    assert_eq!(a.tur().status, 0);
    t.stop();
}

#[test]
fn too_many_connections_and_unknown_tsih_are_refused() {
    let t = common::start(&[1 << 20]);
    let k = with_keys(keys(), &[("MaxConnections", "1")]);
    let a = Initiator::login_ok(t.addr, ISID, 0, 0, &k);
    match Initiator::login(t.addr, ISID, a.tsih, 1, &k) {
        Login::Refused { class, detail } => assert_eq!((class, detail), (2, 6)),
        Login::Ok(_) => panic!("second connection accepted beyond MaxConnections=1"),
    }
    match Initiator::login(t.addr, ISID, 0x7777, 0, &keys()) {
        Login::Refused { class, detail } => assert_eq!((class, detail), (2, 0x0a)),
        Login::Ok(_) => panic!("unknown TSIH accepted"),
    }
    drop(a);
    t.stop();
}

#[test]
fn session_and_connection_reinstatement() {
    let t = common::start(&[1 << 20]);
    let mut old = Initiator::login_ok(t.addr, ISID, 0, 0, &keys());
    assert_eq!(old.tur().status, 0);
    // Same initiator + ISID, TSIH 0: the old session goes.
    let mut new = Initiator::login_ok(t.addr, ISID, 0, 0, &keys());
    assert!(old.closed_within(Duration::from_secs(3)));
    assert_eq!(new.tur().status, 0);
    // Same session, same CID: the old connection goes, the session stays.
    let mut again = Initiator::login_ok(t.addr, ISID, new.tsih, 0, &keys());
    assert!(new.closed_within(Duration::from_secs(3)));
    again.cmd_sn = again.last_exp_cmd_sn;
    assert_eq!(again.tur().status, 0);
    // A different ISID is a different session and is unaffected.
    let mut other = Initiator::login_ok(t.addr, [0x80, 0, 0, 0x12, 0x34, 2], 0, 0, &keys());
    assert_ne!(other.tsih, again.tsih);
    assert_eq!(other.tur().status, 0);
    assert_eq!(again.tur().status, 0);
    assert_eq!(t.handle.session_count(), 2);
    t.stop();
}

#[test]
fn task_management_functions() {
    let t = common::start(&[1 << 20]);
    let mut ini = Initiator::login_ok(
        t.addr,
        ISID,
        0,
        0,
        &with_keys(keys(), &[("ImmediateData", "No")]),
    );
    // A write waiting for Data-Out is aborted: TMF complete, no SCSI response.
    let c = ini.command(&write10(0, 8), 4096, false, true, true);
    let (itt, sn) = (c.itt, c.cmd_sn);
    ini.send_raw(&Pdu {
        header: Bhs::ScsiCommand(c),
        data: vec![],
    });
    let p = ini.recv().unwrap();
    assert!(matches!(p.header, Bhs::R2t(_)));
    assert_eq!(
        tmf(&mut ini, TmfFunction::AbortTask, 0, itt, sn),
        TmfResponse::FunctionComplete
    );
    // Its late data is dropped silently.
    ini.data_out(itt, 1, 0, 0, true, &[0xee; 4096]);
    assert!(ini.silent_for(Duration::from_millis(200)));
    assert!(t.devs[0].snapshot()[..4096].iter().all(|&b| b == 0));
    let behind = ini.last_exp_cmd_sn.wrapping_sub(5);
    assert_eq!(
        tmf(&mut ini, TmfFunction::AbortTask, 0, 0xdead, behind),
        TmfResponse::TaskDoesNotExist
    );
    assert_eq!(
        tmf(&mut ini, TmfFunction::LogicalUnitReset, 7, RESERVED_TAG, 0),
        TmfResponse::LunDoesNotExist
    );
    assert_eq!(
        tmf(&mut ini, TmfFunction::AbortTaskSet, 0, RESERVED_TAG, 0),
        TmfResponse::FunctionComplete
    );
    assert_eq!(
        tmf(&mut ini, TmfFunction::TaskReassign, 0, 1, 0),
        TmfResponse::AllegianceReassignmentNotSupported
    );
    assert_eq!(
        tmf(&mut ini, TmfFunction::ClearAca, 0, RESERVED_TAG, 0),
        TmfResponse::NotSupported
    );
    assert_eq!(
        tmf(&mut ini, TmfFunction::LogicalUnitReset, 0, RESERVED_TAG, 0),
        TmfResponse::FunctionComplete
    );
    // After the reset, a unit attention; then the LU works.
    let d = ini.tur();
    assert_eq!(d.status, 2, "unit attention after LU reset");
    assert_eq!(d.sense.get(2).map(|k| k & 0x0f), Some(6));
    assert_eq!(ini.tur().status, 0);
    // ABORT TASK for a command not received yet (RefCmdSN ahead): the slot
    // is consumed, the late command is ignored.
    let skipped = ini.cmd_sn;
    ini.cmd_sn += 1;
    assert_eq!(
        tmf(&mut ini, TmfFunction::AbortTask, 0, 0x4444, skipped),
        TmfResponse::FunctionComplete
    );
    let mut late = ini.command(&[0; 6], 0, false, false, true);
    late.cmd_sn = skipped;
    ini.cmd_sn = ini.cmd_sn.wrapping_sub(1);
    ini.send_raw(&Pdu {
        header: Bhs::ScsiCommand(late),
        data: vec![],
    });
    assert!(ini.silent_for(Duration::from_millis(200)));
    assert_eq!(ini.tur().status, 0);
    t.stop();
}

#[test]
fn abort_of_a_running_command_suppresses_its_response() {
    let slow = Arc::new(common::SlowDev {
        inner: MemDev::new(1 << 20),
        write_delay: Duration::from_millis(400),
    });
    let t = common::start_devs(
        vec![slow.clone() as SharedDev],
        TargetLimits::default(),
        ServerOptions::default(),
    );
    let mut ini = Initiator::login_ok(t.addr, ISID, 0, 0, &keys());
    let data = pattern(4096, 5);
    let c = ini.command(&write10(0, 8), 4096, false, true, true);
    let (itt, sn) = (c.itt, c.cmd_sn);
    ini.send_raw(&Pdu {
        header: Bhs::ScsiCommand(c),
        data: data.clone(),
    });
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    assert_eq!(
        tmf(&mut ini, TmfFunction::AbortTask, 0, itt, sn),
        TmfResponse::FunctionComplete
    );
    // The TMF answer waited for the running write.
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert!(
        ini.silent_for(Duration::from_millis(200)),
        "aborted task must not answer"
    );
    assert_eq!(ini.tur().status, 0);
    t.stop();
}

#[test]
fn a_slow_device_keeps_the_reader_responsive_after_one_slow_command() {
    // Fast reads let the reader run commands itself (inline); the first
    // slow write then runs inline too, but it turns inline execution off,
    // so an abort of the second slow write is seen while it runs.
    let slow = Arc::new(common::SlowDev {
        inner: MemDev::new(1 << 20),
        write_delay: Duration::from_millis(300),
    });
    let t = common::start_devs(
        vec![slow.clone() as SharedDev],
        TargetLimits::default(),
        ServerOptions::default(),
    );
    let mut ini = Initiator::login_ok(t.addr, ISID, 0, 0, &keys());
    for _ in 0..40 {
        assert_eq!(ini.scsi(&read10(0, 8), 4096, true, &[]).status, 0);
    }
    assert_eq!(
        ini.scsi(&write10(0, 8), 4096, false, &pattern(4096, 1))
            .status,
        0
    );
    let c = ini.command(&write10(8, 8), 4096, false, true, true);
    let (itt, sn) = (c.itt, c.cmd_sn);
    ini.send_raw(&Pdu {
        header: Bhs::ScsiCommand(c),
        data: pattern(4096, 2),
    });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        tmf(&mut ini, TmfFunction::AbortTask, 0, itt, sn),
        TmfResponse::FunctionComplete
    );
    assert!(
        ini.silent_for(Duration::from_millis(200)),
        "aborted task must not answer"
    );
    assert_eq!(ini.tur().status, 0);
    t.stop();
}

#[test]
fn logout_waits_for_running_commands() {
    let slow = Arc::new(common::SlowDev {
        inner: MemDev::new(1 << 20),
        write_delay: Duration::from_millis(300),
    });
    let t = common::start_devs(
        vec![slow as SharedDev],
        TargetLimits::default(),
        ServerOptions::default(),
    );
    let mut ini = Initiator::login_ok(t.addr, ISID, 0, 0, &keys());
    let data = pattern(4096, 2);
    let c = ini.command(&write10(0, 8), 4096, false, true, true);
    let itt = c.itt;
    ini.send_raw(&Pdu {
        header: Bhs::ScsiCommand(c),
        data,
    });
    let litt = ini.next_itt();
    ini.send_raw(&Pdu {
        header: Bhs::LogoutRequest(LogoutRequest {
            immediate: true,
            reason: LogoutReason::CloseSession,
            itt: litt,
            cid: 0,
            cmd_sn: ini.cmd_sn,
            exp_stat_sn: ini.exp_stat_sn,
        }),
        data: vec![],
    });
    // The write's response comes first, then the logout response.
    let first = ini.recv().unwrap();
    assert!(matches!(first.header, Bhs::ScsiResponse(ref r) if r.itt == itt && r.status == 0));
    let second = ini.recv().unwrap();
    assert!(
        matches!(second.header, Bhs::LogoutResponse(ref r) if r.itt == litt && r.response == LogoutResponseCode::Success)
    );
    assert!(ini.closed_within(Duration::from_secs(3)));
    let deadline = Instant::now() + Duration::from_secs(3);
    while t.handle.session_count() != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(t.handle.session_count(), 0);
    // Reasons we do not support.
    let mut ini = Initiator::login_ok(t.addr, ISID, 0, 0, &keys());
    assert_eq!(
        logout(&mut ini, LogoutReason::RemoveConnectionForRecovery, 0),
        LogoutResponseCode::RecoveryNotSupported
    );
    t.stop();
}

#[test]
fn shutdown_lets_in_flight_commands_answer() {
    let slow = Arc::new(common::SlowDev {
        inner: MemDev::new(1 << 20),
        write_delay: Duration::from_millis(400),
    });
    let t = common::start_devs(
        vec![slow.clone() as SharedDev],
        TargetLimits::default(),
        ServerOptions::default(),
    );
    let mut ini = Initiator::login_ok(t.addr, ISID, 0, 0, &keys());
    let data = pattern(4096, 4);
    let c = ini.command(&write10(0, 8), 4096, false, true, true);
    let itt = c.itt;
    ini.send_raw(&Pdu {
        header: Bhs::ScsiCommand(c),
        data: data.clone(),
    });
    std::thread::sleep(Duration::from_millis(100));
    let handle = t.handle.clone();
    let stopper = std::thread::spawn(move || t.stop());
    let d = ini.finish(itt, &data);
    assert_eq!(d.status, 0);
    assert!(ini.closed_within(Duration::from_secs(5)));
    stopper.join().unwrap();
    assert_eq!(handle.connection_count(), 0);
    assert_eq!(&slow.inner.snapshot()[..4096], &data[..]);
}

#[test]
fn header_and_data_digests() {
    let t = common::start(&[1 << 20]);
    let k = with_keys(
        keys(),
        &[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")],
    );
    let mut ini = Initiator::login_ok(t.addr, ISID, 0, 0, &k);
    assert!(ini.cfg.header_digest && ini.cfg.data_digest);
    let data = pattern(20000, 8);
    let mut padded = data.clone();
    padded.resize(20480, 0);
    assert_eq!(ini.scsi(&write10(0, 40), 20480, false, &padded).status, 0);
    let r = ini.scsi(&read10(0, 40), 20480, true, &[]);
    assert_eq!(r.data, padded);
    // A corrupted data digest: Reject (data digest error), then the
    // connection goes (ErrorRecoveryLevel 0).
    let c = ini.command(&write10(0, 1), 512, false, true, true);
    let mut bytes = Pdu {
        header: Bhs::ScsiCommand(c),
        data: vec![1; 512],
    }
    .encode(&ini.cfg);
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    ini.send_bytes(&bytes).unwrap();
    let p = ini.recv().unwrap();
    assert!(matches!(p.header, Bhs::Reject(ref r) if r.reason == RejectReason::DataDigestError));
    assert!(ini.closed_within(Duration::from_secs(3)));
    // A corrupted header digest just closes the connection.
    let mut ini = Initiator::login_ok(t.addr, ISID, 0, 0, &k);
    let c = ini.command(&[0; 6], 0, false, false, true);
    let mut bytes = Pdu {
        header: Bhs::ScsiCommand(c),
        data: vec![],
    }
    .encode(&ini.cfg);
    bytes[49] ^= 1;
    ini.send_bytes(&bytes).unwrap();
    assert!(ini.closed_within(Duration::from_secs(3)));
    t.stop();
}

#[test]
fn send_targets_in_discovery_and_normal_sessions() {
    let t = common::start(&[1 << 20]);
    let k = vec![
        (
            "InitiatorName".to_owned(),
            common::initiator::INITIATOR.to_owned(),
        ),
        ("SessionType".to_owned(), "Discovery".to_owned()),
    ];
    let mut d = Initiator::login_ok(t.addr, ISID, 0, 0, &k);
    let send_targets = |ini: &mut Initiator, value: &str| -> Vec<(String, String)> {
        let itt = ini.next_itt();
        ini.send_raw(&Pdu {
            header: Bhs::TextRequest(TextRequest {
                immediate: false,
                fin: true,
                cont: false,
                lun: Lun::default(),
                itt,
                ttt: RESERVED_TAG,
                cmd_sn: ini.cmd_sn,
                exp_stat_sn: ini.exp_stat_sn,
            }),
            data: encode_text(&[("SendTargets".to_owned(), value.to_owned())]),
        });
        ini.cmd_sn += 1;
        let p = ini.recv().unwrap();
        let Bhs::TextResponse(r) = p.header else {
            panic!("{:?}", p.header)
        };
        assert!(r.fin && !r.cont && r.itt == itt);
        parse_text(&p.data).unwrap()
    };
    let got = send_targets(&mut d, "All");
    assert_eq!(got[0], ("TargetName".to_owned(), common::IQN.to_owned()));
    assert_eq!(
        got[1],
        ("TargetAddress".to_owned(), format!("{},1", t.addr))
    );
    // SCSI commands are refused in a discovery session.
    let c = d.command(&[0; 6], 0, false, false, true);
    d.send_raw(&Pdu {
        header: Bhs::ScsiCommand(c),
        data: vec![],
    });
    let p = d.recv().unwrap();
    assert!(matches!(p.header, Bhs::Reject(ref r) if r.reason == RejectReason::ProtocolError));
    // In a normal session, SendTargets reports the session's target only.
    let mut n = Initiator::login_ok(t.addr, ISID, 0, 0, &keys());
    let got = send_targets(&mut n, "");
    assert_eq!(got[0].1, common::IQN);
    t.stop();
}

#[test]
fn hostile_pdus_are_rejected_without_harming_other_sessions() {
    let t = common::start(&[1 << 20]);
    let mut bystander = Initiator::login_ok(t.addr, [0x80, 0, 0, 0, 0, 9], 0, 0, &keys());
    let mut ini = Initiator::login_ok(t.addr, ISID, 0, 0, &keys());
    // Unknown opcode: Reject, connection stays.
    let mut bhs = [0u8; 48];
    bhs[0] = 0x1c;
    bhs[16..20].copy_from_slice(&5u32.to_be_bytes());
    ini.send_bytes(&bhs).unwrap();
    let p = ini.recv().unwrap();
    match p.header {
        Bhs::Reject(r) => {
            assert_eq!(r.reason, RejectReason::CommandNotSupported);
            assert_eq!(&p.data[..], &bhs[..]);
        }
        other => panic!("{other:?}"),
    }
    // SNACK at ErrorRecoveryLevel 0: Reject.
    ini.send_raw(&Pdu {
        header: Bhs::SnackRequest(SnackRequest {
            snack_type: 0,
            lun: Lun::default(),
            itt: 1,
            ttt_or_snack_tag: RESERVED_TAG,
            exp_stat_sn: ini.exp_stat_sn,
            beg_run: 0,
            run_length: 0,
        }),
        data: vec![],
    });
    let p = ini.recv().unwrap();
    assert!(matches!(p.header, Bhs::Reject(ref r) if r.reason == RejectReason::SnackReject));
    assert_eq!(ini.tur().status, 0);
    // A data segment beyond MaxRecvDataSegmentLength: Reject and close
    // without reading (or allocating) 16 MiB.
    let mut bhs = [0u8; 48];
    bhs[0] = 0x00;
    bhs[1] = 0x80;
    bhs[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    ini.send_bytes(&bhs).unwrap();
    let p = ini.recv().unwrap();
    assert!(matches!(p.header, Bhs::Reject(ref r) if r.reason == RejectReason::ProtocolError));
    assert!(ini.closed_within(Duration::from_secs(3)));
    // Garbage before login, and a login PDU that lies about its length.
    for junk in [vec![0xffu8; 300], {
        let mut b = vec![0u8; 48];
        b[0] = 0x43;
        b[5] = 0x10;
        b
    }] {
        let mut s = std::net::TcpStream::connect(t.addr).unwrap();
        use std::io::Write;
        let _ = s.write_all(&junk);
        drop(s);
    }
    // Random bytes in full feature phase.
    let mut ini = Initiator::login_ok(t.addr, [0x80, 0, 0, 0, 0, 3], 0, 0, &keys());
    let mut x = 0x1234_5678u32;
    let junk: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let _ = ini.send_bytes(&junk);
    drop(ini);
    // The bystander never noticed.
    assert_eq!(bystander.tur().status, 0);
    let data = pattern(8192, 1);
    assert_eq!(
        bystander.scsi(&write10(0, 16), 8192, false, &data).status,
        0
    );
    t.stop();
}

#[test]
fn immediate_commands_are_bounded() {
    let opts = ServerOptions {
        queue_depth: 4,
        ..ServerOptions::default()
    };
    let t = common::start_with(&[1 << 20], TargetLimits::default(), opts);
    let mut ini = Initiator::login_ok(
        t.addr,
        ISID,
        0,
        0,
        &with_keys(keys(), &[("ImmediateData", "No")]),
    );
    // Writes waiting for data stay in the task table.
    let mut itts = Vec::new();
    for _ in 0..9 {
        let mut c = ini.command(&write10(0, 1), 512, false, true, true);
        c.immediate = true;
        ini.cmd_sn = ini.cmd_sn.wrapping_sub(1);
        itts.push(c.itt);
        ini.send_raw(&Pdu {
            header: Bhs::ScsiCommand(c),
            data: vec![],
        });
    }
    let mut r2ts = 0;
    let mut rejects = 0;
    for _ in 0..9 {
        match ini.recv().unwrap().header {
            Bhs::R2t(_) => r2ts += 1,
            Bhs::Reject(r) => {
                assert_eq!(r.reason, RejectReason::ImmediateCommandReject);
                rejects += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((r2ts, rejects), (8, 1));
    t.stop();
}

#[test]
fn data_out_errors_fail_only_the_command() {
    let t = common::start(&[1 << 20]);
    let mut ini = Initiator::login_ok(
        t.addr,
        ISID,
        0,
        0,
        &with_keys(keys(), &[("ImmediateData", "No")]),
    );
    let c = ini.command(&write10(0, 2), 1024, false, true, true);
    let itt = c.itt;
    ini.send_raw(&Pdu {
        header: Bhs::ScsiCommand(c),
        data: vec![],
    });
    let p = ini.recv().unwrap();
    let Bhs::R2t(r) = p.header else { panic!() };
    // Wrong DataSN.
    ini.data_out(itt, r.ttt, 5, 0, true, &[0xaa; 1024]);
    let p = ini.recv().unwrap();
    match p.header {
        Bhs::ScsiResponse(resp) => {
            assert_eq!(resp.status, 2);
            let sense = lunmirror::iscsi::pdu::parse_sense_segment(&p.data).unwrap();
            assert_eq!((sense[2] & 0x0f, sense[12]), (0x0b, 0x4b));
        }
        other => panic!("{other:?}"),
    }
    assert!(t.devs[0].snapshot()[..1024].iter().all(|&b| b == 0));
    assert_eq!(ini.tur().status, 0);
    t.stop();
}

/// The core sees all the data-out the initiator sent, not just what the
/// CDB describes: COMPARE AND WRITE with NUMBER OF LOGICAL BLOCKS 0 (the
/// u8 wrap of 256) but 2 x 256 blocks of data is INVALID FIELD IN CDB
/// (libiscsi CompareAndWrite.Simple), while a matching one succeeds.
#[test]
fn compare_and_write_data_out_longer_than_its_cdb_is_refused() {
    let t = common::start(&[4 << 20]);
    let mut ini = Initiator::login_ok(t.addr, ISID, 0, 0, &keys());
    let caw = |blocks: u8| {
        let mut c = [0u8; 16];
        c[0] = 0x89;
        c[13] = blocks;
        c
    };
    let data = vec![0u8; 2 * 256 * 512];
    let r = ini.scsi(&caw(0), data.len() as u32, false, &data);
    assert_eq!(r.status, 2, "{r:?}");
    assert_eq!(
        (r.sense.get(2).map(|k| k & 0x0f), r.sense.get(12)),
        (Some(5), Some(&0x24)),
        "{r:?}"
    );
    let r = ini.scsi(&caw(1), 1024, false, &data[..1024]);
    assert_eq!(r.status, 0, "{r:?}");
    t.stop();
}

/// A session that logs out has released its I_T nexus when the Logout
/// Response arrives: its RESERVE(6) no longer blocks another initiator
/// port (libiscsi's suite logs out and logs in again at once; its
/// Sanitize.Reset failed on the leftover reservation).
#[test]
fn logout_releases_the_nexus_before_the_response() {
    const RESERVE6: [u8; 6] = [0x16, 0, 0, 0, 0, 0];
    let t = common::start(&[1 << 20]);
    let mut a = Initiator::login_ok(t.addr, ISID, 0, 0, &keys());
    let mut b = Initiator::login_ok(t.addr, [0x80, 0, 0, 0x12, 0x34, 2], 0, 0, &keys());
    a.tur(); // power-on unit attention
    b.tur();
    assert_eq!(a.scsi(&RESERVE6, 0, false, &[]).status, 0);
    assert_eq!(b.scsi(&RESERVE6, 0, false, &[]).status, 0x18);
    assert_eq!(
        logout(&mut a, LogoutReason::CloseSession, 0),
        LogoutResponseCode::Success
    );
    // At once, with `a`'s TCP connection still open.
    assert_eq!(b.scsi(&RESERVE6, 0, false, &[]).status, 0);
    drop(a);
    t.stop();
}

/// A full queue of pipelined commands: workers that finish while more jobs
/// are queued leave their responses for a later `writev` (coalescing).
/// Every command must still get exactly one status, in StatSN order, with
/// its own data.
#[test]
fn pipelined_commands_each_get_one_status_when_responses_are_coalesced() {
    let t = common::start(&[4 << 20]);
    let mut ini = Initiator::login_ok(t.addr, ISID, 0, 0, &keys());
    // Fast commands first, so the connection counts the device as fast
    // (coalescing, like inline execution, only happens then).
    for _ in 0..40 {
        assert_eq!(ini.scsi(&read10(0, 8), 4096, true, &[]).status, 0);
    }
    const N: u32 = 32;
    let mut stat_sns = Vec::new();
    let mut collect = |ini: &mut Initiator, want: &mut std::collections::HashMap<u32, u32>| {
        let mut data: std::collections::HashMap<u32, Vec<u8>> = Default::default();
        while !want.is_empty() {
            let p = ini.recv().expect("response");
            let (itt, stat_sn) = match p.header {
                Bhs::DataIn(d) => {
                    data.entry(d.itt).or_default().extend_from_slice(&p.data);
                    if !d.status_present {
                        continue;
                    }
                    assert_eq!(d.status, 0);
                    (d.itt, d.stat_sn)
                }
                Bhs::ScsiResponse(r) => {
                    assert_eq!((r.status, r.response), (0, 0));
                    (r.itt, r.stat_sn)
                }
                other => panic!("unexpected {other:?}"),
            };
            assert!(want.remove(&itt).is_some(), "one status per ITT {itt:#x}");
            stat_sns.push(stat_sn);
        }
        data
    };
    let mut want = std::collections::HashMap::new();
    for i in 0..N {
        let c = ini.command(&write10(64 + i * 8, 8), 4096, false, true, true);
        want.insert(c.itt, i);
        ini.send_raw(&Pdu {
            header: Bhs::ScsiCommand(c),
            data: pattern(4096, i as u8),
        });
    }
    collect(&mut ini, &mut want);
    let mut lba_of = std::collections::HashMap::new();
    for i in 0..N {
        let c = ini.command(&read10(64 + i * 8, 8), 4096, true, false, true);
        want.insert(c.itt, i);
        lba_of.insert(c.itt, i);
        ini.send_raw(&Pdu {
            header: Bhs::ScsiCommand(c),
            data: Vec::new(),
        });
    }
    let data = collect(&mut ini, &mut want);
    for (itt, i) in lba_of {
        assert_eq!(data[&itt], pattern(4096, i as u8), "data of ITT {itt:#x}");
    }
    assert!(
        stat_sns.windows(2).all(|w| w[1] == w[0].wrapping_add(1)),
        "StatSN in wire order: {stat_sns:?}"
    );
    assert_eq!(ini.tur().status, 0);
    t.stop();
}
