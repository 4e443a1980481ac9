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
use super::compress::{COMPRESSED, Compress, GROUP, LinkMemo, MIN_BODY, Packer, Traffic, Unpacker};
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
    /// Frame bytes before decompression.
    raw_bytes: u64,
    /// Frames unpacked from a compressed frame and not yet returned.
    unpacked: Bytes,
    unpacker: Unpacker,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(r: R) -> Self {
        FrameReader {
            inner: BufReader::with_capacity(256 << 10, Counted::new(r)),
            bytes: 0,
            raw_bytes: 0,
            unpacked: Bytes::new(),
            unpacker: Unpacker::default(),
        }
    }

    /// Bytes read from the stream so far, as they arrive (frames need not be complete).
    pub fn moved(&self) -> Arc<AtomicU64> {
        self.inner.get_ref().moved.clone()
    }

    /// Bytes consumed, on the wire and as they were before compression.
    pub fn traffic(&self) -> Traffic {
        Traffic {
            wire: self.bytes,
            raw: self.raw_bytes,
            memo: None,
        }
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
        self.raw_bytes += n;
    }

    /// Waits until bytes (or the end of the stream) are there to read. Cancel-safe: what
    /// arrives stays buffered for [`FrameReader::next`].
    pub async fn readable(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncBufRead;
        if !self.unpacked.is_empty() {
            return Ok(());
        }
        std::future::poll_fn(|cx| {
            std::pin::Pin::new(&mut self.inner)
                .poll_fill_buf(cx)
                .map_ok(|_| ())
        })
        .await
    }

    /// Next message and its payload; `Ok(None)` on a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<(Msg, Bytes)>, ProtoError> {
        loop {
            if !self.unpacked.is_empty() {
                return self.next_unpacked().map(Some);
            }
            let Some((len, mut frame)) = self.next_body().await? else {
                return Ok(None);
            };
            if len & COMPRESSED == 0 {
                self.raw_bytes += 4 + u64::from(len);
                return decode(&mut frame).map(Some);
            }
            self.unpacked = self.unpacker.unpack(&frame)?;
        }
    }

    /// The next frame held in what a compressed frame unpacked to.
    fn next_unpacked(&mut self) -> Result<(Msg, Bytes), ProtoError> {
        let cut = || ProtoError::Malformed("a compressed frame ends inside a frame".into());
        let len = self
            .unpacked
            .get(..4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_be_bytes)
            .ok_or_else(cut)?;
        if len & COMPRESSED != 0 {
            return Err(ProtoError::Malformed(
                "a compressed frame holds another compressed frame".into(),
            ));
        }
        if !(4..=MAX_FRAME).contains(&len) {
            return Err(ProtoError::Malformed(format!(
                "{len}-byte frame inside a compressed frame"
            )));
        }
        let end = 4 + len as usize;
        if end > self.unpacked.len() {
            self.unpacked = Bytes::new();
            return Err(cut());
        }
        let mut frame = self.unpacked.slice(4..end);
        self.unpacked = self.unpacked.slice(end..);
        self.raw_bytes += end as u64;
        decode(&mut frame)
    }

    /// Reads one frame's length word and body from the stream.
    async fn next_body(&mut self) -> Result<Option<(u32, Bytes)>, ProtoError> {
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
        let word = u32::from_be_bytes(len);
        let len = word & !COMPRESSED;
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
        Ok(Some((word, buf.freeze())))
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
    /// Frame bytes before compression.
    raw_bytes: u64,
    /// Set once both ends agreed to compress.
    pack: Option<Box<Packer>>,
    /// A frame assembled whole, to be compressed.
    scratch: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(w: W) -> Self {
        FrameWriter {
            inner: BufWriter::with_capacity(256 << 10, Counted::new(w)),
            header: Vec::with_capacity(256),
            bytes: 0,
            raw_bytes: 0,
            pack: None,
            scratch: Vec::new(),
        }
    }

    /// Compresses what follows as `mode` says (once the peer agreed to decompress it),
    /// starting from `memo` (what the last session to this target learned) if given.
    pub fn compress(&mut self, mode: Compress, memo: Option<LinkMemo>) {
        self.pack = Packer::new(mode, memo).map(Box::new);
    }

    /// What the compressor learned about the link (see [`Packer::memo`]).
    pub fn memo(&self) -> Option<LinkMemo> {
        self.pack.as_ref().and_then(|p| p.memo())
    }

    /// Bytes written, on the wire and as they were before compression.
    pub fn traffic(&self) -> Traffic {
        Traffic {
            wire: self.bytes,
            raw: self.raw_bytes,
            memo: self.memo(),
        }
    }

    /// Bytes that reached the stream so far (not only queued in our buffer).
    pub fn moved(&self) -> Arc<AtomicU64> {
        self.inner.get_ref().moved.clone()
    }

    /// Writes raw bytes (the handshake magic) outside of any frame.
    pub async fn write_raw(&mut self, b: &[u8]) -> Result<(), ProtoError> {
        self.inner.write_all(b).await?;
        self.bytes += b.len() as u64;
        self.raw_bytes += b.len() as u64;
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
        let lens = [
            (total as u32).to_be_bytes(),
            (self.header.len() as u32).to_be_bytes(),
        ];
        if self
            .pack
            .as_ref()
            .is_some_and(|p| p.level() > 0 && total + 4 >= MIN_BODY)
        {
            // Compressed as one piece: assemble the frame first.
            let mut frame = std::mem::take(&mut self.scratch);
            frame.clear();
            frame.extend_from_slice(lens.as_flattened());
            frame.extend_from_slice(&self.header);
            frame.extend_from_slice(payload);
            let r = self.write_frames(&frame).await;
            self.scratch = frame;
            return r;
        }
        // Counted before it blocks: the wait is the stream's, not the writer's idleness.
        if let Some(p) = self.pack.as_mut() {
            p.pass(4 + total);
        }
        let started = std::time::Instant::now();
        self.inner.write_all(lens.as_flattened()).await?;
        self.inner.write_all(&self.header).await?;
        self.inner.write_all(payload).await?;
        if let Some(p) = self.pack.as_mut() {
            p.wrote(4 + total, started.elapsed());
        }
        self.bytes += 4 + total as u64;
        self.raw_bytes += 4 + total as u64;
        Ok(())
    }

    /// Writes whole encoded frames ([`encode`]'s output, one after another), compressed in
    /// groups of about [`GROUP`] bytes when compression is on and pays.
    pub async fn write_frames(&mut self, frames: &[u8]) -> Result<(), ProtoError> {
        let mut rest = frames;
        while !rest.is_empty() {
            let (group, after) = rest.split_at(group_end(rest));
            rest = after;
            let Self {
                inner,
                pack,
                bytes,
                raw_bytes,
                ..
            } = self;
            *raw_bytes += group.len() as u64;
            match pack.as_mut() {
                None => {
                    inner.write_all(group).await?;
                    *bytes += group.len() as u64;
                }
                Some(p) => match p.pack(group) {
                    Some(z) => {
                        let word = z.len() as u32 | COMPRESSED;
                        let waited = std::time::Instant::now();
                        inner.write_all(&word.to_be_bytes()).await?;
                        inner.write_all(z).await?;
                        let n = 4 + z.len();
                        *bytes += n as u64;
                        p.wrote(n, waited.elapsed());
                    }
                    None => {
                        let waited = std::time::Instant::now();
                        inner.write_all(group).await?;
                        *bytes += group.len() as u64;
                        p.wrote(group.len(), waited.elapsed());
                    }
                },
            }
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), ProtoError> {
        let started = std::time::Instant::now();
        self.inner.flush().await?;
        if let Some(p) = self.pack.as_mut() {
            p.wrote(0, started.elapsed());
        }
        Ok(())
    }

    pub async fn shutdown(&mut self) -> Result<(), ProtoError> {
        self.inner.flush().await?;
        Ok(self.inner.shutdown().await?)
    }
}

/// Where the first group of `frames` ends: whole frames up to about [`GROUP`] bytes (a single
/// bigger frame is a group of its own). Bytes that do not parse as frames end the group there.
fn group_end(frames: &[u8]) -> usize {
    let mut end = 0;
    while end < frames.len() {
        let len = frames
            .get(end..end + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(|b| u32::from_be_bytes(b) as usize);
        let Some(next) = len.map(|l| end + 4 + l).filter(|n| *n <= frames.len()) else {
            return frames.len();
        };
        if end > 0 && next > GROUP {
            break;
        }
        end = next;
    }
    end.max(1).min(frames.len())
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

    /// Writes `frames` (message, payload) through a writer compressing at `mode`, half of them
    /// as list frames ([`FrameWriter::write_frames`]), and reads them back.
    fn through(mode: Compress, frames: &[(Msg, Vec<u8>)]) -> (Vec<(Msg, Bytes)>, Traffic, Traffic) {
        rt().block_on(async {
            let mut wire = Vec::new();
            let mut w = FrameWriter::new(&mut wire);
            w.compress(mode, None);
            let mut list = Vec::new();
            for (i, (m, p)) in frames.iter().enumerate() {
                if i % 2 == 0 {
                    w.write(m, p).await.unwrap();
                } else {
                    list.clear();
                    encode(m, p, &mut list).unwrap();
                    w.write_frames(&list).await.unwrap();
                }
            }
            w.flush().await.unwrap();
            let sent = w.traffic();
            drop(w);
            let mut r = FrameReader::new(&wire[..]);
            let mut got = Vec::new();
            while let Some(f) = r.next().await.unwrap() {
                got.push(f);
            }
            (got, sent, r.traffic())
        })
    }

    fn text(n: usize) -> Vec<u8> {
        b"pub fn sync(&mut self) -> Result<(), Error> { self.flush() }\n"
            .iter()
            .copied()
            .cycle()
            .take(n)
            .collect()
    }

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        use rand::{RngCore, SeedableRng};
        let mut v = vec![0u8; n];
        rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    #[test]
    fn compressed_frames_round_trip_for_every_kind_that_carries_data() {
        use crate::engine::delta::SigParams;
        let stamp = crate::proto::Stamp {
            mode: 0o644,
            mtime: crate::engine::Mtime { sec: 1, nsec: 0 },
        };
        let params = SigParams::for_len(100);
        let frames = vec![
            (Msg::Data { id: 1, chunk: 0 }, text(3 << 20)),
            (Msg::Data { id: 2, chunk: 0 }, noise(1 << 20, 1)),
            (Msg::Data { id: 3, chunk: 0 }, Vec::new()),
            (
                Msg::WholeFiles {
                    files: vec![crate::proto::WholeItem {
                        id: 4,
                        len: 20_000,
                        digest: Default::default(),
                        stamp,
                    }],
                },
                text(20_000),
            ),
            (
                Msg::Delta {
                    id: 5,
                    chunk: 0,
                    window_start: 0,
                    window_len: 1,
                    len: 9000,
                },
                text(9000),
            ),
            (
                Msg::Signature {
                    id: 6,
                    base_len: 100,
                    params,
                    cvs: vec![Default::default()],
                },
                noise(4096, 2),
            ),
            (Msg::SigPart { id: 7, chunk: 0 }, noise(70_000, 3)),
            (
                Msg::NeedWhole {
                    ids: (0..5000).collect(),
                },
                Vec::new(),
            ),
            (Msg::Ping, Vec::new()),
            (Msg::Data { id: 8, chunk: 1 }, text(700)),
        ];
        for mode in [Compress::Auto, Compress::Level(1), Compress::Level(19)] {
            let (got, sent, read) = through(mode, &frames);
            assert_eq!(got.len(), frames.len(), "{mode:?}");
            for ((m, p), (gm, gp)) in frames.iter().zip(&got) {
                assert_eq!(m, gm);
                assert_eq!(&p[..], &gp[..], "{m:?}");
            }
            assert_eq!(sent, read, "{mode:?}: both ends count the same");
            assert!(sent.wire < sent.raw / 2, "{mode:?}: {sent:?}");
        }
        // Noise alone goes raw (apart from a trial), and counts the same both ways.
        let noisy = vec![(Msg::Data { id: 1, chunk: 0 }, noise(4 << 20, 9)); 2];
        let (got, sent, _) = through(Compress::Level(3), &noisy);
        assert_eq!(got.len(), 2);
        assert_eq!(sent.wire, sent.raw);
    }

    #[test]
    fn corrupt_compressed_frames_are_errors_not_panics() {
        let (wire, _) = rt().block_on(async {
            let mut wire = Vec::new();
            let mut w = FrameWriter::new(&mut wire);
            w.compress(Compress::Level(3), None);
            w.write(&Msg::Data { id: 1, chunk: 0 }, &text(50_000))
                .await
                .unwrap();
            w.flush().await.unwrap();
            let t = w.traffic();
            drop(w);
            (wire, t)
        });
        assert_ne!(
            u32::from_be_bytes(wire[..4].try_into().unwrap()) & COMPRESSED,
            0
        );
        // Every single-byte corruption of the compressed body, and every cut.
        for i in (4..wire.len()).step_by(7) {
            let mut bad = wire.clone();
            bad[i] ^= 0x5a;
            let got = rt().block_on(read_all(&bad));
            let last = got.last().unwrap();
            // Either zstd's checksum catches it or the unpacked frames do not parse; what
            // happens to decode cleanly must still be the same message.
            if let Ok(Some((m, _))) = &got[0] {
                assert!(matches!(m, Msg::Data { .. }), "{i}: {got:?}");
            } else {
                assert!(last.is_err(), "{i}: {got:?}");
            }
        }
        for cut in 1..wire.len() {
            let got = rt().block_on(read_all(&wire[..cut]));
            assert!(got.last().unwrap().is_err(), "cut {cut}");
        }
        // Hand-made containers: one that nests, one that ends inside a frame, one that is empty.
        let packed = |inner: &[u8]| {
            let z = zstd::bulk::compress(inner, 1).unwrap();
            let mut v = (z.len() as u32 | COMPRESSED).to_be_bytes().to_vec();
            v.extend_from_slice(&z);
            v
        };
        let mut one = Vec::new();
        encode(&Msg::Bye, &[], &mut one).unwrap();
        let nested = packed(&packed(&one));
        let cut = packed(&one[..one.len() - 1]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (nested, "another compressed"),
            (cut, "ends inside a frame"),
            (packed(b""), "holds nothing"),
        ];
        for (bytes, want) in cases {
            let got = rt().block_on(read_all(&bytes));
            assert!(
                got.iter()
                    .any(|g| g.as_ref().is_err_and(|e| e.contains(want))),
                "{want}: {got:?}"
            );
        }
    }

    #[test]
    fn random_messages_round_trip_compressed() {
        use arbitrary::{Arbitrary, Unstructured};
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut frames = Vec::new();
        while frames.len() < 300 {
            let bytes: Vec<u8> = (0..rng.random_range(16..512))
                .map(|_| rng.random())
                .collect();
            let Ok(m) = Msg::arbitrary(&mut Unstructured::new(&bytes)) else {
                continue;
            };
            let payload = if rng.random_bool(0.5) {
                text(rng.random_range(0..5000))
            } else {
                Vec::new()
            };
            if m.validate(payload.len()).is_ok() {
                frames.push((m, payload));
            }
        }
        let (got, sent, read) = through(Compress::Level(2), &frames);
        assert_eq!(got.len(), frames.len());
        for ((m, p), (gm, gp)) in frames.iter().zip(&got) {
            assert_eq!(m, gm);
            assert_eq!(&p[..], &gp[..]);
        }
        assert_eq!(sent, read);
    }
}
