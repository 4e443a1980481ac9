//! Frames: `u32 BE length | u32 BE header length | postcard header | raw payload`.
//!
//! A reader tells three things apart (mini-redis style): a clean end of stream between frames
//! (`Ok(None)`), a stream that ends inside a frame ([`ProtoError::Truncated`]), and bytes that
//! are not a frame ([`ProtoError::Oversized`] / [`ProtoError::Malformed`] / `Invalid`). The
//! length is checked against [`MAX_FRAME`] before any buffer is allocated. (tokio-util's
//! `LengthDelimitedCodec` reports these cases as indistinguishable `io::Error`s and copies
//! every payload into its write buffer, hence this small reader and writer.)

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadBuf,
};

use super::ProtoError;
use super::msg::Msg;

/// Largest frame accepted: one 4 MiB chunk as a worst-case (all literal) delta, plus headroom.
pub const MAX_FRAME: u32 = 8 << 20;
/// Largest encoded message header inside a frame.
pub const MAX_HEADER: u32 = 1 << 20;

/// A stream that counts the bytes that actually move through it, so a watchdog can tell a
/// slow transfer (bytes trickle) from a dead one (nothing moves).
pub struct Counted<S> {
    inner: S,
    moved: Arc<AtomicU64>,
}

impl<S> Counted<S> {
    fn new(inner: S) -> Self {
        Counted {
            inner,
            moved: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.moved.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.moved.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pub struct FrameReader<R> {
    inner: BufReader<Counted<R>>,
    bytes: u64,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(r: R) -> Self {
        FrameReader {
            inner: BufReader::with_capacity(256 << 10, Counted::new(r)),
            bytes: 0,
        }
    }

    /// Bytes read from the stream so far, as they arrive (frames need not be complete).
    pub fn moved(&self) -> Arc<AtomicU64> {
        self.inner.get_ref().moved.clone()
    }

    /// Bytes consumed from the stream so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    pub(crate) fn buffered(&mut self) -> &mut BufReader<Counted<R>> {
        &mut self.inner
    }

    /// The buffered stream underneath, for reading raw bytes outside frames (handshakes).
    pub fn raw(&mut self) -> &mut BufReader<Counted<R>> {
        &mut self.inner
    }

    pub(crate) fn count(&mut self, n: u64) {
        self.bytes += n;
    }

    /// Waits until bytes (or the end of the stream) are there to read. Cancel-safe: what
    /// arrives stays buffered for [`FrameReader::next`].
    pub async fn readable(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncBufRead;
        std::future::poll_fn(|cx| {
            std::pin::Pin::new(&mut self.inner)
                .poll_fill_buf(cx)
                .map_ok(|_| ())
        })
        .await
    }

    /// Next message and its payload; `Ok(None)` on a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<(Msg, Bytes)>, ProtoError> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            let n = self
                .inner
                .read(len.get_mut(got..).unwrap_or_default())
                .await?;
            if n == 0 {
                return if got == 0 {
                    Ok(None)
                } else {
                    Err(ProtoError::Truncated)
                };
            }
            got += n;
        }
        let len = u32::from_be_bytes(len);
        if len > MAX_FRAME {
            return Err(ProtoError::Oversized { len: len.into() });
        }
        if len < 4 {
            return Err(ProtoError::Malformed(format!(
                "{len}-byte frame is too short"
            )));
        }
        // Read into uninitialized capacity: zero-filling every frame first showed up in
        // profiles (a memset per byte received).
        let len_usize = len as usize;
        let mut buf = BytesMut::with_capacity(len_usize);
        while buf.len() < len_usize {
            let room = len_usize - buf.len();
            if self.inner.read_buf(&mut (&mut buf).limit(room)).await? == 0 {
                return Err(ProtoError::Truncated);
            }
        }
        self.bytes += 4 + u64::from(len);
        let mut frame = buf.freeze();
        decode(&mut frame).map(Some)
    }
}

/// Splits a frame body (without its length prefix) into a validated message and its payload.
pub fn decode(frame: &mut Bytes) -> Result<(Msg, Bytes), ProtoError> {
    let hlen = frame
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| ProtoError::Malformed("frame shorter than its header length".into()))?;
    if hlen > MAX_HEADER || hlen as usize > frame.len() - 4 {
        return Err(ProtoError::Malformed(format!(
            "header length {hlen} does not fit in a {}-byte frame",
            frame.len()
        )));
    }
    let header = frame.slice(4..4 + hlen as usize);
    let payload = frame.slice(4 + hlen as usize..);
    let msg: Msg = postcard::from_bytes(&header)
        .map_err(|e| ProtoError::Malformed(format!("undecodable message: {e}")))?;
    msg.validate(payload.len())?;
    Ok((msg, payload))
}

/// Encodes one frame onto the end of `out` (list batches are encoded by the sender's walker
/// threads with it; tests and fuzzing build raw streams with it). On error `out` is as it was.
pub fn encode(msg: &Msg, payload: &[u8], out: &mut Vec<u8>) -> Result<(), ProtoError> {
    let start = out.len();
    // Both lengths are patched in once the header is serialized in place.
    out.extend_from_slice(&[0; 8]);
    // `&mut Vec<u8>` is an `io::Write` that appends: no intermediate buffer.
    let header_len = match postcard::to_io(msg, &mut *out) {
        Ok(_) => out.len() - start - 8,
        Err(e) => {
            out.truncate(start);
            return Err(ProtoError::Malformed(e.to_string()));
        }
    };
    let total = 4 + header_len + payload.len();
    if total > MAX_FRAME as usize {
        out.truncate(start);
        return Err(ProtoError::Oversized { len: total as u64 });
    }
    let mut lens = [0u8; 8];
    lens[..4].copy_from_slice(&(total as u32).to_be_bytes());
    lens[4..].copy_from_slice(&(header_len as u32).to_be_bytes());
    if let Some(slot) = out.get_mut(start..start + 8) {
        slot.copy_from_slice(&lens);
    }
    out.extend_from_slice(payload);
    Ok(())
}

pub struct FrameWriter<W> {
    inner: BufWriter<Counted<W>>,
    header: Vec<u8>,
    bytes: u64,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(w: W) -> Self {
        FrameWriter {
            inner: BufWriter::with_capacity(256 << 10, Counted::new(w)),
            header: Vec::with_capacity(256),
            bytes: 0,
        }
    }

    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Bytes that reached the stream so far (not only queued in our buffer).
    pub fn moved(&self) -> Arc<AtomicU64> {
        self.inner.get_ref().moved.clone()
    }

    /// Writes raw bytes (the handshake magic) outside of any frame.
    pub async fn write_raw(&mut self, b: &[u8]) -> Result<(), ProtoError> {
        self.inner.write_all(b).await?;
        self.bytes += b.len() as u64;
        Ok(())
    }

    /// Queues one frame; large payloads go straight to the stream without a copy.
    pub async fn write(&mut self, msg: &Msg, payload: &[u8]) -> Result<(), ProtoError> {
        self.header.clear();
        let header = postcard::to_extend(msg, std::mem::take(&mut self.header))
            .map_err(|e| ProtoError::Malformed(e.to_string()))?;
        self.header = header;
        let total = 4 + self.header.len() + payload.len();
        if total > MAX_FRAME as usize {
            return Err(ProtoError::Oversized { len: total as u64 });
        }
        self.inner.write_all(&(total as u32).to_be_bytes()).await?;
        self.inner
            .write_all(&(self.header.len() as u32).to_be_bytes())
            .await?;
        self.inner.write_all(&self.header).await?;
        self.inner.write_all(payload).await?;
        self.bytes += 4 + total as u64;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), ProtoError> {
        Ok(self.inner.flush().await?)
    }

    pub async fn shutdown(&mut self) -> Result<(), ProtoError> {
        self.inner.flush().await?;
        Ok(self.inner.shutdown().await?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::proto::Msg;

    async fn read_all(bytes: &[u8]) -> Vec<Result<Option<(Msg, Bytes)>, String>> {
        let mut r = FrameReader::new(bytes);
        let mut out = Vec::new();
        loop {
            match r.next().await {
                Ok(Some(f)) => out.push(Ok(Some(f))),
                Ok(None) => {
                    out.push(Ok(None));
                    return out;
                }
                Err(e) => {
                    out.push(Err(e.to_string()));
                    return out;
                }
            }
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn roundtrip_and_clean_eof() {
        let mut buf = Vec::new();
        encode(&Msg::Bye, &[], &mut buf).unwrap();
        encode(&Msg::Data { id: 3, chunk: 1 }, b"payload", &mut buf).unwrap();
        let got = rt().block_on(read_all(&buf));
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[1].as_ref().unwrap().as_ref().unwrap().1.as_ref(),
            b"payload"
        );
        assert!(matches!(got[2], Ok(None)));
    }

    #[test]
    fn truncation_anywhere_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        encode(&Msg::Data { id: 3, chunk: 1 }, b"payload", &mut buf).unwrap();
        for cut in 1..buf.len() {
            let got = rt().block_on(read_all(&buf[..cut]));
            let last = got.last().unwrap();
            assert!(
                last.as_ref()
                    .is_err_and(|e| e.contains("middle of a frame")),
                "cut {cut}: {got:?}"
            );
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_allocating() {
        let mut buf = (MAX_FRAME + 1).to_be_bytes().to_vec();
        buf.extend_from_slice(&[0; 16]);
        let got = rt().block_on(read_all(&buf));
        assert!(
            got[0].as_ref().is_err_and(|e| e.contains("limit")),
            "{got:?}"
        );
        assert!(
            encode(
                &Msg::Data { id: 0, chunk: 0 },
                &vec![0; MAX_FRAME as usize],
                &mut Vec::new()
            )
            .is_err()
        );
    }

    #[test]
    fn malformed_and_invalid_frames() {
        let frame = |body: &[u8]| {
            let mut v = (body.len() as u32).to_be_bytes().to_vec();
            v.extend_from_slice(body);
            v
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (frame(&[0, 0]), "too short"),
            (frame(&[0, 0, 0, 9, 1]), "does not fit"),
            (frame(&[0, 0, 0, 1, 0xff]), "undecodable"),
            (frame(&[0xff, 0xff, 0xff, 0xff]), "does not fit"),
        ];
        for (bytes, want) in cases {
            let got = rt().block_on(read_all(&bytes));
            assert!(
                got[0].as_ref().is_err_and(|e| e.contains(want)),
                "{want}: {got:?}"
            );
        }
        // Well-formed but invalid: a payload on a message that takes none, an absolute path.
        let mut buf = Vec::new();
        let hdr = postcard::to_stdvec(&Msg::Bye).unwrap();
        let body = [&(hdr.len() as u32).to_be_bytes()[..], &hdr, b"x"].concat();
        buf.extend_from_slice(&frame(&body));
        let got = rt().block_on(read_all(&buf));
        assert!(
            got[0]
                .as_ref()
                .is_err_and(|e| e.contains("unexpected payload")),
            "{got:?}"
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
        let mut valid = Vec::new();
        encode(
            &Msg::DeltaRequest {
                id: 1,
                chunks: vec![1, 2, 3],
                full: false,
            },
            &[],
            &mut valid,
        )
        .unwrap();
        let rt = rt();
        for _ in 0..5000 {
            let mut b = valid.clone();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..b.len());
                b[i] = rng.random();
            }
            let _ = rt.block_on(read_all(&b));
            let junk: Vec<u8> = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
            let _ = rt.block_on(read_all(&junk));
        }
    }
}
