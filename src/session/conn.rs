//! The outbound half of a connection: a queue drained by one writer task, and the byte budget
//! that bounds how much file data a sender may have queued.
//!
//! The file list takes a side road: walker threads append encoded list frames to a shared
//! buffer ([`Out::append_list`]) and only wake the writer when the buffer stops being empty or
//! grows by another [`LIST_CHUNK`]. The writer lets the list wait up to [`LAZY_FLUSH`] for
//! company, so a 40k-entry list leaves as a few dozen large writes instead of thousands of
//! tiny SSH packets and TLS records, and costs a few dozen wake-ups instead of one per
//! directory. Any other frame takes the waiting list with it and is flushed at once.
//!
//! Sending never blocks (the queue is unbounded), so any thread or task can report an event or
//! make a request without risking a deadlock against a peer that is itself blocked writing.
//! Memory stays bounded because bulk producers take a [`Budget`] permit before reading data,
//! and the writer releases it once the bytes are on the stream.
//!
//! Liveness: when nothing else went out for [`Keepalive::ping`], the writer sends `Ping`, so a
//! live peer is never silent for long, however busy (or idle, as a watch is) its session; a
//! peer that has not read what we wrote for [`Keepalive::dead`] is taken for gone and the
//! connection fails, as does a read that waits that long for the peer's next frame
//! ([`crate::session::next_frame`]). A helper whose client vanished without closing the
//! stream therefore ends by itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};

use super::lock;
use crate::proto::{FrameReader, FrameWriter, Msg, ProtoError, Traffic};

/// Longest the list waits in the writer's hands for more frames to share a flush.
pub const LAZY_FLUSH: std::time::Duration = std::time::Duration::from_millis(2);

/// How often an idle writer says it is alive, and how long a silent or stalled peer is
/// waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub ping: std::time::Duration,
    pub dead: std::time::Duration,
}

impl Keepalive {
    /// 15 s pings; a peer is dead after 2 min without a byte (or without reading ours).
    /// `DEVSYNC_PEER_TIMEOUT_MS` overrides the limit (pings go at an eighth of it).
    pub fn from_env() -> Keepalive {
        let dead = std::env::var("DEVSYNC_PEER_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&ms| ms >= 100)
            .map_or(
                std::time::Duration::from_secs(120),
                std::time::Duration::from_millis,
            );
        Keepalive {
            ping: (dead / 8).min(std::time::Duration::from_secs(15)),
            dead,
        }
    }
}

/// The list buffer wakes the writer again each time it grows by this much.
pub const LIST_CHUNK: usize = 64 << 10;

/// Bytes moving on a connection: ours going out, the peer's coming in (the latter known once
/// the read side has started).
#[derive(Default)]
struct Moving {
    written: OnceLock<Arc<AtomicU64>>,
    heard: OnceLock<Arc<AtomicU64>>,
}

impl Moving {
    fn total(&self) -> u64 {
        let get = |c: &OnceLock<Arc<AtomicU64>>| c.get().map_or(0, |a| a.load(Ordering::Relaxed));
        get(&self.written).wrapping_add(get(&self.heard))
    }
}

/// Runs `f`, unless nothing moves for `dead`: neither our bytes out nor the peer's in. A slow
/// link (bytes trickle) or a peer too busy to read that still pings is alive; only a
/// connection on which nothing at all happens is given up.
async fn unless_dead<T>(
    dead: std::time::Duration,
    moving: &Moving,
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, ProtoError>>,
) -> Result<T, ProtoError> {
    tokio::pin!(f);
    let tick = (dead / 8).max(std::time::Duration::from_millis(10));
    let mut last = moving.total();
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::select! {
            biased;
            r = &mut f => return r,
            () = tokio::time::sleep(tick) => {
                let now = moving.total();
                if now != last {
                    (last, since) = (now, tokio::time::Instant::now());
                } else if since.elapsed() >= dead {
                    return Err(ProtoError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("{what} for {} s; taking the other side for gone", dead.as_secs()),
                    )));
                }
            }
        }
    }
}

// Frames are the common item and move through the queue once; boxing them would cost an
// allocation per frame to save space on the rare `ListReady`.
#[allow(clippy::large_enum_variant)]
enum Item {
    Frame(Msg, Bytes, Option<Permit>),
    /// The list buffer has frames waiting.
    ListReady,
    /// Write the waiting list now and flush (it ended).
    Flush,
}

/// How the list is coming along, for a transport that sends its start ahead of the writer.
#[derive(Default)]
struct Listing {
    /// Set once a list ended ([`Out::end_list`]).
    ended: std::sync::atomic::AtomicBool,
    /// Woken whenever the list buffer grows.
    grown: tokio::sync::Notify,
}

/// Cloneable handle for queueing frames.
#[derive(Clone)]
pub struct Out {
    tx: mpsc::UnboundedSender<Item>,
    /// Encoded list frames not yet taken by the writer.
    list: Arc<Mutex<Vec<u8>>>,
    listing: Arc<Listing>,
    /// Set (once) when the writer failed: the connection is gone.
    broken: watch::Receiver<Option<String>>,
    keep: Keepalive,
    moving: Arc<Moving>,
}

#[derive(Debug, thiserror::Error)]
#[error("connection writer has stopped")]
pub struct Closed;

impl Out {
    pub fn send(&self, msg: Msg) -> Result<(), Closed> {
        self.tx
            .send(Item::Frame(msg, Bytes::new(), None))
            .map_err(|_| Closed)
    }

    pub fn send_data(
        &self,
        msg: Msg,
        payload: Bytes,
        permit: Option<Permit>,
    ) -> Result<(), Closed> {
        self.tx
            .send(Item::Frame(msg, payload, permit))
            .map_err(|_| Closed)
    }

    /// Lets `append` add whole encoded frames ([`crate::proto::frame::encode`]) to the list
    /// buffer. They go out in append order, before any frame queued after this returns.
    pub fn append_list<T>(&self, append: impl FnOnce(&mut Vec<u8>) -> T) -> Result<T, Closed> {
        let (t, wake) = {
            let mut buf = lock(&self.list);
            let before = buf.len();
            let t = append(&mut buf);
            let grew = buf.len() > before;
            (
                t,
                grew && (before == 0 || before / LIST_CHUNK != buf.len() / LIST_CHUNK),
            )
        };
        self.listing.grown.notify_one();
        if wake {
            self.tx.send(Item::ListReady).map_err(|_| Closed)?;
        }
        Ok(t)
    }

    /// Queues `msg` in list order: behind the list frames appended so far, ahead of those
    /// appended later (for what frames a list: a generation's start, renames, scopes).
    pub fn send_listed(&self, msg: &Msg) -> Result<(), crate::session::SessionError> {
        match self.append_list(|buf| crate::proto::frame::encode(msg, &[], buf)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(c) => Err(c.into()),
        }
    }

    /// Queues `msg`, the frame that ends a list, in list order ([`Out::send_listed`]); the
    /// list then goes out at once instead of waiting for company.
    pub fn end_list(&self, msg: &Msg) -> Result<(), crate::session::SessionError> {
        self.send_listed(msg)?;
        self.listing.ended.store(true, Ordering::Release);
        self.listing.grown.notify_one();
        Ok(self.tx.send(Item::Flush).map_err(|_| Closed)?)
    }

    /// Whether the writer has stopped (the session is over): work for it can stop too.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// How long the peer may be silent before it is taken for gone.
    pub fn peer_timeout(&self) -> std::time::Duration {
        self.keep.dead
    }

    /// Waits for the peer's next frame from `reader` (whose bytes also tell the writer the
    /// peer is alive), unless nothing moves on the connection for the keepalive limit.
    pub(crate) async fn next_from<R: AsyncRead + Unpin>(
        &self,
        reader: &mut FrameReader<R>,
    ) -> Result<Option<(Msg, Bytes)>, ProtoError> {
        let _ = self.moving.heard.set(reader.moved()); // the same reader every time
        let only_heard = Moving::default();
        let _ = only_heard.heard.set(reader.moved());
        unless_dead(
            self.keep.dead,
            &only_heard,
            "nothing from the other side",
            reader.next(),
        )
        .await
    }

    /// Resolves with the error once writing to the peer has failed; pending forever otherwise.
    /// Read loops select on it: a link that fails for writing may never signal the read side.
    pub async fn broken(&self) -> String {
        let mut rx = self.broken.clone();
        let seen = rx.wait_for(Option::is_some).await.map(|v| v.clone());
        match seen {
            Ok(v) => v.unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }
}

/// The receiving end of an [`Out`] whose writer has not started yet: frames queue up until
/// [`Pending::start`] is given a stream (so work can begin before the connection exists).
pub struct Pending {
    rx: mpsc::UnboundedReceiver<Item>,
    list: Arc<Mutex<Vec<u8>>>,
    listing: Arc<Listing>,
    broken: watch::Sender<Option<String>>,
    keep: Keepalive,
    moving: Arc<Moving>,
}

/// A queue for frames and its not-yet-started writer.
pub fn channel() -> (Out, Pending) {
    static KEEP: std::sync::OnceLock<Keepalive> = std::sync::OnceLock::new();
    channel_with(*KEEP.get_or_init(Keepalive::from_env))
}

/// [`channel`] with explicit keepalive settings (tests).
pub fn channel_with(keep: Keepalive) -> (Out, Pending) {
    let (tx, rx) = mpsc::unbounded_channel::<Item>();
    let (broken, broken_rx) = watch::channel(None);
    let list = Arc::new(Mutex::new(Vec::new()));
    let listing = Arc::new(Listing::default());
    let moving = Arc::new(Moving::default());
    (
        Out {
            tx,
            list: list.clone(),
            listing: listing.clone(),
            broken: broken_rx,
            keep,
            moving: moving.clone(),
        },
        Pending {
            rx,
            list,
            listing,
            broken,
            keep,
            moving,
        },
    )
}

/// Starts the writer task at once (see [`Pending::start`]).
pub fn spawn_writer<W>(
    w: FrameWriter<W>,
) -> (Out, tokio::task::JoinHandle<Result<Traffic, ProtoError>>)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out, pending) = channel();
    (out, pending.start(w))
}

/// The writer's end of the list buffer.
struct ListTaker {
    shared: Arc<Mutex<Vec<u8>>>,
    /// Swapped with the shared buffer, so neither side reallocates on every round.
    spare: Vec<u8>,
}

impl ListTaker {
    fn waiting(&self) -> usize {
        lock(&self.shared).len()
    }

    /// Writes out whatever list frames are waiting (without flushing).
    async fn write<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut FrameWriter<W>,
    ) -> Result<(), ProtoError> {
        std::mem::swap(&mut *lock(&self.shared), &mut self.spare);
        if !self.spare.is_empty() {
            w.write_frames(&self.spare).await?;
            self.spare.clear();
        }
        Ok(())
    }
}

impl Pending {
    /// Moves whole list frames queued so far, at most `max` bytes of them, to the end of
    /// `into`, for a transport to send before this writer starts (behind the exec that starts
    /// the helper, so the list does not wait for the helper's greeting); the writer sends
    /// only what follows. Order holds: a frame queued before now was queued after the list
    /// frames it must follow, which are among those taken or already gone. Returns the bytes
    /// moved.
    pub fn take_list(&self, max: usize, into: &mut Vec<u8>) -> usize {
        let mut buf = lock(&self.list);
        let mut end = 0;
        while let Some(word) = buf.get(end..end + 4) {
            let len = word.iter().fold(0usize, |n, &b| n << 8 | usize::from(b));
            if end + 4 + len > max.min(buf.len()) {
                break;
            }
            end += 4 + len;
        }
        into.extend(buf.drain(..end));
        end
    }

    /// Puts back list frames [`Pending::take_list`] took, for a transport that could not
    /// deliver them (a kept helper that ended before answering). Only valid before this
    /// writer starts: nothing else takes from the front until then.
    pub fn give_back(&self, frames: &[u8]) {
        lock(&self.list).splice(0..0, frames.iter().copied());
    }

    /// Waits until a list has ended ([`Out::end_list`]) or `max` bytes of it are waiting,
    /// at most `limit`: what [`Pending::take_list`] then takes is a small tree's whole list,
    /// not the few entries a scan had found at the moment of asking.
    pub async fn wait_list(&self, max: usize, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Asked for before checking, so a growth in between is not missed.
            let grown = self.listing.grown.notified();
            if self.listing.ended.load(Ordering::Acquire) || lock(&self.list).len() >= max {
                return;
            }
            if tokio::time::timeout_at(deadline, grown).await.is_err() {
                return;
            }
        }
    }

    /// Starts the writer task. It ends (flushing and shutting the stream down) when every
    /// [`Out`] is dropped, and returns the bytes written (on the wire and before compression).
    pub fn start<W>(
        self,
        mut w: FrameWriter<W>,
    ) -> tokio::task::JoinHandle<Result<Traffic, ProtoError>>
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let Pending {
            mut rx,
            list,
            listing: _,
            broken,
            keep,
            moving,
        } = self;
        let _ = moving.written.set(w.moved());
        let mut list = ListTaker {
            shared: list,
            spare: Vec::new(),
        };
        let dead = keep.dead;
        let stalled = "nothing written or read";
        tokio::spawn(async move {
            let r: Result<Traffic, ProtoError> = async {
                // Set while list frames wait: when they must go out.
                let mut deadline: Option<tokio::time::Instant> = None;
                loop {
                    let wake = deadline.unwrap_or_else(|| tokio::time::Instant::now() + keep.ping);
                    let next = match tokio::time::timeout_at(wake, rx.recv()).await {
                        Ok(next) => next,
                        Err(_) if deadline.is_some() => {
                            unless_dead(dead, &moving, stalled, list.write(&mut w)).await?;
                            unless_dead(dead, &moving, stalled, w.flush()).await?;
                            deadline = None;
                            continue;
                        }
                        Err(_) => {
                            // Idle: tell the peer we are here.
                            unless_dead(dead, &moving, stalled, w.write(&Msg::Ping, &[])).await?;
                            unless_dead(dead, &moving, stalled, w.flush()).await?;
                            continue;
                        }
                    };
                    let Some(mut item) = next else {
                        break;
                    };
                    let mut urgent = false;
                    // Batch whatever is already queued into the same flush.
                    loop {
                        match item {
                            Item::ListReady => {
                                if list.waiting() >= LIST_CHUNK {
                                    unless_dead(dead, &moving, stalled, list.write(&mut w)).await?;
                                }
                            }
                            Item::Frame(msg, payload, permit) => {
                                // List frames appended before this one was queued go first.
                                unless_dead(dead, &moving, stalled, list.write(&mut w)).await?;
                                unless_dead(dead, &moving, stalled, w.write(&msg, &payload))
                                    .await?;
                                drop(permit);
                                urgent = true;
                            }
                            Item::Flush => {
                                unless_dead(dead, &moving, stalled, list.write(&mut w)).await?;
                                urgent = true;
                            }
                        }
                        match rx.try_recv() {
                            Ok(next) => item = next,
                            Err(_) => break,
                        }
                    }
                    if urgent {
                        unless_dead(dead, &moving, stalled, w.flush()).await?;
                        deadline = None;
                    } else if deadline.is_none() {
                        deadline = Some(tokio::time::Instant::now() + LAZY_FLUSH);
                    }
                }
                unless_dead(dead, &moving, stalled, list.write(&mut w)).await?;
                unless_dead(dead, &moving, stalled, w.shutdown()).await?;
                Ok(w.traffic())
            }
            .await;
            if let Err(e) = &r {
                broken.send_replace(Some(e.to_string()));
            }
            r
        })
    }
}

/// A counting semaphore over bytes, for producers running on plain threads.
#[derive(Clone)]
pub struct Budget(Arc<(Mutex<u64>, Condvar)>, u64);

/// Bytes taken from a [`Budget`]; given back on drop.
pub struct Permit {
    budget: Budget,
    n: u64,
}

impl Budget {
    pub fn new(bytes: u64) -> Budget {
        Budget(Arc::new((Mutex::new(bytes), Condvar::new())), bytes)
    }

    /// Blocks until `n` bytes are available (a request larger than the whole budget waits for
    /// all of it, so one huge item still makes progress alone).
    pub fn acquire(&self, n: u64) -> Permit {
        let n = n.min(self.1);
        let (lock, cv) = &*self.0;
        let mut free = super::lock(lock);
        while *free < n {
            free = cv.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= n;
        Permit {
            budget: self.clone(),
            n,
        }
    }
}

impl Budget {
    /// One permit holding all of `permits` (`None` if there are none).
    pub fn merge(&self, permits: Vec<Permit>) -> Option<Permit> {
        let mut n = 0;
        for mut p in permits {
            n += std::mem::take(&mut p.n);
        }
        (n > 0).then(|| Permit {
            budget: self.clone(),
            n,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let (lock, cv) = &*self.budget.0;
        *super::lock(lock) += self.n;
        cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn list_frame(out: &Out, first_id: u32) {
        let msg = Msg::Entries {
            first_id,
            entries: Vec::new(),
            changed: false,
        };
        out.append_list(|buf| crate::proto::frame::encode(&msg, &[], buf))
            .unwrap()
            .unwrap();
    }

    fn is_batch(r: Result<Option<(Msg, Bytes)>, ProtoError>, id: u32) -> bool {
        matches!(r, Ok(Some((Msg::Entries { first_id, .. }, _))) if first_id == id)
    }

    #[tokio::test(start_paused = true)]
    async fn list_frames_wait_for_company_but_not_longer_than_lazy_flush() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (out, writer) = spawn_writer(FrameWriter::new(a));
        let mut r = FrameReader::new(b);
        list_frame(&out, 0);
        list_frame(&out, 1);
        // Nothing is flushed before the deadline...
        let early = tokio::time::timeout(LAZY_FLUSH / 2, r.next()).await;
        assert!(early.is_err(), "a list frame was flushed at once");
        // ...and both frames arrive, in order, once it passes.
        let first = tokio::time::timeout(LAZY_FLUSH, r.next()).await;
        assert!(is_batch(first.unwrap(), 0));
        assert!(is_batch(r.next().await, 1));
        // Any other frame takes the waiting list frames with it at once, behind them.
        list_frame(&out, 2);
        out.send(Msg::EndOfList {
            count: 3,
            scan_errors: 0,
            root: None,
        })
        .unwrap();
        let t0 = tokio::time::Instant::now();
        assert!(is_batch(r.next().await, 2));
        assert!(matches!(
            r.next().await,
            Ok(Some((Msg::EndOfList { .. }, _)))
        ));
        assert!(
            t0.elapsed() < Duration::from_micros(100),
            "{:?}",
            t0.elapsed()
        );
        // List frames still waiting when the last handle goes are written before the end.
        list_frame(&out, 3);
        drop(out);
        assert!(writer.await.unwrap().is_ok());
        assert!(is_batch(r.next().await, 3));
        assert!(matches!(r.next().await, Ok(None)));
    }

    /// What a transport takes ahead of the writer is whole frames, at most the cap, in order,
    /// and the writer sends the rest behind them: the reader sees one unbroken list, and the
    /// frame that ends it leaves at once.
    #[tokio::test(start_paused = true)]
    async fn a_list_taken_ahead_of_the_writer_is_whole_frames_and_the_rest_follows() {
        let (out, pending) = channel();
        for id in 0..5 {
            list_frame(&out, id);
        }
        let one = {
            let mut v = Vec::new();
            pending.take_list(usize::MAX, &mut v);
            let n = v.len() / 5;
            // put them back as they were
            lock(&pending.list).splice(0..0, v);
            n
        };
        // A cap that cuts the third frame takes only two.
        let mut early = b"hello".to_vec();
        assert_eq!(pending.take_list(2 * one + one / 2, &mut early), 2 * one);
        assert_eq!(early.len(), 5 + 2 * one);
        // A cap smaller than a frame takes nothing.
        assert_eq!(pending.take_list(one - 1, &mut early), 0);
        out.end_list(&Msg::EndOfList {
            count: 5,
            scan_errors: 0,
            root: None,
        })
        .unwrap();
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut a = a;
        tokio::io::AsyncWriteExt::write_all(&mut a, early.get(5..).unwrap())
            .await
            .unwrap();
        let writer = pending.start(FrameWriter::new(a));
        // Everything, the end of the list included, is there at once: the writer does not
        // let the list wait for company once it has ended.
        let t0 = tokio::time::Instant::now();
        let mut r = FrameReader::new(b);
        for id in 0..5 {
            assert!(is_batch(r.next().await, id), "frame {id}");
        }
        assert!(matches!(
            r.next().await,
            Ok(Some((Msg::EndOfList { count: 5, .. }, _)))
        ));
        assert!(t0.elapsed() < LAZY_FLUSH, "the end of the list waited");
        drop(out);
        assert!(writer.await.unwrap().is_ok());
        assert!(matches!(r.next().await, Ok(None)));
    }

    /// The wait for a list to take ahead ends when the list ends, when enough of it is
    /// waiting, or at the limit, whichever comes first.
    #[tokio::test(start_paused = true)]
    async fn waiting_for_the_list_ends_at_its_end_its_cap_or_the_limit() {
        let limit = Duration::from_millis(20);
        // Nothing comes: the limit.
        let (_out, pending) = channel();
        let t0 = tokio::time::Instant::now();
        pending.wait_list(1 << 16, limit).await;
        assert_eq!(t0.elapsed(), limit);
        // A scanner thread appends, and the list ends 5 ms later: the wait ends then, not at
        // the limit.
        let (out, pending) = channel();
        let t0 = tokio::time::Instant::now();
        let scanner = std::thread::spawn(move || {
            list_frame(&out, 0);
            out
        });
        let out = scanner.join().unwrap();
        let ender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            out.end_list(&Msg::EndOfList {
                count: 1,
                scan_errors: 0,
                root: None,
            })
            .unwrap();
            out
        });
        pending.wait_list(1 << 16, limit).await;
        assert_eq!(t0.elapsed(), Duration::from_millis(5));
        let _out = ender.await.unwrap();
        // Enough is waiting already: no wait at all.
        let (out, pending) = channel();
        list_frame(&out, 0);
        let t0 = tokio::time::Instant::now();
        pending.wait_list(1, limit).await;
        assert_eq!(t0.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_list_goes_out_in_chunks_without_waiting() {
        let (a, b) = tokio::io::duplex(16 << 20);
        let (out, _writer) = spawn_writer(FrameWriter::new(a));
        let mut r = FrameReader::new(b);
        let big = Msg::Fatal {
            message: "x".repeat(1000),
        };
        // Far past the writer's own 256 KiB buffer: it cannot all stay waiting.
        for _ in 0..(4 * LIST_CHUNK / 1000) {
            out.append_list(|buf| crate::proto::frame::encode(&big, &[], buf))
                .unwrap()
                .unwrap();
        }
        let t0 = tokio::time::Instant::now();
        assert!(matches!(r.next().await, Ok(Some((Msg::Fatal { .. }, _)))));
        assert!(t0.elapsed() < LAZY_FLUSH, "{:?}", t0.elapsed());
    }

    const KEEP: Keepalive = Keepalive {
        ping: Duration::from_secs(15),
        dead: Duration::from_secs(120),
    };

    #[tokio::test(start_paused = true)]
    async fn an_idle_writer_pings_and_a_stalled_peer_is_given_up() {
        let (a, b) = tokio::io::duplex(1 << 10);
        let (out, pending) = channel_with(KEEP);
        let writer = pending.start(FrameWriter::new(a));
        let mut r = FrameReader::new(b);
        let t0 = tokio::time::Instant::now();
        assert!(matches!(r.next().await, Ok(Some((Msg::Ping, _)))));
        assert_eq!(t0.elapsed(), KEEP.ping);
        // Now nobody reads: the writer fills the pipe and gives up after `dead`.
        let t1 = tokio::time::Instant::now();
        for _ in 0..64 {
            out.send(Msg::Fatal {
                message: "x".repeat(100),
            })
            .unwrap();
        }
        let e = writer.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("nothing written or read"), "{e}");
        assert!(t1.elapsed() >= KEEP.dead && t1.elapsed() < KEEP.dead * 2);
        assert!(out.broken().await.contains("nothing written or read"));
        drop(r);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_ends_the_read_side_but_pings_keep_it_open() {
        use tokio::io::AsyncWriteExt;
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let (ours, _theirs) = tokio::io::duplex(1 << 16);
        let (out, pending) = channel_with(KEEP);
        let _writer = pending.start(FrameWriter::new(ours));
        let fatal = crate::session::Fatal::default();
        let mut r = FrameReader::new(b);
        // A peer that pings within the limit keeps the session open.
        let mut ping = Vec::new();
        crate::proto::frame::encode(&Msg::Ping, &[], &mut ping).unwrap();
        for _ in 0..3 {
            tokio::time::sleep(KEEP.dead - Duration::from_secs(1)).await;
            a.write_all(&ping).await.unwrap();
            let got = crate::session::next_frame(&mut r, &fatal, &out).await;
            assert!(matches!(got, Ok((Msg::Ping, _))), "{got:?}");
        }
        // Silent (the stream still open): given up after `dead`.
        let t1 = tokio::time::Instant::now();
        let e = crate::session::next_frame(&mut r, &fatal, &out)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("nothing from the other side"), "{e}");
        assert_eq!(t1.elapsed(), KEEP.dead);
        drop(a);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_too_busy_to_read_is_alive_while_it_pings_and_slow_links_are_not_dead() {
        use tokio::io::AsyncWriteExt;
        // Ours: writes blocked (the peer reads nothing), but the peer's pings keep coming.
        let (ours, theirs) = tokio::io::duplex(1 << 10);
        let (our_r, our_w) = tokio::io::split(ours);
        let (their_r, mut their_w) = tokio::io::split(theirs);
        let (out, pending) = channel_with(KEEP);
        let writer = pending.start(FrameWriter::new(our_w));
        for _ in 0..64 {
            out.send(Msg::Fatal {
                message: "y".repeat(100),
            })
            .unwrap();
        }
        let fatal = crate::session::Fatal::default();
        let mut r = FrameReader::new(our_r);
        let mut ping = Vec::new();
        crate::proto::frame::encode(&Msg::Ping, &[], &mut ping).unwrap();
        for _ in 0..10 {
            tokio::time::sleep(KEEP.dead / 2).await;
            their_w.write_all(&ping).await.unwrap();
            let got = crate::session::next_frame(&mut r, &fatal, &out).await;
            assert!(matches!(got, Ok((Msg::Ping, _))), "{got:?}");
        }
        assert!(!writer.is_finished(), "a peer that pings was given up");
        // The pings stop: now nothing moves, and the writer gives up.
        let t0 = tokio::time::Instant::now();
        let e = writer.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("nothing written or read"), "{e}");
        assert!(t0.elapsed() <= KEEP.dead * 2, "{:?}", t0.elapsed());
        drop(their_r);

        // A frame that trickles in over far longer than the limit still arrives.
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let (_o, p) = tokio::io::duplex(1 << 10);
        let (out, pending) = channel_with(KEEP);
        let _w = pending.start(FrameWriter::new(p));
        let mut big = Vec::new();
        crate::proto::frame::encode(
            &Msg::Data { id: 0, chunk: 0 },
            &vec![7u8; 64 << 10],
            &mut big,
        )
        .unwrap();
        let feeder = tokio::spawn(async move {
            for piece in big.chunks(1 << 10) {
                tokio::time::sleep(KEEP.dead / 4).await;
                a.write_all(piece).await.unwrap();
            }
            a
        });
        let mut r = FrameReader::new(b);
        let t0 = tokio::time::Instant::now();
        let got = crate::session::next_frame(&mut r, &fatal, &out).await;
        assert!(matches!(got, Ok((Msg::Data { .. }, _))), "{got:?}");
        assert!(t0.elapsed() > KEEP.dead * 10, "{:?}", t0.elapsed());
        drop(feeder.await.unwrap());
    }
}
