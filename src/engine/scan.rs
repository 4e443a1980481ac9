//! Parallel walk of a sync root into [`Entry`] values.
//!
//! Each directory is read once (`getdents`) and its entries are `lstat`ed relative to the
//! directory's fd, so the kernel never re-resolves the path from the root. Which entries take
//! part is decided by the `ignore` crate's own matcher ([`ignore::IncrementalIgnore`], built
//! from the same `WalkBuilder` configuration as [`FilterOptions::walker`]), so the gitignore
//! semantics are the crate's, not ours; the walk itself is here because the crate's walker
//! neither exposes directory fds nor lets a caller skip its per-entry path allocations.
//!
//! Directories are reported before anything inside them (the receiver relies on that to
//! refuse paths whose parent was never announced as a directory). Symlinks are reported as
//! links and never followed; fifos, sockets and devices are skipped with a warning.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ignore::IncrementalIgnore;
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::filter::{FilterError, FilterOptions};
use super::relpath::MAX_PATH_LEN;
use super::tempname::{self, Ours};
use super::{Entry, EntryKind, MODE_MASK, Mtime, RelPath, hash, special_kind_name};

/// What the walk reports, from walker threads, in parent-before-child order per subtree.
#[derive(Debug)]
pub enum ScanEvent {
    /// An entry and the `(device, inode)` it is on.
    Entry(Entry, super::index::Ino),
    /// Not synced, but not a failure (special files, unreadable ignore files).
    Skipped { path: String, reason: String },
    /// Something that could not be read: the list is incomplete.
    Error { path: String, message: String },
    /// One of devsync's own temp or partial files (only with [`ScanOptions::report_ours`]);
    /// never part of the list.
    Ours { path: RelPath, kind: Ours },
}

#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    pub filters: FilterOptions,
    /// Fill in each file's BLAKE3 digest (`--checksum`).
    pub checksum: bool,
    /// Walker threads (0: one per core).
    pub threads: usize,
    /// Report devsync's own files as [`ScanEvent::Ours`] (the receiver cleans up leftovers).
    pub report_ours: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{0}: no such file or directory")]
    NotFound(String),
    #[error("{0}: not a directory")]
    NotADirectory(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Filter(#[from] FilterError),
}

/// Checks that `root` is a directory (following a symlink at the root itself: the user chose it).
pub fn check_root(root: &Path) -> Result<(), ScanError> {
    match std::fs::metadata(root) {
        Ok(md) if md.is_dir() => Ok(()),
        Ok(_) => Err(ScanError::NotADirectory(root.display().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(ScanError::NotFound(root.display().to_string()))
        }
        Err(source) => Err(ScanError::Io {
            path: root.display().to_string(),
            source,
        }),
    }
}

/// Walks `root`, calling `sink` for every entry (from several threads at once).
pub fn scan(
    root: &Path,
    opts: &ScanOptions,
    sink: &(dyn Fn(ScanEvent) + Sync),
) -> Result<(), ScanError> {
    scan_each(root, opts, &|| move |ev| sink(ev))
}

/// Walks `root` with one sink per directory listing, made by `make`. A sink sees the entries
/// of one directory in order and is dropped before any of its subdirectories is read, so a
/// sink that batches and flushes on drop keeps every directory ahead of its contents.
pub fn scan_each<S, M>(root: &Path, opts: &ScanOptions, make: &M) -> Result<(), ScanError>
where
    S: FnMut(ScanEvent) + Send,
    M: Fn() -> S + Sync,
{
    Scanner::new(root, opts)?.all(make)
}

/// A root and its filters, for scanning all of it or parts of it again and again (a watch
/// rescans the directories that changed). The ignore files read are cached: a scanner made
/// before an ignore file changed must be replaced to see the change.
pub struct Scanner {
    root: PathBuf,
    opts: ScanOptions,
    matcher: Mutex<IncrementalIgnore>,
}

impl Scanner {
    pub fn new(root: &Path, opts: &ScanOptions) -> Result<Scanner, ScanError> {
        check_root(root)?;
        let matcher = opts
            .filters
            .walker(root)?
            .build_matchers()
            .pop()
            .ok_or_else(|| ScanError::NotFound(root.display().to_string()))?;
        Ok(Scanner {
            root: root.to_path_buf(),
            opts: opts.clone(),
            matcher: Mutex::new(matcher),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn io_err(&self, source: std::io::Error) -> ScanError {
        ScanError::Io {
            path: self.root.display().to_string(),
            source,
        }
    }

    fn walk<'a, M>(&'a self, make: &'a M, recurse: bool) -> Walk<'a, M> {
        Walk {
            root: &self.root,
            checksum: self.opts.checksum,
            report_ours: self.opts.report_ours,
            recurse,
            matcher: &self.matcher,
            make,
        }
    }

    fn pool(&self) -> Result<Arc<rayon::ThreadPool>, ScanError> {
        let threads = match self.opts.threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        scan_pool(threads).map_err(|e| self.io_err(std::io::Error::other(e)))
    }

    fn root_fd(&self) -> Result<OwnedFd, ScanError> {
        rfs::open(
            &self.root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.io_err(e.into()))
    }

    /// The directory `rel` under the root, opened one component at a time without following
    /// symlinks; `None` if it is not (or no longer) a directory.
    fn open_dir(&self, rel: &[u8]) -> Result<Option<OwnedFd>, ScanError> {
        let mut fd = self.root_fd()?;
        for part in rel.split(|&c| c == b'/').filter(|p| !p.is_empty()) {
            match rfs::openat(
                &fd,
                part,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(next) => fd = next,
                Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => return Ok(None),
                Err(e) => {
                    return Err(ScanError::Io {
                        path: self
                            .root
                            .join(std::ffi::OsStr::from_bytes(rel))
                            .display()
                            .to_string(),
                        source: e.into(),
                    });
                }
            }
        }
        Ok(Some(fd))
    }

    /// Walks the whole tree (see [`scan_each`]).
    pub fn all<S, M>(&self, make: &M) -> Result<(), ScanError>
    where
        S: FnMut(ScanEvent) + Send,
        M: Fn() -> S + Sync,
    {
        let root_fd = self.root_fd()?;
        let walk = self.walk(make, true);
        self.pool()?.scope(|s| walk.list(s, root_fd, b""));
        Ok(())
    }

    /// The entries directly in directory `rel` (`None`: the root), without descending.
    /// Nothing is reported if it is not a directory (any more).
    pub fn dir<S, M>(&self, rel: Option<&RelPath>, make: &M) -> Result<(), ScanError>
    where
        S: FnMut(ScanEvent) + Send,
        M: Fn() -> S + Sync,
    {
        let rel = rel.map_or(&b""[..], |r| r.as_bytes());
        let Some(fd) = self.open_dir(rel)? else {
            return Ok(());
        };
        let walk = self.walk(make, false);
        // One listing, no subdirectories: on this thread, without waking the pool.
        rayon::in_place_scope(|s| walk.list(s, fd, rel));
        Ok(())
    }

    /// The entries `names` of directory `dir` (`None`: the root), those that exist and take
    /// part, without descending: one open of the directory for all of them, on this thread.
    pub fn entries<S, M>(
        &self,
        dir: Option<&RelPath>,
        names: &[&[u8]],
        make: &M,
    ) -> Result<(), ScanError>
    where
        S: FnMut(ScanEvent) + Send,
        M: Fn() -> S + Sync,
    {
        let rel = dir.map_or(&b""[..], |r| r.as_bytes());
        let Some(fd) = self.open_dir(rel)? else {
            return Ok(());
        };
        let mut named = Vec::with_capacity(names.len());
        for &name in names {
            if name.is_empty() || name.contains(&b'/') {
                continue;
            }
            let is_dir = match rfs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => Some(FileType::from_raw_mode(st.st_mode) == FileType::Directory),
                Err(Errno::NOENT) => continue,
                Err(_) => None,
            };
            let mut path = Vec::with_capacity(rel.len() + 1 + name.len());
            if !rel.is_empty() {
                path.extend_from_slice(rel);
                path.push(b'/');
            }
            let name_at = path.len();
            path.extend_from_slice(name);
            named.push(Named {
                path,
                name_at,
                is_dir,
            });
        }
        let walk = self.walk(make, false);
        let mut sink = make();
        for n in walk.filter(&mut sink, fd.as_fd(), named) {
            if let Some(ev) = walk.visit(fd.as_fd(), n) {
                sink(ev);
            }
        }
        Ok(())
    }

    /// `rel` itself, if it exists and takes part (its parents' ignore files count), and for a
    /// directory everything under it.
    pub fn subtree<S, M>(&self, rel: &RelPath, make: &M) -> Result<(), ScanError>
    where
        S: FnMut(ScanEvent) + Send,
        M: Fn() -> S + Sync,
    {
        self.part(rel, make, true)
    }

    /// `rel` itself only, if it exists and takes part.
    pub fn entry<S, M>(&self, rel: &RelPath, make: &M) -> Result<(), ScanError>
    where
        S: FnMut(ScanEvent) + Send,
        M: Fn() -> S + Sync,
    {
        let parent = rel.parent().map(|p| RelPath::unchecked(p.to_vec()));
        self.entries(parent.as_ref(), &[rel.file_name()], make)
    }

    fn part<S, M>(&self, rel: &RelPath, make: &M, deep: bool) -> Result<(), ScanError>
    where
        S: FnMut(ScanEvent) + Send,
        M: Fn() -> S + Sync,
    {
        let Some(parent) = self.open_dir(rel.parent().unwrap_or(b""))? else {
            return Ok(());
        };
        let name = rel.file_name();
        let is_dir = match rfs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Some(FileType::from_raw_mode(st.st_mode) == FileType::Directory),
            Err(Errno::NOENT) => return Ok(()),
            Err(_) => None,
        };
        let walk = self.walk(make, true);
        let named = Named {
            path: rel.as_bytes().to_vec(),
            name_at: rel.as_bytes().len() - name.len(),
            is_dir,
        };
        let parent = Arc::new(parent);
        self.pool()?.scope(|s| {
            let mut sink = make();
            let kept = walk.filter(&mut sink, parent.as_fd(), vec![named]);
            let mut sub = None;
            for named in kept {
                if let Some(ev) = walk.visit(parent.as_fd(), named) {
                    if let ScanEvent::Entry(e, _) = &ev
                        && e.is_dir()
                        && deep
                    {
                        sub = Some(SubDir {
                            parent: parent.clone(),
                            rel: e.path.clone(),
                        });
                    }
                    sink(ev);
                }
            }
            drop(sink);
            if let Some(sub) = sub {
                walk.open_and_list(s, sub);
            }
        });
        Ok(())
    }
}

/// The walker threads for scans with `threads` threads, made once per process (a watch rescans
/// often; building a pool per scan cost more than scanning a small tree).
fn scan_pool(threads: usize) -> Result<Arc<rayon::ThreadPool>, rayon::ThreadPoolBuildError> {
    static POOLS: Mutex<Vec<(usize, Arc<rayon::ThreadPool>)>> = Mutex::new(Vec::new());
    let mut pools = POOLS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, p)) = pools.iter().find(|(n, _)| *n == threads) {
        return Ok(p.clone());
    }
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("devsync-scan-{i}"))
            .build()?,
    );
    pools.push((threads, pool.clone()));
    Ok(pool)
}

/// State shared by every directory task of one walk.
struct Walk<'a, M> {
    root: &'a Path,
    checksum: bool,
    report_ours: bool,
    /// Whether subdirectories are read too.
    recurse: bool,
    /// `IncrementalIgnore` caches per-directory matchers and needs `&mut`; a directory's
    /// entries are matched under one lock, which is short next to their `lstat`s.
    matcher: &'a Mutex<IncrementalIgnore>,
    make: &'a M,
}

/// A subdirectory to read: its parent's fd (shared by siblings) and its path.
struct SubDir {
    parent: Arc<OwnedFd>,
    rel: RelPath,
}

impl<'a, M, S> Walk<'a, M>
where
    S: FnMut(ScanEvent) + Send,
    M: Fn() -> S + Sync,
{
    fn shown(&self, rel: &[u8]) -> String {
        self.root
            .join(std::ffi::OsStr::from_bytes(rel))
            .display()
            .to_string()
    }

    fn open_and_list<'s>(&'s self, scope: &rayon::Scope<'s>, sub: SubDir) {
        let opened = rfs::openat(
            sub.parent.as_fd(),
            sub.rel.file_name(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        );
        drop(sub.parent);
        match opened {
            Ok(fd) => self.list(scope, fd, sub.rel.as_bytes()),
            // Removed since its parent was read: not part of this sync.
            Err(Errno::NOENT) => {}
            Err(e) => (self.make)()(ScanEvent::Error {
                path: sub.rel.to_string(),
                message: format!("reading directory: {}", std::io::Error::from(e)),
            }),
        }
    }

    /// Reports the entries of the directory `fd` (at `rel`, empty for the root), then queues
    /// its subdirectories.
    fn list<'s>(&'s self, scope: &rayon::Scope<'s>, fd: OwnedFd, rel: &[u8]) {
        let mut sink = (self.make)();
        let fd = Arc::new(fd);
        let names = match read_names(fd.as_fd(), rel) {
            Ok(names) => names,
            Err(e) => {
                let path = if rel.is_empty() {
                    self.root.display().to_string()
                } else {
                    String::from_utf8_lossy(rel).into_owned()
                };
                sink(ScanEvent::Error {
                    path,
                    message: format!("reading directory: {}", std::io::Error::from(e)),
                });
                return;
            }
        };
        let kept = self.filter(&mut sink, fd.as_fd(), names);
        let mut subdirs = Vec::new();
        for named in kept {
            let Some(ev) = self.visit(fd.as_fd(), named) else {
                continue;
            };
            if let ScanEvent::Entry(e, _) = &ev
                && e.is_dir()
                && self.recurse
            {
                subdirs.push(SubDir {
                    parent: fd.clone(),
                    rel: e.path.clone(),
                });
            }
            sink(ev);
        }
        drop(sink);
        drop(fd);
        for sub in subdirs {
            scope.spawn(move |s| self.open_and_list(s, sub));
        }
    }

    /// Drops the names the filters exclude.
    fn filter(&self, sink: &mut S, dir: BorrowedFd<'_>, mut names: Vec<Named>) -> Vec<Named> {
        names.retain(|n| match tempname::ours(n.name()) {
            None => true,
            Some(kind) => {
                if self.report_ours && n.path.len() <= MAX_PATH_LEN {
                    sink(ScanEvent::Ours {
                        path: RelPath::unchecked(n.path.clone()),
                        kind,
                    });
                }
                false
            }
        });
        // `dir/` patterns need the type; a file system that does not report it in `getdents`
        // gets an extra `lstat` (outside the matcher's lock).
        for named in names.iter_mut().filter(|n| n.is_dir.is_none()) {
            named.is_dir = rfs::statat(dir, named.name(), AtFlags::SYMLINK_NOFOLLOW)
                .ok()
                .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory);
        }
        let mut m = self.matcher.lock().unwrap_or_else(|p| p.into_inner());
        let mut kept = Vec::with_capacity(names.len());
        for named in names {
            let path = Path::new(std::ffi::OsStr::from_bytes(&named.path));
            let (mat, err) = m.matched_with_errors(path, named.is_dir == Some(true));
            if let Some(err) = err {
                sink(walk_error(self.root, err));
            }
            if !mat.is_ignore() {
                kept.push(named);
            }
        }
        kept
    }

    fn visit(&self, dir: BorrowedFd<'_>, named: Named) -> Option<ScanEvent> {
        // Built from names the kernel returned (never empty, `.`, `..`, or longer than
        // NAME_MAX, never containing `/` or NUL), so only the total length can be wrong.
        if named.path.len() > MAX_PATH_LEN {
            return Some(ScanEvent::Skipped {
                path: self.shown(&named.path),
                reason: format!("path longer than {MAX_PATH_LEN} bytes cannot be synced"),
            });
        }
        let rpath = RelPath::unchecked(named.path);
        debug_assert!(rpath.check().is_ok(), "{rpath:?}");
        let name = &rpath.as_bytes()[named.name_at..];
        let st = match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            // Deleted between readdir and lstat: simply not part of this sync.
            Err(Errno::NOENT) => return None,
            Err(e) => {
                return Some(ScanEvent::Error {
                    path: rpath.to_string(),
                    message: std::io::Error::from(e).to_string(),
                });
            }
        };
        let ft = FileType::from_raw_mode(st.st_mode);
        let kind = match ft {
            FileType::RegularFile => {
                let size = st.st_size as u64;
                let digest = if self.checksum {
                    match hash_at(dir, name, size) {
                        Ok(d) => Some(d),
                        Err(e) => {
                            return Some(ScanEvent::Error {
                                path: rpath.to_string(),
                                message: format!("reading for --checksum: {e}"),
                            });
                        }
                    }
                } else {
                    None
                };
                EntryKind::File { size, digest }
            }
            FileType::Directory => EntryKind::Dir,
            FileType::Symlink => match rfs::readlinkat(dir, name, Vec::new()) {
                Ok(t) => EntryKind::Symlink {
                    target: t.into_bytes(),
                },
                Err(e) => {
                    return Some(ScanEvent::Error {
                        path: rpath.to_string(),
                        message: format!("reading symlink: {}", std::io::Error::from(e)),
                    });
                }
            },
            other => {
                return Some(ScanEvent::Skipped {
                    path: rpath.to_string(),
                    reason: format!("skipping {}", special_kind_name(other)),
                });
            }
        };
        Some(ScanEvent::Entry(
            Entry {
                path: rpath,
                kind,
                mode: st.st_mode & MODE_MASK,
                mtime: Mtime::of_stat(&st),
            },
            (st.st_dev, st.st_ino),
        ))
    }
}

/// One name read from a directory: its path relative to the root (the name is the tail
/// from `name_at`) and, when the file system says, whether it is a directory.
struct Named {
    path: Vec<u8>,
    name_at: usize,
    is_dir: Option<bool>,
}

impl Named {
    fn name(&self) -> &[u8] {
        &self.path[self.name_at..]
    }
}

/// Every name in directory `fd` (at `rel`), read with `getdents` into a stack buffer.
fn read_names(fd: BorrowedFd<'_>, rel: &[u8]) -> Result<Vec<Named>, Errno> {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 32 * 1024];
    let mut dir = rfs::RawDir::new(fd, &mut buf);
    let mut out = Vec::with_capacity(32);
    while let Some(ent) = dir.next() {
        let ent = ent?;
        let name = ent.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let mut path = Vec::with_capacity(rel.len() + 1 + name.len());
        if !rel.is_empty() {
            path.extend_from_slice(rel);
            path.push(b'/');
        }
        let name_at = path.len();
        path.extend_from_slice(name);
        let is_dir = match ent.file_type() {
            FileType::Unknown => None,
            t => Some(t == FileType::Directory),
        };
        out.push(Named {
            path,
            name_at,
            is_dir,
        });
    }
    Ok(out)
}

/// BLAKE3 digest of the file `name` in `dir`, never following a symlink swapped in since.
fn hash_at(dir: BorrowedFd<'_>, name: &[u8], len: u64) -> std::io::Result<hash::Digest> {
    let fd = rfs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    hash::file_digest(&File::from(fd), len)
}

/// Collects a whole scan (for the receiver's `--delete` pass, tests and benchmarks).
pub fn scan_to_vec(
    root: &Path,
    opts: &ScanOptions,
) -> Result<(Vec<Entry>, Vec<ScanEvent>), ScanError> {
    let out = std::sync::Mutex::new((Vec::new(), Vec::new()));
    scan(root, opts, &|ev| {
        let mut g = out.lock().unwrap_or_else(|p| p.into_inner());
        match ev {
            ScanEvent::Entry(e, _) => g.0.push(e),
            other => g.1.push(other),
        }
    })?;
    Ok(out.into_inner().unwrap_or_else(|p| p.into_inner()))
}

fn walk_error(root: &Path, err: ignore::Error) -> ScanEvent {
    let path = error_path(&err)
        .and_then(|p| p.strip_prefix(root).ok())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| root.display().to_string());
    match err.io_error() {
        Some(io) => ScanEvent::Error {
            path,
            message: io.to_string(),
        },
        // Parse errors in ignore files: the walk goes on with the valid lines.
        None => ScanEvent::Skipped {
            path,
            reason: err.to_string(),
        },
    }
}

fn error_path(err: &ignore::Error) -> Option<&Path> {
    match err {
        ignore::Error::WithPath { path, .. } => Some(path),
        ignore::Error::WithDepth { err, .. } | ignore::Error::WithLineNumber { err, .. } => {
            error_path(err)
        }
        ignore::Error::Partial(errs) => errs.iter().find_map(error_path),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::{MetadataExt, symlink};

    fn write(root: &Path, rel: &str, body: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }

    /// A tree that exercises every filter source and every kind of entry.
    fn tricky_tree(root: &Path) {
        let files = [
            (".gitignore", "*.log\n/build/\n!keep.log\ncache/\n"),
            ("a.log", "x"),
            ("keep.log", "x"),
            ("build/out.o", "x"),
            ("sub/build/kept.txt", "x"),
            ("sub/.gitignore", "*.tmp\n!important.tmp\n/only-here\n"),
            ("sub/x.tmp", "x"),
            ("sub/important.tmp", "x"),
            ("sub/only-here", "x"),
            ("sub/deeper/only-here", "x"),
            ("sub/deeper/y.tmp", "x"),
            ("other/x.tmp", "x"),
            (
                "cache/inner/keep.log",
                "re-included, but its directory is ignored",
            ),
            (".devsyncignore", "secret/\n"),
            ("secret/key", "x"),
            ("notes.md", "x"),
            ("docs/notes.md", "x"),
            (".git/HEAD", "x"),
            (".git/info/exclude", "by-git-info\n"),
            ("by-git-info", "x"),
            (
                ".devsync-tmp.123",
                "a user's file that only looks like ours",
            ),
            ("d/e/f/g/h/leaf", "x"),
        ];
        for (rel, body) in files {
            write(root, rel, body);
        }
        let ours = String::from_utf8(tempname::temp_name(42)).unwrap();
        write(root, &format!("sub/{ours}"), "devsync's own: never synced");
        std::fs::create_dir_all(root.join("empty/dir")).unwrap();
        symlink("d/e", root.join("link-to-dir")).unwrap();
        symlink("nowhere", root.join("dangling")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("fifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        std::fs::set_permissions(
            root.join("keep.log"),
            std::os::unix::fs::PermissionsExt::from_mode(0o751),
        )
        .unwrap();
    }

    /// The `ignore` crate's own walker with the same configuration: the oracle for which
    /// paths take part, and std's `symlink_metadata` for what they are.
    fn oracle(root: &Path, filters: &FilterOptions) -> BTreeMap<Vec<u8>, (u32, i64, u64)> {
        let mut out = BTreeMap::new();
        for dent in filters.walker(root).unwrap().build() {
            let dent = dent.unwrap();
            if dent.depth() == 0 {
                continue;
            }
            let md = std::fs::symlink_metadata(dent.path()).unwrap();
            if !(md.is_file() || md.is_dir() || md.is_symlink()) {
                continue;
            }
            let rel = dent.path().strip_prefix(root).unwrap();
            let size = if md.is_file() { md.len() } else { 0 };
            out.insert(
                rel.as_os_str().as_bytes().to_vec(),
                (md.mode(), md.mtime(), size),
            );
        }
        out
    }

    type Got = Mutex<BTreeMap<Vec<u8>, Entry>>;

    /// Sinks that collect the entries a scan reports into `got`.
    fn into<'a>(got: &'a Got) -> impl Fn() -> Box<dyn FnMut(ScanEvent) + Send + 'a> + Sync + 'a {
        move || {
            Box::new(move |ev| {
                if let ScanEvent::Entry(e, _) = ev {
                    got.lock().unwrap().insert(e.path.as_bytes().to_vec(), e);
                }
            })
        }
    }

    /// What one scanner call reports.
    fn collect(f: impl FnOnce(&Got)) -> BTreeMap<Vec<u8>, Entry> {
        let got = Mutex::new(BTreeMap::new());
        f(&got);
        got.into_inner().unwrap()
    }

    #[test]
    fn parts_of_the_tree_scan_as_they_do_in_a_whole_walk() {
        let td = tempfile::tempdir().unwrap();
        let root = td.path().join("src");
        tricky_tree(&root);
        let filters = FilterOptions {
            excludes: vec!["*.md".into()],
            ..FilterOptions::default()
        };
        let opts = ScanOptions {
            filters,
            threads: 2,
            ..ScanOptions::default()
        };
        let sc = Scanner::new(&root, &opts).unwrap();
        let all = collect(|g| sc.all(&into(g)).unwrap());
        assert!(all.contains_key(&b"sub/important.tmp"[..]));
        // Every directory's own listing, and every entry's subtree, as in the whole walk
        // (ignore files of the parents included).
        let mut dirs: Vec<Option<RelPath>> = vec![None];
        dirs.extend(
            all.values()
                .filter(|e| e.is_dir())
                .map(|e| Some(e.path.clone())),
        );
        for d in &dirs {
            let got = collect(|g| sc.dir(d.as_ref(), &into(g)).unwrap());
            let want: BTreeMap<_, _> = all
                .iter()
                .filter(|(_, e)| {
                    e.path.parent().unwrap_or(b"") == d.as_ref().map_or(&b""[..], |d| d.as_bytes())
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            assert_eq!(got, want, "listing of {d:?}");
        }
        for e in all.values() {
            let got = collect(|g| sc.subtree(&e.path, &into(g)).unwrap());
            let want: BTreeMap<_, _> = all
                .iter()
                .filter(|(_, o)| o.path == e.path || o.path.is_inside(e.path.as_bytes()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            assert_eq!(got, want, "subtree of {}", e.path);
        }
        // Excluded or missing paths, and paths through a symlink, give nothing.
        for p in [
            "a.log",
            "build",
            "build/out.o",
            "secret/key",
            "missing",
            "link-to-dir/f",
            "notes.md",
        ] {
            let got = collect(|g| sc.subtree(&RelPath::new(p).unwrap(), &into(g)).unwrap());
            assert!(got.is_empty(), "{p}: {got:?}");
        }
        let got = collect(|g| {
            sc.dir(Some(&RelPath::new("link-to-dir").unwrap()), &into(g))
                .unwrap()
        });
        assert!(
            got.is_empty(),
            "a symlink is not listed as a directory: {got:?}"
        );
    }

    #[test]
    fn same_entries_as_the_ignore_crates_walker() {
        let td = tempfile::tempdir().unwrap();
        let root = td.path().join("src");
        tricky_tree(&root);
        let spelled = format!("{}/", root.display());
        let cases = [
            FilterOptions::default(),
            FilterOptions {
                excludes: vec!["*.md".into(), "/d/e/f".into()],
                exclude_vcs: true,
                ..FilterOptions::default()
            },
            FilterOptions {
                gitignore: false,
                ..FilterOptions::default()
            },
        ];
        for filters in cases {
            let want = oracle(&root, &filters);
            for (threads, root) in [(1, root.as_path()), (2, Path::new(&spelled))] {
                let opts = ScanOptions {
                    filters: filters.clone(),
                    checksum: false,
                    threads,
                    report_ours: false,
                };
                let (entries, events) = scan_to_vec(root, &opts).unwrap();
                let got: BTreeMap<_, _> = entries
                    .iter()
                    .map(|e| {
                        let ft = match e.kind {
                            EntryKind::File { .. } => 0o100000,
                            EntryKind::Dir => 0o040000,
                            EntryKind::Symlink { .. } => 0o120000,
                        };
                        (
                            e.path.as_bytes().to_vec(),
                            (ft | e.mode, e.mtime.sec, e.size()),
                        )
                    })
                    .collect();
                assert_eq!(got, want, "{filters:?}, {threads} threads");
                assert_eq!(entries.len(), got.len(), "no duplicates");
                let skipped: Vec<_> = events
                    .iter()
                    .filter_map(|ev| match ev {
                        ScanEvent::Skipped { path, reason } => Some((path, reason)),
                        ScanEvent::Error { path, message } => panic!("{path}: {message}"),
                        ScanEvent::Entry(..) | ScanEvent::Ours { .. } => None,
                    })
                    .collect();
                assert_eq!(skipped.len(), 1, "{skipped:?}");
                assert_eq!(skipped[0].0, "fifo");
                assert!(skipped[0].1.contains("fifo"), "{skipped:?}");
            }
        }
        let (entries, _) = scan_to_vec(&root, &ScanOptions::default()).unwrap();
        let link = entries
            .iter()
            .find(|e| e.path.as_bytes() == b"link-to-dir")
            .unwrap();
        assert_eq!(
            link.kind,
            EntryKind::Symlink {
                target: b"d/e".to_vec()
            }
        );
    }

    #[test]
    fn our_own_files_are_skipped_and_reported_only_when_asked() {
        let td = tempfile::tempdir().unwrap();
        let root = td.path();
        let temp = String::from_utf8(tempname::temp_name(9)).unwrap();
        let part = String::from_utf8(tempname::partial_name(b"big")).unwrap();
        write(root, &format!("d/{temp}"), "x");
        write(root, &part, "x");
        write(root, ".devsync-tmp.mine", "a user's file");
        let names = |report_ours| {
            let opts = ScanOptions {
                report_ours,
                ..ScanOptions::default()
            };
            let (entries, events) = scan_to_vec(root, &opts).unwrap();
            let mut listed: Vec<String> = entries.iter().map(|e| e.path.to_string()).collect();
            listed.sort();
            let mut ours: Vec<(String, Ours)> = events
                .into_iter()
                .filter_map(|ev| match ev {
                    ScanEvent::Ours { path, kind } => Some((path.to_string(), kind)),
                    _ => None,
                })
                .collect();
            ours.sort_by(|a, b| a.0.cmp(&b.0));
            (listed, ours)
        };
        let (listed, ours) = names(false);
        assert_eq!(listed, [".devsync-tmp.mine", "d"]);
        assert!(ours.is_empty());
        let (_, ours) = names(true);
        assert_eq!(
            ours,
            [(part, Ours::Partial), (format!("d/{temp}"), Ours::Temp)]
        );
    }

    #[test]
    fn each_directory_is_delivered_before_its_contents() {
        let td = tempfile::tempdir().unwrap();
        for i in 0..40 {
            for j in 0..5 {
                write(td.path(), &format!("d{i}/s{j}/t/f"), "x");
            }
        }
        // Sinks batch and publish only when dropped, as the sender's list batches do.
        let published = Mutex::new(Vec::<Vec<u8>>::new());
        let opts = ScanOptions {
            threads: 2,
            ..ScanOptions::default()
        };
        struct Batch<'a>(Vec<Vec<u8>>, &'a Mutex<Vec<Vec<u8>>>);
        impl Drop for Batch<'_> {
            fn drop(&mut self) {
                self.1.lock().unwrap().append(&mut self.0);
            }
        }
        scan_each(td.path(), &opts, &|| {
            let mut b = Batch(Vec::new(), &published);
            move |ev| {
                if let ScanEvent::Entry(e, _) = ev {
                    b.0.push(e.path.as_bytes().to_vec());
                }
            }
        })
        .unwrap();
        let published = published.into_inner().unwrap();
        assert_eq!(published.len(), 40 * (1 + 5 * 3));
        let mut seen = std::collections::HashSet::new();
        for p in &published {
            if let Some(i) = p.iter().rposition(|&c| c == b'/') {
                assert!(seen.contains(&p[..i]), "{p:?} before its directory");
            }
            seen.insert(p.clone());
        }
    }

    #[test]
    fn checksum_digests_match_the_file_contents() {
        let td = tempfile::tempdir().unwrap();
        write(td.path(), "a/b", "hello");
        let opts = ScanOptions {
            checksum: true,
            ..ScanOptions::default()
        };
        let (entries, _) = scan_to_vec(td.path(), &opts).unwrap();
        let b = entries
            .iter()
            .find(|e| e.path.as_bytes() == b"a/b")
            .unwrap();
        assert_eq!(
            b.kind,
            EntryKind::File {
                size: 5,
                digest: Some(*blake3::hash(b"hello").as_bytes())
            }
        );
    }

    #[test]
    fn deep_trees_and_over_long_paths() {
        let td = tempfile::tempdir().unwrap();
        // 300 levels deep: one fd per level may be held open at once.
        let mut p = td.path().join("deep");
        for _ in 0..300 {
            p.push("d");
        }
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("leaf"), "x").unwrap();
        // Past PATH_MAX relative to the root: built with *at calls, skipped with a warning.
        let mut fd =
            rfs::open(td.path(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let long = "n".repeat(250);
        for _ in 0..18 {
            rfs::mkdirat(&fd, long.as_str(), Mode::from_raw_mode(0o755)).unwrap();
            fd = rfs::openat(
                &fd,
                long.as_str(),
                OFlags::RDONLY | OFlags::DIRECTORY,
                Mode::empty(),
            )
            .unwrap();
        }
        let (entries, events) = scan_to_vec(td.path(), &ScanOptions::default()).unwrap();
        assert!(
            entries
                .iter()
                .any(|e| e.path.as_bytes().ends_with(b"/d/leaf"))
        );
        assert!(entries.iter().all(|e| e.path.check().is_ok()));
        let longest = entries
            .iter()
            .map(|e| e.path.as_bytes().len())
            .max()
            .unwrap();
        assert!(longest <= MAX_PATH_LEN, "{longest}");
        let skipped: Vec<_> = events
            .iter()
            .filter(|ev| matches!(ev, ScanEvent::Skipped { reason, .. } if reason.contains("longer than")))
            .collect();
        assert_eq!(skipped.len(), 1, "{events:?}");
    }
}
