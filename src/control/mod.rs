//! The control plane: a Unix-socket JSON-RPC 2.0 service modelled on the
//! CIM storage-configuration / replication services (AttachReplica,
//! ModifySynchronization, jobs, enumerations).
//!
//! - [`protocol`]: wire types, error codes, method names;
//! - [`rpc`]: request line → response line, no I/O;
//! - [`server`]: the socket (mode 0660, SO_PEERCRED check, threads);
//! - [`client`]: a blocking client with typed helpers;
//! - [`cli`]: the `lunmirror attach-replica | replicas | jobs |
//!   detach-replica | modify-replica` subcommands.

pub mod cli;
pub mod client;
pub mod protocol;
pub mod rpc;
pub mod server;

pub use server::{ControlServer, ServerOptions};
