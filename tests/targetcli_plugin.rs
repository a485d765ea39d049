//! Runs the targetcli plugin's Python test suite (cfgstring vectors shared
//! with the Rust parser, the org.kernel.TCMUService1 D-Bus service on a
//! private bus, the replication CLI against a fake control socket) as part
//! of the one test command. It needs Debian's python3 with PyGObject
//! (`python3-gi`) and `dbus-daemon`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Debian's interpreter: PyGObject is packaged for it, not for a
/// user-installed python3 earlier on PATH.
const DEBIAN_PYTHON: &str = "/usr/bin/python3";

#[test]
fn targetcli_plugin_python_suite_passes() {
    if !Path::new(DEBIAN_PYTHON).exists() {
        common::skip(&format!("{DEBIAN_PYTHON} not installed"));
        return;
    }
    let has_gi = Command::new(DEBIAN_PYTHON)
        .args(["-c", "import gi"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !has_gi {
        common::skip("python3-gi not installed");
        return;
    }
    if !common::require_tools(&["dbus-daemon"]) {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("targetcli-plugin");
    let out = common::run(
        Command::new(DEBIAN_PYTHON)
            .args(["-m", "unittest", "discover", "-s", "tests", "-v"])
            .current_dir(&dir)
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        Duration::from_secs(300),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert!(out.status.success(), "python suite failed:\n{stderr}");
    // A suite that silently collected nothing must not pass.
    let ran = stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("Ran ")?
                .split_whitespace()
                .next()?
                .parse::<u32>()
                .ok()
        })
        .unwrap_or(0);
    assert!(ran >= 20, "only {ran} Python tests ran:\n{stderr}");
    assert!(
        !stderr.contains("skipped="),
        "Python tests were skipped:\n{stderr}"
    );
}
