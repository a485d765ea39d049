//! Which way a TCMU command's data buffers go.
//!
//! A ring entry carries iovecs but not the transfer direction (LIO knows
//! it; the ring does not say). For a bidirectional command the split is
//! explicit (`iov_bidi_cnt`); otherwise the buffers hold data-out exactly
//! when the opcode is one that carries a parameter list or write data to
//! the target. Everything else with buffers is data-in. Getting this wrong
//! only matters for commands whose data the SCSI core would read: the
//! table lists every SPC-4/SBC-3 opcode with a data-out phase.

/// Transfer direction of one command's `iovs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The buffers hold what the initiator sent.
    Out,
    /// The buffers are to be filled by us.
    In,
}

/// Opcodes (6/10/12/16-byte CDBs) with a data-out phase.
const OUT_OPCODES: &[u8] = &[
    0x04, // FORMAT UNIT (parameter list)
    0x07, // REASSIGN BLOCKS
    0x0a, // WRITE(6)
    0x15, // MODE SELECT(6)
    0x1d, // SEND DIAGNOSTIC
    0x2a, // WRITE(10)
    0x2e, // WRITE AND VERIFY(10)
    0x2f, // VERIFY(10) with BYTCHK
    0x3b, // WRITE BUFFER
    0x3f, // WRITE LONG(10)
    0x41, // WRITE SAME(10)
    0x42, // UNMAP
    0x4c, // LOG SELECT
    0x55, // MODE SELECT(10)
    0x5f, // PERSISTENT RESERVE OUT
    0x83, // EXTENDED COPY / third-party copy OUT
    0x89, // COMPARE AND WRITE
    0x8a, // WRITE(16)
    0x8e, // WRITE AND VERIFY(16)
    0x8f, // VERIFY(16) with BYTCHK
    0x93, // WRITE SAME(16)
    0x9f, // SERVICE ACTION OUT(16), e.g. WRITE LONG(16)
    0xa4, // MAINTENANCE OUT (SET TARGET PORT GROUPS...)
    0xaa, // WRITE(12)
    0xae, // WRITE AND VERIFY(12)
    0xaf, // VERIFY(12) with BYTCHK
    0xb5, // SECURITY PROTOCOL OUT
];

/// Service actions of the variable-length CDB (0x7f) with a data-out phase:
/// VERIFY(32), WRITE(32), WRITE AND VERIFY(32), WRITE SAME(32), and the
/// ORWRITE/atomic writes.
const OUT_VARLEN: &[u16] = &[0x000a, 0x000b, 0x000c, 0x000d, 0x000e, 0x0018];

/// Direction of a non-bidirectional command's buffers.
pub fn direction(cdb: &[u8]) -> Direction {
    match cdb.first() {
        Some(0x7f) => {
            let sa = match (cdb.get(8), cdb.get(9)) {
                (Some(&hi), Some(&lo)) => u16::from_be_bytes([hi, lo]),
                _ => return Direction::In,
            };
            if OUT_VARLEN.contains(&sa) {
                Direction::Out
            } else {
                Direction::In
            }
        }
        Some(op) if OUT_OPCODES.contains(op) => Direction::Out,
        _ => Direction::In,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_commands() {
        assert_eq!(direction(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), Direction::In);
        assert_eq!(
            direction(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
            Direction::Out
        );
        assert_eq!(direction(&[0x12, 0, 0, 0, 36, 0]), Direction::In);
        assert_eq!(direction(&[0x42; 10]), Direction::Out);
        assert_eq!(direction(&[0x89; 16]), Direction::Out);
        assert_eq!(direction(&[0x9e, 0x10]), Direction::In);
        assert_eq!(direction(&[]), Direction::In);
    }

    #[test]
    fn variable_length() {
        let mut w32 = [0u8; 32];
        w32[0] = 0x7f;
        w32[9] = 0x0b;
        assert_eq!(direction(&w32), Direction::Out);
        w32[9] = 0x09; // READ(32)
        assert_eq!(direction(&w32), Direction::In);
        assert_eq!(direction(&[0x7f, 0, 0]), Direction::In);
    }
}
