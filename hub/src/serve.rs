//! `outpost-hub serve`: the daemon's start, its tasks, and its stop. The work is in
//! the rooms around the command state machine:
//!
//! ```text
//! api.send ──▶ api ──▶ registry.check ──▶ ledger.create (open bucket) ──▶ delivery
//! delivery ──signed, per unit version and key──▶ unit ──Ack──▶ ledger.apply ──▶ machine
//! hub.result.<n> ──▶ reports ──▶ ledger.apply(Outcome) ──▶ history ──Receipt──▶ unit
//! hub.hello.<n>  ──▶ reports ──▶ registry (presence, inventory) ──▶ delivery.kick
//! ```
//! Two NATS identities (ADR 0005): `msg` talks to units and operators and may not
//! publish to JetStream or the hub's own subjects; `store` reaches JetStream only.

use crate::delivery::Delivery;
use crate::keys::Keys;
use crate::ledger::Ledger;
use crate::machine::Event;
use crate::registry::Registry;
use crate::store::{Retention, Store};
use async_nats::Client;
use futures_util::StreamExt;
use outpost_wire::now_ms;
use outpost_wire::subject::Subjects;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

/// Unit reports handled at once; further ones wait in the subscription (bounded by
/// async-nats' subscription capacity, then dropped by the client: units re-send).
pub const REPORT_CONCURRENCY: usize = 256;
/// API calls handled at once, apart from reports so a burst of one cannot starve the
/// other.
pub const API_CONCURRENCY: usize = 64;
/// How often the enrolment list is checked for changes (enrol, revoke).
pub const ENROLMENT_POLL: Duration = Duration::from_secs(5);
/// How long in-flight work may take to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the daemon needs.
pub struct ServeConfig {
    pub name: String,
    pub prefix: String,
    pub keys: Keys,
    pub ack_timeout: Duration,
    /// The enrolment list (`units.json`); `None`: units that say hello are enrolled.
    pub units_file: Option<PathBuf>,
    pub retention: Retention,
}

/// The daemon's shared parts.
pub struct Hub {
    pub name: String,
    pub subjects: Subjects,
    /// The messaging connection (units, operators, events).
    pub client: Client,
    pub store: Store,
    pub ledger: Arc<Ledger>,
    pub registry: Arc<Registry>,
    pub delivery: Arc<Delivery>,
}

/// Run the daemon until `shutdown` resolves. `msg` and `store` are the two
/// connections (they may be one client when only one identity is configured).
pub async fn serve(
    cfg: ServeConfig,
    msg: Client,
    store_client: Client,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    let js = async_nats::jetstream::new(store_client.clone());
    let store = loop {
        match Store::open(&js, &cfg.prefix, cfg.retention).await {
            Ok(s) => break s,
            Err(e) => {
                error!(error = %e, "cannot open the JetStream buckets (is JetStream enabled, nats-server ≥ 2.11?); retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    let subjects = Subjects::new(&cfg.prefix);
    let ledger = Arc::new(Ledger::new(store.clone(), msg.clone(), subjects.clone()));
    let registry = Arc::new(Registry::new(cfg.units_file.clone()));
    if let Err(e) = registry.reload() {
        warn!(error = %e, "cannot read the enrolment list; retrying every few seconds");
    }
    let delivery = Arc::new(Delivery::new(
        ledger.clone(),
        registry.clone(),
        msg.clone(),
        subjects.clone(),
        Arc::new(cfg.keys),
        cfg.ack_timeout,
    ));
    let hub = Arc::new(Hub {
        name: cfg.name,
        subjects: subjects.clone(),
        client: msg.clone(),
        store,
        ledger,
        registry,
        delivery,
    });
    // Subscribe before recovering so no report falls between the two.
    let reports = msg.subscribe(subjects.all_reports()).await?;
    let api = msg.subscribe(subjects.api("*")).await?;

    let (nodes, damaged_nodes) = hub.store.all_nodes().await?;
    let n_nodes = nodes.len();
    hub.registry.restore(nodes);
    let recovered = hub.ledger.recover().await?;
    for (node, at, id) in &recovered.open {
        hub.delivery.enqueue(node, *at, *id);
    }
    let _ = hub.registry.reload();
    // Revoked while the hub was down: the list no longer names a unit with open
    // commands.
    let mut revoked = hub.registry.take_revoked();
    for (node, _, _) in &recovered.open {
        if hub.registry.is_unlisted(node) && !revoked.contains(node) {
            revoked.push(node.clone());
        }
    }
    cancel_revoked(&hub, &revoked).await;
    info!(
        hub = %hub.name,
        prefix = %cfg.prefix,
        units = n_nodes,
        enrolled_list = ?hub.registry.units_file(),
        open_commands = recovered.open.len(),
        settled = recovered.settled,
        damaged_records = recovered.damaged + damaged_nodes,
        start_ms = t0.elapsed().as_millis() as u64,
        "hub serving"
    );

    let mut tasks = JoinSet::new();
    let report_slots = Arc::new(Semaphore::new(REPORT_CONCURRENCY));
    let api_slots = Arc::new(Semaphore::new(API_CONCURRENCY));
    {
        let hub = hub.clone();
        let slots = report_slots.clone();
        tasks.spawn(dispatch(reports, slots, move |m| {
            let hub = hub.clone();
            async move { crate::reports::on_report(&hub, m).await }
        }));
    }
    {
        let hub = hub.clone();
        let slots = api_slots.clone();
        tasks.spawn(dispatch(api, slots, move |m| {
            let hub = hub.clone();
            async move { crate::api::on_api(&hub, m).await }
        }));
    }
    {
        let ledger = hub.ledger.clone();
        tasks.spawn(async move { ledger.write_deferred().await });
    }
    tasks.spawn(watch_presence(hub.clone()));
    tasks.spawn(watch_enrolment(hub.clone()));

    shutdown.await;
    info!("hub shutting down: no new reports or calls; finishing what is in flight");
    tasks.abort_all();
    // In-flight handlers hold a slot each: wait for every slot to come back.
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _r = report_slots.acquire_many(REPORT_CONCURRENCY as u32).await;
        let _a = api_slots.acquire_many(API_CONCURRENCY as u32).await;
    })
    .await;
    if drained.is_err() {
        warn!("shutdown: reports or calls still in flight after the grace period");
    }
    hub.delivery.abort_all();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, hub.ledger.flush_all()).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), msg.flush()).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), store_client.flush()).await;
    Ok(())
}

/// Take messages from a subscription and handle each in its own task, at most as
/// many at once as `slots` has permits (each handler holds one until it is done).
async fn dispatch<F, Fut>(mut sub: async_nats::Subscriber, slots: Arc<Semaphore>, handle: F)
where
    F: Fn(async_nats::Message) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    while let Some(m) = sub.next().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        // Boxed: a handler's future is several KiB (an outcome's path through the
        // ledger and store), and the task would copy it on spawn and again on exit.
        let fut = Box::pin(handle(m));
        tokio::spawn(async move {
            fut.await;
            drop(permit);
        });
    }
}

/// Log units going offline as it happens.
async fn watch_presence(hub: Arc<Hub>) {
    let mut offline: HashSet<String> = HashSet::new();
    let mut first = true;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let gone = hub.registry.newly_offline(now_ms(), &mut offline);
        // At start every unit not heard from yet counts as offline: no warning each.
        if first {
            first = false;
            if !gone.is_empty() {
                info!(units = gone.len(), "units offline at start (no hello yet)");
            }
            continue;
        }
        for (node, ms) in gone {
            warn!(node, last_seen_ms_ago = ms, "unit offline");
        }
    }
}

/// Re-read the enrolment list when it changes; cancel what waits for revoked units.
async fn watch_enrolment(hub: Arc<Hub>) {
    loop {
        tokio::time::sleep(ENROLMENT_POLL).await;
        if let Err(e) = hub.registry.reload() {
            warn!(error = %e, "cannot read the enrolment list");
        }
        cancel_revoked(&hub, &hub.registry.take_revoked()).await;
    }
}

/// A revoked unit gets no more deliveries: its open commands end `Cancelled`.
async fn cancel_revoked(hub: &Hub, revoked: &[String]) {
    for node in revoked {
        let open = hub.ledger.open_of(node);
        warn!(
            node,
            open_commands = open.len(),
            "unit revoked: cancelling its commands"
        );
        for (_, id) in open {
            let r = hub
                .ledger
                .apply(
                    &id,
                    Event::Cancel {
                        at: now_ms(),
                        why: "the unit was revoked".into(),
                    },
                )
                .await;
            Ledger::log(node, &id, "revoked", &r);
        }
    }
}
