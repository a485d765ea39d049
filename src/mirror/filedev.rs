//! A minimal pread/pwrite `BlockDev` over an existing regular file or block
//! device, used to open replica targets (`TargetElement` paths). It never
//! creates or grows the file. (The block layer's own file backstore can
//! replace it through `Registry`'s target opener.)

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::block::{check_range, BlockCaps, BlockDev, BlockError, BlockResult, WriteFlags};

/// See the module documentation.
#[derive(Debug)]
pub struct FileTarget {
    file: File,
    size: u64,
}

impl FileTarget {
    /// Open `path` read-write; its size is its current length (regular
    /// file) or device size (block device).
    pub fn open(path: &Path) -> io::Result<FileTarget> {
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.seek(SeekFrom::End(0))?;
        Ok(FileTarget { file, size })
    }
}

impl BlockDev for FileTarget {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(BlockError::from_io)
    }

    fn write_at(&self, buf: &[u8], offset: u64, flags: WriteFlags) -> BlockResult<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(BlockError::from_io)?;
        if flags.fua {
            self.file.sync_data().map_err(BlockError::from_io)?;
        }
        Ok(())
    }

    fn flush(&self) -> BlockResult<()> {
        self.file.sync_data().map_err(BlockError::from_io)
    }

    fn caps(&self) -> BlockCaps {
        BlockCaps::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_grows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.img");
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        let t = FileTarget::open(&p).unwrap();
        assert_eq!(t.size(), 8192);
        t.write_at(b"abc", 8189, WriteFlags { fua: true }).unwrap();
        assert!(t.write_at(b"abcd", 8189, WriteFlags::default()).is_err());
        let mut b = [0u8; 3];
        t.read_at(&mut b, 8189).unwrap();
        assert_eq!(&b, b"abc");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 8192);
        assert!(FileTarget::open(&dir.path().join("missing")).is_err());
    }
}
