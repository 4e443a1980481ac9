//! `devsync cp` at both ends of a session: what the sender lists (the named files of its
//! root, nothing else, and not the root's own attributes) and where the receiver puts them
//! (decided by the receiver from what is there, as cp and scp decide). Everything else is the
//! ordinary sync: deltas against an existing destination file, verification, atomic replace.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::sender::{List, Plan};
use super::{Observer, SessionError};
use crate::engine::scan::{ScanEvent, ScanOptions, Scanner};
use crate::engine::{Entry, RelPath};
use crate::proto::msg::CopySpec;
use crate::proto::{Event, Msg, SyncOptions};

/// The sender's one generation for `opts`: a copy's named files, or the whole tree.
pub fn plan(
    opts: &SyncOptions,
    root: &Path,
    keep_index: bool,
    obs: &dyn Observer,
) -> Result<Plan, SessionError> {
    let Some(spec) = &opts.copy else {
        return Ok(Plan::whole(opts, keep_index));
    };
    Ok(Plan {
        list: List::Given {
            entries: named_entries(root, spec, opts, obs)?,
            root: None,
            read_errors: 0,
        },
        stash: Vec::new(),
        place: Vec::new(),
        scopes: Vec::new(),
        scope_root: false,
        replace_dirs: false,
    })
}

/// The entries for a copy's names, each checked to be something cp copies.
fn named_entries(
    root: &Path,
    spec: &CopySpec,
    opts: &SyncOptions,
    obs: &dyn Observer,
) -> Result<Vec<(Entry, bool)>, SessionError> {
    for name in &spec.names {
        let path = root.join(name.as_os_str());
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SessionError::Local(format!(
                    "{}: no such file or directory",
                    path.display()
                )));
            }
            Err(e) => return Err(SessionError::Local(format!("{}: {e}", path.display()))),
            Ok(md) if md.is_dir() && !spec.recursive => {
                return Err(SessionError::Local(format!(
                    "{} is a directory (copy directories with -r)",
                    path.display()
                )));
            }
            Ok(md) if md.is_dir() => {}
            Ok(md) if !md.is_file() && !md.file_type().is_symlink() => {
                return Err(SessionError::Local(format!(
                    "{}: not a regular file",
                    path.display()
                )));
            }
            Ok(_) => {}
        }
    }
    let scanner = Scanner::new(
        root,
        &ScanOptions {
            filters: opts.filters.clone(),
            checksum: opts.checksum,
            threads: 1,
            report_ours: false,
        },
    )?;
    let found = Mutex::new(Vec::new());
    // Inside a directory copied with -r, what cannot be copied (a socket, an unreadable
    // directory) is reported and the rest copied, as cp does (exit 23).
    let make = || {
        let found = &found;
        move |ev| match ev {
            ScanEvent::Entry(e, _) => super::lock(found).push((e, false)),
            ScanEvent::Skipped { path, reason } => obs.event(Event::Warning {
                path,
                message: reason,
            }),
            ScanEvent::Error { path, message } => obs.event(Event::Error { path, message }),
            ScanEvent::Ours { .. } => {}
        }
    };
    for name in &spec.names {
        if spec.recursive {
            scanner.subtree(name, &make)?;
        } else {
            scanner.entry(name, &make)?;
        }
    }
    let mut found = found.into_inner().unwrap_or_else(|p| p.into_inner());
    // Parents before children: a path sorts after every prefix of it.
    found.sort_by(|a, b| a.0.path.cmp(&b.0.path));
    found.dedup_by(|a, b| a.0.path == b.0.path);
    if let Some(name) = spec
        .names
        .iter()
        .find(|n| found.binary_search_by(|e| e.0.path.cmp(n)).is_err())
    {
        return Err(SessionError::Local(format!(
            "{}: vanished, or excluded by a filter",
            root.join(name.as_os_str()).display()
        )));
    }
    Ok(found)
}

/// Where a copy lands: the receiver's root and, when the one source takes the destination's
/// own name, that renaming (listed name → name made; for a directory, of everything in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Landing {
    pub root: PathBuf,
    pub rename: Option<(RelPath, RelPath)>,
}

/// Decides where a copy lands at `dest` (the destination as written, `~` resolved), from what
/// is there now. Nothing is created here; errors say what to do.
pub fn landing(dest: &Path, spec: &CopySpec) -> Result<Landing, SessionError> {
    let err = |m: String| Err(SessionError::Local(m));
    // A symlink to a file is written through, as cp does: the file it names is replaced.
    let through;
    let dest = match (std::fs::symlink_metadata(dest), std::fs::metadata(dest)) {
        (Ok(l), Ok(m)) if l.file_type().is_symlink() && m.is_file() => {
            through = std::fs::canonicalize(dest)
                .map_err(|e| SessionError::Local(format!("{}: {e}", dest.display())))?;
            through.as_path()
        }
        _ => dest,
    };
    let trimmed = dest.as_os_str().as_encoded_bytes();
    let trimmed = trimmed
        .strip_suffix(b"/")
        .filter(|t| !t.is_empty())
        .unwrap_or(trimmed);
    let shown_path = PathBuf::from(std::ffi::OsStr::from_bytes(trimmed));
    let shown = shown_path.display();
    let wants_dir = dest.as_os_str().as_encoded_bytes().ends_with(b"/");
    let meta = std::fs::metadata(dest);
    let is_dir = meta.as_ref().is_ok_and(|m| m.is_dir());
    let exists = match &meta {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        // `file/`: there is something, and it is not a directory.
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => true,
        Err(e) => return err(format!("{shown}: {e}")),
    };
    // The parent a new name is made in, and that name.
    let made_in = || -> Result<(PathBuf, RelPath), SessionError> {
        let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
            return Err(SessionError::Local(format!("{shown}: not a file name")));
        };
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        if !parent.is_dir() {
            return Err(SessionError::Local(format!(
                "{}: no such directory",
                parent.display()
            )));
        }
        let name = RelPath::new(name.as_encoded_bytes().to_vec())
            .map_err(|e| SessionError::Local(format!("{shown}: {e}")))?;
        Ok((parent.to_path_buf(), name))
    };
    if is_dir {
        return Ok(Landing {
            root: dest.to_path_buf(),
            rename: None,
        });
    }
    match spec.names.as_slice() {
        [one] if !wants_dir => {
            let (root, name) = made_in()?;
            let rename = (one != &name).then(|| (one.clone(), name));
            Ok(Landing { root, rename })
        }
        [_] => err(format!("{shown}: no such directory")),
        _ if exists => err(format!(
            "{shown} is not a directory: copying several files needs a directory to copy into"
        )),
        _ => err(format!(
            "{shown}: no such directory (copying several files needs an existing directory)"
        )),
    }
}

/// A directory copied onto something that is not one is refused, as cp refuses it (the sync
/// would replace the file).
pub fn check_arrival(root: &Path, e: &Entry) -> Result<(), String> {
    if e.path.depth() != 0 || !matches!(e.kind, crate::engine::EntryKind::Dir) {
        return Ok(());
    }
    let at = root.join(e.path.as_os_str());
    match std::fs::symlink_metadata(&at) {
        Ok(md) if !md.is_dir() => Err(format!(
            "{}: cannot overwrite a non-directory with a directory",
            at.display()
        )),
        _ => Ok(()),
    }
}

/// What a copy's receiver accepts from its sender (which may be a remote it does not trust:
/// a copy's landing root is often a home directory). One generation, of the named entries
/// only (and what is under them with `-r`); no renames, scopes, replaced directories or root
/// attributes.
pub fn check_peer(spec: &CopySpec, msg: &Msg, generations: u64) -> Result<(), String> {
    match msg {
        Msg::GenStart { replace_dirs, .. } if *replace_dirs || generations > 0 => {
            Err("a copy is one generation, without replacing directories".into())
        }
        Msg::Stash { .. } | Msg::Place { .. } | Msg::Scope { .. } => {
            Err("renames and scopes are not part of a copy".into())
        }
        Msg::EndOfList { root: Some(_), .. } => {
            Err("a copy does not set the destination directory's attributes".into())
        }
        Msg::Entries { entries, .. } => {
            for e in entries {
                let top = e
                    .path
                    .as_bytes()
                    .split(|&b| b == b'/')
                    .next()
                    .unwrap_or_default();
                if !spec.names.iter().any(|n| n.as_bytes() == top) {
                    return Err(format!("{}: not one of the files asked for", e.path));
                }
                if !spec.recursive && e.path.depth() != 0 {
                    return Err(format!(
                        "{}: a copy without -r has no subdirectories",
                        e.path
                    ));
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// `path` with its first component renamed by `rename`, if it is that name or under it.
pub fn renamed(path: &RelPath, rename: &(RelPath, RelPath)) -> Option<RelPath> {
    let (from, to) = rename;
    let rest = path.as_bytes().strip_prefix(from.as_bytes())?;
    if !rest.is_empty() && !rest.starts_with(b"/") {
        return None;
    }
    let mut p = to.as_bytes().to_vec();
    p.extend_from_slice(rest);
    RelPath::new(p).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(ns: &[&str]) -> CopySpec {
        CopySpec {
            names: ns
                .iter()
                .map(|n| RelPath::new(n.as_bytes().to_vec()).unwrap())
                .collect(),
            recursive: false,
        }
    }

    fn rel(s: &str) -> RelPath {
        RelPath::new(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn copies_land_where_cp_would_put_them() {
        let td = tempfile::tempdir().unwrap();
        let d = td.path();
        std::fs::create_dir(d.join("dir")).unwrap();
        std::fs::write(d.join("file"), b"x").unwrap();
        // Into an existing directory, by name.
        let l = landing(&d.join("dir"), &names(&["a", "b"])).unwrap();
        assert_eq!(
            l,
            Landing {
                root: d.join("dir"),
                rename: None
            }
        );
        // One file under a new name, or over an existing file.
        let l = landing(&d.join("new"), &names(&["a"])).unwrap();
        assert_eq!(l.root, d);
        assert_eq!(l.rename, Some((rel("a"), rel("new"))));
        let l = landing(&d.join("file"), &names(&["file"])).unwrap();
        assert_eq!((l.root.as_path(), l.rename), (d, None));
        // Several files need a directory.
        for dest in ["file", "missing"] {
            let e = landing(&d.join(dest), &names(&["a", "b"])).unwrap_err();
            assert!(e.to_string().contains("several files"), "{e}");
        }
        // A trailing slash means a directory.
        let mut slash = d.join("missing").into_os_string();
        slash.push("/");
        assert!(landing(Path::new(&slash), &names(&["a"])).is_err());
        // A missing parent is an error, not created.
        let e = landing(&d.join("no/such"), &names(&["a"])).unwrap_err();
        assert!(e.to_string().contains("no such directory"), "{e}");
    }

    #[test]
    fn a_renamed_source_renames_everything_under_it() {
        let r = (rel("src"), rel("new"));
        assert_eq!(renamed(&rel("src"), &r), Some(rel("new")));
        assert_eq!(renamed(&rel("src/a/b"), &r), Some(rel("new/a/b")));
        assert_eq!(renamed(&rel("srcx"), &r), None);
        assert_eq!(renamed(&rel("other"), &r), None);
    }

    fn file(path: &str) -> Entry {
        Entry {
            path: rel(path),
            kind: crate::engine::EntryKind::File {
                size: 1,
                digest: None,
            },
            mode: 0o644,
            mtime: crate::engine::Mtime { sec: 1, nsec: 0 },
        }
    }

    fn entries(paths: &[&str]) -> Msg {
        Msg::Entries {
            first_id: 0,
            entries: paths.iter().map(|p| file(p)).collect(),
            changed: false,
        }
    }

    #[test]
    fn a_copy_accepts_only_what_was_asked_for() {
        let spec = names(&["report.html", "src"]);
        let start = |replace_dirs| Msg::GenStart {
            generation: 0,
            whole: false,
            replace_dirs,
        };
        assert!(check_peer(&spec, &start(false), 0).is_ok());
        assert!(
            check_peer(&spec, &start(false), 1).is_err(),
            "a second generation"
        );
        assert!(check_peer(&spec, &start(true), 0).is_err());
        assert!(check_peer(&spec, &entries(&["report.html", "src"]), 1).is_ok());
        for bad in [".ssh/authorized_keys", ".bashrc", "report.htmlx", "src/a"] {
            assert!(check_peer(&spec, &entries(&[bad]), 1).is_err(), "{bad}");
        }
        let recursive = CopySpec {
            recursive: true,
            ..spec.clone()
        };
        assert!(check_peer(&recursive, &entries(&["src/a/b"]), 1).is_ok());
        assert!(check_peer(&recursive, &entries(&["other/a"]), 1).is_err());
        for msg in [
            Msg::Scope {
                root: false,
                paths: vec![rel("Documents")],
            },
            Msg::Stash { moves: vec![] },
            Msg::Place { moves: vec![] },
            Msg::EndOfList {
                count: 0,
                scan_errors: 0,
                root: Some(crate::proto::Stamp {
                    mode: 0o755,
                    mtime: crate::engine::Mtime { sec: 1, nsec: 0 },
                }),
            },
        ] {
            assert!(check_peer(&spec, &msg, 1).is_err(), "{msg:?}");
        }
    }

    /// The real receiver, in copy mode, against a sender listing a file it was not asked for:
    /// a protocol violation, and nothing written.
    #[test]
    fn a_hostile_sender_cannot_write_beside_the_copy() {
        use crate::proto::{FrameReader, FrameWriter};
        use std::sync::Arc;
        let td = tempfile::tempdir().unwrap();
        let root = td.path().to_path_buf();
        let opts = SyncOptions {
            copy: Some(names(&["report.html"])),
            ..SyncOptions::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(async {
            let (ours, theirs) = tokio::io::duplex(1 << 20);
            let (their_r, their_w) = tokio::io::split(theirs);
            let (_our_r, our_w) = tokio::io::split(ours);
            let (out, pending) = crate::session::conn::channel();
            let _writer = pending.start(FrameWriter::new(their_w));
            let mut w = FrameWriter::new(our_w);
            let start = Msg::GenStart {
                generation: 0,
                whole: false,
                replace_dirs: false,
            };
            w.write(&start, &[]).await.unwrap();
            w.write(&entries(&[".bashrc"]), &[]).await.unwrap();
            w.flush().await.unwrap();
            let mut reader = FrameReader::new(their_r);
            crate::session::receiver::run(
                &mut reader,
                out,
                root.join("r.html"),
                opts,
                Arc::new(crate::session::Silent),
            )
            .await
        });
        assert!(
            matches!(r, Err(SessionError::Violation(ref m)) if m.contains(".bashrc")),
            "{r:?}"
        );
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    }
}
