//! The outbound half of a connection: a queue drained by one writer task, and the byte budget
//! that bounds how much file data a sender may have queued.
//!
//! Small list frames are coalesced: a frame of the file list may wait up to [`LAZY_FLUSH`]
//! for company before the writer flushes, so a 40k-entry list leaves as a few dozen large
//! writes instead of thousands of tiny SSH packets and TLS records (each of which costs a
//! wake-up and a syscall on every hop). Any other frame flushes at once.
//!
//! Sending never blocks (the queue is unbounded), so any thread or task can report an event or
//! make a request without risking a deadlock against a peer that is itself blocked writing.
//! Memory stays bounded because bulk producers take a [`Budget`] permit before reading data,
//! and the writer releases it once the bytes are on the stream.

use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use tokio::sync::{mpsc, watch};

use crate::proto::{FrameWriter, Msg, ProtoError};

enum Item {
    Frame(Msg, Bytes, Option<Permit>),
    /// A whole frame encoded by the sender ([`crate::proto::frame::encode`]), for a list batch.
    Encoded(Bytes),
}

/// Longest a list frame waits in the writer's buffer for more frames to share a flush.
pub const LAZY_FLUSH: std::time::Duration = std::time::Duration::from_millis(2);

impl Item {
    /// Frames that may wait for company (see the module docs); the rest are flushed at once.
    fn is_lazy(&self) -> bool {
        matches!(
            self,
            Item::Encoded(_) | Item::Frame(Msg::Entries { .. }, ..)
        )
    }

    async fn write_to<W: AsyncWrite + Unpin>(
        self,
        w: &mut FrameWriter<W>,
    ) -> Result<(), ProtoError> {
        match self {
            Item::Frame(msg, payload, permit) => {
                w.write(&msg, &payload).await?;
                drop(permit);
            }
            Item::Encoded(frame) => w.write_raw(&frame).await?,
        }
        Ok(())
    }
}

/// Cloneable handle for queueing frames.
#[derive(Clone)]
pub struct Out {
    tx: mpsc::UnboundedSender<Item>,
    /// Set (once) when the writer failed: the connection is gone.
    broken: watch::Receiver<Option<String>>,
}

#[derive(Debug, thiserror::Error)]
#[error("connection writer has stopped")]
pub struct Closed;

impl Out {
    pub fn send(&self, msg: Msg) -> Result<(), Closed> {
        self.tx
            .send(Item::Frame(msg, Bytes::new(), None))
            .map_err(|_| Closed)
    }

    /// Queues a frame already encoded with [`crate::proto::frame::encode`] (a file-list batch:
    /// it may wait [`LAZY_FLUSH`] for company).
    pub fn send_encoded(&self, frame: Bytes) -> Result<(), Closed> {
        self.tx.send(Item::Encoded(frame)).map_err(|_| Closed)
    }

    pub fn send_data(
        &self,
        msg: Msg,
        payload: Bytes,
        permit: Option<Permit>,
    ) -> Result<(), Closed> {
        self.tx
            .send(Item::Frame(msg, payload, permit))
            .map_err(|_| Closed)
    }

    /// Resolves with the error once writing to the peer has failed; pending forever otherwise.
    /// Read loops select on it: a link that fails for writing may never signal the read side.
    pub async fn broken(&self) -> String {
        let mut rx = self.broken.clone();
        let seen = rx.wait_for(Option::is_some).await.map(|v| v.clone());
        match seen {
            Ok(v) => v.unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }
}

/// The receiving end of an [`Out`] whose writer has not started yet: frames queue up until
/// [`Pending::start`] is given a stream (so work can begin before the connection exists).
pub struct Pending {
    rx: mpsc::UnboundedReceiver<Item>,
    broken: watch::Sender<Option<String>>,
}

/// A queue for frames and its not-yet-started writer.
pub fn channel() -> (Out, Pending) {
    let (tx, rx) = mpsc::unbounded_channel::<Item>();
    let (broken, broken_rx) = watch::channel(None);
    (
        Out {
            tx,
            broken: broken_rx,
        },
        Pending { rx, broken },
    )
}

/// Starts the writer task at once (see [`Pending::start`]).
pub fn spawn_writer<W>(w: FrameWriter<W>) -> (Out, tokio::task::JoinHandle<Result<u64, ProtoError>>)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out, pending) = channel();
    (out, pending.start(w))
}

impl Pending {
    /// Starts the writer task. It ends (flushing and shutting the stream down) when every
    /// [`Out`] is dropped, and returns the number of bytes written.
    pub fn start<W>(self, mut w: FrameWriter<W>) -> tokio::task::JoinHandle<Result<u64, ProtoError>>
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let Pending { mut rx, broken } = self;
        tokio::spawn(async move {
            let r: Result<u64, ProtoError> = async {
                // Set while only lazy frames sit unflushed: when they must go out.
                let mut deadline: Option<tokio::time::Instant> = None;
                loop {
                    let next = match deadline {
                        None => rx.recv().await,
                        Some(at) => match tokio::time::timeout_at(at, rx.recv()).await {
                            Ok(next) => next,
                            Err(_) => {
                                w.flush().await?;
                                deadline = None;
                                continue;
                            }
                        },
                    };
                    let Some(item) = next else {
                        break;
                    };
                    let mut urgent = !item.is_lazy();
                    item.write_to(&mut w).await?;
                    // Batch whatever is already queued into the same flush.
                    while let Ok(item) = rx.try_recv() {
                        urgent |= !item.is_lazy();
                        item.write_to(&mut w).await?;
                    }
                    if urgent {
                        w.flush().await?;
                        deadline = None;
                    } else if deadline.is_none() {
                        deadline = Some(tokio::time::Instant::now() + LAZY_FLUSH);
                    }
                }
                w.shutdown().await?;
                Ok(w.bytes_written())
            }
            .await;
            if let Err(e) = &r {
                broken.send_replace(Some(e.to_string()));
            }
            r
        })
    }
}

/// A counting semaphore over bytes, for producers running on plain threads.
#[derive(Clone)]
pub struct Budget(Arc<(Mutex<u64>, Condvar)>, u64);

/// Bytes taken from a [`Budget`]; given back on drop.
pub struct Permit {
    budget: Budget,
    n: u64,
}

impl Budget {
    pub fn new(bytes: u64) -> Budget {
        Budget(Arc::new((Mutex::new(bytes), Condvar::new())), bytes)
    }

    /// Blocks until `n` bytes are available (a request larger than the whole budget waits for
    /// all of it, so one huge item still makes progress alone).
    pub fn acquire(&self, n: u64) -> Permit {
        let n = n.min(self.1);
        let (lock, cv) = &*self.0;
        let mut free = lock.lock().unwrap_or_else(|p| p.into_inner());
        while *free < n {
            free = cv.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= n;
        Permit {
            budget: self.clone(),
            n,
        }
    }
}

impl Budget {
    /// One permit holding all of `permits` (`None` if there are none).
    pub fn merge(&self, permits: Vec<Permit>) -> Option<Permit> {
        let mut n = 0;
        for mut p in permits {
            n += std::mem::take(&mut p.n);
        }
        (n > 0).then(|| Permit {
            budget: self.clone(),
            n,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let (lock, cv) = &*self.budget.0;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) += self.n;
        cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::FrameReader;
    use std::time::Duration;

    fn entries() -> Msg {
        Msg::Entries {
            first_id: 0,
            entries: Vec::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn list_frames_wait_for_company_but_not_longer_than_lazy_flush() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (out, writer) = spawn_writer(FrameWriter::new(a));
        let mut r = FrameReader::new(b);
        out.send(entries()).unwrap();
        out.send(entries()).unwrap();
        // Nothing is flushed before the deadline...
        let early = tokio::time::timeout(LAZY_FLUSH / 2, r.next()).await;
        assert!(early.is_err(), "a list frame was flushed at once");
        // ...and both frames arrive together once it passes.
        let first = tokio::time::timeout(LAZY_FLUSH, r.next()).await;
        assert!(matches!(first, Ok(Ok(Some((Msg::Entries { .. }, _))))));
        assert!(matches!(r.next().await, Ok(Some((Msg::Entries { .. }, _)))));
        // Any other frame takes the waiting list frames with it at once.
        out.send(entries()).unwrap();
        out.send(Msg::EndOfList {
            count: 3,
            scan_errors: 0,
        })
        .unwrap();
        let t0 = tokio::time::Instant::now();
        assert!(matches!(r.next().await, Ok(Some((Msg::Entries { .. }, _)))));
        assert!(matches!(
            r.next().await,
            Ok(Some((Msg::EndOfList { .. }, _)))
        ));
        assert!(
            t0.elapsed() < Duration::from_micros(100),
            "{:?}",
            t0.elapsed()
        );
        drop(out);
        assert!(writer.await.unwrap().is_ok());
        assert!(matches!(r.next().await, Ok(None)));
    }
}
