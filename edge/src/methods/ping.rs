//! `ping`: no arguments, always allowed when listed in `[allow] methods`, succeeds at
//! once with no output. It proves the unit is there and obeys.

use outpost_wire::Outcome;

pub fn run() -> Outcome {
    super::ok(Vec::new(), false)
}
