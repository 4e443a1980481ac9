//! Sending file content: small files many to a frame, big ones chunk by chunk, deltas against
//! the receiver's copy. Every read is checked with [`Source::check`]: a file that changed while
//! it was read is read again (if nothing of it went out yet) or started over on the receiver
//! with `Restart`, at most [`MAX_ATTEMPTS`] times; a file that never holds still is reported
//! per path and the receiver keeps its old copy. Only a version that really existed is sent.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use rayon::prelude::*;

use super::{BATCH_BYTES, BATCH_FILES, BigFile, Ctx, SMALL_FILE};
use crate::engine::delta::{self, SigParams};
use crate::engine::hash::{self, CHUNK, Cv, Digest, chunk_count, chunk_span};
use crate::engine::source::{self, Snapshot, Source, Stability};
use crate::proto::{FileId, Msg, Stamp, WholeItem};

/// Reads of one file per session before it is given up as "changing while being sent".
pub(super) const MAX_ATTEMPTS: u32 = 4;
/// Pause before attempt 2, 3 and 4: an editor's save or a build step writing its output is
/// over well within this; a file written all the time (a busy log) is given up after ~0.3 s.
const BACKOFF: [Duration; 3] = [
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(250),
];

/// Why one attempt at sending a file did not finish.
pub(super) enum Fail {
    Io(io::Error),
    /// The file changed while it was read. `sent`: some of this attempt already went out, so
    /// the receiver must be told to start over.
    Changed {
        sent: bool,
    },
}

impl From<io::Error> for Fail {
    fn from(e: io::Error) -> Fail {
        // A read that came up short means the file shrank after we looked at its size.
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Fail::Changed { sent: false }
        } else {
            Fail::Io(e)
        }
    }
}

/// What a chunk request for a hashed big file asks for.
pub(super) enum BigRequest {
    /// Deltas of these chunks against the whole base (`full`) or their neighbourhoods.
    Delta { chunks: Vec<u32>, full: bool },
    /// These chunks as literal data (the receiver has the rest).
    Literal(Vec<u32>),
}

fn stamp(s: &Snapshot) -> Stamp {
    Stamp {
        mode: s.mode,
        mtime: s.mtime,
    }
}

/// Whether the read of `src` was of one version; waits out a racy window before saying no.
fn settled(src: &Source, sent: bool) -> Result<(), Fail> {
    match src.check()? {
        Stability::Stable => Ok(()),
        Stability::Changed => Err(Fail::Changed { sent }),
        Stability::Racy => {
            source::wait_out_racy(&src.before);
            Err(Fail::Changed { sent })
        }
    }
}

/// Chunk `k` of `src` (`len` bytes): its chaining value and, for a file of at most one chunk,
/// its digest.
fn chunk_hash(src: &Source, len: u64, k: u64) -> io::Result<(Cv, Option<Digest>)> {
    let (off, n) = chunk_span(len, k);
    // A hole is zeros: hashed without reading it.
    if len > CHUNK && src.is_hole(off, n as u64) {
        return Ok((hash::zero_cv(k, n), None));
    }
    hash::read_chunk(&src.file, len, k).map(|b| {
        let whole = (len <= CHUNK).then(|| *blake3::hash(&b).as_bytes());
        (hash::chunk_cv(k, &b), whole)
    })
}

/// Chunk `k`'s chaining value, as [`own_hashes`](Ctx::own_hashes) computes it.
pub(super) fn chunk_cv(src: &Source, len: u64, k: u64) -> io::Result<Cv> {
    chunk_hash(src, len, k).map(|(cv, _)| cv)
}

impl Ctx {
    /// Runs `attempt` until it has read a stable version of file `id`, retrying at once what
    /// never went out and restarting on the receiver what did. `None` when it gave up (and
    /// reported why) or asked the receiver to start over. `last`: this step finishes the file
    /// (the count of attempts carries over from a big file's hashing to its delta).
    fn stable<T>(
        &self,
        id: FileId,
        last: bool,
        mut attempt: impl FnMut() -> Result<T, Fail>,
    ) -> Option<T> {
        loop {
            if self.out.is_closed() {
                return None; // the session is over: nobody reads what we would send
            }
            match attempt() {
                Ok(v) => {
                    if last {
                        super::super::lock(&self.attempts).remove(&id);
                    }
                    return Some(v);
                }
                Err(Fail::Io(e)) => {
                    super::super::lock(&self.attempts).remove(&id);
                    self.failed(id, e);
                    return None;
                }
                Err(Fail::Changed { sent }) => {
                    let n = {
                        let mut a = super::super::lock(&self.attempts);
                        let n = a.entry(id).or_insert(0);
                        *n += 1;
                        *n
                    };
                    crate::trace!("send", "file {id} changed while being read (attempt {n})");
                    if n >= MAX_ATTEMPTS {
                        super::super::lock(&self.attempts).remove(&id);
                        self.failed_changed(id);
                        return None;
                    }
                    std::thread::sleep(BACKOFF[(n as usize - 1).min(BACKOFF.len() - 1)]);
                    if sent {
                        let _ = self.out.send(Msg::Restart { id }); // writer gone: loop sees it
                        return None;
                    }
                }
            }
        }
    }

    /// Whether this is the first attempt at file `id` (progress counts a file once).
    fn first_attempt(&self, id: FileId) -> bool {
        !super::super::lock(&self.attempts).contains_key(&id)
    }

    fn failed(&self, id: FileId, e: io::Error) {
        // A file that vanished is picked up (as deleted) by the next sync.
        let transient = e.kind() == io::ErrorKind::NotFound;
        let message = if transient {
            "vanished before it could be sent".to_string()
        } else {
            format!("reading: {e}")
        };
        self.obs.file_done();
        let _ = self.out.send(Msg::SendFailed {
            id,
            message,
            transient,
        });
    }

    fn failed_changed(&self, id: FileId) {
        self.obs.file_done();
        let _ = self.out.send(Msg::SendFailed {
            id,
            message: format!(
                "changed while being sent ({MAX_ATTEMPTS} attempts); not updated, the receiving \
                 side keeps its old copy"
            ),
            transient: false,
        });
    }

    /// Small files, read and sent as one frame. The batch's whole budget is taken once, up
    /// front, and held by nothing else while this thread waits: a pool of any size cannot
    /// hold all the budget in partial batches while each waits for more.
    pub(super) fn send_batch(&self, files: Vec<(FileId, PathBuf, u64)>) {
        let listed: u64 = files.iter().map(|f| f.2).sum();
        let mut permit = Some(self.budget.acquire(listed.max(1)));
        let mut items = Vec::with_capacity(files.len());
        // Sized from the listed sizes and filled in place: no per-file buffers, no regrowth.
        let mut payload: Vec<u8> = Vec::with_capacity(listed as usize);
        // Files that grew past a small file since the scan go on their own, after the batch.
        let mut grown = Vec::new();
        for (id, path, _) in files {
            if self.out.is_closed() {
                return; // the session is over: nobody reads what we would send
            }
            let start = payload.len();
            let first = self.first_attempt(id);
            let read = self.stable(id, true, || {
                payload.truncate(start);
                let src = Source::open(&path)?;
                if src.len() > SMALL_FILE {
                    return Ok(None);
                }
                hash::read_at_into(&src.file, 0, src.len() as usize, &mut payload)?;
                settled(&src, false)?;
                Ok(Some(src.before))
            });
            match read {
                Some(Some(snap)) => {
                    let data = &payload[start..];
                    let n = data.len() as u64;
                    if first {
                        self.obs.planned(n);
                    }
                    items.push(WholeItem {
                        id,
                        len: n as u32,
                        digest: *blake3::hash(data).as_bytes(),
                        stamp: stamp(&snap),
                    });
                    self.obs.progressed(n);
                    self.obs.file_done();
                }
                Some(None) => grown.push((id, path)),
                None => payload.truncate(start),
            }
            if items.len() >= BATCH_FILES || payload.len() as u64 >= BATCH_BYTES {
                self.flush_batch(&mut items, &mut payload, permit.take());
            }
        }
        self.flush_batch(&mut items, &mut payload, permit.take());
        for (id, path) in grown {
            self.send_whole(id, path);
        }
    }

    fn flush_batch(
        &self,
        items: &mut Vec<WholeItem>,
        payload: &mut Vec<u8>,
        permit: Option<crate::session::conn::Permit>,
    ) {
        if items.is_empty() {
            return;
        }
        let _ = self.out.send_data(
            Msg::WholeFiles {
                files: std::mem::take(items),
            },
            Bytes::from(std::mem::take(payload)),
            permit,
        );
    }

    pub(super) fn send_whole(&self, id: FileId, path: PathBuf) {
        let first = self.first_attempt(id);
        self.stable(id, true, || self.try_send_whole(id, &path, first));
    }

    fn try_send_whole(&self, id: FileId, path: &Path, first: bool) -> Result<(), Fail> {
        let src = Source::open(path)?;
        let len = src.len();
        if first {
            self.obs.planned(len);
        }
        if len <= CHUNK {
            let permit = self.budget.acquire(len);
            let buf = hash::read_chunk(&src.file, len, 0)?;
            settled(&src, false)?;
            let item = WholeItem {
                id,
                len: buf.len() as u32,
                digest: *blake3::hash(&buf).as_bytes(),
                stamp: stamp(&src.before),
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
        // Holes travel as holes: announced first, then nothing but their length.
        let sparse = src.is_sparse();
        if sparse {
            let _ = self.out.send(Msg::Sparse { id });
        }
        let cvs: Vec<Cv> = (0..chunk_count(len))
            .into_par_iter()
            .map(|k| {
                if self.out.is_closed() {
                    return Err(io::Error::other("the session is over"));
                }
                let (off, n) = chunk_span(len, k);
                let chunk = k as u32;
                if sparse && src.is_hole(off, n as u64) {
                    let msg = Msg::Zeros {
                        id,
                        chunk,
                        len: n as u32,
                    };
                    let _ = self.out.send(msg);
                    self.obs.progressed(n as u64);
                    return Ok(hash::zero_cv(k, n));
                }
                let permit = self.budget.acquire(CHUNK);
                let buf = hash::read_chunk(&src.file, len, k)?;
                let cv = hash::chunk_cv(k, &buf);
                let _ = self
                    .out
                    .send_data(Msg::Data { id, chunk }, Bytes::from(buf), Some(permit));
                self.obs.progressed(n as u64);
                Ok(cv)
            })
            .collect::<io::Result<_>>()
            .map_err(|e| match Fail::from(e) {
                Fail::Changed { .. } => Fail::Changed { sent: true },
                other => other,
            })?;
        settled(&src, true)?;
        self.finish_file(id, len, &cvs, None, &src.before);
        Ok(())
    }

    /// Sends `FileEnd` with the digest of what was sent (`one_chunk`: the digest of a file of
    /// at most one chunk, which its chaining value does not give).
    fn finish_file(
        &self,
        id: FileId,
        len: u64,
        cvs: &[Cv],
        one_chunk: Option<Digest>,
        snap: &Snapshot,
    ) {
        let digest = hash::digest_from_cvs(cvs, len)
            .or(one_chunk)
            .unwrap_or_else(|| *blake3::hash(b"").as_bytes());
        let _ = self.out.send(Msg::FileEnd {
            id,
            len,
            digest,
            stamp: stamp(snap),
        });
        self.obs.file_done();
    }

    /// Chaining values of all chunks of `f` (and, for a file of one chunk or less, its
    /// digest), and which equal the base chunk at the same offset.
    fn own_hashes(
        &self,
        src: &Source,
        len: u64,
        base_len: u64,
        base_cvs: &[Cv],
    ) -> io::Result<(Vec<Cv>, Option<Digest>, Vec<bool>)> {
        let hashed: Vec<(Cv, Option<Digest>)> = (0..chunk_count(len))
            .into_par_iter()
            .map(|k| chunk_hash(src, len, k))
            .collect::<io::Result<_>>()?;
        let one_chunk = match hashed.first() {
            Some((_, d)) => *d,
            None => Some(*blake3::hash(b"").as_bytes()),
        };
        let cvs: Vec<Cv> = hashed.into_iter().map(|(cv, _)| cv).collect();
        let same = cvs
            .iter()
            .enumerate()
            .map(|(k, cv)| {
                let k64 = k as u64;
                base_cvs.get(k) == Some(cv) && chunk_span(len, k64).1 == chunk_span(base_len, k64).1
            })
            .collect();
        Ok((cvs, one_chunk, same))
    }

    pub(super) fn send_delta_small(
        &self,
        id: FileId,
        path: PathBuf,
        base_len: u64,
        params: SigParams,
        base_cvs: Vec<Cv>,
        sig: Bytes,
    ) {
        let first = self.first_attempt(id);
        self.stable(id, true, || {
            let src = Source::open(&path)?;
            let len = src.len();
            if first {
                self.obs.planned(len);
            }
            let (cvs, one_chunk, same) = self.own_hashes(&src, len, base_len, &base_cvs)?;
            settled(&src, false)?;
            if len == base_len && same.iter().all(|&s| s) {
                self.identical(id, len, &src.before);
                return Ok(());
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
                &src.file,
                len,
                &|k| !same.get(k as usize).copied().unwrap_or(false),
                true,
                params.block_size,
                &|_| Ok((window, &index)),
            )
            .map_err(|e| match Fail::from(e) {
                Fail::Changed { .. } => Fail::Changed { sent: true },
                other => other,
            })?;
            settled(&src, true)?;
            self.finish_file(id, len, &cvs, one_chunk, &src.before);
            Ok(())
        });
    }

    fn identical(&self, id: FileId, len: u64, snap: &Snapshot) {
        let _ = self.out.send(Msg::Identical {
            id,
            stamp: stamp(snap),
        });
        self.obs.progressed(len);
        self.obs.file_done();
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
                let overlap = u64::from(block).saturating_sub(1);
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
    pub(super) fn hash_for_delta(
        &self,
        id: FileId,
        path: PathBuf,
        base_len: u64,
        params: SigParams,
    ) {
        let first = self.first_attempt(id);
        self.stable(id, false, || {
            // Taken first, so that the idle threads leave it whatever happens next.
            let ahead = self.ahead.take(id);
            let fresh = Source::open(&path)?;
            // What was hashed ahead counts if it was read from the version at `path` now:
            // the same file, unchanged since it was opened (a file that changed is read
            // afresh in this same attempt). Used once: a retry reads afresh.
            let ahead = ahead
                .filter(|a| a.src.len() > CHUNK && fresh.same_as(&a.src.before))
                .filter(|a| matches!(a.src.check(), Ok(source::Stability::Stable)));
            let hashed = ahead
                .as_deref()
                .and_then(|a| Some((a, self.ahead.finish(a)?)));
            let (src, cvs, one_chunk) = match hashed {
                Some((a, (cvs, early))) => {
                    let n = cvs.len();
                    crate::trace!(
                        "send",
                        "{}: {early} of {n} chunks hashed ahead",
                        path.display()
                    );
                    (&a.src, cvs, None)
                }
                None => {
                    crate::trace!("send", "{}: hashing own chunks", path.display());
                    let (cvs, one_chunk, _) = self.own_hashes(&fresh, fresh.len(), 0, &[])?;
                    (&fresh, cvs, one_chunk)
                }
            };
            let len = src.len();
            if first {
                self.obs.planned(len);
            }
            settled(src, false)?;
            crate::trace!("send", "{}: own chunks hashed", path.display());
            if src.is_sparse() {
                let _ = self.out.send(Msg::Sparse { id });
            }
            let big = BigFile {
                snap: src.before,
                base_len,
                params,
                cvs: cvs.clone(),
                one_chunk,
                parts: HashMap::new(),
            };
            super::super::lock(&self.big).insert(id, big);
            let _ = self.out.send(Msg::NewHashes {
                id,
                len,
                cvs,
                stamp: stamp(&src.before),
            });
            Ok(())
        });
    }

    /// The second step of a big file: deltas or literal data for the chunks the receiver
    /// does not have, then `FileEnd`. The file must still be the version that was hashed.
    pub(super) fn send_big(&self, id: FileId, path: PathBuf, b: BigFile, req: BigRequest) {
        self.stable(id, true, || {
            let src = Source::open(&path)?;
            if !src.same_as(&b.snap) {
                return Err(Fail::Changed { sent: true });
            }
            let r = match &req {
                BigRequest::Delta { chunks, full } => {
                    crate::trace!(
                        "send",
                        "{}: signatures in, diffing {} chunks",
                        path.display(),
                        chunks.len()
                    );
                    self.send_deltas(id, &src, &b, chunks, *full)
                }
                BigRequest::Literal(chunks) => self.send_literal(id, &src, chunks),
            };
            r.map_err(|e| match Fail::from(e) {
                Fail::Changed { .. } => Fail::Changed { sent: true },
                other => other,
            })?;
            settled(&src, true)?;
            self.finish_file(id, src.len(), &b.cvs, b.one_chunk, &b.snap);
            Ok(())
        });
    }

    fn send_literal(&self, id: FileId, src: &Source, chunks: &[u32]) -> io::Result<()> {
        let len = src.len();
        chunks
            .par_iter()
            .filter(|&&k| u64::from(k) < chunk_count(len))
            .try_for_each(|&k| {
                let permit = self.budget.acquire(CHUNK);
                let buf = hash::read_chunk(&src.file, len, u64::from(k))?;
                let n = buf.len() as u64;
                let msg = Msg::Data { id, chunk: k };
                let _ = self.out.send_data(msg, Bytes::from(buf), Some(permit));
                self.obs.progressed(n);
                Ok(())
            })
    }

    fn send_deltas(
        &self,
        id: FileId,
        src: &Source,
        b: &BigFile,
        chunks: &[u32],
        full: bool,
    ) -> io::Result<()> {
        let base_chunks = chunk_count(b.base_len);
        let window_sig = |start: u64, count: u64| -> io::Result<fast_rsync::Signature> {
            let mut parts = Vec::with_capacity(count as usize);
            for j in start..start + count {
                let part = b.parts.get(&(j as u32)).ok_or_else(|| {
                    io::Error::other(format!("the receiver sent no signature of base chunk {j}"))
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
        let mut windows: Vec<(u64, u64)> = chunks.iter().map(|&k| window(u64::from(k))).collect();
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
        self.send_chunks(
            id,
            &src.file,
            src.len(),
            &diffed,
            false,
            b.params.block_size,
            &index_for,
        )
    }
}
