//! The sync engine: scan → plan → signature → delta → apply, on local files only.
//!
//! Synchronous and transport-free: no tokio, no sockets. The session layer moves the values
//! defined here between peers; everything here can be tested with a temp dir and byte slices.

pub mod delta;
pub mod dest;
pub mod filter;
pub mod hash;
pub mod index;
pub mod plan;
pub mod relpath;
pub mod scan;
pub mod source;
pub mod tempname;

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;

use serde::{Deserialize, Serialize};

pub use relpath::{PathError, RelPath};

/// Permission bits we preserve (rwx for user/group/other plus setuid, setgid, sticky).
pub const MODE_MASK: u32 = 0o7777;

/// A modification time with nanoseconds, as `stat` reports it.
#[cfg_attr(test, derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Mtime {
    pub sec: i64,
    pub nsec: u32,
}

impl Mtime {
    pub fn of(md: &Metadata) -> Mtime {
        Mtime {
            sec: md.mtime(),
            nsec: md.mtime_nsec().clamp(0, 999_999_999) as u32,
        }
    }

    /// The modification time in a `stat` result from rustix.
    pub fn of_stat(st: &rustix::fs::Stat) -> Mtime {
        Mtime {
            #[allow(clippy::unnecessary_cast)] // i64 on x86_64, not on every target
            sec: st.st_mtime as i64,
            nsec: (st.st_mtime_nsec as u32).min(999_999_999),
        }
    }

    pub fn is_valid(&self) -> bool {
        self.nsec < 1_000_000_000
    }

    /// The wall clock now, as a file time (to compare with ctimes and mtimes).
    pub fn now() -> Mtime {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Realtime);
        Mtime {
            sec: t.tv_sec,
            nsec: t.tv_nsec as u32,
        }
    }
}

/// What a sender entry is.
#[cfg_attr(test, derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file; `digest` (BLAKE3 of the content) is only filled in `--checksum` mode.
    File {
        size: u64,
        digest: Option<hash::Digest>,
    },
    Dir,
    /// A symbolic link, stored as its raw target (never followed).
    Symlink {
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
}

/// One item of a sender's file list.
#[cfg_attr(test, derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: RelPath,
    pub kind: EntryKind,
    pub mode: u32,
    pub mtime: Mtime,
}

impl Entry {
    pub fn size(&self) -> u64 {
        match self.kind {
            EntryKind::File { size, .. } => size,
            _ => 0,
        }
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.kind, EntryKind::Dir)
    }
}

/// What is at a path on the receiving side (from `lstat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalKind {
    File,
    Dir,
    Symlink,
    /// fifo, socket or device: never synced, replaced when the sender has something there.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalMeta {
    pub kind: LocalKind,
    pub size: u64,
    pub mode: u32,
    pub mtime: Mtime,
}

impl LocalMeta {
    pub fn from_metadata(md: &Metadata) -> LocalMeta {
        let ft = md.file_type();
        let kind = if ft.is_file() {
            LocalKind::File
        } else if ft.is_dir() {
            LocalKind::Dir
        } else if ft.is_symlink() {
            LocalKind::Symlink
        } else {
            LocalKind::Other
        };
        LocalMeta {
            kind,
            size: md.len(),
            mode: md.mode() & MODE_MASK,
            mtime: Mtime::of(md),
        }
    }
}

/// Names the kind of a special file for warnings.
pub fn special_kind_name(ft: rustix::fs::FileType) -> &'static str {
    use rustix::fs::FileType;
    match ft {
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
        FileType::BlockDevice => "block device",
        FileType::CharacterDevice => "character device",
        _ => "special file",
    }
}
