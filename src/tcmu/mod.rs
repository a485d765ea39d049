//! The TCMU frontend: the kernel's LIO target hands SCSI commands of
//! `user:mirror` backstores to this daemon through the target_core_user
//! command ring (`/dev/uioN`, generic netlink family "TCM-USER").
//!
//! Layers: `sys` (the uapi ABI), `ring` (the shared-memory command ring,
//! the only `unsafe` here besides the mmap/netlink system calls).

pub mod cfgstring;
pub mod netlink;
pub mod ring;
pub mod sim;
pub mod sys;
