//! `file.write`: replace one file atomically (temp file, fsync, rename, fsync the dir).

use super::{check_path, failed, ok};
use crate::policy::{self, Last, Policy};
use outpost_wire::{FileWrite, MsgId, Outcome, Rejection};
use std::path::Path;

pub fn check_args(w: &FileWrite) -> Result<(), String> {
    check_path(&w.path)
}

/// Whether `[allow] write` covers this path.
pub(crate) fn allowed(p: &Policy, w: &FileWrite) -> Result<(), Rejection> {
    policy::check_prefixes("write", &p.write, &w.path, Last::NotFollowed)?;
    p.refuse_protected(&w.path, true)
}

pub async fn run(w: &FileWrite, id: MsgId) -> Outcome {
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

#[cfg(test)]
mod tests {
    use crate::methods::test_support::*;
    use outpost_wire::Status;

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
            assert_eq!(e.code, outpost_wire::RejectCode::NotAllowed, "{name}");
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
        let o = run_with(&write_of(&path, 0o600, b"hello"), L).await;
        assert_eq!(o.status, Status::Succeeded);
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
    }
}
