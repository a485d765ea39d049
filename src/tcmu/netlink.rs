//! Generic netlink for TCMU: the family "TCM-USER" (version 2) announces
//! devices on its multicast group "config" (ADDED_DEVICE, REMOVED_DEVICE,
//! RECONFIG_DEVICE) and accepts SET_FEATURES and the `*_DONE` replies.
//!
//! The first half is a checked codec over byte slices (no I/O): netlink
//! message framing, attributes, the controller's family lookup, the TCMU
//! events. The second half is the socket: one socket joined to the
//! multicast group for events, one for requests and their acks, so that
//! events never interleave with a request's answer.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    bind, recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};

use super::sys::*;

pub const FAMILY_NAME: &str = "TCM-USER";
pub const MCAST_GROUP: &str = "config";

// Netlink and generic netlink constants (linux/netlink.h, linux/genetlink.h).
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;
pub const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_NEWFAMILY: u8 = 1;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;
/// The TCM-USER family's version (target_core_user.c).
pub const TCMU_GENL_VERSION: u8 = 2;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Malformed netlink input or a refusal from the kernel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NlError {
    #[error("netlink message truncated ({have} of {need} bytes)")]
    Truncated { have: usize, need: usize },
    #[error("netlink attribute truncated at byte {at}")]
    AttrTruncated { at: usize },
    #[error("attribute {ty} has {len} bytes, expected {want}")]
    AttrSize { ty: u16, len: usize, want: usize },
    #[error("attribute {0} is missing")]
    Missing(u16),
    #[error("attribute {0} is not a valid string")]
    BadString(u16),
    #[error("kernel answered errno {0}")]
    Kernel(i32),
    #[error("generic netlink family {0} is not registered (is target_core_user loaded?)")]
    NoFamily(String),
    #[error("multicast group {0} not found")]
    NoGroup(String),
}

/// `struct nlmsghdr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NlHeader {
    pub len: u32,
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
}

/// One netlink message: its header and the bytes after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub header: NlHeader,
    pub payload: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Split a datagram into its netlink messages.
pub fn split_messages(buf: &[u8]) -> Result<Vec<Message<'_>>, NlError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < buf.len() {
        let rest = buf.get(at..).unwrap_or_default();
        let trunc = NlError::Truncated {
            have: rest.len(),
            need: NLMSG_HDRLEN,
        };
        let len = u32_at(rest, 0).ok_or(trunc.clone())?;
        let header = NlHeader {
            len,
            ty: u16_at(rest, 4).ok_or(trunc.clone())?,
            flags: u16_at(rest, 6).ok_or(trunc.clone())?,
            seq: u32_at(rest, 8).ok_or(trunc.clone())?,
            pid: u32_at(rest, 12).ok_or(trunc)?,
        };
        let l = len as usize;
        if l < NLMSG_HDRLEN || l > rest.len() {
            return Err(NlError::Truncated {
                have: rest.len(),
                need: l.max(NLMSG_HDRLEN),
            });
        }
        out.push(Message {
            header,
            payload: rest.get(NLMSG_HDRLEN..l).unwrap_or_default(),
        });
        at += align4(l);
    }
    Ok(out)
}

/// Parsed attributes of one level (nested ones are parsed on demand).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attrs<'a> {
    items: Vec<(u16, &'a [u8])>,
}

impl<'a> Attrs<'a> {
    pub fn parse(buf: &'a [u8]) -> Result<Self, NlError> {
        let mut items = Vec::new();
        let mut at = 0usize;
        while at + NLA_HDRLEN <= buf.len() {
            let len = u16_at(buf, at).ok_or(NlError::AttrTruncated { at })? as usize;
            let ty = u16_at(buf, at + 2).ok_or(NlError::AttrTruncated { at })? & NLA_TYPE_MASK;
            if len < NLA_HDRLEN {
                return Err(NlError::AttrTruncated { at });
            }
            let data = buf
                .get(at + NLA_HDRLEN..at + len)
                .ok_or(NlError::AttrTruncated { at })?;
            items.push((ty, data));
            at += align4(len);
        }
        Ok(Attrs { items })
    }

    pub fn get(&self, ty: u16) -> Option<&'a [u8]> {
        self.items.iter().find(|(t, _)| *t == ty).map(|(_, d)| *d)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u16, &'a [u8])> + '_ {
        self.items.iter().copied()
    }

    fn fixed<const N: usize>(&self, ty: u16) -> Result<Option<[u8; N]>, NlError> {
        match self.get(ty) {
            None => Ok(None),
            Some(d) => d.try_into().map(Some).map_err(|_| NlError::AttrSize {
                ty,
                len: d.len(),
                want: N,
            }),
        }
    }

    pub fn u8(&self, ty: u16) -> Result<Option<u8>, NlError> {
        Ok(self.fixed::<1>(ty)?.map(|b| b[0]))
    }
    pub fn u16(&self, ty: u16) -> Result<Option<u16>, NlError> {
        Ok(self.fixed(ty)?.map(u16::from_ne_bytes))
    }
    pub fn u32(&self, ty: u16) -> Result<Option<u32>, NlError> {
        Ok(self.fixed(ty)?.map(u32::from_ne_bytes))
    }
    pub fn u64(&self, ty: u16) -> Result<Option<u64>, NlError> {
        Ok(self.fixed(ty)?.map(u64::from_ne_bytes))
    }
    /// An NLA_STRING: UTF-8, trailing NULs dropped.
    pub fn string(&self, ty: u16) -> Result<Option<String>, NlError> {
        match self.get(ty) {
            None => Ok(None),
            Some(d) => {
                let end = d.iter().position(|&b| b == 0).unwrap_or(d.len());
                let s = d.get(..end).unwrap_or_default();
                String::from_utf8(s.to_vec())
                    .map(Some)
                    .map_err(|_| NlError::BadString(ty))
            }
        }
    }
}

/// Builds the attribute part of a message.
#[derive(Debug, Clone, Default)]
pub struct AttrWriter {
    buf: Vec<u8>,
}

impl AttrWriter {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn put(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        let len = NLA_HDRLEN + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }
    pub fn put_u8(&mut self, ty: u16, v: u8) -> &mut Self {
        self.put(ty, &[v])
    }
    pub fn put_u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }
    pub fn put_i32(&mut self, ty: u16, v: i32) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }
    /// NLA_STRING with its terminating NUL, as `nla_put_string`.
    pub fn put_str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut d = s.as_bytes().to_vec();
        d.push(0);
        self.put(ty, &d)
    }
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// A complete generic netlink request.
pub fn genl_message(
    family: u16,
    flags: u16,
    seq: u32,
    cmd: u8,
    version: u8,
    attrs: &AttrWriter,
) -> Vec<u8> {
    let len = NLMSG_HDRLEN + GENL_HDRLEN + attrs.bytes().len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&family.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[cmd, version, 0, 0]);
    m.extend_from_slice(attrs.bytes());
    m
}

/// Split a generic netlink payload into (cmd, version, attributes).
pub fn genl_payload(payload: &[u8]) -> Result<(u8, u8, Attrs<'_>), NlError> {
    let hdr = payload.get(..GENL_HDRLEN).ok_or(NlError::Truncated {
        have: payload.len(),
        need: GENL_HDRLEN,
    })?;
    let attrs = Attrs::parse(payload.get(GENL_HDRLEN..).unwrap_or_default())?;
    Ok((hdr[0], hdr[1], attrs))
}

/// What the controller says about a family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyInfo {
    pub id: u16,
    pub groups: Vec<(String, u32)>,
}

/// The CTRL_CMD_GETFAMILY request for `name`.
pub fn getfamily_request(seq: u32, name: &str) -> Vec<u8> {
    let mut a = AttrWriter::new();
    a.put_str(CTRL_ATTR_FAMILY_NAME, name);
    genl_message(GENL_ID_CTRL, NLM_F_REQUEST, seq, CTRL_CMD_GETFAMILY, 1, &a)
}

/// Decode a CTRL_CMD_NEWFAMILY payload.
pub fn decode_family(payload: &[u8]) -> Result<FamilyInfo, NlError> {
    let (cmd, _, attrs) = genl_payload(payload)?;
    if cmd != CTRL_CMD_NEWFAMILY {
        return Err(NlError::Missing(CTRL_ATTR_FAMILY_ID));
    }
    let id = attrs
        .u16(CTRL_ATTR_FAMILY_ID)?
        .ok_or(NlError::Missing(CTRL_ATTR_FAMILY_ID))?;
    let mut groups = Vec::new();
    if let Some(nested) = attrs.get(CTRL_ATTR_MCAST_GROUPS) {
        for (_, grp) in Attrs::parse(nested)?.iter() {
            let g = Attrs::parse(grp)?;
            if let (Some(name), Some(gid)) = (
                g.string(CTRL_ATTR_MCAST_GRP_NAME)?,
                g.u32(CTRL_ATTR_MCAST_GRP_ID)?,
            ) {
                groups.push((name, gid));
            }
        }
    }
    Ok(FamilyInfo { id, groups })
}

/// The device an event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevRef {
    /// The uio name: `tcm-user/<hba>/<dev>/<subtype>/<cfgstring>`.
    pub name: String,
    /// The uio minor (`/dev/uio<minor>`).
    pub minor: u32,
    /// The target core's device index, needed for `*_DONE` replies.
    pub device_id: Option<u32>,
}

/// What RECONFIG_DEVICE changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconfig {
    Config(String),
    Size(u64),
    WriteCache(bool),
    /// A RECONFIG without an attribute we know.
    Other,
}

/// A TCMU configuration event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcmuEvent {
    Added(DevRef),
    Removed(DevRef),
    Reconfig(DevRef, Reconfig),
}

impl TcmuEvent {
    pub fn dev(&self) -> &DevRef {
        match self {
            TcmuEvent::Added(d) | TcmuEvent::Removed(d) | TcmuEvent::Reconfig(d, _) => d,
        }
    }

    /// The `*_DONE` command answering this event.
    pub fn done_cmd(&self) -> u8 {
        match self {
            TcmuEvent::Added(_) => TCMU_CMD_ADDED_DEVICE_DONE,
            TcmuEvent::Removed(_) => TCMU_CMD_REMOVED_DEVICE_DONE,
            TcmuEvent::Reconfig(..) => TCMU_CMD_RECONFIG_DEVICE_DONE,
        }
    }
}

/// Decode a TCM-USER multicast payload; `Ok(None)` for commands that are
/// not device events.
pub fn decode_tcmu_event(payload: &[u8]) -> Result<Option<TcmuEvent>, NlError> {
    let (cmd, _, a) = genl_payload(payload)?;
    let dev = || -> Result<DevRef, NlError> {
        Ok(DevRef {
            name: a
                .string(TCMU_ATTR_DEVICE)?
                .ok_or(NlError::Missing(TCMU_ATTR_DEVICE))?,
            minor: a
                .u32(TCMU_ATTR_MINOR)?
                .ok_or(NlError::Missing(TCMU_ATTR_MINOR))?,
            device_id: a.u32(TCMU_ATTR_DEVICE_ID)?,
        })
    };
    Ok(Some(match cmd {
        TCMU_CMD_ADDED_DEVICE => TcmuEvent::Added(dev()?),
        TCMU_CMD_REMOVED_DEVICE => TcmuEvent::Removed(dev()?),
        TCMU_CMD_RECONFIG_DEVICE => {
            let r = if let Some(c) = a.string(TCMU_ATTR_DEV_CFG)? {
                Reconfig::Config(c)
            } else if let Some(s) = a.u64(TCMU_ATTR_DEV_SIZE)? {
                Reconfig::Size(s)
            } else if let Some(w) = a.u8(TCMU_ATTR_WRITECACHE)? {
                Reconfig::WriteCache(w != 0)
            } else {
                Reconfig::Other
            };
            TcmuEvent::Reconfig(dev()?, r)
        }
        _ => return Ok(None),
    }))
}

/// A `*_DONE` reply: status (0 or -errno) for the device `device_id`.
pub fn done_request(family: u16, seq: u32, done_cmd: u8, status: i32, device_id: u32) -> Vec<u8> {
    let mut a = AttrWriter::new();
    a.put_i32(TCMU_ATTR_CMD_STATUS, status)
        .put_u32(TCMU_ATTR_DEVICE_ID, device_id);
    genl_message(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        done_cmd,
        TCMU_GENL_VERSION,
        &a,
    )
}

/// SET_FEATURES: tell the kernel whether this daemon sends `*_DONE` replies.
pub fn set_features_request(family: u16, seq: u32, reply_supported: bool) -> Vec<u8> {
    let mut a = AttrWriter::new();
    a.put_u8(TCMU_ATTR_SUPP_KERN_CMD_REPLY, u8::from(reply_supported));
    genl_message(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        TCMU_CMD_SET_FEATURES,
        TCMU_GENL_VERSION,
        &a,
    )
}

/// The errno of an NLMSG_ERROR payload (0 is an ack).
pub fn decode_error(payload: &[u8]) -> Result<i32, NlError> {
    payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_ne_bytes)
        .ok_or(NlError::Truncated {
            have: payload.len(),
            need: 4,
        })
}

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn nl_io(e: NlError) -> io::Error {
    match e {
        NlError::Kernel(errno) => io::Error::from_raw_os_error(errno),
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

fn genl_socket() -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkGeneric,
    )
    .map_err(nix_io)?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(nix_io)?;
    Ok(fd)
}

fn wait_readable(fd: &OwnedFd, timeout: Duration) -> io::Result<bool> {
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    match poll(
        &mut fds,
        PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
    ) {
        Ok(n) => Ok(n > 0),
        Err(nix::Error::EINTR) => Ok(false),
        Err(e) => Err(nix_io(e)),
    }
}

/// Requests to the kernel, each waiting for its ack.
pub struct GenlRequester {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl GenlRequester {
    pub fn open() -> io::Result<Self> {
        Ok(GenlRequester {
            fd: genl_socket()?,
            seq: 1,
            buf: vec![0u8; 65536],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Send `msg` (built with sequence number `seq`) and collect the
    /// messages answering it up to the ack / error / DONE.
    fn transact(&mut self, msg: &[u8], seq: u32) -> io::Result<Vec<Vec<u8>>> {
        send(self.fd.as_raw_fd(), msg, MsgFlags::empty()).map_err(nix_io)?;
        let mut answers = Vec::new();
        loop {
            if !wait_readable(&self.fd, Duration::from_secs(5))? {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no netlink answer"));
            }
            let n = recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty()).map_err(nix_io)?;
            let data = self.buf.get(..n).unwrap_or_default().to_vec();
            for m in split_messages(&data).map_err(nl_io)? {
                if m.header.seq != seq {
                    continue;
                }
                match m.header.ty {
                    NLMSG_ERROR => {
                        let errno = decode_error(m.payload).map_err(nl_io)?;
                        if errno != 0 {
                            return Err(io::Error::from_raw_os_error(-errno));
                        }
                        return Ok(answers);
                    }
                    NLMSG_DONE => return Ok(answers),
                    NLMSG_NOOP => {}
                    _ => {
                        answers.push(m.payload.to_vec());
                        if m.header.flags & 0x2 == 0 {
                            // Not multipart and no ack requested: done.
                            return Ok(answers);
                        }
                    }
                }
            }
        }
    }

    /// Look a family up by name.
    pub fn resolve(&mut self, name: &str) -> io::Result<FamilyInfo> {
        let seq = self.next_seq();
        let msg = getfamily_request(seq, name);
        match self.transact(&msg, seq) {
            Ok(answers) => {
                let first = answers
                    .first()
                    .ok_or_else(|| nl_io(NlError::NoFamily(name.into())))?;
                decode_family(first).map_err(nl_io)
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                Err(nl_io(NlError::NoFamily(name.into())))
            }
            Err(e) => Err(e),
        }
    }

    /// SET_FEATURES.
    pub fn set_features(&mut self, family: u16, reply_supported: bool) -> io::Result<()> {
        let seq = self.next_seq();
        let msg = set_features_request(family, seq, reply_supported);
        self.transact(&msg, seq).map(|_| ())
    }

    /// A `*_DONE` reply. The kernel answers ENODEV/EINVAL when it was not
    /// waiting for one (replies are per-device opt-in); callers log that.
    pub fn done(
        &mut self,
        family: u16,
        done_cmd: u8,
        status: i32,
        device_id: u32,
    ) -> io::Result<()> {
        let seq = self.next_seq();
        let msg = done_request(family, seq, done_cmd, status, device_id);
        self.transact(&msg, seq).map(|_| ())
    }
}

/// The multicast side: TCMU device events.
pub struct EventSocket {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl EventSocket {
    /// Join `group` (an id from [`FamilyInfo::groups`]).
    pub fn join(group: u32) -> io::Result<Self> {
        let fd = genl_socket()?;
        let g = group;
        // SAFETY: `fd` is an open netlink socket; the option value is a live
        // u32 on our stack whose size we pass; the kernel only reads it.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_ADD_MEMBERSHIP,
                std::ptr::from_ref(&g).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(EventSocket {
            fd,
            buf: vec![0u8; 65536],
        })
    }

    /// Wait up to `timeout` for events. `Err` with ENOBUFS means events were
    /// lost (socket overrun): the caller must rescan the devices.
    pub fn recv(&mut self, family: u16, timeout: Duration) -> io::Result<Vec<TcmuEvent>> {
        if !wait_readable(&self.fd, timeout)? {
            return Ok(Vec::new());
        }
        let n = match recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT) {
            Ok(n) => n,
            Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => return Ok(Vec::new()),
            Err(e) => return Err(nix_io(e)),
        };
        let mut out = Vec::new();
        for m in split_messages(self.buf.get(..n).unwrap_or_default()).map_err(nl_io)? {
            if m.header.ty != family {
                continue;
            }
            match decode_tcmu_event(m.payload) {
                Ok(Some(ev)) => out.push(ev),
                Ok(None) => {}
                Err(e) => tracing::warn!("tcmu: undecodable netlink event: {e}"),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A kernel-side multicast message as `tcmu_netlink_event_init` builds it.
    fn kernel_event(
        family: u16,
        cmd: u8,
        name: &str,
        minor: u32,
        id: u32,
        extra: &[(u16, Vec<u8>)],
    ) -> Vec<u8> {
        let mut a = AttrWriter::new();
        a.put_str(TCMU_ATTR_DEVICE, name)
            .put_u32(TCMU_ATTR_MINOR, minor)
            .put_u32(TCMU_ATTR_DEVICE_ID, id);
        for (t, d) in extra {
            a.put(*t, d);
        }
        genl_message(family, 0, 0, cmd, 2, &a)
    }

    #[test]
    fn added_event_decodes() {
        let m = kernel_event(
            30,
            TCMU_CMD_ADDED_DEVICE,
            "tcm-user/1/disk0/mirror//scratch/raw.img",
            0,
            7,
            &[],
        );
        let msgs = split_messages(&m).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].header.ty, 30);
        let ev = decode_tcmu_event(msgs[0].payload).unwrap().unwrap();
        assert_eq!(
            ev,
            TcmuEvent::Added(DevRef {
                name: "tcm-user/1/disk0/mirror//scratch/raw.img".into(),
                minor: 0,
                device_id: Some(7)
            })
        );
        assert_eq!(ev.done_cmd(), TCMU_CMD_ADDED_DEVICE_DONE);
    }

    #[test]
    fn reconfig_variants_decode() {
        // The kernel puts the u64 size after a PAD attribute for alignment.
        let size = kernel_event(
            30,
            TCMU_CMD_RECONFIG_DEVICE,
            "tcm-user/1/d/mirror//a",
            3,
            1,
            &[
                (TCMU_ATTR_PAD, vec![]),
                (TCMU_ATTR_DEV_SIZE, (1u64 << 30).to_ne_bytes().to_vec()),
            ],
        );
        let m = split_messages(&size).unwrap();
        assert_eq!(
            decode_tcmu_event(m[0].payload).unwrap(),
            Some(TcmuEvent::Reconfig(
                DevRef {
                    name: "tcm-user/1/d/mirror//a".into(),
                    minor: 3,
                    device_id: Some(1)
                },
                Reconfig::Size(1 << 30)
            ))
        );
        let wc = kernel_event(
            30,
            TCMU_CMD_RECONFIG_DEVICE,
            "x",
            3,
            1,
            &[(TCMU_ATTR_WRITECACHE, vec![1])],
        );
        let m = split_messages(&wc).unwrap();
        assert!(matches!(
            decode_tcmu_event(m[0].payload).unwrap(),
            Some(TcmuEvent::Reconfig(_, Reconfig::WriteCache(true)))
        ));
        let mut cfg = b"mirror//b".to_vec();
        cfg.push(0);
        let c = kernel_event(
            30,
            TCMU_CMD_RECONFIG_DEVICE,
            "x",
            3,
            1,
            &[(TCMU_ATTR_DEV_CFG, cfg)],
        );
        let m = split_messages(&c).unwrap();
        assert!(matches!(
            decode_tcmu_event(m[0].payload).unwrap(),
            Some(TcmuEvent::Reconfig(_, Reconfig::Config(ref s))) if s == "mirror//b"
        ));
    }

    #[test]
    fn missing_and_malformed_attributes_are_errors() {
        let mut a = AttrWriter::new();
        a.put_u32(TCMU_ATTR_MINOR, 1);
        let m = genl_message(30, 0, 0, TCMU_CMD_ADDED_DEVICE, 2, &a);
        let msgs = split_messages(&m).unwrap();
        assert_eq!(
            decode_tcmu_event(msgs[0].payload),
            Err(NlError::Missing(TCMU_ATTR_DEVICE))
        );
        let mut a = AttrWriter::new();
        a.put_str(TCMU_ATTR_DEVICE, "x")
            .put(TCMU_ATTR_MINOR, &[1, 2]);
        let m = genl_message(30, 0, 0, TCMU_CMD_ADDED_DEVICE, 2, &a);
        let msgs = split_messages(&m).unwrap();
        assert!(matches!(
            decode_tcmu_event(msgs[0].payload),
            Err(NlError::AttrSize { .. })
        ));
        let mut a = AttrWriter::new();
        a.put(TCMU_ATTR_DEVICE, &[0xff, 0xfe, 0])
            .put_u32(TCMU_ATTR_MINOR, 1);
        let m = genl_message(30, 0, 0, TCMU_CMD_ADDED_DEVICE, 2, &a);
        let msgs = split_messages(&m).unwrap();
        assert_eq!(
            decode_tcmu_event(msgs[0].payload),
            Err(NlError::BadString(TCMU_ATTR_DEVICE))
        );
        // SET_FEATURES from someone else is not an event.
        let m = set_features_request(30, 1, true);
        let msgs = split_messages(&m).unwrap();
        assert_eq!(decode_tcmu_event(msgs[0].payload), Ok(None));
    }

    #[test]
    fn framing_errors() {
        assert!(split_messages(&[1, 2, 3]).is_err());
        let mut m = kernel_event(30, TCMU_CMD_ADDED_DEVICE, "x", 1, 1, &[]);
        m[0] = 200; // length beyond the buffer
        assert!(split_messages(&m).is_err());
        let mut m = kernel_event(30, TCMU_CMD_ADDED_DEVICE, "x", 1, 1, &[]);
        m[0..4].copy_from_slice(&4u32.to_ne_bytes()); // shorter than a header
        assert!(split_messages(&m).is_err());
        assert!(Attrs::parse(&[8, 0, 1, 0, 1]).is_err());
        assert!(Attrs::parse(&[2, 0, 1, 0]).is_err());
    }

    #[test]
    fn two_messages_in_one_datagram() {
        let mut d = kernel_event(30, TCMU_CMD_ADDED_DEVICE, "abc", 1, 1, &[]);
        d.extend(kernel_event(30, TCMU_CMD_REMOVED_DEVICE, "abcd", 1, 1, &[]));
        let msgs = split_messages(&d).unwrap();
        assert_eq!(msgs.len(), 2);
        assert!(matches!(
            decode_tcmu_event(msgs[1].payload).unwrap(),
            Some(TcmuEvent::Removed(_))
        ));
    }

    #[test]
    fn family_reply_decodes() {
        let mut grp = AttrWriter::new();
        grp.put_str(CTRL_ATTR_MCAST_GRP_NAME, "config")
            .put_u32(CTRL_ATTR_MCAST_GRP_ID, 11);
        let mut groups = AttrWriter::new();
        groups.put(1, grp.bytes());
        let mut a = AttrWriter::new();
        a.put(CTRL_ATTR_FAMILY_ID, &29u16.to_ne_bytes())
            .put_str(CTRL_ATTR_FAMILY_NAME, FAMILY_NAME)
            .put(CTRL_ATTR_MCAST_GROUPS | 0x8000, groups.bytes());
        let m = genl_message(GENL_ID_CTRL, 0, 5, CTRL_CMD_NEWFAMILY, 2, &a);
        let msgs = split_messages(&m).unwrap();
        assert_eq!(
            decode_family(msgs[0].payload).unwrap(),
            FamilyInfo {
                id: 29,
                groups: vec![("config".into(), 11)]
            }
        );
    }

    #[test]
    fn requests_encode_as_the_kernel_expects() {
        let m = done_request(29, 9, TCMU_CMD_ADDED_DEVICE_DONE, -22, 4);
        let msgs = split_messages(&m).unwrap();
        assert_eq!(msgs[0].header.flags, NLM_F_REQUEST | NLM_F_ACK);
        let (cmd, ver, a) = genl_payload(msgs[0].payload).unwrap();
        assert_eq!((cmd, ver), (TCMU_CMD_ADDED_DEVICE_DONE, 2));
        assert_eq!(a.u32(TCMU_ATTR_CMD_STATUS).unwrap(), Some(-22i32 as u32));
        assert_eq!(a.u32(TCMU_ATTR_DEVICE_ID).unwrap(), Some(4));
        let m = set_features_request(29, 1, true);
        let msgs = split_messages(&m).unwrap();
        let (_, _, a) = genl_payload(msgs[0].payload).unwrap();
        assert_eq!(a.u8(TCMU_ATTR_SUPP_KERN_CMD_REPLY).unwrap(), Some(1));
        let m = getfamily_request(3, FAMILY_NAME);
        let msgs = split_messages(&m).unwrap();
        let (_, _, a) = genl_payload(msgs[0].payload).unwrap();
        assert_eq!(
            a.string(CTRL_ATTR_FAMILY_NAME).unwrap().as_deref(),
            Some("TCM-USER")
        );
        assert_eq!(m.len() % 4, 0);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(msgs) = split_messages(&bytes) {
                for m in msgs {
                    let _ = decode_tcmu_event(m.payload);
                    let _ = decode_family(m.payload);
                    let _ = decode_error(m.payload);
                }
            }
            let _ = Attrs::parse(&bytes);
        }

        #[test]
        fn attrs_round_trip(items in proptest::collection::vec((1u16..0x3fff, proptest::collection::vec(any::<u8>(), 0..40)), 0..8)) {
            let mut w = AttrWriter::new();
            for (t, d) in &items {
                w.put(*t, d);
            }
            let a = Attrs::parse(w.bytes()).unwrap();
            let got: Vec<(u16, Vec<u8>)> = a.iter().map(|(t, d)| (t, d.to_vec())).collect();
            prop_assert_eq!(got, items);
        }
    }
}
