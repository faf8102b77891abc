//! Enrolment: the list of units allowed on the broker, each with its own NATS nkey
//! and permissions, and the bundle one unit needs. `auth.conf` (included by the
//! generated nats-server config) is regenerated from the list on every change and
//! the broker reloaded, so enrol and revoke take effect at once.
//!
//! What each identity may do on the broker (prefix `p`, ADR 0005):
//!
//! | who | publish | subscribe |
//! |---|---|---|
//! | hub, messages (`hub.nk`) | everything except `$KV.>`, `$JS.>`, `$SYS.>`, `p.hub.>`, `p.api.>`, `_HUB.>` | `p.hub.>`, `p.api.>`, `_HUB.>` |
//! | hub, store (`hub-store.nk`) | `$JS.API.>`, `$JS.ACK.>`, `$KV.p-open.>` and its other buckets by name | `_HUB.>` |
//! | operator | `p.api.>` | `p.event.>`, `_INBOX.>` |
//! | unit N | `p.hub.*.N` (its own reports), replies to requests it got | `p.node.N.cmd`, `_INBOX_N.>` |
//!
//! The hub answers replies only on the sender's own inbox, and its messaging
//! identity cannot write to JetStream at all: a forged reply subject can make it
//! publish nowhere that matters.

use crate::pki::{self, PkiError, write_file};
use outpost_wire::names;
use outpost_wire::subject::{Subjects, unit_inbox};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The enrolment list, in the PKI directory.
pub const UNITS_FILE: &str = "units.json";
/// The broker's authorization, regenerated from the list.
pub const AUTH_CONF: &str = "auth.conf";
/// The hub's and the operators' nkey seeds (0600).
pub const HUB_NKEY: &str = "hub.nk";
/// The hub's JetStream identity (0600); made on first need for PKIs older than it.
pub const HUB_STORE_NKEY: &str = "hub-store.nk";
pub const OPERATOR_NKEY: &str = "operator.nk";
/// nats-server writes its pid here (the generated config says so); reload signals it.
pub const NATS_PID: &str = "nats-server.pid";

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("{0}")]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Name(#[from] names::NameError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is damaged: {message}")]
    Damaged { path: PathBuf, message: String },
    #[error(
        "{0} is already enrolled: pass --force to give it a new key (the old one stops working)"
    )]
    Exists(String),
    #[error("{0} is not enrolled")]
    Unknown(String),
    #[error(
        "invalid label {0:?}: write key=value (key: 1-63 of A-Z a-z 0-9 - _ . /, value: 0-63 of A-Z a-z 0-9 - _ .)"
    )]
    Label(String),
    #[error("cannot make an nkey: {0}")]
    Nkey(String),
}

/// One enrolled unit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Unit {
    /// The public half of its nkey (`U…`); the seed only ever goes into its bundle.
    pub nkey: String,
    pub labels: Vec<String>,
    pub enrolled_at: u64,
}

/// `units.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Units {
    pub prefix: String,
    pub hub_nkey: String,
    /// The hub's JetStream identity (absent in lists from before it existed: made on
    /// the next save).
    #[serde(default)]
    pub hub_store_nkey: String,
    pub operator_nkey: String,
    pub units: BTreeMap<String, Unit>,
    /// Other identities with permissions given by hand (a monitoring tool, the
    /// benchmark's simulated fleet): name → nkey and subjects.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub others: BTreeMap<String, Other>,
}

/// An identity that is neither hub, operator nor unit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Other {
    pub nkey: String,
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// A label as enrolment takes it: `key=value`, both usable in selectors.
pub fn check_label(l: &str) -> Result<(), EnrollError> {
    let ok = l.split_once('=').is_some_and(|(k, v)| {
        !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
            && v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    });
    if ok {
        Ok(())
    } else {
        Err(EnrollError::Label(l.to_string()))
    }
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> EnrollError + '_ {
    move |source| EnrollError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// A new nkey user: (seed, public key).
pub fn new_user() -> Result<(String, String), EnrollError> {
    let kp = nkeys::KeyPair::new_user();
    let seed = kp.seed().map_err(|e| EnrollError::Nkey(e.to_string()))?;
    Ok((seed, kp.public_key()))
}

impl Units {
    pub fn load(pki: &Path) -> Result<Units, EnrollError> {
        Units::load_file(&pki.join(UNITS_FILE))
    }

    /// Read an enrolment list (what the hub reads with `--units`).
    pub fn load_file(path: &Path) -> Result<Units, EnrollError> {
        let text = std::fs::read_to_string(path).map_err(read_err(path))?;
        serde_json::from_str(&text).map_err(|e| EnrollError::Damaged {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Write the list and the broker's `auth.conf` (making the hub's store identity
    /// first if this PKI predates it).
    pub fn save(&mut self, pki: &Path) -> Result<(), EnrollError> {
        if self.hub_store_nkey.is_empty() {
            let (seed, public) = new_user()?;
            write_file(
                &pki.join(HUB_STORE_NKEY),
                format!("{seed}\n").as_bytes(),
                true,
            )?;
            self.hub_store_nkey = public;
        }
        let text = serde_json::to_string_pretty(self).expect("units serialise");
        write_file(&pki.join(UNITS_FILE), text.as_bytes(), false)?;
        write_file(&pki.join(AUTH_CONF), self.auth_conf().as_bytes(), false)?;
        Ok(())
    }

    /// The nats-server `authorization` block for this list.
    pub fn auth_conf(&self) -> String {
        let s = Subjects::new(&self.prefix);
        let p = s.prefix();
        let q = |v: &[String]| {
            v.iter()
                .map(|x| format!("\"{x}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut out = String::from(
            "# made by outpost-hub from units.json: do not edit, run `outpost-hub enroll/revoke`\n\
             authorization {\n  users = [\n",
        );
        // The hub's messaging identity: anything but the store and its own subjects,
        // so a forged reply subject cannot make it write there (ADR 0005).
        let deny = [
            "$KV.>".to_string(),
            "$JS.>".into(),
            "$SYS.>".into(),
            format!("{p}.hub.>"),
            format!("{p}.api.>"),
            "_HUB.>".into(),
        ];
        out.push_str(&format!(
            "    {{ nkey: \"{}\", permissions: {{ publish: {{ allow: \">\", deny: [{}] }}, subscribe: [{}] }} }}\n",
            self.hub_nkey,
            q(&deny),
            q(&[format!("{p}.hub.>"), format!("{p}.api.>"), "_HUB.>".into()]),
        ));
        out.push_str(&format!(
            "    {{ nkey: \"{}\", permissions: {{ publish: [{}], subscribe: [{}] }} }}\n",
            self.hub_store_nkey,
            q(&[
                vec!["$JS.API.>".to_string(), "$JS.ACK.>".into()],
                // A `*` matches whole tokens only: each bucket by name.
                crate::store::BUCKETS
                    .iter()
                    .map(|b| format!("$KV.{p}-{b}.>"))
                    .collect(),
            ]
            .concat()),
            q(&["_HUB.>".into()]),
        ));
        out.push_str(&format!(
            "    {{ nkey: \"{}\", permissions: {{ publish: [{}], subscribe: [{}] }} }}\n",
            self.operator_nkey,
            q(&[s.api(">")]),
            q(&[format!("{p}.event.>"), "_INBOX.>".into()]),
        ));
        for o in self.others.values() {
            out.push_str(&format!(
                "    {{ nkey: \"{}\", permissions: {{ publish: [{}], subscribe: [{}] }} }}\n",
                o.nkey,
                q(&o.publish),
                q(&o.subscribe),
            ));
        }
        for (node, u) in &self.units {
            let publish = [s.reports_of(node)];
            let subscribe = [s.command(node), format!("{}.>", unit_inbox(node))];
            out.push_str(&format!(
                "    {{ nkey: \"{}\", permissions: {{ publish: [{}], subscribe: [{}], allow_responses: {{ max: 1 }} }} }}\n",
                u.nkey,
                q(&publish),
                q(&subscribe),
            ));
        }
        out.push_str("  ]\n}\n");
        out
    }
}

/// Make the hub's and operators' identities and an empty list (called by `pki init`).
pub fn init(pki: &Path, prefix: &str) -> Result<(), EnrollError> {
    let (hub_seed, hub_pub) = new_user()?;
    let (op_seed, op_pub) = new_user()?;
    write_file(
        &pki.join(HUB_NKEY),
        format!("{hub_seed}\n").as_bytes(),
        true,
    )?;
    write_file(
        &pki.join(OPERATOR_NKEY),
        format!("{op_seed}\n").as_bytes(),
        true,
    )?;
    Units {
        prefix: prefix.into(),
        hub_nkey: hub_pub,
        hub_store_nkey: String::new(),
        operator_nkey: op_pub,
        units: BTreeMap::new(),
        others: BTreeMap::new(),
    }
    .save(pki)
}

/// What `enroll` needs to know.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    pub pki: PathBuf,
    pub node: String,
    pub labels: Vec<String>,
    /// Where the bundle goes.
    pub out: PathBuf,
    /// Where the bundle's files will live on the unit (paths in its edge.toml).
    pub install_dir: PathBuf,
    /// The broker URL as the unit reaches it.
    pub nats_url: String,
    pub force: bool,
}

/// Enrol a unit: a new nkey, the list and `auth.conf` updated, and its bundle written:
/// `edge.toml`, `ca.pem`, `node.nk` (0600).
pub fn enroll(o: &EnrollOptions) -> Result<Unit, EnrollError> {
    names::check_node(&o.node)?;
    for l in &o.labels {
        check_label(l)?;
    }
    let mut units = Units::load(&o.pki)?;
    if units.units.contains_key(&o.node) && !o.force {
        return Err(EnrollError::Exists(o.node.clone()));
    }
    let (seed, public) = new_user()?;
    let hub_key_path = o.pki.join(pki::SIGNING_PUB);
    let hub_key = std::fs::read_to_string(&hub_key_path).map_err(read_err(&hub_key_path))?;
    let ca_path = o.pki.join(pki::CA_CERT);
    let ca = std::fs::read(&ca_path).map_err(read_err(&ca_path))?;

    std::fs::create_dir_all(&o.out).map_err(|source| PkiError::Write {
        path: o.out.clone(),
        source,
    })?;
    write_file(&o.out.join("ca.pem"), &ca, false)?;
    write_file(&o.out.join("node.nk"), format!("{seed}\n").as_bytes(), true)?;
    let toml = edge_toml(o, hub_key.trim(), &units.prefix)?;
    write_file(&o.out.join("edge.toml"), toml.as_bytes(), true)?;

    let unit = Unit {
        nkey: public,
        labels: o.labels.clone(),
        enrolled_at: outpost_wire::now_ms(),
    };
    units.units.insert(o.node.clone(), unit.clone());
    units.save(&o.pki)?;
    Ok(unit)
}

/// The values of a unit's `edge.toml`, written by the TOML serializer: whatever an
/// operator passes (a label, a URL, a path) ends up as a quoted string, never as
/// TOML of its own.
#[derive(Serialize)]
struct EdgeToml<'a> {
    node: &'a str,
    nats_url: &'a str,
    ca_file: String,
    nkey_file: String,
    hub_key: &'a str,
    prefix: &'a str,
    state_dir: &'a str,
    labels: &'a [String],
    /// TLS first (the generated broker config asks for it; see ADR 0005).
    tls_first: bool,
}

/// The unit's allow-list as enrolment writes it: ping only, with a specific example.
pub const ALLOW_EXAMPLE: &str = "\
# What this unit may run. Nothing remote can widen it; the default is ping only.
# Name what the unit must do, not whole trees: every entry is something anyone
# with the hub's signing key or an operator credential can make the unit do.
[allow]
methods = [\"ping\", \"hub.keys\"]
# methods = [\"ping\", \"hub.keys\", \"exec\", \"file.read\", \"file.write\"]
# exec = [\"systemctl restart nginx.service\", \"uname -a\"]   # argv globs; see docs/adr/0005
# read = [\"/var/log/nginx/\"]                                # path prefixes
# write = [\"/etc/nginx/conf.d/\"]
# The agent's own config, identity and state are never readable or writable.
";

fn edge_toml(o: &EnrollOptions, hub_key: &str, prefix: &str) -> Result<String, EnrollError> {
    let d = &o.install_dir;
    let values = EdgeToml {
        node: &o.node,
        nats_url: &o.nats_url,
        ca_file: d.join("ca.pem").display().to_string(),
        nkey_file: d.join("node.nk").display().to_string(),
        hub_key,
        prefix,
        state_dir: "/var/lib/outpost",
        labels: &o.labels,
        tls_first: true,
    };
    let body = toml::to_string(&values).map_err(|e| EnrollError::Nkey(e.to_string()))?;
    Ok(format!(
        "# outpost-edge config for {}, made by `outpost-hub enroll`.\n{body}\n{ALLOW_EXAMPLE}",
        o.node
    ))
}

/// Cut a unit off: drop it from the list and `auth.conf`.
pub fn revoke(pki: &Path, node: &str) -> Result<Unit, EnrollError> {
    let mut units = Units::load(pki)?;
    let unit = units
        .units
        .remove(node)
        .ok_or_else(|| EnrollError::Unknown(node.into()))?;
    units.save(pki)?;
    Ok(unit)
}

/// Ask the running nats-server to reload its config (SIGHUP to the pid in its pid
/// file). Returns false when no broker is running from this PKI directory.
pub fn reload_broker(pki: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(pki.join(NATS_PID)) else {
        return false;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return false;
    };
    // SAFETY: kill(2) with SIGHUP; a stale pid file at worst signals nothing (ESRCH).
    unsafe { libc_kill(pid, 1) == 0 }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enroll_writes_a_bundle_and_permissions_and_revoke_removes_them() {
        let dir = tempfile::tempdir().unwrap();
        let pki_dir = dir.path().join("pki");
        pki::init(&pki::InitOptions {
            dir: pki_dir.clone(),
            hosts: vec!["localhost".into()],
            listen: "127.0.0.1:4222".into(),
            force: false,
        })
        .unwrap();
        let out = dir.path().join("bundle");
        let o = EnrollOptions {
            pki: pki_dir.clone(),
            node: "pi-1".into(),
            labels: vec!["site=a".into()],
            out: out.clone(),
            install_dir: "/etc/outpost".into(),
            nats_url: "tls://hub:4222".into(),
            force: false,
        };
        let u = enroll(&o).unwrap();
        let auth = std::fs::read_to_string(pki_dir.join(AUTH_CONF)).unwrap();
        assert!(auth.contains(&u.nkey));
        assert!(
            auth.contains("\"outpost.node.pi-1.cmd\", \"_INBOX_pi-1.>\""),
            "{auth}"
        );
        assert!(auth.contains("publish: [\"outpost.hub.*.pi-1\"]"), "{auth}");
        // The hub's messaging identity cannot write to the store or its own subjects.
        assert!(auth.contains("deny: [\"$KV.>\", \"$JS.>\""), "{auth}");
        assert!(pki_dir.join(HUB_STORE_NKEY).is_file());
        let toml = std::fs::read_to_string(out.join("edge.toml")).unwrap();
        assert!(toml.contains("nkey_file = \"/etc/outpost/node.nk\"") && toml.contains("site=a"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("node.nk"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0);
        assert!(matches!(enroll(&o), Err(EnrollError::Exists(_))));
        // Whatever is passed ends up quoted: no TOML of its own (issue 13, finding 9).
        let evil = EnrollOptions {
            node: "pi-2".into(),
            labels: vec!["site=a\"\n[allow]\nexec = [\"...\"]".into()],
            ..o.clone()
        };
        assert!(matches!(enroll(&evil), Err(EnrollError::Label(_))));
        let evil = EnrollOptions {
            node: "pi-2".into(),
            nats_url: "tls://x:1\"\n[allow]\nmethods = [\"exec\"]\nexec = [\"...\"]\n#".into(),
            install_dir: "/etc/outpost\"\nx = \"".into(),
            out: dir.path().join("bundle2"),
            ..o.clone()
        };
        enroll(&evil).unwrap();
        let text = std::fs::read_to_string(dir.path().join("bundle2/edge.toml")).unwrap();
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(parsed["nats_url"].as_str(), Some(evil.nats_url.as_str()));
        assert_eq!(
            parsed["allow"]["methods"].as_array().unwrap().len(),
            2,
            "only the generated [allow]: {text}"
        );
        assert!(!parsed.contains_key("x"));
        revoke(&pki_dir, "pi-1").unwrap();
        let auth = std::fs::read_to_string(pki_dir.join(AUTH_CONF)).unwrap();
        assert!(!auth.contains(&u.nkey));
        assert!(matches!(
            revoke(&pki_dir, "pi-1"),
            Err(EnrollError::Unknown(_))
        ));
    }
}
