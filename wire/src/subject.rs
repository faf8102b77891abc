//! Subject names: the only place they are spelled.
//!
//! Reply inboxes are part of the security model (ADR 0005): a unit subscribes to its
//! own inbox only (`_INBOX_<node>.>`), operators to `_INBOX.>`, and the hub's
//! connections use `_HUB.<hub>.<role>.>`, which no unit name and no operator inbox can
//! spell, so no unit can read the hub's ACKs or JetStream replies.

use crate::MsgId;

/// The reply-inbox prefix of one unit's connection: the broker lets a unit subscribe
/// to its own inbox only, so it can never read replies meant for others.
pub fn unit_inbox(node: &str) -> String {
    format!("_INBOX_{node}")
}

/// The reply-inbox prefix operators use (async-nats' default): the hub answers API
/// calls only on subjects under it.
pub const OPERATOR_INBOX: &str = "_INBOX";

/// The reply-inbox prefix of one of the hub's connections (`role` is `msg` for the
/// messaging identity, `store` for the JetStream one). Node names have no `.`, so
/// `_HUB.…` is never `_INBOX_<node>`.
pub fn hub_inbox(hub: &str, role: &str) -> String {
    format!("_HUB.{hub}.{role}")
}

/// Whether `reply` is a reply subject in `inbox`'s namespace (`<inbox>.<token>…`).
pub fn is_in_inbox(reply: &str, inbox: &str) -> bool {
    reply
        .strip_prefix(inbox)
        .and_then(|r| r.strip_prefix('.'))
        .is_some_and(|r| {
            !r.is_empty()
                && r.split('.')
                    .all(|t| !t.is_empty() && t != "*" && t != ">" && !t.contains(' '))
        })
}

/// The default subject prefix.
pub const DEFAULT_PREFIX: &str = "outpost";

/// The kinds of unit report, `<prefix>.hub.<kind>.<node>`. A unit may publish any
/// kind for its own name (`<prefix>.hub.*.<node>`), so kinds added later need no new
/// broker permissions.
pub mod kind {
    /// `Outcome` (request; the reply is a `Receipt`).
    pub const RESULT: &str = "result";
    /// `Hello` (version 2: request; the reply is a `HelloReply`).
    pub const HELLO: &str = "hello";
    /// `Log`.
    pub const LOG: &str = "log";
    /// Version 2: `Started`.
    pub const STARTED: &str = "started";
}

/// Subject names under one prefix (several fleets can share a broker).
#[derive(Clone, Debug)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Subjects::new(DEFAULT_PREFIX)
    }
}

impl Subjects {
    pub fn new(prefix: &str) -> Self {
        Subjects {
            prefix: prefix.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Hub → unit commands (request; the reply is an `Ack`).
    pub fn command(&self, node: &str) -> String {
        format!("{}.node.{node}.cmd", self.prefix)
    }

    /// Unit → hub reports of one kind ([`kind`]).
    pub fn report(&self, kind: &str, node: &str) -> String {
        format!("{}.hub.{kind}.{node}", self.prefix)
    }

    /// Unit → hub outcomes (request; the reply is a `Receipt`).
    pub fn result(&self, node: &str) -> String {
        self.report(kind::RESULT, node)
    }

    /// Unit → hub heartbeats.
    pub fn hello(&self, node: &str) -> String {
        self.report(kind::HELLO, node)
    }

    /// Unit → hub warnings and errors.
    pub fn log(&self, node: &str) -> String {
        self.report(kind::LOG, node)
    }

    /// Unit → hub: a queued command started.
    pub fn started(&self, node: &str) -> String {
        self.report(kind::STARTED, node)
    }

    /// Every report of every unit: what the hub subscribes to.
    pub fn all_reports(&self) -> String {
        format!("{}.hub.*.*", self.prefix)
    }

    /// What one unit may publish: every kind of report, under its own name.
    pub fn reports_of(&self, node: &str) -> String {
        self.report("*", node)
    }

    /// Operator → hub API, one subject per call (`send`, `nodes`, `show`, ...).
    pub fn api(&self, call: &str) -> String {
        format!("{}.api.{call}", self.prefix)
    }

    /// Hub → operators: every state change of one command after `Queued` (the reply
    /// to `send` carries that one).
    pub fn event(&self, id: &MsgId) -> String {
        format!("{}.event.cmd.{id}", self.prefix)
    }

    /// Every command's events (what `send` to many units follows).
    pub fn all_events(&self) -> String {
        format!("{}.event.cmd.*", self.prefix)
    }

    /// The kind and node of a unit-report subject (`<prefix>.hub.<kind>.<node>`).
    pub fn report_of<'a>(&self, subject: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = subject.strip_prefix(&self.prefix)?.strip_prefix(".hub.")?;
        let (kind, node) = rest.split_once('.')?;
        (!kind.is_empty() && !node.is_empty() && !node.contains('.')).then_some((kind, node))
    }

    /// The node name in a unit-report subject.
    pub fn node_of<'a>(&self, subject: &'a str) -> Option<&'a str> {
        self.report_of(subject).map(|(_, n)| n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects() {
        let s = Subjects::default();
        assert_eq!(s.command("pi-1"), "outpost.node.pi-1.cmd");
        assert_eq!(s.result("pi-1"), "outpost.hub.result.pi-1");
        assert_eq!(s.node_of("outpost.hub.hello.pi-1"), Some("pi-1"));
        assert_eq!(
            s.report_of("outpost.hub.started.pi-1"),
            Some(("started", "pi-1"))
        );
        assert_eq!(s.node_of("outpost.hub.hello.a.b"), None);
        assert_eq!(s.node_of("other.hub.hello.pi-1"), None);
        assert_eq!(s.api("send"), "outpost.api.send");
        assert_eq!(s.reports_of("pi-1"), "outpost.hub.*.pi-1");
    }

    #[test]
    fn inboxes_cannot_collide() {
        // A unit named `hub` (or anything) never gets the hub's inbox.
        for node in ["hub", "HUB", "_hub", "hub-msg"] {
            let unit = unit_inbox(node);
            assert!(!is_in_inbox(&format!("{unit}.x"), &hub_inbox("hub", "msg")));
            assert!(!unit.starts_with("_HUB"));
            assert!(!is_in_inbox(&format!("{unit}.x"), OPERATOR_INBOX));
        }
        assert!(is_in_inbox("_INBOX_pi-1.abc.1", &unit_inbox("pi-1")));
        assert!(!is_in_inbox("_INBOX_pi-10.abc", &unit_inbox("pi-1")));
        assert!(!is_in_inbox("_INBOX_pi-1", &unit_inbox("pi-1")));
        assert!(!is_in_inbox("_INBOX_pi-1.>", &unit_inbox("pi-1")));
        assert!(!is_in_inbox("$KV.outpost-nodes.zz", OPERATOR_INBOX));
        assert!(is_in_inbox("_INBOX.abc.def", OPERATOR_INBOX));
    }
}
