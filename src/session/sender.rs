//! Sender role: stream the file list, then answer the receiver's requests with whole files,
//! chunk copies and deltas. Bulk work runs on rayon; the async loop here only reads frames and
//! dispatches, so it never blocks and the receiver can always make progress.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use rayon::prelude::*;
use tokio::io::AsyncRead;

use super::conn::{Budget, Out};
use super::{Observer, SessionError};
use crate::engine::delta::{self, SigParams};
use crate::engine::hash::{self, CHUNK, Cv, chunk_count, chunk_span};
use crate::engine::scan::{self, ScanEvent, ScanOptions};
use crate::engine::{Entry, EntryKind};
use crate::proto::{Event, FileId, FrameReader, Msg, Stats, SyncOptions, WholeItem};

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
    pool: rayon::ThreadPool,
    root: PathBuf,
    out: Out,
    obs: Arc<dyn Observer>,
    entries: RwLock<ListTable>,
    budget: Budget,
    big: Mutex<HashMap<FileId, BigFile>>,
    fatal: super::Fatal,
}

/// A big file waiting for the block signatures it asked for.
struct BigFile {
    len: u64,
    base_len: u64,
    params: SigParams,
    cvs: Vec<Cv>,
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
        fatal: Default::default(),
    });
    let scan_ctx = ctx.clone();
    let scan_opts = ScanOptions {
        filters: opts.filters.clone(),
        checksum: opts.checksum,
        threads: 0,
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
                let Some(big) = super::lock(&ctx.big).remove(&id) else {
                    return Err(
                        ctx.violation(format!("delta request for file {id} before its hashes"))
                    );
                };
                let c = ctx.clone();
                ctx.pool
                    .spawn(move || c.send_delta_big(id, path, big, chunks, full));
            }
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
            }
        });
        match result {
            Ok(()) => {
                let count = self.entries.read().unwrap_or_else(|p| p.into_inner()).len();
                let scan_errors = errors.into_inner();
                crate::trace!("send", "list of {count} entries complete");
                let _ = self.out.send(Msg::EndOfList { count, scan_errors });
            }
            Err(e) => self.fatal.fail(
                &self.out,
                SessionError::Local(format!("scanning the source: {e}")),
            ),
        }
    }

    fn open(&self, path: &PathBuf) -> io::Result<(File, u64)> {
        let f = File::options()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)?;
        let len = f.metadata()?.len();
        Ok((f, len))
    }

    fn failed(&self, id: FileId, e: io::Error) {
        // A file that vanished or changed while being read is picked up by the next sync.
        let transient = matches!(
            e.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::UnexpectedEof
        );
        let message = match e.kind() {
            io::ErrorKind::NotFound => "vanished before it could be sent".to_string(),
            io::ErrorKind::UnexpectedEof => {
                "changed while being sent; it will be sent by the next sync".to_string()
            }
            _ => format!("reading: {e}"),
        };
        self.obs.file_done();
        let _ = self.out.send(Msg::SendFailed {
            id,
            message,
            transient,
        });
    }

    /// Small files, read and sent as one frame.
    fn send_batch(&self, files: Vec<(FileId, PathBuf, u64)>) {
        let mut items = Vec::with_capacity(files.len());
        // Sized from the listed sizes and filled in place: no per-file buffers, no regrowth.
        let mut payload: Vec<u8> = Vec::with_capacity(files.iter().map(|f| f.2 as usize).sum());
        let mut permits = Vec::new();
        for (id, path, _) in files {
            let start = payload.len();
            let read = self.open(&path).and_then(|(f, len)| {
                if len > SMALL_FILE {
                    return Ok(false); // grew since the scan: send it on its own
                }
                permits.push(self.budget.acquire(len));
                hash::read_at_into(&f, 0, len as usize, &mut payload).map(|()| true)
            });
            match read {
                Ok(true) => {
                    let data = &payload[start..];
                    let n = data.len() as u64;
                    self.obs.planned(n);
                    items.push(WholeItem {
                        id,
                        len: n as u32,
                        digest: *blake3::hash(data).as_bytes(),
                    });
                    self.obs.progressed(n);
                    self.obs.file_done();
                }
                Ok(false) => self.send_whole(id, path),
                Err(e) => self.failed(id, e),
            }
        }
        if !items.is_empty() {
            let permit = self.budget.merge(permits);
            let _ = self.out.send_data(
                Msg::WholeFiles { files: items },
                Bytes::from(payload),
                permit,
            );
        }
    }

    fn send_whole(&self, id: FileId, path: PathBuf) {
        if let Err(e) = self.try_send_whole(id, &path) {
            self.failed(id, e);
        }
    }

    fn try_send_whole(&self, id: FileId, path: &PathBuf) -> io::Result<()> {
        let (f, len) = self.open(path)?;
        self.obs.planned(len);
        if len <= CHUNK {
            let permit = self.budget.acquire(len);
            let buf = hash::read_chunk(&f, len, 0)?;
            let item = WholeItem {
                id,
                len: buf.len() as u32,
                digest: *blake3::hash(&buf).as_bytes(),
            };
            let _ = self.out.send_data(
                Msg::WholeFiles { files: vec![item] },
                Bytes::from(buf),
                Some(permit),
            );
            self.obs.progressed(len);
            self.obs.file_done();
            return Ok(());
        }
        let cvs: Vec<Cv> = (0..chunk_count(len))
            .into_par_iter()
            .map(|k| {
                let permit = self.budget.acquire(CHUNK);
                let buf = hash::read_chunk(&f, len, k)?;
                let cv = hash::chunk_cv(k, &buf);
                let n = buf.len() as u64;
                let _ = self.out.send_data(
                    Msg::Data {
                        id,
                        chunk: k as u32,
                    },
                    Bytes::from(buf),
                    Some(permit),
                );
                self.obs.progressed(n);
                Ok(cv)
            })
            .collect::<io::Result<_>>()?;
        self.finish_file(id, &f, len, &cvs)
    }

    /// Sends `FileEnd` with the digest of what was sent.
    fn finish_file(&self, id: FileId, f: &File, len: u64, cvs: &[Cv]) -> io::Result<()> {
        let digest = match hash::digest_from_cvs(cvs, len) {
            Some(d) => d,
            None => hash::file_digest(f, len)?,
        };
        let _ = self.out.send(Msg::FileEnd { id, len, digest });
        self.obs.file_done();
        Ok(())
    }

    /// Chaining values of all chunks of `f`, and which equal the base chunk at the same offset.
    fn own_cvs(
        &self,
        f: &File,
        len: u64,
        base_len: u64,
        base_cvs: &[Cv],
    ) -> io::Result<(Vec<Cv>, Vec<bool>)> {
        let cvs: Vec<Cv> = (0..chunk_count(len))
            .into_par_iter()
            .map(|k| hash::read_chunk(f, len, k).map(|b| hash::chunk_cv(k, &b)))
            .collect::<io::Result<_>>()?;
        let same = cvs
            .iter()
            .enumerate()
            .map(|(k, cv)| {
                let k64 = k as u64;
                base_cvs.get(k) == Some(cv) && chunk_span(len, k64).1 == chunk_span(base_len, k64).1
            })
            .collect();
        Ok((cvs, same))
    }

    fn send_delta_small(
        &self,
        id: FileId,
        path: PathBuf,
        base_len: u64,
        params: SigParams,
        base_cvs: Vec<Cv>,
        sig: Bytes,
    ) {
        let r = (|| {
            let (f, len) = self.open(&path)?;
            self.obs.planned(len);
            let (cvs, same) = self.own_cvs(&f, len, base_len, &base_cvs)?;
            if len == base_len && same.iter().all(|&s| s) {
                return self.identical(id, len);
            }
            let sig =
                delta::join_signatures(&[(&sig, base_len as usize)], params).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("receiver's signature: {e}"),
                    )
                })?;
            let index = sig.index();
            let window = (0, chunk_count(base_len));
            self.send_chunks(
                id,
                &f,
                len,
                &|k| !same[k as usize],
                true,
                params.block_size,
                &|_| Ok((window, &index)),
            )?;
            self.finish_file(id, &f, len, &cvs)
        })();
        if let Err(e) = r {
            self.failed(id, e);
        }
    }

    fn identical(&self, id: FileId, len: u64) -> io::Result<()> {
        let _ = self.out.send(Msg::Identical { id });
        self.obs.progressed(len);
        self.obs.file_done();
        Ok(())
    }

    /// Sends the chunks of `f`: a delta against the window `index_for(k)` returns for those
    /// `diffed` says, a `Copy` (if `copies`) for the others, which equal the base chunk at the
    /// same offset. Chunks go out in parallel. A diffed chunk next to another diffed chunk
    /// overlaps it by one block less a byte, so a block shifted across the boundary still
    /// matches (no per-chunk loss after an insertion).
    #[allow(clippy::too_many_arguments)] // the knobs of one loop; a struct would only rename them
    fn send_chunks<'s>(
        &self,
        id: FileId,
        f: &File,
        len: u64,
        diffed: &(dyn Fn(u64) -> bool + Sync),
        copies: bool,
        block: u32,
        index_for: &(
             dyn Fn(u64) -> io::Result<((u64, u64), &'s fast_rsync::IndexedSignature<'s>)> + Sync
         ),
    ) -> io::Result<()> {
        let n_chunks = chunk_count(len);
        let diffed = |k: u64| k < n_chunks && diffed(k);
        (0..n_chunks).into_par_iter().try_for_each(|k| {
            let chunk = k as u32;
            let (off, n) = chunk_span(len, k);
            if !diffed(k) {
                if copies {
                    let _ = self.out.send(Msg::Copy { id, chunk });
                }
            } else {
                let overlap = u64::from(block) - 1;
                let pre = if k > 0 && diffed(k - 1) { overlap } else { 0 };
                let post = if diffed(k + 1) {
                    overlap.min(len - off - n as u64)
                } else {
                    0
                };
                let permit = self.budget.acquire(n as u64);
                let mut data = vec![0u8; (pre + n as u64 + post) as usize];
                f.read_exact_at(&mut data, off - pre)?;
                let ((start, count), index) = index_for(k)?;
                let d = if delta::probably_matches(index, &data, block) {
                    let full = delta::diff(index, &data).map_err(io::Error::other)?;
                    delta::trim(&full, pre, pre + n as u64)
                        .map_err(io::Error::other)?
                        .delta
                } else {
                    let own = &data[pre as usize..pre as usize + n];
                    delta::literal(own)
                };
                let msg = Msg::Delta {
                    id,
                    chunk,
                    window_start: start as u32,
                    window_len: count as u32,
                    len: n as u32,
                };
                let _ = self.out.send_data(msg, Bytes::from(d), Some(permit));
            }
            self.obs.progressed(n as u64);
            Ok(())
        })
    }

    /// First step of a big file's delta: hash our chunks and tell the receiver, which
    /// compares them with its copy as it reads it once, then asks for what differs.
    fn hash_for_delta(&self, id: FileId, path: PathBuf, base_len: u64, params: SigParams) {
        let r = (|| {
            let (f, len) = self.open(&path)?;
            self.obs.planned(len);
            crate::trace!("send", "{}: hashing own chunks", path.display());
            let cvs: Vec<Cv> = (0..chunk_count(len))
                .into_par_iter()
                .map(|k| hash::read_chunk(&f, len, k).map(|b| hash::chunk_cv(k, &b)))
                .collect::<io::Result<_>>()?;
            crate::trace!("send", "{}: own chunks hashed", path.display());
            let big = BigFile {
                len,
                base_len,
                params,
                cvs: cvs.clone(),
                parts: HashMap::new(),
            };
            super::lock(&self.big).insert(id, big);
            let _ = self.out.send(Msg::NewHashes { id, len, cvs });
            Ok(())
        })();
        if let Err(e) = r {
            self.failed(id, e);
        }
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

    /// Deltas for the chunks the receiver found different, then `FileEnd`.
    fn send_delta_big(&self, id: FileId, path: PathBuf, b: BigFile, chunks: Vec<u32>, full: bool) {
        crate::trace!(
            "send",
            "{}: signatures in, diffing {} chunks",
            path.display(),
            chunks.len()
        );
        let r = (|| {
            let (f, len) = self.open(&path)?;
            if len != b.len {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            let base_chunks = chunk_count(b.base_len);
            let window_sig = |start: u64, count: u64| -> io::Result<fast_rsync::Signature> {
                let mut parts = Vec::with_capacity(count as usize);
                for j in start..start + count {
                    let part = b.parts.get(&(j as u32)).ok_or_else(|| {
                        io::Error::other(format!(
                            "the receiver sent no signature of base chunk {j}"
                        ))
                    })?;
                    parts.push((&part[..], chunk_span(b.base_len, j).1));
                }
                delta::join_signatures(&parts, b.params).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("receiver's signature: {e}"),
                    )
                })
            };
            let window = |k: u64| {
                if full {
                    (0, base_chunks)
                } else {
                    delta::window_for(k, base_chunks)
                }
            };
            // One index over the whole base, or one per neighbourhood window.
            let mut windows: Vec<(u64, u64)> =
                chunks.iter().map(|&k| window(u64::from(k))).collect();
            windows.dedup();
            let sigs: Vec<fast_rsync::Signature> = windows
                .iter()
                .map(|&(s, n)| window_sig(s, n))
                .collect::<io::Result<_>>()?;
            let indexes: Vec<fast_rsync::IndexedSignature<'_>> =
                sigs.iter().map(|s| s.index()).collect();
            let index_for = |k: u64| {
                let w = window(k);
                let i = windows
                    .iter()
                    .position(|&x| x == w)
                    .ok_or_else(|| io::Error::other("no window"))?;
                Ok((w, &indexes[i]))
            };
            let diffed = |k: u64| chunks.binary_search(&(k as u32)).is_ok();
            self.send_chunks(id, &f, len, &diffed, false, b.params.block_size, &index_for)?;
            self.finish_file(id, &f, len, &b.cvs)
        })();
        if let Err(e) = r {
            self.failed(id, e);
        }
    }
}
