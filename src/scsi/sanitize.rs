//! SANITIZE (SBC-4 4.11, 5.30): OVERWRITE and BLOCK ERASE run as a
//! background operation of the logical unit.
//!
//! While the operation runs, every command but INQUIRY, REPORT LUNS and
//! REQUEST SENSE ends in NOT READY / SANITIZE IN PROGRESS with a progress
//! indication, from every I_T nexus. The operation survives task
//! management (ABORT TASK of the SANITIZE command itself, LOGICAL UNIT
//! RESET, target resets) and I_T nexus loss, as SBC-4 requires; with IMMED
//! = 0 the SANITIZE command returns when it ends. A failed operation leaves
//! the LU in sanitize failure mode: medium access fails with MEDIUM ERROR /
//! SANITIZE COMMAND FAILED until a sanitize succeeds, or until EXIT FAILURE
//! MODE when the failed one allowed it (AUSE).
//!
//! The state is not persisted: a daemon restart during a sanitize brings the
//! LU back without it (see docs/conformance.md).
//!
//! OVERWRITE is throttled to the LU's sanitize rate (bytes per second), so
//! that wiping a large volume does not starve the other volumes on the same
//! host storage.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::cdb::Reader;
use super::lu::LogicalUnit;
use super::sense::{Asc, ScsiError, Sense, SenseKey};
use super::ua::NexusKey;
use super::Nexus;
use crate::block::WriteFlags;

/// Service actions.
const SA_OVERWRITE: u8 = 0x01;
const SA_BLOCK_ERASE: u8 = 0x02;
const SA_EXIT_FAILURE_MODE: u8 = 0x1F;

/// Bytes written per call (and between progress updates and throttling).
const CHUNK: usize = 1 << 20;

/// The longest single throttling pause, so the thread notices nothing
/// special but progress stays smooth.
const MAX_PAUSE: Duration = Duration::from_millis(250);

/// What a sanitize does to the medium.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// `passes` writes of the whole medium with `block`; with `invert` the
    /// pattern is inverted between consecutive passes.
    Overwrite {
        block: Vec<u8>,
        passes: u8,
        invert: bool,
    },
    BlockErase,
    /// Not an operation: leave sanitize failure mode.
    ExitFailureMode,
}

/// One background operation.
#[derive(Debug)]
struct Op {
    /// Bytes to process over all passes, and processed so far.
    total: u64,
    done: AtomicU64,
    /// The nexus whose SANITIZE (IMMED = 0) waits for the end.
    waiter: Option<NexusKey>,
    /// The frontend is aborting the waiting command.
    cancelled: AtomicBool,
    /// Set when the operation has ended.
    outcome: Mutex<Option<Result<(), String>>>,
}

impl Op {
    /// Fraction done in 1/65536ths (SPC-4 progress indication).
    fn progress(&self) -> u16 {
        let done = u128::from(self.done.load(Ordering::Relaxed));
        let total = u128::from(self.total.max(1));
        (done * 65536 / total).min(0xFFFF) as u16
    }
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Idle,
    Running(Arc<Op>),
    /// The last operation failed; `ause` is that command's AUSE bit.
    Failed {
        ause: bool,
    },
}

/// The sanitize state of one logical unit.
#[derive(Debug, Default)]
pub(crate) struct Sanitizer {
    state: Mutex<State>,
    /// Mirrors `state != Idle`, so ordinary commands skip the mutex.
    busy: AtomicBool,
    changed: Condvar,
    /// OVERWRITE throughput limit in bytes per second; 0: none.
    rate: AtomicU64,
}

/// Commands a running sanitize lets through (SBC-4 4.11.2).
fn allowed_during_sanitize(opcode: u8) -> bool {
    matches!(opcode, 0x12 | 0x03 | 0xA0)
}

fn in_progress(progress: u16) -> ScsiError {
    ScsiError::Other(Sense {
        progress: Some(progress),
        ..Sense::new(SenseKey::NotReady, Asc::SANITIZE_IN_PROGRESS)
    })
}

fn failed() -> ScsiError {
    ScsiError::Other(Sense::new(
        SenseKey::MediumError,
        Asc::SANITIZE_COMMAND_FAILED,
    ))
}

impl Sanitizer {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// The gate every command passes: NOT READY while an operation runs
    /// (but for the few allowed commands), MEDIUM ERROR for medium access
    /// in failure mode (but for SANITIZE, which is the way out).
    pub fn check(&self, opcode: u8, media: bool) -> Result<(), ScsiError> {
        if !self.busy.load(Ordering::Relaxed) {
            return Ok(());
        }
        match &*self.lock() {
            State::Idle => Ok(()),
            State::Running(op) if !allowed_during_sanitize(opcode) => {
                Err(in_progress(op.progress()))
            }
            State::Failed { .. } if media && opcode != 0x48 => Err(failed()),
            _ => Ok(()),
        }
    }

    /// The sense REQUEST SENSE reports when no unit attention is pending.
    pub fn request_sense(&self) -> Option<Sense> {
        if !self.busy.load(Ordering::Relaxed) {
            return None;
        }
        match &*self.lock() {
            State::Running(op) => Some(Sense {
                progress: Some(op.progress()),
                ..Sense::new(SenseKey::NotReady, Asc::SANITIZE_IN_PROGRESS)
            }),
            _ => None,
        }
    }

    /// The frontend is aborting running commands of `nexus` (all nexuses
    /// if `None`) on this LU: a SANITIZE waiting for its operation returns
    /// at once (its response is discarded); the operation goes on.
    pub fn cancel_waits(&self, nexus: Option<&Nexus>) {
        if let State::Running(op) = &*self.lock() {
            let hit = match (&op.waiter, nexus) {
                (Some(_), None) => true,
                (Some(w), Some(n)) => *w == NexusKey::of(n),
                (None, _) => false,
            };
            if hit {
                op.cancelled.store(true, Ordering::Relaxed);
                self.changed.notify_all();
            }
        }
    }
}

/// Validate the CDB fields and parameter list of a SANITIZE.
fn parse(sa: u8, param_len: u16, data_out: &[u8], bs: usize) -> Result<Kind, ScsiError> {
    let no_params = |kind| {
        if param_len != 0 {
            return Err(ScsiError::cdb_byte(7));
        }
        Ok(kind)
    };
    match sa {
        SA_OVERWRITE => {}
        SA_BLOCK_ERASE => return no_params(Kind::BlockErase),
        SA_EXIT_FAILURE_MODE => return no_params(Kind::ExitFailureMode),
        // The dispatch table admits no other service action.
        _ => return Err(ScsiError::cdb(1, 4)),
    }
    let pl = usize::from(param_len);
    if pl < 5 || pl > bs + 4 {
        return Err(ScsiError::cdb_byte(7));
    }
    let params = data_out.get(..pl).ok_or(ScsiError::ParamListLength)?;
    let r = Reader::new(params);
    let short = |_| ScsiError::ParamListLength;
    let b0 = r.u8(0).map_err(short)?;
    let passes = b0 & 0x1F;
    if b0 & 0x60 != 0 {
        return Err(ScsiError::param(0, Some(6)));
    }
    if passes == 0 {
        return Err(ScsiError::param(0, Some(4)));
    }
    if r.u8(1).map_err(short)? != 0 {
        return Err(ScsiError::param(1, None));
    }
    let ipl = usize::from(r.u16(2).map_err(short)?);
    if ipl == 0 || ipl > pl - 4 || ipl > bs {
        return Err(ScsiError::param(2, None));
    }
    let pattern = r.bytes(4, ipl).map_err(short)?;
    let block = pattern.iter().copied().cycle().take(bs).collect();
    Ok(Kind::Overwrite {
        block,
        passes,
        invert: b0 & 0x80 != 0,
    })
}

/// The arguments of one SANITIZE command.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SanitizeArgs {
    pub sa: u8,
    pub immed: bool,
    pub ause: bool,
    pub param_len: u16,
}

/// SANITIZE: start the operation (or leave failure mode) and, without
/// IMMED, wait for its end.
pub(crate) fn sanitize(
    lu: &Arc<LogicalUnit>,
    nexus: &Nexus,
    a: SanitizeArgs,
    data_out: &[u8],
) -> Result<(), ScsiError> {
    let bs = lu.block_size() as usize;
    let kind = parse(a.sa, a.param_len, data_out, bs)?;
    let s = &lu.sanitizer;
    if kind == Kind::ExitFailureMode {
        let mut st = s.lock();
        return match *st {
            State::Running(ref op) => Err(in_progress(op.progress())),
            // Only an operation started with AUSE may be left unfinished.
            State::Failed { ause: false } => Err(ScsiError::cdb(1, 4)),
            State::Failed { ause: true } => {
                *st = State::Idle;
                s.busy.store(false, Ordering::Relaxed);
                Ok(())
            }
            State::Idle => Ok(()),
        };
    }
    lu.check_writable()?;
    let size = lu.blocks() << lu.shift;
    let passes = match &kind {
        Kind::Overwrite { passes, .. } => u64::from(*passes),
        Kind::BlockErase | Kind::ExitFailureMode => 1,
    };
    let op = Arc::new(Op {
        total: size.saturating_mul(passes),
        done: AtomicU64::new(0),
        waiter: (!a.immed).then(|| NexusKey::of(nexus)),
        cancelled: AtomicBool::new(false),
        outcome: Mutex::new(None),
    });
    {
        let mut st = s.lock();
        if let State::Running(ref other) = *st {
            return Err(in_progress(other.progress()));
        }
        *st = State::Running(op.clone());
        s.busy.store(true, Ordering::Relaxed);
    }
    let (lu2, op2, ause) = (lu.clone(), op.clone(), a.ause);
    let spawned = std::thread::Builder::new()
        .name(format!("sanitize {}", lu.config.volume))
        .spawn(move || run(&lu2, &op2, &kind, size, ause));
    if let Err(e) = spawned {
        tracing::error!(volume = %lu.config.volume, "cannot start sanitize: {e}");
        let mut st = s.lock();
        *st = State::Idle;
        s.busy.store(false, Ordering::Relaxed);
        return Err(ScsiError::Other(Sense::new(
            SenseKey::HardwareError,
            Asc::INTERNAL_TARGET_FAILURE,
        )));
    }
    if a.immed {
        return Ok(());
    }
    let mut st = s.lock();
    loop {
        let outcome = op.outcome.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match outcome {
            Some(Ok(())) => return Ok(()),
            Some(Err(_)) => return Err(failed()),
            None if op.cancelled.load(Ordering::Relaxed) => return Err(in_progress(op.progress())),
            None => {
                st = s.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

/// The background thread: do the work, then record the outcome.
fn run(lu: &LogicalUnit, op: &Op, kind: &Kind, size: u64, ause: bool) {
    let started = Instant::now();
    let result = {
        // In-flight commands that passed the gate before the operation
        // was published finish first; later ones are refused by the gate.
        let _g = lu.locks.exclusive(0, size);
        work(lu, op, kind, size)
    };
    let s = &lu.sanitizer;
    let mut st = s.lock();
    match &result {
        Ok(()) => {
            tracing::info!(volume = %lu.config.volume, elapsed = ?started.elapsed(), "sanitize done");
            *st = State::Idle;
            s.busy.store(false, Ordering::Relaxed);
        }
        Err(e) => {
            tracing::error!(volume = %lu.config.volume, "sanitize failed: {e}");
            *st = State::Failed { ause };
        }
    }
    *op.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
    drop(st);
    s.changed.notify_all();
}

fn work(lu: &LogicalUnit, op: &Op, kind: &Kind, size: u64) -> Result<(), String> {
    match kind {
        Kind::ExitFailureMode => {}
        Kind::BlockErase => {
            lu.dev.discard(0, size).map_err(|e| e.to_string())?;
            op.done.store(op.total, Ordering::Relaxed);
        }
        Kind::Overwrite {
            block,
            passes,
            invert,
        } => {
            let start = Instant::now();
            let per_chunk = (CHUNK / block.len().max(1)).max(1);
            let plain: Vec<u8> = block
                .iter()
                .copied()
                .cycle()
                .take(per_chunk * block.len())
                .collect();
            let inverted: Vec<u8> = plain.iter().map(|b| !b).collect();
            for pass in 0..*passes {
                let buf = if *invert && pass % 2 == 1 {
                    &inverted
                } else {
                    &plain
                };
                let mut off = 0u64;
                while off < size {
                    let n = (size - off).min(buf.len() as u64) as usize;
                    let chunk = buf.get(..n).ok_or("chunk out of range")?;
                    lu.dev
                        .write_at(chunk, off, WriteFlags { fua: false })
                        .map_err(|e| e.to_string())?;
                    off += n as u64;
                    let done = op.done.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                    throttle(start, done, lu.sanitizer.rate.load(Ordering::Relaxed));
                }
            }
            lu.dev.flush().map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Sleep while `done` bytes since `start` are ahead of `rate` bytes/s.
fn throttle(start: Instant, done: u64, rate: u64) {
    if rate == 0 {
        return;
    }
    let due = Duration::from_secs_f64(done as f64 / rate as f64);
    let mut elapsed = start.elapsed();
    while elapsed < due {
        std::thread::sleep((due - elapsed).min(MAX_PAUSE));
        elapsed = start.elapsed();
    }
}
