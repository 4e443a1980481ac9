//! The outbound half of a connection: a queue drained by one writer task, and the byte budget
//! that bounds how much file data a sender may have queued.
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

type Item = (Msg, Bytes, Option<Permit>);

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
        self.tx.send((msg, Bytes::new(), None)).map_err(|_| Closed)
    }

    pub fn send_data(
        &self,
        msg: Msg,
        payload: Bytes,
        permit: Option<Permit>,
    ) -> Result<(), Closed> {
        self.tx.send((msg, payload, permit)).map_err(|_| Closed)
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
                while let Some((msg, payload, permit)) = rx.recv().await {
                    w.write(&msg, &payload).await?;
                    drop(permit);
                    // Batch whatever is already queued into the same flush.
                    while let Ok((msg, payload, permit)) = rx.try_recv() {
                        w.write(&msg, &payload).await?;
                        drop(permit);
                    }
                    w.flush().await?;
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
