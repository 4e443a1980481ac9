//! Helper side of a session (`devsync helper`): greet, take the client's instructions, play
//! the role it asks for in the root it names, and forward everything the user should see.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::conn::Out;
use super::{Observer, SessionError, conn, receiver, sender};
use crate::engine::scan::check_root;
use crate::proto::{
    Compress, Event, FrameReader, FrameWriter, Msg, PROTOCOL_VERSION, Role, handshake,
};

/// Sends the helper's events to the client.
struct Forward(Out);

impl Observer for Forward {
    fn event(&self, ev: Event) {
        let _ = self.0.send(Msg::Event(ev)); // writer gone: the session is ending anyway
    }
}

/// `~` and `~/x` are relative to `$HOME`; other relative paths to the working directory (the
/// home directory, under SSH).
pub fn resolve_root(root: &[u8]) -> PathBuf {
    let home = || std::env::var_os("HOME").map(PathBuf::from);
    if root == b"~" {
        if let Some(h) = home() {
            return h;
        }
    }
    if let (Some(rest), Some(h)) = (root.strip_prefix(b"~/"), home()) {
        return h.join(OsStr::from_bytes(rest));
    }
    PathBuf::from(OsStr::from_bytes(root))
}

pub async fn serve<R, W>(r: R, w: W) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // DEVSYNC_COMPRESS=off in the helper's environment declines compression, as a helper
    // without it would.
    let compress = std::env::var("DEVSYNC_COMPRESS").map_or(true, |v| v != "off");
    serve_with(r, w, compress).await
}

/// [`serve`], compressing (if the client asks) only when `compress` allows it.
pub async fn serve_with<R, W>(r: R, w: W, compress: bool) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = FrameReader::new(r);
    let mut writer = FrameWriter::new(w);
    handshake::helper_greet(&mut writer).await?;
    // A client that never speaks (or vanished without closing the stream) is not waited for
    // past the keepalive limit.
    let limit = conn::Keepalive::from_env().dead;
    let hello = async {
        handshake::helper_expect_client(&mut reader).await?;
        reader.next().await
    };
    let first = tokio::time::timeout(limit, hello).await.map_err(|_| {
        SessionError::Local(format!("no word from the client in {} s", limit.as_secs()))
    })?;
    let (role, root, opts) = match first? {
        Some((
            Msg::Hello {
                version,
                helper_role,
                root,
                opts,
            },
            _,
        )) => {
            if version != PROTOCOL_VERSION {
                let message =
                    format!("client speaks protocol version {version}, helper {PROTOCOL_VERSION}");
                return refuse(&mut writer, message).await;
            }
            (helper_role, resolve_root(&root), opts)
        }
        Some((other, _)) => {
            return Err(SessionError::Violation(format!(
                "expected Hello, got {other:?}"
            )));
        }
        None => return Err(SessionError::Eof),
    };
    // A copy's receiver decides where it lands once the session runs.
    let copy_receiver = role == Role::Receiver && opts.copy.is_some();
    let checked = if copy_receiver {
        Ok(())
    } else {
        check_helper_root(role, &root, opts.dry_run)
    };
    if let Err(message) = checked {
        return refuse(&mut writer, message).await;
    }
    let compress = compress && opts.compress != Compress::Off;
    writer
        .write(
            &Msg::HelloOk {
                version: PROTOCOL_VERSION,
                compress,
            },
            &[],
        )
        .await?;
    writer.flush().await?;
    if compress {
        writer.compress(opts.compress, None);
    }
    let (out, writer_task) = conn::spawn_writer(writer);
    let obs: Arc<dyn Observer> = Arc::new(Forward(out.clone()));
    let tell = out.clone();
    let result = match role {
        Role::Sender => sender::run(&mut reader, out, root, opts, obs).await,
        Role::Receiver => receiver::run(&mut reader, out, root, opts, obs).await,
    };
    // Our own failure (a missing source, a destination that cannot take the copy) is the
    // client's to show: it may not have been told yet.
    if let Err(
        e @ (SessionError::Local(_)
        | SessionError::Internal(_)
        | SessionError::Dest(_)
        | SessionError::Scan(_)),
    ) = &result
    {
        let _ = tell.send(Msg::Fatal {
            message: e.to_string(),
        }); // the client may be gone
    }
    drop(tell);
    if result.is_err() {
        // Let what was queued (that Fatal) go out before this process ends.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), writer_task).await;
        return result.map(|_| ());
    }
    writer_task
        .await
        .map_err(|e| SessionError::Local(format!("writer task: {e}")))??;
    Ok(())
}

/// Tells the client why the session cannot start, and ends it.
async fn refuse<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    message: String,
) -> Result<(), SessionError> {
    writer
        .write(
            &Msg::Fatal {
                message: message.clone(),
            },
            &[],
        )
        .await?;
    writer.shutdown().await?;
    Err(SessionError::Remote(message))
}

/// The helper's root must be a directory (a receiver may create it).
fn check_helper_root(role: Role, root: &std::path::Path, dry_run: bool) -> Result<(), String> {
    match role {
        Role::Sender => check_root(root).map_err(|e| format!("source {e}")),
        Role::Receiver => match std::fs::metadata(root) {
            Ok(md) if md.is_dir() => Ok(()),
            Ok(_) => Err(format!(
                "destination {} exists and is not a directory",
                root.display()
            )),
            Err(_) if dry_run => Ok(()),
            Err(_) => crate::engine::dest::Dest::create_root(root).map_err(|e| e.to_string()),
        },
    }
}
