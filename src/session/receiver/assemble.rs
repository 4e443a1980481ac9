//! Transfers: signatures of our old copies, chunks written in any order, verification
//! against the sender's BLAKE3 digest, commit or whole-file retry.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use memmap2::Mmap;
use rayon::prelude::*;

use super::*;
use std::sync::atomic::Ordering;

/// One chunk's outcome in the first pass over our copy: (chunk, matched, written).
type ChunkPass = (u64, bool, bool);

impl Ctx {
    /// Opens our copy as a delta base. A small one is signed whole at once; for a big one the
    /// sender hashes its chunks first ([`Ctx::match_chunks`] takes it from there).
    pub(super) fn start_delta(&self, id: FileId, inc: &Arc<Incoming>) {
        let prepared = (|| -> io::Result<(Arc<Base>, SigParams)> {
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
            Ok((base, SigParams::for_len(len)))
        })();
        let (base, params) = match prepared {
            Ok(p) if p.0.len >= DELTA_MIN_BASE => p,
            // Unreadable or shrunk base: the whole file it is.
            _ => {
                self.need_whole(id, false);
                return;
            }
        };
        {
            let mut st = lock(&inc.st);
            st.base = Some(base.clone());
            st.params = Some(params);
        }
        let base_len = base.len;
        if chunk_count(base_len) <= 2 {
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
        } else {
            let _ = self.out.send(Msg::NeedDelta {
                id,
                base_len,
                params,
            });
        }
    }

    /// A big file, given the sender's chunk hashes: read our copy once, comparing chunk by
    /// chunk. Once one chunk differs (the file is not identical, so a new one will be built),
    /// matching chunks are written into it in the same pass, hashed as written; chunks that
    /// matched before that are written afterwards. Then ask for deltas of the rest.
    pub(super) fn match_chunks(&self, id: FileId, inc: &Arc<Incoming>, len: u64, cvs: Vec<Cv>) {
        let (base, params) = {
            let st = lock(&inc.st);
            (st.base.clone(), st.params)
        };
        let (Some(base), Some(params)) = (base, params) else {
            return self.fail(SessionError::Violation(format!(
                "chunk hashes for file {id} without a base"
            )));
        };
        crate::trace!("recv", "{}: comparing {} chunks", inc.path, cvs.len());
        let (new_chunks, base_chunks) = (chunk_count(len), chunk_count(base.len));
        let same_span =
            |k: u64| k < base_chunks && chunk_span(len, k).1 == chunk_span(base.len, k).1;
        // Different lengths: it cannot be identical, so write from the start.
        let writing = std::sync::atomic::AtomicBool::new(len != base.len);
        // Our copy is a live mapping that another process could rewrite in place, so a chunk
        // is never hashed from it and then written from it again: it streams through a small
        // private buffer that is hashed and written piece by piece. Returns the chunk's
        // chaining value; it is recorded (the chunk counts as written) only if it is `want`.
        let stream = |k: u64, want: Option<&Cv>| -> Result<Option<Cv>, String> {
            let data = base.chunk(k).unwrap_or_default();
            let t = self.temp_file(inc)?;
            let cv = hash::stream_cv(k, data, |off, piece| {
                let _serial = lock(&inc.write);
                t.file().write_all_at(piece, k * CHUNK + off as u64)
            })
            .map_err(|e| self.write_error(inc, e))?;
            if want.is_some_and(|w| *w != cv) {
                // Overwritten later by the delta for this chunk.
                return Ok(None);
            }
            lock(&inc.st).chunks.insert(k, (data.len(), cv));
            self.obs.progressed(data.len() as u64);
            Ok(Some(cv))
        };
        let visit = |k: u64| -> Result<ChunkPass, String> {
            if !same_span(k) {
                writing.store(true, Ordering::Relaxed);
                return Ok((k, false, false));
            }
            let want = cvs.get(k as usize);
            if writing.load(Ordering::Relaxed) {
                let written = stream(k, want)?.is_some();
                return Ok((k, written, written));
            }
            if want != Some(&hash::chunk_cv(k, base.chunk(k).unwrap_or_default())) {
                writing.store(true, Ordering::Relaxed);
                return Ok((k, false, false));
            }
            Ok((k, true, false))
        };
        // Workers take chunks in file order, so the chunks that matched before the first
        // difference showed up (and must be hashed again when they are written late) are
        // only those ahead of it, not also those at the start of another worker's half.
        let next = std::sync::atomic::AtomicU64::new(0);
        let workers = rayon::current_num_threads().clamp(1, new_chunks.max(1) as usize);
        let per_worker: Result<Vec<Vec<ChunkPass>>, String> = (0..workers)
            .into_par_iter()
            .map(|_| {
                let mut done = Vec::new();
                loop {
                    // A failed worker moves the counter past the end, stopping the others.
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= new_chunks {
                        return Ok(done);
                    }
                    match visit(k) {
                        Ok(c) => done.push(c),
                        Err(e) => {
                            next.store(new_chunks, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                }
            })
            .collect();
        let mut pass: Vec<ChunkPass> = match per_worker {
            Ok(p) => p.into_iter().flatten().collect(),
            Err(e) => return self.file_failed(id, inc, e),
        };
        pass.sort_unstable_by_key(|c| c.0);
        let mismatched: Vec<u32> = pass.iter().filter(|c| !c.1).map(|c| c.0 as u32).collect();
        if mismatched.is_empty() && len == base.len {
            return self.identical(id, inc);
        }
        crate::trace!(
            "recv",
            "{}: {} chunks differ, {} matched before the first difference",
            inc.path,
            mismatched.len(),
            pass.iter().filter(|c| c.1 && !c.2).count()
        );
        // Chunks that matched before we knew a new file was needed: streamed in now, hashed
        // again (the digest covers the bytes written; if our copy changed meanwhile,
        // verification fails and the file is sent whole).
        let late: Result<(), String> = pass
            .par_iter()
            .filter(|c| c.1 && !c.2)
            .try_for_each(|&(k, _, _)| stream(k, None).map(drop));
        if let Err(e) = late {
            return self.file_failed(id, inc, e);
        }
        lock(&self.stats).matched_bytes += pass
            .iter()
            .filter(|c| c.1)
            .map(|c| chunk_span(len, c.0).1 as u64)
            .sum::<u64>();
        let wanted = delta::signature_request(
            &mismatched.iter().map(|&k| u64::from(k)).collect::<Vec<_>>(),
            new_chunks,
            base_chunks,
        );
        let full = wanted.is_none();
        let parts: Vec<u64> = wanted.unwrap_or_else(|| (0..base_chunks).collect());
        if !mismatched.is_empty() {
            self.send_sig_parts(id, &base, params, &parts);
        }
        let _ = self.out.send(Msg::DeltaRequest {
            id,
            chunks: mismatched,
            full,
        });
    }

    pub(super) fn send_sig_parts(
        &self,
        id: FileId,
        base: &Base,
        params: SigParams,
        chunks: &[u64],
    ) {
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

    pub(super) fn temp_file(&self, inc: &Incoming) -> Result<Arc<TempFile>, String> {
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

    pub(super) fn whole_file(&self, id: FileId, inc: &Arc<Incoming>, digest: Digest, data: &[u8]) {
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

    pub(super) fn write_error(&self, inc: &Incoming, e: io::Error) -> String {
        if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
            self.fail(SessionError::Local(format!(
                "no space left on the receiving side (while writing {}); nothing was half-written. \
                 Free some space and run again.",
                inc.path
            )));
        }
        format!("writing: {e}")
    }

    pub(super) fn chunk(
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
    pub(super) fn finalize(&self, id: FileId, inc: &Arc<Incoming>) {
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
                self.need_whole(id, false);
                return;
            }
        }
        self.commit(id, inc, len, r);
    }

    pub(super) fn commit(
        &self,
        id: FileId,
        inc: &Arc<Incoming>,
        len: u64,
        staged: Result<(), String>,
    ) {
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

    pub(super) fn identical(&self, id: FileId, inc: &Arc<Incoming>) {
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

    /// A transfer failed with `message`; reported with its path, the sync goes on.
    fn file_failed(&self, id: FileId, inc: &Arc<Incoming>, message: String) {
        let path = inc.path.to_string();
        self.complete(id, inc, Err(Event::Error { path, message }));
    }

    /// A transfer is over (applied, or failed with the event to report).
    pub(super) fn complete(
        &self,
        id: FileId,
        inc: &Arc<Incoming>,
        outcome: Result<ChangeOp, Event>,
    ) {
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

    pub(super) fn release(&self) {
        lock(&self.track).outstanding -= 1;
        self.maybe_finish();
    }
}
