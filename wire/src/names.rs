//! Validation of the names that become NATS subject tokens and KV keys.

/// Longest node or domain name.
pub const MAX_NAME: usize = 64;

/// A name was not usable as a subject token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {name:?}: use 1 to {MAX_NAME} of A-Z a-z 0-9 _ -")]
pub struct NameError {
    pub what: &'static str,
    pub name: String,
}

fn check(what: &'static str, name: &str, allow_empty: bool) -> Result<(), NameError> {
    let ok_len = name.len() <= MAX_NAME && (allow_empty || !name.is_empty());
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err(NameError {
            what,
            name: name.to_string(),
        })
    }
}

/// Node names are subject tokens: `outpost.node.<node>.cmd`.
pub fn check_node(name: &str) -> Result<(), NameError> {
    check("node name", name, false)
}

/// Domains are KV key parts; the empty domain is allowed ("no particular domain").
pub fn check_domain(name: &str) -> Result<(), NameError> {
    check("domain", name, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_node("pi-17").is_ok());
        assert!(check_node("").is_err());
        assert!(check_node("a.b").is_err());
        assert!(check_node("a*").is_err());
        assert!(check_node(&"x".repeat(65)).is_err());
        assert!(check_domain("").is_ok());
        assert!(check_domain("nginx").is_ok());
        assert!(check_domain("ng inx").is_err());
    }
}
