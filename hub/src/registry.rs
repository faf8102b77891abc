//! The registry of units: who is enrolled (from the enrolment list `outpost-hub
//! enroll` writes), what each said in its last hello, and who is online. It answers
//! "may this unit be sent this method" before anything is queued, and pages through
//! the fleet for `nodes`.
//!
//! Memory per unit is a few hundred bytes whatever the fleet's size: inventories
//! (versions, OS, methods, keys) are shared between units that report the same one,
//! and a unit's record is written to the store only when something other than its
//! last-seen time changed.

use crate::enroll::Units;
use crate::selector::{Selector, glob, nearest};
use outpost_wire::api::{ApiError, ErrorCode, NodeRecord, NodeView, NodesPage, NodesRequest};
use outpost_wire::limits::{MAX_HELLO_FIELD, MAX_HELLO_LIST, truncate};
use outpost_wire::{Hello, Method, PROTOCOL, V1_METHODS};
use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// A unit is offline after missing this many hellos.
pub const MISSED_HELLOS: u64 = 3;
/// Slack on top of the missed hellos, for a slow link.
pub const GRACE_MS: u64 = 2000;
/// Hello intervals the hub believes (a unit may not claim it will be silent for a
/// year and stay "online").
pub const MIN_INTERVAL_S: u32 = 1;
pub const MAX_INTERVAL_S: u32 = 3600;
/// How many suggestions an unknown name gets.
const SUGGESTIONS: usize = 3;

/// What a unit said about itself that rarely changes, shared between units that say
/// the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Inventory {
    agent_version: String,
    arch: String,
    os: String,
    kernel: String,
    labels: Vec<(String, String)>,
    proto_min: u8,
    proto_max: u8,
    methods: Vec<String>,
    allowed: Vec<String>,
    keys: Vec<[u8; 8]>,
}

/// What changes with every hello.
#[derive(Debug, Clone)]
struct Seen {
    first_seen: u64,
    last_seen: u64,
    online_since: u64,
    agent_started_at: u64,
    outbox_depth: u32,
    pending: u32,
    interval_s: u32,
    clock_offset_ms: i64,
    hello_proto: u8,
    inv: Arc<Inventory>,
}

#[derive(Debug, Clone, Default)]
struct Unit {
    /// Labels from enrolment; `None`: not enrolled (revoked, or seen before an
    /// enrolment list was given).
    enrolled: Option<Arc<[(String, String)]>>,
    seen: Option<Seen>,
}

/// What the registry knows of one unit, for delivery.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The protocol version to write for it.
    pub proto: u8,
    /// The hub keys it trusts (ids), in its order; empty: unknown.
    pub keys: Vec<[u8; 8]>,
}

/// What a hello changed.
pub struct HelloEffect {
    pub came_online: bool,
    pub restarted: bool,
    /// The record to persist (something besides the last-seen time changed).
    pub persist: Option<NodeRecord>,
    /// The unit reports nothing pending and nothing to deliver: open commands the hub
    /// holds for it as accepted may have lost their outcome (probe them).
    pub idle: bool,
}

fn grace_ms(s: &Seen) -> u64 {
    MISSED_HELLOS * s.interval_s as u64 * 1000 + GRACE_MS
}

fn is_online(s: &Seen, now: u64) -> bool {
    now <= s.last_seen + grace_ms(s)
}

/// Cut every string and list of a hello to its bound, so a unit cannot make the hub
/// store (or show) more than a few KiB about it.
pub fn bounded(h: Hello) -> Hello {
    let s = |v: String| truncate(&v, MAX_HELLO_FIELD);
    let list = |v: Vec<String>| v.into_iter().take(MAX_HELLO_LIST).map(s).collect();
    Hello {
        agent_version: s(h.agent_version),
        arch: s(h.arch),
        os: s(h.os),
        kernel: s(h.kernel),
        labels: h
            .labels
            .into_iter()
            .take(MAX_HELLO_LIST)
            .map(|(k, v)| (s(k), s(v)))
            .collect(),
        methods: list(h.methods),
        allowed: list(h.allowed),
        keys: h.keys.into_iter().take(MAX_HELLO_LIST).collect(),
        interval_s: h.interval_s.clamp(MIN_INTERVAL_S, MAX_INTERVAL_S),
        ..h
    }
}

#[derive(Default)]
struct Inner {
    units: BTreeMap<String, Unit>,
    inventories: HashSet<Arc<Inventory>>,
    /// Whether an enrolment list is loaded (without one, every unit that says hello is
    /// taken as enrolled).
    has_list: bool,
    list_mtime: Option<SystemTime>,
    /// Units found revoked by a reload, until the enrolment watcher takes them (any
    /// caller may be the one whose reload finds them).
    revoked: Vec<String>,
}

impl Inner {
    fn intern(&mut self, inv: Inventory) -> Arc<Inventory> {
        if let Some(a) = self.inventories.get(&inv) {
            return a.clone();
        }
        let a = Arc::new(inv);
        self.inventories.insert(a.clone());
        a
    }

    fn enrolled(&self, u: &Unit) -> bool {
        u.enrolled.is_some() || (!self.has_list && u.seen.is_some())
    }
}

/// The fleet as the hub knows it.
pub struct Registry {
    inner: Mutex<Inner>,
    units_file: Option<PathBuf>,
}

/// A unit's labels: what the operator enrolled it with, which the unit cannot change;
/// a unit not on an enrolment list (no list, or not yet on it) shows what it says.
fn labels(u: &Unit) -> &[(String, String)] {
    match (&u.enrolled, &u.seen) {
        (Some(l), _) => l,
        (None, Some(s)) => &s.inv.labels,
        (None, None) => &[],
    }
}

fn view(name: &str, u: &Unit, enrolled: bool, pending: u32, now: u64) -> NodeView {
    let labels = labels(u).to_vec();
    match &u.seen {
        Some(s) => {
            let online = is_online(s, now);
            NodeView {
                name: name.to_string(),
                online,
                since: if online {
                    s.online_since
                } else {
                    s.last_seen + grace_ms(s)
                },
                last_seen: s.last_seen,
                arch: s.inv.arch.clone(),
                os: s.inv.os.clone(),
                kernel: s.inv.kernel.clone(),
                agent_version: s.inv.agent_version.clone(),
                agent_started_at: s.agent_started_at,
                labels,
                pending,
                enrolled,
                proto_min: s.inv.proto_min,
                proto_max: s.inv.proto_max,
                methods: s.inv.methods.clone(),
                allowed: s.inv.allowed.clone(),
                clock_offset_ms: (s.hello_proto >= 2).then_some(s.clock_offset_ms),
            }
        }
        None => NodeView {
            name: name.to_string(),
            online: false,
            since: 0,
            last_seen: 0,
            arch: String::new(),
            os: String::new(),
            kernel: String::new(),
            agent_version: String::new(),
            agent_started_at: 0,
            labels,
            pending,
            enrolled,
            proto_min: 0,
            proto_max: 0,
            methods: vec![],
            allowed: vec![],
            clock_offset_ms: None,
        },
    }
}

fn labels_of(list: &[String]) -> Vec<(String, String)> {
    list.iter()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Registry {
    /// A registry reading the enrolment list at `units_file` (`units.json` from `pki
    /// init`/`enroll`), or none: then every unit that says hello counts as enrolled.
    pub fn new(units_file: Option<PathBuf>) -> Registry {
        Registry {
            inner: Mutex::new(Inner::default()),
            units_file,
        }
    }

    /// Take the unit records the store holds (at start).
    pub fn restore(&self, records: Vec<NodeRecord>) {
        let mut inner = self.inner.lock().expect("registry lock");
        for r in records {
            let h = bounded(r.hello);
            let inv = inner.intern(inventory(&h));
            let seen = Seen {
                first_seen: r.first_seen,
                last_seen: r.last_seen,
                online_since: r.online_since,
                agent_started_at: h.agent_started_at,
                outbox_depth: h.outbox_depth,
                pending: h.pending,
                interval_s: h.interval_s,
                clock_offset_ms: r.clock_offset_ms,
                hello_proto: r.hello_proto,
                inv,
            };
            inner.units.entry(r.name).or_default().seen = Some(seen);
        }
    }

    /// Read the enrolment list if it changed since the last read (an error names the
    /// file). Units that were enrolled and no longer are wait in [`Self::take_revoked`].
    pub fn reload(&self) -> Result<(), crate::enroll::EnrollError> {
        let Some(path) = &self.units_file else {
            return Ok(());
        };
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        {
            let inner = self.inner.lock().expect("registry lock");
            if inner.has_list && mtime.is_some() && inner.list_mtime == mtime {
                return Ok(());
            }
        }
        let list = Units::load_file(path)?;
        let mut inner = self.inner.lock().expect("registry lock");
        let mut revoked = vec![];
        for (name, u) in inner.units.iter_mut() {
            if u.enrolled.is_some() && !list.units.contains_key(name) {
                u.enrolled = None;
                revoked.push(name.clone());
            }
        }
        for (name, u) in &list.units {
            let labels: Arc<[(String, String)]> = labels_of(&u.labels).into();
            inner.units.entry(name.clone()).or_default().enrolled = Some(labels);
        }
        inner
            .units
            .retain(|_, u| u.enrolled.is_some() || u.seen.is_some());
        inner.has_list = true;
        inner.list_mtime = mtime;
        inner.revoked.extend(revoked);
        Ok(())
    }

    /// The units revoked since the last call (their waiting commands are cancelled).
    pub fn take_revoked(&self) -> Vec<String> {
        std::mem::take(&mut self.inner.lock().expect("registry lock").revoked)
    }

    /// Whether the hub has an enrolment list and `node` is not on it.
    pub fn is_unlisted(&self, node: &str) -> bool {
        let inner = self.inner.lock().expect("registry lock");
        inner.has_list && inner.units.get(node).is_none_or(|u| u.enrolled.is_none())
    }

    pub fn units_file(&self) -> Option<&Path> {
        self.units_file.as_deref()
    }

    /// Record a hello from `node` at hub time `now`, written in protocol version `v`.
    pub fn hello(&self, node: &str, hello: Hello, v: u8, now: u64) -> HelloEffect {
        let h = bounded(hello);
        let mut inner = self.inner.lock().expect("registry lock");
        let inv = inner.intern(inventory(&h));
        let unit = inner.units.entry(node.to_string()).or_default();
        let prev = unit.seen.clone();
        let was_online = prev.as_ref().is_some_and(|p| is_online(p, now));
        let restarted = prev
            .as_ref()
            .is_some_and(|p| p.agent_started_at != h.agent_started_at);
        let clock_offset_ms = if v >= 2 && h.sent_at > 0 {
            h.sent_at as i64 - now as i64
        } else {
            0
        };
        let seen = Seen {
            first_seen: prev.as_ref().map_or(now, |p| p.first_seen),
            last_seen: now,
            online_since: match &prev {
                Some(p) if was_online => p.online_since,
                _ => now,
            },
            agent_started_at: h.agent_started_at,
            outbox_depth: h.outbox_depth,
            pending: h.pending,
            interval_s: h.interval_s,
            clock_offset_ms,
            hello_proto: v,
            inv,
        };
        // Persist when more than the time moved: a new inventory, a restart, coming
        // online, a clock that moved by more than a second.
        let changed = prev.as_ref().is_none_or(|p| {
            !Arc::ptr_eq(&p.inv, &seen.inv)
                || restarted
                || !was_online
                || p.hello_proto != v
                || p.interval_s != seen.interval_s
                || (p.clock_offset_ms - clock_offset_ms).abs() > 1000
        });
        let idle = seen.outbox_depth == 0 && seen.pending == 0;
        let persist = changed.then(|| record(node, &seen, &h));
        unit.seen = Some(seen);
        HelloEffect {
            came_online: !was_online,
            restarted,
            persist,
            idle,
        }
    }

    /// Who of the units known went offline since the last call: (name, ms since the
    /// last hello). `offline` is the caller's set of units already reported.
    pub fn newly_offline(&self, now: u64, offline: &mut HashSet<String>) -> Vec<(String, u64)> {
        let inner = self.inner.lock().expect("registry lock");
        let mut out = vec![];
        for (name, u) in &inner.units {
            let Some(s) = &u.seen else { continue };
            if is_online(s, now) {
                offline.remove(name);
            } else if offline.insert(name.clone()) {
                out.push((name.clone(), now.saturating_sub(s.last_seen)));
            }
        }
        out
    }

    /// What delivery needs to know to write for this unit.
    pub fn peer(&self, node: &str) -> Peer {
        let inner = self.inner.lock().expect("registry lock");
        match inner.units.get(node).and_then(|u| u.seen.as_ref()) {
            Some(s) => Peer {
                proto: s.inv.proto_max.clamp(1, PROTOCOL),
                keys: s.inv.keys.clone(),
            },
            None => Peer {
                proto: 1,
                keys: vec![],
            },
        }
    }

    pub fn is_enrolled(&self, node: &str) -> bool {
        let inner = self.inner.lock().expect("registry lock");
        inner.units.get(node).is_some_and(|u| inner.enrolled(u))
    }

    /// Whether `method` may be queued for `node`: it is enrolled, and (as far as its
    /// last hello says) its agent serves the method and its allow-list lets it run.
    pub fn check(&self, node: &str, method: &Method) -> Result<(), ApiError> {
        if self.units_file.is_some() && !self.is_enrolled(node) {
            // The list may have changed since the last poll: read it before refusing.
            let _ = self.reload();
        }
        let inner = self.inner.lock().expect("registry lock");
        let Some(u) = inner.units.get(node).filter(|u| inner.enrolled(u)) else {
            if inner.units.get(node).is_some_and(|u| u.seen.is_some()) {
                return Err(ApiError::new(
                    ErrorCode::Revoked,
                    format!(
                        "{node} is not enrolled any more (revoked): enrol it again to command it"
                    ),
                ));
            }
            let near = nearest(node, inner.units.keys().map(String::as_str), SUGGESTIONS);
            let hint = if near.is_empty() {
                if inner.has_list {
                    " (`outpost-hub nodes` lists the fleet; `outpost-hub enroll` adds a unit)"
                        .to_string()
                } else {
                    " (the hub has no enrolment list, --units, so it knows only units that said hello)".to_string()
                }
            } else {
                format!(": did you mean {}?", near.join(", "))
            };
            return Err(ApiError::new(
                ErrorCode::UnknownUnit,
                format!("no unit {node:?} is enrolled{hint}"),
            ));
        };
        let name = method.name();
        match &u.seen {
            // Never said hello: every agent serves the version 1 methods.
            None if V1_METHODS.contains(&name) => Ok(()),
            None => Err(ApiError::new(
                ErrorCode::Unsupported,
                format!(
                    "{node} has never said hello, so the hub cannot tell whether its agent serves {name}; version 1 agents serve only {}",
                    V1_METHODS.join(", ")
                ),
            )),
            Some(s) if !s.inv.methods.iter().any(|m| m == name) => Err(ApiError::new(
                ErrorCode::Unsupported,
                format!(
                    "{node}'s agent {} does not serve {name} (it serves {}): upgrade the agent",
                    s.inv.agent_version,
                    s.inv.methods.join(", ")
                ),
            )),
            Some(s) if s.hello_proto >= 2 && !s.inv.allowed.iter().any(|m| m == name) => {
                Err(ApiError::new(
                    ErrorCode::NotAllowed,
                    format!(
                        "{node}'s [allow] methods do not include {name} (it allows {}): change the unit's edge.toml",
                        if s.inv.allowed.is_empty() {
                            "nothing".to_string()
                        } else {
                            s.inv.allowed.join(", ")
                        }
                    ),
                ))
            }
            Some(_) => Ok(()),
        }
    }

    /// One unit as `nodes` shows it; `None` if the hub has never heard of it.
    pub fn node(&self, node: &str, pending: u32, now: u64) -> Option<NodeView> {
        let inner = self.inner.lock().expect("registry lock");
        let u = inner.units.get(node)?;
        Some(view(node, u, inner.enrolled(u), pending, now))
    }

    /// One page of the units matching `req`, in name order.
    pub fn page(
        &self,
        req: &NodesRequest,
        selector: &Selector,
        pending: impl Fn(&str) -> u32,
        now: u64,
    ) -> NodesPage {
        let limit = match req.limit {
            0 => outpost_wire::api::DEFAULT_PAGE,
            n => n.min(outpost_wire::api::MAX_PAGE),
        } as usize;
        let inner = self.inner.lock().expect("registry lock");
        let matches = |name: &str, u: &Unit| -> bool {
            (req.name.is_empty() || glob(&req.name, name))
                && (selector.is_empty() || selector.matches(labels(u)))
                && req
                    .online
                    .is_none_or(|want| u.seen.as_ref().is_some_and(|s| is_online(s, now)) == want)
        };
        let from = if req.after.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(req.after.clone())
        };
        let mut nodes = vec![];
        let mut bytes = 0usize;
        let mut next = None;
        for (name, u) in inner.units.range((from, Bound::Unbounded)) {
            if !matches(name, u) {
                continue;
            }
            if nodes.len() == limit || bytes >= outpost_wire::api::MAX_PAGE_BYTES as usize {
                next = nodes.last().map(|n: &NodeView| n.name.clone());
                break;
            }
            let v = view(name, u, inner.enrolled(u), pending(name), now);
            bytes += approx_bytes(&v);
            nodes.push(v);
        }
        // Counting is a pass over every unit: made once, for the first page, so a
        // whole list stays linear in the fleet (and free without a filter).
        let unfiltered = req.name.is_empty() && selector.is_empty() && req.online.is_none();
        let matched = if unfiltered {
            inner.units.len() as u32
        } else if req.after.is_empty() {
            inner.units.iter().filter(|(n, u)| matches(n, u)).count() as u32
        } else {
            0
        };
        NodesPage {
            nodes,
            next,
            matched,
        }
    }

    /// Names of every unit known (for fan-out and tests).
    pub fn len(&self) -> usize {
        self.inner.lock().expect("registry lock").units.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An upper estimate of a view's encoded size.
fn approx_bytes(v: &NodeView) -> usize {
    let strings = v.name.len() + v.arch.len() + v.os.len() + v.kernel.len() + v.agent_version.len();
    let lists: usize = v
        .labels
        .iter()
        .map(|(k, val)| k.len() + val.len() + 2)
        .sum::<usize>()
        + v.methods
            .iter()
            .chain(&v.allowed)
            .map(|m| m.len() + 1)
            .sum::<usize>();
    strings + lists + 80
}

fn inventory(h: &Hello) -> Inventory {
    Inventory {
        agent_version: h.agent_version.clone(),
        arch: h.arch.clone(),
        os: h.os.clone(),
        kernel: h.kernel.clone(),
        labels: h.labels.clone(),
        proto_min: h.proto_min,
        proto_max: h.proto_max,
        methods: h.methods.clone(),
        allowed: h.allowed.clone(),
        keys: h.keys.clone(),
    }
}

fn record(node: &str, s: &Seen, h: &Hello) -> NodeRecord {
    NodeRecord {
        name: node.to_string(),
        first_seen: s.first_seen,
        last_seen: s.last_seen,
        online_since: s.online_since,
        hello: h.clone(),
        clock_offset_ms: s.clock_offset_ms,
        hello_proto: s.hello_proto,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(version: &str, interval: u32) -> Hello {
        Hello {
            agent_version: version.into(),
            arch: "aarch64".into(),
            os: "Debian".into(),
            kernel: "6.1".into(),
            uptime_s: 1,
            agent_started_at: 100,
            labels: vec![],
            outbox_depth: 0,
            pending: 0,
            interval_s: interval,
            proto_min: 1,
            proto_max: 2,
            methods: V1_METHODS.iter().map(|m| m.to_string()).collect(),
            allowed: vec!["ping".into()],
            sent_at: 0,
            keys: vec![],
        }
    }

    #[test]
    fn hellos_are_bounded_and_inventories_shared() {
        let r = Registry::new(None);
        let mut h = hello("1", 15);
        h.os = "x".repeat(100_000);
        h.labels = (0..1000).map(|i| (format!("k{i}"), "v".into())).collect();
        h.interval_s = u32::MAX;
        let e = r.hello("a", h.clone(), 2, 1000);
        let p = e.persist.unwrap();
        assert!(p.hello.os.len() <= MAX_HELLO_FIELD);
        assert!(p.hello.labels.len() <= MAX_HELLO_LIST);
        assert_eq!(p.hello.interval_s, MAX_INTERVAL_S);
        r.hello("b", h, 2, 1000);
        let inner = r.inner.lock().unwrap();
        assert_eq!(inner.inventories.len(), 1, "one inventory for two units");
    }

    #[test]
    fn a_hello_is_persisted_only_when_something_changed() {
        let r = Registry::new(None);
        assert!(r.hello("a", hello("1", 15), 2, 1000).persist.is_some());
        assert!(r.hello("a", hello("1", 15), 2, 16_000).persist.is_none());
        assert!(r.hello("a", hello("2", 15), 2, 31_000).persist.is_some());
        // Offline for a while, then back: that is news.
        let e = r.hello("a", hello("2", 15), 2, 500_000);
        assert!(e.came_online && e.persist.is_some());
    }

    #[test]
    fn methods_are_checked_against_what_the_unit_says() {
        let r = Registry::new(None);
        r.hello("a", hello("1", 15), 2, 1000);
        assert!(r.check("a", &Method::Ping).is_ok());
        let e = r
            .check(
                "a",
                &Method::Exec(outpost_wire::Exec {
                    argv: vec!["x".into()],
                    env: vec![],
                    cwd: None,
                }),
            )
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NotAllowed);
        let e = r.check("pi-71", &Method::Ping).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownUnit);
    }

    /// Issue 13, finding 8 and issue 14, defect 7: the list decides who may be
    /// commanded and with which labels; a hello cannot relabel a unit; a typo gets the
    /// nearest names; a removed unit is reported revoked, once.
    #[test]
    fn the_enrolment_list_decides_names_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("units.json");
        let unit = |labels: &[&str]| crate::enroll::Unit {
            nkey: "U".into(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
            enrolled_at: 1,
        };
        let mut list = crate::enroll::Units {
            prefix: "outpost".into(),
            hub_nkey: "U".into(),
            hub_store_nkey: "U".into(),
            operator_nkey: "U".into(),
            units: [
                ("pi-17".to_string(), unit(&["site=lab"])),
                ("pi-18".into(), unit(&[])),
            ]
            .into(),
            others: Default::default(),
        };
        std::fs::write(&file, serde_json::to_string(&list).unwrap()).unwrap();
        let r = Registry::new(Some(file.clone()));
        r.reload().unwrap();
        let mut h = hello("1", 15);
        h.labels = vec![("site".into(), "hq".into())];
        r.hello("pi-17", h, 2, 1000);
        let v = r.node("pi-17", 0, 1000).unwrap();
        assert_eq!(v.labels, vec![("site".into(), "lab".into())]);
        let hq = Selector::parse("site=hq").unwrap();
        let page = r.page(&NodesRequest::default(), &hq, |_| 0, 1000);
        assert_eq!(page.matched, 0, "a unit chose its own label");
        // Enrolled but never seen: may be commanded (it may come later).
        assert!(r.check("pi-18", &Method::Ping).is_ok());
        let e = r.check("pi-71", &Method::Ping).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownUnit);
        assert!(e.message.contains("did you mean pi-17"), "{}", e.message);
        // Removed from the list: refused as revoked and handed to the watcher once.
        list.units.remove("pi-17");
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file, serde_json::to_string(&list).unwrap()).unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(2);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(later)
            .unwrap();
        r.reload().unwrap(); // what the enrolment watcher does every 5 s
        let e = r.check("pi-17", &Method::Ping).unwrap_err();
        assert_eq!(e.code, ErrorCode::Revoked);
        assert_eq!(r.take_revoked(), vec!["pi-17".to_string()]);
        assert!(r.take_revoked().is_empty());
    }

    #[test]
    fn pages_cover_everything_once_in_order() {
        let r = Registry::new(None);
        for i in 0..1234 {
            r.hello(&format!("u{i:05}"), hello("1", 15), 2, 1000);
        }
        let mut req = NodesRequest {
            limit: 100,
            ..Default::default()
        };
        let mut all = vec![];
        loop {
            let p = r.page(&req, &Selector::default(), |_| 0, 1000);
            assert_eq!(p.matched, 1234);
            // With a filter, counted on the first page only.
            let online = NodesRequest {
                online: Some(true),
                ..req.clone()
            };
            let counted = r.page(&online, &Selector::default(), |_| 0, 1000).matched;
            assert_eq!(counted, if req.after.is_empty() { 1234 } else { 0 });
            all.extend(p.nodes.into_iter().map(|n| n.name));
            match p.next {
                Some(n) => req.after = n,
                None => break,
            }
        }
        assert_eq!(all.len(), 1234);
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        req = NodesRequest {
            name: "u0000?".into(),
            ..Default::default()
        };
        assert_eq!(
            r.page(&req, &Selector::default(), |_| 0, 1000).nodes.len(),
            10
        );
    }
}
