//! Hashing big files before the receiver asks for their chunk hashes, in idle time.
//!
//! A big file's delta starts with the sender hashing all of it (`NewHashes`), which the
//! receiver asks for only once it has the file's entry and has opened its old copy. On a
//! fresh connection the list is complete long before that: the TLS and SSH handshakes and the
//! helper's start take a round trip each. Files listed at least [`AHEAD_MIN`] big are hashed
//! meanwhile, chunk by chunk, by threads that run only when a CPU is otherwise idle
//! (`SCHED_IDLE`). When the receiver asks, the pool hashes what is
//! left of the file alongside them ([`Ahead::finish`]); when it asks for the file whole, or
//! the generation ends, they stop.
//!
//! Must not: make a normal-priority thread wait for an idle one (an idle thread may not run
//! for a long time on a busy machine). So the idle threads poll their work from a channel
//! (`try_recv`, which never registers a waiter a sender would have to lock) and are woken with
//! `unpark`; they mark progress in atomics and `OnceLock`s; they open files without waiting
//! out or probing a racy window (no lease, no shared lock). Their remaining locks are the
//! receiver end of the channel (shared with each other only) and the allocator's.
//! Must not: decide what is sent. What was hashed ahead is used only for the version it was
//! read from; the caller checks that (see `Ctx::hash_for_delta`).

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

use rayon::prelude::*;

use crate::engine::Mtime;
use crate::engine::hash::{Cv, chunk_count};
use crate::engine::source::Source;
use crate::proto::FileId;

/// Files at least this big are hashed ahead; smaller ones take little time when asked.
pub(super) const AHEAD_MIN: u64 = 64 << 20;
/// Bytes of files hashed ahead per generation at most.
const AHEAD_MAX: u64 = 2 << 30;
/// Threads hashing ahead at most.
const THREADS: usize = 4;

/// Which files a generation hashes ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AheadPolicy {
    Off,
    /// Every big file (no record of an earlier push of these trees).
    All,
    /// Big files changed (by ctime) since this, when the last completed push of these trees
    /// began: the receiver most likely has the others as they are.
    ChangedSince(Mtime),
}

/// How a chunk is hashed: chunk `k` of a source of `len` bytes.
pub(super) type Hasher = dyn Fn(&Source, u64, u64) -> io::Result<Cv> + Send + Sync;

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
                // Claims are unique: nobody else sets this slot.
                Ok(cv) => {
                    let _ = slot.set(cv);
                }
                Err(_) => self.failed.store(true, Ordering::Relaxed),
            }
        }
    }

    /// All chunk hashes, the rest computed on the current rayon pool now (a chunk an idle
    /// thread claimed but has not finished is hashed again rather than waited for). `None` if
    /// a read failed; the caller then reads the file afresh. Also returns how many chunks had
    /// been hashed ahead.
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

/// A listed big file, from its offer until it is taken or the generation ends.
struct Slot {
    id: FileId,
    path: PathBuf,
    /// Opened (by the first idle thread to get to it), if it was.
    ahead: OnceLock<Option<Arc<Ahead>>>,
    /// Taken by the caller, or no longer wanted: the idle threads leave it.
    taken: AtomicBool,
}

/// One generation's hashing ahead.
pub(super) struct HashAhead {
    policy: AheadPolicy,
    hash: Arc<Hasher>,
    /// Offered slots not yet taken (normal-priority threads only).
    slots: Mutex<HashMap<FileId, Arc<Slot>>>,
    /// Work for the idle threads: each slot once per thread wanted, so they all work on it
    /// (normal-priority threads only).
    tx: mpsc::Sender<Arc<Slot>>,
    /// Shared by the idle threads only.
    rx: Mutex<mpsc::Receiver<Arc<Slot>>>,
    /// The idle threads, to wake (normal-priority threads only).
    woken: Mutex<Vec<std::thread::Thread>>,
    threads: AtomicU64,
    /// Threads wanted: one per CPU, at most [`THREADS`].
    want: u64,
    /// Bytes of opened files, against [`AHEAD_MAX`] (idle threads only).
    opened: AtomicU64,
    /// The generation is over (or the session): the threads stop.
    over: AtomicBool,
    /// The threads run at idle priority (always, but in tests that must not depend on the
    /// machine being idle).
    idle: bool,
}

impl HashAhead {
    pub(super) fn new(hash: Arc<Hasher>, policy: AheadPolicy) -> Arc<HashAhead> {
        Self::with_priority(hash, policy, true)
    }

    fn with_priority(hash: Arc<Hasher>, policy: AheadPolicy, idle: bool) -> Arc<HashAhead> {
        let policy = match cfg!(target_os = "linux") {
            true => policy,
            false => AheadPolicy::Off,
        };
        let (tx, rx) = mpsc::channel();
        let want = match policy {
            AheadPolicy::Off => 0,
            _ => std::thread::available_parallelism().map_or(1, |n| n.get().min(THREADS)),
        };
        Arc::new(HashAhead {
            policy,
            hash,
            slots: Mutex::default(),
            tx,
            rx: Mutex::new(rx),
            woken: Mutex::default(),
            threads: AtomicU64::new(0),
            want: want as u64,
            opened: AtomicU64::new(0),
            over: AtomicBool::new(false),
            idle,
        })
    }

    /// A listed file of `size` bytes at `path`: hashed ahead if it is big enough.
    pub(super) fn offer(self: &Arc<Self>, id: FileId, path: PathBuf, size: u64) {
        if self.policy == AheadPolicy::Off || size < AHEAD_MIN || self.over.load(Ordering::Relaxed)
        {
            return;
        }
        let slot = Arc::new(Slot {
            id,
            path,
            ahead: OnceLock::new(),
            taken: AtomicBool::new(false),
        });
        super::super::lock(&self.slots).insert(id, slot.clone());
        for _ in 0..self.want {
            let _ = self.tx.send(slot.clone()); // cannot fail: the receiver lives in `self`
        }
        // The threads live until the generation is over (parked when there is no work), so
        // this only ever starts the first `want` of them.
        let more = |n: u64| (n < self.want).then_some(n + 1);
        while self
            .threads
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, more)
            .is_ok()
        {
            let me = self.clone();
            match std::thread::Builder::new()
                .name("devsync-ahead".into())
                .spawn(move || me.run())
            {
                Ok(h) => super::super::lock(&self.woken).push(h.thread().clone()),
                Err(_) => break,
            }
        }
        self.wake();
    }

    fn wake(&self) {
        for t in super::super::lock(&self.woken).iter() {
            t.unpark();
        }
    }

    /// The receiver asks for file `id`'s chunk hashes: what was hashed of it ahead, if any
    /// (the idle threads leave it from now on).
    pub(super) fn take(&self, id: FileId) -> Option<Arc<Ahead>> {
        let slot = super::super::lock(&self.slots).remove(&id)?;
        slot.taken.store(true, Ordering::Relaxed);
        slot.ahead.get().cloned().flatten()
    }

    /// The receiver wants file `id` some other way: stop hashing it.
    pub(super) fn unwanted(&self, id: FileId) {
        drop(self.take(id));
    }

    /// Every chunk hash of `a` (see [`Ahead::finish`]).
    pub(super) fn finish(&self, a: &Ahead) -> Option<(Vec<Cv>, usize)> {
        a.finish(&*self.hash)
    }

    /// The generation is over: the threads stop after the chunk they are on.
    pub(super) fn stop(&self) {
        self.over.store(true, Ordering::Relaxed);
        for slot in super::super::lock(&self.slots).drain() {
            slot.1.taken.store(true, Ordering::Relaxed);
        }
        self.wake();
    }

    /// One idle thread: works on each slot it is handed until the generation is over.
    fn run(self: Arc<Self>) {
        if self.idle && !idle_priority() {
            return;
        }
        loop {
            if self.over.load(Ordering::Relaxed) {
                return;
            }
            // A lock only other idle threads take.
            let next = super::super::lock(&self.rx).try_recv();
            let slot = match next {
                Ok(slot) => slot,
                Err(mpsc::TryRecvError::Empty) => {
                    // Woken by `offer` and `stop`; the timeout only bounds a lost wakeup.
                    std::thread::park_timeout(Duration::from_millis(200));
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => return,
            };
            if slot.taken.load(Ordering::Relaxed) {
                continue;
            }
            // The first thread opens it; the others wait for that (idle threads only).
            let Some(ahead) = slot.ahead.get_or_init(|| self.open(&slot)).clone() else {
                continue;
            };
            let stop = || self.over.load(Ordering::Relaxed) || slot.taken.load(Ordering::Relaxed);
            ahead.work(&*self.hash, &stop);
        }
    }

    /// Opens `slot`'s file, unless the policy or the budget leaves it alone.
    fn open(&self, slot: &Slot) -> Option<Arc<Ahead>> {
        // Changed just now (an edit right before the push): waited out here, where waiting
        // blocks nobody, a few times at most. Unreadable, or still changing: left to the
        // usual path, which reports what is wrong when the file is asked for.
        let mut src = None;
        for _ in 0..4 {
            src = Source::open_settled(&slot.path).ok()?;
            if src.is_some() || slot.taken.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(crate::engine::source::RACY_WINDOW);
        }
        let src = src?;
        if let AheadPolicy::ChangedSince(since) = self.policy {
            // A second's margin for coarse timestamps.
            let margin = Mtime {
                sec: since.sec.saturating_sub(1),
                nsec: since.nsec,
            };
            if src.before.ctime < margin {
                let id = slot.id;
                crate::trace!(
                    "send",
                    "file {id}: unchanged since the last push, not hashed ahead"
                );
                return None;
            }
        }
        let len = src.len();
        let fits = |n: u64| n.checked_add(len).filter(|t| *t <= AHEAD_MAX);
        self.opened
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, fits)
            .ok()?;
        Some(Arc::new(Ahead::new(src)))
    }
}

/// Makes the calling thread run only when no other thread wants the CPU. (Not the idle I/O
/// class too: a normal reader of a page an idle-class read is bringing in would wait for it.)
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
    use crate::session::lock;
    use std::time::{Duration, Instant};

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
        // Past the racy window: the idle threads leave a file that changed just now.
        std::thread::sleep(crate::engine::source::RACY_WINDOW + Duration::from_millis(5));
        (p, data)
    }

    fn want(data: &[u8]) -> Vec<Cv> {
        data.chunks(CHUNK as usize)
            .enumerate()
            .map(|(k, c)| hash::chunk_cv(k as u64, c))
            .collect()
    }

    /// Waits (30 s at most) until `done`, or fails the test with `what`.
    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until the threads opened file `id` or decided to leave it.
    fn settled_on(ahead: &HashAhead, id: FileId) -> Option<Arc<Ahead>> {
        let slot = lock(&ahead.slots).get(&id).cloned().unwrap();
        wait_until(&format!("file {id} never opened"), || {
            slot.ahead.get().is_some()
        });
        slot.ahead.get().cloned().flatten()
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
        let ahead = HashAhead::with_priority(hasher(), AheadPolicy::All, false);
        // (Sizes as listed: the files themselves are small, to keep the test quick.)
        ahead.offer(0, small, AHEAD_MIN - 1); // too small: never hashed ahead
        ahead.offer(1, big, AHEAD_MIN);
        ahead.offer(2, other, AHEAD_MIN);
        assert!(ahead.take(0).is_none());
        assert!(settled_on(&ahead, 1).is_some());
        let a = ahead.take(1).unwrap();
        assert_eq!(a.finish(&*hasher()).unwrap().0, want(&data));
        assert!(ahead.take(1).is_none(), "taken once");
        ahead.unwanted(2);
        ahead.stop();
        assert!(ahead.take(2).is_none());
        // Nothing is offered once the generation is over, and the threads end.
        ahead.offer(3, dir.path().join("big"), AHEAD_MIN);
        assert!(ahead.take(3).is_none());
        let gone = Arc::downgrade(&ahead);
        drop(ahead);
        wait_until("the threads did not end", || gone.strong_count() == 0);
    }

    #[test]
    fn files_unchanged_since_the_last_push_are_not_hashed_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let (old, _) = file(dir.path(), "old", 3, 6);
        std::thread::sleep(Duration::from_millis(600));
        let (new, _) = file(dir.path(), "new", 3, 7);
        // The last push began 1.5 s after `old` last changed: `old` is older than that by
        // more than the second's margin, `new` (written 0.6 s after `old`) is not.
        let c = Source::open(&old).unwrap().before.ctime;
        let at = i128::from(c.sec) * 1_000_000_000 + i128::from(c.nsec) + 1_500_000_000;
        let since = Mtime {
            sec: (at / 1_000_000_000) as i64,
            nsec: (at % 1_000_000_000) as u32,
        };
        let ahead = HashAhead::with_priority(hasher(), AheadPolicy::ChangedSince(since), false);
        ahead.offer(0, old, AHEAD_MIN);
        ahead.offer(1, new, AHEAD_MIN);
        assert!(
            settled_on(&ahead, 0).is_none(),
            "unchanged since: not hashed ahead"
        );
        assert!(
            settled_on(&ahead, 1).is_some(),
            "changed since: hashed ahead"
        );
        ahead.stop();
    }

    #[test]
    fn nothing_is_hashed_ahead_when_off() {
        let dir = tempfile::tempdir().unwrap();
        let (p, _) = file(dir.path(), "f", 3, 8);
        let ahead = HashAhead::with_priority(hasher(), AheadPolicy::Off, false);
        ahead.offer(0, p, AHEAD_MIN);
        assert!(lock(&ahead.slots).is_empty());
        assert_eq!(ahead.threads.load(Ordering::Relaxed), 0);
    }

    #[cfg(target_os = "linux")]
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
