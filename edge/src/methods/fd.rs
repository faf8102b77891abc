//! File descriptors for the methods' run-time checks: open without following links,
//! learn what an open descriptor really is (type, device and inode, resolved path),
//! and act relative to an open directory so that nothing is looked up twice.

use std::ffi::{CString, OsStr};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Open `path` for what it is, not for reading: no link followed in its last
/// component (a link is opened as itself), no device opened (opening some has effects:
/// a watchdog arms, a tape rewinds), readable by its type and resolved path only.
pub fn open_path_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)
}

/// Open a directory to act in (`openat`, `renameat`, `fsync`), following links: the
/// caller judges it by its resolved path.
pub fn open_dir(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(path)
}

/// Open a directory to run in (`fchdir` needs only search permission), following
/// links: the caller judges it by its resolved path.
pub fn open_dir_path(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(path)
}

/// Open the very file `f` (an `O_PATH` descriptor) refers to for reading, without a
/// second lookup of its name, non-blocking, never as a controlling terminal.
pub fn reopen_for_reading(f: &File) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(proc_fd(f))
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

/// What kind of file `m` describes, in words for an outcome.
pub fn kind(m: &std::fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_file() {
        "regular file"
    } else if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symbolic link"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// Whether two open files are the same file.
pub fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

fn c_name(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The metadata of `name` in `dir` without following a link; `None` if there is none.
pub fn stat_at_nofollow(dir: &File, name: &OsStr) -> io::Result<Option<std::fs::Metadata>> {
    let c = c_name(name)?;
    // SAFETY: openat(2) with a valid directory fd and a NUL-terminated name; the fd it
    // returns is owned at once.
    let r = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    match check(r) {
        // SAFETY: `r` is a new descriptor that nothing else owns.
        Ok(fd) => File::from(unsafe { OwnedFd::from_raw_fd(fd) })
            .metadata()
            .map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Create `name` in `dir` for writing: never an existing file, never through a link.
pub fn create_new_at(dir: &File, name: &OsStr, mode: u32) -> io::Result<File> {
    let c = c_name(name)?;
    // SAFETY: as in stat_at_nofollow.
    let r = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_WRONLY | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    // SAFETY: a new descriptor that nothing else owns.
    check(r).map(|fd| File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Rename `from` to `to`, both in `dir`: replaces what `to` names (a link itself,
/// never what it points to).
pub fn rename_at(dir: &File, from: &OsStr, to: &OsStr) -> io::Result<()> {
    let (f, t) = (c_name(from)?, c_name(to)?);
    let d = dir.as_raw_fd();
    // SAFETY: renameat(2) with a valid directory fd and NUL-terminated names.
    check(unsafe { libc::renameat(d, f.as_ptr(), d, t.as_ptr()) }).map(drop)
}

/// Remove `name` from `dir` (a temp file left by a failed write).
pub fn unlink_at(dir: &File, name: &OsStr) -> io::Result<()> {
    let c = c_name(name)?;
    // SAFETY: unlinkat(2) with a valid directory fd and a NUL-terminated name.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) }).map(drop)
}
