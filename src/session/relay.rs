//! A copy between two remotes (`devsync cp a:x b:y`, like `scp -3`): two helpers, one sending
//! and one receiving, and the client in the middle passing whole frames between them. The
//! client plays neither role: each helper's peer is the other helper, so deltas, verification
//! and atomic replace are exactly a push's. Events (itemized changes, warnings, errors) stop
//! here and are shown; the receiver's `Done` is read on the way for the totals.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::client::{Outcome, hello};
use super::{Observer, SessionError};
use crate::proto::{FrameReader, FrameWriter, Msg, Role, Stats, SyncOptions, Traffic};

/// One end: a helper's stdout (its greeting already read) and stdin, and the root it is
/// told to use.
pub struct End<R, W> {
    pub reader: FrameReader<R>,
    pub writer: W,
    pub root: Vec<u8>,
    /// Its Hello already went with the exec that started it (`client::hello_bytes`).
    pub hello_sent: bool,
}

/// Runs a copy from `from`'s helper (the sender) to `to`'s (the receiver).
pub async fn copy<R1, W1, R2, W2>(
    from: End<R1, W1>,
    to: End<R2, W2>,
    opts: &SyncOptions,
    obs: Arc<dyn Observer>,
) -> Result<Outcome, SessionError>
where
    R1: AsyncRead + Unpin + Send,
    W1: AsyncWrite + Unpin + Send + 'static,
    R2: AsyncRead + Unpin + Send,
    W2: AsyncWrite + Unpin + Send + 'static,
{
    let (mut ra, mut wa) = (from.reader, FrameWriter::new(from.writer));
    let (mut rb, mut wb) = (to.reader, FrameWriter::new(to.writer));
    // We "receive" from the first (it sends) and "send" to the second (it receives).
    let (sent_a, sent_b) = (from.hello_sent, to.hello_sent);
    hello(&mut ra, &mut wa, Role::Receiver, &from.root, opts, sent_a).await?;
    hello(&mut rb, &mut wb, Role::Sender, &to.root, opts, sent_b).await?;
    crate::trace!("relay", "both helpers ready");
    let (a_to_b, b_to_a) = tokio::join!(forward(ra, wb, obs.clone()), forward(rb, wa, obs.clone()));
    // What a helper said when it gave up explains more than the other side's broken pipe.
    if let Some(m) = a_to_b.fatal.or(b_to_a.fatal) {
        return Err(SessionError::Remote(m));
    }
    a_to_b.result?;
    b_to_a.result?;
    let stats = b_to_a.done.ok_or(SessionError::Eof)?;
    Ok(Outcome {
        // As a push counts them: what went towards the destination, and what came back.
        stats,
        bytes_sent: a_to_b.traffic.wire,
        bytes_received: b_to_a.traffic.wire,
        raw_sent: a_to_b.traffic.raw,
        raw_received: b_to_a.traffic.raw,
        memo: None,
    })
}

/// How one direction ended.
struct Forwarded {
    result: Result<(), SessionError>,
    /// The receiver's report (`Done`), if it went by.
    done: Option<Stats>,
    /// A fatal message that went by.
    fatal: Option<String>,
    /// What was read from the sending helper.
    traffic: Traffic,
}

/// Passes frames from `r` to `w` until `r` ends or fails, then ends `w` either way (so the
/// other helper hears of it at once instead of at its keepalive limit).
async fn forward<R, W>(
    mut r: FrameReader<R>,
    mut w: FrameWriter<W>,
    obs: Arc<dyn Observer>,
) -> Forwarded
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let mut done: Option<Stats> = None;
    let mut fatal: Option<String> = None;
    let result = async {
        while let Some((msg, payload)) = r.next().await? {
            match &msg {
                Msg::Event(ev) => {
                    obs.event(ev.clone());
                    continue;
                }
                Msg::Done { stats, .. } => done = Some(stats.clone()),
                Msg::Fatal { message } => fatal = Some(message.clone()),
                _ => {}
            }
            w.write(&msg, &payload).await?;
            // Frames that are already here go out together.
            if r.raw().buffer().is_empty() {
                w.flush().await?;
            }
        }
        w.flush().await?;
        Ok::<_, SessionError>(())
    }
    .await;
    let _ = w.shutdown().await; // the other may be gone already
    Forwarded {
        result,
        done,
        fatal,
        traffic: r.traffic(),
    }
}
