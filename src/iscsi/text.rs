//! The iSCSI text format (RFC 7143 §6.1): `key=value` items separated by NUL
//! bytes, as carried in Login and Text PDUs, plus the value encodings the
//! negotiation and CHAP code need (numbers, booleans, hex/base64 binaries).
//!
//! Parsing is strict about what can hurt us (bad UTF-8, missing `=`, over-long
//! keys or values, duplicate keys) and lenient about what real initiators do
//! (a missing final NUL, NUL padding at the end).

use base64::Engine as _;
use thiserror::Error;

/// Longest key name RFC 7143 §6.1 allows (a standard-label is 1..=63 chars).
pub const MAX_KEY_LEN: usize = 63;
/// Longest value we accept: 8192 bytes is the largest any key needs (a
/// CHAP_C/CHAP_R of 1024 binary bytes in hex takes ~2 KiB; SendTargets
/// values are short). Anything longer is hostile.
pub const MAX_VALUE_LEN: usize = 8192;

/// Why a text segment or a value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TextError {
    #[error("text item {index} is not valid UTF-8")]
    BadUtf8 { index: usize },
    #[error("text item {index} has no '='")]
    MissingEquals { index: usize },
    #[error("text item {index} is empty")]
    EmptyItem { index: usize },
    #[error("text item {index} has an empty key")]
    EmptyKey { index: usize },
    #[error("key of {len} bytes exceeds {MAX_KEY_LEN}")]
    KeyTooLong { len: usize },
    #[error("value of key {key} has {len} bytes, more than {MAX_VALUE_LEN}")]
    ValueTooLong { key: String, len: usize },
    #[error("key {0} appears twice")]
    DuplicateKey(String),
    #[error("text data of {len} bytes exceeds the {limit}-byte limit")]
    TooLong { len: usize, limit: usize },
    #[error("invalid binary value (expected 0x<hex> or 0b<base64>)")]
    BadBinary,
}

/// Splits a text data segment into `(key, value)` pairs, in order.
pub fn parse_text(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    // Trailing NULs are the terminator of the last item plus any padding an
    // initiator left inside the segment; a missing final NUL is tolerated.
    let end = data.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    let body = data.get(..end).unwrap_or_default();
    let mut pairs: Vec<(String, String)> = Vec::new();
    if body.is_empty() {
        return Ok(pairs);
    }
    for (index, item) in body.split(|&b| b == 0).enumerate() {
        if item.is_empty() {
            return Err(TextError::EmptyItem { index });
        }
        let text = std::str::from_utf8(item).map_err(|_| TextError::BadUtf8 { index })?;
        let (key, value) = text
            .split_once('=')
            .ok_or(TextError::MissingEquals { index })?;
        if key.is_empty() {
            return Err(TextError::EmptyKey { index });
        }
        if key.len() > MAX_KEY_LEN {
            return Err(TextError::KeyTooLong { len: key.len() });
        }
        if value.len() > MAX_VALUE_LEN {
            return Err(TextError::ValueTooLong {
                key: key.to_owned(),
                len: value.len(),
            });
        }
        if pairs.iter().any(|(k, _)| k == key) {
            return Err(TextError::DuplicateKey(key.to_owned()));
        }
        pairs.push((key.to_owned(), value.to_owned()));
    }
    Ok(pairs)
}

/// Encodes pairs as `key=value\0` items (every item NUL-terminated).
pub fn encode_text(pairs: &[(String, String)]) -> Vec<u8> {
    let len = pairs.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut out = Vec::with_capacity(len);
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Parses a numerical value: a decimal constant or a `0x`/`0X` hex constant
/// (RFC 7143 §6.1). `None` if malformed or above `u64::MAX`.
pub fn parse_number(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        return u64::from_str_radix(hex, 16).ok();
    }
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses `Yes`/`No`.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

/// The text form of a boolean value.
pub fn bool_str(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

/// Decodes a binary value: `0x`/`0X` + hex digits (an odd count gets an
/// implicit leading zero nibble) or `0b`/`0B` + standard base64.
pub fn parse_binary(s: &str) -> Result<Vec<u8>, TextError> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return decode_hex(hex).ok_or(TextError::BadBinary);
    }
    if let Some(b64) = s.strip_prefix("0b").or_else(|| s.strip_prefix("0B")) {
        if b64.is_empty() {
            return Err(TextError::BadBinary);
        }
        return base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| TextError::BadBinary);
    }
    Err(TextError::BadBinary)
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.is_empty() {
        return None;
    }
    let mut nibbles = Vec::with_capacity(hex.len() + 1);
    if hex.len() % 2 == 1 {
        nibbles.push(0u8);
    }
    for c in hex.chars() {
        nibbles.push(u8::try_from(c.to_digit(16)?).ok()?);
    }
    Some(
        nibbles
            .chunks_exact(2)
            .map(|p| match p {
                [hi, lo] => (hi << 4) | lo,
                _ => 0,
            })
            .collect(),
    )
}

/// Encodes bytes as a `0x` hex constant (lower case).
pub fn encode_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Encodes bytes as a `0b` base64 constant.
pub fn encode_base64(bytes: &[u8]) -> String {
    format!(
        "0b{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// A long text answer handed out in pieces no larger than the peer's limit
/// (RFC 7143 §6.1: a key=value may be split anywhere across PDUs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Segmenter {
    data: Vec<u8>,
    offset: usize,
}

impl Segmenter {
    pub fn new(data: Vec<u8>) -> Self {
        Self { data, offset: 0 }
    }

    /// The next piece of at most `limit` bytes (at least one byte if any is
    /// left) and whether more pieces follow it.
    pub fn next_piece(&mut self, limit: usize) -> (Vec<u8>, bool) {
        let rest = self.data.get(self.offset..).unwrap_or_default();
        let take = rest.len().min(limit.max(1));
        let piece = rest.get(..take).unwrap_or_default().to_vec();
        self.offset += take;
        (piece, self.offset < self.data.len())
    }

    /// Whether pieces remain to be sent.
    pub fn has_more(&self) -> bool {
        self.offset < self.data.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    #[test]
    fn parses_typical_login_text() {
        let data = b"InitiatorName=iqn.1993-08.org.debian:01:abc\0SessionType=Normal\0HeaderDigest=CRC32C,None\0";
        let pairs = parse_text(data).unwrap();
        assert_eq!(
            pairs,
            vec![
                p("InitiatorName", "iqn.1993-08.org.debian:01:abc"),
                p("SessionType", "Normal"),
                p("HeaderDigest", "CRC32C,None"),
            ]
        );
    }

    #[test]
    fn tolerates_missing_final_nul_and_padding() {
        assert_eq!(
            parse_text(b"A=1\0B=2").unwrap(),
            vec![p("A", "1"), p("B", "2")]
        );
        assert_eq!(parse_text(b"A=1\0\0\0\0").unwrap(), vec![p("A", "1")]);
        assert!(parse_text(b"").unwrap().is_empty());
        assert!(parse_text(b"\0\0").unwrap().is_empty());
    }

    #[test]
    fn value_may_be_empty_or_contain_equals() {
        assert_eq!(
            parse_text(b"SendTargets=\0X-a=b=c\0").unwrap(),
            vec![p("SendTargets", ""), p("X-a", "b=c")]
        );
    }

    #[test]
    fn rejects_malformed_items() {
        assert_eq!(
            parse_text(b"A=1\0noequals\0"),
            Err(TextError::MissingEquals { index: 1 })
        );
        assert_eq!(parse_text(b"=v\0"), Err(TextError::EmptyKey { index: 0 }));
        assert_eq!(
            parse_text(b"A=1\0\0B=2\0"),
            Err(TextError::EmptyItem { index: 1 })
        );
        assert_eq!(
            parse_text(b"A=\xff\xfe\0"),
            Err(TextError::BadUtf8 { index: 0 })
        );
        assert_eq!(
            parse_text(b"A=1\0A=2\0"),
            Err(TextError::DuplicateKey("A".into()))
        );
    }

    #[test]
    fn key_and_value_limits() {
        let key63 = "K".repeat(63);
        let key64 = "K".repeat(64);
        assert!(parse_text(format!("{key63}=v").as_bytes()).is_ok());
        assert_eq!(
            parse_text(format!("{key64}=v").as_bytes()),
            Err(TextError::KeyTooLong { len: 64 })
        );
        let v8192 = "a".repeat(8192);
        let v8193 = "a".repeat(8193);
        assert!(parse_text(format!("K={v8192}").as_bytes()).is_ok());
        assert_eq!(
            parse_text(format!("K={v8193}").as_bytes()),
            Err(TextError::ValueTooLong {
                key: "K".into(),
                len: 8193
            })
        );
    }

    #[test]
    fn encode_terminates_every_item() {
        assert_eq!(
            encode_text(&[p("A", "1"), p("B", "")]),
            b"A=1\0B=\0".to_vec()
        );
        assert!(encode_text(&[]).is_empty());
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number("0"), Some(0));
        assert_eq!(parse_number("262144"), Some(262_144));
        assert_eq!(parse_number("0x40000"), Some(262_144));
        assert_eq!(parse_number("0XfF"), Some(255));
        assert_eq!(parse_number("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_number("18446744073709551616"), None);
        for bad in ["", "-1", "+1", "1 ", "0x", "0xg", "1e3", "abc"] {
            assert_eq!(parse_number(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn booleans() {
        assert_eq!(parse_bool("Yes"), Some(true));
        assert_eq!(parse_bool("No"), Some(false));
        assert_eq!(parse_bool("yes"), None);
        assert_eq!(bool_str(true), "Yes");
        assert_eq!(bool_str(false), "No");
    }

    #[test]
    fn binaries() {
        assert_eq!(parse_binary("0x00ff10").unwrap(), vec![0, 0xff, 0x10]);
        assert_eq!(parse_binary("0XABC").unwrap(), vec![0x0a, 0xbc]);
        assert_eq!(parse_binary("0bAP8Q").unwrap(), vec![0, 0xff, 0x10]);
        assert_eq!(parse_binary("0BAP8Q").unwrap(), vec![0, 0xff, 0x10]);
        for bad in ["", "0x", "0b", "00ff", "0xzz", "0b!!", "0bAP8"] {
            assert_eq!(parse_binary(bad), Err(TextError::BadBinary), "{bad:?}");
        }
        assert_eq!(encode_hex(&[0, 0xab]), "0x00ab");
        assert_eq!(encode_base64(&[0, 0xff, 0x10]), "0bAP8Q");
    }

    #[test]
    fn segmenter_splits_at_limit() {
        let mut s = Segmenter::new(b"abcdefg".to_vec());
        assert_eq!(s.next_piece(3), (b"abc".to_vec(), true));
        assert_eq!(s.next_piece(3), (b"def".to_vec(), true));
        assert_eq!(s.next_piece(3), (b"g".to_vec(), false));
        assert!(!s.has_more());
        assert_eq!(s.next_piece(3), (Vec::new(), false));
    }

    fn pairs_strategy() -> impl Strategy<Value = Vec<(String, String)>> {
        proptest::collection::btree_map("[A-Z][A-Za-z0-9.+@_-]{0,62}", "[^\u{0}]{0,64}", 0..12)
            .prop_map(|m| m.into_iter().collect::<Vec<_>>())
    }

    proptest! {
        #[test]
        fn round_trip(pairs in pairs_strategy()) {
            let encoded = encode_text(&pairs);
            prop_assert_eq!(parse_text(&encoded).unwrap(), pairs.clone());
            // Without the final NUL it still parses the same.
            if !encoded.is_empty() {
                let trimmed = &encoded[..encoded.len() - 1];
                prop_assert_eq!(parse_text(trimmed).unwrap(), pairs);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(pairs) = parse_text(&data) {
                // Whatever parses re-encodes to the same items.
                let re = encode_text(&pairs);
                prop_assert_eq!(parse_text(&re).unwrap(), pairs);
            }
        }

        #[test]
        fn segmented_pieces_reassemble(data in proptest::collection::vec(any::<u8>(), 0..2000), limit in 1usize..600) {
            let mut s = Segmenter::new(data.clone());
            let mut out = Vec::new();
            loop {
                let (piece, more) = s.next_piece(limit);
                prop_assert!(piece.len() <= limit);
                out.extend_from_slice(&piece);
                if !more { break; }
                prop_assert!(!piece.is_empty());
            }
            prop_assert_eq!(out, data);
        }

        #[test]
        fn binary_round_trip(bytes in proptest::collection::vec(any::<u8>(), 1..300)) {
            prop_assert_eq!(parse_binary(&encode_hex(&bytes)).unwrap(), bytes.clone());
            prop_assert_eq!(parse_binary(&encode_base64(&bytes)).unwrap(), bytes);
        }

        #[test]
        fn number_round_trip(n in any::<u64>()) {
            prop_assert_eq!(parse_number(&n.to_string()), Some(n));
            prop_assert_eq!(parse_number(&format!("0x{n:x}")), Some(n));
        }
    }
}
