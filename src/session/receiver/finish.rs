//! The end of a sync: guarded deletions, directory metadata, the totals.

use std::sync::atomic::Ordering;

use super::*;
use crate::engine::plan::{self};

impl Ctx {
    pub(super) fn maybe_finish(&self) {
        let go = {
            let mut t = lock(&self.track);
            let go = t.list_done && t.outstanding == 0 && !t.finished;
            t.finished |= go;
            go
        };
        // Every file asked for is in `files` and counted in `outstanding` until it completes
        // once; if the two disagree, `Done` would go out while a file is still in flight.
        if go && !lock(&self.files).is_empty() {
            return self.fail(SessionError::Internal(
                "all transfers counted done while a file is still in flight",
            ));
        }
        if go {
            self.finish();
        }
    }

    pub(super) fn finish(&self) {
        crate::trace!("recv", "all transfers done");
        let (root, paths) = std::mem::take(&mut *lock(&self.scopes));
        if root {
            self.delete_extraneous();
        }
        if !paths.is_empty() {
            self.delete_in_scopes(&paths);
        }
        if !self.opts.dry_run {
            self.fix_dirs();
        }
        let stats = lock(&self.stats).clone();
        let mut unsynced = std::mem::take(&mut *lock(&self.unsynced));
        unsynced.sort();
        unsynced.dedup();
        let overflow = unsynced.len() > crate::proto::msg::MAX_BATCH;
        unsynced.truncate(crate::proto::msg::MAX_BATCH);
        *lock(&self.done) = Some(stats.clone());
        let _ = self.out.send(Msg::Done {
            stats,
            unsynced,
            overflow,
        });
    }

    /// Removes, under each of `scopes`, what the list did not name (and the filters do not
    /// exclude). Deletions a watch saw: no guard, but nothing on a source read error.
    fn delete_in_scopes(&self, scopes: &[RelPath]) {
        let Some(d) = &self.dest else { return };
        if self.sender_scan_errors.load(Ordering::Relaxed) > 0 {
            return self.warn(
                "",
                "the source had read errors; not deleting anything this time",
            );
        }
        let so = ScanOptions {
            filters: self.opts.filters.clone(),
            checksum: false,
            threads: 1,
            report_ours: true,
        };
        let scanner = match crate::engine::scan::Scanner::new(d.root_path(), &so) {
            Ok(s) => s,
            Err(e) => return self.error("", format!("scanning for deletions: {e}")),
        };
        let found = Mutex::new((Vec::new(), Vec::new()));
        for p in scopes {
            let r = scanner.subtree(p, &|| {
                let found = &found;
                move |ev| {
                    let mut g = lock(found);
                    match ev {
                        ScanEvent::Entry(e, _) => g.0.push(e),
                        ScanEvent::Ours { path, kind } => g.1.push((path, kind)),
                        ScanEvent::Error { path, message } => {
                            drop(g);
                            self.warn(path, format!("not deleting: {message}"));
                        }
                        ScanEvent::Skipped { .. } => {}
                    }
                }
            });
            if let Err(e) = r {
                self.warn(p, format!("not deleting: {e}"));
            }
        }
        let (ours, leftovers) = found.into_inner().unwrap_or_else(|p| p.into_inner());
        if !self.opts.dry_run {
            for (path, kind) in leftovers {
                if let Err(e) = d.remove_leftover(&path, kind) {
                    self.warn(&path, format!("cleaning up a leftover: {}", e.detail()));
                }
            }
        }
        let sender_paths = lock(&self.sender_paths);
        let mut doomed = plan::deletions(&ours, &sender_paths);
        drop(sender_paths);
        doomed.dedup_by(|a, b| a.path == b.path);
        self.remove_all(doomed);
    }

    pub(super) fn delete_extraneous(&self) {
        let Some(handle) = lock(&self.receiver_scan).take() else {
            return;
        };
        let root = "";
        let (ours, events) = match handle.join() {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => return self.error(root, format!("scanning for --delete: {e}")),
            Err(_) => return self.error(root, "scanning for --delete failed"),
        };
        // Leftovers of killed sessions are ours to clean, whatever the guard decides below.
        if let (Some(d), false) = (&self.dest, self.opts.dry_run) {
            for ev in &events {
                if let ScanEvent::Ours { path, kind } = ev
                    && let Err(e) = d.remove_leftover(path, *kind)
                {
                    self.warn(path, format!("cleaning up a leftover: {}", e.detail()));
                }
            }
        }
        if self.sender_scan_errors.load(Ordering::Relaxed) > 0 {
            return self.warn(
                root,
                "the source had read errors; not deleting anything this time",
            );
        }
        let sender_paths = std::mem::take(&mut *lock(&self.sender_paths));
        let doomed = plan::deletions(&ours, &sender_paths);
        let sender_total = self.sender_count.load(Ordering::Relaxed) as usize;
        if let Err(mut refusal) =
            plan::check_delete_guard(&doomed, ours.len(), sender_total, self.opts.force_delete)
        {
            // Name the directory itself: a destination that is a symlink is followed.
            if let Some(d) = &self.dest {
                let resolved = std::fs::canonicalize(d.root_path())
                    .unwrap_or_else(|_| d.root_path().to_path_buf());
                refusal.dir = resolved.display().to_string();
            }
            lock(&self.stats).delete_refused = true;
            self.obs.event(Event::Error {
                path: String::new(),
                message: refusal.to_string(),
            });
            return;
        }
        self.remove_all(doomed);
    }

    /// Removes `doomed` (children before their directories).
    fn remove_all(&self, doomed: Vec<Entry>) {
        for e in doomed {
            let kind = ItemKind::of(&e);
            let removed = match (&self.dest, self.opts.dry_run) {
                (Some(d), false) => d.remove(&e.path, e.is_dir()),
                _ => Ok(Removed::Yes),
            };
            match removed {
                Ok(Removed::Yes) => {
                    lock(&self.stats).deleted += 1;
                    self.report(&e.path, kind, ChangeOp::Deleted);
                    self.touched(&e.path);
                }
                Ok(Removed::NotEmpty) => {
                    self.warn(&e.path, "not deleted: the directory holds excluded entries")
                }
                // Already gone with a replaced parent.
                Ok(Removed::Missing) | Err(DestError::ThroughSymlink { .. }) => {}
                Err(err) => self.dest_error(&e.path, err),
            }
        }
    }

    pub(super) fn fix_dirs(&self) {
        let Some(d) = &self.dest else { return };
        let (wanted, fix, original) = {
            let mut g = lock(&self.dirs);
            (
                std::mem::take(&mut g.wanted),
                std::mem::take(&mut g.fix),
                std::mem::take(&mut g.original),
            )
        };
        for dir in fix {
            let (mode, mtime) = match (wanted.get(&dir), original.get(&dir)) {
                (Some(&(mode, mtime)), _) => (Some(mode), mtime),
                // Not listed: unchanged at the sender, so as it was before we wrote into it.
                (None, Some(&mtime)) => (None, mtime),
                (None, None) => continue,
            };
            let Ok(path) = RelPath::new(dir) else {
                continue;
            };
            if let Err(e) = d.set_dir_meta(&path, mode, Some(mtime)) {
                self.warn(&path, e.detail());
            }
        }
        // The root last: everything above changed its mtime.
        let root = lock(&self.dirs).root.take();
        // As for any directory (`fix_dir`): a root whose mtime is off may hold a killed
        // session's temp files, even where this sync replaced nothing in it. (The session's
        // own probe file moves it too, so in practice the root is swept once per sync: one
        // directory read.)
        if let Some(r) = &root
            && d.root_meta().is_ok_and(|m| m.mtime != r.mtime)
        {
            self.sweep_leftovers(d, b"", "");
        }
        if let Some(r) = root
            && let Err(e) = d.set_root_meta(Some(r.mode), Some(r.mtime))
        {
            self.warn("", e);
        }
    }
}
