//! Unit attention conditions, kept per I_T nexus for one logical unit.
//!
//! The first command any nexus sends to a logical unit finds a POWER ON,
//! RESET, OR BUS DEVICE RESET OCCURRED condition pending (the LU "powered
//! on" for that nexus). The fast path (no UA pending) is one read lock on
//! this LU's table and one atomic load.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::sense::Asc;
use super::Nexus;

/// FNV-1a: nexus names are short and trusted-shape (they come from our own
/// frontends), so a cheap non-keyed hash is enough.
#[derive(Debug)]
pub(crate) struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

pub(crate) type FnvBuild = BuildHasherDefault<Fnv>;

/// Identity of an I_T nexus: initiator port + target port names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct NexusKey {
    pub initiator: Box<str>,
    pub target: Box<str>,
}

impl NexusKey {
    pub fn of(n: &Nexus) -> Self {
        NexusKey {
            initiator: n.initiator_port.as_str().into(),
            target: n.target_port.as_str().into(),
        }
    }
}

/// Borrowed form of `NexusKey` so lookups do not allocate.
trait KeyView {
    fn parts(&self) -> (&str, &str);
}

impl KeyView for NexusKey {
    fn parts(&self) -> (&str, &str) {
        (&self.initiator, &self.target)
    }
}

impl KeyView for Nexus {
    fn parts(&self) -> (&str, &str) {
        (&self.initiator_port, &self.target_port)
    }
}

impl<'a> std::borrow::Borrow<dyn KeyView + 'a> for NexusKey {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyView + '_ {}

impl std::hash::Hash for dyn KeyView + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Must match the derived Hash of NexusKey (two str fields).
        let (i, t) = self.parts();
        i.hash(state);
        t.hash(state);
    }
}

/// A map keyed by I_T nexus that can be queried with a `&Nexus`.
#[derive(Debug)]
pub(crate) struct NexusMap<V> {
    map: HashMap<NexusKey, V, FnvBuild>,
}

impl<V> Default for NexusMap<V> {
    fn default() -> Self {
        NexusMap {
            map: HashMap::default(),
        }
    }
}

impl<V> NexusMap<V> {
    pub fn get(&self, n: &Nexus) -> Option<&V> {
        self.map.get(n as &dyn KeyView)
    }

    pub fn entry(&mut self, n: &Nexus) -> std::collections::hash_map::Entry<'_, NexusKey, V> {
        self.map.entry(NexusKey::of(n))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&NexusKey, &V)> {
        self.map.iter()
    }
}

#[derive(Debug, Default)]
struct Slot {
    pending: AtomicBool,
    /// The frontend reported this I_T nexus lost; it gets no new
    /// device-wide conditions until it sends a command again.
    lost: AtomicBool,
    queue: Mutex<Vec<Asc>>,
}

impl Slot {
    fn with(asc: Asc) -> Self {
        Slot {
            pending: AtomicBool::new(true),
            lost: AtomicBool::new(false),
            queue: Mutex::new(vec![asc]),
        }
    }

    fn lose(&self) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.clear();
        self.pending.store(false, Ordering::Release);
        self.lost.store(true, Ordering::Release);
    }

    fn push(&self, asc: Asc) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if is_reset(asc) {
            // A reset supersedes what was pending before it (SAM-5 5.14).
            q.retain(|a| is_reset(*a));
        }
        if !q.contains(&asc) {
            q.push(asc);
        }
        self.pending.store(true, Ordering::Release);
    }

    fn pop(&self, remove: bool) -> Option<Asc> {
        if !self.pending.load(Ordering::Acquire) {
            return None;
        }
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        // Reset conditions are reported before anything else.
        let idx =
            q.iter()
                .position(|a| is_reset(*a))
                .or(if q.is_empty() { None } else { Some(0) })?;
        let asc = q[idx];
        if remove {
            q.remove(idx);
            if q.is_empty() {
                self.pending.store(false, Ordering::Release);
            }
        }
        Some(asc)
    }

    fn clear(&self, asc: Asc) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.retain(|a| *a != asc);
        if q.is_empty() {
            self.pending.store(false, Ordering::Release);
        }
    }
}

fn is_reset(a: Asc) -> bool {
    a.0 == 0x29
}

/// Pending unit attentions of one logical unit, per I_T nexus.
#[derive(Debug, Default)]
pub struct UaTable {
    slots: RwLock<NexusMap<Arc<Slot>>>,
}

impl UaTable {
    pub fn new() -> Self {
        Self::default()
    }

    fn with_slot<R>(&self, n: &Nexus, f: impl FnOnce(&Slot) -> R) -> R {
        {
            let map = self.slots.read().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = map.get(n) {
                if s.lost.load(Ordering::Relaxed) {
                    s.lost.store(false, Ordering::Release);
                }
                return f(s);
            }
        }
        let mut map = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let slot = map
            .entry(n)
            .or_insert_with(|| Arc::new(Slot::with(Asc::POWER_ON_RESET)));
        f(slot)
    }

    /// Report and clear the highest-priority pending UA of this nexus.
    pub fn take(&self, n: &Nexus) -> Option<Asc> {
        self.with_slot(n, |s| s.pop(true))
    }

    /// Clear one specific pending condition of this nexus.
    pub fn clear(&self, n: &Nexus, asc: Asc) {
        self.with_slot(n, |s| s.clear(asc))
    }

    /// Establish `asc` for one nexus.
    #[cfg(test)]
    pub fn establish(&self, n: &Nexus, asc: Asc) {
        self.with_slot(n, |s| s.push(asc))
    }

    /// Establish `asc` for every known nexus except `except`. Nexuses not
    /// yet seen get their power-on UA anyway, which supersedes it.
    pub fn establish_all(&self, asc: Asc, except: Option<&Nexus>) {
        let map = self.slots.read().unwrap_or_else(|e| e.into_inner());
        let skip = except.map(NexusKey::of);
        for (k, s) in map.iter() {
            if skip.as_ref() != Some(k) && !s.lost.load(Ordering::Acquire) {
                s.push(asc);
            }
        }
    }

    /// Establish `asc` for every known nexus `pred` selects.
    pub fn establish_matching(&self, pred: impl Fn(&NexusKey) -> bool, asc: Asc) {
        let map = self.slots.read().unwrap_or_else(|e| e.into_inner());
        for (k, s) in map.iter() {
            if pred(k) {
                s.push(asc);
            }
        }
    }

    /// The frontend lost this I_T nexus: its pending conditions go, and
    /// device-wide ones (resets, mode or capacity changes) skip it until it
    /// returns. Reservation conditions (`establish_matching`) still reach
    /// it, so a preempted initiator learns of it when it reconnects. A
    /// returning nexus gets no I_T NEXUS LOSS OCCURRED: initiators (and
    /// libiscsi's conformance tests) expect a fresh login to be usable at
    /// once, as on Linux LIO.
    pub fn nexus_lost(&self, n: &Nexus) {
        let map = self.slots.read().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(n) {
            s.lose();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nexus(i: &str) -> Nexus {
        Nexus {
            initiator_port: i.into(),
            target_port: "iqn.t,t,0x1".into(),
            relative_port_id: 1,
            port_group_id: 1,
        }
    }

    #[test]
    fn power_on_first_then_clear() {
        let t = UaTable::new();
        let a = nexus("a");
        assert_eq!(t.take(&a), Some(Asc::POWER_ON_RESET));
        assert_eq!(t.take(&a), None);
        let b = nexus("b");
        assert_eq!(t.take(&b), Some(Asc::POWER_ON_RESET));
    }

    #[test]
    fn reset_reported_first_and_supersedes() {
        let t = UaTable::new();
        let a = nexus("a");
        t.take(&a);
        t.establish(&a, Asc::MODE_PARAMETERS_CHANGED);
        t.establish(&a, Asc::CAPACITY_DATA_HAS_CHANGED);
        t.establish(&a, Asc::CAPACITY_DATA_HAS_CHANGED);
        assert_eq!(t.take(&a), Some(Asc::MODE_PARAMETERS_CHANGED));
        t.establish(&a, Asc::BUS_DEVICE_RESET);
        assert_eq!(t.take(&a), Some(Asc::BUS_DEVICE_RESET));
        assert_eq!(t.take(&a), None);
    }

    #[test]
    fn establish_all_skips_issuer() {
        let t = UaTable::new();
        let (a, b) = (nexus("a"), nexus("b"));
        t.take(&a);
        t.take(&b);
        t.establish_all(Asc::MODE_PARAMETERS_CHANGED, Some(&a));
        assert_eq!(t.take(&a), None);
        assert_eq!(t.take(&b), Some(Asc::MODE_PARAMETERS_CHANGED));
        t.establish(&b, Asc::REPORTED_LUNS_DATA_CHANGED);
        t.clear(&b, Asc::REPORTED_LUNS_DATA_CHANGED);
        assert_eq!(t.take(&b), None);
    }

    #[test]
    fn lost_nexus_skips_device_wide_conditions() {
        let t = UaTable::new();
        let (a, b) = (nexus("a"), nexus("b"));
        t.take(&a);
        t.take(&b);
        t.establish_all(Asc::MODE_PARAMETERS_CHANGED, None);
        t.nexus_lost(&b);
        t.establish_all(Asc::BUS_DEVICE_RESET, None);
        t.establish_matching(|k| &*k.initiator == "b", Asc::REGISTRATIONS_PREEMPTED);
        assert_eq!(t.take(&a), Some(Asc::BUS_DEVICE_RESET));
        assert_eq!(t.take(&b), Some(Asc::REGISTRATIONS_PREEMPTED));
        assert_eq!(t.take(&b), None);
        // Back: device-wide conditions reach it again.
        t.establish_all(Asc::CAPACITY_DATA_HAS_CHANGED, None);
        assert_eq!(t.take(&b), Some(Asc::CAPACITY_DATA_HAS_CHANGED));
    }
}
