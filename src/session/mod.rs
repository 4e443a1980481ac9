//! The two roles of a sync and how a client and a helper start one.
//!
//! [`sender`] streams the file list and answers requests with whole files or deltas;
//! [`receiver`] plans against its own tree, asks for what it needs, rebuilds, verifies and
//! applies. [`client`] opens a session over any byte stream and plays one role; [`helper`]
//! answers on the other end and plays the other. The same code runs over a child's pipes, an
//! SSH channel or an in-memory duplex.

pub mod client;
pub mod conn;
pub mod copy;
#[cfg(test)]
mod fuzz;
pub mod helper;
pub mod receiver;
pub mod relay;
pub mod sender;

use std::sync::{Arc, OnceLock};

use crate::engine::dest::DestError;
use crate::engine::scan::ScanError;
use crate::proto::{Event, ProtoError};

/// Receives what the user should see. Implemented by the CLI (printing) and by the helper
/// (forwarding to the client). Called from many threads; must not block for long.
pub trait Observer: Send + Sync {
    fn event(&self, ev: Event);
    /// A file of `bytes` bytes will be transferred (progress total grows).
    fn planned(&self, _bytes: u64) {}
    /// `bytes` more of the planned data have been handled.
    fn progressed(&self, _bytes: u64) {}
    /// One planned file is complete.
    fn file_done(&self) {}
}

/// Locks `m` even if a panicking thread poisoned it, as every lock in the session layer does.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A worker pool of its own for each role: the sender's jobs block on their byte budget, and
/// in a process running both roles (tests, in-memory sessions) a shared pool would let them
/// starve the receiver jobs that release it. Each pool is made once per process and shared by
/// the sessions of that role (a watch runs many; tests and fuzzing run thousands).
pub(crate) fn worker_pool(role: &'static str) -> Result<Arc<rayon::ThreadPool>, SessionError> {
    static SEND: OnceLock<Arc<rayon::ThreadPool>> = OnceLock::new();
    static RECV: OnceLock<Arc<rayon::ThreadPool>> = OnceLock::new();
    let cell = if role == "send" { &SEND } else { &RECV };
    if let Some(p) = cell.get() {
        return Ok(p.clone());
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .thread_name(move |i| format!("devsync-{role}-{i}"))
        .build()
        .map_err(|e| SessionError::Local(format!("starting worker threads: {e}")))?;
    // Two sessions racing here: the loser's pool is dropped, both use the winner's.
    let _ = cell.set(Arc::new(pool));
    cell.get()
        .cloned()
        .ok_or_else(|| SessionError::Local("starting worker threads".into()))
}

/// A session's fatal error, recorded by whichever thread hits it first, and a wake-up for the
/// read loop so that a peer that never hangs up cannot keep us waiting.
#[derive(Default)]
pub(crate) struct Fatal {
    err: std::sync::Mutex<Option<SessionError>>,
    set: tokio::sync::Notify,
}

/// How often our own bookkeeping broke in this process ([`SessionError::Internal`]). Counted
/// apart from the session's error because the first error wins: one that follows a peer's
/// violation would not be what the session ends with. The fuzzers assert it stays zero.
pub(crate) static INTERNAL_ERRORS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

impl Fatal {
    /// Records `e` (the first error wins) and tells the peer, which then closes the session.
    /// The error is stored before the peer hears of it, so whichever way the read loop wakes
    /// up (our notification or the peer hanging up) it reports this error.
    pub(crate) fn fail(&self, out: &conn::Out, e: SessionError) {
        if let SessionError::Internal(what) = &e {
            INTERNAL_ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            crate::trace!("session", "internal error: {what}");
        }
        let message = e.to_string();
        lock(&self.err).get_or_insert(e);
        self.set.notify_one();
        let _ = out.send(crate::proto::Msg::Fatal { message }); // already failing
    }

    /// Tells the peer it broke the protocol; returns the error to end the session with.
    pub(crate) fn violation(out: &conn::Out, what: String) -> SessionError {
        let _ = out.send(crate::proto::Msg::Fatal {
            message: format!("protocol violation: {what}"),
        }); // the session ends with this error either way
        SessionError::Violation(what)
    }

    fn take(&self) -> Option<SessionError> {
        lock(&self.err).take()
    }
}

/// The next frame from the peer; ends early with the recorded fatal error, when our own
/// writer has failed (a link that breaks for writing may never wake the read side), or when
/// the peer has been silent past the keepalive limit (it pings when idle).
/// Abandoning a half-read frame is fine: after either, nothing more is read.
pub(crate) async fn next_frame<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut crate::proto::FrameReader<R>,
    fatal: &Fatal,
    out: &conn::Out,
) -> Result<(crate::proto::Msg, bytes::Bytes), SessionError> {
    let next = tokio::select! {
        biased;
        () = fatal.set.notified() => None,
        e = out.broken() => return Err(SessionError::Local(format!("connection lost: {e}"))),
        r = out.next_from(reader) => match r {
            Ok(r) => r,
            Err(crate::proto::ProtoError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(SessionError::Local(format!("connection lost: {e}")));
            }
            Err(e) => return Err(e.into()),
        },
    };
    next.ok_or_else(|| fatal.take().unwrap_or(SessionError::Eof))
}

/// Observer that drops everything (tests, quiet runs).
pub struct Silent;
impl Observer for Silent {
    fn event(&self, _ev: Event) {}
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("{0}")]
    Remote(String),
    #[error("protocol violation by peer: {0}")]
    Violation(String),
    #[error("connection closed before the sync finished")]
    Eof,
    /// The helper's stream ended before it answered the Hello, so it did nothing for this
    /// session: a client may try again on another connection.
    #[error("the helper ended the connection before answering")]
    Unanswered,
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error(transparent)]
    Dest(#[from] DestError),
    #[error("{0}")]
    Local(String),
    /// Our own bookkeeping broke (a bug, never the peer's doing): the fuzzers fail on it.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl From<conn::Closed> for SessionError {
    fn from(_: conn::Closed) -> Self {
        SessionError::Local("connection writer stopped".into())
    }
}
