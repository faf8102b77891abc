//! The agent's configuration: flags and environment over a TOML file over defaults,
//! validated into a [`Config`] before anything connects.

use crate::policy::{AllowConfig, Policy, PolicyError};
use crate::protected::Protected;
use outpost_wire::names;
use outpost_wire::sign::PublicKey;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Seconds between hellos: three missed hellos (45 s) mark a unit offline, fast enough
/// for an operator's view, slow enough to cost nothing on a metered cellular link.
pub const DEFAULT_HELLO_INTERVAL_S: u32 = 15;
/// Cap per output stream: large enough for `journalctl -n 1000`, small enough that an
/// outcome always fits one NATS message (1 MiB default `max_payload`).
pub const DEFAULT_OUTPUT_CAP: u32 = 128 * 1024;
/// Hard upper bound for `output_cap`: two outputs, a reason and the signed command
/// must fit one stored record (`outpost_wire::limits`).
pub const MAX_OUTPUT_CAP: u32 = outpost_wire::limits::MAX_OUTPUT_CAP;
/// Execution timeout when the command names none.
pub const DEFAULT_TIMEOUT_MS: u32 = 5 * 60 * 1000;
/// Commands accepted but not yet started; at the bound the agent answers `Busy` and
/// the hub delivers again later, so nothing is lost and memory stays bounded.
pub const DEFAULT_QUEUE: u32 = 256;
/// Commands running at once. Start order is acceptance order either way.
pub const DEFAULT_CONCURRENCY: u32 = 4;

/// The config file, every key optional (flags and environment win).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node: Option<String>,
    pub nats_url: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub nkey_file: Option<PathBuf>,
    pub hub_key: Option<String>,
    /// More hub keys to trust besides `hub_key` (the next key of a rotation).
    #[serde(default)]
    pub hub_keys: Vec<String>,
    pub state_dir: Option<PathBuf>,
    pub prefix: Option<String>,
    #[serde(default)]
    pub labels: Vec<String>,
    /// Start TLS before the broker says anything (its config must have
    /// `handshake_first`, as `outpost-hub pki init` writes it).
    pub tls_first: Option<bool>,
    pub hello_interval_s: Option<u32>,
    pub output_cap: Option<u32>,
    pub default_timeout_ms: Option<u32>,
    pub queue: Option<u32>,
    pub concurrency: Option<u32>,
    #[serde(default)]
    pub allow: AllowConfig,
}

/// What the agent runs with, all checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub node: String,
    pub nats_url: String,
    pub ca_file: PathBuf,
    /// The unit's NATS nkey seed file (from `outpost-hub enroll`); the seed itself is
    /// read at connect time and never kept in the config or logged.
    pub nkey_file: Option<PathBuf>,
    /// The hub keys the config trusts: `hub_key` first, then `hub_keys`. A `hub.keys`
    /// command's set, kept in the state dir, replaces them (`crate::trust`).
    pub hub_keys: Vec<PublicKey>,
    pub state_dir: PathBuf,
    pub tls_first: bool,
    /// The config file, if any: never readable or writable by a command.
    pub config_file: Option<PathBuf>,
    pub prefix: String,
    pub labels: Vec<(String, String)>,
    pub hello_interval: Duration,
    pub output_cap: u32,
    pub default_timeout_ms: u32,
    pub queue: u32,
    pub concurrency: u32,
    /// What this unit runs; nothing remote can widen it.
    pub policy: Policy,
}

/// A configuration problem, named precisely.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("missing {0}: set it with --{1}, ${2} or `{3} = ...` in the config file")]
    Missing(&'static str, &'static str, &'static str, &'static str),
    #[error(transparent)]
    Name(#[from] names::NameError),
    #[error("invalid hub_key: {0} (copy it from the hub's hub-signing.pub)")]
    HubKey(outpost_wire::sign::KeyError),
    #[error("invalid label {0:?}: write key=value")]
    Label(String),
    #[error("nats_url {0:?} is not TLS: use tls://host:port (outpost never speaks plain text)")]
    NotTls(String),
    #[error("ca_file {0} does not exist")]
    NoCa(PathBuf),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(
        "nkey_file {0} does not exist (it comes with the unit's bundle from `outpost-hub enroll`)"
    )]
    NoNkey(PathBuf),
    #[error("{0} must be between {1} and {2}")]
    Range(&'static str, u32, u32),
}

/// Values from flags/environment; `None` where not given.
#[derive(Debug, Default)]
pub struct Overrides {
    /// The `--config` file, if any: it and its directory are protected from every method.
    pub config_file: Option<PathBuf>,
    pub node: Option<String>,
    pub nats_url: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub nkey_file: Option<PathBuf>,
    pub hub_key: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub prefix: Option<String>,
    pub labels: Vec<String>,
    pub hello_interval_s: Option<u32>,
    pub tls_first: Option<bool>,
}

pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn range(what: &'static str, v: u32, lo: u32, hi: u32) -> Result<u32, ConfigError> {
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(ConfigError::Range(what, lo, hi))
    }
}

/// The agent's own paths, which no command may read, write or run in.
fn protected(
    config_file: Option<&Path>,
    nkey_file: Option<&Path>,
    ca_file: &Path,
    state_dir: &Path,
) -> Protected {
    let mut p = Protected::none()
        .with("CA certificate", ca_file)
        .with("state directory", state_dir);
    if let Some(c) = config_file {
        p = p.with_config(c);
    }
    if let Some(n) = nkey_file {
        p = p.with("identity (nkey file)", n);
    }
    p
}

impl Config {
    /// Merge flags over the file over defaults, and check everything.
    pub fn build(o: Overrides, f: FileConfig) -> Result<Config, ConfigError> {
        let node = o.node.or(f.node).ok_or(ConfigError::Missing(
            "node name",
            "node",
            "OUTPOST_NODE",
            "node",
        ))?;
        names::check_node(&node)?;
        let nats_url = o.nats_url.or(f.nats_url).ok_or(ConfigError::Missing(
            "NATS URL",
            "nats-url",
            "OUTPOST_NATS_URL",
            "nats_url",
        ))?;
        if !nats_url.split(',').all(|u| u.trim().starts_with("tls://")) {
            return Err(ConfigError::NotTls(nats_url));
        }
        let ca_file = o.ca_file.or(f.ca_file).ok_or(ConfigError::Missing(
            "fleet CA certificate",
            "ca-file",
            "OUTPOST_CA_FILE",
            "ca_file",
        ))?;
        if !ca_file.is_file() {
            return Err(ConfigError::NoCa(ca_file));
        }
        let hub_key = o.hub_key.or(f.hub_key).ok_or(ConfigError::Missing(
            "hub command-signing key",
            "hub-key",
            "OUTPOST_HUB_KEY",
            "hub_key",
        ))?;
        let mut hub_keys: Vec<PublicKey> = vec![hub_key.parse().map_err(ConfigError::HubKey)?];
        for k in &f.hub_keys {
            let k: PublicKey = k.parse().map_err(ConfigError::HubKey)?;
            if !hub_keys.contains(&k) {
                hub_keys.push(k);
            }
        }
        if hub_keys.len() > outpost_wire::MAX_HUB_KEYS {
            return Err(ConfigError::Range(
                "hub_key and hub_keys together",
                1,
                outpost_wire::MAX_HUB_KEYS as u32,
            ));
        }
        let state_dir = o
            .state_dir
            .or(f.state_dir)
            .unwrap_or_else(|| PathBuf::from("/var/lib/outpost"));
        let prefix = o
            .prefix
            .or(f.prefix)
            .unwrap_or_else(|| outpost_wire::subject::DEFAULT_PREFIX.into());
        names::check_node(&prefix).map_err(|_| names::NameError {
            what: "subject prefix",
            name: prefix.clone(),
        })?;
        let mut labels = Vec::new();
        for l in f.labels.iter().chain(o.labels.iter()) {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| ConfigError::Label(l.clone()))?;
            if k.is_empty() {
                return Err(ConfigError::Label(l.clone()));
            }
            labels.retain(|(key, _): &(String, String)| key != k);
            labels.push((k.to_string(), v.to_string()));
        }
        let nkey_file = o.nkey_file.or(f.nkey_file);
        if let Some(n) = &nkey_file
            && !n.is_file()
        {
            return Err(ConfigError::NoNkey(n.clone()));
        }
        let policy = Policy::new(
            f.allow,
            protected(
                o.config_file.as_deref(),
                nkey_file.as_deref(),
                &ca_file,
                &state_dir,
            ),
        )?;
        let hello = o
            .hello_interval_s
            .or(f.hello_interval_s)
            .unwrap_or(DEFAULT_HELLO_INTERVAL_S);
        Ok(Config {
            node,
            nats_url,
            ca_file,
            nkey_file,
            hub_keys,
            state_dir,
            tls_first: o.tls_first.or(f.tls_first).unwrap_or(false),
            config_file: o.config_file,
            prefix,
            labels,
            hello_interval: Duration::from_secs(range("hello_interval_s", hello, 1, 3600)? as u64),
            output_cap: range(
                "output_cap",
                f.output_cap.unwrap_or(DEFAULT_OUTPUT_CAP),
                0,
                MAX_OUTPUT_CAP,
            )?,
            default_timeout_ms: range(
                "default_timeout_ms",
                f.default_timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS),
                1,
                u32::MAX,
            )?,
            queue: range("queue", f.queue.unwrap_or(DEFAULT_QUEUE), 1, 65_536)?,
            concurrency: range(
                "concurrency",
                f.concurrency.unwrap_or(DEFAULT_CONCURRENCY),
                1,
                256,
            )?,
            policy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(ca: &Path) -> Overrides {
        Overrides {
            node: Some("pi-1".into()),
            nats_url: Some("tls://127.0.0.1:4222".into()),
            ca_file: Some(ca.to_path_buf()),
            hub_key: Some("ab".repeat(32)),
            ..Default::default()
        }
    }

    #[test]
    fn flags_over_file_and_errors_name_the_input() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let file: FileConfig = toml::from_str(
            "node = \"from-file\"\nlabels = [\"site=a\", \"rack=1\"]\noutput_cap = 10\n",
        )
        .unwrap();
        let mut o = base(&ca);
        o.labels = vec!["site=b".into()];
        let c = Config::build(o, file).unwrap();
        assert_eq!(c.node, "pi-1");
        assert_eq!(c.output_cap, 10);
        assert_eq!(
            c.labels,
            vec![("rack".into(), "1".into()), ("site".into(), "b".into())]
        );

        let mut o = base(&ca);
        o.nats_url = Some("nats://x:4222".into());
        let e = Config::build(o, FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("not TLS"), "{e}");

        let mut o = base(&ca);
        o.node = None;
        let e = Config::build(o, FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("OUTPOST_NODE"), "{e}");

        let mut o = base(&ca);
        o.node = Some("a.b".into());
        assert!(Config::build(o, FileConfig::default()).is_err());

        let bad: Result<FileConfig, _> = toml::from_str("nodee = \"x\"");
        assert!(bad.is_err());
    }

    #[test]
    fn the_agents_own_files_are_protected_whatever_allow_says() {
        use outpost_wire::{FileRead, FileWrite, Method};
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        let keys = dir.path().join("keys");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&keys).unwrap();
        let (ca, nk) = (keys.join("ca.pem"), keys.join("node.nk"));
        std::fs::write(&ca, "x").unwrap();
        std::fs::write(&nk, "x").unwrap();
        let mut o = base(&ca);
        o.config_file = Some(etc.join("edge.toml"));
        o.nkey_file = Some(nk.clone());
        o.state_dir = Some(dir.path().join("state"));
        let file: FileConfig = toml::from_str(
            "[allow]\nmethods = [\"file.read\", \"file.write\"]\nread = [\"/\"]\nwrite = [\"/\"]\n",
        )
        .unwrap();
        let c = Config::build(o, file).unwrap();
        let read = |p: &Path| {
            c.policy.check(&Method::FileRead(FileRead {
                path: p.display().to_string(),
                max_bytes: 0,
            }))
        };
        let write = |p: &Path| {
            c.policy.check(&Method::FileWrite(FileWrite {
                path: p.display().to_string(),
                mode: 0o600,
                data: vec![],
            }))
        };
        for p in [
            etc.join("edge.toml"),
            etc.join("other"),
            nk.clone(),
            ca.clone(),
            dir.path().join("state/log"),
        ] {
            assert!(read(&p).is_err(), "read {}", p.display());
            assert!(write(&p).is_err(), "write {}", p.display());
        }
        assert!(read(&keys.join("other")).is_ok());
        assert!(write(&keys.join("other")).is_ok());
    }
}
