//! When the last completed push of one local tree to one remote tree began: files there that
//! have not changed since were most likely sent then, so the next push does not hash them
//! ahead of the receiver's request (see `session::sender::ahead`), which would cost CPU for a
//! file the receiver already has. One small file per pair of trees under
//! the state directory, keyed by target, local and remote root and what selects the files
//! (filters, `cp`'s names). Must not: fail a sync, or decide what is sent — a missing or bad
//! record only means hashing every big file ahead, as without one.

use std::path::Path;

use super::credentials;
use crate::engine::Mtime;
use crate::proto::SyncOptions;

/// The record's key: `endpoint` (a target without its path), our root (made absolute), the
/// remote root, and what selects the files sent (filters; `cp`'s names): a push that sent
/// other files says nothing about these.
pub fn key(endpoint: &str, local_root: &Path, remote_root: &[u8], opts: &SyncOptions) -> String {
    let local = std::path::absolute(local_root).unwrap_or_else(|_| local_root.to_path_buf());
    // Debug forms: exact for names that are not UTF-8.
    format!(
        "{endpoint}\0{local:?}\0{:?}\0{:?}\0{:?}",
        bytes::Bytes::copy_from_slice(remote_root),
        opts.filters,
        opts.copy
    )
}

/// When the last completed push under `key` began, if there is a sound record.
pub fn load(key: &str) -> Option<Mtime> {
    load_in(&credentials::records("pushed")?, key)
}

/// Records that a push under `key` that began at `at` completed.
pub fn save(key: &str, at: Mtime) {
    if let Some(d) = credentials::records("pushed") {
        save_in(&d, key, at);
    }
}

fn load_in(dir: &Path, key: &str) -> Option<Mtime> {
    let text = credentials::read_record(dir, key)?;
    let mut f = text.split_whitespace();
    let sec = f.next()?.parse::<i64>().ok()?;
    let nsec = f
        .next()?
        .parse::<u32>()
        .ok()
        .filter(|n| *n < 1_000_000_000)?;
    f.next().is_none().then_some(Mtime { sec, nsec })
}

fn save_in(dir: &Path, key: &str, at: Mtime) {
    // (Without a record the next push hashes every big file ahead.)
    credentials::write_record(dir, key, &format!("{} {}\n", at.sec, at.nsec));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_per_pair_of_trees_and_a_bad_one_is_no_record() {
        let td = tempfile::tempdir().unwrap();
        let d = td.path().join("pushed");
        let o = SyncOptions::default();
        let k = key("ssh://u@h/", Path::new("/src"), b"/dst", &o);
        assert_eq!(load_in(&d, &k), None);
        let at = Mtime {
            sec: 1_764_000_000,
            nsec: 123,
        };
        save_in(&d, &k, at);
        assert_eq!(load_in(&d, &k), Some(at));
        let mut filtered = SyncOptions::default();
        filtered.filters.excludes.push("*.log".into());
        for other in [
            key("ssh://u@h/", Path::new("/src2"), b"/dst", &o),
            key("ssh://u@h/", Path::new("/src"), b"/dst2", &o),
            key("ssh://u@other/", Path::new("/src"), b"/dst", &o),
            key("ssh://u@h/", Path::new("/src"), b"/dst", &filtered),
        ] {
            assert_eq!(load_in(&d, &other), None);
        }
        for bad in ["", "5", "x 1", "5 1000000000", "5 1 extra"] {
            credentials::write_record(&d, &k, bad);
            assert_eq!(load_in(&d, &k), None, "{bad:?}");
        }
    }
}
