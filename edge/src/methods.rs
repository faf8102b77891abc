//! The built-in methods. Each turns a checked command into an [`Outcome`]; none panics
//! and none returns without one.

use outpost_wire::{Exec, FileRead, FileWrite, Method, MsgId, Outcome, Status, now_ms};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt};

/// What a method needs besides its arguments.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub output_cap: u32,
    pub timeout: Duration,
}

/// Arguments that can be refused before anything runs (the ACK then says `BadArgs`).
pub fn check_args(method: &Method) -> Result<(), String> {
    match method {
        Method::Ping => Ok(()),
        Method::HubKeys(k) if k.keys.is_empty() || k.keys.len() > outpost_wire::MAX_HUB_KEYS => {
            Err(format!(
                "hub.keys needs 1 to {} keys, got {}",
                outpost_wire::MAX_HUB_KEYS,
                k.keys.len()
            ))
        }
        Method::HubKeys(_) => Ok(()),
        Method::Exec(e) if e.argv.is_empty() || e.argv[0].is_empty() => {
            Err("exec needs a program: argv is empty".into())
        }
        Method::Exec(e) => match &e.cwd {
            Some(cwd) if !cwd.starts_with('/') => Err(format!("cwd {cwd:?} is not absolute")),
            _ => Ok(()),
        },
        Method::FileWrite(FileWrite { path, .. }) | Method::FileRead(FileRead { path, .. }) => {
            check_path(path)
        }
    }
}

fn check_path(path: &str) -> Result<(), String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!("path {path:?} is not absolute"));
    }
    if p.components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(format!("path {path:?} contains `..`"));
    }
    if p.file_name().is_none() {
        return Err(format!("path {path:?} names no file"));
    }
    Ok(())
}

/// Run one method to its outcome.
pub async fn run(id: MsgId, method: &Method, limits: Limits) -> Outcome {
    let started_at = now_ms();
    let t0 = Instant::now();
    let mut out = match method {
        Method::Ping => ok(Vec::new(), false),
        Method::Exec(e) => exec(e, limits).await,
        Method::FileWrite(w) => file_write(w, id).await,
        Method::FileRead(r) => file_read(r, limits).await,
        // The agent runs it at intake: it needs the key that signed it.
        Method::HubKeys(_) => failed("hub.keys is run by the agent, not here".into()),
    };
    out.command = id;
    out.started_at = started_at;
    out.duration_ms = t0.elapsed().as_millis().min(u32::MAX as u128) as u32;
    out
}

fn blank(status: Status) -> Outcome {
    Outcome {
        command: MsgId([0; 16]),
        status,
        exit_code: None,
        stdout: Vec::new(),
        stderr: Vec::new(),
        truncated: false,
        started_at: 0,
        duration_ms: 0,
    }
}

fn ok(stdout: Vec<u8>, truncated: bool) -> Outcome {
    Outcome {
        stdout,
        truncated,
        ..blank(Status::Succeeded)
    }
}

fn failed(reason: String) -> Outcome {
    blank(Status::Failed(reason))
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

async fn exec(e: &Exec, limits: Limits) -> Outcome {
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
    let stdout = tokio::spawn(capture(child.stdout.take().expect("piped"), cap));
    let stderr = tokio::spawn(capture(child.stderr.take().expect("piped"), cap));
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

async fn file_write(w: &FileWrite, id: MsgId) -> Outcome {
    let path = Path::new(&w.path);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return failed(format!("path {:?} names no file", w.path));
    };
    let tmp = dir.join(format!(".{}.outpost-{id}", name.to_string_lossy()));
    let result = async {
        use std::os::unix::fs::PermissionsExt;
        tokio::fs::write(&tmp, &w.data).await?;
        tokio::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(w.mode & 0o7777)).await?;
        let f = tokio::fs::File::open(&tmp).await?;
        f.sync_all().await?;
        tokio::fs::rename(&tmp, path).await?;
        tokio::fs::File::open(dir).await?.sync_all().await
    }
    .await;
    match result {
        Ok(()) => ok(Vec::new(), false),
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            failed(format!("cannot write {}: {e}", w.path))
        }
    }
}

async fn file_read(r: &FileRead, limits: Limits) -> Outcome {
    let cap = match r.max_bytes {
        0 => limits.output_cap,
        n => n.min(limits.output_cap),
    } as usize;
    match tokio::fs::File::open(&r.path).await {
        Ok(f) => {
            let (data, truncated) = capture(f, cap).await;
            ok(data, truncated)
        }
        Err(e) => failed(format!("cannot read {}: {e}", r.path)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        output_cap: 16,
        timeout: Duration::from_secs(5),
    };

    fn exec_of(argv: &[&str]) -> Method {
        Method::Exec(Exec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("OUTPOST_T".into(), "v".into())],
            cwd: None,
        })
    }

    #[tokio::test]
    async fn exec_outcomes() {
        let id = MsgId([1; 16]);
        let o = run(
            id,
            &exec_of(&["sh", "-c", "echo $OUTPOST_T; echo e >&2"]),
            L,
        )
        .await;
        assert_eq!(o.status, Status::Succeeded);
        assert_eq!(
            (o.stdout.as_slice(), o.stderr.as_slice()),
            (&b"v\n"[..], &b"e\n"[..])
        );
        assert_eq!(o.command, id);

        let o = run(id, &exec_of(&["sh", "-c", "echo no; exit 3"]), L).await;
        assert_eq!(o.exit_code, Some(3));
        assert_eq!(o.status, Status::Failed("exited with code 3".into()));

        let o = run(id, &exec_of(&["sh", "-c", "yes | head -c 100000"]), L).await;
        assert!(o.truncated);
        assert_eq!(o.stdout.len(), 16);

        let short = Limits {
            timeout: Duration::from_millis(200),
            ..L
        };
        let o = run(id, &exec_of(&["sh", "-c", "sleep 30 & sleep 30"]), short).await;
        assert_eq!(o.status, Status::TimedOut);
        assert!(o.duration_ms < 5000);

        let o = run(id, &exec_of(&["/nonexistent/prog"]), L).await;
        assert!(matches!(o.status, Status::Failed(ref r) if r.contains("cannot start")));
    }

    #[tokio::test]
    async fn file_methods() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt").to_string_lossy().into_owned();
        let id = MsgId([2; 16]);
        let w = Method::FileWrite(FileWrite {
            path: path.clone(),
            mode: 0o600,
            data: b"hello".to_vec(),
        });
        assert_eq!(run(id, &w, L).await.status, Status::Succeeded);
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let r = Method::FileRead(FileRead {
            path: path.clone(),
            max_bytes: 3,
        });
        let o = run(id, &r, L).await;
        assert_eq!((o.stdout.as_slice(), o.truncated), (&b"hel"[..], true));
        let missing = Method::FileRead(FileRead {
            path: "/nonexistent/x".into(),
            max_bytes: 0,
        });
        assert!(matches!(
            run(id, &missing, L).await.status,
            Status::Failed(_)
        ));
    }

    #[test]
    fn bad_args() {
        assert!(check_args(&exec_of(&[])).is_err());
        assert!(check_args(&exec_of(&["ls"])).is_ok());
        let rel = Method::FileRead(FileRead {
            path: "etc/passwd".into(),
            max_bytes: 0,
        });
        assert!(check_args(&rel).is_err());
        let dots = Method::FileRead(FileRead {
            path: "/etc/../x".into(),
            max_bytes: 0,
        });
        assert!(check_args(&dots).is_err());
    }
}
