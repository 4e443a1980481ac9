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

/// What the receiver has at the path an entry names: `lstat`'s answer, a symlink's target
/// (when it is one), and the file's digest (when one was needed and computed).
#[derive(Debug, Clone, Copy, Default)]
pub struct Local<'a> {
    pub meta: Option<LocalMeta>,
    pub link: Option<&'a [u8]>,
    pub digest: Option<&'a Digest>,
}

/// How the receiver may treat what it has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rules {
    /// A directory where the sender has a file or symlink may be removed (`--delete`, or a
    /// change a watch saw: the sender replaced its directory).
    pub replace_dirs: bool,
    /// The sender saw this entry change: a file's content is compared even when size and
    /// mtime match (a rewrite within the timestamp's granularity looks the same).
    pub changed: bool,
}

/// What to do about one entry of the sender's list; the session only carries it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A directory is where the sender has a file or symlink, and replacing it is not allowed.
    RefuseDir,
    /// Make the directory, after removing the non-directory in its way (`clear`).
    MakeDir { clear: bool },
    /// The directory exists: its permissions and/or mtime differ (applied once it is filled).
    FixDir { perms: bool, time: bool },
    /// Make the symlink (after removing the directory in its way, `clear_dir`), replacing
    /// whatever else is there.
    Link { clear_dir: bool, op: ChangeOp },
    /// The symlink is already there, with that target.
    LinkUpToDate,
    /// `--checksum` with a same-size file here: hash it, then decide again with its digest.
    HashFirst,
    /// A regular file: what its content and attributes need (after removing the directory in
    /// its way, `clear_dir`).
    File { clear_dir: bool, action: FileAction },
}

/// Decides what the receiver does about `entry`, given what it has there. Pure.
pub fn decide(entry: &Entry, local: &Local<'_>, rules: Rules) -> Decision {
    let have = local.meta.map(|m| m.kind);
    let dir_in_the_way = have == Some(LocalKind::Dir);
    if dir_in_the_way && !entry.is_dir() && !rules.replace_dirs {
        return Decision::RefuseDir;
    }
    match &entry.kind {
        EntryKind::Dir => match local.meta {
            Some(l) if l.kind == LocalKind::Dir => Decision::FixDir {
                perms: l.mode != entry.mode,
                time: l.mtime != entry.mtime,
            },
            Some(_) => Decision::MakeDir { clear: true },
            None => Decision::MakeDir { clear: false },
        },
        EntryKind::Symlink { target } => {
            if have == Some(LocalKind::Symlink) && local.link == Some(target.as_slice()) {
                return Decision::LinkUpToDate;
            }
            let op = if have == Some(LocalKind::Symlink) {
                ChangeOp::Updated {
                    content: true,
                    size: false,
                    time: false,
                    perms: false,
                }
            } else {
                ChangeOp::Created
            };
            Decision::Link {
                clear_dir: dir_in_the_way,
                op,
            }
        }
        EntryKind::File { size, digest } => {
            let file = local.meta.filter(|l| l.kind == LocalKind::File);
            if let (Some(_), Some(l), None) = (digest, file, local.digest)
                && l.size == *size
            {
                return Decision::HashFirst;
            }
            let mut action = file_action(
                *size,
                entry.mode,
                entry.mtime,
                digest.as_ref(),
                file.as_ref(),
                local.digest,
            );
            // Seen changing, and our copy looks the same: compare content (a delta against
            // an identical copy costs a few hashes and an answer).
            if rules.changed
                && digest.is_none()
                && file.is_some()
                && !matches!(action, FileAction::Transfer { .. })
            {
                action = FileAction::Transfer { basis: true };
            }
            Decision::File {
                clear_dir: dir_in_the_way,
                action,
            }
        }
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

    fn meta(kind: LocalKind, size: u64, mode: u32, mtime: Mtime) -> Option<LocalMeta> {
        Some(LocalMeta {
            kind,
            size,
            mode,
            mtime,
        })
    }

    fn with(path: &str, kind: EntryKind, mode: u32, mtime: Mtime) -> Entry {
        Entry {
            path: RelPath::new(path).unwrap(),
            kind,
            mode,
            mtime,
        }
    }

    #[test]
    fn decisions_for_every_kind_against_every_kind() {
        let file = EntryKind::File {
            size: 3,
            digest: None,
        };
        let link = EntryKind::Symlink {
            target: b"t".to_vec(),
        };
        let f = with("f", file.clone(), 0o644, T);
        let d = with("d", EntryKind::Dir, 0o755, T);
        let l = with("l", link, 0o777, T);
        let loose = Rules::default();
        let nothing = Local::default();
        let at = |kind, size, mode| Local {
            meta: meta(kind, size, mode, T),
            ..Local::default()
        };
        // Nothing there: create.
        assert_eq!(
            decide(&d, &nothing, loose),
            Decision::MakeDir { clear: false }
        );
        assert_eq!(
            decide(&l, &nothing, loose),
            Decision::Link {
                clear_dir: false,
                op: ChangeOp::Created
            }
        );
        assert_eq!(
            decide(&f, &nothing, loose),
            Decision::File {
                clear_dir: false,
                action: FileAction::Transfer { basis: false }
            }
        );
        // A directory in the way of a file or link: only when allowed.
        let dir_here = at(LocalKind::Dir, 0, 0o755);
        assert_eq!(decide(&f, &dir_here, loose), Decision::RefuseDir);
        assert_eq!(decide(&l, &dir_here, loose), Decision::RefuseDir);
        let replace = Rules {
            replace_dirs: true,
            ..loose
        };
        assert_eq!(
            decide(&f, &dir_here, replace),
            Decision::File {
                clear_dir: true,
                action: FileAction::Transfer { basis: false }
            }
        );
        // A file where a directory goes is replaced; a directory's attributes are compared.
        assert_eq!(
            decide(&d, &at(LocalKind::File, 3, 0o644), loose),
            Decision::MakeDir { clear: true }
        );
        assert_eq!(
            decide(&d, &at(LocalKind::Dir, 0, 0o700), loose),
            Decision::FixDir {
                perms: true,
                time: false
            }
        );
        // Symlinks: same target is up to date, another is an update, a file is replaced.
        let same_link = Local {
            meta: meta(LocalKind::Symlink, 1, 0o777, T),
            link: Some(b"t"),
            digest: None,
        };
        assert_eq!(decide(&l, &same_link, loose), Decision::LinkUpToDate);
        let other_link = Local {
            link: Some(b"u"),
            ..same_link
        };
        assert!(matches!(
            decide(&l, &other_link, loose),
            Decision::Link {
                op: ChangeOp::Updated { content: true, .. },
                ..
            }
        ));
        // Files: quick check, unless the sender saw it change.
        let same_file = at(LocalKind::File, 3, 0o644);
        assert_eq!(
            decide(&f, &same_file, loose),
            Decision::File {
                clear_dir: false,
                action: FileAction::UpToDate
            }
        );
        let changed = Rules {
            changed: true,
            ..loose
        };
        assert_eq!(
            decide(&f, &same_file, changed),
            Decision::File {
                clear_dir: false,
                action: FileAction::Transfer { basis: true }
            }
        );
        // --checksum: same size means hashing ours first, then comparing digests.
        let dg: crate::engine::hash::Digest = [7u8; 32];
        let fc = with(
            "f",
            EntryKind::File {
                size: 3,
                digest: Some(dg),
            },
            0o644,
            T,
        );
        assert_eq!(decide(&fc, &same_file, loose), Decision::HashFirst);
        let hashed = Local {
            digest: Some(&dg),
            ..same_file
        };
        assert_eq!(
            decide(&fc, &hashed, loose),
            Decision::File {
                clear_dir: false,
                action: FileAction::UpToDate
            }
        );
    }

    /// A receiver path in a model: what is there, with a content version for files.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Have {
        Nothing,
        File {
            size: u64,
            mode: u32,
            mtime: Mtime,
            content: u8,
        },
        Dir {
            mode: u32,
            mtime: Mtime,
        },
        Link {
            target: Vec<u8>,
        },
        Fifo,
    }

    #[test]
    fn seeded_random_decisions_carried_out_give_the_senders_entry() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(77);
        let digest_of = |content: u8| -> Digest { [content; 32] };
        for case in 0..20_000 {
            let mut r = |n: u32| rng.random_range(0..n);
            let times = [Mtime { sec: 1, nsec: 0 }, Mtime { sec: 1, nsec: 1 }, T];
            let (size, mode, mtime, content) = (
                u64::from(r(2)),
                0o600 + r(2) * 0o44,
                times[r(3) as usize],
                r(3) as u8,
            );
            let checksum = r(4) == 0;
            let sent = match r(3) {
                0 => EntryKind::File {
                    size,
                    digest: checksum.then(|| digest_of(content)),
                },
                1 => EntryKind::Dir,
                _ => EntryKind::Symlink {
                    target: vec![b'a' + content],
                },
            };
            let entry = with("p", sent, mode, mtime);
            let mut have = match r(5) {
                0 => Have::Nothing,
                1 => Have::File {
                    size: u64::from(r(2)),
                    mode: 0o600 + r(2) * 0o44,
                    mtime: times[r(3) as usize],
                    content: r(3) as u8,
                },
                2 => Have::Dir {
                    mode: 0o700,
                    mtime: times[r(3) as usize],
                },
                3 => Have::Link {
                    target: vec![b'a' + r(3) as u8],
                },
                _ => Have::Fifo,
            };
            let rules = Rules {
                replace_dirs: r(2) == 0,
                changed: r(2) == 0,
            };
            let before = have.clone();
            let meta_of = |h: &Have| match h {
                Have::Nothing => None,
                Have::File {
                    size, mode, mtime, ..
                } => meta(LocalKind::File, *size, *mode, *mtime),
                Have::Dir { mode, mtime } => meta(LocalKind::Dir, 0, *mode, *mtime),
                Have::Link { .. } => meta(LocalKind::Symlink, 1, 0o777, T),
                Have::Fifo => meta(LocalKind::Other, 0, 0o644, T),
            };
            let link_of = |h: &Have| match h {
                Have::Link { target } => Some(target.clone()),
                _ => None,
            };
            let link = link_of(&have);
            let local = Local {
                meta: meta_of(&have),
                link: link.as_deref(),
                digest: None,
            };
            let mut decision = decide(&entry, &local, rules);
            if decision == Decision::HashFirst {
                let Have::File { content: c, .. } = have else {
                    panic!("case {case}: hashing a non-file")
                };
                let d = digest_of(c);
                decision = decide(
                    &entry,
                    &Local {
                        digest: Some(&d),
                        ..local
                    },
                    rules,
                );
                assert_ne!(decision, Decision::HashFirst, "case {case}");
            }
            let is_dir = matches!(have, Have::Dir { .. });
            // Carry it out on the model.
            match decision {
                Decision::RefuseDir => {
                    assert!(
                        is_dir && !entry.is_dir() && !rules.replace_dirs,
                        "case {case}"
                    );
                    continue;
                }
                Decision::MakeDir { clear } => {
                    assert_eq!(clear, !matches!(have, Have::Nothing), "case {case}");
                    assert!(!is_dir, "case {case}");
                    have = Have::Dir { mode, mtime };
                }
                Decision::FixDir { .. } => {
                    assert!(is_dir, "case {case}");
                    have = Have::Dir { mode, mtime };
                }
                Decision::Link { clear_dir, .. } => {
                    assert_eq!(clear_dir, is_dir, "case {case}");
                    let EntryKind::Symlink { target } = &entry.kind else {
                        panic!("case {case}")
                    };
                    have = Have::Link {
                        target: target.clone(),
                    };
                }
                Decision::LinkUpToDate => {}
                Decision::HashFirst => unreachable!(),
                Decision::File { clear_dir, action } => {
                    assert_eq!(clear_dir, is_dir, "case {case}");
                    match action {
                        FileAction::UpToDate => {}
                        FileAction::Metadata { .. } => {
                            let Have::File {
                                content: c,
                                size: s,
                                ..
                            } = have
                            else {
                                panic!("case {case}: metadata of a non-file")
                            };
                            have = Have::File {
                                size: s,
                                mode,
                                mtime,
                                content: c,
                            };
                        }
                        FileAction::Transfer { basis } => {
                            assert_eq!(basis, matches!(have, Have::File { .. }), "case {case}");
                            have = Have::File {
                                size,
                                mode,
                                mtime,
                                content,
                            };
                        }
                    }
                }
            }
            // The result is the sender's entry; content may only be stale where the quick
            // check was trusted (same size and mtime, not seen changing, no --checksum).
            let want = match &entry.kind {
                EntryKind::File { .. } => Have::File {
                    size,
                    mode,
                    mtime,
                    content,
                },
                EntryKind::Dir => Have::Dir { mode, mtime },
                EntryKind::Symlink { target } => Have::Link {
                    target: target.clone(),
                },
            };
            let stale_allowed = matches!(
                (&before, &want),
                (Have::File { size: s0, mtime: t0, .. }, Have::File { size: s1, mtime: t1, .. })
                    if s0 == s1 && t0 == t1 && !rules.changed && !checksum
            );
            match (&have, &want) {
                (Have::File { content: a, .. }, Have::File { content: b, .. })
                    if stale_allowed && a != b =>
                {
                    let mut fixed = have.clone();
                    if let Have::File { content, .. } = &mut fixed {
                        *content = *b;
                    }
                    assert_eq!(fixed, want, "case {case}: {before:?} {entry:?} {rules:?}");
                }
                _ => assert_eq!(have, want, "case {case}: {before:?} {entry:?} {rules:?}"),
            }
        }
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
