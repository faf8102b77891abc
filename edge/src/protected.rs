//! The agent's own files: its config file and the directory it is in, its identity
//! (the nkey seed), the fleet CA certificate and its state dir. No command may read,
//! write or run in them, whatever the `[allow]` prefixes say: reading the nkey steals
//! the unit's identity, writing the config rewrites its own allow-list, writing the CA
//! or the state dir bricks it.
//!
//! Paths are compared as written (normalised: `//` and `.` dropped) and as resolved
//! (symlinks followed), on both sides, so neither a symlink nor a `//` gets around it;
//! open files are also compared by device and inode, so neither does a hard link or a
//! bind mount of the file itself.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One of the agent's own paths and what it is to the agent.
#[derive(Debug, Clone)]
struct Entry {
    what: &'static str,
    path: PathBuf,
}

/// The agent's own paths, refused to every method.
#[derive(Debug, Clone, Default)]
pub struct Protected {
    entries: Vec<Entry>,
}

/// A path refused because it is (or is inside, or leads to) one of the agent's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// The path asked for, as the check saw it.
    pub asked: PathBuf,
    /// What the protected path is: "config file", "state directory", ...
    pub what: &'static str,
    /// The protected path.
    pub path: PathBuf,
}

impl fmt::Display for Hit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is the agent's own {} ({}): never readable or writable remotely, whatever [allow] says",
            self.asked.display(),
            self.what,
            self.path.display()
        )
    }
}

/// `path` without `//`, `.` and trailing slashes (`..` is refused before this is used).
pub(crate) fn normalise(path: &Path) -> PathBuf {
    path.components().collect()
}

impl Protected {
    /// Nothing protected: for tests and the demo's allow-everything policy.
    pub fn none() -> Protected {
        Protected::default()
    }

    /// Also protect `path` (a file, or a directory and everything under it). A relative
    /// path is taken against the current directory, as the agent itself opens it.
    pub fn with(mut self, what: &'static str, path: &Path) -> Protected {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        self.entries.push(Entry {
            what,
            path: normalise(&path),
        });
        self
    }

    /// Protect the config file and the directory it is in (where the enrolment bundle
    /// puts the nkey and the CA too).
    pub fn with_config(self, config_file: &Path) -> Protected {
        let file = std::path::absolute(config_file).unwrap_or_else(|_| config_file.into());
        let this = self.with("config file", &file);
        match file.parent() {
            Some(dir) => this.with("config directory", dir),
            None => this,
        }
    }

    /// Each entry in both its forms: as given, and resolved where it exists now (it is
    /// resolved at each check, so a state dir made after start is covered too).
    fn forms(&self) -> impl Iterator<Item = (&Entry, PathBuf)> {
        self.entries.iter().flat_map(|e| {
            let resolved = e.path.canonicalize().ok().filter(|r| *r != e.path);
            std::iter::once((e, e.path.clone())).chain(resolved.map(|r| (e, r)))
        })
    }

    fn hit(asked: &Path, e: &Entry) -> Hit {
        Hit {
            asked: asked.to_path_buf(),
            what: e.what,
            path: e.path.clone(),
        }
    }

    /// The protected path that `path` is, or is inside of. Call it with each form of
    /// the path asked for (as written, resolved).
    pub fn covering(&self, path: &Path) -> Option<Hit> {
        let p = normalise(path);
        self.forms()
            .find(|(_, form)| p.starts_with(form))
            .map(|(e, _)| Protected::hit(path, e))
    }

    /// Like [`Protected::covering`], and also when `path` is on the way to a protected
    /// path: replacing it (a symlink to the config dir, say) moves the agent's files.
    pub fn covering_or_above(&self, path: &Path) -> Option<Hit> {
        let p = normalise(path);
        self.forms()
            .find(|(_, form)| p.starts_with(form) || form.starts_with(&p))
            .map(|(e, _)| Protected::hit(path, e))
    }

    /// The protected path that an open file or directory (`dev`, `ino` from its
    /// `fstat`) is, under whatever name it was reached (a hard link, a bind mount).
    pub fn same_file(&self, asked: &Path, dev: u64, ino: u64) -> Option<Hit> {
        self.entries
            .iter()
            .find(|e| std::fs::metadata(&e.path).is_ok_and(|m| m.dev() == dev && m.ino() == ino))
            .map(|e| Protected::hit(asked, e))
    }

    /// Whether nothing is protected.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(p: &Protected, path: &str, covered: bool, above: bool) {
        assert_eq!(
            p.covering(Path::new(path)).is_some(),
            covered,
            "covering {path}"
        );
        assert_eq!(
            p.covering_or_above(Path::new(path)).is_some(),
            above,
            "covering_or_above {path}"
        );
    }

    #[test]
    fn files_dirs_and_the_way_to_them() {
        let p = Protected::none()
            .with_config(Path::new("/etc/outpost/edge.toml"))
            .with("identity (nkey file)", Path::new("/keys/node.nk"))
            .with("state directory", Path::new("/var/lib/outpost/"));
        check(&p, "/etc/outpost/edge.toml", true, true);
        check(&p, "/etc/outpost/anything-new", true, true);
        check(&p, "/etc//outpost/./node.nk", true, true);
        check(&p, "/keys/node.nk", true, true);
        check(&p, "/keys/other", false, false);
        check(&p, "/var/lib/outpost", true, true);
        check(&p, "/var/lib/outpost/log", true, true);
        check(&p, "/var/lib/outpost-other/log", false, false);
        // Replacing /etc or /keys (were they symlinks) would move the agent's files.
        check(&p, "/etc", false, true);
        check(&p, "/keys", false, true);
        check(&p, "/etc/nginx/nginx.conf", false, false);
        let hit = p.covering(Path::new("/keys/node.nk")).unwrap();
        let msg = hit.to_string();
        assert!(
            msg.contains("identity") && msg.contains("never readable or writable remotely"),
            "{msg}"
        );
    }

    #[test]
    fn resolved_forms_and_hard_links() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::write(real.join("node.nk"), "seed").unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        // Protected by its symlinked name: the real path is covered too.
        let p = Protected::none().with("identity (nkey file)", &dir.path().join("link/node.nk"));
        assert!(p.covering(&real.join("node.nk")).is_some());
        std::fs::hard_link(real.join("node.nk"), dir.path().join("copy")).unwrap();
        let m = std::fs::metadata(dir.path().join("copy")).unwrap();
        assert!(p.same_file(Path::new("copy"), m.dev(), m.ino()).is_some());
        let other = std::fs::metadata(dir.path()).unwrap();
        assert!(
            p.same_file(Path::new("x"), other.dev(), other.ino())
                .is_none()
        );
    }
}
