//! Fuzz the control socket's request handling: any request line gets a
//! well-formed JSON-RPC reply (or none, for notifications) and never
//! panics.
//!
//! `cargo fuzz run control_rpc` (from the repository root).

#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use lunmirror::block::mem::MemDev;
use lunmirror::control::rpc::handle_line;
use lunmirror::mirror::MirroredVolume;
use lunmirror::registry::{Registry, RegistryConfig};

fn registry() -> &'static Arc<Registry> {
    static REG: OnceLock<Arc<Registry>> = OnceLock::new();
    REG.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("lunmirror-fuzz-{}", std::process::id()));
        // Never open real files as replicas: fuzzed TargetElement paths
        // would be attached and overwritten.
        let cfg = RegistryConfig {
            opener: Arc::new(|_: &std::path::Path| {
                Ok(Arc::new(MemDev::new(2 << 20)) as lunmirror::block::SharedDev)
            }),
            ..RegistryConfig::default()
        };
        let reg = Registry::open_with(&dir, cfg).expect("state dir");
        let vol = MirroredVolume::new("lun0", Arc::new(MemDev::new(1 << 20)));
        reg.add_volume("lun0", &dir.join("lun0.img"), vol, true)
            .expect("volume");
        reg
    })
}

fuzz_target!(|data: &[u8]| {
    if let Some(reply) = handle_line(registry(), data) {
        let v: serde_json::Value = serde_json::from_slice(&reply).expect("reply is JSON");
        assert!(v.is_object() || v.is_array());
    }
});
