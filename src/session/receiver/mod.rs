//! Receiver role: plan each incoming entry against the local tree, ask for what differs,
//! rebuild files chunk by chunk (in parallel, in any order), verify each with BLAKE3 before it
//! replaces anything, then delete extraneous entries (guarded) and fix directory metadata.
//!
//! Threads: the async loop reads frames and dispatches; a planner thread handles the list in
//! order (it needs parents before children); rayon runs signatures, chunk writes and commits.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, mpsc};

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
use crate::engine::scan::{self, ScanOptions};
use crate::engine::{Entry, EntryKind, LocalKind, LocalMeta, Mtime, RelPath};
use crate::proto::{Event, FileId, FrameReader, Msg, Stats, SyncOptions};

mod assemble;
mod finish;
mod planning;

/// File data received but not yet written to disk.
const RECV_BUDGET: usize = 64 << 20;
/// Files at least this big get their blocks reserved before writing.
const PREALLOCATE_MIN: u64 = 1 << 20;

/// The receiver's old copy of a file, used as delta base.
struct Base {
    map: Option<Mmap>,
    len: u64,
}

impl Base {
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
    mode: u32,
    mtime: Mtime,
    before: Option<LocalMeta>,
    st: Mutex<Assembly>,
    /// Serializes writes into the temp file: concurrent `pwrite`s to one inode only spin on
    /// the filesystem's inode lock, burning the core another chunk could hash on.
    write: Mutex<()>,
}

#[derive(Default)]
struct Assembly {
    base: Option<Arc<Base>>,
    params: Option<SigParams>,
    temp: Option<Arc<TempFile>>,
    /// Written chunks: index → (length, chaining value).
    chunks: HashMap<u64, (usize, Cv)>,
    jobs: usize,
    end: Option<(u64, Digest)>,
    /// Whole-file resend already asked for after a failed verification.
    retried: bool,
    error: Option<String>,
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
}

struct Ctx {
    pool: rayon::ThreadPool,
    dest: Option<Dest>,
    opts: SyncOptions,
    out: Out,
    obs: Arc<dyn Observer>,
    stats: Mutex<Stats>,
    files: Mutex<HashMap<FileId, Arc<Incoming>>>,
    /// Whole-file requests the planner has not sent yet.
    needs: Mutex<Vec<FileId>>,
    track: Mutex<Track>,
    dirs: Mutex<DirState>,
    sender_paths: Mutex<HashSet<RelPath>>,
    sender_count: AtomicU32,
    sender_scan_errors: AtomicU32,
    receiver_scan: Mutex<Option<ScanThread>>,
    fatal: super::Fatal,
    done: Mutex<Option<Stats>>,
}

/// The receiver's own scan for `--delete`, running while transfers happen.
type ScanThread = std::thread::JoinHandle<Result<Vec<Entry>, String>>;

enum PlanItem {
    /// A batch of the list; its ids are consecutive from the first.
    Entries(FileId, Vec<Entry>),
    End {
        count: u32,
        scan_errors: u32,
    },
}

/// Runs the receiver until the sender acknowledges completion; returns the totals.
pub async fn run<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    out: Out,
    root: PathBuf,
    opts: SyncOptions,
    obs: Arc<dyn Observer>,
) -> Result<Stats, SessionError> {
    let dest = match root.is_dir() {
        true => Some(Dest::open(&root)?),
        // Only a dry run gets here without a root: it has nothing to compare against.
        false if opts.dry_run => None,
        false => {
            Dest::create_root(&root)?;
            Some(Dest::open(&root)?)
        }
    };
    let receiver_scan = (opts.delete && dest.is_some()).then(|| {
        let (root, filters) = (root.clone(), opts.filters.clone());
        std::thread::spawn(move || {
            let so = ScanOptions {
                filters,
                checksum: false,
                threads: 0,
            };
            scan::scan_to_vec(&root, &so)
                .map(|(entries, _)| entries)
                .map_err(|e| e.to_string())
        })
    });
    let ctx = Arc::new(Ctx {
        pool: super::worker_pool("recv")?,
        dest,
        opts,
        out,
        obs,
        stats: Mutex::new(Stats::default()),
        files: Mutex::new(HashMap::new()),
        needs: Mutex::new(Vec::new()),
        track: Mutex::new(Track {
            outstanding: 0,
            list_done: false,
            finished: false,
        }),
        dirs: Mutex::new(DirState {
            wanted: HashMap::new(),
            fix: HashSet::new(),
        }),
        sender_paths: Mutex::new(HashSet::new()),
        sender_count: AtomicU32::new(0),
        sender_scan_errors: AtomicU32::new(0),
        receiver_scan: Mutex::new(receiver_scan),
        fatal: Default::default(),
        done: Mutex::new(None),
    });
    let (plan_tx, plan_rx) = mpsc::channel::<PlanItem>();
    let planner_ctx = ctx.clone();
    std::thread::Builder::new()
        .name("devsync-plan".into())
        .spawn(move || planner_ctx.planner(plan_rx))
        .map_err(|e| SessionError::Local(format!("starting planner: {e}")))?;
    let budget = Arc::new(Semaphore::new(RECV_BUDGET));
    // Entries received so far: the id the next batch must start at.
    let mut listed: FileId = 0;

    loop {
        let (msg, payload) = super::next_frame(reader, &ctx.fatal, &ctx.out).await?;
        match msg {
            Msg::Entries { first_id, entries } => {
                if first_id != listed {
                    return Err(ctx.violation(format!(
                        "list batch starts at id {first_id}, expected {listed}"
                    )));
                }
                listed = FileId::try_from(entries.len())
                    .ok()
                    .and_then(|n| listed.checked_add(n))
                    .ok_or_else(|| ctx.violation("file ids overflow".into()))?;
                let _ = plan_tx.send(PlanItem::Entries(first_id, entries)); // planner gone: it reported why
            }
            Msg::EndOfList { count, scan_errors } => {
                crate::trace!("recv", "end of list received");
                let _ = plan_tx.send(PlanItem::End { count, scan_errors });
            }
            Msg::Event(ev) => ctx.obs.event(ev),
            Msg::Bye => {
                let stats = lock(&ctx.done).take();
                return stats
                    .ok_or_else(|| ctx.violation("goodbye before the receiver finished".into()));
            }
            Msg::Fatal { message } => return Err(SessionError::Remote(message)),
            msg => {
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

    /// Validates a content message against the file's state and returns the work to do.
    fn dispatch(self: &Arc<Self>, msg: Msg, payload: Bytes) -> Result<Job, SessionError> {
        let c = self.clone();
        let job: Job = match msg {
            Msg::NewHashes { id, len, cvs } => {
                let inc = self.incoming(id)?;
                Box::new(move || c.match_chunks(id, &inc, len, cvs))
            }
            Msg::WholeFiles { files } => {
                let mut work = Vec::with_capacity(files.len());
                let mut off = 0usize;
                for f in files {
                    let inc = self.incoming(f.id)?;
                    let data = payload.slice(off..off + f.len as usize);
                    off += f.len as usize;
                    work.push((f.id, inc, f.digest, data));
                }
                Box::new(move || {
                    for (id, inc, digest, data) in work {
                        c.whole_file(id, &inc, digest, &data);
                    }
                })
            }
            Msg::Data { id, chunk } | Msg::Copy { id, chunk } | Msg::Delta { id, chunk, .. } => {
                let inc = self.incoming(id)?;
                let window = match msg {
                    Msg::Delta {
                        window_start,
                        window_len,
                        len,
                        ..
                    } => Some(Window {
                        start: u64::from(window_start),
                        count: u64::from(window_len),
                        len: len as usize,
                    }),
                    _ => None,
                };
                let is_copy = matches!(msg, Msg::Copy { .. });
                let base = {
                    let mut st = lock(&inc.st);
                    st.jobs += 1;
                    st.base.clone()
                };
                if (is_copy || window.is_some()) && base.is_none() {
                    return Err(self.violation(format!("delta for file {id} without a base")));
                }
                let piece = match (is_copy, window) {
                    (true, _) => Piece::Copy,
                    (false, Some(w)) => Piece::Delta(w, payload),
                    (false, None) => Piece::Literal(payload),
                };
                Box::new(move || c.chunk(id, &inc, base, u64::from(chunk), piece))
            }
            Msg::FileEnd { id, len, digest } => {
                let inc = self.incoming(id)?;
                if chunk_count(len) > crate::proto::msg::MAX_CHUNKS {
                    return Err(self.violation(format!("file {id} claims {len} bytes")));
                }
                Box::new(move || {
                    let ready = {
                        let mut st = lock(&inc.st);
                        st.end = Some((len, digest));
                        st.jobs == 0
                    };
                    if ready {
                        c.finalize(id, &inc);
                    }
                })
            }
            Msg::Identical { id } => {
                let inc = self.incoming(id)?;
                Box::new(move || c.identical(id, &inc))
            }
            Msg::SendFailed {
                id,
                message,
                transient,
            } => {
                let inc = self.incoming(id)?;
                Box::new(move || {
                    let ev = if transient {
                        Event::Warning {
                            path: inc.path.to_string(),
                            message,
                        }
                    } else {
                        Event::Error {
                            path: inc.path.to_string(),
                            message,
                        }
                    };
                    c.complete(id, &inc, Err(ev));
                })
            }
            other => {
                return Err(self.violation(format!("unexpected message for a receiver: {other:?}")));
            }
        };
        Ok(job)
    }
}

const VERIFY_FAILED: &str = "rebuilt file does not match the sender's BLAKE3 digest";

enum Piece {
    Literal(Bytes),
    Copy,
    Delta(Window, Bytes),
}

/// Where a delta's base window lies and how long the chunk it rebuilds is.
struct Window {
    start: u64,
    count: u64,
    len: usize,
}
