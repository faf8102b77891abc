//! Enrolment: the list of units allowed on the broker, each with its own NATS nkey
//! and permissions, and the bundle one unit needs. `auth.conf` (included by the
//! generated nats-server config) is regenerated from the list on every change and
//! the broker reloaded, so enrol and revoke take effect at once.
//!
//! What each identity may do on the broker (prefix `p`):
//!
//! | who | publish | subscribe |
//! |---|---|---|
//! | hub | everything | everything |
//! | operator | `p.api.>` | `p.event.>`, `_INBOX.>` |
//! | unit N | `p.hub.result.N`, `p.hub.hello.N`, `p.hub.log.N`, replies to requests it got | `p.node.N.cmd`, `_INBOX_N.>` |

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
    #[error("invalid label {0:?}: write key=value")]
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
    pub operator_nkey: String,
    pub units: BTreeMap<String, Unit>,
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
        let path = pki.join(UNITS_FILE);
        let text = std::fs::read_to_string(&path).map_err(read_err(&path))?;
        serde_json::from_str(&text).map_err(|e| EnrollError::Damaged {
            path,
            message: e.to_string(),
        })
    }

    pub fn save(&self, pki: &Path) -> Result<(), EnrollError> {
        let text = serde_json::to_string_pretty(self).expect("units serialise");
        write_file(&pki.join(UNITS_FILE), text.as_bytes(), false)?;
        write_file(&pki.join(AUTH_CONF), self.auth_conf().as_bytes(), false)?;
        Ok(())
    }

    /// The nats-server `authorization` block for this list.
    pub fn auth_conf(&self) -> String {
        let s = Subjects::new(&self.prefix);
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
        out.push_str(&format!(
            "    {{ nkey: \"{}\", permissions: {{ publish: \">\", subscribe: \">\" }} }}\n",
            self.hub_nkey
        ));
        out.push_str(&format!(
            "    {{ nkey: \"{}\", permissions: {{ publish: [{}], subscribe: [{}] }} }}\n",
            self.operator_nkey,
            q(&[s.api(">")]),
            q(&[format!("{}.event.>", s.prefix()), "_INBOX.>".into()]),
        ));
        for (node, u) in &self.units {
            let publish = [s.result(node), s.hello(node), s.log(node)];
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
        operator_nkey: op_pub,
        units: BTreeMap::new(),
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
        if !l.contains('=') || l.starts_with('=') {
            return Err(EnrollError::Label(l.clone()));
        }
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
    let d = o.install_dir.display();
    let labels = o
        .labels
        .iter()
        .map(|l| format!("\"{l}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let toml = format!(
        "# outpost-edge config for {node}, made by `outpost-hub enroll`.\n\
         node = \"{node}\"\n\
         nats_url = \"{url}\"\n\
         ca_file = \"{d}/ca.pem\"\n\
         nkey_file = \"{d}/node.nk\"\n\
         hub_key = \"{key}\"\n\
         prefix = \"{prefix}\"\n\
         state_dir = \"/var/lib/outpost\"\n\
         labels = [{labels}]\n\
         \n\
         # What this unit may run. Nothing remote can widen it; the default is ping only.\n\
         [allow]\n\
         methods = [\"ping\"]\n\
         # methods = [\"ping\", \"exec\", \"file.read\", \"file.write\"]\n\
         # exec = [\"systemctl restart *\", \"uname ...\"]   # argv globs; a last `...` matches any rest\n\
         # read = [\"/etc/\", \"/var/log/\"]                  # path prefixes\n\
         # write = [\"/etc/outpost/\"]\n",
        node = o.node,
        url = o.nats_url,
        key = hub_key.trim(),
        prefix = units.prefix,
    );
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
        assert!(auth.contains("\"outpost.hub.result.pi-1\""));
        let toml = std::fs::read_to_string(out.join("edge.toml")).unwrap();
        assert!(toml.contains("nkey_file = \"/etc/outpost/node.nk\"") && toml.contains("site=a"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("node.nk"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0);
        assert!(matches!(enroll(&o), Err(EnrollError::Exists(_))));
        revoke(&pki_dir, "pi-1").unwrap();
        let auth = std::fs::read_to_string(pki_dir.join(AUTH_CONF)).unwrap();
        assert!(!auth.contains(&u.nkey));
        assert!(matches!(
            revoke(&pki_dir, "pi-1"),
            Err(EnrollError::Unknown(_))
        ));
    }
}
