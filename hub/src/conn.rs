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
    /// Subject prefix shared by hub and units.
    #[arg(long, env = "OUTPOST_PREFIX", default_value = outpost_wire::subject::DEFAULT_PREFIX)]
    pub prefix: String,
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("nats url {0:?} is not TLS: use tls://host:port (outpost never speaks plain text)")]
    NotTls(String),
    #[error("CA file {0} does not exist (make one with `outpost-hub pki init`)")]
    NoCa(PathBuf),
    #[error("cannot reach NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
}

impl NatsArgs {
    fn options(&self, name: &str) -> Result<ConnectOptions, ConnError> {
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
        Ok(ConnectOptions::new()
            .name(name)
            .add_root_certificates(self.ca_file.clone())
            .require_tls(true)
            .connection_timeout(Duration::from_secs(5)))
    }

    /// A short-lived operator connection: fails at once if the broker is not there.
    pub async fn connect_once(&self, name: &str) -> Result<Client, ConnError> {
        self.options(name)?
            .connect(self.nats_url.as_str())
            .await
            .map_err(|source| ConnError::Connect {
                url: self.nats_url.clone(),
                source,
            })
    }

    /// The daemon's connection: waits for the broker and reconnects forever.
    pub async fn connect_daemon(&self, name: &str) -> Result<Client, ConnError> {
        self.options(name)?
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
            .map_err(|source| ConnError::Connect {
                url: self.nats_url.clone(),
                source,
            })
    }
}
