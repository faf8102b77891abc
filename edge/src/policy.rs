//! The unit's local allow-list: which methods run, which programs `exec` may start,
//! which paths the file methods may touch. It comes only from the unit's own config;
//! nothing in a command can widen it.
//!
//! The default allows `ping` only: a unit does nothing else until its operator writes
//! an `[allow]` table (the Ansible role does).

use crate::methods;
use crate::protected::Protected;
use outpost_wire::{Method, RejectCode, Rejection};
use serde::Deserialize;
use std::path::{Component, Path, PathBuf};

/// `[allow]` in the agent's config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowConfig {
    /// Methods this unit runs at all.
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
    /// argv patterns `exec` may run: whitespace-separated element globs (`*`, `?`);
    /// a last element `...` matches any remaining arguments. `["..."]` allows anything.
    #[serde(default)]
    pub exec: Vec<String>,
    /// Path prefixes `file.read` may read.
    #[serde(default)]
    pub read: Vec<String>,
    /// Path prefixes `file.write` may write.
    #[serde(default)]
    pub write: Vec<String>,
}

fn default_methods() -> Vec<String> {
    vec!["ping".into()]
}

impl Default for AllowConfig {
    fn default() -> Self {
        AllowConfig {
            methods: default_methods(),
            exec: vec![],
            read: vec![],
            write: vec![],
        }
    }
}

/// Every method the agent knows.
pub const BUILTIN_METHODS: &[&str] = &["ping", "exec", "file.write", "file.read"];

/// A policy that does not make sense.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("unknown method {0:?} in [allow] methods: known methods are {1}")]
    UnknownMethod(String, String),
    #[error("[allow] {0} entry {1:?} is not an absolute path prefix")]
    RelativePath(&'static str, String),
    #[error("[allow] exec pattern {0:?} is empty")]
    EmptyPattern(String),
}

/// The checked allow-list.
#[derive(Debug, Clone)]
pub struct Policy {
    pub(crate) methods: Vec<String>,
    pub(crate) exec: Vec<Vec<String>>,
    pub(crate) read: Vec<PathBuf>,
    pub(crate) write: Vec<PathBuf>,
    /// The agent's own files: refused to every method whatever the prefixes say.
    pub(crate) protected: Protected,
}

impl Policy {
    /// Check `c`; `protected` are the agent's own paths (config, identity, CA, state),
    /// refused to every method whatever `c` says.
    pub fn new(c: AllowConfig, protected: Protected) -> Result<Policy, PolicyError> {
        for m in &c.methods {
            if !BUILTIN_METHODS.contains(&m.as_str()) {
                return Err(PolicyError::UnknownMethod(
                    m.clone(),
                    BUILTIN_METHODS.join(", "),
                ));
            }
        }
        let exec = c
            .exec
            .iter()
            .map(|p| {
                let parts: Vec<String> = p.split_whitespace().map(str::to_string).collect();
                if parts.is_empty() {
                    Err(PolicyError::EmptyPattern(p.clone()))
                } else {
                    Ok(parts)
                }
            })
            .collect::<Result<_, _>>()?;
        let paths = |what, v: &[String]| -> Result<Vec<PathBuf>, PolicyError> {
            v.iter()
                .map(|p| {
                    if p.starts_with('/') && !p.split('/').any(|c| c == "..") {
                        Ok(PathBuf::from(p))
                    } else {
                        Err(PolicyError::RelativePath(what, p.clone()))
                    }
                })
                .collect()
        };
        Ok(Policy {
            methods: c.methods,
            exec,
            read: paths("read", &c.read)?,
            write: paths("write", &c.write)?,
            protected,
        })
    }

    /// Allow everything: for tests and the demo only.
    pub fn allow_all() -> Policy {
        Policy {
            methods: BUILTIN_METHODS.iter().map(|m| m.to_string()).collect(),
            exec: vec![vec!["...".into()]],
            read: vec![PathBuf::from("/")],
            write: vec![PathBuf::from("/")],
            protected: Protected::none(),
        }
    }

    /// Whether this command may run here; the rejection names the config key to change.
    pub fn check(&self, method: &Method) -> Result<(), Rejection> {
        let no = |detail: String| {
            Err(Rejection {
                code: RejectCode::NotAllowed,
                detail,
            })
        };
        let name = method.name();
        if !self.methods.iter().any(|m| m == name) {
            return no(format!(
                "method {name} is not in this unit's [allow] methods"
            ));
        }
        match method {
            Method::Ping => Ok(()),
            Method::Exec(e) => methods::exec::allowed(self, e),
            Method::FileRead(r) => methods::file_read::allowed(self, r),
            Method::FileWrite(w) => methods::file_write::allowed(self, w),
        }
    }
}

/// Whether `path` lies under one of `prefixes` (the `[allow] what` key).
pub(crate) fn check_prefixes(
    what: &str,
    prefixes: &[PathBuf],
    path: &str,
) -> Result<(), Rejection> {
    let p = Path::new(path);
    // Judge the path as written and, where its directory exists, as resolved, so a
    // symlinked directory cannot lead outside an allowed prefix.
    let resolved = p
        .parent()
        .and_then(|d| d.canonicalize().ok())
        .zip(p.file_name())
        .map(|(d, f)| d.join(f));
    let inside = |q: &Path| prefixes.iter().any(|pre| q.starts_with(pre));
    let inside_resolved = |q: &Path| {
        prefixes
            .iter()
            .any(|pre| q.starts_with(pre.canonicalize().as_deref().unwrap_or(pre)))
    };
    let clean = !p.components().any(|c| matches!(c, Component::ParentDir));
    if clean && inside(p) && resolved.as_deref().is_none_or(inside_resolved) {
        Ok(())
    } else {
        Err(Rejection {
            code: RejectCode::NotAllowed,
            detail: format!("path {path:?} is outside this unit's [allow] {what} prefixes"),
        })
    }
}

/// `path` with its directory resolved (symlinks, `//`), where that directory exists:
/// what a method that does not follow the last component reaches.
pub(crate) fn resolve_parent(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?;
    let dir = path.parent()?.canonicalize().ok()?;
    Some(dir.join(name))
}

impl Policy {
    /// Refuse `path` if it is one of the agent's own (see [`Protected`]) as written or
    /// resolved; `above`: also if it leads to one (a method that replaces what it names).
    pub(crate) fn refuse_protected(&self, path: &str, above: bool) -> Result<(), Rejection> {
        let p = Path::new(path);
        let forms = [
            Some(p.to_path_buf()),
            resolve_parent(p),
            p.canonicalize().ok(),
        ];
        let hit = forms.iter().flatten().find_map(|f| {
            if above {
                self.protected.covering_or_above(f)
            } else {
                self.protected.covering(f)
            }
        });
        match hit {
            None => Ok(()),
            Some(mut h) => {
                h.asked = p.to_path_buf();
                Err(Rejection {
                    code: RejectCode::NotAllowed,
                    detail: h.to_string(),
                })
            }
        }
    }
}

/// Glob match of one argv element: `*` any run of characters, `?` one character.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
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
    p[pi..].iter().all(|&c| c == '*')
}

pub(crate) fn argv_matches(pattern: &[String], argv: &[String]) -> bool {
    match pattern.split_last() {
        Some((last, head)) if last == "..." => {
            argv.len() >= head.len() && head.iter().zip(argv).all(|(p, a)| glob(p, a))
        }
        _ => pattern.len() == argv.len() && pattern.iter().zip(argv).all(|(p, a)| glob(p, a)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_wire::{Exec, FileRead, FileWrite};

    fn exec(argv: &[&str]) -> Method {
        Method::Exec(Exec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            cwd: None,
        })
    }

    fn policy(toml_text: &str) -> Policy {
        Policy::new(toml::from_str(toml_text).unwrap(), Protected::none()).unwrap()
    }

    #[test]
    fn default_allows_only_ping() {
        let p = Policy::new(AllowConfig::default(), Protected::none()).unwrap();
        assert!(p.check(&Method::Ping).is_ok());
        let e = p.check(&exec(&["true"])).unwrap_err();
        assert!(e.detail.contains("[allow] methods"), "{e}");
    }

    #[test]
    fn exec_patterns() {
        let p = policy(
            r#"methods = ["exec"]
               exec = ["systemctl restart *", "uname ...", "/usr/bin/echo ?"]"#,
        );
        assert!(p.check(&exec(&["systemctl", "restart", "nginx"])).is_ok());
        assert!(
            p.check(&exec(&["systemctl", "restart", "nginx", "x"]))
                .is_err()
        );
        assert!(p.check(&exec(&["systemctl", "stop", "nginx"])).is_err());
        assert!(p.check(&exec(&["uname"])).is_ok());
        assert!(p.check(&exec(&["uname", "-a", "-r"])).is_ok());
        assert!(p.check(&exec(&["/usr/bin/echo", "x"])).is_ok());
        assert!(p.check(&exec(&["/usr/bin/echo", "xy"])).is_err());
        assert!(p.check(&exec(&["sh", "-c", "uname"])).is_err());
        assert!(glob("a*b*c", "aXXbYc") && !glob("a*b", "aXc") && glob("*", ""));
    }

    #[test]
    fn path_prefixes_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("allowed");
        std::fs::create_dir(&allowed).unwrap();
        std::os::unix::fs::symlink("/etc", allowed.join("escape")).unwrap();
        let p = policy(&format!(
            "methods = [\"file.read\", \"file.write\"]\nread = [\"{0}\"]\nwrite = [\"{0}\"]",
            allowed.display()
        ));
        let read = |path: &Path| {
            Method::FileRead(FileRead {
                path: path.display().to_string(),
                max_bytes: 0,
            })
        };
        assert!(p.check(&read(&allowed.join("x"))).is_ok());
        assert!(p.check(&read(Path::new("/etc/shadow"))).is_err());
        assert!(
            p.check(&read(&allowed.join("escape/shadow"))).is_err(),
            "symlinked dir"
        );
        let w = Method::FileWrite(FileWrite {
            path: "/etc/passwd".into(),
            mode: 0o644,
            data: vec![],
        });
        assert!(p.check(&w).is_err());
    }

    #[test]
    fn bad_policies_are_named() {
        let e = Policy::new(
            toml::from_str(r#"methods = ["reboot"]"#).unwrap(),
            Protected::none(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("reboot"));
        let e = Policy::new(
            toml::from_str(r#"read = ["etc/"]"#).unwrap(),
            Protected::none(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("absolute"));
    }
}
