//! The iSCSI target server: accepts TCP connections on the listeners the
//! daemon bound, runs one thread per connection (login, then full feature
//! phase, see `conn.rs`), keeps the registry of sessions (TSIH assignment,
//! session reinstatement, adding connections), and shuts down gracefully.
//!
//! Blocking std sockets and threads, no async runtime: a connection is a
//! reader thread plus a small pool of worker threads that execute SCSI
//! commands concurrently.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::conn;
use super::login::LoginConfig;
use super::negotiate::TargetLimits;
use super::session::Session;
use super::TargetDef;

/// Tunables of the server beyond the negotiated limits.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Commands in flight per session (the CmdSN window).
    pub queue_depth: u32,
    /// Worker threads per connection (grown on demand up to this).
    pub max_workers_per_connection: usize,
    /// Largest Expected Data Transfer Length of one write we buffer.
    pub max_command_data: u32,
    /// Write data one session may hold buffered at once; beyond it
    /// commands get TASK SET FULL.
    pub session_data_budget: usize,
    /// Idle time after which we ping the initiator with a NOP-In.
    pub nop_interval: Duration,
    /// Time a pinged initiator has to show life before the connection is
    /// closed.
    pub nop_timeout: Duration,
    /// Time a new connection has to complete login.
    pub login_timeout: Duration,
    /// Time connections get at shutdown to finish their commands.
    pub shutdown_grace: Duration,
    /// Time a logout or TMF waits for running commands.
    pub task_wait_timeout: Duration,
    /// Granularity at which blocked readers look at timers and shutdown.
    pub tick: Duration,
    /// Connections served at once; more are closed right after accept.
    pub max_connections: usize,
    /// Target portal group tag of our one portal group.
    pub target_portal_group_tag: u16,
    /// Send the data of large plain READs of file-backed LUNs straight
    /// from the page cache with `sendfile(2)` instead of reading it into
    /// a buffer first (see `scsi::sbc::read` for the semantics, and
    /// `docs/performance.md`). `daemon.zero_copy_read` in the config.
    pub zero_copy_read: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            queue_depth: 128,
            max_workers_per_connection: 8,
            max_command_data: 64 << 20,
            session_data_budget: 512 << 20,
            nop_interval: Duration::from_secs(15),
            // Single-threaded initiators (libiscsi and what is built on
            // it) answer a ping only when they next use the connection;
            // idle ones must survive a minute without turning into a new
            // I_T nexus (libiscsi's Sanitize.Reset polls every 60 s).
            nop_timeout: Duration::from_secs(60),
            login_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            task_wait_timeout: Duration::from_secs(30),
            tick: Duration::from_millis(200),
            max_connections: 1024,
            target_portal_group_tag: 1,
            zero_copy_read: true,
        }
    }
}

/// Sessions by TSIH.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    sessions: HashMap<u16, Arc<Session>>,
    next_tsih: u16,
}

impl Registry {
    /// A TSIH not in use (never 0).
    pub fn alloc_tsih(&mut self) -> Option<u16> {
        for _ in 0..=u16::MAX {
            self.next_tsih = self.next_tsih.wrapping_add(1);
            if self.next_tsih != 0 && !self.sessions.contains_key(&self.next_tsih) {
                return Some(self.next_tsih);
            }
        }
        None
    }

    pub fn insert(&mut self, s: Arc<Session>) {
        self.sessions.insert(s.tsih, s);
    }

    pub fn get(&self, tsih: u16) -> Option<&Arc<Session>> {
        self.sessions.get(&tsih)
    }

    /// Remove `s` if it is still the session registered under its TSIH;
    /// returns whether it was.
    pub fn remove(&mut self, s: &Arc<Session>) -> bool {
        if self
            .sessions
            .get(&s.tsih)
            .is_some_and(|cur| Arc::ptr_eq(cur, s))
        {
            self.sessions.remove(&s.tsih);
            true
        } else {
            false
        }
    }

    pub fn all(&self) -> Vec<Arc<Session>> {
        self.sessions.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }
}

/// State shared by the server and all its connections.
#[derive(Debug)]
pub(crate) struct Shared {
    pub opts: ServerOptions,
    pub login: Arc<LoginConfig>,
    registry: Mutex<Registry>,
    pub shutdown: AtomicBool,
    pub next_conn_id: AtomicU64,
    pub live_connections: AtomicUsize,
    /// Data-In bytes sent from backing files with `sendfile`, all
    /// connections.
    pub sent_by_ref: AtomicU64,
}

impl Shared {
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sessions logged in to the target named `target`.
    pub fn sessions_of_target(&self, target: &str) -> Vec<Arc<Session>> {
        self.registry()
            .all()
            .into_iter()
            .filter(|s| s.target().is_some_and(|t| t.name == target))
            .collect()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }
}

/// Stops a running [`Server`]; cheap to clone and send.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
    wake: Arc<Option<UnixStream>>,
}

impl ServerHandle {
    /// Stop accepting, let in-flight SCSI commands finish and their
    /// responses go out, then close connections. [`Server::run`] returns
    /// when that is done.
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        if let Some(w) = self.wake.as_ref() {
            let _ = (&*w).write(&[1]);
        }
    }

    /// Number of logged-in sessions.
    pub fn session_count(&self) -> usize {
        self.shared.registry().len()
    }

    /// Number of open connections (logging in or logged in).
    pub fn connection_count(&self) -> usize {
        self.shared.live_connections.load(Ordering::Acquire)
    }

    /// Data-In bytes sent so far straight from backing files (`sendfile`,
    /// see [`ServerOptions::zero_copy_read`]) rather than from buffers.
    pub fn data_in_sent_by_ref(&self) -> u64 {
        self.shared.sent_by_ref.load(Ordering::Relaxed)
    }
}

/// The iSCSI target server.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    listeners: Vec<TcpListener>,
    wake_rx: Option<UnixStream>,
    wake_tx: Arc<Option<UnixStream>>,
}

impl Server {
    /// A server for `targets` on already bound `listeners`.
    pub fn new(
        targets: Vec<Arc<TargetDef>>,
        listeners: Vec<TcpListener>,
        limits: TargetLimits,
    ) -> Server {
        Server::with_options(targets, listeners, limits, ServerOptions::default())
    }

    /// Like [`Server::new`] with explicit tunables.
    pub fn with_options(
        targets: Vec<Arc<TargetDef>>,
        listeners: Vec<TcpListener>,
        limits: TargetLimits,
        opts: ServerOptions,
    ) -> Server {
        let login = LoginConfig {
            targets,
            limits,
            target_portal_group_tag: opts.target_portal_group_tag,
            ..LoginConfig::default()
        };
        Server::with_login_config(login, listeners, opts)
    }

    /// Full control over the login configuration (discovery CHAP...).
    pub fn with_login_config(
        login: LoginConfig,
        listeners: Vec<TcpListener>,
        opts: ServerOptions,
    ) -> Server {
        // Without the socket pair (fd exhaustion) shutdown still works,
        // through the accept loop's poll timeout.
        let (wake_rx, wake_tx) = match UnixStream::pair() {
            Ok((rx, tx)) => {
                let _ = rx.set_nonblocking(true);
                (Some(rx), Some(tx))
            }
            Err(e) => {
                tracing::warn!("no wake-up socket pair: {e}");
                (None, None)
            }
        };
        Server {
            shared: Arc::new(Shared {
                opts,
                login: Arc::new(login),
                registry: Mutex::new(Registry::default()),
                shutdown: AtomicBool::new(false),
                next_conn_id: AtomicU64::new(1),
                live_connections: AtomicUsize::new(0),
                sent_by_ref: AtomicU64::new(0),
            }),
            listeners,
            wake_rx,
            wake_tx: Arc::new(wake_tx),
        }
    }

    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            shared: self.shared.clone(),
            wake: self.wake_tx.clone(),
        }
    }

    /// Serve until [`ServerHandle::shutdown`]; returns once every
    /// connection has finished.
    pub fn run(self) -> io::Result<()> {
        for l in &self.listeners {
            l.set_nonblocking(true)?;
        }
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let result = self.accept_loop(&mut threads);
        drop(self.listeners);
        // Connections notice the flag on their next tick and drain.
        self.shared.shutdown.store(true, Ordering::Release);
        for t in threads {
            let _ = t.join();
        }
        result
    }

    fn accept_loop(&self, threads: &mut Vec<JoinHandle<()>>) -> io::Result<()> {
        loop {
            if self.shared.is_shutting_down() {
                return Ok(());
            }
            let ready: Vec<bool> = {
                let mut fds: Vec<PollFd<'_>> = self
                    .listeners
                    .iter()
                    .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN))
                    .collect();
                if let Some(w) = &self.wake_rx {
                    fds.push(PollFd::new(w.as_fd(), PollFlags::POLLIN));
                }
                match poll(&mut fds, PollTimeout::from(500u16)) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(io::Error::from(e)),
                }
                fds.iter()
                    .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                    .collect()
            };
            if let Some(w) = &self.wake_rx {
                if ready.get(self.listeners.len()).copied().unwrap_or(false) {
                    let mut b = [0u8; 16];
                    let _ = (&*w).read(&mut b);
                }
            }
            for (l, _) in self.listeners.iter().zip(&ready).filter(|(_, r)| **r) {
                loop {
                    match l.accept() {
                        Ok((stream, peer)) => {
                            threads.retain(|t| !t.is_finished());
                            let live = self.shared.live_connections.load(Ordering::Acquire);
                            if live >= self.shared.opts.max_connections {
                                tracing::warn!(%peer, "connection limit reached, closing");
                                continue;
                            }
                            let _ = stream.set_nonblocking(false);
                            self.shared.live_connections.fetch_add(1, Ordering::AcqRel);
                            let shared = self.shared.clone();
                            let t = std::thread::Builder::new()
                                .name(format!("iscsi-conn {peer}"))
                                .spawn(move || {
                                    conn::serve(shared.clone(), stream, peer);
                                    shared.live_connections.fetch_sub(1, Ordering::AcqRel);
                                });
                            match t {
                                Ok(t) => threads.push(t),
                                Err(e) => {
                                    self.shared.live_connections.fetch_sub(1, Ordering::AcqRel);
                                    tracing::error!("cannot spawn connection thread: {e}");
                                }
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            // ECONNABORTED, EMFILE...: keep serving.
                            tracing::warn!("accept: {e}");
                            break;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsih_allocation_skips_zero_and_used() {
        let mut r = Registry {
            next_tsih: u16::MAX - 1,
            ..Registry::default()
        };
        assert_eq!(r.alloc_tsih(), Some(u16::MAX));
        assert_eq!(r.alloc_tsih(), Some(1));
    }

    #[test]
    fn shutdown_of_an_idle_server_returns() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = Server::new(Vec::new(), vec![l], TargetLimits::default());
        let h = server.handle();
        let t = std::thread::spawn(move || server.run());
        std::thread::sleep(Duration::from_millis(50));
        h.shutdown();
        t.join().unwrap().unwrap();
        assert_eq!(h.connection_count(), 0);
    }
}
