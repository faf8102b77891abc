//! The built-in methods, one file each (its argument check, its allow-list check and
//! its execution together); this file only dispatches. Each method turns a checked
//! command into an [`Outcome`]; none panics and none returns without one.

pub mod exec;
mod fd;
pub mod file_read;
pub mod file_write;
pub mod groups;
pub mod hub_keys;
pub mod ping;

use crate::policy::Policy;
use outpost_wire::{Method, MsgId, Outcome, Status, now_ms};
use std::path::{Component, Path};
use std::time::{Duration, Instant};

/// What a method needs besides its arguments.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub output_cap: u32,
    pub timeout: Duration,
}

/// The context a method runs in: its limits and the allow-list it is checked against
/// again at run time (the file system may have changed since intake).
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    pub limits: Limits,
    pub policy: &'a Policy,
    /// Where `exec` registers its process groups, for the agent to kill at shutdown.
    pub groups: &'a groups::Groups,
    /// The command's domain, for the child's `OUTPOST_DOMAIN`.
    pub domain: &'a str,
}

/// Arguments that can be refused before anything runs (the ACK then says `BadArgs`).
pub fn check_args(method: &Method) -> Result<(), String> {
    match method {
        Method::Ping => Ok(()),
        Method::HubKeys(k) => hub_keys::check_args(k),
        Method::Exec(e) => exec::check_args(e),
        Method::FileRead(r) => file_read::check_args(r),
        Method::FileWrite(w) => file_write::check_args(w),
    }
}

/// Run one method to its outcome.
pub async fn run(id: MsgId, method: &Method, ctx: &Ctx<'_>) -> Outcome {
    let started_at = now_ms();
    let t0 = Instant::now();
    let mut out = match method {
        Method::Ping => ping::run(),
        Method::Exec(e) => exec::run(id, e, ctx).await,
        Method::FileWrite(w) => file_write::run(w, id, ctx).await,
        Method::FileRead(r) => file_read::run(r, ctx).await,
        // The agent runs it as it is accepted (see hub_keys.rs), never from the queue.
        Method::HubKeys(_) => {
            failed("hub.keys runs when it is accepted, never from the queue".into())
        }
    };
    out.command = id;
    out.started_at = started_at;
    out.duration_ms = t0.elapsed().as_millis().min(u32::MAX as u128) as u32;
    out
}

/// A path argument: absolute, without `..`, naming a file.
pub(crate) fn check_path(path: &str) -> Result<(), String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!("path {path:?} is not absolute"));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("path {path:?} contains `..`"));
    }
    if p.file_name().is_none() {
        return Err(format!("path {path:?} names no file"));
    }
    Ok(())
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

pub(crate) fn ok(stdout: Vec<u8>, truncated: bool) -> Outcome {
    Outcome {
        stdout,
        truncated,
        ..blank(Status::Succeeded)
    }
}

pub(crate) fn failed(reason: String) -> Outcome {
    blank(Status::Failed(reason))
}

/// Refused at run time: the allow-list no longer lets it run (the file system changed
/// since intake); nothing ran.
pub(crate) fn rejected(r: outpost_wire::Rejection) -> Outcome {
    blank(Status::Rejected(r))
}

#[cfg(test)]
pub(crate) mod test_support {
    //! What the per-method tests share.
    use super::*;
    use outpost_wire::{Exec, FileRead, FileWrite};

    pub const L: Limits = Limits {
        output_cap: 16,
        timeout: Duration::from_secs(5),
    };

    pub fn exec_of(argv: &[&str]) -> Method {
        Method::Exec(Exec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            cwd: None,
        })
    }

    pub fn read_of(path: &str, max_bytes: u32) -> Method {
        Method::FileRead(FileRead {
            path: path.into(),
            max_bytes,
        })
    }

    pub fn write_of(path: &str, mode: u32, data: &[u8]) -> Method {
        Method::FileWrite(FileWrite {
            path: path.into(),
            mode,
            data: data.to_vec(),
        })
    }

    /// A unit's own files (config, identity, CA, state) in a temp dir, everything under
    /// one root that `[allow]` opens entirely.
    pub struct AgentFiles {
        _dir: tempfile::TempDir,
        pub root: std::path::PathBuf,
    }

    impl AgentFiles {
        pub fn new() -> AgentFiles {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().canonicalize().unwrap();
            let etc = root.join("etc/outpost");
            std::fs::create_dir_all(&etc).unwrap();
            for f in ["edge.toml", "node.nk", "ca.pem"] {
                std::fs::write(etc.join(f), f).unwrap();
            }
            std::fs::create_dir_all(root.join("state")).unwrap();
            std::fs::write(root.join("state/log"), "log").unwrap();
            std::fs::create_dir_all(root.join("data")).unwrap();
            std::fs::write(root.join("data/ok.txt"), "ok").unwrap();
            std::os::unix::fs::symlink(&etc, root.join("link")).unwrap();
            AgentFiles { _dir: dir, root }
        }

        pub fn path(&self, rel: &str) -> String {
            self.root.join(rel).display().to_string()
        }

        pub fn protected(&self) -> crate::protected::Protected {
            crate::protected::Protected::none()
                .with_config(&self.root.join("etc/outpost/edge.toml"))
                .with(
                    "identity (nkey file)",
                    &self.root.join("etc/outpost/node.nk"),
                )
                .with("CA certificate", &self.root.join("etc/outpost/ca.pem"))
                .with("state directory", &self.root.join("state"))
        }

        /// Everything allowed under the root (and `extra` TOML), the agent's files protected.
        pub fn policy(&self, extra: &str) -> Policy {
            let r = self.root.display();
            let text = format!(
                "methods = [\"ping\", \"exec\", \"file.read\", \"file.write\"]\n\
                 exec = [\"...\"]\nread = [\"{r}\"]\nwrite = [\"{r}\"]\n{extra}"
            );
            Policy::new(toml::from_str(&text).unwrap(), self.protected()).unwrap()
        }

        /// The agent's own files and dirs by several names each: as they are, through
        /// a symlinked directory, with `//` and `.` in them.
        pub fn protected_names(&self) -> Vec<String> {
            let r = self.root.display();
            vec![
                self.path("etc/outpost/node.nk"),
                self.path("etc/outpost/edge.toml"),
                self.path("etc/outpost/ca.pem"),
                self.path("etc/outpost/new-file"),
                self.path("state/log"),
                self.path("link/node.nk"),
                self.path("link/edge.toml"),
                format!("{r}//etc/outpost/node.nk"),
                format!("{r}/etc//outpost/./edge.toml"),
                format!("{r}/state/"),
            ]
        }
    }

    /// Run with an allow-everything policy and these limits.
    pub async fn run_with(method: &Method, limits: Limits) -> Outcome {
        run_policy(&Policy::allow_all(), method, limits).await
    }

    /// Run under `policy`, as command `[1; 16]`.
    pub async fn run_policy(policy: &Policy, method: &Method, limits: Limits) -> Outcome {
        let groups = groups::Groups::default();
        let ctx = Ctx {
            limits,
            policy,
            groups: &groups,
            domain: "test",
        };
        run(MsgId([1; 16]), method, &ctx).await
    }
}
