//! Whole-file BLAKE3 digests computed chunk by chunk.
//!
//! Files are cut into aligned [`CHUNK`]-sized pieces. Each piece gets a BLAKE3 *chaining value*
//! (the interior hash of that subtree), and the chaining values merge into exactly the standard
//! BLAKE3 hash of the file (what `b3sum` prints). This lets both peers hash pieces in parallel
//! and out of order, compare pieces at the same offset cheaply, and still verify a rebuilt file
//! against one whole-file digest. Pure functions: no I/O beyond the reader passed in.

use std::fs::File;

use blake3::hazmat::{self, ChainingValue, HasherExt, Mode};
use rayon::prelude::*;

/// Size of the aligned pieces files are hashed, diffed and shipped in. A power of two (the BLAKE3
/// tree needs that) and a multiple of every block size the delta engine uses.
pub const CHUNK: u64 = 4 << 20;

pub type Cv = ChainingValue;
pub type Digest = [u8; 32];

/// Number of chunks in a file of `len` bytes (0 for an empty file).
pub fn chunk_count(len: u64) -> u64 {
    len.div_ceil(CHUNK)
}

/// Byte offset and length of chunk `k` in a file of `len` bytes.
pub fn chunk_span(len: u64, k: u64) -> (u64, usize) {
    let off = k * CHUNK;
    (off, len.saturating_sub(off).min(CHUNK) as usize)
}

/// Chaining value of chunk `k` whose bytes are `data`.
pub fn chunk_cv(k: u64, data: &[u8]) -> Cv {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(k * CHUNK);
    h.update(data);
    h.finalize_non_root()
}

/// Chaining value of chunk `k` if it is `n` zero bytes (a hole), without a buffer of its size.
pub fn zero_cv(k: u64, n: usize) -> Cv {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut h = blake3::Hasher::new();
    h.set_input_offset(k * CHUNK);
    let mut left = n;
    while left > 0 {
        let m = left.min(ZEROS.len());
        h.update(&ZEROS[..m]);
        left -= m;
    }
    h.finalize_non_root()
}

/// Streams chunk `k` out of `src` through a small private buffer: each piece is copied, hashed
/// and handed to `sink` (with its offset in the chunk) while it is still in cache. Returns the
/// chaining value of exactly the bytes handed over. Used where `src` is a view of a file another
/// process could change: what `sink` writes is then always what was hashed.
pub fn stream_cv(
    k: u64,
    src: &[u8],
    mut sink: impl FnMut(usize, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<Cv> {
    const PIECE: usize = 64 << 10;
    let mut buf = vec![0u8; PIECE.min(src.len())];
    let mut h = blake3::Hasher::new();
    h.set_input_offset(k * CHUNK);
    for (i, piece) in src.chunks(PIECE).enumerate() {
        let copy = &mut buf[..piece.len()];
        copy.copy_from_slice(piece);
        h.update(copy);
        sink(i * PIECE, copy)?;
    }
    Ok(h.finalize_non_root())
}

/// Standard BLAKE3 digest of a file of `len` bytes, given the chaining values of all its chunks.
/// Files of one chunk or less have no interior nodes: hash them with [`blake3::hash`] instead,
/// which is why this returns `None` for them.
pub fn digest_from_cvs(cvs: &[Cv], len: u64) -> Option<Digest> {
    if len <= CHUNK || cvs.len() as u64 != chunk_count(len) {
        return None;
    }
    let (l, r) = split(cvs, len);
    Some(*hazmat::merge_subtrees_root(&l, &r, Mode::Hash).as_bytes())
}

fn split(cvs: &[Cv], len: u64) -> (Cv, Cv) {
    // BLAKE3's left subtree is the largest power-of-two number of 1 KiB chunks short of `len`;
    // for len > CHUNK that is a power of two >= CHUNK, so it ends on one of our chunk boundaries.
    let left_len = hazmat::left_subtree_len(len);
    let nl = (left_len / CHUNK) as usize;
    (
        subtree(&cvs[..nl], left_len),
        subtree(&cvs[nl..], len - left_len),
    )
}

fn subtree(cvs: &[Cv], len: u64) -> Cv {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let (l, r) = split(cvs, len);
    hazmat::merge_subtrees_non_root(&l, &r, Mode::Hash)
}

/// Reads chunk `k` of `file` (whose length is `len`) into a fresh buffer.
pub fn read_chunk(file: &File, len: u64, k: u64) -> std::io::Result<Vec<u8>> {
    let (off, n) = chunk_span(len, k);
    read_at(file, off, n)
}

/// Reads exactly `n` bytes at `off` into a new buffer, without zero-filling it first (at 4 MiB
/// a chunk, the memset alone cost a fifth of hashing throughput). A file that got shorter
/// meanwhile is `UnexpectedEof`.
pub fn read_at(file: &File, off: u64, n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(n);
    read_at_into(file, off, n, &mut buf)?;
    Ok(buf)
}

/// Appends exactly `n` bytes read at `off` to `buf` (nothing appended on error).
pub fn read_at_into(file: &File, off: u64, n: usize, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let start = buf.len();
    buf.reserve(n);
    while buf.len() - start < n {
        let done = buf.len() - start;
        let want = &mut buf.spare_capacity_mut()[..n - done];
        let got = match rustix::io::pread(file, want, off + done as u64) {
            Ok((got, _)) => got.len(),
            Err(e) => {
                buf.truncate(start);
                return Err(e.into());
            }
        };
        if got == 0 {
            buf.truncate(start);
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        // SAFETY: `pread` initialized the first `got` bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + got) };
    }
    Ok(())
}

/// Chaining values of every chunk of `file`, computed in parallel.
pub fn file_cvs(file: &File, len: u64) -> std::io::Result<Vec<Cv>> {
    (0..chunk_count(len))
        .into_par_iter()
        .map(|k| read_chunk(file, len, k).map(|b| chunk_cv(k, &b)))
        .collect()
}

/// Standard BLAKE3 digest of the first `len` bytes of `file`.
pub fn file_digest(file: &File, len: u64) -> std::io::Result<Digest> {
    if len <= CHUNK {
        let buf = read_chunk(file, len, 0)?;
        return Ok(*blake3::hash(&buf).as_bytes());
    }
    let cvs = file_cvs(file, len)?;
    Ok(digest_from_cvs(&cvs, len).expect("len > CHUNK and one cv per chunk"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    fn digest_of(data: &[u8]) -> Digest {
        let len = data.len() as u64;
        if len <= CHUNK {
            return *blake3::hash(data).as_bytes();
        }
        let cvs: Vec<Cv> = (0..chunk_count(len))
            .map(|k| {
                let (off, n) = chunk_span(len, k);
                chunk_cv(k, &data[off as usize..off as usize + n])
            })
            .collect();
        digest_from_cvs(&cvs, len).unwrap()
    }

    #[test]
    fn chunked_digest_equals_plain_blake3() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let c = CHUNK as usize;
        let mut data = vec![0u8; 9 * c + 1234];
        rng.fill_bytes(&mut data);
        for len in [
            0,
            1,
            c - 1,
            c,
            c + 1,
            2 * c,
            2 * c + 1,
            3 * c,
            3 * c + 17,
            4 * c,
            5 * c + 1,
            8 * c,
            9 * c + 1234,
        ] {
            assert_eq!(
                digest_of(&data[..len]),
                *blake3::hash(&data[..len]).as_bytes(),
                "len {len}"
            );
        }
    }

    #[test]
    fn stream_cv_hashes_exactly_what_it_hands_over() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut data = vec![0u8; CHUNK as usize - 3];
        rng.fill_bytes(&mut data);
        let mut out = vec![0u8; data.len()];
        let cv = stream_cv(5, &data, |off, piece| {
            out[off..off + piece.len()].copy_from_slice(piece);
            Ok(())
        })
        .unwrap();
        assert_eq!(cv, chunk_cv(5, &data));
        assert_eq!(out, data);
        let failed = stream_cv(5, &data, |_, _| Err(std::io::Error::other("disk full")));
        assert!(failed.is_err());
    }

    #[test]
    fn file_digest_matches_and_cvs_locate_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        let mut data = vec![0u8; 3 * CHUNK as usize + 99];
        rng.fill_bytes(&mut data);
        std::fs::write(&path, &data).unwrap();
        let f = File::open(&path).unwrap();
        let len = data.len() as u64;
        assert_eq!(
            file_digest(&f, len).unwrap(),
            *blake3::hash(&data).as_bytes()
        );
        let before = file_cvs(&f, len).unwrap();
        data[CHUNK as usize + 5] ^= 1;
        std::fs::write(&path, &data).unwrap();
        let after = file_cvs(&File::open(&path).unwrap(), len).unwrap();
        let changed: Vec<usize> = (0..4).filter(|&i| before[i] != after[i]).collect();
        assert_eq!(changed, vec![1]);
    }

    #[test]
    fn wrong_cv_count_is_refused() {
        assert_eq!(digest_from_cvs(&[[0; 32]], 3 * CHUNK), None);
        assert_eq!(digest_from_cvs(&[[0; 32]], 10), None);
    }
}
