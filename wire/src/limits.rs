//! Size bounds on the parts of every message and record, so that the worst case of
//! each still fits one NATS message and one KV value (ADR 0003, issue 14): a record
//! that does not fit is never receipted, and the unit's outbox would stall on it.
//!
//! ```text
//! stored record ≤ MAX_PAYLOAD (1 MiB)
//!   = signed command ≤ MAX_COMMAND (128 KiB)
//!   + outcome: stdout + stderr ≤ 2 × MAX_OUTPUT_CAP, reason ≤ MAX_REASON
//!   + record fields, note ≤ MAX_NOTE
//! ```
//! The unit caps each output at its `output_cap` (≤ [`MAX_OUTPUT_CAP`]); the hub cuts
//! outputs further, and says so, when a record would still not fit its store.

/// Largest signed command the hub sends (file.write data included): leaves room
/// under [`crate::MAX_PAYLOAD`] for the largest outcome in one stored record.
pub const MAX_COMMAND: u32 = 128 * 1024;
/// Largest output a unit keeps per stream: two of them and a reason fit one message.
pub const MAX_OUTPUT_CAP: u32 = 416 * 1024;
/// Longest failure reason or rejection detail, in bytes: they echo input (a path, an
/// argv), so they are cut, never the reason a record does not fit.
pub const MAX_REASON: usize = 1024;
/// Longest operator-facing note on a command record.
pub const MAX_NOTE: usize = 1024;
/// Longest string field of a hello (version, arch, os, kernel, a label's key or value).
pub const MAX_HELLO_FIELD: usize = 256;
/// Most labels, methods or keys a hello may list; the hub keeps no more.
pub const MAX_HELLO_LIST: usize = 64;
/// Longest unit log message the hub logs.
pub const MAX_LOG_MESSAGE: usize = 4096;

/// `s` cut to at most `max` bytes on a character boundary, with `…` marking a cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("short", 10), "short");
        let t = truncate(&"é".repeat(100), 11);
        assert!(t.len() <= 11 && t.ends_with('…'), "{t}");
        assert_eq!(truncate("abcdefgh", 5), "ab…");
    }

    #[test]
    fn worst_case_record_fits_one_message() {
        let worst = MAX_COMMAND as usize + 2 * MAX_OUTPUT_CAP as usize + MAX_REASON + MAX_NOTE;
        // Record fields (ids, times, names: a few hundred bytes) and varint lengths.
        assert!(worst + 4096 < crate::MAX_PAYLOAD as usize, "{worst}");
    }
}
