//! Client side of a session: handshake, tell the helper what to do, play the other role.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Observer, SessionError, conn, receiver, sender};
use crate::proto::{
    FrameReader, FrameWriter, Msg, PROTOCOL_VERSION, Role, Stats, SyncOptions, handshake,
};

/// One sync, as the client sees it.
pub struct Job {
    /// The role the client plays (push: `Sender`, pull: `Receiver`); the helper plays the other.
    pub role: Role,
    pub local_root: PathBuf,
    /// The helper's root, as the user wrote it (the helper resolves `~` and relative paths).
    pub remote_root: Vec<u8>,
    pub opts: SyncOptions,
    pub obs: Arc<dyn Observer>,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub stats: Stats,
    /// Protocol bytes written to and read from the helper.
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// Work that can begin before the helper is reachable: for a push, scanning the source and
/// queueing the file list (so connection setup and the scan overlap).
pub struct Prepared {
    out: conn::Out,
    pending: conn::Pending,
    sender: Option<(sender::Sender, sender::Gen)>,
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
            )?;
            let generation = s.start(sender::Plan::whole(&job.opts, false))?;
            Some((s, generation))
        }
        Role::Receiver => None,
    };
    Ok(Prepared {
        out,
        pending,
        sender,
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
    run_ready(reader, w, job, prepared).await
}

/// Like [`run`], for a stream whose helper greeting was already read ([`handshake::await_helper`]).
pub async fn run_ready<R, W>(
    mut reader: FrameReader<R>,
    w: W,
    job: Job,
    prepared: Prepared,
) -> Result<Outcome, SessionError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut writer = FrameWriter::new(w);
    handshake::client_answer(&mut writer).await?;
    crate::trace!("client", "helper ready");
    let helper_role = match job.role {
        Role::Sender => Role::Receiver,
        Role::Receiver => Role::Sender,
    };
    let hello = Msg::Hello {
        version: PROTOCOL_VERSION,
        helper_role,
        root: job.remote_root.clone(),
        opts: job.opts.clone(),
    };
    // Hello goes out before anything queued (the list may already be waiting).
    writer.write(&hello, &[]).await?;
    writer.flush().await?;
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
        Some((Msg::HelloOk { version }, _)) if version == PROTOCOL_VERSION => {}
        Some((Msg::HelloOk { version }, _)) => {
            return Err(SessionError::Remote(format!(
                "helper answered with protocol version {version}"
            )));
        }
        Some((Msg::Fatal { message }, _)) => return Err(SessionError::Remote(message)),
        Some((other, _)) => {
            return Err(SessionError::Violation(format!(
                "expected HelloOk, got {other:?}"
            )));
        }
        None => return Err(SessionError::Eof),
    }
    let Prepared {
        out,
        pending,
        sender,
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
    let bytes_received = reader.bytes_read();
    crate::trace!("client", "session over");
    let stats = result?;
    let bytes_sent = writer_task
        .await
        .map_err(|e| SessionError::Local(format!("writer task: {e}")))??;
    Ok(Outcome {
        stats,
        bytes_sent,
        bytes_received,
    })
}
