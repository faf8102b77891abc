//! Time on a unit without a trustworthy clock (ADR 0011). A Raspberry Pi has no RTC: it
//! boots with a stale clock (1970, or the last shutdown's) and jumps when NTP syncs.
//! So nothing the delivery guarantees rest on reads the unit's wall clock:
//!
//! - **Deadlines mean the hub's clock.** Every version 2 command carries the hub's time
//!   at sending, signed; the hub's answer to a hello carries it too. The agent keeps the
//!   latest sample with the monotonic instant it arrived at, and reads hub time as
//!   `sample + elapsed` — immune to the unit's clock stepping either way.
//! - **Certificates are checked against a floor**: the later of the unit's clock and
//!   the agent's build time, so a unit that boots in 1970 still connects (and then
//!   learns the time from the hub).
//!
//! Until the first sample arrives the hub's time is unknown; commands recovered after
//! a restart wait for it before they start (their deadline cannot be judged yet),
//! unless the hub is a version 1 hub, which sends no time (then the unit's clock is all
//! there is, as before).

use outpost_wire::now_ms;
use std::sync::Mutex;
use std::time::Instant;

/// When this agent was built (ms since the epoch), from `build.rs`: no certificate
/// check happens before it, whatever the unit's clock says.
pub const BUILD_TIME_MS: u64 = match u64::from_str_radix(env!("OUTPOST_BUILD_TIME_MS"), 10) {
    Ok(t) => t,
    Err(_) => 0,
};

/// The unit's clock, never earlier than the build time.
pub fn floored_now_ms() -> u64 {
    now_ms().max(BUILD_TIME_MS)
}

/// Where the agent's idea of the hub's time comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Nothing yet: hub time unknown.
    None,
    /// A version 1 hub: it sends no time, so the unit's own clock is used.
    UnitClock,
    /// A sample from the hub (signed command or hello reply).
    Hub,
}

#[derive(Debug)]
struct Sample {
    hub_ms: u64,
    at: Instant,
}

/// The agent's estimate of the hub's clock.
#[derive(Debug)]
pub struct HubClock {
    sample: Mutex<Option<Sample>>,
    v1: std::sync::atomic::AtomicBool,
    /// Hub time the unit knows had passed before this run (kept in the state dir by
    /// `StateDir::prune`): the clock never reads earlier, so a replayed old command
    /// cannot set it back to before the ids it forgot.
    floor: std::sync::atomic::AtomicU64,
}

impl Default for HubClock {
    fn default() -> Self {
        HubClock::new()
    }
}

impl HubClock {
    pub fn new() -> HubClock {
        HubClock {
            sample: Mutex::new(None),
            v1: std::sync::atomic::AtomicBool::new(false),
            floor: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Take a reading of the hub's clock that arrived just now. A reading older than
    /// what the current sample already implies (a delayed or re-sent command) is
    /// ignored: hub time only moves forward here.
    pub fn observe(&self, hub_ms: u64) {
        if hub_ms == 0 {
            return;
        }
        let mut s = self.sample.lock().expect("clock lock");
        let now = Instant::now();
        let newer = s
            .as_ref()
            .is_none_or(|old| hub_ms > old.hub_ms + now.duration_since(old.at).as_millis() as u64);
        if newer {
            *s = Some(Sample { hub_ms, at: now });
        }
    }

    /// Hub time known to have passed (from the state dir): no reading is earlier.
    pub fn set_floor(&self, hub_ms: u64) {
        self.floor
            .fetch_max(hub_ms, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn floor(&self) -> u64 {
        self.floor.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The hub is a version 1 hub: use the unit's own clock.
    pub fn use_unit_clock(&self) {
        self.v1.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn source(&self) -> Source {
        if self.sample.lock().expect("clock lock").is_some() {
            Source::Hub
        } else if self.v1.load(std::sync::atomic::Ordering::Relaxed) {
            Source::UnitClock
        } else {
            Source::None
        }
    }

    /// The hub's time now (ms since the epoch), if known.
    pub fn now(&self) -> Option<u64> {
        let t = match &*self.sample.lock().expect("clock lock") {
            Some(s) => Some(s.hub_ms + s.at.elapsed().as_millis() as u64),
            None if self.v1.load(std::sync::atomic::Ordering::Relaxed) => Some(now_ms()),
            None => None,
        };
        t.map(|t| t.max(self.floor()))
    }

    /// The unit's clock minus the hub's (ms), when both are known.
    pub fn offset(&self) -> Option<i64> {
        let hub = match &*self.sample.lock().expect("clock lock") {
            Some(s) => s.hub_ms + s.at.elapsed().as_millis() as u64,
            None => return None,
        };
        Some(now_ms() as i64 - hub as i64)
    }
}

/// rustls' time for certificate checks: the unit's clock floored at the build time.
#[derive(Debug)]
pub struct FlooredTime;

impl rustls::time_provider::TimeProvider for FlooredTime {
    fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
        Some(rustls::pki_types::UnixTime::since_unix_epoch(
            std::time::Duration::from_millis(floored_now_ms()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_time_follows_samples_forward_only() {
        let c = HubClock::new();
        assert_eq!(c.source(), Source::None);
        assert_eq!(c.now(), None);
        c.observe(1_000_000);
        let t = c.now().unwrap();
        assert!((1_000_000..1_000_100).contains(&t), "{t}");
        // A delayed, older reading does not pull hub time back.
        c.observe(999_000);
        assert!(c.now().unwrap() >= 1_000_000);
        c.observe(5_000_000);
        assert!(c.now().unwrap() >= 5_000_000);
        assert_eq!(c.source(), Source::Hub);
    }

    #[test]
    fn the_floor_from_before_a_restart_holds_against_old_samples() {
        let c = HubClock::new();
        c.set_floor(10_000);
        assert_eq!(c.now(), None, "a floor is not a reading");
        c.observe(5_000); // a replayed command's sent_at
        assert!(c.now().unwrap() >= 10_000);
        c.observe(20_000);
        assert!(c.now().unwrap() >= 20_000);
    }

    #[test]
    fn a_version_1_hub_means_the_unit_clock() {
        let c = HubClock::new();
        c.use_unit_clock();
        assert_eq!(c.source(), Source::UnitClock);
        assert!(c.now().unwrap() >= now_ms() - 1000);
    }

    #[test]
    fn the_floor_is_the_build_time() {
        const { assert!(BUILD_TIME_MS > 1_700_000_000_000) };
        assert!(floored_now_ms() >= BUILD_TIME_MS);
    }
}
