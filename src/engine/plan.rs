//! Decisions: does a file need its content sent, only its metadata fixed, or nothing; which
//! receiver entries `--delete` removes, and whether that is too many to do without
//! `--force-delete`. Also the rsync-style itemized description of each change.
//!
//! Pure functions over metadata: no I/O.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::{Entry, EntryKind, LocalKind, LocalMeta, RelPath, hash::Digest};

/// What the receiver must do for a regular file the sender has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileAction {
    UpToDate,
    /// Same content; fix permissions and/or mtime in place.
    Metadata {
        perms: bool,
        time: bool,
    },
    /// Content must come over. `basis` says an existing regular file can serve as delta base.
    Transfer {
        basis: bool,
    },
}

/// Quick check (size + mtime to the nanosecond), or, with `--checksum`, content digests.
/// `local_digest` is the receiver's digest, computed only in checksum mode when sizes match.
pub fn file_action(
    size: u64,
    mode: u32,
    mtime: super::Mtime,
    sender_digest: Option<&Digest>,
    local: Option<&LocalMeta>,
    local_digest: Option<&Digest>,
) -> FileAction {
    let Some(local) = local.filter(|l| l.kind == LocalKind::File) else {
        return FileAction::Transfer { basis: false };
    };
    let same_content = match (sender_digest, local_digest) {
        (Some(a), Some(b)) => local.size == size && a == b,
        (Some(_), None) => false,
        _ => local.size == size && local.mtime == mtime,
    };
    if !same_content {
        return FileAction::Transfer { basis: true };
    }
    let perms = local.mode != mode;
    let time = local.mtime != mtime;
    if perms || time {
        FileAction::Metadata { perms, time }
    } else {
        FileAction::UpToDate
    }
}

/// Kind of item a change is about.
#[cfg_attr(test, derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ItemKind {
    File,
    Dir,
    Symlink,
}

impl ItemKind {
    pub fn of(entry: &Entry) -> ItemKind {
        match entry.kind {
            EntryKind::File { .. } => ItemKind::File,
            EntryKind::Dir => ItemKind::Dir,
            EntryKind::Symlink { .. } => ItemKind::Symlink,
        }
    }

    fn letter(self) -> char {
        match self {
            ItemKind::File => 'f',
            ItemKind::Dir => 'd',
            ItemKind::Symlink => 'L',
        }
    }
}

/// What happened (or, in a dry run, would happen) to one path on the receiver.
#[cfg_attr(test, derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeOp {
    Created,
    /// Existing item changed: content (or symlink target), size, mtime, permissions.
    Updated {
        content: bool,
        size: bool,
        time: bool,
        perms: bool,
    },
    Deleted,
}

#[cfg_attr(test, derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub path: RelPath,
    pub kind: ItemKind,
    pub op: ChangeOp,
}

impl Change {
    /// rsync's `--itemize-changes` format: `YXcstpoguax path`, where Y is `<` (sent, push),
    /// `>` (received, pull), `c` (created without data: dirs, symlinks), `.` (attributes only)
    /// or `*deleting`.
    pub fn itemize(&self, sending: bool) -> String {
        format!("{} {}", self.flags(sending), self.path)
    }

    /// The `YXcstpoguax` part of [`Change::itemize`] (`*deleting  ` for a deletion), for
    /// callers that print the path their own way.
    pub fn flags(&self, sending: bool) -> String {
        let x = self.kind.letter();
        let arrow = if sending { '<' } else { '>' };
        match self.op {
            ChangeOp::Deleted => "*deleting  ".to_string(),
            ChangeOp::Created => {
                let y = if self.kind == ItemKind::File {
                    arrow
                } else {
                    'c'
                };
                format!("{y}{x}+++++++++")
            }
            ChangeOp::Updated {
                content,
                size,
                time,
                perms,
            } => {
                let y = match (self.kind, content) {
                    (ItemKind::File, true) => arrow,
                    (ItemKind::Symlink, true) => 'c',
                    _ => '.',
                };
                let f = |b: bool, c: char| if b { c } else { '.' };
                format!(
                    "{y}{x}{}{}{}{}.....",
                    f(content, 'c'),
                    f(size, 's'),
                    f(time, 't'),
                    f(perms, 'p')
                )
            }
        }
    }
}

/// Receiver entries absent on the sender, children before their parents.
pub fn deletions(receiver: &[Entry], sender_has: &HashSet<RelPath>) -> Vec<Entry> {
    let mut doomed: Vec<Entry> = receiver
        .iter()
        .filter(|e| !sender_has.contains(&e.path))
        .cloned()
        .collect();
    doomed.sort_by(|a, b| {
        b.path
            .depth()
            .cmp(&a.path.depth())
            .then_with(|| a.path.cmp(&b.path))
    });
    doomed
}

/// The guard only looks at deletions of at least this many entries (small trees change shape
/// legitimately), except that emptying a non-empty destination is always refused.
pub const GUARD_MIN_DELETIONS: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "refusing to delete {count} of {total} entries in {dir} ({why}); \
     nothing was deleted. Check the source path, or pass --force-delete if this is intended. \
     Would delete: {sample}"
)]
pub struct GuardRefusal {
    pub count: usize,
    pub total: usize,
    pub why: &'static str,
    pub sample: String,
    /// The directory deletions were refused in (filled in by the caller that knows it).
    pub dir: String,
}

/// Refuses deletions that look like a mistake: the sender's root is empty, or more than half
/// of the receiver's entries would go.
pub fn check_delete_guard(
    doomed: &[Entry],
    receiver_total: usize,
    sender_total: usize,
    force: bool,
) -> Result<(), GuardRefusal> {
    let count = doomed.len();
    if force || count == 0 {
        return Ok(());
    }
    let why = if sender_total == 0 {
        "the source is empty"
    } else if count >= GUARD_MIN_DELETIONS && count * 2 > receiver_total {
        "more than half of the destination"
    } else {
        return Ok(());
    };
    // Show the shallowest paths first: they say the most about what would go.
    let mut shown: Vec<&Entry> = doomed.iter().collect();
    shown.sort_by(|a, b| {
        a.path
            .depth()
            .cmp(&b.path.depth())
            .then(a.path.cmp(&b.path))
    });
    let mut sample: Vec<String> = shown.iter().take(10).map(|e| e.path.to_string()).collect();
    if count > 10 {
        sample.push(format!("… and {} more", count - 10));
    }
    Err(GuardRefusal {
        count,
        total: receiver_total,
        why,
        sample: sample.join(", "),
        dir: "the destination".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::Mtime;
    use super::*;

    const T: Mtime = Mtime { sec: 100, nsec: 5 };

    fn local(size: u64, mode: u32, mtime: Mtime) -> LocalMeta {
        LocalMeta {
            kind: LocalKind::File,
            size,
            mode,
            mtime,
        }
    }

    #[test]
    fn quick_check_uses_size_and_nanosecond_mtime() {
        let l = local(10, 0o644, T);
        assert_eq!(
            file_action(10, 0o644, T, None, Some(&l), None),
            FileAction::UpToDate
        );
        let later = Mtime { sec: 100, nsec: 6 };
        assert_eq!(
            file_action(10, 0o644, later, None, Some(&l), None),
            FileAction::Transfer { basis: true }
        );
        assert_eq!(
            file_action(11, 0o644, T, None, Some(&l), None),
            FileAction::Transfer { basis: true }
        );
        assert_eq!(
            file_action(10, 0o755, T, None, Some(&l), None),
            FileAction::Metadata {
                perms: true,
                time: false
            }
        );
        assert_eq!(
            file_action(10, 0o644, T, None, None, None),
            FileAction::Transfer { basis: false }
        );
        let dir = LocalMeta {
            kind: LocalKind::Dir,
            ..l
        };
        assert_eq!(
            file_action(10, 0o644, T, None, Some(&dir), None),
            FileAction::Transfer { basis: false }
        );
    }

    #[test]
    fn checksum_mode_compares_content() {
        let l = local(10, 0o644, Mtime { sec: 1, nsec: 0 });
        let d = [7u8; 32];
        assert_eq!(
            file_action(10, 0o644, T, Some(&d), Some(&l), Some(&d)),
            FileAction::Metadata {
                perms: false,
                time: true
            }
        );
        assert_eq!(
            file_action(10, 0o644, T, Some(&d), Some(&l), Some(&[8u8; 32])),
            FileAction::Transfer { basis: true }
        );
    }

    fn entry(p: &str) -> Entry {
        Entry {
            path: RelPath::new(p).unwrap(),
            kind: EntryKind::Dir,
            mode: 0o755,
            mtime: T,
        }
    }

    #[test]
    fn deletions_are_children_first() {
        let recv: Vec<Entry> = ["a", "a/b", "a/b/c", "keep", "z"].map(entry).to_vec();
        let has: HashSet<RelPath> = [RelPath::new("keep").unwrap()].into();
        let d: Vec<String> = deletions(&recv, &has)
            .iter()
            .map(|e| e.path.to_string())
            .collect();
        assert_eq!(d, ["a/b/c", "a/b", "a", "z"]);
    }

    #[test]
    fn guard_refuses_mass_deletion_and_empty_source() {
        let doomed: Vec<Entry> = (0..6).map(|i| entry(&format!("f{i}"))).collect();
        let e = check_delete_guard(&doomed, 10, 4, false).unwrap_err();
        assert_eq!((e.count, e.total), (6, 10));
        assert!(e.to_string().contains("f0"));
        check_delete_guard(&doomed, 10, 4, true).unwrap();
        check_delete_guard(&doomed, 13, 7, false).unwrap();
        check_delete_guard(&doomed[..4], 5, 1, false).unwrap();
        let e = check_delete_guard(&doomed[..1], 1, 0, false).unwrap_err();
        assert_eq!(e.why, "the source is empty");
    }

    #[test]
    fn itemize_matches_rsync_layout() {
        let c = |kind, op| Change {
            path: RelPath::new("x").unwrap(),
            kind,
            op,
        };
        assert_eq!(
            c(ItemKind::File, ChangeOp::Created).itemize(true),
            "<f+++++++++ x"
        );
        assert_eq!(
            c(ItemKind::Dir, ChangeOp::Created).itemize(false),
            "cd+++++++++ x"
        );
        let upd = ChangeOp::Updated {
            content: true,
            size: true,
            time: true,
            perms: false,
        };
        assert_eq!(c(ItemKind::File, upd).itemize(false), ">fcst...... x");
        let meta = ChangeOp::Updated {
            content: false,
            size: false,
            time: true,
            perms: true,
        };
        assert_eq!(c(ItemKind::File, meta).itemize(false), ".f..tp..... x");
        assert_eq!(
            c(ItemKind::File, ChangeOp::Deleted).itemize(false),
            "*deleting   x"
        );
    }
}
