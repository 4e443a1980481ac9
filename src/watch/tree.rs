//! The local side of a watch: what the tree holds (an [`Index`] with inodes), an inotify
//! watch (through `notify`) on every directory that takes part and on nothing else, and what
//! changed since the last generation.
//!
//! Events only say where to look: a directory whose listing changed is read again (its
//! entries `lstat`ed), a file that was written or had its attributes changed is `lstat`ed,
//! and what they show is compared with the index. A new directory is watched before it is
//! read, so nothing created in it in the meantime is missed. Ignored directories
//! (`node_modules/`, `target/`, anything a `.gitignore` names) are never read nor watched.
//! A lost event (the kernel queue overflowed), an edit to an ignore file or an error from the
//! watcher means a whole rescan, compared with the index the same way: never a missed change.
//! Directories that could not be watched (the `fs.inotify.max_user_watches` limit) are read
//! again periodically instead.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher};

use crate::engine::RelPath;
use crate::engine::filter::DEVSYNC_IGNORE;
use crate::engine::index::{Index, Ino};
use crate::engine::scan::{ScanEvent, ScanOptions, Scanner};

/// How often directories that could not be watched are read again.
pub const UNWATCHED_RESCAN: Duration = Duration::from_secs(2);

/// Watches, as the scanner threads and the event loop both add to them.
struct Watches {
    watcher: notify::RecommendedWatcher,
    /// Directories (relative, `b""` the root) with a watch.
    watched: HashSet<Vec<u8>>,
    /// Directories the watch limit left without one.
    unwatched: BTreeSet<Vec<u8>>,
    /// Set when the limit was first hit (reported once).
    limit_hit: bool,
    /// Other errors adding watches (reported, and covered by a rescan).
    errors: Vec<String>,
}

/// Why the watch must stop propagating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Halt {
    RootGone(String),
    RootReplaced(String),
    RootEmptied(String),
}

impl std::fmt::Display for Halt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Halt::RootGone(r) => write!(
                f,
                "the local root {r} was deleted or moved away; not mirroring that on the remote \
                 (nothing was deleted there). Restore it and start the watch again"
            ),
            Halt::RootReplaced(r) => write!(
                f,
                "the local root {r} was replaced by another file or directory; not mirroring \
                 that on the remote (nothing was deleted there). Start the watch again to sync \
                 the new one"
            ),
            Halt::RootEmptied(r) => write!(
                f,
                "the local root {r} lost all its entries while the remote still has them; not \
                 mirroring a mass deletion (nothing was deleted there). If this is intended, \
                 run devsync push --delete --force-delete"
            ),
        }
    }
}

/// What one [`Tree::refresh`] found.
#[derive(Debug, Default)]
pub struct Refreshed {
    /// Paths that left the index because the filters now exclude them (they still exist):
    /// the remote keeps its copies.
    pub excluded_now: Vec<RelPath>,
    /// Warnings worth showing (scan errors, watch limit).
    pub warnings: Vec<(String, String)>,
    pub full_rescan: bool,
}

pub struct Tree {
    root: PathBuf,
    root_id: Ino,
    opts: ScanOptions,
    scanner: Scanner,
    index: Index,
    watches: Mutex<Watches>,
    /// Where flush markers are made (a private directory watched by the same watcher, so a
    /// marker's event comes after every event queued before it).
    marker_dir: PathBuf,
    // What events said, not yet looked at.
    dirty_dirs: BTreeSet<Vec<u8>>,
    dirty_paths: BTreeSet<RelPath>,
    full: bool,
    ignore_changed: bool,
    /// Changes since the last generation: paths with (`true`) or without their subtrees.
    pending: BTreeMap<RelPath, bool>,
    /// Files written since the last generation (their content is compared even if their
    /// size and mtime look the same).
    touched: HashSet<RelPath>,
    root_changed: bool,
    /// When the oldest change not yet sent was noticed.
    since: Option<Instant>,
    /// Markers seen, in order.
    markers: Vec<u64>,
    /// The last whole read of the tree met directories it could not read.
    unreadable: bool,
}

/// What one scan found: entries with their inodes, things worth a warning, and whether any
/// part could not be read (then nothing missing from it may be taken for deleted).
#[derive(Default)]
struct Collect {
    found: Mutex<Vec<(crate::engine::Entry, Ino)>>,
    warnings: Mutex<Vec<(String, String)>>,
    errors: std::sync::atomic::AtomicUsize,
}

impl Collect {
    fn take(self, out: &mut Refreshed) -> (Vec<(crate::engine::Entry, Ino)>, bool) {
        out.warnings.extend(
            self.warnings
                .into_inner()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let clean = self.errors.into_inner() == 0;
        (
            self.found.into_inner().unwrap_or_else(|p| p.into_inner()),
            clean,
        )
    }

    fn event(&self, ev: ScanEvent) {
        match ev {
            ScanEvent::Entry(e, ino) => lock(&self.found).push((e, ino)),
            ScanEvent::Skipped { path, reason } => lock(&self.warnings).push((path, reason)),
            ScanEvent::Error { path, message } => {
                self.errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                lock(&self.warnings).push((path, message));
            }
            ScanEvent::Ours { .. } => {}
        }
    }
}

/// At most this many watches of our own (`DEVSYNC_WATCH_LIMIT`, for testing the fallback
/// without lowering the system-wide `fs.inotify.max_user_watches`); the kernel's limit applies
/// anyway.
fn watch_limit() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("DEVSYNC_WATCH_LIMIT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(usize::MAX)
    })
}

fn is_ignore_file(name: &[u8]) -> bool {
    name == b".gitignore" || name == DEVSYNC_IGNORE.as_bytes()
}

impl Tree {
    /// Scans `root` (watching every directory that takes part before reading it) and starts
    /// delivering events to `events`.
    pub fn start(
        root: &Path,
        opts: &ScanOptions,
        marker_dir: PathBuf,
        events: tokio::sync::mpsc::UnboundedSender<notify::Result<notify::Event>>,
    ) -> anyhow::Result<Tree> {
        let root = std::fs::canonicalize(root)
            .map_err(|e| anyhow::anyhow!("source {}: {e}", root.display()))?;
        let md = std::fs::metadata(&root)?;
        let root_id = (
            std::os::unix::fs::MetadataExt::dev(&md),
            std::os::unix::fs::MetadataExt::ino(&md),
        );
        let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            // Reads (ours, a build's, an editor's) change nothing: not worth a wake-up.
            if let Ok(e) = &ev
                && matches!(e.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write))
            {
                return;
            }
            let _ = events.send(ev); // the watch is over: nobody listens
        })?;
        let scanner = Scanner::new(&root, opts)?;
        std::fs::create_dir_all(&marker_dir)?;
        let mut t = Tree {
            root,
            root_id,
            opts: opts.clone(),
            scanner,
            index: Index::new(),
            watches: Mutex::new(Watches {
                watcher,
                watched: HashSet::new(),
                unwatched: BTreeSet::new(),
                limit_hit: false,
                errors: Vec::new(),
            }),
            marker_dir,
            dirty_dirs: BTreeSet::new(),
            dirty_paths: BTreeSet::new(),
            full: false,
            ignore_changed: false,
            pending: BTreeMap::new(),
            touched: HashSet::new(),
            root_changed: false,
            since: None,
            markers: Vec::new(),
            unreadable: false,
        };
        {
            let mut w = lock(&t.watches);
            w.watcher
                .watch(&t.marker_dir, RecursiveMode::NonRecursive)
                .map_err(|e| anyhow::anyhow!("watching {}: {e}", t.marker_dir.display()))?;
        }
        t.watch(b"");
        let c = Collect::default();
        t.scanner.all(&t.collecting(&c, true))?;
        let (found, clean) = c.take(&mut Refreshed::default());
        t.unreadable = !clean;
        for (e, ino) in found {
            t.index.insert(e, ino);
        }
        Ok(t)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the last whole read of the tree could not read all of it: a list of the whole
    /// tree is then not the truth about what is gone.
    pub fn unreadable(&self) -> bool {
        self.unreadable
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn watched_dirs(&self) -> usize {
        lock(&self.watches).watched.len()
    }

    /// The directories without a watch (read again every [`UNWATCHED_RESCAN`]).
    pub fn has_unwatched(&self) -> bool {
        !lock(&self.watches).unwatched.is_empty()
    }

    fn abs(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(std::ffi::OsStr::from_bytes(rel))
        }
    }

    /// Watches directory `rel` (before it is read); whether it had no watch before (and has
    /// one now).
    fn watch(&self, rel: &[u8]) -> bool {
        let path = self.abs(rel);
        let mut w = lock(&self.watches);
        if w.watched.contains(rel) {
            return false;
        }
        let r = if w.watched.len() >= watch_limit() {
            Err(notify::Error::new(notify::ErrorKind::MaxFilesWatch))
        } else {
            w.watcher.watch(&path, RecursiveMode::NonRecursive)
        };
        match r {
            Ok(()) => {
                w.watched.insert(rel.to_vec());
                w.unwatched.remove(rel);
                return true;
            }
            Err(e) => match e.kind {
                notify::ErrorKind::MaxFilesWatch => {
                    w.limit_hit = true;
                    w.unwatched.insert(rel.to_vec());
                }
                // Gone already: its parent's listing says so.
                notify::ErrorKind::PathNotFound => {}
                _ => {
                    w.unwatched.insert(rel.to_vec());
                    w.errors.push(format!("watching {}: {e}", path.display()));
                }
            },
        }
        false
    }

    /// Drops the watches on `rel` and every directory under it.
    fn unwatch_subtree(&self, rel: &[u8]) {
        let mut w = lock(&self.watches);
        let doomed: Vec<Vec<u8>> = w
            .watched
            .iter()
            .filter(|d| is_at_or_under(d, rel))
            .cloned()
            .collect();
        for d in doomed {
            let path = self.abs(&d);
            // notify drops the watches of a directory moved or deleted by itself already.
            let _ = w.watcher.unwatch(&path);
            w.watched.remove(&d);
        }
        w.unwatched.retain(|d| !is_at_or_under(d, rel));
    }

    /// A sink factory that collects entries, watching each directory as it is reported
    /// (before the walk reads it) when `watch` is set.
    fn collecting<'a>(
        &'a self,
        c: &'a Collect,
        watch: bool,
    ) -> impl Fn() -> Box<dyn FnMut(ScanEvent) + Send + 'a> + Sync + 'a {
        move || {
            Box::new(move |ev| {
                if let ScanEvent::Entry(e, _) = &ev
                    && e.is_dir()
                    && watch
                {
                    self.watch(e.path.as_bytes());
                }
                c.event(ev);
            })
        }
    }

    /// Takes in one event from the watcher: where to look again. Returns whether it was a
    /// flush marker (whose number is then in [`Tree::take_markers`]).
    pub fn note(&mut self, ev: notify::Result<notify::Event>) {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                crate::trace!("watch", "watcher error: {e}; rescanning");
                self.full = true;
                self.mark_time();
                return;
            }
        };
        if ev.need_rescan() {
            crate::trace!("watch", "events were lost; rescanning");
            self.full = true;
            self.mark_time();
            return;
        }
        let (listing, content, attrs) = match ev.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => (false, true, false),
            EventKind::Access(_) => return, // reads: ours or anyone's, they change nothing
            EventKind::Create(_) => (true, true, false),
            EventKind::Remove(_) => (true, false, false),
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => return, // From and To came too
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => (true, true, false),
            EventKind::Modify(ModifyKind::Name(_)) => (true, false, false),
            EventKind::Modify(ModifyKind::Metadata(_)) => (false, false, true),
            EventKind::Modify(_) => (false, true, false),
            _ => (true, true, true),
        };
        for path in &ev.paths {
            if let Ok(rest) = path.strip_prefix(&self.marker_dir) {
                if let Some(n) = rest.to_str().and_then(|s| s.parse::<u64>().ok())
                    && matches!(ev.kind, EventKind::Create(_))
                {
                    self.markers.push(n);
                }
                continue;
            }
            let Ok(rel) = path.strip_prefix(&self.root) else {
                continue;
            };
            let rel = rel.as_os_str().as_bytes();
            self.mark_time();
            // A watched directory removed or renamed away has lost its watch (the kernel's,
            // or notify's record of it): forget it, so that whatever directory is at that
            // path next (even one reusing the inode number) is watched again.
            if matches!(
                ev.kind,
                EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From))
            ) {
                lock(&self.watches)
                    .watched
                    .retain(|d| !is_at_or_under(d, rel));
            }
            if rel.is_empty() {
                // The root itself: its attributes, or it went away (looked at by `halted`).
                self.root_changed = true;
                continue;
            }
            let Ok(rp) = RelPath::new(rel.to_vec()) else {
                continue;
            };
            if is_ignore_file(rp.file_name()) || rel.ends_with(b".git/info/exclude") {
                self.ignore_changed = true;
            }
            if listing {
                self.dirty_dirs.insert(rp.parent().unwrap_or(b"").to_vec());
            }
            if content || attrs {
                self.dirty_paths.insert(rp.clone());
            }
            if content {
                self.touched.insert(rp);
            }
        }
    }

    fn mark_time(&mut self) {
        self.since.get_or_insert_with(Instant::now);
    }

    /// Whether events are waiting to be looked at.
    pub fn is_dirty(&self) -> bool {
        self.full
            || self.ignore_changed
            || !self.dirty_dirs.is_empty()
            || !self.dirty_paths.is_empty()
            || self.root_changed
    }

    /// Whether flush markers have arrived (not yet taken).
    pub fn has_markers(&self) -> bool {
        !self.markers.is_empty()
    }

    /// Flush markers whose events have arrived since the last call.
    pub fn take_markers(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.markers)
    }

    /// Creates flush marker `n`; its event arrives after every event queued before.
    pub fn make_marker(&self, n: u64) -> std::io::Result<()> {
        let p = self.marker_dir.join(n.to_string());
        std::fs::write(&p, b"")?;
        let _ = std::fs::remove_file(&p); // its creation is the event
        Ok(())
    }

    /// Asks for the directories without a watch to be read again.
    pub fn recheck_unwatched(&mut self) {
        let dirs: Vec<Vec<u8>> = lock(&self.watches).unwatched.iter().cloned().collect();
        if !dirs.is_empty() {
            self.mark_time();
        }
        self.dirty_dirs.extend(dirs);
    }

    /// The root went away or was replaced, or was emptied while `remote_has` entries.
    pub fn halted(&self, remote_has: usize) -> Option<Halt> {
        let shown = self.root.display().to_string();
        match std::fs::metadata(&self.root) {
            Err(_) => return Some(Halt::RootGone(shown)),
            Ok(md) if !md.is_dir() => return Some(Halt::RootReplaced(shown)),
            Ok(md) => {
                use std::os::unix::fs::MetadataExt;
                if (md.dev(), md.ino()) != self.root_id {
                    return Some(Halt::RootReplaced(shown));
                }
            }
        }
        (self.index.is_empty() && remote_has > 0).then_some(Halt::RootEmptied(shown))
    }

    /// Looks where the events pointed and brings the index up to date, recording what
    /// changed for the next generation.
    pub fn refresh(&mut self) -> Refreshed {
        let mut out = Refreshed::default();
        if self.ignore_changed {
            // The rules changed: a new matcher, and everything looked at again.
            match Scanner::new(&self.root, &self.opts) {
                Ok(s) => self.scanner = s,
                Err(e) => out
                    .warnings
                    .push(("".into(), format!("reloading ignore files: {e}"))),
            }
            self.full = true;
        }
        if self.full {
            out.full_rescan = true;
            self.full_rescan(&mut out);
            // The whole tree was read: nothing is left to look at.
            self.dirty_dirs.clear();
            self.dirty_paths.clear();
        } else {
            let dirs = std::mem::take(&mut self.dirty_dirs);
            for d in dirs {
                self.rescan_dir(&d, &mut out);
            }
            let paths = std::mem::take(&mut self.dirty_paths);
            self.restat_all(paths, &mut out);
            // What these found to look at next (a new entry is its parent listing's job)
            // stays for the next refresh.
        }
        self.full = false;
        self.ignore_changed = false;
        let mut w = lock(&self.watches);
        if std::mem::take(&mut w.limit_hit) {
            out.warnings.push((
                String::new(),
                format!(
                    "the inotify watch limit (fs.inotify.max_user_watches) is reached: {} \
                     directories are read again every {} s instead of watched. Raise it with \
                     `sudo sysctl fs.inotify.max_user_watches=1048576` (and in /etc/sysctl.conf)",
                    w.unwatched.len(),
                    UNWATCHED_RESCAN.as_secs()
                ),
            ));
        }
        for e in w.errors.drain(..) {
            out.warnings.push((String::new(), e));
        }
        out
    }

    /// Records a change at `p` (with its subtree when `deep`).
    fn changed(&mut self, p: &RelPath, deep: bool) {
        let e = self.pending.entry(p.clone()).or_insert(deep);
        *e |= deep;
    }

    /// Reads directory `d` again and compares its entries with the index.
    fn rescan_dir(&mut self, d: &[u8], out: &mut Refreshed) {
        let dir = if d.is_empty() {
            None
        } else {
            match RelPath::new(d.to_vec()) {
                Ok(p) if self.index.get(&p).is_some_and(|i| i.entry.is_dir()) => Some(p),
                // Gone, or not (yet) known as a directory: its own parent's listing covers it.
                _ => return,
            }
        };
        // Only this directory's entries: a listing that does not descend.
        let c = Collect::default();
        if let Err(e) = self.scanner.dir(dir.as_ref(), &self.collecting(&c, false)) {
            out.warnings
                .push((String::from_utf8_lossy(d).into_owned(), e.to_string()));
            return;
        }
        let (found, clean) = c.take(out);
        let now: BTreeMap<RelPath, (crate::engine::Entry, Ino)> = found
            .into_iter()
            .map(|(e, ino)| (e.path.clone(), (e, ino)))
            .collect();
        // What is missing from a listing that failed somewhere is not taken for deleted.
        if clean {
            let before: Vec<RelPath> = self
                .index
                .children(dir.as_ref())
                .map(|i| i.entry.path.clone())
                .collect();
            for p in before {
                if !now.contains_key(&p) {
                    self.forget(&p);
                    self.changed(&p, true);
                }
            }
        }
        for (p, (e, ino)) in now {
            self.take_in(p, e, ino, out);
        }
        // Its own mtime moved with its listing.
        if let Some(dp) = dir {
            self.restat(&dp, out);
        } else {
            self.root_changed = true;
        }
    }

    /// Compares one entry as it is now with the index.
    fn take_in(&mut self, p: RelPath, e: crate::engine::Entry, ino: Ino, out: &mut Refreshed) {
        let is_dir_now = e.is_dir();
        match self.index.get(&p) {
            Some(old)
                if old.ino == ino
                    && old.entry.is_dir() == e.is_dir()
                    && same_kind(&old.entry, &e) =>
            {
                if old.entry != e {
                    self.index.insert(e, ino);
                    self.changed(&p, false);
                }
                // The same directory, or a new one on a reused inode number: watched (a
                // no-op if its watch is still there). One that had lost its watch may have
                // gained entries unseen: notify keys watches by path, so a late event about
                // the directory deleted at this path before takes the new one's watch with
                // it. Its listing is read again, and so on down.
                if is_dir_now && self.watch(p.as_bytes()) {
                    self.rescan_dir(p.as_bytes(), out);
                }
            }
            Some(_) => {
                // Another inode or kind: what was here is gone with what it held.
                self.forget(&p);
                self.add_new(p, e, ino, out);
            }
            None => self.add_new(p, e, ino, out),
        }
    }

    /// A new entry; a directory is watched, then read with everything under it.
    fn add_new(&mut self, p: RelPath, e: crate::engine::Entry, ino: Ino, out: &mut Refreshed) {
        let is_dir = e.is_dir();
        self.index.insert(e, ino);
        self.changed(&p, true);
        if is_dir {
            self.watch(p.as_bytes());
            let c = Collect::default();
            if let Err(e) = self.scanner.subtree(&p, &self.collecting(&c, true)) {
                out.warnings.push((p.to_string(), e.to_string()));
            }
            let (found, _) = c.take(out);
            for (e, ino) in found {
                self.index.insert(e, ino);
            }
        }
    }

    /// Drops `p` and everything under it from the index (and their watches).
    fn forget(&mut self, p: &RelPath) {
        if self.index.get(p).is_some_and(|i| i.entry.is_dir()) {
            self.unwatch_subtree(p.as_bytes());
        }
        self.index.remove_subtree(p);
    }

    /// `lstat`s paths again, a directory's at a time.
    fn restat_all(&mut self, paths: BTreeSet<RelPath>, out: &mut Refreshed) {
        let mut by_dir: BTreeMap<Vec<u8>, Vec<RelPath>> = BTreeMap::new();
        for p in paths {
            by_dir
                .entry(p.parent().unwrap_or(b"").to_vec())
                .or_default()
                .push(p);
        }
        for (d, ps) in by_dir {
            let dir = (!d.is_empty()).then(|| RelPath::unchecked(d));
            let c = Collect::default();
            let names: Vec<&[u8]> = ps.iter().map(|p| p.file_name()).collect();
            if let Err(e) = self
                .scanner
                .entries(dir.as_ref(), &names, &self.collecting(&c, false))
            {
                out.warnings.push((
                    dir.map(|d| d.to_string()).unwrap_or_default(),
                    e.to_string(),
                ));
                continue;
            }
            let (found, clean) = c.take(out);
            let mut found: BTreeMap<RelPath, (crate::engine::Entry, Ino)> = found
                .into_iter()
                .map(|(e, ino)| (e.path.clone(), (e, ino)))
                .collect();
            for p in ps {
                let f = found.remove(&p);
                self.restatted(&p, f, clean, out);
            }
        }
    }

    /// `lstat`s one path again.
    fn restat(&mut self, p: &RelPath, out: &mut Refreshed) {
        let c = Collect::default();
        if let Err(e) = self.scanner.entry(p, &self.collecting(&c, false)) {
            out.warnings.push((p.to_string(), e.to_string()));
            return;
        }
        let (mut found, clean) = c.take(out);
        self.restatted(p, found.pop(), clean, out);
    }

    /// Takes in what an `lstat` of `p` found (`None`: nothing, or excluded).
    fn restatted(
        &mut self,
        p: &RelPath,
        found: Option<(crate::engine::Entry, Ino)>,
        clean: bool,
        out: &mut Refreshed,
    ) {
        match found {
            Some((e, ino)) => {
                // Only entries whose parent is known: a new one is its parent listing's job.
                let parent_known = p.parent().is_none_or(|d| {
                    RelPath::new(d.to_vec())
                        .is_ok_and(|d| self.index.get(&d).is_some_and(|i| i.entry.is_dir()))
                });
                if parent_known && self.index.get(p).is_some() {
                    self.take_in(p.clone(), e, ino, out);
                } else if parent_known {
                    self.dirty_dirs.insert(p.parent().unwrap_or(b"").to_vec());
                }
            }
            None if clean && self.index.get(p).is_some() => {
                self.forget(p);
                self.changed(p, true);
            }
            None => {}
        }
    }

    /// Reads the whole tree again (watching what is new) and compares it with the index.
    fn full_rescan(&mut self, out: &mut Refreshed) {
        let c = Collect::default();
        if let Err(e) = self.scanner.all(&self.collecting(&c, true)) {
            out.warnings
                .push((String::new(), format!("rescanning: {e}")));
            return;
        }
        let (found, clean) = c.take(out);
        self.unreadable = !clean;
        let mut now = Index::new();
        for (e, ino) in found {
            now.insert(e, ino);
        }
        if !clean {
            // Parts could not be read: what seems gone is kept until a rescan that reads all.
            out.warnings.push((
                String::new(),
                "parts of the source could not be read; deletions there wait for a rescan \
                 that can read them"
                    .into(),
            ));
            for i in self.index.iter() {
                if now.get(&i.entry.path).is_none() {
                    now.insert(i.entry.clone(), i.ino);
                }
            }
        }
        let old = std::mem::replace(&mut self.index, now);
        // Watches on directories that are no longer part of the tree go.
        let gone_dirs: Vec<Vec<u8>> = lock(&self.watches)
            .watched
            .iter()
            .filter(|d| {
                !d.is_empty()
                    && RelPath::new(d.to_vec()).map_or(true, |p| {
                        !self.index.get(&p).is_some_and(|i| i.entry.is_dir())
                    })
            })
            .cloned()
            .collect();
        let moved = !gone_dirs.is_empty();
        for d in gone_dirs {
            self.unwatch_subtree(&d);
        }
        if moved {
            // A directory that moved keeps its inotify watch under its new path, and the
            // unwatch of its old path just removed it: watch every directory again (adding
            // a watch that exists is cheap and changes nothing).
            let dirs: Vec<Vec<u8>> = self
                .index
                .iter()
                .filter(|i| i.entry.is_dir())
                .map(|i| i.entry.path.as_bytes().to_vec())
                .collect();
            for d in dirs {
                lock(&self.watches).watched.remove(&d);
                self.watch(&d);
            }
        }
        for (p, deep) in changed_between(&old, &self.index) {
            // An entry that left the index but is still there is excluded now: not a deletion.
            if !self.index.contains(&p)
                && std::fs::symlink_metadata(self.abs(p.as_bytes())).is_ok()
                && old.get(&p).is_some()
            {
                out.excluded_now.push(p);
                continue;
            }
            self.changed(&p, deep);
        }
        self.root_changed = true;
    }

    /// Takes what changed since the last call: the scope (paths, with subtrees), the files
    /// written, whether the root's own attributes may have changed, and when the oldest of it
    /// was noticed. Nothing to send if the scope is empty and the root is unchanged.
    pub fn take_changes(&mut self) -> Changes {
        let touched: HashSet<RelPath> = std::mem::take(&mut self.touched)
            .into_iter()
            .filter(|p| {
                self.index
                    .get(p)
                    .is_some_and(|i| matches!(i.entry.kind, crate::engine::EntryKind::File { .. }))
            })
            .collect();
        for p in &touched {
            self.changed(&p.clone(), false);
        }
        Changes {
            scope: std::mem::take(&mut self.pending).into_iter().collect(),
            touched,
            root: std::mem::take(&mut self.root_changed),
            since: self.since.take(),
        }
    }

    /// Puts changes back (their generation did not complete).
    pub fn restore(&mut self, c: Changes) {
        for (p, deep) in c.scope {
            self.changed(&p, deep);
        }
        self.touched.extend(c.touched);
        self.root_changed |= c.root;
        if let Some(t) = c.since {
            self.since = Some(self.since.map_or(t, |s| s.min(t)));
        }
    }

    /// Marks paths to be sent again in full (the remote did not have what we expected).
    pub fn resend(&mut self, paths: &[RelPath]) {
        for p in paths {
            self.changed(p, true);
        }
        if !paths.is_empty() {
            self.mark_time();
        }
    }
}

/// What changed locally since the last generation.
#[derive(Debug, Default)]
pub struct Changes {
    pub scope: Vec<(RelPath, bool)>,
    pub touched: HashSet<RelPath>,
    pub root: bool,
    pub since: Option<Instant>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.scope.is_empty() && !self.root
    }
}

fn same_kind(a: &crate::engine::Entry, b: &crate::engine::Entry) -> bool {
    std::mem::discriminant(&a.kind) == std::mem::discriminant(&b.kind)
}

fn is_at_or_under(d: &[u8], rel: &[u8]) -> bool {
    rel.is_empty() || d == rel || (d.starts_with(rel) && d.get(rel.len()) == Some(&b'/'))
}

/// The paths that differ between two views of a tree: `true` where the subtree may differ
/// too (appeared, vanished, other inode or kind).
pub fn changed_between(old: &Index, new: &Index) -> Vec<(RelPath, bool)> {
    let mut out = Vec::new();
    let mut a = old.iter().peekable();
    let mut b = new.iter().peekable();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(o), None) => {
                out.push((o.entry.path.clone(), true));
                a.next();
            }
            (None, Some(n)) => {
                out.push((n.entry.path.clone(), true));
                b.next();
            }
            (Some(o), Some(n)) => match o.entry.path.cmp(&n.entry.path) {
                std::cmp::Ordering::Less => {
                    out.push((o.entry.path.clone(), true));
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push((n.entry.path.clone(), true));
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if o.ino != n.ino || !same_kind(&o.entry, &n.entry) {
                        out.push((n.entry.path.clone(), true));
                    } else if o.entry != n.entry {
                        out.push((n.entry.path.clone(), false));
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// What a fresh scan finds: path → (entry, inode).
    fn fresh(root: &Path, opts: &ScanOptions) -> Vec<(crate::engine::Entry, Ino)> {
        let sc = Scanner::new(root, opts).unwrap();
        let c = Collect::default();
        sc.all(&|| {
            let c = &c;
            move |ev| c.event(ev)
        })
        .unwrap();
        let (mut v, clean) = c.take(&mut Refreshed::default());
        assert!(clean);
        v.sort_by(|a, b| a.0.path.cmp(&b.0.path));
        v
    }

    fn held(t: &Tree) -> Vec<(crate::engine::Entry, Ino)> {
        t.index().iter().map(|i| (i.entry.clone(), i.ino)).collect()
    }

    /// Feeds the tree its events until none has come for a while.
    fn settle(
        t: &mut Tree,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    ) {
        let mut quiet_since = Instant::now();
        let t0 = Instant::now();
        while quiet_since.elapsed() < Duration::from_millis(40) {
            assert!(t0.elapsed() < Duration::from_secs(10), "events never stop");
            match rx.try_recv() {
                Ok(ev) => {
                    t.note(ev);
                    quiet_since = Instant::now();
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }

    #[test]
    fn seeded_random_operations_keep_the_index_equal_to_a_fresh_scan() {
        let td = tempfile::tempdir().unwrap();
        let root = td.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join(".gitignore"), "*.ign\nskipdir/\n").unwrap();
        let opts = ScanOptions {
            threads: 2,
            ..ScanOptions::default()
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut t = Tree::start(&root, &opts, td.path().join("markers"), tx).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let names = ["a", "b", "c", "d.ign", "skipdir", "e"];
        let mut all_changed = 0;
        for round in 0..60 {
            for _ in 0..rng.random_range(1..12) {
                // A random existing directory (walked from the root) and a name in it.
                let mut dir = root.clone();
                for _ in 0..rng.random_range(0..3) {
                    let sub: Vec<PathBuf> = std::fs::read_dir(&dir)
                        .unwrap()
                        .filter_map(|e| e.ok())
                        .filter(|e| e.file_type().is_ok_and(|f| f.is_dir()))
                        .map(|e| e.path())
                        .collect();
                    if sub.is_empty() {
                        break;
                    }
                    dir = sub[rng.random_range(0..sub.len())].clone();
                }
                let p = dir.join(names[rng.random_range(0..names.len())]);
                let q = root.join(names[rng.random_range(0..names.len())]);
                let is_dir = p.symlink_metadata().is_ok_and(|m| m.is_dir());
                let _ = match rng.random_range(0..8) {
                    0 => std::fs::write(&p, vec![b'x'; rng.random_range(0..100)]),
                    1 => std::fs::create_dir(&p),
                    2 if is_dir => std::fs::remove_dir_all(&p),
                    2 => std::fs::remove_file(&p),
                    3 => std::fs::rename(&p, &q),
                    4 => std::os::unix::fs::symlink("target", &p),
                    5 => std::fs::set_permissions(
                        &p,
                        std::os::unix::fs::PermissionsExt::from_mode(0o700),
                    ),
                    6 => {
                        // An atomic save over whatever file is there.
                        let tmp = dir.join(".tmp-save");
                        std::fs::write(&tmp, b"saved").and_then(|()| std::fs::rename(&tmp, &p))
                    }
                    _ => std::fs::create_dir_all(p.join("x/y"))
                        .and_then(|()| std::fs::write(p.join("x/y/z"), b"deep")),
                }; // many operations fail on what is there: fine, that is the point
            }
            settle(&mut t, &mut rx);
            let r = t.refresh();
            assert!(
                r.excluded_now.is_empty(),
                "round {round}: {:?}",
                r.excluded_now
            );
            let ch = t.take_changes();
            all_changed += ch.scope.len();
            assert_eq!(held(&t), fresh(&root, &opts), "round {round}");
        }
        assert!(
            all_changed > 100,
            "the rounds changed little: {all_changed}"
        );
        // An edited ignore file: a whole rescan, newly excluded paths reported as such.
        std::fs::write(root.join("keepme"), b"k").unwrap();
        settle(&mut t, &mut rx);
        t.refresh();
        std::fs::write(root.join(".gitignore"), "*.ign\nskipdir/\nkeepme\n").unwrap();
        settle(&mut t, &mut rx);
        let r = t.refresh();
        assert!(r.full_rescan);
        assert_eq!(r.excluded_now, vec![RelPath::new("keepme").unwrap()]);
        let fresh_opts = fresh(&root, &opts);
        assert_eq!(held(&t), fresh_opts);
    }

    #[test]
    fn a_directory_that_lost_its_watch_is_read_again_when_watched_anew() {
        // notify keys its watches by path: a late event about a directory deleted at a path
        // drops the watch of the one made there since, and what is created in that one goes
        // unseen. The state that leaves (no watch, none recorded) is made here directly.
        let td = tempfile::tempdir().unwrap();
        let root = td.path().join("root");
        std::fs::create_dir_all(root.join("d/sub")).unwrap();
        std::fs::write(root.join("d/a"), b"a").unwrap();
        let opts = ScanOptions::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut t = Tree::start(&root, &opts, td.path().join("markers"), tx).unwrap();
        settle(&mut t, &mut rx);
        t.refresh();
        t.take_changes();
        t.unwatch_subtree(b"d");
        std::fs::write(root.join("d/new.rs"), b"unseen").unwrap();
        std::fs::write(root.join("d/sub/deeper.rs"), b"unseen too").unwrap();
        // Anything that has the root listed again finds d watchless and reads it.
        std::fs::write(root.join("top"), b"t").unwrap();
        settle(&mut t, &mut rx);
        t.refresh();
        assert_eq!(held(&t), fresh(&root, &opts));
        let scope: Vec<String> = t
            .take_changes()
            .scope
            .iter()
            .map(|(p, _)| p.to_string())
            .collect();
        for p in ["d/new.rs", "d/sub/deeper.rs", "top"] {
            assert!(scope.iter().any(|s| s == p), "{p} not in {scope:?}");
        }
        // And d is watched again: the next file there is an event.
        std::fs::write(root.join("d/later.rs"), b"seen").unwrap();
        settle(&mut t, &mut rx);
        assert!(t.is_dirty());
    }
}
