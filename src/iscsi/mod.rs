//! The built-in iSCSI target (RFC 7143): PDU codec, text negotiation, login
//! and CHAP, sessions and connections, and the TCP server that owns them.
//!
//! Protocol modules (`pdu`, `text`, `negotiate`, `login`) do no I/O; only
//! `conn` touches sockets.

pub mod chap;
pub mod discovery;
pub mod login;
pub mod negotiate;
pub mod text;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::scsi::LunMap;

/// CHAP credentials (a user name and its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapCredentials {
    pub user: String,
    pub secret: Vec<u8>,
}

/// One iSCSI target as the server runs it. Built from the config by the
/// daemon wiring.
#[derive(Debug, Clone)]
pub struct TargetDef {
    /// iSCSI qualified name, e.g. `iqn.2026-11.io.lunmirror:default`.
    pub name: String,
    pub alias: Option<String>,
    pub luns: Arc<LunMap>,
    /// Portals this target is reachable through (for SendTargets and the
    /// target portal group). One portal group, tag 1.
    pub portals: Vec<SocketAddr>,
    /// Initiator IQNs allowed to log in; empty = everyone.
    pub allowed_initiators: Vec<String>,
    /// One-way CHAP: the initiator must authenticate with these.
    pub chap: Option<ChapCredentials>,
    /// Mutual CHAP: the target answers the initiator's challenge with these.
    pub mutual_chap: Option<ChapCredentials>,
}

pub mod conn;
pub mod digest;
pub mod pdu;
pub mod server;
pub mod session;

pub use server::{Server, ServerHandle, ServerOptions};
