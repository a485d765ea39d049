//! Operational text negotiation (RFC 7143 §6.2, §13): a table of every key
//! with its kind (list, Boolean AND/OR, numerical min/max, declarative), the
//! stages it may appear in, its scope and its valid range, and a
//! [`Negotiator`] that answers an initiator's keys from that table and our
//! [`TargetLimits`], accumulating the outcome in [`SessionParams`].
//!
//! Security keys (AuthMethod, CHAP_*), the identity declarations
//! (InitiatorName, TargetName, SessionType, InitiatorAlias) and SendTargets
//! are only checked here (stage, sender, duplicates) and handed back to the
//! caller: login and discovery own their meaning.

use thiserror::Error;

use super::text::{bool_str, parse_bool, parse_number};

/// RFC 7143 default for MaxRecvDataSegmentLength, also the limit on every
/// Login PDU's data segment.
pub const DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH: u32 = 8192;
/// Smallest segment or burst length a peer may declare.
pub const MIN_SEGMENT_LENGTH: u32 = 512;
/// Largest segment or burst length a peer may declare (2**24 - 1).
pub const MAX_SEGMENT_LENGTH: u32 = (1 << 24) - 1;

const REJECT: &str = "Reject";
const IRRELEVANT: &str = "Irrelevant";
const NOT_UNDERSTOOD: &str = "NotUnderstood";

/// The operational values a session (and its connection) runs with once
/// login completes. `Default` gives the RFC 7143 defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    /// CRC32C header digest (else None).
    pub header_digest: bool,
    /// CRC32C data digest (else None).
    pub data_digest: bool,
    pub max_connections: u16,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    /// What the initiator declared it can receive: our maximum transmit
    /// data segment length on this connection.
    pub max_recv_data_segment_length_initiator: u32,
    /// What we declared: the largest data segment we accept on this
    /// connection (8192 if login ended before we could declare).
    pub max_recv_data_segment_length_target: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub max_outstanding_r2t: u16,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u8,
    /// Always false: markers are obsolete (RFC 7143 §13.25).
    pub ifmarker: bool,
    /// Always false: markers are obsolete (RFC 7143 §13.25).
    pub ofmarker: bool,
}

impl Default for SessionParams {
    fn default() -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            max_recv_data_segment_length_initiator: DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
            max_recv_data_segment_length_target: DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
            ifmarker: false,
            ofmarker: false,
        }
    }
}

/// What this target is able and willing to do; the negotiator never agrees
/// to more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetLimits {
    /// Our receive limit, declared to the initiator.
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub max_connections: u16,
    pub max_outstanding_r2t: u16,
    pub allow_header_digest: bool,
    pub allow_data_digest: bool,
    /// Our side of InitialR2T (OR): `true` insists on an R2T before any
    /// Data-Out, `false` lets an initiator that asks send unsolicited data.
    pub require_initial_r2t: bool,
    /// Our side of ImmediateData (AND).
    pub immediate_data: bool,
}

impl Default for TargetLimits {
    fn default() -> Self {
        Self {
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1_048_576,
            first_burst_length: 262_144,
            max_connections: 8,
            max_outstanding_r2t: 1,
            allow_header_digest: true,
            allow_data_digest: true,
            require_initial_r2t: true,
            immediate_data: true,
        }
    }
}

impl TargetLimits {
    /// The same limits forced into the ranges RFC 7143 allows (and with
    /// FirstBurstLength <= MaxBurstLength), so a bad config cannot make us
    /// declare something illegal.
    pub fn normalized(&self) -> Self {
        let seg = |v: u32| v.clamp(MIN_SEGMENT_LENGTH, MAX_SEGMENT_LENGTH);
        let max_burst = seg(self.max_burst_length);
        Self {
            max_recv_data_segment_length: seg(self.max_recv_data_segment_length),
            max_burst_length: max_burst,
            first_burst_length: seg(self.first_burst_length).min(max_burst),
            max_connections: self.max_connections.max(1),
            max_outstanding_r2t: self.max_outstanding_r2t.max(1),
            ..self.clone()
        }
    }
}

/// Every key this target knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    AuthMethod,
    ChapA,
    ChapI,
    ChapC,
    ChapN,
    ChapR,
    HeaderDigest,
    DataDigest,
    MaxConnections,
    SendTargets,
    TargetName,
    InitiatorName,
    TargetAlias,
    InitiatorAlias,
    TargetAddress,
    TargetPortalGroupTag,
    InitialR2T,
    ImmediateData,
    MaxRecvDataSegmentLength,
    MaxBurstLength,
    FirstBurstLength,
    DefaultTime2Wait,
    DefaultTime2Retain,
    MaxOutstandingR2T,
    DataPduInOrder,
    DataSequenceInOrder,
    ErrorRecoveryLevel,
    SessionType,
    IfMarker,
    OfMarker,
    IfMarkInt,
    OfMarkInt,
    ProtocolLevel,
    TaskReporting,
}

/// How a key's outcome is computed (RFC 7143 §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// The acceptor picks the first value of the offered list it supports.
    List,
    /// Boolean, result is the AND of both sides.
    BoolAnd,
    /// Boolean, result is the OR of both sides.
    BoolOr,
    /// Numerical, result is the smaller value.
    NumMin,
    /// Numerical, result is the larger value.
    NumMax,
    /// Declared by one side, not answered.
    Declarative,
    /// Authentication exchange keys, owned by the login machine.
    Security,
    /// SendTargets, owned by discovery.
    SendTargets,
    /// Obsolete marker intervals: always answered `Reject` (§13.25).
    Obsolete,
}

/// Where a key may appear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPhase {
    /// Security negotiation stage only.
    Security,
    /// Any login stage ("IO ... Any-Stage").
    LoginAnyStage,
    /// Any login stage and full feature phase ("ALL ... Any-Stage").
    Anywhere,
    /// Operational stage of any connection's login ("IO").
    LoginOperational,
    /// Operational stage of the leading connection only ("LO").
    LeadingOnly,
    /// Operational stage and full feature phase (MaxRecvDataSegmentLength).
    OperationalAndFull,
    /// Full feature phase only ("FFPO").
    FullFeatureOnly,
}

/// Whether a key's value belongs to the session or to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Session,
    Connection,
}

/// Who may originate a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    Initiator,
    Target,
    Both,
}

/// One row of the key table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyDef {
    pub key: Key,
    pub name: &'static str,
    pub kind: KeyKind,
    pub phase: KeyPhase,
    pub scope: Scope,
    pub sender: Sender,
    /// "Irrelevant when: SessionType=Discovery".
    pub irrelevant_in_discovery: bool,
    /// Valid numerical range, inclusive.
    pub range: Option<(u64, u64)>,
}

#[allow(clippy::too_many_arguments)] // one argument per table column
const fn def(
    key: Key,
    name: &'static str,
    kind: KeyKind,
    phase: KeyPhase,
    scope: Scope,
    sender: Sender,
    irrelevant_in_discovery: bool,
    range: Option<(u64, u64)>,
) -> KeyDef {
    KeyDef {
        key,
        name,
        kind,
        phase,
        scope,
        sender,
        irrelevant_in_discovery,
        range,
    }
}

const SEG: Option<(u64, u64)> = Some((MIN_SEGMENT_LENGTH as u64, MAX_SEGMENT_LENGTH as u64));

/// The key table (RFC 7143 §12, §13; iSCSIProtocolLevel and TaskReporting
/// from RFC 7144 §13).
#[rustfmt::skip]
pub static KEY_TABLE: &[KeyDef] = {
    use KeyKind::*;
    use KeyPhase::*;
    use Scope::*;
    use Sender::*;
    &[
        def(Key::AuthMethod, "AuthMethod", KeyKind::Security, KeyPhase::Security, Connection, Both, false, None),
        def(Key::ChapA, "CHAP_A", KeyKind::Security, KeyPhase::Security, Connection, Both, false, None),
        def(Key::ChapI, "CHAP_I", KeyKind::Security, KeyPhase::Security, Connection, Both, false, None),
        def(Key::ChapC, "CHAP_C", KeyKind::Security, KeyPhase::Security, Connection, Both, false, None),
        def(Key::ChapN, "CHAP_N", KeyKind::Security, KeyPhase::Security, Connection, Both, false, None),
        def(Key::ChapR, "CHAP_R", KeyKind::Security, KeyPhase::Security, Connection, Both, false, None),
        def(Key::HeaderDigest, "HeaderDigest", List, LoginOperational, Connection, Both, false, None),
        def(Key::DataDigest, "DataDigest", List, LoginOperational, Connection, Both, false, None),
        def(Key::MaxConnections, "MaxConnections", NumMin, LeadingOnly, Session, Both, true, Some((1, 65_535))),
        def(Key::SendTargets, "SendTargets", KeyKind::SendTargets, FullFeatureOnly, Session, Initiator, false, None),
        def(Key::TargetName, "TargetName", Declarative, LoginAnyStage, Session, Initiator, false, None),
        def(Key::InitiatorName, "InitiatorName", Declarative, LoginAnyStage, Session, Initiator, false, None),
        def(Key::TargetAlias, "TargetAlias", Declarative, Anywhere, Session, Target, false, None),
        def(Key::InitiatorAlias, "InitiatorAlias", Declarative, Anywhere, Session, Initiator, false, None),
        def(Key::TargetAddress, "TargetAddress", Declarative, Anywhere, Session, Target, false, None),
        def(Key::TargetPortalGroupTag, "TargetPortalGroupTag", Declarative, LoginAnyStage, Session, Target, false, None),
        def(Key::InitialR2T, "InitialR2T", BoolOr, LeadingOnly, Session, Both, true, None),
        def(Key::ImmediateData, "ImmediateData", BoolAnd, LeadingOnly, Session, Both, true, None),
        def(Key::MaxRecvDataSegmentLength, "MaxRecvDataSegmentLength", Declarative, OperationalAndFull, Connection, Both, false, SEG),
        def(Key::MaxBurstLength, "MaxBurstLength", NumMin, LeadingOnly, Session, Both, true, SEG),
        def(Key::FirstBurstLength, "FirstBurstLength", NumMin, LeadingOnly, Session, Both, true, SEG),
        def(Key::DefaultTime2Wait, "DefaultTime2Wait", NumMax, LeadingOnly, Session, Both, false, Some((0, 3600))),
        def(Key::DefaultTime2Retain, "DefaultTime2Retain", NumMin, LeadingOnly, Session, Both, false, Some((0, 3600))),
        def(Key::MaxOutstandingR2T, "MaxOutstandingR2T", NumMin, LeadingOnly, Session, Both, true, Some((1, 65_535))),
        def(Key::DataPduInOrder, "DataPDUInOrder", BoolOr, LeadingOnly, Session, Both, true, None),
        def(Key::DataSequenceInOrder, "DataSequenceInOrder", BoolOr, LeadingOnly, Session, Both, true, None),
        def(Key::ErrorRecoveryLevel, "ErrorRecoveryLevel", NumMin, LeadingOnly, Session, Both, false, Some((0, 2))),
        def(Key::SessionType, "SessionType", Declarative, LoginAnyStage, Session, Initiator, false, None),
        def(Key::IfMarker, "IFMarker", BoolAnd, LoginOperational, Connection, Both, false, None),
        def(Key::OfMarker, "OFMarker", BoolAnd, LoginOperational, Connection, Both, false, None),
        def(Key::IfMarkInt, "IFMarkInt", Obsolete, LoginOperational, Connection, Both, false, None),
        def(Key::OfMarkInt, "OFMarkInt", Obsolete, LoginOperational, Connection, Both, false, None),
        def(Key::ProtocolLevel, "iSCSIProtocolLevel", NumMin, LeadingOnly, Session, Both, false, Some((0, 31))),
        def(Key::TaskReporting, "TaskReporting", List, LeadingOnly, Session, Both, true, None),
    ]
};

/// Finds a key's row by its exact (case-sensitive) name.
pub fn lookup(name: &str) -> Option<&'static KeyDef> {
    KEY_TABLE.iter().find(|d| d.name == name)
}

/// The table row of a known key.
pub fn key_def(key: Key) -> &'static KeyDef {
    // Every Key variant has a row (checked by a unit test); the fallback
    // only keeps this total.
    KEY_TABLE
        .iter()
        .find(|d| d.key == key)
        .unwrap_or(&KEY_TABLE[0])
}

/// Where the keys being negotiated arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Login, security negotiation stage (CSG=0).
    Security,
    /// Login, operational negotiation stage (CSG=1).
    Operational,
    /// A Text Request in full feature phase.
    FullFeature,
}

/// A protocol error in the initiator's keys: login fails with "initiator
/// error", a text exchange is rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NegotiationError {
    #[error("key {0} negotiated or declared twice")]
    Renegotiated(String),
    #[error("key {0} may only be sent by a target")]
    WrongSender(String),
    #[error("key {key} is not allowed in the {phase:?} phase")]
    WrongPhase { key: String, phase: Phase },
    #[error("invalid value {value:?} declared for {key}")]
    InvalidDeclaration { key: String, value: String },
    #[error("reserved constant {value:?} offered for {key}")]
    ReservedValue { key: String, value: String },
    #[error("inadmissible value {value:?} for {key}, whose default we cannot accept")]
    Unacceptable { key: String, value: String },
    #[error("answer {value:?} to our offer of {key} is not admissible")]
    BadAnswer { key: String, value: String },
}

/// The result of one batch of keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Answers to put in the response, in the order of the request.
    pub replies: Vec<(String, String)>,
    /// Keys the caller handles (security, identity declarations,
    /// SendTargets), already checked for stage, sender and duplicates.
    pub passthrough: Vec<(Key, String)>,
    /// Set when the initiator declared MaxRecvDataSegmentLength.
    pub initiator_max_recv_data_segment_length: Option<u32>,
}

/// Negotiates one login (or one full-feature Text exchange).
#[derive(Debug, Clone)]
pub struct Negotiator {
    limits: TargetLimits,
    discovery: bool,
    leading: bool,
    params: SessionParams,
    /// Keys the initiator has sent so far, with the value first sent.
    received: Vec<(String, String)>,
    /// Our offers awaiting the initiator's answer.
    offered: Vec<(Key, u64)>,
    /// Keys that reached a negotiated value (not Reject/Irrelevant).
    settled: Vec<Key>,
    /// Whether our declarations (MaxRecvDataSegmentLength) went out.
    declared: bool,
}

impl Negotiator {
    /// `leading`: this login creates a session (TSIH 0) rather than adding
    /// a connection to one; leading-only keys are Irrelevant otherwise.
    pub fn new(limits: &TargetLimits, discovery: bool, leading: bool) -> Self {
        Self {
            limits: limits.normalized(),
            discovery,
            leading,
            params: SessionParams::default(),
            received: Vec::new(),
            offered: Vec::new(),
            settled: Vec::new(),
            declared: false,
        }
    }

    /// Changes the session type once SessionType is known.
    pub fn set_discovery(&mut self, discovery: bool) {
        self.discovery = discovery;
    }

    pub fn params(&self) -> &SessionParams {
        &self.params
    }

    pub fn into_params(self) -> SessionParams {
        self.params
    }

    /// Whether we offered keys the initiator has not answered yet (the
    /// login must not leave the stage before it does).
    pub fn awaiting_answers(&self) -> bool {
        !self.offered.is_empty()
    }

    /// Whether our own declarations have been sent.
    pub fn declared(&self) -> bool {
        self.declared
    }

    /// Whether the login could skip the operational stage without leaving
    /// a limit of ours unenforced (defaults exceeding what we accept).
    pub fn defaults_acceptable(&self) -> bool {
        self.discovery || !self.leading || self.pending_offers().is_empty()
    }

    fn is_settled(&self, key: Key) -> bool {
        self.settled.contains(&key)
    }

    /// Our value for `key` when its RFC default is more than we accept
    /// (only session keys of a leading, normal login can be constrained).
    fn constraint(&self, key: Key) -> Option<u64> {
        if self.discovery || !self.leading {
            return None;
        }
        let defaults = SessionParams::default();
        let l = &self.limits;
        match key {
            Key::MaxBurstLength if l.max_burst_length < defaults.max_burst_length => {
                Some(u64::from(l.max_burst_length))
            }
            Key::FirstBurstLength if l.first_burst_length < defaults.first_burst_length => {
                Some(u64::from(l.first_burst_length))
            }
            Key::ImmediateData if !l.immediate_data => Some(0),
            _ => None,
        }
    }

    /// The keys whose RFC defaults we cannot accept and the initiator did
    /// not settle: we must offer our own value.
    fn pending_offers(&self) -> Vec<(Key, u64)> {
        [
            Key::MaxBurstLength,
            Key::FirstBurstLength,
            Key::ImmediateData,
        ]
        .into_iter()
        .filter(|k| !self.is_settled(*k))
        .filter_map(|k| self.constraint(k).map(|v| (k, v)))
        .collect()
    }

    /// Our declarations and offers for the operational stage: always
    /// MaxRecvDataSegmentLength (declarative from both sides), plus offers
    /// for session keys whose defaults exceed our limits. Returns nothing
    /// the second time.
    pub fn target_keys(&mut self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.declared {
            return out;
        }
        self.declared = true;
        self.params.max_recv_data_segment_length_target = self.limits.max_recv_data_segment_length;
        out.push((
            key_def(Key::MaxRecvDataSegmentLength).name.to_owned(),
            self.limits.max_recv_data_segment_length.to_string(),
        ));
        for (key, value) in self.pending_offers() {
            let text = match key {
                Key::ImmediateData => bool_str(value != 0).to_owned(),
                _ => value.to_string(),
            };
            if key == Key::MaxBurstLength {
                self.params.max_burst_length = self.limits.max_burst_length;
            }
            out.push((key_def(key).name.to_owned(), text));
            self.offered.push((key, value));
        }
        out
    }

    /// Negotiates one complete batch of keys (one request, C-bit pieces
    /// already joined) received in `phase`.
    pub fn negotiate(
        &mut self,
        phase: Phase,
        pairs: &[(String, String)],
    ) -> Result<Outcome, NegotiationError> {
        let mut out = Outcome::default();
        for (name, value) in pairs {
            self.one_key(phase, name, value, &mut out)?;
        }
        // RFC 7143 §13.14: FirstBurstLength MUST NOT exceed MaxBurstLength,
        // whichever order the two were negotiated in.
        if self.params.first_burst_length > self.params.max_burst_length {
            self.params.first_burst_length = self.params.max_burst_length;
            let fbl = key_def(Key::FirstBurstLength).name;
            for (k, v) in &mut out.replies {
                if k == fbl {
                    *v = self.params.first_burst_length.to_string();
                }
            }
        }
        Ok(out)
    }

    fn one_key(
        &mut self,
        phase: Phase,
        name: &str,
        value: &str,
        out: &mut Outcome,
    ) -> Result<(), NegotiationError> {
        let Some(def) = lookup(name) else {
            // Unknown keys, standard-looking or X-/X# extensions alike, are
            // answered NotUnderstood (§6.2) but still may not repeat.
            self.remember(name, value, None)?;
            out.replies
                .push((name.to_owned(), NOT_UNDERSTOOD.to_owned()));
            return Ok(());
        };

        if let Some(pos) = self.offered.iter().position(|(k, _)| *k == def.key) {
            let (_, offer) = self.offered.remove(pos);
            self.received.push((name.to_owned(), value.to_owned()));
            return self.take_answer(def, offer, value);
        }

        if is_reserved(value) && def.kind != KeyKind::Declarative {
            return Err(NegotiationError::ReservedValue {
                key: name.to_owned(),
                value: value.to_owned(),
            });
        }
        if !self.remember(name, value, Some(def))? {
            return Ok(());
        }
        if def.sender == Sender::Target {
            return Err(NegotiationError::WrongSender(name.to_owned()));
        }

        match phase_verdict(def.phase, phase) {
            Verdict::Allowed => {}
            Verdict::Reject => {
                out.replies.push((name.to_owned(), REJECT.to_owned()));
                return Ok(());
            }
            Verdict::Error => {
                return Err(NegotiationError::WrongPhase {
                    key: name.to_owned(),
                    phase,
                })
            }
        }
        if (def.phase == KeyPhase::LeadingOnly && !self.leading)
            || (def.irrelevant_in_discovery && self.discovery)
        {
            out.replies.push((name.to_owned(), IRRELEVANT.to_owned()));
            return Ok(());
        }

        match def.kind {
            KeyKind::Security | KeyKind::SendTargets => {
                out.passthrough.push((def.key, value.to_owned()));
            }
            KeyKind::Declarative => self.declaration(def, value, out)?,
            KeyKind::List => {
                let answer = self.list(def, value)?;
                out.replies.push((name.to_owned(), answer));
            }
            KeyKind::BoolAnd | KeyKind::BoolOr => {
                let answer = match parse_bool(value) {
                    Some(offer) => {
                        let ours = self.our_bool(def.key);
                        let result = if def.kind == KeyKind::BoolAnd {
                            offer && ours
                        } else {
                            offer || ours
                        };
                        self.set_bool(def.key, result);
                        self.settled.push(def.key);
                        bool_str(result).to_owned()
                    }
                    None => self.reject_or_fail(def, value)?,
                };
                out.replies.push((name.to_owned(), answer));
            }
            KeyKind::NumMin | KeyKind::NumMax => {
                let (lo, hi) = def.range.unwrap_or((0, u64::MAX));
                let answer = match parse_number(value) {
                    Some(offer) if (lo..=hi).contains(&offer) => {
                        let ours = self.our_number(def.key);
                        let result = if def.kind == KeyKind::NumMin {
                            offer.min(ours)
                        } else {
                            offer.max(ours)
                        };
                        self.set_number(def.key, result);
                        self.settled.push(def.key);
                        result.to_string()
                    }
                    _ => self.reject_or_fail(def, value)?,
                };
                out.replies.push((name.to_owned(), answer));
            }
            KeyKind::Obsolete => out.replies.push((name.to_owned(), REJECT.to_owned())),
        }
        Ok(())
    }

    /// Records a received key; `Ok(false)` means "identical repeat of an
    /// identity declaration, ignore it" (libiscsi re-sends InitiatorName,
    /// TargetName and SessionType in the operational stage).
    fn remember(
        &mut self,
        name: &str,
        value: &str,
        def: Option<&KeyDef>,
    ) -> Result<bool, NegotiationError> {
        if let Some((_, first)) = self.received.iter().find(|(k, _)| k == name) {
            let key = def.map(|d| d.key);
            let identity = matches!(
                key,
                Some(Key::InitiatorName | Key::TargetName | Key::SessionType | Key::InitiatorAlias)
            );
            if identity && first == value {
                return Ok(false);
            }
            // A declaration of our receive limit may be repeated with a new
            // value (it only describes the sender's current buffers).
            if key != Some(Key::MaxRecvDataSegmentLength) {
                return Err(NegotiationError::Renegotiated(name.to_owned()));
            }
            return Ok(true);
        }
        self.received.push((name.to_owned(), value.to_owned()));
        Ok(true)
    }

    fn declaration(
        &mut self,
        def: &KeyDef,
        value: &str,
        out: &mut Outcome,
    ) -> Result<(), NegotiationError> {
        let invalid = || NegotiationError::InvalidDeclaration {
            key: def.name.to_owned(),
            value: value.to_owned(),
        };
        if def.key == Key::MaxRecvDataSegmentLength {
            let n = parse_number(value).ok_or_else(invalid)?;
            let (lo, hi) = def.range.unwrap_or((0, u64::MAX));
            if !(lo..=hi).contains(&n) {
                return Err(invalid());
            }
            let n = u32::try_from(n).map_err(|_| invalid())?;
            self.params.max_recv_data_segment_length_initiator = n;
            out.initiator_max_recv_data_segment_length = Some(n);
            return Ok(());
        }
        if is_reserved(value) {
            return Err(invalid());
        }
        out.passthrough.push((def.key, value.to_owned()));
        Ok(())
    }

    fn list(&mut self, def: &KeyDef, value: &str) -> Result<String, NegotiationError> {
        let offered: Vec<&str> = value.split(',').collect();
        if offered.iter().any(|v| is_reserved(v) && *v != REJECT) || offered.contains(&REJECT) {
            return Err(NegotiationError::ReservedValue {
                key: def.name.to_owned(),
                value: value.to_owned(),
            });
        }
        let acceptable = |v: &str| match def.key {
            Key::HeaderDigest => v == "None" || (v == "CRC32C" && self.limits.allow_header_digest),
            Key::DataDigest => v == "None" || (v == "CRC32C" && self.limits.allow_data_digest),
            Key::TaskReporting => v == "RFC3720",
            _ => false,
        };
        let Some(choice) = offered.iter().copied().find(|v| acceptable(v)) else {
            return Ok(REJECT.to_owned());
        };
        match def.key {
            Key::HeaderDigest => self.params.header_digest = choice == "CRC32C",
            Key::DataDigest => self.params.data_digest = choice == "CRC32C",
            _ => {}
        }
        Ok(choice.to_owned())
    }

    fn take_answer(
        &mut self,
        def: &KeyDef,
        offer: u64,
        value: &str,
    ) -> Result<(), NegotiationError> {
        // Reject/Irrelevant/NotUnderstood complete the negotiation with
        // the default standing (§6.2).
        if is_reserved(value) {
            if def.key == Key::MaxBurstLength {
                self.params.max_burst_length = SessionParams::default().max_burst_length;
            }
            return Ok(());
        }
        let bad = || NegotiationError::BadAnswer {
            key: def.name.to_owned(),
            value: value.to_owned(),
        };
        match def.kind {
            KeyKind::NumMin => {
                let (lo, hi) = def.range.unwrap_or((0, u64::MAX));
                let n = parse_number(value).ok_or_else(bad)?;
                if !(lo..=hi).contains(&n) || n > offer {
                    return Err(bad());
                }
                self.set_number(def.key, n);
                self.settled.push(def.key);
            }
            KeyKind::BoolAnd => {
                let b = parse_bool(value).ok_or_else(bad)?;
                if b && offer == 0 {
                    return Err(bad());
                }
                self.set_bool(def.key, b);
                self.settled.push(def.key);
            }
            _ => return Err(bad()),
        }
        Ok(())
    }

    /// The answer to an inadmissible value: Reject, unless the default
    /// that Reject leaves standing is more than we accept (we could not
    /// then enforce our limit without negotiating the key a second time).
    fn reject_or_fail(&self, def: &KeyDef, value: &str) -> Result<String, NegotiationError> {
        if self.constraint(def.key).is_some() {
            return Err(NegotiationError::Unacceptable {
                key: def.name.to_owned(),
                value: value.to_owned(),
            });
        }
        Ok(REJECT.to_owned())
    }

    fn our_bool(&self, key: Key) -> bool {
        match key {
            Key::InitialR2T => self.limits.require_initial_r2t,
            Key::ImmediateData => self.limits.immediate_data,
            // We want PDUs and sequences in order: OR with Yes is Yes.
            Key::DataPduInOrder | Key::DataSequenceInOrder => true,
            // Markers are obsolete; AND with No is No.
            _ => false,
        }
    }

    fn set_bool(&mut self, key: Key, v: bool) {
        let p = &mut self.params;
        match key {
            Key::InitialR2T => p.initial_r2t = v,
            Key::ImmediateData => p.immediate_data = v,
            Key::DataPduInOrder => p.data_pdu_in_order = v,
            Key::DataSequenceInOrder => p.data_sequence_in_order = v,
            Key::IfMarker => p.ifmarker = v,
            Key::OfMarker => p.ofmarker = v,
            _ => {}
        }
    }

    fn our_number(&self, key: Key) -> u64 {
        let l = &self.limits;
        match key {
            Key::MaxConnections => u64::from(l.max_connections),
            Key::MaxBurstLength => u64::from(l.max_burst_length),
            Key::FirstBurstLength => u64::from(l.first_burst_length),
            Key::DefaultTime2Wait => 2,
            Key::DefaultTime2Retain => 20,
            Key::MaxOutstandingR2T => u64::from(l.max_outstanding_r2t),
            // Only session recovery by full re-login is implemented.
            Key::ErrorRecoveryLevel => 0,
            // 1 = RFC 7143; the RFC 7144 additions are not implemented.
            Key::ProtocolLevel => 1,
            _ => 0,
        }
    }

    fn set_number(&mut self, key: Key, v: u64) {
        // Values were range-checked against the table, so they fit.
        let as_u16 = |v: u64| u16::try_from(v).unwrap_or(u16::MAX);
        let as_u32 = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        let p = &mut self.params;
        match key {
            Key::MaxConnections => p.max_connections = as_u16(v),
            Key::MaxBurstLength => p.max_burst_length = as_u32(v),
            Key::FirstBurstLength => p.first_burst_length = as_u32(v),
            Key::DefaultTime2Wait => p.default_time2wait = as_u16(v),
            Key::DefaultTime2Retain => p.default_time2retain = as_u16(v),
            Key::MaxOutstandingR2T => p.max_outstanding_r2t = as_u16(v),
            Key::ErrorRecoveryLevel => p.error_recovery_level = u8::try_from(v).unwrap_or(0),
            _ => {}
        }
    }
}

fn is_reserved(v: &str) -> bool {
    matches!(v, REJECT | IRRELEVANT | NOT_UNDERSTOOD)
}

enum Verdict {
    Allowed,
    /// Answer the key with Reject (full feature phase: a text exchange is
    /// not torn down for one misplaced key).
    Reject,
    /// Protocol error.
    Error,
}

fn phase_verdict(key_phase: KeyPhase, phase: Phase) -> Verdict {
    use KeyPhase as K;
    match phase {
        // Only security keys and "Any-Stage" declarations may appear in the
        // security stage (RFC 7143 §13, introduction).
        Phase::Security => match key_phase {
            K::Security | K::LoginAnyStage | K::Anywhere => Verdict::Allowed,
            _ => Verdict::Error,
        },
        Phase::Operational => match key_phase {
            K::Security | K::FullFeatureOnly => Verdict::Error,
            _ => Verdict::Allowed,
        },
        Phase::FullFeature => match key_phase {
            K::Anywhere | K::OperationalAndFull | K::FullFeatureOnly => Verdict::Allowed,
            _ => Verdict::Reject,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn normal() -> Negotiator {
        Negotiator::new(&TargetLimits::default(), false, true)
    }

    fn reply(n: &mut Negotiator, key: &str, value: &str) -> String {
        let out = n
            .negotiate(Phase::Operational, &pairs(&[(key, value)]))
            .unwrap();
        assert_eq!(out.replies.len(), 1, "{out:?}");
        out.replies[0].1.clone()
    }

    #[test]
    fn table_covers_every_key_once() {
        let all = [
            Key::AuthMethod,
            Key::ChapA,
            Key::ChapI,
            Key::ChapC,
            Key::ChapN,
            Key::ChapR,
            Key::HeaderDigest,
            Key::DataDigest,
            Key::MaxConnections,
            Key::SendTargets,
            Key::TargetName,
            Key::InitiatorName,
            Key::TargetAlias,
            Key::InitiatorAlias,
            Key::TargetAddress,
            Key::TargetPortalGroupTag,
            Key::InitialR2T,
            Key::ImmediateData,
            Key::MaxRecvDataSegmentLength,
            Key::MaxBurstLength,
            Key::FirstBurstLength,
            Key::DefaultTime2Wait,
            Key::DefaultTime2Retain,
            Key::MaxOutstandingR2T,
            Key::DataPduInOrder,
            Key::DataSequenceInOrder,
            Key::ErrorRecoveryLevel,
            Key::SessionType,
            Key::IfMarker,
            Key::OfMarker,
            Key::IfMarkInt,
            Key::OfMarkInt,
            Key::ProtocolLevel,
            Key::TaskReporting,
        ];
        assert_eq!(all.len(), KEY_TABLE.len());
        for k in all {
            assert_eq!(KEY_TABLE.iter().filter(|d| d.key == k).count(), 1, "{k:?}");
            assert_eq!(key_def(k).key, k);
            assert_eq!(lookup(key_def(k).name).map(|d| d.key), Some(k));
        }
        assert!(lookup("maxburstlength").is_none());
    }

    #[test]
    fn defaults_are_rfc_defaults() {
        let p = SessionParams::default();
        assert!(!p.header_digest && !p.data_digest);
        assert_eq!(p.max_connections, 1);
        assert!(p.initial_r2t && p.immediate_data);
        assert_eq!(p.max_recv_data_segment_length_initiator, 8192);
        assert_eq!(p.max_recv_data_segment_length_target, 8192);
        assert_eq!(p.max_burst_length, 262_144);
        assert_eq!(p.first_burst_length, 65_536);
        assert_eq!((p.default_time2wait, p.default_time2retain), (2, 20));
        assert_eq!(p.max_outstanding_r2t, 1);
        assert!(p.data_pdu_in_order && p.data_sequence_in_order);
        assert_eq!(p.error_recovery_level, 0);
    }

    #[test]
    fn digests_pick_first_acceptable_in_initiator_order() {
        let mut n = normal();
        assert_eq!(reply(&mut n, "HeaderDigest", "CRC32C,None"), "CRC32C");
        assert_eq!(reply(&mut n, "DataDigest", "None,CRC32C"), "None");
        assert!(n.params().header_digest);
        assert!(!n.params().data_digest);

        let limits = TargetLimits {
            allow_header_digest: false,
            allow_data_digest: false,
            ..TargetLimits::default()
        };
        let mut n = Negotiator::new(&limits, false, true);
        assert_eq!(reply(&mut n, "HeaderDigest", "CRC32C,None"), "None");
        assert_eq!(reply(&mut n, "DataDigest", "CRC32C"), "Reject");
        assert!(!n.params().header_digest && !n.params().data_digest);

        let mut n = normal();
        assert_eq!(reply(&mut n, "HeaderDigest", "Y-vendor,CRC32C"), "CRC32C");
        assert_eq!(reply(&mut n, "DataDigest", "MD5"), "Reject");
    }

    #[test]
    fn reserved_constants_as_offers_are_errors() {
        for (k, v) in [
            ("HeaderDigest", "None,Reject"),
            ("InitialR2T", "Irrelevant"),
            ("MaxBurstLength", "NotUnderstood"),
            ("InitiatorName", "Reject"),
        ] {
            let mut n = normal();
            let phase = if k == "InitiatorName" {
                Phase::Security
            } else {
                Phase::Operational
            };
            assert!(n.negotiate(phase, &pairs(&[(k, v)])).is_err(), "{k}={v}");
        }
    }

    #[test]
    fn booleans_and_or() {
        let mut n = normal();
        // OR with our Yes (we require R2T by default).
        assert_eq!(reply(&mut n, "InitialR2T", "No"), "Yes");
        assert_eq!(reply(&mut n, "ImmediateData", "Yes"), "Yes");
        assert_eq!(reply(&mut n, "DataPDUInOrder", "No"), "Yes");
        assert_eq!(reply(&mut n, "DataSequenceInOrder", "No"), "Yes");
        assert_eq!(reply(&mut n, "IFMarker", "Yes"), "No");
        assert_eq!(reply(&mut n, "OFMarker", "No"), "No");
        let p = n.params();
        assert!(p.initial_r2t && p.immediate_data && !p.ifmarker && !p.ofmarker);

        let limits = TargetLimits {
            require_initial_r2t: false,
            immediate_data: false,
            ..TargetLimits::default()
        };
        let mut n = Negotiator::new(&limits, false, true);
        assert_eq!(reply(&mut n, "InitialR2T", "No"), "No");
        assert_eq!(reply(&mut n, "ImmediateData", "Yes"), "No");
        assert!(!n.params().initial_r2t && !n.params().immediate_data);

        let mut n = normal();
        assert_eq!(reply(&mut n, "InitialR2T", "yes"), "Reject");
        assert_eq!(reply(&mut n, "ImmediateData", "1"), "Reject");
    }

    #[test]
    fn numbers_min_max_and_ranges() {
        let mut n = normal();
        assert_eq!(reply(&mut n, "MaxConnections", "65535"), "8");
        assert_eq!(reply(&mut n, "MaxBurstLength", "16776192"), "1048576");
        assert_eq!(reply(&mut n, "FirstBurstLength", "512"), "512");
        assert_eq!(reply(&mut n, "DefaultTime2Wait", "0"), "2");
        assert_eq!(reply(&mut n, "DefaultTime2Retain", "0"), "0");
        assert_eq!(reply(&mut n, "MaxOutstandingR2T", "4"), "1");
        assert_eq!(reply(&mut n, "ErrorRecoveryLevel", "2"), "0");
        assert_eq!(reply(&mut n, "iSCSIProtocolLevel", "2"), "1");
        let p = n.params();
        assert_eq!(p.max_connections, 8);
        assert_eq!(p.max_burst_length, 1_048_576);
        assert_eq!(p.first_burst_length, 512);
        assert_eq!((p.default_time2wait, p.default_time2retain), (2, 0));
        assert_eq!(p.max_outstanding_r2t, 1);

        let mut n = normal();
        assert_eq!(reply(&mut n, "DefaultTime2Wait", "3600"), "3600");
        assert_eq!(reply(&mut n, "MaxConnections", "1"), "1");
        assert_eq!(reply(&mut n, "MaxBurstLength", "0x200"), "512");

        for (k, v) in [
            ("MaxConnections", "0"),
            ("MaxConnections", "65536"),
            ("MaxBurstLength", "511"),
            ("MaxBurstLength", "16777216"),
            ("FirstBurstLength", "-1"),
            ("DefaultTime2Wait", "3601"),
            ("DefaultTime2Retain", "x"),
            ("MaxOutstandingR2T", "0"),
            ("ErrorRecoveryLevel", "3"),
            ("iSCSIProtocolLevel", "32"),
        ] {
            let mut n = normal();
            assert_eq!(reply(&mut n, k, v), "Reject", "{k}={v}");
            assert_eq!(n.params(), &SessionParams::default(), "{k}={v}");
        }
    }

    #[test]
    fn first_burst_never_exceeds_max_burst() {
        let mut n = normal();
        let out = n
            .negotiate(
                Phase::Operational,
                &pairs(&[("FirstBurstLength", "262144"), ("MaxBurstLength", "65536")]),
            )
            .unwrap();
        assert_eq!(
            out.replies,
            pairs(&[("FirstBurstLength", "65536"), ("MaxBurstLength", "65536")])
        );
        assert_eq!(n.params().first_burst_length, 65_536);
    }

    #[test]
    fn max_recv_data_segment_length_is_declarative() {
        let mut n = normal();
        let out = n
            .negotiate(
                Phase::Operational,
                &pairs(&[("MaxRecvDataSegmentLength", "65536")]),
            )
            .unwrap();
        assert!(out.replies.is_empty());
        assert_eq!(out.initiator_max_recv_data_segment_length, Some(65_536));
        assert_eq!(n.params().max_recv_data_segment_length_initiator, 65_536);
        // Re-declaration is allowed.
        n.negotiate(
            Phase::Operational,
            &pairs(&[("MaxRecvDataSegmentLength", "512")]),
        )
        .unwrap();
        assert_eq!(n.params().max_recv_data_segment_length_initiator, 512);

        for bad in ["511", "16777216", "abc", "Reject"] {
            let mut n = normal();
            assert!(matches!(
                n.negotiate(
                    Phase::Operational,
                    &pairs(&[("MaxRecvDataSegmentLength", bad)])
                ),
                Err(NegotiationError::InvalidDeclaration { .. })
            ));
        }
        // Upper bound is legal.
        let mut n = normal();
        n.negotiate(
            Phase::Operational,
            &pairs(&[("MaxRecvDataSegmentLength", "16777215")]),
        )
        .unwrap();
    }

    #[test]
    fn target_declares_its_receive_limit_once() {
        let mut n = normal();
        assert_eq!(n.params().max_recv_data_segment_length_target, 8192);
        assert_eq!(
            n.target_keys(),
            pairs(&[("MaxRecvDataSegmentLength", "262144")])
        );
        assert_eq!(n.params().max_recv_data_segment_length_target, 262_144);
        assert!(n.target_keys().is_empty());
        assert!(!n.awaiting_answers());
    }

    #[test]
    fn target_offers_limits_below_defaults_and_checks_answers() {
        let limits = TargetLimits {
            max_burst_length: 65_536,
            first_burst_length: 16_384,
            immediate_data: false,
            ..TargetLimits::default()
        };
        let mut n = Negotiator::new(&limits, false, true);
        // Initiator negotiated MaxBurstLength itself: only FBL and ImmediateData offered.
        n.negotiate(Phase::Operational, &pairs(&[("MaxBurstLength", "262144")]))
            .unwrap();
        assert!(!n.defaults_acceptable());
        let keys = n.target_keys();
        assert_eq!(
            keys,
            pairs(&[
                ("MaxRecvDataSegmentLength", "262144"),
                ("FirstBurstLength", "16384"),
                ("ImmediateData", "No"),
            ])
        );
        assert!(n.awaiting_answers());
        let out = n
            .negotiate(
                Phase::Operational,
                &pairs(&[("FirstBurstLength", "8192"), ("ImmediateData", "No")]),
            )
            .unwrap();
        assert!(out.replies.is_empty());
        assert!(!n.awaiting_answers());
        assert_eq!(n.params().first_burst_length, 8192);
        assert_eq!(n.params().max_burst_length, 65_536);
        assert!(!n.params().immediate_data);

        // An answer above our offer is a protocol error.
        let mut n = Negotiator::new(&limits, false, true);
        n.target_keys();
        assert!(matches!(
            n.negotiate(Phase::Operational, &pairs(&[("MaxBurstLength", "65537")])),
            Err(NegotiationError::BadAnswer { .. })
        ));
        let mut n = Negotiator::new(&limits, false, true);
        n.target_keys();
        assert!(n
            .negotiate(Phase::Operational, &pairs(&[("ImmediateData", "Yes")]))
            .is_err());
        // Reject completes the negotiation.
        let mut n = Negotiator::new(&limits, false, true);
        n.target_keys();
        n.negotiate(
            Phase::Operational,
            &pairs(&[
                ("MaxBurstLength", "Reject"),
                ("FirstBurstLength", "NotUnderstood"),
                ("ImmediateData", "Irrelevant"),
            ]),
        )
        .unwrap();
        assert!(!n.awaiting_answers());
    }

    #[test]
    fn garbage_for_a_constrained_key_fails() {
        let limits = TargetLimits {
            max_burst_length: 4096,
            ..TargetLimits::default()
        };
        let mut n = Negotiator::new(&limits, false, true);
        assert!(matches!(
            n.negotiate(Phase::Operational, &pairs(&[("MaxBurstLength", "Yes")])),
            Err(NegotiationError::Unacceptable { .. })
        ));
        // Unconstrained keys are simply rejected.
        let mut n = Negotiator::new(&limits, false, true);
        assert_eq!(reply(&mut n, "MaxConnections", "x"), "Reject");
    }

    #[test]
    fn discovery_makes_session_keys_irrelevant() {
        let mut n = Negotiator::new(&TargetLimits::default(), true, true);
        for k in [
            "MaxConnections",
            "InitialR2T",
            "ImmediateData",
            "MaxBurstLength",
            "FirstBurstLength",
            "MaxOutstandingR2T",
            "DataPDUInOrder",
            "DataSequenceInOrder",
        ] {
            let v = if matches!(
                k,
                "InitialR2T" | "ImmediateData" | "DataPDUInOrder" | "DataSequenceInOrder"
            ) {
                "Yes"
            } else {
                "4096"
            };
            assert_eq!(reply(&mut n, k, v), "Irrelevant", "{k}");
        }
        // Still negotiated in discovery sessions.
        assert_eq!(reply(&mut n, "HeaderDigest", "None"), "None");
        assert_eq!(reply(&mut n, "DefaultTime2Wait", "2"), "2");
        assert_eq!(reply(&mut n, "ErrorRecoveryLevel", "0"), "0");
        assert_eq!(n.target_keys().len(), 1);
        assert_eq!(n.params().max_connections, 1);
    }

    #[test]
    fn leading_only_keys_irrelevant_on_added_connection() {
        let mut n = Negotiator::new(&TargetLimits::default(), false, false);
        assert_eq!(reply(&mut n, "MaxBurstLength", "4096"), "Irrelevant");
        assert_eq!(reply(&mut n, "ErrorRecoveryLevel", "0"), "Irrelevant");
        assert_eq!(reply(&mut n, "HeaderDigest", "CRC32C"), "CRC32C");
        assert_eq!(n.params().max_burst_length, 262_144);
    }

    #[test]
    fn unknown_and_extension_keys_not_understood() {
        let mut n = normal();
        assert_eq!(reply(&mut n, "X-com.example.foo", "1"), "NotUnderstood");
        assert_eq!(reply(&mut n, "X#Whatever", "1"), "NotUnderstood");
        assert_eq!(reply(&mut n, "FooBar", "1"), "NotUnderstood");
        assert_eq!(reply(&mut n, "maxburstlength", "512"), "NotUnderstood");
        // Still counted for duplicates.
        assert!(n
            .negotiate(Phase::Operational, &pairs(&[("FooBar", "2")]))
            .is_err());
    }

    #[test]
    fn obsolete_and_rfc7144_keys() {
        let mut n = normal();
        assert_eq!(reply(&mut n, "IFMarkInt", "1~65535"), "Reject");
        assert_eq!(reply(&mut n, "OFMarkInt", "2048~8192"), "Reject");
        assert_eq!(
            reply(&mut n, "TaskReporting", "FastAbort,RFC3720"),
            "RFC3720"
        );
        let mut n = normal();
        assert_eq!(reply(&mut n, "TaskReporting", "FastAbort"), "Reject");
    }

    #[test]
    fn renegotiation_is_an_error() {
        let mut n = normal();
        reply(&mut n, "MaxBurstLength", "4096");
        assert_eq!(
            n.negotiate(Phase::Operational, &pairs(&[("MaxBurstLength", "4096")])),
            Err(NegotiationError::Renegotiated("MaxBurstLength".into()))
        );
    }

    #[test]
    fn identity_redeclaration_tolerated_only_when_identical() {
        let mut n = normal();
        let first = pairs(&[
            ("InitiatorName", "iqn.a"),
            ("SessionType", "Normal"),
            ("TargetName", "iqn.t"),
        ]);
        let out = n.negotiate(Phase::Security, &first).unwrap();
        assert_eq!(out.passthrough.len(), 3);
        let out = n.negotiate(Phase::Operational, &first).unwrap();
        assert!(out.passthrough.is_empty() && out.replies.is_empty());
        assert!(n
            .negotiate(Phase::Operational, &pairs(&[("InitiatorName", "iqn.b")]))
            .is_err());
    }

    #[test]
    fn target_only_keys_from_initiator_are_errors() {
        for k in ["TargetAlias", "TargetAddress", "TargetPortalGroupTag"] {
            let mut n = normal();
            assert_eq!(
                n.negotiate(Phase::Security, &pairs(&[(k, "1")])),
                Err(NegotiationError::WrongSender(k.into()))
            );
        }
    }

    #[test]
    fn stage_rules() {
        // Operational keys in the security stage.
        let mut n = normal();
        assert!(matches!(
            n.negotiate(Phase::Security, &pairs(&[("MaxBurstLength", "4096")])),
            Err(NegotiationError::WrongPhase { .. })
        ));
        let mut n = normal();
        assert!(n
            .negotiate(
                Phase::Security,
                &pairs(&[("MaxRecvDataSegmentLength", "4096")])
            )
            .is_err());
        // Security keys in the operational stage.
        let mut n = normal();
        assert!(n
            .negotiate(Phase::Operational, &pairs(&[("CHAP_A", "5")]))
            .is_err());
        // SendTargets during login.
        let mut n = normal();
        assert!(n
            .negotiate(Phase::Operational, &pairs(&[("SendTargets", "All")]))
            .is_err());
        // Any-stage keys pass through in every login stage.
        let mut n = normal();
        let out = n
            .negotiate(
                Phase::Security,
                &pairs(&[("InitiatorAlias", "host"), ("AuthMethod", "None")]),
            )
            .unwrap();
        assert_eq!(
            out.passthrough,
            vec![
                (Key::InitiatorAlias, "host".into()),
                (Key::AuthMethod, "None".into())
            ]
        );
    }

    #[test]
    fn full_feature_phase_rules() {
        let mut n = normal();
        let out = n
            .negotiate(
                Phase::FullFeature,
                &pairs(&[
                    ("MaxRecvDataSegmentLength", "131072"),
                    ("SendTargets", "All"),
                    ("MaxBurstLength", "4096"),
                    ("HeaderDigest", "CRC32C"),
                    ("AuthMethod", "None"),
                    ("InitiatorName", "iqn.x"),
                    ("X-foo", "bar"),
                ]),
            )
            .unwrap();
        assert_eq!(out.initiator_max_recv_data_segment_length, Some(131_072));
        assert_eq!(out.passthrough, vec![(Key::SendTargets, "All".into())]);
        assert_eq!(
            out.replies,
            pairs(&[
                ("MaxBurstLength", "Reject"),
                ("HeaderDigest", "Reject"),
                ("AuthMethod", "Reject"),
                ("InitiatorName", "Reject"),
                ("X-foo", "NotUnderstood"),
            ])
        );
        assert_eq!(n.params().max_burst_length, 262_144);
    }

    #[test]
    fn limits_are_normalized() {
        let l = TargetLimits {
            max_recv_data_segment_length: 1,
            max_burst_length: u32::MAX,
            first_burst_length: u32::MAX,
            max_connections: 0,
            max_outstanding_r2t: 0,
            ..TargetLimits::default()
        }
        .normalized();
        assert_eq!(l.max_recv_data_segment_length, 512);
        assert_eq!(l.max_burst_length, MAX_SEGMENT_LENGTH);
        assert_eq!(l.first_burst_length, MAX_SEGMENT_LENGTH);
        assert_eq!((l.max_connections, l.max_outstanding_r2t), (1, 1));
        let l = TargetLimits {
            max_burst_length: 4096,
            first_burst_length: 8192,
            ..TargetLimits::default()
        }
        .normalized();
        assert_eq!(l.first_burst_length, 4096);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        const KEYS: &[&str] = &[
            "HeaderDigest",
            "DataDigest",
            "MaxConnections",
            "InitialR2T",
            "ImmediateData",
            "MaxRecvDataSegmentLength",
            "MaxBurstLength",
            "FirstBurstLength",
            "DefaultTime2Wait",
            "DefaultTime2Retain",
            "MaxOutstandingR2T",
            "DataPDUInOrder",
            "DataSequenceInOrder",
            "ErrorRecoveryLevel",
            "IFMarker",
            "OFMarker",
            "iSCSIProtocolLevel",
            "TaskReporting",
        ];

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                (0u64..20_000_000).prop_map(|n| n.to_string()),
                Just("Yes".to_owned()),
                Just("No".to_owned()),
                Just("CRC32C,None".to_owned()),
                Just("None".to_owned()),
                "[ -~]{0,12}",
            ]
        }

        fn limits() -> impl Strategy<Value = TargetLimits> {
            (
                512u32..2_000_000,
                512u32..2_000_000,
                512u32..2_000_000,
                0u16..20,
                0u16..20,
                any::<bool>(),
                any::<bool>(),
            )
                .prop_map(|(mrdsl, mbl, fbl, mc, mor, r2t, imm)| TargetLimits {
                    max_recv_data_segment_length: mrdsl,
                    max_burst_length: mbl,
                    first_burst_length: fbl,
                    max_connections: mc,
                    max_outstanding_r2t: mor,
                    require_initial_r2t: r2t,
                    immediate_data: imm,
                    ..TargetLimits::default()
                })
        }

        proptest! {
            #[test]
            fn outcome_respects_our_limits(
                l in limits(),
                offers in proptest::collection::btree_map(0..KEYS.len(), value(), 0..KEYS.len()),
            ) {
                let pairs: Vec<(String, String)> =
                    offers.into_iter().map(|(k, v)| (KEYS[k].to_owned(), v)).collect();
                let mut n = Negotiator::new(&l, false, true);
                let Ok(out) = n.negotiate(Phase::Operational, &pairs) else { return Ok(()) };
                // Our declaration always goes out once.
                let ours = n.target_keys();
                prop_assert_eq!(&ours[0].0, "MaxRecvDataSegmentLength");
                prop_assert_eq!(n.params().max_recv_data_segment_length_target, l.normalized().max_recv_data_segment_length);
                // The initiator accepts our offers as made.
                let answers: Vec<(String, String)> = ours[1..].to_vec();
                n.negotiate(Phase::Operational, &answers).unwrap();
                prop_assert!(!n.awaiting_answers());
                let l = l.normalized();
                let p = n.params();
                prop_assert!(p.max_burst_length <= l.max_burst_length);
                prop_assert!(p.first_burst_length <= p.max_burst_length);
                prop_assert!(p.first_burst_length <= l.first_burst_length.max(65_536));
                prop_assert!(p.max_connections >= 1 && p.max_connections <= l.max_connections);
                prop_assert!(p.max_outstanding_r2t >= 1 && p.max_outstanding_r2t <= l.max_outstanding_r2t);
                prop_assert_eq!(p.error_recovery_level, 0);
                prop_assert!(!p.ifmarker && !p.ofmarker);
                prop_assert!(p.data_pdu_in_order && p.data_sequence_in_order);
                if l.require_initial_r2t { prop_assert!(p.initial_r2t); }
                if !l.immediate_data { prop_assert!(!p.immediate_data || !pairs.iter().any(|(k, _)| k == "ImmediateData")); }
                prop_assert!((512..=MAX_SEGMENT_LENGTH).contains(&p.max_recv_data_segment_length_initiator));
                // Every answered key is one that was offered, answered once.
                for (k, v) in &out.replies {
                    prop_assert_eq!(pairs.iter().filter(|(pk, _)| pk == k).count(), 1);
                    let def = lookup(k).unwrap();
                    if matches!(def.kind, KeyKind::NumMin | KeyKind::NumMax) && v != "Reject" {
                        let (lo, hi) = def.range.unwrap();
                        let n: u64 = v.parse().unwrap();
                        prop_assert!((lo..=hi).contains(&n));
                        let offered: u64 = parse_number(&pairs.iter().find(|(pk, _)| pk == k).unwrap().1).unwrap();
                        if def.kind == KeyKind::NumMin { prop_assert!(n <= offered); } else { prop_assert!(n >= offered); }
                    }
                }
            }
        }
    }
}
