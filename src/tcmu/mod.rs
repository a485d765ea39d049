//! The TCMU frontend: the kernel's LIO target hands SCSI commands of
//! `user:mirror` backstores to this daemon through the target_core_user
//! command ring (`/dev/uioN`, generic netlink family "TCM-USER").
//!
//! Layers, bottom up: `sys` (the uapi ABI), `ring` (the shared-memory
//! command ring: all pointer work, bounds-checked), `netlink` (device
//! events and replies), `uio` / `configfs` (finding, mapping and resetting
//! devices), `cfgstring` (what `user:mirror` devices are configured with),
//! `frontend` (one thread per device ring feeding the SCSI core, one
//! manager thread for netlink). `sim` plays the kernel's part for tests.

pub mod cfgstring;
pub mod configfs;
pub mod frontend;
pub mod netlink;
pub mod ring;
pub mod sdnotify;
pub mod sim;
pub mod sys;
pub mod uio;
pub mod volume;
pub mod xfer;

pub use frontend::{
    DeviceInfo, DeviceStatus, Frontend, FrontendHandle, HandlerConfig, ScsiTarget, VolumeFactory,
};
pub use volume::FileVolumeFactory;
