//! Subject names: the only place they are spelled.

use crate::MsgId;

/// The reply-inbox prefix of one unit's connection: the broker lets a unit subscribe
/// to its own inbox only, so it can never read replies meant for others.
pub fn unit_inbox(node: &str) -> String {
    format!("_INBOX_{node}")
}

/// The reply-inbox prefix of the hub's own connection (units' ACKs come back there;
/// operators cannot read it).
pub const HUB_INBOX: &str = "_INBOX_hub";

/// The default subject prefix.
pub const DEFAULT_PREFIX: &str = "outpost";

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

    /// Unit → hub outcomes (request; the reply is a `Receipt`).
    pub fn result(&self, node: &str) -> String {
        format!("{}.hub.result.{node}", self.prefix)
    }

    /// Unit → hub heartbeats.
    pub fn hello(&self, node: &str) -> String {
        format!("{}.hub.hello.{node}", self.prefix)
    }

    /// Unit → hub warnings and errors.
    pub fn log(&self, node: &str) -> String {
        format!("{}.hub.log.{node}", self.prefix)
    }

    /// What the hub subscribes to for each kind of unit report (`*` = every node).
    pub fn all_results(&self) -> String {
        self.result("*")
    }
    pub fn all_hellos(&self) -> String {
        self.hello("*")
    }
    pub fn all_logs(&self) -> String {
        self.log("*")
    }

    /// Operator → hub API, one subject per call (`send`, `nodes`, `show`).
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

    /// The node name in a unit-report subject (`<prefix>.hub.<kind>.<node>`).
    pub fn node_of<'a>(&self, subject: &'a str) -> Option<&'a str> {
        let rest = subject.strip_prefix(&self.prefix)?.strip_prefix(".hub.")?;
        let (_, node) = rest.split_once('.')?;
        (!node.is_empty() && !node.contains('.')).then_some(node)
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
        assert_eq!(s.node_of("outpost.hub.hello.a.b"), None);
        assert_eq!(s.node_of("other.hub.hello.pi-1"), None);
        assert_eq!(s.api("send"), "outpost.api.send");
    }
}
