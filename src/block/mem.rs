//! An in-memory `BlockDev`, for tests and benchmarks of the layers above the
//! block layer (SCSI core, mirror layer) without touching a file.

use std::sync::RwLock;

use super::{check_range, BlockCaps, BlockDev, BlockResult, WriteFlags};

/// A RAM-backed device of fixed size, zero-filled.
#[derive(Debug)]
pub struct MemDev {
    data: RwLock<Vec<u8>>,
}

impl MemDev {
    pub fn new(size: u64) -> Self {
        MemDev {
            data: RwLock::new(vec![0; size as usize]),
        }
    }

    /// A copy of the whole contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl BlockDev for MemDev {
    fn size(&self) -> u64 {
        self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        check_range(data.len() as u64, offset, buf.len() as u64)?;
        let start = offset as usize;
        buf.copy_from_slice(&data[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _flags: WriteFlags) -> BlockResult<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        check_range(data.len() as u64, offset, buf.len() as u64)?;
        let start = offset as usize;
        data[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }

    fn caps(&self) -> BlockCaps {
        BlockCaps::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_round_trips_and_range_is_checked() {
        let dev = MemDev::new(4096);
        dev.write_at(b"hello", 100, WriteFlags::default()).unwrap();
        let mut buf = [0u8; 5];
        dev.read_at(&mut buf, 100).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(dev.read_at(&mut buf, 4092).is_err());
        assert!(dev
            .write_at(&buf, u64::MAX - 1, WriteFlags::default())
            .is_err());
    }

    #[test]
    fn memory_has_no_file_extent_but_checks_the_range() {
        let dev = MemDev::new(128 * 1024);
        assert!(dev.file_extent(0, 128 * 1024).unwrap().is_none());
        assert!(dev.file_extent(4096, 128 * 1024).is_err());
    }
}
