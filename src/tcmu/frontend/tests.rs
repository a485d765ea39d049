use std::sync::Mutex;

use super::*;
use crate::block::mem::MemDev;
use crate::tcmu::ring::HeapMem;
use crate::tcmu::sim::FakeKernel;

const CAPS: u16 =
    TCMU_MAILBOX_FLAG_CAP_OOOC | TCMU_MAILBOX_FLAG_CAP_READ_LEN | TCMU_MAILBOX_FLAG_CAP_TMR;

fn info(size: u64) -> DeviceInfo {
    DeviceInfo {
        uio_index: 0,
        hba: 1,
        name: "disk0".into(),
        config: CfgString::parse("/scratch/disk0.img").unwrap(),
        size,
        block_size: 512,
        write_cache: false,
        serial: Some("6b1a4e2c-0000-4000-8000-000000000001".into()),
    }
}

fn setup(
    size: u64,
) -> (
    FakeKernel,
    Ring<Arc<HeapMem>>,
    LunMap,
    Arc<MemDev>,
    Arc<Nexus>,
) {
    let k = FakeKernel::new(1 << 16, 1 << 20, CAPS);
    let ring = Ring::new(k.mem()).unwrap();
    let mem = Arc::new(MemDev::new(size));
    let map = lun_map_for(&HandlerConfig::default(), &info(size), mem.clone());
    (k, ring, map, mem, device_nexus(1, "disk0"))
}

/// Consume the power-on unit attention a new nexus sees first.
fn clear_ua(k: &mut FakeKernel, ring: &mut Ring<Arc<HeapMem>>, map: &LunMap, nexus: &Arc<Nexus>) {
    k.queue_cmd(&[0x00, 0, 0, 0, 0, 0], &[], 0);
    service_ring(ring, map, nexus).unwrap();
    let r = k.reap().unwrap();
    assert_eq!(r[0].sense[2] & 0x0f, 0x06, "power-on UNIT ATTENTION");
}

fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![0x28, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&blocks.to_be_bytes());
    c.push(0);
    c
}

fn write10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = read10(lba, blocks);
    c[0] = 0x2a;
    c
}

#[test]
fn inquiry_and_capacity_through_the_ring() {
    let (mut k, mut ring, map, _mem, nexus) = setup(1 << 20);
    clear_ua(&mut k, &mut ring, &map, &nexus);
    let inq = k.queue_cmd(&[0x12, 0, 0, 0, 96, 0], &[], 96);
    let cap = k.queue_cmd(
        &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
        &[],
        32,
    );
    let pass = service_ring(&mut ring, &map, &nexus).unwrap();
    assert_eq!(pass.commands, 2);
    let r = k.reap().unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].cmd_id, inq);
    assert_eq!(r[0].status, 0);
    assert_eq!(&r[0].data_in[8..15], b"LUNMIRR");
    assert_eq!(r[1].cmd_id, cap);
    assert_eq!(r[1].status, 0);
    let last_lba = u64::from_be_bytes(r[1].data_in[0..8].try_into().unwrap());
    assert_eq!(last_lba, (1 << 20) / 512 - 1);
    assert_eq!(
        u32::from_be_bytes(r[1].data_in[8..12].try_into().unwrap()),
        512
    );
}

#[test]
fn writes_reach_the_block_device_and_read_back() {
    let (mut k, mut ring, map, mem, nexus) = setup(1 << 20);
    clear_ua(&mut k, &mut ring, &map, &nexus);
    let data: Vec<u8> = (0..8 * 512).map(|i| (i * 7 % 251) as u8).collect();
    k.queue_cmd(&write10(16, 8), &data, 0);
    service_ring(&mut ring, &map, &nexus).unwrap();
    let r = k.reap().unwrap();
    assert_eq!((r[0].status, r[0].sense.len()), (0, 0), "{:?}", r[0].sense);
    assert_eq!(&mem.snapshot()[16 * 512..24 * 512], &data[..]);
    k.queue_cmd(&read10(16, 8), &[], 8 * 512);
    service_ring(&mut ring, &map, &nexus).unwrap();
    let r = k.reap().unwrap();
    assert_eq!(r[0].status, 0);
    assert_eq!(r[0].data_in, data);
}

#[test]
fn out_of_range_read_gets_sense() {
    let (mut k, mut ring, map, _mem, nexus) = setup(1 << 20);
    clear_ua(&mut k, &mut ring, &map, &nexus);
    k.queue_cmd(&read10(1 << 20, 1), &[], 512);
    service_ring(&mut ring, &map, &nexus).unwrap();
    let r = k.reap().unwrap();
    assert_eq!(r[0].status, 0x02);
    assert_eq!(r[0].sense[2] & 0x0f, 0x05, "ILLEGAL REQUEST");
    assert_eq!(r[0].sense[12], 0x21, "LBA OUT OF RANGE");
}

#[test]
fn hostile_entry_is_failed_and_service_continues() {
    let (mut k, mut ring, map, _mem, nexus) = setup(1 << 20);
    let mut e = vec![0u8; 128];
    e[0..4].copy_from_slice(&hdr_len_op(128, TCMU_OP_CMD).to_ne_bytes());
    e[HDR_CMD_ID..HDR_CMD_ID + 2].copy_from_slice(&500u16.to_ne_bytes());
    e[REQ_IOV_CNT..REQ_IOV_CNT + 4].copy_from_slice(&1u32.to_ne_bytes());
    // iovec pointing at the mailbox.
    e[REQ_IOV + 8..REQ_IOV + 16].copy_from_slice(&64u64.to_ne_bytes());
    let cdb_abs = u64::from(k.cmdr_off() + k.head()) + 112;
    e[REQ_CDB_OFF..REQ_CDB_OFF + 8].copy_from_slice(&cdb_abs.to_ne_bytes());
    e[112..118].copy_from_slice(&[0x12, 0, 0, 0, 36, 0]);
    k.queue_raw(&e, 128, Some((500, vec![])));
    let ok = k.queue_cmd(&[0x00, 0, 0, 0, 0, 0], &[], 0);
    let pass = service_ring(&mut ring, &map, &nexus).unwrap();
    assert_eq!(pass.failed_entries, 1);
    assert_eq!(pass.commands, 1);
    let r = k.reap().unwrap();
    assert_eq!(r[0].cmd_id, 500);
    assert_eq!(r[0].status, 0x02);
    assert_eq!(r[1].cmd_id, ok);
}

#[derive(Default)]
struct Recorder {
    tmfs: Mutex<Vec<TaskMgmt>>,
    cdbs: Mutex<Vec<(Vec<u8>, usize, u32)>>,
}

impl ScsiTarget for Recorder {
    fn execute(&self, req: &ScsiRequest<'_>) -> ScsiResponse {
        self.cdbs
            .lock()
            .unwrap()
            .push((req.cdb.to_vec(), req.data_out.len(), req.expected_in_len));
        ScsiResponse::good(vec![0xab; req.expected_in_len as usize])
    }
    fn task_management(&self, tmf: TaskMgmt, _nexus: &Nexus) {
        self.tmfs.lock().unwrap().push(tmf);
    }
}

#[test]
fn directions_and_lengths_reach_the_core() {
    let k0 = FakeKernel::new(1 << 16, 1 << 20, CAPS);
    let mut k = k0;
    let mut ring = Ring::new(k.mem()).unwrap();
    let rec = Recorder::default();
    let nexus = device_nexus(1, "d");
    k.queue_cmd(&write10(0, 1), &[7u8; 512], 0);
    k.queue_cmd(&read10(0, 2), &[], 1024);
    k.queue_cmd(&[0x00, 0, 0, 0, 0, 0], &[], 0);
    // A bidirectional command: data-out and data-in.
    k.queue_cmd(&[0x53, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[1u8; 512], 512);
    service_ring(&mut ring, &rec, &nexus).unwrap();
    let seen = rec.cdbs.lock().unwrap().clone();
    assert_eq!(seen[0].1, 512);
    assert_eq!(seen[0].2, 0);
    assert_eq!(seen[1].1, 0);
    assert_eq!(seen[1].2, 1024);
    assert_eq!((seen[2].1, seen[2].2), (0, 0));
    assert_eq!((seen[3].1, seen[3].2), (512, 512));
    let r = k.reap().unwrap();
    assert_eq!(r[1].data_in, vec![0xab; 1024]);
    assert_eq!(r[3].data_in, vec![0xab; 512]);
}

#[test]
fn tmr_notifications_become_task_management() {
    let mut k = FakeKernel::new(1 << 16, 1 << 20, CAPS);
    let mut ring = Ring::new(k.mem()).unwrap();
    let rec = Recorder::default();
    let nexus = device_nexus(1, "d");
    k.queue_tmr(TCMU_TMR_LUN_RESET, &[]);
    k.queue_tmr(TCMU_TMR_ABORT_TASK, &[3]);
    k.queue_tmr(TCMU_TMR_TARGET_WARM_RESET, &[]);
    k.queue_tmr(TCMU_TMR_CLEAR_TASK_SET, &[]);
    let pass = service_ring(&mut ring, &rec, &nexus).unwrap();
    assert_eq!(pass.tmrs, 4);
    assert_eq!(
        *rec.tmfs.lock().unwrap(),
        vec![
            TaskMgmt::LogicalUnitReset { lun: 0 },
            TaskMgmt::TargetWarmReset,
            TaskMgmt::ClearTaskSet { lun: 0 }
        ]
    );
    assert_eq!(k.tail(), k.head());
}

#[test]
fn lun_reset_raises_unit_attention_in_the_core() {
    let (mut k, mut ring, map, _mem, nexus) = setup(1 << 20);
    clear_ua(&mut k, &mut ring, &map, &nexus);
    k.queue_cmd(&[0x00, 0, 0, 0, 0, 0], &[], 0);
    service_ring(&mut ring, &map, &nexus).unwrap();
    assert_eq!(k.reap().unwrap()[0].status, 0);
    k.queue_tmr(TCMU_TMR_LUN_RESET, &[]);
    k.queue_cmd(&[0x00, 0, 0, 0, 0, 0], &[], 0);
    service_ring(&mut ring, &map, &nexus).unwrap();
    let r = k.reap().unwrap();
    assert_eq!(r[0].status, 0x02);
    assert_eq!(r[0].sense[2] & 0x0f, 0x06, "UNIT ATTENTION");
}

#[test]
fn drain_busy_answers_without_executing() {
    let mut k = FakeKernel::new(1 << 16, 1 << 20, CAPS);
    k.queue_cmd(&write10(0, 1), &[9u8; 512], 0);
    k.queue_cmd(&read10(0, 1), &[], 512);
    let mut ring = Ring::new(k.mem()).unwrap();
    assert_eq!(drain_busy(&mut ring).unwrap(), 2);
    let r = k.reap().unwrap();
    assert!(r.iter().all(|r| r.status == ScsiStatus::Busy as u8));
    assert!(ring.take_kick());
}

#[test]
fn not_ready_target() {
    let nr = NotReady {
        vendor: "LUNMIRR".into(),
        product: "TCMU mirror".into(),
    };
    let nexus = device_nexus(1, "d");
    let req = |cdb: &'static [u8]| ScsiRequest {
        cdb,
        lun: 0,
        nexus: &nexus,
        data_out: &[],
        expected_in_len: 96,
        task_attr: TaskAttr::Simple,
        data_in_by_ref: false,
    };
    let inq = nr.execute(&req(&[0x12, 0, 0, 0, 96, 0]));
    assert_eq!(inq.status, ScsiStatus::Good);
    assert_eq!(&inq.data_in[8..15], b"LUNMIRR");
    let tur = nr.execute(&req(&[0x00, 0, 0, 0, 0, 0]));
    assert_eq!(tur.status, ScsiStatus::CheckCondition);
    assert_eq!(
        (tur.sense[2], tur.sense[12], tur.sense[13]),
        (0x02, 0x04, 0x03)
    );
    // VPD pages are not offered by the stand-in.
    let vpd = nr.execute(&req(&[0x12, 1, 0x80, 0, 96, 0]));
    assert_eq!(vpd.status, ScsiStatus::CheckCondition);
}

#[test]
fn naa_is_stable_and_type_6() {
    let a = naa_from_serial("abc");
    assert_eq!(a, naa_from_serial("abc"));
    assert_ne!(a, naa_from_serial("abd"));
    assert_eq!(a[0] >> 4, 6);
    // OUI 00-14-05 in bits 4..28.
    let oui = (u32::from(a[0] & 0x0f) << 20)
        | (u32::from(a[1]) << 12)
        | (u32::from(a[2]) << 4)
        | u32::from(a[3] >> 4);
    assert_eq!(oui, 0x001405);
}

#[test]
fn device_info_reads_fake_configfs() {
    let t = tempfile::tempdir().unwrap();
    let cfg = HandlerConfig {
        kernel: KernelPaths {
            core: t.path().join("core"),
            module_params: t.path().join("params"),
        },
        ..HandlerConfig::default()
    };
    let d = t.path().join("core/user_2/lun0");
    std::fs::create_dir_all(d.join("attrib")).unwrap();
    std::fs::create_dir_all(d.join("wwn")).unwrap();
    std::fs::write(
        d.join("info"),
        "Status: ACTIVATED Config: mirror//a.img Size: 1048576 MaxDataAreaMB: 8",
    )
    .unwrap();
    std::fs::write(d.join("attrib/hw_block_size"), "4096").unwrap();
    std::fs::write(
        d.join("wwn/vpd_unit_serial"),
        "T10 VPD Unit Serial Number: s1\n",
    )
    .unwrap();
    let dev = |cfgstring: &str| UioDevice {
        index: 4,
        name: crate::tcmu::uio::UioName {
            hba: 2,
            dev: "lun0".into(),
            subtype: "mirror".into(),
            cfgstring: cfgstring.into(),
        },
        map_size: 4096,
        version: "2".into(),
    };
    let i = device_info(&cfg, &dev("/a.img")).unwrap();
    assert_eq!(
        (i.size, i.block_size, i.serial.as_deref()),
        (1 << 20, 4096, Some("s1"))
    );
    assert_eq!(i.uio_index, 4);
    assert!(device_info(&cfg, &dev("/a.img;size=1M")).is_ok());
    assert_eq!(
        device_info(&cfg, &dev("/a.img;size=2M")),
        Err(DeviceFault::SizeMismatch {
            want: 2 << 20,
            have: 1 << 20
        })
    );
    assert!(matches!(
        device_info(&cfg, &dev("a.img")),
        Err(DeviceFault::Config(_))
    ));
}

#[test]
fn default_reconfigure_policy() {
    struct F;
    impl VolumeFactory for F {
        fn open(&self, _dev: &DeviceInfo) -> Result<SharedDev, String> {
            Err("unused".into())
        }
    }
    let i = info(1 << 20);
    assert!(F.reconfigure(&i, &Reconfig::WriteCache(true)).is_ok());
    assert!(F.reconfigure(&i, &Reconfig::Size(2 << 20)).is_err());
    assert!(F
        .reconfigure(&i, &Reconfig::Config("mirror//b".into()))
        .is_err());
}

/// Sleeps according to the CDB's LBA byte so later commands can finish first;
/// answers with the LBA byte repeated.
struct Slow;

impl ScsiTarget for Slow {
    fn execute(&self, req: &ScsiRequest<'_>) -> ScsiResponse {
        let b = req.cdb.get(5).copied().unwrap_or(0);
        std::thread::sleep(std::time::Duration::from_millis(u64::from(b % 4) * 15));
        ScsiResponse::good(vec![b; req.expected_in_len as usize])
    }
    fn task_management(&self, _tmf: TaskMgmt, _nexus: &Nexus) {}
}

fn pump_until_idle(
    pool: &mut Pool,
    k: &mut FakeKernel,
    ring: &mut Ring<Arc<HeapMem>>,
    target: &dyn ScsiTarget,
    nexus: &Arc<Nexus>,
    want: usize,
) -> Vec<crate::tcmu::sim::Reaped> {
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while got.len() < want {
        assert!(std::time::Instant::now() < deadline, "pool stalled");
        pool.pump(ring, target, nexus, false).unwrap();
        got.extend(k.reap().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    got
}

#[test]
fn pool_completes_out_of_order_with_right_data() {
    let mut k = FakeKernel::new(1 << 16, 1 << 20, CAPS);
    let mut ring = Ring::new(k.mem()).unwrap();
    let target: Arc<dyn ScsiTarget> = Arc::new(Slow);
    let nexus = device_nexus(1, "d");
    let mut pool = Pool::new(4, 8, target.clone(), nexus.clone(), "d").unwrap();
    let mut expect = std::collections::HashMap::new();
    for i in 0..24u8 {
        let id = k.queue_cmd(&read10(u32::from(i), 1), &[], 512);
        expect.insert(id, i);
    }
    let got = pump_until_idle(&mut pool, &mut k, &mut ring, &*target, &nexus, 24);
    assert_eq!(got.len(), 24);
    let order: Vec<u16> = got.iter().map(|r| r.cmd_id).collect();
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_ne!(
        order, sorted,
        "workers of different speed finish out of order"
    );
    for r in got {
        assert_eq!(r.status, 0);
        assert_eq!(r.data_in, vec![expect[&r.cmd_id]; 512]);
    }
    assert_eq!(pool.inflight(), 0);
    assert_eq!(k.tail(), k.head());
}

#[test]
fn pool_respects_max_inflight_and_writes_reach_the_core() {
    let mut k = FakeKernel::new(1 << 16, 1 << 20, CAPS);
    let mut ring = Ring::new(k.mem()).unwrap();
    let rec = Arc::new(Recorder::default());
    let target: Arc<dyn ScsiTarget> = rec.clone();
    let nexus = device_nexus(1, "d");
    let mut pool = Pool::new(2, 3, target.clone(), nexus.clone(), "d").unwrap();
    for i in 0..10u8 {
        k.queue_cmd(&write10(u32::from(i), 1), &[i; 512], 0);
    }
    pool.pump(&mut ring, &*target, &nexus, false).unwrap();
    assert!(pool.inflight() <= 3);
    let got = pump_until_idle(&mut pool, &mut k, &mut ring, &*target, &nexus, 10);
    assert!(got.iter().all(|r| r.status == 0));
    let seen = rec.cdbs.lock().unwrap();
    assert_eq!(seen.len(), 10);
    assert!(seen.iter().all(|(_, out, inn)| *out == 512 && *inn == 0));
}

#[test]
fn pool_drops_results_from_before_a_reset() {
    let mut k = FakeKernel::new(1 << 16, 1 << 20, CAPS);
    let mut ring = Ring::new(k.mem()).unwrap();
    let target: Arc<dyn ScsiTarget> = Arc::new(Slow);
    let nexus = device_nexus(1, "d");
    let mut pool = Pool::new(2, 8, target.clone(), nexus.clone(), "d").unwrap();
    for i in 0..4u8 {
        k.queue_cmd(&read10(u32::from(i) + 1, 1), &[], 512);
    }
    pool.pump(&mut ring, &*target, &nexus, false).unwrap();
    assert!(pool.inflight() > 0);
    k.reset_ring();
    ring.reset().unwrap();
    let id = k.queue_cmd(&read10(0, 1), &[], 512);
    let got = pump_until_idle(&mut pool, &mut k, &mut ring, &*target, &nexus, 1);
    assert_eq!(got[0].cmd_id, id);
    pool.forget_inflight_results(&mut ring);
    assert_eq!(pool.inflight(), 0);
    assert!(
        k.reap().unwrap().is_empty(),
        "stale results never reach the kernel"
    );
}

#[test]
fn reconfig_with_current_values_is_accepted() {
    struct Refuse;
    impl VolumeFactory for Refuse {
        fn open(&self, _dev: &DeviceInfo) -> Result<SharedDev, String> {
            Err("unused".into())
        }
    }
    let devices: Devices = Arc::new(Mutex::new(HashMap::new()));
    let mut mgr = Manager {
        cfg: HandlerConfig::default(),
        factory: Arc::new(Refuse),
        devices: devices.clone(),
        stop: Arc::new(AtomicBool::new(false)),
        nl: None,
    };
    let i = info(1 << 20);
    devices.lock().unwrap().insert(
        7,
        DeviceSlot {
            dev: UioDevice {
                index: 7,
                name: crate::tcmu::uio::UioName::parse(
                    "tcm-user/1/disk0/mirror//scratch/disk0.img",
                )
                .unwrap(),
                map_size: 0,
                version: "2".into(),
            },
            info: Some(i.clone()),
            fault: None,
            stop: Arc::new(AtomicBool::new(false)),
            alive: Arc::new(AtomicBool::new(true)),
            stats: Arc::new(DeviceStats::default()),
            thread: None,
        },
    );
    let same_cfg = Reconfig::Config("mirror//scratch/disk0.img".into());
    assert_eq!(mgr.reconfig_status(7, &same_cfg), 0);
    assert_eq!(mgr.reconfig_status(7, &Reconfig::Size(1 << 20)), 0);
    assert_eq!(
        mgr.reconfig_status(7, &Reconfig::Size(2 << 20)),
        -libc::EOPNOTSUPP
    );
    assert_eq!(
        mgr.reconfig_status(7, &Reconfig::Config("mirror//other.img".into())),
        -libc::EOPNOTSUPP
    );
    // The default policy accepts write-cache changes and records them.
    assert_eq!(mgr.reconfig_status(7, &Reconfig::WriteCache(true)), 0);
    assert!(
        devices.lock().unwrap()[&7]
            .info
            .as_ref()
            .unwrap()
            .write_cache
    );
    assert_eq!(mgr.reconfig_status(99, &Reconfig::Size(1)), -libc::ENODEV);
}

#[test]
fn buffer_direction_follows_the_core_table() {
    assert_eq!(buffer_direction(&write10(0, 1), 512), Direction::Out);
    assert_eq!(buffer_direction(&read10(0, 1), 512), Direction::In);
    assert_eq!(buffer_direction(&[0x00, 0, 0, 0, 0, 0], 512), Direction::In);
    // MODE SELECT(10) with a parameter list, UNMAP: data-out.
    assert_eq!(
        buffer_direction(&[0x55, 0x10, 0, 0, 0, 0, 0, 0, 24, 0], 512),
        Direction::Out
    );
    assert_eq!(
        buffer_direction(&[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], 512),
        Direction::Out
    );
    // COMPARE AND WRITE of 0 blocks sent with data: still data-out.
    assert_eq!(
        buffer_direction(&[0x89, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 512),
        Direction::Out
    );
    // An opcode the core does not know falls back to the frontend's table.
    assert_eq!(
        buffer_direction(&[0x3b, 0x02, 0, 0, 0, 0, 0, 0, 8, 0], 512),
        direction(&[0x3b])
    );
}
