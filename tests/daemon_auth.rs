//! Access control with real initiators: initiator ACLs, one-way CHAP and
//! mutual CHAP (libiscsi: credentials in the URL as `user%secret@`, the
//! target's credentials as `target_user`/`target_password` URL
//! parameters).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);
const TGT: &str = "iqn.2026-11.io.lunmirror:secure";
const USER: &str = "alice";
const SECRET: &str = "initiator-secret-42";
const TUSER: &str = "lunmirror";
const TSECRET: &str = "target-secret-0815";

fn config(extra: &str) -> String {
    format!(
        "[[target]]\nname = \"{TGT}\"\nportals = [\"127.0.0.1:0\"]\n{extra}\n[[target.lun]]\nid = 0\nvolume = \"v\"\nsize = \"4M\"\n"
    )
}

fn start(extra: &str) -> Daemon {
    Daemon::builder()
        .config(&config(extra))
        .listen(&[])
        .expect_listeners(1)
        .start()
}

/// Run iscsi-readcapacity16 -s on `url` as `initiator`; Ok(size) or the
/// tool's output on failure.
fn readcap(url: &str, initiator_name: &str) -> Result<String, String> {
    let out = run(
        Command::new("iscsi-readcapacity16")
            .args(["-s", "--initiator-name", initiator_name])
            .arg(url),
        T,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(text)
    }
}

const SIZE: &str = "4194304";

#[test]
fn initiator_acl() {
    if !require_tools(&["iscsi-readcapacity16"]) {
        return;
    }
    let ok = initiator("allowed");
    let d = start(&format!("allowed_initiators = [\"{ok}\"]"));
    let url = d.lun_url(TGT, 0);
    assert_eq!(readcap(&url, &ok).as_deref(), Ok(SIZE));
    // ACLs compare case-insensitively, like iSCSI names.
    assert_eq!(readcap(&url, &ok.to_ascii_uppercase()).as_deref(), Ok(SIZE));
    let denied = readcap(&url, &initiator("intruder"));
    assert!(denied.is_err(), "intruder got in: {denied:?}");
    // The daemon keeps serving after refusing someone.
    assert_eq!(readcap(&url, &ok).as_deref(), Ok(SIZE));
    d.stop();
}

#[test]
fn one_way_chap() {
    if !require_tools(&["iscsi-readcapacity16", "iscsi-ls"]) {
        return;
    }
    let d = start(&format!(
        "chap = {{ user = \"{USER}\", secret = \"{SECRET}\" }}"
    ));
    let p = d.portal();
    let me = initiator("chap");
    let good = format!("iscsi://{USER}%{SECRET}@{p}/{TGT}/0");
    assert_eq!(readcap(&good, &me).as_deref(), Ok(SIZE));

    let none = format!("iscsi://{p}/{TGT}/0");
    assert!(readcap(&none, &me).is_err(), "login without CHAP succeeded");
    let wrong_secret = format!("iscsi://{USER}%not-the-secret@{p}/{TGT}/0");
    assert!(
        readcap(&wrong_secret, &me).is_err(),
        "wrong secret accepted"
    );
    let wrong_user = format!("iscsi://mallory%{SECRET}@{p}/{TGT}/0");
    assert!(readcap(&wrong_user, &me).is_err(), "wrong user accepted");

    // Discovery with credentials lists the target.
    let ls = run_ok(
        Command::new("iscsi-ls").arg(format!("iscsi://{USER}%{SECRET}@{p}")),
        T,
    );
    assert!(ls.contains(TGT), "{ls}");
    d.stop();
}

#[test]
fn mutual_chap() {
    if !require_tools(&["iscsi-readcapacity16"]) {
        return;
    }
    let d = start(&format!(
        "chap = {{ user = \"{USER}\", secret = \"{SECRET}\" }}\nmutual_chap = {{ user = \"{TUSER}\", secret = \"{TSECRET}\" }}"
    ));
    let p = d.portal();
    let me = initiator("mutual");
    let url = |tuser: &str, tsecret: &str| {
        format!("iscsi://{USER}%{SECRET}@{p}/{TGT}/0?target_user={tuser}&target_password={tsecret}")
    };
    assert_eq!(readcap(&url(TUSER, TSECRET), &me).as_deref(), Ok(SIZE));

    // The initiator must refuse a target that does not prove the expected
    // secret: libiscsi checks the target's CHAP_R against what it expects.
    assert!(
        readcap(&url(TUSER, "some-other-secret"), &me).is_err(),
        "bad target secret accepted"
    );

    // The same through libiscsi's environment variables.
    let out = run(
        Command::new("iscsi-readcapacity16")
            .args(["-s", "--initiator-name", &me])
            .arg(format!("iscsi://{USER}%{SECRET}@{p}/{TGT}/0"))
            .env("LIBISCSI_CHAP_TARGET_USERNAME", TUSER)
            .env("LIBISCSI_CHAP_TARGET_PASSWORD", TSECRET),
        T,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), SIZE);
    d.stop();
}

#[test]
fn chap_and_acl_together() {
    if !require_tools(&["iscsi-readcapacity16"]) {
        return;
    }
    let ok = initiator("both");
    let d = start(&format!(
        "allowed_initiators = [\"{ok}\"]\nchap = {{ user = \"{USER}\", secret = \"{SECRET}\" }}"
    ));
    let good = format!("iscsi://{USER}%{SECRET}@{}/{TGT}/0", d.portal());
    assert_eq!(readcap(&good, &ok).as_deref(), Ok(SIZE));
    // Right secret, wrong initiator name.
    assert!(readcap(&good, &initiator("other")).is_err());
    d.stop();
}
