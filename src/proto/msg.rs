//! Message types and their validation. Every message decoded from a peer passes
//! [`Msg::validate`] before the session sees it; checks that need session state (is this file
//! id one I asked for? is this chunk index inside the file?) live in the session.

use serde::{Deserialize, Serialize};

use super::ProtoError;
use crate::engine::delta::SigParams;
use crate::engine::filter::{FilterOptions, MAX_EXCLUDES, MAX_PATTERN_LEN};
use crate::engine::hash::{Cv, Digest, chunk_count};
use crate::engine::plan::Change;
use crate::engine::{Entry, EntryKind, MODE_MASK, Mtime, RelPath};

/// Index of an entry in the sender's file list (assigned in the order entries are sent).
pub type FileId = u32;

/// Longest text (messages, warnings) accepted from a peer.
pub const MAX_TEXT: usize = 64 << 10;
/// Longest symlink target accepted.
pub const MAX_LINK_TARGET: usize = 4096;
/// Most chunk hashes in one message: a 64 TiB file.
pub const MAX_CHUNKS: u64 = 1 << 24;

/// The mode and mtime a file had while its content was read, for the receiver to apply (the
/// list's may be older: a file can change between the scan and its transfer).
#[cfg_attr(test, derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub mode: u32,
    pub mtime: Mtime,
}

impl Stamp {
    fn validate(&self) -> Result<(), ProtoError> {
        if self.mode & !MODE_MASK != 0 || !self.mtime.is_valid() {
            return Err(invalid(format!("bad mode or mtime {self:?}")));
        }
        Ok(())
    }
}

/// One file in a [`Msg::WholeFiles`] batch.
#[cfg_attr(test, derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WholeItem {
    pub id: FileId,
    pub len: u32,
    pub digest: Digest,
    pub stamp: Stamp,
}

/// Most ids or files in one batch message.
pub const MAX_BATCH: usize = 1 << 16;

/// The part the helper plays; the client plays the other.
#[cfg_attr(test, derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Sender,
    Receiver,
}

/// What the user asked for, shared by both peers.
#[cfg_attr(test, derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncOptions {
    pub delete: bool,
    pub force_delete: bool,
    pub dry_run: bool,
    pub checksum: bool,
    /// Flush each file (and its directory entry) to disk before moving on.
    pub fsync: bool,
    /// `--inplace`: a changed file with an old copy has its changed ranges written into that
    /// file (after the new content is verified) instead of being replaced.
    pub inplace: bool,
    pub filters: FilterOptions,
    /// `devsync cp`: what is sent and where it goes, instead of a tree mirror.
    pub copy: Option<CopySpec>,
    /// How the client wants frames compressed, both ways (`--compress`); `Off`: the client
    /// neither compresses nor accepts compressed frames.
    pub compress: super::Compress,
}

/// What `devsync cp` asks of the two ends. The sender's root is the sources' directory; the
/// receiver's root is the destination as the user wrote it, and the receiver decides from
/// what is there (as cp and scp do): an existing directory receives the sources by name;
/// otherwise the one source is made under the destination's own name.
#[cfg_attr(test, derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopySpec {
    /// Names in the sender's root to send; nothing else of the root is listed, and not its
    /// own attributes.
    pub names: Vec<RelPath>,
    /// Directories among them are sent with everything in them (`-r`); without it a
    /// directory is refused.
    pub recursive: bool,
}

/// Something the user should hear about, produced by either peer and shown by the client.
#[cfg_attr(test, derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    Change(Change),
    Warning {
        path: String,
        message: String,
    },
    Error {
        path: String,
        message: String,
    },
    /// The receiver has planned the whole list: this many files and bytes will travel (a
    /// progress display can show a real bar from here on).
    Planned {
        files: u64,
        bytes: u64,
    },
}

/// Totals of one sync, counted by the receiver and reported to the client.
#[cfg_attr(test, derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Entries in the sender's list, by kind.
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Sum of the sender's file sizes.
    pub total_size: u64,
    /// Items created or whose content changed (files, dirs, symlinks).
    pub created: u64,
    pub updated: u64,
    /// Files whose content was already right but permissions or mtime were not.
    pub metadata_only: u64,
    pub deleted: u64,
    /// Bytes of file content that crossed the wire (whole files plus delta streams).
    pub literal_bytes: u64,
    /// Bytes of rebuilt files that came from the receiver's own copy.
    pub matched_bytes: u64,
    /// Rebuilt files whose BLAKE3 did not match and were re-sent whole.
    pub verify_retries: u64,
    /// Transfers started over because the file changed while it was being sent.
    pub restarts: u64,
    pub errors: u64,
    pub warnings: u64,
    /// `--delete` was refused by the guard (exit status 25).
    pub delete_refused: bool,
    /// Entries moved by a rename (a directory counts once, whatever it holds).
    pub renamed: u64,
}

impl Stats {
    /// Adds another generation's totals to these.
    pub fn add(&mut self, o: &Stats) {
        self.files += o.files;
        self.dirs += o.dirs;
        self.symlinks += o.symlinks;
        self.total_size += o.total_size;
        self.created += o.created;
        self.updated += o.updated;
        self.metadata_only += o.metadata_only;
        self.deleted += o.deleted;
        self.literal_bytes += o.literal_bytes;
        self.matched_bytes += o.matched_bytes;
        self.verify_retries += o.verify_retries;
        self.restarts += o.restarts;
        self.errors += o.errors;
        self.warnings += o.warnings;
        self.delete_refused |= o.delete_refused;
        self.renamed += o.renamed;
    }
}

#[cfg_attr(test, derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// Client → helper, first frame: who does what where.
    Hello {
        version: u32,
        helper_role: Role,
        #[serde(with = "serde_bytes")]
        root: Vec<u8>,
        opts: SyncOptions,
    },
    /// Helper → client: ready. `compress`: the helper compresses what it sends from here on
    /// and takes compressed frames (only if the client asked for it).
    HelloOk { version: u32, compress: bool },
    /// Either way: the session cannot continue; the text says why.
    Fatal { message: String },

    /// Sender → receiver: a generation begins: a batch of changes with its own file ids (from
    /// 0) and totals. A session runs one or more, one at a time; each ends with `Done`.
    /// `whole`: the list is the sender's whole tree (every directory listed before what it
    /// holds); otherwise only what changed, in directories the receiver already has.
    /// `replace_dirs`: a directory where the sender has a file or symlink is replaced.
    GenStart {
        generation: u64,
        whole: bool,
        replace_dirs: bool,
    },
    /// Sender → receiver, before the generation's list: park each entry (`from`) under a
    /// parking name at the root, in order.
    Stash { moves: Vec<(RelPath, RelPath)> },
    /// Sender → receiver, after `Stash`: put each parked entry at `to`, in order (making
    /// missing parents, replacing what is there).
    Place { moves: Vec<(RelPath, RelPath)> },
    /// Sender → receiver, before the list: the list is the truth at these paths. Once the
    /// generation's files are in place, whatever else the receiver has there (and does not
    /// exclude) is removed. `root`: the whole tree (`--delete`, guarded against mass deletion).
    Scope { root: bool, paths: Vec<RelPath> },
    /// Sender → receiver: list entries with consecutive ids from `first_id`. Batches arrive in
    /// id order (each `first_id` is the number of entries sent before it in this generation).
    /// `changed`: the sender saw these change; compare a file's content even if its size and
    /// mtime match ours.
    Entries {
        first_id: FileId,
        #[serde(with = "super::list")]
        entries: Vec<Entry>,
        changed: bool,
    },
    /// Sender → receiver: the list is complete. With scan errors, the receiver must not delete.
    /// `root`: the sender's root directory's own mode and mtime, mirrored at the end.
    EndOfList {
        count: u32,
        scan_errors: u32,
        root: Option<Stamp>,
    },

    /// Receiver → sender: send these files whole.
    NeedWhole { ids: Vec<FileId> },
    /// Receiver → sender: my copy is small; here is its full signature (payload) and chunk hashes.
    Signature {
        id: FileId,
        base_len: u64,
        params: SigParams,
        cvs: Vec<Cv>,
    },
    /// Receiver → sender: my copy is big (signed with `params`); send your chunk hashes.
    NeedDelta {
        id: FileId,
        base_len: u64,
        params: SigParams,
    },
    /// Sender → receiver: the chaining value of every chunk of the new file, and the
    /// attributes of the version hashed.
    NewHashes {
        id: FileId,
        len: u64,
        cvs: Vec<Cv>,
        stamp: Stamp,
    },
    /// Receiver → sender: block signature of one base chunk (payload).
    SigPart { id: FileId, chunk: u32 },
    /// Receiver → sender (after the signature parts it needs): send deltas for these new
    /// chunks, against the whole base (`full`) or each chunk's neighbourhood; then `FileEnd`.
    DeltaRequest {
        id: FileId,
        chunks: Vec<u32>,
        full: bool,
    },
    /// Receiver → sender (after `NewHashes`, when it has no base to diff against but holds the
    /// other chunks already, as when resuming a partial transfer): send these chunks as
    /// literal `Data`, then `FileEnd`.
    NeedChunks { id: FileId, chunks: Vec<u32> },

    /// Sender → receiver: complete files of at most one chunk each; the payload is their
    /// contents one after the other, in `files` order.
    WholeFiles { files: Vec<WholeItem> },
    /// Sender → receiver: literal bytes of one chunk (payload) of a bigger file.
    Data { id: FileId, chunk: u32 },
    /// Sender → receiver, before any chunk of the file: it has holes. Do not reserve its
    /// space; `Zeros` chunks and zero blocks are to be left as holes.
    Sparse { id: FileId },
    /// Sender → receiver: chunk `chunk` (`len` bytes) is a hole in the sender's file (all
    /// zeros, nothing to send).
    Zeros { id: FileId, chunk: u32, len: u32 },
    /// Sender → receiver: a delta (payload) against a window of base chunks that rebuilds
    /// chunk `chunk`, exactly `len` bytes.
    Delta {
        id: FileId,
        chunk: u32,
        window_start: u32,
        window_len: u32,
        len: u32,
    },
    /// Sender → receiver: this chunk equals the base chunk at the same offset.
    Copy { id: FileId, chunk: u32 },
    /// Sender → receiver: all chunks of the file were sent; its length and BLAKE3.
    FileEnd {
        id: FileId,
        len: u64,
        digest: Digest,
        stamp: Stamp,
    },
    /// Sender → receiver: the receiver's copy already has this content.
    Identical { id: FileId, stamp: Stamp },
    /// Sender → receiver: the file changed while it was being sent; forget what was sent of it
    /// and ask for it again.
    Restart { id: FileId },
    /// Sender → receiver: this file could not be read. `transient`: it vanished or changed
    /// while being read (a warning; the next sync picks it up).
    SendFailed {
        id: FileId,
        message: String,
        transient: bool,
    },

    /// Helper → client: something to show the user.
    Event(Event),
    /// Receiver → sender: the generation is applied; its totals, and the paths where our tree
    /// was not what the sender expected (a rename's source missing, a parent gone), which
    /// the sender should send again in full (`overflow`: more than could be listed).
    Done {
        stats: Stats,
        unsynced: Vec<RelPath>,
        overflow: bool,
    },
    /// Sender → receiver, after `Done`: the session is over.
    Bye,
    /// Either way, when nothing else was sent for a while: the peer is alive.
    Ping,
}

fn invalid(what: impl Into<String>) -> ProtoError {
    ProtoError::Invalid(what.into())
}

fn check_text(s: &str) -> Result<(), ProtoError> {
    if s.len() > MAX_TEXT {
        return Err(invalid(format!("{} bytes of text", s.len())));
    }
    Ok(())
}

/// Refuses a list of file ids naming one file twice.
fn check_unique(ids: impl Iterator<Item = FileId>, what: &str) -> Result<(), ProtoError> {
    let mut seen = std::collections::HashSet::new();
    for id in ids {
        if !seen.insert(id) {
            return Err(invalid(format!("{what} names file {id} twice")));
        }
    }
    Ok(())
}

fn check_cvs(base_len: u64, params: &SigParams, cvs: &[Cv]) -> Result<(), ProtoError> {
    params.validate().map_err(|e| invalid(e.to_string()))?;
    let n = chunk_count(base_len);
    if n > MAX_CHUNKS || cvs.len() as u64 != n {
        return Err(invalid(format!(
            "{} chunk hashes for a {base_len}-byte file",
            cvs.len()
        )));
    }
    Ok(())
}

pub fn check_entry(e: &Entry) -> Result<(), ProtoError> {
    e.path.check().map_err(|err| invalid(err.to_string()))?;
    if e.mode & !MODE_MASK != 0 {
        return Err(invalid(format!("{}: mode {:o}", e.path, e.mode)));
    }
    if !e.mtime.is_valid() {
        return Err(invalid(format!(
            "{}: mtime nanoseconds out of range",
            e.path
        )));
    }
    if let EntryKind::Symlink { target } = &e.kind
        && (target.is_empty() || target.len() > MAX_LINK_TARGET || target.contains(&0))
    {
        return Err(invalid(format!("{}: bad symlink target", e.path)));
    }
    Ok(())
}

impl Msg {
    /// Checks everything that can be checked without session state. `payload` is the length
    /// of the raw bytes that came with the message.
    pub fn validate(&self, payload: usize) -> Result<(), ProtoError> {
        let takes_payload = matches!(
            self,
            Msg::Signature { .. }
                | Msg::SigPart { .. }
                | Msg::WholeFiles { .. }
                | Msg::Data { .. }
                | Msg::Delta { .. }
        );
        if payload > 0 && !takes_payload {
            return Err(invalid("unexpected payload"));
        }
        match self {
            Msg::Hello { root, opts, .. } => {
                if root.is_empty()
                    || root.len() > crate::engine::relpath::MAX_PATH_LEN
                    || root.contains(&0)
                {
                    return Err(invalid("bad root path"));
                }
                opts.compress.validate()?;
                let f = &opts.filters;
                if f.excludes.len() > MAX_EXCLUDES
                    || f.excludes
                        .iter()
                        .any(|p| p.is_empty() || p.len() > MAX_PATTERN_LEN)
                {
                    return Err(invalid("bad exclude patterns"));
                }
                if let Some(c) = &opts.copy {
                    if c.names.len() > MAX_BATCH || c.names.is_empty() {
                        return Err(invalid("bad copy request"));
                    }
                    for n in &c.names {
                        n.check().map_err(|e| invalid(e.to_string()))?;
                        if n.depth() != 0 {
                            return Err(invalid(format!("{n}: not a name")));
                        }
                    }
                }
            }
            Msg::Fatal { message } => check_text(message)?,
            Msg::Stash { moves } | Msg::Place { moves } => {
                if moves.len() > MAX_BATCH {
                    return Err(invalid("too many renames in one message"));
                }
                let stash = matches!(self, Msg::Stash { .. });
                for (from, to) in moves {
                    from.check().map_err(|e| invalid(e.to_string()))?;
                    to.check().map_err(|e| invalid(e.to_string()))?;
                    let park = if stash { to } else { from };
                    if park.depth() != 0
                        || crate::engine::tempname::ours(park.as_bytes())
                            != Some(crate::engine::tempname::Ours::Move)
                    {
                        return Err(invalid(format!("{park}: not a parking name")));
                    }
                }
            }
            Msg::Scope { paths, .. }
            | Msg::Done {
                unsynced: paths, ..
            } => {
                if paths.len() > MAX_BATCH {
                    return Err(invalid("too many paths in one message"));
                }
                for p in paths {
                    p.check().map_err(|e| invalid(e.to_string()))?;
                }
            }
            Msg::Entries { entries, .. } => {
                if entries.len() > MAX_BATCH {
                    return Err(invalid("too many entries in one message"));
                }
                for e in entries {
                    check_entry(e)?;
                }
            }
            Msg::NeedWhole { ids } => {
                if ids.len() > MAX_BATCH {
                    return Err(invalid("too many ids in one request"));
                }
                check_unique(ids.iter().copied(), "whole-file request")?;
            }
            Msg::WholeFiles { files } => {
                let total: u64 = files.iter().map(|f| u64::from(f.len)).sum();
                if files.len() > MAX_BATCH
                    || total != payload as u64
                    || files
                        .iter()
                        .any(|f| u64::from(f.len) > crate::engine::hash::CHUNK)
                {
                    return Err(invalid("whole-file batch lengths do not match its payload"));
                }
                check_unique(files.iter().map(|f| f.id), "whole-file batch")?;
                for f in files {
                    f.stamp.validate()?;
                }
            }
            Msg::FileEnd { stamp, .. } | Msg::Identical { stamp, .. } => stamp.validate()?,
            Msg::EndOfList {
                root: Some(stamp), ..
            } => stamp.validate()?,
            Msg::Signature {
                base_len,
                params,
                cvs,
                ..
            } => check_cvs(*base_len, params, cvs)?,
            Msg::NeedDelta { params, .. } => {
                params.validate().map_err(|e| invalid(e.to_string()))?
            }
            Msg::NewHashes {
                len, cvs, stamp, ..
            } => {
                stamp.validate()?;
                let n = chunk_count(*len);
                if n > MAX_CHUNKS || cvs.len() as u64 != n {
                    return Err(invalid(format!(
                        "{} chunk hashes for a {len}-byte file",
                        cvs.len()
                    )));
                }
            }
            Msg::DeltaRequest { chunks, .. } | Msg::NeedChunks { chunks, .. }
                if chunks.len() as u64 > MAX_CHUNKS
                    || chunks.windows(2).any(|w| w.first() >= w.get(1)) =>
            {
                return Err(invalid("requested chunks not strictly increasing"));
            }
            Msg::Delta {
                window_len, len, ..
            } if *window_len == 0 || u64::from(*len) > crate::engine::hash::CHUNK => {
                return Err(invalid("delta window or length out of range"));
            }
            Msg::Zeros { len, .. } if *len == 0 || u64::from(*len) > crate::engine::hash::CHUNK => {
                return Err(invalid("hole length out of range"));
            }
            Msg::SendFailed { message, .. } => check_text(message)?,
            Msg::Event(ev) => match ev {
                Event::Change(c) => c.path.check().map_err(|e| invalid(e.to_string()))?,
                Event::Warning { path, message } | Event::Error { path, message } => {
                    check_text(path)?;
                    check_text(message)?;
                }
                Event::Planned { .. } => {}
            },
            _ => {}
        }
        Ok(())
    }
}
