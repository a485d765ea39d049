//! Reservations of one logical unit: SPC-4 persistent reservations
//! (PERSISTENT RESERVE IN/OUT, registrations per I_T nexus, all six
//! reservation types, APTPL) and SPC-2 RESERVE/RELEASE, plus the check
//! every command passes before it runs.
//!
//! Persistence (APTPL) goes through the `PrStore` trait so this module does
//! no file I/O; the daemon implements it on its state directory.

use serde::{Deserialize, Serialize};

use super::cdb::{Attrs, PrClass, Reader};
use super::sense::{Asc, ScsiError};
use super::spc::truncate;
use super::ua::{NexusKey, UaTable};
use super::Nexus;

/// Where APTPL persistent-reservation state lives across restarts. Both
/// calls may block briefly (the daemon writes a small file); `lu` is the
/// logical unit's volume name.
pub trait PrStore: Send + Sync {
    /// Replace the saved state of `lu`.
    fn save(&self, lu: &str, state: &[u8]);
    /// The saved state of `lu`, if any.
    fn load(&self, lu: &str) -> Option<Vec<u8>>;
}

/// Reservation types (SPC-4 table 183).
pub const WRITE_EXCLUSIVE: u8 = 0x1;
pub const EXCLUSIVE_ACCESS: u8 = 0x3;
pub const WRITE_EXCLUSIVE_RO: u8 = 0x5;
pub const EXCLUSIVE_ACCESS_RO: u8 = 0x6;
pub const WRITE_EXCLUSIVE_AR: u8 = 0x7;
pub const EXCLUSIVE_ACCESS_AR: u8 = 0x8;

fn valid_type(t: u8) -> bool {
    matches!(t, 1 | 3 | 5 | 6 | 7 | 8)
}

fn all_registrants(t: u8) -> bool {
    matches!(t, WRITE_EXCLUSIVE_AR | EXCLUSIVE_ACCESS_AR)
}

/// Registrants-only and all-registrants types let registrants in.
fn registrants_type(t: u8) -> bool {
    matches!(t, 5..=8)
}

fn exclusive_access(t: u8) -> bool {
    matches!(
        t,
        EXCLUSIVE_ACCESS | EXCLUSIVE_ACCESS_RO | EXCLUSIVE_ACCESS_AR
    )
}

/// One registration: an initiator port, through one target port or (ALL_TG_PT)
/// through all of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Registration {
    key: u64,
    initiator: String,
    /// `None`: registered through every target port (ALL_TG_PT).
    target: Option<String>,
    relative_port_id: u16,
}

impl Registration {
    fn matches(&self, initiator: &str, target: &str) -> bool {
        self.initiator == initiator && wild_eq(self.target.as_deref(), target)
    }

    fn matches_nexus(&self, n: &Nexus) -> bool {
        self.matches(&n.initiator_port, &n.target_port)
    }

    fn same_registrant(&self, other: &Registration) -> bool {
        self.initiator == other.initiator && self.target == other.target
    }
}

/// A registration's target port matches `v` (`None` is every port).
fn wild_eq(t: Option<&str>, v: &str) -> bool {
    match t {
        None => true,
        Some(t) => t == v,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Reservation {
    pr_type: u8,
    /// The holding registration (initiator, target); `None` for the
    /// all-registrants types, where every registrant holds it.
    holder: Option<(String, Option<String>)>,
}

/// Persistent reservation state of one LU (what APTPL persists).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Persistent {
    generation: u32,
    aptpl: bool,
    regs: Vec<Registration>,
    res: Option<Reservation>,
}

/// All reservation state of one LU.
#[derive(Debug, Default)]
pub(crate) struct PrState {
    p: Persistent,
    /// SPC-2 RESERVE holder.
    spc2: Option<NexusKey>,
}

/// The PERSISTENT RESERVE OUT CDB fields.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PrOutCdb {
    pub sa: u8,
    pub scope: u8,
    pub pr_type: u8,
    pub param_len: u32,
}

/// The PERSISTENT RESERVE OUT parameter list (basic form).
struct PrOutParams {
    key: u64,
    sa_key: u64,
    all_tg_pt: bool,
    aptpl: bool,
}

/// PERSISTENT RESERVE OUT service actions.
pub(crate) const PR_REGISTER: u8 = 0x00;
pub(crate) const PR_RESERVE: u8 = 0x01;
pub(crate) const PR_RELEASE: u8 = 0x02;
pub(crate) const PR_CLEAR: u8 = 0x03;
pub(crate) const PR_PREEMPT: u8 = 0x04;
pub(crate) const PR_PREEMPT_AND_ABORT: u8 = 0x05;
pub(crate) const PR_REGISTER_AND_IGNORE: u8 = 0x06;

/// What a PR OUT changed, so the caller knows whether to persist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Unchanged,
    Changed,
}

impl PrState {
    /// Restore APTPL state saved by `save_bytes`. Anything unreadable is
    /// ignored: losing reservations is safer than refusing to start.
    pub fn load(bytes: &[u8]) -> Self {
        match serde_json::from_slice::<Persistent>(bytes) {
            Ok(p) if p.aptpl => PrState { p, spc2: None },
            _ => PrState::default(),
        }
    }

    pub fn save_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.p).unwrap_or_default()
    }

    pub fn aptpl(&self) -> bool {
        self.p.aptpl
    }

    /// Is any reservation (PR or SPC-2) in effect? Commands skip the
    /// reservation check entirely when not.
    pub fn reserved(&self) -> bool {
        self.p.res.is_some() || self.spc2.is_some()
    }

    fn find(&self, n: &Nexus) -> Option<usize> {
        self.p.regs.iter().position(|r| r.matches_nexus(n))
    }

    fn is_holder(&self, n: &Nexus) -> bool {
        match &self.p.res {
            None => false,
            Some(res) => match &res.holder {
                None => self.find(n).is_some(),
                Some((i, t)) => *i == n.initiator_port && wild_eq(t.as_deref(), &n.target_port),
            },
        }
    }

    fn holder_key(&self) -> Option<u64> {
        let (i, t) = self.p.res.as_ref()?.holder.as_ref()?;
        self.p
            .regs
            .iter()
            .find(|r| r.initiator == *i && r.target == *t)
            .map(|r| r.key)
    }

    /// The reservation check of SPC-4 5.9.1 / SBC-3 4.17 for a command of
    /// class `attrs` from nexus `n`.
    pub fn check(&self, n: &Nexus, attrs: &Attrs) -> Result<(), ScsiError> {
        if let Some(h) = &self.spc2 {
            let mine = *h.initiator == *n.initiator_port && *h.target == *n.target_port;
            if !mine && !attrs.spc2_ok {
                return Err(ScsiError::ReservationConflict);
            }
        }
        let Some(res) = &self.p.res else {
            return Ok(());
        };
        if attrs.pr == PrClass::Allowed || self.is_holder(n) {
            return Ok(());
        }
        let registered = self.find(n).is_some();
        let allowed = match attrs.pr {
            PrClass::Allowed => true,
            PrClass::Read => {
                !exclusive_access(res.pr_type) || (registrants_type(res.pr_type) && registered)
            }
            PrClass::Write => registrants_type(res.pr_type) && registered,
        };
        if allowed {
            Ok(())
        } else {
            Err(ScsiError::ReservationConflict)
        }
    }

    // ---------------------------------------------------------- SPC-2

    /// RESERVE(6)/(10). With persistent registrations present every RESERVE
    /// conflicts (CRH = 0).
    pub fn reserve(&mut self, n: &Nexus) -> Result<(), ScsiError> {
        if !self.p.regs.is_empty() {
            return Err(ScsiError::ReservationConflict);
        }
        match &self.spc2 {
            Some(h) if *h.initiator != *n.initiator_port || *h.target != *n.target_port => {
                Err(ScsiError::ReservationConflict)
            }
            _ => {
                self.spc2 = Some(NexusKey::of(n));
                Ok(())
            }
        }
    }

    /// RELEASE(6)/(10): a no-op unless the nexus holds the reservation.
    pub fn release(&mut self, n: &Nexus) -> Result<(), ScsiError> {
        if !self.p.regs.is_empty() {
            return Err(ScsiError::ReservationConflict);
        }
        if let Some(h) = &self.spc2 {
            if *h.initiator == *n.initiator_port && *h.target == *n.target_port {
                self.spc2 = None;
            }
        }
        Ok(())
    }

    /// LU reset / power on: SPC-2 reservations are released; persistent
    /// ones survive.
    pub fn reset(&mut self) {
        self.spc2 = None;
    }

    /// I_T nexus loss releases the SPC-2 reservation it held.
    pub fn nexus_loss(&mut self, n: &Nexus) {
        if let Some(h) = &self.spc2 {
            if *h.initiator == *n.initiator_port && *h.target == *n.target_port {
                self.spc2 = None;
            }
        }
    }

    // ---------------------------------------------------------- PR IN

    pub fn pr_in(&self, sa: u8, alloc_len: u16) -> Result<Vec<u8>, ScsiError> {
        let mut d = Vec::with_capacity(64);
        match sa {
            // READ KEYS
            0x00 => {
                d.extend_from_slice(&self.p.generation.to_be_bytes());
                d.extend_from_slice(&((8 * self.p.regs.len()) as u32).to_be_bytes());
                for r in &self.p.regs {
                    d.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            // READ RESERVATION
            0x01 => {
                d.extend_from_slice(&self.p.generation.to_be_bytes());
                match &self.p.res {
                    None => d.extend_from_slice(&0u32.to_be_bytes()),
                    Some(res) => {
                        d.extend_from_slice(&16u32.to_be_bytes());
                        let key = if all_registrants(res.pr_type) {
                            0
                        } else {
                            self.holder_key().unwrap_or(0)
                        };
                        d.extend_from_slice(&key.to_be_bytes());
                        d.extend_from_slice(&[0; 5]);
                        d.push(res.pr_type); // scope LU_SCOPE (0)
                        d.extend_from_slice(&[0; 2]);
                    }
                }
            }
            // REPORT CAPABILITIES
            0x02 => {
                d.extend_from_slice(&8u16.to_be_bytes());
                d.push(0x05); // ATP_C, PTPL_C
                d.push(0x90 | u8::from(self.p.aptpl)); // TMV, ALLOW COMMANDS 001b, PTPL_A
                d.push(0xEA); // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX
                d.push(0x01); // EX_AC_AR
                d.extend_from_slice(&[0; 2]);
            }
            // READ FULL STATUS
            0x03 => {
                d.extend_from_slice(&self.p.generation.to_be_bytes());
                d.extend_from_slice(&[0; 4]);
                for r in &self.p.regs {
                    let holder = match &self.p.res {
                        Some(res) => match &res.holder {
                            None => true,
                            Some((i, t)) => *i == r.initiator && *t == r.target,
                        },
                        None => false,
                    };
                    d.extend_from_slice(&r.key.to_be_bytes());
                    d.extend_from_slice(&[0; 4]);
                    d.push(u8::from(r.target.is_none()) << 1 | u8::from(holder));
                    d.push(match (&self.p.res, holder) {
                        (Some(res), true) => res.pr_type,
                        _ => 0,
                    });
                    d.extend_from_slice(&[0; 4]);
                    let rtp = if r.target.is_none() {
                        0
                    } else {
                        r.relative_port_id
                    };
                    d.extend_from_slice(&rtp.to_be_bytes());
                    let tid = transport_id(&r.initiator);
                    d.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    d.extend_from_slice(&tid);
                }
                let n = (d.len() - 8) as u32;
                d[4..8].copy_from_slice(&n.to_be_bytes());
            }
            _ => return Err(ScsiError::cdb(1, 4)),
        }
        Ok(truncate(d, alloc_len.into()))
    }

    // ---------------------------------------------------------- PR OUT

    /// PERSISTENT RESERVE OUT. Unit attentions for other nexuses go to `ua`.
    pub fn pr_out(
        &mut self,
        n: &Nexus,
        ua: &UaTable,
        cdb: PrOutCdb,
        data_out: &[u8],
    ) -> Result<Outcome, ScsiError> {
        let PrOutCdb {
            sa,
            scope,
            pr_type,
            param_len,
        } = cdb;
        if param_len != 24 {
            return Err(ScsiError::ParamListLength);
        }
        let params = data_out.get(..24).ok_or(ScsiError::ParamListLength)?;
        let r = Reader::new(params);
        let short = |_| ScsiError::ParamListLength;
        let flags = r.u8(20).map_err(short)?;
        if flags & 0x08 != 0 {
            // SPEC_I_PT: SIP_C = 0.
            return Err(ScsiError::param(20, Some(3)));
        }
        let p = PrOutParams {
            key: r.u64(0).map_err(short)?,
            sa_key: r.u64(8).map_err(short)?,
            all_tg_pt: flags & 0x04 != 0,
            aptpl: flags & 0x01 != 0,
        };
        let check_scope_type = || {
            if scope != 0 {
                Err(ScsiError::cdb(2, 7))
            } else if !valid_type(pr_type) {
                Err(ScsiError::cdb(2, 3))
            } else {
                Ok(())
            }
        };
        match sa {
            PR_REGISTER | PR_REGISTER_AND_IGNORE => {
                self.register(n, ua, &p, sa == PR_REGISTER_AND_IGNORE)
            }
            _ => {
                let me = self.find(n).ok_or(ScsiError::ReservationConflict)?;
                let my_key = self.p.regs.get(me).map(|r| r.key);
                if my_key != Some(p.key) {
                    return Err(ScsiError::ReservationConflict);
                }
                match sa {
                    PR_RESERVE => {
                        check_scope_type()?;
                        self.pr_reserve(n, me, pr_type)
                    }
                    PR_RELEASE => {
                        check_scope_type()?;
                        self.pr_release(n, ua, pr_type)
                    }
                    PR_CLEAR => {
                        self.clear(n, ua);
                        Ok(Outcome::Changed)
                    }
                    PR_PREEMPT | PR_PREEMPT_AND_ABORT => {
                        self.preempt(n, ua, me, &p, pr_type, check_scope_type)
                    }
                    _ => Err(ScsiError::cdb(1, 4)),
                }
            }
        }
    }

    fn register(
        &mut self,
        n: &Nexus,
        ua: &UaTable,
        p: &PrOutParams,
        ignore: bool,
    ) -> Result<Outcome, ScsiError> {
        match self.find(n) {
            None => {
                if !ignore && p.key != 0 {
                    return Err(ScsiError::ReservationConflict);
                }
                if p.sa_key == 0 {
                    return Ok(Outcome::Unchanged);
                }
                self.p.regs.push(Registration {
                    key: p.sa_key,
                    initiator: n.initiator_port.clone(),
                    target: (!p.all_tg_pt).then(|| n.target_port.clone()),
                    relative_port_id: n.relative_port_id,
                });
            }
            Some(i) => {
                let cur = self.p.regs.get(i).map(|r| r.key).unwrap_or(0);
                if !ignore && p.key != cur {
                    return Err(ScsiError::ReservationConflict);
                }
                if p.sa_key == 0 {
                    self.unregister(i, ua);
                } else if let Some(r) = self.p.regs.get_mut(i) {
                    r.key = p.sa_key;
                }
            }
        }
        self.p.aptpl = p.aptpl;
        self.p.generation = self.p.generation.wrapping_add(1);
        Ok(Outcome::Changed)
    }

    /// Remove registration `i` and what hangs on it (SPC-4 5.9.11.2).
    fn unregister(&mut self, i: usize, ua: &UaTable) {
        if i >= self.p.regs.len() {
            return;
        }
        let gone = self.p.regs.remove(i);
        let Some(res) = &self.p.res else { return };
        let released = match &res.holder {
            None => self.p.regs.is_empty(),
            Some((hi, ht)) => *hi == gone.initiator && *ht == gone.target,
        };
        if released {
            let t = res.pr_type;
            self.p.res = None;
            if matches!(t, WRITE_EXCLUSIVE_RO | EXCLUSIVE_ACCESS_RO) {
                self.ua_regs(ua, None, Asc::RESERVATIONS_RELEASED);
            }
        }
    }

    fn pr_reserve(&mut self, n: &Nexus, me: usize, pr_type: u8) -> Result<Outcome, ScsiError> {
        if let Some(res) = &self.p.res {
            return if self.is_holder(n) && res.pr_type == pr_type {
                Ok(Outcome::Unchanged)
            } else {
                Err(ScsiError::ReservationConflict)
            };
        }
        let holder = if all_registrants(pr_type) {
            None
        } else {
            self.p
                .regs
                .get(me)
                .map(|r| (r.initiator.clone(), r.target.clone()))
        };
        self.p.res = Some(Reservation { pr_type, holder });
        Ok(Outcome::Changed)
    }

    fn pr_release(&mut self, n: &Nexus, ua: &UaTable, pr_type: u8) -> Result<Outcome, ScsiError> {
        let Some(res) = &self.p.res else {
            return Ok(Outcome::Unchanged);
        };
        if !self.is_holder(n) {
            return Ok(Outcome::Unchanged);
        }
        if res.pr_type != pr_type {
            return Err(ScsiError::Other(super::sense::Sense::new(
                super::sense::SenseKey::IllegalRequest,
                Asc::INVALID_RELEASE_OF_PR,
            )));
        }
        let t = res.pr_type;
        self.p.res = None;
        if t != WRITE_EXCLUSIVE && t != EXCLUSIVE_ACCESS {
            self.ua_regs(ua, Some(n), Asc::RESERVATIONS_RELEASED);
        }
        Ok(Outcome::Changed)
    }

    fn clear(&mut self, n: &Nexus, ua: &UaTable) {
        self.ua_regs(ua, Some(n), Asc::RESERVATIONS_PREEMPTED);
        self.p.regs.clear();
        self.p.res = None;
        self.p.generation = self.p.generation.wrapping_add(1);
    }

    fn preempt(
        &mut self,
        n: &Nexus,
        ua: &UaTable,
        me: usize,
        p: &PrOutParams,
        pr_type: u8,
        check_scope_type: impl Fn() -> Result<(), ScsiError>,
    ) -> Result<Outcome, ScsiError> {
        let Some(myself) = self.p.regs.get(me).cloned() else {
            return Err(ScsiError::ReservationConflict);
        };
        let res = self.p.res.clone();
        // Preempting the reservation itself: it moves to the issuer with
        // the new type; otherwise only registrations are removed.
        let takes_reservation = match &res {
            None => false,
            Some(r) if all_registrants(r.pr_type) => p.sa_key == 0,
            Some(_) => Some(p.sa_key) == self.holder_key(),
        };
        if takes_reservation {
            check_scope_type()?;
        } else if p.sa_key == 0 {
            return Err(ScsiError::param(8, None));
        }
        let victims: Vec<Registration> = self
            .p
            .regs
            .iter()
            .filter(|r| !r.same_registrant(&myself))
            .filter(|r| {
                if takes_reservation && p.sa_key == 0 {
                    true
                } else {
                    r.key == p.sa_key
                }
            })
            .cloned()
            .collect();
        if !takes_reservation && victims.is_empty() {
            return Err(ScsiError::ReservationConflict);
        }
        self.p.regs.retain(|r| !victims.contains(r));
        for v in &victims {
            ua.establish_matching(
                |k| v.matches(&k.initiator, &k.target),
                Asc::REGISTRATIONS_PREEMPTED,
            );
        }
        if takes_reservation {
            let changed = res.as_ref().is_some_and(|r| r.pr_type != pr_type);
            let holder = if all_registrants(pr_type) {
                None
            } else {
                Some((myself.initiator.clone(), myself.target.clone()))
            };
            self.p.res = Some(Reservation { pr_type, holder });
            if changed {
                self.ua_regs(ua, Some(n), Asc::RESERVATIONS_RELEASED);
            }
        } else if let Some(r) = &res {
            // A removed holder (or the last registrant) takes the
            // reservation with it.
            let lost = match &r.holder {
                None => self.p.regs.is_empty(),
                Some((i, t)) => !self
                    .p
                    .regs
                    .iter()
                    .any(|x| x.initiator == *i && x.target == *t),
            };
            if lost {
                self.p.res = None;
            }
        }
        self.p.generation = self.p.generation.wrapping_add(1);
        Ok(Outcome::Changed)
    }

    /// Unit attention for every registered nexus except `except`.
    fn ua_regs(&self, ua: &UaTable, except: Option<&Nexus>, asc: Asc) {
        let regs = &self.p.regs;
        ua.establish_matching(
            |k| {
                let me = except.is_some_and(|n| {
                    *k.initiator == *n.initiator_port && *k.target == *n.target_port
                });
                !me && regs.iter().any(|r| r.matches(&k.initiator, &k.target))
            },
            asc,
        );
    }
}

/// iSCSI TransportID (SPC-4 7.6.4.6) for an initiator port name: format
/// 01b ("name,i,0x<ISID>") when the port name carries an ISID, else 00b.
fn transport_id(initiator_port: &str) -> Vec<u8> {
    let format = if initiator_port.contains(",i,0x") {
        0x40
    } else {
        0x00
    };
    let mut name: Vec<u8> = initiator_port.bytes().take(1000).collect();
    name.push(0);
    while name.len() % 4 != 0 || name.len() < 20 {
        name.push(0);
    }
    let mut d = vec![format | 0x05, 0];
    d.extend_from_slice(&(name.len() as u16).to_be_bytes());
    d.extend(name);
    d
}
