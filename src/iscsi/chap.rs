//! CHAP (RFC 1994) as iSCSI runs it in the security stage (RFC 7143
//! §12.1.3), target side: choose an algorithm from the initiator's CHAP_A
//! list, send CHAP_I/CHAP_C, verify CHAP_N/CHAP_R, and for mutual CHAP
//! answer the initiator's own CHAP_I/CHAP_C with CHAP_N/CHAP_R.
//!
//! Algorithms: MD5 (5, the one RFC 7143 mandates) and SHA-256 (7, the
//! IANA "PPP Authentication Algorithms" number the Linux target and
//! open-iscsi use). No I/O; randomness comes from the caller's RNG.

use md5::Digest as _;
use rand::RngCore;
use thiserror::Error;

use super::negotiate::Key;
use super::text::{encode_hex, parse_binary, parse_number};
use super::ChapCredentials;

/// Largest challenge we accept from an initiator (RFC 7143 §12.1.3: CHAP_C
/// is at most 1024 bytes).
pub const MAX_CHALLENGE_LEN: usize = 1024;

/// A CHAP digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChapAlgorithm {
    Md5,
    Sha256,
}

impl ChapAlgorithm {
    /// From its CHAP_A code.
    pub fn from_code(code: u64) -> Option<Self> {
        match code {
            5 => Some(Self::Md5),
            7 => Some(Self::Sha256),
            _ => None,
        }
    }

    /// Its CHAP_A code.
    pub fn code(self) -> u8 {
        match self {
            Self::Md5 => 5,
            Self::Sha256 => 7,
        }
    }

    /// Length of a CHAP_R for this algorithm.
    pub fn digest_len(self) -> usize {
        match self {
            Self::Md5 => 16,
            Self::Sha256 => 32,
        }
    }

    /// Length of the challenges we issue: at least the digest length.
    pub fn challenge_len(self) -> usize {
        self.digest_len()
    }

    /// The CHAP response: H(identifier || secret || challenge).
    pub fn response(self, id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
        match self {
            Self::Md5 => {
                let mut h = md5::Md5::new();
                h.update([id]);
                h.update(secret);
                h.update(challenge);
                h.finalize().to_vec()
            }
            Self::Sha256 => {
                let mut h = sha2::Sha256::new();
                h.update([id]);
                h.update(secret);
                h.update(challenge);
                h.finalize().to_vec()
            }
        }
    }
}

/// Why authentication failed. Every variant ends the login with
/// "authentication failure" (status 0x0201).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChapError {
    #[error("no supported CHAP algorithm in CHAP_A={0}")]
    NoAlgorithm(String),
    #[error("{0} missing")]
    MissingKey(&'static str),
    #[error("{0} not expected at this point of the CHAP exchange")]
    UnexpectedKey(&'static str),
    #[error("invalid {key} value")]
    BadValue { key: &'static str },
    #[error("unknown CHAP user name")]
    UnknownUser,
    #[error("CHAP response does not match")]
    WrongResponse,
    #[error("initiator asked for mutual CHAP but none is configured")]
    MutualNotConfigured,
    #[error("initiator reflected our own challenge")]
    Reflection,
    #[error("mutual CHAP secret equals the initiator's secret")]
    SameSecret,
    #[error("CHAP exchange already finished")]
    Finished,
}

#[derive(Debug, Clone)]
enum ChapState {
    ExpectAlgorithm,
    ExpectResponse {
        alg: ChapAlgorithm,
        id: u8,
        challenge: Vec<u8>,
    },
    Done,
}

/// What to do after a CHAP step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChapStep {
    /// Send these keys and wait for the initiator's next PDU.
    Continue(Vec<(String, String)>),
    /// The initiator is authenticated; send these keys (CHAP_N/CHAP_R for
    /// mutual CHAP, else nothing).
    Authenticated(Vec<(String, String)>),
}

/// The target side of one CHAP exchange.
#[derive(Debug, Clone)]
pub struct ChapAuthenticator {
    state: ChapState,
    credentials: ChapCredentials,
    mutual: Option<ChapCredentials>,
}

fn key_value(keys: &[(Key, String)], key: Key) -> Option<&str> {
    keys.iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.as_str())
}

/// Equality whose time depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ChapAuthenticator {
    /// `credentials` authenticate the initiator; `mutual` (if any) is what
    /// we answer an initiator's challenge with.
    pub fn new(credentials: ChapCredentials, mutual: Option<ChapCredentials>) -> Self {
        Self {
            state: ChapState::ExpectAlgorithm,
            credentials,
            mutual,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, ChapState::Done)
    }

    /// Consumes the CHAP keys of one request.
    pub fn step<R: RngCore + ?Sized>(
        &mut self,
        keys: &[(Key, String)],
        rng: &mut R,
    ) -> Result<ChapStep, ChapError> {
        match std::mem::replace(&mut self.state, ChapState::Done) {
            ChapState::ExpectAlgorithm => self.choose_algorithm(keys, rng),
            ChapState::ExpectResponse { alg, id, challenge } => {
                self.verify(keys, alg, id, &challenge)
            }
            ChapState::Done => Err(ChapError::Finished),
        }
    }

    fn choose_algorithm<R: RngCore + ?Sized>(
        &mut self,
        keys: &[(Key, String)],
        rng: &mut R,
    ) -> Result<ChapStep, ChapError> {
        for (key, name) in [
            (Key::ChapI, "CHAP_I"),
            (Key::ChapC, "CHAP_C"),
            (Key::ChapN, "CHAP_N"),
            (Key::ChapR, "CHAP_R"),
        ] {
            if key_value(keys, key).is_some() {
                return Err(ChapError::UnexpectedKey(name));
            }
        }
        let list = key_value(keys, Key::ChapA).ok_or(ChapError::MissingKey("CHAP_A"))?;
        // The initiator's list is in its order of preference.
        let alg = list
            .split(',')
            .filter_map(parse_number)
            .find_map(ChapAlgorithm::from_code)
            .ok_or_else(|| ChapError::NoAlgorithm(list.to_owned()))?;
        let mut id = [0u8; 1];
        rng.fill_bytes(&mut id);
        let mut challenge = vec![0u8; alg.challenge_len()];
        rng.fill_bytes(&mut challenge);
        let reply = vec![
            ("CHAP_A".to_owned(), alg.code().to_string()),
            ("CHAP_I".to_owned(), id[0].to_string()),
            ("CHAP_C".to_owned(), encode_hex(&challenge)),
        ];
        self.state = ChapState::ExpectResponse {
            alg,
            id: id[0],
            challenge,
        };
        Ok(ChapStep::Continue(reply))
    }

    fn verify(
        &mut self,
        keys: &[(Key, String)],
        alg: ChapAlgorithm,
        id: u8,
        challenge: &[u8],
    ) -> Result<ChapStep, ChapError> {
        if key_value(keys, Key::ChapA).is_some() {
            return Err(ChapError::UnexpectedKey("CHAP_A"));
        }
        let name = key_value(keys, Key::ChapN).ok_or(ChapError::MissingKey("CHAP_N"))?;
        let response = key_value(keys, Key::ChapR).ok_or(ChapError::MissingKey("CHAP_R"))?;
        let response = parse_binary(response).map_err(|_| ChapError::BadValue { key: "CHAP_R" })?;
        if name != self.credentials.user {
            return Err(ChapError::UnknownUser);
        }
        let expected = alg.response(id, &self.credentials.secret, challenge);
        if !constant_time_eq(&expected, &response) {
            return Err(ChapError::WrongResponse);
        }

        let their_id = key_value(keys, Key::ChapI);
        let their_challenge = key_value(keys, Key::ChapC);
        let reply = match (their_id, their_challenge) {
            (None, None) => Vec::new(),
            (Some(_), None) => return Err(ChapError::MissingKey("CHAP_C")),
            (None, Some(_)) => return Err(ChapError::MissingKey("CHAP_I")),
            (Some(i), Some(c)) => {
                let mutual = self.mutual.as_ref().ok_or(ChapError::MutualNotConfigured)?;
                let their_id = parse_number(i)
                    .and_then(|n| u8::try_from(n).ok())
                    .ok_or(ChapError::BadValue { key: "CHAP_I" })?;
                let their_challenge =
                    parse_binary(c).map_err(|_| ChapError::BadValue { key: "CHAP_C" })?;
                if their_challenge.is_empty() || their_challenge.len() > MAX_CHALLENGE_LEN {
                    return Err(ChapError::BadValue { key: "CHAP_C" });
                }
                // Answering our own challenge would hand the initiator the
                // response it needs (reflection attack, RFC 7143 §12.1.3).
                if their_challenge == challenge {
                    return Err(ChapError::Reflection);
                }
                if constant_time_eq(&mutual.secret, &self.credentials.secret) {
                    return Err(ChapError::SameSecret);
                }
                let r = alg.response(their_id, &mutual.secret, &their_challenge);
                vec![
                    ("CHAP_N".to_owned(), mutual.user.clone()),
                    ("CHAP_R".to_owned(), encode_hex(&r)),
                ]
            }
        };
        self.state = ChapState::Done;
        Ok(ChapStep::Authenticated(reply))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::text::encode_base64;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn creds(user: &str, secret: &str) -> ChapCredentials {
        ChapCredentials {
            user: user.into(),
            secret: secret.as_bytes().to_vec(),
        }
    }

    type MakeResponse = Box<dyn Fn(u8, &[u8]) -> String>;
    type ExtraKeys<'a> = &'a dyn Fn(&[u8]) -> Vec<(Key, String)>;

    fn keys(items: &[(Key, &str)]) -> Vec<(Key, String)> {
        items.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
    }

    fn get<'a>(reply: &'a [(String, String)], k: &str) -> &'a str {
        reply
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .unwrap()
    }

    #[test]
    fn md5_and_sha256_match_independent_vectors() {
        // Computed outside this code (Python hashlib / coreutils md5sum) over
        // 0x2a || "abcdefghijkl" || 00 01 .. 0f.
        let challenge: Vec<u8> = (0u8..16).collect();
        assert_eq!(
            encode_hex(&ChapAlgorithm::Md5.response(0x2a, b"abcdefghijkl", &challenge)),
            "0xcec6cff406e03600ec3585732fc9de13"
        );
        assert_eq!(
            encode_hex(&ChapAlgorithm::Sha256.response(0x2a, b"abcdefghijkl", &challenge)),
            "0xc311614443e3469a010a5bdcb3b6b575b19e315a81aeec1c6e62a117e66c48aa"
        );
    }

    #[test]
    fn algorithm_codes() {
        assert_eq!(ChapAlgorithm::from_code(5), Some(ChapAlgorithm::Md5));
        assert_eq!(ChapAlgorithm::from_code(7), Some(ChapAlgorithm::Sha256));
        assert_eq!(ChapAlgorithm::from_code(6), None);
        assert_eq!(ChapAlgorithm::Md5.code(), 5);
        assert_eq!(ChapAlgorithm::Sha256.code(), 7);
    }

    /// Runs the first step and returns (alg code, id, challenge bytes).
    fn start(auth: &mut ChapAuthenticator, a: &str) -> (u8, u8, Vec<u8>) {
        let mut rng = StdRng::seed_from_u64(7);
        let ChapStep::Continue(reply) = auth.step(&keys(&[(Key::ChapA, a)]), &mut rng).unwrap()
        else {
            panic!("expected Continue");
        };
        let c = get(&reply, "CHAP_C");
        assert!(c.starts_with("0x"));
        (
            get(&reply, "CHAP_A").parse().unwrap(),
            get(&reply, "CHAP_I").parse().unwrap(),
            parse_binary(c).unwrap(),
        )
    }

    #[test]
    fn one_way_md5_hex_and_base64() {
        for encode in [encode_hex as fn(&[u8]) -> String, encode_base64] {
            let mut auth = ChapAuthenticator::new(creds("alice", "0123456789ab"), None);
            let (a, id, challenge) = start(&mut auth, "7,5");
            assert_eq!(a, 7, "initiator preference order wins");
            assert_eq!(challenge.len(), 32);
            let r = ChapAlgorithm::Sha256.response(id, b"0123456789ab", &challenge);
            let step = auth
                .step(
                    &keys(&[(Key::ChapN, "alice"), (Key::ChapR, &encode(&r))]),
                    &mut rand::rng(),
                )
                .unwrap();
            assert_eq!(step, ChapStep::Authenticated(vec![]));
            assert!(auth.is_done());
        }
    }

    #[test]
    fn md5_selected_when_offered_first_or_alone() {
        let mut auth = ChapAuthenticator::new(creds("u", "s"), None);
        let (a, id, challenge) = start(&mut auth, "5");
        assert_eq!(a, 5);
        assert_eq!(challenge.len(), 16);
        let r = ChapAlgorithm::Md5.response(id, b"s", &challenge);
        assert!(matches!(
            auth.step(
                &keys(&[(Key::ChapN, "u"), (Key::ChapR, &encode_hex(&r))]),
                &mut rand::rng()
            ),
            Ok(ChapStep::Authenticated(_))
        ));
    }

    #[test]
    fn wrong_secret_user_or_garbage_fail() {
        let cases: Vec<(&str, MakeResponse, ChapError)> = vec![
            (
                "alice",
                Box::new(|id, c| encode_hex(&ChapAlgorithm::Md5.response(id, b"wrong", c))),
                ChapError::WrongResponse,
            ),
            (
                "mallory",
                Box::new(|id, c| encode_hex(&ChapAlgorithm::Md5.response(id, b"secret", c))),
                ChapError::UnknownUser,
            ),
            (
                "alice",
                Box::new(|id, c| {
                    let r = ChapAlgorithm::Md5.response(id, b"secret", c);
                    encode_hex(&r[..15])
                }),
                ChapError::WrongResponse,
            ),
            (
                "alice",
                Box::new(|_, _| "zz".into()),
                ChapError::BadValue { key: "CHAP_R" },
            ),
        ];
        for (user, make, err) in cases {
            let mut auth = ChapAuthenticator::new(creds("alice", "secret"), None);
            let (_, id, challenge) = start(&mut auth, "5");
            let r = make(id, &challenge);
            assert_eq!(
                auth.step(
                    &keys(&[(Key::ChapN, user), (Key::ChapR, &r)]),
                    &mut rand::rng()
                ),
                Err(err)
            );
        }
    }

    #[test]
    fn algorithm_negotiation_errors() {
        let mut rng = rand::rng();
        let mut auth = ChapAuthenticator::new(creds("u", "s"), None);
        assert_eq!(
            auth.step(&keys(&[(Key::ChapA, "6,x,99")]), &mut rng),
            Err(ChapError::NoAlgorithm("6,x,99".into()))
        );
        let mut auth = ChapAuthenticator::new(creds("u", "s"), None);
        assert_eq!(
            auth.step(&[], &mut rng),
            Err(ChapError::MissingKey("CHAP_A"))
        );
        let mut auth = ChapAuthenticator::new(creds("u", "s"), None);
        assert_eq!(
            auth.step(&keys(&[(Key::ChapA, "5"), (Key::ChapN, "u")]), &mut rng),
            Err(ChapError::UnexpectedKey("CHAP_N"))
        );
        let mut auth = ChapAuthenticator::new(creds("u", "s"), None);
        start(&mut auth, "5");
        assert_eq!(
            auth.step(&keys(&[(Key::ChapR, "0x00")]), &mut rng),
            Err(ChapError::MissingKey("CHAP_N"))
        );
        assert_eq!(auth.step(&[], &mut rng), Err(ChapError::Finished));
    }

    #[test]
    fn mutual_chap_answers_with_target_credentials() {
        let mut auth = ChapAuthenticator::new(
            creds("alice", "initiator-secret"),
            Some(creds("target-user", "target-secret-xyz")),
        );
        let (_, id, challenge) = start(&mut auth, "5");
        let r = ChapAlgorithm::Md5.response(id, b"initiator-secret", &challenge);
        let step = auth.step(
            &keys(&[
                (Key::ChapN, "alice"),
                (Key::ChapR, &encode_hex(&r)),
                (Key::ChapI, "255"),
                (Key::ChapC, "0b" /* base64 */),
            ]),
            &mut rand::rng(),
        );
        // Empty base64 challenge is invalid.
        assert_eq!(step, Err(ChapError::BadValue { key: "CHAP_C" }));

        let mut auth = ChapAuthenticator::new(
            creds("alice", "initiator-secret"),
            Some(creds("target-user", "target-secret-xyz")),
        );
        let (_, id, challenge) = start(&mut auth, "5");
        let r = ChapAlgorithm::Md5.response(id, b"initiator-secret", &challenge);
        let step = auth
            .step(
                &keys(&[
                    (Key::ChapN, "alice"),
                    (Key::ChapR, &encode_hex(&r)),
                    (Key::ChapI, "255"),
                    (Key::ChapC, "0x00112233445566778899aabbccddeeff"),
                ]),
                &mut rand::rng(),
            )
            .unwrap();
        // Expected value computed independently (Python hashlib).
        assert_eq!(
            step,
            ChapStep::Authenticated(vec![
                ("CHAP_N".into(), "target-user".into()),
                ("CHAP_R".into(), "0x43762ba62519f0f0d7e905b17c2a5b3f".into()),
            ])
        );
    }

    #[test]
    fn mutual_chap_refusals() {
        let run = |mutual: Option<ChapCredentials>, extra: ExtraKeys<'_>| {
            let mut auth = ChapAuthenticator::new(creds("alice", "secret-one"), mutual);
            let (_, id, challenge) = start(&mut auth, "5");
            let r = ChapAlgorithm::Md5.response(id, b"secret-one", &challenge);
            let mut k = keys(&[(Key::ChapN, "alice"), (Key::ChapR, &encode_hex(&r))]);
            k.extend(extra(&challenge));
            auth.step(&k, &mut rand::rng())
        };
        let good_c = |_: &[u8]| keys(&[(Key::ChapI, "1"), (Key::ChapC, "0x0102030405060708")]);
        assert_eq!(run(None, &good_c), Err(ChapError::MutualNotConfigured));
        assert_eq!(
            run(Some(creds("t", "secret-one")), &good_c),
            Err(ChapError::SameSecret)
        );
        let reflect = |c: &[u8]| vec![(Key::ChapI, "1".to_owned()), (Key::ChapC, encode_base64(c))];
        assert_eq!(
            run(Some(creds("t", "secret-two")), &reflect),
            Err(ChapError::Reflection)
        );
        let only_i = |_: &[u8]| keys(&[(Key::ChapI, "1")]);
        assert_eq!(
            run(Some(creds("t", "secret-two")), &only_i),
            Err(ChapError::MissingKey("CHAP_C"))
        );
        let bad_i = |_: &[u8]| keys(&[(Key::ChapI, "256"), (Key::ChapC, "0x01")]);
        assert_eq!(
            run(Some(creds("t", "secret-two")), &bad_i),
            Err(ChapError::BadValue { key: "CHAP_I" })
        );
        let huge = "0x".to_owned() + &"ab".repeat(MAX_CHALLENGE_LEN + 1);
        let huge_c = move |_: &[u8]| vec![(Key::ChapI, "1".to_owned()), (Key::ChapC, huge.clone())];
        assert_eq!(
            run(Some(creds("t", "secret-two")), &huge_c),
            Err(ChapError::BadValue { key: "CHAP_C" })
        );
        // Mutual configured but not requested: one-way succeeds.
        assert_eq!(
            run(Some(creds("t", "secret-two")), &|_| vec![]),
            Ok(ChapStep::Authenticated(vec![]))
        );
    }

    #[test]
    fn challenges_are_fresh() {
        let mut a = ChapAuthenticator::new(creds("u", "s"), None);
        let mut b = ChapAuthenticator::new(creds("u", "s"), None);
        let mut rng = rand::rng();
        let ChapStep::Continue(ra) = a.step(&keys(&[(Key::ChapA, "5")]), &mut rng).unwrap() else {
            panic!()
        };
        let ChapStep::Continue(rb) = b.step(&keys(&[(Key::ChapA, "5")]), &mut rng).unwrap() else {
            panic!()
        };
        assert_ne!(get(&ra, "CHAP_C"), get(&rb, "CHAP_C"));
    }
}
