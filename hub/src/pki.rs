//! `outpost-hub pki init`: the fleet CA, the NATS server's certificate, the hub's
//! command-signing key, and a nats-server config with TLS and JetStream.
//!
//! No plain-text NATS anywhere: the generated server config only has a TLS listener.

use outpost_wire::sign::SigningKey;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// File names inside the PKI directory (shared with the Ansible role and the docs).
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const SIGNING_KEY: &str = "hub-signing.pk8";
pub const SIGNING_PUB: &str = "hub-signing.pub";
pub const NATS_CONF: &str = "nats-server.conf";

/// What `init` makes.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub dir: PathBuf,
    /// DNS names and IP addresses the server certificate is valid for.
    pub hosts: Vec<String>,
    /// The address nats-server listens on.
    pub listen: String,
    /// Overwrite an existing PKI.
    pub force: bool,
}

/// The subject prefix the broker permissions are written for.
pub const DEFAULT_PREFIX: &str = outpost_wire::subject::DEFAULT_PREFIX;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(
        "{0} already exists: pass --force to replace the whole PKI (every unit must then get the new CA)"
    )]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("{0}")]
    Key(#[from] outpost_wire::sign::KeyError),
    #[error("{0}")]
    Other(String),
}

/// Write a file; `secret` files are created 0600 from the start, never widened later.
pub fn write_file(path: &Path, data: &[u8], secret: bool) -> Result<(), PkiError> {
    let werr = |source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    opts.mode(if secret { 0o600 } else { 0o644 });
    let mut f = opts.open(path).map_err(werr)?;
    f.write_all(data).map_err(werr)?;
    f.sync_all().map_err(werr)
}

/// Make the CA, server certificate, signing key and nats-server config in `opts.dir`.
pub fn init(opts: &InitOptions) -> Result<(), PkiError> {
    let dir = &opts.dir;
    fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.clone(),
        source,
    })?;
    if dir.join(CA_CERT).exists() && !opts.force {
        return Err(PkiError::Exists(dir.join(CA_CERT)));
    }

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "outpost fleet CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;

    let mut srv_params = CertificateParams::new(opts.hosts.clone())?;
    srv_params
        .distinguished_name
        .push(DnType::CommonName, "outpost nats-server");
    srv_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let srv_key = KeyPair::generate()?;
    let srv = srv_params.signed_by(&srv_key, &ca)?;

    let signing = SigningKey::generate_pkcs8()?;
    let public = SigningKey::from_pkcs8(&signing)?.public();

    write_file(&dir.join(CA_CERT), ca.pem().as_bytes(), false)?;
    write_file(&dir.join(CA_KEY), ca_key_pem.as_bytes(), true)?;
    write_file(&dir.join(SERVER_CERT), srv.pem().as_bytes(), false)?;
    write_file(
        &dir.join(SERVER_KEY),
        srv_key.serialize_pem().as_bytes(),
        true,
    )?;
    write_file(&dir.join(SIGNING_KEY), &signing, true)?;
    write_file(
        &dir.join(SIGNING_PUB),
        format!("{public}\n").as_bytes(),
        false,
    )?;
    crate::enroll::init(dir, DEFAULT_PREFIX).map_err(|e| match e {
        crate::enroll::EnrollError::Pki(p) => p,
        other => PkiError::Other(other.to_string()),
    })?;
    write_file(&dir.join(NATS_CONF), nats_conf(opts).as_bytes(), false)?;
    Ok(())
}

fn nats_conf(opts: &InitOptions) -> String {
    let d = opts.dir.canonicalize().unwrap_or_else(|_| opts.dir.clone());
    let d = d.display();
    format!(
        "# nats-server config made by `outpost-hub pki init`: TLS only, JetStream on,\n\
         # every client authenticated by nkey with permissions from auth.conf.\n\
         listen: \"{listen}\"\n\
         max_payload: 1MB\n\
         pid_file: \"{d}/nats-server.pid\"\n\
         include \"auth.conf\"\n\
         # handshake_first: clients that start TLS at once never see a plain-text INFO;\n\
         # clients that wait for INFO (agents before TLS-first) get it after 2 s.\n\
         tls {{\n  cert_file: \"{d}/{SERVER_CERT}\"\n  key_file: \"{d}/{SERVER_KEY}\"\n  ca_file: \"{d}/{CA_CERT}\"\n  timeout: 5\n  handshake_first: \"2s\"\n}}\n\
         jetstream {{\n  store_dir: \"{d}/jetstream\"\n}}\n",
        listen = opts.listen
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_writes_everything_and_refuses_to_clobber() {
        let dir = tempfile::tempdir().unwrap();
        let opts = InitOptions {
            dir: dir.path().to_path_buf(),
            hosts: vec!["localhost".into(), "127.0.0.1".into()],
            listen: "127.0.0.1:4222".into(),
            force: false,
        };
        init(&opts).unwrap();
        for (f, secret) in [
            (CA_CERT, false),
            (CA_KEY, true),
            (SERVER_KEY, true),
            (SIGNING_KEY, true),
            (NATS_CONF, false),
        ] {
            let mode = fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077 == 0, secret, "{f} mode {mode:o}");
        }
        let conf = fs::read_to_string(dir.path().join(NATS_CONF)).unwrap();
        assert!(conf.contains("tls {") && conf.contains("jetstream"));
        let e = init(&opts).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        init(&InitOptions {
            force: true,
            ..opts
        })
        .unwrap();
    }
}
