//! The `user:mirror` configuration string: what follows `mirror/` in the
//! kernel's `dev_config` (and targetcli's `cfgstring=`).
//!
//! ```text
//! <backing file>[;option=value]...
//! /srv/lun0.img
//! /srv/lun0.img;size=1G;replica=/mnt/b/lun0.img;copytype=async
//! ```
//!
//! | option | meaning |
//! |---|---|
//! | `size=N[K\|M\|G\|T]` | the device must be exactly this big (checked against the kernel's dev_size) |
//! | `create=yes\|no` | create a missing backing file, sparse, at the device size (default yes) |
//! | `grow=yes\|no` | extend a backing file smaller than the device (default no: refuse) |
//! | `ro=yes\|no` | serve read-only |
//! | `replica=PATH` | attach a replica (repeatable); it must exist and be large enough |
//! | `copytype=sync\|async` | CopyType of the replicas (default sync) |
//! | `engine=uring\|sync` | I/O engine of the backing file (default: the daemon's) |
//! | `direct=yes\|no` | O_DIRECT on the backing file |
//!
//! The kernel splits its `control` writes at `,` and stores at most 255
//! bytes of `dev_config`, so neither the syntax nor the paths may use
//! commas, and the whole string is capped. Paths must be absolute.

use std::fmt;

/// Longest `dev_config` the kernel keeps (TCMU_CONFIG_LEN - 1), including
/// the `mirror/` prefix.
pub const MAX_DEV_CONFIG: usize = 255;

/// CopyType of replicas named in the cfgstring (control protocol values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyType {
    /// CopyType 2.
    Async,
    /// CopyType 3.
    #[default]
    Sync,
}

impl CopyType {
    /// The control protocol's CopyType number.
    pub fn cim_value(self) -> u16 {
        match self {
            CopyType::Async => 2,
            CopyType::Sync => 3,
        }
    }
}

/// I/O engine choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Uring,
    Sync,
}

/// A parsed cfgstring.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CfgString {
    pub path: String,
    pub size: Option<u64>,
    pub create: bool,
    pub grow: bool,
    pub read_only: bool,
    pub replicas: Vec<String>,
    pub copy_type: CopyType,
    pub engine: Option<Engine>,
    pub direct: Option<bool>,
}

/// Why a cfgstring was refused; the text is what CheckConfig returns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CfgError {
    #[error("empty cfgstring: expected <backing file>[;option=value...]")]
    Empty,
    #[error("backing file '{0}' is not an absolute path")]
    RelativePath(String),
    #[error("'{0}' contains a comma, which the kernel's control parser splits on")]
    Comma(String),
    #[error(
        "cfgstring is {0} bytes; the kernel keeps at most {MAX_DEV_CONFIG} of mirror/<cfgstring>"
    )]
    TooLong(usize),
    #[error("option '{0}' is not name=value")]
    NotKeyValue(String),
    #[error("unknown option '{0}'")]
    UnknownOption(String),
    #[error("option '{0}' given twice")]
    Duplicate(String),
    #[error("bad value '{value}' for {key}: {why}")]
    BadValue {
        key: String,
        value: String,
        why: &'static str,
    },
    #[error("subtype '{0}' is not 'mirror'")]
    Subtype(String),
}

fn parse_bool(key: &str, v: &str) -> Result<bool, CfgError> {
    match v {
        "yes" | "true" | "1" | "on" => Ok(true),
        "no" | "false" | "0" | "off" => Ok(false),
        _ => Err(CfgError::BadValue {
            key: key.into(),
            value: v.into(),
            why: "expected yes or no",
        }),
    }
}

/// `123`, `64M`, `1G` (binary multiples; a trailing `B`/`iB` is accepted).
pub fn parse_size(v: &str) -> Option<u64> {
    let s = v.trim();
    let s = s
        .strip_suffix("iB")
        .or_else(|| s.strip_suffix('B'))
        .unwrap_or(s);
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return None,
            };
            (s.get(..i)?, shift)
        }
        _ => (s, 0),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    num.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

fn check_path(p: &str) -> Result<(), CfgError> {
    if !p.starts_with('/') {
        return Err(CfgError::RelativePath(p.into()));
    }
    if p.contains(',') {
        return Err(CfgError::Comma(p.into()));
    }
    Ok(())
}

impl CfgString {
    /// Parse the part after `mirror/`.
    pub fn parse(s: &str) -> Result<CfgString, CfgError> {
        if s.len() + "mirror/".len() > MAX_DEV_CONFIG {
            return Err(CfgError::TooLong(s.len()));
        }
        let mut parts = s.split(';');
        let path = parts.next().unwrap_or_default().trim();
        if path.is_empty() {
            return Err(CfgError::Empty);
        }
        check_path(path)?;
        let mut c = CfgString {
            path: path.to_string(),
            create: true,
            ..CfgString::default()
        };
        let mut seen: Vec<&str> = Vec::new();
        for opt in parts {
            let opt = opt.trim();
            if opt.is_empty() {
                continue;
            }
            let Some((k, v)) = opt.split_once('=') else {
                return Err(CfgError::NotKeyValue(opt.into()));
            };
            let (k, v) = (k.trim(), v.trim());
            if k != "replica" {
                if seen.contains(&k) {
                    return Err(CfgError::Duplicate(k.into()));
                }
                seen.push(k);
            }
            let bad = |why| CfgError::BadValue {
                key: k.into(),
                value: v.into(),
                why,
            };
            match k {
                "size" => c.size = Some(parse_size(v).ok_or_else(|| bad("expected N[K|M|G|T]"))?),
                "create" => c.create = parse_bool(k, v)?,
                "grow" => c.grow = parse_bool(k, v)?,
                "ro" => c.read_only = parse_bool(k, v)?,
                "direct" => c.direct = Some(parse_bool(k, v)?),
                "replica" => {
                    check_path(v)?;
                    if v == c.path || c.replicas.iter().any(|r| r == v) {
                        return Err(bad("replica repeats the backing file or another replica"));
                    }
                    c.replicas.push(v.to_string());
                }
                "copytype" => {
                    c.copy_type = match v {
                        "sync" | "3" => CopyType::Sync,
                        "async" | "2" => CopyType::Async,
                        _ => return Err(bad("expected sync or async")),
                    }
                }
                "engine" => {
                    c.engine = Some(match v {
                        "uring" | "io_uring" => Engine::Uring,
                        "sync" | "pread" => Engine::Sync,
                        _ => return Err(bad("expected uring or sync")),
                    })
                }
                _ => return Err(CfgError::UnknownOption(k.into())),
            }
        }
        if c.read_only && !c.replicas.is_empty() {
            return Err(CfgError::BadValue {
                key: "replica".into(),
                value: c.replicas.join(" "),
                why: "a read-only device has no writes to mirror",
            });
        }
        Ok(c)
    }

    /// Parse a full `dev_config` (`<subtype>/<cfgstring>`), as CheckConfig
    /// receives it, for the subtype `expected`.
    pub fn parse_dev_config(dev_config: &str, expected: &str) -> Result<CfgString, CfgError> {
        let (sub, rest) = dev_config.split_once('/').unwrap_or((dev_config, ""));
        if sub != expected {
            return Err(CfgError::Subtype(sub.into()));
        }
        if dev_config.len() > MAX_DEV_CONFIG {
            return Err(CfgError::TooLong(rest.len()));
        }
        CfgString::parse(rest)
    }
}

impl fmt::Display for CfgString {
    /// The canonical cfgstring (parses back to an equal value).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)?;
        if let Some(s) = self.size {
            write!(f, ";size={s}")?;
        }
        if !self.create {
            f.write_str(";create=no")?;
        }
        if self.grow {
            f.write_str(";grow=yes")?;
        }
        if self.read_only {
            f.write_str(";ro=yes")?;
        }
        for r in &self.replicas {
            write!(f, ";replica={r}")?;
        }
        if self.copy_type != CopyType::Sync {
            f.write_str(";copytype=async")?;
        }
        match self.engine {
            Some(Engine::Uring) => f.write_str(";engine=uring")?,
            Some(Engine::Sync) => f.write_str(";engine=sync")?,
            None => {}
        }
        if let Some(d) = self.direct {
            write!(f, ";direct={}", if d { "yes" } else { "no" })?;
        }
        Ok(())
    }
}

/// `ConfigDesc` shown by targetcli's `help create` for `user:mirror`.
pub const CONFIG_DESC: &str = "mirror/<backing file>[;option=value...] \
options: size=N[K|M|G|T] (must match), create=yes|no (default yes: create a missing file), \
grow=yes|no (extend a smaller file; default no), ro=yes|no, replica=PATH (repeatable; \
existing file at least as large), copytype=sync|async (default sync), engine=uring|sync, \
direct=yes|no. No commas; at most 255 bytes with the mirror/ prefix.";

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Test vectors shared with the Python CheckConfig implementation.
    const VECTORS: &str = include_str!("../../targetcli-plugin/tests/cfgstring_vectors.json");

    #[test]
    fn plain_path() {
        let c = CfgString::parse("/srv/lun0.img").unwrap();
        assert_eq!(c.path, "/srv/lun0.img");
        assert!(c.create);
        assert!(c.replicas.is_empty());
    }

    #[test]
    fn all_options() {
        let c = CfgString::parse(
            "/srv/a.img;size=1G;create=no;grow=yes;replica=/r/1;replica=/r/2;copytype=async;engine=sync;direct=yes",
        )
        .unwrap();
        assert_eq!(c.size, Some(1 << 30));
        assert!(!c.create && c.grow);
        assert_eq!(c.replicas, vec!["/r/1", "/r/2"]);
        assert_eq!(c.copy_type, CopyType::Async);
        assert_eq!(c.engine, Some(Engine::Sync));
        assert_eq!(c.direct, Some(true));
    }

    #[test]
    fn refusals() {
        assert_eq!(CfgString::parse(""), Err(CfgError::Empty));
        assert!(matches!(
            CfgString::parse("srv/a"),
            Err(CfgError::RelativePath(_))
        ));
        assert!(matches!(CfgString::parse("/a,b"), Err(CfgError::Comma(_))));
        assert!(matches!(
            CfgString::parse("/a;bogus=1"),
            Err(CfgError::UnknownOption(_))
        ));
        assert!(matches!(
            CfgString::parse("/a;size"),
            Err(CfgError::NotKeyValue(_))
        ));
        assert!(matches!(
            CfgString::parse("/a;size=1G;size=2G"),
            Err(CfgError::Duplicate(_))
        ));
        assert!(matches!(
            CfgString::parse("/a;replica=/a"),
            Err(CfgError::BadValue { .. })
        ));
        assert!(matches!(
            CfgString::parse("/a;ro=yes;replica=/b"),
            Err(CfgError::BadValue { .. })
        ));
        let long = format!("/{}", "x".repeat(300));
        assert!(matches!(CfgString::parse(&long), Err(CfgError::TooLong(_))));
    }

    #[test]
    fn dev_config_prefix() {
        let c = CfgString::parse_dev_config("mirror//scratch/raw.img", "mirror").unwrap();
        assert_eq!(c.path, "/scratch/raw.img");
        assert!(matches!(
            CfgString::parse_dev_config("qcow//x.img", "mirror"),
            Err(CfgError::Subtype(_))
        ));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("2k"), Some(2048));
        assert_eq!(parse_size("1X"), None);
        assert_eq!(parse_size("G"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn shared_vectors_agree() {
        let v: serde_json::Value = serde_json::from_str(VECTORS).expect("vectors parse");
        let cases = v["cases"].as_array().expect("cases");
        assert!(cases.len() >= 10);
        for case in cases {
            let input = case["dev_config"].as_str().expect("dev_config");
            let ok = case["ok"].as_bool().expect("ok");
            let got = CfgString::parse_dev_config(input, "mirror");
            assert_eq!(got.is_ok(), ok, "{input}: {got:?}");
            if let (Ok(c), Some(p)) = (&got, case["path"].as_str()) {
                assert_eq!(c.path, p, "{input}");
            }
            if let (Ok(c), Some(r)) = (&got, case["replicas"].as_array()) {
                let want: Vec<&str> = r.iter().filter_map(|x| x.as_str()).collect();
                assert_eq!(c.replicas, want, "{input}");
            }
        }
    }

    proptest! {
        #[test]
        fn display_round_trips(
            path in "/[a-z0-9/._-]{1,40}",
            size in proptest::option::of(1u64..1u64 << 40),
            create in any::<bool>(), grow in any::<bool>(),
            reps in proptest::collection::vec("/r[a-z0-9]{1,10}", 0..3),
            async_ in any::<bool>(),
        ) {
            let mut reps = reps;
            reps.sort();
            reps.dedup();
            reps.retain(|r| *r != path);
            let c = CfgString {
                path, size, create, grow, read_only: false, replicas: reps,
                copy_type: if async_ { CopyType::Async } else { CopyType::Sync },
                engine: None, direct: None,
            };
            let s = c.to_string();
            if s.len() + 7 <= MAX_DEV_CONFIG {
                prop_assert_eq!(CfgString::parse(&s).unwrap(), c);
            }
        }

        #[test]
        fn parse_never_panics(s in ".{0,300}") {
            let _ = CfgString::parse(&s);
            let _ = CfgString::parse_dev_config(&s, "mirror");
        }
    }
}
