//! The TCMU handler process for the VM tests (`tests/vm/`), packaged as an
//! ignored test so it needs nothing from `src/main.rs`: it runs the real
//! frontend (netlink, uio, ring, SCSI core, file backstore) until a stop
//! file appears. `cargo test` skips it; the VM scripts run
//! `tcmu_vm_handler-<hash> --ignored --exact tcmu_handler` in the guest with
//! `LUNMIRROR_TCMU_STOP=<file>` (and optionally `LUNMIRROR_TCMU_READY`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lunmirror::block::file::EngineKind;
use lunmirror::tcmu::{FileVolumeFactory, Frontend, HandlerConfig};

#[test]
#[ignore = "started inside the VM by tests/vm/*.sh"]
fn tcmu_handler() {
    let Some(stop) = std::env::var_os("LUNMIRROR_TCMU_STOP").map(PathBuf::from) else {
        eprintln!("LUNMIRROR_TCMU_STOP not set: nothing to do");
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .try_init();
    let engine = match std::env::var("LUNMIRROR_ENGINE").as_deref() {
        Ok("sync") => EngineKind::Sync,
        Ok("io_uring") => EngineKind::IoUring,
        _ => EngineKind::Auto,
    };
    let factory = Arc::new(FileVolumeFactory {
        default_engine: engine,
        ..Default::default()
    });
    let h = Frontend::start(HandlerConfig::default(), factory).expect("frontend start");
    eprintln!("tcmu handler: started, devices {:?}", h.devices());
    if let Some(ready) = std::env::var_os("LUNMIRROR_TCMU_READY") {
        std::fs::write(ready, b"ready\n").expect("ready file");
    }
    let mut last = Vec::new();
    while !stop.exists() {
        std::thread::sleep(Duration::from_millis(200));
        // Report state changes, not every command count.
        let now: Vec<_> = h
            .devices()
            .into_iter()
            .map(|mut d| {
                d.commands = 0;
                d
            })
            .collect();
        if now != last {
            eprintln!("tcmu handler: devices {now:?}");
            last = now;
        }
    }
    eprintln!("tcmu handler: stopping, devices {:?}", h.devices());
    h.shutdown();
    eprintln!("tcmu handler: stopped");
}
