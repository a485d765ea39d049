//! The kernel ABI of `include/uapi/linux/target_core_user.h` (TCMU ring
//! version 2) as `repr(C)` types and constants, and nothing else from that
//! file's neighbours.
//!
//! The ring code never dereferences these structs over shared memory (the
//! kernel writes the ring concurrently and entries may be hostile); it reads
//! fields at the offsets these definitions fix (`offset_of!`), through the
//! checked accessors in `ring.rs`. The structs exist so that the layout is
//! written down once and asserted against the header in tests.
//!
//! Only 64-bit userspace is supported: the kernel writes native `struct
//! iovec` (16 bytes) for 64-bit processes and compat iovecs (8 bytes) for
//! 32-bit ones.

use std::mem::{offset_of, size_of};

#[cfg(not(target_pointer_width = "64"))]
compile_error!("the TCMU ring ABI is implemented for 64-bit userspace only");

/// `TCMU_VERSION`.
pub const TCMU_VERSION: &str = "2.0";
/// `TCMU_MAILBOX_VERSION`: the only mailbox layout this code understands.
pub const TCMU_MAILBOX_VERSION: u16 = 2;
/// `ALIGN_SIZE`: `cmd_tail` sits on its own cache line.
pub const ALIGN_SIZE: usize = 64;

/// Mailbox `flags`: the kernel accepts completions in any order (the
/// completion carries the `cmd_id` of the command it completes).
pub const TCMU_MAILBOX_FLAG_CAP_OOOC: u16 = 1 << 0;
/// Mailbox `flags`: userspace may report the data-in length (`read_len`).
pub const TCMU_MAILBOX_FLAG_CAP_READ_LEN: u16 = 1 << 1;
/// Mailbox `flags`: the kernel queues TMR notification entries.
pub const TCMU_MAILBOX_FLAG_CAP_TMR: u16 = 1 << 2;
/// Mailbox `flags`: userspace may keep a command's data buffer after completion.
pub const TCMU_MAILBOX_FLAG_CAP_KEEP_BUF: u16 = 1 << 3;

/// `struct tcmu_mailbox`: at offset 0 of the mapping. `cmd_head` is written
/// by the kernel, `cmd_tail` (own cache line) by userspace.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy)]
pub struct TcmuMailbox {
    pub version: u16,
    pub flags: u16,
    pub cmdr_off: u32,
    pub cmdr_size: u32,
    pub cmd_head: u32,
    _pad_to_tail: [u8; 48],
    pub cmd_tail: u32,
}

/// `enum tcmu_opcode`, the low 3 bits of `len_op`.
pub const TCMU_OP_PAD: u32 = 0;
pub const TCMU_OP_CMD: u32 = 1;
pub const TCMU_OP_TMR: u32 = 2;
/// `TCMU_OP_MASK`.
pub const TCMU_OP_MASK: u32 = 0x7;
/// `TCMU_OP_ALIGN_SIZE`: entry lengths (and so offsets) are multiples of 8.
pub const TCMU_OP_ALIGN_SIZE: u32 = 8;

/// `tcmu_hdr_get_op`.
pub const fn hdr_get_op(len_op: u32) -> u32 {
    len_op & TCMU_OP_MASK
}

/// `tcmu_hdr_get_len`.
pub const fn hdr_get_len(len_op: u32) -> u32 {
    len_op & !TCMU_OP_MASK
}

/// `tcmu_hdr_set_op` + `tcmu_hdr_set_len` in one go.
pub const fn hdr_len_op(len: u32, op: u32) -> u32 {
    (len & !TCMU_OP_MASK) | (op & TCMU_OP_MASK)
}

/// `uflags`: userspace does not know this entry's opcode.
pub const TCMU_UFLAG_UNKNOWN_OP: u8 = 0x1;
/// `uflags`: `rsp.read_len` holds the data-in length.
pub const TCMU_UFLAG_READ_LEN: u8 = 0x2;
/// `uflags`: keep the data buffer after completion.
pub const TCMU_UFLAG_KEEP_BUF: u8 = 0x4;

/// `struct tcmu_cmd_entry_hdr`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct TcmuCmdEntryHdr {
    pub len_op: u32,
    pub cmd_id: u16,
    pub kflags: u8,
    pub uflags: u8,
}

/// `TCMU_SENSE_BUFFERSIZE`.
pub const TCMU_SENSE_BUFFERSIZE: usize = 96;

/// `struct iovec` as a 64-bit process sees it; `iov_base` is an offset from
/// the start of the mapping, not a pointer.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcmuIovec {
    pub iov_base: u64,
    pub iov_len: u64,
}

/// The `req` arm of the `tcmu_cmd_entry` union; `iov[]` follows it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct TcmuCmdReq {
    pub iov_cnt: u32,
    pub iov_bidi_cnt: u32,
    pub iov_dif_cnt: u32,
    pub cdb_off: u64,
    pub __pad1: u64,
    pub __pad2: u64,
}

/// The `rsp` arm of the `tcmu_cmd_entry` union.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TcmuCmdRsp {
    pub scsi_status: u8,
    pub __pad1: u8,
    pub __pad2: u16,
    pub read_len: u32,
    pub sense_buffer: [u8; TCMU_SENSE_BUFFERSIZE],
}

/// The anonymous union of `struct tcmu_cmd_entry`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union TcmuCmdBody {
    pub req: TcmuCmdReq,
    pub rsp: TcmuCmdRsp,
}

/// `struct tcmu_cmd_entry` (without the flexible `iov[]`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcmuCmdEntry {
    pub hdr: TcmuCmdEntryHdr,
    pub body: TcmuCmdBody,
}

/// `TCMU_TMR_*`: `tmr_type` of a TMR entry.
pub const TCMU_TMR_UNKNOWN: u8 = 0;
pub const TCMU_TMR_ABORT_TASK: u8 = 1;
pub const TCMU_TMR_ABORT_TASK_SET: u8 = 2;
pub const TCMU_TMR_CLEAR_ACA: u8 = 3;
pub const TCMU_TMR_CLEAR_TASK_SET: u8 = 4;
pub const TCMU_TMR_LUN_RESET: u8 = 5;
pub const TCMU_TMR_TARGET_WARM_RESET: u8 = 6;
pub const TCMU_TMR_TARGET_COLD_RESET: u8 = 7;
/// Pseudo reset due to a received PR OUT.
pub const TCMU_TMR_LUN_RESET_PRO: u8 = 128;

/// `struct tcmu_tmr_entry` (without the flexible `cmd_ids[]` of `u16`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct TcmuTmrEntry {
    pub hdr: TcmuCmdEntryHdr,
    pub tmr_type: u8,
    pub __pad1: u8,
    pub __pad2: u16,
    pub cmd_cnt: u32,
    pub __pad3: u64,
    pub __pad4: u64,
}

/// `enum tcmu_genl_cmd`.
pub const TCMU_CMD_UNSPEC: u8 = 0;
pub const TCMU_CMD_ADDED_DEVICE: u8 = 1;
pub const TCMU_CMD_REMOVED_DEVICE: u8 = 2;
pub const TCMU_CMD_RECONFIG_DEVICE: u8 = 3;
pub const TCMU_CMD_ADDED_DEVICE_DONE: u8 = 4;
pub const TCMU_CMD_REMOVED_DEVICE_DONE: u8 = 5;
pub const TCMU_CMD_RECONFIG_DEVICE_DONE: u8 = 6;
pub const TCMU_CMD_SET_FEATURES: u8 = 7;
pub const TCMU_CMD_MAX: u8 = 7;

/// `enum tcmu_genl_attr`.
pub const TCMU_ATTR_UNSPEC: u16 = 0;
pub const TCMU_ATTR_DEVICE: u16 = 1;
pub const TCMU_ATTR_MINOR: u16 = 2;
pub const TCMU_ATTR_PAD: u16 = 3;
pub const TCMU_ATTR_DEV_CFG: u16 = 4;
pub const TCMU_ATTR_DEV_SIZE: u16 = 5;
pub const TCMU_ATTR_WRITECACHE: u16 = 6;
pub const TCMU_ATTR_CMD_STATUS: u16 = 7;
pub const TCMU_ATTR_DEVICE_ID: u16 = 8;
pub const TCMU_ATTR_SUPP_KERN_CMD_REPLY: u16 = 9;
pub const TCMU_ATTR_MAX: u16 = 9;

// Offsets the ring code uses, derived from the definitions above.

/// `sizeof(struct tcmu_mailbox)`: the smallest legal `cmdr_off`.
pub const MAILBOX_SIZE: usize = size_of::<TcmuMailbox>();
pub const MB_VERSION: usize = offset_of!(TcmuMailbox, version);
pub const MB_FLAGS: usize = offset_of!(TcmuMailbox, flags);
pub const MB_CMDR_OFF: usize = offset_of!(TcmuMailbox, cmdr_off);
pub const MB_CMDR_SIZE: usize = offset_of!(TcmuMailbox, cmdr_size);
pub const MB_CMD_HEAD: usize = offset_of!(TcmuMailbox, cmd_head);
pub const MB_CMD_TAIL: usize = offset_of!(TcmuMailbox, cmd_tail);

pub const HDR_SIZE: usize = size_of::<TcmuCmdEntryHdr>();
pub const HDR_LEN_OP: usize = offset_of!(TcmuCmdEntryHdr, len_op);
pub const HDR_CMD_ID: usize = offset_of!(TcmuCmdEntryHdr, cmd_id);
pub const HDR_KFLAGS: usize = offset_of!(TcmuCmdEntryHdr, kflags);
pub const HDR_UFLAGS: usize = offset_of!(TcmuCmdEntryHdr, uflags);

const BODY: usize = offset_of!(TcmuCmdEntry, body);
/// `sizeof(struct tcmu_cmd_entry)`: the smallest legal CMD entry.
pub const CMD_ENTRY_SIZE: usize = size_of::<TcmuCmdEntry>();
pub const REQ_IOV_CNT: usize = BODY + offset_of!(TcmuCmdReq, iov_cnt);
pub const REQ_IOV_BIDI_CNT: usize = BODY + offset_of!(TcmuCmdReq, iov_bidi_cnt);
pub const REQ_IOV_DIF_CNT: usize = BODY + offset_of!(TcmuCmdReq, iov_dif_cnt);
pub const REQ_CDB_OFF: usize = BODY + offset_of!(TcmuCmdReq, cdb_off);
/// Offset of `req.iov[0]`.
pub const REQ_IOV: usize = BODY + size_of::<TcmuCmdReq>();
pub const IOVEC_SIZE: usize = size_of::<TcmuIovec>();
pub const RSP_SCSI_STATUS: usize = BODY + offset_of!(TcmuCmdRsp, scsi_status);
pub const RSP_READ_LEN: usize = BODY + offset_of!(TcmuCmdRsp, read_len);
pub const RSP_SENSE: usize = BODY + offset_of!(TcmuCmdRsp, sense_buffer);

pub const TMR_ENTRY_SIZE: usize = size_of::<TcmuTmrEntry>();
pub const TMR_TYPE: usize = offset_of!(TcmuTmrEntry, tmr_type);
pub const TMR_CMD_CNT: usize = offset_of!(TcmuTmrEntry, cmd_cnt);
/// Offset of `cmd_ids[0]`.
pub const TMR_CMD_IDS: usize = TMR_ENTRY_SIZE;

#[cfg(test)]
mod tests {
    use super::*;

    // Values printed by a C program compiled against the uapi header
    // (gcc, x86_64): offsetof/sizeof of every field the ring touches.
    #[test]
    fn mailbox_layout_matches_header() {
        assert_eq!(MAILBOX_SIZE, 128);
        assert_eq!(MB_VERSION, 0);
        assert_eq!(MB_FLAGS, 2);
        assert_eq!(MB_CMDR_OFF, 4);
        assert_eq!(MB_CMDR_SIZE, 8);
        assert_eq!(MB_CMD_HEAD, 12);
        assert_eq!(MB_CMD_TAIL, 64);
        assert_eq!(std::mem::align_of::<TcmuMailbox>(), ALIGN_SIZE);
    }

    #[test]
    fn cmd_entry_layout_matches_header() {
        assert_eq!(HDR_SIZE, 8);
        assert_eq!(
            (HDR_LEN_OP, HDR_CMD_ID, HDR_KFLAGS, HDR_UFLAGS),
            (0, 4, 6, 7)
        );
        assert_eq!(CMD_ENTRY_SIZE, 112);
        assert_eq!(REQ_IOV_CNT, 8);
        assert_eq!(REQ_IOV_BIDI_CNT, 12);
        assert_eq!(REQ_IOV_DIF_CNT, 16);
        // cdb_off is 8-aligned inside the (unpacked) req struct.
        assert_eq!(REQ_CDB_OFF, 24);
        assert_eq!(REQ_IOV, 48);
        assert_eq!(IOVEC_SIZE, 16);
        assert_eq!(RSP_SCSI_STATUS, 8);
        assert_eq!(RSP_READ_LEN, 12);
        assert_eq!(RSP_SENSE, 16);
        assert_eq!(RSP_SENSE + TCMU_SENSE_BUFFERSIZE, CMD_ENTRY_SIZE);
    }

    #[test]
    fn tmr_entry_layout_matches_header() {
        assert_eq!(TMR_ENTRY_SIZE, 32);
        assert_eq!(TMR_TYPE, 8);
        assert_eq!(TMR_CMD_CNT, 12);
        assert_eq!(TMR_CMD_IDS, 32);
    }

    #[test]
    fn len_op_helpers() {
        let v = hdr_len_op(136, TCMU_OP_CMD);
        assert_eq!(hdr_get_len(v), 136);
        assert_eq!(hdr_get_op(v), TCMU_OP_CMD);
        assert_eq!(hdr_get_op(hdr_len_op(64, TCMU_OP_TMR)), TCMU_OP_TMR);
        // A length that is not 8-aligned loses its low bits to the opcode.
        assert_eq!(hdr_get_len(hdr_len_op(13, TCMU_OP_PAD)), 8);
    }

    #[test]
    fn genl_numbers_match_header_enums() {
        assert_eq!(TCMU_CMD_SET_FEATURES, 7);
        assert_eq!(TCMU_CMD_MAX, TCMU_CMD_SET_FEATURES);
        assert_eq!(TCMU_ATTR_SUPP_KERN_CMD_REPLY, 9);
        assert_eq!(TCMU_ATTR_MAX, TCMU_ATTR_SUPP_KERN_CMD_REPLY);
        assert_eq!(TCMU_ATTR_DEVICE_ID, 8);
    }
}
