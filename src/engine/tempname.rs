//! The names devsync gives its own files inside a user's tree, and how to recognise them.
//!
//! Two kinds: short-lived temp names (`.devsync-tmp.<nonce>.<check>`, used for the moment
//! between naming a staged file and renaming it into place, and by the named fallback where
//! `O_TMPFILE` is missing) and resumable partial transfers of big files
//! (`.devsync-part.<name hash>.<check>`, one per target name, so the next sync finds it).
//! `<check>` is a hash of the rest of the name, so a user's own file that merely starts with
//! the prefix is not ours: it is synced like any other file. Whether a file of ours is still in
//! use is not decided by its name but by a lock: the session that owns it holds `flock` on it
//! (see `engine::dest`).
//!
//! Pure functions over bytes; no I/O.

/// Prefix of temp names given to staged files already locked by their owner.
pub const TEMP_PREFIX: &[u8] = b".devsync-tmp.";
/// Prefix of files created by name (where `O_TMPFILE` is missing): locked an instant after
/// they appear, so a sweep leaves young ones alone.
pub const NEW_PREFIX: &[u8] = b".devsync-new.";
/// Prefix of resumable partial files.
pub const PART_PREFIX: &[u8] = b".devsync-part.";
/// Prefix of entries parked for a moment while a batch of renames is applied (so that two
/// entries can trade places).
pub const MOVE_PREFIX: &[u8] = b".devsync-mv.";

/// Which kind of file of ours a name denotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ours {
    Temp,
    /// Created by name, locked just after.
    New,
    Partial,
    /// An entry parked during renames.
    Move,
}

fn check(prefix: &[u8], body: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"devsync own file name v1\0");
    h.update(prefix);
    h.update(body);
    h.finalize().to_hex()[..8].to_string()
}

fn named(prefix: &[u8], body: &str) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.extend_from_slice(body.as_bytes());
    v.push(b'.');
    v.extend_from_slice(check(prefix, body.as_bytes()).as_bytes());
    v
}

/// A temp name from a session-unique nonce.
pub fn temp_name(nonce: u64) -> Vec<u8> {
    named(TEMP_PREFIX, &format!("{nonce:016x}"))
}

/// A name for a file created by name (see [`NEW_PREFIX`]).
pub fn new_name(nonce: u64) -> Vec<u8> {
    named(NEW_PREFIX, &format!("{nonce:016x}"))
}

/// The parking name for the `n`th move of a batch whose renames use `nonce`.
pub fn move_name(nonce: u64, n: u64) -> Vec<u8> {
    named(MOVE_PREFIX, &format!("{:016x}", nonce.wrapping_add(n)))
}

/// The partial-transfer name for a file called `name` in the same directory.
pub fn partial_name(name: &[u8]) -> Vec<u8> {
    let mut h = blake3::Hasher::new();
    h.update(b"devsync partial v1\0");
    h.update(name);
    named(PART_PREFIX, &h.finalize().to_hex()[..16])
}

/// Whether `name` (one path component) is one of devsync's own files, and which kind.
pub fn ours(name: &[u8]) -> Option<Ours> {
    let (kind, prefix) = if name.starts_with(TEMP_PREFIX) {
        (Ours::Temp, TEMP_PREFIX)
    } else if name.starts_with(NEW_PREFIX) {
        (Ours::New, NEW_PREFIX)
    } else if name.starts_with(PART_PREFIX) {
        (Ours::Partial, PART_PREFIX)
    } else if name.starts_with(MOVE_PREFIX) {
        (Ours::Move, MOVE_PREFIX)
    } else {
        return None;
    };
    let rest = name.get(prefix.len()..)?;
    // Body: exactly 16 lowercase hex digits, then '.', then the 8-digit check.
    if rest.len() != 16 + 1 + 8 || rest.get(16) != Some(&b'.') {
        return None;
    }
    let (body, tail) = (rest.get(..16)?, rest.get(17..)?);
    let hex = |b: &[u8]| b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    if !hex(body) || !hex(tail) {
        return None;
    }
    (check(prefix, body).as_bytes() == tail).then_some(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_names_are_recognised_and_look_alikes_are_not() {
        for n in [0, 1, u64::MAX, 0xdead_beef] {
            let t = temp_name(n);
            assert_eq!(
                ours(&t),
                Some(Ours::Temp),
                "{}",
                String::from_utf8_lossy(&t)
            );
        }
        assert_eq!(ours(&new_name(3)), Some(Ours::New));
        assert_ne!(new_name(3), temp_name(3));
        let p = partial_name(b"big.iso");
        assert_eq!(ours(&p), Some(Ours::Partial));
        assert_ne!(p, partial_name(b"big.iso2"));
        assert_eq!(p, partial_name(b"big.iso"), "deterministic per name");
        // A user's files that merely look like ours are theirs.
        let mut forged = temp_name(7);
        let last = forged.len() - 1;
        forged[last] = if forged[last] == b'0' { b'1' } else { b'0' };
        for n in [
            &b".devsync-tmp."[..],
            b".devsync-tmp.notes",
            b".devsync-tmp.123.abc.4",
            b".devsync-tmp.0000000000000007.00000000",
            &forged,
            b".devsync-part.x",
            b"devsync-tmp.0000000000000007.abcdefgh",
        ] {
            assert_eq!(ours(n), None, "{}", String::from_utf8_lossy(n));
        }
    }
}
