//! Sender role: for each generation, stream its list (the whole scanned tree, or the changes
//! a watch found), then answer the receiver's requests with whole files, chunk copies and
//! deltas ([`files`]) until it reports the generation done. Bulk work runs on rayon; the async
//! loop here only reads frames and dispatches, so it never blocks and the receiver can always
//! make progress.

mod ahead;
mod files;

pub use ahead::AheadPolicy;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use tokio::io::AsyncRead;

use super::conn::{Budget, Out};
use super::{Observer, SessionError};
use crate::engine::delta::SigParams;
use crate::engine::hash::{Cv, chunk_count};
use crate::engine::index::{Index, Ino};
use crate::engine::scan::{ScanEvent, ScanOptions, Scanner};
use crate::engine::source::Snapshot;
use crate::engine::{Entry, EntryKind, MODE_MASK, RelPath};
use crate::proto::{Event, FileId, FrameReader, Msg, Stamp, Stats, SyncOptions, msg::MAX_BATCH};

/// File data a sender may have read but not yet written to the stream.
const SEND_BUDGET: u64 = 48 << 20;
/// Files up to this size travel many to a frame; bigger ones one per frame or in chunks.
const SMALL_FILE: u64 = 256 << 10;
/// A batch of small files ends at this many files or bytes.
const BATCH_FILES: usize = 256;
const BATCH_BYTES: u64 = 1 << 20;
/// Most file-list entries in one frame.
const LIST_BATCH: usize = 256;

/// One directory's list entries on their way out. The walker drops the batch (flushing it)
/// before it reads any subdirectory, so a directory always goes out before its contents.
struct ListBatch<'a> {
    ctx: &'a Ctx,
    buf: Vec<Entry>,
    inos: Vec<Ino>,
    changed: bool,
}

impl ListBatch<'_> {
    fn push(&mut self, entry: Entry, ino: Ino) {
        self.buf.push(entry);
        if self.ctx.keep_inos {
            self.inos.push(ino);
        }
        if self.buf.len() >= LIST_BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        // Ids are assigned and the frame queued under one lock, so frames leave in id order
        // (the receiver requires that); encoding here, straight into the connection's list
        // buffer, lets the entries move into the table instead of being copied for the writer.
        let mut all = self.ctx.entries.write().unwrap_or_else(|p| p.into_inner());
        let first_id = all.len();
        let big: Vec<(FileId, PathBuf, u64)> = (self.buf.iter().enumerate())
            .filter_map(|(i, e)| match e.kind {
                EntryKind::File { size, .. } if size >= ahead::AHEAD_MIN => {
                    let path = self.ctx.root.join(e.path.as_os_str());
                    Some((first_id + i as FileId, path, size))
                }
                _ => None,
            })
            .collect();
        let msg = Msg::Entries {
            first_id,
            entries: std::mem::take(&mut self.buf),
            changed: self.changed,
        };
        let encoded = self
            .ctx
            .out
            .append_list(|buf| crate::proto::frame::encode(&msg, &[], buf));
        let Msg::Entries { entries, .. } = msg else {
            unreachable!("built just above")
        };
        all.push(entries, std::mem::take(&mut self.inos));
        drop(all);
        for (id, path, size) in big {
            self.ctx.ahead.offer(id, path, size);
        }
        match encoded {
            // Writer gone: the read loop sees the end.
            Err(_) | Ok(Ok(())) => {}
            Ok(Err(e)) => self.ctx.fatal.fail(
                &self.ctx.out,
                SessionError::Local(format!("encoding the file list: {e}")),
            ),
        }
    }
}

impl Drop for ListBatch<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The list as sent, in id order: whole batches, so that growing it never copies entries.
#[derive(Default)]
struct ListTable {
    /// Each batch with the id of its first entry, and (when kept) their inodes.
    batches: Vec<(FileId, Vec<Entry>, Vec<Ino>)>,
    len: FileId,
}

impl ListTable {
    fn len(&self) -> FileId {
        self.len
    }

    fn push(&mut self, batch: Vec<Entry>, inos: Vec<Ino>) {
        let first = self.len;
        self.len += batch.len() as FileId;
        self.batches.push((first, batch, inos));
    }

    fn get(&self, id: FileId) -> Option<&Entry> {
        let i = self.batches.partition_point(|(first, ..)| *first <= id);
        let (first, batch, _) = self.batches.get(i.checked_sub(1)?)?;
        batch.get((id - first) as usize)
    }
}

/// What every generation of one session shares.
struct Shared {
    pool: Arc<rayon::ThreadPool>,
    root: PathBuf,
    out: Out,
    obs: Arc<dyn Observer>,
    budget: Budget,
    scan: ScanOptions,
    fatal: Arc<super::Fatal>,
    gens: AtomicU64,
    /// Which big files are hashed ahead of the receiver's request.
    ahead: AheadPolicy,
}

/// One generation's state.
struct Ctx {
    pool: Arc<rayon::ThreadPool>,
    root: PathBuf,
    out: Out,
    obs: Arc<dyn Observer>,
    entries: RwLock<ListTable>,
    /// Keep each listed entry's inode (to hand the list back as an [`Index`]).
    keep_inos: bool,
    budget: Budget,
    big: Mutex<HashMap<FileId, BigFile>>,
    /// Files sent again because they changed while being read: how many times so far.
    attempts: Mutex<HashMap<FileId, u32>>,
    fatal: Arc<super::Fatal>,
    ahead: Arc<ahead::HashAhead>,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        self.ahead.stop();
    }
}

/// A big file waiting for the block signatures it asked for.
struct BigFile {
    /// The version that was hashed: the delta must be of the same one.
    snap: Snapshot,
    base_len: u64,
    params: SigParams,
    cvs: Vec<Cv>,
    /// The digest of a file of at most one chunk (its chaining value does not give it).
    one_chunk: Option<crate::engine::hash::Digest>,
    /// Block signatures of base chunks, as they arrive.
    parts: HashMap<u32, Bytes>,
}

/// The sending side of a session: starts generations, one at a time.
pub struct Sender(Arc<Shared>);

/// What a generation lists.
pub enum List {
    /// The whole tree, scanned now and streamed as it is read; `keep_index`: hand it back
    /// (with inodes) when the generation is done.
    Scan { keep_index: bool },
    /// These entries (parents before children; `true`: seen changing), and the root's own
    /// attributes. `read_errors`: parts of the tree could not be read, so the receiver must
    /// not take what is missing from the list for deleted.
    Given {
        entries: Vec<(Entry, bool)>,
        root: Option<Stamp>,
        read_errors: u32,
    },
}

/// One generation's instructions.
pub struct Plan {
    pub list: List,
    /// Renames: parkings, then placings (see [`crate::engine::index::ChangeSet`]).
    pub stash: Vec<(RelPath, RelPath)>,
    pub place: Vec<(RelPath, RelPath)>,
    /// Paths where the list is the truth (whatever else the receiver has there goes).
    pub scopes: Vec<RelPath>,
    /// The whole tree is such a scope (`--delete`, guarded).
    pub scope_root: bool,
    pub replace_dirs: bool,
}

impl Plan {
    /// Everything, with push semantics.
    pub fn whole(opts: &SyncOptions, keep_index: bool) -> Plan {
        Plan {
            list: List::Scan { keep_index },
            stash: Vec::new(),
            place: Vec::new(),
            scopes: Vec::new(),
            scope_root: opts.delete,
            replace_dirs: opts.delete,
        }
    }
}

/// A generation under way.
pub struct Gen(Arc<Ctx>);

/// How a generation ended, as the receiver reported it.
#[derive(Debug)]
pub struct GenDone {
    pub stats: Stats,
    /// Paths the receiver could not bring to what the sender expected.
    pub unsynced: Vec<RelPath>,
    pub overflow: bool,
    /// The scanned list with inodes ([`List::Scan`] with `keep_index`).
    pub index: Option<Index>,
}

impl Sender {
    /// `ahead`: which big files to hash before the receiver asks (never in a dry run, which
    /// asks for nothing, nor with `DEVSYNC_NO_HASH_AHEAD` set, to measure what it saves).
    pub fn new(
        out: Out,
        root: PathBuf,
        opts: &SyncOptions,
        obs: Arc<dyn Observer>,
        ahead: AheadPolicy,
    ) -> Result<Sender, SessionError> {
        let off = opts.dry_run || std::env::var_os("DEVSYNC_NO_HASH_AHEAD").is_some();
        Ok(Sender(Arc::new(Shared {
            pool: super::worker_pool("send")?,
            root,
            out,
            obs,
            budget: Budget::new(SEND_BUDGET),
            scan: ScanOptions {
                filters: opts.filters.clone(),
                checksum: opts.checksum,
                threads: 0,
                // Never sent, but never skipped without a word either (below).
                report_ours: true,
            },
            fatal: Default::default(),
            gens: AtomicU64::new(0),
            ahead: if off { AheadPolicy::Off } else { ahead },
        })))
    }

    pub fn out(&self) -> &Out {
        &self.0.out
    }

    /// Starts the next generation: queues its start, renames and scopes, then its list (from
    /// a scanner thread for [`List::Scan`]).
    pub fn start(&self, plan: Plan) -> Result<Gen, SessionError> {
        let sh = &self.0;
        let generation = sh.gens.fetch_add(1, Ordering::Relaxed);
        let keep_inos = matches!(plan.list, List::Scan { keep_index: true });
        let ctx = Arc::new(Ctx {
            pool: sh.pool.clone(),
            root: sh.root.clone(),
            out: sh.out.clone(),
            obs: sh.obs.clone(),
            entries: RwLock::new(ListTable::default()),
            keep_inos,
            budget: sh.budget.clone(),
            big: Mutex::new(HashMap::new()),
            attempts: Mutex::new(HashMap::new()),
            fatal: sh.fatal.clone(),
            ahead: ahead::HashAhead::new(Arc::new(files::chunk_cv), sh.ahead),
        });
        let out = &sh.out;
        out.send_listed(&Msg::GenStart {
            generation,
            whole: matches!(plan.list, List::Scan { .. }),
            replace_dirs: plan.replace_dirs,
        })?;
        for moves in plan.stash.chunks(MAX_BATCH) {
            out.send_listed(&Msg::Stash {
                moves: moves.to_vec(),
            })?;
        }
        for moves in plan.place.chunks(MAX_BATCH) {
            out.send_listed(&Msg::Place {
                moves: moves.to_vec(),
            })?;
        }
        if plan.scope_root || !plan.scopes.is_empty() {
            let mut chunks: Vec<&[RelPath]> = plan.scopes.chunks(MAX_BATCH).collect();
            if chunks.is_empty() {
                chunks.push(&[]);
            }
            for (i, paths) in chunks.into_iter().enumerate() {
                out.send_listed(&Msg::Scope {
                    root: plan.scope_root && i == 0,
                    paths: paths.to_vec(),
                })?;
            }
        }
        match plan.list {
            List::Scan { .. } => {
                let scan_ctx = ctx.clone();
                let scan_opts = sh.scan.clone();
                std::thread::Builder::new()
                    .name("devsync-scan".into())
                    .spawn(move || scan_ctx.stream_list(&scan_opts))
                    .map_err(|e| SessionError::Local(format!("starting scanner: {e}")))?;
            }
            List::Given {
                entries,
                root,
                read_errors,
            } => {
                {
                    let mut batch = ListBatch {
                        ctx: &ctx,
                        buf: Vec::new(),
                        inos: Vec::new(),
                        changed: false,
                    };
                    for (e, changed) in entries {
                        if changed != batch.changed {
                            batch.flush();
                            batch.changed = changed;
                        }
                        batch.push(e, (0, 0));
                    }
                }
                let count = ctx.entries.read().unwrap_or_else(|p| p.into_inner()).len();
                out.end_list(&Msg::EndOfList {
                    count,
                    scan_errors: read_errors,
                    root,
                })?;
            }
        }
        Ok(Gen(ctx))
    }

    /// Ends the session (after the last generation's `Done`).
    pub fn bye(&self) -> Result<(), SessionError> {
        Ok(self.0.out.send(Msg::Bye)?)
    }
}

/// Plays the sender for one session of one whole generation (a push, or a pull's helper);
/// returns the receiver's totals.
pub async fn run<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    out: Out,
    root: PathBuf,
    opts: SyncOptions,
    obs: Arc<dyn Observer>,
) -> Result<Stats, SessionError> {
    let plan = super::copy::plan(&opts, &root, false, &*obs)?;
    // (A pull's helper: its window before the request is one round trip, and it keeps no
    // record of what the client has.)
    let sender = Sender::new(out, root, &opts, obs, AheadPolicy::Off)?;
    let generation = sender.start(plan)?;
    finish(reader, &sender, &generation).await
}

/// Serves a started one-generation session to its end.
pub async fn finish<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    sender: &Sender,
    generation: &Gen,
) -> Result<Stats, SessionError> {
    let done = serve(reader, generation).await?;
    sender.bye()?;
    Ok(done.stats)
}

/// Answers the receiver for generation `generation` until it reports the generation done.
pub async fn serve<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    generation: &Gen,
) -> Result<GenDone, SessionError> {
    let ctx = &generation.0;
    // However the generation ends, nothing more is hashed ahead for it.
    struct Over<'a>(&'a ahead::HashAhead);
    impl Drop for Over<'_> {
        fn drop(&mut self) {
            self.0.stop();
        }
    }
    let _over = Over(&ctx.ahead);
    loop {
        let (msg, payload) = super::next_frame(reader, &ctx.fatal, &ctx.out).await?;
        match msg {
            Msg::NeedWhole { ids } => {
                let mut small = Vec::new();
                let mut small_bytes = 0;
                for id in ids {
                    ctx.ahead.unwanted(id);
                    let (path, size) = ctx.file(id)?;
                    if size > SMALL_FILE {
                        let c = ctx.clone();
                        ctx.pool.spawn(move || c.send_whole(id, path));
                        continue;
                    }
                    small.push((id, path, size));
                    small_bytes += size;
                    if small.len() >= BATCH_FILES || small_bytes >= BATCH_BYTES {
                        let (c, batch) = (ctx.clone(), std::mem::take(&mut small));
                        ctx.pool.spawn(move || c.send_batch(batch));
                        small_bytes = 0;
                    }
                }
                if !small.is_empty() {
                    let c = ctx.clone();
                    ctx.pool.spawn(move || c.send_batch(small));
                }
            }
            Msg::Signature {
                id,
                base_len,
                params,
                cvs,
            } => {
                ctx.ahead.unwanted(id);
                let path = ctx.file_path(id)?;
                let c = ctx.clone();
                ctx.pool
                    .spawn(move || c.send_delta_small(id, path, base_len, params, cvs, payload));
            }
            Msg::NeedDelta {
                id,
                base_len,
                params,
            } => {
                let path = ctx.file_path(id)?;
                let c = ctx.clone();
                ctx.pool
                    .spawn(move || c.hash_for_delta(id, path, base_len, params));
            }
            Msg::SigPart { id, chunk } => ctx.add_part(id, chunk, payload)?,
            Msg::DeltaRequest { id, chunks, full } => {
                let path = ctx.file_path(id)?;
                let big = ctx.take_big(id)?;
                let c = ctx.clone();
                let req = files::BigRequest::Delta { chunks, full };
                ctx.pool.spawn(move || c.send_big(id, path, big, req));
            }
            Msg::NeedChunks { id, chunks } => {
                let path = ctx.file_path(id)?;
                let big = ctx.take_big(id)?;
                let c = ctx.clone();
                let req = files::BigRequest::Literal(chunks);
                ctx.pool.spawn(move || c.send_big(id, path, big, req));
            }
            Msg::Ping => {}
            Msg::Event(ev) => ctx.obs.event(ev),
            Msg::Done {
                stats,
                unsynced,
                overflow,
            } => {
                let index = ctx.keep_inos.then(|| ctx.index());
                return Ok(GenDone {
                    stats,
                    unsynced,
                    overflow,
                    index,
                });
            }
            Msg::Fatal { message } => return Err(SessionError::Remote(message)),
            other => {
                return Err(ctx.violation(format!("unexpected message for a sender: {other:?}")));
            }
        }
    }
}

impl Ctx {
    fn violation(&self, what: String) -> SessionError {
        super::Fatal::violation(&self.out, what)
    }

    /// Stores a signature part of a big file's base.
    fn add_part(&self, id: FileId, chunk: u32, part: Bytes) -> Result<(), SessionError> {
        let mut big = super::lock(&self.big);
        let ok = big.get_mut(&id).is_some_and(|b| {
            u64::from(chunk) < chunk_count(b.base_len) && b.parts.insert(chunk, part).is_none()
        });
        drop(big);
        if ok {
            Ok(())
        } else {
            Err(self.violation(format!("unexpected signature part {chunk} of file {id}")))
        }
    }

    /// The hashed big file a delta or chunk request is for.
    fn take_big(&self, id: FileId) -> Result<BigFile, SessionError> {
        super::lock(&self.big)
            .remove(&id)
            .ok_or_else(|| self.violation(format!("chunk request for file {id} before its hashes")))
    }

    fn file_path(&self, id: FileId) -> Result<PathBuf, SessionError> {
        self.file(id).map(|(p, _)| p)
    }

    /// Path and listed size of file `id` (a protocol violation if it is not a listed file).
    fn file(&self, id: FileId) -> Result<(PathBuf, u64), SessionError> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        match entries.get(id) {
            Some(Entry {
                path,
                kind: EntryKind::File { size, .. },
                ..
            }) => Ok((self.root.join(path.as_os_str()), *size)),
            _ => Err(self.violation(format!("request for unknown file id {id}"))),
        }
    }

    /// The list as sent, with inodes, as an index.
    fn index(&self) -> Index {
        let mut ix = Index::new();
        let table = self.entries.read().unwrap_or_else(|p| p.into_inner());
        for (_, batch, inos) in &table.batches {
            for (e, ino) in batch
                .iter()
                .zip(inos.iter().chain(std::iter::repeat(&(0, 0))))
            {
                ix.insert(e.clone(), *ino);
            }
        }
        ix
    }

    /// Scans and streams entries; ids are list positions.
    fn stream_list(&self, opts: &ScanOptions) {
        crate::trace!("send", "scanning");
        let errors = std::sync::atomic::AtomicU32::new(0);
        let result = Scanner::new(&self.root, opts).and_then(|sc| {
            sc.all(&|| {
                let mut batch = ListBatch {
                    ctx: self,
                    buf: Vec::with_capacity(32),
                    inos: Vec::new(),
                    changed: false,
                };
                let errors = &errors;
                move |ev| match ev {
                    ScanEvent::Entry(entry, ino) => batch.push(entry, ino),
                    ScanEvent::Skipped { path, reason } => self.obs.event(Event::Warning {
                        path,
                        message: reason,
                    }),
                    ScanEvent::Error { path, message } => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        self.obs.event(Event::Error { path, message })
                    }
                    // devsync's own (its name carries our check hash): not the user's data,
                    // so not sent, but said, in case it ever were.
                    ScanEvent::Ours { path, .. } => self.obs.event(Event::Warning {
                        path: path.to_string(),
                        message: "not sent: a devsync temp or partial file (a sync into this \
                                  directory is under way, or one was interrupted)"
                            .into(),
                    }),
                }
            })
        });
        match result {
            Ok(()) => {
                let count = self.entries.read().unwrap_or_else(|p| p.into_inner()).len();
                let scan_errors = errors.into_inner();
                crate::trace!("send", "list of {count} entries complete");
                // In list order, so a transport may send the whole list ahead of the writer.
                let _ = self.out.end_list(&Msg::EndOfList {
                    count,
                    scan_errors,
                    root: root_stamp(&self.root),
                }); // writer gone: the read loop sees the end
            }
            Err(e) => self.fatal.fail(
                &self.out,
                SessionError::Local(format!("scanning the source: {e}")),
            ),
        }
    }
}

/// The root's own attributes, as they are now (once its entries were read).
pub fn root_stamp(root: &std::path::Path) -> Option<Stamp> {
    std::fs::metadata(root).ok().map(|md| Stamp {
        mode: std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & MODE_MASK,
        mtime: crate::engine::Mtime::of(&md),
    })
}
