//! The wire protocol between client and helper: a magic + version handshake, then
//! length-prefixed frames, each holding one postcard-encoded [`Msg`] and an optional raw payload
//! (file bytes, deltas, signatures travel without re-encoding).
//!
//! Nothing here trusts the peer: frame sizes are checked before allocating, every decoded
//! message is validated, and decoding never panics.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

pub mod compress;
pub mod frame;
pub mod handshake;
mod list;
pub mod msg;

pub use compress::{Compress, LinkMemo, Traffic};
pub use frame::{FrameReader, FrameWriter, MAX_FRAME};
pub use msg::{CopySpec, Event, FileId, Msg, Role, Stamp, Stats, SyncOptions, WholeItem};

/// Bumped on any incompatible change to frames or messages.
pub const PROTOCOL_VERSION: u32 = 9;

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed in the middle of a frame (peer died or the link dropped)")]
    Truncated,
    #[error("peer sent a {len}-byte frame; the limit is {MAX_FRAME}")]
    Oversized { len: u64 },
    #[error("peer sent a malformed frame: {0}")]
    Malformed(String),
    #[error("peer sent an invalid message: {0}")]
    Invalid(String),
    #[error("{0}")]
    Handshake(String),
}
