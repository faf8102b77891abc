//! `file.read`: the contents of one regular file, up to `max_bytes` and the output cap,
//! within the method's timeout.
//!
//! The file is opened without following a link in its last component and without
//! opening it as what it is (`O_PATH`: a device is never opened, a FIFO never waited
//! on); it must be a regular file; its real path (from the descriptor) must be under
//! `[allow] read` and none of the agent's own files, nor the same file as one under
//! another name. Only then is that very file opened for reading (through the
//! descriptor, non-blocking) and read in a blocking thread, bounded by size and by the
//! timeout. A read error at any point is a failure: no partial contents are reported.

use super::{Ctx, blank, check_path, failed, fd, ok, rejected};
use crate::policy::{self, Last, Policy};
use outpost_wire::{FileRead, Outcome, Rejection, Status};
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::time::{Duration, Instant};

/// Pause before reading again when a file has nothing yet (a streaming file read
/// non-blocking): short enough to feel immediate, long enough not to spin.
pub const READ_RETRY: Duration = Duration::from_millis(10);

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

/// Open `path` for reading after judging what it really is.
fn open_checked(p: &Policy, path: &str) -> Result<File, Outcome> {
    let cannot = |e: io::Error| failed(format!("cannot read {path}: {e}"));
    let handle = fd::open_path_nofollow(Path::new(path)).map_err(cannot)?;
    let meta = handle.metadata().map_err(cannot)?;
    if meta.file_type().is_symlink() {
        return Err(failed(format!(
            "{path} is a symbolic link: file.read never follows one (name the file it points to)"
        )));
    }
    if !meta.is_file() {
        return Err(failed(format!(
            "{path} is a {}: file.read reads only regular files",
            fd::kind(&meta)
        )));
    }
    let real = fd::real_path(&handle).map_err(cannot)?;
    p.check_opened("read", &p.read, path, &real, &meta, false)
        .map_err(rejected)?;
    let f = fd::reopen_for_reading(&handle).map_err(cannot)?;
    match f.metadata() {
        Ok(m) if fd::same_file(&m, &meta) => Ok(f),
        Ok(_) => Err(failed(format!("{path} changed while it was being opened"))),
        Err(e) => Err(cannot(e)),
    }
}

/// How a bounded read ended without contents.
#[derive(Debug)]
pub(crate) enum End {
    TimedOut,
    Failed(io::Error),
}

/// Read at most `cap` bytes (and whether there were more) before `deadline`. Waits
/// [`READ_RETRY`] whenever a non-blocking read has nothing yet; any other error ends
/// it, and the bytes read so far are dropped.
pub(crate) fn read_bounded<R: Read>(
    r: &mut R,
    cap: usize,
    deadline: Instant,
) -> Result<(Vec<u8>, bool), End> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if Instant::now() >= deadline {
            return Err(End::TimedOut);
        }
        // One byte past the cap tells whether there is more; never read further.
        let want = (cap + 1 - kept.len()).min(buf.len());
        match r.read(&mut buf[..want]) {
            Ok(0) => return Ok((kept, false)),
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > cap {
                    kept.truncate(cap);
                    return Ok((kept, true));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(READ_RETRY),
            Err(e) => return Err(End::Failed(e)),
        }
    }
}

pub async fn run(r: &FileRead, ctx: &Ctx<'_>) -> Outcome {
    let cap = match r.max_bytes {
        0 => ctx.limits.output_cap,
        n => n.min(ctx.limits.output_cap),
    } as usize;
    let deadline = Instant::now() + ctx.limits.timeout;
    let mut file = match open_checked(ctx.policy, &r.path) {
        Ok(f) => f,
        Err(o) => return o,
    };
    let reading = tokio::task::spawn_blocking(move || read_bounded(&mut file, cap, deadline));
    // A read stuck in the kernel (a hung network file system) cannot be interrupted:
    // the outcome says timed out and the thread is left to finish on its own.
    match tokio::time::timeout_at(deadline.into(), reading).await {
        Ok(Ok(Ok((data, truncated)))) => ok(data, truncated),
        Ok(Ok(Err(End::Failed(e)))) => failed(format!("reading {}: {e}", r.path)),
        Ok(Ok(Err(End::TimedOut))) | Err(_) => blank(Status::TimedOut),
        Ok(Err(e)) => failed(format!("reading {}: {e}", r.path)),
    }
}

#[cfg(test)]
mod tests {
    use crate::methods::test_support::*;
    use crate::policy::Policy;
    use outpost_wire::{RejectCode, Status};
    use std::time::Duration;

    /// Runs under the agent-files policy, at most 5 s (a hang is a failure too).
    async fn read(a: &AgentFiles, path: &str) -> outpost_wire::Outcome {
        let p = a.policy("");
        tokio::time::timeout(Duration::from_secs(5), run_policy(&p, &read_of(path, 0), L))
            .await
            .expect("file.read hung")
    }

    fn failed_with(o: &outpost_wire::Outcome, needle: &str) {
        match &o.status {
            Status::Failed(r) => assert!(r.contains(needle), "{r:?} lacks {needle:?}"),
            other => panic!("expected a failure with {needle:?}, got {other:?} {o:?}"),
        }
        assert!(o.stdout.is_empty(), "{o:?}");
    }

    fn rejected_with(o: &outpost_wire::Outcome, needle: &str) {
        match &o.status {
            Status::Rejected(r) => {
                assert_eq!(r.code, RejectCode::NotAllowed);
                assert!(r.detail.contains(needle), "{r} lacks {needle:?}");
            }
            other => panic!("expected a rejection with {needle:?}, got {other:?}"),
        }
        assert!(o.stdout.is_empty(), "{o:?}");
    }

    #[tokio::test]
    async fn reads_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        std::fs::write(&path, "hello").unwrap();
        let o = run_with(&read_of(&path.display().to_string(), 3), L).await;
        assert_eq!((o.stdout.as_slice(), o.truncated), (&b"hel"[..], true));
        let o = run_with(&read_of(&path.display().to_string(), 5), L).await;
        assert_eq!((o.stdout.as_slice(), o.truncated), (&b"hello"[..], false));
        let o = run_with(&read_of("/nonexistent/x", 0), L).await;
        assert!(matches!(o.status, Status::Failed(_)));
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
            assert_eq!(e.code, RejectCode::NotAllowed, "{name}");
            assert!(
                e.detail.contains("never readable or writable remotely"),
                "{name}: {e}"
            );
        }
    }

    #[tokio::test]
    async fn a_symlink_is_never_followed() {
        let a = AgentFiles::new();
        std::os::unix::fs::symlink(a.root.join("data/ok.txt"), a.root.join("data/link")).unwrap();
        failed_with(&read(&a, &a.path("data/link")).await, "symbolic link");
        // Through a symlinked directory, the file is judged where it really is.
        std::os::unix::fs::symlink(a.root.join("data"), a.root.join("alias")).unwrap();
        assert_eq!(read(&a, &a.path("alias/ok.txt")).await.stdout, b"ok");
    }

    #[tokio::test]
    async fn only_regular_files_are_read() {
        let a = AgentFiles::new();
        let fifo = a.root.join("data/fifo");
        let c = std::ffi::CString::new(fifo.display().to_string()).unwrap();
        // SAFETY: mkfifo(3) with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        failed_with(&read(&a, &fifo.display().to_string()).await, "FIFO");
        failed_with(&read(&a, &a.path("data")).await, "directory");
        let all = Policy::allow_all();
        let o = tokio::time::timeout(
            Duration::from_secs(5),
            run_policy(&all, &read_of("/dev/zero", 0), L),
        )
        .await
        .expect("file.read of /dev/zero hung");
        failed_with(&o, "character device");
    }

    #[tokio::test]
    async fn a_read_error_is_a_failure_not_partial_success() {
        // Reading /proc/self/mem at offset 0 fails with EIO, for root too.
        let all = Policy::allow_all();
        let o = run_policy(&all, &read_of("/proc/self/mem", 0), L).await;
        failed_with(&o, "reading /proc/self/mem");
        // An unreadable file, where permissions bind (not as root).
        let a = AgentFiles::new();
        let secret = a.root.join("data/secret");
        std::fs::write(&secret, "s").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).unwrap();
        if std::fs::read(&secret).is_err() {
            failed_with(&read(&a, &secret.display().to_string()).await, "secret");
        }
    }

    #[test]
    fn reading_is_bounded_in_size_and_time_and_fails_on_error() {
        use super::{End, read_bounded};
        use std::io::{self, Read};
        use std::time::Instant;
        struct Script(Vec<io::Result<Vec<u8>>>);
        impl Read for Script {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                match self.0.first() {
                    None => Ok(0),
                    Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        Err(io::ErrorKind::WouldBlock.into())
                    }
                    Some(_) => match self.0.remove(0) {
                        Ok(b) => {
                            buf[..b.len()].copy_from_slice(&b);
                            Ok(b.len())
                        }
                        Err(e) => Err(e),
                    },
                }
            }
        }
        let soon = || Instant::now() + Duration::from_millis(200);
        let ok = |v: Vec<&[u8]>| Script(v.into_iter().map(|b| Ok(b.to_vec())).collect());
        assert_eq!(
            read_bounded(&mut ok(vec![b"ab", b"cd"]), 10, soon()).unwrap(),
            (b"abcd".to_vec(), false)
        );
        assert_eq!(
            read_bounded(&mut ok(vec![b"ab", b"cd"]), 3, soon()).unwrap(),
            (b"abc".to_vec(), true)
        );
        assert_eq!(
            read_bounded(&mut ok(vec![b"abc"]), 3, soon()).unwrap(),
            (b"abc".to_vec(), false)
        );
        // An error mid-way: a failure, the partial data dropped.
        let mut mid = Script(vec![Ok(b"ab".to_vec()), Err(io::Error::other("boom"))]);
        assert!(matches!(
            read_bounded(&mut mid, 10, soon()),
            Err(End::Failed(_))
        ));
        // Nothing comes (a streaming file in non-blocking mode): timed out, not stuck.
        let t0 = Instant::now();
        let mut never = Script(vec![Err(io::ErrorKind::WouldBlock.into())]);
        assert!(matches!(
            read_bounded(&mut never, 10, soon()),
            Err(End::TimedOut)
        ));
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn the_opened_file_is_judged_at_run_time() {
        let a = AgentFiles::new();
        let p = a.policy("");
        // Accepted as data/sub/node.nk, a plain file; then data/sub is swapped for a
        // symlink to the agent's config dir before the command runs.
        let sub = a.root.join("data/sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("node.nk"), "decoy").unwrap();
        let m = read_of(&sub.join("node.nk").display().to_string(), 0);
        assert!(p.check(&m).is_ok());
        std::fs::remove_dir_all(&sub).unwrap();
        std::os::unix::fs::symlink(a.root.join("etc/outpost"), &sub).unwrap();
        rejected_with(&run_policy(&p, &m, L).await, "never readable");
        // A hard link to the nkey under an allowed name: the same file, refused.
        std::fs::hard_link(a.root.join("etc/outpost/node.nk"), a.root.join("data/hard")).unwrap();
        let m = read_of(&a.path("data/hard"), 0);
        rejected_with(&run_policy(&p, &m, L).await, "never readable");
        // And one that leads out of the prefixes.
        let narrow = a.policy("").clone();
        let out = tempfile::tempdir().unwrap();
        std::fs::write(out.path().join("x"), "outside").unwrap();
        let sub2 = a.root.join("data/sub2");
        std::fs::create_dir(&sub2).unwrap();
        std::fs::write(sub2.join("x"), "inside").unwrap();
        let m = read_of(&sub2.join("x").display().to_string(), 0);
        assert!(narrow.check(&m).is_ok());
        std::fs::remove_dir_all(&sub2).unwrap();
        std::os::unix::fs::symlink(out.path(), &sub2).unwrap();
        rejected_with(&run_policy(&narrow, &m, L).await, "[allow] read");
    }
}
