//! systemd readiness notification (`sd_notify(3)` protocol) without
//! libsystemd: one datagram of `KEY=VALUE` lines to the Unix socket named
//! by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
//! Not TCMU-specific; it lives here because `Type=notify` is part of the
//! TCMU/systemd deliverable. With no `$NOTIFY_SOCKET` every call is a no-op.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    sock: Option<(UnixDatagram, SocketAddr)>,
}

fn addr_of(name: &str) -> io::Result<SocketAddr> {
    match name.strip_prefix('@') {
        Some(abs) => SocketAddr::from_abstract_name(abs.as_bytes()),
        None if name.starts_with('/') => SocketAddr::from_pathname(name),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NOTIFY_SOCKET {name:?} is neither a path nor @abstract"),
        )),
    }
}

/// Sanitise a free-text STATUS= value: one line.
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c == '\n' { ' ' } else { c }).collect()
}

impl Notifier {
    /// From `$NOTIFY_SOCKET` (left in the environment).
    pub fn from_env() -> io::Result<Self> {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(name) if !name.is_empty() => Self::to(&name),
            _ => Ok(Notifier { sock: None }),
        }
    }

    /// Notify to an explicit socket name (tests, or a value saved earlier).
    pub fn to(name: &str) -> io::Result<Self> {
        let addr = addr_of(name)?;
        let sock = UnixDatagram::unbound()?;
        Ok(Notifier {
            sock: Some((sock, addr)),
        })
    }

    pub fn enabled(&self) -> bool {
        self.sock.is_some()
    }

    /// Send raw `KEY=VALUE\n...` state.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        match &self.sock {
            Some((s, addr)) => s.send_to_addr(state.as_bytes(), addr).map(|_| ()),
            None => Ok(()),
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.notify(&format!(
            "READY=1\nSTATUS={}\nMAINPID={}\n",
            one_line(status),
            std::process::id()
        ))
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) -> io::Result<()> {
        self.notify(&format!("STOPPING=1\nSTATUS={}\n", one_line(status)))
    }

    /// `STATUS=...`.
    pub fn status(&self, status: &str) -> io::Result<()> {
        self.notify(&format!("STATUS={}\n", one_line(status)))
    }

    /// `RELOADING=1`.
    pub fn reloading(&self) -> io::Result<()> {
        self.notify("RELOADING=1\n")
    }

    /// `WATCHDOG=1` keep-alive.
    pub fn watchdog(&self) -> io::Result<()> {
        self.notify("WATCHDOG=1\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_socket() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("notify");
        let rx = UnixDatagram::bind(&p).unwrap();
        let n = Notifier::to(p.to_str().unwrap()).unwrap();
        assert!(n.enabled());
        n.ready("serving 2 devices\nsecond line").unwrap();
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        let msg = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(msg.starts_with("READY=1\nSTATUS=serving 2 devices second line\nMAINPID="));
        n.stopping("bye").unwrap();
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1\nSTATUS=bye\n");
        n.status("x").unwrap();
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STATUS=x\n");
    }

    #[test]
    fn abstract_socket_names_work() {
        let name = format!("lunmirror-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
            .unwrap();
        let n = Notifier::to(&format!("@{name}")).unwrap();
        n.watchdog().unwrap();
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1\n");
    }

    #[test]
    fn bad_names_and_absent_socket() {
        assert!(Notifier::to("relative").is_err());
        let off = Notifier { sock: None };
        assert!(!off.enabled());
        off.ready("x").unwrap();
    }
}
