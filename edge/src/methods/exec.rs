//! `exec`: run a program (no shell) in its own process group, capture its outputs up
//! to the cap, kill the group at the timeout.

use super::{Ctx, blank, failed};
use crate::policy::{self, Policy};
use outpost_wire::{Exec, Outcome, RejectCode, Rejection, Status};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

pub fn check_args(e: &Exec) -> Result<(), String> {
    if e.argv.is_empty() || e.argv[0].is_empty() {
        return Err("exec needs a program: argv is empty".into());
    }
    match &e.cwd {
        Some(cwd) if !cwd.starts_with('/') => Err(format!("cwd {cwd:?} is not absolute")),
        _ => Ok(()),
    }
}

/// Whether `[allow] exec` lets this argv run.
pub(crate) fn allowed(p: &Policy, e: &Exec) -> Result<(), Rejection> {
    if p.exec.iter().any(|pat| policy::argv_matches(pat, &e.argv)) {
        Ok(())
    } else {
        Err(Rejection {
            code: RejectCode::NotAllowed,
            detail: format!(
                "argv {:?} matches no pattern in this unit's [allow] exec",
                e.argv
            ),
        })
    }
}

/// Read a stream to its end, keeping the first `cap` bytes. Reading on past the cap
/// keeps the child from blocking on a full pipe.
async fn capture<R: AsyncRead + Unpin>(mut r: R, cap: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return (kept, truncated),
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                truncated |= n > room;
            }
        }
    }
}

pub async fn run(e: &Exec, ctx: &Ctx<'_>) -> Outcome {
    let limits = ctx.limits;
    let mut cmd = tokio::process::Command::new(&e.argv[0]);
    cmd.args(&e.argv[1..])
        .envs(e.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills what it started too.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(cwd) = &e.cwd {
        cmd.current_dir(cwd);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(err) => return failed(format!("cannot start {:?}: {err}", e.argv[0])),
    };
    let cap = limits.output_cap as usize;
    let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
        return failed("the child's output pipes are missing".into());
    };
    let stdout = tokio::spawn(capture(out, cap));
    let stderr = tokio::spawn(capture(err, cap));
    let (status, exit_code) = match tokio::time::timeout(limits.timeout, child.wait()).await {
        Ok(Ok(st)) => match st.code() {
            Some(0) => (Status::Succeeded, Some(0)),
            Some(c) => (Status::Failed(format!("exited with code {c}")), Some(c)),
            None => {
                use std::os::unix::process::ExitStatusExt;
                let sig = st.signal().unwrap_or(0);
                (Status::Failed(format!("killed by signal {sig}")), None)
            }
        },
        Ok(Err(err)) => (
            Status::Failed(format!("waiting for the process: {err}")),
            None,
        ),
        Err(_) => {
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) with a negative pid signals the process group we made.
                unsafe {
                    libc::kill(-(pid as i32), libc::SIGKILL);
                }
            }
            let _ = child.wait().await;
            (Status::TimedOut, None)
        }
    };
    // Grandchildren that keep the pipes open must not hold the outcome forever.
    let grace = Duration::from_secs(2);
    let (out, t1) = tokio::time::timeout(grace, stdout)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let (err, t2) = tokio::time::timeout(grace, stderr)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    Outcome {
        exit_code,
        stdout: out,
        stderr: err,
        truncated: t1 || t2,
        ..blank(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::Limits;
    use crate::methods::test_support::*;
    use outpost_wire::Method;

    #[tokio::test]
    async fn exec_outcomes() {
        let with_env = Method::Exec(Exec {
            argv: ["sh", "-c", "echo $OUTPOST_T; echo e >&2"]
                .map(String::from)
                .to_vec(),
            env: vec![("OUTPOST_T".into(), "v".into())],
            cwd: None,
        });
        let o = run_with(&with_env, L).await;
        assert_eq!(o.status, Status::Succeeded);
        assert_eq!(
            (o.stdout.as_slice(), o.stderr.as_slice()),
            (&b"v\n"[..], &b"e\n"[..])
        );

        let o = run_with(&exec_of(&["sh", "-c", "echo no; exit 3"]), L).await;
        assert_eq!(o.exit_code, Some(3));
        assert_eq!(o.status, Status::Failed("exited with code 3".into()));

        let o = run_with(&exec_of(&["sh", "-c", "yes | head -c 100000"]), L).await;
        assert!(o.truncated);
        assert_eq!(o.stdout.len(), 16);

        let short = Limits {
            timeout: Duration::from_millis(200),
            ..L
        };
        let o = run_with(&exec_of(&["sh", "-c", "sleep 30 & sleep 30"]), short).await;
        assert_eq!(o.status, Status::TimedOut);
        assert!(o.duration_ms < 5000);

        let o = run_with(&exec_of(&["/nonexistent/prog"]), L).await;
        assert!(matches!(o.status, Status::Failed(ref r) if r.contains("cannot start")));
    }

    #[test]
    fn bad_args() {
        assert!(
            check_args(&Exec {
                argv: vec![],
                env: vec![],
                cwd: None
            })
            .is_err()
        );
        assert!(crate::methods::check_args(&exec_of(&["ls"])).is_ok());
    }
}
