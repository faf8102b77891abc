//! The environment of a program that `exec` starts: a fixed base (never the agent's own
//! environment), plus the names a command sets that `[allow] env` lists, never a name
//! on [`REFUSED`]: those change which code a program runs or what it trusts, so they
//! would turn an allowed argv into any program. No config can allow them.

use outpost_wire::MsgId;

/// Where `exec` looks up a program name (an `argv[0]` without `/`), and the `PATH`
/// every child gets: the system directories only, in the usual order, never one that
/// a command or the agent's own environment names.
pub const SEARCH_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `LANG` of every child: UTF-8 without a language, so output stays parseable (glibc
/// since 2.35 and musl know it; where a system lacks it, programs fall back to `C`).
pub const CHILD_LANG: &str = "C.UTF-8";

/// `HOME` of every child: `/`, which the agent cannot write (`ProtectSystem=strict`), so
/// no program reads its dotfiles (`.gitconfig`, `.bashrc`, ...) from a directory that a
/// command could have written.
pub const CHILD_HOME: &str = "/";

/// Names a command may never set, whatever `[allow] env` says; `*` at the end matches
/// any rest. Matched without regard to case (over-refusing `ld_preload` costs nothing).
///
/// Sources: glibc's `UNSECURE_ENVVARS` (`sysdeps/generic/unsecvars.h`, what the dynamic
/// loader strips for setuid programs), sudo's `initial_badenv_table`
/// (`plugins/sudoers/env.c`, what sudo strips even when it keeps the environment), and
/// then the runtimes and tools a unit runs that load code, configuration or trust from
/// the environment. It guards against a config mistake (`env = ["*"]`); `[allow] env`
/// itself is deny-by-default.
pub const REFUSED: &[&str] = &[
    // Set by the agent itself: the fixed search path and home, and its own variables.
    "PATH",
    "HOME",
    "OUTPOST_*",
    // glibc UNSECURE_ENVVARS: the dynamic loader, iconv modules, resolver, locale and
    // message catalogues, malloc, time zone files, temporary files.
    "LD_*",
    "GCONV_PATH",
    "GETCONF_DIR",
    "GLIBC_TUNABLES",
    "HOSTALIASES",
    "LOCALDOMAIN",
    "LOCPATH",
    "MALLOC_*",
    "NIS_PATH",
    "NLSPATH",
    "RESOLV_HOST_CONF",
    "RES_OPTIONS",
    "TMPDIR",
    "TZDIR",
    // musl's locale path (the agent's own static builds link musl).
    "MUSL_LOCPATH",
    // sudo initial_badenv_table: shells and their startup files, terminal databases,
    // Kerberos, Perl, Python, Ruby, Java.
    "IFS",
    "CDPATH",
    "PATH_LOCALE",
    "ENV",
    "BASH_ENV",
    "BASH_FUNC_*",
    "BASHOPTS",
    "SHELLOPTS",
    "PS4",
    "GLOBIGNORE",
    "FPATH",
    "NULLCMD",
    "READNULLCMD",
    "ZDOTDIR",
    "TMPPREFIX",
    "TERMINFO",
    "TERMINFO_DIRS",
    "TERMPATH",
    "TERMCAP",
    "KRB5_CONFIG*",
    "KRB5_KTNAME",
    "PERL*",
    "PYTHON*",
    "RUBY*",
    "JAVA_TOOL_OPTIONS",
    // Beyond sudo's list: bash's other hooks, and runtimes that load code from the
    // environment (Java, .NET, Node.js, npm, PHP, Lua, Tcl, Ruby gems).
    "BASH_XTRACEFD",
    "PROMPT_COMMAND",
    "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "CLASSPATH",
    "DOTNET_*",
    "CORECLR_*",
    "COMPLUS_*",
    "NODE_*",
    "NPM_CONFIG_*",
    "PHPRC",
    "PHP_INI_SCAN_DIR",
    "LUA_*",
    "TCLLIBPATH",
    "GEM_*",
    "BUNDLE_*",
    // Tools that run a program or read their configuration from a named place: git
    // (GIT_SSH_COMMAND, GIT_CONFIG_*, GIT_EXEC_PATH, ...), make, apt, systemctl's pager
    // and editor, editors and pagers in general, askpass helpers, the XDG config dirs,
    // the D-Bus address systemctl talks to.
    "GIT_*",
    "MAKEFLAGS",
    "MFLAGS",
    "GNUMAKEFLAGS",
    "MAKEFILES",
    "APT_CONFIG",
    "SYSTEMD_*",
    "EDITOR",
    "VISUAL",
    "PAGER",
    "MANPAGER",
    "LESS*",
    "BROWSER",
    "SHELL",
    "SUDO_*",
    "SSH_ASKPASS*",
    "XDG_*",
    "DBUS_*",
    // TLS: which CAs a program trusts, which engines and providers it loads, where it
    // logs its session keys.
    "OPENSSL_*",
    "SSL_CERT_*",
    "SSLKEYLOGFILE",
    "CURL_CA_BUNDLE",
    "REQUESTS_CA_BUNDLE",
    "GNUTLS_*",
];

/// The base environment of every child, set before the command's own names.
/// `OUTPOST_COMMAND_ID` (32 hex digits) and `OUTPOST_DOMAIN` (the command's domain,
/// maybe empty) let a script log what it runs for.
pub fn base(id: MsgId, domain: &str) -> [(&'static str, String); 5] {
    [
        ("PATH", SEARCH_PATH.to_string()),
        ("LANG", CHILD_LANG.to_string()),
        ("HOME", CHILD_HOME.to_string()),
        ("OUTPOST_COMMAND_ID", id.to_string()),
        ("OUTPOST_DOMAIN", domain.to_string()),
    ]
}

/// Names whose value sudo's `env_check` refuses when it holds `/` or `%`: a locale or
/// terminal name that is really a path loads its data from anywhere.
const NO_PATH_VALUE: &[&str] = &["LANG", "LANGUAGE", "LC_*", "LINGUAS", "TERM", "COLORTERM"];

/// Whether `name` is a variable name: `[A-Za-z_][A-Za-z0-9_]*`. Anything else (`=`,
/// `%` as in bash's exported functions, spaces) is refused as a bad argument.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether an `[allow] env` entry is a name or a `*` glob of one.
pub fn valid_entry(entry: &str) -> bool {
    !entry.is_empty()
        && entry
            .chars()
            .all(|c| c == '*' || c.is_ascii_alphanumeric() || c == '_')
}

/// `*` matches any run of characters, empty too; everything else itself.
pub fn glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => name.strip_prefix(head).is_some_and(|rest| {
            (0..=rest.len())
                .filter(|&i| rest.is_char_boundary(i))
                .any(|i| glob(tail, &rest[i..]))
        }),
    }
}

/// Whether some name matches both `*` globs `a` and `b`.
pub fn overlap(a: &[u8], b: &[u8]) -> bool {
    match (a.first(), b.first()) {
        (None, None) => true,
        (Some(b'*'), _) => overlap(&a[1..], b) || (!b.is_empty() && overlap(a, &b[1..])),
        (_, Some(b'*')) => overlap(a, &b[1..]) || (!a.is_empty() && overlap(&a[1..], b)),
        (Some(x), Some(y)) => x == y && overlap(&a[1..], &b[1..]),
        _ => false,
    }
}

/// The refusal-list entry that `name` matches, if any (case does not matter).
pub fn refused(name: &str) -> Option<&'static str> {
    let upper = name.to_ascii_uppercase();
    REFUSED.iter().copied().find(|r| glob(r, &upper))
}

/// The refusal-list entry that some name matching the `[allow] env` glob `entry` would
/// match, if any: such an entry is a config error.
pub fn refused_by_entry(entry: &str) -> Option<&'static str> {
    let upper = entry.to_ascii_uppercase();
    REFUSED
        .iter()
        .copied()
        .find(|r| overlap(r.as_bytes(), upper.as_bytes()))
}

/// Refuse values that name files where only a name belongs (sudo's `env_check` for
/// locale and terminal names; its `tz_is_safe` for `TZ`).
pub fn check_value(name: &str, value: &str) -> Result<(), String> {
    if NO_PATH_VALUE.iter().any(|p| glob(p, name)) && value.contains(['/', '%']) {
        return Err(format!(
            "env {name}={value:?}: a value with `/` or `%` names a file to load, not a locale or terminal"
        ));
    }
    if name == "TZ" {
        let zone = value.strip_prefix(':').unwrap_or(value);
        if zone.starts_with('/') || zone.split('/').any(|s| s == "..") {
            return Err(format!(
                "env TZ={value:?} names a file outside the time zone database: give a zone name such as Europe/Berlin"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_and_their_overlaps() {
        for (p, n, want) in [
            ("LC_*", "LC_ALL", true),
            ("LC_*", "LC_", true),
            ("LC_*", "LANG", false),
            ("*", "", true),
            ("A*B", "AXXB", true),
            ("A*B", "AXXBC", false),
            ("TZ", "TZ", true),
            ("TZ", "TZDIR", false),
        ] {
            assert_eq!(glob(p, n), want, "{p} {n}");
        }
        for (a, b, want) in [
            ("LC_*", "LD_*", false),
            ("L*", "LD_*", true),
            ("*", "PATH", true),
            ("*_OPTIONS", "JAVA_TOOL_OPTIONS", true),
            ("*B", "A*", true),
            ("TZ*", "TZDIR", true),
            ("TZ", "TZDIR", false),
            ("PATHNAME", "PATH", false),
            ("MY_PATH", "PATH", false),
        ] {
            assert_eq!(overlap(a.as_bytes(), b.as_bytes()), want, "{a} {b}");
            assert_eq!(overlap(b.as_bytes(), a.as_bytes()), want, "{b} {a}");
        }
    }

    #[test]
    fn the_base_is_fixed() {
        let names: Vec<&str> = base(MsgId([0; 16]), "d").iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            [
                "PATH",
                "LANG",
                "HOME",
                "OUTPOST_COMMAND_ID",
                "OUTPOST_DOMAIN"
            ]
        );
        // A command can override none of them but LANG (when [allow] env lists it).
        assert!(names.iter().all(|n| refused(n).is_some() || *n == "LANG"));
    }
}
