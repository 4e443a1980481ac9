//! Staging new content next to its final path and moving it there, and sweeping up what a
//! killed session left behind.
//!
//! Small files go to an unnamed `O_TMPFILE` in the target's directory: a new file is linked
//! straight to its final name; a replacement is linked to a temp name and renamed over the old
//! file. Killing the process between those two steps leaves the temp name behind, so every
//! named file of ours is locked (`flock`) by the session that owns it, and a later session that
//! replaces files in a directory first sweeps it: unlocked temp files there are leftovers of a
//! dead session and are removed. Files of [`PARTIAL_MIN`] bytes or more are staged in a named
//! partial file instead (`.devsync-part.<hash of the name>`), which survives an interrupted
//! transfer: the next session finds it by name, checks that no live session holds it, and
//! resumes from what it holds (every chunk taken from it is verified against the sender's
//! hashes). Where `O_TMPFILE` is unavailable, named temp files are used throughout.
//!
//! Names come from [`crate::engine::tempname`], which also tells a user's look-alike file
//! apart from ours.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use rustix::fs::{self as rfs, AtFlags, CWD, FileType, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use super::direct::Direct;
use super::{Dest, DestError, Result, set_fd_meta};
use crate::engine::tempname::{self, Ours};
use crate::engine::{Mtime, RelPath};

/// Files at least this big are staged in a resumable, named partial file.
pub const PARTIAL_MIN: u64 = 32 << 20;
/// A leftover partial that nothing resumed for this long is removed by the sweep.
const PARTIAL_MAX_AGE_SECS: i64 = 7 * 24 * 3600;
/// A symlink cannot be locked; a temp symlink is in place for microseconds, so one this old
/// belongs to a dead session.
const SYMLINK_TEMP_AGE_SECS: i64 = 60;
/// A file created by name is unlocked for an instant after it appears: a sweep leaves those
/// younger than this alone.
const NEW_FILE_AGE_SECS: i64 = 10;

/// How a [`TempFile`] is held on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// `O_TMPFILE`: no name until committed.
    Unnamed,
    /// A temp name, removed unless committed.
    Temp,
    /// A partial-transfer name, kept on drop (resumable) unless discarded.
    Partial,
}

/// A staged file; dropped without [`TempFile::commit`], it disappears (a partial stays for the
/// next session to resume, unless [`TempFile::discard`]ed).
pub struct TempFile {
    file: File,
    dir: Arc<OwnedFd>,
    path: RelPath,
    name: Option<Vec<u8>>,
    holder: Holder,
    committed: AtomicBool,
    /// Set once the file is at its final path (its staging name, if any, is gone).
    placed: AtomicBool,
    discarded: AtomicBool,
    /// The `O_DIRECT` descriptor for [`TempFile::write_direct`], opened on first use (`None`
    /// where the filesystem gains nothing from it).
    direct: OnceLock<Option<Direct>>,
}

/// A staged file and, for a resumed partial, how many bytes it already holds.
pub struct Staged {
    pub file: TempFile,
    pub resumed_len: u64,
}

pub(super) fn random_nonce() -> u64 {
    let mut b = [0u8; 8];
    match rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()) {
        Ok(8) => u64::from_ne_bytes(b),
        // Uniqueness, not secrecy, is what the nonce is for.
        _ => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            t ^ (u64::from(std::process::id()) << 40)
        }
    }
}

fn open_tmpfile(dir: &OwnedFd) -> rustix::io::Result<OwnedFd> {
    rfs::openat(
        dir,
        ".",
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
}

/// Gives an `O_TMPFILE` file a name (via /proc: `AT_EMPTY_PATH` would need privileges).
fn link_fd(fd: &impl AsFd, dir: &OwnedFd, name: &[u8]) -> rustix::io::Result<()> {
    let proc = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    rfs::linkat(CWD, &proc, dir, name, AtFlags::SYMLINK_FOLLOW)
}

/// Takes the owner's lock on a file of ours; `false` if another live session holds it.
fn try_lock(fd: &impl AsFd) -> rustix::io::Result<bool> {
    match rfs::flock(fd, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Locks a file we just made (nobody else can hold it yet): an error if that fails.
fn lock_own(fd: &impl AsFd) -> rustix::io::Result<()> {
    match try_lock(fd)? {
        true => Ok(()),
        false => Err(Errno::BUSY),
    }
}

/// Whether `name` in `dir` still is the file open as `fd`, and its only name. Checked after
/// locking a file found by name: meanwhile its owner may have renamed it into place (and
/// another file may have taken the name).
fn still_named(dir: &OwnedFd, name: &[u8], fd: &impl AsFd) -> bool {
    match (
        rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW),
        rfs::fstat(fd),
    ) {
        (Ok(by_name), Ok(open)) => {
            by_name.st_dev == open.st_dev && by_name.st_ino == open.st_ino && open.st_nlink == 1
        }
        _ => false,
    }
}

impl Dest {
    pub(super) fn temp_name(&self) -> Vec<u8> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        tempname::temp_name(self.nonce.wrapping_add(n))
    }

    pub(super) fn probe_tmpfile(&self) -> bool {
        let Ok(fd) = open_tmpfile(&self.root) else {
            return false;
        };
        let name = self.temp_name();
        if lock_own(&fd).is_err() || link_fd(&fd, &self.root, &name).is_err() {
            return false;
        }
        rfs::unlinkat(&*self.root, &name, AtFlags::empty()).is_ok()
    }

    /// A new, empty, writable file that becomes `path` on [`TempFile::commit`].
    pub fn create_temp(&self, path: &RelPath) -> Result<TempFile> {
        let dir = self.parent(path)?;
        if self.uses_tmpfile() {
            match open_tmpfile(&dir) {
                Ok(fd) => {
                    return Ok(TempFile {
                        file: File::from(fd),
                        dir,
                        path: path.clone(),
                        name: None,
                        holder: Holder::Unnamed,
                        committed: AtomicBool::new(false),
                        placed: AtomicBool::new(false),
                        discarded: AtomicBool::new(false),
                        direct: OnceLock::new(),
                    });
                }
                // Some directories (other filesystems) may not support it: fall back.
                Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {}
                Err(e) => return Err(DestError::io(path, "creating temp file", e)),
            }
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = tempname::new_name(self.nonce.wrapping_add(n));
        let fd = rfs::openat(
            &*dir,
            &name,
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| DestError::io(path, "creating temp file", e))?;
        let staged = TempFile {
            file: File::from(fd),
            dir,
            path: path.clone(),
            name: Some(name),
            holder: Holder::Temp,
            committed: AtomicBool::new(false),
            placed: AtomicBool::new(false),
            discarded: AtomicBool::new(false),
            direct: OnceLock::new(),
        };
        lock_own(&staged.file).map_err(|e| DestError::io(path, "locking temp file", e))?;
        Ok(staged)
    }

    /// Stages `path` in its resumable partial file: a leftover of an interrupted earlier
    /// transfer (resumed: its bytes are kept), or a new one. Falls back to [`Dest::create_temp`]
    /// if another live session holds the partial or its name is taken by something else.
    pub fn stage_partial(&self, path: &RelPath) -> Result<Staged> {
        let dir = self.parent(path)?;
        let name = tempname::partial_name(path.file_name());
        let fallback = || {
            self.create_temp(path).map(|file| Staged {
                file,
                resumed_len: 0,
            })
        };
        // A few tries: the file found by name may be renamed away under us (see below).
        for _ in 0..3 {
            let opened = rfs::openat(
                &*dir,
                &name,
                OFlags::RDWR
                    | OFlags::CREATE
                    | OFlags::NOFOLLOW
                    | OFlags::CLOEXEC
                    | OFlags::NONBLOCK,
                Mode::from_raw_mode(0o600),
            );
            let fd = match opened {
                Ok(fd) => fd,
                // A symlink, directory or fifo by that name is not ours to use.
                Err(Errno::LOOP | Errno::ISDIR | Errno::NXIO | Errno::ACCESS) => return fallback(),
                Err(e) => return Err(DestError::io(path, "opening partial file", e)),
            };
            if !try_lock(&fd).map_err(|e| DestError::io(path, "locking partial file", e))? {
                return fallback(); // another session is transferring this file right now
            }
            // Its owner may have committed it (renamed it to the final name) between our open
            // and our lock: then it is a live file, not a partial, and must not be touched.
            if !still_named(&dir, &name, &fd) {
                continue;
            }
            let st = rfs::fstat(&fd).map_err(|e| DestError::io(path, "stat of partial file", e))?;
            if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile
                || st.st_uid != rustix::process::geteuid().as_raw()
            {
                return fallback();
            }
            let file = TempFile {
                file: File::from(fd),
                dir,
                path: path.clone(),
                name: Some(name),
                holder: Holder::Partial,
                committed: AtomicBool::new(false),
                placed: AtomicBool::new(false),
                discarded: AtomicBool::new(false),
                direct: OnceLock::new(),
            };
            return Ok(Staged {
                file,
                resumed_len: st.st_size as u64,
            });
        }
        fallback()
    }

    /// Removes what killed sessions left in directory `dir` (once per session and directory):
    /// temp files no live session holds, and partials nothing resumed for a week. Returns how
    /// many were removed. Errors are not fatal to a sync; the caller may report them.
    pub fn sweep(&self, dir: &[u8]) -> Result<usize> {
        if !self.swept_lock().insert(dir.to_vec()) {
            return Ok(0);
        }
        let shown = || String::from_utf8_lossy(dir).into_owned();
        let Some(fd) = self.dir(dir)? else {
            return Ok(0);
        };
        let reopened = rfs::openat(
            &*fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| DestError::io(shown(), "reading directory", e))?;
        let mut candidates = Vec::new();
        for ent in rfs::Dir::read_from(&reopened)
            .map_err(|e| DestError::io(shown(), "reading directory", e))?
        {
            let ent = ent.map_err(|e| DestError::io(shown(), "reading directory", e))?;
            let name = ent.file_name().to_bytes();
            if let Some(kind) = tempname::ours(name) {
                candidates.push((name.to_vec(), kind));
            }
        }
        let mut removed = 0;
        for (name, kind) in candidates {
            if self.remove_if_leftover(&fd, &name, kind)? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// [`Dest::sweep`] for one file of ours found by a scan of the destination.
    pub fn remove_leftover(&self, path: &RelPath, kind: Ours) -> Result<bool> {
        let Some(dir) = self.dir(path.parent().unwrap_or(b""))? else {
            return Ok(false);
        };
        self.remove_if_leftover(&dir, path.file_name(), kind)
    }

    fn remove_if_leftover(&self, dir: &OwnedFd, name: &[u8], kind: Ours) -> Result<bool> {
        let shown = || String::from_utf8_lossy(name).into_owned();
        let st = match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(DestError::io(shown(), "stat", e)),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        #[allow(clippy::unnecessary_cast)] // i64 on x86_64, not on every target
        let age = now - st.st_ctime as i64;
        if kind == Ours::Move {
            // Parked for an instant during a batch of renames: one this old was left by a
            // session that died between parking and placing (its content comes again).
            if age <= SYMLINK_TEMP_AGE_SECS {
                return Ok(false);
            }
            return super::remove_tree_at(dir, name)
                .map(|()| true)
                .map_err(|e| DestError::io(shown(), "removing leftover", e));
        }
        let dead = match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => {
                let fd = match rfs::openat(
                    dir,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT) => return Ok(false),
                    Err(e) => return Err(DestError::io(shown(), "opening leftover", e)),
                };
                // Locked: a live session owns it. The lock we take goes with the fd, and the
                // name must still be this file once we hold it.
                try_lock(&fd).map_err(|e| DestError::io(shown(), "locking leftover", e))?
                    && still_named(dir, name, &fd)
                    && match kind {
                        Ours::Temp => true,
                        Ours::New => age > NEW_FILE_AGE_SECS,
                        Ours::Partial => age > PARTIAL_MAX_AGE_SECS,
                        Ours::Move => false,
                    }
            }
            FileType::Symlink => kind == Ours::Temp && age > SYMLINK_TEMP_AGE_SECS,
            _ => false,
        };
        if !dead {
            return Ok(false);
        }
        match rfs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) => {
                crate::trace!("dest", "removed leftover {}", shown());
                Ok(true)
            }
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(DestError::io(shown(), "removing leftover", e)),
        }
    }

    fn swept_lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<Vec<u8>>> {
        self.swept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `path` a symlink to `target` (atomically replacing a file or link there).
    pub fn symlink(&self, path: &RelPath, target: &[u8], mtime: Mtime) -> Result<()> {
        let dir = self.parent(path)?;
        let tmp = self.temp_name();
        rfs::symlinkat(target, &*dir, &tmp).map_err(|e| DestError::io(path, "symlink", e))?;
        // A link's own mtime is cosmetic; filesystems that refuse it are not an error.
        let _ = rfs::utimensat(&*dir, &tmp, &super::times(mtime), AtFlags::SYMLINK_NOFOLLOW);
        if let Err(e) = rfs::renameat(&*dir, &tmp, &*dir, path.file_name()) {
            let _ = rfs::unlinkat(&*dir, &tmp, AtFlags::empty()); // best effort: already failing
            return Err(DestError::io(path, "renaming symlink into place", e));
        }
        Ok(())
    }
}

impl TempFile {
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &RelPath {
        &self.path
    }

    /// Whether this is a named partial (kept for resuming if the session dies).
    pub fn is_partial(&self) -> bool {
        self.holder == Holder::Partial
    }

    /// Its content is wrong (a failed verification, a restarted transfer): do not keep it
    /// for resuming.
    pub fn discard(&self) {
        self.discarded.store(true, Ordering::Release);
    }

    /// Reserves disk blocks for `len` bytes up front (size unchanged). A full disk is reported
    /// before any data is written, and the file has no delayed allocation left for the final
    /// rename to force out (ext4's `auto_da_alloc` otherwise makes replacing a big file cost as
    /// much as writing it back). Filesystems without `fallocate` are fine.
    pub fn preallocate(&self, len: u64) -> Result<()> {
        match rfs::fallocate(&self.file, rfs::FallocateFlags::KEEP_SIZE, 0, len) {
            Ok(()) | Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => Ok(()),
            Err(e) => Err(DestError::io(&self.path, "reserving space", e)),
        }
    }

    /// Whether [`TempFile::write_direct`] goes past the page cache: only where the rename over
    /// the old file would write the new one back anyway (ext4, see [`super::direct`]). For a
    /// file that replaces an existing one; decided (and the descriptor opened) on first ask.
    pub fn writes_direct(&self) -> bool {
        self.direct
            .get_or_init(|| {
                let d = Direct::for_replacement(&*self.dir, &self.file);
                if d.is_some() {
                    crate::trace!("dest", "{}: writing past the page cache", self.path);
                }
                d
            })
            .is_some()
    }

    /// Writes `src` at `at` through a private copy that `inspect` sees first, so what it sees
    /// (to hash) is exactly what is written even if `src` is a mapping someone else changes;
    /// `inspect` also says whether to write it at all. Past the page cache if
    /// [`TempFile::writes_direct`], else through it and written back.
    pub fn write_direct<R>(
        &self,
        src: &[u8],
        at: u64,
        inspect: impl FnOnce(&[u8]) -> (R, bool),
    ) -> std::io::Result<R> {
        match self.direct.get().and_then(Option::as_ref) {
            Some(d) => d.write_copy(&self.file, src, at, inspect),
            None => super::direct::write_copied(&self.file, src, at, inspect),
        }
    }

    /// Whether a rename of this file over an existing one writes it back first (ext4's
    /// `auto_da_alloc`), which makes a crash show the old content or the new, never zeros,
    /// unless the file's blocks were reserved ([`TempFile::preallocate`]) beforehand.
    pub fn rename_flushes(&self) -> bool {
        super::direct::flushes_at_replace(&*self.dir)
    }

    /// Makes `[off, off + len)` a hole (for a reused partial whose old bytes there must go;
    /// a fresh file's unwritten ranges are holes already). Filesystems without hole punching
    /// get zeros written instead.
    pub fn punch(&self, off: u64, len: u64) -> Result<()> {
        let flags = rfs::FallocateFlags::PUNCH_HOLE | rfs::FallocateFlags::KEEP_SIZE;
        match rfs::fallocate(&self.file, flags, off, len) {
            Ok(()) => Ok(()),
            Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => {
                use std::os::unix::fs::FileExt;
                let zeros = vec![0u8; len.min(1 << 20) as usize];
                let mut at = off;
                while at < off + len {
                    let n = (off + len - at).min(zeros.len() as u64) as usize;
                    self.file
                        .write_all_at(&zeros[..n], at)
                        .map_err(|e| DestError::io(&self.path, "writing zeros", e))?;
                    at += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(DestError::io(&self.path, "punching a hole", e)),
        }
    }

    /// Sets the final length (dropping any reservation beyond it).
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| DestError::io(&self.path, "setting length", e))
    }

    /// Applies the final mode and mtime, then moves the file to its path, replacing whatever
    /// file or symlink is there (never writing through it).
    /// With `durable`, the data is on disk before the name points at it, and the directory
    /// entry after (power-loss safe, and slower).
    pub fn commit(&self, dest: &Dest, mode: u32, mtime: Mtime, durable: bool) -> Result<()> {
        let p = &self.path;
        if self.committed.swap(true, Ordering::AcqRel) {
            return Err(DestError::io(
                p,
                "committing",
                std::io::Error::other("already committed"),
            ));
        }
        set_fd_meta(&self.file, Some(mode), Some(mtime))
            .map_err(|e| DestError::io(p, "setting attributes", e))?;
        if durable {
            rfs::fdatasync(&self.file).map_err(|e| DestError::io(p, "fsync", e))?;
        }
        self.link_into_place(dest)?;
        self.placed.store(true, Ordering::Release);
        if durable {
            rfs::fsync(&*self.dir).map_err(|e| DestError::io(p, "fsync of directory", e))?;
        }
        Ok(())
    }

    fn link_into_place(&self, dest: &Dest) -> Result<()> {
        let p = &self.path;
        let name = p.file_name();
        let staged = match &self.name {
            Some(n) => n.clone(),
            None => {
                // Fast path for new files: link straight to the final name.
                match link_fd(&self.file, &self.dir, name) {
                    Ok(()) => return Ok(()),
                    Err(Errno::EXIST) => {}
                    Err(e) => return Err(DestError::io(p, "linking into place", e)),
                }
                // A replacement: the temp name exists until the rename. Locked first, so a
                // sweep by another session never takes it for a leftover.
                lock_own(&self.file).map_err(|e| DestError::io(p, "locking temp file", e))?;
                let tmp = dest.temp_name();
                link_fd(&self.file, &self.dir, &tmp)
                    .map_err(|e| DestError::io(p, "linking into place", e))?;
                tmp
            }
        };
        rfs::renameat(&*self.dir, &staged, &*self.dir, name).map_err(|e| {
            let _ = rfs::unlinkat(&*self.dir, &staged, AtFlags::empty()); // already failing
            DestError::io(p, "renaming into place", e)
        })
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let keep = self.holder == Holder::Partial && !self.discarded.load(Ordering::Acquire);
        // After the rename our staging name is gone; a partial's name may already be someone
        // else's new partial, so it is never unlinked then.
        if self.placed.load(Ordering::Acquire) || keep {
            return;
        }
        if let Some(name) = &self.name {
            // Nothing to report to: the caller is already handling the failure that got us here.
            let _ = rfs::unlinkat(&*self.dir, name, AtFlags::empty());
        }
    }
}
