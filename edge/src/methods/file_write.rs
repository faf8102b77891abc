//! `file.write`: replace one file atomically: a new temp file in the same directory,
//! written, fsynced, renamed over the name, the directory fsynced.
//!
//! At run time (not only at intake) the parent directory is opened and judged by its
//! real path (from the descriptor): under `[allow] write`, not one of the agent's own
//! directories under any name. Everything after happens relative to that descriptor,
//! so the directory cannot be swapped between the check and the write. The temp file
//! is created new (`O_CREAT|O_EXCL|O_NOFOLLOW`), so nothing planted in its place is
//! written through; the rename replaces what the name is, a symbolic link itself and
//! never what it points to. A name that is a directory, FIFO, device or socket is
//! refused. A missing parent is a failure: file.write makes no directories.
//!
//! The parent is followed if it is a link (judged where it leads), unlike the last
//! component of `file.read`: its resolved path is what is checked.

use super::{Ctx, blank, check_path, failed, fd, ok, rejected};
use crate::policy::{self, Last, Policy};
use outpost_wire::{FileWrite, MsgId, Outcome, Rejection, Status};
use std::ffi::{OsStr, OsString};
use std::fs::{File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

pub fn check_args(w: &FileWrite) -> Result<(), String> {
    check_path(&w.path)?;
    if w.mode & 0o7000 != 0 {
        return Err(format!(
            "mode {:o} sets setuid, setgid or sticky bits: file.write never makes such files",
            w.mode
        ));
    }
    if w.mode > 0o777 {
        return Err(format!(
            "mode {:o} is not a permission: give at most 777 (e.g. 644)",
            w.mode
        ));
    }
    Ok(())
}

/// Whether `[allow] write` covers this path.
pub(crate) fn allowed(p: &Policy, w: &FileWrite) -> Result<(), Rejection> {
    policy::check_prefixes("write", &p.write, &w.path, Last::NotFollowed)?;
    p.refuse_protected(&w.path, true)
}

/// Open the parent of `path` and judge it; check what the name is now.
fn open_parent_checked(p: &Policy, path: &str) -> Result<(File, OsString), Outcome> {
    let asked = Path::new(path);
    let (Some(parent), Some(name)) = (asked.parent(), asked.file_name()) else {
        return Err(failed(format!("path {path:?} names no file")));
    };
    let dir = fd::open_dir(parent).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => failed(format!(
            "directory {} does not exist: file.write does not create directories",
            parent.display()
        )),
        _ => failed(format!("cannot open directory {}: {e}", parent.display())),
    })?;
    let cannot = |e: io::Error| failed(format!("cannot write {path}: {e}"));
    let real = fd::real_path(&dir).map_err(cannot)?.join(name);
    let meta = dir.metadata().map_err(cannot)?;
    p.check_opened("write", &p.write, path, &real, &meta, true)
        .map_err(rejected)?;
    match fd::stat_at_nofollow(&dir, name).map_err(cannot)? {
        Some(m) if !(m.is_file() || m.file_type().is_symlink()) => Err(failed(format!(
            "{path} is a {}: file.write replaces only a regular file or a symbolic link",
            fd::kind(&m)
        ))),
        _ => Ok((dir, name.to_owned())),
    }
}

/// Create `tmp` new in `dir`, write and sync it, rename it over `name`, sync `dir`.
/// A temp file left by a failure is removed.
fn write_in(dir: &File, tmp: &OsStr, name: &OsStr, mode: u32, data: &[u8]) -> io::Result<()> {
    let mut f = fd::create_new_at(dir, tmp, 0o600)?;
    let result = (|| {
        // fchmod, so the mode is exactly what was asked whatever the agent's umask.
        f.set_permissions(Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fd::rename_at(dir, tmp, name)?;
        dir.sync_all()
    })();
    if result.is_err() {
        let _ = fd::unlink_at(dir, tmp);
    }
    result
}

pub async fn run(w: &FileWrite, id: MsgId, ctx: &Ctx<'_>) -> Outcome {
    let (dir, name) = match open_parent_checked(ctx.policy, &w.path) {
        Ok(x) => x,
        Err(o) => return o,
    };
    // The command id makes the name unique; a leftover with it is never reused.
    let tmp = OsString::from(format!(".outpost-{id}.tmp"));
    let (mode, data) = (w.mode, w.data.clone());
    let writing = tokio::task::spawn_blocking(move || write_in(&dir, &tmp, &name, mode, &data));
    match tokio::time::timeout(ctx.limits.timeout, writing).await {
        Ok(Ok(Ok(()))) => ok(Vec::new(), false),
        Ok(Ok(Err(e))) => failed(format!("cannot write {}: {e}", w.path)),
        Ok(Err(e)) => failed(format!("cannot write {}: {e}", w.path)),
        // Stuck in the kernel (a hung file system): the thread finishes on its own.
        Err(_) => blank(Status::TimedOut),
    }
}

#[cfg(test)]
mod tests {
    use crate::methods::test_support::*;
    use outpost_wire::{MsgId, Outcome, RejectCode, Status};
    use std::os::unix::fs::PermissionsExt;

    fn failed_with(o: &Outcome, needle: &str) {
        match &o.status {
            Status::Failed(r) => assert!(r.contains(needle), "{r:?} lacks {needle:?}"),
            other => panic!("expected a failure with {needle:?}, got {other:?}"),
        }
    }

    fn rejected_with(o: &Outcome, needle: &str) {
        match &o.status {
            Status::Rejected(r) => {
                assert_eq!(r.code, RejectCode::NotAllowed);
                assert!(r.detail.contains(needle), "{r} lacks {needle:?}");
            }
            other => panic!("expected a rejection with {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn the_agents_own_files_are_refused() {
        let a = AgentFiles::new();
        let p = a.policy("");
        assert!(
            p.check(&write_of(&a.path("data/new.txt"), 0o644, b"x"))
                .is_ok()
        );
        // The way to the config dir: were `etc` a symlink, replacing it moves the config.
        for name in a.protected_names().into_iter().chain([a.path("etc")]) {
            let e = p.check(&write_of(&name, 0o644, b"x")).unwrap_err();
            assert_eq!(e.code, RejectCode::NotAllowed, "{name}");
            assert!(
                e.detail.contains("never readable or writable remotely"),
                "{name}: {e}"
            );
        }
    }

    #[tokio::test]
    async fn writes_with_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt").to_string_lossy().into_owned();
        let o = run_with(&write_of(&path, 0o640, b"hello"), L).await;
        assert_eq!(o.status, Status::Succeeded);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
        // Again over the old file: replaced, and no temp file left behind.
        let o = run_with(&write_of(&path, 0o600, b"again"), L).await;
        assert_eq!(o.status, Status::Succeeded);
        assert_eq!(std::fs::read(&path).unwrap(), b"again");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn setuid_setgid_and_sticky_modes_are_bad_args() {
        let check = |mode: u32| crate::methods::check_args(&write_of("/srv/x", mode, b""));
        for bad in [0o4755, 0o2755, 0o1777, 0o6755, 0o7777, 0o100644] {
            let e = check(bad).expect_err(&format!("{bad:o}"));
            assert!(e.contains(&format!("{bad:o}")), "{e}");
        }
        for good in [0o644, 0o600, 0o755, 0o777, 0] {
            assert!(check(good).is_ok(), "{good:o}");
        }
    }

    #[tokio::test]
    async fn a_symlinked_final_name_is_replaced_not_written_through() {
        let a = AgentFiles::new();
        let p = a.policy("");
        let (link, target) = (a.root.join("data/link"), a.root.join("data/ok.txt"));
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let o = run_policy(&p, &write_of(&link.display().to_string(), 0o644, b"new"), L).await;
        assert_eq!(o.status, Status::Succeeded);
        assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
        assert_eq!(std::fs::read(&link).unwrap(), b"new");
        assert_eq!(
            std::fs::read(&target).unwrap(),
            b"ok",
            "written through the link"
        );
    }

    #[tokio::test]
    async fn the_parent_must_exist_and_is_judged_at_run_time() {
        let a = AgentFiles::new();
        let p = a.policy("");
        let missing = a.path("data/missing/x");
        failed_with(
            &run_policy(&p, &write_of(&missing, 0o644, b"x"), L).await,
            "does not exist",
        );
        // Accepted while data/later did not exist; made a symlink out before the run.
        let out = tempfile::tempdir().unwrap();
        let m = write_of(&a.path("data/later/x"), 0o644, b"x");
        assert!(p.check(&m).is_ok());
        std::os::unix::fs::symlink(out.path(), a.root.join("data/later")).unwrap();
        rejected_with(&run_policy(&p, &m, L).await, "[allow] write");
        assert!(
            !out.path().join("x").exists(),
            "written outside the prefixes"
        );
        // Accepted as data/sub/edge.toml; data/sub swapped for a link to the config dir.
        let sub = a.root.join("data/sub");
        std::fs::create_dir(&sub).unwrap();
        let m = write_of(&sub.join("edge.toml").display().to_string(), 0o644, b"x");
        assert!(p.check(&m).is_ok());
        std::fs::remove_dir(&sub).unwrap();
        std::os::unix::fs::symlink(a.root.join("etc/outpost"), &sub).unwrap();
        rejected_with(&run_policy(&p, &m, L).await, "never readable or writable");
        assert_eq!(
            std::fs::read(a.root.join("etc/outpost/edge.toml")).unwrap(),
            b"edge.toml"
        );
    }

    #[tokio::test]
    async fn only_a_regular_file_or_a_link_is_replaced() {
        let a = AgentFiles::new();
        let p = a.policy("");
        let fifo = a.root.join("data/fifo");
        let c = std::ffi::CString::new(fifo.display().to_string()).unwrap();
        // SAFETY: mkfifo(3) with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let o = run_policy(&p, &write_of(&fifo.display().to_string(), 0o644, b"x"), L).await;
        failed_with(&o, "FIFO");
        assert!(!std::fs::symlink_metadata(&fifo).unwrap().is_file());
        std::fs::create_dir(a.root.join("data/dir")).unwrap();
        let o = run_policy(&p, &write_of(&a.path("data/dir"), 0o644, b"x"), L).await;
        failed_with(&o, "directory");
    }

    #[tokio::test]
    async fn the_temp_file_is_created_new_never_through_a_link() {
        let a = AgentFiles::new();
        let p = a.policy("");
        let victim = a.root.join("data/ok.txt");
        // Links planted where a temp file goes (this naming and the one before it).
        let id = MsgId([1; 16]);
        for tmp in [format!(".outpost-{id}.tmp"), format!(".f.outpost-{id}")] {
            std::os::unix::fs::symlink(&victim, a.root.join("data").join(tmp)).unwrap();
        }
        let o = run_policy(&p, &write_of(&a.path("data/f"), 0o644, b"evil"), L).await;
        failed_with(&o, "exists");
        assert_eq!(std::fs::read(&victim).unwrap(), b"ok");
        assert!(!a.root.join("data/f").exists());
    }
}
