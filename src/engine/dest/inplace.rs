//! `--inplace`: a file's changed ranges are written into its own inode instead of a new file
//! replacing it, so an update costs the change, not the file, where the filesystem has no
//! reflinks. The ranges come from a staged file that the session has already verified in
//! full; what this module writes is only copying, in offset order, then the final length and
//! attributes.
//!
//! It must not be used for anything that was not verified first: between the first write and
//! the last, readers of the file see a mix of old and new (as with `rsync --inplace`), and a
//! failure in between leaves it so until the next sync repairs it.

use std::fs::File;
use std::os::unix::fs::FileExt;

use rustix::fs::{self as rfs, FileType, OFlags};
use rustix::io::Errno;

use super::{Dest, DestError, Result, TempFile, set_fd_meta};
use crate::engine::{Mtime, RelPath};

/// Bytes copied per read/write (the ranges are the changed chunks, a few MiB each).
const COPY_BUF: usize = 1 << 20;

impl Dest {
    /// Opens the existing regular file at `path` for reading and writing in place, without
    /// following a symlink there. Fails (and the caller replaces the file as usual) where the
    /// file is not writable by us.
    pub fn open_for_update(&self, path: &RelPath) -> Result<File> {
        let fd = self.open_existing(path, OFlags::RDWR, "open for writing in place")?;
        let st = rfs::fstat(&fd).map_err(|e| DestError::io(path, "stat", e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(DestError::io(
                path,
                "open for writing in place",
                std::io::Error::other("not a regular file"),
            ));
        }
        Ok(fd)
    }
}

impl TempFile {
    /// Copies `ranges` (offset, length; ascending, within `len`) of this staged file into
    /// `target` at the same offsets, sets `target`'s length to `len`, then its mode and mtime.
    /// With `durable`, the data is on disk before this returns. The staged file is left for
    /// the caller to discard.
    pub fn patch_into(
        &self,
        target: &File,
        ranges: &[(u64, u64)],
        len: u64,
        mode: u32,
        mtime: Mtime,
        durable: bool,
    ) -> Result<u64> {
        let p = self.path();
        // A file that grows gets its new space first: a full disk is then an error before
        // anything is written, not a half-updated file.
        let old = target
            .metadata()
            .map_err(|e| DestError::io(p, "stat", e))?
            .len();
        if len > old {
            match rfs::fallocate(target, rfs::FallocateFlags::KEEP_SIZE, old, len - old) {
                Ok(()) | Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => {}
                Err(e) => return Err(DestError::io(p, "reserving space", e)),
            }
        }
        let mut buf = vec![0u8; COPY_BUF];
        let mut copied = 0;
        for &(off, n) in ranges {
            let end = off.saturating_add(n).min(len);
            let mut at = off;
            while at < end {
                let k = ((end - at) as usize).min(COPY_BUF);
                let piece = buf.get_mut(..k).unwrap_or_default();
                self.file()
                    .read_exact_at(piece, at)
                    .map_err(|e| DestError::io(p, "reading staged data", e))?;
                target
                    .write_all_at(piece, at)
                    .map_err(|e| DestError::io(p, "writing in place", e))?;
                at += k as u64;
                copied += k as u64;
            }
        }
        // Truncating last: while the file shrinks, ranges beyond the new end were still the
        // old copy's, and nothing here reads them.
        target
            .set_len(len)
            .map_err(|e| DestError::io(p, "setting length", e))?;
        set_fd_meta(target, Some(mode), Some(mtime))
            .map_err(|e| DestError::io(p, "setting attributes", e))?;
        if durable {
            rfs::fdatasync(target).map_err(|e| DestError::io(p, "fsync", e))?;
        }
        Ok(copied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_ranges_truncates_and_sets_attributes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), vec![b'o'; 100]).unwrap();
        let d = Dest::open(dir.path()).unwrap();
        let path = RelPath::new(b"f".to_vec()).unwrap();
        let target = d.open_for_update(&path).unwrap();
        let staged = d.create_temp(&path).unwrap();
        staged.file().write_all_at(&[b'n'; 80], 0).unwrap();
        let mtime = Mtime {
            sec: 1_600_000_000,
            nsec: 5,
        };
        let copied = staged
            .patch_into(&target, &[(10, 10), (40, 100)], 80, 0o600, mtime, true)
            .unwrap();
        assert_eq!(copied, 10 + 40);
        staged.discard();
        let mut want = vec![b'o'; 80];
        want[10..20].fill(b'n');
        want[40..80].fill(b'n');
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), want);
        let meta = std::fs::metadata(dir.path().join("f")).unwrap();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!((meta.mtime(), meta.mtime_nsec()), (1_600_000_000, 5));
    }

    #[test]
    fn refuses_symlinks_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("real"), b"x").unwrap();
        std::os::unix::fs::symlink("real", dir.path().join("link")).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let d = Dest::open(dir.path()).unwrap();
        for name in ["link", "sub"] {
            let path = RelPath::new(name.as_bytes().to_vec()).unwrap();
            assert!(d.open_for_update(&path).is_err(), "{name}");
        }
    }
}
