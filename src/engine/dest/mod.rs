//! Receiver-side filesystem operations, confined to one destination root.
//!
//! Every path is resolved component by component from an open root directory with
//! `openat(O_NOFOLLOW | O_DIRECTORY)`, so no peer-supplied path can lead outside the root or
//! through a symlink, whatever string checks say. New content is staged apart from its final
//! path and moved there only when complete ([`stage`]), so a crash or a dropped connection never
//! leaves a partial file at a final path.
//!
//! This module does not decide anything; `session` tells it what to do.

mod direct;
mod inplace;
mod stage;

pub use stage::{PARTIAL_MIN, Staged, TempFile};

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustix::fs::{
    self as rfs, AtFlags, CWD, FileType, Mode, OFlags, Timespec, Timestamps, UTIME_OMIT,
};
use rustix::io::Errno;

use super::{LocalKind, LocalMeta, MODE_MASK, Mtime, RelPath};

#[derive(Debug, thiserror::Error)]
pub enum DestError {
    #[error(
        "{path}: refusing to go through symlink {link:?} (not following links on the receiving side)"
    )]
    ThroughSymlink { path: String, link: String },
    #[error("{path}: {op}: {source}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

impl DestError {
    pub(crate) fn io(path: impl ToString, op: &'static str, e: impl Into<io::Error>) -> DestError {
        DestError::Io {
            path: path.to_string(),
            op,
            source: e.into(),
        }
    }

    /// The error without its path, for reports that carry the path separately.
    pub fn detail(&self) -> String {
        match self {
            DestError::ThroughSymlink { link, .. } => format!(
                "refusing to go through symlink {link:?} (not following links on the receiving side)"
            ),
            DestError::Io { op, source, .. } => format!("{op}: {source}"),
        }
    }

    /// The underlying OS error, if any (for "no space left" detection and the like).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            DestError::Io { source, .. } => source.raw_os_error(),
            DestError::ThroughSymlink { .. } => None,
        }
    }
}

type Result<T> = std::result::Result<T, DestError>;

/// Open directories, keyed by relative path (`b""` is the root). Bounded so a deep tree never
/// exhausts file descriptors; entries are cheap to reopen.
const DIR_CACHE_MAX: usize = 512;

pub struct Dest {
    root_path: PathBuf,
    root: Arc<OwnedFd>,
    dirs: Mutex<HashMap<Vec<u8>, Arc<OwnedFd>>>,
    tmpfile: AtomicBool,
    /// Temp names are `nonce + counter`: unique across sessions sharing a directory.
    counter: AtomicU64,
    nonce: u64,
    /// Directories already swept for leftovers of killed sessions.
    swept: Mutex<HashSet<Vec<u8>>>,
}

/// Result of removing one entry.
#[derive(Debug, PartialEq, Eq)]
pub enum Removed {
    Yes,
    Missing,
    /// A directory that still holds (excluded) entries; left in place.
    NotEmpty,
}

impl Dest {
    /// Opens an existing destination root (a symlink at the root itself is followed: the user
    /// named it).
    pub fn open(root: &Path) -> Result<Dest> {
        let fd = rfs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| DestError::io(root.display(), "opening destination", e))?;
        let dest = Dest {
            root_path: root.to_path_buf(),
            root: Arc::new(fd),
            dirs: Mutex::new(HashMap::new()),
            tmpfile: AtomicBool::new(false),
            counter: AtomicU64::new(0),
            nonce: stage::random_nonce(),
            swept: Mutex::new(HashSet::new()),
        };
        dest.tmpfile.store(
            std::env::var_os("DEVSYNC_NO_TMPFILE").is_none() && dest.probe_tmpfile(),
            Ordering::Relaxed,
        );
        Ok(dest)
    }

    /// Takes this session's lock on the root (`flock` on the open directory, so nothing is
    /// written into the tree for it): one receiving session per destination at a time, so a
    /// helper still finishing what its vanished client had sent never writes next to a rerun.
    /// `false` if another session holds it. Filesystems without `flock` (some network mounts)
    /// are not locked rather than refused.
    pub fn try_lock_root(&self) -> Result<bool> {
        match rfs::flock(&*self.root, rfs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(true),
            Err(Errno::WOULDBLOCK) => Ok(false),
            Err(Errno::NOLCK | Errno::OPNOTSUPP | Errno::INVAL | Errno::BADF) => Ok(true),
            Err(e) => Err(DestError::io(
                self.root_path.display(),
                "locking destination",
                e,
            )),
        }
    }

    /// The process holding the root's lock, as `/proc/locks` names it (Linux).
    pub fn root_lock_holder(&self) -> Option<u32> {
        let st = rfs::fstat(&*self.root).ok()?;
        let (major, minor) = (rfs::major(st.st_dev), rfs::minor(st.st_dev));
        let want = format!("{major:02x}:{minor:02x}:{}", st.st_ino);
        let locks = std::fs::read_to_string("/proc/locks").ok()?;
        locks.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; waiters have "->" in front.
            match f.as_slice() {
                [_, "FLOCK", _, _, pid, dev, ..] if *dev == want => pid.parse().ok(),
                _ => None,
            }
        })
    }

    /// Creates the destination root and its missing parents.
    pub fn create_root(root: &Path) -> Result<()> {
        std::fs::create_dir_all(root)
            .map_err(|e| DestError::io(root.display(), "creating destination", e))
    }

    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    /// What the root itself is (its mode and mtime are mirrored like any directory's).
    pub fn root_meta(&self) -> Result<LocalMeta> {
        rfs::fstat(&*self.root)
            .map(|st| local_meta(&st))
            .map_err(|e| DestError::io(self.root_path.display(), "stat", e))
    }

    /// Sets mode and/or mtime of the root directory.
    pub fn set_root_meta(&self, mode: Option<u32>, mtime: Option<Mtime>) -> Result<()> {
        set_fd_meta(&*self.root, mode, mtime)
            .map_err(|e| DestError::io(self.root_path.display(), "setting attributes", e))
    }

    /// Whether new files are staged in unnamed `O_TMPFILE` files.
    pub fn uses_tmpfile(&self) -> bool {
        self.tmpfile.load(Ordering::Relaxed)
    }

    /// Forces named temp files (tests of the fallback path).
    pub fn disable_tmpfile(&self) {
        self.tmpfile.store(false, Ordering::Relaxed);
    }

    /// The open directory at relative path `dir` (`b""` = root), resolved without following
    /// symlinks. `Ok(None)` if some component does not exist.
    pub fn dir(&self, dir: &[u8]) -> Result<Option<Arc<OwnedFd>>> {
        if dir.is_empty() {
            return Ok(Some(self.root.clone()));
        }
        if let Some(fd) = self.lock_dirs().get(dir) {
            return Ok(Some(fd.clone()));
        }
        let (parent, name) = match dir.iter().rposition(|&c| c == b'/') {
            Some(i) => (&dir[..i], &dir[i + 1..]),
            None => (&b""[..], dir),
        };
        let Some(pfd) = self.dir(parent)? else {
            return Ok(None);
        };
        let shown = || String::from_utf8_lossy(dir).into_owned();
        let fd = match rfs::openat(
            &*pfd,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => Arc::new(fd),
            Err(Errno::NOENT) => return Ok(None),
            // With O_DIRECTORY a symlink reports ENOTDIR rather than ELOOP: look at what it is.
            Err(e @ (Errno::LOOP | Errno::NOTDIR)) => {
                let is_link = rfs::statat(&*pfd, name, AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink);
                if !is_link && e == Errno::NOTDIR {
                    // Some component is a file: the directory does not exist.
                    return Ok(None);
                }
                return Err(if is_link {
                    DestError::ThroughSymlink {
                        path: shown(),
                        link: shown(),
                    }
                } else {
                    DestError::io(shown(), "opening directory", e)
                });
            }
            Err(e) => return Err(DestError::io(shown(), "opening directory", e)),
        };
        let mut dirs = self.lock_dirs();
        if dirs.len() >= DIR_CACHE_MAX {
            dirs.clear();
        }
        dirs.insert(dir.to_vec(), fd.clone());
        Ok(Some(fd))
    }

    fn lock_dirs(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Arc<OwnedFd>>> {
        self.dirs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets cached directories at or below `prefix` (after removing or replacing one).
    pub fn invalidate(&self, prefix: &[u8]) {
        self.lock_dirs().retain(|k, _| {
            !(k.as_slice() == prefix
                || (k.starts_with(prefix) && k.get(prefix.len()) == Some(&b'/')))
        });
    }

    /// Parent directory of `path`, which must exist.
    fn parent(&self, path: &RelPath) -> Result<Arc<OwnedFd>> {
        let parent = path.parent().unwrap_or(b"");
        self.dir(parent)?.ok_or_else(|| {
            DestError::io(
                path,
                "opening parent directory",
                io::Error::from(io::ErrorKind::NotFound),
            )
        })
    }

    /// `lstat` of `path`; `None` if it (or a parent) does not exist.
    pub fn lstat(&self, path: &RelPath) -> Result<Option<LocalMeta>> {
        let parent = path.parent().unwrap_or(b"");
        let Some(dir) = self.dir(parent)? else {
            return Ok(None);
        };
        match rfs::statat(&*dir, path.file_name(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(local_meta(&st))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(DestError::io(path, "stat", e)),
        }
    }

    /// Target of the symlink at `path`.
    pub fn read_link(&self, path: &RelPath) -> Result<Vec<u8>> {
        let dir = self.parent(path)?;
        rfs::readlinkat(&*dir, path.file_name(), Vec::new())
            .map(|c| c.into_bytes())
            .map_err(|e| DestError::io(path, "readlink", e))
    }

    /// Creates directory `path` (owner-writable while the sync fills it; the final mode is
    /// applied by [`Dest::set_dir_meta`] at the end).
    pub fn mkdir(&self, path: &RelPath) -> Result<()> {
        let dir = self.parent(path)?;
        match rfs::mkdirat(&*dir, path.file_name(), Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => Ok(()),
            Err(e) => Err(DestError::io(path, "mkdir", e)),
        }
    }

    /// Sets mode and/or mtime of the directory at `path`.
    pub fn set_dir_meta(
        &self,
        path: &RelPath,
        mode: Option<u32>,
        mtime: Option<Mtime>,
    ) -> Result<()> {
        let fd = self.dir(path.as_bytes())?.ok_or_else(|| {
            DestError::io(
                path,
                "opening directory",
                io::Error::from(io::ErrorKind::NotFound),
            )
        })?;
        set_fd_meta(&*fd, mode, mtime).map_err(|e| DestError::io(path, "setting attributes", e))
    }

    /// Sets mode and/or mtime of the regular file at `path` without following a symlink there.
    pub fn set_file_meta(
        &self,
        path: &RelPath,
        mode: Option<u32>,
        mtime: Option<Mtime>,
    ) -> Result<()> {
        let dir = self.parent(path)?;
        let flags = OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
        let fd = match rfs::openat(
            &*dir,
            path.file_name(),
            flags | OFlags::RDONLY,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            // Unreadable file: an O_PATH handle still lets us reach the inode via /proc.
            Err(Errno::ACCESS) => {
                let fd = rfs::openat(&*dir, path.file_name(), flags | OFlags::PATH, Mode::empty())
                    .map_err(|e| DestError::io(path, "open", e))?;
                let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
                if let Some(m) = mode {
                    rfs::chmodat(
                        CWD,
                        &proc,
                        Mode::from_raw_mode(m & MODE_MASK),
                        AtFlags::empty(),
                    )
                    .map_err(|e| DestError::io(path, "chmod", e))?;
                }
                if let Some(t) = mtime {
                    rfs::utimensat(CWD, &proc, &times(t), AtFlags::empty())
                        .map_err(|e| DestError::io(path, "setting mtime", e))?;
                }
                return Ok(());
            }
            Err(e) => return Err(DestError::io(path, "open", e)),
        };
        let st = rfs::fstat(&fd).map_err(|e| DestError::io(path, "stat", e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(DestError::io(
                path,
                "setting attributes",
                io::Error::other("not a regular file"),
            ));
        }
        set_fd_meta(&fd, mode, mtime).map_err(|e| DestError::io(path, "setting attributes", e))
    }

    /// Opens the existing regular file at `path` for reading (delta base, checksums).
    pub fn open_file(&self, path: &RelPath) -> Result<File> {
        self.open_existing(path, OFlags::RDONLY, "open")
    }

    /// Opens what is at `path` with `access` (never following a symlink there, never
    /// blocking on a FIFO, never taking a terminal).
    fn open_existing(&self, path: &RelPath, access: OFlags, op: &'static str) -> Result<File> {
        let dir = self.parent(path)?;
        let fd = rfs::openat(
            &*dir,
            path.file_name(),
            access | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
            Mode::empty(),
        )
        .map_err(|e| DestError::io(path, op, e))?;
        Ok(File::from(fd))
    }

    /// Removes the file, symlink or empty directory at `path`.
    pub fn remove(&self, path: &RelPath, is_dir: bool) -> Result<Removed> {
        let Some(dir) = self.dir(path.parent().unwrap_or(b""))? else {
            return Ok(Removed::Missing);
        };
        let flags = if is_dir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        if is_dir {
            self.invalidate(path.as_bytes());
        }
        match rfs::unlinkat(&*dir, path.file_name(), flags) {
            Ok(()) => Ok(Removed::Yes),
            Err(Errno::NOENT) => Ok(Removed::Missing),
            Err(Errno::NOTEMPTY | Errno::EXIST) => Ok(Removed::NotEmpty),
            Err(e) => Err(DestError::io(path, "remove", e)),
        }
    }

    /// Removes the directory tree at `path` (used only when the sender has a file or link where
    /// the receiver has a directory, and the user allowed deletions). Never follows symlinks.
    pub fn remove_tree(&self, path: &RelPath) -> Result<()> {
        let parent = self.parent(path)?;
        self.invalidate(path.as_bytes());
        remove_tree_at(&parent, path.file_name())
            .map_err(|e| DestError::io(path, "removing directory", e))
    }
}

/// Result of a rename inside the destination.
#[derive(Debug, PartialEq, Eq)]
pub enum Renamed {
    Yes,
    /// Nothing at the source (or its parent is gone).
    Missing,
    /// Source and destination are on different file systems (a mount inside the tree).
    CrossDevice,
}

impl Dest {
    /// Renames `from` to `to` (both inside the root, neither followed if a symlink; what is at
    /// `to` is replaced as `rename(2)` does).
    pub fn rename(&self, from: &RelPath, to: &RelPath) -> Result<Renamed> {
        let Some(src) = self.dir(from.parent().unwrap_or(b""))? else {
            return Ok(Renamed::Missing);
        };
        let dst = self.parent(to)?;
        self.invalidate(from.as_bytes());
        self.invalidate(to.as_bytes());
        match rfs::renameat(&*src, from.file_name(), &*dst, to.file_name()) {
            Ok(()) => Ok(Renamed::Yes),
            Err(Errno::NOENT) => Ok(Renamed::Missing),
            Err(Errno::XDEV) => Ok(Renamed::CrossDevice),
            Err(e) => Err(DestError::io(from, "renaming", e)),
        }
    }

    /// Puts `from` at `to`: missing parents of `to` are made (a non-directory in their way is
    /// removed first), whatever is at `to` is removed, then `from` is renamed there.
    pub fn place(&self, from: &RelPath, to: &RelPath) -> Result<Renamed> {
        if self.lstat(from)?.is_none() {
            return Ok(Renamed::Missing);
        }
        for a in crate::engine::index::ancestors(to) {
            match self.lstat(&a)? {
                Some(m) if m.kind == LocalKind::Dir => continue,
                Some(_) => {
                    self.remove(&a, false)?;
                }
                None => {}
            }
            self.mkdir(&a)?;
        }
        match self.lstat(to)? {
            Some(m) if m.kind == LocalKind::Dir => self.remove_tree(to)?,
            Some(_) => {
                self.remove(to, false)?;
            }
            None => {}
        }
        self.rename(from, to)
    }
}

pub(super) fn times(t: Mtime) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: t.sec,
            tv_nsec: t.nsec.into(),
        },
    }
}

pub(super) fn set_fd_meta(
    fd: &impl AsFd,
    mode: Option<u32>,
    mtime: Option<Mtime>,
) -> rustix::io::Result<()> {
    if let Some(m) = mode {
        rfs::fchmod(fd, Mode::from_raw_mode(m & MODE_MASK))?;
    }
    if let Some(t) = mtime {
        rfs::futimens(fd, &times(t))?;
    }
    Ok(())
}

fn local_meta(st: &rfs::Stat) -> LocalMeta {
    let kind = match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => LocalKind::File,
        FileType::Directory => LocalKind::Dir,
        FileType::Symlink => LocalKind::Symlink,
        _ => LocalKind::Other,
    };
    LocalMeta {
        kind,
        size: st.st_size as u64,
        mode: st.st_mode & MODE_MASK,
        mtime: Mtime::of_stat(st),
    }
}

pub(super) fn remove_tree_at(parent: &OwnedFd, name: &[u8]) -> io::Result<()> {
    let fd = match rfs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        // Not a directory (anymore): just unlink it.
        Err(Errno::NOTDIR | Errno::LOOP) => {
            return Ok(rfs::unlinkat(parent, name, AtFlags::empty())?);
        }
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut children = Vec::new();
    for ent in rfs::Dir::read_from(&fd)? {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            children.push((n.to_vec(), ent.file_type() == FileType::Directory));
        }
    }
    for (child, is_dir) in children {
        if is_dir {
            remove_tree_at(&fd, &child)?;
        } else {
            match rfs::unlinkat(&fd, &child, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                // d_type may be unknown on some filesystems: try it as a directory.
                Err(Errno::ISDIR) => remove_tree_at(&fd, &child)?,
                Err(e) => return Err(e.into()),
            }
        }
    }
    match rfs::unlinkat(parent, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

    fn rp(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    const T: Mtime = Mtime {
        sec: 1_600_000_000,
        nsec: 123_456_789,
    };

    fn write_and_commit(d: &Dest, p: &str, data: &[u8]) -> Result<()> {
        use std::io::Write;
        let t = d.create_temp(&rp(p))?;
        t.file().write_all(data).unwrap();
        t.commit(d, 0o640, T, false)
    }

    #[test]
    fn commit_creates_and_replaces_atomically_with_both_temp_kinds() {
        for tmpfile in [true, false] {
            let td = tempfile::tempdir().unwrap();
            let d = Dest::open(td.path()).unwrap();
            if !tmpfile {
                d.disable_tmpfile();
            } else {
                assert!(d.uses_tmpfile(), "O_TMPFILE should work on this machine");
            }
            write_and_commit(&d, "a", b"one").unwrap();
            write_and_commit(&d, "a", b"two").unwrap();
            let p = td.path().join("a");
            assert_eq!(std::fs::read(&p).unwrap(), b"two");
            let md = std::fs::metadata(&p).unwrap();
            assert_eq!(md.mode() & 0o7777, 0o640);
            assert_eq!((md.mtime(), md.mtime_nsec()), (T.sec, T.nsec as i64));
            // A dropped temp file leaves nothing behind.
            drop(d.create_temp(&rp("b")).unwrap());
            let names: Vec<_> = std::fs::read_dir(td.path()).unwrap().collect();
            assert_eq!(names.len(), 1, "tmpfile={tmpfile}");
        }
    }

    #[test]
    fn never_writes_through_symlinks() {
        let td = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = td.path().join("root");
        std::fs::create_dir(&root).unwrap();
        symlink(outside.path(), root.join("link")).unwrap();
        std::fs::write(outside.path().join("victim"), b"safe").unwrap();
        symlink(outside.path().join("victim"), root.join("filelink")).unwrap();
        let d = Dest::open(&root).unwrap();
        assert!(matches!(
            write_and_commit(&d, "link/x", b"evil"),
            Err(DestError::ThroughSymlink { .. })
        ));
        assert!(matches!(
            d.mkdir(&rp("link/sub")),
            Err(DestError::ThroughSymlink { .. })
        ));
        assert!(d.lstat(&rp("link/victim")).is_err());
        assert!(d.set_file_meta(&rp("filelink"), Some(0o777), None).is_err());
        // Replacing a symlink with a file replaces the link, not its target.
        write_and_commit(&d, "filelink", b"new").unwrap();
        assert_eq!(
            std::fs::read(outside.path().join("victim")).unwrap(),
            b"safe"
        );
        assert!(std::fs::read_dir(outside.path()).unwrap().count() == 1);
        let victim_mode = std::fs::metadata(outside.path().join("victim"))
            .unwrap()
            .permissions()
            .mode();
        assert_ne!(victim_mode & 0o777, 0o777);
    }

    #[test]
    fn symlinks_dirs_and_removal() {
        let td = tempfile::tempdir().unwrap();
        let d = Dest::open(td.path()).unwrap();
        d.mkdir(&rp("dir")).unwrap();
        d.mkdir(&rp("dir/sub")).unwrap();
        write_and_commit(&d, "dir/sub/f", b"x").unwrap();
        d.symlink(&rp("dir/l"), b"../nowhere", T).unwrap();
        assert_eq!(d.read_link(&rp("dir/l")).unwrap(), b"../nowhere");
        d.symlink(&rp("dir/l"), b"elsewhere", T).unwrap();
        assert_eq!(d.read_link(&rp("dir/l")).unwrap(), b"elsewhere");
        assert_eq!(
            d.lstat(&rp("dir/l")).unwrap().unwrap().kind,
            LocalKind::Symlink
        );
        assert_eq!(d.remove(&rp("dir/sub"), true).unwrap(), Removed::NotEmpty);
        d.remove_tree(&rp("dir")).unwrap();
        assert!(d.lstat(&rp("dir")).unwrap().is_none());
        assert_eq!(d.remove(&rp("dir"), true).unwrap(), Removed::Missing);
        d.mkdir(&rp("m")).unwrap();
        d.set_dir_meta(&rp("m"), Some(0o751), Some(T)).unwrap();
        let md = std::fs::metadata(td.path().join("m")).unwrap();
        assert_eq!(
            (md.mode() & 0o7777, md.mtime_nsec()),
            (0o751, T.nsec as i64)
        );
    }
}
