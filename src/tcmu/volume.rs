//! The default [`VolumeFactory`]: the cfgstring's backing file opened with
//! the block layer's `FileDev`, optionally wrapped by the daemon (mirror
//! layer, registry) through a hook.

use std::path::Path;
use std::sync::Arc;

use super::cfgstring::Engine;
use super::frontend::{DeviceInfo, VolumeFactory};
use crate::block::file::{EngineKind, FileDev, FileDevOptions};
use crate::block::SharedDev;

/// Called with the opened primary; returns the device to serve (e.g. a
/// mirrored volume attaching `info.config.replicas`, registered under
/// `info.name`). Its `close` counterpart is [`CloseHook`].
pub type WrapHook = Arc<dyn Fn(&DeviceInfo, SharedDev) -> Result<SharedDev, String> + Send + Sync>;
/// Called when a device goes away.
pub type CloseHook = Arc<dyn Fn(&DeviceInfo) + Send + Sync>;

/// Opens `user:mirror` backing files.
#[derive(Clone, Default)]
pub struct FileVolumeFactory {
    /// Engine when the cfgstring does not name one.
    pub default_engine: EngineKind,
    pub wrap: Option<WrapHook>,
    pub on_close: Option<CloseHook>,
}

impl std::fmt::Debug for FileVolumeFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileVolumeFactory")
            .field("default_engine", &self.default_engine)
            .field("wrap", &self.wrap.is_some())
            .finish()
    }
}

impl FileVolumeFactory {
    /// Apply `create=` / `grow=` to the backing file before opening it.
    fn prepare(&self, info: &DeviceInfo) -> Result<Option<u64>, String> {
        let c = &info.config;
        let path = Path::new(&c.path);
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() && m.len() < info.size => {
                if c.grow && !c.read_only {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(path)
                        .and_then(|f| f.set_len(info.size))
                        .map_err(|e| format!("cannot grow {}: {e}", c.path))?;
                    Ok(None)
                } else {
                    Err(format!(
                        "{} is {} bytes, the device is {} (grow=yes extends it)",
                        c.path,
                        m.len(),
                        info.size
                    ))
                }
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if c.create && !c.read_only {
                    Ok(Some(info.size))
                } else {
                    Err(format!("{} does not exist (create=no)", c.path))
                }
            }
            Err(e) => Err(format!("{}: {e}", c.path)),
        }
    }
}

impl VolumeFactory for FileVolumeFactory {
    fn open(&self, info: &DeviceInfo) -> Result<SharedDev, String> {
        let c = &info.config;
        let create_size = self.prepare(info)?;
        let engine = match c.engine {
            Some(Engine::Uring) => EngineKind::IoUring,
            Some(Engine::Sync) => EngineKind::Sync,
            None => self.default_engine,
        };
        let dev = FileDev::open(
            Path::new(&c.path),
            FileDevOptions {
                engine,
                read_only: c.read_only,
                direct: c.direct.unwrap_or(false),
                create_size,
            },
        )
        .map_err(|e| format!("{}: {e}", c.path))?;
        let dev: SharedDev = Arc::new(dev);
        match &self.wrap {
            Some(wrap) => wrap(info, dev),
            None if !c.replicas.is_empty() => Err(format!(
                "replica= given but this daemon has no mirror layer wired ({} replicas)",
                c.replicas.len()
            )),
            None => Ok(dev),
        }
    }

    fn close(&self, info: &DeviceInfo) {
        if let Some(h) = &self.on_close {
            h(info);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcmu::cfgstring::CfgString;

    fn err(r: Result<SharedDev, String>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    fn info(cfg: &str, size: u64) -> DeviceInfo {
        DeviceInfo {
            uio_index: 0,
            hba: 1,
            name: "d".into(),
            config: CfgString::parse(cfg).unwrap(),
            size,
            block_size: 512,
            write_cache: false,
            serial: None,
        }
    }

    #[test]
    fn creates_missing_file_at_device_size() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a.img");
        let f = FileVolumeFactory {
            default_engine: EngineKind::Sync,
            ..Default::default()
        };
        let dev = f.open(&info(p.to_str().unwrap(), 1 << 20)).unwrap();
        assert_eq!(dev.size(), 1 << 20);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
    }

    #[test]
    fn refuses_missing_with_create_no_and_small_without_grow() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a.img");
        let f = FileVolumeFactory::default();
        let s = p.to_str().unwrap();
        assert!(f.open(&info(&format!("{s};create=no"), 4096)).is_err());
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let e = err(f.open(&info(s, 8192)));
        assert!(e.contains("grow=yes"), "{e}");
        let dev = f
            .open(&info(&format!("{s};grow=yes;engine=sync"), 8192))
            .unwrap();
        assert_eq!(dev.size(), 8192);
    }

    #[test]
    fn replicas_need_a_wrap_hook() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a.img");
        let cfg = format!("{};replica=/nonexistent/r.img", p.to_str().unwrap());
        let plain = FileVolumeFactory::default();
        assert!(err(plain.open(&info(&cfg, 4096))).contains("mirror layer"));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let wrapped = FileVolumeFactory {
            default_engine: EngineKind::Sync,
            wrap: Some(Arc::new(move |i: &DeviceInfo, d: SharedDev| {
                s2.lock().unwrap().push(i.config.replicas.clone());
                Ok(d)
            })),
            on_close: None,
        };
        assert!(wrapped.open(&info(&cfg, 4096)).is_ok());
        assert_eq!(
            seen.lock().unwrap()[0],
            vec!["/nonexistent/r.img".to_string()]
        );
    }
}
