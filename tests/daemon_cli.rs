//! The daemon binary's failure paths: bad configs exit 2 naming the key and
//! touch nothing, usage errors exit 2, a locked state dir exits 1.

mod common;

use std::fs;
use std::path::Path;

use common::*;

/// Run `serve --config <file>` with `text` in a fresh dir; return (exit
/// code, stderr, dir).
fn serve_with_config(text: &str) -> (Option<i32>, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    let text = text.replace("{tmp}", &dir.path().display().to_string());
    fs::write(&cfg, &text).unwrap();
    let out = run_lunmirror(
        &[
            "serve",
            "--config",
            cfg.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        dir.path(),
    );
    // The config file is never modified.
    assert_eq!(fs::read_to_string(&cfg).unwrap(), text);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stderr, dir)
}

/// Entries of `dir` other than the config file.
fn created_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "bad.toml" && n != "existing.img")
        .collect();
    v.sort();
    v
}

const GOOD_TARGET: &str = r#"
[daemon]
state_dir = "{tmp}/state"
[[target]]
name = "iqn.2026-11.io.lunmirror:t"
"#;

#[test]
fn bad_configs_exit_2_name_the_key_and_touch_nothing() {
    let cases: &[(&str, &str)] = &[
        (
            "[[target.lun]]\nid = 0\nvolume = \"v\"\nblock_size = 1000\n",
            "target[0].lun[0].block_size: must be 512 or 4096",
        ),
        ("[[target.lun]]\nid = 0\nvolume = \"v\"\nsizee = 1\n", "target[0].lun[0].sizee: unknown field"),
        (
            "[[target.lun]]\nid = 0\nvolume = \"v\"\n[[target.lun]]\nid = 0\nvolume = \"w\"\n",
            "target[0].lun[1].id: duplicate LUN id 0",
        ),
        (
            "chap = { user = \"u\", secret = \"\" }\n[[target.lun]]\nid = 0\nvolume = \"v\"\n",
            "target[0].chap.secret",
        ),
        (
            "portals = [\"127.0.0.1\"]\n[[target.lun]]\nid = 0\nvolume = \"v\"\n",
            "target[0].portals[0]",
        ),
        // Found by the preflight, still before anything is created.
        (
            "[[target.lun]]\nid = 0\nvolume = \"v\"\nread_only = true\n",
            "target[0].lun[0].path",
        ),
        (
            "[[target.lun]]\nid = 0\nvolume = \"v\"\npath = \"{tmp}/existing.img\"\nsize = \"1M\"\n",
            "target[0].lun[0].size",
        ),
    ];
    for (lun_part, needle) in cases {
        let text = format!("{GOOD_TARGET}{lun_part}");
        let dir = tempfile::tempdir().unwrap();
        // An existing 4 KiB backing file for the size-mismatch case.
        fs::write(dir.path().join("existing.img"), [0u8; 4096]).unwrap();
        let (code, stderr, dir2) = {
            let cfg = dir.path().join("bad.toml");
            let text = text.replace("{tmp}", &dir.path().display().to_string());
            fs::write(&cfg, &text).unwrap();
            let out = run_lunmirror(
                &[
                    "serve",
                    "--config",
                    cfg.to_str().unwrap(),
                    "--listen",
                    "127.0.0.1:0",
                ],
                dir.path(),
            );
            assert_eq!(fs::read_to_string(&cfg).unwrap(), text, "config modified");
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
                dir,
            )
        };
        assert_eq!(code, Some(2), "case {needle}: stderr:\n{stderr}");
        assert!(stderr.contains(needle), "case {needle}: stderr:\n{stderr}");
        assert_eq!(
            created_entries(dir2.path()),
            Vec::<String>::new(),
            "case {needle}"
        );
        assert_eq!(
            fs::metadata(dir2.path().join("existing.img"))
                .unwrap()
                .len(),
            4096
        );
    }
}

#[test]
fn syntax_error_reports_line() {
    let (code, stderr, dir) = serve_with_config("[daemon\nstate_dir = \"x\"\n");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("line 1"), "{stderr}");
    assert!(created_entries(dir.path()).is_empty());
}

#[test]
fn missing_config_file_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_lunmirror(&["serve", "--config", "nope.toml"], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("nope.toml") && stderr.contains("cannot read"),
        "{stderr}"
    );
    assert!(created_entries(dir.path()).is_empty());
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &[][..],
        &["serve", "--bogus"][..],
        &["serve", "--listen", "localhost"][..],
        &["serve", "--size", "12Q"][..],
        &["serve", "--engine", "fast"][..],
        &["frobnicate"][..],
    ] {
        let out = run_lunmirror(args, dir.path());
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(created_entries(dir.path()).is_empty());
    let out = run_lunmirror(&["serve", "--help"], dir.path());
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--state-dir", "--listen", "--size", "--config", "--engine"] {
        assert!(help.contains(flag), "{flag} missing from help:\n{help}");
    }
}

#[test]
fn default_size_must_fit_block_size() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_lunmirror(
        &["serve", "--size", "1000", "--listen", "127.0.0.1:0"],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("target[0].lun[0].size"), "{stderr}");
    assert!(
        created_entries(dir.path()).is_empty(),
        "state dir created on config error"
    );
}

#[test]
fn locked_state_dir_exits_1() {
    use nix::fcntl::{Flock, FlockArg};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    fs::create_dir(&state).unwrap();
    let f = fs::File::create(state.join("lunmirror.lock")).unwrap();
    let _held = Flock::lock(f, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .unwrap();
    let out = run_lunmirror(
        &[
            "serve",
            "--state-dir",
            state.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in use by another lunmirror"), "{stderr}");
    // Nothing else was created while the lock was refused.
    assert!(!state.join("volumes").exists());
}
