//! The rsync algorithm on byte slices, on top of `fast_rsync`: signature parameters, per-chunk
//! signatures that concatenate into window signatures, diff and checked apply.
//!
//! Transport-free and file-free: callers hand in bytes and get bytes back. Everything that
//! arrives from a peer (parameters, signatures, deltas) is validated here before `fast_rsync`
//! sees it, because `fast_rsync` itself trusts its inputs (a zero block size would never end).

use fast_rsync::{IndexedSignature, Signature, SignatureOptions};
use serde::{Deserialize, Serialize};

use super::hash::CHUNK;

/// Smallest and largest block sizes (powers of two; every one divides [`CHUNK`]).
pub const MIN_BLOCK: u32 = 512;
pub const MAX_BLOCK: u32 = 128 << 10;
/// Bytes of MD4 kept per block. Short is fine: BLAKE3 verifies every rebuilt file.
pub const MIN_STRONG: u32 = 4;
pub const MAX_STRONG: u32 = 16;
/// Receiver files smaller than this are replaced whole (a delta cannot save enough).
pub const DELTA_MIN_BASE: u64 = 1024;
/// When more than 1/N of a file's chunks differ in place, the sender asks for the signature of
/// the whole base (content probably shifted); otherwise only for the neighbourhood of changes.
pub const FULL_SIGNATURE_FRACTION: u64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error(
        "invalid signature parameters (block size {block_size}, strong hash {strong_len} bytes)"
    )]
    BadParams { block_size: u32, strong_len: u32 },
    #[error("malformed signature: {0}")]
    BadSignature(&'static str),
    #[error("delta does not apply: {0}")]
    Apply(#[from] fast_rsync::ApplyError),
    #[error("delta produced {got} bytes, expected {want}")]
    WrongLength { got: usize, want: usize },
    #[error("diff failed: {0}")]
    Diff(#[from] fast_rsync::DiffError),
}

/// How the receiver cut and hashed its base file.
#[cfg_attr(test, derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigParams {
    pub block_size: u32,
    pub strong_len: u32,
}

impl SigParams {
    /// Block size about √len (rounded to a power of two, clamped), and enough strong-hash bytes
    /// that a false block match in a file this size is about a one-in-a-million event.
    pub fn for_len(len: u64) -> SigParams {
        let root = (len as f64).sqrt().max(1.0);
        let block_size = (2f64.powf(root.log2().round()) as u32).clamp(MIN_BLOCK, MAX_BLOCK);
        let blocks = len / u64::from(block_size) + 1;
        // Weak-hash hits to check ≈ positions × blocks / 2^32; add 20 bits of margin and 8 for
        // the rolling checksum being far from uniform.
        let bits = 20 + 8 + log2_ceil(len.max(2)) + log2_ceil(blocks.max(2));
        let bits = bits.saturating_sub(32);
        let strong_len = bits.div_ceil(8).clamp(MIN_STRONG, MAX_STRONG);
        SigParams {
            block_size,
            strong_len,
        }
    }

    pub fn validate(&self) -> Result<(), DeltaError> {
        let ok = self.block_size.is_power_of_two()
            && (MIN_BLOCK..=MAX_BLOCK).contains(&self.block_size)
            && (MIN_STRONG..=MAX_STRONG).contains(&self.strong_len);
        if ok {
            Ok(())
        } else {
            Err(DeltaError::BadParams {
                block_size: self.block_size,
                strong_len: self.strong_len,
            })
        }
    }

    fn options(&self) -> SignatureOptions {
        SignatureOptions {
            block_size: self.block_size,
            crypto_hash_size: self.strong_len,
        }
    }

    fn record_len(&self) -> usize {
        4 + self.strong_len as usize
    }

    /// The serialized signature header `fast_rsync` writes for these parameters.
    fn header(&self) -> Vec<u8> {
        Signature::calculate(&[], self.options()).into_serialized()
    }

    /// Number of blocks (signature records) covering `len` bytes.
    pub fn blocks_in(&self, len: usize) -> usize {
        len.div_ceil(self.block_size as usize)
    }
}

fn log2_ceil(x: u64) -> u32 {
    64 - (x - 1).leading_zeros()
}

/// Signature of one base chunk (header included). Callers validate `p` first.
pub fn chunk_signature(data: &[u8], p: SigParams) -> Vec<u8> {
    Signature::calculate(data, p.options()).into_serialized()
}

/// Joins the signatures of consecutive base chunks into the signature of their concatenation.
/// `parts` pairs each signature with the length of the base bytes it must describe, so a
/// signature with the wrong number of blocks (from a confused or hostile peer) is refused.
pub fn join_signatures(parts: &[(&[u8], usize)], p: SigParams) -> Result<Signature, DeltaError> {
    p.validate()?;
    let header = p.header();
    let mut out = header.clone();
    for &(sig, covered) in parts {
        let body = sig
            .strip_prefix(header.as_slice())
            .ok_or(DeltaError::BadSignature(
                "header does not match the parameters",
            ))?;
        if body.len() != p.blocks_in(covered) * p.record_len() {
            return Err(DeltaError::BadSignature("wrong number of blocks"));
        }
        out.extend_from_slice(body);
    }
    Signature::deserialize(out).map_err(|_| DeltaError::BadSignature("unparseable"))
}

/// Delta that rebuilds `data` from the base described by `index`.
pub fn diff(index: &IndexedSignature<'_>, data: &[u8]) -> Result<Vec<u8>, DeltaError> {
    let mut out = Vec::with_capacity(data.len() / 64 + 64);
    fast_rsync::diff(index, data, &mut out)?;
    Ok(out)
}

/// Rebuilds exactly `want` bytes from `base` and an untrusted `delta`.
pub fn apply(base: &[u8], delta: &[u8], want: usize) -> Result<Vec<u8>, DeltaError> {
    let mut out = Vec::with_capacity(want);
    fast_rsync::apply_limited(base, delta, &mut out, want)?;
    if out.len() != want {
        return Err(DeltaError::WrongLength {
            got: out.len(),
            want,
        });
    }
    Ok(out)
}

/// One command of a delta (the librsync format `fast_rsync` writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op<'a> {
    Copy { offset: u64, len: u64 },
    Literal(&'a [u8]),
}

const DELTA_MAGIC: [u8; 4] = 0x7273_0236u32.to_be_bytes();
const OP_END: u8 = 0x00;
const OP_LITERAL_64: u8 = 0x40;
const OP_LITERAL_N1: u8 = 0x41;
const OP_LITERAL_N8: u8 = 0x44;
const OP_COPY_N1_N1: u8 = 0x45;
const OP_COPY_N8_N8: u8 = 0x54;

fn parse_ops(delta: &[u8]) -> Result<Vec<Op<'_>>, DeltaError> {
    let bad = DeltaError::BadSignature;
    let mut rest = delta
        .strip_prefix(&DELTA_MAGIC[..])
        .ok_or(bad("delta magic"))?;
    let mut take = |n: usize| -> Result<&[u8], DeltaError> {
        if rest.len() < n {
            return Err(bad("truncated delta"));
        }
        let (a, b) = rest.split_at(n);
        rest = b;
        Ok(a)
    };
    let int = |b: &[u8]| b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
    let mut ops = Vec::new();
    loop {
        let cmd = take(1)?[0];
        match cmd {
            OP_END => break,
            1..=OP_LITERAL_64 => ops.push(Op::Literal(take(cmd as usize)?)),
            OP_LITERAL_N1..=OP_LITERAL_N8 => {
                let n = int(take(1 << (cmd - OP_LITERAL_N1))?);
                ops.push(Op::Literal(take(
                    usize::try_from(n).map_err(|_| bad("literal length"))?,
                )?));
            }
            OP_COPY_N1_N1..=OP_COPY_N8_N8 => {
                let mode = cmd - OP_COPY_N1_N1;
                let offset = int(take(1 << (mode / 4))?);
                let len = int(take(1 << (mode % 4))?);
                ops.push(Op::Copy { offset, len });
            }
            _ => return Err(bad("unknown delta command")),
        }
    }
    Ok(ops)
}

fn size_class(v: u64) -> u8 {
    match v {
        0..=0xff => 0,
        0x100..=0xffff => 1,
        0x1_0000..=0xffff_ffff => 2,
        _ => 3,
    }
}

fn put_int(out: &mut Vec<u8>, v: u64, class: u8) {
    out.extend_from_slice(&v.to_be_bytes()[8 - (1usize << class)..]);
}

fn encode_ops(ops: &[Op<'_>], out: &mut Vec<u8>) {
    out.extend_from_slice(&DELTA_MAGIC);
    for op in ops {
        match *op {
            Op::Literal([]) => {}
            Op::Literal(b) if b.len() <= 64 => {
                out.push(b.len() as u8);
                out.extend_from_slice(b);
            }
            Op::Literal(b) => {
                let class = size_class(b.len() as u64);
                out.push(OP_LITERAL_N1 + class);
                put_int(out, b.len() as u64, class);
                out.extend_from_slice(b);
            }
            Op::Copy { len: 0, .. } => {}
            Op::Copy { offset, len } => {
                let (oc, lc) = (size_class(offset), size_class(len));
                out.push(OP_COPY_N1_N1 + oc * 4 + lc);
                put_int(out, offset, oc);
                put_int(out, len, lc);
            }
        }
    }
    out.push(OP_END);
}

/// Sample windows [`probably_matches`] diffs.
const PROBES: usize = 16;

/// Whether `data` seems to hold any block of the base the index describes, at any shift.
/// `fast_rsync`'s diff runs ~10x slower over data that matches nothing (two hash lookups per
/// byte), and such data is sent literally anyway; so before diffing a whole chunk, diff a few
/// windows of two blocks spread over it (two blocks always contain one block-aligned window for
/// whatever shift old content has). Content that is only a small fraction of a chunk can be
/// missed: it is then sent literally, which is correct, just not minimal.
pub fn probably_matches(index: &IndexedSignature<'_>, data: &[u8], block: u32) -> bool {
    let win = 2 * block as usize;
    if data.len() <= PROBES * win * 4 {
        return true;
    }
    let step = (data.len() - win) / (PROBES - 1);
    (0..PROBES).any(|i| {
        let w = &data[i * step..i * step + win];
        diff(index, w).is_ok_and(|d| {
            parse_ops(&d).is_ok_and(|ops| ops.iter().any(|op| matches!(op, Op::Copy { .. })))
        })
    })
}

/// A delta made of `data` alone (for chunks not worth diffing).
pub fn literal(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    encode_ops(&[Op::Literal(data)], &mut out);
    out
}

/// A delta cut down to part of its output.
#[derive(Debug)]
pub struct Trimmed {
    pub delta: Vec<u8>,
    /// Bytes the trimmed delta carries literally, and bytes it copies from the base.
    pub literal: u64,
    pub copied: u64,
}

/// Rewrites `delta` so that it rebuilds only bytes `from..to` of its original output. Lets a
/// chunk be diffed with some overlap into its neighbours (so blocks across the boundary still
/// match) without sending the overlap.
pub fn trim(delta: &[u8], from: u64, to: u64) -> Result<Trimmed, DeltaError> {
    let mut kept = Vec::new();
    let (mut literal, mut copied, mut pos) = (0u64, 0u64, 0u64);
    for op in parse_ops(delta)? {
        let len = match op {
            Op::Copy { len, .. } => len,
            Op::Literal(b) => b.len() as u64,
        };
        let (s, e) = (pos, pos + len);
        pos = e;
        let (a, b) = (s.max(from), e.min(to));
        if a >= b {
            continue;
        }
        match op {
            Op::Copy { offset, .. } => {
                copied += b - a;
                kept.push(Op::Copy {
                    offset: offset + (a - s),
                    len: b - a,
                });
            }
            Op::Literal(bytes) => {
                literal += b - a;
                kept.push(Op::Literal(&bytes[(a - s) as usize..(b - s) as usize]));
            }
        }
    }
    if pos < to {
        return Err(DeltaError::WrongLength {
            got: pos as usize,
            want: to as usize,
        });
    }
    let mut out = Vec::with_capacity(literal as usize + 16 * kept.len() + 8);
    encode_ops(&kept, &mut out);
    Ok(Trimmed {
        delta: out,
        literal,
        copied,
    })
}

/// Which base chunks the sender needs signatures for, given the new-file chunks that differ
/// from the base chunk at the same offset. `None` means "all of them".
pub fn signature_request(
    mismatched: &[u64],
    new_chunks: u64,
    base_chunks: u64,
) -> Option<Vec<u64>> {
    if mismatched.len() as u64 * FULL_SIGNATURE_FRACTION > new_chunks {
        return None;
    }
    let mut want: Vec<u64> = mismatched
        .iter()
        .flat_map(|&k| {
            let (start, n) = window_for(k, base_chunks);
            start..start + n
        })
        .collect();
    want.sort_unstable();
    want.dedup();
    Some(want)
}

/// The base window (first chunk, chunk count) that new chunk `k` is diffed against when only
/// neighbourhood signatures were requested: the chunk at the same offset and one either side.
pub fn window_for(k: u64, base_chunks: u64) -> (u64, u64) {
    if base_chunks == 0 {
        return (0, 0);
    }
    let centre = k.min(base_chunks - 1);
    let start = centre.saturating_sub(1);
    let end = (centre + 2).min(base_chunks);
    (start, end - start)
}

/// Byte range of a window of base chunks in a base of `base_len` bytes.
pub fn window_bytes(start: u64, count: u64, base_len: u64) -> (u64, u64) {
    let lo = (start * CHUNK).min(base_len);
    let hi = ((start + count) * CHUNK).min(base_len);
    (lo, hi)
}

/// Granularity of [`changed_runs`]: a page, the unit a filesystem shares and copies on write.
pub const PAGE: usize = 4096;

/// The byte ranges (offset, length) where `new` differs from `old`, by whole [`PAGE`]s
/// (adjacent pages joined), for slices of the same length. Writing only these into a file
/// that already holds `old` (a reflink clone, or the file itself) gives `new` while the
/// other pages stay shared with the original.
pub fn changed_runs(old: &[u8], new: &[u8]) -> Vec<(usize, usize)> {
    debug_assert_eq!(old.len(), new.len());
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, (a, b)) in old.chunks(PAGE).zip(new.chunks(PAGE)).enumerate() {
        if a == b {
            continue;
        }
        let at = i * PAGE;
        match runs.last_mut() {
            Some((off, n)) if *off + *n == at => *n += b.len(),
            _ => runs.push((at, b.len())),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, RngCore, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    fn roundtrip(base: &[u8], new: &[u8]) -> usize {
        let p = SigParams::for_len(base.len() as u64);
        let sig = join_signatures(&[(&chunk_signature(base, p), base.len())], p).unwrap();
        let delta = diff(&sig.index(), new).unwrap();
        assert_eq!(apply(base, &delta, new.len()).unwrap(), new);
        delta.len()
    }

    #[test]
    fn params_scale_with_size() {
        assert_eq!(SigParams::for_len(0).block_size, MIN_BLOCK);
        assert_eq!(SigParams::for_len(64 << 20).block_size, 8192);
        let g = SigParams::for_len(1 << 30);
        assert_eq!(g.block_size, 32768);
        assert_eq!(g.strong_len, 6);
        assert_eq!(SigParams::for_len(1 << 40).block_size, MAX_BLOCK);
        for len in [0u64, 1, 1000, 1 << 20, 1 << 34, u64::MAX / 2] {
            SigParams::for_len(len).validate().unwrap();
        }
        assert!(
            SigParams {
                block_size: 0,
                strong_len: 8
            }
            .validate()
            .is_err()
        );
        assert!(
            SigParams {
                block_size: 4096,
                strong_len: 17
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn seeded_edits_roundtrip_and_stay_small() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for round in 0..20u64 {
            let len = rng.random_range(1..300_000);
            let base = random(len, round);
            let mut new = base.clone();
            for _ in 0..rng.random_range(0..5) {
                let at = rng.random_range(0..new.len().max(1));
                let (end, insert) = match rng.random_range(0..3) {
                    0 => (at, random(rng.random_range(1..500), round + 100)),
                    1 => ((at + rng.random_range(1..500)).min(new.len()), vec![]),
                    _ => ((at + 100).min(new.len()), random(100, round + 200)),
                };
                new.splice(at..end, insert);
            }
            let d = roundtrip(&base, &new);
            if len > 100_000 {
                assert!(d < len / 4, "delta {d} for {len} bytes");
            }
        }
    }

    #[test]
    fn insertion_and_deletion_in_the_middle_are_found() {
        let base = random(1 << 20, 9);
        let mut ins = base.clone();
        ins.splice(500_000..500_000, random(3000, 10));
        assert!(roundtrip(&base, &ins) < 3000 + 4 * 1024 + 200);
        let mut del = base.clone();
        del.drain(300_000..303_000);
        assert!(roundtrip(&base, &del) < 2 * 1024 + 200);
    }

    #[test]
    fn chunk_signatures_concatenate() {
        let p = SigParams {
            block_size: 4096,
            strong_len: 8,
        };
        let c = CHUNK as usize;
        let base = random(2 * c + 5000, 3);
        let parts: Vec<Vec<u8>> = base.chunks(c).map(|ch| chunk_signature(ch, p)).collect();
        let joined =
            join_signatures(&[(&parts[0], c), (&parts[1], c), (&parts[2], 5000)], p).unwrap();
        assert_eq!(joined.serialized(), chunk_signature(&base, p).as_slice());
        // A part with the wrong coverage or parameters is refused.
        assert!(join_signatures(&[(&parts[2], c)], p).is_err());
        let other = SigParams {
            block_size: 2048,
            strong_len: 8,
        };
        assert!(join_signatures(&[(&parts[0], c)], other).is_err());
    }

    #[test]
    fn hostile_deltas_fail_cleanly() {
        let base = random(10_000, 4);
        let p = SigParams::for_len(10_000);
        let sig = join_signatures(&[(&chunk_signature(&base, p), base.len())], p).unwrap();
        let delta = diff(&sig.index(), &base).unwrap();
        assert!(apply(&base, &delta, 9_999).is_err());
        assert!(matches!(
            apply(&base, &delta, 10_001),
            Err(DeltaError::WrongLength { .. })
        ));
        assert!(apply(&base, &delta[..delta.len() - 1], 10_000).is_err());
        assert!(apply(&base[..100], &delta, 10_000).is_err());
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..2000 {
            let mut junk = delta.clone();
            let i = rng.random_range(0..junk.len());
            junk[i] = rng.random();
            let _ = apply(&base, &junk, 10_000); // must not panic
        }
    }

    #[test]
    fn trimmed_deltas_rebuild_exactly_their_range() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for round in 0..30u64 {
            let base = random(rng.random_range(5_000..200_000), round);
            let mut new = base.clone();
            let at = rng.random_range(0..new.len());
            new.splice(at..at, random(rng.random_range(1..3000), round + 50));
            let p = SigParams::for_len(base.len() as u64);
            let sig = join_signatures(&[(&chunk_signature(&base, p), base.len())], p).unwrap();
            let full = diff(&sig.index(), &new).unwrap();
            let from = rng.random_range(0..new.len() as u64);
            let to = rng.random_range(from..=new.len() as u64);
            let t = trim(&full, from, to).unwrap();
            let got = apply(&base, &t.delta, (to - from) as usize).unwrap();
            assert_eq!(got, &new[from as usize..to as usize]);
            assert_eq!(t.literal + t.copied, to - from);
            let whole = trim(&full, 0, new.len() as u64).unwrap();
            assert_eq!(apply(&base, &whole.delta, new.len()).unwrap(), new);
        }
        assert!(trim(b"junk", 0, 1).is_err());
        assert!(trim(&[0x72, 0x73, 0x02, 0x36, 0x41], 0, 1).is_err());
    }

    #[test]
    fn shifted_content_costs_no_block_per_chunk_with_overlap() {
        // Two neighbouring pieces of a shifted file, each diffed with a block of overlap and
        // trimmed: together they carry little more than the inserted bytes.
        let p = SigParams {
            block_size: 4096,
            strong_len: 8,
        };
        let base = random(400_000, 12);
        let mut new = base.clone();
        new.splice(1000..1000, random(300, 13));
        let sig = join_signatures(&[(&chunk_signature(&base, p), base.len())], p).unwrap();
        let index = sig.index();
        let mid = 200_000u64;
        let ov = u64::from(p.block_size) - 1;
        let a = trim(&diff(&index, &new[..(mid + ov) as usize]).unwrap(), 0, mid).unwrap();
        let b_in = &new[(mid - ov) as usize..];
        let b = trim(&diff(&index, b_in).unwrap(), ov, b_in.len() as u64).unwrap();
        assert!(
            a.literal + b.literal < 300 + 2 * 4096,
            "{} + {}",
            a.literal,
            b.literal
        );
        // The second piece is shifted old content; only the base's final partial block (which
        // no rsync diff can match) is literal.
        assert_eq!(b.literal, base.len() as u64 % 4096);
    }

    #[test]
    fn probe_finds_old_content_at_any_shift_and_rejects_new() {
        let p = SigParams {
            block_size: 4096,
            strong_len: 8,
        };
        let base = random(1 << 20, 20);
        let sig = join_signatures(&[(&chunk_signature(&base, p), base.len())], p).unwrap();
        let index = sig.index();
        assert!(!probably_matches(&index, &random(1 << 20, 21), 4096));
        for shift in [0usize, 1, 777, 4095] {
            let mut new = random(shift, 22);
            new.extend_from_slice(&base[..base.len() - shift]);
            assert!(probably_matches(&index, &new, 4096), "shift {shift}");
        }
        // Half old, half new: still worth diffing.
        let mut half = random(1 << 19, 23);
        half.extend_from_slice(&base[1 << 19..]);
        assert!(probably_matches(&index, &half, 4096));
        let lit = literal(b"hello");
        assert_eq!(apply(&base, &lit, 5).unwrap(), b"hello");
    }

    #[test]
    fn windows_cover_neighbours() {
        assert_eq!(window_for(0, 10), (0, 2));
        assert_eq!(window_for(5, 10), (4, 3));
        assert_eq!(window_for(9, 10), (8, 2));
        assert_eq!(window_for(15, 10), (8, 2));
        assert_eq!(window_for(0, 1), (0, 1));
        assert_eq!(signature_request(&[3], 100, 100), Some(vec![2, 3, 4]));
        assert_eq!(signature_request(&[3, 4], 100, 100), Some(vec![2, 3, 4, 5]));
        assert_eq!(
            signature_request(&(0..30).collect::<Vec<_>>(), 100, 100),
            None
        );
        assert_eq!(
            window_bytes(8, 2, 9 * CHUNK + 7),
            (8 * CHUNK, 9 * CHUNK + 7)
        );
    }

    #[test]
    fn changed_runs_are_whole_pages_joined_when_adjacent() {
        let old = random(10 * PAGE + 100, 11);
        assert!(changed_runs(&old, &old).is_empty());
        let mut new = old.clone();
        new[5] ^= 1; // page 0
        new[3 * PAGE + 7] ^= 1; // pages 3 and 4, joined
        new[4 * PAGE] ^= 1;
        new[10 * PAGE + 99] ^= 1; // the short last page
        assert_eq!(
            changed_runs(&old, &new),
            vec![(0, PAGE), (3 * PAGE, 2 * PAGE), (10 * PAGE, 100)]
        );
        // Applying the runs to the old bytes rebuilds the new ones.
        let mut out = old.clone();
        for (off, n) in changed_runs(&old, &new) {
            out[off..off + n].copy_from_slice(&new[off..off + n]);
        }
        assert_eq!(out, new);
        let other: Vec<u8> = old.iter().map(|b| !b).collect();
        assert_eq!(changed_runs(&old, &other), vec![(0, old.len())]);
    }
}
