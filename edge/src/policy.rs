//! The unit's local allow-list: which methods run, which programs `exec` may start with
//! which environment names and in which directories, which paths the file methods may
//! touch. It comes only from the unit's own config; nothing in a command can widen it,
//! and the agent's own files ([`crate::protected`]) are refused whatever it says.
//!
//! The default allows `ping` only: a unit does nothing else until its operator writes
//! an `[allow]` table (the Ansible role does).
//!
//! # `[allow] exec` patterns
//!
//! A pattern is whitespace-separated elements matched one to one against argv (so
//! `systemctl restart *` needs exactly three). What one element matches:
//!
//! | pattern element | matches | never matches |
//! |---|---|---|
//! | no `*` or `?`: `restart`, `/var/log/syslog`, `--now` | exactly this text | anything else |
//! | `*` (within an element) | any run of characters, empty too, except `/` | a `/`: `/var/log/*` is only the direct children of `/var/log` |
//! | `?` | exactly one character except `/` | a `/` |
//! | an element with `*` or `?` not starting with `-` | | an argument starting with `-`: no option injection through a wildcard (`*` never matches `--output=x`; write `--unit=*` or `-*` to allow options) |
//! | an element with `*` or `?` | | an argument with a `.` or `..` path segment (`..`, `.`, `./x`, `a/../b`, `/var/log/.`); `.hidden` and `a..b` are fine |
//! | `...` as the last element | **anything**: zero or more further arguments of any text, options, `..` and `/` included | — (`...` anywhere else is a config error) |
//! | the first element (the program) without `/`: `systemctl` | the program this name resolves to in the agent's fixed PATH ([`crate::child_env::SEARCH_PATH`]) at check time, named either way: `systemctl` or `/usr/bin/systemctl` | the same name anywhere else (`/tmp/x/systemctl`, or `/bin/systemctl` through a symlinked `/bin`); a wildcard here is a config error |
//! | the first element with `/`: `/usr/bin/*` | the resolved program's absolute path, by the rules above | |
//! | the single pattern `...` | any argv at all (tests and the demo) | |
//!
//! Literal equality always holds: an element without wildcards matches its own text
//! even when that is `..` or an option. There is no escape for a literal `*` or `?`.
//! The program an argv names is resolved the same way (`argv[0]` without `/` looked up
//! in the fixed PATH, one with `/` taken as it is) and that absolute path is what runs.
//!
//! # Path prefixes (`read`, `write`, `cwd`)
//!
//! A path is allowed when it lies under a prefix by whole components (`/srv/app/`
//! covers `/srv/app` and `/srv/app/x`, not `/srv/application`), both as written and as
//! resolved (symlinks, `//`), and is not one of the agent's own files. The methods check
//! again at run time on the opened file or directory itself.

use crate::child_env;
use crate::methods;
use crate::protected::{Protected, normalise};
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
    /// argv patterns `exec` may run (see the module doc). `["..."]` allows anything.
    #[serde(default)]
    pub exec: Vec<String>,
    /// Path prefixes `file.read` may read.
    #[serde(default)]
    pub read: Vec<String>,
    /// Path prefixes `file.write` may write.
    #[serde(default)]
    pub write: Vec<String>,
    /// Environment names an `exec` command may set: exact names or `*` globs (`TZ`,
    /// `LC_*`). Default none; names on [`child_env::REFUSED`] can never be allowed.
    #[serde(default)]
    pub env: Vec<String>,
    /// Path prefixes an `exec` command may name as its working directory. Default none
    /// (commands run in `/`).
    #[serde(default)]
    pub cwd: Vec<String>,
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
            env: vec![],
            cwd: vec![],
        }
    }
}

/// Every method the agent knows.
pub const BUILTIN_METHODS: &[&str] = &["ping", "exec", "file.write", "file.read", "hub.keys"];

/// A policy that does not make sense.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("unknown method {0:?} in [allow] methods: known methods are {1}")]
    UnknownMethod(String, String),
    #[error("[allow] {0} entry {1:?} is not an absolute path prefix")]
    RelativePath(&'static str, String),
    #[error("[allow] exec pattern {0:?} is empty")]
    EmptyPattern(String),
    #[error(
        "[allow] exec pattern {0:?}: the program must be a name (looked up in the agent's PATH) or an absolute path"
    )]
    RelativeProgram(String),
    #[error(
        "[allow] exec pattern {0:?}: a program with `*` or `?` must be an absolute path glob such as /usr/bin/*"
    )]
    WildProgram(String),
    #[error("[allow] exec pattern {0:?}: `...` (any rest) may only be the last element")]
    MisplacedRest(String),
    #[error(
        "[allow] env entry {0:?} is not a variable name or a `*` glob of one (letters, digits, `_`, `*`)"
    )]
    BadEnvEntry(String),
    #[error(
        "[allow] env entry {entry:?} would allow {refused}, which is never passed to a program (it changes what code runs or what it trusts): remove the entry or list the names you need exactly"
    )]
    RefusedEnv {
        entry: String,
        refused: &'static str,
    },
}

/// What the first element of an exec pattern names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Program {
    /// The pattern `...` alone: any argv.
    Any,
    /// A name, resolved in the fixed PATH at check time.
    Name(String),
    /// An absolute path or path glob, matched against the resolved program.
    Path(String),
}

/// One checked `[allow] exec` pattern.
#[derive(Debug, Clone)]
pub struct Pattern {
    program: Program,
    args: Vec<String>,
    /// A last `...`: any further arguments.
    rest: bool,
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?'])
}

impl Pattern {
    fn parse(text: &str) -> Result<Pattern, PolicyError> {
        let mut parts: Vec<&str> = text.split_whitespace().collect();
        let rest = parts.last() == Some(&"...");
        if rest {
            parts.pop();
        }
        if parts.contains(&"...") {
            return Err(PolicyError::MisplacedRest(text.into()));
        }
        let Some((first, args)) = parts.split_first() else {
            return if rest {
                Ok(Pattern {
                    program: Program::Any,
                    args: vec![],
                    rest,
                })
            } else {
                Err(PolicyError::EmptyPattern(text.into()))
            };
        };
        let program = if first.contains('/') {
            if !first.starts_with('/') {
                return Err(PolicyError::RelativeProgram(text.into()));
            }
            Program::Path(first.to_string())
        } else if has_wildcard(first) {
            return Err(PolicyError::WildProgram(text.into()));
        } else {
            Program::Name(first.to_string())
        };
        Ok(Pattern {
            program,
            args: args.iter().map(|a| a.to_string()).collect(),
            rest,
        })
    }

    /// Whether `program` (resolved, absolute) with `args` matches.
    pub(crate) fn matches(&self, program: &Path, args: &[String]) -> bool {
        let program_ok = match &self.program {
            Program::Any => return true,
            Program::Name(n) => {
                methods::exec::resolve_program(n).is_some_and(|p| p.as_path() == program)
            }
            Program::Path(g) => program.to_str().is_some_and(|p| element_matches(g, p)),
        };
        let n = self.args.len();
        let count_ok = if self.rest {
            args.len() >= n
        } else {
            args.len() == n
        };
        program_ok
            && count_ok
            && self
                .args
                .iter()
                .zip(args)
                .all(|(p, a)| element_matches(p, a))
    }
}

/// The checked allow-list.
#[derive(Debug, Clone)]
pub struct Policy {
    pub(crate) methods: Vec<String>,
    pub(crate) exec: Vec<Pattern>,
    pub(crate) read: Vec<PathBuf>,
    pub(crate) write: Vec<PathBuf>,
    pub(crate) env: Vec<String>,
    pub(crate) cwd: Vec<PathBuf>,
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
            .map(|p| Pattern::parse(p))
            .collect::<Result<_, _>>()?;
        for entry in &c.env {
            if !child_env::valid_entry(entry) {
                return Err(PolicyError::BadEnvEntry(entry.clone()));
            }
            if let Some(refused) = child_env::refused_by_entry(entry) {
                return Err(PolicyError::RefusedEnv {
                    entry: entry.clone(),
                    refused,
                });
            }
        }
        let paths = |what, v: &[String]| -> Result<Vec<PathBuf>, PolicyError> {
            v.iter()
                .map(|p| {
                    if p.starts_with('/') && !p.split('/').any(|c| c == "..") {
                        Ok(normalise(Path::new(p)))
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
            cwd: paths("cwd", &c.cwd)?,
            env: c.env,
            protected,
        })
    }

    /// Allow everything but the refused environment names: for tests and the demo only.
    pub fn allow_all() -> Policy {
        Policy {
            methods: BUILTIN_METHODS.iter().map(|m| m.to_string()).collect(),
            exec: vec![Pattern {
                program: Program::Any,
                args: vec![],
                rest: true,
            }],
            read: vec![PathBuf::from("/")],
            write: vec![PathBuf::from("/")],
            env: vec!["*".into()],
            cwd: vec![PathBuf::from("/")],
            protected: Protected::none(),
        }
    }

    /// Whether `[allow] methods` lists this method.
    pub fn allows_method(&self, name: &str) -> bool {
        self.methods.iter().any(|m| m == name)
    }

    /// Whether this command may run here; the rejection names the config key to change.
    pub fn check(&self, method: &Method) -> Result<(), Rejection> {
        let name = method.name();
        if !self.methods.iter().any(|m| m == name) {
            return Err(not_allowed(format!(
                "method {name} is not in this unit's [allow] methods"
            )));
        }
        match method {
            Method::Ping | Method::HubKeys(_) => Ok(()),
            Method::Exec(e) => methods::exec::allowed(self, e).map(drop),
            Method::FileRead(r) => methods::file_read::allowed(self, r),
            Method::FileWrite(w) => methods::file_write::allowed(self, w),
        }
    }

    /// Whether a command may set the environment variable `name` to `value`.
    pub(crate) fn check_env(&self, name: &str, value: &str) -> Result<(), Rejection> {
        // Intake refuses these as bad arguments already; checked again so that no
        // path around `check_args` can pass `A=B` as a name.
        if !child_env::valid_name(name) {
            return Err(Rejection {
                code: RejectCode::BadArgs,
                detail: format!("env name {name:?} is not a variable name"),
            });
        }
        if let Some(r) = child_env::refused(name) {
            return Err(not_allowed(format!(
                "env {name} is never passed to a program (it matches {r}, which changes what code runs or what it trusts); no [allow] env can allow it"
            )));
        }
        if !self.env.iter().any(|g| child_env::glob(g, name)) {
            return Err(not_allowed(format!(
                "env {name} is not in this unit's [allow] env"
            )));
        }
        child_env::check_value(name, value).map_err(not_allowed)
    }

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
                Err(not_allowed(h.to_string()))
            }
        }
    }

    /// The run-time check of what a method opened: `real` is its resolved path (from
    /// the descriptor), `meta` its metadata. Under `prefixes` (the `[allow] what` key),
    /// and none of the agent's own files, under any name; `above` as in
    /// [`Policy::refuse_protected`].
    pub(crate) fn check_opened(
        &self,
        what: &str,
        prefixes: &[PathBuf],
        asked: &str,
        real: &Path,
        meta: &std::fs::Metadata,
        above: bool,
    ) -> Result<(), Rejection> {
        use std::os::unix::fs::MetadataExt;
        if !inside_resolved(prefixes, real) {
            return Err(outside(what, asked, Some(real)));
        }
        let hit = if above {
            self.protected.covering_or_above(real)
        } else {
            self.protected.covering(real)
        };
        match hit.or_else(|| self.protected.same_file(real, meta.dev(), meta.ino())) {
            None => Ok(()),
            Some(mut h) => {
                h.asked = PathBuf::from(asked);
                Err(not_allowed(h.to_string()))
            }
        }
    }
}

pub(crate) fn not_allowed(detail: String) -> Rejection {
    Rejection {
        code: RejectCode::NotAllowed,
        detail,
    }
}

fn outside(what: &str, path: &str, real: Option<&Path>) -> Rejection {
    let noun = if what == "cwd" { "cwd" } else { "path" };
    let resolved = match real {
        Some(r) if r != Path::new(path) => format!(" (resolved: {})", r.display()),
        _ => String::new(),
    };
    not_allowed(format!(
        "{noun} {path:?}{resolved} is outside this unit's [allow] {what} prefixes"
    ))
}

/// `path` with its directory resolved (symlinks, `//`), where that directory exists:
/// what a method that does not follow the last component reaches.
pub(crate) fn resolve_parent(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?;
    let dir = path.parent()?.canonicalize().ok()?;
    Some(dir.join(name))
}

/// Whether the resolved path `real` lies under a prefix, itself resolved where it exists.
fn inside_resolved(prefixes: &[PathBuf], real: &Path) -> bool {
    prefixes.iter().any(|pre| {
        let pre = pre.canonicalize().unwrap_or_else(|_| pre.clone());
        real.starts_with(pre)
    })
}

/// Whether the link in a path's last component is followed by the method using it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Last {
    /// `exec`'s cwd: a symlinked directory is run in where it leads.
    Followed,
    /// The file methods: a last-component link is never followed.
    NotFollowed,
}

/// Whether `path` lies under one of `prefixes` (the `[allow] what` key) as written and,
/// where it exists, as resolved, so a symlinked directory cannot lead out of them.
pub(crate) fn check_prefixes(
    what: &str,
    prefixes: &[PathBuf],
    path: &str,
    last: Last,
) -> Result<(), Rejection> {
    let p = Path::new(path);
    let clean = p.is_absolute() && !p.components().any(|c| matches!(c, Component::ParentDir));
    let written = normalise(p);
    let inside = prefixes.iter().any(|pre| written.starts_with(pre));
    let resolved = match last {
        Last::Followed => p.canonicalize().ok().or_else(|| resolve_parent(p)),
        Last::NotFollowed => resolve_parent(p),
    };
    if clean
        && inside
        && resolved
            .as_deref()
            .is_none_or(|r| inside_resolved(prefixes, r))
    {
        Ok(())
    } else {
        Err(outside(what, path, resolved.as_deref()))
    }
}

/// Whether one pattern element matches one argument: the table in the module doc.
pub fn element_matches(pattern: &str, arg: &str) -> bool {
    if !has_wildcard(pattern) {
        return pattern == arg;
    }
    if arg.starts_with('-') && !pattern.starts_with('-') {
        return false;
    }
    if arg.split('/').any(|seg| seg == "." || seg == "..") {
        return false;
    }
    glob(pattern, arg)
}

/// `*` any run of characters but `/`, `?` one character but `/`, the rest itself.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    // The last `*` seen: the pattern position after it, the text position it reaches.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi + 1, ti));
            pi += 1;
        } else if pi < p.len()
            && ((p[pi] == '?' && t[ti] != '/') || (p[pi] != '?' && p[pi] == t[ti]))
        {
            pi += 1;
            ti += 1;
        } else if let Some((after, reach)) = star {
            // Let the last `*` take one more character, unless that is a `/`: then no
            // earlier `*` can either (each `/` must meet a `/` of the pattern, in order).
            if t[reach] == '/' {
                return false;
            }
            star = Some((after, reach + 1));
            pi = after;
            ti = reach + 1;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
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
               exec = ["cat restart *", "uname ...", "/usr/bin/echo ?"]"#,
        );
        assert!(p.check(&exec(&["cat", "restart", "nginx"])).is_ok());
        assert!(p.check(&exec(&["cat", "restart", "nginx", "x"])).is_err());
        assert!(p.check(&exec(&["cat", "stop", "nginx"])).is_err());
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

    /// The table in this module's doc, row by row.
    #[test]
    fn what_a_pattern_element_matches() {
        for (pattern, arg, want) in [
            // literal: exactly this text, whatever it holds
            ("restart", "restart", true),
            ("restart", "restarts", false),
            ("..", "..", true),
            ("--force", "--force", true),
            ("/var/log/../x", "/var/log/../x", true),
            // `*` and `?` never match `/`
            ("/var/log/*", "/var/log/syslog", true),
            ("/var/log/*", "/var/log/nginx/access.log", false),
            ("/var/log/*", "/var/log/../../etc/shadow", false),
            ("/var/log/*/*", "/var/log/nginx/access.log", true),
            ("*", "a/b", false),
            ("?", "a", true),
            ("?", "/", false),
            ("a?c", "abc", true),
            ("a*", "a", true),
            ("*.log", "app.log", true),
            ("*", "", true),
            // a wildcard never matches an option unless the element is one itself
            ("*", "--output=x", false),
            ("*", "-", false),
            ("nginx*", "-nginx", false),
            ("-*", "--output=x", true),
            ("--unit=*", "--unit=nginx.service", true),
            // nor an argument with a `.` or `..` path segment
            ("*", "..", false),
            ("*", ".", false),
            ("/srv/*/x", "/srv/../x", false),
            ("/var/log/*", "/var/log/.", false),
            ("/var/log/*/*", "/var/log/./syslog", false),
            ("*", ".hidden", true),
            ("*", "a..b", true),
        ] {
            assert_eq!(
                element_matches(pattern, arg),
                want,
                "{pattern:?} against {arg:?}"
            );
        }
    }

    #[test]
    fn argv_patterns_from_the_security_review() {
        let p = policy(
            r#"methods = ["exec"]
               exec = ["cat /var/log/*", "echo restart *", "uname -u nginx ..."]"#,
        );
        assert!(p.check(&exec(&["cat", "/var/log/syslog"])).is_ok());
        for argv in [
            &["cat", "/var/log/../../etc/shadow"][..],
            &["cat", "/var/log/nginx/../../../etc/shadow"],
            &["cat", "/var/log/.."],
            &["echo", "restart", "--output=x"],
            &["echo", "restart", "-H"],
            &["echo", "restart", "a", "b"],
        ] {
            assert!(p.check(&exec(argv)).is_err(), "{argv:?}");
        }
        // `...` is "anything": options and all.
        assert!(
            p.check(&exec(&["uname", "-u", "nginx", "--since", "-1h", "../x"]))
                .is_ok()
        );
        assert!(p.check(&exec(&["uname", "-u", "nginx"])).is_ok());
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
