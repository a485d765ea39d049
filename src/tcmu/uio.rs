//! UIO side of a TCMU device: finding `/dev/uioN` by its sysfs name
//! (`tcm-user/<hba>/<dev>/<subtype>/<cfgstring>`), mapping map0 and the
//! event counter protocol (read 4 bytes to wait, write 4 bytes to kick).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use super::ring::SharedMem;

/// The parts of a TCMU uio name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UioName {
    pub hba: u32,
    pub dev: String,
    pub subtype: String,
    pub cfgstring: String,
}

impl UioName {
    /// Parse `tcm-user/<hba>/<dev>/<subtype>/<cfgstring>`; `None` for other
    /// uio devices and for TCMU devices without a subtype.
    pub fn parse(name: &str) -> Option<UioName> {
        let rest = name.trim_end_matches('\n').strip_prefix("tcm-user/")?;
        let (hba, rest) = rest.split_once('/')?;
        let (dev, dev_config) = rest.split_once('/')?;
        let (subtype, cfgstring) = dev_config.split_once('/').unwrap_or((dev_config, ""));
        if dev.is_empty() || subtype.is_empty() {
            return None;
        }
        Some(UioName {
            hba: hba.parse().ok()?,
            dev: dev.to_string(),
            subtype: subtype.to_string(),
            cfgstring: cfgstring.to_string(),
        })
    }

    /// `<subtype>/<cfgstring>`, the kernel's `dev_config`.
    pub fn dev_config(&self) -> String {
        format!("{}/{}", self.subtype, self.cfgstring)
    }
}

/// A TCMU uio device found in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UioDevice {
    /// N of `uioN` (= the minor the netlink events carry).
    pub index: u32,
    pub name: UioName,
    /// Size of map0 in bytes.
    pub map_size: u64,
    pub version: String,
}

/// Where the sysfs and /dev files live (tests point these at a temp dir).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UioPaths {
    /// `/sys/class/uio`.
    pub class_dir: PathBuf,
    /// `/dev`.
    pub dev_dir: PathBuf,
}

impl Default for UioPaths {
    fn default() -> Self {
        UioPaths {
            class_dir: PathBuf::from("/sys/class/uio"),
            dev_dir: PathBuf::from("/dev"),
        }
    }
}

fn read_trim(p: &Path) -> io::Result<String> {
    Ok(std::fs::read_to_string(p)?.trim().to_string())
}

/// `0x40800000` or decimal.
pub fn parse_sysfs_number(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

impl UioPaths {
    /// Describe `uio<index>` if it is a TCMU device.
    pub fn device(&self, index: u32) -> io::Result<Option<UioDevice>> {
        let dir = self.class_dir.join(format!("uio{index}"));
        let name = read_trim(&dir.join("name"))?;
        let Some(name) = UioName::parse(&name) else {
            return Ok(None);
        };
        let size = read_trim(&dir.join("maps/map0/size"))?;
        let map_size = parse_sysfs_number(&size).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("uio{index}: bad map0 size {size:?}"),
            )
        })?;
        let version = read_trim(&dir.join("version")).unwrap_or_default();
        Ok(Some(UioDevice {
            index,
            name,
            map_size,
            version,
        }))
    }

    /// Every TCMU uio device present, sorted by index. Devices that vanish
    /// or are unreadable mid-scan are skipped.
    pub fn scan(&self) -> io::Result<Vec<UioDevice>> {
        let rd = match std::fs::read_dir(&self.class_dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for ent in rd.flatten() {
            let fname = ent.file_name();
            let Some(idx) = fname
                .to_str()
                .and_then(|n| n.strip_prefix("uio"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Ok(Some(d)) = self.device(idx) {
                out.push(d);
            }
        }
        out.sort_by_key(|d| d.index);
        Ok(out)
    }

    pub fn dev_path(&self, index: u32) -> PathBuf {
        self.dev_dir.join(format!("uio{index}"))
    }
}

/// An open `/dev/uioN`: the event counter.
#[derive(Debug)]
pub struct UioFd {
    file: File,
}

impl UioFd {
    /// Open exclusively (the kernel allows one opener per TCMU device and
    /// answers EBUSY to the second, e.g. when tcmu-runner holds it).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Ok(UioFd { file })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Wait up to `timeout` for the kernel's notification; returns whether
    /// one arrived (consuming the event count).
    pub fn wait(&mut self, timeout: Duration) -> io::Result<bool> {
        self.wait_with(None, timeout)
    }

    /// As [`UioFd::wait`], also returning early when `extra` is readable
    /// (e.g. a worker pool's wake pipe; the caller drains it).
    pub fn wait_with(
        &mut self,
        extra: Option<BorrowedFd<'_>>,
        timeout: Duration,
    ) -> io::Result<bool> {
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        let mut fds = vec![PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
        if let Some(fd) = extra {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
        }
        let n = match poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(n) => n,
            Err(nix::Error::EINTR) => return Ok(false),
            Err(e) => return Err(io::Error::from_raw_os_error(e as i32)),
        };
        if n == 0 {
            return Ok(false);
        }
        let revents = fds
            .first()
            .and_then(|f| f.revents())
            .unwrap_or(PollFlags::empty());
        if revents.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "uio device went away",
            ));
        }
        if !revents.contains(PollFlags::POLLIN) {
            return Ok(false);
        }
        let mut count = [0u8; 4];
        self.file.read_exact(&mut count)?;
        Ok(true)
    }

    /// Tell the kernel that `cmd_tail` moved.
    pub fn kick(&mut self) -> io::Result<()> {
        self.file.write_all(&0u32.to_ne_bytes())
    }
}

/// map0 of a TCMU uio device, mapped shared read-write.
#[derive(Debug)]
pub struct UioMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; moving the
// owner to another thread does not change who may touch it.
unsafe impl Send for UioMapping {}

impl UioMapping {
    /// Map `len` bytes of map0 (offset 0). The kernel refuses any other
    /// length, so `len` must be the sysfs map0 size.
    pub fn map(fd: &UioFd, len: u64) -> io::Result<Self> {
        let n = usize::try_from(len)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad map size"))?;
        // SAFETY: a fresh shared mapping of the uio fd at offset 0 (map0), no
        // fixed address, so no existing memory is replaced; the kernel checks
        // the length. The returned pointer is owned by `UioMapping` and
        // unmapped exactly once in Drop.
        let ptr = unsafe {
            mmap(
                None,
                n,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd.file.as_fd(),
                0,
            )
        }
        .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
        Ok(UioMapping {
            ptr: ptr.cast(),
            len: n.get(),
        })
    }
}

impl Drop for UioMapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; after drop nothing
        // references the mapping (Region borrows cannot outlive the owner).
        if let Err(e) = unsafe { munmap(self.ptr.cast(), self.len) } {
            tracing::warn!("tcmu: munmap failed: {e}");
        }
    }
}

// SAFETY: the mapping stays valid until Drop; mmap returns page-aligned
// memory (so 8-aligned); the kernel accesses cmd_head/cmd_tail as single
// aligned words (READ_ONCE/WRITE_ONCE), which is atomic on every Linux arch.
unsafe impl SharedMem for UioMapping {
    fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl AsRawFd for UioFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            UioName::parse("tcm-user/1/disk0/mirror//scratch/raw.img\n"),
            Some(UioName {
                hba: 1,
                dev: "disk0".into(),
                subtype: "mirror".into(),
                cfgstring: "/scratch/raw.img".into()
            })
        );
        let n = UioName::parse("tcm-user/12/lun0/mirror//a.img;replica=/b").unwrap();
        assert_eq!(n.cfgstring, "/a.img;replica=/b");
        assert_eq!(n.dev_config(), "mirror//a.img;replica=/b");
        assert_eq!(
            UioName::parse("tcm-user/1/d/qcow").map(|n| n.subtype),
            Some("qcow".into())
        );
        assert_eq!(UioName::parse("tcm-user/1/disk0"), None);
        assert_eq!(UioName::parse("tcm-user/x/disk0/mirror/a"), None);
        assert_eq!(UioName::parse("uio_pci_generic"), None);
        assert_eq!(UioName::parse("tcm-user/1//mirror/a"), None);
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_sysfs_number("0x40800000\n"), Some(0x4080_0000));
        assert_eq!(parse_sysfs_number("4096"), Some(4096));
        assert_eq!(parse_sysfs_number("0xzz"), None);
    }

    #[test]
    fn scan_fake_sysfs() {
        let t = tempfile::tempdir().unwrap();
        let class = t.path().join("class");
        let mk = |idx: u32, name: &str, size: &str| {
            let d = class.join(format!("uio{idx}"));
            std::fs::create_dir_all(d.join("maps/map0")).unwrap();
            std::fs::write(d.join("name"), format!("{name}\n")).unwrap();
            std::fs::write(d.join("version"), "2\n").unwrap();
            std::fs::write(d.join("maps/map0/size"), format!("{size}\n")).unwrap();
        };
        mk(3, "tcm-user/1/b/mirror//b.img", "0x1000");
        mk(0, "tcm-user/1/a/mirror//a.img", "0x40800000");
        mk(1, "uio_hv_generic", "0x10");
        mk(2, "tcm-user/1/c/mirror//c.img", "garbage");
        std::fs::create_dir_all(class.join("not-uio")).unwrap();
        let p = UioPaths {
            class_dir: class,
            dev_dir: t.path().join("dev"),
        };
        let found = p.scan().unwrap();
        assert_eq!(
            found.iter().map(|d| d.index).collect::<Vec<_>>(),
            vec![0, 3]
        );
        assert_eq!(found[0].map_size, 0x4080_0000);
        assert_eq!(found[0].name.dev, "a");
        assert_eq!(p.dev_path(3), t.path().join("dev/uio3"));
        let missing = UioPaths {
            class_dir: t.path().join("nope"),
            dev_dir: t.path().into(),
        };
        assert!(missing.scan().unwrap().is_empty());
    }

    #[test]
    fn mapping_a_regular_file_works_like_map0() {
        // A plain file stands in for /dev/uioN: same mmap path, same
        // read/write of the 4-byte counter.
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("uio0");
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        let mut fd = UioFd::open(&p).unwrap();
        let m = UioMapping::map(&fd, 8192).unwrap();
        let r = super::super::ring::Region::new(&m);
        r.write(100, b"hello").unwrap();
        drop(m);
        fd.kick().unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(&data[100..105], b"hello");
        assert!(UioMapping::map(&fd, 0).is_err());
    }
}
