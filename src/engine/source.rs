//! Reading a source file so that what is sent is one version of it that really existed.
//!
//! A file can be rewritten while it is read (an editor saving, a build writing its output, a
//! log growing): bytes read before and after the change then make a file that never existed,
//! and its BLAKE3 digest, taken of what was read, cannot tell. So every read is bracketed by
//! `fstat`s of the open file: if the inode, size, mtime or ctime moved, the read is not
//! trusted. ctime cannot be set by user programs, so a writer that restores the mtime is still
//! seen. Kernels from 6.13 hand out fine-grained timestamps on ext4, xfs, btrfs and tmpfs once a
//! timestamp has been looked at, so any write after our first `fstat` changes ctime; elsewhere a
//! write in the same clock tick as the file's previous change could leave ctime as it was, so a
//! file changed within [`RACY_WINDOW`] before we looked is read again once the window has passed
//! (git's "racily clean" problem, solved the same way).
//!
//! This module reads and decides; retrying and reporting is the sender's job.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use rustix::fs::{self as rfs, OFlags};

use super::{MODE_MASK, Mtime};

/// How recent a change must be for a coarse-timestamp filesystem to possibly hide the next one.
pub const RACY_WINDOW: Duration = Duration::from_millis(25);

/// What identifies one version of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mode: u32,
    pub mtime: Mtime,
    pub ctime: Mtime,
    /// 512-byte blocks allocated.
    pub blocks: u64,
}

impl Snapshot {
    /// Whether `self` and `other` describe the same version of the same file (the blocks
    /// allocated may change on their own, as delayed allocation completes).
    pub fn same_version(&self, other: &Snapshot) -> bool {
        let key = |s: &Snapshot| (s.dev, s.ino, s.size, s.mode, s.mtime, s.ctime);
        key(self) == key(other)
    }
}

/// The outcome of a bracketed read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stability {
    /// Nothing changed: what was read is the version `Snapshot` describes.
    Stable,
    /// The file changed while it was read.
    Changed,
    /// Nothing visibly changed, but the file had changed so recently before the read that a
    /// change during it might not show; read it again after [`RACY_WINDOW`].
    Racy,
}

fn snapshot_of(st: &rfs::Stat) -> Snapshot {
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Snapshot {
        dev: st.st_dev as u64,
        ino: st.st_ino as u64,
        size: st.st_size as u64,
        mode: st.st_mode & MODE_MASK,
        mtime: Mtime::of_stat(st),
        ctime: Mtime {
            sec: st.st_ctime as i64,
            nsec: (st.st_ctime_nsec as u32).min(999_999_999),
        },
        blocks: st.st_blocks as u64,
    }
}

/// An open source file and how it looked when opened.
pub struct Source {
    pub file: File,
    pub before: Snapshot,
    /// Wall-clock time of the first `fstat`, for the racy check.
    seen_at: Mtime,
}

fn now() -> Mtime {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Realtime);
    Mtime {
        sec: t.tv_sec,
        nsec: t.tv_nsec as u32,
    }
}

fn nanos(t: Mtime) -> i128 {
    i128::from(t.sec) * 1_000_000_000 + i128::from(t.nsec)
}

impl Source {
    /// Opens `path` without following a symlink there.
    pub fn open(path: &Path) -> io::Result<Source> {
        let file = File::options()
            .read(true)
            .custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32)
            .open(path)?;
        let seen_at = now();
        let before = snapshot_of(&rfs::fstat(&file)?);
        Ok(Source {
            file,
            before,
            seen_at,
        })
    }

    pub fn len(&self) -> u64 {
        self.before.size
    }

    pub fn is_empty(&self) -> bool {
        self.before.size == 0
    }

    /// The file's state now, compared with when it was opened.
    pub fn check(&self) -> io::Result<Stability> {
        let after = snapshot_of(&rfs::fstat(&self.file)?);
        if !after.same_version(&self.before) {
            return Ok(Stability::Changed);
        }
        if fine_grained_ctime(&self.file) {
            return Ok(Stability::Stable);
        }
        let since_change = nanos(self.seen_at) - nanos(self.before.ctime);
        if since_change < RACY_WINDOW.as_nanos() as i128 {
            Ok(Stability::Racy)
        } else {
            Ok(Stability::Stable)
        }
    }

    /// Whether the file has holes (fewer blocks allocated than its size needs).
    pub fn is_sparse(&self) -> bool {
        self.before.blocks.saturating_mul(512) < self.before.size
    }

    /// Whether `[off, off + len)` holds no data (a hole: it reads as zeros and need not be
    /// read). Only ever `true` for a sparse file; an error answers `false`.
    pub fn is_hole(&self, off: u64, len: u64) -> bool {
        if len == 0 || !self.is_sparse() {
            return false;
        }
        match rfs::seek(&self.file, rfs::SeekFrom::Data(off)) {
            Ok(next) => next >= off + len,
            // No data after `off` at all.
            Err(rustix::io::Errno::NXIO) => true,
            Err(_) => false,
        }
    }

    /// Whether the file still is the version `snap` describes (a later read of a file first
    /// read earlier, as the two halves of a big file's delta are).
    pub fn same_as(&self, snap: &Snapshot) -> bool {
        self.before.same_version(snap)
    }
}

/// Waits until a file last changed at `ctime` is past [`RACY_WINDOW`].
pub fn wait_out_racy(before: &Snapshot) {
    let until = nanos(before.ctime) + RACY_WINDOW.as_nanos() as i128;
    let left = until - nanos(now());
    if left > 0 {
        std::thread::sleep(Duration::from_nanos(left as u64));
    }
}

/// Whether a change to the file always gets a ctime distinct from the one we looked at:
/// multigrain timestamps (Linux 6.13 and later) on the filesystems that have them.
fn fine_grained_ctime(f: &impl AsFd) -> bool {
    static KERNEL: OnceLock<bool> = OnceLock::new();
    let new_kernel = *KERNEL.get_or_init(|| {
        let uname = rustix::system::uname();
        let release = uname.release().to_string_lossy().into_owned();
        let mut it = release
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse::<u32>().ok());
        let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
        (major, minor) >= (6, 13)
    });
    if !new_kernel {
        return false;
    }
    static BY_TYPE: Mutex<Option<std::collections::HashMap<i64, bool>>> = Mutex::new(None);
    let Ok(fs) = rfs::fstatfs(f) else {
        return false;
    };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let ty = fs.f_type as i64;
    let mut cache = BY_TYPE.lock().unwrap_or_else(|p| p.into_inner());
    *cache.get_or_insert_with(Default::default).entry(ty).or_insert(matches!(
        ty,
        0xEF53 /* ext2/3/4 */ | 0x5846_5342 /* xfs */ | 0x9123_683E /* btrfs */ | 0x0102_1994 /* tmpfs */
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_write_between_the_two_looks_is_seen() {
        let td = tempfile::tempdir().unwrap();
        let p = td.path().join("f");
        std::fs::write(&p, b"one").unwrap();
        std::thread::sleep(RACY_WINDOW * 2);
        let s = Source::open(&p).unwrap();
        assert_eq!(s.check().unwrap(), Stability::Stable);
        // Same size, and the mtime put back: ctime still moves.
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .write_all(b"two")
            .unwrap();
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(s.check().unwrap(), Stability::Changed);
        // Replaced by another file under the same name: the open file is what is read, and
        // it did not change; a fresh open sees the new inode.
        let s = Source::open(&p).unwrap();
        let tmp = td.path().join("g");
        std::fs::write(&tmp, b"three").unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        assert!(!Source::open(&p).unwrap().same_as(&s.before));
    }

    #[test]
    fn a_file_changed_just_before_it_is_read_is_racy_on_coarse_clocks() {
        let td = tempfile::tempdir().unwrap();
        let p = td.path().join("f");
        std::fs::write(&p, b"fresh").unwrap();
        let s = Source::open(&p).unwrap();
        let st = s.check().unwrap();
        if fine_grained_ctime(&s.file) {
            assert_eq!(st, Stability::Stable);
        } else {
            assert_eq!(st, Stability::Racy);
            wait_out_racy(&s.before);
            let again = Source::open(&p).unwrap();
            assert_eq!(again.check().unwrap(), Stability::Stable);
        }
    }
}
