//! Hot paths of the engine, one core unless noted: signature, diff, apply, chunk hashing, delta
//! trimming, and the parallel scan. `cargo bench --bench engine`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use devsync::engine::delta::{self, SigParams};
use devsync::engine::hash;
use devsync::engine::scan::{ScanOptions, scan_to_vec};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// A base and a new version with a few scattered edits and one insertion.
fn pair(len: usize) -> (Vec<u8>, Vec<u8>) {
    let base = random(len, 1);
    let mut new = base.clone();
    for at in [len / 7, len / 3, len / 2] {
        new[at..at + 100].copy_from_slice(&random(100, at as u64));
    }
    new.splice(len * 3 / 4..len * 3 / 4, random(777, 2));
    (base, new)
}

fn signature(c: &mut Criterion) {
    let mut g = c.benchmark_group("signature");
    let data = random(hash::CHUNK as usize, 3);
    for block in [2048u32, 8192, 32768] {
        let p = SigParams {
            block_size: block,
            strong_len: 6,
        };
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_with_input(BenchmarkId::new("4MiB_chunk", block), &p, |b, &p| {
            b.iter(|| delta::chunk_signature(black_box(&data), p))
        });
    }
    g.finish();
}

fn diff_and_apply(c: &mut Criterion) {
    let len = 16 << 20;
    let (base, new) = pair(len);
    let p = SigParams::for_len(len as u64);
    let sig =
        delta::join_signatures(&[(&delta::chunk_signature(&base, p), base.len())], p).unwrap();
    let index = sig.index();
    let d = delta::diff(&index, &new).unwrap();
    let mut g = c.benchmark_group("delta");
    g.throughput(Throughput::Bytes(new.len() as u64));
    g.bench_function("diff_16MiB_few_edits", |b| {
        b.iter(|| delta::diff(black_box(&index), black_box(&new)).unwrap())
    });
    let fresh = random(len, 9);
    g.bench_function("diff_16MiB_all_new", |b| {
        b.iter(|| delta::diff(black_box(&index), black_box(&fresh)).unwrap())
    });
    g.bench_function("probe_16MiB_all_new", |b| {
        b.iter(|| {
            fresh
                .chunks(hash::CHUNK as usize)
                .any(|c| delta::probably_matches(black_box(&index), c, p.block_size))
        })
    });
    g.bench_function("apply_16MiB", |b| {
        b.iter(|| delta::apply(black_box(&base), black_box(&d), new.len()).unwrap())
    });
    g.bench_function("trim_16MiB_delta", |b| {
        b.iter(|| delta::trim(black_box(&d), 1 << 20, 5 << 20).unwrap())
    });
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let data = random(hash::CHUNK as usize, 4);
    let mut g = c.benchmark_group("blake3");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("chunk_cv_4MiB", |b| {
        b.iter(|| hash::chunk_cv(7, black_box(&data)))
    });
    // What the delta receiver does for a chunk it writes: stream it out of the mapping of its
    // own file through a small buffer, hashing each piece (here written nowhere).
    g.bench_function("stream_cv_4MiB", |b| {
        b.iter(|| {
            hash::stream_cv(7, black_box(&data), |_, p| {
                black_box(p);
                Ok(())
            })
            .unwrap()
        })
    });
    g.finish();
    let td = tempfile::tempdir().unwrap();
    let path = td.path().join("f");
    std::fs::write(&path, random(64 << 20, 5)).unwrap();
    let f = std::fs::File::open(&path).unwrap();
    let mut g = c.benchmark_group("blake3_file");
    g.throughput(Throughput::Bytes(64 << 20));
    g.bench_function("file_digest_64MiB_parallel", |b| {
        b.iter(|| hash::file_digest(&f, 64 << 20).unwrap())
    });
    g.finish();
}

fn scan(c: &mut Criterion) {
    let td = tempfile::tempdir().unwrap();
    let n = 5000;
    for i in 0..n {
        let d = td.path().join(format!("d{}/e{}", i % 50, i % 7));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("f{i}.rs")), b"fn main() {}\n").unwrap();
    }
    std::fs::write(td.path().join(".gitignore"), "*.o\ntarget/\n").unwrap();
    let mut g = c.benchmark_group("scan");
    g.throughput(Throughput::Elements(n));
    g.bench_function("5k_files_gitignore", |b| {
        b.iter(|| scan_to_vec(td.path(), &ScanOptions::default()).unwrap())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = signature, diff_and_apply, hashing, scan
}
criterion_main!(benches);
