//! lunmirror: a userspace block service that serves LUNs over iSCSI (built-in
//! RFC 7143 target) or through the kernel's TCMU, and mirrors every write to
//! replicas (sync fan-out or an ordered async journal).
//!
//! Data flows one way: frontend (`iscsi`, `tcmu`) → `scsi` (all SCSI
//! semantics) → `block::BlockDev` (byte ranges only) → `mirror` → files.

pub mod block;
pub mod config;
pub mod control;
pub mod daemon;
pub mod iscsi;
pub mod jobs;
pub mod mirror;
pub mod registry;
pub mod scsi;
pub mod tcmu;
