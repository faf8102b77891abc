//! `exec`: run a program (no shell) with a fixed environment, in its own process group,
//! capturing its outputs up to the cap.
//!
//! - The program is `argv[0]` resolved against the fixed [`SEARCH_PATH`] (a name) or
//!   taken as it is (an absolute path); that absolute path is what runs, with `argv[0]`
//!   passed as given.
//! - The environment is [`child_env::base`] plus the names the command sets that
//!   `[allow] env` lists; never the agent's own environment.
//! - The working directory is `/`, or the command's `cwd` where `[allow] cwd` allows
//!   it: opened, judged by its real path, and entered by descriptor (`fchdir`), so it
//!   cannot be swapped after the check.
//! - Everything is checked again at run time; a command that no longer passes is
//!   reported `Rejected` and never starts.
//! - The command's process group dies with its main process: background children left
//!   running when it exits are killed (SIGKILL to the group), as at the timeout and at
//!   agent shutdown ([`Groups`](super::groups::Groups)). Outputs are read until both pipes close or, when a
//!   child that left the group (`setsid`) holds them, for [`PIPE_GRACE`] after the
//!   group is gone; never forever. Such a child itself escapes the kill; systemd's
//!   `KillMode=control-group` ends it when the agent stops.

use super::{Ctx, blank, fd, rejected};
use crate::child_env::{self, SEARCH_PATH};
use crate::policy::{self, Last, Policy, not_allowed};
use outpost_wire::{Exec, MsgId, Outcome, RejectCode, Rejection, Status};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

/// How long the outputs may stay open after the command's process group is gone (a
/// child that left the group with `setsid` may hold them): then the outcome is sent
/// with what was read.
pub const PIPE_GRACE: Duration = Duration::from_secs(2);

/// The working directory of a command that names none: the same on every unit, and
/// not the agent's own (its state dir under systemd).
pub const DEFAULT_CWD: &str = "/";

pub fn check_args(e: &Exec) -> Result<(), String> {
    let Some(program) = e.argv.first().filter(|p| !p.is_empty()) else {
        return Err("exec needs a program: argv is empty".into());
    };
    if program.contains('/') && !program.starts_with('/') {
        return Err(format!(
            "program {program:?} is a relative path: give a name to look up in PATH or an absolute path"
        ));
    }
    if let Some(a) = e.argv.iter().find(|a| a.contains('\0')) {
        return Err(format!("argument {a:?} contains a NUL byte"));
    }
    for (name, value) in &e.env {
        if !child_env::valid_name(name) {
            return Err(format!(
                "env name {name:?} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)"
            ));
        }
        if value.contains('\0') {
            return Err(format!("env {name} contains a NUL byte"));
        }
    }
    match &e.cwd {
        Some(cwd) if !cwd.starts_with('/') => Err(format!("cwd {cwd:?} is not absolute")),
        Some(cwd) if cwd.split('/').any(|c| c == "..") => Err(format!("cwd {cwd:?} contains `..`")),
        Some(cwd) if cwd.contains('\0') => Err(format!("cwd {cwd:?} contains a NUL byte")),
        _ => Ok(()),
    }
}

/// The absolute program `name` runs: a name is looked up in [`SEARCH_PATH`] (first
/// executable regular file), an absolute path must be one. Never the current
/// directory, never the agent's own `PATH`.
pub fn resolve_program(name: &str) -> Option<PathBuf> {
    let runnable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.starts_with('/') {
        let p = PathBuf::from(name);
        return runnable(&p).then_some(p);
    }
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return None;
    }
    SEARCH_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| runnable(p))
}

/// Whether `[allow]` lets this command run: its program (resolved), every environment
/// name it sets, its working directory. Gives the program to run.
pub(crate) fn allowed(p: &Policy, e: &Exec) -> Result<PathBuf, Rejection> {
    let Some(argv0) = e.argv.first() else {
        return Err(not_allowed("exec needs a program: argv is empty".into()));
    };
    let Some(program) = resolve_program(argv0) else {
        return Err(Rejection {
            code: RejectCode::BadArgs,
            detail: format!(
                "program {argv0:?} is not found (an executable file in {SEARCH_PATH}, or an absolute path to one)"
            ),
        });
    };
    if !p.exec.iter().any(|pat| pat.matches(&program, &e.argv[1..])) {
        return Err(not_allowed(format!(
            "argv {:?} (program {}) matches no pattern in this unit's [allow] exec",
            e.argv,
            program.display()
        )));
    }
    // An argument naming one of the agent's own files (as a path, or after `=` as in
    // `--file=/path`, through links too) is refused whatever the patterns allow: an
    // allowed `cat /var/log/...` must not read the nkey through a symlink. A program
    // that walks a directory (`cp -r /etc`) or runs a script is not seen through:
    // allow such programs narrowly (ADR 0005).
    for arg in &e.argv[1..] {
        let after_eq = arg.split_once('=').map(|(_, v)| v);
        for path in [Some(arg.as_str()), after_eq].into_iter().flatten() {
            if path.starts_with('/') {
                p.refuse_protected(path, false)?;
            }
        }
    }
    for (name, value) in &e.env {
        p.check_env(name, value)?;
    }
    if let Some(cwd) = &e.cwd {
        policy::check_prefixes("cwd", &p.cwd, cwd, Last::Followed)?;
        p.refuse_protected(cwd, false)?;
    }
    Ok(program)
}

/// Open the command's working directory and judge it by what it really is.
fn open_cwd(p: &Policy, cwd: &str) -> Result<File, Outcome> {
    let dir = fd::open_dir_path(Path::new(cwd))
        .map_err(|e| super::failed(format!("cannot open cwd {cwd}: {e}")))?;
    let (real, meta) = fd::real_path(&dir)
        .and_then(|r| dir.metadata().map(|m| (r, m)))
        .map_err(|e| super::failed(format!("cannot resolve cwd {cwd}: {e}")))?;
    p.check_opened("cwd", &p.cwd, cwd, &real, &meta, false)
        .map_err(rejected)?;
    Ok(dir)
}

/// One output stream: the first `cap` bytes, and whether there were more. Reading on
/// past the cap keeps the child from blocking on a full pipe.
struct Captured {
    kept: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl Captured {
    fn new(cap: usize) -> Captured {
        Captured {
            kept: Vec::new(),
            cap,
            truncated: false,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = self.cap.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.truncated |= bytes.len() > room;
    }
}

fn exit_status(r: std::io::Result<std::process::ExitStatus>) -> (Status, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    match r {
        Ok(st) => match (st.code(), st.signal()) {
            (Some(0), _) => (Status::Succeeded, Some(0)),
            (Some(c), _) => (Status::Failed(format!("exited with code {c}")), Some(c)),
            (None, sig) => (
                Status::Failed(format!("killed by signal {}", sig.unwrap_or(0))),
                None,
            ),
        },
        Err(err) => (
            Status::Failed(format!("waiting for the process: {err}")),
            None,
        ),
    }
}

pub async fn run(id: MsgId, e: &Exec, ctx: &Ctx<'_>) -> Outcome {
    // Checked again: the file system may have changed since intake.
    let program = match allowed(ctx.policy, e) {
        Ok(p) => p,
        Err(r) => return rejected(r),
    };
    let cwd = match &e.cwd {
        Some(c) => match open_cwd(ctx.policy, c) {
            Ok(dir) => Some(dir),
            Err(o) => return o,
        },
        None => None,
    };
    let mut cmd = tokio::process::Command::new(&program);
    cmd.arg0(&e.argv[0])
        .args(&e.argv[1..])
        .env_clear()
        .envs(child_env::base(id, ctx.domain))
        .envs(e.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that what it starts dies with it.
        .process_group(0)
        .kill_on_drop(true);
    match &cwd {
        Some(dir) => {
            let raw = dir.as_raw_fd();
            // SAFETY: between fork and exec the child calls only fchdir(2), which is
            // async-signal-safe, on a descriptor the parent keeps open until spawn
            // returns (it is close-on-exec, so the program never sees it).
            unsafe {
                cmd.pre_exec(move || {
                    if libc::fchdir(raw) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        None => {
            cmd.current_dir(DEFAULT_CWD);
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(err) => {
            return super::failed(format!("cannot start {}: {err}", program.display()));
        }
    };
    drop(cwd);
    let (Some(pid), Some(mut out), Some(mut err)) =
        (child.id(), child.stdout.take(), child.stderr.take())
    else {
        return super::failed("the child's process id or output pipes are missing".into());
    };
    let mut group = ctx.groups.register(pid);
    run_to_end(&mut child, &mut group, &mut out, &mut err, ctx).await
}

/// Wait for the main process (or the timeout) while draining both pipes; then kill
/// the group and read the pipes until they close or [`PIPE_GRACE`] passes.
async fn run_to_end(
    child: &mut tokio::process::Child,
    group: &mut super::groups::Group<'_>,
    out: &mut tokio::process::ChildStdout,
    err: &mut tokio::process::ChildStderr,
    ctx: &Ctx<'_>,
) -> Outcome {
    let cap = ctx.limits.output_cap as usize;
    let (mut stdout, mut stderr) = (Captured::new(cap), Captured::new(cap));
    let (mut out_open, mut err_open) = (true, true);
    let (mut out_buf, mut err_buf) = ([0u8; 4096], [0u8; 4096]);
    let mut deadline = Instant::now() + ctx.limits.timeout;
    let mut exit: Option<(Status, Option<i32>)> = None;
    while exit.is_none() || out_open || err_open {
        tokio::select! {
            r = child.wait(), if exit.is_none() => {
                // The main process is done: what it left running in its group goes.
                group.finish();
                exit = Some(exit_status(r));
                deadline = Instant::now() + PIPE_GRACE;
            }
            n = out.read(&mut out_buf), if out_open => match n {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => stdout.push(&out_buf[..n]),
            },
            n = err.read(&mut err_buf), if err_open => match n {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => stderr.push(&err_buf[..n]),
            },
            _ = tokio::time::sleep_until(deadline) => {
                if exit.is_some() {
                    // Pipes held by a child that left the group: stop reading.
                    break;
                }
                group.kill();
                let _ = child.wait().await;
                group.finish();
                exit = Some((Status::TimedOut, None));
                deadline = Instant::now() + PIPE_GRACE;
            }
        }
    }
    let (status, exit_code) = exit.unwrap_or((Status::TimedOut, None));
    Outcome {
        exit_code,
        stdout: stdout.kept,
        stderr: stderr.kept,
        truncated: stdout.truncated || stderr.truncated,
        ..blank(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::child_env::{REFUSED, SEARCH_PATH};
    use crate::methods::groups::Groups;
    use crate::methods::test_support::*;
    use crate::methods::{self, Limits};
    use outpost_wire::{Method, MsgId};
    use std::path::{Path, PathBuf};
    use std::time::Instant;

    /// Output room for `env` and friends.
    const BIG: Limits = Limits {
        output_cap: 64 * 1024,
        timeout: Duration::from_secs(10),
    };

    fn exec_full(argv: &[&str], env: &[(&str, &str)], cwd: Option<&str>) -> Method {
        Method::Exec(Exec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cwd: cwd.map(str::to_string),
        })
    }

    /// What intake decides: arguments, then the allow-list.
    fn intake(p: &Policy, m: &Method) -> Result<(), Rejection> {
        methods::check_args(m).map_err(|detail| Rejection {
            code: RejectCode::BadArgs,
            detail,
        })?;
        p.check(m)
    }

    /// `m` is refused with `code` and a detail containing `needle`.
    fn refused(p: &Policy, m: &Method, code: RejectCode, needle: &str) {
        match intake(p, m) {
            Ok(()) => panic!("allowed, should be refused ({needle}): {m:?}"),
            Err(r) => {
                assert_eq!(r.code, code, "{m:?}: {r}");
                assert!(r.detail.contains(needle), "{m:?}: {r} lacks {needle:?}");
            }
        }
    }

    fn policy_of(text: &str) -> Policy {
        Policy::new(
            toml::from_str(text).unwrap(),
            crate::protected::Protected::none(),
        )
        .unwrap()
    }

    async fn run_in(p: &Policy, groups: &Groups, m: &Method, limits: Limits) -> Outcome {
        let ctx = Ctx {
            limits,
            policy: p,
            groups,
            domain: "nginx",
        };
        methods::run(MsgId([7; 16]), m, &ctx).await
    }

    fn stdout(o: &Outcome) -> String {
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Where the fixed PATH finds `name`, looked up here independently of the agent.
    fn on_search_path(name: &str) -> PathBuf {
        SEARCH_PATH
            .split(':')
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
            .unwrap()
    }

    /// Whether `pid` is still a live process (a zombie waiting to be reaped is not).
    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            let state = s.rsplit(')').next().and_then(|r| r.trim().chars().next());
            !matches!(state, Some('Z' | 'X') | None)
        })
    }

    /// Poll until `pid` is gone, at most 3 s; kill it if it is not (no leak either way).
    async fn gone(pid: i32) -> bool {
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            if !alive(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // SAFETY: kill(2) on a pid this test's command printed.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        false
    }

    fn first_pid(o: &Outcome) -> i32 {
        stdout(o)
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap()
    }

    #[tokio::test]
    async fn exec_outcomes() {
        let o = run_with(&exec_of(&["sh", "-c", "echo o; echo e >&2"]), L).await;
        assert_eq!(o.status, Status::Succeeded);
        assert_eq!(
            (o.stdout.as_slice(), o.stderr.as_slice()),
            (&b"o\n"[..], &b"e\n"[..])
        );

        let o = run_with(&exec_of(&["sh", "-c", "echo no; exit 3"]), L).await;
        assert_eq!(o.exit_code, Some(3));
        assert_eq!(o.status, Status::Failed("exited with code 3".into()));

        let o = run_with(&exec_of(&["sh", "-c", "yes | head -c 100000"]), L).await;
        assert!(o.truncated);
        assert_eq!(o.stdout.len(), 16);
    }

    // ---- finding 2: environment ----

    /// Every name on the refusal list (a `*` made concrete) and the ones the security
    /// review named: refused in a command even where `[allow] env` lists plenty, and
    /// no `[allow] env` entry can allow them.
    fn refused_names() -> Vec<String> {
        let mut names: Vec<String> = REFUSED.iter().map(|r| r.replace('*', "X")).collect();
        names.extend(
            [
                "PATH",
                "LD_PRELOAD",
                "LD_LIBRARY_PATH",
                "ld_preload",
                "BASH_ENV",
                "ENV",
                "BASH_FUNC_foo",
                "SHELLOPTS",
                "PS4",
                "IFS",
                "GIT_CONFIG_COUNT",
                "GIT_CONFIG_KEY_0",
                "GIT_SSH_COMMAND",
                "PERL5OPT",
                "PERL5LIB",
                "PERLLIB",
                "PYTHONPATH",
                "PYTHONSTARTUP",
                "NODE_OPTIONS",
                "NODE_PATH",
                "RUBYOPT",
                "RUBYLIB",
                "GCONV_PATH",
                "HOSTALIASES",
                "LOCALDOMAIN",
                "RES_OPTIONS",
                "MALLOC_CHECK_",
                "GLIBC_TUNABLES",
                "OPENSSL_CONF",
                "SSL_CERT_FILE",
                "SSL_CERT_DIR",
                "HOME",
                "OUTPOST_COMMAND_ID",
            ]
            .map(String::from),
        );
        names
    }

    #[test]
    fn every_refused_env_name_is_refused_in_a_command() {
        let p = policy_of(
            "methods = [\"exec\"]\nexec = [\"...\"]\nenv = [\"TZ\", \"LC_*\", \"APP_*\"]\n",
        );
        for name in refused_names() {
            let m = exec_full(&["true"], &[(&name, "x")], None);
            refused(&p, &m, RejectCode::NotAllowed, "never");
        }
        // The allow-everything policy of tests and the demo refuses them too.
        let all = Policy::allow_all();
        for name in refused_names() {
            let m = exec_full(&["true"], &[(&name, "x")], None);
            refused(&all, &m, RejectCode::NotAllowed, "never");
        }
    }

    #[test]
    fn allow_env_cannot_allow_a_refused_name() {
        let mut entries: Vec<String> = refused_names();
        entries.extend(["*", "L*", "LD_*", "P*", "PY*", "*_OPTIONS", "GIT*"].map(String::from));
        for entry in entries {
            let text = format!("methods = [\"exec\"]\nenv = [\"TZ\", {entry:?}]\n");
            let e = Policy::new(
                toml::from_str(&text).unwrap(),
                crate::protected::Protected::none(),
            )
            .expect_err(&entry);
            let msg = e.to_string();
            assert!(
                msg.contains(&entry) && msg.contains("[allow] env"),
                "{entry}: {msg}"
            );
        }
        // Neighbours of refused names are fine.
        policy_of("env = [\"TZ\", \"LC_*\", \"LANG\", \"APP_*\", \"PATHNAME\", \"MY_PATH\"]");
    }

    #[test]
    fn env_is_deny_by_default_and_values_are_checked() {
        let p = policy_of("methods = [\"exec\"]\nexec = [\"...\"]\nenv = [\"TZ\", \"LC_*\"]\n");
        assert!(intake(&p, &exec_full(&["true"], &[("TZ", "UTC")], None)).is_ok());
        assert!(intake(&p, &exec_full(&["true"], &[("LC_ALL", "C")], None)).is_ok());
        refused(
            &p,
            &exec_full(&["true"], &[("APP_MODE", "x")], None),
            RejectCode::NotAllowed,
            "[allow] env",
        );
        let none = policy_of("methods = [\"exec\"]\nexec = [\"...\"]\n");
        refused(
            &none,
            &exec_full(&["true"], &[("TZ", "UTC")], None),
            RejectCode::NotAllowed,
            "[allow] env",
        );
        // sudo's env_check: a locale name with `/` or `%` loads files from anywhere.
        refused(
            &p,
            &exec_full(&["true"], &[("LC_ALL", "/tmp/evil")], None),
            RejectCode::NotAllowed,
            "LC_ALL",
        );
        refused(
            &p,
            &exec_full(&["true"], &[("TZ", "/tmp/zone")], None),
            RejectCode::NotAllowed,
            "TZ",
        );
        refused(
            &p,
            &exec_full(&["true"], &[("TZ", "Europe/../../tmp/zone")], None),
            RejectCode::NotAllowed,
            "TZ",
        );
        // Not a variable name at all: bad arguments.
        for bad in ["", "A=B", "BASH_FUNC_x%%", "1X", "A B"] {
            refused(
                &p,
                &exec_full(&["true"], &[(bad, "x")], None),
                RejectCode::BadArgs,
                "name",
            );
        }
    }

    #[tokio::test]
    async fn allowed_env_reaches_the_child_with_the_fixed_base_and_nothing_else() {
        let p = policy_of("methods = [\"exec\"]\nexec = [\"env\"]\nenv = [\"TZ\"]\n");
        let o = run_in(
            &p,
            &Groups::default(),
            &exec_full(&["env"], &[("TZ", "UTC")], None),
            BIG,
        )
        .await;
        assert_eq!(o.status, Status::Succeeded, "{o:?}");
        let mut got: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
        got.sort();
        let want = [
            "HOME=/".to_string(),
            "LANG=C.UTF-8".into(),
            format!("OUTPOST_COMMAND_ID={}", MsgId([7; 16])),
            "OUTPOST_DOMAIN=nginx".into(),
            format!("PATH={SEARCH_PATH}"),
            "TZ=UTC".into(),
        ];
        assert_eq!(got, want);
    }

    /// The agent's own environment never reaches a child: this test runs itself again
    /// in a process that has a marker variable, and looks for it in the child's.
    #[test]
    fn the_agents_environment_never_reaches_the_child() {
        const MARKER: &str = "OUTPOST_TEST_AGENT_ENV_MARKER";
        if std::env::var_os(MARKER).is_none() {
            let st = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "methods::exec::tests::the_agents_environment_never_reaches_the_child",
                    "--test-threads=1",
                    "--nocapture",
                ])
                .env(MARKER, "leaked")
                .env("LD_PRELOAD", "")
                .status()
                .unwrap();
            assert!(st.success(), "the re-run in a marked environment failed");
            return;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let o = rt.block_on(run_with(&exec_of(&["env"]), BIG));
        let out = stdout(&o);
        assert!(out.contains("PATH="), "{out}");
        assert!(
            !out.contains(MARKER),
            "the agent's environment leaked: {out}"
        );
        assert!(!out.contains("LD_PRELOAD"), "{out}");
    }

    // ---- finding 2: working directory ----

    #[tokio::test]
    async fn cwd_has_its_own_allow_list() {
        let a = AgentFiles::new();
        let data = a.path("data");
        std::os::unix::fs::symlink("/etc", a.root.join("data/out")).unwrap();
        let p = a.policy(&format!("cwd = [{data:?}]\n"));
        let pwd = |cwd: &str| exec_full(&["pwd"], &[], Some(cwd));
        assert!(intake(&p, &pwd(&data)).is_ok());
        refused(
            &p,
            &pwd(&a.path("state")),
            RejectCode::NotAllowed,
            "[allow] cwd",
        );
        refused(&p, &pwd("/tmp"), RejectCode::NotAllowed, "[allow] cwd");
        refused(
            &p,
            &pwd(&a.path("data/out")),
            RejectCode::NotAllowed,
            "[allow] cwd",
        );
        // Default: no cwd at all.
        refused(
            &a.policy(""),
            &pwd(&data),
            RejectCode::NotAllowed,
            "[allow] cwd",
        );
        // The agent's own dirs, whatever the prefixes say.
        let wide = a.policy(&format!("cwd = [{:?}]\n", a.root.display().to_string()));
        let r = a.root.display();
        for dir in [
            a.path("etc/outpost"),
            a.path("link"),
            a.path("state"),
            format!("{r}//etc/./outpost/"),
        ] {
            refused(
                &wide,
                &pwd(&dir),
                RejectCode::NotAllowed,
                "never readable or writable remotely",
            );
        }
        // It runs there (the real path), and only there.
        let o = run_in(&p, &Groups::default(), &pwd(&data), BIG).await;
        assert_eq!(stdout(&o).trim(), data, "{o:?}");
        let o = run_in(&p, &Groups::default(), &exec_of(&["pwd"]), BIG).await;
        assert_eq!(stdout(&o).trim(), "/", "{o:?}");
    }

    #[tokio::test]
    async fn cwd_is_checked_again_at_run_time_by_its_real_path() {
        let a = AgentFiles::new();
        let work = a.root.join("data/work");
        std::fs::create_dir(&work).unwrap();
        let p = a.policy(&format!("cwd = [{:?}]\n", a.path("data")));
        let m = exec_full(&["pwd"], &[], Some(&work.display().to_string()));
        assert!(intake(&p, &m).is_ok());
        // Swapped for a symlink to the agent's config dir between intake and run.
        std::fs::remove_dir(&work).unwrap();
        std::os::unix::fs::symlink(a.root.join("etc/outpost"), &work).unwrap();
        let o = run_in(&p, &Groups::default(), &m, BIG).await;
        assert!(
            matches!(&o.status, Status::Rejected(r) if r.code == RejectCode::NotAllowed),
            "{o:?}"
        );
        assert!(o.stdout.is_empty());
    }

    // ---- finding 4: the agent's own files as arguments ----

    #[test]
    fn arguments_naming_the_agents_own_files_are_refused() {
        let a = AgentFiles::new();
        let p = a.policy("");
        std::os::unix::fs::symlink(a.root.join("etc/outpost/node.nk"), a.root.join("data/nk"))
            .unwrap();
        let cat = |arg: String| {
            Method::Exec(Exec {
                argv: vec!["cat".into(), arg],
                env: vec![],
                cwd: None,
            })
        };
        assert!(p.check(&cat(a.path("data/ok.txt"))).is_ok());
        for name in a.protected_names().into_iter().chain([a.path("data/nk")]) {
            for arg in [name.clone(), format!("--file={name}")] {
                refused(
                    &p,
                    &cat(arg),
                    RejectCode::NotAllowed,
                    "never readable or writable remotely",
                );
            }
        }
    }

    // ---- finding 2: argv[0] ----

    #[tokio::test]
    async fn program_names_resolve_against_the_fixed_path_only() {
        let p = policy_of("methods = [\"exec\"]\nexec = [\"sh -c *\", \"env\"]\n");
        let sh = on_search_path("sh").display().to_string();
        assert!(intake(&p, &exec_of(&["sh", "-c", "true"])).is_ok());
        assert!(intake(&p, &exec_of(&[&sh, "-c", "true"])).is_ok(), "{sh}");
        // The same name anywhere else is not the allowed program.
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("sh");
        std::fs::copy(&sh, &fake).unwrap();
        refused(
            &p,
            &exec_of(&[&fake.display().to_string(), "-c", "true"]),
            RejectCode::NotAllowed,
            "[allow] exec",
        );
        // Nor can a command move the search path.
        let path = format!("{}:{SEARCH_PATH}", dir.path().display());
        refused(
            &p,
            &exec_full(&["sh", "-c", "true"], &[("PATH", &path)], None),
            RejectCode::NotAllowed,
            "never",
        );
        // A relative program or one that is nowhere: refused, saying why.
        refused(
            &p,
            &exec_of(&["./sh", "-c", "x"]),
            RejectCode::BadArgs,
            "absolute",
        );
        let all = Policy::allow_all();
        refused(
            &all,
            &exec_of(&["outpost-no-such-program"]),
            RejectCode::BadArgs,
            "not found",
        );
        // What runs is the resolved program, whatever the agent's own PATH says.
        let o = run_in(&p, &Groups::default(), &exec_of(&["env"]), BIG).await;
        assert!(
            stdout(&o).contains(&format!("PATH={SEARCH_PATH}\n")),
            "{o:?}"
        );
    }

    #[test]
    fn pattern_program_elements() {
        let sh = on_search_path("sh").display().to_string();
        let p = policy_of(&format!(
            "methods = [\"exec\"]\nexec = [\"{sh} -c *\", \"/usr/bin/* --version\"]\n"
        ));
        assert!(intake(&p, &exec_of(&["sh", "-c", "true"])).is_ok());
        assert!(intake(&p, &exec_of(&["env", "--version"])).is_ok());
        refused(
            &p,
            &exec_of(&["/usr/bin/../bin/env", "--version"]),
            RejectCode::NotAllowed,
            "[allow] exec",
        );
        for bad in ["* -c x", "sh?", "bin/sh -c", "... x"] {
            let text = format!("methods = [\"exec\"]\nexec = [{bad:?}]\n");
            let e = Policy::new(
                toml::from_str(&text).unwrap(),
                crate::protected::Protected::none(),
            );
            assert!(e.is_err(), "{bad}");
        }
    }

    // ---- finding 6: process groups ----

    #[tokio::test]
    async fn a_background_child_dies_when_the_main_process_exits() {
        let t0 = Instant::now();
        let o = run_with(&exec_of(&["sh", "-c", "sleep 30 & echo $!"]), BIG).await;
        assert_eq!(o.status, Status::Succeeded);
        let pid = first_pid(&o);
        assert!(
            gone(pid).await,
            "background child {pid} outlived its command"
        );
        // And its open stdout did not hold the outcome.
        assert!(t0.elapsed() < PIPE_GRACE, "{:?}", t0.elapsed());
    }

    #[tokio::test]
    async fn the_whole_group_dies_at_the_timeout() {
        let short = Limits {
            timeout: Duration::from_millis(300),
            ..BIG
        };
        let t0 = Instant::now();
        let o = run_with(
            &exec_of(&["sh", "-c", "sleep 30 & echo $!; exec sleep 30"]),
            short,
        )
        .await;
        assert_eq!(o.status, Status::TimedOut);
        let pid = first_pid(&o);
        assert!(
            gone(pid).await,
            "background child {pid} outlived the timeout"
        );
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    }

    #[tokio::test]
    async fn kill_all_ends_running_commands_and_their_children() {
        let groups = Groups::default();
        let p = Policy::allow_all();
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!("sleep 30 & echo $! > {}; exec sleep 30", pid_file.display());
        let m = exec_of(&["sh", "-c", &script]);
        let long = Limits {
            timeout: Duration::from_secs(60),
            ..BIG
        };
        // Once the background child is running, as the agent does at shutdown.
        let killer = async {
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end {
                if let Ok(pid) = std::fs::read_to_string(&pid_file)
                    && let Ok(pid) = pid.trim().parse::<i32>()
                {
                    return (groups.kill_all(), pid);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("the command did not start its background child");
        };
        let (o, (killed, pid)) = tokio::join!(run_in(&p, &groups, &m, long), killer);
        assert_eq!(killed, 1);
        assert_eq!(o.status, Status::Failed("killed by signal 9".into()));
        assert!(gone(pid).await, "background child {pid} outlived kill_all");
        assert!(
            groups.is_empty(),
            "a finished command left its group registered"
        );
    }

    #[tokio::test]
    async fn a_child_that_left_the_group_does_not_hold_the_outcome() {
        // setsid(1) puts the sleep in a session of its own: out of reach of the group
        // kill (systemd's KillMode=control-group gets it at agent stop). It still
        // holds stdout open; the outcome comes anyway, with what was written.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pid");
        // The main process waits until the child is in its own session (it wrote its
        // pid from there), so the group kill cannot catch it before it escapes.
        let script = format!(
            "setsid sh -c 'echo $$ > {f}; exec sleep 30' & \
             while [ ! -s {f} ]; do sleep 0.01; done; cat {f}",
            f = f.display()
        );
        let t0 = Instant::now();
        let o = run_with(&exec_of(&["sh", "-c", &script]), BIG).await;
        let pid = first_pid(&o);
        let escaped = alive(pid);
        // SAFETY: kill(2) on the pid the command printed; the test cleans up after it.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(o.status, Status::Succeeded);
        assert!(escaped, "the child did not escape: the test tests nothing");
        let took = t0.elapsed();
        assert!(
            took >= PIPE_GRACE && took < PIPE_GRACE + Duration::from_secs(2),
            "{took:?}"
        );
    }
}
