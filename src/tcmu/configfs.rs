//! The configfs and module-parameter knobs of a TCMU device that a handler
//! reads (size, block size, serial) and pulls (block the device, reset its
//! ring, unblock netlink after a crash).
//!
//! `/sys/kernel/config/target/core/user_<hba>/<dev>/`:
//! `info` ("... Size: N ..."), `attrib/hw_block_size`,
//! `attrib/emulate_write_cache`, `attrib/nl_reply_supported`,
//! `wwn/vpd_unit_serial`, `action/block_dev`, `action/reset_ring`.
//! `/sys/module/target_core_user/parameters/`: `block_netlink`,
//! `reset_netlink`.

use std::io;
use std::path::{Path, PathBuf};

/// Roots of the kernel's files (tests point them at a temp dir).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPaths {
    /// `/sys/kernel/config/target/core`.
    pub core: PathBuf,
    /// `/sys/module/target_core_user/parameters`.
    pub module_params: PathBuf,
}

impl Default for KernelPaths {
    fn default() -> Self {
        KernelPaths {
            core: PathBuf::from("/sys/kernel/config/target/core"),
            module_params: PathBuf::from("/sys/module/target_core_user/parameters"),
        }
    }
}

/// How `action/reset_ring` fails the commands the kernel holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetLevel {
    /// Complete them with BUSY: the initiator retries (what a restarting
    /// handler wants).
    Retry = 1,
    /// Complete them with CHECK CONDITION.
    Fail = 2,
}

/// The configfs directory of one TCMU device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDir {
    pub path: PathBuf,
}

fn read_trim(p: &Path) -> io::Result<String> {
    Ok(std::fs::read_to_string(p)?.trim().to_string())
}

/// The number after the token `Size:` in the device's `info` text (the
/// tokens `MaxDataAreaMB:` and the like are different words).
pub fn parse_info_size(info: &str) -> Option<u64> {
    let mut words = info.split_whitespace();
    while let Some(w) = words.next() {
        if w == "Size:" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// The serial from `wwn/vpd_unit_serial` ("T10 VPD Unit Serial Number: X").
pub fn parse_unit_serial(s: &str) -> Option<String> {
    let v = s.rsplit_once(':').map(|(_, v)| v).unwrap_or(s).trim();
    (!v.is_empty()).then(|| v.to_string())
}

impl DeviceDir {
    pub fn new(paths: &KernelPaths, hba: u32, dev: &str) -> Self {
        DeviceDir {
            path: paths.core.join(format!("user_{hba}")).join(dev),
        }
    }

    /// Device size in bytes (`dev_size`).
    pub fn size(&self) -> io::Result<u64> {
        let info = read_trim(&self.path.join("info"))?;
        parse_info_size(&info).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no Size: in {}", self.path.join("info").display()),
            )
        })
    }

    fn attrib_u64(&self, name: &str) -> io::Result<u64> {
        let v = read_trim(&self.path.join("attrib").join(name))?;
        v.parse::<i64>().map(|n| n.max(0) as u64).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidData, format!("attrib/{name}: {v:?}"))
        })
    }

    pub fn block_size(&self) -> io::Result<u32> {
        self.attrib_u64("hw_block_size").map(|n| n as u32)
    }

    pub fn write_cache(&self) -> io::Result<bool> {
        self.attrib_u64("emulate_write_cache").map(|n| n != 0)
    }

    /// Whether the kernel waits for `*_DONE` replies for this device.
    pub fn nl_reply_supported(&self) -> bool {
        read_trim(&self.path.join("attrib/nl_reply_supported"))
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
            .is_some_and(|v| v > 0)
    }

    pub fn unit_serial(&self) -> Option<String> {
        read_trim(&self.path.join("wwn/vpd_unit_serial"))
            .ok()
            .and_then(|s| parse_unit_serial(&s))
    }

    /// `action/block_dev`: while blocked the kernel queues new commands
    /// instead of putting them on the ring.
    pub fn block(&self, on: bool) -> io::Result<()> {
        std::fs::write(
            self.path.join("action/block_dev"),
            if on { "1" } else { "0" },
        )
    }

    /// `action/reset_ring` (device must be blocked): the kernel fails the
    /// commands on the ring and sets head = tail = 0.
    pub fn reset_ring(&self, level: ResetLevel) -> io::Result<()> {
        std::fs::write(
            self.path.join("action/reset_ring"),
            (level as u8).to_string(),
        )
    }
}

/// Block or unblock new netlink commands (module parameter).
pub fn block_netlink(paths: &KernelPaths, on: bool) -> io::Result<()> {
    std::fs::write(
        paths.module_params.join("block_netlink"),
        if on { "1" } else { "0" },
    )
}

/// Fail netlink commands still waiting for a reply from a dead daemon
/// (requires netlink to be blocked).
pub fn reset_netlink(paths: &KernelPaths) -> io::Result<()> {
    std::fs::write(paths.module_params.join("reset_netlink"), "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_size() {
        let info = "Status: ACTIVATED  Max Queue Depth: 0  SectorSize: 512  HwMaxSectors: 128\n        Config: mirror//scratch/raw.img Size: 67108864 MaxDataAreaMB: 1024 DataPagesPerBlk: 1 CmdRingSizeMB: 8\n";
        assert_eq!(parse_info_size(info), Some(67_108_864));
        assert_eq!(parse_info_size("Config: NULL CmdRingSizeMB: 8"), None);
        assert_eq!(parse_info_size("Size: lots"), None);
    }

    #[test]
    fn serial() {
        assert_eq!(
            parse_unit_serial("T10 VPD Unit Serial Number: 6b1a4e2c-1234\n").as_deref(),
            Some("6b1a4e2c-1234")
        );
        assert_eq!(parse_unit_serial("T10 VPD Unit Serial Number: "), None);
    }

    #[test]
    fn fake_configfs_round_trip() {
        let t = tempfile::tempdir().unwrap();
        let paths = KernelPaths {
            core: t.path().join("core"),
            module_params: t.path().join("params"),
        };
        let d = DeviceDir::new(&paths, 1, "disk0");
        for sub in ["attrib", "action", "wwn"] {
            std::fs::create_dir_all(d.path.join(sub)).unwrap();
        }
        std::fs::create_dir_all(&paths.module_params).unwrap();
        std::fs::write(d.path.join("info"), "Config: x Size: 4096 MaxDataAreaMB: 8").unwrap();
        std::fs::write(d.path.join("attrib/hw_block_size"), "4096\n").unwrap();
        std::fs::write(d.path.join("attrib/emulate_write_cache"), "1\n").unwrap();
        std::fs::write(d.path.join("attrib/nl_reply_supported"), "0\n").unwrap();
        std::fs::write(
            d.path.join("wwn/vpd_unit_serial"),
            "T10 VPD Unit Serial Number: abc\n",
        )
        .unwrap();
        assert_eq!(d.size().unwrap(), 4096);
        assert_eq!(d.block_size().unwrap(), 4096);
        assert!(d.write_cache().unwrap());
        assert!(!d.nl_reply_supported());
        assert_eq!(d.unit_serial().as_deref(), Some("abc"));
        d.block(true).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path.join("action/block_dev")).unwrap(),
            "1"
        );
        d.reset_ring(ResetLevel::Retry).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path.join("action/reset_ring")).unwrap(),
            "1"
        );
        block_netlink(&paths, true).unwrap();
        reset_netlink(&paths).unwrap();
        assert_eq!(
            std::fs::read_to_string(paths.module_params.join("reset_netlink")).unwrap(),
            "1"
        );
        std::fs::write(d.path.join("attrib/nl_reply_supported"), "-1\n").unwrap();
        assert!(!d.nl_reply_supported());
    }
}
