//! `file.read`: the contents of one file, up to `max_bytes` and the output cap.

use super::{Ctx, check_path, failed, ok};
use crate::policy::{self, Last, Policy};
use outpost_wire::{FileRead, Outcome, Rejection};
use tokio::io::AsyncReadExt;

pub fn check_args(r: &FileRead) -> Result<(), String> {
    check_path(&r.path)
}

/// Whether `[allow] read` covers this path.
pub(crate) fn allowed(p: &Policy, r: &FileRead) -> Result<(), Rejection> {
    policy::check_prefixes("read", &p.read, &r.path, Last::NotFollowed)?;
    // Resolved all the way: a symlink to the nkey is refused here already (the read
    // itself never follows one).
    p.refuse_protected(&r.path, false)
}

pub async fn run(r: &FileRead, ctx: &Ctx<'_>) -> Outcome {
    let cap = match r.max_bytes {
        0 => ctx.limits.output_cap,
        n => n.min(ctx.limits.output_cap),
    } as usize;
    match tokio::fs::File::open(&r.path).await {
        Ok(mut f) => {
            let mut kept = Vec::new();
            let mut truncated = false;
            let mut buf = [0u8; 8192];
            loop {
                match f.read(&mut buf).await {
                    Ok(0) | Err(_) => return ok(kept, truncated),
                    Ok(n) => {
                        let room = cap.saturating_sub(kept.len());
                        kept.extend_from_slice(&buf[..n.min(room)]);
                        truncated |= n > room;
                    }
                }
            }
        }
        Err(e) => failed(format!("cannot read {}: {e}", r.path)),
    }
}

#[cfg(test)]
mod tests {
    use crate::methods::test_support::*;
    use outpost_wire::Status;

    #[tokio::test]
    async fn reads_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        std::fs::write(&path, "hello").unwrap();
        let o = run_with(&read_of(&path.display().to_string(), 3), L).await;
        assert_eq!((o.stdout.as_slice(), o.truncated), (&b"hel"[..], true));
        let o = run_with(&read_of("/nonexistent/x", 0), L).await;
        assert!(matches!(o.status, Status::Failed(_)));
    }

    #[test]
    fn the_agents_own_files_are_refused() {
        let a = AgentFiles::new();
        let p = a.policy("");
        assert!(p.check(&read_of(&a.path("data/ok.txt"), 0)).is_ok());
        // A symlinked file that leads to the nkey.
        std::os::unix::fs::symlink(a.root.join("etc/outpost/node.nk"), a.root.join("data/nk"))
            .unwrap();
        for name in a.protected_names().into_iter().chain([a.path("data/nk")]) {
            let e = p.check(&read_of(&name, 0)).unwrap_err();
            assert_eq!(e.code, outpost_wire::RejectCode::NotAllowed, "{name}");
            assert!(
                e.detail.contains("never readable or writable remotely"),
                "{name}: {e}"
            );
        }
    }

    #[test]
    fn bad_args() {
        for bad in ["etc/passwd", "/etc/../x"] {
            assert!(
                crate::methods::check_args(&read_of(bad, 0)).is_err(),
                "{bad}"
            );
        }
    }
}
