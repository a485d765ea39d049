//! Full-feature-phase Text Requests (RFC 7143 §11.10, §11.11): SendTargets
//! discovery (Appendix C) and the few keys that may be declared after login
//! (MaxRecvDataSegmentLength), plus [`TextExchange`], which joins request
//! text sent over several PDUs (C bit) and hands out long answers in pieces.
//! No I/O; the connection code owns Target Transfer Tags and PDUs.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use thiserror::Error;

use super::login::{initiator_allowed, SessionType};
use super::negotiate::{Key, NegotiationError, Negotiator, Phase, TargetLimits};
use super::text::{encode_text, parse_text, Segmenter, TextError};
use super::TargetDef;

/// Cap on the text one Text Request may accumulate over C=1 PDUs.
pub const MAX_TEXT_REQUEST: usize = 64 * 1024;

/// The SendTargets answer: a record (TargetName, then its TargetAddress
/// keys) per target the initiator may see.
///
/// `value` is the SendTargets value: `All` (discovery sessions only), a
/// target name, or empty (the session's own target; normal sessions only).
/// `session_target` is the target of a normal session, None in a
/// discovery session. Portals bound to an unspecified address (0.0.0.0 or
/// ::) are reported with the address of `local_portal`, the local end of
/// the connection the request came in on; a target without portals is
/// reported at `local_portal`.
pub fn send_targets(
    targets: &[Arc<TargetDef>],
    value: &str,
    session_target: Option<&str>,
    local_portal: SocketAddr,
    initiator_name: &str,
    target_portal_group_tag: u16,
) -> Vec<(String, String)> {
    let visible = |t: &&Arc<TargetDef>| initiator_allowed(t, initiator_name);
    let chosen: Vec<&Arc<TargetDef>> = match session_target {
        // "All" MUST NOT be supported on an operational session; "" and the
        // session's own name report only that target.
        Some(own) => {
            if value.is_empty() || value.eq_ignore_ascii_case(own) {
                targets
                    .iter()
                    .filter(|t| t.name.eq_ignore_ascii_case(own))
                    .filter(visible)
                    .collect()
            } else {
                Vec::new()
            }
        }
        None => match value {
            "All" => targets.iter().filter(visible).collect(),
            "" => Vec::new(),
            name => targets
                .iter()
                .filter(|t| t.name.eq_ignore_ascii_case(name))
                .filter(visible)
                .collect(),
        },
    };

    let mut out = Vec::new();
    for target in chosen {
        out.push(("TargetName".to_owned(), target.name.clone()));
        let mut addresses: Vec<String> = Vec::new();
        let portals: Vec<SocketAddr> = if target.portals.is_empty() {
            vec![local_portal]
        } else {
            target
                .portals
                .iter()
                .map(|p| {
                    if p.ip().is_unspecified() {
                        SocketAddr::new(local_portal.ip(), p.port())
                    } else {
                        *p
                    }
                })
                .collect()
        };
        for portal in portals {
            let address = format_address(portal, target_portal_group_tag);
            if !addresses.contains(&address) {
                addresses.push(address);
            }
        }
        out.extend(
            addresses
                .into_iter()
                .map(|a| ("TargetAddress".to_owned(), a)),
        );
    }
    out
}

/// `ip:port,tpgt`, IPv6 in brackets (RFC 7143 §13.8), IPv4-mapped IPv6
/// addresses shown as IPv4, no zone index.
fn format_address(addr: SocketAddr, tpgt: u16) -> String {
    match addr.ip().to_canonical() {
        IpAddr::V4(ip) => format!("{ip}:{},{tpgt}", addr.port()),
        IpAddr::V6(ip) => format!("[{ip}]:{},{tpgt}", addr.port()),
    }
}

/// What a Text Request in full feature phase is answered from.
#[derive(Debug, Clone, Copy)]
pub struct TextContext<'a> {
    pub targets: &'a [Arc<TargetDef>],
    pub initiator_name: &'a str,
    pub session_type: SessionType,
    /// The target of a normal session; None for discovery.
    pub session_target: Option<&'a str>,
    /// Local address of this connection.
    pub local_portal: SocketAddr,
    pub target_portal_group_tag: u16,
    pub limits: &'a TargetLimits,
}

/// The answer to one complete Text Request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TextReply {
    pub pairs: Vec<(String, String)>,
    /// The initiator declared a new MaxRecvDataSegmentLength: our maximum
    /// transmit segment on this connection from now on.
    pub initiator_max_recv_data_segment_length: Option<u32>,
}

/// Why a Text Request is refused (the connection answers with a Reject
/// PDU, reason "protocol error" or "invalid PDU field").
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TextRequestError {
    #[error("malformed text: {0}")]
    Text(#[from] TextError),
    #[error("negotiation: {0}")]
    Negotiation(#[from] NegotiationError),
    #[error("text request exceeds {MAX_TEXT_REQUEST} bytes")]
    TooLong,
    #[error("continuation of a text exchange that is not in progress")]
    NoExchange,
    #[error("continuation carries ITT {got:#x}, exchange has {expected:#x}")]
    WrongItt { expected: u32, got: u32 },
    #[error("text sent while our response is incomplete")]
    UnexpectedData,
}

/// Answers one complete Text Request (text already joined).
pub fn text_request(ctx: &TextContext<'_>, data: &[u8]) -> Result<TextReply, TextRequestError> {
    let pairs = parse_text(data)?;
    let discovery = ctx.session_type == SessionType::Discovery;
    let mut negotiator = Negotiator::new(ctx.limits, discovery, true);
    let outcome = negotiator.negotiate(Phase::FullFeature, &pairs)?;
    let mut reply = TextReply {
        pairs: outcome.replies,
        initiator_max_recv_data_segment_length: outcome.initiator_max_recv_data_segment_length,
    };
    for (key, value) in outcome.passthrough {
        if key == Key::SendTargets {
            reply.pairs.extend(send_targets(
                ctx.targets,
                &value,
                ctx.session_target,
                ctx.local_portal,
                ctx.initiator_name,
                ctx.target_portal_group_tag,
            ));
        }
    }
    Ok(reply)
}

/// One Text Request PDU as [`TextExchange`] needs it.
#[derive(Debug, Clone, Copy)]
pub struct TextPdu<'a> {
    pub itt: u32,
    /// The request carries a Target Transfer Tag we handed out (not
    /// 0xffffffff): it continues the exchange in progress.
    pub continuation: bool,
    /// C bit: more request text follows.
    pub cont: bool,
    pub data: &'a [u8],
}

/// What to send back for one Text Request PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextStep {
    /// Send an empty Text Response with F=0, C=0 and a Target Transfer Tag
    /// (not 0xffffffff) for the initiator to continue with.
    NeedMore,
    /// Send a Text Response with this data. `cont`: more pieces follow
    /// (F=0, C=1, TTT not 0xffffffff); else F=1, C=0, TTT=0xffffffff.
    Respond {
        data: Vec<u8>,
        cont: bool,
        initiator_max_recv_data_segment_length: Option<u32>,
    },
}

#[derive(Debug, Default)]
enum ExchangeState {
    #[default]
    Idle,
    Receiving {
        itt: u32,
        text: Vec<u8>,
    },
    Sending {
        itt: u32,
        text: Segmenter,
    },
}

/// The text exchange of one connection (one at a time, RFC 7143 §11.10).
#[derive(Debug, Default)]
pub struct TextExchange {
    state: ExchangeState,
}

impl TextExchange {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether an exchange is half done.
    pub fn in_progress(&self) -> bool {
        !matches!(self.state, ExchangeState::Idle)
    }

    /// Consumes one Text Request; `max_segment` is the initiator's
    /// MaxRecvDataSegmentLength. On error the exchange is reset.
    pub fn step(
        &mut self,
        ctx: &TextContext<'_>,
        pdu: &TextPdu<'_>,
        max_segment: usize,
    ) -> Result<TextStep, TextRequestError> {
        let result = self.step_inner(ctx, pdu, max_segment);
        if result.is_err() {
            self.state = ExchangeState::Idle;
        }
        result
    }

    fn step_inner(
        &mut self,
        ctx: &TextContext<'_>,
        pdu: &TextPdu<'_>,
        max_segment: usize,
    ) -> Result<TextStep, TextRequestError> {
        // A request with the reserved TTT starts afresh, abandoning any
        // exchange in progress.
        let previous = std::mem::take(&mut self.state);
        let mut text = match (pdu.continuation, previous) {
            (false, _) => Vec::new(),
            (true, ExchangeState::Idle) => return Err(TextRequestError::NoExchange),
            (true, ExchangeState::Receiving { itt, text }) => {
                if itt != pdu.itt {
                    return Err(TextRequestError::WrongItt {
                        expected: itt,
                        got: pdu.itt,
                    });
                }
                text
            }
            (true, ExchangeState::Sending { itt, text }) => {
                if itt != pdu.itt {
                    return Err(TextRequestError::WrongItt {
                        expected: itt,
                        got: pdu.itt,
                    });
                }
                if !pdu.data.is_empty() || pdu.cont {
                    return Err(TextRequestError::UnexpectedData);
                }
                return Ok(self.send(pdu.itt, text, max_segment, None));
            }
        };
        if text.len() + pdu.data.len() > MAX_TEXT_REQUEST {
            return Err(TextRequestError::TooLong);
        }
        text.extend_from_slice(pdu.data);
        if pdu.cont {
            self.state = ExchangeState::Receiving { itt: pdu.itt, text };
            return Ok(TextStep::NeedMore);
        }
        let reply = text_request(ctx, &text)?;
        Ok(self.send(
            pdu.itt,
            Segmenter::new(encode_text(&reply.pairs)),
            max_segment,
            reply.initiator_max_recv_data_segment_length,
        ))
    }

    fn send(
        &mut self,
        itt: u32,
        mut text: Segmenter,
        max_segment: usize,
        mrdsl: Option<u32>,
    ) -> TextStep {
        let (data, cont) = text.next_piece(max_segment);
        if cont {
            self.state = ExchangeState::Sending { itt, text };
        }
        TextStep::Respond {
            data,
            cont,
            initiator_max_recv_data_segment_length: mrdsl,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::LunMap;

    const INITIATOR: &str = "iqn.1993-08.org.debian:01:abc";

    fn target(name: &str, portals: &[&str], allowed: &[&str]) -> Arc<TargetDef> {
        Arc::new(TargetDef {
            name: name.into(),
            alias: None,
            luns: Arc::new(LunMap::new()),
            portals: portals.iter().map(|p| p.parse().unwrap()).collect(),
            allowed_initiators: allowed.iter().map(|s| (*s).to_owned()).collect(),
            chap: None,
            mutual_chap: None,
        })
    }

    fn targets() -> Vec<Arc<TargetDef>> {
        vec![
            target("iqn.2026-11.io.lunmirror:a", &["0.0.0.0:3260"], &[]),
            target(
                "iqn.2026-11.io.lunmirror:b",
                &["10.0.0.5:3261", "[fe80::1]:3260", "10.0.0.5:3261"],
                &[],
            ),
            target(
                "iqn.2026-11.io.lunmirror:secret",
                &["10.0.0.9:3260"],
                &["iqn.other"],
            ),
            target("iqn.2026-11.io.lunmirror:v6any", &["[::]:3260"], &[]),
        ]
    }

    fn local() -> SocketAddr {
        "192.168.1.10:3260".parse().unwrap()
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn all_in_discovery_lists_visible_targets() {
        let got = send_targets(&targets(), "All", None, local(), INITIATOR, 1);
        assert_eq!(
            got,
            pairs(&[
                ("TargetName", "iqn.2026-11.io.lunmirror:a"),
                ("TargetAddress", "192.168.1.10:3260,1"),
                ("TargetName", "iqn.2026-11.io.lunmirror:b"),
                ("TargetAddress", "10.0.0.5:3261,1"),
                ("TargetAddress", "[fe80::1]:3260,1"),
                ("TargetName", "iqn.2026-11.io.lunmirror:v6any"),
                ("TargetAddress", "192.168.1.10:3260,1"),
            ])
        );
        // The ACL'd target shows up for its initiator (case-insensitively).
        let got = send_targets(&targets(), "All", None, local(), "IQN.OTHER", 3);
        assert!(got.contains(&(
            "TargetName".into(),
            "iqn.2026-11.io.lunmirror:secret".into()
        )));
        assert!(got.contains(&("TargetAddress".into(), "10.0.0.9:3260,3".into())));
    }

    #[test]
    fn ipv6_local_portal_and_mapped_addresses() {
        let v6: SocketAddr = "[2001:db8::7]:3260".parse().unwrap();
        let got = send_targets(
            &targets(),
            "iqn.2026-11.io.lunmirror:v6any",
            None,
            v6,
            INITIATOR,
            1,
        );
        assert_eq!(
            got,
            pairs(&[
                ("TargetName", "iqn.2026-11.io.lunmirror:v6any"),
                ("TargetAddress", "[2001:db8::7]:3260,1"),
            ])
        );
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:3260".parse().unwrap();
        let got = send_targets(
            &targets(),
            "iqn.2026-11.io.lunmirror:a",
            None,
            mapped,
            INITIATOR,
            1,
        );
        assert_eq!(got[1].1, "127.0.0.1:3260,1");
        let none = vec![target("iqn.x", &[], &[])];
        assert_eq!(
            send_targets(&none, "All", None, local(), INITIATOR, 9),
            pairs(&[
                ("TargetName", "iqn.x"),
                ("TargetAddress", "192.168.1.10:3260,9")
            ])
        );
    }

    #[test]
    fn named_target_in_discovery() {
        let t = targets();
        assert_eq!(
            send_targets(
                &t,
                "IQN.2026-11.io.lunmirror:B",
                None,
                local(),
                INITIATOR,
                1
            )
            .len(),
            3
        );
        assert!(send_targets(&t, "iqn.nope", None, local(), INITIATOR, 1).is_empty());
        assert!(send_targets(
            &t,
            "iqn.2026-11.io.lunmirror:secret",
            None,
            local(),
            INITIATOR,
            1
        )
        .is_empty());
        assert!(send_targets(&t, "", None, local(), INITIATOR, 1).is_empty());
    }

    #[test]
    fn normal_session_sees_only_its_target() {
        let t = targets();
        let own = Some("iqn.2026-11.io.lunmirror:b");
        let expect = pairs(&[
            ("TargetName", "iqn.2026-11.io.lunmirror:b"),
            ("TargetAddress", "10.0.0.5:3261,1"),
            ("TargetAddress", "[fe80::1]:3260,1"),
        ]);
        assert_eq!(send_targets(&t, "", own, local(), INITIATOR, 1), expect);
        assert_eq!(
            send_targets(&t, "iqn.2026-11.io.lunmirror:b", own, local(), INITIATOR, 1),
            expect
        );
        assert!(send_targets(&t, "All", own, local(), INITIATOR, 1).is_empty());
        assert!(
            send_targets(&t, "iqn.2026-11.io.lunmirror:a", own, local(), INITIATOR, 1).is_empty()
        );
    }

    fn ctx<'a>(
        t: &'a [Arc<TargetDef>],
        limits: &'a TargetLimits,
        normal: Option<&'a str>,
    ) -> TextContext<'a> {
        TextContext {
            targets: t,
            initiator_name: INITIATOR,
            session_type: if normal.is_some() {
                SessionType::Normal
            } else {
                SessionType::Discovery
            },
            session_target: normal,
            local_portal: local(),
            target_portal_group_tag: 1,
            limits,
        }
    }

    #[test]
    fn text_request_answers_send_targets_and_other_keys() {
        let t = targets();
        let limits = TargetLimits::default();
        let c = ctx(&t, &limits, None);
        let reply = text_request(&c, b"SendTargets=All\0").unwrap();
        assert_eq!(reply.pairs.len(), 7);
        assert_eq!(reply.initiator_max_recv_data_segment_length, None);

        let reply = text_request(
            &c,
            b"MaxRecvDataSegmentLength=65536\0X-vendor=1\0MaxBurstLength=4096\0",
        )
        .unwrap();
        assert_eq!(reply.initiator_max_recv_data_segment_length, Some(65_536));
        assert_eq!(
            reply.pairs,
            pairs(&[("X-vendor", "NotUnderstood"), ("MaxBurstLength", "Reject")])
        );

        assert!(matches!(
            text_request(&c, b"SendTargets=All\0SendTargets=All\0"),
            Err(TextRequestError::Text(TextError::DuplicateKey(_)))
        ));
        assert!(matches!(
            text_request(&c, b"TargetAddress=1.2.3.4\0"),
            Err(TextRequestError::Negotiation(_))
        ));
        assert!(matches!(
            text_request(&c, b"MaxRecvDataSegmentLength=1\0"),
            Err(TextRequestError::Negotiation(_))
        ));
    }

    fn pdu(itt: u32, continuation: bool, cont: bool, data: &[u8]) -> TextPdu<'_> {
        TextPdu {
            itt,
            continuation,
            cont,
            data,
        }
    }

    #[test]
    fn exchange_single_pdu() {
        let t = targets();
        let limits = TargetLimits::default();
        let c = ctx(&t, &limits, Some("iqn.2026-11.io.lunmirror:a"));
        let mut x = TextExchange::new();
        let step = x
            .step(&c, &pdu(1, false, false, b"SendTargets=\0"), 8192)
            .unwrap();
        assert_eq!(
            step,
            TextStep::Respond {
                data: b"TargetName=iqn.2026-11.io.lunmirror:a\0TargetAddress=192.168.1.10:3260,1\0"
                    .to_vec(),
                cont: false,
                initiator_max_recv_data_segment_length: None,
            }
        );
        assert!(!x.in_progress());
    }

    #[test]
    fn exchange_request_in_pieces_and_long_answer() {
        let many: Vec<Arc<TargetDef>> = (0..300)
            .map(|i| {
                target(
                    &format!("iqn.2026-11.io.lunmirror:t{i:03}"),
                    &["10.1.1.1:3260"],
                    &[],
                )
            })
            .collect();
        let limits = TargetLimits::default();
        let c = ctx(&many, &limits, None);
        let mut x = TextExchange::new();
        assert_eq!(
            x.step(&c, &pdu(9, false, true, b"SendTa"), 512).unwrap(),
            TextStep::NeedMore
        );
        assert!(x.in_progress());
        assert_eq!(
            x.step(&c, &pdu(9, true, true, b"rgets=A"), 512).unwrap(),
            TextStep::NeedMore
        );
        let mut all = Vec::new();
        let mut step = x.step(&c, &pdu(9, true, false, b"ll\0"), 512).unwrap();
        let mut pieces = 1;
        loop {
            let TextStep::Respond { data, cont, .. } = step else {
                panic!("{step:?}")
            };
            assert!(data.len() <= 512);
            all.extend_from_slice(&data);
            if !cont {
                break;
            }
            pieces += 1;
            step = x.step(&c, &pdu(9, true, false, &[]), 512).unwrap();
        }
        assert!(pieces > 10);
        assert!(!x.in_progress());
        let got = parse_text_records(&all);
        assert_eq!(got, 300);
    }

    fn parse_text_records(data: &[u8]) -> usize {
        // Records repeat TargetName/TargetAddress keys, so count items.
        data.split(|b| *b == 0)
            .filter(|i| i.starts_with(b"TargetName="))
            .count()
    }

    #[test]
    fn exchange_errors_reset() {
        let t = targets();
        let limits = TargetLimits::default();
        let c = ctx(&t, &limits, None);
        let mut x = TextExchange::new();
        assert_eq!(
            x.step(&c, &pdu(1, true, false, b""), 8192),
            Err(TextRequestError::NoExchange)
        );
        x.step(&c, &pdu(1, false, true, b"SendTargets="), 8192)
            .unwrap();
        assert!(matches!(
            x.step(&c, &pdu(2, true, false, b"All\0"), 8192),
            Err(TextRequestError::WrongItt {
                expected: 1,
                got: 2
            })
        ));
        assert!(!x.in_progress());

        // A fresh request (reserved TTT) abandons a half-received one.
        x.step(&c, &pdu(3, false, true, b"Garbage"), 8192).unwrap();
        assert!(matches!(
            x.step(&c, &pdu(4, false, false, b"SendTargets=All\0"), 8192),
            Ok(TextStep::Respond { .. })
        ));

        // Data while we are still sending pieces.
        let mut x = TextExchange::new();
        let step = x
            .step(&c, &pdu(5, false, false, b"SendTargets=All\0"), 16)
            .unwrap();
        assert!(matches!(step, TextStep::Respond { cont: true, .. }));
        assert_eq!(
            x.step(&c, &pdu(5, true, false, b"A=1\0"), 16),
            Err(TextRequestError::UnexpectedData)
        );

        let mut x = TextExchange::new();
        let big = vec![b'a'; 40 * 1024];
        x.step(&c, &pdu(6, false, true, &big), 8192).unwrap();
        assert_eq!(
            x.step(&c, &pdu(6, true, true, &big), 8192),
            Err(TextRequestError::TooLong)
        );
    }
}
