//! File descriptors for the methods' run-time checks: open without following links,
//! learn what an open descriptor really is (type, device and inode, resolved path),
//! and act relative to an open directory so that nothing is looked up twice.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Open a directory to run in (`fchdir` needs only search permission), following
/// links: the caller judges it by its resolved path.
pub fn open_dir_path(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(path)
}

fn proc_fd(f: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

/// The path an open descriptor resolves to now (symlinks, `//` and `.` resolved).
pub fn real_path(f: &File) -> io::Result<PathBuf> {
    let p = std::fs::read_link(proc_fd(f))?;
    // The kernel marks a file unlinked since it was opened: judge no such name.
    if p.as_os_str().as_bytes().ends_with(b" (deleted)") {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the file was deleted while being opened",
        ));
    }
    Ok(p)
}
