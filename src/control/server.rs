//! The control socket: a Unix stream socket speaking JSON-RPC 2.0, one
//! object per line, served by plain threads (one accept thread, one thread
//! per connection, bounded).
//!
//! - Created with mode 0660: it is bound under a temporary name, chmod-ed
//!   and then renamed into place, so it is never reachable with looser
//!   permissions. A stale socket (nobody listening) is replaced; a live one
//!   or a non-socket file at the path is an error.
//! - Peers are checked with SO_PEERCRED: root, the daemon's own user, and
//!   members (primary or supplementary group) of the socket's group.
//! - Request lines are capped at [`MAX_REQUEST`] bytes; a longer line gets
//!   an Invalid Request error and is skipped, the connection stays usable.

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::protocol::{code, Response, RpcError, MAX_REQUEST};
use super::rpc;
use crate::registry::Registry;

/// Server settings.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    pub max_request: usize,
    pub max_connections: usize,
    /// Socket file mode.
    pub mode: u32,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_request: MAX_REQUEST,
            max_connections: 64,
            mode: 0o660,
        }
    }
}

/// A running control server. Dropping it shuts it down.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

const POLL: Duration = Duration::from_millis(100);

fn prepare_path(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by a running server", path.display()),
            )),
            Err(_) => std::fs::remove_file(path),
        },
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
    }
}

impl ControlServer {
    /// Serve `registry` on `socket_path` with default options.
    pub fn start(socket_path: &Path, registry: Arc<Registry>) -> io::Result<ControlServer> {
        Self::start_with(socket_path, registry, ServerOptions::default())
    }

    pub fn start_with(
        socket_path: &Path,
        registry: Arc<Registry>,
        opts: ServerOptions,
    ) -> io::Result<ControlServer> {
        prepare_path(socket_path)?;
        let dir = socket_path.parent().unwrap_or_else(|| Path::new("."));
        let tmp = dir.join(format!(".control.{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(opts.mode))
            .and_then(|_| std::fs::rename(&tmp, socket_path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let sock_gid = std::fs::metadata(socket_path)?.gid();
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let active = Arc::new(AtomicUsize::new(0));
        let (s2, c2) = (stop.clone(), conns.clone());
        let accept = std::thread::Builder::new()
            .name("control-accept".into())
            .spawn(move || accept_loop(listener, registry, opts, sock_gid, s2, c2, active))?;
        tracing::info!(path = %socket_path.display(), "control socket listening");
        Ok(ControlServer {
            path: socket_path.to_path_buf(),
            stop,
            accept: Some(accept),
            conns,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop accepting, close connections, remove the socket file.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
            let conns = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|e| e.into_inner()));
            for c in conns {
                let _ = c.join();
            }
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn accept_loop(
    listener: UnixListener,
    registry: Arc<Registry>,
    opts: ServerOptions,
    sock_gid: u32,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    active: Arc<AtomicUsize>,
) {
    while !stop.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(POLL);
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                std::thread::sleep(POLL);
                continue;
            }
        };
        let _ = stream.set_nonblocking(false);
        if let Err(why) = check_peer(&stream, sock_gid) {
            tracing::warn!(%why, "control socket peer rejected");
            reject(
                stream,
                code::PERMISSION_DENIED,
                &format!("permission denied: {why}"),
            );
            continue;
        }
        if active.load(Ordering::SeqCst) >= opts.max_connections {
            reject(stream, code::SERVER_BUSY, "too many connections");
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (reg, st, act) = (registry.clone(), stop.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                if let Err(e) = serve(stream, &reg, opts.max_request, &st) {
                    tracing::debug!(error = %e, "control connection ended");
                }
                act.fetch_sub(1, Ordering::SeqCst);
            });
        match spawned {
            Ok(h) => {
                let mut g = conns.lock().unwrap_or_else(|e| e.into_inner());
                g.retain(|h| !h.is_finished());
                g.push(h);
            }
            Err(e) => {
                active.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!(error = %e, "cannot start control connection thread");
            }
        }
    }
}

fn reject(mut stream: UnixStream, code: i64, msg: &str) {
    let r = Response::err(serde_json::Value::Null, RpcError::new(code, msg));
    if let Ok(mut bytes) = serde_json::to_vec(&r) {
        bytes.push(b'\n');
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = stream.write_all(&bytes);
    }
}

/// Supplementary groups of a process, from /proc/<pid>/status.
fn groups_of(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn check_peer(stream: &UnixStream, sock_gid: u32) -> Result<(), String> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| format!("SO_PEERCRED failed: {e}"))?;
    let (uid, gid, pid) = (cred.uid(), cred.gid(), cred.pid());
    let me = nix::unistd::geteuid().as_raw();
    if uid == 0 || uid == me || gid == sock_gid || groups_of(pid).contains(&sock_gid) {
        Ok(())
    } else {
        Err(format!(
            "uid {uid} gid {gid} is neither root nor in group {sock_gid}"
        ))
    }
}

/// Serve one connection until EOF, error or server stop.
fn serve(mut stream: UnixStream, reg: &Registry, max: usize, stop: &AtomicBool) -> io::Result<()> {
    stream.set_read_timeout(Some(POLL))?;
    let mut out = stream.try_clone()?;
    out.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    // Skipping the rest of an over-long line.
    let mut discarding = false;
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        let mut data = chunk.get(..n).unwrap_or_default();
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            let (line, rest) = data.split_at(pos);
            data = rest.get(1..).unwrap_or_default();
            if discarding {
                discarding = false;
                buf.clear();
                continue;
            }
            buf.extend_from_slice(line);
            if buf.len() > max {
                write_line(&mut out, &rpc::too_large(max))?;
            } else {
                let trimmed = trim(&buf);
                if !trimmed.is_empty() {
                    if let Some(resp) = rpc::handle_line(reg, trimmed) {
                        write_line(&mut out, &resp)?;
                    }
                }
            }
            buf.clear();
        }
        if !discarding {
            buf.extend_from_slice(data);
            if buf.len() > max {
                write_line(&mut out, &rpc::too_large(max))?;
                buf.clear();
                discarding = true;
            }
        }
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    b.get(start..end).unwrap_or_default()
}

fn write_line(out: &mut UnixStream, bytes: &[u8]) -> io::Result<()> {
    let mut v = Vec::with_capacity(bytes.len() + 1);
    v.extend_from_slice(bytes);
    v.push(b'\n');
    out.write_all(&v)
}
