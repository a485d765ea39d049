//! Reusable large I/O buffers.
//!
//! A 1 MiB READ needs a 1 MiB buffer that lives from the backstore read
//! until the last Data-In PDU carrying it is on the wire. Allocating it
//! fresh per command costs more than the data copy itself: glibc serves
//! such sizes with `mmap` (or trims them back to the kernel), so every
//! command page-faults in 256 new pages that the kernel zeroes, then
//! `vec![0; n]` zeroes them again (measured: about 30 % of the server's
//! CPU at 1 MiB QD32). The pool keeps recently freed buffers of at least
//! [`MIN_POOLED`] bytes, up to a byte cap, and hands them out again.
//!
//! Small buffers are not pooled: malloc's per-thread caches already serve
//! them without faults.
//!
//! A recycled buffer still holds the bytes of its previous use (another
//! initiator's data, possibly). [`BufPool::take_for_overwrite`] is only for
//! callers that overwrite every byte before anything reads it (a backstore
//! `read_at`, which fills the whole buffer or fails); everyone else uses
//! [`BufPool::take_zeroed`].

use std::sync::{Mutex, OnceLock};

/// Buffers shorter than this are allocated and freed normally.
pub const MIN_POOLED: usize = 64 * 1024;
/// Default cap on the bytes the process-wide pool keeps.
pub const DEFAULT_CAP: usize = 32 << 20;

/// A bounded free list of large byte buffers. See the module docs.
#[derive(Debug)]
pub struct BufPool {
    cap: usize,
    free: Mutex<Free>,
}

#[derive(Debug, Default)]
struct Free {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

impl BufPool {
    /// A pool keeping at most `cap` bytes of free buffers.
    pub fn new(cap: usize) -> BufPool {
        BufPool {
            cap,
            free: Mutex::new(Free::default()),
        }
    }

    /// Bytes currently held by free buffers.
    pub fn pooled_bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Free> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The smallest free buffer of capacity `len..=2*len`, removed from
    /// the pool (larger ones would waste memory for a small request).
    fn pop_fit(&self, len: usize) -> Option<Vec<u8>> {
        if len < MIN_POOLED {
            return None;
        }
        let mut f = self.lock();
        let limit = len.saturating_mul(2);
        let idx = f
            .bufs
            .iter()
            .enumerate()
            .filter(|(_, b)| (len..=limit).contains(&b.capacity()))
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i)?;
        let b = f.bufs.swap_remove(idx);
        f.bytes -= b.capacity();
        Some(b)
    }

    /// A buffer of `len` bytes whose contents are unspecified (left over
    /// from an earlier use): the caller must overwrite all of it before
    /// anything reads it.
    pub fn take_for_overwrite(&self, len: usize) -> Vec<u8> {
        match self.pop_fit(len) {
            Some(mut b) => {
                // Bytes below the old length are initialised already:
                // only growth past it is zero-filled.
                if b.len() >= len {
                    b.truncate(len);
                } else {
                    b.resize(len, 0);
                }
                b
            }
            None => vec![0; len],
        }
    }

    /// A buffer of `len` zero bytes.
    pub fn take_zeroed(&self, len: usize) -> Vec<u8> {
        match self.pop_fit(len) {
            Some(mut b) => {
                b.clear();
                b.resize(len, 0);
                b
            }
            None => vec![0; len],
        }
    }

    /// Return a buffer for reuse (dropped if small or the pool is full).
    pub fn give(&self, buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap < MIN_POOLED || cap > self.cap {
            return;
        }
        let mut f = self.lock();
        if f.bytes + cap <= self.cap {
            f.bytes += cap;
            f.bufs.push(buf);
        }
    }
}

/// The process-wide pool shared by the SCSI core (read buffers) and the
/// frontends (write buffers, sent Data-In).
pub fn global() -> &'static BufPool {
    static POOL: OnceLock<BufPool> = OnceLock::new();
    POOL.get_or_init(|| BufPool::new(DEFAULT_CAP))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_buffers_are_not_pooled() {
        let p = BufPool::new(1 << 20);
        p.give(vec![1u8; 4096]);
        assert_eq!(p.pooled_bytes(), 0);
        assert_eq!(p.take_for_overwrite(4096), vec![0u8; 4096]);
    }

    #[test]
    fn a_freed_buffer_is_reused_without_reallocation() {
        let p = BufPool::new(4 << 20);
        let b = vec![7u8; 1 << 20];
        let ptr = b.as_ptr();
        p.give(b);
        assert_eq!(p.pooled_bytes(), 1 << 20);
        let again = p.take_for_overwrite(1 << 20);
        assert_eq!(again.as_ptr(), ptr);
        assert_eq!(again.len(), 1 << 20);
        assert_eq!(p.pooled_bytes(), 0);
    }

    #[test]
    fn zeroed_takes_never_show_old_data() {
        let p = BufPool::new(4 << 20);
        p.give(vec![0xAAu8; 256 << 10]);
        let z = p.take_zeroed(200 << 10);
        assert_eq!(z.len(), 200 << 10);
        assert!(z.iter().all(|&b| b == 0));
    }

    #[test]
    fn overwrite_takes_grow_with_zeroes() {
        let p = BufPool::new(4 << 20);
        let mut b = Vec::with_capacity(256 << 10);
        b.resize(100 << 10, 0xAA);
        p.give(b);
        let t = p.take_for_overwrite(200 << 10);
        assert_eq!(t.len(), 200 << 10);
        assert!(t[100 << 10..].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_cap_bounds_what_is_kept_and_fit_is_bounded() {
        let p = BufPool::new(1 << 20);
        p.give(vec![0u8; 768 << 10]);
        p.give(vec![0u8; 768 << 10]);
        assert_eq!(p.pooled_bytes(), 768 << 10);
        // Too large for a 64 KiB request (more than twice its size).
        let small = p.take_for_overwrite(64 << 10);
        assert!(small.capacity() < 768 << 10);
        assert_eq!(p.pooled_bytes(), 768 << 10);
        // A buffer larger than the cap is never kept.
        p.give(vec![0u8; 2 << 20]);
        assert_eq!(p.pooled_bytes(), 768 << 10);
    }

    #[test]
    fn the_best_fit_is_chosen() {
        let p = BufPool::new(8 << 20);
        p.give(vec![0u8; 2 << 20]);
        p.give(vec![0u8; 1 << 20]);
        let t = p.take_for_overwrite(1 << 20);
        assert_eq!(t.capacity(), 1 << 20);
    }
}
