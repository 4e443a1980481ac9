//! Client side of a session: handshake, tell the helper what to do, play the other role.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Observer, SessionError, conn, receiver, sender};
use crate::proto::{
    Compress, FrameReader, FrameWriter, LinkMemo, Msg, PROTOCOL_VERSION, Role, Stats, SyncOptions,
    handshake,
};

/// One sync, as the client sees it.
#[derive(Clone)]
pub struct Job {
    /// The role the client plays (push: `Sender`, pull: `Receiver`); the helper plays the other.
    pub role: Role,
    pub local_root: PathBuf,
    /// The helper's root, as the user wrote it (the helper resolves `~` and relative paths).
    pub remote_root: Vec<u8>,
    pub opts: SyncOptions,
    pub obs: Arc<dyn Observer>,
    /// What the last session to this target learned about the link: our compressor starts
    /// there.
    pub memo: Option<LinkMemo>,
    /// Which big files a push hashes before the receiver asks for their chunk hashes.
    pub ahead: sender::AheadPolicy,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub stats: Stats,
    /// Protocol bytes written to and read from the helper (on the wire).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// The same before compression.
    pub raw_sent: u64,
    pub raw_received: u64,
    /// What our compressor learned about the link, if worth remembering.
    pub memo: Option<LinkMemo>,
}

/// Work that can begin before the helper is reachable: for a push, scanning the source and
/// queueing the file list (so connection setup and the scan overlap).
pub struct Prepared {
    out: conn::Out,
    pending: conn::Pending,
    sender: Option<(sender::Sender, sender::Gen)>,
    /// Bytes the transport sent for us before the session started ([`Prepared::early`]).
    early_sent: std::sync::atomic::AtomicU64,
}

/// Most list bytes sent ahead of the helper's answer. They go uncompressed (the helper has
/// not agreed to compression yet), which costs less than the round trip they save while they
/// stay under a slow link's bandwidth-delay product (20 Mbit/s × 50 ms ≈ 125 KB): a small
/// tree's whole list goes early, and the rest of a big tree's goes compressed.
const EARLY_LIST: usize = 64 << 10;

/// Longest a push on a greeted stream (a kept connection, a local helper) waits for the
/// scan to end (or fill [`EARLY_LIST`]) before sending its Hello, so that the list goes with
/// it. Only a scan stalled on a slow filesystem waits this long; on a WAN that is less than
/// the round trip it saves, on a LAN it may be more.
const EARLY_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

impl Prepared {
    /// Waits (at most `limit`) until a push's list has ended or fills what goes early.
    pub async fn list_ready(&self, limit: std::time::Duration) {
        self.pending.wait_list(EARLY_LIST, limit).await;
    }

    /// What a transport sends behind the exec that starts the helper: `hello` (the
    /// [`hello_bytes`]) and the part of a push's file list queued so far, so a small tree's
    /// list is with the helper when it starts (a no-change push then costs one round trip
    /// after the exec, not two). Called again (the helper had to be uploaded and started
    /// again), it returns the same bytes and whatever list was queued since. A session on such
    /// a stream is run with `hello_sent`.
    pub fn early(&self, hello: Vec<u8>) -> impl Fn() -> Vec<u8> + Send + Sync + '_ {
        let said = std::sync::Mutex::new((hello, 0usize));
        move || {
            let mut g = super::lock(&said);
            let (bytes, listed) = &mut *g;
            *listed += self
                .pending
                .take_list(EARLY_LIST.saturating_sub(*listed), bytes);
            self.early_sent
                .store(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
            bytes.clone()
        }
    }
}

pub fn prepare(job: &Job) -> Result<Prepared, SessionError> {
    let (out, pending) = conn::channel();
    let sender = match job.role {
        Role::Sender => {
            let s = sender::Sender::new(
                out.clone(),
                job.local_root.clone(),
                &job.opts,
                job.obs.clone(),
                job.ahead,
            )?;
            let plan = super::copy::plan(&job.opts, &job.local_root, false, &*job.obs)?;
            let generation = s.start(plan)?;
            Some((s, generation))
        }
        Role::Receiver => None,
    };
    Ok(Prepared {
        out,
        pending,
        sender,
        early_sent: 0.into(),
    })
}

pub async fn run<R, W>(r: R, w: W, job: Job) -> Result<Outcome, SessionError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let prepared = prepare(&job)?;
    let mut reader = FrameReader::new(r);
    crate::trace!("client", "waiting for the helper");
    handshake::await_helper(&mut reader).await?;
    run_ready(reader, w, job, prepared, false).await
}

/// The client's answer to the greeting and its `Hello`, as bytes a transport can send before
/// the greeting arrives (the helper reads them once it starts): one round trip less. A
/// session on such a stream is run with `hello_sent`.
pub fn hello_bytes(role: Role, remote_root: &[u8], opts: &SyncOptions) -> Vec<u8> {
    let mut v = handshake::CLIENT_MAGIC.to_vec();
    // Encoding a Hello cannot fail (no payload, far below the frame limit); if it ever did,
    // sending only the magic would make the helper see a broken session, not a wrong one.
    let _ = crate::proto::frame::encode(&hello_msg(role, remote_root, opts), &[], &mut v);
    v
}

fn hello_msg(role: Role, remote_root: &[u8], opts: &SyncOptions) -> Msg {
    let helper_role = match role {
        Role::Sender => Role::Receiver,
        Role::Receiver => Role::Sender,
    };
    Msg::Hello {
        version: PROTOCOL_VERSION,
        helper_role,
        root: remote_root.to_vec(),
        opts: opts.clone(),
    }
}

/// Answers the helper's greeting, tells it what to do (it plays the role other than `role`)
/// and waits for it to agree; from then on `writer` compresses if both ends agreed to.
/// `sent`: the transport already sent [`hello_bytes`]; only the answer is awaited.
pub(super) async fn hello<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    role: Role,
    remote_root: &[u8],
    opts: &SyncOptions,
    sent: bool,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    if !sent {
        send_hello(writer, &hello_bytes(role, remote_root, opts)).await?;
    }
    if let Some(mode) = await_hello_ok(reader, opts).await? {
        // No remembered link here (a watch, a relay): only a one-shot push starts from one.
        writer.compress(mode, None);
    }
    Ok(())
}

/// The answer to the greeting and the `Hello` ([`hello_bytes`], maybe with list frames
/// after it), flushed.
async fn send_hello<W>(writer: &mut FrameWriter<W>, said: &[u8]) -> Result<(), SessionError>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    writer.write_raw(said).await?;
    writer.flush().await?;
    Ok(())
}

/// Waits for the helper to agree to the `Hello`; returns how to compress from then on
/// (`None`: not at all).
async fn await_hello_ok<R>(
    reader: &mut FrameReader<R>,
    opts: &SyncOptions,
) -> Result<Option<Compress>, SessionError>
where
    R: AsyncRead + Unpin + Send,
{
    crate::trace!("client", "helper ready");
    let limit = conn::Keepalive::from_env().dead;
    let answer = tokio::time::timeout(limit, reader.next())
        .await
        .map_err(|_| {
            SessionError::Local(format!(
                "no answer from the helper in {} s",
                limit.as_secs()
            ))
        })?;
    match answer? {
        Some((Msg::HelloOk { version, compress }, _)) if version == PROTOCOL_VERSION => {
            crate::trace!(
                "client",
                "compression {}",
                if compress { "on" } else { "off" }
            );
            Ok((compress && opts.compress != Compress::Off).then_some(opts.compress))
        }
        Some((Msg::HelloOk { version, .. }, _)) => Err(SessionError::Remote(format!(
            "helper answered with protocol version {version}"
        ))),
        Some((Msg::Fatal { message }, _)) => Err(SessionError::Remote(message)),
        Some((other, _)) => Err(SessionError::Violation(format!(
            "expected HelloOk, got {other:?}"
        ))),
        None => Err(SessionError::Unanswered),
    }
}

/// A session that stays open for generation after generation, the client sending (a watch).
pub struct Live<R> {
    pub reader: FrameReader<R>,
    pub sender: sender::Sender,
    writer: tokio::task::JoinHandle<Result<crate::proto::Traffic, crate::proto::ProtoError>>,
}

/// Opens a [`Live`] session on a stream whose helper greeting was already read.
pub async fn open_live<R, W>(
    mut reader: FrameReader<R>,
    w: W,
    local_root: PathBuf,
    remote_root: &[u8],
    opts: &SyncOptions,
    obs: Arc<dyn Observer>,
    hello_sent: bool,
) -> Result<Live<R>, SessionError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut writer = FrameWriter::new(w);
    hello(
        &mut reader,
        &mut writer,
        Role::Sender,
        remote_root,
        opts,
        hello_sent,
    )
    .await?;
    let (out, pending) = conn::channel();
    // A watch's generations list what changed, which the receiver asks for at once; its
    // first and catch-up ones list the whole tree, most of which the receiver has.
    let sender = sender::Sender::new(out, local_root, opts, obs, sender::AheadPolicy::Off)?;
    Ok(Live {
        reader,
        sender,
        writer: pending.start(writer),
    })
}

impl<R: AsyncRead + Unpin + Send> Live<R> {
    /// Runs one generation to its end.
    pub async fn generation(
        &mut self,
        plan: sender::Plan,
    ) -> Result<sender::GenDone, SessionError> {
        let g = self.sender.start(plan)?;
        sender::serve(&mut self.reader, &g).await
    }

    /// Waits, between generations, for the peer's next frame: a keepalive is fine; anything
    /// else, or a peer silent past the keepalive limit, ends the session. Cancel-safe: nothing
    /// is read until a whole frame's first bytes are there.
    pub async fn idle(&mut self) -> Result<(), SessionError> {
        let out = self.sender.out().clone();
        let dead = out.peer_timeout();
        let moved = self.reader.moved();
        let mut last = moved.load(std::sync::atomic::Ordering::Relaxed);
        let mut since = tokio::time::Instant::now();
        loop {
            tokio::select! {
                r = self.reader.readable() => {
                    r.map_err(|e| SessionError::Local(format!("connection lost: {e}")))?;
                    break;
                }
                e = out.broken() => return Err(SessionError::Local(format!("connection lost: {e}"))),
                () = tokio::time::sleep(dead / 8) => {
                    let now = moved.load(std::sync::atomic::Ordering::Relaxed);
                    if now != last {
                        (last, since) = (now, tokio::time::Instant::now());
                    } else if since.elapsed() >= dead {
                        return Err(SessionError::Local(format!(
                            "connection lost: nothing from the other side for {} s",
                            dead.as_secs()
                        )));
                    }
                }
            }
        }
        match self.reader.next().await? {
            Some((Msg::Ping, _)) => Ok(()),
            Some((Msg::Event(_), _)) => Ok(()),
            Some((Msg::Fatal { message }, _)) => Err(SessionError::Remote(message)),
            Some((other, _)) => Err(super::Fatal::violation(
                &out,
                format!("unexpected message between generations: {other:?}"),
            )),
            None => Err(SessionError::Eof),
        }
    }

    /// Says goodbye and waits (at most `limit`) for everything to be written.
    pub async fn close(self, limit: std::time::Duration) {
        let Live {
            reader,
            sender,
            writer,
        } = self;
        let _ = sender.bye(); // gone already: nothing to say goodbye to
        drop(sender);
        let _ = tokio::time::timeout(limit, writer).await;
        drop(reader);
    }
}

/// Like [`run`], for a stream whose helper greeting was already read ([`handshake::await_helper`]).
pub async fn run_ready<R, W>(
    reader: FrameReader<R>,
    w: W,
    job: Job,
    prepared: Prepared,
    hello_sent: bool,
) -> Result<Outcome, SessionError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    match run_or_hand_back(reader, w, job, prepared, hello_sent).await {
        Ran::Done(r) => r,
        Ran::Unanswered(_) => Err(SessionError::Unanswered),
    }
}

/// What [`run_or_hand_back`] came to.
pub enum Ran {
    Done(Result<Outcome, SessionError>),
    /// The helper (a kept one) ended before it answered the Hello: nothing was done, and the
    /// job is handed back as it was, its list whole again, to run on another connection
    /// without scanning twice.
    Unanswered(Prepared),
}

/// [`run_ready`], except that a session this side opened with its Hello (`!hello_sent`)
/// whose helper ends before answering gives the prepared job back.
pub async fn run_or_hand_back<R, W>(
    mut reader: FrameReader<R>,
    w: W,
    job: Job,
    prepared: Prepared,
    hello_sent: bool,
) -> Ran
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut writer = FrameWriter::new(w);
    let mut early = prepared
        .early_sent
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut said = Vec::new();
    let mut listed = 0..0;
    if !hello_sent {
        // A kept helper already greeted: the Hello and what fits of the list go together
        // (a kept no-change push is then one round trip).
        said = hello_bytes(job.role, &job.remote_root, &job.opts);
        // The scan started moments ago: a small tree's is done in a millisecond or two.
        // (Only a push has a list to wait for.)
        if prepared.sender.is_some() {
            prepared.pending.wait_list(EARLY_LIST, EARLY_WAIT).await;
        }
        let at = said.len();
        prepared.pending.take_list(EARLY_LIST, &mut said);
        listed = at..said.len();
        early = 0; // the writer counts these
    }
    let greeted = async {
        if !hello_sent {
            send_hello(&mut writer, &said).await?;
        }
        await_hello_ok(&mut reader, &job.opts).await
    };
    let mode = match greeted.await {
        Ok(mode) => mode,
        Err(SessionError::Unanswered | SessionError::Proto(crate::proto::ProtoError::Io(_)))
            if !hello_sent =>
        {
            prepared
                .pending
                .give_back(said.get(listed).unwrap_or_default());
            return Ran::Unanswered(prepared);
        }
        Err(e) => return Ran::Done(Err(e)),
    };
    // The writer starts once the helper agreed, so that the rest of a big tree's list is
    // compressed if both ends want it.
    if let Some(mode) = mode {
        writer.compress(mode, job.memo);
    }
    Ran::Done(run_answered(reader, writer, job, prepared, early).await)
}

/// The session once the helper has agreed.
async fn run_answered<R, W>(
    mut reader: FrameReader<R>,
    writer: FrameWriter<W>,
    job: Job,
    prepared: Prepared,
    early: u64,
) -> Result<Outcome, SessionError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Prepared {
        out,
        pending,
        sender,
        ..
    } = prepared;
    let writer_task = pending.start(writer);
    let result = match (job.role, sender) {
        (Role::Sender, Some((s, generation))) => {
            drop(out);
            let r = sender::finish(&mut reader, &s, &generation).await;
            drop((s, generation)); // the writer ends (flushing Bye) once every Out is gone
            r
        }
        _ => receiver::run(&mut reader, out, job.local_root, job.opts, job.obs).await,
    };
    let received = reader.traffic();
    crate::trace!("client", "session over");
    let stats = result?;
    let sent = writer_task
        .await
        .map_err(|e| SessionError::Local(format!("writer task: {e}")))??;
    Ok(Outcome {
        stats,
        bytes_sent: sent.wire + early,
        bytes_received: received.wire,
        raw_sent: sent.raw + early,
        raw_received: received.raw,
        memo: sent.memo,
    })
}
