//! `outpost-hub`: parse flags, install logging, and run one subcommand.

use anyhow::Context;
use clap::{Parser, Subcommand};
use outpost_hub::cli::{self, exit};
use outpost_hub::conn::NatsArgs;
use outpost_hub::keys::Keys;
use outpost_hub::store::Retention;
use outpost_hub::{enroll, pki, serve};
use outpost_wire::api::SendRequest;
use outpost_wire::subject::Subjects;
use outpost_wire::{Exec, FileRead, FileWrite, Method, MsgId, now_ms};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// outpost hub: commands a fleet of edge units over NATS and knows, at all times,
/// the state of every unit and every command.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the hub daemon: persist, sign and deliver commands; store outcomes.
    Serve(ServeArgs),
    /// Send a command to a unit and wait for its outcome.
    #[command(after_help = SEND_HELP)]
    Send(SendArgs),
    /// List units: online or offline since when, inventory, clock, pending commands.
    /// Pages through the fleet; filters run at the hub.
    #[command(
        after_help = "Examples:\n  outpost-hub nodes --offline\n  outpost-hub nodes 'pi-*' --selector 'site=oslo,role!=camera'\n  outpost-hub nodes pi-17 --json"
    )]
    Nodes {
        #[command(flatten)]
        nats: NatsArgs,
        /// Only units whose name matches this glob (`*`, `?`); a plain name shows one unit.
        name: Option<String>,
        /// Only units whose enrolment labels match (`site=oslo,role!=camera,tier in (a,b)`).
        #[arg(long, short = 'l')]
        selector: Option<String>,
        /// Only units online now.
        #[arg(long, conflicts_with = "offline")]
        online: bool,
        /// Only units offline now (or never seen).
        #[arg(long)]
        offline: bool,
        /// Print JSON (one array) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Wait until a unit is online, optionally with a given agent version and a hello
    /// from after a restart: what deploy tools run after upgrading an agent.
    #[command(
        after_help = "Exit status: 0 once the unit is online as asked; 1 when the \
time runs out (the message says what the hub sees); 255 outpost could not ask.\n\n\
Example (after restarting the agent at unix time T ms):\n  \
outpost-hub wait-online pi-17 --agent-version 0.2.0 --started-after T --timeout 2m"
    )]
    WaitOnline {
        #[command(flatten)]
        nats: NatsArgs,
        /// The unit.
        node: String,
        /// The agent version it must report.
        #[arg(long)]
        agent_version: Option<String>,
        /// Its agent must have started at or after this time (ms since the epoch, the
        /// unit's clock), e.g. just before it was restarted.
        #[arg(long, value_name = "MS")]
        started_after: Option<u64>,
        /// How long to wait.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Show one command: its state, attempts, outcome and output.
    Show {
        #[command(flatten)]
        nats: NatsArgs,
        /// The command id (32 hex digits, as `send` prints it).
        id: MsgId,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fleet PKI: CA, NATS server certificate, command-signing key, nats-server config.
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Enrol a unit: its own NATS identity and permissions, and the bundle it needs
    /// (edge.toml, ca.pem, node.nk). Reloads the broker.
    Enroll(EnrollArgs),
    /// Cut a unit off: its identity leaves auth.conf and units.json, the local broker
    /// is reloaded, and the hub cancels the unit's pending commands when it reads the
    /// list. With a broker elsewhere, copy auth.conf there and reload it (the Ansible
    /// playbook does).
    Revoke {
        /// The PKI directory (from `pki init`).
        #[arg(long, env = "OUTPOST_PKI_DIR")]
        pki: PathBuf,
        node: String,
        /// Only rewrite the broker's auth.conf; do not signal the broker.
        #[arg(long)]
        no_reload: bool,
    },
    /// List enrolled units.
    Enrolled {
        #[arg(long, env = "OUTPOST_PKI_DIR")]
        pki: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct EnrollArgs {
    /// The PKI directory (from `pki init`).
    #[arg(long, env = "OUTPOST_PKI_DIR")]
    pki: PathBuf,
    /// The unit's name.
    node: String,
    /// A label key=value for selectors (`send --selector`, `nodes --selector`);
    /// repeatable. Kept in units.json: the unit cannot change its own labels.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Where to write the bundle [default: <pki>/bundles/<node>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where the bundle's files will be on the unit (paths inside edge.toml).
    #[arg(long, default_value = "/etc/outpost")]
    install_dir: PathBuf,
    /// The broker URL as the unit reaches it.
    #[arg(long, env = "OUTPOST_NATS_URL", default_value = "tls://127.0.0.1:4222")]
    nats_url: String,
    /// Replace an enrolled unit's key (the old key stops working).
    #[arg(long)]
    force: bool,
    /// Only rewrite the broker's auth.conf; do not signal the broker.
    #[arg(long)]
    no_reload: bool,
}

const SEND_HELP: &str = "\
Examples:
  outpost-hub send --to pi-17 -- uname -a
  outpost-hub send --to pi-17 --domain nginx --timeout 2m -- systemctl reload nginx
  outpost-hub send --to pi-17 --method file.write --data-file motd -- /etc/motd
  outpost-hub send --to pi-17 --method file.read -- /etc/os-release
  outpost-hub send --to pi-17 --method ping --no-wait
  outpost-hub send --to pi-1,pi-2,pi-3 -- systemctl is-active nginx
  outpost-hub send --to pi-1,pi-2 --method hub.keys -- hub-signing.pub hub-signing-2.pub

Exit status: 0 when the command succeeded; the unit's exit code when it failed with
one; 1 failed without an exit code; 124 timed out on the unit; 125 rejected by the
unit; 126 expired before the unit accepted it (or before it started, on the unit);
75 the deadline passed and the hub cannot tell whether the unit accepted it (its
answer was lost; the record shows the outcome if one comes); 255 outpost could not
do it (bad input, an unknown or revoked unit, broker or hub unreachable). With several units: 0 when every one succeeded,
else the status of the first unit (in the order given) that did not; 255 when a
unit's command could not be queued (the others are still sent).";

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// The hub's JetStream identity (`hub-store.nk` from `pki init`) [default: beside
    /// --nkey-file]. The --nkey-file identity then only talks to units and operators
    /// and cannot write to the store (ADR 0005).
    #[arg(long, env = "OUTPOST_STORE_NKEY_FILE")]
    store_nkey_file: Option<PathBuf>,
    /// The enrolment list (`units.json` from `pki init`/`enroll`): the units that may
    /// be commanded, with their labels. Re-read when it changes [default: beside
    /// --nkey-file, if there].
    #[arg(long, env = "OUTPOST_UNITS_FILE")]
    units: Option<PathBuf>,
    /// The hub's command-signing key (PKCS#8, from `pki init`): the key units are
    /// enrolled with.
    #[arg(long, env = "OUTPOST_SIGNING_KEY")]
    signing_key: PathBuf,
    /// During a key rotation, the next signing key: used for units that report they
    /// trust it (see `docs/adr/0005-security.md`, key rotation).
    #[arg(long, env = "OUTPOST_NEXT_SIGNING_KEY")]
    next_signing_key: Option<PathBuf>,
    /// How long finished commands are kept (`show`, history) before they expire.
    #[arg(long, env = "OUTPOST_RETENTION", default_value = "30d", value_parser = humantime::parse_duration)]
    retention: Duration,
    /// At most this many bytes of finished commands (oldest dropped first); -1: no limit.
    #[arg(long, env = "OUTPOST_HISTORY_MAX_BYTES", default_value_t = -1, allow_negative_numbers = true)]
    history_max_bytes: i64,
    /// This hub's name, carried in every command it issues.
    #[arg(long, env = "OUTPOST_HUB_NAME", default_value = "hub")]
    name: String,
    /// How long to wait for a unit's ACK before retrying.
    #[arg(long, env = "OUTPOST_ACK_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    ack_timeout: Duration,
}

#[derive(clap::Args)]
struct SendArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// The unit to command. Several (comma-separated or repeated) get the same
    /// command each: their outputs are printed with the unit's name before each
    /// line, and `send` exits 0 only if every one succeeded.
    #[arg(long, required = true, value_delimiter = ',', value_name = "UNIT")]
    to: Vec<String>,
    /// What to do: exec, ping, file.write, file.read, hub.keys (the hub keys the unit
    /// trusts from now on, after --: public keys as hex or .pub files; the set must
    /// keep the key that signs it).
    #[arg(long, short, default_value = "exec")]
    method: String,
    /// What it is for (state is kept per unit, method and domain), e.g. nginx.
    #[arg(long, short, default_value = "")]
    domain: String,
    /// How long the method may run on the unit (default: the unit's, 5 minutes).
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// How long the hub keeps trying to deliver before the command expires.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    deadline: Duration,
    /// exec: an environment variable KEY=VALUE; repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// exec: working directory on the unit.
    #[arg(long)]
    cwd: Option<String>,
    /// file.write: local file with the new contents (`-` for stdin).
    #[arg(long)]
    data_file: Option<PathBuf>,
    /// file.write: permission bits, octal.
    #[arg(long, default_value = "0644")]
    mode: String,
    /// file.read: read at most this many bytes (0: the unit's output cap).
    #[arg(long, default_value_t = 0)]
    max_bytes: u32,
    /// Return once the hub has queued the command; print its id.
    #[arg(long)]
    no_wait: bool,
    /// Print the final record as JSON instead of the output.
    #[arg(long)]
    json: bool,
    /// exec: the program and its arguments; file.*: the path on the unit.
    #[arg(last = true)]
    args: Vec<String>,
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Make a new fleet PKI in a directory.
    Init {
        /// Directory to write into (created if missing).
        #[arg(long, env = "OUTPOST_PKI_DIR")]
        dir: PathBuf,
        /// DNS name or IP the NATS server is reached at; repeatable.
        #[arg(long = "host", default_values = ["localhost", "127.0.0.1"])]
        hosts: Vec<String>,
        /// host:port nats-server listens on.
        #[arg(long, default_value = "127.0.0.1:4222")]
        listen: String,
        /// Replace an existing PKI.
        #[arg(long)]
        force: bool,
    },
    /// Make a new command-signing key (for a rotation: see docs/adr/0005-security.md):
    /// FILE (PKCS#8, secret) and FILE with .pub (what units are told to trust).
    SigningKey {
        /// Where to write the key, e.g. hub-signing-2.pk8.
        out: PathBuf,
    },
}

/// `--timeout` as the wire has it: ms, 0 for the unit's default.
fn timeout_ms(a: &SendArgs) -> u32 {
    a.timeout
        .map_or(0, |t| t.as_millis().clamp(1, u32::MAX as u128) as u32)
}

fn method_of(a: &SendArgs) -> anyhow::Result<Method> {
    let one_path = || -> anyhow::Result<String> {
        match a.args.as_slice() {
            [p] => Ok(p.clone()),
            _ => anyhow::bail!("{} takes exactly one path after --", a.method),
        }
    };
    Ok(match a.method.as_str() {
        "ping" => Method::Ping,
        "exec" => {
            if a.args.is_empty() {
                anyhow::bail!("exec needs a program after --, e.g. `send --to pi-1 -- uname -a`");
            }
            let env = a
                .env
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .with_context(|| format!("--env {kv:?}: write KEY=VALUE"))
                })
                .collect::<anyhow::Result<_>>()?;
            Method::Exec(Exec {
                argv: a.args.clone(),
                env,
                cwd: a.cwd.clone(),
            })
        }
        "file.write" => {
            let src = a
                .data_file
                .as_ref()
                .context("file.write needs --data-file FILE (or - for stdin)")?;
            let data = if src.as_os_str() == "-" {
                let mut d = Vec::new();
                std::io::stdin().read_to_end(&mut d)?;
                d
            } else {
                std::fs::read(src).with_context(|| format!("cannot read {}", src.display()))?
            };
            let mode = u32::from_str_radix(a.mode.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .with_context(|| {
                    format!("--mode {:?} is not an octal permission like 0644", a.mode)
                })?;
            Method::FileWrite(FileWrite {
                path: one_path()?,
                mode,
                data,
            })
        }
        "file.read" => Method::FileRead(FileRead {
            path: one_path()?,
            max_bytes: a.max_bytes,
        }),
        "hub.keys" => {
            if a.args.is_empty() || a.args.len() > outpost_wire::MAX_HUB_KEYS {
                anyhow::bail!(
                    "hub.keys takes 1 to {} public keys after -- (hex, or a .pub file)",
                    outpost_wire::MAX_HUB_KEYS
                );
            }
            let keys = a
                .args
                .iter()
                .map(|k| {
                    let text = match std::path::Path::new(k).is_file() {
                        true => std::fs::read_to_string(k)
                            .with_context(|| format!("cannot read {k}"))?,
                        false => k.clone(),
                    };
                    text.trim()
                        .parse::<outpost_wire::sign::PublicKey>()
                        .map(|p| p.0)
                        .map_err(|_| {
                            anyhow::anyhow!(
                                "{k:?} is not a public key (64 hex digits) nor a file holding one"
                            )
                        })
                })
                .collect::<anyhow::Result<_>>()?;
            Method::HubKeys(outpost_wire::HubKeys { keys })
        }
        other => anyhow::bail!(
            "unknown method {other:?}: use exec, ping, file.write, file.read or hub.keys"
        ),
    })
}

/// `RUST_LOG` wins; otherwise the daemon logs at info and the CLI only warnings, so
/// a command's output is not mixed with connection chatter.
fn report_reload(pki: &std::path::Path, no_reload: bool) {
    if no_reload {
        println!("broker not signalled (--no-reload): reload it to apply auth.conf");
    } else if enroll::reload_broker(pki) {
        println!("broker reloaded");
    } else {
        println!(
            "no broker runs from {}: copy {} to the broker's config dir and reload it (`nats-server --signal reload`); the Ansible playbook does both",
            pki.display(),
            pki.join(enroll::AUTH_CONF).display()
        );
    }
}

fn init_logging(daemon: bool) {
    let default = if daemon {
        "info,async_nats=warn"
    } else {
        "warn,async_nats=error"
    };
    let filter: tracing_subscriber::filter::Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| default.parse().expect("valid filter"));
    use tracing_subscriber::prelude::*;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .init();
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<u8> {
    match cmd {
        Cmd::Serve(a) => {
            let keys = Keys::load(&a.signing_key, a.next_signing_key.as_deref())?;
            outpost_wire::names::check_node(&a.name).context("--name")?;
            let beside = |file: &str| {
                a.nats
                    .nkey_file
                    .as_ref()
                    .and_then(|k| k.parent())
                    .map(|d| d.join(file))
                    .filter(|p| p.is_file())
            };
            let store_nkey = a
                .store_nkey_file
                .clone()
                .or_else(|| beside(enroll::HUB_STORE_NKEY));
            let units = a.units.clone().or_else(|| beside(enroll::UNITS_FILE));
            if units.is_none() {
                tracing::warn!(
                    "no enrolment list (--units): any unit that says hello can be commanded, and an unknown name is refused only once the hub has never heard of it"
                );
            }
            let msg = a
                .nats
                .connect_daemon(
                    &format!("outpost-hub {}", a.name),
                    &outpost_wire::subject::hub_inbox(&a.name, "msg"),
                    a.nats.nkey_file.as_deref(),
                )
                .await?;
            let store = match &store_nkey {
                Some(k) => {
                    a.nats
                        .connect_daemon(
                            &format!("outpost-hub {} store", a.name),
                            &outpost_wire::subject::hub_inbox(&a.name, "store"),
                            Some(k),
                        )
                        .await?
                }
                None => {
                    tracing::warn!(
                        "no store identity (--store-nkey-file, hub-store.nk): one connection for messages and store, so a forged reply subject is stopped by the hub's own checks only"
                    );
                    msg.clone()
                }
            };
            let cfg = serve::ServeConfig {
                name: a.name,
                prefix: a.nats.prefix.clone(),
                keys,
                ack_timeout: a.ack_timeout,
                units_file: units,
                retention: Retention {
                    max_age: a.retention,
                    max_bytes: a.history_max_bytes,
                },
            };
            serve::serve(cfg, msg, store, shutdown_signal()).await?;
            Ok(0)
        }
        Cmd::Send(a) if a.to.len() > 1 => {
            let mut seen = std::collections::HashSet::new();
            if let Some(twice) = a.to.iter().find(|t| !seen.insert(t.as_str())) {
                anyhow::bail!("--to names {twice} twice");
            }
            let many = cli::Many {
                domain: a.domain.clone(),
                method: method_of(&a)?,
                timeout_ms: timeout_ms(&a),
                ttl_ms: a.deadline.as_millis() as u64,
            };
            let client = a.nats.connect_once("outpost-hub send").await?;
            let subjects = Subjects::new(&a.nats.prefix);
            let results =
                cli::send_many(&client, &subjects, &a.to, many, !a.no_wait, !a.json).await?;
            if a.json {
                let v: Vec<serde_json::Value> = results
                    .iter()
                    .map(|(node, r)| match r {
                        Ok(rec) => cli::record_json(rec),
                        Err(e) => {
                            serde_json::json!({ "node": node, "error": e.message, "code": e.code })
                        }
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if a.no_wait {
                for (node, r) in &results {
                    match r {
                        Ok(rec) => println!("{node}\t{}", rec.id),
                        Err(e) => eprintln!("outpost: {node}: not queued: {e}"),
                    }
                }
            }
            if !a.json && !a.no_wait {
                cli::print_many(&results)?;
            }
            Ok(cli::many_exit_code(&results))
        }
        Cmd::Send(a) => {
            let method = method_of(&a)?;
            let req = SendRequest {
                id: MsgId::new(now_ms()),
                to: a.to[0].clone(),
                domain: a.domain.clone(),
                method,
                timeout_ms: timeout_ms(&a),
                ttl_ms: a.deadline.as_millis() as u64,
            };
            let client = a.nats.connect_once("outpost-hub send").await?;
            let subjects = Subjects::new(&a.nats.prefix);
            let rec = cli::send(&client, &subjects, req, !a.no_wait, !a.json).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&cli::record_json(&rec))?);
            } else if a.no_wait {
                println!("{}", rec.id);
            } else {
                cli::print_outcome(&rec)?;
            }
            Ok(if a.no_wait { 0 } else { cli::exit_code(&rec) })
        }
        Cmd::Nodes {
            nats,
            name,
            selector,
            online,
            offline,
            json,
        } => {
            let client = nats.connect_once("outpost-hub nodes").await?;
            let subjects = Subjects::new(&nats.prefix);
            let filter = cli::NodesFilter {
                online: match (online, offline) {
                    (true, _) => Some(true),
                    (_, true) => Some(false),
                    _ => None,
                },
                name: name.unwrap_or_default(),
                selector: selector.unwrap_or_default(),
            };
            if json {
                let mut all = vec![];
                cli::nodes_paged(&client, &subjects, &filter, |p| {
                    all.extend(p.nodes.iter().cloned())
                })
                .await?;
                println!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(0);
            }
            // Each page as it arrives: the first lines show at once in a big fleet.
            let mut first = true;
            let mut matched = 0;
            let mut out = std::io::stdout().lock();
            cli::nodes_paged(&client, &subjects, &filter, |p| {
                use std::io::Write;
                let _ = out.write_all(cli::nodes_table(&p.nodes, first).as_bytes());
                if first {
                    matched = p.matched;
                }
                first = false;
            })
            .await?;
            if matched == 0 {
                eprintln!("outpost-hub: no unit matches");
            }
            Ok(0)
        }
        Cmd::WaitOnline {
            nats,
            node,
            agent_version,
            started_after,
            timeout,
        } => {
            let client = nats.connect_once("outpost-hub wait-online").await?;
            let want = cli::OnlineWant {
                agent_version,
                started_after,
            };
            let subjects = Subjects::new(&nats.prefix);
            match cli::wait_online(&client, &subjects, &node, &want, timeout).await? {
                Ok(n) => {
                    println!(
                        "{} is online with agent {} (started at {} ms)",
                        n.name, n.agent_version, n.agent_started_at
                    );
                    Ok(0)
                }
                Err(why) => {
                    eprintln!("outpost-hub: {why}");
                    Ok(1)
                }
            }
        }
        Cmd::Show { nats, id, json } => {
            let client = nats.connect_once("outpost-hub show").await?;
            let rec = cli::show(&client, &Subjects::new(&nats.prefix), id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&cli::record_json(&rec))?);
            } else {
                print!("{}", cli::record_text(&rec));
            }
            Ok(0)
        }
        Cmd::Pki(PkiCmd::SigningKey { out }) => {
            if out.exists() {
                anyhow::bail!("{} exists: choose a new name", out.display());
            }
            let der = outpost_wire::sign::SigningKey::generate_pkcs8()?;
            let public = outpost_wire::sign::SigningKey::from_pkcs8(&der)?.public();
            let pub_file = out.with_extension("pub");
            pki::write_file(&out, &der, true)?;
            pki::write_file(&pub_file, format!("{public}\n").as_bytes(), false)?;
            println!("signing key: {} (secret)", out.display());
            println!("public key:  {} ({public})", pub_file.display());
            println!(
                "next: `send --method hub.keys -- CURRENT.pub {}` to every unit, then serve with --next-signing-key {}",
                pub_file.display(),
                out.display()
            );
            Ok(0)
        }
        Cmd::Pki(PkiCmd::Init {
            dir,
            hosts,
            listen,
            force,
        }) => {
            pki::init(&pki::InitOptions {
                dir: dir.clone(),
                hosts,
                listen,
                force,
            })?;
            println!("fleet PKI written to {}", dir.display());
            println!(
                "  start the broker:  nats-server -c {}",
                dir.join(pki::NATS_CONF).display()
            );
            println!(
                "  hub signing key:   {}",
                dir.join(pki::SIGNING_KEY).display()
            );
            println!(
                "  units pin:         {} and the key in {}",
                dir.join(pki::CA_CERT).display(),
                dir.join(pki::SIGNING_PUB).display()
            );
            println!(
                "  hub identity:      --nkey-file {}",
                dir.join(enroll::HUB_NKEY).display()
            );
            println!(
                "  operator identity: --nkey-file {}",
                dir.join(enroll::OPERATOR_NKEY).display()
            );
            println!(
                "  enrol a unit:      outpost-hub enroll --pki {} NODE",
                dir.display()
            );
            Ok(0)
        }
        Cmd::Enroll(a) => {
            let out = a
                .out
                .clone()
                .unwrap_or_else(|| a.pki.join("bundles").join(&a.node));
            let unit = enroll::enroll(&enroll::EnrollOptions {
                pki: a.pki.clone(),
                node: a.node.clone(),
                labels: a.labels,
                out: out.clone(),
                install_dir: a.install_dir,
                nats_url: a.nats_url,
                force: a.force,
            })?;
            println!("enrolled {} (nkey {})", a.node, unit.nkey);
            println!(
                "bundle for the unit: {} (edge.toml, ca.pem, node.nk)",
                out.display()
            );
            report_reload(&a.pki, a.no_reload);
            Ok(0)
        }
        Cmd::Revoke {
            pki,
            node,
            no_reload,
        } => {
            enroll::revoke(&pki, &node)?;
            println!("revoked {node}: its nkey is no longer in auth.conf nor units.json");
            report_reload(&pki, no_reload);
            println!(
                "the hub cancels {node}'s pending commands when it reads {} (within seconds if it reads this file)",
                pki.join(enroll::UNITS_FILE).display()
            );
            Ok(0)
        }
        Cmd::Enrolled { pki, json } => {
            let units = enroll::Units::load(&pki)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&units.units)?);
            } else {
                for (name, u) in &units.units {
                    println!("{name}\t{}\t{}", u.nkey, u.labels.join(","));
                }
            }
            Ok(0)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(matches!(cli.cmd, Cmd::Serve(_)));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outpost-hub: cannot start the runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("outpost-hub: {e:#}");
            ExitCode::from(exit::ERROR)
        }
    }
}
