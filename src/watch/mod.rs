//! `devsync watch`: an initial sync with push semantics, then one connection and one helper
//! session that stay open, each batch of changes going out as one generation as soon as the
//! events stop coming for a moment (a few milliseconds).
//!
//! ```text
//!  inotify ─▶ Tree::note ─▶ (quiet 3 ms) ─▶ Tree::refresh: rescan what the events name
//!                                              │  local index (path → entry, inode)
//!                                              ▼
//!   synced index ──────────────────▶ diff(synced[scope], local[scope]) ─▶ ChangeSet
//!   (what the remote has)                                                 │ renames, upserts,
//!        ▲                                                                │ removes
//!        └──── update on Done ◀── generation on the live session ◀────────┘
//! ```
//!
//! The local index is what the tree holds; the synced index is what the remote was last
//! told and confirmed. Only the paths events named are compared, so a change costs the same
//! in a 50-file tree as in a 50,000-file one. When the connection drops, the watch keeps
//! noting changes, reconnects with backoff and sends a catch-up generation: the whole list
//! (the receiver compares each entry with what it has, so only what differs travels) plus the
//! renames and removals a diff against the synced index finds. Safety halts stop propagating
//! when the root is deleted, replaced or emptied.

pub mod flush;
pub mod report;
pub mod tree;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

use crate::engine::index::{self, Index};
use crate::engine::scan::ScanOptions;
use crate::engine::{Entry, RelPath};
use crate::proto::{FrameReader, SyncOptions, handshake};
use crate::session::Observer;
use crate::session::client::{self, Live};
use crate::session::sender::{self, GenDone, List, Plan};
use crate::target::Target;
use crate::transport::keep;
use crate::transport::local::LocalHelper;
use crate::transport::remote::{self, RemoteOptions};
use report::{Report, Synced};
use tree::Tree;

/// What a watch needs.
pub struct Config {
    pub local_root: PathBuf,
    pub target: Target,
    /// The target as the user wrote it (for messages).
    pub target_text: String,
    pub opts: SyncOptions,
    pub ropts: RemoteOptions,
    /// A batch of events ends after this long without another…
    pub quiet: Duration,
    /// …or this long after its first event, whichever comes first.
    pub max_wait: Duration,
}

/// How a watch ended (other than by an error before it was ever connected).
#[derive(Debug)]
pub enum End {
    /// Ctrl-C or SIGTERM: the generation under way was finished first.
    Interrupted,
    /// A safety halt: nothing was propagated; the reason.
    Halted(String),
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;

/// A live session and what carries it.
struct Connected {
    live: Live<Reader>,
    link: Link,
}

enum Link {
    /// A helper child process, and what it writes to stderr.
    Local(tokio::process::Child, tokio::task::JoinHandle<Vec<u8>>),
    Remote(
        crate::transport::ssh::Connection,
        tokio::sync::watch::Receiver<crate::transport::ssh::ExecStatus>,
    ),
    /// A kept connection's helper, through its keeper (no stderr or exit status comes back;
    /// ending the session is closing our end of the relay).
    Kept,
}

impl Connected {
    /// Ends the session: politely (`Bye`, a moment for it to be written) or at once.
    /// Returns what the helper said on stderr, if anything.
    async fn close(self, polite: bool) -> String {
        if polite {
            self.live.close(Duration::from_secs(2)).await;
        } else {
            drop(self.live);
        }
        match self.link {
            Link::Local(mut child, stderr) => {
                if !polite {
                    let _ = child.start_kill(); // it may have exited already
                }
                let (_, err) = tokio::time::timeout(
                    Duration::from_secs(2),
                    crate::transport::local::finish(child, stderr),
                )
                .await
                .unwrap_or_default();
                err
            }
            Link::Remote(conn, mut status) => {
                let err = if polite {
                    String::new()
                } else {
                    crate::transport::ssh::wait_exit(&mut status, Duration::from_millis(500))
                        .await
                        .stderr_text()
                };
                // Bounded: a link that broke for writing may never finish a goodbye.
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.close()).await;
                err
            }
            Link::Kept => String::new(),
        }
    }
}

/// A session to the target: through its keeper if there is one; if the helper (most likely
/// a kept one) ended before it answered, nothing was done, and it is tried once more afresh,
/// past any keeper.
async fn connect(cfg: &Config, report: &Arc<Report>) -> anyhow::Result<Connected> {
    match connect_via(cfg, report, true).await {
        Err(e)
            if matches!(
                e.downcast_ref::<crate::session::SessionError>(),
                Some(crate::session::SessionError::Unanswered)
            ) =>
        {
            crate::trace!(
                "watch",
                "the helper ended before answering; connecting afresh"
            );
            connect_via(cfg, report, false).await
        }
        r => r,
    }
}

async fn connect_via(
    cfg: &Config,
    report: &Arc<Report>,
    use_keeper: bool,
) -> anyhow::Result<Connected> {
    type Writer = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;
    // The helper's stream, its root, what carries it, and whether our Hello already went.
    let (reader, writer, root, link, hello_sent): (FrameReader<Reader>, Writer, Vec<u8>, _, _) =
        match &cfg.target {
            Target::Local(path) => {
                let abs = std::path::absolute(path)
                    .with_context(|| format!("resolving {}", path.display()))?;
                let helper = LocalHelper::spawn().context("starting the helper")?;
                let (stdout, stdin, (child, stderr)) = helper.into_parts();
                let mut reader: FrameReader<Reader> = FrameReader::new(Box::new(stdout));
                handshake::await_helper(&mut reader).await?;
                let root = abs.into_os_string().into_encoded_bytes();
                (
                    reader,
                    Box::new(stdin),
                    root,
                    Link::Local(child, stderr),
                    false,
                )
            }
            target => {
                let root = target.remote_path().as_bytes().to_vec();
                let kept = match keep::wanted(target, &cfg.ropts).filter(|_| use_keeper) {
                    Some(ep) => match keep::attach(&ep, target, &cfg.ropts).await {
                        Ok((helper, pid)) => {
                            crate::trace!(
                                "watch",
                                "reusing the kept connection (keeper pid {pid})"
                            );
                            Some(helper)
                        }
                        Err(why) => {
                            crate::trace!("watch", "not reusing a connection: {why}");
                            None
                        }
                    },
                    None => None,
                };
                match kept {
                    Some(helper) => (helper.reader, helper.writer, root, Link::Kept, false),
                    None => {
                        let r = report.clone();
                        let notice: remote::Notice = Arc::new(move |m: String| r.notice(&m));
                        // The Hello goes with the command that starts the helper (saves a
                        // round trip).
                        let early =
                            client::hello_bytes(crate::proto::Role::Sender, &root, &cfg.opts);
                        let remote =
                            remote::open(target, &cfg.ropts, notice, &|| early.clone()).await?;
                        let status = remote.helper.status.clone();
                        let link = Link::Remote(remote.conn, status);
                        (remote.helper.reader, remote.helper.writer, root, link, true)
                    }
                }
            }
        };
    let obs: Arc<dyn Observer> = report.clone();
    let live = client::open_live(
        reader,
        writer,
        cfg.local_root.clone(),
        &root,
        &cfg.opts,
        obs,
        hello_sent,
    )
    .await?;
    Ok(Connected { live, link })
}

/// Ctrl-C and SIGTERM. The streams live as long as the watch, so a signal that arrives
/// while nothing waits for one is kept until something does.
struct Stop {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Stop {
    fn new() -> std::io::Result<Stop> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Stop {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// A flush request: waiting for its marker's event, then for generation `need` to be done.
struct Waiter {
    marker: u64,
    need: Option<u64>,
    /// The watch's error count when the flush was asked for.
    errors_at: u64,
    reply: tokio::sync::oneshot::Sender<Result<u64, String>>,
}

/// Paths the remote did not have as expected are sent again at most this many times in a row.
const MAX_RESENDS: u32 = 3;

struct State {
    tree: Tree,
    /// What the remote has, as far as the generations it confirmed say.
    synced: Index,
    /// Generations started and finished (a finished one is confirmed by the receiver).
    started: u64,
    finished: u64,
    waiters: Vec<Waiter>,
    next_marker: u64,
    /// Paths to send again in full next time, and how often they were.
    resend: Vec<RelPath>,
    resends: HashMap<RelPath, u32>,
    /// Paths an interrupted generation was changing (their remote state is unknown).
    in_doubt: Vec<RelPath>,
    /// Warnings from reading the tree already shown (not repeated at every re-read).
    warned: HashSet<(String, String)>,
    /// Where errors are counted (a flush says if some came up while it waited).
    report: Arc<Report>,
    /// Entries lost by recent batches, for [`mass_deletion`].
    losses: std::collections::VecDeque<(Instant, usize)>,
    /// Whether the remote ever had the initial sync.
    initial_done: bool,
    stop_after_generation: bool,
    /// When directories without a watch are read again next.
    next_recheck: tokio::time::Instant,
    events: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
    flushes: mpsc::UnboundedReceiver<flush::Request>,
    stop: Stop,
}

/// What woke the idle loop.
enum Wake {
    Changes,
    Flush(flush::Request),
    Stop,
    Peer(Result<(), crate::session::SessionError>),
    Recheck,
}

pub async fn run(cfg: Config, report: Arc<Report>) -> anyhow::Result<End> {
    let paths = flush::paths(&cfg.local_root)?;
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let scan = ScanOptions {
        filters: cfg.opts.filters.clone(),
        checksum: cfg.opts.checksum,
        threads: 0,
        report_ours: false,
    };
    // Watch and scan while connecting.
    let root = cfg.local_root.clone();
    let markers = paths.markers.clone();
    let tree = tokio::task::spawn_blocking(move || Tree::start(&root, &scan, markers, ev_tx));
    let (flush_tx, flush_rx) = mpsc::unbounded_channel();
    flush::serve(&paths.socket, flush_tx).await?;
    let _cleanup = RemoveOnDrop(vec![paths.socket.clone(), paths.markers.clone()]);
    report.connecting(&cfg.target_text);
    let first = connect(&cfg, &report).await;
    let tree = tree.await.context("scanning the source")??;
    let mut st = State {
        tree,
        synced: Index::new(),
        started: 0,
        finished: 0,
        waiters: Vec::new(),
        next_marker: 0,
        resend: Vec::new(),
        resends: HashMap::new(),
        in_doubt: Vec::new(),
        warned: HashSet::new(),
        losses: Default::default(),
        initial_done: false,
        stop_after_generation: false,
        next_recheck: tokio::time::Instant::now() + tree::UNWATCHED_RESCAN,
        events: ev_rx,
        flushes: flush_rx,
        stop: Stop::new()?,
        report: report.clone(),
    };
    // The first connection must work: a wrong target or credentials are not retried.
    let mut conn = Some(first?);
    let mut attempt: u32 = 0;
    let mut last_error = String::new();
    loop {
        let c = match conn.take() {
            Some(c) => c,
            None => {
                attempt += 1;
                let wait = backoff(attempt);
                report.reconnecting(&last_error, attempt, wait);
                st.fail_waiters(&format!(
                    "the watch is disconnected ({last_error}); reconnecting"
                ));
                if st.sleep_noting(wait, &last_error).await {
                    return Ok(End::Interrupted);
                }
                match connect(&cfg, &report).await {
                    Ok(c) => c,
                    Err(e) => {
                        last_error = crate::error_chain::chain(e.as_ref());
                        continue;
                    }
                }
            }
        };
        let before = st.finished;
        match session(&cfg, c, &mut st, &report).await {
            Ok(end) => return Ok(end),
            Err(e) => {
                last_error = crate::error_chain::chain(e.as_ref());
                crate::trace!("watch", "session ended: {last_error}");
                // A session that got as far as syncing starts the backoff over.
                if st.finished > before {
                    attempt = 0;
                }
            }
        }
    }
}

/// Removes the watch's socket and markers at exit.
struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Waits before reconnect attempt `n`: 0.25 s doubling to 30 s.
fn backoff(n: u32) -> Duration {
    let ms = 250u64.saturating_mul(1 << n.saturating_sub(1).min(7));
    Duration::from_millis(ms.min(30_000))
}

impl State {
    /// Sleeps `d`, noting events and refusing flushes meanwhile; `true` if told to stop.
    async fn sleep_noting(&mut self, d: Duration, why: &str) -> bool {
        let until = tokio::time::Instant::now() + d;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return false,
                () = self.stop.wait() => return true,
                Some(ev) = self.events.recv() => self.tree.note(ev),
                Some(f) = self.flushes.recv() => {
                    let _ = f.reply.send(Err(format!(
                        "the watch is disconnected ({why}); reconnecting"
                    )));
                }
            }
        }
    }

    fn fail_waiters(&mut self, why: &str) {
        for w in self.waiters.drain(..) {
            let _ = w.reply.send(Err(why.to_string()));
        }
    }

    /// Whether anything is waiting to be sent.
    fn has_work(&self) -> bool {
        self.tree.is_dirty() || !self.resend.is_empty()
    }

    /// Takes in a flush request: makes its marker.
    fn add_waiter(&mut self, req: flush::Request) {
        let n = self.next_marker;
        self.next_marker += 1;
        match self.tree.make_marker(n) {
            Ok(()) => self.waiters.push(Waiter {
                marker: n,
                need: None,
                errors_at: self.report.errors(),
                reply: req.reply,
            }),
            Err(e) => {
                let _ = req.reply.send(Err(format!("making a flush marker: {e}")));
            }
        }
    }

    /// The pending events came to nothing: waiters for the next generation wait for none.
    fn nothing_to_send(&mut self) {
        let next = self.started + 1;
        for w in &mut self.waiters {
            if w.need == Some(next) {
                w.need = Some(self.finished);
            }
        }
    }

    /// Markers that arrived: what each waiter needs; answers those already satisfied.
    fn settle_waiters(&mut self, in_flight: bool) {
        let seen = self.tree.take_markers();
        if !seen.is_empty() {
            // Directories without a watch give no events: a flush reads them again.
            self.tree.recheck_unwatched();
        }
        let pending = self.has_work();
        for w in &mut self.waiters {
            if w.need.is_none() && seen.contains(&w.marker) {
                w.need = Some(if pending {
                    self.started + 1
                } else if in_flight {
                    self.started
                } else {
                    self.finished
                });
            }
        }
        self.answer_waiters();
    }

    fn answer_waiters(&mut self) {
        let (finished, busy) = (self.finished, !self.resend.is_empty());
        let (ready, wait): (Vec<Waiter>, Vec<Waiter>) = self
            .waiters
            .drain(..)
            .partition(|w| w.need.is_some_and(|n| n <= finished) && !busy);
        self.waiters = wait;
        let oldest = self.waiters.iter().map(|w| w.errors_at).min();
        for w in ready {
            // A flush is a promise that what was saved is there: not if some of it failed
            // (and no later generation sent it after all: a file that changed while one
            // generation read it is sent by the next, which its events start).
            let answer = match self.report.failing_since(w.errors_at) {
                0 => Ok(finished),
                n => Err(format!(
                    "{n} error{} while syncing since this flush was asked for (the watch's \
                     output names them); everything else is on the remote",
                    if n == 1 { "" } else { "s" }
                )),
            };
            let _ = w.reply.send(answer); // the asker may be gone
        }
        // Errors from before every flush still waiting (and any asked from now on) count for
        // none of them.
        self.report
            .forget_up_to(oldest.unwrap_or_else(|| self.report.errors()));
    }

    fn any_marker_pending(&self) -> bool {
        self.waiters.iter().any(|w| w.need.is_none())
    }
}

/// Runs one connection's session: the catch-up generation, then a generation per batch of
/// changes. Returns how the watch ended, or the error that ended this connection.
async fn session(
    cfg: &Config,
    mut c: Connected,
    st: &mut State,
    report: &Arc<Report>,
) -> anyhow::Result<End> {
    let fresh = matches!(c.link, Link::Remote(..));
    let r = session_inner(cfg, &mut c, st, report).await;
    let said = c.close(r.is_ok()).await;
    // A watch stopped by the user leaves a kept connection behind, as a push does, for the
    // next command to that target (one made through a keeper left it running).
    if let (true, Ok(End::Interrupted), Some(ep)) =
        (fresh, &r, keep::wanted(&cfg.target, &cfg.ropts))
    {
        keep::spawn(&ep, cfg.ropts.keep_args.clone(), cfg.ropts.keep);
    }
    match r {
        // The helper's own account of an error we already have adds nothing.
        Err(e) if !said.is_empty() && !said.contains(&e.to_string()) => {
            Err(e.context(format!("helper said: {}", said.trim())))
        }
        r => r,
    }
}

async fn session_inner(
    cfg: &Config,
    c: &mut Connected,
    st: &mut State,
    report: &Arc<Report>,
) -> anyhow::Result<End> {
    let reconnected = st.initial_done;
    // Catch up: the initial sync, or what changed while disconnected.
    let t0 = Instant::now();
    // What happened while disconnected may be the root emptied: never a catch-up that wipes.
    if let Err(end) = refresh(st, report) {
        return Ok(end);
    }
    let changes = st.tree.take_changes();
    let snapshot = st.tree.index().clone();
    let (plan, shown) = if !st.initial_done {
        (
            initial_plan(cfg, &snapshot, st.tree.unreadable()),
            Vec::new(),
        )
    } else {
        catch_up_plan(cfg, st, &snapshot, &changes)
    };
    let done = match run_generation(c, st, plan).await {
        Ok(d) => d,
        Err(e) => {
            st.tree.restore(changes);
            return Err(e);
        }
    };
    st.synced = snapshot;
    st.in_doubt.clear();
    st.resend.clear();
    take_unsynced(st, report, &done);
    let first = !st.initial_done;
    st.initial_done = true;
    if first {
        let (files, dirs) = st.synced.iter().fold((0, 0), |(f, d), i| {
            if i.entry.is_dir() {
                (f, d + 1)
            } else {
                (f + 1, d)
            }
        });
        report.ready(
            files,
            dirs,
            st.tree.watched_dirs(),
            &done.stats,
            t0.elapsed(),
        );
    } else {
        if reconnected {
            report.connected();
        }
        let renamed: Vec<(RelPath, RelPath)> = shown;
        report.synced(&Synced {
            generation: st.finished,
            upserted: &[],
            removed: &[],
            renamed: &renamed,
            stats: &done.stats,
            latency: changes.since.map(|t| t.elapsed()),
        });
    }
    if done.stats.delete_refused {
        report.error(
            "",
            "--delete was refused by the guard; the remote keeps its extra entries",
        );
    }
    st.answer_waiters();
    // Then each batch of changes as it comes.
    loop {
        if st.stop_after_generation {
            return Ok(End::Interrupted);
        }
        if !st.has_work() {
            let wake = {
                let recheck = st.tree.has_unwatched();
                let next_recheck = st.next_recheck;
                tokio::select! {
                    Some(ev) = st.events.recv() => { st.tree.note(ev); Wake::Changes }
                    Some(f) = st.flushes.recv() => Wake::Flush(f),
                    () = st.stop.wait() => Wake::Stop,
                    r = c.live.idle() => Wake::Peer(r),
                    () = tokio::time::sleep_until(next_recheck), if recheck => Wake::Recheck,
                }
            };
            match wake {
                Wake::Changes => {}
                Wake::Flush(f) => st.add_waiter(f),
                Wake::Stop => return Ok(End::Interrupted),
                Wake::Peer(r) => r?,
                Wake::Recheck => {
                    st.next_recheck = tokio::time::Instant::now() + tree::UNWATCHED_RESCAN;
                    st.tree.recheck_unwatched();
                }
            }
            coalesce(cfg, st).await;
            st.settle_waiters(false);
            if !st.has_work() {
                continue;
            }
        }
        let t_refresh = Instant::now();
        let refreshed = match refresh(st, report) {
            Ok(r) => r,
            Err(end) => return Ok(end),
        };
        if mass_deletion(st) {
            // Most of the tree is going away (`rm -rf` of the root takes a while on a big
            // tree): nothing of it goes out until it holds still, and then the halts judge.
            settle(st).await;
            if let Err(end) = refresh(st, report) {
                return Ok(end);
            }
        }
        let changes = st.tree.take_changes();
        crate::trace!(
            "watch",
            "refreshed in {:?} (full rescan: {}): {} changed paths",
            t_refresh.elapsed(),
            refreshed.full_rescan,
            changes.scope.len()
        );
        let resend = std::mem::take(&mut st.resend);
        if changes.is_empty() && resend.is_empty() {
            // The events were about nothing that takes part (an ignored log file): flushes
            // that waited for this batch need no generation.
            st.nothing_to_send();
            st.settle_waiters(false);
            continue;
        }
        let scope: Vec<(RelPath, bool)> = changes.scope.clone();
        let view = |ix: &Index| ix.restricted(scope.iter().map(|(p, d)| (p, *d)));
        let (old, new) = (view(&st.synced), view(st.tree.index()));
        let cs = index::diff(&old, &new, nonce(st.started), &changes.touched);
        crate::trace!(
            "watch",
            "diffed in {:?}: {} upserts, {} removes, {} renames",
            t_refresh.elapsed(),
            cs.upserts.len(),
            cs.removes.len(),
            cs.renamed.len()
        );
        let upserted: Vec<RelPath> = cs.upserts.iter().map(|e| e.path.clone()).collect();
        let mut scopes = cs.removes.clone();
        scopes.extend(resend.iter().cloned());
        scopes.sort();
        scopes.dedup();
        let gen_scopes = scopes.clone();
        report.syncing(upserted.len() + cs.removes.len() + cs.renamed.len());
        let entries: Vec<(Entry, bool)> = cs
            .upserts
            .into_iter()
            .map(|e| {
                let seen = changes.touched.contains(&e.path);
                (e, seen)
            })
            .collect();
        let plan = Plan {
            list: List::Given {
                entries,
                root: sender::root_stamp(st.tree.root()),
                // Removes here come from what events named; a read error never makes one.
                read_errors: 0,
            },
            stash: cs.stash,
            place: cs.place,
            scopes,
            scope_root: false,
            replace_dirs: true,
        };
        let errors_before = report.errors();
        let done = match run_generation(c, st, plan).await {
            Ok(d) => d,
            Err(e) => {
                // What this generation was to remove or resend (not every directory whose
                // listing changed: a scope there would delete the remote's own files).
                st.in_doubt.extend(gen_scopes);
                st.tree.restore(changes);
                return Err(e);
            }
        };
        st.synced
            .update_from(&new, scope.iter().map(|(p, d)| (p, *d)));
        for p in &resend {
            // Sent in full now (or gone): what the remote has there is what we have.
            st.synced.update_from(&new, [(p, true)]);
        }
        take_unsynced(st, report, &done);
        // (Not when the receiver could not even list what it did not sync.)
        if !done.overflow {
            report.made_good(
                errors_before,
                upserted.iter().chain(&cs.removes).chain(&resend),
            );
        }
        report.synced(&Synced {
            generation: st.finished,
            upserted: &upserted,
            removed: &cs.removes,
            renamed: &cs.renamed,
            stats: &done.stats,
            latency: changes.since.map(|t| t.elapsed()),
        });
        st.settle_waiters(false);
    }
}

/// Waits for a batch of events to end: `quiet` without another, at most `max_wait` in all;
/// a flush marker ends it at once.
/// Reads again what the events named, judging the halts before and after: how the tree
/// was refreshed, or how the watch ends.
fn refresh(st: &mut State, report: &Report) -> Result<tree::Refreshed, End> {
    let halt = |st: &State| {
        st.tree.halted(st.synced.len()).map(|h| {
            report.halted(&h.to_string());
            End::Halted(h.to_string())
        })
    };
    if let Some(end) = halt(st) {
        return Err(end);
    }
    let refreshed = st.tree.refresh();
    note_refresh(st, report, &refreshed);
    match halt(st) {
        Some(end) => Err(end),
        None => Ok(refreshed),
    }
}

/// Whether this batch loses many entries, or half of what the remote has: maybe the start
/// of a root being deleted or emptied, which `rm -rf` does over many batches on a big tree.
/// Such a batch waits for the deletions to pause (then the halts judge); a wanted deletion
/// of that size (`rm -rf node_modules`) is only that much later.
fn mass_deletion(st: &mut State) -> bool {
    let (had, have) = (st.synced.len(), st.tree.index().len());
    let lost = had.saturating_sub(have);
    // Losses of the last few seconds count together: `rm -rf` paces itself over batches.
    let now = Instant::now();
    st.losses
        .retain(|(t, _)| now.duration_since(*t) < MASS_WINDOW);
    let recent: usize = st.losses.iter().map(|(_, n)| n).sum();
    if lost > 0 {
        st.losses.push_back((now, lost));
    }
    lost > 0 && (recent + lost >= MASS_MIN || (had >= MASS_MIN && have * 2 <= had))
}

/// How far back the losses of earlier batches count.
const MASS_WINDOW: Duration = Duration::from_secs(5);

/// Entries one batch may lose without waiting for the deletions to pause.
const MASS_MIN: usize = 100;
/// How long events must pause for a mass deletion to count as over, and how long it is
/// waited for at most.
const MASS_QUIET: Duration = Duration::from_secs(1);
const MASS_LIMIT: Duration = Duration::from_secs(15);

/// Takes in events until they pause for [`MASS_QUIET`] (at most [`MASS_LIMIT`]).
async fn settle(st: &mut State) {
    let start = tokio::time::Instant::now();
    loop {
        let left = MASS_LIMIT.saturating_sub(start.elapsed());
        if left.is_zero() {
            return;
        }
        tokio::select! {
            Some(ev) = st.events.recv() => st.tree.note(ev),
            Some(f) = st.flushes.recv() => st.add_waiter(f),
            () = tokio::time::sleep(MASS_QUIET.min(left)) => return,
        }
    }
}

async fn coalesce(cfg: &Config, st: &mut State) {
    let start = tokio::time::Instant::now();
    loop {
        while let Ok(ev) = st.events.try_recv() {
            st.tree.note(ev);
        }
        // A flush whose marker is in: its batch is complete.
        if st.any_marker_pending() && st.tree.has_markers() {
            return;
        }
        let left = cfg.max_wait.saturating_sub(start.elapsed());
        if left.is_zero() {
            return;
        }
        tokio::select! {
            Some(ev) = st.events.recv() => st.tree.note(ev),
            Some(f) = st.flushes.recv() => st.add_waiter(f),
            () = tokio::time::sleep(cfg.quiet.min(left)) => return,
        }
    }
}

fn note_refresh(st: &mut State, report: &Report, r: &tree::Refreshed) {
    // A directory that cannot be read is read again every few seconds: say so once (until
    // it can be read, or something else is said about it).
    let now: HashSet<(String, String)> = r.warnings.iter().cloned().collect();
    for (path, message) in &r.warnings {
        if !st.warned.contains(&(path.clone(), message.clone())) {
            report.warning(path, message);
        }
    }
    if !r.warnings.is_empty() || r.full_rescan {
        st.warned = now;
    }
    // Newly excluded: the remote keeps its copies, and we forget we sent them.
    for p in &r.excluded_now {
        st.synced.remove_subtree(p);
    }
}

/// The receiver's report of paths it did not have as expected: sent again in full next time
/// (a few times at most).
fn take_unsynced(st: &mut State, report: &Report, done: &GenDone) {
    if done.overflow {
        // Too many to list: everything is compared again. What the remote was told to
        // remove stays removed (the synced index is kept), so deletions keep working.
        let all: Vec<RelPath> = st
            .tree
            .index()
            .iter()
            .map(|i| i.entry.path.clone())
            .collect();
        st.tree.resend(&all);
        st.resend.clear();
        return;
    }
    let mut again = Vec::new();
    let listed: HashSet<&RelPath> = done.unsynced.iter().collect();
    st.resends.retain(|p, _| listed.contains(p));
    for p in &done.unsynced {
        let n = st.resends.entry(p.clone()).or_insert(0);
        *n += 1;
        if *n > MAX_RESENDS {
            report.error(
                &p.to_string(),
                "the remote keeps differing from what was sent here; giving up on it until it \
                 changes again",
            );
            st.resends.remove(p);
            continue;
        }
        st.synced.remove_subtree(p);
        again.push(p.clone());
    }
    st.tree.resend(&again);
    st.resend.extend(again);
}

/// Runs one generation, noting events and flush requests while it is under way (a stop
/// request waits for it to finish).
async fn run_generation(c: &mut Connected, st: &mut State, plan: Plan) -> anyhow::Result<GenDone> {
    st.started += 1;
    let fut = c.live.generation(plan);
    tokio::pin!(fut);
    let done = loop {
        tokio::select! {
            r = &mut fut => break r?,
            Some(ev) = st.events.recv() => st.tree.note(ev),
            Some(f) = st.flushes.recv() => st.add_waiter(f),
            () = st.stop.wait(), if !st.stop_after_generation => st.stop_after_generation = true,
        }
        st.settle_waiters(true);
    };
    st.finished = st.started;
    Ok(done)
}

/// Parking names differ from generation to generation (and from watch to watch).
fn nonce(generation: u64) -> u64 {
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ (u64::from(std::process::id()) << 40)
    });
    base.wrapping_add(generation << 20)
}

/// The initial sync: everything, with push semantics.
fn initial_plan(cfg: &Config, local: &Index, unreadable: bool) -> Plan {
    Plan {
        list: List::Given {
            entries: local.iter().map(|i| (i.entry.clone(), false)).collect(),
            root: sender::root_stamp(&cfg.local_root),
            read_errors: u32::from(unreadable),
        },
        stash: Vec::new(),
        place: Vec::new(),
        scopes: Vec::new(),
        scope_root: cfg.opts.delete,
        replace_dirs: cfg.opts.delete,
    }
}

/// After a reconnect: the renames and removals since the remote was last in sync, and the
/// whole list (compared entry by entry on the other side, so only what differs travels).
fn catch_up_plan(
    cfg: &Config,
    st: &State,
    local: &Index,
    changes: &tree::Changes,
) -> (Plan, Vec<(RelPath, RelPath)>) {
    let unreadable = st.tree.unreadable();
    let cs = index::diff(&st.synced, local, nonce(st.started), &changes.touched);
    let mut scopes = cs.removes.clone();
    scopes.extend(st.in_doubt.iter().cloned());
    scopes.extend(st.resend.iter().cloned());
    // Paths still here are listed (and so kept); what is gone under them goes.
    scopes.sort();
    scopes.dedup();
    let plan = Plan {
        list: List::Given {
            entries: local
                .iter()
                .map(|i| (i.entry.clone(), changes.touched.contains(&i.entry.path)))
                .collect(),
            root: sender::root_stamp(&cfg.local_root),
            read_errors: u32::from(unreadable),
        },
        stash: cs.stash,
        place: cs.place,
        scopes,
        scope_root: false,
        replace_dirs: true,
    };
    (plan, cs.renamed)
}
