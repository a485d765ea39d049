//! A fair byte-range lock.
//!
//! Host writes hold their byte range while they are mirrored or journaled,
//! so two overlapping writes reach the primary, the replica and the journal
//! in the same order (otherwise replica and primary could end up with
//! different winners). Copy jobs hold one region while copying it, and
//! attach/detach/mode changes hold the whole device ("quiesce").
//!
//! Fairness: a request is granted only when it overlaps neither a held
//! range nor an *earlier waiting* request, so a quiesce waiting for the
//! whole device is not starved by a stream of small writes.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Req {
    id: u64,
    start: u64,
    end: u64,
}

impl Req {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }
}

#[derive(Debug, Default)]
struct Inner {
    held: Vec<Req>,
    waiting: Vec<Req>,
    next_id: u64,
}

impl Inner {
    fn grantable(&self, r: &Req) -> bool {
        !self.held.iter().any(|h| h.overlaps(r.start, r.end))
            && !self
                .waiting
                .iter()
                .take_while(|w| w.id != r.id)
                .any(|w| w.overlaps(r.start, r.end))
    }
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct RangeLock {
    inner: Mutex<Inner>,
    cond: Condvar,
}

/// Releases its range on drop.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
    start: u64,
    end: u64,
}

impl RangeGuard<'_> {
    pub fn start(&self) -> u64 {
        self.start
    }
    pub fn end(&self) -> u64 {
        self.end
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut g = self.lock.locked();
        g.held.retain(|h| h.id != self.id);
        drop(g);
        self.lock.cond.notify_all();
    }
}

impl RangeLock {
    pub fn new() -> Self {
        Self::default()
    }

    fn locked(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lock `start..end`, waiting as long as it takes.
    pub fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        // Without a deadline `acquire` only returns once granted.
        loop {
            if let Some(g) = self.acquire(start, end, None) {
                return g;
            }
        }
    }

    /// Lock `start..end`, giving up after `timeout`.
    pub fn lock_timeout(&self, start: u64, end: u64, timeout: Duration) -> Option<RangeGuard<'_>> {
        self.acquire(start, end, Some(Instant::now() + timeout))
    }

    fn acquire(&self, start: u64, end: u64, deadline: Option<Instant>) -> Option<RangeGuard<'_>> {
        let end = end.max(start.saturating_add(1));
        let mut g = self.locked();
        let id = g.next_id;
        g.next_id += 1;
        let req = Req { id, start, end };
        g.waiting.push(req);
        loop {
            if g.grantable(&req) {
                g.waiting.retain(|w| w.id != id);
                g.held.push(req);
                return Some(RangeGuard {
                    lock: self,
                    id,
                    start,
                    end,
                });
            }
            match deadline {
                None => g = self.cond.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        g.waiting.retain(|w| w.id != id);
                        drop(g);
                        // Requests queued behind this one may be grantable now.
                        self.cond.notify_all();
                        return None;
                    }
                    g = self
                        .cond
                        .wait_timeout(g, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// Number of requests waiting (tests).
    pub fn waiters(&self) -> usize {
        self.locked().waiting.len()
    }

    /// The ranges held right now (for the activity log: regions with writes
    /// in flight must not be cleared).
    pub fn held_ranges(&self) -> Vec<(u64, u64)> {
        self.locked()
            .held
            .iter()
            .map(|h| (h.start, h.end))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn overlapping_ranges_exclude_each_other() {
        let lock = Arc::new(RangeLock::new());
        let g = lock.lock(0, 100);
        assert!(lock
            .lock_timeout(50, 60, Duration::from_millis(20))
            .is_none());
        let other = lock.lock_timeout(100, 200, Duration::from_millis(20));
        assert!(other.is_some(), "adjacent ranges do not overlap");
        drop(other);
        let flag = Arc::new(AtomicBool::new(false));
        let (l2, f2) = (lock.clone(), flag.clone());
        let t = std::thread::spawn(move || {
            let _g = l2.lock(10, 20);
            f2.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(30));
        assert!(!flag.load(Ordering::SeqCst));
        drop(g);
        t.join().unwrap();
        assert!(flag.load(Ordering::SeqCst));
        assert!(lock.held_ranges().is_empty());
    }

    #[test]
    fn waiting_quiesce_blocks_later_small_requests() {
        let lock = Arc::new(RangeLock::new());
        let small = lock.lock(0, 10);
        let l2 = lock.clone();
        let quiesce = std::thread::spawn(move || {
            l2.lock_timeout(0, u64::MAX, Duration::from_secs(5))
                .map(|g| g.end())
        });
        while lock.waiters() == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // A new request that overlaps the waiting quiesce must queue behind it.
        assert!(lock
            .lock_timeout(20, 30, Duration::from_millis(30))
            .is_none());
        drop(small);
        assert_eq!(quiesce.join().unwrap(), Some(u64::MAX));
    }

    #[test]
    fn timed_out_request_unblocks_those_behind_it() {
        let lock = RangeLock::new();
        let a = lock.lock(0, 10);
        assert!(lock
            .lock_timeout(0, 100, Duration::from_millis(10))
            .is_none());
        assert!(lock
            .lock_timeout(50, 60, Duration::from_millis(10))
            .is_some());
        drop(a);
    }
}
