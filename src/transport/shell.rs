//! A shell or command session (`devsync ssh`) on an SSH channel of our own connection, or on
//! one a keeper holds (`keep`), through its socket. Both look the same to the caller: requests
//! (terminal, shell, exec), stdin, window changes and signals go one way, output, replies and
//! the exit status come back as [`Event`]s.
//!
//! Through a keeper the channel's messages travel as small frames (`kind`, 4-byte length,
//! payload) over the Unix socket; the keeper does what they say on a channel it opened and
//! sends back what the channel says. It must not interpret the session (no terminal handling,
//! no exit codes of its own): it only relays.

use std::time::Duration;

use russh::{ChannelMsg, Sig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// What a session says back.
#[derive(Debug)]
pub enum Event {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// A request was granted…
    Success,
    /// …or refused.
    Failure,
    ExitStatus(u32),
    ExitSignal(Sig),
    /// The channel closed: nothing more comes.
    Close,
}

/// A terminal to ask for: `TERM`, columns, rows and pixel sizes.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Pty {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
    pub px: u32,
    pub py: u32,
}

/// The largest frame either side accepts (output comes in SSH packets of 32 KiB or so).
const MAX_FRAME: usize = 1 << 20;

mod kind {
    // Client → keeper.
    pub const PTY: u8 = b'P';
    pub const SHELL: u8 = b'S';
    pub const EXEC: u8 = b'X';
    pub const DATA: u8 = b'D';
    pub const EOF: u8 = b'E';
    pub const WINDOW: u8 = b'W';
    pub const SIGNAL: u8 = b'G';
    // Keeper → client (DATA as above).
    pub const STDERR: u8 = b'R';
    pub const SUCCESS: u8 = b'O';
    pub const FAILURE: u8 = b'F';
    pub const STATUS: u8 = b'T';
    pub const KILLED: u8 = b'K';
    pub const CLOSE: u8 = b'C';
}

type Channel = russh::Channel<russh::client::Msg>;

/// One session, direct or through a keeper.
pub enum Shell {
    Direct {
        read: russh::ChannelReadHalf,
        write: russh::ChannelWriteHalf<russh::client::Msg>,
    },
    Kept {
        events: mpsc::Receiver<Event>,
        write: Box<dyn AsyncWrite + Send + Unpin>,
    },
}

impl Shell {
    pub fn direct(channel: Channel) -> Shell {
        let (read, write) = channel.split();
        Shell::Direct { read, write }
    }

    /// A session on the keeper's socket halves (after its `OK`).
    pub fn kept(
        r: impl AsyncRead + Send + Unpin + 'static,
        w: impl AsyncWrite + Send + Unpin + 'static,
    ) -> Shell {
        let (tx, events) = mpsc::channel(64);
        tokio::spawn(read_events(r, tx));
        Shell::Kept {
            events,
            write: Box::new(w),
        }
    }

    pub async fn request_pty(&mut self, p: &Pty) -> std::io::Result<()> {
        match self {
            Shell::Direct { write, .. } => write
                .request_pty(true, &p.term, p.cols, p.rows, p.px, p.py, &[])
                .await
                .map_err(io),
            Shell::Kept { write, .. } => {
                let json = serde_json::to_vec(p).map_err(std::io::Error::other)?;
                send(write, kind::PTY, &json).await
            }
        }
    }

    pub async fn request_shell(&mut self) -> std::io::Result<()> {
        match self {
            Shell::Direct { write, .. } => write.request_shell(true).await.map_err(io),
            Shell::Kept { write, .. } => send(write, kind::SHELL, &[]).await,
        }
    }

    pub async fn exec(&mut self, command: &str) -> std::io::Result<()> {
        match self {
            Shell::Direct { write, .. } => write.exec(true, command).await.map_err(io),
            Shell::Kept { write, .. } => send(write, kind::EXEC, command.as_bytes()).await,
        }
    }

    pub async fn data(&mut self, bytes: bytes::Bytes) -> std::io::Result<()> {
        match self {
            Shell::Direct { write, .. } => write.data_bytes(bytes).await.map_err(io),
            Shell::Kept { write, .. } => {
                for piece in bytes.chunks(MAX_FRAME) {
                    send(write, kind::DATA, piece).await?;
                }
                Ok(())
            }
        }
    }

    pub async fn eof(&mut self) -> std::io::Result<()> {
        match self {
            Shell::Direct { write, .. } => write.eof().await.map_err(io),
            Shell::Kept { write, .. } => send(write, kind::EOF, &[]).await,
        }
    }

    pub async fn window_change(&mut self, c: u32, r: u32, px: u32, py: u32) -> std::io::Result<()> {
        match self {
            Shell::Direct { write, .. } => write.window_change(c, r, px, py).await.map_err(io),
            Shell::Kept { write, .. } => {
                let mut b = Vec::with_capacity(16);
                for v in [c, r, px, py] {
                    b.extend_from_slice(&v.to_be_bytes());
                }
                send(write, kind::WINDOW, &b).await
            }
        }
    }

    pub async fn signal(&mut self, sig: Sig) -> std::io::Result<()> {
        match self {
            Shell::Direct { write, .. } => write.signal(sig).await.map_err(io),
            Shell::Kept { write, .. } => send(write, kind::SIGNAL, sig_name(&sig).as_bytes()).await,
        }
    }

    /// The next thing the session says (cancel-safe); `Close` once it is over.
    pub async fn wait(&mut self) -> Event {
        match self {
            Shell::Direct { read, .. } => loop {
                match read.wait().await {
                    Some(ChannelMsg::Data { data }) => return Event::Stdout(data.to_vec()),
                    Some(ChannelMsg::ExtendedData { data, .. }) => {
                        return Event::Stderr(data.to_vec());
                    }
                    Some(ChannelMsg::Success) => return Event::Success,
                    Some(ChannelMsg::Failure) => return Event::Failure,
                    Some(ChannelMsg::ExitStatus { exit_status }) => {
                        return Event::ExitStatus(exit_status);
                    }
                    Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                        return Event::ExitSignal(signal_name);
                    }
                    Some(ChannelMsg::Close) | None => return Event::Close,
                    Some(_) => {}
                }
            },
            Shell::Kept { events, .. } => events.recv().await.unwrap_or(Event::Close),
        }
    }
}

fn io(e: russh::Error) -> std::io::Error {
    std::io::Error::other(e)
}

async fn send<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    kind: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    if payload.len() > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} bytes in one piece; at most {MAX_FRAME} go through a kept connection (--keep-connection 0 does without)",
                payload.len()
            ),
        ));
    }
    let len = u32::try_from(payload.len()).map_err(std::io::Error::other)?;
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&head).await?;
    w.write_all(payload).await?;
    w.flush().await
}

/// One frame, `None` at a clean end between frames (an end inside one is an error).
async fn recv<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut k = [0u8; 1];
    if r.read(&mut k).await? == 0 {
        return Ok(None);
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let ([k], [a, b, c, d]) = (k, len);
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a {len}-byte frame from the keeper's peer"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some((k, payload)))
}

/// The `n` big-endian u32s a payload must be exactly.
fn u32s<const N: usize>(b: &[u8]) -> Option<[u32; N]> {
    if b.len() != N * 4 {
        return None;
    }
    let mut out = [0u32; N];
    for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
        *o = u32::from_be_bytes(c.try_into().ok()?);
    }
    Some(out)
}

/// Client side: the keeper's frames as events, until it closes.
async fn read_events(mut r: impl AsyncRead + Unpin, tx: mpsc::Sender<Event>) {
    loop {
        let ev = match recv(&mut r).await {
            Ok(Some((kind::DATA, p))) => Event::Stdout(p),
            Ok(Some((kind::STDERR, p))) => Event::Stderr(p),
            Ok(Some((kind::SUCCESS, _))) => Event::Success,
            Ok(Some((kind::FAILURE, _))) => Event::Failure,
            // A status that is not one ends the session (never read as a made-up 0).
            Ok(Some((kind::STATUS, p))) => match u32s::<1>(&p) {
                Some([code]) => Event::ExitStatus(code),
                None => Event::Close,
            },
            Ok(Some((kind::KILLED, p))) => {
                Event::ExitSignal(sig_from_name(&String::from_utf8_lossy(&p)))
            }
            Ok(Some((kind::CLOSE, _))) => Event::Close,
            Ok(Some((_, _))) => continue, // nothing else is sent this way
            Ok(None) | Err(_) => Event::Close,
        };
        let last = matches!(ev, Event::Close);
        if tx.send(ev).await.is_err() || last {
            return;
        }
    }
}

/// Keeper side: does on `channel` what the client's frames say and sends back what the
/// channel says, until either end is done. A client that goes away closes the channel.
pub async fn relay<R, W>(channel: Channel, mut r: R, mut w: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut read, write) = channel.split();
    let up = async {
        while let Ok(Some((k, p))) = recv(&mut r).await {
            let done = match k {
                // Something we cannot read is not our client: end the session.
                kind::PTY => match serde_json::from_slice::<Pty>(&p) {
                    Ok(t) => write
                        .request_pty(true, &t.term, t.cols, t.rows, t.px, t.py, &[])
                        .await
                        .is_err(),
                    Err(_) => true,
                },
                kind::SHELL => write.request_shell(true).await.is_err(),
                kind::EXEC => write.exec(true, p).await.is_err(),
                kind::DATA => write.data_bytes(p).await.is_err(),
                kind::EOF => write.eof().await.is_err(),
                kind::WINDOW => match u32s::<4>(&p) {
                    Some([c, r, px, py]) => write.window_change(c, r, px, py).await.is_err(),
                    None => true,
                },
                kind::SIGNAL => write
                    .signal(sig_from_name(&String::from_utf8_lossy(&p)))
                    .await
                    .is_err(),
                _ => true, // not a client of this protocol
            };
            if done {
                break;
            }
        }
    };
    // Whether the channel ended by itself (else the client went away).
    let down = async {
        loop {
            let (k, p): (u8, Vec<u8>) = match read.wait().await {
                Some(ChannelMsg::Data { data }) => (kind::DATA, data.to_vec()),
                Some(ChannelMsg::ExtendedData { data, .. }) => (kind::STDERR, data.to_vec()),
                Some(ChannelMsg::Success) => (kind::SUCCESS, vec![]),
                Some(ChannelMsg::Failure) => (kind::FAILURE, vec![]),
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    (kind::STATUS, exit_status.to_be_bytes().to_vec())
                }
                Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                    (kind::KILLED, sig_name(&signal_name).into_bytes())
                }
                Some(ChannelMsg::Close) | None => break,
                Some(_) => continue,
            };
            for piece in p.chunks(MAX_FRAME).chain(p.is_empty().then_some(&[][..])) {
                if send(&mut w, k, piece).await.is_err() {
                    return false; // the client is gone
                }
            }
        }
        let _ = send(&mut w, kind::CLOSE, &[]).await; // it may be gone already
        true
    };
    let closed_by_itself = tokio::select! {
        done = down => done,
        () = up => false,
    };
    if !closed_by_itself {
        // The client hung up (or stopped reading): end its command as a dropped connection
        // would, and wait (bounded: a dying connection may not answer) for the close.
        let _ = write.close().await; // the channel may be closing already
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while !matches!(read.wait().await, Some(ChannelMsg::Close) | None) {}
        })
        .await;
    }
}

/// A signal's name as SSH spells it (`INT`, `TERM`, …).
pub fn sig_name(sig: &Sig) -> String {
    match sig {
        Sig::Custom(name) => name.clone(),
        other => format!("{other:?}"),
    }
}

fn sig_from_name(name: &str) -> Sig {
    match name {
        "ABRT" => Sig::ABRT,
        "ALRM" => Sig::ALRM,
        "FPE" => Sig::FPE,
        "HUP" => Sig::HUP,
        "ILL" => Sig::ILL,
        "INT" => Sig::INT,
        "KILL" => Sig::KILL,
        "PIPE" => Sig::PIPE,
        "QUIT" => Sig::QUIT,
        "SEGV" => Sig::SEGV,
        "TERM" => Sig::TERM,
        "USR1" => Sig::USR1,
        other => Sig::Custom(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_round_trip() {
        for s in [
            Sig::ABRT,
            Sig::ALRM,
            Sig::FPE,
            Sig::HUP,
            Sig::ILL,
            Sig::INT,
            Sig::KILL,
            Sig::PIPE,
            Sig::QUIT,
            Sig::SEGV,
            Sig::TERM,
            Sig::USR1,
            Sig::Custom("WINCH".into()),
        ] {
            assert_eq!(sig_name(&sig_from_name(&sig_name(&s))), sig_name(&s));
            assert!(
                !matches!(sig_from_name(&sig_name(&s)), Sig::Custom(_))
                    || matches!(s, Sig::Custom(_))
            );
        }
    }

    #[tokio::test]
    async fn frames_round_trip_and_oversized_ones_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        send(&mut a, kind::DATA, b"hello").await.unwrap();
        send(&mut a, kind::EOF, &[]).await.unwrap();
        assert_eq!(
            recv(&mut b).await.unwrap(),
            Some((kind::DATA, b"hello".to_vec()))
        );
        assert_eq!(recv(&mut b).await.unwrap(), Some((kind::EOF, vec![])));
        let mut huge = vec![kind::DATA];
        huge.extend_from_slice(&(MAX_FRAME as u32 + 1).to_be_bytes());
        a.write_all(&huge).await.unwrap();
        assert!(recv(&mut b).await.is_err());
        assert!(
            send(&mut a, kind::EXEC, &vec![b'x'; MAX_FRAME + 1])
                .await
                .is_err()
        );
        // An end between frames is clean; inside a header, an error.
        let (a, mut b) = tokio::io::duplex(1 << 16);
        drop(a);
        assert_eq!(recv(&mut b).await.unwrap(), None);
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        a.write_all(&[kind::DATA, 0, 0]).await.unwrap();
        drop(a);
        assert!(recv(&mut b).await.is_err());
    }

    #[test]
    fn fixed_size_payloads_must_be_exactly_that_size() {
        assert_eq!(u32s::<1>(&7u32.to_be_bytes()), Some([7]));
        assert_eq!(u32s::<1>(&[0, 0, 7]), None);
        assert_eq!(u32s::<4>(&[0; 15]), None);
    }
}
