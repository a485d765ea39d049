//! The target side of the iSCSI login phase (RFC 7143 §6.3, §11.12,
//! §11.13): one [`LoginMachine`] per new connection consumes Login Request
//! PDUs (already decoded by the PDU codec) and produces Login Responses,
//! ending in [`LoginOutcome::Complete`] with everything the session layer
//! needs, or in [`LoginOutcome::Failed`] with the status to send before
//! closing the connection.
//!
//! It covers the security stage (AuthMethod, CHAP with optional mutual
//! CHAP), the operational stage (through [`Negotiator`]), identity and
//! access checks (target lookup, initiator ACL), stage transitions, and
//! text spread over several PDUs in both directions (C bit). No I/O; the
//! server assigns the TSIH of new sessions and checks existing ones.
//!
//! ```
//! use std::sync::Arc;
//! use lunmirror::iscsi::login::*;
//!
//! let config = Arc::new(LoginConfig::default()); // no targets: discovery only
//! let mut login = LoginMachine::new(config);
//! let text = b"InitiatorName=iqn.1993-08.org.debian:01:abc\0SessionType=Discovery\0";
//! let req = LoginRequest {
//!     transit: true, cont: false, csg: 1, nsg: 3, version_max: 0, version_min: 0,
//!     isid: [0x80, 0, 0, 0, 0, 1], tsih: 0, itt: 1, cid: 0, cmd_sn: 1, exp_stat_sn: 0,
//!     data: text,
//! };
//! match login.step(&req) {
//!     LoginOutcome::Complete(mut resp, negotiated) => {
//!         resp.tsih = 1; // the server's new TSIH
//!         assert_eq!(negotiated.session_type, SessionType::Discovery);
//!         // send `resp`, enter full feature phase with `negotiated.params`
//!     }
//!     LoginOutcome::Continue(_resp) => { /* send, read the next Login Request */ }
//!     LoginOutcome::Failed(_resp) => { /* send, close; login.error() says why */ }
//! }
//! ```

use std::sync::Arc;

use thiserror::Error;

use super::chap::{ChapAuthenticator, ChapError, ChapStep};
use super::negotiate::{Key, NegotiationError, Negotiator, Phase, SessionParams, TargetLimits};
use super::text::{encode_text, parse_text, Segmenter, TextError};
use super::{ChapCredentials, TargetDef};

/// The only iSCSI version there is (RFC 7143 §11.12.4).
pub const ISCSI_VERSION: u8 = 0;
/// Login PDUs carry at most this much text each way: the initiator's
/// declared MaxRecvDataSegmentLength only applies from full feature phase.
pub const LOGIN_MAX_DATA_SEGMENT: usize = 8192;
/// Cap on the text one login request may accumulate over C=1 PDUs
/// (RFC 7143 §6.1 requires at least 8192; more is hostile).
pub const MAX_LOGIN_TEXT: usize = 64 * 1024;
/// Longest iSCSI name (RFC 7143 §4.2.7.1).
pub const MAX_ISCSI_NAME_LEN: usize = 223;

/// A login stage (CSG/NSG field values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Security = 0,
    Operational = 1,
    FullFeature = 3,
}

impl Stage {
    /// From the 2-bit CSG/NSG code; 2 is reserved.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::Security),
            1 => Some(Self::Operational),
            3 => Some(Self::FullFeature),
            _ => None,
        }
    }

    pub fn code(self) -> u8 {
        self as u8
    }
}

/// The fields of a Login Request PDU the login logic needs.
#[derive(Debug, Clone, Copy)]
pub struct LoginRequest<'a> {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub data: &'a [u8],
}

/// The fields of a Login Response PDU the login logic decides; the server
/// fills in StatSN, ExpCmdSN and MaxCmdSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub status_class: u8,
    pub status_detail: u8,
    pub data: Vec<u8>,
}

impl LoginResponse {
    /// Turns this response into a failure with `status` (no transit, no
    /// text): for checks only the server can make at completion, e.g. an
    /// unknown TSIH (`SessionDoesNotExist`) or `TooManyConnections`.
    pub fn with_status(mut self, status: LoginStatus) -> Self {
        self.status_class = status.class();
        self.status_detail = status.detail();
        if status != LoginStatus::Success {
            self.transit = false;
            self.cont = false;
            self.nsg = 0;
            self.data.clear();
        }
        self
    }
}

/// Login status class and detail (RFC 7143 §11.13.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginStatus {
    Success,
    TargetMovedTemporarily,
    TargetMovedPermanently,
    InitiatorError,
    AuthenticationFailure,
    AuthorizationFailure,
    NotFound,
    TargetRemoved,
    UnsupportedVersion,
    TooManyConnections,
    MissingParameter,
    CantIncludeInSession,
    SessionTypeNotSupported,
    SessionDoesNotExist,
    InvalidDuringLogin,
    TargetError,
    ServiceUnavailable,
    OutOfResources,
}

impl LoginStatus {
    pub fn class(self) -> u8 {
        use LoginStatus::*;
        match self {
            Success => 0,
            TargetMovedTemporarily | TargetMovedPermanently => 1,
            TargetError | ServiceUnavailable | OutOfResources => 3,
            _ => 2,
        }
    }

    pub fn detail(self) -> u8 {
        use LoginStatus::*;
        match self {
            Success | InitiatorError | TargetError => 0,
            TargetMovedTemporarily | AuthenticationFailure | ServiceUnavailable => 1,
            TargetMovedPermanently | AuthorizationFailure | OutOfResources => 2,
            NotFound => 3,
            TargetRemoved => 4,
            UnsupportedVersion => 5,
            TooManyConnections => 6,
            MissingParameter => 7,
            CantIncludeInSession => 8,
            SessionTypeNotSupported => 9,
            SessionDoesNotExist => 0x0a,
            InvalidDuringLogin => 0x0b,
        }
    }
}

/// Why a login failed (for logs); [`LoginError::status`] is what the
/// initiator is told.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LoginError {
    #[error("initiator supports versions {min}..={max}, we only 0")]
    UnsupportedVersion { min: u8, max: u8 },
    #[error("malformed login text: {0}")]
    Text(#[from] TextError),
    #[error("negotiation: {0}")]
    Negotiation(#[from] NegotiationError),
    #[error("CHAP: {0}")]
    Chap(#[from] ChapError),
    #[error("authentication failed: {0}")]
    Authentication(&'static str),
    #[error("missing {0}")]
    MissingParameter(&'static str),
    #[error("invalid {key}: {value:?}")]
    InvalidName { key: &'static str, value: String },
    #[error("no target named {0}")]
    TargetNotFound(String),
    #[error("initiator {initiator} may not log in to {target}")]
    NotAuthorized { initiator: String, target: String },
    #[error("unsupported session type {0:?}")]
    SessionType(String),
    #[error("invalid stage transition: CSG {csg}, NSG {nsg}, transit {transit}")]
    InvalidStage { csg: u8, nsg: u8, transit: bool },
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("login text exceeds {MAX_LOGIN_TEXT} bytes")]
    TooLong,
    #[error("login already finished")]
    Finished,
}

impl LoginError {
    /// The status this failure is reported with.
    pub fn status(&self) -> LoginStatus {
        match self {
            Self::UnsupportedVersion { .. } => LoginStatus::UnsupportedVersion,
            Self::Chap(_) | Self::Authentication(_) => LoginStatus::AuthenticationFailure,
            Self::MissingParameter(_) => LoginStatus::MissingParameter,
            Self::TargetNotFound(_) => LoginStatus::NotFound,
            Self::NotAuthorized { .. } => LoginStatus::AuthorizationFailure,
            Self::SessionType(_) => LoginStatus::SessionTypeNotSupported,
            Self::InvalidStage { .. } => LoginStatus::InvalidDuringLogin,
            Self::TooLong => LoginStatus::OutOfResources,
            Self::Text(_)
            | Self::Negotiation(_)
            | Self::InvalidName { .. }
            | Self::Protocol(_)
            | Self::Finished => LoginStatus::InitiatorError,
        }
    }
}

/// SessionType.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    Discovery,
    Normal,
}

/// Everything a successful login established.
#[derive(Debug, Clone)]
pub struct NegotiatedLogin {
    pub session_type: SessionType,
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    /// The target of a Normal session (None for Discovery).
    pub target: Option<Arc<TargetDef>>,
    pub isid: [u8; 6],
    /// 0 = new session; else the initiator wants to add a connection to
    /// (or reinstate a connection of) this session. Session-wide
    /// (leading-only) keys were answered Irrelevant on such a connection,
    /// so `params` then only carries the connection's own values
    /// (digests, MaxRecvDataSegmentLength); take the rest from the session.
    pub tsih: u16,
    pub cid: u16,
    pub params: SessionParams,
}

/// What to do with the response to one Login Request.
#[derive(Debug)]
pub enum LoginOutcome {
    /// Send it and wait for the next Login Request.
    Continue(LoginResponse),
    /// Send it and close the connection.
    Failed(LoginResponse),
    /// Send it (after setting `tsih` for a new session) and enter full
    /// feature phase.
    Complete(LoginResponse, NegotiatedLogin),
}

/// What the login machine needs to know about this target portal.
#[derive(Debug, Clone)]
pub struct LoginConfig {
    pub targets: Vec<Arc<TargetDef>>,
    pub limits: TargetLimits,
    pub target_portal_group_tag: u16,
    /// CHAP required for discovery sessions (None: no authentication).
    pub discovery_chap: Option<ChapCredentials>,
    /// Mutual CHAP credentials for discovery sessions.
    pub discovery_mutual_chap: Option<ChapCredentials>,
}

impl Default for LoginConfig {
    fn default() -> Self {
        Self {
            targets: Vec::new(),
            limits: TargetLimits::default(),
            target_portal_group_tag: 1,
            discovery_chap: None,
            discovery_mutual_chap: None,
        }
    }
}

impl LoginConfig {
    /// A target by name; iSCSI names compare case-insensitively (they are
    /// normalized to lower case, RFC 3722).
    pub fn find_target(&self, name: &str) -> Option<&Arc<TargetDef>> {
        self.targets
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(name))
    }
}

/// Whether `initiator` passes `target`'s ACL (empty list: everyone).
pub fn initiator_allowed(target: &TargetDef, initiator: &str) -> bool {
    target.allowed_initiators.is_empty()
        || target
            .allowed_initiators
            .iter()
            .any(|a| a.eq_ignore_ascii_case(initiator))
}

#[derive(Debug)]
enum State {
    /// No complete request yet.
    ExpectFirst,
    /// Security stage, no authentication method chosen yet.
    ExpectAuthMethod,
    /// Security stage, CHAP exchange under way.
    ExpectChap(Box<ChapAuthenticator>),
    /// Security stage done; waiting for the initiator to ask to transit.
    ExpectSecurityTransit,
    /// Operational stage.
    ExpectOperational,
    /// Our response is longer than one PDU: waiting for the empty request
    /// that asks for the next piece.
    ExpectResponseContinue(Box<PendingResponse>),
    /// Completed or failed.
    Done,
}

#[derive(Debug)]
struct PendingResponse {
    text: Segmenter,
    transit: bool,
    nsg: Stage,
    /// State to return to once the last piece is out (unless completing).
    resume: State,
}

/// Who is logging in, fixed by the first request.
#[derive(Debug)]
struct Identity {
    session_type: SessionType,
    initiator_name: String,
    initiator_alias: Option<String>,
    target: Option<Arc<TargetDef>>,
    negotiator: Negotiator,
}

/// Header fields that must not change during one login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fixed {
    isid: [u8; 6],
    tsih: u16,
    cid: u16,
}

/// The login state machine of one connection.
#[derive(Debug)]
pub struct LoginMachine {
    config: Arc<LoginConfig>,
    state: State,
    stage: Stage,
    fixed: Option<Fixed>,
    identity: Option<Identity>,
    request_text: Vec<u8>,
    error: Option<LoginError>,
}

impl LoginMachine {
    pub fn new(config: Arc<LoginConfig>) -> Self {
        Self {
            config,
            state: State::ExpectFirst,
            stage: Stage::Security,
            fixed: None,
            identity: None,
            request_text: Vec::new(),
            error: None,
        }
    }

    /// Why the login failed, once it has.
    pub fn error(&self) -> Option<&LoginError> {
        self.error.as_ref()
    }

    /// The stage the connection is in.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// Consumes one Login Request.
    pub fn step(&mut self, req: &LoginRequest<'_>) -> LoginOutcome {
        match self.step_inner(req) {
            Ok(outcome) => outcome,
            Err(err) => {
                let status = err.status();
                self.error = Some(err);
                self.state = State::Done;
                LoginOutcome::Failed(
                    self.response(req, false, false, 0, Vec::new())
                        .with_status(status),
                )
            }
        }
    }

    fn response(
        &self,
        req: &LoginRequest<'_>,
        transit: bool,
        cont: bool,
        nsg: u8,
        data: Vec<u8>,
    ) -> LoginResponse {
        LoginResponse {
            transit,
            cont,
            csg: self.stage.code(),
            nsg,
            version_max: ISCSI_VERSION,
            version_active: ISCSI_VERSION,
            isid: req.isid,
            tsih: req.tsih,
            itt: req.itt,
            status_class: 0,
            status_detail: 0,
            data,
        }
    }

    fn step_inner(&mut self, req: &LoginRequest<'_>) -> Result<LoginOutcome, LoginError> {
        if matches!(self.state, State::Done) {
            return Err(LoginError::Finished);
        }
        if req.version_min > ISCSI_VERSION || req.version_max < req.version_min {
            return Err(LoginError::UnsupportedVersion {
                min: req.version_min,
                max: req.version_max,
            });
        }
        let fixed = Fixed {
            isid: req.isid,
            tsih: req.tsih,
            cid: req.cid,
        };
        match self.fixed {
            None => self.fixed = Some(fixed),
            Some(f) if f != fixed => {
                return Err(LoginError::Protocol(
                    "ISID, TSIH or CID changed during login",
                ))
            }
            Some(_) => {}
        }
        if req.transit && req.cont {
            return Err(LoginError::Protocol("T and C both set"));
        }
        let invalid_stage = || LoginError::InvalidStage {
            csg: req.csg,
            nsg: req.nsg,
            transit: req.transit,
        };
        let csg = match Stage::from_code(req.csg) {
            Some(s @ (Stage::Security | Stage::Operational)) => s,
            _ => return Err(invalid_stage()),
        };
        if matches!(self.state, State::ExpectFirst) && self.request_text.is_empty() {
            // The first request picks the starting stage: the initiator may
            // skip security negotiation (checked once we know the target).
            self.stage = csg;
        } else if csg != self.stage {
            return Err(invalid_stage());
        }

        // A transit may only go forward (RFC 7143 §11.12.3).
        let wanted = if req.transit {
            match (self.stage, Stage::from_code(req.nsg)) {
                (Stage::Security, Some(n @ (Stage::Operational | Stage::FullFeature))) => Some(n),
                (Stage::Operational, Some(Stage::FullFeature)) => Some(Stage::FullFeature),
                _ => return Err(invalid_stage()),
            }
        } else {
            None
        };

        if let State::ExpectResponseContinue(_) = self.state {
            if !req.data.is_empty() || req.cont {
                return Err(LoginError::Protocol(
                    "text sent while our response is incomplete",
                ));
            }
            return Ok(self.next_piece(req));
        }

        if self.request_text.len() + req.data.len() > MAX_LOGIN_TEXT {
            return Err(LoginError::TooLong);
        }
        self.request_text.extend_from_slice(req.data);
        if req.cont {
            // More text follows; acknowledge with an empty response.
            return Ok(LoginOutcome::Continue(self.response(
                req,
                false,
                false,
                0,
                Vec::new(),
            )));
        }
        let text = std::mem::take(&mut self.request_text);
        let pairs = parse_text(&text)?;

        let first = matches!(self.state, State::ExpectFirst);
        if first {
            self.identify(req, &pairs)?;
            self.state = match self.stage {
                Stage::Security => State::ExpectAuthMethod,
                _ => State::ExpectOperational,
            };
        }
        let phase = match self.stage {
            Stage::Security => Phase::Security,
            _ => Phase::Operational,
        };
        let identity = self.identity.as_mut().ok_or(LoginError::Finished)?;
        let outcome = identity.negotiator.negotiate(phase, &pairs)?;

        let mut replies = Vec::new();
        if first && identity.session_type == SessionType::Normal {
            // RFC 7143 §13.9: TargetPortalGroupTag in the response to the
            // first complete request naming a target; §13.6 TargetAlias.
            if let Some(alias) = identity.target.as_ref().and_then(|t| t.alias.clone()) {
                replies.push(("TargetAlias".to_owned(), alias));
            }
            replies.push((
                "TargetPortalGroupTag".to_owned(),
                self.config.target_portal_group_tag.to_string(),
            ));
        }
        let mut security = Vec::new();
        for (key, value) in outcome.passthrough {
            match key {
                Key::InitiatorAlias => identity.initiator_alias = Some(value),
                Key::SessionType => {
                    let declared = match value.as_str() {
                        "Normal" => SessionType::Normal,
                        "Discovery" => SessionType::Discovery,
                        _ => return Err(LoginError::SessionType(value)),
                    };
                    if declared != identity.session_type {
                        return Err(LoginError::Protocol("SessionType changed during login"));
                    }
                }
                // Settled by `identify` on the first request; a different
                // value later is caught by the negotiator as a redeclaration.
                Key::InitiatorName | Key::TargetName => {}
                _ => security.push((key, value)),
            }
        }
        replies.extend(outcome.replies);

        let stage_done = match self.stage {
            Stage::Security => self.security(&security, req.transit, &mut replies)?,
            _ => {
                let identity = self.identity.as_mut().ok_or(LoginError::Finished)?;
                replies.extend(identity.negotiator.target_keys());
                !identity.negotiator.awaiting_answers()
            }
        };

        let mut transit = false;
        let mut nsg = self.stage;
        if let Some(wanted) = wanted {
            if stage_done {
                transit = true;
                nsg = wanted;
                let defaults_ok = self
                    .identity
                    .as_ref()
                    .is_some_and(|i| i.negotiator.defaults_acceptable());
                if nsg == Stage::FullFeature && self.stage == Stage::Security && !defaults_ok {
                    // Our limits are below RFC defaults the initiator would
                    // assume: go through the operational stage to offer them.
                    nsg = Stage::Operational;
                }
            }
        }
        let resume = if transit && nsg == Stage::Operational {
            State::ExpectOperational
        } else {
            std::mem::replace(&mut self.state, State::Done)
        };
        Ok(self.respond(req, encode_text(&replies), transit, nsg, resume))
    }

    /// Checks the first complete request: who the initiator is, which
    /// session type and target, and whether it may log in.
    fn identify(
        &mut self,
        req: &LoginRequest<'_>,
        pairs: &[(String, String)],
    ) -> Result<(), LoginError> {
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        let initiator_name =
            get("InitiatorName").ok_or(LoginError::MissingParameter("InitiatorName"))?;
        check_name("InitiatorName", initiator_name)?;
        let session_type = match get("SessionType") {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(other) => return Err(LoginError::SessionType(other.to_owned())),
        };
        let target = match session_type {
            SessionType::Discovery => None,
            SessionType::Normal => {
                let name = get("TargetName").ok_or(LoginError::MissingParameter("TargetName"))?;
                check_name("TargetName", name)?;
                let target = self
                    .config
                    .find_target(name)
                    .ok_or_else(|| LoginError::TargetNotFound(name.to_owned()))?;
                if !initiator_allowed(target, initiator_name) {
                    return Err(LoginError::NotAuthorized {
                        initiator: initiator_name.to_owned(),
                        target: target.name.clone(),
                    });
                }
                Some(Arc::clone(target))
            }
        };
        let discovery = session_type == SessionType::Discovery;
        self.identity = Some(Identity {
            session_type,
            initiator_name: initiator_name.to_owned(),
            initiator_alias: None,
            target,
            negotiator: Negotiator::new(&self.config.limits, discovery, req.tsih == 0),
        });
        if self.stage != Stage::Security && self.auth_requirement().is_some() {
            return Err(LoginError::Authentication(
                "security negotiation skipped but CHAP is required",
            ));
        }
        Ok(())
    }

    /// CHAP credentials this login must present, and ours for mutual CHAP.
    fn auth_requirement(&self) -> Option<(ChapCredentials, Option<ChapCredentials>)> {
        let identity = self.identity.as_ref()?;
        match identity.session_type {
            SessionType::Discovery => self
                .config
                .discovery_chap
                .clone()
                .map(|c| (c, self.config.discovery_mutual_chap.clone())),
            SessionType::Normal => {
                let t = identity.target.as_ref()?;
                t.chap.clone().map(|c| (c, t.mutual_chap.clone()))
            }
        }
    }

    /// Runs the security keys of one request; true when authentication is
    /// complete and the stage may be left.
    fn security(
        &mut self,
        keys: &[(Key, String)],
        transit_requested: bool,
        replies: &mut Vec<(String, String)>,
    ) -> Result<bool, LoginError> {
        let auth_method = keys
            .iter()
            .find(|(k, _)| *k == Key::AuthMethod)
            .map(|(_, v)| v.as_str());
        let chap_keys: Vec<(Key, String)> = keys
            .iter()
            .filter(|(k, _)| *k != Key::AuthMethod)
            .cloned()
            .collect();
        let required = self.auth_requirement();
        match std::mem::replace(&mut self.state, State::Done) {
            State::ExpectAuthMethod => {
                let Some(list) = auth_method else {
                    if !chap_keys.is_empty() {
                        return Err(LoginError::Protocol("CHAP keys before AuthMethod"));
                    }
                    self.state = State::ExpectAuthMethod;
                    if required.is_some() && transit_requested {
                        return Err(LoginError::Authentication(
                            "no AuthMethod offered but CHAP is required",
                        ));
                    }
                    // No method offered and none required: as with None.
                    return Ok(required.is_none());
                };
                let offered: Vec<&str> = list.split(',').collect();
                match required {
                    Some((creds, mutual)) => {
                        if !offered.contains(&"CHAP") {
                            return Err(LoginError::Authentication(
                                "CHAP required but not offered",
                            ));
                        }
                        replies.push(("AuthMethod".to_owned(), "CHAP".to_owned()));
                        let auth = Box::new(ChapAuthenticator::new(creds, mutual));
                        if chap_keys.is_empty() {
                            self.state = State::ExpectChap(auth);
                            Ok(false)
                        } else {
                            // An initiator that offered only CHAP may send
                            // CHAP_A with it.
                            self.chap(auth, &chap_keys, replies)
                        }
                    }
                    None => {
                        if !offered.contains(&"None") {
                            return Err(LoginError::Authentication(
                                "no offered AuthMethod is configured",
                            ));
                        }
                        if !chap_keys.is_empty() {
                            return Err(LoginError::Protocol("CHAP keys with AuthMethod=None"));
                        }
                        replies.push(("AuthMethod".to_owned(), "None".to_owned()));
                        self.state = State::ExpectSecurityTransit;
                        Ok(true)
                    }
                }
            }
            State::ExpectChap(auth) => self.chap(auth, &chap_keys, replies),
            State::ExpectSecurityTransit => {
                if !chap_keys.is_empty() {
                    return Err(LoginError::Protocol(
                        "security keys after authentication completed",
                    ));
                }
                self.state = State::ExpectSecurityTransit;
                Ok(true)
            }
            _ => Err(LoginError::Protocol(
                "security keys outside the security stage",
            )),
        }
    }

    fn chap(
        &mut self,
        mut auth: Box<ChapAuthenticator>,
        keys: &[(Key, String)],
        replies: &mut Vec<(String, String)>,
    ) -> Result<bool, LoginError> {
        match auth.step(keys, &mut rand::rng())? {
            ChapStep::Continue(r) => {
                replies.extend(r);
                self.state = State::ExpectChap(auth);
                Ok(false)
            }
            ChapStep::Authenticated(r) => {
                replies.extend(r);
                self.state = State::ExpectSecurityTransit;
                Ok(true)
            }
        }
    }

    /// Sends `text` (in pieces if needed) with the decided transit; the
    /// login completes when the last piece transits to full feature phase.
    fn respond(
        &mut self,
        req: &LoginRequest<'_>,
        text: Vec<u8>,
        transit: bool,
        nsg: Stage,
        resume: State,
    ) -> LoginOutcome {
        if text.len() > LOGIN_MAX_DATA_SEGMENT {
            self.state = State::ExpectResponseContinue(Box::new(PendingResponse {
                text: Segmenter::new(text),
                transit,
                nsg,
                resume,
            }));
            return self.next_piece(req);
        }
        self.finish_response(req, text, transit, nsg, resume)
    }

    fn next_piece(&mut self, req: &LoginRequest<'_>) -> LoginOutcome {
        let State::ExpectResponseContinue(mut pending) =
            std::mem::replace(&mut self.state, State::Done)
        else {
            self.error = Some(LoginError::Finished);
            return LoginOutcome::Failed(
                self.response(req, false, false, 0, Vec::new())
                    .with_status(LoginStatus::TargetError),
            );
        };
        let (piece, more) = pending.text.next_piece(LOGIN_MAX_DATA_SEGMENT);
        if more {
            let resp = self.response(req, false, true, 0, piece);
            self.state = State::ExpectResponseContinue(pending);
            return LoginOutcome::Continue(resp);
        }
        let PendingResponse {
            transit,
            nsg,
            resume,
            ..
        } = *pending;
        self.finish_response(req, piece, transit, nsg, resume)
    }

    fn finish_response(
        &mut self,
        req: &LoginRequest<'_>,
        data: Vec<u8>,
        transit: bool,
        nsg: Stage,
        resume: State,
    ) -> LoginOutcome {
        let resp = self.response(
            req,
            transit,
            false,
            if transit { nsg.code() } else { 0 },
            data,
        );
        if !transit {
            self.state = resume;
            return LoginOutcome::Continue(resp);
        }
        self.stage = nsg;
        if nsg != Stage::FullFeature {
            self.state = resume;
            return LoginOutcome::Continue(resp);
        }
        self.state = State::Done;
        let (Some(identity), Some(fixed)) = (self.identity.take(), self.fixed) else {
            self.error = Some(LoginError::Finished);
            return LoginOutcome::Failed(resp.with_status(LoginStatus::TargetError));
        };
        LoginOutcome::Complete(
            resp,
            NegotiatedLogin {
                session_type: identity.session_type,
                initiator_name: identity.initiator_name,
                initiator_alias: identity.initiator_alias,
                target: identity.target,
                isid: fixed.isid,
                tsih: fixed.tsih,
                cid: fixed.cid,
                params: identity.negotiator.into_params(),
            },
        )
    }
}

fn check_name(key: &'static str, value: &str) -> Result<(), LoginError> {
    if value.is_empty()
        || value.len() > MAX_ISCSI_NAME_LEN
        || value.chars().any(char::is_whitespace)
    {
        return Err(LoginError::InvalidName {
            key,
            value: value.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::chap::ChapAlgorithm;
    use crate::iscsi::text::{encode_base64, encode_hex, parse_binary};
    use crate::scsi::LunMap;

    const INITIATOR: &str = "iqn.1993-08.org.debian:01:abc";
    const TARGET: &str = "iqn.2026-11.io.lunmirror:disk1";
    const ISID: [u8; 6] = [0x80, 0, 0, 0x12, 0x34, 0];

    fn creds(user: &str, secret: &str) -> ChapCredentials {
        ChapCredentials {
            user: user.into(),
            secret: secret.as_bytes().to_vec(),
        }
    }

    fn target(name: &str) -> TargetDef {
        TargetDef {
            name: name.into(),
            alias: None,
            luns: Arc::new(LunMap::new()),
            portals: vec![],
            allowed_initiators: vec![],
            chap: None,
            mutual_chap: None,
        }
    }

    fn config_with(t: TargetDef) -> Arc<LoginConfig> {
        Arc::new(LoginConfig {
            targets: vec![
                Arc::new(t),
                Arc::new(target("iqn.2026-11.io.lunmirror:other")),
            ],
            target_portal_group_tag: 7,
            ..LoginConfig::default()
        })
    }

    fn text(items: &[(&str, &str)]) -> Vec<u8> {
        encode_text(
            &items
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<Vec<_>>(),
        )
    }

    fn req(csg: u8, nsg: u8, transit: bool, data: &[u8]) -> LoginRequest<'_> {
        LoginRequest {
            transit,
            cont: false,
            csg,
            nsg,
            version_max: 0,
            version_min: 0,
            isid: ISID,
            tsih: 0,
            itt: 0x1000,
            cid: 1,
            cmd_sn: 5,
            exp_stat_sn: 0,
            data,
        }
    }

    fn reply_pairs(resp: &LoginResponse) -> Vec<(String, String)> {
        parse_text(&resp.data).unwrap()
    }

    fn get(resp: &LoginResponse, key: &str) -> Option<String> {
        reply_pairs(resp)
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    #[track_caller]
    fn cont(o: LoginOutcome) -> LoginResponse {
        match o {
            LoginOutcome::Continue(r) => {
                assert_eq!((r.status_class, r.status_detail), (0, 0));
                r
            }
            other => panic!("expected Continue, got {other:?}"),
        }
    }

    #[track_caller]
    fn failed(o: LoginOutcome, status: LoginStatus) -> LoginResponse {
        match o {
            LoginOutcome::Failed(r) => {
                assert_eq!(
                    (r.status_class, r.status_detail),
                    (status.class(), status.detail()),
                    "{r:?}"
                );
                assert!(!r.transit && r.data.is_empty());
                r
            }
            other => panic!("expected Failed({status:?}), got {other:?}"),
        }
    }

    #[track_caller]
    fn complete(o: LoginOutcome) -> (LoginResponse, NegotiatedLogin) {
        match o {
            LoginOutcome::Complete(r, n) => {
                assert!(r.transit);
                assert_eq!(r.nsg, 3);
                assert_eq!((r.status_class, r.status_detail), (0, 0));
                (r, n)
            }
            other => panic!("expected Complete, got {other:?}"),
        }
    }

    /// The operational keys libiscsi sends (it re-sends its identity too).
    fn libiscsi_opneg() -> Vec<u8> {
        text(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("SessionType", "Normal"),
            ("HeaderDigest", "None,CRC32C"),
            ("DataDigest", "None"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "16776192"),
            ("FirstBurstLength", "262144"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("MaxOutstandingR2T", "1"),
            ("ErrorRecoveryLevel", "0"),
            ("IFMarker", "No"),
            ("OFMarker", "No"),
            ("MaxConnections", "1"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
        ])
    }

    #[test]
    fn login_without_auth_security_then_operational() {
        let mut t = target(TARGET);
        t.alias = Some("disk one".into());
        let mut m = LoginMachine::new(config_with(t));
        let first = text(&[
            ("InitiatorName", INITIATOR),
            ("InitiatorAlias", "host1"),
            ("TargetName", TARGET),
            ("SessionType", "Normal"),
            ("AuthMethod", "CHAP,None"),
        ]);
        let r = cont(m.step(&req(0, 1, true, &first)));
        assert!(r.transit);
        assert_eq!((r.csg, r.nsg), (0, 1));
        assert_eq!((r.isid, r.itt, r.tsih), (ISID, 0x1000, 0));
        assert_eq!((r.version_max, r.version_active), (0, 0));
        assert_eq!(get(&r, "AuthMethod").as_deref(), Some("None"));
        assert_eq!(get(&r, "TargetPortalGroupTag").as_deref(), Some("7"));
        assert_eq!(get(&r, "TargetAlias").as_deref(), Some("disk one"));
        assert_eq!(m.stage(), Stage::Operational);

        let op = libiscsi_opneg();
        let (r, n) = complete(m.step(&req(1, 3, true, &op)));
        assert_eq!(r.csg, 1);
        let replies = reply_pairs(&r);
        let expect = |k: &str, v: &str| {
            assert!(
                replies.contains(&(k.to_owned(), v.to_owned())),
                "{k}={v} in {replies:?}"
            )
        };
        expect("MaxRecvDataSegmentLength", "262144");
        expect("HeaderDigest", "None");
        expect("DataDigest", "None");
        expect("InitialR2T", "Yes");
        expect("ImmediateData", "Yes");
        expect("MaxBurstLength", "1048576");
        expect("FirstBurstLength", "262144");
        expect("MaxConnections", "1");
        expect("ErrorRecoveryLevel", "0");
        // Identity re-sent by the initiator is not echoed, nor TPGT again.
        assert!(get(&r, "InitiatorName").is_none() && get(&r, "TargetPortalGroupTag").is_none());

        assert_eq!(n.session_type, SessionType::Normal);
        assert_eq!(n.initiator_name, INITIATOR);
        assert_eq!(n.initiator_alias.as_deref(), Some("host1"));
        assert_eq!(n.target.as_ref().map(|t| t.name.as_str()), Some(TARGET));
        assert_eq!((n.isid, n.tsih, n.cid), (ISID, 0, 1));
        let p = &n.params;
        assert_eq!(p.max_recv_data_segment_length_initiator, 262_144);
        assert_eq!(p.max_recv_data_segment_length_target, 262_144);
        assert_eq!(p.max_burst_length, 1_048_576);
        assert_eq!(p.first_burst_length, 262_144);
        assert_eq!(p.default_time2retain, 0);
        assert!(p.initial_r2t && p.immediate_data && !p.header_digest);
        assert!(m.error().is_none());
        // Nothing more is accepted.
        failed(m.step(&req(1, 3, true, &[])), LoginStatus::InitiatorError);
    }

    #[test]
    fn login_straight_into_operational_stage() {
        let mut m = LoginMachine::new(config_with(target(TARGET)));
        let (r, n) = complete(m.step(&req(1, 3, true, &libiscsi_opneg())));
        assert_eq!(r.csg, 1);
        assert_eq!(get(&r, "TargetPortalGroupTag").as_deref(), Some("7"));
        assert!(get(&r, "TargetAlias").is_none());
        assert_eq!(n.params.max_recv_data_segment_length_target, 262_144);
    }

    #[test]
    fn security_straight_to_full_feature_keeps_defaults() {
        let mut m = LoginMachine::new(config_with(target(TARGET)));
        let first = text(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "None"),
        ]);
        let (r, n) = complete(m.step(&req(0, 3, true, &first)));
        assert_eq!(r.csg, 0);
        assert_eq!(n.params, SessionParams::default());
    }

    #[test]
    fn limits_below_defaults_force_operational_offers() {
        let config = Arc::new(LoginConfig {
            targets: vec![Arc::new(target(TARGET))],
            limits: TargetLimits {
                max_burst_length: 65_536,
                first_burst_length: 8192,
                ..TargetLimits::default()
            },
            ..LoginConfig::default()
        });
        let mut m = LoginMachine::new(config);
        let first = text(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "None"),
        ]);
        let r = cont(m.step(&req(0, 3, true, &first)));
        assert!(r.transit);
        assert_eq!(r.nsg, 1, "target steers through the operational stage");
        let r = cont(m.step(&req(1, 3, true, &[])));
        assert!(!r.transit, "must wait for answers to our offers");
        assert_eq!(get(&r, "MaxBurstLength").as_deref(), Some("65536"));
        assert_eq!(get(&r, "FirstBurstLength").as_deref(), Some("8192"));
        let answers = text(&[("MaxBurstLength", "65536"), ("FirstBurstLength", "4096")]);
        let (r, n) = complete(m.step(&req(1, 3, true, &answers)));
        assert!(r.data.is_empty());
        assert_eq!(n.params.max_burst_length, 65_536);
        assert_eq!(n.params.first_burst_length, 4096);
    }

    /// Drives a CHAP login like libiscsi/open-iscsi; returns the machine
    /// after the response carrying CHAP_C, and the CHAP_I/CHAP_C.
    fn chap_start(m: &mut LoginMachine, algs: &str) -> (u8, Vec<u8>, u8) {
        let first = text(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("SessionType", "Normal"),
            ("AuthMethod", "CHAP,None"),
        ]);
        let r = cont(m.step(&req(0, 1, true, &first)));
        assert!(!r.transit, "cannot leave security stage before CHAP");
        assert_eq!(get(&r, "AuthMethod").as_deref(), Some("CHAP"));
        let r = cont(m.step(&req(0, 1, false, &text(&[("CHAP_A", algs)]))));
        assert!(!r.transit);
        let id: u8 = get(&r, "CHAP_I").unwrap().parse().unwrap();
        let c = get(&r, "CHAP_C").unwrap();
        assert!(c.starts_with("0x"));
        let a: u8 = get(&r, "CHAP_A").unwrap().parse().unwrap();
        (id, parse_binary(&c).unwrap(), a)
    }

    fn chap_target() -> TargetDef {
        let mut t = target(TARGET);
        t.chap = Some(creds("alice", "alice-secret-1"));
        t
    }

    #[test]
    fn chap_one_way_md5_then_operational() {
        let mut m = LoginMachine::new(config_with(chap_target()));
        let (id, challenge, a) = chap_start(&mut m, "5");
        assert_eq!(a, 5);
        assert!(challenge.len() >= 16);
        let r = ChapAlgorithm::Md5.response(id, b"alice-secret-1", &challenge);
        let data = text(&[("CHAP_N", "alice"), ("CHAP_R", &encode_hex(&r))]);
        let resp = cont(m.step(&req(0, 1, true, &data)));
        assert!(resp.transit);
        assert_eq!((resp.csg, resp.nsg), (0, 1));
        assert!(resp.data.is_empty());
        complete(m.step(&req(1, 3, true, &libiscsi_opneg())));
    }

    #[test]
    fn chap_sha256_base64_response() {
        let mut m = LoginMachine::new(config_with(chap_target()));
        let (id, challenge, a) = chap_start(&mut m, "7,5");
        assert_eq!(a, 7);
        let r = ChapAlgorithm::Sha256.response(id, b"alice-secret-1", &challenge);
        let data = text(&[("CHAP_N", "alice"), ("CHAP_R", &encode_base64(&r))]);
        // Default limits: the initiator may go straight to full feature.
        let (resp, n) = complete(m.step(&req(0, 3, true, &data)));
        assert_eq!(resp.csg, 0);
        assert_eq!(n.params.max_recv_data_segment_length_target, 8192);
    }

    #[test]
    fn chap_failures_are_authentication_failures() {
        // Wrong secret.
        let mut m = LoginMachine::new(config_with(chap_target()));
        let (id, challenge, _) = chap_start(&mut m, "5");
        let r = ChapAlgorithm::Md5.response(id, b"wrong", &challenge);
        let data = text(&[("CHAP_N", "alice"), ("CHAP_R", &encode_hex(&r))]);
        failed(
            m.step(&req(0, 1, true, &data)),
            LoginStatus::AuthenticationFailure,
        );
        assert!(matches!(
            m.error(),
            Some(LoginError::Chap(ChapError::WrongResponse))
        ));

        // Unsupported algorithm list.
        let mut m = LoginMachine::new(config_with(chap_target()));
        let first = text(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "CHAP"),
        ]);
        cont(m.step(&req(0, 1, true, &first)));
        failed(
            m.step(&req(0, 1, false, &text(&[("CHAP_A", "6")]))),
            LoginStatus::AuthenticationFailure,
        );

        // CHAP required, only None offered.
        let mut m = LoginMachine::new(config_with(chap_target()));
        let first = text(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "None"),
        ]);
        failed(
            m.step(&req(0, 1, true, &first)),
            LoginStatus::AuthenticationFailure,
        );

        // CHAP required, transit without any AuthMethod.
        let mut m = LoginMachine::new(config_with(chap_target()));
        let first = text(&[("InitiatorName", INITIATOR), ("TargetName", TARGET)]);
        failed(
            m.step(&req(0, 1, true, &first)),
            LoginStatus::AuthenticationFailure,
        );

        // Security stage skipped although CHAP is configured.
        let mut m = LoginMachine::new(config_with(chap_target()));
        failed(
            m.step(&req(1, 3, true, &libiscsi_opneg())),
            LoginStatus::AuthenticationFailure,
        );

        // Initiator offers only CHAP, target has no credentials.
        let mut m = LoginMachine::new(config_with(target(TARGET)));
        let first = text(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "CHAP"),
        ]);
        failed(
            m.step(&req(0, 1, true, &first)),
            LoginStatus::AuthenticationFailure,
        );

        // Empty request where CHAP_A is due.
        let mut m = LoginMachine::new(config_with(chap_target()));
        let first = text(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "CHAP"),
        ]);
        cont(m.step(&req(0, 1, true, &first)));
        failed(
            m.step(&req(0, 1, true, &[])),
            LoginStatus::AuthenticationFailure,
        );
    }

    #[test]
    fn chap_a_with_auth_method_in_first_request() {
        let mut m = LoginMachine::new(config_with(chap_target()));
        let first = text(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "CHAP"),
            ("CHAP_A", "5"),
        ]);
        let r = cont(m.step(&req(0, 1, false, &first)));
        assert_eq!(get(&r, "AuthMethod").as_deref(), Some("CHAP"));
        assert!(get(&r, "CHAP_C").is_some());
    }

    #[test]
    fn mutual_chap() {
        let mut t = chap_target();
        t.mutual_chap = Some(creds("lunmirror", "target-secret-2"));
        let mut m = LoginMachine::new(config_with(t));
        let (id, challenge, _) = chap_start(&mut m, "5");
        let r = ChapAlgorithm::Md5.response(id, b"alice-secret-1", &challenge);
        let my_challenge = [9u8; 16];
        let data = text(&[
            ("CHAP_N", "alice"),
            ("CHAP_R", &encode_hex(&r)),
            ("CHAP_I", "77"),
            ("CHAP_C", &encode_hex(&my_challenge)),
        ]);
        let resp = cont(m.step(&req(0, 1, true, &data)));
        assert!(resp.transit);
        assert_eq!(get(&resp, "CHAP_N").as_deref(), Some("lunmirror"));
        let expected = ChapAlgorithm::Md5.response(77, b"target-secret-2", &my_challenge);
        assert_eq!(get(&resp, "CHAP_R"), Some(encode_hex(&expected)));

        // Reflection of our own challenge is refused.
        let mut t = chap_target();
        t.mutual_chap = Some(creds("lunmirror", "target-secret-2"));
        let mut m = LoginMachine::new(config_with(t));
        let (id, challenge, _) = chap_start(&mut m, "5");
        let r = ChapAlgorithm::Md5.response(id, b"alice-secret-1", &challenge);
        let data = text(&[
            ("CHAP_N", "alice"),
            ("CHAP_R", &encode_hex(&r)),
            ("CHAP_I", &id.to_string()),
            ("CHAP_C", &encode_hex(&challenge)),
        ]);
        failed(
            m.step(&req(0, 1, true, &data)),
            LoginStatus::AuthenticationFailure,
        );

        // Mutual requested but not configured.
        let mut m = LoginMachine::new(config_with(chap_target()));
        let (id, challenge, _) = chap_start(&mut m, "5");
        let r = ChapAlgorithm::Md5.response(id, b"alice-secret-1", &challenge);
        let data = text(&[
            ("CHAP_N", "alice"),
            ("CHAP_R", &encode_hex(&r)),
            ("CHAP_I", "1"),
            ("CHAP_C", "0x0102030405060708"),
        ]);
        failed(
            m.step(&req(0, 1, true, &data)),
            LoginStatus::AuthenticationFailure,
        );
    }

    #[test]
    fn auth_done_but_initiator_waits() {
        let mut m = LoginMachine::new(config_with(target(TARGET)));
        let first = text(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "None"),
        ]);
        let r = cont(m.step(&req(0, 1, false, &first)));
        assert!(!r.transit);
        assert_eq!(r.nsg, 0);
        let r = cont(m.step(&req(0, 1, true, &[])));
        assert!(r.transit);
        assert_eq!(m.stage(), Stage::Operational);
        // AuthMethod again is a renegotiation... but in the operational
        // stage it is a stage violation anyway.
        failed(
            m.step(&req(1, 3, true, &text(&[("AuthMethod", "None")]))),
            LoginStatus::InitiatorError,
        );
    }

    #[test]
    fn identity_failures() {
        let cfg = || {
            let mut t = target(TARGET);
            t.allowed_initiators = vec!["iqn.1993-08.org.debian:01:ABC".into()];
            config_with(t)
        };
        let cases: Vec<(Vec<u8>, LoginStatus)> = vec![
            (
                text(&[("TargetName", TARGET)]),
                LoginStatus::MissingParameter,
            ),
            (
                text(&[("InitiatorName", INITIATOR)]),
                LoginStatus::MissingParameter,
            ),
            (
                text(&[("InitiatorName", INITIATOR), ("TargetName", "iqn.nope")]),
                LoginStatus::NotFound,
            ),
            (
                text(&[
                    ("InitiatorName", "iqn.someone-else"),
                    ("TargetName", TARGET),
                ]),
                LoginStatus::AuthorizationFailure,
            ),
            (
                text(&[("InitiatorName", INITIATOR), ("SessionType", "Bogus")]),
                LoginStatus::SessionTypeNotSupported,
            ),
            (
                text(&[("InitiatorName", ""), ("TargetName", TARGET)]),
                LoginStatus::InitiatorError,
            ),
            (
                text(&[
                    ("InitiatorName", INITIATOR),
                    ("TargetName", TARGET),
                    ("TargetAlias", "x"),
                ]),
                LoginStatus::InitiatorError,
            ),
            (b"InitiatorName\0".to_vec(), LoginStatus::InitiatorError),
            (
                text(&[
                    ("InitiatorName", INITIATOR),
                    ("TargetName", TARGET),
                    ("MaxBurstLength", "512"),
                ]),
                LoginStatus::InitiatorError,
            ),
        ];
        for (data, status) in cases {
            let mut m = LoginMachine::new(cfg());
            failed(m.step(&req(0, 1, true, &data)), status);
            assert_eq!(m.error().map(LoginError::status), Some(status));
        }
        // ACL and target name match case-insensitively.
        let mut m = LoginMachine::new(cfg());
        let data = text(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", &TARGET.to_uppercase()),
            ("AuthMethod", "None"),
        ]);
        cont(m.step(&req(0, 1, true, &data)));
    }

    #[test]
    fn version_and_header_checks() {
        let data = text(&[("InitiatorName", INITIATOR), ("TargetName", TARGET)]);
        let mut m = LoginMachine::new(config_with(target(TARGET)));
        let mut r = req(0, 1, true, &data);
        r.version_min = 1;
        r.version_max = 2;
        failed(m.step(&r), LoginStatus::UnsupportedVersion);

        // Range 0..=2 includes us.
        let mut m = LoginMachine::new(config_with(target(TARGET)));
        let mut r = req(0, 1, true, &data);
        r.version_max = 2;
        cont(m.step(&r));

        // T and C together.
        let mut m = LoginMachine::new(config_with(target(TARGET)));
        let mut r = req(0, 1, true, &data);
        r.cont = true;
        failed(m.step(&r), LoginStatus::InitiatorError);

        // ISID changes mid-login.
        let mut m = LoginMachine::new(config_with(target(TARGET)));
        cont(m.step(&req(0, 1, false, &data)));
        let mut r = req(0, 1, true, &[]);
        r.isid = [1; 6];
        failed(m.step(&r), LoginStatus::InitiatorError);
    }

    #[test]
    fn invalid_stage_transitions() {
        let data = text(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("AuthMethod", "None"),
        ]);
        for (csg, nsg) in [(0u8, 0u8), (0, 2), (1, 1), (1, 0), (3, 3), (2, 3)] {
            let mut m = LoginMachine::new(config_with(target(TARGET)));
            failed(
                m.step(&req(csg, nsg, true, &data)),
                LoginStatus::InvalidDuringLogin,
            );
        }
        // CSG changes without a transit.
        let mut m = LoginMachine::new(config_with(target(TARGET)));
        cont(m.step(&req(0, 1, false, &data)));
        failed(
            m.step(&req(1, 3, true, &[])),
            LoginStatus::InvalidDuringLogin,
        );
    }

    #[test]
    fn duplicate_keys_fail() {
        // Twice in one request.
        let mut m = LoginMachine::new(config_with(target(TARGET)));
        let data = b"InitiatorName=a\0TargetName=b\0InitiatorName=a\0";
        failed(m.step(&req(0, 1, true, data)), LoginStatus::InitiatorError);
        // Renegotiated in a later request.
        let mut m = LoginMachine::new(config_with(target(TARGET)));
        let data = text(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("MaxBurstLength", "4096"),
        ]);
        cont(m.step(&req(1, 3, false, &data)));
        failed(
            m.step(&req(1, 3, true, &text(&[("MaxBurstLength", "8192")]))),
            LoginStatus::InitiatorError,
        );
    }

    #[test]
    fn request_text_split_over_pdus() {
        let all = libiscsi_opneg();
        // Split in the middle of a key and of a value.
        let (a, rest) = all.split_at(10);
        let (b, c) = rest.split_at(57);
        let mut m = LoginMachine::new(config_with(target(TARGET)));
        for piece in [a, b] {
            let mut r = req(1, 3, false, piece);
            r.cont = true;
            let resp = cont(m.step(&r));
            assert!(resp.data.is_empty() && !resp.transit && !resp.cont);
            assert_eq!(resp.csg, 1);
        }
        let (_, n) = complete(m.step(&req(1, 3, true, c)));
        assert_eq!(n.initiator_name, INITIATOR);
        assert_eq!(n.params.max_recv_data_segment_length_initiator, 262_144);
    }

    #[test]
    fn request_text_limit() {
        let mut m = LoginMachine::new(config_with(target(TARGET)));
        let chunk = vec![b'a'; 8192];
        let mut outcome = None;
        for _ in 0..=(MAX_LOGIN_TEXT / chunk.len()) {
            let mut r = req(1, 3, false, &chunk);
            r.cont = true;
            match m.step(&r) {
                LoginOutcome::Continue(_) => continue,
                other => {
                    outcome = Some(other);
                    break;
                }
            }
        }
        failed(outcome.unwrap(), LoginStatus::OutOfResources);
    }

    #[test]
    fn long_response_sent_in_pieces() {
        // Many unknown keys: each answered NotUnderstood, > 8192 bytes back.
        let mut items: Vec<(String, String)> = vec![
            ("InitiatorName".into(), INITIATOR.into()),
            ("TargetName".into(), TARGET.into()),
        ];
        for i in 0..600 {
            items.push((format!("X-com.example.key{i:04}"), "1".into()));
        }
        let data = encode_text(&items);
        let mut m = LoginMachine::new(config_with(target(TARGET)));
        let mut collected = Vec::new();
        let mut resp = cont(m.step(&req(1, 3, true, &data)));
        let mut pieces = 1;
        while resp.cont {
            assert!(!resp.transit);
            assert!(resp.data.len() <= LOGIN_MAX_DATA_SEGMENT);
            collected.extend_from_slice(&resp.data);
            pieces += 1;
            match m.step(&req(1, 3, true, &[])) {
                LoginOutcome::Continue(r) => resp = r,
                LoginOutcome::Complete(r, _) => {
                    resp = r;
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(resp.transit && !resp.cont, "last piece transits");
        collected.extend_from_slice(&resp.data);
        assert!(pieces >= 3);
        let replies = parse_text(&collected).unwrap();
        assert_eq!(
            replies.iter().filter(|(_, v)| v == "NotUnderstood").count(),
            600
        );
        assert!(replies.contains(&("MaxRecvDataSegmentLength".into(), "262144".into())));
        // Sending text while pieces are pending is an error.
        let mut m = LoginMachine::new(config_with(target(TARGET)));
        let r = cont(m.step(&req(1, 3, true, &data)));
        assert!(r.cont);
        failed(
            m.step(&req(1, 3, true, b"A=1\0")),
            LoginStatus::InitiatorError,
        );
    }

    #[test]
    fn discovery_session() {
        let mut m = LoginMachine::new(config_with(chap_target()));
        let first = text(&[
            ("InitiatorName", INITIATOR),
            ("SessionType", "Discovery"),
            ("AuthMethod", "None"),
        ]);
        let r = cont(m.step(&req(0, 1, true, &first)));
        assert!(r.transit);
        assert!(get(&r, "TargetPortalGroupTag").is_none());
        let op = text(&[
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", "32768"),
            ("DefaultTime2Wait", "0"),
            ("DefaultTime2Retain", "0"),
            ("IFMarker", "No"),
            ("OFMarker", "No"),
            ("ErrorRecoveryLevel", "0"),
            ("MaxBurstLength", "4096"),
            ("InitialR2T", "No"),
        ]);
        let (r, n) = complete(m.step(&req(1, 3, true, &op)));
        assert_eq!(get(&r, "MaxBurstLength").as_deref(), Some("Irrelevant"));
        assert_eq!(get(&r, "InitialR2T").as_deref(), Some("Irrelevant"));
        assert_eq!(
            get(&r, "MaxRecvDataSegmentLength").as_deref(),
            Some("262144")
        );
        assert_eq!(n.session_type, SessionType::Discovery);
        assert!(n.target.is_none());
        assert_eq!(n.params.max_recv_data_segment_length_initiator, 32_768);
    }

    #[test]
    fn discovery_chap_when_configured() {
        let config = Arc::new(LoginConfig {
            targets: vec![Arc::new(target(TARGET))],
            discovery_chap: Some(creds("disc", "discovery-secret")),
            ..LoginConfig::default()
        });
        let mut m = LoginMachine::new(Arc::clone(&config));
        let first = text(&[
            ("InitiatorName", INITIATOR),
            ("SessionType", "Discovery"),
            ("AuthMethod", "None"),
        ]);
        failed(
            m.step(&req(0, 1, true, &first)),
            LoginStatus::AuthenticationFailure,
        );

        let mut m = LoginMachine::new(config);
        let first = text(&[
            ("InitiatorName", INITIATOR),
            ("SessionType", "Discovery"),
            ("AuthMethod", "CHAP,None"),
        ]);
        let r = cont(m.step(&req(0, 1, true, &first)));
        assert_eq!(get(&r, "AuthMethod").as_deref(), Some("CHAP"));
        let r = cont(m.step(&req(0, 1, false, &text(&[("CHAP_A", "5")]))));
        let id: u8 = get(&r, "CHAP_I").unwrap().parse().unwrap();
        let c = parse_binary(&get(&r, "CHAP_C").unwrap()).unwrap();
        let resp = ChapAlgorithm::Md5.response(id, b"discovery-secret", &c);
        let data = text(&[("CHAP_N", "disc"), ("CHAP_R", &encode_hex(&resp))]);
        let (_, n) = complete(m.step(&req(0, 3, true, &data)));
        assert_eq!(n.session_type, SessionType::Discovery);
    }

    #[test]
    fn added_connection_gets_irrelevant_session_keys() {
        let mut m = LoginMachine::new(config_with(target(TARGET)));
        let mut r = req(1, 3, true, &[]);
        let data = text(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("MaxBurstLength", "4096"),
            ("HeaderDigest", "CRC32C"),
            ("MaxRecvDataSegmentLength", "65536"),
        ]);
        r.data = &data;
        r.tsih = 0x0042;
        let (resp, n) = complete(m.step(&r));
        assert_eq!(resp.tsih, 0x0042);
        assert_eq!(n.tsih, 0x0042);
        assert_eq!(get(&resp, "MaxBurstLength").as_deref(), Some("Irrelevant"));
        assert_eq!(get(&resp, "HeaderDigest").as_deref(), Some("CRC32C"));
        assert!(n.params.header_digest);
        assert_eq!(n.params.max_recv_data_segment_length_initiator, 65_536);
    }

    #[test]
    fn with_status_turns_success_into_failure() {
        let mut m = LoginMachine::new(config_with(target(TARGET)));
        let (r, _) = complete(m.step(&req(1, 3, true, &libiscsi_opneg())));
        let f = r.with_status(LoginStatus::SessionDoesNotExist);
        assert_eq!((f.status_class, f.status_detail), (2, 0x0a));
        assert!(!f.transit && f.data.is_empty() && f.nsg == 0);
    }

    #[test]
    fn machine_can_move_between_threads() {
        fn assert_send<T: Send + 'static>() {}
        assert_send::<LoginMachine>();
        assert_send::<NegotiatedLogin>();
        assert_send::<LoginConfig>();
    }

    #[test]
    fn status_codes() {
        use LoginStatus::*;
        let table = [
            (Success, 0x0000),
            (TargetMovedTemporarily, 0x0101),
            (TargetMovedPermanently, 0x0102),
            (InitiatorError, 0x0200),
            (AuthenticationFailure, 0x0201),
            (AuthorizationFailure, 0x0202),
            (NotFound, 0x0203),
            (TargetRemoved, 0x0204),
            (UnsupportedVersion, 0x0205),
            (TooManyConnections, 0x0206),
            (MissingParameter, 0x0207),
            (CantIncludeInSession, 0x0208),
            (SessionTypeNotSupported, 0x0209),
            (SessionDoesNotExist, 0x020a),
            (InvalidDuringLogin, 0x020b),
            (TargetError, 0x0300),
            (ServiceUnavailable, 0x0301),
            (OutOfResources, 0x0302),
        ];
        for (s, code) in table {
            assert_eq!(
                u16::from(s.class()) << 8 | u16::from(s.detail()),
                code,
                "{s:?}"
            );
        }
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        const KEYS: &[&str] = &[
            "InitiatorName",
            "TargetName",
            "SessionType",
            "AuthMethod",
            "CHAP_A",
            "CHAP_N",
            "CHAP_R",
            "CHAP_I",
            "CHAP_C",
            "HeaderDigest",
            "MaxBurstLength",
            "FirstBurstLength",
            "MaxRecvDataSegmentLength",
            "InitialR2T",
            "ImmediateData",
            "X-foo",
            "TargetAlias",
            "SendTargets",
            "ErrorRecoveryLevel",
            "IFMarkInt",
        ];
        const VALUES: &[&str] = &[
            INITIATOR,
            TARGET,
            "Normal",
            "Discovery",
            "CHAP,None",
            "None",
            "CHAP",
            "5",
            "7,5",
            "alice",
            "0x00",
            "0b",
            "CRC32C,None",
            "512",
            "16777215",
            "0",
            "Yes",
            "No",
            "Reject",
            "",
            "99999999999999999999999",
        ];

        fn data_strategy() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..200),
                proptest::collection::vec((0..KEYS.len(), 0..VALUES.len()), 0..8).prop_map(|kv| {
                    let mut seen = std::collections::BTreeSet::new();
                    let pairs: Vec<(String, String)> = kv
                        .into_iter()
                        .filter(|(k, _)| seen.insert(*k))
                        .map(|(k, v)| (KEYS[k].to_owned(), VALUES[v].to_owned()))
                        .collect();
                    encode_text(&pairs)
                }),
            ]
        }

        proptest! {
            #[test]
            fn hostile_request_sequences_never_panic(
                steps in proptest::collection::vec(
                    (any::<bool>(), any::<bool>(), 0u8..4, 0u8..4, 0u8..2, any::<bool>(), data_strategy()),
                    1..10,
                ),
                chap in any::<bool>(),
            ) {
                let config = if chap { config_with(chap_target()) } else { config_with(target(TARGET)) };
                let mut m = LoginMachine::new(config);
                let mut finished = false;
                for (transit, c, csg, nsg, version_min, other_isid, data) in steps {
                    let mut r = req(csg, nsg, transit, &data);
                    r.cont = c;
                    r.version_min = version_min;
                    if other_isid {
                        r.isid = [9; 6];
                    }
                    match m.step(&r) {
                        LoginOutcome::Continue(resp) => {
                            prop_assert!(!finished);
                            prop_assert_eq!((resp.status_class, resp.status_detail), (0, 0));
                            prop_assert!(resp.data.len() <= LOGIN_MAX_DATA_SEGMENT);
                            prop_assert!(!(resp.transit && resp.cont));
                            if resp.transit {
                                prop_assert!(transit, "target transits only when asked");
                                prop_assert!(resp.nsg > resp.csg);
                            }
                        }
                        LoginOutcome::Failed(resp) => {
                            prop_assert!(resp.status_class >= 2);
                            prop_assert!(m.error().is_some() || finished);
                            finished = true;
                        }
                        LoginOutcome::Complete(resp, n) => {
                            prop_assert!(!finished);
                            prop_assert!(resp.transit && resp.nsg == 3);
                            prop_assert!(!chap || n.session_type == SessionType::Discovery || resp.csg == 0 || m.error().is_none());
                            finished = true;
                        }
                    }
                }
            }
        }
    }
}
