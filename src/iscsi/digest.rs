//! iSCSI header and data digests: CRC32C (Castagnoli), RFC 7143 §13.1.
//!
//! The digest goes on the wire least significant byte first (the RFC's
//! examples list the CRC of 32 zero bytes, 0x8A9136AA, as `aa 36 91 8a`).

/// Length of a digest on the wire.
pub const DIGEST_LEN: usize = 4;

/// CRC32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// An incremental CRC32C over several discontiguous pieces (a header and
/// its AHS, or a data segment and its padding).
#[derive(Debug, Clone, Copy, Default)]
pub struct Crc32c(u32);

impl Crc32c {
    pub fn new() -> Self {
        Crc32c(0)
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0 = crc32c::crc32c_append(self.0, data);
    }

    pub fn value(&self) -> u32 {
        self.0
    }
}

/// The four wire bytes of a digest value.
pub fn to_wire(crc: u32) -> [u8; DIGEST_LEN] {
    crc.to_le_bytes()
}

/// A digest value from its four wire bytes.
pub fn from_wire(bytes: [u8; DIGEST_LEN]) -> u32 {
    u32::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_examples() {
        // RFC 7143 appendix B.4: 32 bytes of zeroes, of 0xff, ascending, descending.
        assert_eq!(to_wire(crc32c(&[0u8; 32])), [0xaa, 0x36, 0x91, 0x8a]);
        assert_eq!(to_wire(crc32c(&[0xffu8; 32])), [0x43, 0xab, 0xa8, 0x62]);
        let asc: Vec<u8> = (0u8..32).collect();
        assert_eq!(to_wire(crc32c(&asc)), [0x4e, 0x79, 0xdd, 0x46]);
        let desc: Vec<u8> = (0u8..32).rev().collect();
        assert_eq!(to_wire(crc32c(&desc)), [0x5c, 0xdb, 0x3f, 0x11]);
    }

    #[test]
    fn incremental_equals_one_shot() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let mut c = Crc32c::new();
        c.update(&data[..13]);
        c.update(&data[13..500]);
        c.update(&data[500..]);
        assert_eq!(c.value(), crc32c(&data));
        assert_eq!(from_wire(to_wire(c.value())), c.value());
    }
}
