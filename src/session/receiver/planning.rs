//! Planning: each entry of the sender's list against the local tree, in list order.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};

use super::*;
use crate::engine::dest::Renamed;
use crate::engine::plan::{self, Decision, FileAction};

/// What the planner knows while it works through one generation's list.
#[derive(Default)]
struct Walk {
    /// Directories listed so far.
    dirs_seen: HashSet<Vec<u8>>,
    /// Directories found on our side (generations that list only changes).
    dirs_here: HashSet<Vec<u8>>,
    /// The parent of the previous entry, known to be fine: siblings arrive together.
    last_parent: Vec<u8>,
    planned: u64,
    /// Parking names whose entry did not get parked.
    unparked: HashSet<RelPath>,
    /// Each parking name's source, when that is a real path (not inside another parked entry).
    parked: HashMap<RelPath, Option<RelPath>>,
    /// The real paths this generation's renames involve.
    moved: Vec<RelPath>,
    /// Some rename failed.
    rename_failed: bool,
}

impl Ctx {
    pub(super) fn planner(self: Arc<Self>, rx: mpsc::Receiver<PlanItem>) {
        let mut w = Walk::default();
        loop {
            // Requests go out in batches, and whenever the list pauses.
            let item = match rx.try_recv() {
                Ok(item) => item,
                Err(mpsc::TryRecvError::Empty) => {
                    self.flush_needs();
                    match rx.recv() {
                        Ok(item) => item,
                        Err(_) => return,
                    }
                }
                Err(mpsc::TryRecvError::Disconnected) => return,
            };
            match item {
                PlanItem::Stash(moves) => {
                    for (from, park) in moves {
                        self.stash(&mut w, &from, park);
                    }
                }
                PlanItem::Place(moves) => {
                    for (park, to) in moves {
                        self.place(&mut w, &park, to);
                    }
                }
                PlanItem::Entries(first_id, entries, changed) => {
                    // Entries first: the id range is only advanced for real entries, so it
                    // cannot step past the last id the read loop accepted.
                    for (entry, id) in entries.into_iter().zip(first_id..) {
                        if let Some(parent) = entry.path.parent()
                            && parent != w.last_parent.as_slice()
                        {
                            if !self.parent_ok(&mut w, parent) {
                                if self.whole {
                                    return self.fail(SessionError::Violation(format!(
                                        "{}: listed before its parent directory (or inside a \
                                         non-directory)",
                                        entry.path
                                    )));
                                }
                                w.planned += 1;
                                continue;
                            }
                            w.last_parent.clear();
                            w.last_parent.extend_from_slice(parent);
                        }
                        if entry.is_dir() {
                            w.dirs_seen.insert(entry.path.as_bytes().to_vec());
                        }
                        if self.keeps_sender_paths() {
                            lock(&self.sender_paths).insert(entry.path.clone());
                        }
                        w.planned += 1;
                        self.plan_entry(id, entry, changed);
                    }
                }
                PlanItem::End { count, scan_errors } => {
                    // The read loop checked that batches are consecutive from id 0.
                    if u64::from(count) != w.planned {
                        return self.fail(SessionError::Violation(format!(
                            "list ended with count {count}, but {} entries arrived",
                            w.planned
                        )));
                    }
                    crate::trace!("recv", "all {count} entries planned");
                    if w.rename_failed {
                        // Where anything of this generation's renames is now is uncertain:
                        // the sender sends those places again in full.
                        lock(&self.unsynced).extend(w.moved.drain(..));
                    }
                    self.flush_needs();
                    let (files, bytes) = *lock(&self.planned);
                    self.obs.event(Event::Planned { files, bytes });
                    self.sender_count.store(count, Ordering::Relaxed);
                    self.sender_scan_errors
                        .store(scan_errors, Ordering::Relaxed);
                    lock(&self.track).list_done = true;
                    self.maybe_finish();
                    return;
                }
            }
        }
    }

    fn keeps_sender_paths(&self) -> bool {
        let sc = lock(&self.scopes);
        sc.0 || !sc.1.is_empty()
    }

    /// Whether an entry in directory `parent` can be planned: the directory was listed
    /// before, or (in a generation of changes) is already here. Otherwise the outermost
    /// missing piece is reported as unsynced.
    fn parent_ok(&self, w: &mut Walk, parent: &[u8]) -> bool {
        if w.dirs_seen.contains(parent) || w.dirs_here.contains(parent) {
            return true;
        }
        if self.whole {
            return false;
        }
        let Some(d) = &self.dest else {
            return true; // a dry run into nothing: nothing to check against
        };
        let Ok(p) = RelPath::new(parent.to_vec()) else {
            return false;
        };
        if let Ok(Some(m)) = d.lstat(&p)
            && m.kind == LocalKind::Dir
        {
            w.dirs_here.insert(parent.to_vec());
            lock(&self.dirs)
                .original
                .entry(parent.to_vec())
                .or_insert(m.mtime);
            return true;
        }
        let missing = crate::engine::index::ancestors(&p)
            .chain(std::iter::once(p.clone()))
            .find(|a| {
                !w.dirs_seen.contains(a.as_bytes())
                    && !matches!(d.lstat(a), Ok(Some(m)) if m.kind == LocalKind::Dir)
            })
            .unwrap_or_else(|| p.clone());
        let mut u = lock(&self.unsynced);
        if !u.contains(&missing) {
            crate::trace!("recv", "{missing} is missing here; asking for it again");
            u.push(missing);
        }
        false
    }

    /// Parks `from` under the parking name `park`.
    fn stash(&self, w: &mut Walk, from: &RelPath, park: RelPath) {
        let real = !from
            .as_bytes()
            .starts_with(crate::engine::tempname::MOVE_PREFIX);
        w.parked.insert(park.clone(), real.then(|| from.clone()));
        let (Some(d), false) = (&self.dest, self.opts.dry_run) else {
            return;
        };
        match d.rename(from, &park) {
            Ok(Renamed::Yes) => {
                self.touched(from);
            }
            Ok(r) => {
                crate::trace!("recv", "parking {from}: {r:?}");
                w.rename_failed = true;
                w.unparked.insert(park);
            }
            Err(e) => {
                w.rename_failed = true;
                w.unparked.insert(park);
                self.dest_error(from, e);
            }
        }
    }

    /// Puts what was parked under `park` at `to`.
    fn place(&self, w: &mut Walk, park: &RelPath, to: RelPath) {
        if let Some(Some(from)) = w.parked.get(park) {
            w.moved.push(from.clone());
        }
        w.moved.push(to.clone());
        let (Some(d), false) = (&self.dest, self.opts.dry_run) else {
            lock(&self.stats).renamed += 1;
            return;
        };
        if w.unparked.contains(park) {
            return;
        }
        match d.place(park, &to) {
            Ok(Renamed::Yes) => {
                lock(&self.stats).renamed += 1;
                self.touched(&to);
            }
            Ok(r) => {
                crate::trace!("recv", "placing {to}: {r:?}");
                w.rename_failed = true;
            }
            Err(e) => {
                w.rename_failed = true;
                self.dest_error(&to, e);
            }
        }
    }

    pub(super) fn report(&self, path: &RelPath, kind: ItemKind, op: ChangeOp) {
        self.obs.event(Event::Change(Change {
            path: path.clone(),
            kind,
            op,
        }));
    }

    pub(super) fn error(&self, path: impl std::fmt::Display, message: impl ToString) {
        lock(&self.stats).errors += 1;
        self.obs.event(Event::Error {
            path: path.to_string(),
            message: message.to_string(),
        });
    }

    /// Removes what killed sessions left in directory `dir` (`Dest::sweep`); a failure is a
    /// warning about `shown`, never the end of the sync.
    pub(super) fn sweep_leftovers(&self, d: &Dest, dir: &[u8], shown: impl std::fmt::Display) {
        if let Err(e) = d.sweep(dir) {
            self.warn(shown, format!("cleaning up leftovers: {}", e.detail()));
        }
    }

    pub(super) fn warn(&self, path: impl std::fmt::Display, message: impl ToString) {
        lock(&self.stats).warnings += 1;
        self.obs.event(Event::Warning {
            path: path.to_string(),
            message: message.to_string(),
        });
    }

    /// Reports a destination error; a full disk ends the whole sync.
    pub(super) fn dest_error(&self, path: &RelPath, e: DestError) {
        if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
            self.fail(SessionError::Local(format!(
                "no space left on the receiving side (while writing {path}); files already \
                 replaced are complete, nothing is half-written. Free some space and run again."
            )));
        }
        // The event names the path; the message is what went wrong there.
        self.error(path, e.detail());
    }

    pub(super) fn touched(&self, path: &RelPath) {
        let parent = path.parent().unwrap_or(b"");
        if !parent.is_empty() {
            lock(&self.dirs).fix.insert(parent.to_vec());
        }
    }

    pub(super) fn lstat(&self, path: &RelPath) -> Result<Option<LocalMeta>, DestError> {
        match &self.dest {
            Some(d) => d.lstat(path),
            None => Ok(None),
        }
    }

    pub(super) fn plan_entry(self: &Arc<Self>, id: FileId, entry: Entry, changed: bool) {
        {
            let mut s = lock(&self.stats);
            match entry.kind {
                EntryKind::File { size, .. } => {
                    s.files += 1;
                    s.total_size += size;
                }
                EntryKind::Dir => s.dirs += 1,
                EntryKind::Symlink { .. } => s.symlinks += 1,
            }
        }
        let meta = match self.lstat(&entry.path) {
            Ok(l) => l,
            Err(e) => return self.dest_error(&entry.path, e),
        };
        let link = match (&self.dest, meta) {
            (Some(d), Some(l))
                if l.kind == LocalKind::Symlink
                    && matches!(entry.kind, EntryKind::Symlink { .. }) =>
            {
                match d.read_link(&entry.path) {
                    Ok(t) => Some(t),
                    Err(e) => return self.dest_error(&entry.path, e),
                }
            }
            _ => None,
        };
        let rules = plan::Rules {
            replace_dirs: self.replace_dirs || self.opts.delete,
            changed,
        };
        let local = plan::Local {
            meta,
            link: link.as_deref(),
            digest: None,
        };
        let decision = plan::decide(&entry, &local, rules);
        if decision != Decision::HashFirst {
            return self.carry_out(id, &entry, meta, decision, true);
        }
        // --checksum: hash our copy off the planner thread, then decide with its digest.
        lock(&self.track).outstanding += 1;
        let c = self.clone();
        self.pool.spawn(move || {
            let ours = c.dest.as_ref().map(|d| {
                d.open_file(&entry.path)
                    .map_err(|e| e.to_string())
                    .and_then(|f| {
                        hash::file_digest(&f, meta.map_or(0, |m| m.size)).map_err(|e| e.to_string())
                    })
            });
            match ours {
                Some(Err(e)) => c.error(&entry.path, format!("reading for --checksum: {e}")),
                Some(Ok(digest)) => {
                    let local = plan::Local {
                        meta,
                        link: None,
                        digest: Some(&digest),
                    };
                    let decision = plan::decide(&entry, &local, rules);
                    c.carry_out(id, &entry, meta, decision, false);
                }
                None => c.carry_out(
                    id,
                    &entry,
                    meta,
                    Decision::File {
                        clear_dir: false,
                        action: FileAction::Transfer { basis: false },
                    },
                    false,
                ),
            }
            c.release();
        });
    }

    /// Does what [`plan::decide`] decided for `entry` (`local`: what `lstat` found there).
    fn carry_out(
        self: &Arc<Self>,
        id: FileId,
        entry: &Entry,
        local: Option<LocalMeta>,
        decision: Decision,
        batched: bool,
    ) {
        let r = match decision {
            Decision::RefuseDir => Err(DestError::Io {
                path: entry.path.to_string(),
                op: "replacing a directory",
                source: io::Error::other(
                    "the receiving side has a directory where the source has a file or \
                     symlink; pass --delete to replace it",
                ),
            }),
            Decision::MakeDir { clear } => self.make_dir(entry, clear),
            Decision::FixDir { perms, time } => self.fix_dir(entry, local, perms, time),
            Decision::Link { clear_dir, op } => self
                .clear_dir(entry, clear_dir)
                .and_then(|()| self.make_link(entry, local, op)),
            Decision::LinkUpToDate => Ok(()),
            Decision::HashFirst => Ok(()), // decided again once hashed
            Decision::File { clear_dir, action } => self.clear_dir(entry, clear_dir).map(|()| {
                let local = local.filter(|l| l.kind == LocalKind::File);
                self.plan_file(id, entry, local, action, batched)
            }),
        };
        if let Err(e) = r {
            self.dest_error(&entry.path, e);
        }
    }

    /// Removes the directory where the sender has a file or symlink.
    fn clear_dir(&self, entry: &Entry, clear: bool) -> Result<(), DestError> {
        if !clear {
            return Ok(());
        }
        self.report(&entry.path, ItemKind::Dir, ChangeOp::Deleted);
        match &self.dest {
            Some(d) if !self.opts.dry_run => d.remove_tree(&entry.path),
            _ => Ok(()),
        }
    }

    fn make_dir(&self, entry: &Entry, clear: bool) -> Result<(), DestError> {
        let key = entry.path.as_bytes().to_vec();
        lock(&self.dirs)
            .wanted
            .insert(key.clone(), (entry.mode, entry.mtime));
        if let (Some(d), false) = (&self.dest, self.opts.dry_run) {
            if clear {
                // A file, symlink or special file where the sender has a directory.
                d.remove(&entry.path, false)?;
            }
            d.mkdir(&entry.path)?;
        }
        self.report(&entry.path, ItemKind::Dir, ChangeOp::Created);
        lock(&self.stats).created += 1;
        lock(&self.dirs).fix.insert(key);
        self.touched(&entry.path);
        Ok(())
    }

    fn fix_dir(
        &self,
        entry: &Entry,
        local: Option<LocalMeta>,
        perms: bool,
        time: bool,
    ) -> Result<(), DestError> {
        let key = entry.path.as_bytes().to_vec();
        lock(&self.dirs)
            .wanted
            .insert(key.clone(), (entry.mode, entry.mtime));
        if perms {
            self.report(
                &entry.path,
                ItemKind::Dir,
                ChangeOp::Updated {
                    content: false,
                    size: false,
                    time,
                    perms,
                },
            );
            lock(&self.stats).metadata_only += 1;
        }
        if perms || time {
            lock(&self.dirs).fix.insert(key);
        }
        // Every sync ends by mirroring directory mtimes, so an existing directory whose mtime
        // is off was written to since: perhaps by a session killed while a temp file of its
        // stood there. Sweeping it here cleans that up even if nothing in it is replaced now.
        if time
            && !self.opts.dry_run
            && let Some(d) = &self.dest
        {
            self.sweep_leftovers(d, entry.path.as_bytes(), &entry.path);
        }
        // Keep it writable for us while we fill it; the final mode comes at the end.
        if let (Some(d), false, Some(l)) = (&self.dest, self.opts.dry_run, local)
            && l.mode & 0o700 != 0o700
        {
            d.set_dir_meta(&entry.path, Some(l.mode | 0o700), None)?;
            lock(&self.dirs).fix.insert(entry.path.as_bytes().to_vec());
        }
        Ok(())
    }

    fn make_link(
        &self,
        entry: &Entry,
        local: Option<LocalMeta>,
        op: ChangeOp,
    ) -> Result<(), DestError> {
        let EntryKind::Symlink { target } = &entry.kind else {
            return Ok(());
        };
        if let (Some(d), false) = (&self.dest, self.opts.dry_run) {
            if local.is_some() {
                self.sweep_leftovers(d, entry.path.parent().unwrap_or(b""), &entry.path);
            }
            d.symlink(&entry.path, target, entry.mtime)?;
        }
        self.count_change(op);
        self.report(&entry.path, ItemKind::Symlink, op);
        self.touched(&entry.path);
        Ok(())
    }

    pub(super) fn count_change(&self, op: ChangeOp) {
        let mut s = lock(&self.stats);
        match op {
            ChangeOp::Created => s.created += 1,
            _ => s.updated += 1,
        }
    }

    pub(super) fn plan_file(
        self: &Arc<Self>,
        id: FileId,
        entry: &Entry,
        local: Option<LocalMeta>,
        action: FileAction,
        batched: bool,
    ) {
        let EntryKind::File { size, digest } = &entry.kind else {
            return;
        };
        match action {
            FileAction::UpToDate => {}
            FileAction::Metadata { perms, time } => {
                if let (Some(d), false) = (&self.dest, self.opts.dry_run)
                    && let Err(e) =
                        d.set_file_meta(&entry.path, Some(entry.mode), Some(entry.mtime))
                {
                    return self.dest_error(&entry.path, e);
                }
                lock(&self.stats).metadata_only += 1;
                let op = ChangeOp::Updated {
                    content: false,
                    size: false,
                    time,
                    perms,
                };
                self.report(&entry.path, ItemKind::File, op);
            }
            FileAction::Transfer { basis } => {
                if self.opts.dry_run {
                    let op = self.file_op(
                        local.as_ref(),
                        *size,
                        entry.mode,
                        entry.mtime,
                        digest.is_some(),
                    );
                    self.count_change(op);
                    return self.report(&entry.path, ItemKind::File, op);
                }
                let inc = Arc::new(Incoming {
                    path: entry.path.clone(),
                    size: *size,
                    before: local,
                    basis,
                    st: Mutex::new(Assembly::default()),
                    write: Mutex::new(()),
                });
                // In `files` before it is counted: safe, as nothing can finish the list (and
                // so see the count at zero) but this planner thread, which counts it next.
                if lock(&self.files).insert(id, inc.clone()).is_some() {
                    return self.fail(SessionError::Violation(format!("file id {id} reused")));
                }
                lock(&self.track).outstanding += 1;
                self.obs.planned(*size);
                {
                    let mut p = lock(&self.planned);
                    p.0 += 1;
                    p.1 += *size;
                }
                self.request(id, &inc, batched);
            }
        }
    }

    pub(super) fn file_op(
        &self,
        before: Option<&LocalMeta>,
        size: u64,
        mode: u32,
        mtime: Mtime,
        content_known: bool,
    ) -> ChangeOp {
        match before.filter(|l| l.kind == LocalKind::File) {
            None => ChangeOp::Created,
            Some(l) => ChangeOp::Updated {
                content: content_known || !self.opts.dry_run,
                size: l.size != size,
                time: l.mtime != mtime,
                perms: l.mode != mode,
            },
        }
    }
}

impl Ctx {
    /// Asks for file `id` whole: queued with others when called from the planner (which
    /// flushes whenever its input pauses), at once otherwise.
    pub(super) fn need_whole(&self, id: FileId, inc: &Incoming, batched: bool) {
        // Recorded before the request can leave, so the answer always finds it.
        lock(&inc.st).asked = Some(Ask::Whole);
        if !batched {
            let _ = self.out.send(Msg::NeedWhole { ids: vec![id] }); // writer gone: loop sees it
            return;
        }
        let full = {
            let mut needs = lock(&self.needs);
            needs.push(id);
            needs.len() >= NEED_BATCH
        };
        if full {
            self.flush_needs();
        }
    }

    pub(super) fn flush_needs(&self) {
        let ids = std::mem::take(&mut *lock(&self.needs));
        if !ids.is_empty() {
            let _ = self.out.send(Msg::NeedWhole { ids }); // writer gone: loop sees it
        }
    }
}

/// Whole-file requests per message.
const NEED_BATCH: usize = 512;
