//! Start of a session. The helper speaks first with [`HELPER_MAGIC`] and its protocol version,
//! so a client can skip whatever a remote login shell prints to stdout before the helper
//! starts (motd, rc-file echoes) without mistaking it for a frame. The client answers with
//! [`CLIENT_MAGIC`] and then frames; the first frame is `Hello`.

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite};

use super::frame::{FrameReader, FrameWriter};
use super::{PROTOCOL_VERSION, ProtoError};

pub const HELPER_MAGIC: &[u8; 16] = b"\0DEVSYNC-HELPER\0";
pub const CLIENT_MAGIC: &[u8; 16] = b"\0DEVSYNC-CLIENT\0";
/// How much stray output before the helper's greeting is tolerated.
pub const MAX_JUNK: usize = 1 << 20;

/// Helper side: greet.
pub async fn helper_greet<W: AsyncWrite + Unpin>(w: &mut FrameWriter<W>) -> Result<(), ProtoError> {
    w.write_raw(HELPER_MAGIC).await?;
    w.write_raw(&PROTOCOL_VERSION.to_be_bytes()).await?;
    w.flush().await
}

/// Helper side: expect the client's magic.
pub async fn helper_expect_client<R: AsyncRead + Unpin>(
    r: &mut FrameReader<R>,
) -> Result<(), ProtoError> {
    let mut m = [0u8; 16];
    let mut got = 0;
    while got < m.len() {
        let n = r
            .buffered()
            .read(m.get_mut(got..).unwrap_or_default())
            .await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    r.count(got as u64);
    let seen = m.get(..got).unwrap_or_default();
    if !CLIENT_MAGIC.starts_with(seen) {
        return Err(ProtoError::Handshake(
            "the other end is not a devsync client (`devsync helper` is started by devsync itself)"
                .into(),
        ));
    }
    if got < m.len() {
        return Err(ProtoError::Handshake(
            "the client went away before the handshake".into(),
        ));
    }
    Ok(())
}

/// Client side: skip junk up to the helper's greeting, check its version, answer. Returns
/// the junk that was skipped (worth showing if something fails later).
pub async fn client_start<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
) -> Result<Vec<u8>, ProtoError> {
    let junk = await_helper(r).await?;
    client_answer(w).await?;
    Ok(junk)
}

/// Client side, first half: read (and return) whatever precedes the helper's greeting, then
/// the greeting; checks the version. Transports use it to tell "helper running" from "helper
/// missing" before handing the stream to the session.
pub async fn await_helper<R: AsyncRead + Unpin>(
    r: &mut FrameReader<R>,
) -> Result<Vec<u8>, ProtoError> {
    let mut junk: Vec<u8> = Vec::new();
    loop {
        let buf = r.buffered().fill_buf().await?;
        if buf.is_empty() {
            let shown = String::from_utf8_lossy(&junk).trim().to_string();
            return Err(ProtoError::Handshake(if shown.is_empty() {
                "the helper exited before saying hello".into()
            } else {
                format!("the helper did not start; the remote side said: {shown}")
            }));
        }
        let (n, before) = (buf.len(), junk.len());
        junk.extend_from_slice(buf);
        if let Some(pos) = find(&junk, HELPER_MAGIC) {
            // Take no more than the greeting: what follows it is the session's (the answer to
            // a Hello the client sent ahead, already on its way).
            let magic_end = pos + HELPER_MAGIC.len();
            let end = (magic_end + 4).min(junk.len());
            let used = end.saturating_sub(before);
            r.buffered().consume(used);
            r.count(used as u64);
            let mut v = [0u8; 4];
            let have = end - magic_end;
            if let (Some(dst), Some(src)) = (v.get_mut(..have), junk.get(magic_end..end)) {
                dst.copy_from_slice(src);
            }
            if let Some(dst) = v.get_mut(have..) {
                r.buffered().read_exact(dst).await.map_err(|_| {
                    ProtoError::Handshake("the helper's greeting was cut short".into())
                })?;
                r.count(dst.len() as u64);
            }
            let version = u32::from_be_bytes(v);
            if version != PROTOCOL_VERSION {
                return Err(ProtoError::Handshake(format!(
                    "the helper speaks protocol version {version}, this client {PROTOCOL_VERSION}: \
                     the remote devsync binary is from another release"
                )));
            }
            junk.truncate(pos);
            return Ok(junk);
        }
        r.buffered().consume(n);
        r.count(n as u64);
        if junk.len() > MAX_JUNK {
            return Err(ProtoError::Handshake(format!(
                "more than {MAX_JUNK} bytes of output before the helper started: a login script \
                 on the remote side prints too much to stdout"
            )));
        }
    }
}

/// Client side, second half: answer the greeting.
pub async fn client_answer<W: AsyncWrite + Unpin>(
    w: &mut FrameWriter<W>,
) -> Result<(), ProtoError> {
    w.write_raw(CLIENT_MAGIC).await
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::proto::Msg;

    /// A helper that got the client's Hello early answers it right after its greeting, so
    /// both can arrive in one read: the answer stays for the session, split anywhere.
    #[tokio::test]
    async fn what_follows_the_greeting_is_left_for_the_session() {
        let mut wire = b"motd\n".to_vec();
        wire.extend_from_slice(HELPER_MAGIC);
        wire.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        let ok = Msg::HelloOk {
            version: PROTOCOL_VERSION,
            compress: false,
        };
        crate::proto::frame::encode(&ok, &[], &mut wire).unwrap();
        for split in 0..wire.len() {
            let (a, b) = wire.split_at(split);
            let (mut tx, rx) = tokio::io::duplex(1 << 16);
            let (a, b) = (a.to_vec(), b.to_vec());
            let writer = tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                tx.write_all(&a).await.unwrap();
                tokio::task::yield_now().await;
                tx.write_all(&b).await.unwrap();
            });
            let mut r = FrameReader::new(rx);
            let junk = await_helper(&mut r).await.expect("greeting");
            assert_eq!(junk, b"motd\n", "split at {split}");
            let (msg, _) = r.next().await.unwrap().expect("the answer");
            assert!(matches!(msg, Msg::HelloOk { .. }), "split at {split}");
            writer.await.unwrap();
        }
    }
}
