//! Parallel walk of a sync root into [`Entry`] values.
//!
//! Directories are reported before anything inside them (the receiver relies on that to
//! refuse paths whose parent was never announced as a directory). Symlinks are reported as
//! links and never followed; fifos, sockets and devices are skipped with a warning.

use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use ignore::WalkState;

use super::filter::{FilterError, FilterOptions};
use super::{Entry, EntryKind, MODE_MASK, Mtime, RelPath, hash, special_kind_name};

/// What the walk reports, from walker threads, in parent-before-child order per subtree.
#[derive(Debug)]
pub enum ScanEvent {
    Entry(Entry),
    /// Not synced, but not a failure (special files, unreadable ignore files).
    Skipped {
        path: String,
        reason: String,
    },
    /// Something that could not be read: the list is incomplete.
    Error {
        path: String,
        message: String,
    },
}

#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    pub filters: FilterOptions,
    /// Fill in each file's BLAKE3 digest (`--checksum`).
    pub checksum: bool,
    /// Walker threads (0: one per core).
    pub threads: usize,
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

/// Walks `root` with one sink per walker thread, made by `make`. Each sink sees its thread's
/// events in order and is dropped when the walk ends (so it can batch, and flush on drop).
pub fn scan_each<S, M>(root: &Path, opts: &ScanOptions, make: &M) -> Result<(), ScanError>
where
    S: FnMut(ScanEvent) + Send,
    M: Fn() -> S + Sync,
{
    check_root(root)?;
    let mut walker = opts.filters.walker(root)?;
    walker.threads(opts.threads);
    walker.build_parallel().run(|| {
        let mut sink = make();
        Box::new(move |item| {
            match item {
                Ok(dent) if dent.depth() == 0 => {}
                Ok(dent) => {
                    if let Some(ev) = visit(root, dent.path(), opts.checksum) {
                        sink(ev);
                    }
                }
                Err(err) => sink(walk_error(root, err)),
            }
            WalkState::Continue
        })
    });
    Ok(())
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
            ScanEvent::Entry(e) => g.0.push(e),
            other => g.1.push(other),
        }
    })?;
    Ok(out.into_inner().unwrap_or_else(|p| p.into_inner()))
}

fn rel(root: &Path, path: &Path) -> Option<RelPath> {
    // The walker builds every path as `root` joined with names: slice the bytes rather than
    // re-parsing components (this runs once per entry); RelPath::new checks the result.
    let bytes = path.as_os_str().as_bytes();
    let r = match bytes.strip_prefix(root.as_os_str().as_bytes()) {
        Some(r) => r.strip_prefix(b"/").unwrap_or(r),
        None => path.strip_prefix(root).ok()?.as_os_str().as_bytes(),
    };
    RelPath::new(r).ok()
}

fn visit(root: &Path, path: &Path, checksum: bool) -> Option<ScanEvent> {
    let shown = || path.display().to_string();
    let Some(rpath) = rel(root, path) else {
        return Some(ScanEvent::Skipped {
            path: shown(),
            reason: "name cannot be synced (too long or contains odd bytes)".into(),
        });
    };
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        // Deleted between readdir and lstat: simply not part of this sync.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            return Some(ScanEvent::Error {
                path: rpath.to_string(),
                message: e.to_string(),
            });
        }
    };
    let ft = md.file_type();
    let kind = if ft.is_file() {
        let digest = if checksum {
            match hash_file(path, md.len()) {
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
        EntryKind::File {
            size: md.len(),
            digest,
        }
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
        match std::fs::read_link(path) {
            Ok(t) => EntryKind::Symlink {
                target: t.as_os_str().as_bytes().to_vec(),
            },
            Err(e) => {
                return Some(ScanEvent::Error {
                    path: rpath.to_string(),
                    message: format!("reading symlink: {e}"),
                });
            }
        }
    } else {
        return Some(ScanEvent::Skipped {
            path: rpath.to_string(),
            reason: format!("skipping {}", special_kind_name(&md)),
        });
    };
    Some(ScanEvent::Entry(Entry {
        path: rpath,
        kind,
        mode: md.mode() & MODE_MASK,
        mtime: Mtime::of(&md),
    }))
}

/// BLAKE3 digest of a file the walker found (never following a symlink swapped in since).
pub fn hash_file(path: &Path, len: u64) -> std::io::Result<hash::Digest> {
    let f = File::options()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)?;
    hash::file_digest(&f, len)
}

fn walk_error(root: &Path, err: ignore::Error) -> ScanEvent {
    let path = error_path(&err)
        .and_then(|p| rel(root, p).map(|r| r.to_string()))
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

    #[test]
    fn relative_paths_whatever_the_root_spelling() {
        let cases = [
            ("src", "src/a/b.rs", Some("a/b.rs")),
            ("src/", "src/a", Some("a")),
            ("/", "/etc/x", Some("etc/x")),
            ("/w/src", "/w/src/.git/HEAD", Some(".git/HEAD")),
            ("src", "src/a//b", None),
            ("src", "src/../x", None),
        ];
        for (root, path, want) in cases {
            let got = rel(Path::new(root), Path::new(path));
            assert_eq!(
                got.as_ref().map(|r| r.as_bytes()),
                want.map(str::as_bytes),
                "{root} {path}"
            );
        }
    }
}
