//! The pass over our old copy of a big file against the sender's chunk hashes: which chunks
//! are kept (in a reflink clone, or in the old file with `--inplace`), which are copied into
//! the new file (hashed as written), and which are asked for, as deltas against signed base
//! chunks or as data.
//!
//! Must not: hash a chunk from the live mapping and then write it from there again (another
//! process may rewrite our copy in place meanwhile); write anything for a file found identical.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rayon::prelude::*;

use super::assemble::{FileError, is_zero};
use super::*;

/// One chunk's outcome in the first pass over our copy: (chunk, matched, written).
type ChunkPass = (u64, bool, bool);

impl Ctx {
    /// A big file, given the sender's chunk hashes: read our copy once, comparing chunk by
    /// chunk. Once one chunk differs (the file is not identical, so a new one will be built),
    /// matching chunks are written into it in the same pass, hashed as written; chunks that
    /// matched before that are written afterwards. Chunks a resumed partial already holds stay
    /// where they are. Then ask for the rest.
    pub(super) fn match_chunks(
        self: &Arc<Self>,
        id: FileId,
        inc: &Arc<Incoming>,
        len: u64,
        cvs: Vec<Cv>,
        stamp: Stamp,
    ) {
        if let Err(e) = self.try_match_chunks(id, inc, len, &cvs, stamp) {
            {
                let mut st = lock(&inc.st);
                st.error.get_or_insert(e);
                st.phase = Phase::Wanted {
                    chunks: HashSet::new(),
                    literal: true,
                };
            }
            // Ends the attempt: ask for nothing more and let the sender's end finish it.
            let _ = self.out.send(Msg::NeedChunks { id, chunks: vec![] });
        }
        self.job_done(id, inc);
    }

    fn try_match_chunks(
        self: &Arc<Self>,
        id: FileId,
        inc: &Arc<Incoming>,
        len: u64,
        cvs: &[Cv],
        stamp: Stamp,
    ) -> Result<(), FileError> {
        let (base, params, resumed, partial, sparse) = {
            let mut st = lock(&inc.st);
            st.new_len = len;
            let partial = st.temp.clone().filter(|_| st.resumed > 0);
            (st.base.clone(), st.params, st.resumed, partial, st.sparse)
        };
        let params = params.unwrap_or_else(|| SigParams::for_len(0));
        crate::trace!("recv", "{}: comparing {} chunks", inc.path, cvs.len());
        let base_len = base.as_ref().map_or(0, |b| b.len);
        let (new_chunks, base_chunks) = (chunk_count(len), chunk_count(base_len));
        let same_span =
            |k: u64| k < base_chunks && chunk_span(len, k).1 == chunk_span(base_len, k).1;
        // Different lengths (or a partial to fill): it cannot be identical, so write from the
        // start.
        let writing = AtomicBool::new(len != base_len || partial.is_some());
        let resumed_bytes = AtomicU64::new(0);
        // On a filesystem with reflinks the new file starts as a clone of our copy (one
        // ioctl, no data written): chunks that match are already in place, and only the ones
        // that differ are written. Decided at the first chunk that would be written.
        let cloned = std::sync::OnceLock::<bool>::new();
        let clone_base = || -> bool {
            *cloned.get_or_init(|| {
                let Some(b) = base.as_ref().filter(|_| partial.is_none() && !sparse) else {
                    return false;
                };
                if b.writable {
                    // `--inplace`: the same, with our copy itself as the new file.
                    crate::trace!("recv", "{}: updating in place", inc.path);
                    lock(&inc.st).inplace = true;
                    return true;
                }
                if self.no_reflink.load(Ordering::Relaxed) {
                    return false;
                }
                let Ok(t) = self.temp_file(inc) else {
                    return false;
                };
                match rustix::fs::ioctl_ficlone(t.file(), &b.file) {
                    Ok(()) => {
                        crate::trace!("recv", "{}: cloned our copy (reflink)", inc.path);
                        lock(&inc.st).cloned = true;
                        true
                    }
                    Err(e) => {
                        crate::trace!("recv", "no reflinks here ({e}): writing copies");
                        self.no_reflink.store(true, Ordering::Relaxed);
                        false
                    }
                }
            })
        };
        // Chunk `k` (`n` bytes, chaining value `cv`) is in the new file.
        let record = |k: u64, n: usize, cv: Cv| {
            lock(&inc.st).chunks.insert(k, (n, cv));
            self.obs.progressed(n as u64);
        };
        // Chunk `k` is already in place (in the clone, or in our copy itself with --inplace).
        let keep = |k: u64, n: usize, cv: Cv| {
            let mut st = lock(&inc.st);
            if st.inplace {
                st.kept.insert(k);
            }
            drop(st);
            record(k, n, cv);
        };
        // Our copy is a live mapping that another process could rewrite in place, so a chunk
        // is never hashed from it and then written from it again: it streams through a small
        // private buffer that is hashed and written piece by piece (written directly, through
        // a private copy of the whole chunk, hashed before it is written). Returns the chunk's
        // chaining value; it is recorded (the chunk counts as written) only if it is `want`.
        let stream = |k: u64, data: &[u8], want: Option<&Cv>| -> Result<Option<Cv>, FileError> {
            if same_span(k) && clone_base() {
                // Already in the clone: only its hash is needed (taken of our copy; the clone
                // is checked against changes to it before the file is committed).
                let cv = match want {
                    Some(w) if *w == hash::chunk_cv(k, data) => *w,
                    Some(_) => return Ok(None),
                    None => hash::chunk_cv(k, data),
                };
                keep(k, data.len(), cv);
                return Ok(Some(cv));
            }
            let t = self.temp_file(inc)?;
            if self.direct(inc, &t) {
                // The copy is hashed, then written; the disk write needs no serializing (see
                // `Incoming::write`): it waits on the device, not spinning on the inode lock.
                // A chunk that differs is not written at all: its delta will be.
                let cv = t
                    .write_direct(data, k * CHUNK, |copy| {
                        let cv = hash::chunk_cv(k, copy);
                        (cv, want.is_none_or(|w| *w == cv))
                    })
                    .map_err(|e| self.write_error(inc, e))?;
                if want.is_some_and(|w| *w != cv) {
                    return Ok(None);
                }
                record(k, data.len(), cv);
                return Ok(Some(cv));
            }
            let cv = hash::stream_cv(k, data, |off, piece| {
                let at = k * CHUNK + off as u64;
                if sparse && is_zero(piece) {
                    // Leave it a hole (a reused partial may hold old bytes there).
                    return match t.is_partial() {
                        true => t
                            .punch(at, piece.len() as u64)
                            .map_err(std::io::Error::other),
                        false => Ok(()),
                    };
                }
                let _serial = lock(&inc.write);
                t.file().write_all_at(piece, at)
            })
            .map_err(|e| self.write_error(inc, e))?;
            if want.is_some_and(|w| *w != cv) {
                // Overwritten later by the delta for this chunk.
                return Ok(None);
            }
            record(k, data.len(), cv);
            Ok(Some(cv))
        };
        // A chunk an interrupted transfer already wrote, if it is the one wanted.
        let from_partial = |k: u64, want: Option<&Cv>| -> Result<bool, FileError> {
            let (Some(p), Some(want)) = (&partial, want) else {
                return Ok(false);
            };
            let (off, n) = chunk_span(len, k);
            if off + n as u64 > resumed {
                return Ok(false);
            }
            let buf = hash::read_at(p.file(), off, n).map_err(FileError::ReadBase)?;
            if hash::chunk_cv(k, &buf) != *want {
                return Ok(false);
            }
            record(k, n, *want);
            resumed_bytes.fetch_add(n as u64, Ordering::Relaxed);
            Ok(true)
        };
        let visit = |k: u64| -> Result<ChunkPass, FileError> {
            let want = cvs.get(k as usize);
            if from_partial(k, want)? {
                return Ok((k, true, true));
            }
            let Some(base) = base.as_ref().filter(|_| same_span(k)) else {
                writing.store(true, Ordering::Relaxed);
                return Ok((k, false, false));
            };
            let data = base.chunk(k).unwrap_or_default();
            if writing.load(Ordering::Relaxed) {
                let written = stream(k, data, want)?.is_some();
                return Ok((k, written, written));
            }
            if want != Some(&hash::chunk_cv(k, data)) {
                writing.store(true, Ordering::Relaxed);
                return Ok((k, false, false));
            }
            Ok((k, true, false))
        };
        // Workers take chunks in file order, so the chunks that matched before the first
        // difference showed up (and must be hashed again when they are written late) are
        // only those ahead of it, not also those at the start of another worker's half.
        let next = AtomicU64::new(0);
        let workers = rayon::current_num_threads().clamp(1, new_chunks.max(1) as usize);
        let per_worker: Result<Vec<Vec<ChunkPass>>, FileError> = (0..workers)
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
        let mut pass: Vec<ChunkPass> = per_worker?.into_iter().flatten().collect();
        pass.sort_unstable_by_key(|c| c.0);
        let mismatched: Vec<u32> = pass.iter().filter(|c| !c.1).map(|c| c.0 as u32).collect();
        if mismatched.is_empty() && len == base_len && partial.is_none() {
            // Nothing was written: no temp file exists for it.
            self.identical(id, inc, stamp);
            return Ok(());
        }
        crate::trace!(
            "recv",
            "{}: {} chunks differ, {} matched before the first difference, {} resumed",
            inc.path,
            mismatched.len(),
            pass.iter().filter(|c| c.1 && !c.2).count(),
            resumed_bytes.load(Ordering::Relaxed)
        );
        // Chunks that matched before we knew a new file was needed: streamed in now, hashed
        // again (the digest covers the bytes written; if our copy changed meanwhile,
        // verification fails and the file is sent whole).
        if clone_base() {
            // Those matched the sender's hashes already and sit in the clone.
            for &(k, _, _) in pass.iter().filter(|c| c.1 && !c.2) {
                let (Some(cv), Some(data)) =
                    (cvs.get(k as usize), base.as_ref().and_then(|b| b.chunk(k)))
                else {
                    continue;
                };
                keep(k, data.len(), *cv);
            }
        } else {
            pass.par_iter()
                .filter(|c| c.1 && !c.2)
                .try_for_each(|&(k, _, _)| {
                    let data = base.as_ref().and_then(|b| b.chunk(k)).unwrap_or_default();
                    stream(k, data, None).map(drop)
                })?;
        }
        lock(&self.stats).matched_bytes += pass
            .iter()
            .filter(|c| c.1)
            .map(|c| chunk_span(len, c.0).1 as u64)
            .sum::<u64>();
        // Recorded before the request leaves, so the answer finds it.
        lock(&inc.st).phase = Phase::Wanted {
            chunks: mismatched.iter().copied().collect(),
            literal: base.is_none(),
        };
        match base {
            Some(base) => {
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
            None => {
                let _ = self.out.send(Msg::NeedChunks {
                    id,
                    chunks: mismatched,
                });
            }
        }
        Ok(())
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
}
