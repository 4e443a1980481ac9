//! Sender role: stream the file list, then answer the receiver's requests with whole files,
//! chunk copies and deltas ([`files`]). Bulk work runs on rayon; the async loop here only reads
//! frames and dispatches, so it never blocks and the receiver can always make progress.

mod files;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use tokio::io::AsyncRead;

use super::conn::{Budget, Out};
use super::{Observer, SessionError};
use crate::engine::delta::SigParams;
use crate::engine::hash::{Cv, chunk_count};
use crate::engine::scan::{self, ScanEvent, ScanOptions};
use crate::engine::source::Snapshot;
use crate::engine::{Entry, EntryKind, MODE_MASK};
use crate::proto::{Event, FileId, FrameReader, Msg, Stamp, Stats, SyncOptions};

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
}

impl ListBatch<'_> {
    fn push(&mut self, entry: Entry) {
        self.buf.push(entry);
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
        let msg = Msg::Entries {
            first_id: all.len(),
            entries: std::mem::take(&mut self.buf),
        };
        let encoded = self
            .ctx
            .out
            .append_list(|buf| crate::proto::frame::encode(&msg, &[], buf));
        let Msg::Entries { entries, .. } = msg else {
            unreachable!("built just above")
        };
        all.push(entries);
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
    /// Each batch with the id of its first entry.
    batches: Vec<(FileId, Vec<Entry>)>,
    len: FileId,
}

impl ListTable {
    fn len(&self) -> FileId {
        self.len
    }

    fn push(&mut self, batch: Vec<Entry>) {
        let first = self.len;
        self.len += batch.len() as FileId;
        self.batches.push((first, batch));
    }

    fn get(&self, id: FileId) -> Option<&Entry> {
        let i = self.batches.partition_point(|(first, _)| *first <= id);
        let (first, batch) = self.batches.get(i.checked_sub(1)?)?;
        batch.get((id - first) as usize)
    }
}

struct Ctx {
    pool: Arc<rayon::ThreadPool>,
    root: PathBuf,
    out: Out,
    obs: Arc<dyn Observer>,
    entries: RwLock<ListTable>,
    budget: Budget,
    big: Mutex<HashMap<FileId, BigFile>>,
    /// Files sent again because they changed while being read: how many times so far.
    attempts: Mutex<HashMap<FileId, u32>>,
    /// How recent a change makes a read suspect ([`crate::engine::source::RACY_WINDOW`]).
    racy: std::time::Duration,
    fatal: super::Fatal,
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

/// A sender whose list is already streaming into its [`Out`] (possibly before the connection
/// exists: frames queue until the writer starts).
pub struct Started(Arc<Ctx>);

/// Starts scanning `root` and queueing the list.
pub fn start(
    out: Out,
    root: PathBuf,
    opts: &SyncOptions,
    obs: Arc<dyn Observer>,
) -> Result<Started, SessionError> {
    let ctx = Arc::new(Ctx {
        pool: super::worker_pool("send")?,
        root,
        out,
        obs,
        entries: RwLock::new(ListTable::default()),
        budget: Budget::new(SEND_BUDGET),
        big: Mutex::new(HashMap::new()),
        attempts: Mutex::new(HashMap::new()),
        racy: crate::engine::source::RACY_WINDOW,
        fatal: Default::default(),
    });
    let scan_ctx = ctx.clone();
    let scan_opts = ScanOptions {
        filters: opts.filters.clone(),
        checksum: opts.checksum,
        threads: 0,
        report_ours: false,
    };
    std::thread::Builder::new()
        .name("devsync-scan".into())
        .spawn(move || scan_ctx.stream_list(&scan_opts))
        .map_err(|e| SessionError::Local(format!("starting scanner: {e}")))?;
    Ok(Started(ctx))
}

/// Runs the sender until the receiver reports completion; returns the receiver's totals.
pub async fn run<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    out: Out,
    root: PathBuf,
    opts: SyncOptions,
    obs: Arc<dyn Observer>,
) -> Result<Stats, SessionError> {
    serve(reader, start(out, root, &opts, obs)?).await
}

/// Answers the receiver for a started sender.
pub async fn serve<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    started: Started,
) -> Result<Stats, SessionError> {
    let ctx = started.0;
    loop {
        let (msg, payload) = super::next_frame(reader, &ctx.fatal, &ctx.out).await?;
        match msg {
            Msg::NeedWhole { ids } => {
                let mut small = Vec::new();
                let mut small_bytes = 0;
                for id in ids {
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
            Msg::Done { stats } => {
                ctx.out.send(Msg::Bye)?;
                return Ok(stats);
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

    /// Scans and streams entries; ids are list positions.
    fn stream_list(&self, opts: &ScanOptions) {
        crate::trace!("send", "scanning");
        let errors = std::sync::atomic::AtomicU32::new(0);
        let result = scan::scan_each(&self.root, opts, &|| {
            let mut batch = ListBatch {
                ctx: self,
                buf: Vec::with_capacity(32),
            };
            let errors = &errors;
            move |ev| match ev {
                ScanEvent::Entry(entry) => batch.push(entry),
                ScanEvent::Skipped { path, reason } => self.obs.event(Event::Warning {
                    path,
                    message: reason,
                }),
                ScanEvent::Error { path, message } => {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.obs.event(Event::Error { path, message })
                }
                // Not asked for (and never part of the list).
                ScanEvent::Ours { .. } => {}
            }
        });
        match result {
            Ok(()) => {
                let count = self.entries.read().unwrap_or_else(|p| p.into_inner()).len();
                let scan_errors = errors.into_inner();
                crate::trace!("send", "list of {count} entries complete");
                // The root's own attributes, as they are once its entries were read.
                let root = std::fs::metadata(&self.root).ok().map(|md| Stamp {
                    mode: std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & MODE_MASK,
                    mtime: crate::engine::Mtime::of(&md),
                });
                let _ = self.out.send(Msg::EndOfList {
                    count,
                    scan_errors,
                    root,
                });
            }
            Err(e) => self.fatal.fail(
                &self.out,
                SessionError::Local(format!("scanning the source: {e}")),
            ),
        }
    }
}
