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
        let n = buf.len();
        junk.extend_from_slice(buf);
        r.buffered().consume(n);
        r.count(n as u64);
        if let Some(pos) = find(&junk, HELPER_MAGIC) {
            let after = junk.split_off(pos);
            // Bytes after the magic belong to the protocol: we need exactly the version after it.
            let rest = after.get(HELPER_MAGIC.len()..).unwrap_or_default().to_vec();
            let version = read_version(r, rest).await?;
            if version != PROTOCOL_VERSION {
                return Err(ProtoError::Handshake(format!(
                    "the helper speaks protocol version {version}, this client {PROTOCOL_VERSION}: \
                     the remote devsync binary is from another release"
                )));
            }
            return Ok(junk);
        }
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

/// Reads the 4-byte version that follows the magic. `already` holds bytes read past the magic,
/// which can only be part of the version or frames that follow it: those must be handed back.
async fn read_version<R: AsyncRead + Unpin>(
    r: &mut FrameReader<R>,
    already: Vec<u8>,
) -> Result<u32, ProtoError> {
    // The helper writes nothing after its greeting until it hears from us, so at most the 4
    // version bytes can have been read with the magic.
    if already.len() > 4 {
        return Err(ProtoError::Handshake(
            "the helper sent data before the client spoke".into(),
        ));
    }
    let mut v = [0u8; 4];
    let have = already.len();
    if let Some(dst) = v.get_mut(..have) {
        dst.copy_from_slice(&already);
    }
    if let Some(dst) = v.get_mut(have..) {
        r.buffered()
            .read_exact(dst)
            .await
            .map_err(|_| ProtoError::Handshake("the helper's greeting was cut short".into()))?;
    }
    Ok(u32::from_be_bytes(v))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
