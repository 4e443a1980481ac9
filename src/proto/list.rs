//! Compact encoding of file-list batches: each path is sent as the number of leading bytes it
//! shares with the previous path of the same batch plus the rest (as rsync does). Siblings
//! travel together, so this halves the list of a source tree. Modification times go as the
//! difference in seconds from the previous entry's (files written together share them).
//! Decoding only rebuilds values; `Msg::validate` checks them like any other.

use serde::de::Error as _;
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::engine::relpath::RelPath;
use crate::engine::{Entry, EntryKind, Mtime};

#[derive(Serialize)]
struct WireRef<'a> {
    shared: u32,
    #[serde(with = "serde_bytes")]
    rest: &'a [u8],
    kind: &'a EntryKind,
    mode: u32,
    sec_delta: i64,
    nsec: u32,
}

/// Borrows the path bytes from the frame: one allocation per entry, for its path.
#[derive(Deserialize)]
struct Wire<'a> {
    shared: u32,
    #[serde(borrow, with = "serde_bytes")]
    rest: &'a [u8],
    kind: EntryKind,
    mode: u32,
    sec_delta: i64,
    nsec: u32,
}

pub fn serialize<S: Serializer>(entries: &[Entry], s: S) -> Result<S::Ok, S::Error> {
    let mut seq = s.serialize_seq(Some(entries.len()))?;
    let mut prev: &[u8] = &[];
    let mut prev_sec = 0i64;
    for e in entries {
        let path = e.path.as_bytes();
        let shared = prev.iter().zip(path).take_while(|(a, b)| a == b).count();
        seq.serialize_element(&WireRef {
            shared: shared as u32,
            rest: path.get(shared..).unwrap_or_default(),
            kind: &e.kind,
            mode: e.mode,
            sec_delta: e.mtime.sec.wrapping_sub(prev_sec),
            nsec: e.mtime.nsec,
        })?;
        prev = path;
        prev_sec = e.mtime.sec;
    }
    seq.end()
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Entry>, D::Error> {
    let wire = Vec::<Wire<'de>>::deserialize(d)?;
    let mut out: Vec<Entry> = Vec::with_capacity(wire.len());
    let mut sec = 0i64;
    for w in wire {
        let prev = out.last().map(|e| e.path.as_bytes()).unwrap_or_default();
        let Some(head) = prev.get(..w.shared as usize) else {
            return Err(D::Error::custom(format!(
                "list entry shares {} bytes with a {}-byte previous path",
                w.shared,
                prev.len()
            )));
        };
        let mut path = Vec::with_capacity(head.len() + w.rest.len());
        path.extend_from_slice(head);
        path.extend_from_slice(w.rest);
        sec = sec.wrapping_add(w.sec_delta);
        out.push(Entry {
            path: RelPath::unchecked(path),
            kind: w.kind,
            mode: w.mode,
            mtime: Mtime { sec, nsec: w.nsec },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use crate::proto::Msg;

    fn entry(path: &str) -> Entry {
        let sec = match path.len() % 3 {
            0 => i64::MIN,
            1 => 1_700_000_000,
            _ => -5,
        };
        Entry {
            path: RelPath::new(path).unwrap(),
            kind: EntryKind::File {
                size: 7,
                digest: None,
            },
            mode: 0o644,
            mtime: Mtime { sec, nsec: 2 },
        }
    }

    #[test]
    fn shared_prefixes_round_trip_and_shrink_the_list() {
        let paths = [
            "src/engine/scan.rs",
            "src/engine/plan.rs",
            "src/engine/p",
            "src",
            "src/ü/x",
            "src/ü/y",
            "other",
            "x",
            "yy",
        ];
        let msg = Msg::Entries {
            first_id: 3,
            entries: paths.iter().map(|p| entry(p)).collect(),
            changed: true,
        };
        let bytes = postcard::to_allocvec(&msg).unwrap();
        assert_eq!(postcard::from_bytes::<Msg>(&bytes).unwrap(), msg);
        let Msg::Entries { entries, .. } = &msg else {
            unreachable!()
        };
        let plain = postcard::to_allocvec(entries).unwrap().len();
        assert!(bytes.len() + 20 < plain, "{} vs {plain} bytes", bytes.len());
    }

    #[test]
    fn a_prefix_longer_than_the_previous_path_is_malformed() {
        let bad = vec![WireRef {
            shared: 2,
            rest: b"x",
            kind: &EntryKind::Dir,
            mode: 0o755,
            sec_delta: 0,
            nsec: 0,
        }];
        let mut bytes = postcard::to_allocvec(&Msg::Entries {
            first_id: 0,
            entries: vec![],
            changed: false,
        })
        .unwrap();
        // Re-encode the same message with a hand-made entry list (the empty list and the
        // flag after it are the last two bytes).
        bytes.truncate(bytes.len() - 2);
        bytes.extend(postcard::to_allocvec(&bad).unwrap());
        bytes.push(0);
        let err = postcard::from_bytes::<Msg>(&bytes).unwrap_err();
        assert!(!err.to_string().is_empty());
    }
}
