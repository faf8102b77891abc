//! A memory cgroup for one test process: what `systemd-run -p MemoryMax=` gives a
//! service, without needing systemd. cgroup v2 (`memory.max`) where the machine has
//! its memory controller there, else cgroup v1 (`memory.limit_in_bytes`). Needs root.
//! The kernel OOM-kills a process in it that needs more.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

pub struct MemoryLimit {
    dir: PathBuf,
    v2: bool,
}

impl MemoryLimit {
    /// A new cgroup limited to `bytes` (memory and, where the kernel has it, swap).
    pub fn new(name: &str, bytes: u64) -> Result<MemoryLimit> {
        let name = format!("outpost-test-{name}-{}", std::process::id());
        let v2_root = Path::new("/sys/fs/cgroup");
        let v2 = std::fs::read_to_string(v2_root.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        if v2 {
            // The root must hand the memory controller down to its children.
            let _ = std::fs::write(v2_root.join("cgroup.subtree_control"), "+memory");
            let dir = v2_root.join(&name);
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            std::fs::write(dir.join("memory.max"), bytes.to_string())?;
            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
            return Ok(MemoryLimit { dir, v2 });
        }
        let v1 = Path::new("/sys/fs/cgroup/memory");
        if !v1.join("memory.limit_in_bytes").exists() {
            bail!("this machine has no memory cgroup controller (neither v2 nor v1)");
        }
        let dir = v1.join(&name);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::write(dir.join("memory.limit_in_bytes"), bytes.to_string())?;
        // Swap must not stand in for memory (only where the kernel accounts it).
        let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), bytes.to_string());
        Ok(MemoryLimit { dir, v2 })
    }

    /// A wrapper that moves the process into the cgroup before it `exec`s the rest
    /// of its command line (for [`crate::AgentOpts::wrapper`]).
    pub fn wrapper(&self, program: &Path) -> Vec<String> {
        vec![
            "sh".into(),
            "-c".into(),
            "echo $$ > \"$0\" && exec \"$@\"".into(),
            self.dir.join("cgroup.procs").display().to_string(),
            program.display().to_string(),
        ]
    }

    /// A control file: `v2` under cgroup v2, `v1` under v1.
    fn read(&self, v2: &str, v1: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(if self.v2 { v2 } else { v1 })).ok()
    }

    /// How many times the kernel OOM-killed a process in it.
    pub fn oom_kills(&self) -> u64 {
        self.read("memory.events", "memory.oom_control")
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// The peak charge (page cache included), where the kernel keeps one.
    pub fn peak_bytes(&self) -> Option<u64> {
        self.read("memory.peak", "memory.max_usage_in_bytes")
            .and_then(|s| s.trim().parse().ok())
    }
}

impl Drop for MemoryLimit {
    fn drop(&mut self) {
        // Empty once its processes are gone; retry briefly while they exit.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}
