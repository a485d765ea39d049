//! Fuzz the Async journal record decoder (replay reads these from disk
//! after crashes, so any bytes must decode or fail cleanly), and check
//! that what decodes re-encodes to the same bytes.
//!
//! `cargo fuzz run journal_record` (from the repository root).

#![no_main]

use libfuzzer_sys::fuzz_target;
use lunmirror::mirror::journal::{decode_record, encode_record};

fuzz_target!(|data: &[u8]| {
    if let Ok((h, payload, used)) = decode_record(data) {
        assert!(used <= data.len());
        let again = encode_record(h.kind, h.fua, h.seq, h.offset, h.length, payload);
        assert_eq!(Some(&again[..]), data.get(..used));
    }
});
