//! SANITIZE as a background operation: NOT READY / SANITIZE IN PROGRESS
//! with progress while it runs, the commands it lets through, IMMED,
//! aborting the waiting command, surviving resets, failure mode and
//! EXIT FAILURE MODE.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::tests::{cdb10, k3, nexus, sense_of, CapsDev};
use super::*;
use crate::block::mem::MemDev;
use crate::block::{BlockCaps, BlockDev, BlockError, BlockResult, WriteFlags};

/// 4 MiB: four 1 MiB overwrite chunks, so progress is visible.
const SIZE: u64 = 4 << 20;

/// A device whose writes fail while `fail` is set.
#[derive(Debug)]
struct FlakyDev {
    inner: MemDev,
    fail: AtomicBool,
}

impl BlockDev for FlakyDev {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> BlockResult<()> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(BlockError::Io(std::io::Error::other("injected")));
        }
        self.inner.write_at(buf, offset, flags)
    }
    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    fn caps(&self) -> BlockCaps {
        BlockCaps {
            discard: true,
            ..BlockCaps::default()
        }
    }
}

struct T {
    map: LunMap,
    a: Arc<Nexus>,
    b: Arc<Nexus>,
}

impl T {
    fn new(dev: Arc<dyn BlockDev>, rate: u64) -> T {
        let mut map = LunMap::new();
        let lu = LogicalUnit::new(super::tests::config(512), dev).with_sanitize_rate(rate);
        map.insert(0, Arc::new(lu));
        let t = T {
            map,
            a: nexus("iqn.init-a"),
            b: nexus("iqn.init-b"),
        };
        // Consume the power-on unit attentions.
        for n in [&t.a, &t.b] {
            t.run(n, &[0; 6], &[]);
        }
        t
    }

    /// A MemDev-backed LU whose overwrite takes about `secs` seconds.
    fn slow(secs: f64) -> T {
        let dev = Arc::new(CapsDev {
            inner: MemDev::new(SIZE),
            caps: BlockCaps {
                discard: true,
                ..BlockCaps::default()
            },
        });
        T::new(dev, (SIZE as f64 / secs) as u64)
    }

    fn run(&self, n: &Arc<Nexus>, cdb: &[u8], data_out: &[u8]) -> ScsiResponse {
        self.map.execute(&ScsiRequest {
            cdb,
            lun: 0,
            nexus: n,
            data_out,
            expected_in_len: 1 << 20,
            task_attr: TaskAttr::Simple,
            data_in_by_ref: false,
        })
    }

    fn tur(&self, n: &Arc<Nexus>) -> ScsiResponse {
        self.run(n, &[0; 6], &[])
    }

    /// TEST UNIT READY until it reports no unit attention.
    fn first_non_ua(&self, n: &Arc<Nexus>) -> ScsiResponse {
        for _ in 0..8 {
            let r = self.tur(n);
            if r.sense.get(2).map(|k| k & 0x0F) != Some(6) {
                return r;
            }
        }
        panic!("unit attentions without end");
    }

    /// Poll TEST UNIT READY until it is GOOD.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.tur(&self.a).status != ScsiStatus::Good {
            assert!(Instant::now() < deadline, "sanitize never ended");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn sanitize(sa: u8, b1: u8, len: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x48;
    c[1] = sa | b1;
    c[7..9].copy_from_slice(&len.to_be_bytes());
    c
}

const IMMED: u8 = 0x80;
const AUSE: u8 = 0x20;

fn pattern(b: u8) -> Vec<u8> {
    let mut p = vec![0x01, 0, 0x02, 0x00];
    p.extend_from_slice(&[b; 512]);
    p
}

fn progress(r: &ScsiResponse) -> u16 {
    let (key, asc, ascq, sks) = sense_of(r);
    assert_eq!([key, asc, ascq], [2, 0x04, 0x1B], "SANITIZE IN PROGRESS");
    assert_eq!(sks[0], 0x80, "SKSV");
    u16::from_be_bytes([sks[1], sks[2]])
}

#[test]
fn immed_runs_in_background_and_blocks_other_commands() {
    let t = T::slow(1.0);
    let r = t.run(&t.a, &sanitize(1, IMMED, 516), &pattern(0xA5));
    assert_eq!(r.status, ScsiStatus::Good, "IMMED returns at once");
    // Medium access, SANITIZE itself and START STOP UNIT, from any nexus.
    for (n, cdb) in [
        (&t.a, vec![0u8; 6]),
        (&t.b, cdb10(0x28, 0, 0, 1).to_vec()),
        (&t.a, cdb10(0x2A, 0, 0, 1).to_vec()),
        (&t.b, vec![0x1B, 0, 0, 0, 1, 0]),
        (&t.a, sanitize(2, 0, 0).to_vec()),
        (&t.b, vec![0x5A, 0, 0x3F, 0, 0, 0, 0, 0x10, 0, 0]),
    ] {
        let r = t.run(n, &cdb, &[0; 512]);
        progress(&r);
    }
    // INQUIRY, REPORT LUNS and REQUEST SENSE go through; REQUEST SENSE
    // reports the condition with its progress.
    assert_eq!(
        t.run(&t.b, &[0x12, 0, 0, 0, 36, 0], &[]).status,
        ScsiStatus::Good
    );
    let rl = [0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0];
    assert_eq!(t.run(&t.b, &rl, &[]).status, ScsiStatus::Good);
    let rs = t.run(&t.a, &[0x03, 0, 0, 0, 18, 0], &[]);
    assert_eq!(rs.status, ScsiStatus::Good);
    assert_eq!(
        (rs.data_in[2] & 0x0F, rs.data_in[12], rs.data_in[13]),
        (2, 0x04, 0x1B)
    );
    assert_eq!(rs.data_in[15], 0x80);
    // Progress grows while the operation runs.
    let p0 = progress(&t.tur(&t.a));
    std::thread::sleep(Duration::from_millis(400));
    let p1 = progress(&t.tur(&t.a));
    assert!(p1 > p0, "progress {p0} -> {p1}");
    t.wait_ready();
    let d = t.run(&t.a, &cdb10(0x28, 0, 8191, 1), &[]);
    assert_eq!(d.data_in, vec![0xA5; 512]);
}

#[test]
fn without_immed_the_command_waits_for_the_end() {
    let t = T::slow(0.5);
    let start = Instant::now();
    let r = t.run(&t.a, &sanitize(1, 0, 516), &pattern(0x3C));
    assert_eq!(r.status, ScsiStatus::Good);
    assert!(start.elapsed() >= Duration::from_millis(400));
    assert_eq!(t.tur(&t.b).status, ScsiStatus::Good);
    let d = t.run(&t.b, &cdb10(0x28, 0, 0, 1), &[]);
    assert_eq!(d.data_in, vec![0x3C; 512]);
}

#[test]
fn aborting_the_waiting_command_leaves_the_operation_running() {
    let t = Arc::new(T::slow(1.5));
    let t2 = t.clone();
    let waiter = std::thread::spawn(move || t2.run(&t2.a, &sanitize(1, 0, 516), &pattern(0x11)));
    std::thread::sleep(Duration::from_millis(300));
    // Another nexus aborting its commands does not release the waiter.
    t.map.cancel_waits(Some(0), Some(&t.b));
    std::thread::sleep(Duration::from_millis(100));
    assert!(!waiter.is_finished());
    // Its own nexus does: the response (to be discarded) says why.
    t.map.cancel_waits(Some(0), Some(&t.a));
    let r = waiter.join().unwrap();
    progress(&r);
    // Resets and nexus loss do not stop the operation.
    t.map
        .task_management(TaskMgmt::LogicalUnitReset { lun: 0 }, &t.a);
    t.map.task_management(TaskMgmt::TargetColdReset, &t.a);
    t.map.nexus_loss(&t.a);
    // Unit attentions from the resets come first, then the sanitize
    // condition, for old and new nexuses alike.
    for n in [&t.a, &t.b, &nexus("iqn.init-c")] {
        progress(&t.first_non_ua(n));
    }
    t.wait_ready();
    let d = t.run(&t.a, &cdb10(0x28, 0, 100, 1), &[]);
    assert_eq!(d.data_in, vec![0x11; 512]);
}

#[test]
fn block_erase_in_background_and_exit_failure_mode_when_idle() {
    let t = T::slow(1.0);
    t.run(&t.a, &cdb10(0x2A, 0, 0, 1), &[7; 512]);
    let r = t.run(&t.a, &sanitize(2, IMMED, 0), &[]);
    assert_eq!(r.status, ScsiStatus::Good);
    t.wait_ready();
    let d = t.run(&t.a, &cdb10(0x28, 0, 0, 1), &[]);
    assert_eq!(d.data_in, vec![0; 512]);
    // EXIT FAILURE MODE: no parameter list; nothing to leave is fine.
    assert_eq!(
        k3(sense_of(&t.run(&t.a, &sanitize(0x1F, 0, 8), &[0; 8]))),
        [5, 0x24, 0]
    );
    assert_eq!(
        t.run(&t.a, &sanitize(0x1F, 0, 0), &[]).status,
        ScsiStatus::Good
    );
}

#[test]
fn a_failed_sanitize_enters_failure_mode() {
    let dev = Arc::new(FlakyDev {
        inner: MemDev::new(SIZE),
        fail: AtomicBool::new(true),
    });
    let t = T::new(dev.clone(), 0);
    let failed = [3, 0x31, 0x03];
    // Without IMMED the command reports the failure.
    assert_eq!(
        k3(sense_of(&t.run(&t.a, &sanitize(1, 0, 516), &pattern(1)))),
        failed
    );
    // Medium access fails for everyone; INQUIRY does not.
    assert_eq!(
        k3(sense_of(&t.run(&t.b, &cdb10(0x28, 0, 0, 1), &[]))),
        failed
    );
    assert_eq!(k3(sense_of(&t.tur(&t.a))), failed);
    assert_eq!(
        t.run(&t.b, &[0x12, 0, 0, 0, 36, 0], &[]).status,
        ScsiStatus::Good
    );
    // Started without AUSE: EXIT FAILURE MODE is refused.
    assert_eq!(
        k3(sense_of(&t.run(&t.a, &sanitize(0x1F, 0, 0), &[]))),
        [5, 0x24, 0]
    );
    // Fail again, this time with AUSE: EXIT FAILURE MODE gets out.
    assert_eq!(
        k3(sense_of(&t.run(&t.a, &sanitize(1, AUSE, 516), &pattern(1)))),
        failed
    );
    assert_eq!(
        t.run(&t.a, &sanitize(0x1F, 0, 0), &[]).status,
        ScsiStatus::Good
    );
    assert_eq!(t.tur(&t.a).status, ScsiStatus::Good);
    // And a sanitize that succeeds clears failure mode too.
    t.run(&t.a, &sanitize(1, 0, 516), &pattern(1));
    dev.fail.store(false, Ordering::Relaxed);
    assert_eq!(
        t.run(&t.a, &sanitize(1, 0, 516), &pattern(9)).status,
        ScsiStatus::Good
    );
    assert_eq!(t.tur(&t.b).status, ScsiStatus::Good);
}

#[test]
fn overwrite_count_and_invert_take_every_pass() {
    // Three passes with INVERT: normal, inverted, normal.
    let t = T::slow(0.2);
    let mut p = pattern(0x0F);
    p[0] = 0x80 | 3;
    let start = Instant::now();
    assert_eq!(
        t.run(&t.a, &sanitize(1, 0, 516), &p).status,
        ScsiStatus::Good
    );
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "three throttled passes"
    );
    let d = t.run(&t.a, &cdb10(0x28, 0, 3, 1), &[]);
    assert_eq!(d.data_in, vec![0x0F; 512]);
    p[0] = 0x80 | 2;
    t.run(&t.a, &sanitize(1, 0, 516), &p);
    let d = t.run(&t.a, &cdb10(0x28, 0, 3, 1), &[]);
    assert_eq!(d.data_in, vec![0xF0; 512]);
}
