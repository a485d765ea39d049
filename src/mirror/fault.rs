//! A fault-injecting `BlockDev` wrapper (nbdkit's "error filter" idea): it
//! forwards to an inner device and can be told to fail reads, writes or
//! flushes, to report a full disk, to hold writes at a gate, or to count
//! operations. Used by the tests of the mirror layer and by integration
//! tests that need a failing replica; also used for a replica whose backing
//! file could not be opened after a restart (`FaultDev::unavailable`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::block::{BlockCaps, BlockDev, BlockError, BlockResult, SharedDev, WriteFlags};

/// See the module documentation.
pub struct FaultDev {
    inner: Option<SharedDev>,
    size: u64,
    fail_reads: AtomicBool,
    fail_writes: AtomicBool,
    fail_flush: AtomicBool,
    no_space: AtomicBool,
    gate_closed: Mutex<bool>,
    gate: Condvar,
    flush_gate_closed: Mutex<bool>,
    flush_gate: Condvar,
    write_delay_us: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    flushes_started: AtomicU64,
    fua_writes: AtomicU64,
}

impl std::fmt::Debug for FaultDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultDev")
            .field("size", &self.size)
            .finish()
    }
}

fn injected(what: &str) -> BlockError {
    BlockError::Io(std::io::Error::other(format!("injected {what} failure")))
}

impl FaultDev {
    /// Wrap `inner`; no faults enabled.
    pub fn new(inner: SharedDev) -> Self {
        let size = inner.size();
        FaultDev {
            inner: Some(inner),
            size,
            fail_reads: AtomicBool::new(false),
            fail_writes: AtomicBool::new(false),
            fail_flush: AtomicBool::new(false),
            no_space: AtomicBool::new(false),
            gate_closed: Mutex::new(false),
            gate: Condvar::new(),
            flush_gate_closed: Mutex::new(false),
            flush_gate: Condvar::new(),
            write_delay_us: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            flushes_started: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
        }
    }

    /// A device of `size` bytes on which every operation fails (a replica
    /// that could not be opened).
    pub fn unavailable(size: u64) -> Self {
        let mut d = FaultDev::new(std::sync::Arc::new(crate::block::mem::MemDev::new(0)));
        d.inner = None;
        d.size = size;
        d
    }

    pub fn fail_reads(&self, on: bool) {
        self.fail_reads.store(on, Ordering::SeqCst);
    }
    pub fn fail_writes(&self, on: bool) {
        self.fail_writes.store(on, Ordering::SeqCst);
    }
    pub fn fail_flush(&self, on: bool) {
        self.fail_flush.store(on, Ordering::SeqCst);
    }
    /// Writes fail with `NoSpace` (ENOSPC), as on a full filesystem.
    pub fn no_space(&self, on: bool) {
        self.no_space.store(on, Ordering::SeqCst);
    }
    /// Delay every write by `d`.
    pub fn write_delay(&self, d: Duration) {
        self.write_delay_us
            .store(d.as_micros() as u64, Ordering::SeqCst);
    }
    /// Closed: writes block until the gate opens again.
    pub fn set_gate(&self, closed: bool) {
        *self.gate_closed.lock().unwrap_or_else(|e| e.into_inner()) = closed;
        self.gate.notify_all();
    }
    /// Closed: flushes block until it opens again.
    pub fn set_flush_gate(&self, closed: bool) {
        *self
            .flush_gate_closed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = closed;
        self.flush_gate.notify_all();
    }
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }
    pub fn fua_writes(&self) -> u64 {
        self.fua_writes.load(Ordering::SeqCst)
    }
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }
    /// Flushes called, including those still held by the flush gate.
    pub fn flushes_started(&self) -> u64 {
        self.flushes_started.load(Ordering::SeqCst)
    }

    fn inner(&self) -> BlockResult<&SharedDev> {
        self.inner.as_ref().ok_or_else(|| {
            BlockError::Io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "replica unavailable",
            ))
        })
    }

    fn before_write(&self, fua: bool) -> BlockResult<()> {
        let mut closed = self.gate_closed.lock().unwrap_or_else(|e| e.into_inner());
        while *closed {
            closed = self.gate.wait(closed).unwrap_or_else(|e| e.into_inner());
        }
        drop(closed);
        let d = self.write_delay_us.load(Ordering::SeqCst);
        if d > 0 {
            std::thread::sleep(Duration::from_micros(d));
        }
        if self.no_space.load(Ordering::SeqCst) {
            return Err(BlockError::NoSpace);
        }
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(injected("write"));
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl BlockDev for FaultDev {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(injected("read"));
        }
        self.inner()?.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> BlockResult<()> {
        self.before_write(flags.fua)?;
        self.inner()?.write_at(buf, offset, flags)
    }

    fn flush(&self) -> BlockResult<()> {
        self.flushes_started.fetch_add(1, Ordering::SeqCst);
        let mut closed = self
            .flush_gate_closed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while *closed {
            closed = self
                .flush_gate
                .wait(closed)
                .unwrap_or_else(|e| e.into_inner());
        }
        drop(closed);
        if self.fail_flush.load(Ordering::SeqCst) {
            return Err(injected("flush"));
        }
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner()?.flush()
    }

    fn caps(&self) -> BlockCaps {
        self.inner.as_ref().map(|d| d.caps()).unwrap_or_default()
    }

    fn release_cache(&self) {
        if let Some(d) = &self.inner {
            d.release_cache();
        }
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.before_write(false)?;
        self.inner()?.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> BlockResult<()> {
        self.before_write(flags.fua)?;
        self.inner()?.write_zeroes(offset, len, flags)
    }
}
