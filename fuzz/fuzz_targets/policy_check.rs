//! `Policy::check` against a naive reference written here from the rules alone (the
//! table in `edge/src/policy.rs`, the refusal list of issue 13, whole-component path
//! prefixes): small policies and commands built from the input out of a vocabulary
//! that hits the edges (wildcards, `..`, options, symlinked system dirs, refused
//! environment names, the agent's own files). Whatever the agent allows, the
//! reference must allow too; the reference may be stricter, never looser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_edge::policy::{AllowConfig, Policy};
use outpost_edge::protected::Protected;
use outpost_wire::{Exec, FileRead, FileWrite, Method};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The input, read as choices from small vocabularies.
struct Choices<'a>(&'a [u8]);

impl Choices<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn pick<'v>(&mut self, v: &[&'v str]) -> &'v str {
        v[self.byte() as usize % v.len()]
    }
    fn upto(&mut self, n: u8) -> usize {
        (self.byte() % (n + 1)) as usize
    }
    /// 1 to 3 fragments glued together.
    fn word(&mut self, v: &[&str]) -> String {
        let n = 1 + self.upto(2);
        (0..n).map(|_| self.pick(v)).collect()
    }
}

const FRAGMENTS: &[&str] = &[
    "*",
    "?",
    "-",
    "--",
    "/",
    ".",
    "..",
    "...",
    "a",
    "log",
    "var",
    "x=",
    "/var/log/",
    "etc",
    "shadow",
    "restart",
    "nginx",
    "/..",
    "/.",
    "-o",
];
const PATTERN_PROGRAMS: &[&str] = &[
    "...",
    "sh",
    "cat",
    "env",
    "outpost-nope",
    "/usr/bin/sh",
    "/bin/sh",
    "/usr/bin/*",
    "/usr/*/sh",
    "/tmp/sh",
    "*",
    "s?",
    "bin/sh",
];
const PROGRAMS: &[&str] = &[
    "sh",
    "cat",
    "env",
    "/usr/bin/sh",
    "/bin/sh",
    "/usr/bin/cat",
    "/tmp/sh",
    "outpost-nope",
    "./sh",
    "/usr/bin/../bin/sh",
    "",
];
const PREFIXES: &[&str] = &[
    "/var/log/",
    "/var/",
    "/",
    "/srv/app",
    "/srv/app/",
    "/etc/",
    "/etc/outpost/",
    "/var//log/./",
    "/tmp/",
    "var/log",
    "/srv/../etc/",
];
const PATH_PARTS: &[&str] = &[
    "/var",
    "/log",
    "/srv",
    "/app",
    "/etc",
    "/outpost",
    "/node.nk",
    "/edge.toml",
    "/x",
    "/..",
    "/.",
    "//",
    "/lib",
    "/outpost-x",
    "/application",
    "/proc",
    "/self",
    "/tmp",
    "x",
];
const ENV_NAMES: &[&str] = &[
    "TZ",
    "LC_ALL",
    "LD_PRELOAD",
    "ld_preload",
    "PATH",
    "Path",
    "APP_X",
    "LANG",
    "PYTHONPATH",
    "GIT_DIR",
    "A",
    "_",
    "1A",
    "A=B",
    "TZDIR",
    "OUTPOST_COMMAND_ID",
    "BASH_FUNC_f%%",
    "SSL_CERT_FILE",
    "MALLOC_ARENA_MAX",
    "",
];
const ENV_VALUES: &[&str] = &["UTC", "/tmp/x", "C", "..", "Europe/Berlin", "%", ""];
const ENV_ENTRIES: &[&str] = &[
    "TZ", "LC_*", "*", "L*", "APP_*", "A*", "*X", "LANG", "TZ*", "_", "P?TH", "", "Path",
];

/// The agent's own files in this run (they need not exist: compared as written then).
const CONFIG: &str = "/etc/outpost/edge.toml";
const NKEY: &str = "/etc/outpost/node.nk";
const CA: &str = "/etc/ssl/outpost-ca.pem";
const STATE: &str = "/var/lib/outpost";

// ---- the reference: naive, written from the rules, sharing no code with the agent ----

/// The fixed search path, spelled out again.
const REF_PATH: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

fn ref_runnable(p: &str) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn ref_resolve(name: &str) -> Option<String> {
    if name.starts_with('/') {
        return ref_runnable(name).then(|| name.to_string());
    }
    if name.is_empty() || name.contains('/') {
        return None;
    }
    REF_PATH
        .iter()
        .map(|d| format!("{d}/{name}"))
        .find(|p| ref_runnable(p))
}

/// Naive recursive glob: `*` any run of non-`/`, `?` one non-`/`.
fn ref_glob(p: &[char], t: &[char]) -> bool {
    match p.split_first() {
        None => t.is_empty(),
        Some(('*', rest)) => {
            (0..=t.len()).any(|i| !t[..i].contains(&'/') && ref_glob(rest, &t[i..]))
        }
        Some(('?', rest)) => !t.is_empty() && t[0] != '/' && ref_glob(rest, &t[1..]),
        Some((c, rest)) => !t.is_empty() && t[0] == *c && ref_glob(rest, &t[1..]),
    }
}

fn ref_element(p: &str, a: &str) -> bool {
    if !p.contains('*') && !p.contains('?') {
        return p == a;
    }
    if a.starts_with('-') && !p.starts_with('-') {
        return false;
    }
    for seg in a.split('/') {
        if seg == "." || seg == ".." {
            return false;
        }
    }
    let (p, a): (Vec<char>, Vec<char>) = (p.chars().collect(), a.chars().collect());
    ref_glob(&p, &a)
}

fn ref_argv(pattern: &str, argv: &[String]) -> bool {
    let parts: Vec<&str> = pattern.split_whitespace().collect();
    if parts == ["..."] {
        return true;
    }
    let Some(program) = argv.first().and_then(|a| ref_resolve(a)) else {
        return false;
    };
    let (first, mut args) = match parts.split_first() {
        Some((f, a)) => (*f, a.to_vec()),
        None => return false,
    };
    let rest = args.last() == Some(&"...");
    if rest {
        args.pop();
    }
    let first_ok = if first.contains('/') {
        ref_element(first, &program)
    } else {
        ref_resolve(first).as_deref() == Some(program.as_str())
    };
    let given = &argv[1..];
    let count_ok = if rest {
        given.len() >= args.len()
    } else {
        given.len() == args.len()
    };
    first_ok && count_ok && args.iter().zip(given).all(|(p, a)| ref_element(p, a))
}

/// Components of an absolute path without `..`, `//` and `.`; `None` if it has `..`
/// or is relative.
fn ref_components(p: &str) -> Option<Vec<&str>> {
    if !p.starts_with('/') {
        return None;
    }
    let mut out = vec![];
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

fn ref_under(path: &[&str], prefix: &str) -> bool {
    ref_components(prefix).is_some_and(|pre| path.starts_with(&pre))
}

/// The agent's own paths as files (exact) or trees; `above`: also their ancestors.
fn ref_protected(path: &[&str], above: bool) -> bool {
    let dir = Path::new(CONFIG)
        .parent()
        .and_then(|d| d.to_str())
        .unwrap_or("/");
    [CONFIG, dir, NKEY, CA, STATE].iter().any(|p| {
        let own = ref_components(p).unwrap_or_default();
        path.starts_with(&own) || (above && own.starts_with(path))
    })
}

fn ref_path_ok(path: &str, prefixes: &[String], above: bool) -> bool {
    let Some(c) = ref_components(path) else {
        return false;
    };
    prefixes.iter().any(|pre| ref_under(&c, pre)) && !ref_protected(&c, above)
}

/// The names issue 13 requires refused, spelled out again (`*`: any rest).
const REF_REFUSED: &[&str] = &[
    "PATH",
    "LD_*",
    "BASH_ENV",
    "ENV",
    "BASH_FUNC_*",
    "SHELLOPTS",
    "PS4",
    "IFS",
    "GIT_*",
    "PERL5OPT",
    "PERL5LIB",
    "PERLLIB",
    "PYTHON*",
    "NODE_OPTIONS",
    "NODE_PATH",
    "RUBYOPT",
    "RUBYLIB",
    "GCONV_PATH",
    "HOSTALIASES",
    "LOCALDOMAIN",
    "RES_OPTIONS",
    "MALLOC_*",
    "GLIBC_TUNABLES",
    "OPENSSL_CONF",
    "SSL_CERT_*",
];

fn ref_name_glob(p: &str, n: &str) -> bool {
    match p.strip_suffix('*') {
        Some(head) if !head.contains('*') => n.starts_with(head),
        _ => {
            let (p, n): (Vec<char>, Vec<char>) = (p.chars().collect(), n.chars().collect());
            // `*` here may match anything (names have no `/`).
            fn g(p: &[char], t: &[char]) -> bool {
                match p.split_first() {
                    None => t.is_empty(),
                    Some(('*', r)) => (0..=t.len()).any(|i| g(r, &t[i..])),
                    Some((c, r)) => !t.is_empty() && t[0] == *c && g(r, &t[1..]),
                }
            }
            g(&p, &n)
        }
    }
}

fn ref_env_ok(name: &str, allow: &[String]) -> bool {
    let upper = name.to_ascii_uppercase();
    let valid = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    valid
        && !REF_REFUSED.iter().any(|r| ref_name_glob(r, &upper))
        && allow.iter().any(|a| ref_name_glob(a, name))
}

fn reference_allows(c: &AllowConfig, m: &Method) -> bool {
    if !c.methods.iter().any(|x| x == m.name()) {
        return false;
    }
    match m {
        Method::Ping | Method::HubKeys(_) => true,
        Method::Exec(e) => {
            c.exec.iter().any(|p| ref_argv(p, &e.argv))
                && e.env.iter().all(|(k, _)| ref_env_ok(k, &c.env))
                && e.cwd
                    .as_deref()
                    .is_none_or(|d| ref_path_ok(d, &c.cwd, false))
        }
        Method::FileRead(r) => ref_path_ok(&r.path, &c.read, false),
        Method::FileWrite(w) => ref_path_ok(&w.path, &c.write, true),
    }
}

// ---- building policies and commands from the input ----

fn list(c: &mut Choices, v: &[&str], max: u8) -> Vec<String> {
    (0..c.upto(max)).map(|_| c.pick(v).to_string()).collect()
}

fn path(c: &mut Choices) -> String {
    let n = 1 + c.upto(4);
    (0..n).map(|_| c.pick(PATH_PARTS)).collect()
}

fn allow_config(c: &mut Choices) -> AllowConfig {
    let all = ["ping", "exec", "file.read", "file.write"];
    let bits = c.byte();
    let methods = all
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, m)| m.to_string())
        .collect();
    let exec = (0..c.upto(2))
        .map(|_| {
            let mut p = c.pick(PATTERN_PROGRAMS).to_string();
            for _ in 0..c.upto(3) {
                p.push(' ');
                p.push_str(&c.word(FRAGMENTS));
            }
            p
        })
        .collect();
    AllowConfig {
        methods,
        exec,
        read: list(c, PREFIXES, 2),
        write: list(c, PREFIXES, 2),
        env: list(c, ENV_ENTRIES, 2),
        cwd: list(c, PREFIXES, 2),
    }
}

fn command(c: &mut Choices) -> Method {
    match c.byte() % 4 {
        0 => Method::Ping,
        1 => {
            let mut argv = vec![c.pick(PROGRAMS).to_string()];
            for _ in 0..c.upto(3) {
                argv.push(c.word(FRAGMENTS));
            }
            let env = (0..c.upto(2))
                .map(|_| {
                    (
                        c.pick(ENV_NAMES).to_string(),
                        c.pick(ENV_VALUES).to_string(),
                    )
                })
                .collect();
            let cwd = (c.byte() % 2 == 1).then(|| path(c));
            Method::Exec(Exec { argv, env, cwd })
        }
        2 => Method::FileRead(FileRead {
            path: path(c),
            max_bytes: 0,
        }),
        _ => Method::FileWrite(FileWrite {
            path: path(c),
            mode: 0o644,
            data: vec![],
        }),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut c = Choices(data);
    let config = allow_config(&mut c);
    let protected = Protected::none()
        .with_config(Path::new(CONFIG))
        .with("identity (nkey file)", Path::new(NKEY))
        .with("CA certificate", Path::new(CA))
        .with("state directory", Path::new(STATE));
    // A config the agent refuses at start never runs.
    let Ok(policy) = Policy::new(config.clone(), protected) else {
        return;
    };
    for _ in 0..3 {
        let m = command(&mut c);
        if policy.check(&m).is_ok() {
            assert!(
                reference_allows(&config, &m),
                "the agent allows what the reference refuses:\n{config:#?}\n{m:#?}"
            );
        }
    }
});
