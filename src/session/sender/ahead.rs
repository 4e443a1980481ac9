//! Hashing big files before the receiver asks for their chunk hashes, in idle time.
//!
//! A big file's delta starts with the sender hashing all of it (`NewHashes`), which the
//! receiver asks for only once it has the file's entry and has opened its old copy. On a
//! fresh connection the list is complete long before that: the TLS and SSH handshakes and the
//! helper's start take a round trip each. Files listed at least [`AHEAD_MIN`] big are hashed
//! meanwhile, chunk by chunk, by threads that run only when the CPU is otherwise idle
//! (`SCHED_IDLE`), so they cost nothing the sync or the handshakes need. When the receiver
//! asks, the pool hashes what is left of the file alongside them ([`Ahead::finish`]); when it
//! asks for the file whole, or the generation ends, they stop.
//!
//! What was hashed ahead is used only for the version it was read from: the chunks are read
//! through one [`Source`] opened before the first of them, and the caller checks that source
//! with [`Source::check`] as it does its own reads.

use std::collections::HashSet;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rayon::prelude::*;

use crate::engine::Mtime;
use crate::engine::hash::{Cv, chunk_count};
use crate::engine::source::Source;
use crate::proto::FileId;

/// Files at least this big are hashed ahead; smaller ones take little time when asked.
pub(super) const AHEAD_MIN: u64 = 64 << 20;
/// Bytes of files hashed ahead per generation at most: a sync the receiver answers without
/// asking for any of them (nothing changed) spends no more CPU than this on them.
const AHEAD_MAX: u64 = 2 << 30;
/// Threads hashing ahead at most.
const THREADS: usize = 4;

/// One file hashed ahead, or being hashed: its chunks are claimed in order by whoever works
/// on it (the idle threads, and the pool once the receiver asked).
pub(super) struct Ahead {
    pub src: Source,
    next: AtomicU64,
    cvs: Vec<OnceLock<Cv>>,
    /// A read failed: the caller hashes the file itself (and reports what is wrong).
    failed: AtomicBool,
}

impl Ahead {
    pub(super) fn new(src: Source) -> Ahead {
        let n = chunk_count(src.len());
        Ahead {
            src,
            next: AtomicU64::new(0),
            cvs: (0..n).map(|_| OnceLock::new()).collect(),
            failed: AtomicBool::new(false),
        }
    }

    /// Hashes chunks until none is left to claim, `stop` says so, or a read fails.
    fn work(&self, hash: &Hasher, stop: &dyn Fn() -> bool) {
        let len = self.src.len();
        while !stop() && !self.failed.load(Ordering::Relaxed) {
            let k = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(slot) = self.cvs.get(k as usize) else {
                return;
            };
            match hash(&self.src, len, k) {
                Ok(cv) => {
                    let _ = slot.set(cv);
                }
                Err(_) => self.failed.store(true, Ordering::Relaxed),
            }
        }
    }

    fn complete(&self) -> bool {
        self.next.load(Ordering::Relaxed) >= self.cvs.len() as u64
    }

    /// All chunk hashes, the rest computed on the current rayon pool now (a chunk an idle
    /// thread claimed but has not finished is hashed again rather than waited for: an idle
    /// thread may not run for a while). `None` if a read failed; the caller then starts over
    /// on its own. Also returns how many chunks had been hashed ahead.
    pub(super) fn finish(&self, hash: &Hasher) -> Option<(Vec<Cv>, usize)> {
        let early = self.cvs.iter().filter(|c| c.get().is_some()).count();
        let threads = rayon::current_num_threads().max(1);
        (0..threads)
            .into_par_iter()
            .for_each(|_| self.work(hash, &|| false));
        let len = self.src.len();
        let cvs: Option<Vec<Cv>> = self
            .cvs
            .par_iter()
            .enumerate()
            .map(|(k, slot)| match slot.get() {
                Some(cv) => Some(*cv),
                None => hash(&self.src, len, k as u64).ok(),
            })
            .collect();
        match cvs {
            Some(cvs) if !self.failed.load(Ordering::Relaxed) => Some((cvs, early)),
            _ => None,
        }
    }
}

/// How a chunk is hashed: chunk `k` of a source of `len` bytes.
pub(super) type Hasher = dyn Fn(&Source, u64, u64) -> io::Result<Cv> + Send + Sync;

#[derive(Default)]
struct Queue {
    /// Listed big files not opened yet, in list order.
    waiting: VecDeque<(FileId, PathBuf)>,
    /// Being opened by a thread (taken from `waiting`, not in `open` yet).
    opening: HashSet<FileId>,
    /// Opened: being hashed, or hashed and waiting to be asked for.
    open: HashMap<FileId, Arc<Ahead>>,
    offered: u64,
    threads: usize,
}

/// One generation's hashing ahead.
pub(super) struct HashAhead {
    queue: Mutex<Queue>,
    hash: Arc<Hasher>,
    /// The generation is over (or the session): the threads stop.
    over: AtomicBool,
    /// Whether to hash ahead at all.
    enabled: bool,
    /// The threads run at idle priority (always, but in tests that must not depend on the
    /// machine being idle).
    idle: bool,
    /// Files last changed before this are left alone (see `Job::ahead_since`).
    since: Option<Mtime>,
}

impl HashAhead {
    pub(super) fn new(hash: Arc<Hasher>, enabled: bool, since: Option<Mtime>) -> Arc<HashAhead> {
        Self::with_priority(hash, enabled, since, true)
    }

    fn with_priority(
        hash: Arc<Hasher>,
        enabled: bool,
        since: Option<Mtime>,
        idle: bool,
    ) -> Arc<HashAhead> {
        Arc::new(HashAhead {
            queue: Mutex::default(),
            hash,
            over: AtomicBool::new(false),
            enabled: enabled && cfg!(target_os = "linux"),
            idle,
            since,
        })
    }

    /// A listed file of `size` bytes at `path`: hashed ahead if it is big enough and there is
    /// budget left.
    pub(super) fn offer(self: &Arc<Self>, id: FileId, path: PathBuf, size: u64) {
        if !self.enabled || size < AHEAD_MIN || self.over.load(Ordering::Relaxed) {
            return;
        }
        let start = {
            let mut q = super::super::lock(&self.queue);
            if q.offered.saturating_add(size) > AHEAD_MAX {
                return;
            }
            q.offered += size;
            q.waiting.push_back((id, path));
            let want = std::thread::available_parallelism().map_or(1, |n| n.get().min(THREADS));
            let start = want.saturating_sub(q.threads);
            q.threads += start;
            start
        };
        for _ in 0..start {
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("devsync-ahead".into())
                .spawn(move || me.run());
            if spawned.is_err() {
                super::super::lock(&self.queue).threads -= 1;
            }
        }
    }

    /// The receiver asks for file `id`'s chunk hashes: what was hashed of it ahead, if any
    /// (nothing more of it is started by the threads after this).
    pub(super) fn take(&self, id: FileId) -> Option<Arc<Ahead>> {
        let mut q = super::super::lock(&self.queue);
        q.waiting.retain(|(w, _)| *w != id);
        q.opening.remove(&id);
        q.open.remove(&id)
    }

    /// Every chunk hash of `a` (see [`Ahead::finish`]).
    pub(super) fn finish(&self, a: &Ahead) -> Option<(Vec<Cv>, usize)> {
        a.finish(&*self.hash)
    }

    /// The receiver wants file `id` some other way: stop hashing it.
    pub(super) fn unwanted(&self, id: FileId) {
        drop(self.take(id));
    }

    /// The generation is over: the threads stop after the chunk they are on.
    pub(super) fn stop(&self) {
        self.over.store(true, Ordering::Relaxed);
        let mut q = super::super::lock(&self.queue);
        q.waiting.clear();
        q.opening.clear();
        q.open.clear();
    }

    /// One hashing thread: works on the current file until it is hashed (or no longer
    /// wanted), then on the next.
    fn run(self: Arc<Self>) {
        if self.idle && !idle_priority() {
            super::super::lock(&self.queue).threads -= 1;
            return;
        }
        loop {
            let Some((id, ahead)) = self.next_file() else {
                super::super::lock(&self.queue).threads -= 1;
                return;
            };
            let dropped = || {
                self.over.load(Ordering::Relaxed)
                    || !super::super::lock(&self.queue).open.contains_key(&id)
            };
            ahead.work(&*self.hash, &dropped);
            crate::trace!(
                "send",
                "file {id}: hashing ahead {}",
                if ahead.complete() { "done" } else { "stopped" }
            );
        }
    }

    /// The file to work on: an open one with chunks left to claim (the threads work on one
    /// file together), else the next waiting one, opened now.
    fn next_file(&self) -> Option<(FileId, Arc<Ahead>)> {
        loop {
            let (id, path) = {
                let mut q = super::super::lock(&self.queue);
                if self.over.load(Ordering::Relaxed) {
                    return None;
                }
                if let Some((id, a)) = q.open.iter().find(|(_, a)| !a.complete()) {
                    return Some((*id, a.clone()));
                }
                let (id, path) = q.waiting.pop_front()?;
                q.opening.insert(id);
                (id, path)
            };
            // Opened outside the lock: it may wait out a racy window.
            let src = Source::open(&path);
            let mut q = super::super::lock(&self.queue);
            // Asked for (or the generation ended) meanwhile: the usual path has it.
            if !q.opening.remove(&id) || self.over.load(Ordering::Relaxed) {
                continue;
            }
            // Unreadable: when asked for, the usual path reports what is wrong.
            let Ok(src) = src else {
                continue;
            };
            // Unchanged since the last push of this tree began (a second's margin for
            // coarse timestamps): the receiver most likely has it as it is.
            if let Some(since) = self.since {
                let margin = Mtime {
                    sec: since.sec.saturating_sub(1),
                    nsec: since.nsec,
                };
                if src.before.ctime < margin {
                    crate::trace!(
                        "send",
                        "file {id}: unchanged since the last push, not hashed ahead"
                    );
                    continue;
                }
            }
            let ahead = Arc::new(Ahead::new(src));
            q.open.insert(id, ahead.clone());
            return Some((id, ahead));
        }
    }
}

/// Makes the calling thread run only when no other thread wants the CPU.
#[cfg(target_os = "linux")]
fn idle_priority() -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall on the calling thread (pid 0) with a valid parameter block.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn idle_priority() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::hash::{self, CHUNK};

    fn hasher() -> Arc<Hasher> {
        Arc::new(|src: &Source, len: u64, k: u64| {
            hash::read_chunk(&src.file, len, k).map(|b| hash::chunk_cv(k, &b))
        })
    }

    fn file(dir: &std::path::Path, name: &str, chunks: u64, seed: u8) -> (PathBuf, Vec<u8>) {
        let data: Vec<u8> = (0..chunks * CHUNK + 5)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        let p = dir.join(name);
        std::fs::write(&p, &data).unwrap();
        (p, data)
    }

    fn want(data: &[u8]) -> Vec<Cv> {
        data.chunks(CHUNK as usize)
            .enumerate()
            .map(|(k, c)| hash::chunk_cv(k as u64, c))
            .collect()
    }

    #[test]
    fn finish_gives_every_chunk_hash_however_much_was_done_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let (p, data) = file(dir.path(), "f", 5, 1);
        let h = hasher();
        // Nothing ahead, part ahead (a claimed chunk never finished included), all ahead.
        for ahead_chunks in [0, 2, 6] {
            let a = Ahead::new(Source::open(&p).unwrap());
            let done = AtomicU64::new(0);
            a.work(&*h, &|| {
                done.fetch_add(1, Ordering::Relaxed) >= ahead_chunks
            });
            if ahead_chunks == 2 {
                // A thread that claimed chunk 2 and stalled.
                a.next.fetch_add(1, Ordering::Relaxed);
            }
            let (cvs, early) = a.finish(&*h).unwrap();
            assert_eq!(cvs, want(&data), "{ahead_chunks} ahead");
            assert_eq!(early, (ahead_chunks as usize).min(6));
        }
    }

    #[test]
    fn a_file_that_shrank_under_it_is_left_to_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let (p, _) = file(dir.path(), "f", 4, 2);
        let a = Ahead::new(Source::open(&p).unwrap());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(CHUNK)
            .unwrap();
        assert!(a.finish(&*hasher()).is_none());
    }

    #[test]
    fn threads_hash_offered_files_and_stop_when_unwanted_or_over() {
        let dir = tempfile::tempdir().unwrap();
        let (big, data) = file(dir.path(), "big", 3, 3);
        let (other, _) = file(dir.path(), "other", 3, 4);
        let small = file(dir.path(), "small", 1, 5).0;
        let ahead = HashAhead::with_priority(hasher(), true, None, false);
        // (Sizes as listed: the files themselves are small, to keep the test quick.)
        ahead.offer(0, small, AHEAD_MIN - 1); // too small: never hashed ahead
        ahead.offer(1, big, AHEAD_MIN);
        ahead.offer(2, other, AHEAD_MIN);
        assert!(ahead.take(0).is_none());
        // The threads open file 1 first; give them (a bounded) while.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !super::super::super::lock(&ahead.queue)
            .open
            .contains_key(&1)
        {
            assert!(std::time::Instant::now() < deadline, "file 1 never opened");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let a = ahead.take(1).unwrap();
        assert_eq!(a.finish(&*hasher()).unwrap().0, want(&data));
        ahead.unwanted(2);
        ahead.stop();
        assert!(ahead.take(2).is_none());
        while super::super::super::lock(&ahead.queue).threads > 0 {
            assert!(std::time::Instant::now() < deadline, "threads did not stop");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Nothing is started once the generation is over.
        ahead.offer(3, dir.path().join("big"), AHEAD_MIN);
        assert_eq!(super::super::super::lock(&ahead.queue).threads, 0);
    }

    #[test]
    fn files_unchanged_since_the_last_push_are_not_hashed_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let (old, _) = file(dir.path(), "old", 3, 6);
        std::thread::sleep(std::time::Duration::from_millis(600));
        let (new, _) = file(dir.path(), "new", 3, 7);
        // The last push began 1.5 s after `old` last changed: `old` is older than that by
        // more than the second's margin, `new` (written 0.6 s after `old`) is not.
        let c = Source::open(&old).unwrap().before.ctime;
        let at = i128::from(c.sec) * 1_000_000_000 + i128::from(c.nsec) + 1_500_000_000;
        let since = Mtime {
            sec: (at / 1_000_000_000) as i64,
            nsec: (at % 1_000_000_000) as u32,
        };
        let ahead = HashAhead::with_priority(hasher(), true, Some(since), false);
        ahead.offer(0, old, AHEAD_MIN);
        ahead.offer(1, new, AHEAD_MIN);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let q = super::super::super::lock(&ahead.queue);
            if q.waiting.is_empty() && q.opening.is_empty() && q.open.contains_key(&1) {
                break;
            }
            drop(q);
            assert!(std::time::Instant::now() < deadline, "file 1 never opened");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(ahead.take(0).is_none(), "unchanged since: not hashed ahead");
        assert!(ahead.take(1).is_some(), "changed since: hashed ahead");
        ahead.stop();
    }

    #[test]
    fn idle_priority_is_what_the_threads_get() {
        let policy = std::thread::spawn(|| {
            assert!(idle_priority());
            // SAFETY: plain syscall on the calling thread.
            unsafe { libc::sched_getscheduler(0) }
        })
        .join()
        .unwrap();
        assert_eq!(policy, libc::SCHED_IDLE);
    }
}
