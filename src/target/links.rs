//! What earlier sessions learned about the link to each target: the compression level most
//! of a big push went at, and what raw data delivered there, so that the next push to the
//! same target starts at that level instead of climbing to it again. One small file per
//! target under the state directory. Must not: fail a sync — a record that is missing,
//! unreadable or malformed means starting from scratch, and one that cannot be written is
//! not worth an error.

use std::path::Path;

use super::credentials;

/// What is remembered about one link: (zstd level, raw bytes per second; 0 = not measured).
pub type Link = (u8, u64);

/// The record for `endpoint` (a target without its path), if there is a sound one.
pub fn load(endpoint: &str) -> Option<Link> {
    load_in(&credentials::records("links")?, endpoint)
}

/// Records `link` for `endpoint`, replacing what was there in one step.
pub fn save(endpoint: &str, link: Link) {
    if let Some(d) = credentials::records("links") {
        save_in(&d, endpoint, link);
    }
}

fn load_in(dir: &Path, endpoint: &str) -> Option<Link> {
    let text = credentials::read_record(dir, endpoint)?;
    let mut f = text.split_whitespace();
    let level = f.next()?.parse::<u8>().ok().filter(|l| *l <= 19)?;
    let raw = f.next()?.parse::<u64>().ok()?;
    f.next().is_none().then_some((level, raw))
}

fn save_in(dir: &Path, endpoint: &str, link: Link) {
    // (Without a record the next push just starts from scratch.)
    credentials::write_record(dir, endpoint, &format!("{} {}\n", link.0, link.1));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_a_bad_one_is_no_record() {
        let td = tempfile::tempdir().unwrap();
        let d = td.path().join("links");
        assert_eq!(load_in(&d, "ssh://u@h/"), None);
        save_in(&d, "ssh://u@h/", (9, 2_400_000));
        assert_eq!(load_in(&d, "ssh://u@h/"), Some((9, 2_400_000)));
        assert_eq!(load_in(&d, "ssh://other/"), None);
        save_in(&d, "ssh://u@h/", (1, 0));
        assert_eq!(load_in(&d, "ssh://u@h/"), Some((1, 0)));
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            1,
            "no temp files left"
        );
        for bad in ["", "9", "x 1", "20 5", "9 1 extra"] {
            credentials::write_record(&d, "ssh://u@h/", bad);
            assert_eq!(load_in(&d, "ssh://u@h/"), None, "{bad:?}");
        }
    }
}
