//! Transfers: signatures of our old copies, chunks written in any order, verification
//! against the sender's BLAKE3 digest, commit, whole-file retry, and starting over when the
//! sender saw its file change. Big files are staged in resumable partials: an interrupted
//! transfer's chunks are reused next time once they match the sender's hashes. The pass over
//! a big file's old copy is in `matching`.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use memmap2::Mmap;
use rayon::prelude::*;

use super::*;
use crate::engine::delta::DeltaError;
use crate::engine::dest::PARTIAL_MIN;

/// Why one file could not be applied (the sync goes on with the others).
#[derive(Debug, thiserror::Error)]
pub(super) enum FileError {
    #[error("content does not match the sender's BLAKE3 digest")]
    Digest,
    #[error("rebuilt file does not match the sender's BLAKE3 digest")]
    Verify,
    #[error("{}", .0.detail())]
    Dest(#[source] DestError),
    #[error("writing: {0}")]
    Write(#[source] io::Error),
    #[error("reading back: {0}")]
    ReadBack(#[source] io::Error),
    #[error("reading our copy: {0}")]
    ReadBase(#[source] io::Error),
    #[error("applying the delta: {0}")]
    Delta(#[source] DeltaError),
    #[error("no space left on the receiving side")]
    NoSpace,
    #[error("the sender's pieces do not fit the file: {0}")]
    Pieces(String),
}

fn is_nospace(code: Option<i32>) -> bool {
    code == Some(rustix::io::Errno::NOSPC.raw_os_error())
}

impl Ctx {
    /// Asks for file `id`: a delta against our copy, a resumed partial, or the whole file.
    pub(super) fn request(self: &Arc<Self>, id: FileId, inc: &Arc<Incoming>, batched: bool) {
        let base_len = inc.before.map_or(0, |l| l.size);
        if (inc.basis && base_len >= DELTA_MIN_BASE) || inc.size >= PARTIAL_MIN {
            let (c, inc) = (self.clone(), inc.clone());
            self.pool.spawn(move || c.start_delta(id, &inc));
        } else {
            self.need_whole(id, inc, batched);
        }
    }

    /// Opens our copy as a delta base and, for a big file, its partial. A small base is signed
    /// whole at once; otherwise the sender hashes its chunks first ([`Ctx::match_chunks`]
    /// takes it from there).
    fn start_delta(self: &Arc<Self>, id: FileId, inc: &Arc<Incoming>) {
        let Some(d) = self.dest.as_ref() else {
            return self.need_whole(id, inc, false);
        };
        let mut resumed = 0;
        if inc.size >= PARTIAL_MIN {
            match d.stage_partial(&inc.path) {
                Ok(staged) => {
                    resumed = staged.resumed_len;
                    lock(&inc.st).temp = Some(Arc::new(staged.file));
                }
                Err(e) => return self.file_failed(id, inc, FileError::Dest(e)),
            }
        }
        let base = inc
            .basis
            .then(|| self.open_base(d, inc).ok())
            .flatten()
            .filter(|b| b.len >= DELTA_MIN_BASE);
        if base.is_none() && resumed == 0 {
            return self.need_whole(id, inc, false);
        }
        let base_len = base.as_ref().map_or(0, |b| b.len);
        let params = SigParams::for_len(base_len);
        let small = resumed == 0 && chunk_count(base_len) <= 2;
        {
            let mut st = lock(&inc.st);
            st.asked = Some(Ask::Delta);
            st.base = base.clone();
            st.params = Some(params);
            st.resumed = resumed;
            st.phase = if small {
                Phase::Plain
            } else {
                Phase::AwaitHashes
            };
        }
        if resumed > 0 {
            crate::trace!("recv", "{}: resuming from {resumed} bytes", inc.path);
        }
        match base {
            Some(base) if small => {
                let cvs = (0..chunk_count(base_len))
                    .into_par_iter()
                    .map(|k| hash::chunk_cv(k, base.chunk(k).unwrap_or_default()))
                    .collect();
                let sig = delta::chunk_signature(base.bytes(), params);
                let msg = Msg::Signature {
                    id,
                    base_len,
                    params,
                    cvs,
                };
                let _ = self.out.send_data(msg, Bytes::from(sig), None);
            }
            _ => {
                let _ = self.out.send(Msg::NeedDelta {
                    id,
                    base_len,
                    params,
                });
            }
        }
    }

    /// Whether `inc`'s chunks are written into `t` past the page cache: a big file that
    /// replaces a regular one, on a filesystem that would otherwise write the new file back
    /// inside the rename (ext4; see `engine::dest::direct`). Not for a sparse file (its holes),
    /// a clone or `--inplace` (only changed pages are written there), nor with
    /// `DEVSYNC_NO_DIRECT` set (to measure what it saves).
    pub(super) fn direct(&self, inc: &Incoming, t: &TempFile) -> bool {
        let eligible = {
            let st = lock(&inc.st);
            !self.no_direct
                && inc.before.is_some_and(|b| b.kind == LocalKind::File)
                && inc.size.max(st.new_len) >= DIRECT_MIN
                && !st.sparse
                && !st.cloned
                && !st.inplace
        };
        eligible && t.writes_direct()
    }

    /// The file the current attempt writes into, created on first use.
    pub(super) fn temp_file(&self, inc: &Incoming) -> Result<Arc<TempFile>, FileError> {
        if let Some(t) = &lock(&inc.st).temp {
            return Ok(t.clone());
        }
        let d = self
            .dest
            .as_ref()
            .ok_or(FileError::Pieces("no destination".into()))?;
        let report = |e: DestError| {
            if is_nospace(e.raw_os_error()) {
                self.dest_error(&inc.path, e);
                return FileError::NoSpace;
            }
            FileError::Dest(e)
        };
        // A partial's old bytes are not trusted here: every chunk of this attempt is written.
        let t = if inc.size >= PARTIAL_MIN {
            d.stage_partial(&inc.path).map(|s| s.file)
        } else {
            d.create_temp(&inc.path)
        };
        let t = Arc::new(t.map_err(report)?);
        // A sparse file keeps its holes: reserving its whole size would fill them. With
        // --inplace only the changed chunks are staged here.
        let reserve = {
            let st = lock(&inc.st);
            // (A writable base with no resumed partial is what try_match_chunks updates in
            // place.)
            let in_place = st.resumed == 0 && st.base.as_ref().is_some_and(|b| b.writable);
            !st.sparse && !in_place
        };
        if inc.size >= PREALLOCATE_MIN && reserve {
            // On ext4 a rename over the old file writes the new one back first, so a crash
            // shows the old content or the new; reserved blocks would skip that and could
            // show zeros. There a replacement is reserved only if it is written directly
            // (`direct`), which puts it on the device before the rename anyway.
            let keep_flush = inc.before.is_some_and(|b| b.kind == LocalKind::File)
                && t.rename_flushes()
                && !self.direct(inc, &t);
            match keep_flush {
                true => crate::trace!("recv", "{}: not reserved (the rename flushes it)", inc.path),
                false => t.preallocate(inc.size).map_err(report)?,
            }
        }
        let mut st = lock(&inc.st);
        // Another worker may have created one meanwhile: use that one.
        Ok(st.temp.get_or_insert(t).clone())
    }

    pub(super) fn whole_file(
        &self,
        id: FileId,
        inc: &Arc<Incoming>,
        digest: Digest,
        stamp: Stamp,
        data: &[u8],
    ) {
        lock(&self.stats).literal_bytes += data.len() as u64;
        let r = (|| -> Result<(), FileError> {
            if *blake3::hash(data).as_bytes() != digest {
                return Err(FileError::Digest);
            }
            let t = self.temp_file(inc)?;
            // (Listed big, it may have been reserved: then it goes direct too.)
            match self.direct(inc, &t) {
                true => t.write_direct(data, 0, |_| ((), true)),
                false => t.file().write_all_at(data, 0),
            }
            .map_err(|e| self.write_error(inc, e))?;
            if t.is_partial() {
                // Listed big, sent small: what an earlier attempt left beyond it must go.
                t.set_len(data.len() as u64).map_err(FileError::Dest)?;
            }
            Ok(())
        })();
        self.obs.progressed(data.len() as u64);
        self.commit(id, inc, data.len() as u64, stamp, r);
    }

    pub(super) fn write_error(&self, inc: &Incoming, e: io::Error) -> FileError {
        if is_nospace(e.raw_os_error()) {
            self.fail(SessionError::Local(format!(
                "no space left on the receiving side (while writing {}); nothing was half-written. \
                 Free some space and run again.",
                inc.path
            )));
            return FileError::NoSpace;
        }
        FileError::Write(e)
    }

    pub(super) fn chunk(
        self: &Arc<Self>,
        id: FileId,
        inc: &Arc<Incoming>,
        base: Option<Arc<Base>>,
        k: u64,
        piece: Piece,
    ) {
        let r = (|| -> Result<(usize, Cv), FileError> {
            if lock(&inc.st).completed {
                return Err(FileError::Pieces("chunk after the file was done".into()));
            }
            let base = base.as_deref();
            let bad = |what: &str| FileError::Pieces(what.to_string());
            if let Piece::Zeros(n) = piece {
                if n as u64 > CHUNK || k >= crate::proto::msg::MAX_CHUNKS {
                    return Err(bad("hole out of range"));
                }
                let t = self.temp_file(inc)?;
                if t.is_partial() {
                    t.punch(k * CHUNK, n as u64).map_err(FileError::Dest)?;
                }
                self.obs.progressed(n as u64);
                return Ok((n, hash::zero_cv(k, n)));
            }
            let sparse = lock(&inc.st).sparse;
            let (data, literal, matched): (std::borrow::Cow<'_, [u8]>, u64, u64) = match &piece {
                Piece::Literal(b) => (b[..].into(), b.len() as u64, 0),
                Piece::Zeros(_) => return Err(bad("unreachable")),
                Piece::Copy => {
                    let c = base
                        .and_then(|b| b.chunk(k))
                        .ok_or_else(|| bad("copy of a chunk the base does not have"))?;
                    // Out of the live mapping once: what is hashed below is what is written,
                    // even if another process rewrites our copy meanwhile.
                    (c.to_vec().into(), 0, c.len() as u64)
                }
                Piece::Delta(w, d) => {
                    let b = base.ok_or_else(|| bad("delta without a base"))?;
                    if w.start.saturating_add(w.count) > chunk_count(b.len) {
                        return Err(bad("delta window outside the base"));
                    }
                    let (lo, hi) = delta::window_bytes(w.start, w.count, b.len);
                    let window = b
                        .bytes()
                        .get(lo as usize..hi as usize)
                        .ok_or_else(|| bad("delta window outside the base"))?;
                    let out = delta::apply(window, d, w.len).map_err(FileError::Delta)?;
                    let n = out.len() as u64;
                    (out.into(), d.len() as u64, n.saturating_sub(d.len() as u64))
                }
            };
            if data.len() as u64 > CHUNK || k >= crate::proto::msg::MAX_CHUNKS {
                return Err(bad("chunk out of range"));
            }
            {
                let mut s = lock(&self.stats);
                s.literal_bytes += literal;
                s.matched_bytes += matched;
            }
            let cv = hash::chunk_cv(k, &data);
            let t = self.temp_file(inc)?;
            // In a clone of our copy (or, with --inplace, over it) the chunk is there already
            // as our copy has it: only the pages that differ are written, so a small edit
            // costs its pages, not the chunk, and the rest stays shared. (What they are
            // compared with is checked unchanged before the file is committed.) Not for a file
            // of one chunk, whose digest is read back from what was written.
            let (over, inplace) = {
                let st = lock(&inc.st);
                let base = st.base.clone().filter(|_| st.cloned || st.inplace);
                (base.filter(|_| st.new_len > CHUNK), st.inplace)
            };
            let runs = over
                .as_deref()
                .and_then(|b| b.chunk(k))
                .filter(|old| old.len() == data.len())
                .map(|old| delta::changed_runs(old, &data));
            if runs.is_none() && !sparse && self.direct(inc, &t) {
                t.write_direct(&data, k * CHUNK, |_| ((), true))
                    .map_err(|e| self.write_error(inc, e))?;
            } else {
                let _serial = lock(&inc.write);
                match &runs {
                    Some(runs) => {
                        for &(off, n) in runs {
                            let piece = data.get(off..off + n).ok_or_else(|| bad("bad run"))?;
                            t.file()
                                .write_all_at(piece, k * CHUNK + off as u64)
                                .map_err(|e| self.write_error(inc, e))?;
                        }
                    }
                    None => write_chunk(&t, &data, k * CHUNK, sparse)
                        .map_err(|e| self.write_error(inc, e))?,
                }
            }
            if let Some(runs) = runs {
                let differ: usize = runs.iter().map(|r| r.1).sum();
                crate::trace!(
                    "recv",
                    "{}: chunk {k}: {differ} of {} bytes differ",
                    inc.path,
                    data.len()
                );
                if inplace {
                    let at = |(off, n): (usize, usize)| (k * CHUNK + off as u64, n as u64);
                    lock(&inc.st)
                        .runs
                        .insert(k, runs.into_iter().map(at).collect());
                }
            }
            self.obs.progressed(data.len() as u64);
            Ok((data.len(), cv))
        })();
        {
            let mut st = lock(&inc.st);
            match r {
                Ok(c) => {
                    if st.chunks.insert(k, c).is_some() {
                        st.error
                            .get_or_insert(FileError::Pieces(format!("chunk {k} sent twice")));
                    }
                }
                Err(e) => {
                    st.error.get_or_insert(e);
                }
            }
        }
        self.job_done(id, inc);
    }

    /// One job for file `id` is over; finishes the attempt if it was the last and the sender
    /// has ended it.
    pub(super) fn job_done(self: &Arc<Self>, id: FileId, inc: &Arc<Incoming>) {
        let ready = {
            let mut st = lock(&inc.st);
            st.jobs = st.jobs.saturating_sub(1);
            st.jobs == 0 && st.end.is_some()
        };
        if ready {
            self.finalize(id, inc);
        }
    }

    /// The sender ended the attempt and no work is pending: verify and commit, retry, start
    /// over, or report.
    pub(super) fn finalize(self: &Arc<Self>, id: FileId, inc: &Arc<Incoming>) {
        let (end, chunks, error, was_delta, clone_of, kept) = {
            let mut st = lock(&inc.st);
            if st.completed {
                return;
            }
            st.finalizing |= st.end.is_some();
            (
                st.end.take(),
                std::mem::take(&mut st.chunks),
                st.error.take(),
                st.asked == Some(Ask::Delta),
                st.base.clone().filter(|_| st.cloned || st.inplace),
                st.inplace.then(|| st.kept.clone()),
            )
        };
        let (len, digest, stamp) = match end {
            None | Some(End::Whole) => return,
            Some(End::Identical(stamp)) => return self.identical(id, inc, stamp),
            Some(End::Restart) => return self.restart(id, inc),
            Some(End::Failed(ev)) => return self.complete(id, inc, Err(ev)),
            Some(End::Complete { len, digest, stamp }) => (len, digest, stamp),
        };
        crate::trace!("recv", "{}: all chunks written, verifying", inc.path);
        let r = (|| -> Result<(), FileError> {
            if let Some(e) = error {
                return Err(e);
            }
            let n = chunk_count(len);
            let mut cvs = Vec::with_capacity(n.min(1 << 16) as usize);
            for k in 0..n {
                match chunks.get(&k) {
                    Some(&(l, cv)) if l == chunk_span(len, k).1 => cvs.push(cv),
                    _ => {
                        return Err(FileError::Pieces(format!(
                            "chunk {k} missing or of the wrong size"
                        )));
                    }
                }
            }
            if chunks.len() as u64 != n {
                return Err(FileError::Pieces("more chunks than the file has".into()));
            }
            let t = self.temp_file(inc)?;
            t.set_len(len).map_err(FileError::Dest)?;
            let got = match hash::digest_from_cvs(&cvs, len) {
                Some(d) => d,
                // One chunk or less, kept in place: hash that.
                None if kept.as_ref().is_some_and(|k| k.contains(&0)) => {
                    let data = clone_of.as_ref().and_then(|b| b.chunk(0));
                    *blake3::hash(data.unwrap_or_default()).as_bytes()
                }
                // One chunk or less: hash what is actually in the file.
                None => hash::file_digest(t.file(), len).map_err(FileError::ReadBack)?,
            };
            if got != digest {
                return Err(FileError::Verify);
            }
            // The clone holds our copy's blocks as they were when cloned, the hashes what we
            // read of it: if it was written to in between, they may differ. With --inplace,
            // the chunks kept are our copy's blocks as they are now.
            if clone_of.is_some_and(|b| !b.unchanged()) {
                crate::trace!("recv", "{}: our copy changed while cloned", inc.path);
                return Err(FileError::Verify);
            }
            Ok(())
        })();
        if matches!(r, Err(FileError::Verify)) && was_delta {
            let retry = {
                let mut st = lock(&inc.st);
                let first = !st.retried;
                st.retried = true;
                st.reset();
                first
            };
            if retry {
                lock(&self.stats).verify_retries += 1;
                return self.need_whole(id, inc, false);
            }
        }
        self.commit(id, inc, len, stamp, r);
    }

    /// The sender saw its file change while sending it: forget this attempt, ask again.
    fn restart(self: &Arc<Self>, id: FileId, inc: &Arc<Incoming>) {
        lock(&inc.st).reset();
        lock(&self.stats).restarts += 1;
        crate::trace!(
            "recv",
            "{}: changed while being sent; asking again",
            inc.path
        );
        // Re-planned like the first time (our copy is unchanged).
        self.request(id, inc, false);
    }

    fn commit(
        &self,
        id: FileId,
        inc: &Arc<Incoming>,
        len: u64,
        stamp: Stamp,
        staged: Result<(), FileError>,
    ) {
        let r = staged.and_then(|()| {
            let t = self.temp_file(inc)?;
            let d = self
                .dest
                .as_ref()
                .ok_or(FileError::Pieces("no destination".into()))?;
            if inc.before.is_some() {
                // Replacing: first remove what killed sessions left in this directory.
                self.sweep_leftovers(d, inc.path.parent().unwrap_or(b""), &inc.path);
            }
            let inplace = {
                let st = lock(&inc.st);
                st.base
                    .clone()
                    .filter(|_| st.inplace)
                    .map(|b| (b, st.kept.clone(), st.runs.clone()))
            };
            let done = match inplace {
                // Checked again just before the first write: our copy must still be what the
                // kept chunks were hashed from.
                Some((base, ..)) if !base.unchanged() => Err(DestError::io(
                    &inc.path,
                    "updating in place",
                    io::Error::other("the old copy changed during the transfer; not updated"),
                )),
                Some((base, kept, runs)) => {
                    let ranges: Vec<(u64, u64)> = (0..chunk_count(len))
                        .filter(|k| !kept.contains(k))
                        .flat_map(|k| match runs.get(&k) {
                            Some(r) => r.clone(),
                            None => {
                                let (off, n) = chunk_span(len, k);
                                vec![(off, n as u64)]
                            }
                        })
                        .collect();
                    t.patch_into(
                        &base.file,
                        &ranges,
                        len,
                        stamp.mode,
                        stamp.mtime,
                        self.opts.fsync,
                    )
                    .map(|n| {
                        crate::trace!("recv", "{}: wrote {n} bytes in place", inc.path);
                        // Only staging: nothing of it is kept, a partial neither.
                        t.discard();
                    })
                }
                None => t.commit(d, stamp.mode, stamp.mtime, self.opts.fsync),
            };
            done.map_err(|e| {
                if is_nospace(e.raw_os_error()) {
                    self.dest_error(&inc.path, e);
                    return FileError::NoSpace;
                }
                FileError::Dest(e)
            })
        });
        if let Some(t) = lock(&inc.st).temp.take() {
            if r.is_err() {
                t.discard();
            }
        }
        crate::trace!(
            "recv",
            "{}: committed ({})",
            inc.path,
            if r.is_ok() { "ok" } else { "failed" }
        );
        let outcome = match r {
            Ok(()) => {
                let op = self.file_op(inc.before.as_ref(), len, stamp.mode, stamp.mtime, true);
                self.count_change(op);
                Ok(op)
            }
            Err(FileError::NoSpace) => return self.complete_silently(id, inc),
            Err(e) => Err(Event::Error {
                path: inc.path.to_string(),
                message: e.to_string(),
            }),
        };
        self.complete(id, inc, outcome);
    }

    /// Our copy has the content; only attributes may differ (`stamp`: the sender's, for the
    /// version it compared).
    pub(super) fn identical(&self, id: FileId, inc: &Arc<Incoming>, stamp: Stamp) {
        if let Some(t) = lock(&inc.st).temp.take() {
            t.discard();
        }
        let before = inc.before.unwrap_or(LocalMeta {
            kind: LocalKind::File,
            size: 0,
            mode: stamp.mode,
            mtime: stamp.mtime,
        });
        let op = ChangeOp::Updated {
            content: false,
            size: false,
            time: before.mtime != stamp.mtime,
            perms: before.mode != stamp.mode,
        };
        let r = match &self.dest {
            Some(d) => d.set_file_meta(&inc.path, Some(stamp.mode), Some(stamp.mtime)),
            None => Ok(()),
        };
        let outcome = match r {
            Ok(()) => {
                lock(&self.stats).metadata_only += 1;
                Ok(op)
            }
            Err(e) => Err(Event::Error {
                path: inc.path.to_string(),
                message: e.detail(),
            }),
        };
        self.complete(id, inc, outcome);
    }

    /// A transfer failed with `e`; reported with its path, the sync goes on.
    fn file_failed(&self, id: FileId, inc: &Arc<Incoming>, e: FileError) {
        let path = inc.path.to_string();
        let message = e.to_string();
        self.complete(id, inc, Err(Event::Error { path, message }));
    }

    /// A transfer is over (applied, or failed with the event to report). Counted once, however
    /// often a confused or hostile sender makes us get here.
    pub(super) fn complete(
        &self,
        id: FileId,
        inc: &Arc<Incoming>,
        outcome: Result<ChangeOp, Event>,
    ) {
        {
            let mut st = lock(&inc.st);
            if st.completed {
                return;
            }
            st.completed = true;
            if let Some(t) = st.temp.take() {
                t.discard();
            }
        }
        if lock(&self.files).remove(&id).is_none() {
            return;
        }
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

    /// A file that failed because the disk is full: the whole sync is already ending with
    /// that error, which was reported once; this file only stops counting.
    fn complete_silently(&self, id: FileId, inc: &Arc<Incoming>) {
        lock(&inc.st).completed = true;
        if lock(&self.files).remove(&id).is_some() {
            lock(&self.stats).errors += 1;
            self.obs.file_done();
            self.release();
        }
    }

    pub(super) fn release(&self) {
        {
            let mut t = lock(&self.track);
            match t.outstanding.checked_sub(1) {
                Some(n) => t.outstanding = n,
                None => {
                    drop(t);
                    return self.fail(SessionError::Internal(
                        "more transfers finished than started",
                    ));
                }
            }
        }
        self.maybe_finish();
    }
}

impl Assembly {
    /// Forgets the current attempt (its staged file goes; its partial is not kept).
    fn reset(&mut self) {
        if let Some(t) = self.temp.take() {
            t.discard();
        }
        self.asked = None;
        self.base = None;
        self.params = None;
        self.resumed = 0;
        self.phase = Phase::Plain;
        self.sparse = false;
        self.chunks.clear();
        self.cloned = false;
        self.inplace = false;
        self.kept.clear();
        self.runs.clear();
        self.new_len = 0;
        self.end = None;
        self.finalizing = false;
        self.error = None;
    }
}

/// Whether `b` is all zeros.
pub(super) fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Writes `data` at `at`; for a sparse file, 64 KiB-aligned blocks of zeros are left as holes
/// (punched in a reused partial, which may hold old bytes there).
fn write_chunk(t: &TempFile, data: &[u8], at: u64, sparse: bool) -> io::Result<()> {
    if !sparse {
        return t.file().write_all_at(data, at);
    }
    const BLOCK: usize = 64 << 10;
    for (i, piece) in data.chunks(BLOCK).enumerate() {
        let off = at + (i * BLOCK) as u64;
        if is_zero(piece) {
            if t.is_partial() {
                t.punch(off, piece.len() as u64).map_err(io::Error::other)?;
            }
        } else {
            t.file().write_all_at(piece, off)?;
        }
    }
    Ok(())
}

impl Ctx {
    /// Our copy of `inc`, mapped for reading. With `--inplace` and an old copy big enough for
    /// chunked deltas, opened for writing too where it can be (otherwise it is replaced as
    /// usual) and where no other path of this sync shares its inode.
    fn open_base(&self, d: &Dest, inc: &Incoming) -> io::Result<Arc<Base>> {
        let path = &inc.path;
        let big = inc.before.is_some_and(|b| b.size > 2 * CHUNK);
        let writable = (self.opts.inplace && big)
            .then(|| {
                d.open_for_update(path)
                    .inspect_err(|e| crate::trace!("recv", "{path}: not in place: {}", e.detail()))
                    .ok()
            })
            .flatten();
        let base = map_base(d, path, writable)?;
        if self.opts.inplace {
            let mut seen = lock(&self.base_inodes);
            match seen.get(&base.inode) {
                // Being updated in place through another path: not a stable base.
                Some(true) => return Err(io::Error::other("hard link updated in place")),
                Some(false) if base.writable => {
                    crate::trace!("recv", "{path}: not in place: a hard link is a base too");
                    drop(seen);
                    return map_base(d, path, None);
                }
                _ => {}
            }
            seen.insert(base.inode, base.writable);
        }
        Ok(base)
    }
}

/// Our copy of `path` (`writable`: already opened for writing), mapped for reading.
fn map_base(d: &Dest, path: &RelPath, writable: Option<std::fs::File>) -> io::Result<Arc<Base>> {
    let (f, writable) = match writable {
        Some(f) => (f, true),
        None => (d.open_file(path).map_err(io::Error::other)?, false),
    };
    let st = rustix::fs::fstat(&f)?;
    let len = st.st_size as u64;
    let ctime = ctime_of(&st);
    // SAFETY: the map is read-only and private to this process. If another process
    // truncates the file while we read it the kernel raises SIGBUS, as for any reader
    // of a mapped file; that risk is accepted for the receiver's own old copy, which
    // nothing else should be rewriting during a sync. This session itself truncates a
    // file only with --inplace, through this base once every read of it is over, and
    // never maps an inode that another path updates in place (`Ctx::open_base`).
    let map = if len > 0 {
        Some(unsafe { Mmap::map(&f)? })
    } else {
        None
    };
    Ok(Arc::new(Base {
        map,
        len,
        file: f,
        writable,
        #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
        inode: (st.st_dev as u64, st.st_ino as u64),
        ctime,
    }))
}
