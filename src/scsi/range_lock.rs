//! Striped byte-range lock of one logical unit.
//!
//! Ordinary reads and writes take the stripes their range touches shared;
//! commands that must be atomic against other writers of the same range
//! (COMPARE AND WRITE, ORWRITE, WRITE SAME, EXTENDED COPY targets) take them
//! exclusive. Ranges map to stripes by `region % STRIPES`, so unrelated
//! ranges may share a stripe: that only costs concurrency, never
//! correctness. Stripes are always acquired in ascending index order, so two
//! guards can never deadlock.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crossbeam::utils::CachePadded;

const STRIPES: usize = 32;
/// Bytes per region (1 MiB).
const REGION_SHIFT: u32 = 20;

/// The lock itself; one per logical unit.
#[derive(Debug)]
pub struct RangeLock {
    stripes: Box<[CachePadded<RwLock<()>>]>,
}

impl Default for RangeLock {
    fn default() -> Self {
        RangeLock {
            stripes: (0..STRIPES)
                .map(|_| CachePadded::new(RwLock::new(())))
                .collect(),
        }
    }
}

enum Held<'a> {
    Shared(#[allow(dead_code)] RwLockReadGuard<'a, ()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'a, ()>),
}

/// Holds the stripes of one range until dropped. Lives on the stack: no
/// allocation on the I/O path.
pub struct RangeGuard<'a> {
    _held: [Option<Held<'a>>; STRIPES],
}

impl RangeLock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Which stripes `offset..offset+len` touches, as a bitmask.
    fn mask(offset: u64, len: u64) -> u32 {
        let first = offset >> REGION_SHIFT;
        let last = offset.saturating_add(len.max(1) - 1) >> REGION_SHIFT;
        if last - first >= STRIPES as u64 - 1 {
            return u32::MAX;
        }
        let mut m = 0u32;
        for r in first..=last {
            m |= 1 << (r % STRIPES as u64);
        }
        m
    }

    fn lock(&self, offset: u64, len: u64, exclusive: bool) -> RangeGuard<'_> {
        let mask = Self::mask(offset, len);
        let mut held: [Option<Held<'_>>; STRIPES] = std::array::from_fn(|_| None);
        for (i, (slot, stripe)) in held.iter_mut().zip(self.stripes.iter()).enumerate() {
            if mask & (1 << i) == 0 {
                continue;
            }
            // A poisoned stripe only means a panic elsewhere while holding
            // it; the `()` it protects cannot be inconsistent.
            *slot = Some(if exclusive {
                Held::Exclusive(stripe.write().unwrap_or_else(|e| e.into_inner()))
            } else {
                Held::Shared(stripe.read().unwrap_or_else(|e| e.into_inner()))
            });
        }
        RangeGuard { _held: held }
    }

    /// Lock a byte range for an ordinary read or write.
    pub fn shared(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        self.lock(offset, len, false)
    }

    /// Lock a byte range against every other reader and writer.
    #[allow(dead_code)] // taken by the atomic commands (COMPARE AND WRITE, ...)
    pub fn exclusive(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        self.lock(offset, len, true)
    }
}

impl RangeGuard<'_> {
    /// Number of stripes held (for tests).
    #[cfg(test)]
    fn count(&self) -> usize {
        self._held.iter().filter(|h| h.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn masks() {
        assert_eq!(RangeLock::mask(0, 512), 1);
        assert_eq!(RangeLock::mask((1 << 20) - 512, 1024), 0b11);
        assert_eq!(RangeLock::mask(31 << 20, 2 << 20), (1 << 31) | 1);
        assert_eq!(RangeLock::mask(0, 64 << 20), u32::MAX);
        assert_eq!(RangeLock::mask(u64::MAX - 10, 100), 1 << 31);
    }

    #[test]
    fn shared_guards_coexist_exclusive_excludes() {
        let l = Arc::new(RangeLock::new());
        let g1 = l.shared(0, 4096);
        let g2 = l.shared(0, 4096);
        assert_eq!(g1.count(), 1);
        drop((g1, g2));
        let inside = Arc::new(AtomicU32::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (l, inside) = (l.clone(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let _g = l.exclusive(512, 512);
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let all = l.exclusive(0, u64::MAX);
        assert_eq!(all.count(), STRIPES);
    }
}
