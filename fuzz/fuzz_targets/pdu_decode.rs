//! Fuzz the iSCSI PDU decoder: any bytes decode or fail cleanly, and what
//! decodes re-encodes to a PDU that decodes to the same value.
//!
//! `cargo fuzz run pdu_decode` (from the repository root).

#![no_main]

use libfuzzer_sys::fuzz_target;
use lunmirror::iscsi::pdu::{Bhs, FrameConfig, Pdu, Prefix, BHS_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let cfg = FrameConfig {
        header_digest: flags & 1 != 0,
        data_digest: flags & 2 != 0,
        max_data_segment_len: 1 << 16,
    };
    // The staged path the connection uses must agree with the one-shot one.
    if let Some(bhs) = bytes.first_chunk::<BHS_LEN>() {
        let pre = Prefix::parse(bhs);
        let ahs = bytes.get(BHS_LEN..BHS_LEN + pre.ahs_len).unwrap_or(&[]);
        let staged = Bhs::decode(bhs, ahs);
        if let Ok((pdu, _)) = Pdu::decode(bytes, &cfg) {
            assert_eq!(staged.as_ref().ok(), Some(&pdu.header));
        }
    }
    if let Ok((pdu, used)) = Pdu::decode(bytes, &cfg) {
        assert!(used <= bytes.len());
        let again = pdu.encode(&cfg);
        let (back, used2) = Pdu::decode(&again, &cfg).expect("re-encoded PDU decodes");
        assert_eq!(used2, again.len());
        assert_eq!(back, pdu);
    }
});
