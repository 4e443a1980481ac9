//! Receiver role: plan each incoming entry against the local tree, ask for what differs,
//! rebuild files chunk by chunk (in parallel, in any order), verify each with BLAKE3 before it
//! replaces anything, then delete extraneous entries (guarded) and fix directory metadata.
//!
//! Threads: the async loop reads frames and dispatches; a planner thread handles the list in
//! order (it needs parents before children); rayon runs signatures, chunk writes and commits.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};

use bytes::Bytes;
use memmap2::Mmap;
use rayon::prelude::*;
use tokio::io::AsyncRead;
use tokio::sync::Semaphore;

use super::conn::Out;
use super::{Observer, SessionError};
use crate::engine::delta::{self, DELTA_MIN_BASE, SigParams};
use crate::engine::dest::{Dest, DestError, Removed, TempFile};
use crate::engine::hash::{self, CHUNK, Cv, Digest, chunk_count, chunk_span};
use crate::engine::plan::{self, Change, ChangeOp, FileAction, ItemKind};
use crate::engine::scan::{self, ScanOptions};
use crate::engine::{Entry, EntryKind, LocalKind, LocalMeta, Mtime, RelPath};
use crate::proto::{Event, FileId, FrameReader, Msg, Stats, SyncOptions};

/// File data received but not yet written to disk.
const RECV_BUDGET: usize = 64 << 20;
/// Files at least this big get their blocks reserved before writing.
const PREALLOCATE_MIN: u64 = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The receiver's old copy of a file, used as delta base.
struct Base {
    map: Option<Mmap>,
    len: u64,
}

impl Base {
    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or_default()
    }

    fn chunk(&self, k: u64) -> Option<&[u8]> {
        let (off, n) = chunk_span(self.len, k);
        self.bytes()
            .get(off as usize..off as usize + n)
            .filter(|_| k < chunk_count(self.len))
    }
}

/// A file being transferred.
struct Incoming {
    path: RelPath,
    /// Size in the sender's list (the file may have changed since; `FileEnd` has the truth).
    size: u64,
    mode: u32,
    mtime: Mtime,
    before: Option<LocalMeta>,
    st: Mutex<Assembly>,
    /// Serializes writes into the temp file: concurrent `pwrite`s to one inode only spin on
    /// the filesystem's inode lock, burning the core another chunk could hash on.
    write: Mutex<()>,
}

#[derive(Default)]
struct Assembly {
    base: Option<Arc<Base>>,
    params: Option<SigParams>,
    temp: Option<Arc<TempFile>>,
    /// Written chunks: index → (length, chaining value).
    chunks: HashMap<u64, (usize, Cv)>,
    jobs: usize,
    end: Option<(u64, Digest)>,
    /// Whole-file resend already asked for after a failed verification.
    retried: bool,
    error: Option<String>,
}

struct Track {
    outstanding: usize,
    list_done: bool,
    finished: bool,
}

struct DirState {
    /// Sender's directories: desired (mode, mtime).
    wanted: HashMap<Vec<u8>, (u32, Mtime)>,
    /// Directories whose metadata must be (re)applied at the end.
    fix: HashSet<Vec<u8>>,
}

struct Ctx {
    pool: rayon::ThreadPool,
    dest: Option<Dest>,
    opts: SyncOptions,
    out: Out,
    obs: Arc<dyn Observer>,
    stats: Mutex<Stats>,
    files: Mutex<HashMap<FileId, Arc<Incoming>>>,
    track: Mutex<Track>,
    dirs: Mutex<DirState>,
    sender_paths: Mutex<HashSet<RelPath>>,
    sender_count: AtomicU32,
    sender_scan_errors: AtomicU32,
    receiver_scan: Mutex<Option<ScanThread>>,
    fatal: Mutex<Option<SessionError>>,
    /// Wakes the read loop when a worker hits a fatal error, so a peer that never hangs up
    /// cannot keep us waiting.
    fatal_set: tokio::sync::Notify,
    done: Mutex<Option<Stats>>,
}

/// The receiver's own scan for `--delete`, running while transfers happen.
type ScanThread = std::thread::JoinHandle<Result<Vec<Entry>, String>>;

enum PlanItem {
    Entry(FileId, Entry),
    End { count: u32, scan_errors: u32 },
}

/// Runs the receiver until the sender acknowledges completion; returns the totals.
pub async fn run<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    out: Out,
    root: PathBuf,
    opts: SyncOptions,
    obs: Arc<dyn Observer>,
) -> Result<Stats, SessionError> {
    let dest = match root.is_dir() {
        true => Some(Dest::open(&root)?),
        // Only a dry run gets here without a root: it has nothing to compare against.
        false if opts.dry_run => None,
        false => {
            Dest::create_root(&root)?;
            Some(Dest::open(&root)?)
        }
    };
    let receiver_scan = (opts.delete && dest.is_some()).then(|| {
        let (root, filters) = (root.clone(), opts.filters.clone());
        std::thread::spawn(move || {
            let so = ScanOptions {
                filters,
                checksum: false,
                threads: 0,
            };
            scan::scan_to_vec(&root, &so)
                .map(|(entries, _)| entries)
                .map_err(|e| e.to_string())
        })
    });
    let ctx = Arc::new(Ctx {
        pool: super::worker_pool("recv")?,
        dest,
        opts,
        out,
        obs,
        stats: Mutex::new(Stats::default()),
        files: Mutex::new(HashMap::new()),
        track: Mutex::new(Track {
            outstanding: 0,
            list_done: false,
            finished: false,
        }),
        dirs: Mutex::new(DirState {
            wanted: HashMap::new(),
            fix: HashSet::new(),
        }),
        sender_paths: Mutex::new(HashSet::new()),
        sender_count: AtomicU32::new(0),
        sender_scan_errors: AtomicU32::new(0),
        receiver_scan: Mutex::new(receiver_scan),
        fatal: Mutex::new(None),
        fatal_set: tokio::sync::Notify::new(),
        done: Mutex::new(None),
    });
    let (plan_tx, plan_rx) = mpsc::channel::<PlanItem>();
    let planner_ctx = ctx.clone();
    std::thread::Builder::new()
        .name("devsync-plan".into())
        .spawn(move || planner_ctx.planner(plan_rx))
        .map_err(|e| SessionError::Local(format!("starting planner: {e}")))?;
    let budget = Arc::new(Semaphore::new(RECV_BUDGET));

    loop {
        // Abandoning a half-read frame is fine here: after a fatal error nothing more is read.
        let next = tokio::select! {
            biased;
            () = ctx.fatal_set.notified() => None,
            e = ctx.out.broken() => return Err(SessionError::Local(format!("connection lost: {e}"))),
            r = reader.next() => Some(r?),
        };
        let Some((msg, payload)) = next.flatten() else {
            return Err(ctx.take_fatal().unwrap_or(SessionError::Eof));
        };
        match msg {
            Msg::Entry { id, entry } => {
                let _ = plan_tx.send(PlanItem::Entry(id, entry)); // planner gone: it reported why
            }
            Msg::EndOfList { count, scan_errors } => {
                let _ = plan_tx.send(PlanItem::End { count, scan_errors });
            }
            Msg::Event(ev) => ctx.obs.event(ev),
            Msg::Bye => {
                let stats = lock(&ctx.done).take();
                return stats
                    .ok_or_else(|| ctx.violation("goodbye before the receiver finished".into()));
            }
            Msg::Fatal { message } => return Err(SessionError::Remote(message)),
            msg => {
                let n = payload.len().clamp(1, RECV_BUDGET) as u32;
                let permit = budget
                    .clone()
                    .acquire_many_owned(n)
                    .await
                    .map_err(|_| SessionError::Local("receive budget closed".into()))?;
                let job = ctx.dispatch(msg, payload)?;
                ctx.pool.spawn(move || {
                    job();
                    drop(permit);
                });
            }
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

impl Ctx {
    fn take_fatal(&self) -> Option<SessionError> {
        lock(&self.fatal).take()
    }

    fn violation(&self, what: String) -> SessionError {
        let _ = self.out.send(Msg::Fatal {
            message: format!("protocol violation: {what}"),
        }); // the session ends with this error either way
        SessionError::Violation(what)
    }

    /// Records a fatal error from a worker and tells the peer, which then closes the session.
    /// The error is stored before the peer hears of it, so whichever way the read loop wakes
    /// up (our notification or the peer hanging up) it reports this error.
    fn fail(&self, e: SessionError) {
        let message = e.to_string();
        lock(&self.fatal).get_or_insert(e);
        self.fatal_set.notify_one();
        let _ = self.out.send(Msg::Fatal { message }); // already failing
    }

    fn incoming(&self, id: FileId) -> Result<Arc<Incoming>, SessionError> {
        lock(&self.files)
            .get(&id)
            .cloned()
            .ok_or_else(|| self.violation(format!("data for file {id}, which was not requested")))
    }

    /// Validates a content message against the file's state and returns the work to do.
    fn dispatch(self: &Arc<Self>, msg: Msg, payload: Bytes) -> Result<Job, SessionError> {
        let c = self.clone();
        let job: Job = match msg {
            Msg::SigRequest { id, chunks } => {
                let inc = self.incoming(id)?;
                let (base, params) = {
                    let st = lock(&inc.st);
                    (st.base.clone(), st.params)
                };
                let (Some(base), Some(params)) = (base, params) else {
                    return Err(
                        self.violation(format!("signature request for file {id} without a base"))
                    );
                };
                let n = chunk_count(base.len);
                let chunks: Vec<u64> = match chunks {
                    Some(v) => v.into_iter().map(u64::from).collect(),
                    None => (0..n).collect(),
                };
                if chunks.iter().any(|&k| k >= n) {
                    return Err(
                        self.violation(format!("signature request beyond the end of file {id}"))
                    );
                }
                Box::new(move || c.send_sig_parts(id, &base, params, &chunks))
            }
            Msg::WholeFile { id, digest } => {
                let inc = self.incoming(id)?;
                Box::new(move || c.whole_file(id, &inc, digest, &payload))
            }
            Msg::Data { id, chunk } | Msg::Copy { id, chunk } | Msg::Delta { id, chunk, .. } => {
                let inc = self.incoming(id)?;
                let window = match msg {
                    Msg::Delta {
                        window_start,
                        window_len,
                        len,
                        ..
                    } => Some(Window {
                        start: u64::from(window_start),
                        count: u64::from(window_len),
                        len: len as usize,
                    }),
                    _ => None,
                };
                let is_copy = matches!(msg, Msg::Copy { .. });
                let base = {
                    let mut st = lock(&inc.st);
                    st.jobs += 1;
                    st.base.clone()
                };
                if (is_copy || window.is_some()) && base.is_none() {
                    return Err(self.violation(format!("delta for file {id} without a base")));
                }
                let piece = match (is_copy, window) {
                    (true, _) => Piece::Copy,
                    (false, Some(w)) => Piece::Delta(w, payload),
                    (false, None) => Piece::Literal(payload),
                };
                Box::new(move || c.chunk(id, &inc, base, u64::from(chunk), piece))
            }
            Msg::FileEnd { id, len, digest } => {
                let inc = self.incoming(id)?;
                if chunk_count(len) > crate::proto::msg::MAX_CHUNKS {
                    return Err(self.violation(format!("file {id} claims {len} bytes")));
                }
                Box::new(move || {
                    let ready = {
                        let mut st = lock(&inc.st);
                        st.end = Some((len, digest));
                        st.jobs == 0
                    };
                    if ready {
                        c.finalize(id, &inc);
                    }
                })
            }
            Msg::Identical { id } => {
                let inc = self.incoming(id)?;
                Box::new(move || c.identical(id, &inc))
            }
            Msg::SendFailed {
                id,
                message,
                transient,
            } => {
                let inc = self.incoming(id)?;
                Box::new(move || {
                    let ev = if transient {
                        Event::Warning {
                            path: inc.path.to_string(),
                            message,
                        }
                    } else {
                        Event::Error {
                            path: inc.path.to_string(),
                            message,
                        }
                    };
                    c.complete(id, &inc, Err(ev));
                })
            }
            other => {
                return Err(self.violation(format!("unexpected message for a receiver: {other:?}")));
            }
        };
        Ok(job)
    }

    // ---- planning -------------------------------------------------------------------------

    fn planner(self: Arc<Self>, rx: mpsc::Receiver<PlanItem>) {
        let mut dirs_seen: HashSet<Vec<u8>> = HashSet::new();
        let mut ids: HashSet<FileId> = HashSet::new();
        for item in rx {
            match item {
                PlanItem::Entry(id, entry) => {
                    if !ids.insert(id) {
                        return self
                            .fail(SessionError::Violation(format!("file id {id} used twice")));
                    }
                    if let Some(parent) = entry.path.parent()
                        && !dirs_seen.contains(parent)
                    {
                        return self.fail(SessionError::Violation(format!(
                            "{}: listed before its parent directory (or inside a non-directory)",
                            entry.path
                        )));
                    }
                    if entry.is_dir() {
                        dirs_seen.insert(entry.path.as_bytes().to_vec());
                    }
                    if self.opts.delete {
                        lock(&self.sender_paths).insert(entry.path.clone());
                    }
                    self.plan_entry(id, entry);
                }
                PlanItem::End { count, scan_errors } => {
                    if count as usize != ids.len() {
                        return self.fail(SessionError::Violation(format!(
                            "list ended with count {count}, but {} entries arrived",
                            ids.len()
                        )));
                    }
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

    fn report(&self, path: &RelPath, kind: ItemKind, op: ChangeOp) {
        self.obs.event(Event::Change(Change {
            path: path.clone(),
            kind,
            op,
        }));
    }

    fn error(&self, path: impl std::fmt::Display, message: impl ToString) {
        lock(&self.stats).errors += 1;
        self.obs.event(Event::Error {
            path: path.to_string(),
            message: message.to_string(),
        });
    }

    fn warn(&self, path: impl std::fmt::Display, message: impl ToString) {
        lock(&self.stats).warnings += 1;
        self.obs.event(Event::Warning {
            path: path.to_string(),
            message: message.to_string(),
        });
    }

    /// Reports a destination error; a full disk ends the whole sync.
    fn dest_error(&self, path: &RelPath, e: DestError) {
        if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
            self.fail(SessionError::Local(format!(
                "no space left on the receiving side (while writing {path}); files already \
                 replaced are complete, nothing is half-written. Free some space and run again."
            )));
        }
        self.error(path, e);
    }

    fn touched(&self, path: &RelPath) {
        let parent = path.parent().unwrap_or(b"");
        if !parent.is_empty() {
            lock(&self.dirs).fix.insert(parent.to_vec());
        }
    }

    fn lstat(&self, path: &RelPath) -> Result<Option<LocalMeta>, DestError> {
        match &self.dest {
            Some(d) => d.lstat(path),
            None => Ok(None),
        }
    }

    fn plan_entry(self: &Arc<Self>, id: FileId, entry: Entry) {
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
                                Some(Ok(d)) => c.plan_file(id, &entry, Some(l), Some(&d)),
                                None => c.plan_file(id, &entry, Some(l), None),
                            }
                            c.release();
                        });
                        Ok(())
                    }
                    _ => {
                        self.plan_file(id, &entry, local, None);
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
    fn clear_dir_in_the_way(
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

    fn plan_dir(&self, entry: &Entry, local: Option<LocalMeta>) -> Result<(), DestError> {
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

    fn plan_symlink(
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

    fn count_change(&self, op: ChangeOp) {
        let mut s = lock(&self.stats);
        match op {
            ChangeOp::Created => s.created += 1,
            _ => s.updated += 1,
        }
    }

    fn plan_file(
        self: &Arc<Self>,
        id: FileId,
        entry: &Entry,
        local: Option<LocalMeta>,
        local_digest: Option<&Digest>,
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
                    let op = self.file_op(local.as_ref(), *size, entry, digest.is_some());
                    self.count_change(op);
                    return self.report(&entry.path, ItemKind::File, op);
                }
                let inc = Arc::new(Incoming {
                    path: entry.path.clone(),
                    size: *size,
                    mode: entry.mode,
                    mtime: entry.mtime,
                    before: local,
                    st: Mutex::new(Assembly::default()),
                    write: Mutex::new(()),
                });
                if lock(&self.files).insert(id, inc.clone()).is_some() {
                    return self.fail(SessionError::Violation(format!("file id {id} reused")));
                }
                lock(&self.track).outstanding += 1;
                self.obs.planned(*size);
                let base_len = local.map_or(0, |l| l.size);
                if basis && base_len >= DELTA_MIN_BASE {
                    let c = self.clone();
                    self.pool.spawn(move || c.start_delta(id, &inc));
                } else {
                    let _ = self.out.send(Msg::NeedWhole { id });
                }
            }
        }
    }

    fn file_op(
        &self,
        before: Option<&LocalMeta>,
        size: u64,
        entry: &Entry,
        content_known: bool,
    ) -> ChangeOp {
        match before.filter(|l| l.kind == LocalKind::File) {
            None => ChangeOp::Created,
            Some(l) => ChangeOp::Updated {
                content: content_known || !self.opts.dry_run,
                size: l.size != size,
                time: l.mtime != entry.mtime,
                perms: l.mode != entry.mode,
            },
        }
    }

    // ---- transfers --------------------------------------------------------------------------

    /// Signs our copy and asks for a delta (chunk hashes first for big files).
    fn start_delta(&self, id: FileId, inc: &Arc<Incoming>) {
        let prepared = (|| -> io::Result<(Arc<Base>, SigParams, Vec<Cv>)> {
            let d = self
                .dest
                .as_ref()
                .ok_or_else(|| io::Error::other("no destination"))?;
            let f = d.open_file(&inc.path).map_err(io::Error::other)?;
            let len = f.metadata()?.len();
            // SAFETY: the map is read-only and private to this process. If another process
            // truncates the file while we read it the kernel raises SIGBUS, as for any reader
            // of a mapped file; that risk is accepted for the receiver's own old copy, which
            // nothing else should be rewriting during a sync.
            let map = if len > 0 {
                Some(unsafe { Mmap::map(&f)? })
            } else {
                None
            };
            let base = Arc::new(Base { map, len });
            let params = SigParams::for_len(len);
            let cvs = (0..chunk_count(len))
                .into_par_iter()
                .map(|k| hash::chunk_cv(k, base.chunk(k).unwrap_or_default()))
                .collect();
            Ok((base, params, cvs))
        })();
        let (base, params, cvs) = match prepared {
            Ok(p) if p.0.len >= DELTA_MIN_BASE => p,
            // Unreadable or shrunk base: the whole file it is.
            _ => {
                let _ = self.out.send(Msg::NeedWhole { id });
                return;
            }
        };
        {
            let mut st = lock(&inc.st);
            st.base = Some(base.clone());
            st.params = Some(params);
        }
        let base_len = base.len;
        crate::trace!(
            "recv",
            "{}: base hashed ({} chunks)",
            inc.path,
            chunk_count(base_len)
        );
        if chunk_count(base_len) <= 2 {
            let sig = delta::chunk_signature(base.bytes(), params);
            let msg = Msg::Signature {
                id,
                base_len,
                params,
                cvs,
            };
            let _ = self.out.send_data(msg, Bytes::from(sig), None);
        } else {
            let _ = self.out.send(Msg::ChunkHashes {
                id,
                base_len,
                params,
                cvs,
            });
        }
    }

    fn send_sig_parts(&self, id: FileId, base: &Base, params: SigParams, chunks: &[u64]) {
        crate::trace!("recv", "file {id}: signing {} base chunks", chunks.len());
        chunks.par_iter().for_each(|&k| {
            let sig = delta::chunk_signature(base.chunk(k).unwrap_or_default(), params);
            let _ = self.out.send_data(
                Msg::SigPart {
                    id,
                    chunk: k as u32,
                },
                Bytes::from(sig),
                None,
            );
        });
    }

    fn temp_file(&self, inc: &Incoming) -> Result<Arc<TempFile>, String> {
        let mut st = lock(&inc.st);
        if let Some(t) = &st.temp {
            return Ok(t.clone());
        }
        let d = self.dest.as_ref().ok_or("no destination")?;
        let report = |e: DestError| {
            if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
                self.dest_error(&inc.path, e);
                return "no space left".to_string();
            }
            e.to_string()
        };
        let t = Arc::new(d.create_temp(&inc.path).map_err(report)?);
        if inc.size >= PREALLOCATE_MIN {
            t.preallocate(inc.size).map_err(report)?;
        }
        st.temp = Some(t.clone());
        Ok(t)
    }

    fn whole_file(&self, id: FileId, inc: &Arc<Incoming>, digest: Digest, data: &[u8]) {
        lock(&self.stats).literal_bytes += data.len() as u64;
        let r = (|| -> Result<(), String> {
            if *blake3::hash(data).as_bytes() != digest {
                return Err("content does not match the sender's BLAKE3 digest".into());
            }
            let t = self.temp_file(inc)?;
            t.file()
                .write_all_at(data, 0)
                .map_err(|e| self.write_error(inc, e))?;
            Ok(())
        })();
        self.obs.progressed(data.len() as u64);
        self.commit(id, inc, data.len() as u64, r);
    }

    fn write_error(&self, inc: &Incoming, e: io::Error) -> String {
        if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
            self.fail(SessionError::Local(format!(
                "no space left on the receiving side (while writing {}); nothing was half-written. \
                 Free some space and run again.",
                inc.path
            )));
        }
        format!("writing: {e}")
    }

    fn chunk(
        &self,
        id: FileId,
        inc: &Arc<Incoming>,
        base: Option<Arc<Base>>,
        k: u64,
        piece: Piece,
    ) {
        let r = (|| -> Result<(usize, Cv), String> {
            let base = base.as_deref();
            let (data, literal, matched): (std::borrow::Cow<'_, [u8]>, u64, u64) = match &piece {
                Piece::Literal(b) => (b[..].into(), b.len() as u64, 0),
                Piece::Copy => {
                    let c = base
                        .and_then(|b| b.chunk(k))
                        .ok_or("copy of a chunk the base does not have")?;
                    (c.into(), 0, c.len() as u64)
                }
                Piece::Delta(w, d) => {
                    let b = base.ok_or("delta without a base")?;
                    if w.start + w.count > chunk_count(b.len) {
                        return Err("delta window outside the base".into());
                    }
                    let (lo, hi) = delta::window_bytes(w.start, w.count, b.len);
                    let window = b
                        .bytes()
                        .get(lo as usize..hi as usize)
                        .ok_or("bad window")?;
                    let out = delta::apply(window, d, w.len).map_err(|e| e.to_string())?;
                    let n = out.len() as u64;
                    (out.into(), d.len() as u64, n.saturating_sub(d.len() as u64))
                }
            };
            if data.len() as u64 > CHUNK || k >= crate::proto::msg::MAX_CHUNKS {
                return Err("chunk out of range".into());
            }
            {
                let mut s = lock(&self.stats);
                s.literal_bytes += literal;
                s.matched_bytes += matched;
            }
            let cv = hash::chunk_cv(k, &data);
            let t = self.temp_file(inc)?;
            {
                let _serial = lock(&inc.write);
                t.file()
                    .write_all_at(&data, k * CHUNK)
                    .map_err(|e| self.write_error(inc, e))?;
            }
            self.obs.progressed(data.len() as u64);
            Ok((data.len(), cv))
        })();
        let ready = {
            let mut st = lock(&inc.st);
            st.jobs -= 1;
            match r {
                Ok(c) => {
                    if st.chunks.insert(k, c).is_some() {
                        st.error
                            .get_or_insert_with(|| format!("chunk {k} sent twice"));
                    }
                }
                Err(e) => {
                    st.error.get_or_insert(e);
                }
            }
            st.jobs == 0 && st.end.is_some()
        };
        if ready {
            self.finalize(id, inc);
        }
    }

    /// All chunks are in and `FileEnd` arrived: verify, then commit or retry.
    fn finalize(&self, id: FileId, inc: &Arc<Incoming>) {
        let (end, chunks, error, was_delta) = {
            let mut st = lock(&inc.st);
            (
                st.end.take(),
                std::mem::take(&mut st.chunks),
                st.error.take(),
                st.base.is_some(),
            )
        };
        let Some((len, digest)) = end else { return };
        crate::trace!("recv", "{}: all chunks written, verifying", inc.path);
        let r = (|| -> Result<(), String> {
            if let Some(e) = error {
                return Err(e);
            }
            let n = chunk_count(len);
            let mut cvs = Vec::with_capacity(n as usize);
            for k in 0..n {
                match chunks.get(&k) {
                    Some(&(l, cv)) if l == chunk_span(len, k).1 => cvs.push(cv),
                    _ => return Err(format!("chunk {k} missing or of the wrong size")),
                }
            }
            if chunks.len() as u64 != n {
                return Err("more chunks than the file has".into());
            }
            let t = self.temp_file(inc)?;
            t.set_len(len).map_err(|e| e.to_string())?;
            let got = match hash::digest_from_cvs(&cvs, len) {
                Some(d) => d,
                // One chunk or less: hash what is actually in the file.
                None => {
                    hash::file_digest(t.file(), len).map_err(|e| format!("reading back: {e}"))?
                }
            };
            if got != digest {
                return Err(VERIFY_FAILED.into());
            }
            Ok(())
        })();
        if r.as_ref().err().map(String::as_str) == Some(VERIFY_FAILED) && was_delta {
            let retry = {
                let mut st = lock(&inc.st);
                let first = !st.retried;
                st.retried = true;
                st.temp = None;
                st.base = None;
                first
            };
            if retry {
                lock(&self.stats).verify_retries += 1;
                let _ = self.out.send(Msg::NeedWhole { id });
                return;
            }
        }
        self.commit(id, inc, len, r);
    }

    fn commit(&self, id: FileId, inc: &Arc<Incoming>, len: u64, staged: Result<(), String>) {
        let r = staged.and_then(|()| {
            let t = self.temp_file(inc)?;
            let d = self.dest.as_ref().ok_or("no destination")?;
            t.commit(d, inc.mode, inc.mtime, self.opts.fsync)
                .map_err(|e| {
                    let s = e.to_string();
                    self.dest_error(&inc.path, e);
                    s
                })
        });
        lock(&inc.st).temp = None;
        crate::trace!(
            "recv",
            "{}: committed ({})",
            inc.path,
            if r.is_ok() { "ok" } else { "failed" }
        );
        let outcome = match r {
            Ok(()) => {
                let op = self.file_op(
                    inc.before.as_ref(),
                    len,
                    &Entry {
                        path: inc.path.clone(),
                        kind: EntryKind::Dir,
                        mode: inc.mode,
                        mtime: inc.mtime,
                    },
                    true,
                );
                self.count_change(op);
                Ok(op)
            }
            Err(message) => Err(Event::Error {
                path: inc.path.to_string(),
                message,
            }),
        };
        self.complete(id, inc, outcome);
    }

    fn identical(&self, id: FileId, inc: &Arc<Incoming>) {
        let before = inc.before.unwrap_or(LocalMeta {
            kind: LocalKind::File,
            size: 0,
            mode: inc.mode,
            mtime: inc.mtime,
        });
        let op = ChangeOp::Updated {
            content: false,
            size: false,
            time: before.mtime != inc.mtime,
            perms: before.mode != inc.mode,
        };
        let r = match &self.dest {
            Some(d) => d.set_file_meta(&inc.path, Some(inc.mode), Some(inc.mtime)),
            None => Ok(()),
        };
        let outcome = match r {
            Ok(()) => {
                lock(&self.stats).metadata_only += 1;
                Ok(op)
            }
            Err(e) => Err(Event::Error {
                path: inc.path.to_string(),
                message: e.to_string(),
            }),
        };
        self.complete(id, inc, outcome);
    }

    /// A transfer is over (applied, or failed with the event to report).
    fn complete(&self, id: FileId, inc: &Arc<Incoming>, outcome: Result<ChangeOp, Event>) {
        lock(&self.files).remove(&id);
        match outcome {
            Ok(op) => {
                self.report(&inc.path, ItemKind::File, op);
                self.touched(&inc.path);
            }
            Err(ev) => {
                match &ev {
                    Event::Warning { .. } => lock(&self.stats).warnings += 1,
                    _ => lock(&self.stats).errors += 1,
                }
                self.obs.event(ev);
            }
        }
        self.obs.file_done();
        self.release();
    }

    fn release(&self) {
        lock(&self.track).outstanding -= 1;
        self.maybe_finish();
    }

    // ---- the end ------------------------------------------------------------------------------

    fn maybe_finish(&self) {
        let go = {
            let mut t = lock(&self.track);
            let go = t.list_done && t.outstanding == 0 && !t.finished;
            t.finished |= go;
            go
        };
        if go {
            self.finish();
        }
    }

    fn finish(&self) {
        crate::trace!("recv", "all transfers done");
        if self.opts.delete {
            self.delete_extraneous();
        }
        if !self.opts.dry_run {
            self.fix_dirs();
        }
        let stats = lock(&self.stats).clone();
        *lock(&self.done) = Some(stats.clone());
        let _ = self.out.send(Msg::Done { stats });
    }

    fn delete_extraneous(&self) {
        let Some(handle) = lock(&self.receiver_scan).take() else {
            return;
        };
        let root = "";
        let ours = match handle.join() {
            Ok(Ok(entries)) => entries,
            Ok(Err(e)) => return self.error(root, format!("scanning for --delete: {e}")),
            Err(_) => return self.error(root, "scanning for --delete failed"),
        };
        if self.sender_scan_errors.load(Ordering::Relaxed) > 0 {
            return self.warn(
                root,
                "the source had read errors; not deleting anything this time",
            );
        }
        let sender_paths = std::mem::take(&mut *lock(&self.sender_paths));
        let doomed = plan::deletions(&ours, &sender_paths);
        let sender_total = self.sender_count.load(Ordering::Relaxed) as usize;
        if let Err(refusal) =
            plan::check_delete_guard(&doomed, ours.len(), sender_total, self.opts.force_delete)
        {
            lock(&self.stats).delete_refused = true;
            self.obs.event(Event::Error {
                path: String::new(),
                message: refusal.to_string(),
            });
            return;
        }
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

    fn fix_dirs(&self) {
        let Some(d) = &self.dest else { return };
        let (wanted, fix) = {
            let mut g = lock(&self.dirs);
            (std::mem::take(&mut g.wanted), std::mem::take(&mut g.fix))
        };
        for dir in fix {
            let Some(&(mode, mtime)) = wanted.get(&dir) else {
                continue;
            };
            let Ok(path) = RelPath::new(dir) else {
                continue;
            };
            if let Err(e) = d.set_dir_meta(&path, Some(mode), Some(mtime)) {
                self.warn(&path, e);
            }
        }
    }
}

const VERIFY_FAILED: &str = "rebuilt file does not match the sender's BLAKE3 digest";

enum Piece {
    Literal(Bytes),
    Copy,
    Delta(Window, Bytes),
}

/// Where a delta's base window lies and how long the chunk it rebuilds is.
struct Window {
    start: u64,
    count: u64,
    len: usize,
}
