//! A minimal scripted iSCSI initiator over the crate's own PDU codec, for
//! protocol tests real initiators cannot drive (MC/S, reinstatement,
//! digests, hostile PDUs, TMF timing).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use lunmirror::iscsi::pdu::{
    Bhs, DataIn, DataOut, FrameConfig, LoginRequest, Lun, Pdu, PduError, Prefix, ScsiCommand,
    TaskAttribute, BHS_LEN, RESERVED_TAG,
};
use lunmirror::iscsi::text::{encode_text, parse_text};

pub const INITIATOR: &str = "iqn.2026-11.io.lunmirror:initiator";

/// Outcome of a login attempt.
pub enum Login {
    Ok(Initiator),
    Refused { class: u8, detail: u8 },
}

pub struct Initiator {
    pub s: TcpStream,
    pub cfg: FrameConfig,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub itt: u32,
    pub tsih: u16,
    pub isid: [u8; 6],
    pub cid: u16,
    /// Keys the target answered with.
    pub keys: HashMap<String, String>,
    /// Largest data segment the target accepts.
    pub max_xmit: u32,
    pub first_burst: u32,
    pub max_burst: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub last_max_cmd_sn: u32,
    pub last_exp_cmd_sn: u32,
}

/// Result of a SCSI command.
#[derive(Debug, Default)]
pub struct Done {
    pub status: u8,
    pub response: u8,
    pub data: Vec<u8>,
    pub sense: Vec<u8>,
    pub overflow: bool,
    pub underflow: bool,
    pub residual: u32,
    /// (DataSN, offset, len, F, S) of every Data-In.
    pub data_ins: Vec<(u32, u32, u32, bool, bool)>,
    /// (R2TSN, offset, len) of every R2T.
    pub r2ts: Vec<(u32, u32, u32)>,
}

impl Done {
    /// Take one Data-In of this command (which must continue the data in
    /// order); returns whether it carried the status.
    pub fn absorb_data_in(&mut self, d: &DataIn, data: &[u8]) -> bool {
        assert_eq!(
            d.buffer_offset as usize,
            self.data.len(),
            "Data-In in order"
        );
        self.data_ins.push((
            d.data_sn,
            d.buffer_offset,
            data.len() as u32,
            d.fin,
            d.status_present,
        ));
        self.data.extend_from_slice(data);
        if d.status_present {
            self.status = d.status;
            self.overflow = d.overflow;
            self.underflow = d.underflow;
            self.residual = d.residual;
        }
        d.status_present
    }
}

pub fn default_keys(target: &str) -> Vec<(String, String)> {
    [
        ("InitiatorName", INITIATOR),
        ("TargetName", target),
        ("SessionType", "Normal"),
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("MaxRecvDataSegmentLength", "65536"),
        ("InitialR2T", "Yes"),
        ("ImmediateData", "Yes"),
        ("MaxConnections", "4"),
        ("ErrorRecoveryLevel", "0"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

/// Replace or add keys.
pub fn with_keys(mut base: Vec<(String, String)>, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    for (k, v) in extra {
        match base.iter_mut().find(|(bk, _)| bk == k) {
            Some(e) => e.1 = (*v).to_owned(),
            None => base.push(((*k).to_owned(), (*v).to_owned())),
        }
    }
    base
}

impl Initiator {
    /// Log in (operational stage straight to full feature phase).
    pub fn login(
        addr: SocketAddr,
        isid: [u8; 6],
        tsih: u16,
        cid: u16,
        keys: &[(String, String)],
    ) -> Login {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        let mut ini = Initiator {
            s,
            cfg: FrameConfig {
                header_digest: false,
                data_digest: false,
                max_data_segment_len: 1 << 24,
            },
            cmd_sn: 1000,
            exp_stat_sn: 0,
            itt: 0x100,
            tsih,
            isid,
            cid,
            keys: HashMap::new(),
            max_xmit: 8192,
            first_burst: 65536,
            max_burst: 262144,
            initial_r2t: true,
            immediate_data: true,
            last_max_cmd_sn: 0,
            last_exp_cmd_sn: 0,
        };
        let mut text = encode_text(keys);
        for _ in 0..8 {
            let req = Bhs::LoginRequest(LoginRequest {
                transit: true,
                cont: false,
                csg: 1,
                nsg: 3,
                version_max: 0,
                version_min: 0,
                isid,
                tsih,
                itt: ini.itt,
                cid,
                cmd_sn: ini.cmd_sn,
                exp_stat_sn: ini.exp_stat_sn,
            });
            ini.send_raw(&Pdu {
                header: req,
                data: std::mem::take(&mut text),
            });
            let p = ini.recv().expect("login response");
            let Bhs::LoginResponse(r) = p.header else {
                panic!("expected a login response, got {:?}", p.header);
            };
            if r.status_class != 0 {
                return Login::Refused {
                    class: r.status_class,
                    detail: r.status_detail,
                };
            }
            ini.exp_stat_sn = r.stat_sn.wrapping_add(1);
            ini.last_exp_cmd_sn = r.exp_cmd_sn;
            ini.last_max_cmd_sn = r.max_cmd_sn;
            for (k, v) in parse_text(&p.data).expect("login text") {
                ini.keys.insert(k, v);
            }
            if r.transit && r.nsg == 3 {
                ini.tsih = r.tsih;
                ini.apply_keys();
                return Login::Ok(ini);
            }
        }
        panic!("login did not finish");
    }

    pub fn login_ok(
        addr: SocketAddr,
        isid: [u8; 6],
        tsih: u16,
        cid: u16,
        keys: &[(String, String)],
    ) -> Initiator {
        match Self::login(addr, isid, tsih, cid, keys) {
            Login::Ok(mut i) => {
                // ITTs unique across the connections of one session.
                i.itt = 0x100 + (u32::from(cid) << 20);
                if keys
                    .iter()
                    .any(|(k, v)| k == "SessionType" && v == "Discovery")
                {
                    return i;
                }
                if tsih == 0 {
                    // A new nexus starts with a unit attention (power on /
                    // reset): consume it.
                    for _ in 0..4 {
                        if i.tur().status == 0 {
                            break;
                        }
                    }
                }
                i
            }
            Login::Refused { class, detail } => panic!("login refused: {class:#x}/{detail:#x}"),
        }
    }

    fn apply_keys(&mut self) {
        let k = &self.keys;
        let yes = |name: &str, dflt: bool| k.get(name).map_or(dflt, |v| v == "Yes");
        self.cfg.header_digest = k.get("HeaderDigest").is_some_and(|v| v == "CRC32C");
        self.cfg.data_digest = k.get("DataDigest").is_some_and(|v| v == "CRC32C");
        self.max_xmit = k
            .get("MaxRecvDataSegmentLength")
            .and_then(|v| v.parse().ok())
            .unwrap_or(8192);
        self.first_burst = k
            .get("FirstBurstLength")
            .and_then(|v| v.parse().ok())
            .unwrap_or(65536);
        self.max_burst = k
            .get("MaxBurstLength")
            .and_then(|v| v.parse().ok())
            .unwrap_or(262144);
        self.initial_r2t = yes("InitialR2T", true);
        self.immediate_data = yes("ImmediateData", true);
    }

    pub fn send_raw(&mut self, p: &Pdu) {
        let bytes = p.encode(&self.cfg);
        self.s.write_all(&bytes).expect("send");
    }

    pub fn send_bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.s.write_all(b)
    }

    /// Next PDU from the target (panics on timeout).
    pub fn recv(&mut self) -> Result<Pdu, String> {
        let mut bhs = [0u8; BHS_LEN];
        self.s.read_exact(&mut bhs).map_err(|e| e.to_string())?;
        let pre = Prefix::parse(&bhs);
        let rest = self.cfg.header_tail_len(&pre) + self.cfg.data_wire_len(pre.data_len);
        let mut buf = bhs.to_vec();
        buf.resize(BHS_LEN + rest, 0);
        self.s
            .read_exact(&mut buf[BHS_LEN..])
            .map_err(|e| e.to_string())?;
        let (p, _) = Pdu::decode(&buf, &self.cfg).map_err(|e: PduError| e.to_string())?;
        self.note_sn(&p.header);
        Ok(p)
    }

    /// Whether nothing arrives within `d`.
    pub fn silent_for(&mut self, d: Duration) -> bool {
        self.s.set_read_timeout(Some(d)).unwrap();
        let mut b = [0u8; 1];
        let r = self.s.peek(&mut b);
        self.s
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut)
    }

    /// Whether the target closed the connection (EOF or reset) within `d`.
    pub fn closed_within(&mut self, d: Duration) -> bool {
        self.s.set_read_timeout(Some(d)).unwrap();
        let mut b = [0u8; 4096];
        let deadline = std::time::Instant::now() + d;
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {
                    if std::time::Instant::now() > deadline {
                        return false;
                    }
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }

    fn note_sn(&mut self, h: &Bhs) {
        let (stat, exp, max, advances) = match h {
            Bhs::ScsiResponse(r) => (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn, true),
            Bhs::DataIn(d) => (d.stat_sn, d.exp_cmd_sn, d.max_cmd_sn, d.status_present),
            Bhs::NopIn(n) => (n.stat_sn, n.exp_cmd_sn, n.max_cmd_sn, n.itt != RESERVED_TAG),
            Bhs::TaskMgmtResponse(r) => (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn, true),
            Bhs::TextResponse(r) => (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn, true),
            Bhs::LogoutResponse(r) => (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn, true),
            Bhs::Reject(r) => (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn, true),
            Bhs::R2t(r) => (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn, false),
            _ => return,
        };
        if advances {
            self.exp_stat_sn = stat.wrapping_add(1);
        }
        self.last_exp_cmd_sn = exp;
        self.last_max_cmd_sn = max;
    }

    pub fn next_itt(&mut self) -> u32 {
        self.itt = self.itt.wrapping_add(1);
        self.itt
    }

    /// A SCSI Command header (consumes a CmdSN unless immediate).
    pub fn command(
        &mut self,
        cdb: &[u8],
        edtl: u32,
        read: bool,
        write: bool,
        fin: bool,
    ) -> ScsiCommand {
        let mut c = [0u8; 16];
        c[..cdb.len().min(16)].copy_from_slice(&cdb[..cdb.len().min(16)]);
        let itt = self.next_itt();
        let cmd = ScsiCommand {
            immediate: false,
            fin,
            read,
            write,
            attr: TaskAttribute::Simple,
            lun: Lun::from_flat(0),
            itt,
            expected_data_len: edtl,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb: c,
            ext_cdb: cdb.get(16..).map(|s| s.to_vec()).unwrap_or_default(),
            bidi_read_len: None,
        };
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        cmd
    }

    /// Run a command to completion: immediate data, unsolicited Data-Out
    /// and R2T-driven Data-Out as negotiated; collect Data-In.
    pub fn scsi(&mut self, cdb: &[u8], edtl: u32, read: bool, data_out: &[u8]) -> Done {
        let write = !data_out.is_empty();
        let imm = if write && self.immediate_data {
            (data_out.len() as u32)
                .min(self.first_burst)
                .min(self.max_xmit) as usize
        } else {
            0
        };
        let unsolicited_end = if write && !self.initial_r2t {
            (data_out.len() as u32).min(self.first_burst) as usize
        } else {
            imm
        };
        let fin = unsolicited_end <= imm;
        let cmd = self.command(cdb, edtl, read, write, fin);
        let itt = cmd.itt;
        self.send_raw(&Pdu {
            header: Bhs::ScsiCommand(cmd),
            data: data_out[..imm].to_vec(),
        });
        // unsolicited Data-Out
        let mut off = imm;
        let mut sn = 0;
        while off < unsolicited_end {
            let n = (unsolicited_end - off).min(self.max_xmit as usize);
            self.data_out(
                itt,
                RESERVED_TAG,
                sn,
                off as u32,
                off + n == unsolicited_end,
                &data_out[off..off + n],
            );
            off += n;
            sn += 1;
        }
        self.finish(itt, data_out)
    }

    pub fn data_out(
        &mut self,
        itt: u32,
        ttt: u32,
        data_sn: u32,
        offset: u32,
        fin: bool,
        data: &[u8],
    ) {
        let h = Bhs::DataOut(DataOut {
            fin,
            lun: Lun::from_flat(0),
            itt,
            ttt,
            exp_stat_sn: self.exp_stat_sn,
            data_sn,
            buffer_offset: offset,
        });
        self.send_raw(&Pdu {
            header: h,
            data: data.to_vec(),
        });
    }

    /// Collect PDUs of command `itt` until its status, answering R2Ts
    /// from `data_out`.
    pub fn finish(&mut self, itt: u32, data_out: &[u8]) -> Done {
        let mut done = Done::default();
        loop {
            let p = self.recv().expect("response");
            match p.header {
                Bhs::R2t(r) => {
                    assert_eq!(r.itt, itt);
                    done.r2ts.push((r.r2t_sn, r.buffer_offset, r.desired_len));
                    let mut off = r.buffer_offset as usize;
                    let end = off + r.desired_len as usize;
                    let mut sn = 0;
                    while off < end {
                        let n = (end - off).min(self.max_xmit as usize);
                        let chunk = data_out[off..off + n].to_vec();
                        self.data_out(itt, r.ttt, sn, off as u32, off + n == end, &chunk);
                        off += n;
                        sn += 1;
                    }
                }
                Bhs::DataIn(d) => {
                    assert_eq!(d.itt, itt);
                    if done.absorb_data_in(&d, &p.data) {
                        return done;
                    }
                }
                Bhs::ScsiResponse(r) => {
                    assert_eq!(r.itt, itt);
                    done.status = r.status;
                    done.response = r.response;
                    done.overflow = r.overflow;
                    done.underflow = r.underflow;
                    done.residual = r.residual;
                    if !p.data.is_empty() {
                        done.sense = lunmirror::iscsi::pdu::parse_sense_segment(&p.data)
                            .expect("sense")
                            .to_vec();
                    }
                    return done;
                }
                other => panic!("unexpected PDU while waiting for ITT {itt:#x}: {other:?}"),
            }
        }
    }

    pub fn tur(&mut self) -> Done {
        self.scsi(&[0, 0, 0, 0, 0, 0], 0, false, &[])
    }
}

pub fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let l = lba.to_be_bytes();
    let b = blocks.to_be_bytes();
    [0x28, 0, l[0], l[1], l[2], l[3], 0, b[0], b[1], 0]
}

pub fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let l = lba.to_be_bytes();
    let b = blocks.to_be_bytes();
    [0x2a, 0, l[0], l[1], l[2], l[3], 0, b[0], b[1], 0]
}
