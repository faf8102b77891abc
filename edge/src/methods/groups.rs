//! The process groups of running `exec` commands, so that nothing a command started
//! outlives it: each group is killed when its main process exits, at its timeout, when
//! its run is dropped, and by [`Groups::kill_all`] at agent shutdown.
//!
//! A process that calls `setsid()` (or `setpgid()`) leaves its group and escapes all of
//! these; systemd's `KillMode=control-group` still ends it when the agent stops.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// The registry the agent owns; every running `exec` is in it.
#[derive(Debug, Default)]
pub struct Groups {
    running: Mutex<Vec<i32>>,
}

/// One running command's process group: killed and unregistered when dropped, unless
/// [`Group::finish`] did that already.
#[derive(Debug)]
pub struct Group<'a> {
    groups: &'a Groups,
    pgid: i32,
    done: bool,
}

/// SIGKILL a whole process group.
fn kill_group(pgid: i32) {
    // Never 0, 1 or a negative id: kill(-1) would signal every process we may signal.
    if pgid > 1 {
        // SAFETY: kill(2) has no memory effects; a negative pid names the group.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

impl Groups {
    fn lock(&self) -> MutexGuard<'_, Vec<i32>> {
        // A panic elsewhere leaves the list as valid as before it.
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Register the group a command's main process `pid` leads (it was started with
    /// `process_group(0)`, so the group id is its pid).
    pub fn register(&self, pid: u32) -> Group<'_> {
        let pgid = i32::try_from(pid).unwrap_or(0);
        self.lock().push(pgid);
        Group {
            groups: self,
            pgid,
            done: false,
        }
    }

    /// SIGKILL every running command's process group; how many there were. The
    /// commands then finish as "killed by signal 9".
    pub fn kill_all(&self) -> usize {
        let running = self.lock();
        for &pgid in running.iter() {
            kill_group(pgid);
        }
        running.len()
    }

    /// How many commands are running.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Group<'_> {
    /// Kill the group (the main process is still unreaped, so its id cannot have been
    /// reused): at the timeout.
    pub fn kill(&self) {
        kill_group(self.pgid);
    }

    /// The main process has exited and was reaped: kill what it left in its group and
    /// forget the group at once. While members are left, the kernel keeps the group's
    /// id from being reused, so the kill cannot reach a stranger; the id is never
    /// signalled again after this.
    pub fn finish(&mut self) {
        if !self.done {
            self.done = true;
            kill_group(self.pgid);
            self.groups.lock().retain(|&g| g != self.pgid);
        }
    }
}

impl Drop for Group<'_> {
    fn drop(&mut self) {
        // A run that is dropped half-way (the agent stopping) takes its group with it.
        self.finish();
    }
}
