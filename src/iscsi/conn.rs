//! One iSCSI connection: the only code here that touches a socket.
//!
//! A connection thread logs in (driving `login::LoginMachine`), attaches
//! to a session, then becomes the *reader*: it decodes PDUs, sequences
//! them by CmdSN, reassembles Data-Out straight into each task's buffer and
//! sends R2Ts. Commands whose data is complete go to a small pool of
//! *worker* threads that call `LunMap::execute` concurrently (QD32 needs
//! that). Everything outgoing goes through one queue per connection that
//! stamps StatSN/ExpCmdSN/MaxCmdSN in send order; whichever thread finds
//! the queue idle becomes the writer and drains it with vectored writes,
//! so small responses are batched and large Data-In go out without a copy.
//!
//! Large plain READs of file-backed LUNs go out without a copy in this
//! process: their Data-In PDUs carry a range of the backing file
//! ([`OutData::File`]) that the writer sends with `sendfile(2)` between the
//! PDU's header and its padding (see `Conn::write_batch`).
//!
//! Lock order: session state, then the output queue. Socket writes happen
//! with neither held.

use std::fs::File;
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender};
use nix::errno::Errno;
use nix::sys::socket::MsgFlags;

use super::digest::{self, Crc32c};
use super::discovery::{TextContext, TextExchange, TextPdu, TextStep};
use super::login::{self, LoginMachine, LoginOutcome, NegotiatedLogin, SessionType};
use super::pdu::{
    self, check_data_digest, check_header_digest, pad_len, Bhs, DataIn, DataOut, LogoutReason,
    LogoutRequest, LogoutResponse, LogoutResponseCode, Lun, NopIn, NopOut, Prefix, R2t, Reject,
    RejectReason, ScsiCommand, TaskAttribute, TaskMgmtRequest, TaskMgmtResponse, TextRequest,
    TextResponse, TmfFunction, TmfResponse, BHS_LEN, MAX_AHS_LEN, RESERVED_TAG,
};
use super::server::Shared;
use super::session::{
    self, fixed_sense, initiator_port_name, plan_data_in, target_port_name, truncate_write_cdb,
    Arrival, BudgetCharge, CmdWindow, DataOutLimits, DataOutState, LocalAnswer, Ordered, Request,
    Residual, ScsiJob, Session, SessionKind, SessionState, Task, TaskPhase,
};
use crate::scsi::cdb::data_out_len;
use crate::scsi::{Nexus, ScsiRequest, ScsiResponse, ScsiStatus, TaskAttr, TaskMgmt};

/// How an outgoing PDU uses the connection's StatSN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatSn {
    /// Carries status: stamp StatSN and advance it.
    Advance,
    /// Carries the current StatSN without consuming it (R2T, NOP-In ping).
    Current,
    /// No StatSN (Data-In without status); ExpCmdSN/MaxCmdSN only.
    None,
}

/// Data segment of an outgoing PDU.
#[derive(Debug)]
pub enum OutData {
    Empty,
    Owned(Vec<u8>),
    /// A range of a buffer shared by several Data-In PDUs.
    Shared(Arc<Vec<u8>>, usize, usize),
    /// `len` bytes of a backing file at `offset`, sent with `sendfile(2)`
    /// (bytes past the file's end are sent as zeroes). Never used with a
    /// data digest (that needs the bytes here).
    File {
        file: Arc<File>,
        offset: u64,
        len: usize,
    },
}

impl OutData {
    /// The bytes of an in-memory segment (empty for `File`).
    fn bytes(&self) -> &[u8] {
        match self {
            OutData::Empty | OutData::File { .. } => &[],
            OutData::Owned(v) => v,
            OutData::Shared(v, s, l) => v.get(*s..s.saturating_add(*l)).unwrap_or(&[]),
        }
    }

    /// Length of the data segment.
    fn len(&self) -> usize {
        match self {
            OutData::File { len, .. } => *len,
            other => other.bytes().len(),
        }
    }

    /// A `File` segment read into memory (zeroes past the file's end), for
    /// a connection that must digest it; other segments as they are.
    fn into_memory(self) -> io::Result<OutData> {
        let OutData::File { file, offset, len } = self else {
            return Ok(self);
        };
        let mut buf = vec![0u8; len];
        crate::block::file::read_file_at(&file, &mut buf, offset)?;
        Ok(OutData::Owned(buf))
    }
}

/// One outgoing PDU: an encoded BHS (StatSN/ExpCmdSN/MaxCmdSN are
/// stamped when queued) and its data.
#[derive(Debug)]
pub struct OutPdu {
    hdr: [u8; BHS_LEN],
    stat: StatSn,
    data: OutData,
}

impl OutPdu {
    pub fn new(h: &Bhs, stat: StatSn, data: OutData) -> Self {
        let len = data.len() as u32;
        OutPdu {
            hdr: h.encode(len),
            stat,
            data,
        }
    }
}

#[derive(Debug)]
struct OutQueue {
    pending: Vec<OutPdu>,
    /// When the oldest PDU in `pending` was queued (bounds coalescing).
    pending_since: Option<Instant>,
    writing: bool,
    stat_sn: u32,
    dead: bool,
    /// Threads in `flush_and_wait` (rarely any): the writer wakes them only
    /// then, not with a `futex` system call after every flush.
    idle_waiters: u32,
}

/// Largest command (data in or out) the reader runs itself (see
/// `FfpReader::run_actions`).
const INLINE_MAX: u32 = 128 * 1024;
/// A command that executes longer than this is slow: the reader stops
/// running commands itself until `INLINE_AFTER_FAST` fast ones in a row
/// (on workers or inline) show the device is quick again.
const INLINE_SLOW: Duration = Duration::from_millis(1);
const INLINE_AFTER_FAST: u32 = 16;
/// Most PDUs a worker leaves queued for the next one to write (see
/// `Conn::defer_flush`).
const COALESCE_MAX: usize = 64;
/// Longest a queued response waits for a later one to share its `writev`.
const COALESCE_AGE: Duration = Duration::from_micros(100);

/// Per-connection values fixed at login.
#[derive(Debug, Clone, Copy)]
pub struct ConnParams {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Our MaxRecvDataSegmentLength.
    pub max_recv: u32,
    /// The initiator's MaxRecvDataSegmentLength: our largest data segment.
    pub max_xmit: u32,
}

#[derive(Debug)]
struct Pool {
    tx: Mutex<Option<Sender<Box<ScsiJob>>>>,
    rx: Receiver<Box<ScsiJob>>,
    idle: AtomicUsize,
    queued: AtomicUsize,
    total: AtomicUsize,
    max: usize,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

/// A logged-in connection, shared by its reader, its workers and any
/// thread that answers on it (TMF, logout).
pub struct Conn {
    /// Unique among all connections of this server.
    pub id: u64,
    pub cid: u16,
    pub peer: SocketAddr,
    stream: TcpStream,
    out: Mutex<OutQueue>,
    out_idle: Condvar,
    pub session: Arc<Session>,
    pub params: ConnParams,
    pub limits: DataOutLimits,
    pool: Pool,
    shared: Arc<Shared>,
    /// Ended by logout (or reinstatement): not a session failure.
    logged_out: AtomicBool,
    closed: AtomicBool,
    /// The text exchange in progress and the TTT we gave it.
    text: Mutex<(TextExchange, u32)>,
    /// Local address (reported by SendTargets for wildcard portals).
    pub local: SocketAddr,
    /// The initiator's MaxRecvDataSegmentLength (a Text Request may
    /// declare a new one).
    max_xmit: AtomicU32,
    /// SCSI commands in a row that executed in under `INLINE_SLOW`; the
    /// reader runs commands itself only after `INLINE_AFTER_FAST` of them.
    fast_streak: AtomicU32,
    /// Data-In bytes sent from backing files with `sendfile`.
    sent_by_ref: AtomicU64,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("id", &self.id)
            .field("cid", &self.cid)
            .field("peer", &self.peer)
            .field("tsih", &self.session.tsih)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Conn {
    /// Largest data segment we may send.
    pub fn max_xmit(&self) -> u32 {
        self.max_xmit.load(Ordering::Acquire)
    }

    fn lock_out(&self) -> MutexGuard<'_, OutQueue> {
        lock(&self.out)
    }

    /// Queue PDUs, stamping sequence numbers in queue order.
    pub fn push_all(&self, pdus: impl IntoIterator<Item = OutPdu>) {
        let mut q = self.lock_out();
        if q.dead {
            return;
        }
        // Read inside the queue lock: values only grow, so stamps grow in
        // queue (= wire) order.
        let (exp, max) = self.session.exp_max();
        if q.pending_since.is_none() {
            q.pending_since = Some(Instant::now());
        }
        for mut p in pdus {
            match p.stat {
                StatSn::Advance => {
                    p.hdr[24..28].copy_from_slice(&q.stat_sn.to_be_bytes());
                    q.stat_sn = q.stat_sn.wrapping_add(1);
                }
                StatSn::Current => p.hdr[24..28].copy_from_slice(&q.stat_sn.to_be_bytes()),
                StatSn::None => {}
            }
            p.hdr[28..32].copy_from_slice(&exp.to_be_bytes());
            p.hdr[32..36].copy_from_slice(&max.to_be_bytes());
            q.pending.push(p);
        }
    }

    pub fn push(&self, pdu: OutPdu) {
        self.push_all(std::iter::once(pdu));
    }

    /// Write queued PDUs unless another thread is already writing (it will
    /// pick ours up before it stops).
    pub fn flush(&self) {
        let mut q = self.lock_out();
        if q.writing || q.pending.is_empty() {
            return;
        }
        q.writing = true;
        let mut batch = Vec::new();
        loop {
            std::mem::swap(&mut batch, &mut q.pending);
            q.pending_since = None;
            drop(q);
            let res = if self.params.data_digest {
                // `run_job` never sends by reference on such a connection;
                // should a `File` segment get here, digest its bytes.
                materialize(&mut batch).and_then(|()| self.write_batch(&batch))
            } else {
                self.write_batch(&batch)
            };
            recycle(&mut batch);
            q = self.lock_out();
            if let Err(e) = res {
                tracing::debug!(conn = self.id, "write failed: {e}");
                q.dead = true;
                q.pending.clear();
                q.pending_since = None;
                let _ = self.stream.shutdown(Shutdown::Both);
            }
            if q.pending.is_empty() {
                q.writing = false;
                if q.idle_waiters > 0 {
                    self.out_idle.notify_all();
                }
                return;
            }
        }
    }

    /// Queue and write.
    pub fn send(&self, pdu: OutPdu) {
        self.push(pdu);
        self.flush();
    }

    /// Flush and wait until everything queued is on the wire (or the
    /// connection died).
    pub fn flush_and_wait(&self) {
        self.flush();
        let mut q = self.lock_out();
        let deadline = Instant::now() + self.shared.opts.task_wait_timeout;
        while (q.writing || !q.pending.is_empty()) && !q.dead {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            q.idle_waiters += 1;
            q = match self.out_idle.wait_timeout(q, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
            q.idle_waiters -= 1;
        }
    }

    /// Write a batch of PDUs in order: runs of in-memory PDUs with one
    /// `writev` each, file data with `sendfile`.
    ///
    /// A PDU whose data is a [`OutData::File`] range goes out as: everything
    /// gathered before it plus its BHS (and header digest) in one `sendmsg`
    /// with `MSG_MORE`, so the kernel holds the header back for the data
    /// instead of pushing a 48-byte segment; then the range with
    /// `sendfile(2)` (its last chunk clears MORE and pushes); then the
    /// padding, which starts the next gathered run. `sendfile` rather than
    /// `splice` through a pipe: one system call per segment instead of two
    /// plus a pipe per writer, and the same page references end up in the
    /// socket either way. The price is that a read error of the file comes
    /// after the header is on the wire, where it can no longer become a
    /// CHECK CONDITION: the connection is closed (the initiator recovers by
    /// retrying on a new one). Errors are rare there: the range was checked
    /// and the file is open; what is left is a failing disk under a page
    /// that is not cached.
    fn write_batch(&self, batch: &[OutPdu]) -> io::Result<()> {
        let hd = self.params.header_digest;
        let dd = self.params.data_digest;
        const ZEROS: [u8; 4] = [0; 4];
        let digests: Vec<([u8; 4], [u8; 4])> = batch
            .iter()
            .map(|p| {
                let h = if hd {
                    digest::to_wire(digest::crc32c(&p.hdr))
                } else {
                    [0; 4]
                };
                let data = p.data.bytes();
                let d = if dd && !data.is_empty() {
                    let mut c = Crc32c::new();
                    c.update(data);
                    c.update(&ZEROS[..pad_len(data.len())]);
                    digest::to_wire(c.value())
                } else {
                    [0; 4]
                };
                (h, d)
            })
            .collect();
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 5);
        for (p, (h, d)) in batch.iter().zip(&digests) {
            slices.push(IoSlice::new(&p.hdr));
            if hd {
                slices.push(IoSlice::new(h));
            }
            if let OutData::File { file, offset, len } = &p.data {
                write_all_vectored(&self.stream, &slices, true)?;
                slices.clear();
                // Counted before the send (and taken back if it fails):
                // once the bytes are out the initiator may act on them
                // before this thread runs again, and tests read the counts.
                self.sent_by_ref.fetch_add(*len as u64, Ordering::Relaxed);
                self.shared
                    .sent_by_ref
                    .fetch_add(*len as u64, Ordering::Relaxed);
                if let Err(e) = send_file(&self.stream, file, *offset, *len) {
                    self.sent_by_ref.fetch_sub(*len as u64, Ordering::Relaxed);
                    self.shared
                        .sent_by_ref
                        .fetch_sub(*len as u64, Ordering::Relaxed);
                    if socket_side(&e) {
                        tracing::debug!(conn = self.id, "sendfile to the peer failed: {e}");
                    } else {
                        tracing::error!(
                            conn = self.id,
                            offset,
                            len,
                            "sending Data-In from the backing file failed after its header \
                             was sent: {e}; closing the connection (the initiator retries)"
                        );
                    }
                    return Err(e);
                }
                let pad = pad_len(*len);
                if pad > 0 {
                    slices.push(IoSlice::new(&ZEROS[..pad]));
                }
                continue;
            }
            let data = p.data.bytes();
            if !data.is_empty() {
                slices.push(IoSlice::new(data));
                let pad = pad_len(data.len());
                if pad > 0 {
                    slices.push(IoSlice::new(&ZEROS[..pad]));
                }
                if dd {
                    slices.push(IoSlice::new(d));
                }
            }
        }
        write_all_vectored(&self.stream, &slices, false)
    }

    /// Close the socket; the reader sees EOF and tears the connection down.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Close as the result of a logout or reinstatement (not a failure).
    pub fn close_gracefully(&self) {
        self.logged_out.store(true, Ordering::Release);
        self.close();
    }

    fn stamp_reject(&self, bhs: &[u8; BHS_LEN], reason: RejectReason) -> OutPdu {
        OutPdu::new(
            &Bhs::Reject(Reject {
                reason,
                stat_sn: 0,
                exp_cmd_sn: 0,
                max_cmd_sn: 0,
                data_sn_or_r2t_sn: 0,
            }),
            StatSn::Advance,
            OutData::Owned(bhs.to_vec()),
        )
    }

    /// Send a Reject carrying the offending header.
    pub fn reject(&self, bhs: &[u8; BHS_LEN], reason: RejectReason) {
        self.send(self.stamp_reject(bhs, reason));
    }

    // ---- worker pool ----

    fn submit(self: &Arc<Self>, job: Box<ScsiJob>) {
        let itt = job.itt;
        let sent = match lock(&self.pool.tx).as_ref() {
            Some(tx) => {
                self.pool.queued.fetch_add(1, Ordering::AcqRel);
                tx.send(job).is_ok()
            }
            None => false,
        };
        if !sent {
            // The connection is going away: the task will never run.
            let mut acts = Actions::default();
            let mut st = self.session.lock();
            st.remove_task(itt);
            release_blocked(&mut st, &mut acts);
            self.session.publish(&st.window);
            drop(st);
            self.session.notify_changed();
            acts.run();
            return;
        }
        let queued = self.pool.queued.load(Ordering::Acquire);
        if queued > self.pool.idle.load(Ordering::Acquire)
            && self.pool.total.load(Ordering::Acquire) < self.pool.max
        {
            self.spawn_worker();
        }
    }

    /// Whether a worker that just queued its response may leave the
    /// writing to whoever finishes the next queued job. At queue depth 32
    /// most responses would otherwise leave one `writev` each: a TCP
    /// segment the loopback receiver processes and wakes the initiator
    /// for. Coalescing them cuts both. Only while the device is fast (the
    /// queued job will finish soon, see `INLINE_SLOW`), up to
    /// `COALESCE_MAX` PDUs and for at most `COALESCE_AGE`; the worker
    /// that takes the last queued job always flushes.
    fn defer_flush(&self) -> bool {
        if self.pool.queued.load(Ordering::Acquire) == 0
            || self.fast_streak.load(Ordering::Relaxed) < INLINE_AFTER_FAST
        {
            return false;
        }
        let q = self.lock_out();
        q.pending.len() < COALESCE_MAX
            && q.pending_since.is_some_and(|t| t.elapsed() < COALESCE_AGE)
    }

    /// No job queued and every worker waiting for one.
    fn pool_idle(&self) -> bool {
        self.pool.queued.load(Ordering::Acquire) == 0
            && self.pool.idle.load(Ordering::Acquire) == self.pool.total.load(Ordering::Acquire)
    }

    fn spawn_worker(self: &Arc<Self>) {
        let n = self.pool.total.fetch_add(1, Ordering::AcqRel);
        if n >= self.pool.max {
            self.pool.total.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let conn = self.clone();
        let rx = self.pool.rx.clone();
        let t = std::thread::Builder::new()
            .name(format!("iscsi-worker {}", self.id))
            .spawn(move || loop {
                conn.pool.idle.fetch_add(1, Ordering::AcqRel);
                let job = rx.recv();
                conn.pool.idle.fetch_sub(1, Ordering::AcqRel);
                match job {
                    Ok(j) => {
                        conn.pool.queued.fetch_sub(1, Ordering::AcqRel);
                        run_job(&conn, *j);
                    }
                    Err(_) => break,
                }
            });
        match t {
            Ok(h) => lock(&self.pool.handles).push(h),
            Err(e) => {
                self.pool.total.fetch_sub(1, Ordering::AcqRel);
                tracing::error!("cannot spawn worker: {e}");
            }
        }
    }

    /// Stop accepting jobs and wait for the workers to finish theirs.
    fn stop_workers(&self) {
        lock(&self.pool.tx).take();
        let handles = std::mem::take(&mut *lock(&self.pool.handles));
        for h in handles {
            let _ = h.join();
        }
    }
}

/// Empty a written batch, returning large data buffers to the pool (a
/// shared Data-In buffer goes back with the last PDU that used it).
fn recycle(batch: &mut Vec<OutPdu>) {
    let pool = crate::block::bufpool::global();
    for p in batch.drain(..) {
        match p.data {
            OutData::Owned(v) => pool.give(v),
            OutData::Shared(a, _, _) => {
                if let Ok(v) = Arc::try_unwrap(a) {
                    pool.give(v);
                }
            }
            OutData::Empty | OutData::File { .. } => {}
        }
    }
}

/// Read every `File` segment of a batch into memory.
fn materialize(batch: &mut [OutPdu]) -> io::Result<()> {
    for p in batch.iter_mut() {
        if matches!(p.data, OutData::File { .. }) {
            p.data = std::mem::replace(&mut p.data, OutData::Empty).into_memory()?;
        }
    }
    Ok(())
}

/// Zeroes sent in place of file bytes past the end of a short file.
static ZERO_FILL: [u8; 64 * 1024] = [0; 64 * 1024];

/// Send `len` bytes of `file` at `offset` to the socket with `sendfile(2)`;
/// the file ending early (a backing file shorter than the LUN, or one
/// truncated meanwhile) is made up with zeroes, so exactly `len` bytes go
/// out, as the Data-In header announced.
fn send_file(stream: &TcpStream, file: &File, offset: u64, len: usize) -> io::Result<()> {
    let mut off = libc::off64_t::try_from(offset)
        .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    let mut left = len;
    while left > 0 {
        match nix::sys::sendfile::sendfile64(stream, file, Some(&mut off), left) {
            Ok(0) => break,
            // `off` was advanced by the kernel.
            Ok(n) => left = left.saturating_sub(n),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    while left > 0 {
        let n = left.min(ZERO_FILL.len());
        let chunk = ZERO_FILL.get(..n).unwrap_or_default();
        write_all_vectored(stream, &[IoSlice::new(chunk)], false)?;
        left -= n;
    }
    Ok(())
}

/// Whether a failed `sendfile` failed on the socket's side (the peer went
/// away or stopped reading) rather than reading the file.
fn socket_side(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EPIPE
                | libc::ECONNRESET
                | libc::ENOTCONN
                | libc::ESHUTDOWN
                | libc::ETIMEDOUT
                | libc::EAGAIN
        )
    )
}

/// `write_all` over many slices, resuming after partial writes. With
/// `more`, the data is sent with `MSG_MORE`: more follows at once, so the
/// kernel need not push a partial segment.
fn write_all_vectored(mut w: &TcpStream, slices: &[IoSlice<'_>], more: bool) -> io::Result<()> {
    const MAX_IOV: usize = 512;
    let more_flags = MsgFlags::from_bits_retain(libc::MSG_MORE) | MsgFlags::MSG_NOSIGNAL;
    let mut idx = 0;
    let mut off = 0;
    let mut window: Vec<IoSlice<'_>> = Vec::with_capacity(MAX_IOV.min(slices.len()));
    while idx < slices.len() {
        window.clear();
        for (i, s) in slices.iter().enumerate().skip(idx).take(MAX_IOV) {
            let b: &[u8] = s;
            window.push(IoSlice::new(if i == idx {
                b.get(off..).unwrap_or(&[])
            } else {
                b
            }));
        }
        let res = if more {
            nix::sys::socket::sendmsg::<()>(w.as_raw_fd(), &window, &[], more_flags, None)
                .map_err(io::Error::from)
        } else {
            w.write_vectored(&window)
        };
        let mut n = match res {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while n > 0 && idx < slices.len() {
            let left = slices.get(idx).map_or(0, |s| s.len()) - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
        while idx < slices.len() && slices.get(idx).is_some_and(|s| s.is_empty()) {
            idx += 1;
        }
    }
    w.flush()
}

// ---------------------------------------------------------------------
// Connection thread: login, then full feature phase.

/// Why a connection's reader stopped.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("peer closed the connection")]
    Eof,
    #[error("I/O error: {0}")]
    Io(io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Peer did not answer our NOP-In ping.
    #[error("no answer to NOP-In ping")]
    Dead,
    #[error("server shutdown")]
    Shutdown,
    #[error("closed by the target")]
    Closed,
}

/// Serve one accepted TCP connection until it ends.
pub(crate) fn serve(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(shared.opts.task_wait_timeout));
    let conn = match login_phase(&shared, &stream, peer) {
        Ok(Some(c)) => c,
        Ok(None) => {
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
        Err(e) => {
            tracing::debug!(%peer, "login ended: {e}");
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    };
    tracing::debug!(%peer, tsih = conn.session.tsih, cid = conn.cid, "full feature phase");
    let end = match stream.try_clone() {
        Ok(s) => {
            let _ = s.set_read_timeout(Some(shared.opts.tick));
            FfpReader::new(conn.clone(), s).run()
        }
        Err(e) => End::Io(e),
    };
    tracing::debug!(
        %peer,
        tsih = conn.session.tsih,
        cid = conn.cid,
        sent_by_ref = conn.sent_by_ref.load(Ordering::Relaxed),
        "connection ends: {end}"
    );
    teardown(&conn, &end);
}

/// Read exactly `buf.len()` bytes, treating read timeouts as ticks that
/// check `deadline` and the shutdown flag.
fn read_login(
    r: &mut impl Read,
    buf: &mut [u8],
    deadline: Instant,
    shared: &Shared,
) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        if Instant::now() >= deadline || shared.is_shutting_down() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        match r.read(buf.get_mut(filled..).unwrap_or(&mut [])) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_login_response(
    mut w: &TcpStream,
    resp: &login::LoginResponse,
    stat_sn: u32,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
) -> io::Result<()> {
    let pdu = pdu::Pdu {
        header: Bhs::LoginResponse(pdu::LoginResponse {
            transit: resp.transit,
            cont: resp.cont,
            csg: resp.csg,
            nsg: resp.nsg,
            version_max: resp.version_max,
            version_active: resp.version_active,
            isid: resp.isid,
            tsih: resp.tsih,
            itt: resp.itt,
            stat_sn,
            exp_cmd_sn,
            max_cmd_sn,
            status_class: resp.status_class,
            status_detail: resp.status_detail,
        }),
        data: resp.data.clone(),
    };
    w.write_all(&pdu.encode(&pdu::FrameConfig::default()))
}

/// Run the login phase. `Ok(Some)` = logged in and attached to a session.
fn login_phase(
    shared: &Arc<Shared>,
    stream: &TcpStream,
    peer: SocketAddr,
) -> io::Result<Option<Arc<Conn>>> {
    stream.set_read_timeout(Some(shared.opts.tick))?;
    let deadline = Instant::now() + shared.opts.login_timeout;
    let mut rd = stream;
    let mut machine = LoginMachine::new(shared.login.clone());
    let mut stat_sn: Option<u32> = None;
    loop {
        let mut bhs = [0u8; BHS_LEN];
        read_login(&mut rd, &mut bhs, deadline, shared)?;
        let pre = Prefix::parse(&bhs);
        if pre.data_len as usize > login::LOGIN_MAX_DATA_SEGMENT || pre.ahs_len > 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "oversized login PDU",
            ));
        }
        let Ok(Bhs::LoginRequest(req)) = Bhs::decode(&bhs, &[]) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("opcode {:#x} during login", pre.opcode),
            ));
        };
        let dl = pre.data_len as usize;
        let mut data = vec![0u8; dl + pad_len(dl)];
        read_login(&mut rd, &mut data, deadline, shared)?;
        data.truncate(dl);
        let sn = *stat_sn.get_or_insert(req.exp_stat_sn);
        let lreq = login::LoginRequest {
            transit: req.transit,
            cont: req.cont,
            csg: req.csg,
            nsg: req.nsg,
            version_max: req.version_max,
            version_min: req.version_min,
            isid: req.isid,
            tsih: req.tsih,
            itt: req.itt,
            cid: req.cid,
            cmd_sn: req.cmd_sn,
            exp_stat_sn: req.exp_stat_sn,
            data: &data,
        };
        match machine.step(&lreq) {
            LoginOutcome::Continue(resp) => {
                write_login_response(stream, &resp, sn, req.cmd_sn, req.cmd_sn)?;
                stat_sn = Some(sn.wrapping_add(1));
            }
            LoginOutcome::Failed(resp) => {
                tracing::info!(%peer, class = resp.status_class, detail = resp.status_detail,
                    error = ?machine.error(), "login failed");
                write_login_response(stream, &resp, sn, req.cmd_sn, req.cmd_sn)?;
                return Ok(None);
            }
            LoginOutcome::Complete(mut resp, neg) => {
                return match attach(shared, stream, peer, &neg, req.cmd_sn, sn.wrapping_add(1)) {
                    Ok(conn) => {
                        resp.tsih = conn.session.tsih;
                        let (exp, max) = conn.session.exp_max();
                        write_login_response(stream, &resp, sn, exp, max)?;
                        // Workers may exist only once the login response is out.
                        Ok(Some(conn))
                    }
                    Err(status) => {
                        tracing::info!(%peer, ?status, "login refused at completion");
                        let resp = resp.with_status(status);
                        write_login_response(stream, &resp, sn, req.cmd_sn, req.cmd_sn)?;
                        Ok(None)
                    }
                };
            }
        }
    }
}

/// Create or join the session a completed login asks for and register
/// the new connection in it.
fn attach(
    shared: &Arc<Shared>,
    stream: &TcpStream,
    peer: SocketAddr,
    neg: &NegotiatedLogin,
    login_cmd_sn: u32,
    next_stat_sn: u32,
) -> Result<Arc<Conn>, login::LoginStatus> {
    let stream = stream
        .try_clone()
        .map_err(|_| login::LoginStatus::OutOfResources)?;
    let local = stream
        .local_addr()
        .map_err(|_| login::LoginStatus::TargetError)?;
    let same_target = |s: &Session| match (&s.kind, &neg.target) {
        (SessionKind::Normal { target, .. }, Some(t)) => target.name == t.name,
        (SessionKind::Discovery, None) => true,
        _ => false,
    };
    let mut to_close: Vec<Arc<Session>> = Vec::new();
    let mut replaced_conn: Option<Arc<Conn>> = None;
    let mut reg = shared.registry();
    let session = if neg.tsih == 0 {
        // Session reinstatement: same initiator, ISID and target.
        for s in reg.all() {
            if s.initiator_name == neg.initiator_name && s.isid == neg.isid && same_target(&s) {
                reg.remove(&s);
                to_close.push(s);
            }
        }
        let tsih = reg.alloc_tsih().ok_or(login::LoginStatus::OutOfResources)?;
        let kind = match (&neg.session_type, &neg.target) {
            (SessionType::Normal, Some(t)) => SessionKind::Normal {
                target: t.clone(),
                nexus: Arc::new(Nexus {
                    initiator_port: initiator_port_name(&neg.initiator_name, &neg.isid),
                    target_port: target_port_name(&t.name, shared.login.target_portal_group_tag),
                    relative_port_id: 1,
                    port_group_id: 1,
                }),
            },
            (SessionType::Discovery, _) => SessionKind::Discovery,
            (SessionType::Normal, None) => return Err(login::LoginStatus::MissingParameter),
        };
        let s = Arc::new(Session::new(
            tsih,
            neg.isid,
            neg.initiator_name.clone(),
            kind,
            neg.params.clone(),
            CmdWindow::new(login_cmd_sn, shared.opts.queue_depth),
        ));
        reg.insert(s.clone());
        s
    } else {
        let s = reg
            .get(neg.tsih)
            .filter(|s| {
                s.initiator_name == neg.initiator_name && s.isid == neg.isid && same_target(s)
            })
            .cloned()
            .ok_or(login::LoginStatus::SessionDoesNotExist)?;
        s
    };
    drop(reg);
    for s in to_close {
        tracing::info!(tsih = s.tsih, "session reinstated: closing the old one");
        close_session(&s);
        nexus_loss(&s);
    }

    let params = ConnParams {
        header_digest: neg.params.header_digest,
        data_digest: neg.params.data_digest,
        max_recv: neg.params.max_recv_data_segment_length_target,
        max_xmit: neg.params.max_recv_data_segment_length_initiator,
    };
    let limits = DataOutLimits {
        max_recv_data_segment_length: params.max_recv,
        ..session.limits
    };
    let (tx, rx) = channel::unbounded();
    let conn = Arc::new(Conn {
        id: shared.next_conn_id.fetch_add(1, Ordering::AcqRel),
        cid: neg.cid,
        peer,
        stream,
        out: Mutex::new(OutQueue {
            pending: Vec::new(),
            pending_since: None,
            writing: false,
            stat_sn: next_stat_sn,
            dead: false,
            idle_waiters: 0,
        }),
        out_idle: Condvar::new(),
        session: session.clone(),
        params,
        limits,
        pool: Pool {
            tx: Mutex::new(Some(tx)),
            rx,
            idle: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            total: AtomicUsize::new(0),
            max: shared.opts.max_workers_per_connection.max(1),
            handles: Mutex::new(Vec::new()),
        },
        shared: shared.clone(),
        logged_out: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        text: Mutex::new((TextExchange::new(), RESERVED_TAG)),
        local,
        max_xmit: AtomicU32::new(params.max_xmit),
        fast_streak: AtomicU32::new(0),
        sent_by_ref: AtomicU64::new(0),
    });
    {
        let mut st = session.lock();
        if st.closing {
            return Err(login::LoginStatus::SessionDoesNotExist);
        }
        if let Some(old) = st.conns.get(&neg.cid) {
            // Connection reinstatement: the old connection with this CID goes.
            replaced_conn = Some(old.clone());
        } else if neg.tsih != 0 && st.conns.len() >= usize::from(session.params.max_connections) {
            return Err(login::LoginStatus::TooManyConnections);
        }
        st.conns.insert(neg.cid, conn.clone());
    }
    if let Some(old) = replaced_conn {
        tracing::info!(tsih = session.tsih, cid = neg.cid, "connection reinstated");
        old.close_gracefully();
    }
    Ok(conn)
}

/// End a session: no new work, every connection closed.
pub(crate) fn close_session(s: &Arc<Session>) {
    let conns: Vec<Arc<Conn>> = {
        let mut st = s.lock();
        st.closing = true;
        st.conns.values().cloned().collect()
    };
    for c in conns {
        c.close();
    }
}

/// Clean up after a connection's reader stopped.
fn teardown(conn: &Arc<Conn>, end: &End) {
    let session = &conn.session;
    let graceful = conn.logged_out.load(Ordering::Acquire);
    let mut released = Actions::default();
    let session_over;
    let mut had_running = false;
    {
        let mut st = session.lock();
        if st
            .conns
            .get(&conn.cid)
            .is_some_and(|c| Arc::ptr_eq(c, conn))
        {
            st.conns.remove(&conn.cid);
        }
        for itt in st.tasks_of(conn.id) {
            let running = st
                .tasks
                .get(&itt)
                .is_some_and(|t| matches!(t.phase, TaskPhase::Running));
            if running {
                had_running = true;
                if let Some(t) = st.tasks.get_mut(&itt) {
                    t.aborted = true;
                }
            } else {
                st.remove_task(itt);
            }
        }
        st.forget_held_of(conn.id);
        release_blocked(&mut st, &mut released);
        // ErrorRecoveryLevel 0: a failed connection fails its session.
        session_over = st.conns.is_empty() || (!graceful && !matches!(end, End::Shutdown));
        if session_over {
            st.closing = true;
        }
        session.publish(&st.window);
    }
    session.notify_changed();
    released.run();
    {
        let mut q = conn.lock_out();
        q.dead = true;
        q.pending.clear();
        q.pending_since = None;
    }
    let _ = conn.stream.shutdown(Shutdown::Both);
    if had_running {
        // Do not wait for a SANITIZE (IMMED = 0) to finish its background
        // operation: nobody is left to receive its status.
        if let (Some(t), Some(n)) = (session.target(), session.nexus()) {
            t.luns.cancel_waits(None, Some(n));
        }
    }
    conn.stop_workers();
    if session_over {
        // A reinstated session was taken out of the registry (and its
        // nexus loss reported) by the login that replaced it.
        let removed = conn.shared.registry().remove(session);
        close_session(session);
        if removed {
            nexus_loss(session);
        }
    }
}

/// Tell the SCSI core the session's I_T nexus is gone (reservations,
/// I_T NEXUS LOSS OCCURRED unit attention).
fn nexus_loss(s: &Session) {
    if let (Some(t), Some(n)) = (s.target(), s.nexus()) {
        if catch_unwind(AssertUnwindSafe(|| t.luns.nexus_loss(n))).is_err() {
            tracing::error!(tsih = s.tsih, "nexus_loss panicked");
        }
    }
}

// ---------------------------------------------------------------------
// Full feature phase reader.

struct FfpReader {
    conn: Arc<Conn>,
    wire: BufReader<TcpStream>,
    last_rx: Instant,
    ping: Option<(u32, Instant)>,
    draining_since: Option<Instant>,
}

/// Deliveries decided under the session lock, carried out after it.
#[derive(Default)]
struct Actions {
    jobs: Vec<(Arc<Conn>, Box<ScsiJob>)>,
    requests: Vec<(Arc<Conn>, Box<Request>)>,
    flush: Vec<Arc<Conn>>,
}

impl Actions {
    fn run(self) {
        for c in &self.flush {
            c.flush();
        }
        for (c, job) in self.jobs {
            c.submit(job);
        }
        for (c, req) in self.requests {
            handle_request(&c, *req);
        }
    }
}

/// Start tasks that task-attribute ordering held back, now that a task
/// finished (under the session lock).
fn release_blocked(st: &mut SessionState, acts: &mut Actions) {
    for (id, job) in st.release_blocked() {
        match st.conns.values().find(|c| c.id == id).cloned() {
            Some(c) => acts.jobs.push((c, job)),
            None => {
                st.remove_task(job.itt);
            }
        }
    }
}

/// Route delivered CmdSN items (under the session lock).
fn route_delivered(st: &mut SessionState, items: Vec<Ordered>, acts: &mut Actions) {
    for item in items {
        match item {
            Ordered::Task(itt) => {
                let owner = st.tasks.get(&itt).map(|t| t.conn);
                if let Some(job) = st.deliver_task(itt) {
                    match owner.and_then(|id| st.conns.values().find(|c| c.id == id).cloned()) {
                        Some(c) => acts.jobs.push((c, job)),
                        None => {
                            st.remove_task(itt);
                        }
                    }
                }
            }
            Ordered::Request(id, req) => {
                // The request's CmdSN slot is used up once it is delivered.
                st.window.complete();
                if let Some(c) = st.conns.values().find(|c| c.id == id).cloned() {
                    acts.requests.push((c, req));
                }
            }
            Ordered::Skip => st.window.complete(),
        }
    }
}

impl FfpReader {
    fn new(conn: Arc<Conn>, stream: TcpStream) -> Self {
        FfpReader {
            conn,
            wire: BufReader::with_capacity(64 * 1024, stream),
            last_rx: Instant::now(),
            ping: None,
            draining_since: None,
        }
    }

    fn opts(&self) -> &super::server::ServerOptions {
        &self.conn.shared.opts
    }

    /// Fill `buf` from the socket; timeouts become ticks.
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), End> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.wire.read(buf.get_mut(filled..).unwrap_or(&mut [])) {
                Ok(0) => {
                    return Err(if self.conn.closed.load(Ordering::Acquire) {
                        End::Closed
                    } else {
                        End::Eof
                    })
                }
                Ok(n) => {
                    filled += n;
                    self.last_rx = Instant::now();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    self.tick()?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(if self.conn.closed.load(Ordering::Acquire) {
                        End::Closed
                    } else {
                        End::Io(e)
                    })
                }
            }
        }
        Ok(())
    }

    /// Read and drop `n` bytes.
    fn skip(&mut self, mut n: usize) -> Result<(), End> {
        let mut scratch = [0u8; 4096];
        while n > 0 {
            let k = n.min(scratch.len());
            self.fill(&mut scratch[..k])?;
            n -= k;
        }
        Ok(())
    }

    /// Skip a data segment of `len` bytes with its padding and digest.
    fn skip_data(&mut self, len: u32) -> Result<(), End> {
        let wire = data_wire_len(&self.conn.params, len);
        self.skip(wire)
    }

    /// Read a data segment into `dst` (exactly its length), then padding
    /// and digest, verifying the digest.
    fn read_data_into(&mut self, dst: &mut [u8]) -> Result<Result<(), pdu::PduError>, End> {
        if dst.is_empty() {
            return Ok(Ok(()));
        }
        self.fill(dst)?;
        let pad = pad_len(dst.len());
        let mut tail = [0u8; 8];
        let tl = pad + if self.conn.params.data_digest { 4 } else { 0 };
        self.fill(&mut tail[..tl])?;
        if self.conn.params.data_digest {
            let mut d = [0u8; 4];
            d.copy_from_slice(&tail[pad..pad + 4]);
            return Ok(check_data_digest(dst, &tail[..pad], d));
        }
        Ok(Ok(()))
    }

    /// Read a small data segment into a new buffer (bounded by our
    /// MaxRecvDataSegmentLength, checked before).
    fn read_data(&mut self, len: u32) -> Result<Result<Vec<u8>, pdu::PduError>, End> {
        let mut v = vec![0u8; len as usize];
        Ok(self.read_data_into(&mut v)?.map(|()| v))
    }

    fn tick(&mut self) -> Result<(), End> {
        if self.conn.closed.load(Ordering::Acquire) {
            return Err(End::Closed);
        }
        self.check_drain()?;
        let now = Instant::now();
        if let Some((_, sent)) = self.ping {
            if self.last_rx > sent {
                self.ping = None;
            } else if now.duration_since(sent) >= self.opts().nop_timeout {
                return Err(End::Dead);
            }
        }
        if self.ping.is_none() && now.duration_since(self.last_rx) >= self.opts().nop_interval {
            let ttt = self.conn.session.lock().alloc_ttt();
            self.conn.send(OutPdu::new(
                &Bhs::NopIn(NopIn {
                    lun: Lun::default(),
                    itt: RESERVED_TAG,
                    ttt,
                    stat_sn: 0,
                    exp_cmd_sn: 0,
                    max_cmd_sn: 0,
                }),
                StatSn::Current,
                OutData::Empty,
            ));
            self.ping = Some((ttt, now));
        }
        Ok(())
    }

    /// At shutdown: stop taking commands, end once this connection's tasks
    /// are done (or the grace period ran out).
    fn check_drain(&mut self) -> Result<(), End> {
        if self.draining_since.is_none() && self.conn.shared.is_shutting_down() {
            self.draining_since = Some(Instant::now());
        }
        if let Some(since) = self.draining_since {
            let idle = self.conn.session.lock().tasks_of(self.conn.id).is_empty();
            if idle || since.elapsed() >= self.opts().shutdown_grace {
                // Let queued responses reach the wire before closing.
                self.conn.flush_and_wait();
                return Err(End::Shutdown);
            }
        }
        Ok(())
    }

    fn run(mut self) -> End {
        match self.run_inner() {
            Ok(()) => End::Closed,
            Err(e) => e,
        }
    }

    fn run_inner(&mut self) -> Result<(), End> {
        let mut ahs_buf = [0u8; MAX_AHS_LEN + 4];
        loop {
            self.check_drain()?;
            let mut bhs = [0u8; BHS_LEN];
            self.fill(&mut bhs)?;
            let pre = Prefix::parse(&bhs);
            let tail = pre.ahs_len + if self.conn.params.header_digest { 4 } else { 0 };
            let tail_buf = ahs_buf.get_mut(..tail).unwrap_or(&mut []);
            self.fill(tail_buf)?;
            let (ahs, hdig) = tail_buf.split_at(pre.ahs_len.min(tail_buf.len()));
            if self.conn.params.header_digest {
                let mut d = [0u8; 4];
                d.copy_from_slice(hdig.get(..4).unwrap_or(&[0; 4]));
                if let Err(e) = check_header_digest(&bhs, ahs, d) {
                    // Lengths cannot be trusted: only closing is safe.
                    return Err(End::Protocol(e.to_string()));
                }
            }
            if pre.data_len > self.conn.params.max_recv {
                self.conn.reject(&bhs, RejectReason::ProtocolError);
                self.conn.flush_and_wait();
                return Err(End::Protocol(format!(
                    "data segment of {} bytes exceeds MaxRecvDataSegmentLength {}",
                    pre.data_len, self.conn.params.max_recv
                )));
            }
            let header = match Bhs::decode(&bhs, ahs) {
                Ok(h) => h,
                Err(e) => {
                    tracing::debug!(conn = self.conn.id, "undecodable PDU: {e}");
                    self.skip_data(pre.data_len)?;
                    let reason = match e {
                        pdu::PduError::UnknownOpcode(_) => RejectReason::CommandNotSupported,
                        _ => RejectReason::InvalidPduField,
                    };
                    self.conn.reject(&bhs, reason);
                    continue;
                }
            };
            if self.draining_since.is_some() && !matches!(header, Bhs::DataOut(_)) {
                // Shutting down: only data for commands already here counts.
                self.skip_data(pre.data_len)?;
                continue;
            }
            self.dispatch(header, &bhs, pre.data_len)?;
        }
    }

    fn protocol_error(&mut self, bhs: &[u8; BHS_LEN], why: String) -> End {
        self.conn.reject(bhs, RejectReason::ProtocolError);
        self.conn.flush_and_wait();
        End::Protocol(why)
    }

    fn dispatch(&mut self, h: Bhs, bhs: &[u8; BHS_LEN], data_len: u32) -> Result<(), End> {
        tracing::trace!(conn = self.conn.id, data_len, "received {h:?}");
        match h {
            Bhs::ScsiCommand(c) => self.on_command(c, bhs, data_len),
            Bhs::DataOut(d) => self.on_data_out(d, bhs, data_len),
            Bhs::NopOut(n) => {
                let data = match self.read_data(data_len)? {
                    Ok(d) => d,
                    Err(_) => return Err(self.digest_error(bhs)),
                };
                self.on_nop_out(n, data);
                Ok(())
            }
            Bhs::TextRequest(t) => {
                let data = match self.read_data(data_len)? {
                    Ok(d) => d,
                    Err(_) => return Err(self.digest_error(bhs)),
                };
                let (imm, sn) = (t.immediate, t.cmd_sn);
                self.sequence(imm, sn, Request::Text(t, data));
                Ok(())
            }
            Bhs::TaskMgmtRequest(t) => {
                self.skip_data(data_len)?;
                let (imm, sn) = (t.immediate, t.cmd_sn);
                self.sequence(imm, sn, Request::Tmf(t));
                Ok(())
            }
            Bhs::LogoutRequest(l) => {
                self.skip_data(data_len)?;
                let (imm, sn) = (l.immediate, l.cmd_sn);
                self.sequence(imm, sn, Request::Logout(l));
                Ok(())
            }
            Bhs::SnackRequest(_) => {
                // ErrorRecoveryLevel 0: no SNACK support.
                self.skip_data(data_len)?;
                self.conn.reject(bhs, RejectReason::SnackReject);
                Ok(())
            }
            Bhs::LoginRequest(_) => {
                self.skip_data(data_len)?;
                self.conn.reject(bhs, RejectReason::ProtocolError);
                Ok(())
            }
            // Target opcodes from an initiator.
            _ => {
                self.skip_data(data_len)?;
                self.conn.reject(bhs, RejectReason::ProtocolError);
                Ok(())
            }
        }
    }

    fn digest_error(&mut self, bhs: &[u8; BHS_LEN]) -> End {
        // ErrorRecoveryLevel 0: reject, then the connection goes.
        self.conn.reject(bhs, RejectReason::DataDigestError);
        self.conn.flush_and_wait();
        End::Protocol("data digest error".into())
    }

    /// Sequence a non-SCSI request by CmdSN, or handle it now if immediate.
    fn sequence(&mut self, immediate: bool, cmd_sn: u32, req: Request) {
        if immediate {
            handle_request(&self.conn, req);
            return;
        }
        let mut acts = Actions::default();
        {
            let mut st = self.conn.session.lock();
            match st.arrive(cmd_sn, Ordered::Request(self.conn.id, Box::new(req))) {
                Arrival::Delivered(items) => route_delivered(&mut st, items, &mut acts),
                Arrival::Held | Arrival::Dropped => {}
            }
            self.conn.session.publish(&st.window);
        }
        acts.run();
    }

    fn on_nop_out(&mut self, n: NopOut, data: Vec<u8>) {
        if n.itt == RESERVED_TAG {
            // The answer to our ping.
            if self.ping.is_some_and(|(t, _)| t == n.ttt) {
                self.ping = None;
            }
            return;
        }
        let (imm, sn) = (n.immediate, n.cmd_sn);
        self.sequence(imm, sn, Request::Nop(n, data));
    }

    fn on_command(
        &mut self,
        c: ScsiCommand,
        bhs: &[u8; BHS_LEN],
        data_len: u32,
    ) -> Result<(), End> {
        let session = self.conn.session.clone();
        if session.target().is_none() {
            // Discovery sessions take no SCSI commands.
            self.skip_data(data_len)?;
            self.conn.reject(bhs, RejectReason::ProtocolError);
            return Ok(());
        }
        if data_len > 0 && !c.write {
            return Err(
                self.protocol_error(bhs, "immediate data on a command without W bit".into())
            );
        }
        let opts = self.opts().clone();
        let edtl = c.expected_data_len;
        let mut local = None;
        let mut charge = None;
        if c.write && (c.read || edtl > opts.max_command_data) {
            // Bidirectional commands are not supported; oversized writes
            // cannot be buffered.
            local = Some(LocalAnswer::InvalidFieldInCdb);
        } else if c.write && edtl > 0 {
            charge =
                BudgetCharge::try_new(&session.buffered, edtl as usize, opts.session_data_budget);
            if charge.is_none() {
                local = Some(LocalAnswer::TaskSetFull);
            }
        }
        let mut data = Vec::new();
        let mut dstate = None;
        if local.is_none() && c.write && edtl > 0 {
            let st = match DataOutState::new(edtl, data_len, c.fin, self.conn.limits) {
                Ok(s) => s,
                Err(e) => return Err(self.protocol_error(bhs, e.to_string())),
            };
            data = crate::block::bufpool::global().take_zeroed(edtl as usize);
            let dst = data.get_mut(..data_len as usize).unwrap_or(&mut []);
            if self.read_data_into(dst)?.is_err() {
                return Err(self.digest_error(bhs));
            }
            if !st.is_complete() {
                dstate = Some(Box::new(st));
            }
        } else {
            if c.write && local.is_none() && data_len > 0 {
                // EDTL 0 with immediate data.
                return Err(self.protocol_error(bhs, "immediate data beyond EDTL".into()));
            }
            self.skip_data(data_len)?;
        }
        let mut cdb = c.cdb.to_vec();
        cdb.extend_from_slice(&c.ext_cdb);
        let job = Box::new(ScsiJob {
            itt: c.itt,
            lun: c.lun,
            cdb,
            expected_len: edtl,
            read: c.read,
            write: c.write,
            attr: c.attr,
            data,
            charge,
            immediate: c.immediate,
            r2t_count: 0,
            local,
        });

        if matches!(
            c.attr,
            TaskAttribute::Ordered | TaskAttribute::HeadOfQueue | TaskAttribute::Aca
        ) {
            session.ordered_seen.store(true, Ordering::Relaxed);
        }
        let mut acts = Actions::default();
        {
            let mut st = session.lock();
            if st.closing {
                return Ok(());
            }
            if !c.immediate && st.window.check(c.cmd_sn) == session::CmdSnCheck::Drop {
                tracing::debug!(
                    cmd_sn = c.cmd_sn,
                    exp = st.window.exp_cmd_sn(),
                    "command outside the CmdSN window dropped"
                );
                return Ok(());
            }
            if st.tasks.contains_key(&c.itt) {
                drop(st);
                self.conn.reject(bhs, RejectReason::TaskInProgress);
                return Ok(());
            }
            // Immediate commands bypass the CmdSN window; bound them so a
            // peer cannot grow the task table without limit.
            if c.immediate && st.tasks.len() >= 2 * opts.queue_depth.max(1) as usize {
                drop(st);
                self.conn.reject(bhs, RejectReason::ImmediateCommandReject);
                return Ok(());
            }
            let phase = match dstate {
                Some(d) => TaskPhase::Receiving(d),
                None => TaskPhase::Ready,
            };
            st.tasks.insert(
                c.itt,
                Task {
                    conn: self.conn.id,
                    lun: c.lun,
                    cmd_sn: c.cmd_sn,
                    immediate: c.immediate,
                    delivered: c.immediate,
                    phase,
                    aborted: false,
                    attr: c.attr,
                    job: Some(job),
                },
            );
            let r2ts = st.r2ts_for(c.itt);
            if !r2ts.is_empty() {
                self.conn
                    .push_all(r2ts.into_iter().map(|r| r2t_pdu(c.lun, c.itt, &r)));
                acts.flush.push(self.conn.clone());
            }
            if c.immediate {
                if let Some(job) = st.take_if_ready(c.itt) {
                    acts.jobs.push((self.conn.clone(), job));
                }
            } else {
                match st.arrive(c.cmd_sn, Ordered::Task(c.itt)) {
                    Arrival::Delivered(items) => route_delivered(&mut st, items, &mut acts),
                    Arrival::Held => {}
                    Arrival::Dropped => {
                        st.tasks.remove(&c.itt);
                    }
                }
            }
            session.publish(&st.window);
        }
        self.run_actions(acts);
        Ok(())
    }

    /// Carry out what a command's (or its last Data-Out's) arrival decided.
    /// A lone short command on a connection with nothing else running and
    /// nothing more received runs right here on the reader: handing it to
    /// a worker costs two thread switches and a wake-up, more than a
    /// page-cache read or write, and at queue depth 1 there is nothing to
    /// overlap it with. Short means at most `INLINE_MAX` bytes and either
    /// data-in (READ, INQUIRY, ...: their run time grows with the data they
    /// return) or a plain WRITE (not WRITE SAME, UNMAP, EXTENDED COPY...,
    /// which can work far beyond the data they carry). Anything else, or
    /// anything while other work is in flight, goes to the workers.
    ///
    /// While the reader runs a command it reads nothing, so a TMF or a
    /// NOP-Out sent meanwhile waits for that command. Inline execution is
    /// therefore only used while the device is fast: after a command took
    /// more than `INLINE_SLOW`, everything goes to the workers (where the
    /// reader stays responsive) until `INLINE_AFTER_FAST` quick commands in
    /// a row. A device that turns slow costs at most one blocked command.
    fn run_actions(&mut self, mut acts: Actions) {
        let inline = acts.requests.is_empty()
            && self.conn.fast_streak.load(Ordering::Relaxed) >= INLINE_AFTER_FAST
            && self.wire.buffer().is_empty()
            && matches!(acts.jobs.as_slice(), [(c, job)]
            if Arc::ptr_eq(c, &self.conn)
                && job.local.is_none()
                && job.expected_len <= INLINE_MAX
                && match (job.read, job.write) {
                    (true, false) => true,
                    (false, true) => crate::scsi::sbc::is_plain_transfer(&job.cdb),
                    _ => false,
                })
            && self.conn.pool_idle();
        if inline {
            if let Some((c, job)) = acts.jobs.pop() {
                acts.run();
                run_job(&c, *job);
                return;
            }
        }
        acts.run();
    }

    fn on_data_out(&mut self, d: DataOut, bhs: &[u8; BHS_LEN], data_len: u32) -> Result<(), End> {
        let session = self.conn.session.clone();
        let placement;
        let mut job;
        {
            let mut st = session.lock();
            let Some(t) = st.tasks.get_mut(&d.itt) else {
                drop(st);
                // Aborted or answered early: the data has nowhere to go.
                return self.skip_data(data_len);
            };
            let accepting = t.conn == self.conn.id && !t.aborted && t.job.is_some();
            let TaskPhase::Receiving(ds) = &mut t.phase else {
                drop(st);
                return self.skip_data(data_len);
            };
            if !accepting {
                drop(st);
                return self.skip_data(data_len);
            }
            placement = match ds.accept(&d, data_len) {
                Ok(p) => p,
                Err(e) => {
                    // The framing is intact: fail this command (CHECK
                    // CONDITION) and keep the connection; later Data-Out
                    // for it is dropped.
                    tracing::debug!(conn = self.conn.id, itt = d.itt, "Data-Out rejected: {e}");
                    let (asc, ascq) = e.asc_ascq();
                    if let Some(j) = t.job.as_mut() {
                        j.local = Some(LocalAnswer::DataPhase { asc, ascq });
                        j.r2t_count = ds.r2t_count();
                    }
                    t.phase = TaskPhase::Ready;
                    let mut acts = Actions::default();
                    if let Some(job) = st.take_if_ready(d.itt) {
                        acts.jobs.push((self.conn.clone(), job));
                    }
                    drop(st);
                    acts.run();
                    let _ = bhs;
                    return self.skip_data(data_len);
                }
            };
            job = t.job.take();
        }
        let Some(mut j) = job.take() else {
            return self.skip_data(data_len);
        };
        let range = placement.offset as usize..(placement.offset + placement.len) as usize;
        let digest_ok = match j.data.get_mut(range) {
            Some(dst) => self.read_data_into(dst)?.is_ok(),
            None => {
                return Err(self.protocol_error(bhs, "Data-Out beyond the buffer".into()));
            }
        };
        if !digest_ok {
            return Err(self.digest_error(bhs));
        }
        let mut acts = Actions::default();
        {
            let mut st = session.lock();
            let Some(t) = st.tasks.get_mut(&d.itt) else {
                return Ok(());
            };
            if t.aborted {
                return Ok(());
            }
            let complete = match &t.phase {
                TaskPhase::Receiving(ds) => ds.is_complete().then(|| ds.r2t_count()),
                _ => None,
            };
            if let Some(r2t_count) = complete {
                j.r2t_count = r2t_count;
                t.job = Some(j);
                t.phase = TaskPhase::Ready;
                if let Some(job) = st.take_if_ready(d.itt) {
                    acts.jobs.push((self.conn.clone(), job));
                }
            } else {
                let lun = t.lun;
                t.job = Some(j);
                let r2ts = st.r2ts_for(d.itt);
                if !r2ts.is_empty() {
                    self.conn
                        .push_all(r2ts.into_iter().map(|r| r2t_pdu(lun, d.itt, &r)));
                    acts.flush.push(self.conn.clone());
                }
            }
            session.publish(&st.window);
        }
        self.run_actions(acts);
        Ok(())
    }
}

fn data_wire_len(p: &ConnParams, len: u32) -> usize {
    pdu::FrameConfig {
        header_digest: p.header_digest,
        data_digest: p.data_digest,
        max_data_segment_len: p.max_recv,
    }
    .data_wire_len(len)
}

fn r2t_pdu(lun: Lun, itt: u32, r: &session::R2tPlan) -> OutPdu {
    OutPdu::new(
        &Bhs::R2t(R2t {
            lun,
            itt,
            ttt: r.ttt,
            stat_sn: 0,
            exp_cmd_sn: 0,
            max_cmd_sn: 0,
            r2t_sn: r.r2t_sn,
            buffer_offset: r.offset,
            desired_len: r.len,
        }),
        StatSn::Current,
        OutData::Empty,
    )
}

// ---------------------------------------------------------------------
// Requests other than SCSI commands.

fn handle_request(conn: &Arc<Conn>, req: Request) {
    match req {
        Request::Nop(n, mut data) => {
            data.truncate(conn.max_xmit() as usize);
            let data = if data.is_empty() {
                OutData::Empty
            } else {
                OutData::Owned(data)
            };
            conn.send(OutPdu::new(
                &Bhs::NopIn(NopIn {
                    lun: n.lun,
                    itt: n.itt,
                    ttt: RESERVED_TAG,
                    stat_sn: 0,
                    exp_cmd_sn: 0,
                    max_cmd_sn: 0,
                }),
                StatSn::Advance,
                data,
            ));
        }
        Request::Text(t, data) => handle_text(conn, t, data),
        Request::Tmf(t) => handle_tmf(conn, t),
        Request::Logout(l) => {
            let c = conn.clone();
            let spawned = std::thread::Builder::new()
                .name("iscsi-logout".into())
                .spawn(move || handle_logout(&c, l));
            if let Err(e) = spawned {
                tracing::error!("cannot spawn logout thread: {e}");
                conn.close();
            }
        }
    }
}

fn text_response(t: &TextRequest, data: Vec<u8>, more: Option<u32>) -> OutPdu {
    OutPdu::new(
        &Bhs::TextResponse(TextResponse {
            fin: more.is_none(),
            cont: more.is_some() && !data.is_empty(),
            lun: t.lun,
            itt: t.itt,
            ttt: more.unwrap_or(RESERVED_TAG),
            stat_sn: 0,
            exp_cmd_sn: 0,
            max_cmd_sn: 0,
        }),
        StatSn::Advance,
        if data.is_empty() {
            OutData::Empty
        } else {
            OutData::Owned(data)
        },
    )
}

/// A Text Request in full feature phase (SendTargets, declarations),
/// through the connection's `TextExchange`.
fn handle_text(conn: &Arc<Conn>, t: TextRequest, data: Vec<u8>) {
    let session = &conn.session;
    let target_name = session.target().map(|t| t.name.clone());
    let ctx = TextContext {
        targets: &conn.shared.login.targets,
        initiator_name: &session.initiator_name,
        session_type: if target_name.is_some() {
            SessionType::Normal
        } else {
            SessionType::Discovery
        },
        session_target: target_name.as_deref(),
        local_portal: conn.local,
        target_portal_group_tag: conn.shared.login.target_portal_group_tag,
        limits: &conn.shared.login.limits,
    };
    let mut text = lock(&conn.text);
    let continuation = t.ttt != RESERVED_TAG;
    if continuation && t.ttt != text.1 {
        drop(text);
        let bhs = Bhs::TextRequest(t).encode(data.len() as u32);
        conn.reject(&bhs, RejectReason::InvalidPduField);
        return;
    }
    let step = text.0.step(
        &ctx,
        &TextPdu {
            itt: t.itt,
            continuation,
            cont: t.cont,
            data: &data,
        },
        conn.max_xmit() as usize,
    );
    let pdu = match step {
        Ok(TextStep::NeedMore) => {
            text.1 = session.lock().alloc_ttt();
            text_response(&t, Vec::new(), Some(text.1))
        }
        Ok(TextStep::Respond {
            data: reply,
            cont,
            initiator_max_recv_data_segment_length,
        }) => {
            if let Some(m) = initiator_max_recv_data_segment_length {
                conn.max_xmit.store(m.max(512), Ordering::Release);
            }
            let more = if cont {
                text.1 = session.lock().alloc_ttt();
                Some(text.1)
            } else {
                text.1 = RESERVED_TAG;
                None
            };
            text_response(&t, reply, more)
        }
        Err(e) => {
            tracing::debug!(conn = conn.id, "text request refused: {e}");
            text.1 = RESERVED_TAG;
            drop(text);
            let bhs = Bhs::TextRequest(t).encode(data.len() as u32);
            conn.reject(&bhs, RejectReason::ProtocolError);
            return;
        }
    };
    drop(text);
    conn.send(pdu);
}

fn tmf_response(itt: u32, response: TmfResponse) -> OutPdu {
    OutPdu::new(
        &Bhs::TaskMgmtResponse(TaskMgmtResponse {
            response,
            itt,
            stat_sn: 0,
            exp_cmd_sn: 0,
            max_cmd_sn: 0,
        }),
        StatSn::Advance,
        OutData::Empty,
    )
}

/// Abort the tasks that `pick` selects (by ITT and task): tasks not yet
/// running go at once, running ones are marked so their responses are
/// dropped. Returns the running ones to wait for.
fn abort_locked(st: &mut SessionState, mut pick: impl FnMut(u32, &Task) -> bool) -> Vec<u32> {
    let mut running = Vec::new();
    let itts: Vec<u32> = st
        .tasks
        .iter()
        .filter(|(&i, t)| pick(i, t))
        .map(|(&i, _)| i)
        .collect();
    for itt in itts {
        let is_running = st
            .tasks
            .get(&itt)
            .is_some_and(|t| matches!(t.phase, TaskPhase::Running));
        if is_running {
            if let Some(t) = st.tasks.get_mut(&itt) {
                t.aborted = true;
            }
            running.push(itt);
        } else {
            st.remove_task(itt);
        }
    }
    running
}

/// [`abort_locked`] on session `s`.
fn abort_where(s: &Session, pick: impl FnMut(u32, &Task) -> bool) -> Vec<u32> {
    let running = {
        let mut st = s.lock();
        let r = abort_locked(&mut st, pick);
        s.publish(&st.window);
        r
    };
    s.notify_changed();
    running
}

/// Task management (RFC 7143 §11.5). The affected tasks are chosen
/// synchronously, on the delivering thread, so commands that arrive later
/// are never caught; waiting for running ones happens on a helper thread.
fn handle_tmf(conn: &Arc<Conn>, t: TaskMgmtRequest) {
    let session = &conn.session;
    let Some(target) = session.target().cloned() else {
        conn.send(tmf_response(t.itt, TmfResponse::NotSupported));
        return;
    };
    let lun_num = t.lun.to_flat();
    let lun_exists = lun_num.is_some_and(|l| target.luns.get(l).is_some());
    let same_lun = |_: u32, task: &Task| task.lun.to_flat() == lun_num;
    let mut waits: Vec<(Arc<Session>, Vec<u32>)> = Vec::new();
    let mut scsi_effect: Option<TaskMgmt> = None;
    let mut close_all = false;
    let response = match t.function {
        TmfFunction::AbortTask => {
            let mut st = session.lock();
            let r = if st.tasks.contains_key(&t.ref_task_tag) {
                let running = abort_locked(&mut st, |itt, _| itt == t.ref_task_tag);
                waits.push((session.clone(), running));
                TmfResponse::FunctionComplete
            } else if st.skip_cmd_sn(t.ref_cmd_sn, t.cmd_sn) {
                // Not here yet but within the window: it counts as
                // received, and will be ignored when it comes.
                let items = st.take_deliverable();
                let mut acts = Actions::default();
                route_delivered(&mut st, items, &mut acts);
                session.publish(&st.window);
                drop(st);
                acts.run();
                st = session.lock();
                TmfResponse::FunctionComplete
            } else {
                TmfResponse::TaskDoesNotExist
            };
            session.publish(&st.window);
            drop(st);
            session.notify_changed();
            r
        }
        TmfFunction::AbortTaskSet | TmfFunction::ClearTaskSet if !lun_exists => {
            TmfResponse::LunDoesNotExist
        }
        TmfFunction::AbortTaskSet => {
            let running = abort_where(session, same_lun);
            waits.push((session.clone(), running));
            TmfResponse::FunctionComplete
        }
        TmfFunction::ClearTaskSet | TmfFunction::LogicalUnitReset => {
            if !lun_exists {
                TmfResponse::LunDoesNotExist
            } else {
                for s in conn.shared.sessions_of_target(&target.name) {
                    let running = abort_where(&s, same_lun);
                    waits.push((s, running));
                }
                let lun = lun_num.unwrap_or(0);
                scsi_effect = Some(if t.function == TmfFunction::ClearTaskSet {
                    TaskMgmt::ClearTaskSet { lun }
                } else {
                    TaskMgmt::LogicalUnitReset { lun }
                });
                TmfResponse::FunctionComplete
            }
        }
        TmfFunction::TargetWarmReset | TmfFunction::TargetColdReset => {
            for s in conn.shared.sessions_of_target(&target.name) {
                let running = abort_where(&s, |_, _| true);
                waits.push((s, running));
            }
            if t.function == TmfFunction::TargetColdReset {
                scsi_effect = Some(TaskMgmt::TargetColdReset);
                close_all = true;
            } else {
                scsi_effect = Some(TaskMgmt::TargetWarmReset);
            }
            TmfResponse::FunctionComplete
        }
        TmfFunction::TaskReassign => TmfResponse::AllegianceReassignmentNotSupported,
        TmfFunction::ClearAca | TmfFunction::Other(_) => TmfResponse::NotSupported,
    };
    let needs_wait = waits.iter().any(|(_, r)| !r.is_empty());
    if needs_wait {
        // Commands that only wait for a background operation (SANITIZE
        // with IMMED = 0) return now instead of holding up the TMF.
        match (t.function, session.nexus()) {
            (TmfFunction::AbortTask | TmfFunction::AbortTaskSet, Some(n)) => {
                target.luns.cancel_waits(lun_num, Some(n))
            }
            (TmfFunction::AbortTask | TmfFunction::AbortTaskSet, None) => {}
            (TmfFunction::ClearTaskSet | TmfFunction::LogicalUnitReset, _) => {
                target.luns.cancel_waits(lun_num, None)
            }
            _ => target.luns.cancel_waits(None, None),
        }
    }
    if !needs_wait && scsi_effect.is_none() && !close_all {
        conn.send(tmf_response(t.itt, response));
        return;
    }
    let c = conn.clone();
    let nexus = session.nexus().cloned();
    let spawned = std::thread::Builder::new()
        .name("iscsi-tmf".into())
        .spawn(move || {
            let timeout = c.shared.opts.task_wait_timeout;
            for (s, running) in waits {
                if running.is_empty() {
                    continue;
                }
                let g = s.lock();
                let (_g, done) = s.wait_until(g, timeout, |st| {
                    running.iter().all(|i| !st.tasks.contains_key(i))
                });
                if !done {
                    tracing::warn!(
                        tsih = s.tsih,
                        "TMF: aborted tasks still running after {timeout:?}"
                    );
                }
            }
            if let (Some(effect), Some(nexus)) = (scsi_effect, nexus) {
                let r = catch_unwind(AssertUnwindSafe(|| {
                    target.luns.task_management(effect, &nexus)
                }));
                if r.is_err() {
                    tracing::error!("task_management panicked");
                }
            }
            c.send(tmf_response(t.itt, response));
            if close_all {
                c.flush_and_wait();
                for s in c.shared.sessions_of_target(&target.name) {
                    close_session(&s);
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot spawn TMF thread: {e}");
        conn.close();
    }
}

/// A logout ends the session: release its I_T nexus (SPC-2 reservations,
/// unit attentions) before the response goes out, so that the initiator's
/// next login already finds it released. The teardown that follows then
/// finds the session gone from the registry and reports nothing twice.
fn end_nexus(conn: &Arc<Conn>) {
    if conn.shared.registry().remove(&conn.session) {
        nexus_loss(&conn.session);
    }
}

fn handle_logout(conn: &Arc<Conn>, l: LogoutRequest) {
    let session = &conn.session;
    let timeout = conn.shared.opts.task_wait_timeout;
    let respond = |code: LogoutResponseCode| {
        conn.send(OutPdu::new(
            &Bhs::LogoutResponse(LogoutResponse {
                response: code,
                itt: l.itt,
                stat_sn: 0,
                exp_cmd_sn: 0,
                max_cmd_sn: 0,
                time2wait: 0,
                time2retain: 0,
            }),
            StatSn::Advance,
            OutData::Empty,
        ));
        conn.flush_and_wait();
    };
    match l.reason {
        LogoutReason::CloseSession => {
            let g = session.lock();
            let (mut g, _) = session.wait_until(g, timeout, |st| st.tasks.is_empty());
            g.closing = true;
            let conns: Vec<Arc<Conn>> = g.conns.values().cloned().collect();
            drop(g);
            end_nexus(conn);
            respond(LogoutResponseCode::Success);
            for c in conns {
                c.close_gracefully();
            }
        }
        LogoutReason::CloseConnection => {
            let other = session.lock().conns.get(&l.cid).cloned();
            match other {
                None => respond(LogoutResponseCode::CidNotFound),
                Some(c) if Arc::ptr_eq(&c, conn) => {
                    let id = conn.id;
                    let g = session.lock();
                    let (g, _) = session.wait_until(g, timeout, |st| st.tasks_of(id).is_empty());
                    let last = g.conns.len() == 1;
                    drop(g);
                    if last {
                        end_nexus(conn);
                    }
                    respond(LogoutResponseCode::Success);
                    conn.close_gracefully();
                }
                Some(c) => {
                    c.close_gracefully();
                    respond(LogoutResponseCode::Success);
                }
            }
        }
        LogoutReason::RemoveConnectionForRecovery | LogoutReason::Other(_) => {
            respond(LogoutResponseCode::RecoveryNotSupported);
        }
    }
}

// ---------------------------------------------------------------------
// SCSI execution (worker threads).

fn task_attr(a: TaskAttribute) -> TaskAttr {
    match a {
        TaskAttribute::Untagged => TaskAttr::Untagged,
        TaskAttribute::Simple | TaskAttribute::Reserved(_) => TaskAttr::Simple,
        TaskAttribute::Ordered => TaskAttr::Ordered,
        TaskAttribute::HeadOfQueue => TaskAttr::HeadOfQueue,
        TaskAttribute::Aca => TaskAttr::Aca,
    }
}

fn check_condition(key: u8, asc: u8, ascq: u8) -> ScsiResponse {
    ScsiResponse::with_sense(ScsiStatus::CheckCondition, fixed_sense(key, asc, ascq))
}

/// Whether a command may take its data-in by reference (`OutData::File`,
/// sent with `sendfile`): the option is on, no data digest (that needs the
/// bytes in memory; a header digest only covers the BHS), a read that is
/// not bidirectional, and no ORDERED or HEAD OF QUEUE task seen on the
/// session (see `Session::ordered_seen`). The SCSI core decides the rest
/// (plain READ, SIMPLE, large enough, a file-backed device).
fn data_in_by_ref(conn: &Conn, job: &ScsiJob) -> bool {
    conn.shared.opts.zero_copy_read
        && !conn.params.data_digest
        && job.read
        && !job.write
        && !conn.session.ordered_seen.load(Ordering::Relaxed)
}

/// Execute one command and queue its response.
fn run_job(conn: &Arc<Conn>, mut job: ScsiJob) {
    let session = &conn.session;
    let edtl = job.expected_len;
    let mut residual = Residual::default();
    let mut target_failure = false;
    let resp = match (job.local, session.target(), session.nexus()) {
        (Some(LocalAnswer::TaskSetFull), _, _) => {
            ScsiResponse::with_sense(ScsiStatus::TaskSetFull, Vec::new())
        }
        (Some(LocalAnswer::InvalidFieldInCdb), _, _) | (None, None, _) | (None, _, None) => {
            check_condition(session::SENSE_ILLEGAL_REQUEST, 0x24, 0)
        }
        (Some(LocalAnswer::DataPhase { asc, ascq }), _, _) => {
            check_condition(session::SENSE_ABORTED_COMMAND, asc, ascq)
        }
        (None, Some(target), Some(nexus)) => {
            let lun = job.lun.to_flat().unwrap_or(u64::MAX);
            let spdtl = if job.write {
                target
                    .luns
                    .get(lun)
                    .and_then(|lu| data_out_len(&job.cdb, lu.config.block_size))
            } else {
                None
            };
            if let Some(sp) = spdtl {
                residual = Residual::of(edtl, sp);
            }
            let bs = target
                .luns
                .get(lun)
                .map_or(512, |lu| lu.config.block_size.max(1));
            if residual.overflow
                && job.write
                && !(edtl % bs == 0 && truncate_write_cdb(&mut job.cdb, edtl / bs))
            {
                // Less data than the CDB describes and no whole-block way
                // to move only that: INVALID FIELD IN COMMAND INFORMATION UNIT.
                check_condition(session::SENSE_ILLEGAL_REQUEST, 0x0e, 0x03)
            } else {
                // Everything received (at most EDTL), not cut to the CDB's
                // length: the core judges a mismatch (COMPARE AND WRITE
                // with more data than NUMBER OF LOGICAL BLOCKS is an error,
                // a longer WRITE just has surplus).
                let req = ScsiRequest {
                    cdb: &job.cdb,
                    lun,
                    nexus,
                    data_out: &job.data,
                    expected_in_len: edtl,
                    task_attr: task_attr(job.attr),
                    data_in_by_ref: data_in_by_ref(conn, &job),
                };
                let started = Instant::now();
                let r = catch_unwind(AssertUnwindSafe(|| target.luns.execute(&req)));
                let streak = if started.elapsed() < INLINE_SLOW {
                    conn.fast_streak.load(Ordering::Relaxed).saturating_add(1)
                } else {
                    0
                };
                conn.fast_streak.store(streak, Ordering::Relaxed);
                match r {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::error!(
                            itt = job.itt,
                            "SCSI core panicked on CDB {:02x?}",
                            job.cdb
                        );
                        target_failure = true;
                        ScsiResponse::with_sense(ScsiStatus::CheckCondition, Vec::new())
                    }
                }
            }
        }
    };
    // Free the write buffer (and its budget) before queueing the response.
    crate::block::bufpool::global().give(std::mem::take(&mut job.data));
    job.charge = None;

    let mut pdus: Vec<OutPdu> = Vec::new();
    // At most MAX_XFER_BYTES (the core's limit), so it fits in usize.
    let produced = usize::try_from(resp.data_in_len()).unwrap_or(usize::MAX);
    if !job.write {
        residual = Residual::of(edtl, produced as u64);
    }
    let send_len = if job.read {
        produced.min(edtl as usize)
    } else {
        0
    };
    let status = resp.status as u8;
    let collapse = !target_failure && resp.sense.is_empty() && send_len > 0;
    let mut data_in_count = 0u32;
    if send_len > 0 {
        let plan: Vec<session::DataInPdu> = plan_data_in(
            send_len as u32,
            conn.max_xmit(),
            session.params.max_burst_length,
        )
        .collect();
        data_in_count = plan.len() as u32;
        let mut data_in = resp.data_in;
        let file = resp.data_in_file;
        let single = plan.len() == 1;
        let shared = if single || file.is_some() {
            None
        } else {
            Some(Arc::new(std::mem::take(&mut data_in)))
        };
        for p in plan {
            let last_with_status = p.last && collapse;
            let h = Bhs::DataIn(DataIn {
                fin: p.fin,
                ack: false,
                overflow: last_with_status && residual.overflow,
                underflow: last_with_status && residual.underflow,
                status_present: last_with_status,
                status: if last_with_status { status } else { 0 },
                lun: job.lun,
                itt: job.itt,
                ttt: RESERVED_TAG,
                stat_sn: 0,
                exp_cmd_sn: 0,
                max_cmd_sn: 0,
                data_sn: p.data_sn,
                buffer_offset: p.offset,
                residual: if last_with_status { residual.count } else { 0 },
            });
            let data = match (&file, &shared) {
                // The plan covers `send_len` <= the extent's length.
                (Some(f), _) => OutData::File {
                    file: f.file.clone(),
                    offset: f.offset.saturating_add(u64::from(p.offset)),
                    len: p.len as usize,
                },
                (None, Some(a)) => OutData::Shared(a.clone(), p.offset as usize, p.len as usize),
                (None, None) => {
                    data_in.truncate(send_len);
                    OutData::Owned(std::mem::take(&mut data_in))
                }
            };
            pdus.push(OutPdu::new(
                &h,
                if last_with_status {
                    StatSn::Advance
                } else {
                    StatSn::None
                },
                data,
            ));
        }
    }
    if !collapse {
        let h = Bhs::ScsiResponse(pdu::ScsiResponse {
            bidi_overflow: false,
            bidi_underflow: false,
            overflow: residual.overflow,
            underflow: residual.underflow,
            response: u8::from(target_failure),
            status: if target_failure { 0 } else { status },
            itt: job.itt,
            snack_tag: 0,
            stat_sn: 0,
            exp_cmd_sn: 0,
            max_cmd_sn: 0,
            exp_data_sn: if job.read {
                data_in_count
            } else {
                job.r2t_count
            },
            bidi_read_residual: 0,
            residual: residual.count,
        });
        let data = if resp.sense.is_empty() || target_failure {
            OutData::Empty
        } else {
            OutData::Owned(pdu::sense_segment(&resp.sense))
        };
        pdus.push(OutPdu::new(&h, StatSn::Advance, data));
    }

    let mut acts = Actions::default();
    {
        let mut st = session.lock();
        let send = match st.remove_task(job.itt) {
            Some(t) => !t.aborted,
            None => false,
        };
        release_blocked(&mut st, &mut acts);
        session.publish(&st.window);
        if send {
            // Queued under the session lock so a TMF that no longer finds
            // this task answers after it.
            conn.push_all(pdus);
        }
    }
    session.notify_changed();
    if !conn.defer_flush() {
        conn.flush();
    }
    acts.run();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digest fallback reads a file segment into memory with the
    /// device's semantics: the range's bytes, zeroes past the file's end.
    #[test]
    fn a_file_segment_read_into_memory_is_its_bytes_then_zeroes() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"0123456789").unwrap();
        let seg = OutData::File {
            file: Arc::new(f),
            offset: 4,
            len: 10,
        };
        assert_eq!(seg.len(), 10);
        let OutData::Owned(v) = seg.into_memory().unwrap() else {
            panic!("not read into memory");
        };
        assert_eq!(v, b"456789\0\0\0\0");
        let mem = OutData::Owned(b"abc".to_vec()).into_memory().unwrap();
        assert_eq!(mem.bytes(), b"abc");
    }
}
