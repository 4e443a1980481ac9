//! Relative paths as they travel between peers: raw bytes (Unix names need not be UTF-8),
//! `/`-separated, validated so that no component can climb out of the sync root.
//!
//! This module only checks syntax. Whether a path would pass through a symlink on disk is
//! decided at the point of use (`engine::dest`), with `O_NOFOLLOW` lookups, never here.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;

use serde::{Deserialize, Serialize};

/// Longest relative path accepted (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest single name accepted (Linux `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("absolute path {0:?}")]
    Absolute(String),
    #[error("path {0:?} contains a '..' component")]
    DotDot(String),
    #[error("path {0:?} contains a '.' or empty component")]
    NotNormalized(String),
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    #[error("path is longer than {MAX_PATH_LEN} bytes")]
    TooLong,
    #[error("path {0:?} has a name longer than {MAX_NAME_LEN} bytes")]
    NameTooLong(String),
}

/// A normalized path relative to a sync root. Construct with [`RelPath::new`]; values that come
/// off the wire are re-checked by the protocol's `validate()` before use.
#[cfg_attr(test, derive(arbitrary::Arbitrary))]
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RelPath(#[serde(with = "serde_bytes")] Vec<u8>);

impl RelPath {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<RelPath, PathError> {
        let p = RelPath(bytes.into());
        p.check()?;
        Ok(p)
    }

    /// Wraps bytes without checking them: only for decoders, whose output the protocol's
    /// `validate()` checks before anything uses it (as with serde's derived decoding).
    pub(crate) fn unchecked(bytes: Vec<u8>) -> RelPath {
        RelPath(bytes)
    }

    /// Re-checks the invariants (for values produced by deserialization).
    pub fn check(&self) -> Result<(), PathError> {
        let b = &self.0;
        if b.is_empty() {
            return Err(PathError::Empty);
        }
        if b.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong);
        }
        let shown = || String::from_utf8_lossy(b).into_owned();
        if b.contains(&0) {
            return Err(PathError::Nul(shown()));
        }
        if b[0] == b'/' {
            return Err(PathError::Absolute(shown()));
        }
        for comp in b.split(|&c| c == b'/') {
            match comp {
                b".." => return Err(PathError::DotDot(shown())),
                b"" | b"." => return Err(PathError::NotNormalized(shown())),
                c if c.len() > MAX_NAME_LEN => return Err(PathError::NameTooLong(shown())),
                _ => {}
            }
        }
        Ok(())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_os_str(&self) -> &OsStr {
        OsStr::from_bytes(&self.0)
    }

    /// The parent directory, or `None` for a top-level name.
    pub fn parent(&self) -> Option<&[u8]> {
        self.0
            .iter()
            .rposition(|&c| c == b'/')
            .map(|i| &self.0[..i])
    }

    /// The final component.
    pub fn file_name(&self) -> &[u8] {
        match self.0.iter().rposition(|&c| c == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// Number of components minus one (0 for a top-level name).
    pub fn depth(&self) -> usize {
        self.0.iter().filter(|&&c| c == b'/').count()
    }

    /// True if `self` lies strictly inside the directory `dir` (a relative dir path).
    pub fn is_inside(&self, dir: &[u8]) -> bool {
        self.0.len() > dir.len() && self.0.starts_with(dir) && self.0[dir.len()] == b'/'
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_normal_paths() {
        for p in [
            "a",
            "a/b",
            "dir with space/file",
            "-leading",
            "ünï/кириллица",
            ".hidden/x",
        ] {
            RelPath::new(p).unwrap();
        }
        let non_utf8 = RelPath::new(b"a/\xff\xfe".to_vec()).unwrap();
        assert_eq!(non_utf8.file_name(), b"\xff\xfe");
    }

    #[test]
    fn refuses_escapes_and_odd_forms() {
        assert_eq!(RelPath::new(""), Err(PathError::Empty));
        assert!(matches!(
            RelPath::new("/etc/x"),
            Err(PathError::Absolute(_))
        ));
        assert!(matches!(RelPath::new("../x"), Err(PathError::DotDot(_))));
        assert!(matches!(
            RelPath::new("a/../../x"),
            Err(PathError::DotDot(_))
        ));
        assert!(matches!(RelPath::new("a/.."), Err(PathError::DotDot(_))));
        assert!(matches!(
            RelPath::new("a//b"),
            Err(PathError::NotNormalized(_))
        ));
        assert!(matches!(
            RelPath::new("a/./b"),
            Err(PathError::NotNormalized(_))
        ));
        assert!(matches!(
            RelPath::new("a/"),
            Err(PathError::NotNormalized(_))
        ));
        assert!(matches!(RelPath::new("a\0b"), Err(PathError::Nul(_))));
        assert!(matches!(
            RelPath::new("x".repeat(256)),
            Err(PathError::NameTooLong(_))
        ));
        assert_eq!(RelPath::new("a/".repeat(2049)), Err(PathError::TooLong));
    }

    #[test]
    fn parent_name_depth() {
        let p = RelPath::new("a/b/c").unwrap();
        assert_eq!(p.parent(), Some(&b"a/b"[..]));
        assert_eq!(p.file_name(), b"c");
        assert_eq!(p.depth(), 2);
        let top = RelPath::new("top").unwrap();
        assert_eq!(top.parent(), None);
        assert!(p.is_inside(b"a"));
        assert!(p.is_inside(b"a/b"));
        assert!(!p.is_inside(b"a/b/c"));
        assert!(!RelPath::new("ab/c").unwrap().is_inside(b"a"));
    }
}
