//! Planning: each entry of the sender's list against the local tree, in list order.

use std::collections::HashSet;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};

use super::*;
use crate::engine::plan::{self, FileAction};

impl Ctx {
    pub(super) fn planner(self: Arc<Self>, rx: mpsc::Receiver<PlanItem>) {
        let mut dirs_seen: HashSet<Vec<u8>> = HashSet::new();
        // The parent of the previous entry, known to be listed: siblings arrive together.
        let mut last_parent: Vec<u8> = Vec::new();
        let mut planned: u64 = 0;
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
                PlanItem::Entries(first_id, entries) => {
                    // Entries first: the id range is only advanced for real entries, so it
                    // cannot step past the last id the read loop accepted.
                    for (entry, id) in entries.into_iter().zip(first_id..) {
                        if let Some(parent) = entry.path.parent()
                            && parent != last_parent.as_slice()
                        {
                            if !dirs_seen.contains(parent) {
                                return self.fail(SessionError::Violation(format!(
                                    "{}: listed before its parent directory (or inside a \
                                     non-directory)",
                                    entry.path
                                )));
                            }
                            last_parent.clear();
                            last_parent.extend_from_slice(parent);
                        }
                        if entry.is_dir() {
                            dirs_seen.insert(entry.path.as_bytes().to_vec());
                        }
                        if self.opts.delete {
                            lock(&self.sender_paths).insert(entry.path.clone());
                        }
                        planned += 1;
                        self.plan_entry(id, entry);
                    }
                }
                PlanItem::End { count, scan_errors } => {
                    // The read loop checked that batches are consecutive from id 0.
                    if u64::from(count) != planned {
                        return self.fail(SessionError::Violation(format!(
                            "list ended with count {count}, but {planned} entries arrived"
                        )));
                    }
                    crate::trace!("recv", "all {count} entries planned");
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

    pub(super) fn plan_entry(self: &Arc<Self>, id: FileId, entry: Entry) {
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
        let local = match self.lstat(&entry.path) {
            Ok(l) => l,
            Err(e) => return self.dest_error(&entry.path, e),
        };
        let r = match &entry.kind {
            EntryKind::Dir => self.plan_dir(&entry, local),
            EntryKind::Symlink { target } => self.plan_symlink(&entry, target, local),
            EntryKind::File { size, digest } => {
                if let Err(e) = self.clear_dir_in_the_way(&entry, local.as_ref()) {
                    return self.dest_error(&entry.path, e);
                }
                let local = local.filter(|l| l.kind == LocalKind::File);
                match (digest, local) {
                    (Some(_), Some(l)) if l.size == *size => {
                        // --checksum: hash our copy off the planner thread.
                        lock(&self.track).outstanding += 1;
                        let c = self.clone();
                        let entry = entry.clone();
                        self.pool.spawn(move || {
                            let ours = c.dest.as_ref().map(|d| {
                                d.open_file(&entry.path)
                                    .map_err(|e| e.to_string())
                                    .and_then(|f| {
                                        hash::file_digest(&f, l.size).map_err(|e| e.to_string())
                                    })
                            });
                            match ours {
                                Some(Err(e)) => {
                                    c.error(&entry.path, format!("reading for --checksum: {e}"))
                                }
                                Some(Ok(d)) => c.plan_file(id, &entry, Some(l), Some(&d), false),
                                None => c.plan_file(id, &entry, Some(l), None, false),
                            }
                            c.release();
                        });
                        Ok(())
                    }
                    _ => {
                        self.plan_file(id, &entry, local, None, true);
                        Ok(())
                    }
                }
            }
        };
        if let Err(e) = r {
            self.dest_error(&entry.path, e);
        }
    }

    /// A directory where the sender has a file or symlink goes only with `--delete`.
    pub(super) fn clear_dir_in_the_way(
        &self,
        entry: &Entry,
        local: Option<&LocalMeta>,
    ) -> Result<(), DestError> {
        if local.map(|l| l.kind) != Some(LocalKind::Dir) {
            return Ok(());
        }
        if !self.opts.delete {
            return Err(DestError::Io {
                path: entry.path.to_string(),
                op: "replacing a directory",
                source: io::Error::other(format!(
                    "the receiving side has a directory where the source has a {}; pass --delete to replace it",
                    if entry.is_dir() {
                        "directory"
                    } else {
                        "file or symlink"
                    }
                )),
            });
        }
        self.report(&entry.path, ItemKind::Dir, ChangeOp::Deleted);
        match &self.dest {
            Some(d) if !self.opts.dry_run => d.remove_tree(&entry.path),
            _ => Ok(()),
        }
    }

    pub(super) fn plan_dir(
        &self,
        entry: &Entry,
        local: Option<LocalMeta>,
    ) -> Result<(), DestError> {
        let key = entry.path.as_bytes().to_vec();
        lock(&self.dirs)
            .wanted
            .insert(key.clone(), (entry.mode, entry.mtime));
        let dry = self.opts.dry_run;
        match local {
            Some(l) if l.kind == LocalKind::Dir => {
                let perms = l.mode != entry.mode;
                if perms {
                    self.report(
                        &entry.path,
                        ItemKind::Dir,
                        ChangeOp::Updated {
                            content: false,
                            size: false,
                            time: l.mtime != entry.mtime,
                            perms,
                        },
                    );
                    lock(&self.stats).metadata_only += 1;
                }
                if perms || l.mtime != entry.mtime {
                    lock(&self.dirs).fix.insert(key);
                }
                // Keep it writable for us while we fill it; the final mode comes at the end.
                if let (Some(d), false) = (&self.dest, dry)
                    && l.mode & 0o700 != 0o700
                {
                    d.set_dir_meta(&entry.path, Some(l.mode | 0o700), None)?;
                    lock(&self.dirs).fix.insert(entry.path.as_bytes().to_vec());
                }
                return Ok(());
            }
            Some(_) => {
                // A file, symlink or special file where the sender has a directory.
                if let (Some(d), false) = (&self.dest, dry) {
                    d.remove(&entry.path, false)?;
                }
            }
            None => {}
        }
        if let (Some(d), false) = (&self.dest, dry) {
            d.mkdir(&entry.path)?;
        }
        self.report(&entry.path, ItemKind::Dir, ChangeOp::Created);
        lock(&self.stats).created += 1;
        lock(&self.dirs).fix.insert(key);
        self.touched(&entry.path);
        Ok(())
    }

    pub(super) fn plan_symlink(
        &self,
        entry: &Entry,
        target: &[u8],
        local: Option<LocalMeta>,
    ) -> Result<(), DestError> {
        self.clear_dir_in_the_way(entry, local.as_ref())?;
        let existing = match (&self.dest, local) {
            (Some(d), Some(l)) if l.kind == LocalKind::Symlink => Some(d.read_link(&entry.path)?),
            _ => None,
        };
        if existing.as_deref() == Some(target) {
            return Ok(());
        }
        if let (Some(d), false) = (&self.dest, self.opts.dry_run) {
            if local.is_some()
                && let Err(e) = d.sweep(entry.path.parent().unwrap_or(b""))
            {
                self.warn(
                    &entry.path,
                    format!("cleaning up leftovers: {}", e.detail()),
                );
            }
            d.symlink(&entry.path, target, entry.mtime)?;
        }
        let op = match local {
            Some(l) if l.kind == LocalKind::Symlink => ChangeOp::Updated {
                content: true,
                size: false,
                time: false,
                perms: false,
            },
            _ => ChangeOp::Created,
        };
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
        local_digest: Option<&Digest>,
        batched: bool,
    ) {
        let EntryKind::File { size, digest } = &entry.kind else {
            return;
        };
        let action = plan::file_action(
            *size,
            entry.mode,
            entry.mtime,
            digest.as_ref(),
            local.as_ref(),
            local_digest,
        );
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
