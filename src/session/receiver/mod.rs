//! Receiver role: plan each incoming entry against the local tree, ask for what differs,
//! rebuild files chunk by chunk (in parallel, in any order), verify each with BLAKE3 before it
//! replaces anything, then delete extraneous entries (guarded) and fix directory metadata.
//!
//! Threads: the async loop reads frames and dispatches; a planner thread handles the list in
//! order (it needs parents before children); rayon runs signatures, chunk writes and commits.
//!
//! Nothing the sender says is trusted: each file's progress is a small state machine
//! ([`Assembly`]) advanced by the read loop itself, in wire order, before any work is handed to
//! a worker, so a message that does not fit the file's state (data nobody asked for, a second
//! end, a whole file after chunks) is a protocol violation, and a file completes exactly once.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use memmap2::Mmap;
use tokio::io::AsyncRead;
use tokio::sync::Semaphore;

use super::conn::Out;
use super::{Observer, SessionError, lock};
use crate::engine::delta::{self, DELTA_MIN_BASE, SigParams};
use crate::engine::dest::{Dest, DestError, Removed, TempFile};
use crate::engine::hash::{self, CHUNK, Cv, Digest, chunk_count, chunk_span};
use crate::engine::plan::{Change, ChangeOp, ItemKind};
use crate::engine::scan::{self, ScanEvent, ScanOptions};
use crate::engine::{Entry, EntryKind, LocalKind, LocalMeta, Mtime, RelPath};
use crate::proto::{Event, FileId, FrameReader, Msg, Stamp, Stats, SyncOptions};

mod assemble;
mod finish;
mod matching;
mod planning;

/// File data received but not yet written to disk.
const RECV_BUDGET: usize = 64 << 20;
/// Files at least this big get their blocks reserved before writing.
const PREALLOCATE_MIN: u64 = 1 << 20;
/// Replacements at least this big are written past the page cache where that pays
/// (`Ctx::direct`): below it, a rename's writeback is too small to matter.
const DIRECT_MIN: u64 = 8 << 20;
/// A sender that restarts one file more often than this is not acting in good faith.
const MAX_RESTARTS: u32 = 8;

/// The receiver's old copy of a file (a delta base), or a resumed partial's bytes.
struct Base {
    map: Option<Mmap>,
    len: u64,
    /// Open for cloning its blocks into the new file (reflink filesystems), or for writing the
    /// changed ranges into it (`--inplace`, then open read-write).
    file: std::fs::File,
    /// Opened for `--inplace`: the new content goes into this file's own blocks.
    writable: bool,
    /// (device, inode), for telling hard links apart with `--inplace`.
    inode: (u64, u64),
    /// Its change time when opened: a clone is only as good as the hashes taken of the same
    /// bytes, so a copy that changed meanwhile is not trusted (see [`Base::unchanged`]).
    ctime: (i64, u64),
}

/// A stat's change time (the field types differ between platforms).
#[allow(clippy::unnecessary_cast)]
fn ctime_of(s: &rustix::fs::Stat) -> (i64, u64) {
    (s.st_ctime as i64, s.st_ctime_nsec as u64)
}

impl Base {
    /// Whether our copy is still as it was when opened (no write changed its ctime).
    fn unchanged(&self) -> bool {
        rustix::fs::fstat(&self.file)
            .is_ok_and(|s| ctime_of(&s) == self.ctime && s.st_size as u64 == self.len)
    }

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
    before: Option<LocalMeta>,
    /// Our copy can serve as delta base.
    basis: bool,
    st: Mutex<Assembly>,
    /// Serializes writes into the temp file: concurrent `pwrite`s to one inode only spin on
    /// the filesystem's inode lock, burning the core another chunk could hash on.
    write: Mutex<()>,
}

/// What the receiver asked the sender for, for the file's current attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ask {
    Whole,
    Delta,
}

/// The steps of a delta against a big base (or a resumed partial): the sender's chunk hashes
/// come first, then our pass over the base, then only the chunks we asked for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
enum Phase {
    /// Not a big delta: a whole file, or a small base signed at once.
    #[default]
    Plain,
    /// `NeedDelta` sent; waiting for `NewHashes`.
    AwaitHashes,
    /// Comparing the hashes with our copy.
    Matching,
    /// Asked for these chunks: as deltas, or (`literal`) as data.
    Wanted { chunks: HashSet<u32>, literal: bool },
}

/// How the sender ended the current attempt at a file.
#[derive(Debug)]
enum End {
    /// All chunks were sent; the file's length, digest and attributes.
    Complete {
        len: u64,
        digest: Digest,
        stamp: Stamp,
    },
    /// The whole file came in one message; its job writes and commits it.
    Whole,
    /// Our copy already has the content.
    Identical(Stamp),
    /// The file changed while being sent: start over.
    Restart,
    /// The sender could not send it.
    Failed(Event),
}

#[derive(Default)]
struct Assembly {
    asked: Option<Ask>,
    base: Option<Arc<Base>>,
    params: Option<SigParams>,
    temp: Option<Arc<TempFile>>,
    /// Bytes of an interrupted earlier transfer in `temp` (a resumed partial), to be checked
    /// chunk by chunk against the sender's hashes.
    resumed: u64,
    /// Where a big file's delta is (what may arrive next).
    phase: Phase,
    /// The sender's file has holes: no space reserved, zeros left as holes.
    sparse: bool,
    /// `temp` began as a reflink clone of `base`: chunks that match stay as they are.
    cloned: bool,
    /// `--inplace`: `temp` only stages the chunks that differ; they are copied into `base`
    /// itself once the whole file is verified. Chunks that match are in `kept`.
    inplace: bool,
    kept: HashSet<u64>,
    /// `--inplace`: chunks staged only where they differ from our copy, and those ranges
    /// (offset in the file, length); only these are copied into it.
    runs: HashMap<u64, Vec<(u64, u64)>>,
    /// The length of the version the sender hashed (its `NewHashes`), once known.
    new_len: u64,
    /// Written chunks: index → (length, chaining value).
    chunks: HashMap<u64, (usize, Cv)>,
    /// Work handed to the pool for this file and not finished yet.
    jobs: usize,
    end: Option<End>,
    /// The attempt's end was taken to be verified and applied (`end` is empty again): nothing
    /// more may arrive for this attempt, or it would land in a file being checked or copied.
    finalizing: bool,
    /// Whole-file resend already asked for after a failed verification.
    retried: bool,
    restarts: u32,
    error: Option<assemble::FileError>,
    /// Reported (applied or failed): nothing more happens to this file.
    completed: bool,
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
    /// Directories this generation writes into without listing them (only what changed is
    /// listed): the mtime they had, to put back once our writes have moved it.
    original: HashMap<Vec<u8>, Mtime>,
    /// The sender's root: applied to ours last.
    root: Option<Stamp>,
}

struct Ctx {
    pool: Arc<rayon::ThreadPool>,
    dest: Option<Arc<Dest>>,
    opts: SyncOptions,
    out: Out,
    obs: Arc<dyn Observer>,
    /// This generation's list is the sender's whole tree.
    whole: bool,
    /// A directory where the sender has a file or symlink may be replaced.
    replace_dirs: bool,
    stats: Mutex<Stats>,
    files: Mutex<HashMap<FileId, Arc<Incoming>>>,
    /// Whole-file requests the planner has not sent yet.
    needs: Mutex<Vec<FileId>>,
    /// Files and bytes planned for transfer so far.
    planned: Mutex<(u64, u64)>,
    track: Mutex<Track>,
    dirs: Mutex<DirState>,
    /// Where the list is the truth: the whole tree (guarded), and subtrees.
    scopes: Mutex<(bool, Vec<RelPath>)>,
    sender_paths: Mutex<HashSet<RelPath>>,
    sender_count: AtomicU32,
    sender_scan_errors: AtomicU32,
    receiver_scan: Mutex<Option<ScanThread>>,
    /// Paths where our tree was not what the sender expected.
    unsynced: Mutex<Vec<RelPath>>,
    fatal: Arc<super::Fatal>,
    done: Mutex<Option<Stats>>,
    /// A reflink clone failed here once (ext4, tmpfs, another filesystem per file): do not
    /// try again this session.
    no_reflink: AtomicBool,
    /// `DEVSYNC_NO_DIRECT`: big replacements go through the page cache everywhere.
    no_direct: bool,
    /// `--inplace`: the inodes (device, inode) opened as delta bases this session, and whether
    /// for writing. A file is only updated in place if no other path of this sync (a hard
    /// link) maps the same inode, and a path whose inode is being updated is not mapped.
    base_inodes: Mutex<HashMap<(u64, u64), bool>>,
}

/// The receiver's own scan for `--delete`, running while transfers happen: its entries, and
/// leftovers of killed sessions.
type ScanThread = std::thread::JoinHandle<Result<(Vec<Entry>, Vec<ScanEvent>), String>>;

enum PlanItem {
    Stash(Vec<(RelPath, RelPath)>),
    Place(Vec<(RelPath, RelPath)>),
    /// A batch of the list; its ids are consecutive from the first. `changed`: the sender saw
    /// these change.
    Entries(FileId, Vec<Entry>, bool),
    End {
        count: u32,
        scan_errors: u32,
    },
}

/// What the session shares across generations.
struct Session {
    pool: Arc<rayon::ThreadPool>,
    dest: Option<Arc<Dest>>,
    root: PathBuf,
    opts: SyncOptions,
    out: Out,
    obs: Arc<dyn Observer>,
    fatal: Arc<super::Fatal>,
}

/// The generation being received, as the read loop tracks it.
struct Current {
    ctx: Arc<Ctx>,
    plan_tx: mpsc::Sender<PlanItem>,
    /// Entries received so far: the id the next batch must start at.
    listed: FileId,
    list_started: bool,
    list_ended: bool,
    placing: bool,
}

impl Current {
    fn is_done(&self) -> bool {
        lock(&self.ctx.done).is_some()
    }
}

impl Session {
    fn start_generation(&self, whole: bool, replace_dirs: bool) -> Result<Current, SessionError> {
        let ctx = Arc::new(Ctx {
            pool: self.pool.clone(),
            dest: self.dest.clone(),
            opts: self.opts.clone(),
            out: self.out.clone(),
            obs: self.obs.clone(),
            whole,
            replace_dirs,
            stats: Mutex::new(Stats::default()),
            files: Mutex::new(HashMap::new()),
            needs: Mutex::new(Vec::new()),
            planned: Mutex::new((0, 0)),
            track: Mutex::new(Track {
                outstanding: 0,
                list_done: false,
                finished: false,
            }),
            dirs: Mutex::new(DirState {
                wanted: HashMap::new(),
                fix: HashSet::new(),
                original: HashMap::new(),
                root: None,
            }),
            scopes: Mutex::new((false, Vec::new())),
            sender_paths: Mutex::new(HashSet::new()),
            sender_count: AtomicU32::new(0),
            sender_scan_errors: AtomicU32::new(0),
            receiver_scan: Mutex::new(None),
            unsynced: Mutex::new(Vec::new()),
            fatal: self.fatal.clone(),
            done: Mutex::new(None),
            no_reflink: AtomicBool::new(std::env::var_os("DEVSYNC_NO_REFLINK").is_some()),
            no_direct: std::env::var_os("DEVSYNC_NO_DIRECT").is_some(),
            base_inodes: Mutex::new(HashMap::new()),
        });
        let (plan_tx, plan_rx) = mpsc::channel::<PlanItem>();
        let planner_ctx = ctx.clone();
        std::thread::Builder::new()
            .name("devsync-plan".into())
            .spawn(move || planner_ctx.planner(plan_rx))
            .map_err(|e| SessionError::Local(format!("starting planner: {e}")))?;
        Ok(Current {
            ctx,
            plan_tx,
            listed: 0,
            list_started: false,
            list_ended: false,
            placing: false,
        })
    }

    /// Starts the receiver's own scan of the whole tree, for `--delete` at the end.
    fn scan_root(&self, ctx: &Ctx) {
        if self.dest.is_none() {
            return;
        }
        let (root, filters) = (self.root.clone(), self.opts.filters.clone());
        let handle = std::thread::spawn(move || {
            let so = ScanOptions {
                filters,
                checksum: false,
                threads: 0,
                report_ours: true,
            };
            scan::scan_to_vec(&root, &so).map_err(|e| e.to_string())
        });
        *lock(&ctx.receiver_scan) = Some(handle);
    }
}

/// The generation a list-phase message belongs to (one that is not done).
fn open<'a>(cur: &'a mut Option<Current>, out: &Out) -> Result<&'a mut Current, SessionError> {
    match cur {
        Some(c) if !c.is_done() => Ok(c),
        _ => Err(super::Fatal::violation(
            out,
            "a generation's message outside a generation".into(),
        )),
    }
}

/// How long a receiver waits for another session writing into the same root to end: long
/// enough for a helper whose client vanished to notice (`DEVSYNC_LOCK_WAIT_MS` in tests).
fn lock_wait() -> Duration {
    let ms = std::env::var("DEVSYNC_LOCK_WAIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    Duration::from_millis(ms)
}

/// Takes the destination's lock, waiting a bounded time for a session that holds it.
async fn lock_root(dest: &Dest, obs: &dyn Observer) -> Result<(), SessionError> {
    let (started, wait) = (Instant::now(), lock_wait());
    let mut told = false;
    while !dest.try_lock_root()? {
        if started.elapsed() >= wait {
            let who = dest
                .root_lock_holder()
                .map(|pid| format!(" (pid {pid})"))
                .unwrap_or_default();
            return Err(SessionError::Local(format!(
                "{}: another devsync session{who} is syncing into this directory (a `devsync \
                 watch`, or a push or pull still running); stop it, or wait for it to end, and \
                 retry",
                dest.root_path().display()
            )));
        }
        if !told {
            told = true;
            obs.event(Event::Warning {
                path: dest.root_path().display().to_string(),
                message: format!(
                    "another devsync session is writing here; waiting up to {} s for it to end",
                    wait.as_secs()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Runs the receiver for a session's generations until the sender says goodbye; returns the
/// totals of all of them.
pub async fn run<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    out: Out,
    root: PathBuf,
    opts: SyncOptions,
    obs: Arc<dyn Observer>,
) -> Result<Stats, SessionError> {
    // A copy lands where cp would put it: into an existing directory, or under a new name.
    let (root, rename) = match &opts.copy {
        Some(spec) => {
            let l = super::copy::landing(&root, spec)?;
            (l.root, l.rename)
        }
        None => (root, None),
    };
    // Copied files go into a directory whose own attributes are not the copy's business.
    let keep_root = opts.copy.is_some();
    let dest = match root.is_dir() {
        true => Some(Arc::new(Dest::open(&root)?)),
        // Only a dry run gets here without a root: it has nothing to compare against.
        false if opts.dry_run => None,
        false => {
            Dest::create_root(&root)?;
            Some(Arc::new(Dest::open(&root)?))
        }
    };
    // One session at a time per destination tree; copies (into /tmp, into a home) only
    // replace the files they name, atomically, and do not shut others out.
    if let (Some(d), false, None) = (&dest, opts.dry_run, &opts.copy) {
        lock_root(d, &*obs).await?;
    }
    // Keep the root writable for us while we fill it; its final mode comes at the end.
    if let (Some(d), false, false) = (&dest, opts.dry_run, keep_root) {
        let meta = d.root_meta()?;
        if meta.mode & 0o700 != 0o700 {
            d.set_root_meta(Some(meta.mode | 0o700), None)?;
        }
    }
    let session = Session {
        pool: super::worker_pool("recv")?,
        dest,
        root,
        opts,
        out,
        obs,
        fatal: Default::default(),
    };
    let budget = Arc::new(Semaphore::new(RECV_BUDGET));
    let mut total = Stats::default();
    let mut cur: Option<Current> = None;
    let mut last_generation: Option<u64> = None;
    let violation = |what: &str| super::Fatal::violation(&session.out, what.to_string());

    let mut generations = 0u64;
    loop {
        let (msg, payload) = super::next_frame(reader, &session.fatal, &session.out).await?;
        if let Some(spec) = &session.opts.copy {
            super::copy::check_peer(spec, &msg, generations).map_err(|e| violation(&e))?;
        }
        if matches!(msg, Msg::GenStart { .. }) {
            generations += 1;
        }
        match msg {
            Msg::GenStart {
                generation,
                whole,
                replace_dirs,
            } => {
                if let Some(c) = &cur {
                    let Some(stats) = lock(&c.ctx.done).clone() else {
                        return Err(violation("a generation began before the last one was done"));
                    };
                    total.add(&stats);
                }
                if last_generation.is_some_and(|l| generation <= l) {
                    return Err(violation("generation numbers must increase"));
                }
                last_generation = Some(generation);
                crate::trace!("recv", "generation {generation} begins");
                cur = Some(session.start_generation(whole, replace_dirs)?);
            }
            Msg::Stash { moves } => {
                let c = open(&mut cur, &session.out)?;
                if c.list_started || c.placing {
                    return Err(violation("parking after placing or the list began"));
                }
                let _ = c.plan_tx.send(PlanItem::Stash(moves)); // planner gone: it reported why
            }
            Msg::Place { moves } => {
                let c = open(&mut cur, &session.out)?;
                if c.list_started {
                    return Err(violation("renames after the list began"));
                }
                c.placing = true;
                let _ = c.plan_tx.send(PlanItem::Place(moves)); // planner gone: it reported why
            }
            Msg::Scope { root, paths } => {
                let c = open(&mut cur, &session.out)?;
                if c.list_started {
                    return Err(violation("a scope after the list began"));
                }
                let mut sc = lock(&c.ctx.scopes);
                if root && !sc.0 {
                    sc.0 = true;
                    session.scan_root(&c.ctx);
                }
                if sc.1.len() + paths.len() > crate::proto::msg::MAX_BATCH * 16 {
                    return Err(violation("too many scopes"));
                }
                sc.1.extend(paths);
            }
            Msg::Entries {
                first_id,
                entries,
                changed,
            } => {
                let c = open(&mut cur, &session.out)?;
                if c.list_ended {
                    return Err(violation("list entries after the end of the list"));
                }
                if first_id != c.listed {
                    return Err(violation(&format!(
                        "list batch starts at id {first_id}, expected {}",
                        c.listed
                    )));
                }
                c.list_started = true;
                c.listed = FileId::try_from(entries.len())
                    .ok()
                    .and_then(|n| c.listed.checked_add(n))
                    .ok_or_else(|| violation("file ids overflow"))?;
                let entries = match &rename {
                    Some(r) => entries
                        .into_iter()
                        .map(|mut e| {
                            if let Some(p) = super::copy::renamed(&e.path, r) {
                                e.path = p;
                            }
                            e
                        })
                        .collect(),
                    None => entries,
                };
                if session.opts.copy.is_some() {
                    for e in &entries {
                        super::copy::check_arrival(&session.root, e).map_err(|m| {
                            let _ = session.out.send(Msg::Fatal { message: m.clone() });
                            SessionError::Local(m)
                        })?;
                    }
                }
                // A copy compares content even where size and mtime match, as cp would copy.
                let changed = changed || session.opts.copy.is_some();
                let _ = c
                    .plan_tx
                    .send(PlanItem::Entries(first_id, entries, changed)); // planner gone: it reported why
            }
            Msg::EndOfList {
                count,
                scan_errors,
                root,
            } => {
                let c = open(&mut cur, &session.out)?;
                if c.list_ended {
                    return Err(violation("the list ended twice"));
                }
                c.list_ended = true;
                c.list_started = true;
                crate::trace!("recv", "end of list received");
                lock(&c.ctx.dirs).root = root;
                let _ = c.plan_tx.send(PlanItem::End { count, scan_errors });
            }
            Msg::Event(ev) => session.obs.event(ev),
            Msg::Ping => {}
            Msg::Bye => {
                if let Some(c) = &cur {
                    let Some(stats) = lock(&c.ctx.done).clone() else {
                        return Err(violation("goodbye before the receiver finished"));
                    };
                    total.add(&stats);
                }
                return Ok(total);
            }
            Msg::Fatal { message } => return Err(SessionError::Remote(message)),
            msg => {
                let Some(c) = cur.as_ref().filter(|c| !c.is_done()) else {
                    return Err(violation(&format!(
                        "unexpected message between generations: {msg:?}"
                    )));
                };
                let ctx = c.ctx.clone();
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
    fn violation(&self, what: String) -> SessionError {
        super::Fatal::violation(&self.out, what)
    }

    /// Records a fatal error from a worker and tells the peer (see [`super::Fatal::fail`]).
    fn fail(&self, e: SessionError) {
        self.fatal.fail(&self.out, e);
    }

    fn incoming(&self, id: FileId) -> Result<Arc<Incoming>, SessionError> {
        lock(&self.files)
            .get(&id)
            .cloned()
            .ok_or_else(|| self.violation(format!("data for file {id}, which was not requested")))
    }

    /// Advances file `id`'s state for a message of kind `kind` (in wire order, here in the
    /// read loop) or refuses one that does not fit it. Returns the file and what to do next.
    fn advance(&self, id: FileId, kind: Kind) -> Result<(Arc<Incoming>, Step), SessionError> {
        let inc = self.incoming(id)?;
        let mut st = lock(&inc.st);
        let bad = |what: &str| Err(self.violation(format!("file {id}: {what}")));
        let Some(asked) = st.asked else {
            return bad("message for a file that was not asked for");
        };
        if st.end.is_some() || st.finalizing {
            return bad("message after the file was ended");
        }
        let big = st.phase != Phase::Plain;
        let wanted = |st: &Assembly, k: u32, lit: bool| matches!(&st.phase, Phase::Wanted { chunks, literal } if *literal == lit && chunks.contains(&k));
        let step = match kind {
            Kind::Whole => {
                if asked != Ask::Whole || st.jobs > 0 || !st.chunks.is_empty() {
                    return bad("whole file where chunks were expected");
                }
                st.end = Some(End::Whole);
                Step::Go
            }
            Kind::Hashes => {
                if asked != Ask::Delta || st.phase != Phase::AwaitHashes {
                    return bad("chunk hashes that were not asked for");
                }
                st.phase = Phase::Matching;
                st.jobs += 1;
                Step::Go
            }
            Kind::Data(k) => {
                if asked == Ask::Delta && !wanted(&st, k, true) {
                    return bad("data for a chunk that was not asked for");
                }
                st.jobs += 1;
                Step::Chunk(st.base.clone())
            }
            Kind::Copy => {
                if asked != Ask::Delta || big || st.base.is_none() {
                    return bad("a copy without a base");
                }
                st.jobs += 1;
                Step::Chunk(st.base.clone())
            }
            Kind::Delta(k) => {
                if asked != Ask::Delta || st.base.is_none() || (big && !wanted(&st, k, false)) {
                    return bad("a delta that was not asked for");
                }
                st.jobs += 1;
                Step::Chunk(st.base.clone())
            }
            Kind::Sparse => {
                let early = asked == Ask::Whole || st.phase == Phase::AwaitHashes;
                if st.sparse || !early || st.jobs > 0 || !st.chunks.is_empty() {
                    return bad("'sparse' after the file's data began");
                }
                st.sparse = true;
                Step::Ready(false)
            }
            Kind::End(end) => {
                match &end {
                    End::Identical(_) if asked != Ask::Delta || big || st.base.is_none() => {
                        return bad("'identical' where it cannot be");
                    }
                    End::Complete { .. }
                        if matches!(st.phase, Phase::AwaitHashes | Phase::Matching) =>
                    {
                        return bad("the end of a file before its chunks were asked for");
                    }
                    End::Restart => {
                        st.restarts += 1;
                        if st.restarts > MAX_RESTARTS {
                            return bad("restarted too many times");
                        }
                    }
                    _ => {}
                }
                st.end = Some(end);
                Step::Ready(st.jobs == 0)
            }
        };
        drop(st);
        Ok((inc, step))
    }

    /// Validates a content message against the file's state and returns the work to do.
    fn dispatch(self: &Arc<Self>, msg: Msg, payload: Bytes) -> Result<Job, SessionError> {
        let c = self.clone();
        if let Msg::WholeFiles { files } = msg {
            let mut work = Vec::with_capacity(files.len());
            let mut off = 0usize;
            for f in files {
                let (inc, _) = self.advance(f.id, Kind::Whole)?;
                let end = off + f.len as usize;
                // `validate` checked that the lengths add up to the payload.
                let data = payload.slice(off.min(payload.len())..end.min(payload.len()));
                off = end;
                work.push((f.id, inc, f.digest, f.stamp, data));
            }
            return Ok(Box::new(move || {
                for (id, inc, digest, stamp, data) in work {
                    c.whole_file(id, &inc, digest, stamp, &data);
                }
            }));
        }
        let (id, kind) = match &msg {
            Msg::NewHashes { id, .. } => (*id, Kind::Hashes),
            Msg::Data { id, chunk } | Msg::Zeros { id, chunk, .. } => (*id, Kind::Data(*chunk)),
            Msg::Sparse { id } => (*id, Kind::Sparse),
            Msg::Copy { id, .. } => (*id, Kind::Copy),
            Msg::Delta { id, chunk, .. } => (*id, Kind::Delta(*chunk)),
            Msg::FileEnd { id, len, .. } if chunk_count(*len) > crate::proto::msg::MAX_CHUNKS => {
                return Err(self.violation(format!("file {id} claims {len} bytes")));
            }
            Msg::FileEnd {
                id,
                len,
                digest,
                stamp,
            } => (
                *id,
                Kind::End(End::Complete {
                    len: *len,
                    digest: *digest,
                    stamp: *stamp,
                }),
            ),
            Msg::Identical { id, stamp } => (*id, Kind::End(End::Identical(*stamp))),
            Msg::Restart { id } => (*id, Kind::End(End::Restart)),
            Msg::SendFailed {
                id,
                message,
                transient,
            } => {
                let path = lock(&self.files)
                    .get(id)
                    .map(|i| i.path.to_string())
                    .unwrap_or_default();
                let message = message.clone();
                let ev = if *transient {
                    Event::Warning { path, message }
                } else {
                    Event::Error { path, message }
                };
                (*id, Kind::End(End::Failed(ev)))
            }
            other => {
                return Err(self.violation(format!("unexpected message for a receiver: {other:?}")));
            }
        };
        let (inc, step) = self.advance(id, kind)?;
        let job: Job = match (msg, step) {
            (
                Msg::NewHashes {
                    len, cvs, stamp, ..
                },
                _,
            ) => Box::new(move || c.match_chunks(id, &inc, len, cvs, stamp)),
            (Msg::Data { chunk, .. }, Step::Chunk(base)) => {
                let piece = Piece::Literal(payload);
                Box::new(move || c.chunk(id, &inc, base, u64::from(chunk), piece))
            }
            (Msg::Zeros { chunk, len, .. }, Step::Chunk(base)) => {
                let piece = Piece::Zeros(len as usize);
                Box::new(move || c.chunk(id, &inc, base, u64::from(chunk), piece))
            }
            (Msg::Sparse { .. }, _) => Box::new(|| {}),
            (Msg::Copy { chunk, .. }, Step::Chunk(base)) => {
                Box::new(move || c.chunk(id, &inc, base, u64::from(chunk), Piece::Copy))
            }
            (
                Msg::Delta {
                    chunk,
                    window_start,
                    window_len,
                    len,
                    ..
                },
                Step::Chunk(base),
            ) => {
                let w = Window {
                    start: u64::from(window_start),
                    count: u64::from(window_len),
                    len: len as usize,
                };
                let piece = Piece::Delta(w, payload);
                Box::new(move || c.chunk(id, &inc, base, u64::from(chunk), piece))
            }
            (_, Step::Ready(now)) => Box::new(move || {
                if now {
                    c.finalize(id, &inc);
                }
            }),
            _ => return Err(self.violation(format!("file {id}: unexpected message"))),
        };
        Ok(job)
    }
}

/// The kinds of message that advance a file's state.
enum Kind {
    Whole,
    Hashes,
    /// Literal chunk data (or a hole) for this chunk.
    Data(u32),
    /// A chunk is the base's at the same offset.
    Copy,
    /// A delta for this chunk.
    Delta(u32),
    /// The file has holes.
    Sparse,
    End(End),
}

/// What a message did to its file's state.
enum Step {
    /// Work to do.
    Go,
    /// A chunk to write, against this base.
    Chunk(Option<Arc<Base>>),
    /// The attempt has ended; `true` if no work is pending, so it can be finished now.
    Ready(bool),
}

enum Piece {
    Literal(Bytes),
    /// A hole of this many bytes.
    Zeros(usize),
    Copy,
    Delta(Window, Bytes),
}

/// Where a delta's base window lies and how long the chunk it rebuilds is.
struct Window {
    start: u64,
    count: u64,
    len: usize,
}
