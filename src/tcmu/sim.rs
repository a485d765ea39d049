//! A userspace model of the kernel's side of the TCMU ring, for unit and
//! integration tests and benchmarks: it lays out the mailbox, queues CMD,
//! PAD and TMR entries the way `target_core_user.c` does (entries never
//! wrap, a PAD fills the ring's end, CDB after the iovecs, data in
//! page-sized iovecs), lets tests write arbitrary (hostile) bytes, and reaps
//! completions the way the kernel does (walking from its last cleaned
//! position to `cmd_tail`, looking commands up by the entry's `cmd_id`).
//!
//! It panics on misuse by the test (ring full, data area exhausted); it
//! reports protocol violations by the handler as `Err`.

use std::collections::HashMap;
use std::sync::Arc;

use super::ring::{HeapMem, Region, SharedMem};
use super::sys::*;

const PAGE: u64 = 4096;

/// One completion as the kernel would see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reaped {
    pub cmd_id: u16,
    pub status: u8,
    pub uflags: u8,
    pub read_len: u32,
    /// The 96-byte sense buffer, trimmed to its fixed-format length when it
    /// holds fixed-format sense, else empty for GOOD.
    pub sense: Vec<u8>,
    /// Data-in as the kernel would copy it to the initiator (honouring
    /// `TCMU_UFLAG_READ_LEN`).
    pub data_in: Vec<u8>,
}

struct SimCmd {
    in_segs: Vec<(u64, u64)>,
}

/// The kernel's half of one device's ring.
pub struct FakeKernel {
    mem: Arc<HeapMem>,
    cmdr_off: u32,
    cmdr_size: u32,
    data_off: u64,
    data_len: u64,
    head: u32,
    last_cleaned: u32,
    next_id: u16,
    cmds: HashMap<u16, SimCmd>,
    data_next: u64,
}

/// A protocol violation the fake kernel detected while reaping.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    #[error("cmd_id {0} not found, ring is broken")]
    UnknownCmdId(u16),
    #[error("cmd_tail {0} is not an entry boundary the kernel wrote")]
    BadTail(u32),
}

impl FakeKernel {
    /// A ring of `cmdr_size` bytes (multiple of 8) after a 128-byte mailbox,
    /// followed by a data area of `data_len` bytes; mailbox `flags` as given.
    pub fn new(cmdr_size: u32, data_len: u64, flags: u16) -> Self {
        assert!(cmdr_size % 8 == 0 && cmdr_size >= 256);
        let cmdr_off = MAILBOX_SIZE as u32;
        let data_off = u64::from(cmdr_off) + u64::from(cmdr_size);
        let mem = Arc::new(HeapMem::new((data_off + data_len) as usize));
        let k = FakeKernel {
            mem,
            cmdr_off,
            cmdr_size,
            data_off,
            data_len,
            head: 0,
            last_cleaned: 0,
            next_id: 1,
            cmds: HashMap::new(),
            data_next: 0,
        };
        let r = k.region();
        r.write(MB_VERSION as u64, &TCMU_MAILBOX_VERSION.to_ne_bytes())
            .expect("mailbox");
        r.write(MB_FLAGS as u64, &flags.to_ne_bytes())
            .expect("mailbox");
        r.write(MB_CMDR_OFF as u64, &cmdr_off.to_ne_bytes())
            .expect("mailbox");
        r.write(MB_CMDR_SIZE as u64, &cmdr_size.to_ne_bytes())
            .expect("mailbox");
        k
    }

    /// The shared memory, to build a `Ring` on.
    pub fn mem(&self) -> Arc<HeapMem> {
        self.mem.clone()
    }

    pub fn region(&self) -> Region<'_> {
        Region::new(&*self.mem as &dyn SharedMem)
    }

    pub fn cmdr_off(&self) -> u32 {
        self.cmdr_off
    }
    pub fn cmdr_size(&self) -> u32 {
        self.cmdr_size
    }
    pub fn data_off(&self) -> u64 {
        self.data_off
    }
    pub fn head(&self) -> u32 {
        self.head
    }
    pub fn tail(&self) -> u32 {
        self.region()
            .load_acquire(MB_CMD_TAIL as u64)
            .expect("mailbox")
    }
    /// Commands queued and not reaped.
    pub fn in_flight(&self) -> usize {
        self.cmds.len()
    }

    fn publish_head(&mut self, head: u32) {
        self.head = head;
        self.region()
            .store_release(MB_CMD_HEAD as u64, head)
            .expect("mailbox");
    }

    /// Store any value as `cmd_head` (hostile tests).
    pub fn set_head_raw(&mut self, head: u32) {
        self.publish_head(head);
    }

    fn used(&self) -> u32 {
        (self.head + self.cmdr_size - self.last_cleaned) % self.cmdr_size
    }

    /// Make room for an entry of `len` bytes at head, writing a PAD to the
    /// ring end if it would not fit there (the kernel never wraps entries).
    fn reserve(&mut self, len: u32) -> u32 {
        let to_end = self.cmdr_size - self.head;
        let pad = if to_end < len { to_end } else { 0 };
        assert!(
            self.used() + pad + len < self.cmdr_size,
            "fake kernel: ring full (reap first)"
        );
        if pad > 0 {
            let abs = u64::from(self.cmdr_off + self.head);
            self.region()
                .write(abs, &hdr_len_op(pad, TCMU_OP_PAD).to_ne_bytes())
                .expect("pad");
            self.publish_head(0);
        }
        self.head
    }

    fn alloc_data(&mut self, len: u64) -> Vec<(u64, u64)> {
        let need = len.div_ceil(PAGE) * PAGE;
        if self.data_next + need > self.data_len {
            assert!(self.cmds.is_empty(), "fake kernel: data area exhausted");
            self.data_next = 0;
        }
        assert!(need <= self.data_len, "fake kernel: data area too small");
        let mut segs = Vec::new();
        let mut left = len;
        while left > 0 {
            let n = left.min(PAGE);
            segs.push((self.data_off + self.data_next, n));
            self.data_next += PAGE;
            left -= n;
        }
        segs
    }

    fn new_id(&mut self) -> u16 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.cmds.contains_key(&id) {
                return id;
            }
        }
    }

    /// Queue a command with `data_out` (copied into the data area) or room
    /// for `data_in_len` bytes of data-in (one of them should be empty, as
    /// for a non-bidirectional command). Returns its `cmd_id`.
    pub fn queue_cmd(&mut self, cdb: &[u8], data_out: &[u8], data_in_len: usize) -> u16 {
        let out = self.alloc_data(data_out.len() as u64);
        let inn = self.alloc_data(data_in_len as u64);
        let mut off = 0usize;
        for &(base, l) in &out {
            let chunk = &data_out[off..off + l as usize];
            self.region().write(base, chunk).expect("data");
            off += l as usize;
        }
        let (iov, bidi) = if data_out.is_empty() {
            (inn.clone(), Vec::new())
        } else if data_in_len == 0 {
            (out, Vec::new())
        } else {
            (out, inn.clone())
        };
        let id = self.new_id();
        self.write_cmd_entry(id, cdb, &iov, &bidi);
        self.cmds.insert(id, SimCmd { in_segs: inn });
        id
    }

    fn write_cmd_entry(&mut self, id: u16, cdb: &[u8], iov: &[(u64, u64)], bidi: &[(u64, u64)]) {
        let n = iov.len() + bidi.len();
        let base = (REQ_IOV + IOVEC_SIZE * n).max(CMD_ENTRY_SIZE);
        let len = (base + cdb.len()).div_ceil(8) as u32 * 8;
        let at = self.reserve(len);
        let abs = u64::from(self.cmdr_off + at);
        let mut e = vec![0u8; len as usize];
        e[HDR_LEN_OP..HDR_LEN_OP + 4].copy_from_slice(&hdr_len_op(len, TCMU_OP_CMD).to_ne_bytes());
        e[HDR_CMD_ID..HDR_CMD_ID + 2].copy_from_slice(&id.to_ne_bytes());
        e[REQ_IOV_CNT..REQ_IOV_CNT + 4].copy_from_slice(&(iov.len() as u32).to_ne_bytes());
        e[REQ_IOV_BIDI_CNT..REQ_IOV_BIDI_CNT + 4]
            .copy_from_slice(&(bidi.len() as u32).to_ne_bytes());
        e[REQ_CDB_OFF..REQ_CDB_OFF + 8].copy_from_slice(&(abs + base as u64).to_ne_bytes());
        for (i, &(b, l)) in iov.iter().chain(bidi).enumerate() {
            let o = REQ_IOV + IOVEC_SIZE * i;
            e[o..o + 8].copy_from_slice(&b.to_ne_bytes());
            e[o + 8..o + 16].copy_from_slice(&l.to_ne_bytes());
        }
        e[base..base + cdb.len()].copy_from_slice(cdb);
        self.region().write(abs, &e).expect("entry");
        self.publish_head((at + len) % self.cmdr_size);
    }

    /// Queue a TMR notification naming `cmd_ids`.
    pub fn queue_tmr(&mut self, tmr_type: u8, cmd_ids: &[u16]) {
        let len = (TMR_CMD_IDS + 2 * cmd_ids.len()).div_ceil(8) as u32 * 8;
        let at = self.reserve(len);
        let mut e = vec![0u8; len as usize];
        e[0..4].copy_from_slice(&hdr_len_op(len, TCMU_OP_TMR).to_ne_bytes());
        e[TMR_TYPE] = tmr_type;
        e[TMR_CMD_CNT..TMR_CMD_CNT + 4].copy_from_slice(&(cmd_ids.len() as u32).to_ne_bytes());
        for (i, id) in cmd_ids.iter().enumerate() {
            let o = TMR_CMD_IDS + 2 * i;
            e[o..o + 2].copy_from_slice(&id.to_ne_bytes());
        }
        self.region()
            .write(u64::from(self.cmdr_off + at), &e)
            .expect("entry");
        self.publish_head((at + len) % self.cmdr_size);
    }

    /// Write `bytes` at head as they are and advance head by `advance`
    /// (hostile tests; the caller forges `len_op` etc.). If `cmd_id` is
    /// given, the kernel will expect a completion for it, with data-in read
    /// from `in_segs`.
    pub fn queue_raw(&mut self, bytes: &[u8], advance: u32, cmd: Option<(u16, Vec<(u64, u64)>)>) {
        let abs = u64::from(self.cmdr_off + self.head);
        self.region().write(abs, bytes).expect("raw entry");
        if let Some((id, in_segs)) = cmd {
            self.cmds.insert(id, SimCmd { in_segs });
        }
        let h = (self.head + advance) % self.cmdr_size;
        self.publish_head(h);
    }

    /// Allocate data-area pages (for hand-built entries).
    pub fn alloc(&mut self, len: u64) -> Vec<(u64, u64)> {
        self.alloc_data(len)
    }

    /// Collect completions up to `cmd_tail`, as `tcmu_handle_completions`.
    pub fn reap(&mut self) -> Result<Vec<Reaped>, SimError> {
        let tail = self.tail();
        let mut out = Vec::new();
        let r = Region::new(&*self.mem as &dyn SharedMem);
        while self.last_cleaned != tail {
            let abs = u64::from(self.cmdr_off + self.last_cleaned);
            let len_op = r.u32_at(abs).map_err(|_| SimError::BadTail(tail))?;
            let len = hdr_get_len(len_op);
            if len == 0 || self.used() == 0 {
                return Err(SimError::BadTail(tail));
            }
            if hdr_get_op(len_op) == TCMU_OP_CMD {
                let id = r.u16_at(abs + HDR_CMD_ID as u64).unwrap_or(0);
                let cmd = self.cmds.remove(&id).ok_or(SimError::UnknownCmdId(id))?;
                let uflags = r.u8_at(abs + HDR_UFLAGS as u64).unwrap_or(0);
                let status = r.u8_at(abs + RSP_SCSI_STATUS as u64).unwrap_or(0);
                let read_len = r.u32_at(abs + RSP_READ_LEN as u64).unwrap_or(0);
                let mut sense = vec![0u8; TCMU_SENSE_BUFFERSIZE];
                r.read(abs + RSP_SENSE as u64, &mut sense).unwrap_or(());
                let sense_len = if sense[0] & 0x7e == 0x70 {
                    (8 + usize::from(sense[7])).min(sense.len())
                } else {
                    0
                };
                sense.truncate(sense_len);
                let mut data_in = Vec::new();
                for (b, l) in cmd.in_segs {
                    let mut buf = vec![0u8; l as usize];
                    r.read(b, &mut buf).unwrap_or(());
                    data_in.extend_from_slice(&buf);
                }
                if uflags & TCMU_UFLAG_READ_LEN != 0 {
                    data_in.truncate(read_len as usize);
                }
                out.push(Reaped {
                    cmd_id: id,
                    status,
                    uflags,
                    read_len,
                    sense,
                    data_in,
                });
            }
            self.last_cleaned = (self.last_cleaned + len) % self.cmdr_size;
        }
        Ok(out)
    }

    /// What configfs `action/reset_ring` does: forget every command, put
    /// head and tail at 0.
    pub fn reset_ring(&mut self) {
        self.cmds.clear();
        self.last_cleaned = 0;
        self.data_next = 0;
        self.region()
            .store_release(MB_CMD_TAIL as u64, 0)
            .expect("mailbox");
        self.publish_head(0);
    }
}
