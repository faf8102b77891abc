//! NATS connections of the hub and the operator CLI: TLS pinned to the fleet CA, always.

use async_nats::{Client, ConnectOptions, Event};
use std::path::PathBuf;
use std::time::Duration;
use tracing::{info, warn};

/// Where the broker is and which CA its certificate chains to.
#[derive(clap::Args, Debug, Clone)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated; must be tls://.
    #[arg(long, env = "OUTPOST_NATS_URL", default_value = "tls://127.0.0.1:4222")]
    pub nats_url: String,
    /// The fleet CA certificate (PEM), as made by `outpost-hub pki init`.
    #[arg(long, env = "OUTPOST_CA_FILE")]
    pub ca_file: PathBuf,
    /// This client's NATS nkey seed file: `hub.nk` for `serve`, `operator.nk` for the
    /// operator commands (both made by `pki init`).
    #[arg(long, env = "OUTPOST_NKEY_FILE")]
    pub nkey_file: Option<PathBuf>,
    /// Subject prefix shared by hub and units.
    #[arg(long, env = "OUTPOST_PREFIX", default_value = outpost_wire::subject::DEFAULT_PREFIX)]
    pub prefix: String,
    /// Start TLS before the broker says anything (no plain-text INFO an attacker on
    /// the path could alter). The broker config from `pki init` allows it; pass
    /// `--tls-first false` for a broker configured before it did.
    #[arg(long, env = "OUTPOST_TLS_FIRST", default_value_t = true, action = clap::ArgAction::Set)]
    pub tls_first: bool,
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("nats url {0:?} is not TLS: use tls://host:port (outpost never speaks plain text)")]
    NotTls(String),
    #[error("CA file {0} does not exist (make one with `outpost-hub pki init`)")]
    NoCa(PathBuf),
    #[error("cannot reach NATS at {url}: {source}{hint}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
        hint: &'static str,
    },
    #[error("cannot read nkey file {path}: {source}")]
    Nkey {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn hint(e: &async_nats::ConnectError, has_key: bool) -> &'static str {
    let text = e.to_string();
    if text.contains("tls") || text.contains("TLS") || text.contains("handshake") {
        return " (if the broker's config predates TLS-first (no handshake_first in its tls block), pass --tls-first false or regenerate it with `outpost-hub pki init`)";
    }
    match e.kind() {
        async_nats::ConnectErrorKind::AuthorizationViolation if !has_key => {
            " (the broker wants an identity: pass --nkey-file, e.g. the operator.nk that `pki init` made)"
        }
        async_nats::ConnectErrorKind::AuthorizationViolation => {
            " (this nkey is not allowed: enrolled and not revoked?)"
        }
        _ => "",
    }
}

impl NatsArgs {
    fn options(&self, name: &str) -> Result<ConnectOptions, ConnError> {
        self.options_as(name, self.nkey_file.as_deref())
    }

    fn options_as(
        &self,
        name: &str,
        nkey_file: Option<&std::path::Path>,
    ) -> Result<ConnectOptions, ConnError> {
        if !self
            .nats_url
            .split(',')
            .all(|u| u.trim().starts_with("tls://"))
        {
            return Err(ConnError::NotTls(self.nats_url.clone()));
        }
        if !self.ca_file.is_file() {
            return Err(ConnError::NoCa(self.ca_file.clone()));
        }
        let mut opts = ConnectOptions::new();
        if let Some(path) = nkey_file {
            let seed = std::fs::read_to_string(path).map_err(|source| ConnError::Nkey {
                path: path.to_path_buf(),
                source,
            })?;
            opts = opts.nkey(seed.trim().to_string());
        }
        if self.tls_first {
            opts = opts.tls_first();
        }
        Ok(opts
            .name(name)
            .add_root_certificates(self.ca_file.clone())
            .require_tls(true)
            .connection_timeout(Duration::from_secs(5)))
    }

    fn connect_error(&self, source: async_nats::ConnectError) -> ConnError {
        ConnError::Connect {
            url: self.nats_url.clone(),
            hint: hint(&source, self.nkey_file.is_some()),
            source,
        }
    }

    /// A short-lived operator connection: fails at once if the broker is not there.
    pub async fn connect_once(&self, name: &str) -> Result<Client, ConnError> {
        self.options(name)?
            .connect(self.nats_url.as_str())
            .await
            .map_err(|source| self.connect_error(source))
    }

    /// One of the daemon's connections: as the identity in `nkey_file`, with its own
    /// reply inbox; waits for the broker and reconnects forever.
    pub async fn connect_daemon(
        &self,
        name: &str,
        inbox: &str,
        nkey_file: Option<&std::path::Path>,
    ) -> Result<Client, ConnError> {
        self.options_as(name, nkey_file)?
            .custom_inbox_prefix(inbox)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|n| Duration::from_millis((100u64 << n.min(6)).min(5000)))
            .event_callback(|e| async move {
                match e {
                    Event::Connected => info!(event = %e, "nats connection"),
                    _ => warn!(event = %e, "nats connection"),
                }
            })
            .connect(self.nats_url.as_str())
            .await
            .map_err(|source| self.connect_error(source))
    }
}
