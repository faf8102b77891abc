//! Which units a request means: name globs (`pi-*`) and label selectors over the labels
//! given at enrolment (`site=oslo,role!=camera,tier in (a,b),!retired`), in the
//! syntax operators know from Kubernetes. Labels a unit reports about itself are
//! never matched: a stolen unit must not be able to put itself in a rollout.

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Req {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    Absent(String),
}

/// A parsed label selector; the empty selector matches every unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(Vec<Req>);

/// A selector that does not parse, with what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid selector {text:?}: {why} (write e.g. `site=oslo,role!=camera,tier in (a,b),!retired`)"
)]
pub struct SelectorError {
    pub text: String,
    pub why: String,
}

fn is_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
}

fn is_value(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Split at commas outside parentheses.
fn parts(text: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (vec![], 0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out
}

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        let err = |why: String| SelectorError {
            text: text.to_string(),
            why,
        };
        if text.trim().is_empty() {
            return Ok(Selector::default());
        }
        let mut reqs = vec![];
        for part in parts(text) {
            let p = part.trim();
            let key_ok = |k: &str| {
                if is_key(k) {
                    Ok(k.to_string())
                } else {
                    Err(err(format!("{k:?} is not a label key")))
                }
            };
            let val_ok = |v: &str| {
                if is_value(v) {
                    Ok(v.to_string())
                } else {
                    Err(err(format!("{v:?} is not a label value")))
                }
            };
            let set = |rest: &str| -> Result<Vec<String>, SelectorError> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| err(format!("{p:?}: a set is written (a,b)")))?;
                inner.split(',').map(|v| val_ok(v.trim())).collect()
            };
            let req = if let Some((k, v)) = p.split_once("!=") {
                Req::Ne(key_ok(k.trim())?, val_ok(v.trim())?)
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                Req::Eq(key_ok(k.trim())?, val_ok(v.trim())?)
            } else if let Some((k, rest)) = p.split_once(" notin ") {
                Req::NotIn(key_ok(k.trim())?, set(rest)?)
            } else if let Some((k, rest)) = p.split_once(" in ") {
                Req::In(key_ok(k.trim())?, set(rest)?)
            } else if let Some(k) = p.strip_prefix('!') {
                Req::Absent(key_ok(k.trim())?)
            } else if p.is_empty() {
                return Err(err("empty requirement".into()));
            } else {
                Req::Exists(key_ok(p)?)
            };
            reqs.push(req);
        }
        Ok(Selector(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether labels (`key=value` pairs) satisfy every requirement.
    pub fn matches(&self, labels: &[(String, String)]) -> bool {
        let get = |k: &str| labels.iter().find(|(key, _)| key == k).map(|(_, v)| v);
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => get(k) == Some(v),
            Req::Ne(k, v) => get(k) != Some(v),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.contains(x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.contains(x)),
            Req::Exists(k) => get(k).is_some(),
            Req::Absent(k) => get(k).is_none(),
        })
    }
}

/// Glob match of a name: `*` any run of characters, `?` one character.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Levenshtein distance, for "did you mean" suggestions.
pub fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Up to `n` names closest to `name` (distance at most a third of its length + 1).
pub fn nearest<'a>(name: &str, names: impl Iterator<Item = &'a str>, n: usize) -> Vec<String> {
    let limit = name.chars().count() / 3 + 1;
    let mut scored: Vec<(usize, &str)> = names
        .map(|c| (distance(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(n)
        .map(|(_, c)| c.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors() {
        let l = labels(&[("site", "oslo"), ("role", "camera"), ("tier", "b")]);
        let yes = |s: &str| Selector::parse(s).unwrap().matches(&l);
        assert!(yes(""));
        assert!(yes("site=oslo"));
        assert!(yes("site==oslo,role=camera"));
        assert!(!yes("site=bergen"));
        assert!(yes("role!=gateway"));
        assert!(!yes("role!=camera"));
        assert!(yes("tier in (a, b)"));
        assert!(!yes("tier notin (a,b)"));
        assert!(yes("missing notin (a,b)"));
        assert!(yes("site") && !yes("retired") && yes("!retired") && !yes("!site"));
        for bad in [
            "site=",
            "=x",
            "a in b",
            "a in (x y)",
            ",",
            "k=v,,",
            "bad key=1",
        ] {
            let e = Selector::parse(bad);
            if bad == "site=" {
                // An empty value is a value (Kubernetes allows it).
                assert!(e.is_ok());
                continue;
            }
            assert!(e.is_err(), "{bad:?} parsed");
        }
        let e = Selector::parse("a in b").unwrap_err();
        assert!(e.to_string().contains("(a,b)"), "{e}");
    }

    #[test]
    fn globs_and_suggestions() {
        assert!(glob("pi-*", "pi-17") && !glob("pi-*", "cam-1") && glob("pi-?", "pi-1"));
        assert!(glob("*", "") && !glob("pi-?", "pi-17"));
        let names = ["pi-7", "pi-17", "pi-71a", "camera-3"];
        assert_eq!(
            nearest("pi-71", names.iter().copied(), 3),
            vec!["pi-7", "pi-71a", "pi-17"]
        );
        assert!(nearest("zzzzzz", names.iter().copied(), 3).is_empty());
    }
}
