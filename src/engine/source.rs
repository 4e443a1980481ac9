//! Reading a source file so that what is sent is one version of it that really existed.
//!
//! A file can be rewritten while it is read (an editor saving, a build writing its output, a
//! log growing): bytes read before and after the change then make a file that never existed,
//! and its BLAKE3 digest, taken of what was read, cannot tell. So every read is bracketed by
//! `fstat`s of the open file: if the inode, size, mtime or ctime moved, the read is not
//! trusted. ctime cannot be set by user programs, so a writer that restores the mtime is still
//! seen. Two gaps remain, both for a file changed just before we looked: on kernels before 6.13
//! (and filesystems without their multigrain timestamps) a write in the same clock tick as the
//! previous change leaves ctime as it was, and anywhere a single `write()` already under way
//! at our first look has set ctime once, at its start, and goes on changing the data unseen.
//! So a file whose ctime is within [`RACY_WINDOW`] of our first look is read only once the
//! window has passed (git's "racily clean" problem, solved the same way) — unless neither gap
//! can be open: the filesystem stamps every change after our `fstat` apart from the one we saw
//! (multigrain), and no process has the file open for writing (the kernel grants a read lease
//! only then, and a write under way holds its file open). Then a change as recent as a
//! microsecond ago needs no wait, which is what keeps a watch's latency in milliseconds. The
//! window itself is a bound, not a proof: a writer that keeps the file open and has one
//! `write()` take longer than 25 ms (throttled on dirty pages, preempted) can still tear a
//! read; kernels and filesystems without multigrain timestamps pay the 25 ms on every file
//! changed just before it is read.
//!
//! This module reads and decides; retrying and reporting is the sender's job.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
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
    /// How recent a change makes this read suspect: [`RACY_WINDOW`], or none when
    /// [`changes_all_show`] said so at the first look.
    racy: Duration,
}

/// Opens the regular file `path` for reading (not following a symlink there) and looks at
/// it: the file, when it was looked at, and what was seen. Something else by now at that
/// path is an error.
fn open_regular(path: &Path) -> io::Result<(File, Mtime, rfs::Stat)> {
    let file = File::options()
        .read(true)
        .custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32)
        .open(path)?;
    let seen_at = Mtime::now();
    let st = rfs::fstat(&file)?;
    if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no longer a regular file",
        ));
    }
    Ok((file, seen_at, st))
}

fn nanos(t: Mtime) -> i128 {
    i128::from(t.sec) * 1_000_000_000 + i128::from(t.nsec)
}

impl Source {
    /// Opens the regular file `path` (not following a symlink there). Something else by now
    /// at that path is an error. A file changed within [`RACY_WINDOW`] is waited on first,
    /// unless [`changes_all_show`].
    pub fn open(path: &Path) -> io::Result<Source> {
        let (file, mut seen_at, mut st) = open_regular(path)?;
        let mut racy = RACY_WINDOW;
        // Changed just now: wait out the window before reading rather than read it twice
        // (a few times at most; `check` still catches a file that keeps changing).
        for _ in 0..3 {
            let snap = snapshot_of(&st);
            if nanos(seen_at) - nanos(snap.ctime) >= racy.as_nanos() as i128 {
                break;
            }
            // Asked after the `fstat` whose ctime is kept: a write under way then still
            // holds the file open now.
            if changes_all_show(&file) {
                racy = Duration::ZERO;
                break;
            }
            wait_out_racy(&snap);
            seen_at = Mtime::now();
            st = rfs::fstat(&file)?;
        }
        Ok(Source {
            file,
            before: snapshot_of(&st),
            seen_at,
            racy,
        })
    }

    /// Opens `path` as [`Source::open`] does, but a file changed within [`RACY_WINDOW`] is
    /// `None` instead of waited on or probed ([`changes_all_show`] takes a lease and a shared
    /// lock): for readers that would rather skip a file than make anyone wait.
    pub fn open_settled(path: &Path) -> io::Result<Option<Source>> {
        let (file, seen_at, st) = open_regular(path)?;
        let before = snapshot_of(&st);
        if nanos(seen_at) - nanos(before.ctime) < RACY_WINDOW.as_nanos() as i128 {
            return Ok(None);
        }
        Ok(Some(Source {
            file,
            before,
            seen_at,
            racy: RACY_WINDOW,
        }))
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
        let since_change = nanos(self.seen_at) - nanos(self.before.ctime);
        if since_change < self.racy.as_nanos() as i128 {
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

/// Waits until a file last changed at `ctime` is past [`RACY_WINDOW`] (at most that long:
/// a ctime in the future, from a clock stepped back or a server's clock ahead, is no reason
/// to wait more).
pub fn wait_out_racy(before: &Snapshot) {
    let until = nanos(before.ctime) + RACY_WINDOW.as_nanos() as i128;
    let left = (until - nanos(Mtime::now())).clamp(0, RACY_WINDOW.as_nanos() as i128);
    if left > 0 {
        std::thread::sleep(Duration::from_nanos(left as u64));
    }
}

/// Whether any change another process makes to `file` from now on moves its ctime away from
/// what our last `fstat` saw: nobody has it open for writing, and its filesystem has
/// multigrain timestamps. `false` whenever either cannot be told.
pub fn changes_all_show(file: &File) -> bool {
    fine_timestamps(file) && open_for_write(file) == Some(false)
}

/// Multigrain timestamps (Linux 6.13): once a timestamp was read, the next change gets a
/// fine-grained one, so a change in the same clock tick as the last still moves ctime. Only
/// the filesystem types converted with the feature; the mount's type is what counts (ext2
/// and ext3 mounts share ext4's superblock magic and driver, not its multigrain flag).
fn fine_timestamps(file: &File) -> bool {
    static KERNEL_HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let kernel = *KERNEL_HAS.get_or_init(|| {
        let uname = rustix::system::uname();
        let release = uname.release().to_string_lossy();
        let mut nums = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse::<u32>().unwrap_or(0));
        let (major, minor) = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
        (major, minor) >= (6, 13)
    });
    kernel
        && mount_type(file)
            .is_some_and(|t| matches!(t.as_str(), "ext4" | "xfs" | "btrfs" | "tmpfs"))
}

/// The filesystem type of the mount `file` is on, from `/proc/self/mountinfo` (read again
/// only for a mount not seen before).
fn mount_type(file: &File) -> Option<String> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static TYPES: Mutex<Option<HashMap<u64, String>>> = Mutex::new(None);
    let stx = rfs::statx(file, "", rfs::AtFlags::EMPTY_PATH, rfs::StatxFlags::MNT_ID).ok()?;
    if stx.stx_mask & rfs::StatxFlags::MNT_ID.bits() == 0 {
        return None; // before Linux 5.8
    }
    let mut types = TYPES.lock().unwrap_or_else(|p| p.into_inner());
    let types = types.get_or_insert_with(HashMap::new);
    if let Some(t) = types.get(&stx.stx_mnt_id) {
        return Some(t.clone());
    }
    // "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    for line in info.lines() {
        let id = line.split(' ').next().and_then(|id| id.parse::<u64>().ok());
        let fstype = line
            .split_once(" - ")
            .and_then(|(_, rest)| rest.split(' ').next());
        if let (Some(id), Some(fstype)) = (id, fstype) {
            types.insert(id, fstype.to_string());
        }
    }
    types.get(&stx.stx_mnt_id).cloned()
}

/// Whether a process has the file open for writing (a write under way, a writable mapping, an
/// editor holding it), as the kernel counts it: it grants a read lease only when none has.
/// The lease is let go at once; a writer opening the file in those microseconds waits for
/// that (one opening with `O_NONBLOCK` is told to retry; were this process stopped between
/// the two calls, writers would wait up to the kernel's lease-break time, 45 s). `None`: no
/// answer (leases off, a file we neither own nor have `CAP_LEASE` for, a filesystem without
/// leases).
fn open_for_write(file: &File) -> Option<bool> {
    /// `<linux/fcntl.h>`'s, which the libc crate does not define.
    const F_SETSIG: libc::c_int = 10;
    let fd = file.as_raw_fd();
    // SAFETY: `fcntl` with integer arguments on a descriptor `file` keeps open.
    unsafe {
        // A broken lease signals its holder, SIGIO by default, whose default is to end the
        // process; SIGURG's default is to ignore it.
        if libc::fcntl(fd, F_SETSIG, libc::SIGURG) != 0 {
            return None;
        }
        if libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) == 0 {
            // Not let go (it cannot fail on a lease we hold): writers then wait for our
            // `close`, and the answer is not trusted.
            return (libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) == 0).then_some(false);
        }
    }
    (io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN)).then_some(true)
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
        // Something other than a regular file by now is refused, not read.
        std::fs::remove_file(&p).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &p,
            rfs::FileType::Fifo,
            rfs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        assert!(Source::open(&p).is_err());
    }

    #[test]
    fn a_file_changed_just_before_it_is_read_waits_only_while_a_change_could_hide() {
        let td = tempfile::tempdir().unwrap();
        let p = td.path().join("f");
        let fine = {
            std::fs::write(&p, b"").unwrap();
            fine_timestamps(&File::open(&p).unwrap())
        };
        std::fs::write(&p, b"fresh").unwrap();
        let written = std::time::Instant::now();
        // Nobody has it open for writing: with multigrain timestamps (this kernel and
        // filesystem permitting) it is read at once, otherwise after the window.
        let s = Source::open(&p).unwrap();
        if written.elapsed() < RACY_WINDOW {
            assert_eq!(s.racy, if fine { Duration::ZERO } else { RACY_WINDOW });
        }
        assert_eq!(s.check().unwrap(), Stability::Stable);
        // A file that changes again right after we looked is caught either way.
        std::fs::write(&p, b"fresh again").unwrap();
        assert_eq!(s.check().unwrap(), Stability::Changed);
        // A writer holding it open may be in the middle of a write: the window is waited out.
        let mut w = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        w.write_all(b"fresher").unwrap();
        assert!(!changes_all_show(&File::open(&p).unwrap()));
        let s = Source::open(&p).unwrap();
        assert_eq!(s.racy, RACY_WINDOW);
        assert_eq!(s.check().unwrap(), Stability::Stable);
        drop(w);
        assert_eq!(changes_all_show(&File::open(&p).unwrap()), fine);
        // A ctime in the future is waited out for no longer than the window.
        let future = Snapshot {
            ctime: Mtime {
                sec: Mtime::now().sec + 3600,
                nsec: 0,
            },
            ..s.before
        };
        let t0 = std::time::Instant::now();
        wait_out_racy(&future);
        assert!(t0.elapsed() < RACY_WINDOW * 2, "{:?}", t0.elapsed());
    }

    #[test]
    fn a_quiet_open_skips_a_file_changed_just_now_and_opens_it_later() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let written = std::time::Instant::now();
        std::fs::write(&p, b"data").unwrap();
        let quiet = Source::open_settled(&p).unwrap();
        // (On a machine so loaded that the open came a window after the write, it may open.)
        if written.elapsed() < RACY_WINDOW - Duration::from_millis(5) {
            assert!(quiet.is_none());
        }
        std::thread::sleep(RACY_WINDOW + Duration::from_millis(5));
        let src = Source::open_settled(&p).unwrap().expect("settled by now");
        assert_eq!(src.len(), 4);
        assert!(matches!(src.check().unwrap(), Stability::Stable));
        std::os::unix::fs::symlink(&p, dir.path().join("link")).unwrap();
        assert!(Source::open_settled(&dir.path().join("link")).is_err());
    }

    #[test]
    fn the_mount_type_is_read_from_mountinfo() {
        let td = tempfile::tempdir().unwrap();
        let f = File::create(td.path().join("f")).unwrap();
        let t = mount_type(&f).expect("a mount type");
        assert!(!t.is_empty() && !t.contains(' '), "{t:?}");
        assert_eq!(mount_type(&f), Some(t), "the same from the cache");
    }

    #[test]
    fn asking_for_writers_never_fails_a_blocking_writer_nor_signals_us_to_death() {
        // The read lease is held for microseconds; writers opening the file meanwhile wait
        // for it to go, and the lease break's signal is one that is ignored.
        let td = tempfile::tempdir().unwrap();
        let p = td.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let leases = open_for_write(&File::open(&p).unwrap()).is_some();
        let writer = {
            let p = p.clone();
            std::thread::spawn(move || {
                for i in 0..2000u32 {
                    let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
                    f.write_all(&i.to_le_bytes()).unwrap();
                }
            })
        };
        let f = File::open(&p).unwrap();
        let mut answers = 0;
        while !writer.is_finished() && answers < 100_000 {
            let _ = open_for_write(&f);
            answers += 1;
        }
        writer.join().unwrap();
        if leases {
            assert_eq!(open_for_write(&f), Some(false));
        }
    }
}
